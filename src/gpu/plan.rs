//! The kernel plan: which variant of each kernel runs on this adapter,
//! decided once when the context is made. Recording asks the plan for the
//! [`Pipeline`] of every dispatch, and precompiling asks the same functions
//! for the pipelines a model will use, so what is compiled ahead of time is
//! exactly what is recorded later.

use std::fmt;

use super::kernels::{
    Pipeline, TexTile, WkvEntry, XSource, LINEAR_TEX_DECODE_LANE_ROWS, LINEAR_TEX_PREFILL_LANE_ROWS,
    LINEAR_TEX_PREFILL_LANE_ROWS_SMALL, LINEAR_TEX_TOKENS, LINEAR_TN, X_WINDOW_BYTES,
};
use crate::quant::{Encoding, Format, Scheme, QX_BLOCK};
use crate::tensor::Dtype;

/// Where matrix weights are stored, chosen per adapter.
///
/// On llvmpipe (lavapipe) a storage-buffer load is a loop over the eight SIMD
/// lanes with a bounds check and a branch per lane and per component, while a
/// texel fetch is one vector gather: `linear_tex.wgsl` reading weights (and x)
/// from textures measured 4-6x the matrix throughput of the buffer kernel
/// there. The textures are bound as read-only storage textures: llvmpipe's
/// image load skips the sampler path's per-lane mip-level arithmetic (the
/// matrix kernels measured ~20-30 % less CPU time than with sampled
/// textures). Real GPUs read buffers at full speed and keep the buffer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStore {
    Buffer,
    Texture,
}

/// The per-adapter choices (see `docs/performance.md`, *Shapes per adapter*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPlan {
    /// Where matrix weights live: textures on CPU adapters, else buffers.
    pub weights: WeightStore,
    /// The subgroup size the subgroup kernels are built for, where the
    /// adapter has subgroups of one fixed size.
    pub subgroup_size: Option<u32>,
    /// Whether kernels can read activation (rgba32float) textures as
    /// read-only storage textures, as the texture WKV kernels do.
    pub float_storage_textures: bool,
}

/// Which matrix kernel `linear` records (for printing and for callers that
/// need to know, such as the x texture's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixKernel {
    /// `linear_tex.wgsl`: weights in textures, x through a uniform window or the x texture.
    Texture,
    /// `linear_sg.wgsl`: one subgroup per 16-row tile.
    Subgroup,
    /// `linear.wgsl`: 64 invocations, no subgroup operations.
    Plain,
}

impl KernelPlan {
    pub fn new(weights: WeightStore, subgroup_size: Option<u32>, float_storage_textures: bool) -> Self {
        Self { weights, subgroup_size, float_storage_textures }
    }

    /// Invocations per workgroup of the row-reducing kernels (`GS`): the
    /// subgroup size where it is fixed, else 64.
    pub fn group_size(&self) -> u32 {
        self.subgroup_size.unwrap_or(64)
    }

    /// Tokens per invocation of the element-wise kernels that read per-layer
    /// vectors (`token_shift`, `group_norm`, `v7_prep`, `layer_norm`: their
    /// `TPW`): 8 on CPU adapters (the texture store), where each
    /// storage-buffer load is a per-lane loop and the vectors are then loaded
    /// once per 8 tokens (a batch-8 decode step); 1 elsewhere, for parallelism.
    pub fn elementwise_tokens(&self) -> u32 {
        match self.weights {
            WeightStore::Texture => 8,
            WeightStore::Buffer => 1,
        }
    }

    pub fn matrix_kernel(&self) -> MatrixKernel {
        match (self.weights, self.subgroup_size) {
            (WeightStore::Texture, Some(_)) => MatrixKernel::Texture,
            (_, Some(_)) => MatrixKernel::Subgroup,
            (_, None) => MatrixKernel::Plain,
        }
    }

    /// Whether attention runs `attention_lanes.wgsl` (each lane owns whole
    /// keys and its own online softmax; no cross-lane work per key) rather
    /// than `attention.wgsl` (lanes own channels, reduce every tile): on CPU
    /// adapters with subgroups, where a storage load is a per-lane loop
    /// either way and per-key reductions are what costs. On llvmpipe it read
    /// the KV cache several times faster; GPUs keep the coalesced kernel.
    pub fn attention_by_lanes(&self) -> bool {
        self.weights == WeightStore::Texture && self.subgroup_size.is_some()
    }

    pub fn layer_norm(&self) -> Pipeline {
        Pipeline::LayerNorm { tpw: self.elementwise_tokens() }
    }

    pub fn rms_norm(&self) -> Pipeline {
        Pipeline::RmsNorm { tpw: self.elementwise_tokens() }
    }

    pub fn token_shift(&self) -> Pipeline {
        Pipeline::TokenShift { tpw: self.elementwise_tokens() }
    }

    pub fn group_norm(&self) -> Pipeline {
        Pipeline::GroupNorm { tpw: self.elementwise_tokens() }
    }

    pub fn v7_prep(&self) -> Pipeline {
        Pipeline::V7Prep { tpw: self.elementwise_tokens() }
    }

    /// Rows of one `linear_tex` prefill workgroup (a multiple of a decode
    /// one): texture layers hold whole tiles.
    pub fn texture_tile_rows(&self) -> usize {
        LINEAR_TEX_PREFILL_LANE_ROWS as usize * self.subgroup_size.unwrap_or(1) as usize
    }

    /// A matrix's rows padded for the texture store: LoRA ranks are padded
    /// with zero weights to whole 64-column rows there (the texture kernel's
    /// shape; exact, since zero weights add nothing).
    pub fn lora_rank(&self, d: usize) -> usize {
        match self.weights {
            WeightStore::Texture => d.next_multiple_of(64),
            WeightStore::Buffer => d,
        }
    }

    /// The buffer-store matrix kernel for `n_rows` tokens of a matrix with
    /// `cols` columns of `weights`, x at element `x_offset`: the subgroup
    /// kernel where subgroups have a fixed size and rows are whole vec4 words
    /// (8 weights of 16 bits or 4 of f32), with 4 tokens per workgroup (1 for
    /// a single token: decode); else `linear.wgsl`. Block-quantized weights
    /// take `linear_q.wgsl` (any group size), 1 or LINEAR_TN tokens per workgroup.
    pub fn buffer_linear(&self, weights: Encoding, cols: usize, n_rows: usize, x_offset: usize) -> Pipeline {
        let weights = match weights {
            Encoding::Blocks(scheme) => {
                return Pipeline::LinearQ { scheme, tokens: if n_rows == 1 { 1 } else { LINEAR_TN } }
            }
            Encoding::Float(d) => d,
        };
        let words = match weights {
            Dtype::F32 => cols.is_multiple_of(4),
            Dtype::F16 | Dtype::BF16 => cols.is_multiple_of(8),
        };
        if self.subgroup_size.is_some() && words && x_offset.is_multiple_of(4) {
            let tokens = if n_rows == 1 { 1 } else { LINEAR_TN };
            Pipeline::LinearSg { weights, tokens }
        } else {
            Pipeline::Linear(weights)
        }
    }

    /// The texture-store matrix kernel for a window of `n_tokens` tokens of
    /// a `rows`-row matrix: `decode` for one token, else the prefill tile,
    /// whose 8-row variant serves matrices of at most 8 rows per lane (LoRA
    /// ranks, which the 16-row tile would leave half idle). Block-quantized
    /// weights always take the 8-row tile: `linear_q_tex.wgsl`'s prefill
    /// holds 8 rows by 8 tokens (its per-block sums take the registers a
    /// 16-row tile would need).
    /// Blocks of 64 with subgroups of 8 take `linear_qx_tex.wgsl` instead
    /// ([`KernelPlan::qx_groups`]).
    pub fn texture_linear(&self, weights: Encoding, rows: usize, n_tokens: usize, x: XSource) -> Pipeline {
        if let (true, Encoding::Blocks(scheme)) = (self.qx_groups(weights), weights) {
            let tile = if n_tokens == 1 { TexTile::Decode } else { TexTile::Prefill };
            return Pipeline::LinearQxTex { format: scheme.format, tile, x };
        }
        let tile = if n_tokens == 1 {
            TexTile::Decode
        } else if self.small_rows(rows) || matches!(weights, Encoding::Blocks(_)) {
            TexTile::PrefillSmall
        } else {
            TexTile::Prefill
        };
        Pipeline::LinearTex { weights, tile, x }
    }

    /// Whether a texture matrix in `weights` is stored in the row groups of
    /// `linear_qx_tex.wgsl` ([`crate::quant::QX_GROUP_ROWS`]): int8 or Q4 in
    /// blocks of 64 where subgroups are 8 lanes (lavapipe on AVX2). That
    /// kernel quantizes x per block and sums codes as integers, two products
    /// per u32 operation: on llvmpipe, which is bound by operations, not
    /// bytes, about 1.5 (int8) and 2 (Q4) times the speed of decoding each
    /// code to f32 (`docs/performance.md`).
    pub fn qx_groups(&self, weights: Encoding) -> bool {
        self.matrix_kernel() == MatrixKernel::Texture
            && self.subgroup_size == Some(8)
            && matches!(weights, Encoding::Blocks(Scheme { block: QX_BLOCK, .. }))
    }

    /// Whether a `rows`-row matrix is small enough for the 8-row prefill
    /// tile (at most 8 rows per lane).
    fn small_rows(&self, rows: usize) -> bool {
        rows <= (LINEAR_TEX_PREFILL_LANE_ROWS_SMALL * self.subgroup_size.unwrap_or(1)) as usize
    }

    /// Rows per lane of a texture tile.
    pub fn lane_rows(tile: TexTile) -> u32 {
        match tile {
            TexTile::Decode => LINEAR_TEX_DECODE_LANE_ROWS,
            TexTile::Prefill => LINEAR_TEX_PREFILL_LANE_ROWS,
            TexTile::PrefillSmall => LINEAR_TEX_PREFILL_LANE_ROWS_SMALL,
        }
    }

    /// The matrix pipelines any model with `weights` uses here, for
    /// compiling ahead of time (the 8-row tile of small matrices is in
    /// [`KernelPlan::small_tile`]). Derived from the functions recording
    /// uses, at the token counts that select each variant.
    pub fn linear_pipelines(&self, weights: Encoding) -> Vec<Pipeline> {
        match self.matrix_kernel() {
            // linear.wgsl runs any token count; linear_q.wgsl has a decode variant.
            MatrixKernel::Plain if matches!(weights, Encoding::Float(_)) => vec![self.buffer_linear(weights, 8, 1, 0)],
            MatrixKernel::Plain => vec![self.buffer_linear(weights, 8, 1, 0), self.buffer_linear(weights, 8, 2, 0)],
            MatrixKernel::Subgroup => {
                vec![self.buffer_linear(weights, 8, 1, 0), self.buffer_linear(weights, 8, 2, 0)]
            }
            MatrixKernel::Texture => {
                // Matrices that cannot take a texture (columns not a multiple
                // of 64) fall back to the subgroup buffer kernel.
                let mut v = vec![self.buffer_linear(weights, 8, 1, 0), self.buffer_linear(weights, 8, 2, 0)];
                let large = usize::MAX;
                for x in [XSource::Texture, XSource::Window] {
                    v.push(self.texture_linear(weights, large, 1, x));
                    v.push(self.texture_linear(weights, large, LINEAR_TEX_TOKENS as usize, x));
                }
                v
            }
        }
    }

    /// Where a window of `n_tokens` x rows of `d_in` floats is read from when
    /// it fits a uniform window (alignment aside): the window, else the x texture.
    pub fn x_source(d_in: usize, n_tokens: usize) -> XSource {
        if (d_in * 4 * n_tokens) as u64 <= X_WINDOW_BYTES {
            XSource::Window
        } else {
            XSource::Texture
        }
    }

    /// The pipeline a batch of several tokens through a `rows` x `d_in`
    /// matrix uses on the texture store when `rows` is small enough for the
    /// 8-row tile (LoRA down-projections; every matrix of a narrow model).
    /// Only a model knows whether it has such matrices, and each compiled
    /// variant keeps MiBs of JIT memory on llvmpipe, so it is not among
    /// [`KernelPlan::linear_pipelines`].
    pub fn small_tile(&self, weights: Encoding, rows: usize, d_in: usize) -> Option<Pipeline> {
        (self.matrix_kernel() == MatrixKernel::Texture && self.small_rows(rows)).then(|| {
            let tokens = LINEAR_TEX_TOKENS as usize;
            self.texture_linear(weights, rows, tokens, Self::x_source(d_in, tokens))
        })
    }

    /// Whether the texture WKV kernels (`wkv7_tex`, `wkv5_tex`) can run a
    /// model of this head size here: textures for weights, subgroups of 8,
    /// float storage textures, head size 64. Whether a step's shape fits the
    /// texture limits is checked per step (`ops::WkvTextures::fit`).
    pub fn wkv_textures(&self, head_size: usize) -> bool {
        self.weights == WeightStore::Texture
            && self.subgroup_size == Some(8)
            && self.float_storage_textures
            && head_size == 64
    }

    /// The RWKV-7 WKV pipeline: the texture kernel (its `decode` entry when
    /// no sequence has more than one token) or the buffer kernel.
    pub fn wkv7(&self, textures: bool, longest: u32) -> Pipeline {
        match (textures, longest <= 1) {
            (true, true) => Pipeline::Wkv7Tex(WkvEntry::Decode),
            (true, false) => Pipeline::Wkv7Tex(WkvEntry::Main),
            (false, _) => Pipeline::Wkv7,
        }
    }

    /// The RWKV-5/6 WKV pipeline.
    pub fn wkv5(&self, textures: bool) -> Pipeline {
        if textures {
            Pipeline::Wkv5Tex
        } else {
            Pipeline::Wkv5
        }
    }
}

impl fmt::Display for KernelPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sg = match self.subgroup_size {
            Some(n) => format!("subgroups of {n}"),
            None => "no subgroups (64-lane shared-memory reductions)".into(),
        };
        let matrix = match self.matrix_kernel() {
            MatrixKernel::Texture => format!(
                "linear_tex (weights in textures; {} rows/lane for 1 token, {}x{} tile for more, {}x{} for <= {} rows)",
                LINEAR_TEX_DECODE_LANE_ROWS,
                LINEAR_TEX_PREFILL_LANE_ROWS,
                LINEAR_TEX_TOKENS,
                LINEAR_TEX_PREFILL_LANE_ROWS_SMALL,
                LINEAR_TEX_TOKENS,
                LINEAR_TEX_PREFILL_LANE_ROWS_SMALL * self.subgroup_size.unwrap_or(1)
            ),
            MatrixKernel::Subgroup => format!("linear_sg (weights in buffers; 16-row tiles, 1 or {LINEAR_TN} tokens)"),
            MatrixKernel::Plain => "linear (weights in buffers; 64 lanes)".into(),
        };
        let quantized = if self.qx_groups(Encoding::Blocks(Scheme { format: Format::Q4, block: QX_BLOCK })) {
            "linear_qx_tex (8-row groups; x quantized per block, integer sums)"
        } else if self.matrix_kernel() == MatrixKernel::Texture {
            "linear_q_tex (codes widened to f32)"
        } else {
            "linear_q (codes widened to f32)"
        };
        let wkv = if self.wkv_textures(64) { "wkv7_tex/wkv5_tex (head size 64), else buffers" } else { "buffers" };
        let attention = if self.attention_by_lanes() {
            "attention_lanes (lanes own keys; attention for an f16 cache whose head dim is not a multiple of 8)"
        } else {
            "attention (lanes own channels, splits of positions)"
        };
        write!(
            f,
            "{sg}; matrices: {matrix}; quantized matrices: {quantized}; WKV: {wkv}; attention: {attention}; \
             element-wise: {} token(s) per invocation",
            self.elementwise_tokens()
        )
    }
}
