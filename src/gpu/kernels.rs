//! The compute kernels: one WGSL file each under `shaders/`, and for each one
//! the `#[repr(C)]` struct that mirrors its `Params` uniform field by field.

use bytemuck::{Pod, Zeroable};

use std::sync::Arc;

use super::{Binding, GpuBuffer, GpuContext, GpuTexture, Recorder, WeightStore, X_TEXTURE_FORMAT};
use crate::error::{Error, Result};
use crate::loader::Dtype;

/// Shared WGSL helpers prepended to every kernel (WGSL has no includes).
const COMMON: &str = include_str!("../../shaders/common.wgsl");
/// `group_sum` for a workgroup of one subgroup, or of 64 invocations.
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    LayerNorm,
    TokenShift,
    GatherRows,
    Linear,
    LinearSg,
    LinearTex,
    V7Prep,
    Wkv7,
    Wkv7Tex,
    Wkv5,
    Wkv5Tex,
    Wkv4,
    GroupNorm,
    MulAdd,
}

impl Kernel {
    fn source(self) -> &'static str {
        match self {
            Kernel::LayerNorm => include_str!("../../shaders/layer_norm.wgsl"),
            Kernel::TokenShift => include_str!("../../shaders/token_shift.wgsl"),
            Kernel::GatherRows => include_str!("../../shaders/gather_rows.wgsl"),
            Kernel::Linear => include_str!("../../shaders/linear.wgsl"),
            Kernel::LinearSg => include_str!("../../shaders/linear_sg.wgsl"),
            Kernel::LinearTex => include_str!("../../shaders/linear_tex.wgsl"),
            Kernel::V7Prep => include_str!("../../shaders/v7_prep.wgsl"),
            Kernel::Wkv7 => include_str!("../../shaders/wkv7.wgsl"),
            Kernel::Wkv7Tex => include_str!("../../shaders/wkv7_tex.wgsl"),
            Kernel::Wkv5 => include_str!("../../shaders/wkv5.wgsl"),
            Kernel::Wkv5Tex => include_str!("../../shaders/wkv5_tex.wgsl"),
            Kernel::Wkv4 => include_str!("../../shaders/wkv4.wgsl"),
            Kernel::GroupNorm => include_str!("../../shaders/group_norm.wgsl"),
            Kernel::MulAdd => include_str!("../../shaders/mul_add.wgsl"),
        }
    }
}

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

/// Activation applied by `linear.wgsl` before storing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Act {
    None = 0,
    Tanh = 1,
    Sigmoid = 2,
    /// relu(x)², the RWKV channel-mix key activation.
    ReluSq = 3,
    /// x · sigmoid(x), the RWKV-5/6 gate.
    Silu = 4,
}

/// `linear.wgsl`: Y[n, row0+o] (+)= act(Σ_i X[n,i]·W[o,i]).
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

/// `linear_tex.wgsl`: Y[n, o] (+)= act(Σ_i X[n,i]·W[o,i]), W and X in textures.
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
    /// Workgroups for these params: one per run of
    /// [`GpuContext::elementwise_tokens`] rows.
    pub fn groups(&self, ctx: &GpuContext) -> [u32; 3] {
        [self.n_rows.div_ceil(ctx.elementwise_tokens()), 1, 1]
    }
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
    /// [`GpuContext::elementwise_tokens`] tokens.
    pub fn groups(&self, ctx: &GpuContext) -> [u32; 3] {
        [(self.dim / 4).div_ceil(WG), self.n_tok.div_ceil(ctx.elementwise_tokens()), 1]
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

/// `gather_rows.wgsl`: out[r, :] = x[rows[r], :].
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
    /// Workgroups for these params: see [`head_runs`].
    pub fn groups(&self, ctx: &GpuContext) -> [u32; 3] {
        head_runs(ctx, self.dim, self.head_size, self.n_tok)
    }
}

/// Workgroups of the per-head element-wise kernels (group norm, v7_prep):
/// one per head and run of [`GpuContext::elementwise_tokens`] tokens.
fn head_runs(ctx: &GpuContext, dim: u32, head_size: u32, n_tok: u32) -> [u32; 3] {
    [dim / head_size, n_tok.div_ceil(ctx.elementwise_tokens()), 1]
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

/// What `wkv7_tex.wgsl` and `wkv5_tex.wgsl` read instead of storage buffers:
/// the WKV planes of `att` and one layer's state, copied into textures
/// before each run.
pub struct WkvTextures {
    att: Arc<GpuTexture>,   // [WKV_PLANES, capacity, dim / 4] texels
    state: Arc<GpuTexture>, // [n_seq, n_head * 64, 16] texels
}

impl WkvTextures {
    /// Whether the texture WKV kernels can run this shape here: head size 64,
    /// subgroups of 8, float storage textures, `capacity` tokens and `n_seq` sequences within the
    /// texture limits, and a state layout a buffer-to-texture copy can read
    /// (rows of 256 bytes, sequences a whole number of rows apart, layers at
    /// 16-byte offsets).
    pub fn fit(
        ctx: &GpuContext,
        head_size: usize,
        dim: usize,
        state_stride: usize,
        capacity: usize,
        n_seq: usize,
    ) -> bool {
        let (max_dim, max_layers) = ctx.max_texture_dims();
        ctx.subgroup_size() == Some(8)
            && ctx.float_storage_textures()
            && head_size == 64
            && dim.is_multiple_of(64)
            && (state_stride * 4).is_multiple_of(256)
            && capacity.max(dim) <= max_dim as usize
            && n_seq <= max_layers as usize
    }

    pub fn new(ctx: &GpuContext, dim: usize, capacity: usize, n_seq: usize) -> Result<Self> {
        let att = ctx.texture("att texture", (dim / 4) as u32, capacity as u32, WKV_PLANES, X_TEXTURE_FORMAT, true)?;
        let state = ctx.texture("state texture", 16, dim as u32, n_seq as u32, X_TEXTURE_FORMAT, true)?;
        Ok(Self { att: Arc::new(att), state: Arc::new(state) })
    }

    /// att's planes 0 .. WKV_PLANES for `n_tok` tokens into the att texture.
    fn copy_att<'a>(&self, rec: &mut Recorder<'a>, att: &'a GpuBuffer, dim: u32, plane: u32, n_tok: u32) {
        rec.copy_to_texture(att, 0, dim * 4, plane / dim, self.att.clone(), [dim / 4, n_tok, WKV_PLANES]);
    }

    /// One layer's state of every sequence (one texture row per state row of
    /// 64 floats = 256 bytes) into the state texture.
    fn copy_state<'a>(
        &self,
        rec: &mut Recorder<'a>,
        state: &'a GpuBuffer,
        offset: u32,
        stride: u32,
        rows: u32,
        n_seq: u32,
    ) {
        rec.copy_to_texture(state, offset as u64 * 4, 256, stride / 64, self.state.clone(), [16, rows, n_seq]);
    }
}

/// The fields every WKV kernel's params share, for `record_runs`.
trait WkvRun: Pod {
    /// (n_seq, n_head, head_size, dim, plane, state_stride, state_offset)
    fn geometry(&self) -> [u32; 7];
    /// These params for the run of tokens `t_first .. t_first + t_count`.
    fn run(self, t_first: u32, t_count: u32) -> Self;
}

impl WkvRun for Wkv7Params {
    fn geometry(&self) -> [u32; 7] {
        [self.n_seq, self.n_head, self.head_size, self.dim, self.plane, self.state_stride, self.state_offset]
    }
    fn run(self, t_first: u32, t_count: u32) -> Self {
        Self { t_first, t_count, ..self }
    }
}

impl WkvRun for Wkv5Params {
    fn geometry(&self) -> [u32; 7] {
        [self.n_seq, self.n_head, self.head_size, self.dim, self.plane, self.state_stride, self.state_offset]
    }
    fn run(self, t_first: u32, t_count: u32) -> Self {
        Self { t_first, t_count, ..self }
    }
}

/// Records a WKV kernel over tokens `0 .. longest` of each of the params'
/// sequences (`n_tok` tokens in all), in runs of WKV_TOKENS_PER_DISPATCH
/// tokens: with `tex`, the texture kernel (att's planes copied once, the
/// layer's state before each run, since each run writes it; with
/// `texture_decode`, its `decode` entry when no sequence has more than one
/// token), else the buffer kernel. Bindings: att, seq_start, state, y, then (texture kernels) the
/// state texture, then `extra`.
#[allow(clippy::too_many_arguments)]
fn record_runs<'a, P: WkvRun>(
    rec: &mut Recorder<'a>,
    (buffer_kernel, texture_kernel, texture_decode): (Kernel, Kernel, bool),
    p: P,
    n_tok: u32,
    longest: u32,
    [att, seq_start, state, y]: [&'a GpuBuffer; 4],
    extra: &[&'a GpuBuffer],
    tex: Option<&WkvTextures>,
) -> Result<()> {
    let [n_seq, n_head, head_size, dim, plane, state_stride, state_offset] = p.geometry();
    let groups = [n_head, n_seq, 1];
    if let Some(t) = tex {
        t.copy_att(rec, att, dim, plane, n_tok);
    }
    for t_first in (0..longest).step_by(WKV_TOKENS_PER_DISPATCH as usize) {
        let run = p.run(t_first, WKV_TOKENS_PER_DISPATCH);
        match tex {
            Some(t) => {
                t.copy_state(rec, state, state_offset, state_stride, n_head * head_size, n_seq);
                let mut bindings = vec![
                    Binding::Texture(t.att.clone()),
                    Binding::Buffer(seq_start),
                    Binding::Buffer(state),
                    Binding::Buffer(y),
                    Binding::Texture(t.state.clone()),
                ];
                bindings.extend(extra.iter().map(|b| Binding::Buffer(b)));
                // One token per sequence: the `decode` entry (variant 1).
                let variant = (texture_decode && longest == 1) as u32;
                rec.dispatch_with(texture_kernel, variant, &run, bindings, groups)?
            }
            None => {
                let mut buffers = vec![att, seq_start, state, y];
                buffers.extend_from_slice(extra);
                rec.dispatch(buffer_kernel, 0, &run, &buffers, groups)?
            }
        }
    }
    Ok(())
}

/// The RWKV-7 WKV (`wkv7_tex.wgsl` with `tex`, else `wkv7.wgsl`), see `record_runs`.
#[allow(clippy::too_many_arguments)]
pub fn record_wkv7<'a>(
    rec: &mut Recorder<'a>,
    p: Wkv7Params,
    n_tok: u32,
    longest: u32,
    att: &'a GpuBuffer,       // [plane::COUNT, p.plane / p.dim, dim]
    seq_start: &'a GpuBuffer, // [n_seq + 1]
    state: &'a GpuBuffer,     // [n_seq, state_stride]
    y: &'a GpuBuffer,         // [n_tok, dim]
    tex: Option<&WkvTextures>,
) -> Result<()> {
    let kernels = (Kernel::Wkv7, Kernel::Wkv7Tex, true);
    record_runs(rec, kernels, p, n_tok, longest, [att, seq_start, state, y], &[], tex)
}

/// The RWKV-5/6 WKV (`wkv5_tex.wgsl` with `tex`, else `wkv5.wgsl`), see
/// `record_runs`; `vecs` holds the bonus and the decay.
#[allow(clippy::too_many_arguments)]
pub fn record_wkv5<'a>(
    rec: &mut Recorder<'a>,
    p: Wkv5Params,
    n_tok: u32,
    longest: u32,
    att: &'a GpuBuffer,       // [plane::COUNT, p.plane / p.dim, dim]
    seq_start: &'a GpuBuffer, // [n_seq + 1]
    state: &'a GpuBuffer,     // [n_seq, state_stride]
    y: &'a GpuBuffer,         // [n_tok, dim]
    vecs: &'a GpuBuffer,      // per-layer vectors
    tex: Option<&WkvTextures>,
) -> Result<()> {
    let kernels = (Kernel::Wkv5, Kernel::Wkv5Tex, false);
    record_runs(rec, kernels, p, n_tok, longest, [att, seq_start, state, y], &[vecs], tex)
}

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
    /// Workgroups for these params: see [`head_runs`].
    pub fn groups(&self, ctx: &GpuContext) -> [u32; 3] {
        head_runs(ctx, self.dim, self.head_size, self.n_tok)
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

impl GpuContext {
    /// Tokens per invocation of the element-wise kernels that read per-layer
    /// vectors (`token_shift.wgsl`, `group_norm.wgsl`, `v7_prep.wgsl`,
    /// `layer_norm.wgsl`: their `TPW`): 8 on CPU adapters (the texture store), where each storage-buffer
    /// load is a per-lane loop and the vectors are then loaded once per 8
    /// tokens (a batch-8 decode step); 1 elsewhere, for parallelism.
    pub fn elementwise_tokens(&self) -> u32 {
        match self.weight_store() {
            WeightStore::Texture => 8,
            WeightStore::Buffer => 1,
        }
    }

    /// Invocations per workgroup of the row-reducing kernels (`GS`): the
    /// subgroup size where it is fixed, else 64.
    pub fn group_size(&self) -> u32 {
        self.subgroup_size().unwrap_or(64)
    }

    /// The compiled pipeline for `kernel` (with weights of `wdtype`, and for
    /// LinearSg its token tile in bits 8..), built on first use and cached.
    pub fn pipeline(&self, kernel: Kernel, wdtype: u32) -> Result<wgpu::ComputePipeline> {
        let key = (kernel, wdtype);
        if let Some(p) = self.shared.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let device = self.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let reduce = if self.subgroup_size().is_some() { REDUCE_SUBGROUP } else { REDUCE_WORKGROUP };
        let source = format!("{COMMON}\n{reduce}\n{}", kernel.source());
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&format!("{kernel:?}")),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        // `variant` is the WDTYPE, plus for LinearSg and LinearTex its tokens
        // per workgroup << 8, and for LinearTex x from a uniform window << 12
        // and the 8-row prefill tile << 13.
        let mut constants = vec![("WDTYPE", (wdtype & 0xff) as f64), ("GS", self.group_size() as f64)];
        // linear_tex has two entry points: `decode` (1 token) and `prefill`.
        let entry = match kernel {
            Kernel::LinearTex if (wdtype >> 8) & 0xf == 1 => "decode",
            Kernel::LinearTex => "prefill",
            Kernel::Wkv7Tex if wdtype == 1 => "decode",
            _ => "main",
        };
        if kernel == Kernel::LinearTex {
            let sg = self.subgroup_size().ok_or_else(|| Error::Gpu("LinearTex needs a fixed subgroup size".into()))?;
            constants.push(("WG", sg as f64));
            constants.push(("XU", ((wdtype >> 12) & 1) as f64)); // x from a uniform window
            let pr =
                if (wdtype >> 13) & 1 == 1 { LINEAR_TEX_PREFILL_LANE_ROWS_SMALL } else { LINEAR_TEX_PREFILL_LANE_ROWS };
            constants.push(("PR", pr as f64));
        }
        if matches!(kernel, Kernel::TokenShift | Kernel::GroupNorm | Kernel::V7Prep | Kernel::LayerNorm) {
            constants.push(("TPW", self.elementwise_tokens() as f64));
        }
        if kernel == Kernel::LinearSg {
            let sg = self.subgroup_size().ok_or_else(|| Error::Gpu("LinearSg needs a fixed subgroup size".into()))?;
            constants.push(("WG", sg as f64));
            constants.push(("TN", (wdtype >> 8).max(1) as f64));
        }
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&format!("{kernel:?}")),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("compiling kernel {kernel:?}: {e}")));
        }
        self.shared.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
