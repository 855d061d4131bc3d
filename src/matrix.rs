//! The weight-matrix type. Model code only ever asks a `Matrix` to multiply;
//! how the weights are encoded (checkpoint floats, or int8 / 4-bit blocks
//! quantized at load: [`Encoding`]) stays in here and in the kernel plan,
//! so no model file knows about quantization.
//!
//! Where the weights live is chosen per adapter ([`WeightStore`]):
//! - storage buffers: a matrix larger than one binding (lavapipe allows
//!   128 MiB; a 65536 x 2048 f16 head is 256 MiB) is split by rows into parts,
//!   each its own buffer, and each op runs once per part;
//! - a 2D texture array (CPU adapters): rows of 4-word texels, split by rows
//!   into layers; `linear` copies x into a texture too and runs
//!   `linear_tex.wgsl`.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::kernels::{
    Act, LinearParams, LinearTexParams, LINEAR_QX_TOKENS, LINEAR_Q_ROWS, LINEAR_SG_ROWS, LINEAR_TEX_TOKENS, LINEAR_TN,
    WG,
};
use crate::gpu::{
    Binding, GpuBuffer, GpuContext, GpuTexture, KernelPlan, Pipeline, Recorder, Release, WeightStore, XSource, STORAGE,
    UPLOAD_SLICE, WEIGHT_TEXTURE_FORMAT, X_WINDOW_BYTES,
};
pub use crate::quant::Encoding;
use crate::quant::{gpu_rows_from_bytes, qx_group_row_bytes, qx_groups, Format, Quantized, QX_GROUP_ROWS};
use crate::tensor::{Dtype, Tensor};

struct Part {
    row0: usize,
    rows: usize,
    buffer: GpuBuffer,
}

enum Store {
    /// Row ranges, each in its own storage buffer.
    Buffers(Vec<Part>),
    /// `[layers, layer_rows / group, texels per texture row]` of rgba32uint
    /// texels; a texture row holds `group` rows of W: 1 in
    /// [`crate::quant::RowLayout`] (`linear_tex`, `linear_q_tex`), 8 in the row
    /// groups of `linear_qx_tex` where [`KernelPlan::qx_groups`].
    Texture { texture: Arc<GpuTexture>, layer_rows: usize },
}

/// A `[rows, cols]` weight matrix used as `y = x @ W.T` (rows = outputs).
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
    store: Store,
}

impl Matrix {
    /// Uploads a row-major `[rows, cols]` matrix of `dtype` from `bytes` for
    /// `linear`, in the adapter's preferred store where the shape allows it,
    /// splitting by rows so each part or layer is at most `max_part_bytes`.
    pub fn upload(
        ctx: &GpuContext,
        name: &str,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part_bytes: u64,
    ) -> Result<Self> {
        Self::upload_to(ctx, ctx.weight_store(), name, dtype, rows, cols, bytes, max_part_bytes, None)
    }

    /// As [`Matrix::upload`], in `store` if the shape allows it (textures
    /// need `cols % 64 == 0`), else in buffers. `release` is called with each slice of `bytes`
    /// once it is on its way to the GPU (the model drops file pages with it).
    #[allow(clippy::too_many_arguments)]
    pub fn upload_to(
        ctx: &GpuContext,
        store: WeightStore,
        name: &str,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part_bytes: u64,
        release: Release,
    ) -> Result<Self> {
        Self::upload_encoded(ctx, store, name, None, dtype, rows, cols, bytes, max_part_bytes, release)
    }

    /// As [`Matrix::upload_to`], quantized to `quant` where the columns
    /// allow it ([`Encoding::choose`]; else in the checkpoint's floats). The
    /// quantized rows are made a block of rows at a time from `bytes`, which
    /// are released as soon as they are read.
    #[allow(clippy::too_many_arguments)]
    pub fn upload_encoded(
        ctx: &GpuContext,
        store: WeightStore,
        name: &str,
        quant: Option<Format>,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part_bytes: u64,
        release: Release,
    ) -> Result<Self> {
        let encoding = Encoding::choose(quant, dtype, cols);
        match encoding {
            Encoding::Float(_) => {
                Self::upload_rows(ctx, store, name, encoding, rows, cols, bytes, max_part_bytes, release)
            }
            Encoding::Blocks(scheme) => {
                let gpu = gpu_rows_from_bytes(scheme, dtype, bytes, rows, cols)?;
                if let Some(r) = release {
                    r(bytes);
                }
                Self::upload_rows(ctx, store, name, encoding, rows, cols, &gpu, max_part_bytes, None)
            }
        }
    }

    /// Uploads a matrix quantized already (a pre-quantized file's tensor),
    /// in `store` where the shape allows it.
    pub fn upload_quantized(
        ctx: &GpuContext,
        store: WeightStore,
        name: &str,
        q: &Quantized,
        max_part_bytes: u64,
    ) -> Result<Self> {
        let encoding = Encoding::Blocks(q.scheme);
        Self::upload_rows(ctx, store, name, encoding, q.rows, q.cols, &q.gpu_rows()?, max_part_bytes, None)
    }

    /// Uploads rows already in `encoding`'s GPU layout (a pre-quantized
    /// file's, from [`crate::quant::gpu_rows_from_parts`]).
    #[allow(clippy::too_many_arguments)]
    pub fn upload_rows(
        ctx: &GpuContext,
        store: WeightStore,
        name: &str,
        encoding: Encoding,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part_bytes: u64,
        release: Release,
    ) -> Result<Self> {
        let row_bytes = encoding.row_bytes(cols);
        if store == WeightStore::Texture && ctx.subgroup_size().is_some() {
            if let Some(m) = Self::upload_texture(ctx, name, encoding, rows, cols, bytes, max_part_bytes, release)? {
                return Ok(m);
            }
        }
        let rows_per_part = ((max_part_bytes as usize) / row_bytes.max(1)).max(1);
        let mut parts = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = rows_per_part.min(rows - row0);
            let slice = &bytes[row0 * row_bytes..(row0 + n) * row_bytes];
            let buffer = ctx.buffer_from_bytes_releasing(name, slice, STORAGE, release)?;
            parts.push(Part { row0, rows: n, buffer });
            row0 += n;
        }
        Ok(Self { rows, cols, encoding, store: Store::Buffers(parts) })
    }

    /// The texture store, or `None` where the shape does not fit one.
    /// `bytes` are rows in `encoding`'s [`crate::quant::RowLayout`]; blocks are regrouped
    /// for `linear_qx_tex` where the plan takes it ([`KernelPlan::qx_groups`]).
    #[allow(clippy::too_many_arguments)]
    fn upload_texture(
        ctx: &GpuContext,
        name: &str,
        encoding: Encoding,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_part_bytes: u64,
        release: Release,
    ) -> Result<Option<Self>> {
        let (max_dim, max_layers) = ctx.max_texture_dims();
        let (max_dim, max_layers) = (max_dim as usize, max_layers as usize);
        let row_bytes = encoding.row_bytes(cols);
        // The format regrouped for linear_qx_tex, if any; rows of W per
        // texture row, and bytes of a texture row.
        let qx = match encoding {
            Encoding::Blocks(s) if ctx.plan().qx_groups(encoding) => Some(s.format),
            _ => None,
        };
        let (group, tex_row_bytes) = match qx {
            Some(f) => (QX_GROUP_ROWS, qx_group_row_bytes(f, cols)),
            None => (1, row_bytes),
        };
        let texels = tex_row_bytes / 16;
        if rows == 0 || !cols.is_multiple_of(64) || texels > max_dim {
            return Ok(None);
        }
        // Layers of at most max_part_bytes, but whole tiles of both kernels
        // (a tile never straddles two layers).
        let tile = ctx.plan().texture_tile_rows();
        // As few layers as fit, of equal rows (whole tiles): the last layer
        // is allocated whole, however few rows it holds.
        let fit = (max_part_bytes as usize / row_bytes).min(max_dim * group);
        let layer_rows = if rows <= fit {
            rows.next_multiple_of(group)
        } else {
            let most = (fit / tile * tile).max(tile);
            rows.div_ceil(rows.div_ceil(most)).next_multiple_of(tile)
        };
        if layer_rows > max_dim * group || rows.div_ceil(layer_rows) > max_layers {
            return Ok(None);
        }
        let layers = rows.div_ceil(layer_rows);
        let height = (layer_rows / group) as u32;
        let texture = ctx.texture(name, texels as u32, height, layers as u32, WEIGHT_TEXTURE_FORMAT, true)?;
        // Slices of at most UPLOAD_SLICE bytes (whole groups), each
        // submitted (so wgpu frees its staging copy) before the next: a
        // large matrix is never resident three times (file pages, staging,
        // texture).
        let slice_rows = (UPLOAD_SLICE / row_bytes).max(1).next_multiple_of(group);
        for l in 0..layers {
            let layer_end = rows.min((l + 1) * layer_rows);
            let mut r0 = l * layer_rows;
            while r0 < layer_end {
                let n = slice_rows.min(layer_end - r0);
                let src = &bytes[r0 * row_bytes..(r0 + n) * row_bytes];
                let grouped;
                let data = match qx {
                    Some(f) => {
                        grouped = qx_groups(f, src, n, cols)?;
                        &grouped[..]
                    }
                    None => src,
                };
                ctx.queue().write_texture(
                    wgpu::TexelCopyTextureInfo {
                        texture: texture.raw(),
                        mip_level: 0,
                        origin: wgpu::Origin3d { x: 0, y: ((r0 - l * layer_rows) / group) as u32, z: l as u32 },
                        aspect: wgpu::TextureAspect::All,
                    },
                    data,
                    wgpu::TexelCopyBufferLayout {
                        offset: 0,
                        bytes_per_row: Some(tex_row_bytes as u32),
                        rows_per_image: None,
                    },
                    wgpu::Extent3d { width: texels as u32, height: n.div_ceil(group) as u32, depth_or_array_layers: 1 },
                );
                if let Some(r) = release {
                    r(src);
                }
                if rows * row_bytes > UPLOAD_SLICE {
                    ctx.queue().submit([]);
                    ctx.sync()?;
                }
                r0 += n;
            }
        }
        let store = Store::Texture { texture: Arc::new(texture), layer_rows };
        Ok(Some(Self { rows, cols, encoding, store }))
    }

    /// A checkpoint tensor `[out, in]` used as `x @ W.T`; `release` is
    /// called with each slice of its bytes once uploaded (the loader lets
    /// the OS drop those pages of the file mapping).
    /// Quantized to `quant` where its columns allow ([`Encoding::choose`]).
    pub fn from_tensor(
        ctx: &GpuContext,
        t: &Tensor,
        quant: Option<Format>,
        max_part_bytes: u64,
        release: Release,
    ) -> Result<Self> {
        let store = ctx.weight_store();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        Self::upload_encoded(ctx, store, t.name, quant, t.dtype, rows, cols, t.bytes, max_part_bytes, release)
    }

    /// A checkpoint LoRA tensor `[in, out]` used as `x @ W`: stored transposed
    /// (an exact permutation) so the same kernel serves both, as `[rows,
    /// cols]` >= `[out, in]` with zeros around it (exact too: zero weights add
    /// nothing). Padding a LoRA's rank to a multiple of 64 lets it use the
    /// texture store.
    pub fn from_tensor_transposed(
        ctx: &GpuContext,
        t: &Tensor,
        rows: usize,
        cols: usize,
        quant: Option<Format>,
        max_part: u64,
    ) -> Result<Self> {
        let bytes = t.transposed_bytes_padded(rows, cols);
        Self::upload_encoded(ctx, ctx.weight_store(), t.name, quant, t.dtype, rows, cols, &bytes, max_part, None)
    }

    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::Buffers(parts) => parts.iter().map(|p| p.buffer.size()).sum(),
            Store::Texture { texture, .. } => texture.bytes(),
        }
    }

    /// Buffers, or texture layers, the rows are split into.
    pub fn part_count(&self) -> usize {
        match &self.store {
            Store::Buffers(parts) => parts.len(),
            Store::Texture { layer_rows, .. } => self.rows.div_ceil(*layer_rows),
        }
    }

    /// Where the weights are.
    pub fn store(&self) -> WeightStore {
        match self.store {
            Store::Buffers(_) => WeightStore::Buffer,
            Store::Texture { .. } => WeightStore::Texture,
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
        let parts = match &self.store {
            Store::Buffers(parts) => parts,
            Store::Texture { texture, layer_rows, .. } => {
                return self.linear_tex(rec, texture, *layer_rows, x, x_offset, y, y_offset, n_rows, act, accumulate)
            }
        };
        if matches!(self.encoding, Encoding::Blocks(_)) && !x_offset.is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "quantized matrix: x offset {x_offset} is not a multiple of 4 elements"
            )));
        }
        for part in parts {
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
            let key = rec.ctx().plan().buffer_linear(self.encoding, self.cols, n_rows, x_offset);
            let groups = match key {
                // One subgroup-sized workgroup per LINEAR_SG_ROWS output rows
                // and `tokens` tokens.
                Pipeline::LinearSg { tokens, .. } => {
                    [(part.rows as u32).div_ceil(LINEAR_SG_ROWS), (n_rows as u32).div_ceil(tokens), 1]
                }
                // One workgroup per LINEAR_Q_ROWS rows and `tokens` tokens.
                Pipeline::LinearQ { tokens, .. } => {
                    [(part.rows as u32).div_ceil(LINEAR_Q_ROWS), (n_rows as u32).div_ceil(tokens), 1]
                }
                _ => [(part.rows as u32).div_ceil(WG), (n_rows as u32).div_ceil(LINEAR_TN), 1],
            };
            rec.dispatch(key, &params, &[&part.buffer, x, y], groups)?;
        }
        Ok(())
    }

    /// `linear` for the texture store, one dispatch per window of tokens:
    /// where the window's x rows fit X_WINDOW_BYTES and its offset is aligned,
    /// they are bound straight from `x` as a uniform window (`XU` 1);
    /// otherwise they are copied into the shared x texture first (`XU` 0).
    /// `decode` runs single tokens, `prefill` tiles of LINEAR_TEX_TOKENS.
    #[allow(clippy::too_many_arguments)]
    fn linear_tex<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        texture: &Arc<GpuTexture>,
        layer_rows: usize,
        x: &'a GpuBuffer,
        x_offset: usize,
        y: &'a GpuBuffer,
        y_offset: usize,
        n_rows: usize,
        act: Act,
        accumulate: bool,
    ) -> Result<()> {
        if !x_offset.is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "texture matrix: x offset {x_offset} is not a multiple of 4 elements"
            )));
        }
        let (ctx, ws) = (rec.ctx(), rec.workspace());
        let plan = ctx.plan();
        let row_bytes = (self.cols * 4) as u64;
        let align = ctx.limits().min_uniform_buffer_offset_alignment as u64;
        // Tokens per uniform window: 1 alone, else whole prefill tiles.
        let per_window = (X_WINDOW_BYTES / row_bytes) as usize;
        let per_window = if n_rows == 1 { per_window.min(1) } else { per_window / 8 * 8 };
        let max_tex = ctx.max_texture_dims().0 as usize;
        let mut n0 = 0;
        while n0 < n_rows {
            let start = (x_offset + n0 * self.cols) as u64 * 4;
            let uniform = per_window > 0 && start.is_multiple_of(align) && start + X_WINDOW_BYTES <= x.size();
            let nb = if uniform { per_window } else { max_tex }.min(n_rows - n0);
            let (xt, xu) = if uniform {
                (ws.x_texture(ctx, 1, 1)?, Binding::Range(x, start, X_WINDOW_BYTES))
            } else {
                let xt = ws.x_texture(ctx, (self.cols / 4) as u32, nb as u32)?;
                rec.copy_to_texture(
                    x,
                    start,
                    row_bytes as u32,
                    nb as u32,
                    xt.clone(),
                    [(self.cols / 4) as u32, nb as u32, 1],
                );
                (xt, Binding::Shared(ws.dummy_uniform(ctx)?))
            };
            let params = LinearTexParams {
                n_rows: nb as u32,
                d_in: self.cols as u32,
                d_out: self.rows as u32,
                layer_rows: layer_rows as u32,
                y_offset: (y_offset + n0 * self.rows) as u32,
                act: act as u32,
                accumulate: accumulate as u32,
                _pad: 0,
            };
            let lanes = ctx.subgroup_size().unwrap_or(1);
            let source = if uniform { XSource::Window } else { XSource::Texture };
            let key = plan.texture_linear(self.encoding, self.rows, nb, source);
            // Rows per lane and tokens per workgroup.
            let (lane_rows, tokens) = match key {
                Pipeline::LinearTex { tile, .. } => (KernelPlan::lane_rows(tile), LINEAR_TEX_TOKENS),
                Pipeline::LinearQxTex { .. } => (QX_GROUP_ROWS as u32, LINEAR_QX_TOKENS),
                _ => unreachable!("texture_linear makes texture pipelines"),
            };
            let row_tiles = (self.rows as u32).div_ceil(lane_rows * lanes);
            let groups = if nb == 1 { [row_tiles, 1, 1] } else { [row_tiles, (nb as u32).div_ceil(tokens), 1] };
            let bindings = vec![Binding::Texture(texture.clone()), Binding::Texture(xt), xu, Binding::Buffer(y)];
            rec.dispatch_with(key, &params, bindings, groups)?;
            n0 += nb;
        }
        Ok(())
    }
}

/// Adds `m`'s GPU bytes to its encoding's entry of `tally` (the weight
/// bytes by format that `inspect` and `bench` report).
pub fn tally(tally: &mut Vec<(Encoding, u64)>, m: &Matrix) {
    match tally.iter_mut().find(|(e, _)| *e == m.encoding) {
        Some((_, b)) => *b += m.bytes(),
        None => tally.push((m.encoding, m.bytes())),
    }
}
