//! Memory-mapped checkpoint reading with shape and dtype checks: safetensors,
//! and official PyTorch `.pth` files (see `pth.rs`), told apart by content.
//!
//! The file is mapped, never read into RAM as a whole: tensors are handed out
//! as borrowed byte slices of the mapping, and the GPU upload copies each one
//! straight into a mapped GPU buffer. Dropping the `SafeTensorsFile` releases
//! the mapping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensorError;

use crate::error::{Error, Result};
pub use crate::tensor::{Dtype, Tensor};

pub mod hf;
pub mod pth;

struct Entry {
    dtype: std::result::Result<Dtype, String>,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The bytes of a checkpoint: a file mapping, or data built into the binary.
enum Backing {
    /// The mapping, and the file for positioned reads.
    Mmap(Mmap, std::fs::File),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m, _) => m,
            Backing::Static(s) => s,
            Backing::Owned(v) => v,
        }
    }
}

/// An opened, validated checkpoint: a safetensors file or a PyTorch `.pth`
/// (the name is historical; both are read the same way from then on).
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Backing,
    entries: HashMap<String, Entry>,
    /// The safetensors header's `__metadata__` (empty for a `.pth`).
    metadata: HashMap<String, String>,
}

impl SafeTensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io { path: path.clone(), error: source };
        let file = crate::files::open_regular(&path)?;
        // SAFETY: the mapping is read-only; a file changed underneath us while
        // loading can give wrong weights but not memory unsafety in our code,
        // which only ever copies bytes out of it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Backing::Mmap(mmap, file))
    }

    /// A checkpoint in an open file (e.g. [`crate::files::unnamed_file`]);
    /// `name` stands in for the path in errors.
    pub fn from_file(file: std::fs::File, name: &str) -> Result<Self> {
        let path = PathBuf::from(name);
        // SAFETY: as in `open`: a read-only mapping we only copy bytes out of.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.clone(), error: source })?;
        Self::parse(path, Backing::Mmap(mmap, file))
    }

    /// A checkpoint (or state file) held in memory; `name` stands in for
    /// the path in errors.
    pub fn from_vec(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(PathBuf::from(name), Backing::Owned(bytes))
    }

    /// A checkpoint held in memory for the life of the program (e.g. a model
    /// embedded with `include_bytes!`); `name` stands in for the path in errors.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self> {
        Self::parse(PathBuf::from(name), Backing::Static(bytes))
    }

    fn parse(path: PathBuf, mmap: Backing) -> Result<Self> {
        if pth::is_zip(&mmap) {
            let tensors = pth::index(&mmap).map_err(|detail| Error::BadPth { path: path.clone(), detail })?;
            let entries = tensors
                .into_iter()
                .map(|t| (t.name, Entry { dtype: t.dtype, shape: t.shape, start: t.start, end: t.end }))
                .collect();
            return Ok(Self { path, mmap, entries, metadata: HashMap::new() });
        }
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| header_error(&path, mmap.len(), e))?;
        let data_start = 8 + header_len;
        let header_metadata = metadata.metadata().clone().unwrap_or_default();
        let mut entries = HashMap::new();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => Ok(Dtype::F32),
                safetensors::Dtype::F16 => Ok(Dtype::F16),
                safetensors::Dtype::BF16 => Ok(Dtype::BF16),
                other => Err(format!("{other:?}")),
            };
            let (a, b) = info.data_offsets;
            entries
                .insert(name, Entry { dtype, shape: info.shape.clone(), start: data_start + a, end: data_start + b });
        }
        Ok(Self { path, mmap, entries, metadata: header_metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Tells the OS it may drop the pages of `t` from memory (they are
    /// re-read from the file if touched again). No effect on built-in bytes.
    pub fn release(&self, t: &Tensor) {
        self.release_bytes(t.bytes);
    }

    /// As [`SafeTensorsFile::release`] for any byte range of this file's
    /// mapping (whole pages inside it); no effect on other memory.
    pub fn release_bytes(&self, bytes: &[u8]) {
        #[cfg(unix)]
        if let Backing::Mmap(m, _) = &self.mmap {
            let (base, ptr) = (m.as_ptr() as usize, bytes.as_ptr() as usize);
            if ptr < base || ptr + bytes.len() > base + m.len() {
                return;
            }
            let start = ptr - base;
            let page = 4096;
            // Whole pages inside the range only.
            let first = start.next_multiple_of(page);
            let end = (start + bytes.len()) / page * page;
            if end > first {
                // SAFETY: the mapping is read-only and file-backed: dropped
                // pages are read again from the file on the next access, so
                // no data is lost and no reference is invalidated.
                unsafe {
                    let _ = m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first);
                }
            }
        }
        #[cfg(not(unix))]
        let _ = bytes;
    }

    /// Copies `out.len()` bytes of tensor `t` from byte `offset` on, with a
    /// positioned read of the file rather than through the mapping, so the
    /// pages read (and the kernel's fault-around neighbours) do not become
    /// resident memory of this process. Used for embedding rows.
    pub fn read_into(&self, t: &Tensor, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = t
            .bytes
            .get(offset..offset + out.len())
            .ok_or_else(|| Error::InvalidArgument(format!("{}: bytes {offset}.. out of range", t.name)))?;
        match &self.mmap {
            #[cfg(unix)]
            Backing::Mmap(m, file) => {
                use std::os::unix::fs::FileExt;
                let at = (src.as_ptr() as usize - m.as_ptr() as usize) as u64;
                file.read_exact_at(out, at).map_err(|source| Error::Io { path: self.path.clone(), error: source })
            }
            _ => {
                out.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.entries.values().map(|e| (e.end - e.start) as u64).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// A tensor of any shape; errors if missing or of an unsupported dtype.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        let (key, e) = self.entries.get_key_value(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        let dtype = e.dtype.clone().map_err(|dtype| Error::UnsupportedDtype { name: name.into(), dtype })?;
        Ok(Tensor { name: key, dtype, shape: &e.shape, bytes: &self.mmap[e.start..e.end] })
    }

    /// The header's `__metadata__` entries.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The element type of a tensor as the file names it (`F16`, `U8`, ..).
    pub fn dtype_name(&self, name: &str) -> Option<String> {
        self.entries.get(name).map(|e| match &e.dtype {
            Ok(d) => d.name().to_string(),
            Err(other) => other.clone(),
        })
    }

    /// The bytes of a `U8` tensor of exactly `shape` (a pre-quantized
    /// file's codes).
    pub fn expect_u8(&self, name: &str, shape: &[usize]) -> Result<&[u8]> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        if e.dtype.as_ref().err().map(String::as_str) != Some("U8") {
            let dtype = self.dtype_name(name).unwrap_or_default();
            return Err(Error::UnsupportedDtype { name: format!("{name} (quantized codes must be U8)"), dtype });
        }
        if e.shape != shape {
            return Err(Error::ShapeMismatch { name: name.into(), expected: shape.to_vec(), found: e.shape.clone() });
        }
        Ok(&self.mmap[e.start..e.end])
    }

    /// A tensor that must have exactly `shape`.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<Tensor<'_>> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch { name: name.into(), expected: shape.to_vec(), found: t.shape.to_vec() });
        }
        Ok(t)
    }
}

/// Writes every float tensor of `src` (a `.pth` or a safetensors file) to a
/// safetensors file at `out`, names, dtypes and bytes unchanged, streaming
/// from the mapping (the checkpoint is never copied into memory whole).
/// Returns the number of tensors written and the names of those skipped
/// (integer or f64 tensors, which no RWKV weight is).
///
/// The output is written atomically ([`crate::files::write_atomic`]): never
/// over the input itself, and an existing file only with `Overwrite::Replace`.
pub fn convert_to_safetensors(
    src: &SafeTensorsFile,
    out: &Path,
    overwrite: crate::files::Overwrite,
) -> Result<(usize, Vec<String>)> {
    let mut names: Vec<&str> = src.names().collect();
    names.sort_unstable();
    let mut views = Vec::with_capacity(names.len());
    let mut skipped = Vec::new();
    for name in &names {
        let t = match src.get(name) {
            Ok(t) => t,
            Err(Error::UnsupportedDtype { .. }) => {
                skipped.push(name.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        let dtype = match t.dtype {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::BF16 => safetensors::Dtype::BF16,
        };
        let view = safetensors::tensor::TensorView::new(dtype, t.shape.to_vec(), t.bytes)
            .map_err(|e| Error::InvalidArgument(format!("tensor `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    let source = src.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("converted_from".to_string(), source)]);
    let written = views.len();
    crate::files::write_atomic(out, &[src.path()], overwrite, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| Error::InvalidArgument(format!("writing {}: {e}", out.display())))
    })?;
    Ok((written, skipped))
}

/// A tensor to write: name, element type, shape, bytes.
type OutTensor<'a> = (String, safetensors::Dtype, Vec<usize>, std::borrow::Cow<'a, [u8]>);

/// What [`quantize_file`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeSummary {
    /// Matrices stored as codes and scales, by scheme.
    pub quantized: Vec<(crate::quant::Scheme, usize)>,
    /// Tensors copied as they were (vectors, the embedding, LoRAs, and
    /// matrices whose columns no block divides).
    pub copied: usize,
    /// Tensors of other element types, left out (as `convert` does).
    pub skipped: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Writes `src` (a `.pth` or safetensors checkpoint) to a safetensors
/// file at `out` with its matrices quantized to `format` in the layout of
/// [`crate::quant::FILE_VERSION`] (the metadata names the format and the
/// version). A matrix is a 2-D `*.weight` tensor other than the embedding
/// (which is read by row from the file and stays in floats); each is
/// quantized a block of rows at a time from the mapping. Written atomically,
/// never over the input ([`crate::files::write_atomic`]).
pub fn quantize_file(
    src: &SafeTensorsFile,
    out: &Path,
    format: crate::quant::Format,
    overwrite: crate::files::Overwrite,
) -> Result<QuantizeSummary> {
    use crate::quant::{quantize_bytes, Scheme, FILE_FORMAT_KEY, FILE_VERSION, FILE_VERSION_KEY};
    if let Some(f) = crate::quant::file_format(src.metadata())? {
        return Err(Error::InvalidArgument(format!(
            "{} is already quantized ({f}): quantize the float checkpoint",
            src.path().display()
        )));
    }
    let mut names: Vec<&str> = src.names().collect();
    names.sort_unstable();
    // The quantized tensors owned, the rest borrowed from the mapping.
    let mut tensors: Vec<OutTensor> = Vec::new();
    let mut summary =
        QuantizeSummary { quantized: Vec::new(), copied: 0, skipped: Vec::new(), bytes_in: 0, bytes_out: 0 };
    for name in names {
        let t = match src.get(name) {
            Ok(t) => t,
            Err(Error::UnsupportedDtype { .. }) => {
                summary.skipped.push(name.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        summary.bytes_in += t.bytes.len() as u64;
        let matrix = t.shape.len() == 2 && name.ends_with(".weight") && name != "emb.weight";
        let scheme = if matrix { Scheme::for_cols(format, t.shape[1]) } else { None };
        if let Some(scheme) = scheme {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let q = quantize_bytes(scheme, t.dtype, t.bytes, rows, cols)?;
            src.release(&t);
            let scales: Vec<u8> = bytemuck::cast_slice(&q.scales).to_vec();
            let code_cols = cols * format.bits() / 8;
            tensors.push((name.to_string(), safetensors::Dtype::U8, vec![rows, code_cols], q.codes.into()));
            tensors.push((
                format!("{name}.scales"),
                safetensors::Dtype::F16,
                vec![rows, cols / scheme.block],
                scales.into(),
            ));
            match summary.quantized.iter_mut().find(|(s, _)| *s == scheme) {
                Some((_, n)) => *n += 1,
                None => summary.quantized.push((scheme, 1)),
            }
        } else {
            let dtype = match t.dtype {
                Dtype::F32 => safetensors::Dtype::F32,
                Dtype::F16 => safetensors::Dtype::F16,
                Dtype::BF16 => safetensors::Dtype::BF16,
            };
            tensors.push((name.to_string(), dtype, t.shape.to_vec(), t.bytes.into()));
            summary.copied += 1;
        }
    }
    summary.bytes_out = tensors.iter().map(|t| t.3.len() as u64).sum();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, bytes) in &tensors {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| Error::InvalidArgument(format!("tensor `{name}`: {e}")))?;
        views.push((name.clone(), view));
    }
    let source = src.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("converted_from".to_string(), source),
        (FILE_FORMAT_KEY.to_string(), format.name().to_string()),
        (FILE_VERSION_KEY.to_string(), FILE_VERSION.to_string()),
    ]);
    crate::files::write_atomic(out, &[src.path()], overwrite, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| Error::InvalidArgument(format!("writing {}: {e}", out.display())))
    })?;
    Ok(summary)
}

fn header_error(path: &Path, file_len: usize, e: SafeTensorError) -> Error {
    let path = path.to_path_buf();
    match e {
        SafeTensorError::HeaderTooSmall => {
            Error::TruncatedFile { path, detail: format!("{file_len} bytes, shorter than the 8-byte header length") }
        }
        SafeTensorError::InvalidHeaderLength => Error::TruncatedFile {
            path,
            detail: format!("the header length runs past the end of the file ({file_len} bytes)"),
        },
        SafeTensorError::MetadataIncompleteBuffer => Error::TruncatedFile {
            path,
            detail: format!("the tensor data does not match the file size ({file_len} bytes)"),
        },
        // A header length larger than the file or absurdly large: not a
        // safetensors file at all (a text file, an image, ...).
        SafeTensorError::HeaderTooLarge => Error::BadHeader {
            path,
            detail: format!(
                "not a safetensors or PyTorch .pth file ({file_len} bytes; its first 8 bytes are no header length)"
            ),
        },
        other => Error::BadHeader { path, detail: other.to_string() },
    }
}
