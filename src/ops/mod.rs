//! The GPU ops, as functions of buffers and offsets: nothing here knows
//! which model calls it. Each records one kernel (`shaders/*.wgsl`) into a
//! [`Recorder`], with the pipeline the context's [`crate::gpu::KernelPlan`]
//! chooses. The matrix product is [`crate::matrix::Matrix::linear`]; the
//! WKV recurrences are in [`wkv`].
//!
//! Offsets are in f32 elements. Buffers hold rows of `dim` floats; `dim` is
//! a multiple of 4 (the kernels read vec4s).

pub mod attention;
pub mod wkv;

pub use attention::{attention, kv_write, Attention, AttentionShape};
pub use wkv::{record_wkv4, record_wkv5, record_wkv7, WkvTextures};

use crate::error::{Error, Result};
use crate::gpu::kernels::{
    AddBiasParams, GatherParams, GeluParams, GroupNormParams, LayerNormParams, MulAddParams, RmsNormParams, RopeParams,
    SwigluParams, TokenShiftParams, V7PrepParams, WG,
};
use crate::gpu::{GpuBuffer, Pipeline, Recorder};

/// `y[r] = (x[r] - mean) / sqrt(var + eps) * w + b` for `rows` rows of
/// `dim` floats; the weight and bias are vectors of one buffer (`vecs`,
/// at `w_offset` and `b_offset`).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm<'a>(
    rec: &mut Recorder<'a>,
    x: &'a GpuBuffer,    // [rows, dim]
    y: &'a GpuBuffer,    // [rows, dim]
    vecs: &'a GpuBuffer, // w [dim] at w_offset, b [dim] at b_offset
    w_offset: usize,
    b_offset: usize,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let p = LayerNormParams {
        n_rows: rows as u32,
        dim: dim as u32,
        x_offset: 0,
        y_offset: 0,
        w_offset: w_offset as u32,
        b_offset: b_offset as u32,
        eps,
        _pad: 0,
    };
    let key = rec.ctx().plan().layer_norm();
    let Pipeline::LayerNorm { tpw } = key else { unreachable!() };
    rec.dispatch(key, &p, &[x, vecs, y], p.groups(tpw))
}

/// `y[r] = x[r] / sqrt(mean(x[r]²) + eps) * w` for `rows` rows of `dim`
/// floats (RMSNorm, as Llama and Qwen2 normalise); the weight is a vector of
/// `vecs` at `w_offset`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm<'a>(
    rec: &mut Recorder<'a>,
    x: &'a GpuBuffer,    // [rows, dim]
    y: &'a GpuBuffer,    // [rows, dim]
    vecs: &'a GpuBuffer, // w [dim] at w_offset
    w_offset: usize,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let p = RmsNormParams {
        n_rows: rows as u32,
        dim: dim as u32,
        x_offset: 0,
        y_offset: 0,
        w_offset: w_offset as u32,
        eps,
        _pad: [0; 2],
    };
    let key = rec.ctx().plan().rms_norm();
    let Pipeline::RmsNorm { tpw } = key else { unreachable!() };
    rec.dispatch(key, &p, &[x, vecs, y], p.groups(tpw))
}

/// The exact GELU in place, `x = 0.5 x (1 + erf(x / √2))` (GPT-NeoX's MLP;
/// erf to a fractional error below 1.2e-7), on `n` elements from `offset`.
pub fn gelu<'a>(rec: &mut Recorder<'a>, x: &'a GpuBuffer, offset: usize, n: usize) -> Result<()> {
    let p = GeluParams { n: n as u32, offset: offset as u32, _pad: [0; 2] };
    let groups = (n as u32).div_ceil(WG);
    // Past 65535 workgroups in x, the rest go in y (the kernel folds them back).
    let (x_groups, y_groups) = (groups.min(65535), groups.div_ceil(65535));
    rec.dispatch(Pipeline::Gelu, &p, &[x], [x_groups, y_groups, 1])
}

/// Rotary position embedding in place (`rope.wgsl`, the rotate-half form):
/// the first `rotary` channels of each of `n_head` heads of `head_dim` in
/// each of `n` token rows (`row_stride` apart from element `offset`) are
/// rotated by the (cos, sin) pairs `cs [n, rotary / 2]`
/// (see [`rope_cos_sin`]).
#[allow(clippy::too_many_arguments)]
pub fn rope<'a>(
    rec: &mut Recorder<'a>,
    x: &'a GpuBuffer,  // [n, row_stride] at offset
    cs: &'a GpuBuffer, // [n, rotary / 2] (cos, sin) pairs
    n: usize,
    n_head: usize,
    head_dim: usize,
    rotary: usize,
    row_stride: usize,
    offset: usize,
) -> Result<()> {
    if rotary == 0 || !rotary.is_multiple_of(2) || rotary > head_dim {
        return Err(Error::InvalidArgument(format!("rope: {rotary} rotary channels of a head of {head_dim}")));
    }
    let p = RopeParams {
        n_tok: n as u32,
        n_head: n_head as u32,
        head_dim: head_dim as u32,
        rotary: rotary as u32,
        row_stride: row_stride as u32,
        offset: offset as u32,
        _pad: [0; 2],
    };
    let pairs = (rotary / 2 * n_head) as u32;
    rec.dispatch(Pipeline::Rope, &p, &[x, cs], [pairs.div_ceil(WG), n as u32, 1])
}

/// The (cos, sin) pairs of [`rope`] for tokens at `positions`, as
/// transformers computes them: the angle `f32(position) * inv_freq[i]` in
/// f32 (its rotary angles are f32 even in an f64 model), then its cosine and
/// sine, rounded to f32. `[positions.len(), inv_freq.len()]` pairs, flat.
pub fn rope_cos_sin(positions: &[u32], inv_freq: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(positions.len() * inv_freq.len() * 2);
    for &p in positions {
        for &f in inv_freq {
            let angle = (p as f32 * f) as f64;
            out.push(angle.cos() as f32);
            out.push(angle.sin() as f32);
        }
    }
    out
}

/// One token-shift mix (`token_shift.wgsl`), for tokens laid end to end by
/// sequence:
/// `out[m, t, :] = x[t] + (prev - x[t]) * (mix[m] + extra[m, t])`
/// for `n_mix` mixes, `prev` being the token before in its sequence (for a
/// sequence's first token, the row `state[seq, state_offset..]`). With
/// `hand_over`, that state row takes each sequence's last x.
pub struct TokenShift<'a> {
    pub x: &'a GpuBuffer,         // [n, dim]
    pub tok_seq: &'a GpuBuffer,   // [n] sequence of each token
    pub seq_start: &'a GpuBuffer, // [n_seq + 1] first token of each sequence
    pub state: &'a GpuBuffer,     // [n_seq, state_stride]
    pub state_stride: usize,
    pub state_offset: usize,
    /// The mixing vectors `[n_mix, dim]`, from element `mix_offset` of `vecs`.
    pub vecs: &'a GpuBuffer,
    pub mix_offset: usize,
    pub n_mix: u32,
    /// `[n_mix, out_plane]`: mix m goes to element `m * out_plane`.
    pub out: &'a GpuBuffer,
    pub out_plane: usize,
    /// Per-token extra mixes `[n_mix, out_plane]` (v6's data-dependent mix).
    pub extra: Option<&'a GpuBuffer>,
    pub hand_over: bool,
}

pub fn token_shift<'a>(rec: &mut Recorder<'a>, op: &TokenShift<'a>, n: usize, dim: usize) -> Result<()> {
    if op.n_mix > TokenShiftParams::MAX_MIX {
        return Err(Error::InvalidArgument(format!(
            "token shift: {} mixing vectors, at most {}",
            op.n_mix,
            TokenShiftParams::MAX_MIX
        )));
    }
    let p = TokenShiftParams {
        n_tok: n as u32,
        dim: dim as u32,
        n_mix: op.n_mix,
        mix_offset: op.mix_offset as u32,
        state_stride: op.state_stride as u32,
        state_offset: op.state_offset as u32,
        out_plane: op.out_plane as u32,
        hand_over: op.hand_over as u32,
        extra_plane: if op.extra.is_some() { op.out_plane as u32 } else { 0 },
        _pad: [0; 3],
    };
    let key = rec.ctx().plan().token_shift();
    let Pipeline::TokenShift { tpw } = key else { unreachable!() };
    // Without extra mixes the binding is declared but not read: x stands in.
    let extra = op.extra.unwrap_or(op.x);
    let bindings = [op.x, op.tok_seq, op.seq_start, op.state, op.vecs, op.out, extra];
    rec.dispatch(key, &p, &bindings, p.groups(tpw))
}

/// Per-head group norm of `y` (`group_norm.wgsl`), in place:
///   y = GroupNorm(y, w, b, eps) per head of `head_size` channels,
/// then, with `bonus`, `+ (r * k * r_k).sum per head * v` (RWKV-7), and with
/// `gate`, `* g`; r, k, v and g are planes of `att` (`plane` elements apart,
/// at the plane indices of `gpu::kernels::plane`).
pub struct GroupNorm<'a> {
    pub y: &'a GpuBuffer,   // [n, dim]
    pub att: &'a GpuBuffer, // [PLANES, plane]
    pub plane: usize,
    pub vecs: &'a GpuBuffer, // w, b (and r_k) [dim] at their offsets
    pub w_offset: usize,
    pub b_offset: usize,
    pub bonus: Option<usize>, // r_k's offset
    pub gate: bool,
    pub head_size: usize,
    pub eps: f32,
}

pub fn group_norm<'a>(rec: &mut Recorder<'a>, op: &GroupNorm<'a>, n: usize, dim: usize) -> Result<()> {
    let p = GroupNormParams {
        n_tok: n as u32,
        dim: dim as u32,
        head_size: op.head_size as u32,
        plane: op.plane as u32,
        lnx_w: op.w_offset as u32,
        lnx_b: op.b_offset as u32,
        r_k: op.bonus.unwrap_or(0) as u32,
        eps: op.eps,
        bonus: op.bonus.is_some() as u32,
        gate: op.gate as u32,
        _pad: [0; 2],
    };
    let key = rec.ctx().plan().group_norm();
    let Pipeline::GroupNorm { tpw } = key else { unreachable!() };
    rec.dispatch(key, &p, &[op.y, op.att, op.vecs], p.groups(tpw))
}

/// `x[r, c] += b[c]` for the `dim` channels from element `x_offset` of
/// each of `rows` rows `row_stride` apart; the bias is at `b_offset` of `vecs`.
#[allow(clippy::too_many_arguments)]
pub fn add_bias<'a>(
    rec: &mut Recorder<'a>,
    x: &'a GpuBuffer, // [rows, row_stride] at x_offset
    x_offset: usize,
    row_stride: usize,
    rows: usize,
    dim: usize,
    vecs: &'a GpuBuffer, // b [dim] at b_offset
    b_offset: usize,
) -> Result<()> {
    let p = AddBiasParams {
        n_rows: rows as u32,
        dim: dim as u32,
        row_stride: row_stride as u32,
        x_offset: x_offset as u32,
        b_offset: b_offset as u32,
        _pad: [0; 3],
    };
    rec.dispatch(Pipeline::AddBias, &p, &[x, vecs], [(dim as u32 / 4).div_ceil(WG), rows as u32, 1])
}

/// SwiGLU's product `y[r, i] = silu(h[r, i]) * h[r, F + i]` for `rows`
/// rows, `h` holding each row's gate and up projections side by side.
pub fn swiglu<'a>(
    rec: &mut Recorder<'a>,
    h: &'a GpuBuffer, // [rows, 2F]
    y: &'a GpuBuffer, // [rows, F]
    rows: usize,
    ffn: usize,
) -> Result<()> {
    let p = SwigluParams { n_rows: rows as u32, ffn: ffn as u32, _pad: [0; 2] };
    rec.dispatch(Pipeline::Swiglu, &p, &[h, y], [(ffn as u32 / 4).div_ceil(WG), rows as u32, 1])
}

/// `x[t, :] += a[t, :] * b[t, :]` for `n` rows of `dim` (`mul_add.wgsl`).
pub fn mul_add<'a>(
    rec: &mut Recorder<'a>,
    a: &'a GpuBuffer, // [n, dim]
    b: &'a GpuBuffer, // [n, dim]
    x: &'a GpuBuffer, // [n, dim]
    n: usize,
    dim: usize,
) -> Result<()> {
    let p = MulAddParams { n_tok: n as u32, dim: dim as u32, a_offset: 0, b_offset: 0 };
    rec.dispatch(Pipeline::MulAdd, &p, &[a, b, x], [(dim as u32 / 4).div_ceil(WG), n as u32, 1])
}

/// `out[r, :] = x[rows[first + r], :]` for `n_out` rows of `dim` (`gather_rows.wgsl`).
#[allow(clippy::too_many_arguments)]
pub fn gather_rows<'a>(
    rec: &mut Recorder<'a>,
    rows: &'a GpuBuffer, // [first + n_out] u32
    first: usize,
    x: &'a GpuBuffer,   // [*, dim]
    out: &'a GpuBuffer, // [n_out, dim]
    n_out: usize,
    dim: usize,
) -> Result<()> {
    let p = GatherParams { n_out: n_out as u32, dim: dim as u32, rows_offset: first as u32, _pad: 0 };
    rec.dispatch(Pipeline::GatherRows, &p, &[rows, x, out], [(dim as u32).div_ceil(WG), n_out as u32, 1])
}

/// RWKV-7's per-token preparation before its WKV (`v7_prep.wgsl`), in place
/// in the planes of `att`: decay, a, the value residual, kk and k; the
/// vectors w0, a0, v0, k_k, k_a are at the offsets `p` names in `vecs`.
pub fn v7_prep<'a>(
    rec: &mut Recorder<'a>,
    p: &V7PrepParams,
    att: &'a GpuBuffer,  // [PLANES, p.plane]
    vecs: &'a GpuBuffer, // per-layer vectors
) -> Result<()> {
    let key = rec.ctx().plan().v7_prep();
    let Pipeline::V7Prep { tpw } = key else { unreachable!() };
    rec.dispatch(key, p, &[att, vecs], p.groups(tpw))
}
