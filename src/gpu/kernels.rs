//! The compute kernels: one WGSL file each under `shaders/`, and for each one
//! the `#[repr(C)]` struct that mirrors its `Params` uniform field by field.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::quant::{Encoding, Format, Scheme};
use crate::tensor::Dtype;

/// Shared WGSL helpers prepended to every kernel (WGSL has no includes).
pub(crate) const COMMON: &str = include_str!("../../shaders/common.wgsl");
/// `group_sum` for a workgroup of one subgroup, or of 64 invocations.
pub(crate) const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
pub(crate) const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    LayerNorm,
    RmsNorm,
    Rope,
    Gelu,
    TokenShift,
    GatherRows,
    Linear,
    LinearSg,
    LinearTex,
    LinearQ,
    LinearQTex,
    LinearQxTex,
    V7Prep,
    Wkv7,
    Wkv7Tex,
    Wkv5,
    Wkv5Tex,
    Wkv4,
    GroupNorm,
    MulAdd,
    AddBias,
    Swiglu,
    KvWrite,
    Attention,
    AttentionLanes,
    AttentionCombine,
}

impl Kernel {
    /// The kernel's WGSL file (without the prepended helpers).
    pub fn source(self) -> &'static str {
        match self {
            Kernel::LayerNorm => include_str!("../../shaders/layer_norm.wgsl"),
            Kernel::RmsNorm => include_str!("../../shaders/rms_norm.wgsl"),
            Kernel::Rope => include_str!("../../shaders/rope.wgsl"),
            Kernel::Gelu => include_str!("../../shaders/gelu.wgsl"),
            Kernel::TokenShift => include_str!("../../shaders/token_shift.wgsl"),
            Kernel::GatherRows => include_str!("../../shaders/gather_rows.wgsl"),
            Kernel::Linear => include_str!("../../shaders/linear.wgsl"),
            Kernel::LinearSg => include_str!("../../shaders/linear_sg.wgsl"),
            Kernel::LinearTex => include_str!("../../shaders/linear_tex.wgsl"),
            Kernel::LinearQ => include_str!("../../shaders/linear_q.wgsl"),
            Kernel::LinearQTex => include_str!("../../shaders/linear_q_tex.wgsl"),
            Kernel::LinearQxTex => include_str!("../../shaders/linear_qx_tex.wgsl"),
            Kernel::V7Prep => include_str!("../../shaders/v7_prep.wgsl"),
            Kernel::Wkv7 => include_str!("../../shaders/wkv7.wgsl"),
            Kernel::Wkv7Tex => include_str!("../../shaders/wkv7_tex.wgsl"),
            Kernel::Wkv5 => include_str!("../../shaders/wkv5.wgsl"),
            Kernel::Wkv5Tex => include_str!("../../shaders/wkv5_tex.wgsl"),
            Kernel::Wkv4 => include_str!("../../shaders/wkv4.wgsl"),
            Kernel::GroupNorm => include_str!("../../shaders/group_norm.wgsl"),
            Kernel::MulAdd => include_str!("../../shaders/mul_add.wgsl"),
            Kernel::AddBias => include_str!("../../shaders/add_bias.wgsl"),
            Kernel::Swiglu => include_str!("../../shaders/swiglu.wgsl"),
            Kernel::KvWrite => include_str!("../../shaders/kv_write.wgsl"),
            Kernel::Attention => include_str!("../../shaders/attention.wgsl"),
            Kernel::AttentionLanes => include_str!("../../shaders/attention_lanes.wgsl"),
            Kernel::AttentionCombine => include_str!("../../shaders/attention_combine.wgsl"),
        }
    }
}

/// Tokens of one `linear_tex.wgsl` workgroup, and rows per lane (its entry
/// point and `PR` override).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TexTile {
    /// One token, LINEAR_TEX_DECODE_LANE_ROWS rows per lane (entry `decode`).
    Decode,
    /// LINEAR_TEX_TOKENS tokens, LINEAR_TEX_PREFILL_LANE_ROWS rows per lane (entry `prefill`).
    Prefill,
    /// LINEAR_TEX_TOKENS tokens, LINEAR_TEX_PREFILL_LANE_ROWS_SMALL rows per
    /// lane, for matrices of at most that many rows per lane (LoRA ranks).
    PrefillSmall,
}

/// Where `linear_tex.wgsl` reads x from (its `XU` override).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XSource {
    /// The engine's x texture, filled by a copy before the dispatch.
    Texture,
    /// A uniform window of the activation buffer, bound in place.
    Window,
}

/// Entry point of `wkv7_tex.wgsl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WkvEntry {
    /// Any number of tokens per sequence.
    Main,
    /// At most one token per sequence: one subgroup per (head, sequence).
    Decode,
}

/// One compiled variant of a kernel: everything that picks its entry point
/// or sets its override constants. Made by [`super::KernelPlan`], which
/// both precompiling and recording ask, so the two cannot differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pipeline {
    /// `tpw`: rows per invocation (`TPW`).
    LayerNorm {
        tpw: u32,
    },
    /// `tpw`: rows per workgroup (`TPW`).
    RmsNorm {
        tpw: u32,
    },
    /// `tpw`: tokens per invocation (`TPW`).
    TokenShift {
        tpw: u32,
    },
    GatherRows,
    Rope,
    Gelu,
    /// `tpw`: tokens per workgroup (`TPW`).
    GroupNorm {
        tpw: u32,
    },
    /// `tpw`: tokens per workgroup (`TPW`).
    V7Prep {
        tpw: u32,
    },
    MulAdd,
    AddBias,
    Swiglu,
    /// `kv_write.wgsl` for a cache of this element type (`KVF16`).
    KvWrite(KvDtype),
    /// `attention.wgsl` over a cache of this element type (`KVF16`).
    Attention(KvDtype),
    /// `attention_lanes.wgsl`: a cache of `dtype`, heads of `hd4` vec4s
    /// (`HD4`), `g` query heads per workgroup (`GH`).
    AttentionLanes {
        dtype: KvDtype,
        hd4: u32,
        g: u32,
    },
    AttentionCombine,
    Wkv7,
    Wkv7Tex(WkvEntry),
    Wkv5,
    Wkv5Tex,
    Wkv4,
    /// `linear.wgsl` with weights of this dtype (`WDTYPE`).
    Linear(Dtype),
    /// `linear_sg.wgsl`: `tokens` per workgroup (`TN`: 1 or LINEAR_TN).
    LinearSg {
        weights: Dtype,
        tokens: u32,
    },
    /// `linear_q.wgsl`: block-quantized weights (`QF`, `QB`), `tokens` per
    /// workgroup (`TN`: 1 or LINEAR_TN).
    LinearQ {
        scheme: Scheme,
        tokens: u32,
    },
    /// `linear_tex.wgsl` for float weights, `linear_q_tex.wgsl` for blocks.
    LinearTex {
        weights: Encoding,
        tile: TexTile,
        x: XSource,
    },
    /// `linear_qx_tex.wgsl`: int8 or Q4 in blocks of 64 in row groups, x
    /// quantized in the kernel, integer sums (subgroups of 8). `Decode`: 1
    /// token; otherwise LINEAR_QX_TOKENS per workgroup.
    LinearQxTex {
        format: Format,
        tile: TexTile,
        x: XSource,
    },
}

impl Pipeline {
    pub fn kernel(self) -> Kernel {
        match self {
            Pipeline::LayerNorm { .. } => Kernel::LayerNorm,
            Pipeline::RmsNorm { .. } => Kernel::RmsNorm,
            Pipeline::TokenShift { .. } => Kernel::TokenShift,
            Pipeline::GatherRows => Kernel::GatherRows,
            Pipeline::Rope => Kernel::Rope,
            Pipeline::Gelu => Kernel::Gelu,
            Pipeline::GroupNorm { .. } => Kernel::GroupNorm,
            Pipeline::V7Prep { .. } => Kernel::V7Prep,
            Pipeline::MulAdd => Kernel::MulAdd,
            Pipeline::AddBias => Kernel::AddBias,
            Pipeline::Swiglu => Kernel::Swiglu,
            Pipeline::KvWrite(_) => Kernel::KvWrite,
            Pipeline::Attention(_) => Kernel::Attention,
            Pipeline::AttentionLanes { .. } => Kernel::AttentionLanes,
            Pipeline::AttentionCombine => Kernel::AttentionCombine,
            Pipeline::Wkv7 => Kernel::Wkv7,
            Pipeline::Wkv7Tex(_) => Kernel::Wkv7Tex,
            Pipeline::Wkv5 => Kernel::Wkv5,
            Pipeline::Wkv5Tex => Kernel::Wkv5Tex,
            Pipeline::Wkv4 => Kernel::Wkv4,
            Pipeline::Linear(_) => Kernel::Linear,
            Pipeline::LinearSg { .. } => Kernel::LinearSg,
            Pipeline::LinearQ { .. } => Kernel::LinearQ,
            Pipeline::LinearTex { weights: Encoding::Float(_), .. } => Kernel::LinearTex,
            Pipeline::LinearTex { weights: Encoding::Blocks(_), .. } => Kernel::LinearQTex,
            Pipeline::LinearQxTex { .. } => Kernel::LinearQxTex,
        }
    }

    /// The WGSL entry point.
    pub fn entry(self) -> &'static str {
        match self {
            Pipeline::LinearTex { tile: TexTile::Decode, .. }
            | Pipeline::LinearQxTex { tile: TexTile::Decode, .. }
            | Pipeline::Wkv7Tex(WkvEntry::Decode) => "decode",
            Pipeline::LinearTex { .. } | Pipeline::LinearQxTex { .. } => "prefill",
            _ => "main",
        }
    }

    /// Override constants beyond `GS`, the adapter's reduction width.
    pub fn constants(self, subgroup: Option<u32>) -> Result<Vec<(&'static str, f64)>> {
        let need_sg = || subgroup.ok_or_else(|| Error::Gpu(format!("{self:?} needs a fixed subgroup size")));
        Ok(match self {
            Pipeline::LayerNorm { tpw }
            | Pipeline::RmsNorm { tpw }
            | Pipeline::TokenShift { tpw }
            | Pipeline::GroupNorm { tpw }
            | Pipeline::V7Prep { tpw } => vec![("TPW", tpw as f64)],
            Pipeline::Linear(w) => vec![("WDTYPE", wdtype(w) as f64)],
            Pipeline::KvWrite(d) | Pipeline::Attention(d) => vec![("KVF16", (d == KvDtype::F16) as u32 as f64)],
            Pipeline::AttentionLanes { dtype, hd4, g } => {
                need_sg()?;
                vec![("KVF16", (dtype == KvDtype::F16) as u32 as f64), ("HD4", hd4 as f64), ("GH", g as f64)]
            }
            Pipeline::LinearSg { weights, tokens } => {
                vec![("WDTYPE", wdtype(weights) as f64), ("WG", need_sg()? as f64), ("TN", tokens as f64)]
            }
            Pipeline::LinearQ { scheme, tokens } => {
                vec![("QF", qf(scheme.format) as f64), ("QB", scheme.block as f64), ("TN", tokens as f64)]
            }
            Pipeline::LinearTex { weights: Encoding::Float(weights), tile, x } => {
                let pr = match tile {
                    TexTile::PrefillSmall => LINEAR_TEX_PREFILL_LANE_ROWS_SMALL,
                    _ => LINEAR_TEX_PREFILL_LANE_ROWS,
                };
                vec![
                    ("WDTYPE", wdtype(weights) as f64),
                    ("WG", need_sg()? as f64),
                    ("XU", (x == XSource::Window) as u32 as f64),
                    ("PR", pr as f64),
                ]
            }
            // One tile of 8 rows per lane for any number of tokens (`decode`
            // or `prefill`): the plan never asks for `TexTile::Prefill`.
            Pipeline::LinearTex { weights: Encoding::Blocks(scheme), x, .. } => vec![
                ("WG", need_sg()? as f64),
                ("XU", (x == XSource::Window) as u32 as f64),
                ("QF", qf(scheme.format) as f64),
                ("QB", scheme.block as f64),
            ],
            Pipeline::LinearQxTex { format, x, .. } => {
                if need_sg()? != 8 {
                    return Err(Error::Gpu(format!("{self:?} needs subgroups of 8")));
                }
                vec![("WG", 8.0), ("XU", (x == XSource::Window) as u32 as f64), ("QF", qf(format) as f64)]
            }
            _ => Vec::new(),
        })
    }
}

/// Bytes of the uniform window `linear_tex` reads x through (its `xu`).
pub const X_WINDOW_BYTES: u64 = 65536;

/// Workgroup size of every kernel (threads along x).
pub const WG: u32 = 64;
/// Tokens per invocation in `linear.wgsl` and per workgroup in
/// `linear_sg.wgsl` (their `TN`, unrolled by hand).
pub const LINEAR_TN: u32 = 4;
/// Output rows per workgroup of `linear_sg.wgsl` (its `ROWS`).
pub const LINEAR_SG_ROWS: u32 = 16;
/// Rows per lane of `linear_tex.wgsl`'s `decode` and `prefill` (a workgroup
/// of one subgroup covers that many times the subgroup size), and tokens per
/// `prefill` workgroup. Texture layers hold whole tiles of both so no tile
/// straddles two layers.
pub const LINEAR_TEX_DECODE_LANE_ROWS: u32 = 8;
pub const LINEAR_TEX_PREFILL_LANE_ROWS: u32 = 16;
/// `prefill`'s rows per lane for matrices of at most that many times the
/// subgroup size rows (its `PR` override; 16 otherwise).
pub const LINEAR_TEX_PREFILL_LANE_ROWS_SMALL: u32 = 8;
pub const LINEAR_TEX_TOKENS: u32 = 8;
/// Tokens per `prefill` workgroup of `linear_qx_tex.wgsl` (its `QT`).
pub const LINEAR_QX_TOKENS: u32 = 4;
/// Largest head size the WKV kernels hold in registers (`MAX_N` in WGSL).
pub const MAX_HEAD_SIZE: usize = 64;

/// `WDTYPE` override value for a weight dtype.
pub fn wdtype(d: Dtype) -> u32 {
    match d {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        Dtype::BF16 => 2,
    }
}

/// `QF` override value for a block format.
pub fn qf(f: Format) -> u32 {
    match f {
        Format::Int8 => 0,
        Format::Q4 => 1,
    }
}

/// Output rows per workgroup of `linear_q.wgsl` (its `ROWS`).
pub const LINEAR_Q_ROWS: u32 = 4;

/// Activation applied by `linear.wgsl` before storing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Act {
    None = 0,
    Tanh = 1,
    Sigmoid = 2,
    /// relu(x)², the RWKV channel-mix key activation.
    ReluSq = 3,
    /// x · sigmoid(x), the RWKV-5/6 gate and SwiGLU's gate.
    Silu = 4,
}

/// `linear.wgsl`: `Y[n, row0+o] (+)= act(Σ_i X[n,i]·W[o,i])`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct LinearParams {
    pub n_rows: u32,
    pub d_in: u32,
    pub d_out: u32,
    pub row0: u32,
    pub part_rows: u32,
    pub x_offset: u32,
    pub y_offset: u32,
    pub act: u32,
    pub accumulate: u32,
    pub _pad: [u32; 3],
}

/// `linear_tex.wgsl`: `Y[n, o] (+)= act(Σ_i X[n,i]·W[o,i])`, W and X in textures.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct LinearTexParams {
    pub n_rows: u32,
    pub d_in: u32,
    pub d_out: u32,
    pub layer_rows: u32,
    pub y_offset: u32,
    pub act: u32,
    pub accumulate: u32,
    pub _pad: u32,
}

/// `layer_norm.wgsl`: y = (x - mean) / sqrt(var + eps) * w + b per row.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct LayerNormParams {
    pub n_rows: u32,
    pub dim: u32,
    pub x_offset: u32,
    pub y_offset: u32,
    pub w_offset: u32,
    pub b_offset: u32,
    pub eps: f32,
    pub _pad: u32,
}

impl LayerNormParams {
    /// Workgroups for these params: one per run of `tpw` rows.
    pub fn groups(&self, tpw: u32) -> [u32; 3] {
        [self.n_rows.div_ceil(tpw), 1, 1]
    }
}

/// `rms_norm.wgsl`: `y = x / sqrt(mean(x²) + eps) * w` per row.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RmsNormParams {
    pub n_rows: u32,
    pub dim: u32,
    pub x_offset: u32,
    pub y_offset: u32,
    pub w_offset: u32,
    pub eps: f32,
    pub _pad: [u32; 2],
}

impl RmsNormParams {
    /// Workgroups for these params: one per run of `tpw` rows.
    pub fn groups(&self, tpw: u32) -> [u32; 3] {
        [self.n_rows.div_ceil(tpw), 1, 1]
    }
}

/// `gelu.wgsl`: the exact (erf) GELU in place on `n` elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GeluParams {
    pub n: u32,
    pub offset: u32,
    pub _pad: [u32; 2],
}

/// `rope.wgsl`: rotate-half RoPE in place on the first `rotary` channels of
/// each head, with per-token (cos, sin) pairs.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RopeParams {
    pub n_tok: u32,
    pub n_head: u32,
    pub head_dim: u32,
    pub rotary: u32,
    pub row_stride: u32,
    pub offset: u32,
    pub _pad: [u32; 2],
}

/// `token_shift.wgsl`: out[m, n, c] = x + (prev - x) * (mix[m, c] + extra[m, n, c]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct TokenShiftParams {
    pub n_tok: u32,
    pub dim: u32,
    pub n_mix: u32,
    pub mix_offset: u32,
    pub state_stride: u32,
    pub state_offset: u32,
    pub out_plane: u32,
    /// 1: each sequence's last x becomes its state.
    pub hand_over: u32,
    /// Elements between the planes of `extra`; 0: no extra (binding unused).
    pub extra_plane: u32,
    pub _pad: [u32; 3],
}

impl TokenShiftParams {
    /// Most mixing vectors (`MAX_MIX` in WGSL).
    pub const MAX_MIX: u32 = 8;

    /// Workgroups for these params: 64 channel groups of 4 by runs of
    /// `tpw` tokens.
    pub fn groups(&self, tpw: u32) -> [u32; 3] {
        [(self.dim / 4).div_ceil(WG), self.n_tok.div_ceil(tpw), 1]
    }
}

/// `mul_add.wgsl`: x[n, c] += a[n, c] * b[n, c].
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MulAddParams {
    pub n_tok: u32,
    pub dim: u32,
    pub a_offset: u32,
    pub b_offset: u32,
}

/// `gather_rows.wgsl`: `out[r, :] = x[rows[r], :]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GatherParams {
    pub n_out: u32,
    pub dim: u32,
    pub rows_offset: u32,
    pub _pad: u32,
}

/// `v7_prep.wgsl`: decay, a, kk, k and the value residual of RWKV-7.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct V7PrepParams {
    pub n_tok: u32,
    pub dim: u32,
    pub head_size: u32,
    pub plane: u32,
    pub layer0: u32,
    pub w0: u32,
    pub a0: u32,
    pub v0: u32,
    pub k_k: u32,
    pub k_a: u32,
    pub _pad: [u32; 2],
}

impl V7PrepParams {
    /// Workgroups for these params: one per head and run of `tpw` tokens.
    pub fn groups(&self, tpw: u32) -> [u32; 3] {
        head_runs(self.dim, self.head_size, self.n_tok, tpw)
    }
}

/// Workgroups of the per-head element-wise kernels (group norm, v7_prep):
/// one per head and run of `tpw` tokens.
fn head_runs(dim: u32, head_size: u32, n_tok: u32, tpw: u32) -> [u32; 3] {
    [dim / head_size, n_tok.div_ceil(tpw), 1]
}

/// `wkv7.wgsl`: the RWKV-7 state recurrence, one workgroup per (head, sequence).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Wkv7Params {
    pub n_seq: u32,
    pub n_head: u32,
    pub head_size: u32,
    pub dim: u32,
    pub plane: u32,
    pub state_stride: u32,
    pub state_offset: u32,
    /// This dispatch walks tokens `t_first .. t_first + t_count` of each sequence.
    pub t_first: u32,
    pub t_count: u32,
    pub _pad: [u32; 3],
}

/// Most tokens one `wkv7.wgsl` dispatch walks. llvmpipe (Mesa's lavapipe)
/// stops any loop nest after 65535 iterations in all, silently: a token costs
/// about 2 × head_size + 3 of them, so a longer chunk is walked in several
/// dispatches (the state is loaded and stored once per dispatch).
pub const WKV_TOKENS_PER_DISPATCH: u32 = 256;

/// Planes 0 .. WKV_PLANES of the RWKV-7 `att` buffer hold everything the WKV
/// reads (r, w, k, v, a, kk).
pub const WKV_PLANES: u32 = plane::KK + 1;

/// `group_norm.wgsl`: per-head group norm, then v7's r·k·r_k bonus and the gate.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GroupNormParams {
    pub n_tok: u32,
    pub dim: u32,
    pub head_size: u32,
    pub plane: u32,
    pub lnx_w: u32,
    pub lnx_b: u32,
    pub r_k: u32,
    pub eps: f32,
    pub bonus: u32,
    pub gate: u32,
    pub _pad: [u32; 2],
}

impl GroupNormParams {
    /// Workgroups for these params: one per head and run of `tpw` tokens.
    pub fn groups(&self, tpw: u32) -> [u32; 3] {
        head_runs(self.dim, self.head_size, self.n_tok, tpw)
    }
}

/// `wkv5.wgsl`: the RWKV-5/6 state recurrence, one workgroup per (head, sequence).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Wkv5Params {
    pub n_seq: u32,
    pub n_head: u32,
    pub head_size: u32,
    pub dim: u32,
    pub plane: u32,
    pub state_stride: u32,
    pub state_offset: u32,
    pub t_first: u32,
    pub t_count: u32,
    pub u_offset: u32,
    pub w_offset: u32,
    pub w_dynamic: u32,
}

/// `wkv4.wgsl`: the RWKV-4 recurrence, one invocation per (channel, sequence).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Wkv4Params {
    pub n_seq: u32,
    pub dim: u32,
    pub plane: u32,
    pub state_stride: u32,
    pub state_offset: u32,
    pub u_offset: u32,
    pub w_offset: u32,
    pub _pad: u32,
}

/// Element type of a Transformer's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDtype {
    /// Half the memory and bytes read per decode step; keys and values
    /// rounded once to f16 as they are written (the default, as llama.cpp's).
    #[default]
    F16,
    /// Exact: what the golden logits are checked with.
    F32,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            other => Err(Error::InvalidArgument(format!("KV cache type `{other}`: expected f16 or f32"))),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        })
    }
}

/// `add_bias.wgsl`: `x[n, c] += b[c]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AddBiasParams {
    pub n_rows: u32,
    pub dim: u32,
    pub row_stride: u32,
    pub x_offset: u32,
    pub b_offset: u32,
    pub _pad: [u32; 3],
}

/// `swiglu.wgsl`: `y[n, i] = silu(h[n, i]) * h[n, F + i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SwigluParams {
    pub n_rows: u32,
    pub ffn: u32,
    pub _pad: [u32; 2],
}

/// `kv_write.wgsl`: one sequence's k and v rows into its cache.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct KvWriteParams {
    pub n_tok: u32,
    pub row0: u32,
    pub qkv_stride: u32,
    pub k_offset: u32,
    pub kv_dim: u32,
    pub pos0: u32,
    pub cap: u32,
    pub _pad: u32,
}

/// `attention.wgsl`: causal GQA attention of one sequence's rows over its cache.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AttentionParams {
    pub n_tok: u32,
    pub row0: u32,
    pub t0: u32,
    pub qkv_stride: u32,
    pub n_head: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
    pub pos0: u32,
    pub cap: u32,
    pub n_splits: u32,
    pub split_keys: u32,
    pub group_heads: u32,
    pub scale: f32,
    pub _pad: [u32; 3],
}

/// `attention_combine.wgsl`: the splits of `attention.wgsl` merged.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AttentionCombineParams {
    pub n_tok: u32,
    pub row0: u32,
    pub n_head: u32,
    pub head_dim: u32,
    pub n_splits: u32,
    pub _pad: [u32; 3],
}

/// Query heads one `attention.wgsl` workgroup takes at most (`MAX_G`),
/// vec4 accumulators per invocation (`MAX_ACC`) and vec4s of query rows
/// it holds (`QS`).
pub const ATTENTION_MAX_G: usize = 8;
pub const ATTENTION_MAX_ACC: usize = 16;
pub const ATTENTION_QS: usize = 256;
/// Query heads of one `attention_lanes.wgsl` workgroup at most (`MAX_G`),
/// and vec4s of outputs each lane accumulates (`MAX_ACC`).
pub const ATTENTION_LANES_MAX_G: usize = 8;
pub const ATTENTION_LANES_MAX_ACC: usize = 64;
/// Largest head dimension the attention kernel takes.
pub const MAX_ATTENTION_HEAD_DIM: usize = 256;

/// Plane indices of the RWKV-7 time-mix activation buffer `[PLANES, tokens, C]`.
pub mod plane {
    pub const R: u32 = 0;
    pub const W: u32 = 1;
    pub const K: u32 = 2;
    pub const V: u32 = 3;
    pub const A: u32 = 4;
    pub const G: u32 = 5;
    pub const KK: u32 = 6;
    pub const V_FIRST: u32 = 7;
    pub const V_GATE: u32 = 8;
    pub const COUNT: u32 = 9;
}
