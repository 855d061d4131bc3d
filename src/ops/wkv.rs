//! The WKV recurrences (`wkv7`, `wkv5`, `wkv4` and the texture variants of
//! the first two), recorded in runs of WKV_TOKENS_PER_DISPATCH tokens.

use std::sync::Arc;

use bytemuck::Pod;

use crate::error::Result;
use crate::gpu::kernels::{Wkv4Params, Wkv5Params, Wkv7Params, WG, WKV_PLANES, WKV_TOKENS_PER_DISPATCH};
use crate::gpu::{Binding, GpuBuffer, GpuContext, GpuTexture, Pipeline, Recorder, X_TEXTURE_FORMAT};

/// What `wkv7_tex.wgsl` and `wkv5_tex.wgsl` read instead of storage buffers:
/// the WKV planes of `att` and one layer's state, copied into textures
/// before each run.
pub struct WkvTextures {
    att: Arc<GpuTexture>,   // [WKV_PLANES, capacity, dim / 4] texels
    state: Arc<GpuTexture>, // [n_seq, n_head * 64, 16] texels
}

impl WkvTextures {
    /// Whether the texture WKV kernels can run this shape here: the plan's
    /// conditions (`KernelPlan::wkv_textures`: head size 64, subgroups of 8,
    /// float storage textures), `capacity` tokens and `n_seq` sequences
    /// within the texture limits, and a state layout a buffer-to-texture
    /// copy can read (rows of 256 bytes, sequences a whole number of rows
    /// apart, layers at 16-byte offsets).
    pub fn fit(
        ctx: &GpuContext,
        head_size: usize,
        dim: usize,
        state_stride: usize,
        capacity: usize,
        n_seq: usize,
    ) -> bool {
        let (max_dim, max_layers) = ctx.max_texture_dims();
        ctx.plan().wkv_textures(head_size)
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
/// tokens: with `tex`, the texture kernel `key` (att's planes copied once,
/// the layer's state before each run, since each run writes it), else the
/// buffer kernel `key`. Bindings: att, seq_start, state, y, then (texture
/// kernels) the state texture, then `extra`.
#[allow(clippy::too_many_arguments)]
fn record_runs<'a, P: WkvRun>(
    rec: &mut Recorder<'a>,
    key: Pipeline,
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
                rec.dispatch_with(key, &run, bindings, groups)?
            }
            None => {
                let mut buffers = vec![att, seq_start, state, y];
                buffers.extend_from_slice(extra);
                rec.dispatch(key, &run, &buffers, groups)?
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
    let key = rec.ctx().plan().wkv7(tex.is_some(), longest);
    record_runs(rec, key, p, n_tok, longest, [att, seq_start, state, y], &[], tex)
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
    let key = rec.ctx().plan().wkv5(tex.is_some());
    record_runs(rec, key, p, n_tok, longest, [att, seq_start, state, y], &[vecs], tex)
}

/// The RWKV-4 WKV (`wkv4.wgsl`), one invocation per (channel, sequence);
/// `vecs` holds the bonus and the decay.
#[allow(clippy::too_many_arguments)]
pub fn record_wkv4<'a>(
    rec: &mut Recorder<'a>,
    p: &Wkv4Params,
    att: &'a GpuBuffer,       // [PLANES, p.plane / p.dim, dim]: R, K, V
    seq_start: &'a GpuBuffer, // [n_seq + 1]
    state: &'a GpuBuffer,     // [n_seq, state_stride]
    y: &'a GpuBuffer,         // [n_tok, dim]
    vecs: &'a GpuBuffer,      // per-layer vectors
) -> Result<()> {
    let groups = [p.dim.div_ceil(WG), p.n_seq, 1];
    rec.dispatch(Pipeline::Wkv4, p, &[att, seq_start, state, y, vecs], groups)
}
