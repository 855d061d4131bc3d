//! Loading shared by every generation: the dimensions every checkpoint
//! has, and the `BlockLoader` each generation's `load` reads its tensors
//! with. It uploads by official name, counts parameters and GPU bytes once
//! for all generations, and reports progress.

use std::cell::Cell;

use crate::error::{Error, Result};
use crate::gpu::kernels::MAX_HEAD_SIZE;
use crate::gpu::GpuContext;
use crate::loader::SafeTensorsFile;
use crate::matrix::{tally, Matrix};
use crate::model::info::Progress;
use crate::quant::{file_scheme, gpu_rows_from_parts, Encoding, Format};
use crate::state::StateLayout;
use crate::tensor::{Dtype, Tensor};

/// Widest model supported (n_embd): RWKV's largest published models are
/// 8192 wide; 65536 leaves room and bounds every per-step buffer.
pub const MAX_WIDTH: usize = 1 << 16;

/// Upload bytes between two flushes of wgpu's upload staging.
const FLUSH_BYTES: u64 = 32 << 20;

/// The dimensions every generation shares, from the tensor shapes.
pub struct Dims {
    pub vocab: usize,
    pub c: usize,
    pub n_layer: usize,
    pub dtype: Dtype,
}

impl Dims {
    pub fn read(f: &SafeTensorsFile) -> Result<Self> {
        let emb = f.get("emb.weight")?;
        if emb.shape.len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "emb.weight".into(),
                expected: vec![0, 0],
                found: emb.shape.to_vec(),
            });
        }
        let (vocab, c) = (emb.shape[0], emb.shape[1]);
        // The element-wise kernels read four channels at a time. Every other
        // dimension is checked against tensors of c columns whose bytes are
        // in the file, so with c and vocab at least 1 none can be larger than
        // the file: a shape like [0, 2^40] (no bytes) is refused here, before
        // anything is sized by it.
        if c == 0 || !c.is_multiple_of(4) || c > MAX_WIDTH || vocab == 0 {
            return Err(Error::UnsupportedShape(format!(
                "emb.weight {:?}: the vocabulary must be at least 1 and n_embd a multiple of 4 up to {MAX_WIDTH}",
                emb.shape
            )));
        }
        let mut n_layer = 0;
        while f.contains(&format!("blocks.{n_layer}.ln1.weight")) {
            n_layer += 1;
        }
        Ok(Self { vocab, c, n_layer, dtype: emb.dtype })
    }
}

/// Uploads a checkpoint's tensors by official name, counting parameters and
/// GPU bytes and reporting progress; each generation's loader builds its
/// blocks with it.
pub struct BlockLoader<'f> {
    pub ctx: &'f GpuContext,
    pub f: &'f SafeTensorsFile,
    pub c: usize,
    /// Quantize matrices to this format (`LoadOptions::quant`).
    pub quant: Option<Format>,
    /// Split matrices into parts of at most this many bytes.
    pub max_part: u64,
    /// Parameters read so far (every element of every tensor read).
    pub parameters: u64,
    /// GPU bytes of everything uploaded so far.
    pub gpu_bytes: u64,
    /// GPU bytes of the matrices by encoding.
    pub matrices: Vec<(Encoding, u64)>,
    total: u64,
    done: Cell<u64>,
    progress: Option<Progress>,
}

impl<'f> BlockLoader<'f> {
    pub fn new(
        ctx: &'f GpuContext,
        f: &'f SafeTensorsFile,
        c: usize,
        quant: Option<Format>,
        max_part: u64,
        progress: Option<Progress>,
    ) -> Self {
        Self {
            ctx,
            f,
            c,
            quant,
            max_part,
            parameters: 0,
            gpu_bytes: 0,
            matrices: Vec::new(),
            total: f.data_bytes(),
            done: Cell::new(0),
            progress,
        }
    }

    /// Called once a tensor has been read: reports progress, lets the OS
    /// drop the tensor's pages of the file mapping, and every FLUSH_BYTES
    /// submits the pending copies so wgpu frees its staging buffers. Peak
    /// memory while loading stays near the GPU copy of the weights instead of
    /// the file plus the staging plus the GPU copy.
    pub fn done(&self, t: &Tensor) -> Result<()> {
        self.f.release(t);
        self.done_bytes(t.bytes.len())
    }

    /// As `done` for `n` bytes read and released otherwise.
    fn done_bytes(&self, n: usize) -> Result<()> {
        let before = self.done.get();
        self.done.set(before + n as u64);
        if self.done.get() / FLUSH_BYTES != before / FLUSH_BYTES {
            self.ctx.queue().submit([]);
            self.ctx.sync()?;
        }
        if let Some(p) = &self.progress {
            p(self.done.get().min(self.total), self.total);
        }
        Ok(())
    }

    /// A tensor that stays in the file (the embedding): counted, then its
    /// pages dropped.
    pub fn skip(&mut self, name: &str) -> Result<()> {
        let t = self.f.get(name)?;
        self.parameters += t.len() as u64;
        self.done(&t)
    }

    /// A linear weight `[rows, cols]` used as `x @ W.T`.
    /// In a pre-quantized file (`rwkv quantize`) it is read as its codes
    /// and `NAME.scales`, straight into the kernels' row layout.
    pub fn mat(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let f = self.f;
        let scales_name = format!("{name}.scales");
        if let (Some(format), true) = (self.quant, f.contains(&scales_name)) {
            let scales = f.get(&scales_name)?;
            if scales.dtype != Dtype::F16 {
                let dtype = scales.dtype.name().to_string();
                return Err(Error::UnsupportedDtype { name: format!("{scales_name} (scales must be F16)"), dtype });
            }
            let scheme = file_scheme(format, name, rows, cols, scales.shape)?;
            let codes = f.expect_u8(name, &[rows, cols * format.bits() / 8])?;
            let gpu = gpu_rows_from_parts(scheme, rows, cols, codes, scales.bytes)?;
            f.release_bytes(codes);
            let (store, encoding) = (self.ctx.weight_store(), Encoding::Blocks(scheme));
            let m = Matrix::upload_rows(self.ctx, store, name, encoding, rows, cols, &gpu, self.max_part, None)?;
            self.parameters += (rows * cols) as u64;
            self.gpu_bytes += m.bytes();
            tally(&mut self.matrices, &m);
            self.done(&scales)?;
            self.done_bytes(codes.len())?;
            return Ok(m);
        }
        let t = f.expect(name, &[rows, cols])?;
        self.parameters += t.len() as u64;
        let release = |b: &[u8]| f.release_bytes(b);
        let m = Matrix::from_tensor(self.ctx, &t, self.quant, self.max_part, Some(&release))?;
        self.gpu_bytes += m.bytes();
        tally(&mut self.matrices, &m);
        self.done(&t)?;
        Ok(m)
    }

    /// A LoRA tensor `[cols, rows]` (`[in, out]`, used as `x @ W`), stored
    /// transposed as `[rows, cols]` with its rank padded (`KernelPlan::lora_rank`).
    pub fn lora(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let f = self.f;
        let t = f.expect(name, &[cols, rows])?;
        let m = self.lora_from(&t, rows, cols)?;
        self.done(&t)?;
        Ok(m)
    }

    /// As `lora` for a tensor already read (or a slice of one).
    pub fn lora_from(&mut self, t: &Tensor, rows: usize, cols: usize) -> Result<Matrix> {
        let c = self.c;
        let plan = self.ctx.plan();
        let pad = |d: usize| if d == c { d } else { plan.lora_rank(d) };
        let m = Matrix::from_tensor_transposed(self.ctx, t, pad(rows), pad(cols), self.quant, self.max_part)?;
        self.parameters += t.len() as u64;
        self.gpu_bytes += m.bytes();
        tally(&mut self.matrices, &m);
        Ok(m)
    }

    /// A vector tensor of exactly `shape` (C elements in all), widened to f32.
    pub fn vector(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.f.expect(name, shape)?;
        self.parameters += t.len() as u64;
        let v = t.to_f32();
        self.done(&t)?;
        Ok(v)
    }

    /// `vector` written into slot `slot` of a `[slots, C]` buffer.
    pub fn vec_into(&mut self, dst: &mut [f32], slot: usize, name: &str, shape: &[usize]) -> Result<()> {
        let v = self.vector(name, shape)?;
        let c = self.c;
        dst[slot * c..(slot + 1) * c].copy_from_slice(&v);
        Ok(())
    }

    /// Per-layer vectors `[slots, C]` uploaded as one f32 buffer.
    pub fn vectors(&mut self, what: &str, v: &[f32]) -> Result<crate::gpu::GpuBuffer> {
        let b = self.ctx.storage_f32(what, v)?;
        self.gpu_bytes += b.size();
        Ok(b)
    }
}

/// What a generation's `load` returns besides the shared parts.
pub struct Loaded<B> {
    pub blocks: Vec<B>,
    pub ffn: usize,
    /// Named LoRA widths, as in the checkpoint.
    pub lora: Vec<(&'static str, usize)>,
    pub layout: StateLayout,
}

/// The head count and size read from tensor `name` of `shape`, checked:
/// heads x size must be the width `c`, and the size a multiple of 4 (the
/// element-wise kernels read four channels at a time) no larger than the
/// WKV kernels hold in registers.
pub fn check_heads(name: &str, shape: &[usize], c: usize, n_head: usize, head_size: usize) -> Result<(usize, usize)> {
    if n_head == 0 || n_head.checked_mul(head_size) != Some(c) {
        // What would fit n_embd: the tensor's own head size if it divides
        // n_embd, else the official 64.
        let n = shape.last().copied().filter(|&n| shape.len() == 2 && n > 0 && c.is_multiple_of(n)).unwrap_or(64);
        let expected = if shape.len() == 2 { vec![c / n, n] } else { vec![c / n] };
        return Err(Error::ShapeMismatch { name: name.into(), expected, found: shape.to_vec() });
    }
    if head_size > MAX_HEAD_SIZE || !head_size.is_multiple_of(4) {
        return Err(Error::UnsupportedShape(format!(
            "head size {head_size} (from {name} {shape:?}); a multiple of 4 up to {MAX_HEAD_SIZE} is supported"
        )));
    }
    Ok((n_head, head_size))
}
