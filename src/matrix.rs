//! The weight-matrix type. Model code only ever asks a `Matrix` to multiply
//! or to gather rows; how the weights are encoded stays in here, so int8 and
//! 4-bit block encodings can be added as new `Encoding`s without touching
//! any model file.
//!
//! A matrix larger than one storage binding (lavapipe allows 128 MiB; a
//! 65536 x 2048 f16 head is 256 MiB) is split by rows into parts, each its own
//! buffer, and each op runs once per part.

use crate::error::Result;
use crate::gpu::kernels::{self, Act, EmbeddingParams, LinearParams, LINEAR_SG_ROWS, LINEAR_TN, WG};
use crate::gpu::{GpuBuffer, GpuContext, Kernel, Recorder, STORAGE};
use crate::loader::{Dtype, Tensor};

/// How the elements of a matrix are stored on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Plain floats as in the checkpoint (f32, f16, bf16), widened exactly
    /// to f32 inside the kernels.
    Float(Dtype),
}

struct Part {
    row0: usize,
    rows: usize,
    buffer: GpuBuffer,
}

/// A `[rows, cols]` weight matrix used as `y = x @ W.T` (rows = outputs).
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
    parts: Vec<Part>,
}

impl Matrix {
    /// Uploads a row-major `[rows, cols]` matrix of `dtype` from `bytes`,
    /// splitting by rows so each part is at most `max_part_bytes`.
    pub fn upload(
        ctx: &GpuContext,
        name: &str,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part_bytes: u64,
    ) -> Result<Self> {
        let row_bytes = cols * dtype.size();
        let rows_per_part = ((max_part_bytes as usize) / row_bytes.max(1)).max(1);
        let mut parts = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = rows_per_part.min(rows - row0);
            let slice = &bytes[row0 * row_bytes..(row0 + n) * row_bytes];
            let buffer = ctx.buffer_from_bytes(name, slice, STORAGE)?;
            parts.push(Part { row0, rows: n, buffer });
            row0 += n;
        }
        Ok(Self {
            rows,
            cols,
            encoding: Encoding::Float(dtype),
            parts,
        })
    }

    /// A checkpoint tensor `[out, in]` used as `x @ W.T`.
    pub fn from_tensor(ctx: &GpuContext, t: &Tensor, max_part_bytes: u64) -> Result<Self> {
        Self::upload(ctx, t.name, t.dtype, t.shape[0], t.shape[1], t.bytes, max_part_bytes)
    }

    /// A checkpoint LoRA tensor `[in, out]` used as `x @ W`: stored transposed
    /// (an exact permutation) so the same kernel serves both.
    pub fn from_tensor_transposed(ctx: &GpuContext, t: &Tensor, max_part_bytes: u64) -> Result<Self> {
        let bytes = t.transposed_bytes();
        Self::upload(ctx, t.name, t.dtype, t.shape[1], t.shape[0], &bytes, max_part_bytes)
    }

    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.buffer.size()).sum()
    }

    pub fn part_count(&self) -> usize {
        self.parts.len()
    }

    /// Whether `linear` can use the subgroup kernel: the adapter has
    /// fixed-size subgroups, and rows are whole vec4 words (8 weights of
    /// 16 bits or 4 of f32).
    fn use_subgroups(&self, ctx: &GpuContext) -> bool {
        ctx.subgroup_size().is_some()
            && match self.encoding {
                Encoding::Float(Dtype::F32) => self.cols.is_multiple_of(4),
                Encoding::Float(_) => self.cols.is_multiple_of(8),
            }
    }

    fn wdtype(&self) -> u32 {
        match self.encoding {
            Encoding::Float(d) => kernels::wdtype(d),
        }
    }

    /// Records `Y[n, :] (+)= act(X[n, :] @ W.T)` for `n_rows` rows.
    /// `x_offset`/`y_offset` are element offsets; Y has row stride `rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        x: &'a GpuBuffer,
        x_offset: usize,
        y: &'a GpuBuffer,
        y_offset: usize,
        n_rows: usize,
        act: Act,
        accumulate: bool,
    ) -> Result<()> {
        for part in &self.parts {
            let params = LinearParams {
                n_rows: n_rows as u32,
                d_in: self.cols as u32,
                d_out: self.rows as u32,
                row0: part.row0 as u32,
                part_rows: part.rows as u32,
                x_offset: x_offset as u32,
                y_offset: y_offset as u32,
                act: act as u32,
                accumulate: accumulate as u32,
                _pad: [0; 3],
            };
            let token_groups = (n_rows as u32).div_ceil(LINEAR_TN);
            if self.use_subgroups(rec.ctx()) && x_offset.is_multiple_of(4) {
                // One subgroup-sized workgroup per LINEAR_SG_ROWS output rows
                // and 4 tokens (1 for a single token: decode).
                let tn = if n_rows == 1 { 1 } else { LINEAR_TN };
                let groups = [(part.rows as u32).div_ceil(LINEAR_SG_ROWS), (n_rows as u32).div_ceil(tn), 1];
                let variant = self.wdtype() | (tn << 8);
                rec.dispatch(Kernel::LinearSg, variant, &params, &[&part.buffer, x, y], groups)?;
            } else {
                let groups = [(part.rows as u32).div_ceil(WG), token_groups, 1];
                rec.dispatch(Kernel::Linear, self.wdtype(), &params, &[&part.buffer, x, y], groups)?;
            }
        }
        Ok(())
    }

    /// Records `out[n, :] = W[tokens[n], :]` (an embedding lookup) for `n_tok` tokens.
    pub fn gather<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        tokens: &'a GpuBuffer,
        out: &'a GpuBuffer,
        n_tok: usize,
    ) -> Result<()> {
        for part in &self.parts {
            let params = EmbeddingParams {
                n_tok: n_tok as u32,
                dim: self.cols as u32,
                row0: part.row0 as u32,
                part_rows: part.rows as u32,
            };
            let groups = [(self.cols as u32).div_ceil(WG), n_tok as u32, 1];
            rec.dispatch(Kernel::Embedding, self.wdtype(), &params, &[tokens, &part.buffer, out], groups)?;
        }
        Ok(())
    }
}
