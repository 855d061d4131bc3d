//! Block quantization of weight matrices: the CPU quantizers, their exact
//! dequantization, and the row layout the GPU kernels
//! (`linear_q_tex.wgsl`, `linear_q.wgsl`) read.
//!
//! A `[rows, cols]` matrix is cut along its input dimension (`cols`) into
//! blocks of `block` weights; each block keeps one f16 scale `s` and one
//! code per weight, and a weight reads back as `code · s` (exact in f32: a
//! code times an f16 fits f32's mantissa):
//! - `Int8`: symmetric absmax, codes −127..=127, `s ≥ absmax / 127` (the
//!   f16 nearest the ideal, rounded up when nearest is below it, so no code
//!   is clamped and every weight is within half a step);
//! - `Q4`: llama.cpp's Q4_0 codes −8..=7 (two per byte, stored as `c + 8`)
//!   with a signed scale: the block's largest-magnitude weight `m` maps near
//!   code −8, and of the scales `m / t` for t on a grid from −6.5 to −9.5
//!   (steps of 1/8; beyond −8 a few outliers are clamped to −8 or 7) the
//!   one with the least squared error is kept.
//!
//! Why these (Austen RWKV-7 perplexity, f16 44.818; `docs/performance.md`):
//! int8 with blocks of 32 or 64 costs nothing measurable; for 4 bits,
//! symmetric absmax −7..7 cost +1.7 %, NF4 (QLoRA's normal-quantile levels)
//! +0.65 %, Q4_0 with the signed absmax scale +0.5 % and with the searched
//! scale −0.1 % (blocks of 32) / +0.2 % (64). Q4's codes also decode with a
//! shift, a mask and a conversion, where NF4 needs a 16-entry table lookup
//! per weight (a gather per lane on CPU adapters).

use half::f16;

use crate::error::{Error, Result};
use crate::tensor::Dtype;

/// A code format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Int8,
    Q4,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Int8 => "int8",
            Format::Q4 => "q4",
        }
    }

    /// The format a `--quant`/`--to` argument names: `int8`, or `4bit`/`q4`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "int8" | "i8" | "q8" => Ok(Format::Int8),
            "4bit" | "q4" | "q4_0" => Ok(Format::Q4),
            _ => Err(Error::InvalidArgument(format!("unknown weight format {s:?}: int8 or 4bit (q4) are available"))),
        }
    }

    /// Bits of one code.
    pub fn bits(self) -> usize {
        match self {
            Format::Int8 => 8,
            Format::Q4 => 4,
        }
    }

    /// The block size this runtime uses for the format (see `Scheme::new`).
    pub fn default_block(self) -> usize {
        64
    }

    /// The value of code `c` in scale units.
    fn value(self, c: u8) -> f32 {
        match self {
            Format::Int8 => c as i8 as f32,
            Format::Q4 => (c & 15) as f32 - 8.0,
        }
    }

    /// The code nearest `v` (in scale units), clamped to the format's range.
    fn code(self, v: f32) -> u8 {
        match self {
            Format::Int8 => v.round().clamp(-127.0, 127.0) as i8 as u8,
            Format::Q4 => (v.round().clamp(-8.0, 7.0) + 8.0) as u8,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Format::parse(s)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A format and its block size along the input dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scheme {
    pub format: Format,
    pub block: usize,
}

impl Scheme {
    /// The scheme a matrix of `cols` inputs gets in `format`: the format's
    /// block where it divides the input, else blocks of 32 (a v7 LoRA's
    /// rank of 32 under blocks of 64); `None` where 32 does not divide it
    /// either (the matrix then stays in floats).
    pub fn for_cols(format: Format, cols: usize) -> Option<Self> {
        [format.default_block(), 32]
            .into_iter()
            .find(|&b| cols > 0 && cols.is_multiple_of(b))
            .map(|block| Self { format, block })
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.format.name(), self.block)
    }
}

/// How the elements of a weight matrix are stored on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Plain floats as in the checkpoint (f32, f16, bf16), widened exactly
    /// to f32 inside the kernels.
    Float(Dtype),
    /// Block-quantized codes and f16 scales, in the kernels' [`RowLayout`].
    Blocks(Scheme),
}

impl Encoding {
    /// The encoding a `[_, cols]` matrix of `dtype` gets when loaded with
    /// `quant`: that format's [`Scheme::for_cols`], else (no format, or
    /// columns no block divides) the checkpoint's floats.
    pub fn choose(quant: Option<Format>, dtype: Dtype, cols: usize) -> Self {
        match quant.and_then(|f| Scheme::for_cols(f, cols)) {
            Some(s) => Encoding::Blocks(s),
            None => Encoding::Float(dtype),
        }
    }

    /// Bytes of one row of `cols` weights on the GPU.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Encoding::Float(d) => cols * d.size(),
            Encoding::Blocks(s) => RowLayout::new(s, cols).row_bytes(),
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encoding::Float(d) => f.write_str(d.name()),
            Encoding::Blocks(s) => write!(f, "{s}"),
        }
    }
}

/// A quantized `[rows, cols]` matrix: codes row by row (int8: a byte each;
/// 4-bit: two a byte, the lower nibble first) and one scale per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub scheme: Scheme,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    /// `[rows, cols / block]`.
    pub scales: Vec<f16>,
}

impl Quantized {
    /// Bytes of codes and scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }

    fn code(&self, i: usize) -> u8 {
        match self.scheme.format.bits() {
            8 => self.codes[i],
            _ => (self.codes[i / 2] >> (4 * (i % 2))) & 15,
        }
    }

    /// The weights the codes stand for, `[rows, cols]` f32 (each exactly
    /// `value · scale`: a code value times an f16 fits f32's mantissa).
    pub fn dequantize(&self) -> Vec<f32> {
        let b = self.scheme.block;
        (0..self.rows * self.cols)
            .map(|i| self.scheme.format.value(self.code(i)) * self.scales[i / b].to_f32())
            .collect()
    }
}

/// Which axis of an official RWKV tensor is a matrix's input (the axis
/// blocks run along): 1 for a `[out, in]` projection or head (`*.weight`
/// of rank 2), 0 for a v7 LoRA stored `[in, out]` (`att.w1`, `att.w2`,
/// `a1`, `a2`, `v1`, `v2`, `g1`, `g2`); `None` for what is not a matrix
/// product's weight (vectors, `r_k`, the embedding, which is read by row).
pub fn input_axis(name: &str, shape: &[usize]) -> Option<usize> {
    if shape.len() != 2 || name == "emb.weight" {
        return None;
    }
    const LORAS: [&str; 8] = ["w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"];
    let last = name.rsplit('.').next().unwrap_or("");
    if name.contains(".att.") && LORAS.contains(&last) {
        Some(0)
    } else if last == "weight" {
        Some(1)
    } else {
        None
    }
}

/// An official RWKV tensor quantized by `scheme` and read back in its own
/// layout, if it is a matrix (see [`input_axis`]); `None` otherwise. Blocks
/// run along the input; an input the block does not divide (a v7 LoRA's 32
/// under blocks of 64) takes blocks of 32. For measuring a scheme's quality
/// with the float kernels (`examples/quant_quality.rs`).
pub fn round_trip(scheme: Scheme, name: &str, shape: &[usize], values: &[f32]) -> Result<Option<Vec<f32>>> {
    let Some(axis) = input_axis(name, shape) else { return Ok(None) };
    let (rows, cols) = if axis == 1 { (shape[0], shape[1]) } else { (shape[1], shape[0]) };
    let as_rows = if axis == 1 { values.to_vec() } else { transpose(values, shape[0], shape[1]) };
    let block = if cols.is_multiple_of(scheme.block) { scheme.block } else { 32 };
    let back = quantize(Scheme { block, ..scheme }, &as_rows, rows, cols)?.dequantize();
    Ok(Some(if axis == 1 { back } else { transpose(&back, rows, cols) }))
}

/// `[rows, cols]` to `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// The smallest f16 at least `x` (x finite, ≥ 0), or `None` past f16's range.
fn scale_up(x: f32) -> Option<f16> {
    let h = f16::from_f32(x);
    if !h.is_finite() {
        return None;
    }
    if h.to_f32() >= x {
        return Some(h);
    }
    let up = f16::from_bits(h.to_bits() + 1);
    up.is_finite().then_some(up)
}

/// Squared error of a block read back with scale `s` (codes by `f.code`).
fn block_error(f: Format, blk: &[f32], s: f32) -> f32 {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    blk.iter().map(|&v| (f.value(f.code(v * inv)) * s - v).powi(2)).sum()
}

/// Divisors of the Q4 scale search (`m / t`): −6.5 down to −9.5 in eighths.
const Q4_DIVISORS: std::ops::RangeInclusive<u32> = 52..=76;

/// The scale of one block (see the module notes).
fn block_scale(f: Format, k: usize, blk: &[f32]) -> Result<f16> {
    if blk.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!("block {k} of the matrix holds a non-finite weight")));
    }
    let m = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let too_large = || Error::InvalidArgument(format!("block {k}: weights up to {m} need a scale past f16's range"));
    match f {
        Format::Int8 => scale_up(m.abs() / 127.0).ok_or_else(too_large),
        Format::Q4 => {
            let mut best: Option<(f32, f16)> = None;
            for eighths in Q4_DIVISORS {
                let s = f16::from_f32(m / -(eighths as f32 / 8.0));
                if !s.is_finite() {
                    return Err(too_large());
                }
                let e = block_error(f, blk, s.to_f32());
                if best.is_none_or(|(b, _)| e < b) {
                    best = Some((e, s));
                }
            }
            Ok(best.expect("a non-empty grid").1)
        }
    }
}

/// Quantizes a `[rows, cols]` matrix; `cols` must be a multiple of the block.
pub fn quantize(scheme: Scheme, values: &[f32], rows: usize, cols: usize) -> Result<Quantized> {
    let b = scheme.block;
    if b == 0 || !cols.is_multiple_of(b) || values.len() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "quantizing a [{rows}, {cols}] matrix ({} values) in blocks of {b}: the columns must be a multiple of the block",
            values.len()
        )));
    }
    let f = scheme.format;
    let mut scales = Vec::with_capacity(rows * cols / b);
    let mut codes = vec![0u8; (rows * cols * f.bits()).div_ceil(8)];
    for (k, blk) in values.chunks_exact(b).enumerate() {
        let s = block_scale(f, k, blk)?;
        scales.push(s);
        let inv = if s.to_f32() != 0.0 { 1.0 / s.to_f32() } else { 0.0 };
        for (j, &v) in blk.iter().enumerate() {
            let c = f.code(v * inv);
            let i = k * b + j;
            match f.bits() {
                8 => codes[i] = c,
                _ => codes[i / 2] |= c << (4 * (i % 2)),
            }
        }
    }
    Ok(Quantized { scheme, rows, cols, codes, scales })
}

/// Quantizes a row-major `[rows, cols]` matrix of `dtype` read from `bytes`
/// (a checkpoint tensor), a row block at a time: the f32 copy never holds
/// more than one block of rows per thread. Row ranges run on the machine's
/// cores (the q4 scale search costs ~150 operations a weight); the result
/// does not depend on how they are split (each block is quantized alone).
pub fn quantize_bytes(scheme: Scheme, dtype: Dtype, bytes: &[u8], rows: usize, cols: usize) -> Result<Quantized> {
    if bytes.len() != rows * cols * dtype.size() {
        return Err(Error::InvalidArgument(format!(
            "quantizing [{rows}, {cols}] {}: {} bytes",
            dtype.name(),
            bytes.len()
        )));
    }
    const ROWS_AT_ONCE: usize = 256;
    let row_bytes = cols * dtype.size();
    let one_range = |r0: usize, r1: usize| -> Result<Quantized> {
        let mut out = Quantized { scheme, rows: r1 - r0, cols, codes: Vec::new(), scales: Vec::new() };
        for a in (r0..r1).step_by(ROWS_AT_ONCE) {
            let n = ROWS_AT_ONCE.min(r1 - a);
            let v = crate::tensor::widen(dtype, &bytes[a * row_bytes..(a + n) * row_bytes]);
            let q = quantize(scheme, &v, n, cols)?;
            out.codes.extend_from_slice(&q.codes);
            out.scales.extend_from_slice(&q.scales);
        }
        Ok(out)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.div_ceil(ROWS_AT_ONCE)).max(1);
    let per = rows.div_ceil(threads);
    let parts: Vec<Result<Quantized>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| (t * per, rows.min((t + 1) * per)))
            .map(|(a, b)| s.spawn(move || one_range(a, b)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("a quantizer thread panicked")).collect()
    });
    let mut out = Quantized { scheme, rows, cols, codes: Vec::new(), scales: Vec::new() };
    out.codes.reserve_exact(rows * cols * scheme.format.bits() / 8);
    out.scales.reserve_exact(rows * cols / scheme.block.max(1));
    for p in parts {
        let p = p?;
        out.codes.extend_from_slice(&p.codes);
        out.scales.extend_from_slice(&p.scales);
    }
    Ok(out)
}

/// Metadata key of a pre-quantized file (`rwkv quantize`): the format name.
pub const FILE_FORMAT_KEY: &str = "rwkv_wgpu.quant";
/// Metadata key of the layout version of a pre-quantized file.
pub const FILE_VERSION_KEY: &str = "rwkv_wgpu.quant_version";
/// The layout this runtime writes and reads: each quantized matrix (a 2-D
/// `*.weight` used as `x @ W.T`, the head included) stored under its
/// official name as `U8` codes `[rows, cols * bits / 8]` (int8: one byte
/// per code; q4: two codes a byte, c + 8, the lower nibble first), and
/// `NAME.scales`, `F16` `[rows, cols / block]`; every other tensor as in
/// the source.
pub const FILE_VERSION: u32 = 1;

/// The format of a checkpoint from its safetensors metadata: `None` for a
/// float checkpoint; an error naming what is wrong for a format or version
/// this runtime does not read (a newer writer, another tool's key).
pub fn file_format(metadata: &std::collections::HashMap<String, String>) -> Result<Option<Format>> {
    let Some(name) = metadata.get(FILE_FORMAT_KEY) else {
        return Ok(None);
    };
    let format = Format::parse(name).map_err(|_| {
        Error::InvalidArgument(format!(
            "pre-quantized file: unknown weight format {name:?} in its metadata ({FILE_FORMAT_KEY}); this \
             runtime reads int8 and q4 (written by a newer or another tool?)"
        ))
    })?;
    let version = metadata.get(FILE_VERSION_KEY);
    match version.map(|v| v.parse::<u32>()) {
        Some(Ok(FILE_VERSION)) => Ok(Some(format)),
        _ => Err(Error::InvalidArgument(format!(
            "pre-quantized {format} file: layout version {} ({FILE_VERSION_KEY}); this runtime reads version \
             {FILE_VERSION}",
            version.map_or("missing".to_string(), |v| format!("{v:?}"))
        ))),
    }
}

/// A pre-quantized matrix's scheme from its codes' and scales' shapes
/// (`[rows, code bytes]`, `[rows, blocks]`) for a `[rows, cols]` matrix in
/// `format`, checked: the block must be one this runtime runs (32 or 64).
pub fn file_scheme(format: Format, name: &str, rows: usize, cols: usize, scales: &[usize]) -> Result<Scheme> {
    let blocks = if scales.len() == 2 && scales[0] == rows { scales[1] } else { 0 };
    let block = if blocks > 0 && cols.is_multiple_of(blocks) { cols / blocks } else { 0 };
    if block != 32 && block != 64 {
        return Err(Error::ShapeMismatch {
            name: format!("{name}.scales ({format} blocks of 32 or 64 weights)"),
            expected: vec![rows, cols / 64],
            found: scales.to_vec(),
        });
    }
    Ok(Scheme { format, block })
}

/// Rows in the kernels' layout ([`RowLayout`]) from a pre-quantized file's
/// codes and f16 scale bytes (little-endian), as [`Quantized::gpu_rows`].
pub fn gpu_rows_from_parts(scheme: Scheme, rows: usize, cols: usize, codes: &[u8], scales: &[u8]) -> Result<Vec<u8>> {
    let layout = RowLayout::new(scheme, cols);
    let scale_row = 2 * cols / scheme.block;
    if codes.len() != rows * layout.code_bytes || scales.len() != rows * scale_row {
        return Err(Error::InvalidArgument(format!(
            "pre-quantized [{rows}, {cols}] {scheme}: {} code and {} scale bytes",
            codes.len(),
            scales.len()
        )));
    }
    let mut out = vec![0u8; rows * layout.row_bytes()];
    for (r, row) in out.chunks_exact_mut(layout.row_bytes()).enumerate() {
        row[..layout.code_bytes].copy_from_slice(&codes[r * layout.code_bytes..(r + 1) * layout.code_bytes]);
        row[layout.code_bytes..layout.code_bytes + scale_row]
            .copy_from_slice(&scales[r * scale_row..(r + 1) * scale_row]);
    }
    Ok(out)
}

/// A row-major `[rows, cols]` matrix of `dtype` from `bytes`, quantized
/// in the kernels' row layout ([`Quantized::gpu_rows`]) a block of rows at
/// a time: besides the result, at most one block of rows is held.
pub fn gpu_rows_from_bytes(scheme: Scheme, dtype: Dtype, bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    const ROWS_AT_ONCE: usize = 1024;
    let row_bytes = cols * dtype.size();
    if bytes.len() != rows * row_bytes {
        return Err(Error::InvalidArgument(format!(
            "quantizing [{rows}, {cols}] {}: {} bytes",
            dtype.name(),
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(rows * RowLayout::new(scheme, cols).row_bytes());
    for r0 in (0..rows).step_by(ROWS_AT_ONCE) {
        let n = ROWS_AT_ONCE.min(rows - r0);
        let q = quantize_bytes(scheme, dtype, &bytes[r0 * row_bytes..(r0 + n) * row_bytes], n, cols)?;
        out.extend_from_slice(&q.gpu_rows()?);
    }
    Ok(out)
}

/// The kernels' row layout of a quantized matrix: each row holds its codes
/// (`cols · bits / 8` bytes), then its f16 scales, padded to 16 bytes (one
/// texel or `vec4<u32>`; the codes of a row whose columns are a multiple of
/// 32 fill whole 16-byte words too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    pub code_bytes: usize,
    pub scale_bytes: usize,
}

impl RowLayout {
    pub fn new(scheme: Scheme, cols: usize) -> Self {
        let code_bytes = cols * scheme.format.bits() / 8;
        Self { code_bytes, scale_bytes: (2 * cols / scheme.block).next_multiple_of(16) }
    }

    pub fn row_bytes(&self) -> usize {
        self.code_bytes + self.scale_bytes
    }
}

impl Quantized {
    /// The rows in the kernels' layout ([`RowLayout`]); an error if the
    /// codes and scales do not fit the shape.
    pub fn gpu_rows(&self) -> Result<Vec<u8>> {
        gpu_rows_from_parts(self.scheme, self.rows, self.cols, &self.codes, bytemuck::cast_slice(&self.scales))
    }
}

/// The layout of `linear_qx_tex.wgsl` (CPU adapters with subgroups of 8):
/// int8 or Q4 in blocks of [`QX_BLOCK`], rows of W in groups of
/// [`QX_GROUP_ROWS`], one texture row per group. Per block of 64 inputs a
/// group row holds [`qx_block_texels`] texels of 16 bytes: the codes, then
/// the 8 rows' f16 scales, then the 8 rows' sums of their stored codes (u16),
/// which the kernel's integer sums need. Codes are stored non-negative,
/// n = code + 8 (Q4) or code + 128 (int8):
/// - Q4: texel t, u32 word c = input 4t + c of the block, nibble r = row r;
/// - int8: for inputs i..i+3 (i = 4s), texel 2s holds rows 0..3 and texel
///   2s + 1 rows 4..7, u32 word r % 4 = row r's bytes n[i+1], n[i+3], n[i],
///   n[i+2] (the order the kernel's two-term products need).
pub const QX_GROUP_ROWS: usize = 8;
/// The block of the `linear_qx_tex` layout.
pub const QX_BLOCK: usize = 64;

/// Texels of one block in a group row: the codes, the scales, the sums.
pub fn qx_block_texels(format: Format) -> usize {
    QX_BLOCK * QX_GROUP_ROWS * format.bits() / 128 + 2
}

/// Bytes of one group row of a matrix of `cols` inputs.
pub fn qx_group_row_bytes(format: Format, cols: usize) -> usize {
    cols / QX_BLOCK * qx_block_texels(format) * 16
}

/// Group rows (see [`QX_GROUP_ROWS`]) from `rows` rows of a `format`/64
/// matrix in [`RowLayout`]; a last group short of 8 rows is padded with
/// zero rows.
pub fn qx_groups(format: Format, layout_rows: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let layout = RowLayout::new(Scheme { format, block: QX_BLOCK }, cols);
    let rb = layout.row_bytes();
    if !cols.is_multiple_of(QX_BLOCK) || layout_rows.len() != rows * rb {
        return Err(Error::InvalidArgument(format!(
            "{format} groups of [{rows}, {cols}]: {} bytes in rows of {rb}",
            layout_rows.len()
        )));
    }
    let groups = rows.div_ceil(QX_GROUP_ROWS);
    let gb = qx_group_row_bytes(format, cols);
    let code_bytes = QX_BLOCK * QX_GROUP_ROWS * format.bits() / 8;
    let mut out = vec![0u8; groups * gb];
    for (g, grow) in out.chunks_exact_mut(gb).enumerate() {
        for r in 0..QX_GROUP_ROWS.min(rows - g * QX_GROUP_ROWS) {
            let row = &layout_rows[(g * QX_GROUP_ROWS + r) * rb..][..rb];
            for (b, blk) in grow.chunks_exact_mut(qx_block_texels(format) * 16).enumerate() {
                let mut sum = 0u16;
                for i in 0..QX_BLOCK {
                    let k = b * QX_BLOCK + i;
                    match format {
                        Format::Q4 => {
                            let n = (row[k / 2] >> (4 * (k % 2))) & 15;
                            sum += n as u16;
                            // Word i (texel i / 4, word i % 4), nibble r.
                            blk[4 * i + r / 2] |= n << (4 * (r % 2));
                        }
                        Format::Int8 => {
                            let n = row[k] ^ 0x80; // code + 128
                            sum += n as u16;
                            // Step i / 4: texel 2 (i / 4) + r / 4, word r % 4,
                            // byte [1, 3, 0, 2][i % 4] holds n[i].
                            let byte = [2, 0, 3, 1][i % 4];
                            blk[(2 * (i / 4) + r / 4) * 16 + (r % 4) * 4 + byte] = n;
                        }
                    }
                }
                let scale = layout.code_bytes + 2 * b;
                blk[code_bytes + 2 * r..code_bytes + 2 * r + 2].copy_from_slice(&row[scale..scale + 2]);
                blk[code_bytes + 16 + 2 * r..code_bytes + 18 + 2 * r].copy_from_slice(&sum.to_le_bytes());
            }
        }
    }
    Ok(out)
}

/// x quantized as `linear_qx_tex.wgsl` quantizes it for weights in
/// `format`, per block of 64 (as llama.cpp's Q8_0): each block's scale
/// `max |x| / L` (1 for a zero block) and codes `round(x / scale)` (to even;
/// the kernel multiplies by the f32 reciprocal, as here) in −L..=L, L = 127
/// (8 bits) for Q4 weights and 63 (7 bits) for int8, whose two-term integer
/// products need the room. The CPU reference of the kernel's products:
/// `x @ W.T` there is `Σ_blocks scale · sw · Σ code · c`.
pub fn quantize_x(format: Format, x: &[f32]) -> (Vec<i32>, Vec<f32>) {
    let levels = match format {
        Format::Int8 => 63,
        Format::Q4 => 127,
    };
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len().div_ceil(QX_BLOCK));
    for blk in x.chunks(QX_BLOCK) {
        let m = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if m == 0.0 { 1.0 } else { m / levels as f32 };
        let inv = 1.0 / s;
        codes.extend(blk.iter().map(|v| ((v * inv).round_ties_even() as i32).clamp(-levels, levels)));
        scales.push(s);
    }
    (codes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::sampler::SplitMix64(seed);
        // Roughly normal (sum of four uniforms), with an outlier per 97.
        (0..n)
            .map(|i| {
                let u: f32 = (0..4).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).sum();
                if i % 97 == 0 {
                    u * 20.0
                } else {
                    u * 0.05
                }
            })
            .collect()
    }

    const SCHEMES: [Scheme; 4] = [
        Scheme { format: Format::Int8, block: 32 },
        Scheme { format: Format::Int8, block: 64 },
        Scheme { format: Format::Q4, block: 32 },
        Scheme { format: Format::Q4, block: 64 },
    ];

    /// f32's rounding of x / s, relative to the largest code value (a few ulps:
    /// it can only move a weight at a rounding tie to the neighbouring code).
    const DIVISION_ULPS: f32 = 1e-6;

    /// int8 reads every weight back within half a step; Q4's searched scale
    /// never does worse (squared error per block) than the plain signed
    /// absmax scale `m / -8`; and codes re-quantized from the values they
    /// stand for are the same codes.
    #[test]
    fn round_trip_error_and_stability() {
        let (rows, cols) = (5, 192);
        let w = weights(rows * cols, 7);
        for scheme in SCHEMES {
            let q = quantize(scheme, &w, rows, cols).unwrap();
            assert_eq!(q.bytes(), rows * cols * scheme.format.bits() / 8 + 2 * rows * cols / scheme.block);
            let d = q.dequantize();
            for (k, (blk, back)) in w.chunks(scheme.block).zip(d.chunks(scheme.block)).enumerate() {
                let s = q.scales[k].to_f32();
                match scheme.format {
                    Format::Int8 => {
                        for (&x, &y) in blk.iter().zip(back) {
                            let bound = s * (0.5 + DIVISION_ULPS * 127.0);
                            assert!((x - y).abs() <= bound, "{scheme} block {k}: {x} read back as {y} (scale {s})");
                        }
                    }
                    Format::Q4 => {
                        let m = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                        let plain = f16::from_f32(m / -8.0).to_f32();
                        let e: f32 = blk.iter().zip(back).map(|(x, y)| (x - y).powi(2)).sum();
                        assert!(e <= block_error(Format::Q4, blk, plain), "{scheme} block {k}");
                    }
                }
            }
            let again = quantize(scheme, &d, rows, cols).unwrap();
            assert_eq!(again.dequantize(), d, "{scheme}: read back twice");
        }
    }

    #[test]
    fn scales_round_up_and_zero_blocks_are_zero() {
        for x in [1e-8f32, 0.1, 1.0 / 3.0, 1000.0, 65504.0] {
            let s = scale_up(x).unwrap();
            assert!(s.to_f32() >= x && f16::from_bits(s.to_bits() - 1).to_f32() < x, "{x} -> {s}");
        }
        assert!(scale_up(1e6).is_none());
        for scheme in SCHEMES {
            let q = quantize(scheme, &[0.0; 128], 2, 64).unwrap();
            assert!(q.dequantize().iter().all(|&v| v == 0.0));
        }
        // Q4: every code value is reachable and reads back exactly.
        let levels: Vec<f32> = (-8..8).map(|c| c as f32 * 0.25).collect();
        let mut v = levels.clone();
        v.extend(&levels);
        let q = quantize(Scheme { format: Format::Q4, block: 32 }, &v, 1, 32).unwrap();
        assert_eq!(q.dequantize(), v);
    }

    #[test]
    fn gpu_rows_hold_codes_then_scales() {
        let (rows, cols) = (3, 96);
        let w = weights(rows * cols, 11);
        for scheme in [Scheme { format: Format::Int8, block: 32 }, Scheme { format: Format::Q4, block: 32 }] {
            let q = quantize(scheme, &w, rows, cols).unwrap();
            let layout = RowLayout::new(scheme, cols);
            assert_eq!(layout.scale_bytes, 16, "3 scales padded to 16 bytes");
            let g = q.gpu_rows().unwrap();
            assert_eq!(g.len(), rows * layout.row_bytes());
            for r in 0..rows {
                let row = &g[r * layout.row_bytes()..(r + 1) * layout.row_bytes()];
                assert_eq!(&row[..layout.code_bytes], &q.codes[r * layout.code_bytes..(r + 1) * layout.code_bytes]);
                for b in 0..3 {
                    let s = f16::from_le_bytes([row[layout.code_bytes + 2 * b], row[layout.code_bytes + 2 * b + 1]]);
                    assert_eq!(s, q.scales[r * 3 + b]);
                }
                assert!(row[layout.code_bytes + 6..].iter().all(|&b| b == 0));
            }
        }
        // Quantizing from checkpoint bytes row block by row block is the same.
        let bytes: Vec<u8> = w.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let wide: Vec<f32> = w.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        let s = Scheme { format: Format::Q4, block: 32 };
        assert_eq!(quantize_bytes(s, Dtype::F16, &bytes, rows, cols).unwrap(), quantize(s, &wide, rows, cols).unwrap());
        assert!(quantize_bytes(s, Dtype::F16, &bytes[2..], rows, cols).is_err());
    }

    /// The `linear_qx_tex` group rows read back, by the layout its docs
    /// state, as the codes, scales and code sums of each row (the last group
    /// padded with zero rows).
    #[test]
    fn qx_groups_hold_codes_scales_and_sums() {
        let (rows, cols) = (13, 128);
        let w = weights(rows * cols, 5);
        for format in [Format::Int8, Format::Q4] {
            let q = quantize(Scheme { format, block: QX_BLOCK }, &w, rows, cols).unwrap();
            let g = qx_groups(format, &q.gpu_rows().unwrap(), rows, cols).unwrap();
            let gb = qx_group_row_bytes(format, cols);
            assert_eq!(g.len(), 2 * gb, "{format}: two groups of 8 rows");
            let bt = qx_block_texels(format) * 16;
            for r in 0..16 {
                let grow = &g[(r / 8) * gb..][..gb];
                let rr = r % 8;
                for b in 0..cols / QX_BLOCK {
                    let blk = &grow[b * bt..(b + 1) * bt];
                    let mut sum = 0u16;
                    for i in 0..QX_BLOCK {
                        let n = match format {
                            Format::Q4 => (blk[4 * i + rr / 2] >> (4 * (rr % 2))) & 15,
                            Format::Int8 => {
                                let word = &blk[(2 * (i / 4) + rr / 4) * 16 + (rr % 4) * 4..][..4];
                                word[[2, 0, 3, 1][i % 4]]
                            }
                        };
                        sum += n as u16;
                        let code = if r < rows { q.code(r * cols + b * QX_BLOCK + i) } else { 0 };
                        let want = match format {
                            Format::Q4 => code,
                            Format::Int8 if r < rows => code ^ 0x80,
                            Format::Int8 => 0,
                        };
                        assert_eq!(n, want, "{format} row {r} input {}", b * QX_BLOCK + i);
                    }
                    let at = bt - 32;
                    let scale = f16::from_le_bytes([blk[at + 2 * rr], blk[at + 2 * rr + 1]]);
                    let want = if r < rows { q.scales[r * (cols / QX_BLOCK) + b] } else { f16::ZERO };
                    assert_eq!(scale, want, "{format} row {r} block {b} scale");
                    assert_eq!(u16::from_le_bytes([blk[at + 16 + 2 * rr], blk[at + 17 + 2 * rr]]), sum);
                }
            }
        }
        assert!(qx_groups(Format::Q4, &[0; 10], 1, 64).is_err());
    }

    #[test]
    fn schemes_by_input_width_and_names() {
        assert_eq!(Scheme::for_cols(Format::Q4, 768), Some(Scheme { format: Format::Q4, block: 64 }));
        assert_eq!(Scheme::for_cols(Format::Int8, 32), Some(Scheme { format: Format::Int8, block: 32 }));
        assert_eq!(Scheme::for_cols(Format::Int8, 48), None);
        assert_eq!(Format::parse("4bit").unwrap(), Format::Q4);
        assert_eq!(Format::parse("int8").unwrap(), Format::Int8);
        assert!(Format::parse("nf3").unwrap_err().to_string().contains("nf3"));
    }

    #[test]
    fn matrices_are_found_by_official_name() {
        assert_eq!(input_axis("blocks.3.att.key.weight", &[768, 768]), Some(1));
        assert_eq!(input_axis("head.weight", &[65536, 768]), Some(1));
        assert_eq!(input_axis("blocks.0.att.w1", &[768, 64]), Some(0));
        assert_eq!(input_axis("blocks.0.att.g2", &[128, 768]), Some(0));
        assert_eq!(input_axis("emb.weight", &[65536, 768]), None);
        assert_eq!(input_axis("blocks.0.att.r_k", &[12, 64]), None);
        assert_eq!(input_axis("blocks.0.ln1.weight", &[768]), None);
        // A LoRA [in 32, out 64] is quantized as its [64, 32] rows, in blocks of 32
        // (64 does not divide its input), and read back in its own layout.
        let w = weights(32 * 64, 3);
        let back = round_trip(Scheme { format: Format::Int8, block: 64 }, "blocks.0.att.a2", &[32, 64], &w).unwrap();
        let rows = transpose(&w, 32, 64);
        let want = quantize(Scheme { format: Format::Int8, block: 32 }, &rows, 64, 32).unwrap().dequantize();
        assert_eq!(back, Some(transpose(&want, 64, 32)));
        assert_eq!(round_trip(SCHEMES[0], "blocks.0.att.r_k", &[12, 64], &w[..768]).unwrap(), None);
    }

    #[test]
    fn bad_matrices_are_errors() {
        let s = SCHEMES[0];
        assert!(quantize(s, &[0.0; 40], 1, 40).is_err(), "40 columns in blocks of 32");
        assert!(quantize(s, &[0.0; 32], 2, 32).is_err(), "too few values");
        assert!(quantize(s, &[f32::NAN; 32], 1, 32).is_err());
        assert!(quantize(s, &[1e9; 32], 1, 32).is_err(), "scale past f16");
        assert!(quantize(SCHEMES[2], &[1e9; 32], 1, 32).is_err(), "q4 scale past f16");
        assert!(quantize(Scheme { format: Format::Q4, block: 0 }, &[0.0; 32], 1, 32).is_err());
    }
}
