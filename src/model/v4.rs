//! RWKV-4 on the GPU.
//!
//! Per layer, for the tokens x of a chunk (rows n, channels c):
//! ```text
//!  1. xx = LayerNorm(x, ln1); shifted = token shift of xx against att_x state
//!  2. xr, xk, xv = xx * time_mix + shifted * (1 - time_mix)
//!  3. r = sigmoid(xr Wr), k = xk Wk, v = xv Wv
//!  4. per channel, with u = time_first and w = -exp(time_decay):
//!     y = r * (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) /
//!     (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t})
//!     kept as (aa, bb, pp): numerator and denominator over a common exponent
//!     pp, so nothing overflows however long the context (`wkv4.wgsl`)
//!  5. x = x + y Wo
//!  6. xx = LayerNorm(x, ln2); xk, xr = mixes of xx and its shift (time_mix_k, _r)
//!  7. x = x + sigmoid(xr Wr) * (relu(xk Wk)^2 Wv)
//! ```
//!
//! Embedding, ln0, the head and the step around these layers are in
//! `model/mod.rs` and `engine.rs`.

use crate::error::Result;
use crate::gpu::kernels::{plane, Act, Wkv4Params};
use crate::gpu::{GpuBuffer, Recorder};
use crate::matrix::Matrix;
use crate::model::load::{BlockLoader, Dims, Loaded};
use crate::model::step::{ChannelMix, Step};
use crate::ops::record_wkv4;
use crate::state::StateLayout;

// Slots of the per-layer vector buffer `vecs [VEC_COUNT, C]`. The token-shift
// mixes come in the order of the mixed planes (r, k, v), stored as
// 1 - time_mix (see v5.rs).
const MIX_R: usize = 0; // r, k, v at 0..3
const FIRST: usize = 3; // u = time_first
const DECAY: usize = 4; // w = -exp(time_decay)
const LN1_W: usize = 5;
const LN1_B: usize = 6;
const LN2_W: usize = 7;
const LN2_B: usize = 8;
const _: () = assert!(LN2_B == LN2_W + 1, "Step::channel_mix reads ln2's bias from the slot after its weight");
const FFN_MIX_K: usize = 9; // k, r at 9, 10
const VEC_COUNT: usize = 11;

/// The zero state's pp (the exponent of empty sums), as in the official code.
const PP_INIT: f32 = -1e30;

pub struct Block {
    vecs: GpuBuffer, // [VEC_COUNT, C] f32
    receptance: Matrix,
    key: Matrix,
    value: Matrix,
    output: Matrix,
    ffn: ChannelMix,
}

/// Per layer and sequence: `att_x`, `ffn_x`, `aa`, `bb`, `pp`, each [C].
fn state_layout(n_layer: usize, c: usize) -> StateLayout {
    StateLayout::new(
        n_layer,
        &[
            ("att_x", vec![c], 0.0),
            ("ffn_x", vec![c], 0.0),
            ("aa", vec![c], 0.0),
            ("bb", vec![c], 0.0),
            ("pp", vec![c], PP_INIT),
        ],
    )
}

/// The blocks of an RWKV-4 checkpoint, one line per official tensor name.
pub fn load(ld: &mut BlockLoader, d: &Dims) -> Result<Loaded<Block>> {
    let (f, c, n_layer) = (ld.f, d.c, d.n_layer);
    let ffn = f.shape("blocks.0.ffn.key.weight").and_then(|s| s.first().copied()).unwrap_or(0);
    let mix = [1, 1, c];
    let mut blocks = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let p = format!("blocks.{l}.");
        let mut v = vec![0f32; VEC_COUNT * c];
        let mut put = |slot: usize, values: Vec<f32>| v[slot * c..(slot + 1) * c].copy_from_slice(&values);
        for (i, n) in ["r", "k", "v"].iter().enumerate() {
            let m = ld.vector(&format!("{p}att.time_mix_{n}"), &mix)?;
            put(MIX_R + i, m.iter().map(|m| 1.0 - m).collect());
        }
        for (i, n) in ["k", "r"].iter().enumerate() {
            let m = ld.vector(&format!("{p}ffn.time_mix_{n}"), &mix)?;
            put(FFN_MIX_K + i, m.iter().map(|m| 1.0 - m).collect());
        }
        put(FIRST, ld.vector(&format!("{p}att.time_first"), &[c])?);
        // w = -exp(time_decay), in f64 and rounded once.
        let decay = ld.vector(&format!("{p}att.time_decay"), &[c])?;
        put(DECAY, decay.iter().map(|&t| -(t as f64).exp() as f32).collect());
        put(LN1_W, ld.vector(&format!("{p}ln1.weight"), &[c])?);
        put(LN1_B, ld.vector(&format!("{p}ln1.bias"), &[c])?);
        put(LN2_W, ld.vector(&format!("{p}ln2.weight"), &[c])?);
        put(LN2_B, ld.vector(&format!("{p}ln2.bias"), &[c])?);
        let b = Block {
            vecs: ld.vectors("layer vectors", &v)?,
            receptance: ld.mat(&format!("{p}att.receptance.weight"), c, c)?,
            key: ld.mat(&format!("{p}att.key.weight"), c, c)?,
            value: ld.mat(&format!("{p}att.value.weight"), c, c)?,
            output: ld.mat(&format!("{p}att.output.weight"), c, c)?,
            ffn: ChannelMix::load(ld, &p, ffn)?,
        };
        blocks.push(b);
    }
    Ok(Loaded { blocks, ffn, lora: Vec::new(), layout: state_layout(n_layer, c) })
}

/// Records every layer for the tokens of `chunk` (x in `s.x`, after ln0).
pub fn record<'a>(blocks: &'a [Block], rec: &mut Recorder<'a>, step: &Step<'a>) -> Result<()> {
    let (s, n) = (step.s, step.n());
    let c = step.info.n_embd;
    let at = |p: u32| p as usize * s.plane_len(c); // plane p of mixed or att
    let (att_x, aa) = (0, 2 * c); // offsets within a layer's state (ffn_x is at c)
    for (l, b) in blocks.iter().enumerate() {
        let st = &step.state[l];
        // 1-2. xx = ln1(x); the mixes into mixed planes 0.. (r, k, v), and
        // xx's last row of each sequence into the state, for the next call.
        step.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN1_W, LN1_B, n)?;
        step.token_shift(rec, st, &b.vecs, 3, MIX_R, att_x, true, false)?;

        // 3. r, k, v projections into the planes of att.
        b.receptance.linear(rec, &s.mixed, at(0), &s.att, at(plane::R), n, Act::Sigmoid, false)?;
        b.key.linear(rec, &s.mixed, at(1), &s.att, at(plane::K), n, Act::None, false)?;
        b.value.linear(rec, &s.mixed, at(2), &s.att, at(plane::V), n, Act::None, false)?;

        // 4. the WKV, one invocation per (channel, sequence).
        let p = Wkv4Params {
            n_seq: step.batch as u32,
            dim: c as u32,
            plane: s.plane_len(c) as u32,
            state_stride: step.stride as u32,
            state_offset: aa as u32,
            u_offset: (FIRST * c) as u32,
            w_offset: (DECAY * c) as u32,
            _pad: 0,
        };
        record_wkv4(rec, &p, &s.att, &s.seq_start, st, &s.y, &b.vecs)?;

        // 5. x += y Wo.
        b.output.linear(rec, &s.y, 0, &s.x, 0, n, Act::None, true)?;

        // 6-7. channel mix.
        step.channel_mix(rec, st, &b.vecs, LN2_W, FFN_MIX_K, &b.ffn)?;
    }
    Ok(())
}
