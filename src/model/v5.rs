//! RWKV-5 "Eagle" (5.0, 5.1, 5.2) on the GPU.
//!
//! Per layer, for the tokens x of a chunk (rows n, channels c):
//! ```text
//!  1. xx = LayerNorm(x, ln1); shifted = token shift of xx against att_x state
//!  2. xr, xk, xv, xg = xx * time_mix + shifted * (1 - time_mix)   (5.0: no xg)
//!  3. r = xr Wr, k = xk Wk, v = xv Wv, g = silu(xg Wg)             (5.0: no g)
//!  4. per head, state S [key j, value i]:
//!     y[i] = sum_j r[j] (u[j] k[j] v[i] + S[j, i]);  S[j, i] = k[j] v[i] + w[j] S[j, i]
//!     with w = exp(-exp(time_decay)) and u = time_faaaa (5.2, per channel) or
//!     u = exp(time_first) (5.0/5.1, whose decay and bonus are per head)
//!  5. y = GroupNorm(y, ln_x, eps 64e-5) (* g)
//!  6. x = x + y Wo
//!  7. xx = LayerNorm(x, ln2); xk, xr = mixes of xx and its shift (time_mix_k, _r)
//!  8. x = x + sigmoid(xr Wr) * (relu(xk Wk)^2 Wv)
//! ```
//!
//! Embedding, ln0, the head and the step around these layers are in
//! `model/mod.rs` and `engine.rs`.

use crate::error::Result;
use crate::gpu::kernels::{plane, Act, Wkv5Params};
use crate::gpu::{GpuBuffer, Recorder};
use crate::loader::SafeTensorsFile;
use crate::matrix::Matrix;
use crate::model::info::Version;
use crate::model::load::{check_heads, BlockLoader, Dims, Loaded};
use crate::model::step::{ChannelMix, Step};
use crate::ops::record_wkv5;
use crate::state::StateLayout;

// Slots of the per-layer vector buffer `vecs [VEC_COUNT, C]`. The token-shift
// mixes come in the order of the mixed planes (r, k, v, g), stored as
// 1 - time_mix so that the shift kernel's x + (prev - x) * m is
// x * time_mix + prev * (1 - time_mix).
const MIX_R: usize = 0; // r, k, v, g at 0..4
const DECAY: usize = 4; // w = exp(-exp(time_decay)) per channel
const BONUS: usize = 5; // u per channel
const LNX_W: usize = 6; // and ln_x.bias at 7
const LN1_W: usize = 8;
const LN1_B: usize = 9;
const LN2_W: usize = 10;
const LN2_B: usize = 11;
const _: () = assert!(LN2_B == LN2_W + 1, "Step::channel_mix reads ln2's bias from the slot after its weight");
const FFN_MIX_K: usize = 12; // k, r at 12, 13
const VEC_COUNT: usize = 14;

pub struct Block {
    vecs: GpuBuffer, // [VEC_COUNT, C] f32
    receptance: Matrix,
    key: Matrix,
    value: Matrix,
    gate: Option<Matrix>, // absent in 5.0
    output: Matrix,
    ffn: ChannelMix,
}

/// Per layer and sequence: `att_x [C]`, `ffn_x [C]`, `att_kv [H, N, N]`
/// officially indexed [head, key j, value i] (v5 and v6), kept on the GPU as
/// [head, value i, key j] so that each WKV invocation owns one contiguous row
/// (as in v7); `State::read`/`write` give and take the official layout.
pub fn state_layout(n_layer: usize, c: usize, n_head: usize, head_size: usize) -> StateLayout {
    StateLayout::new(
        n_layer,
        &[("att_x", vec![c], 0.0), ("ffn_x", vec![c], 0.0), ("att_kv", vec![n_head, head_size, head_size], 0.0)],
    )
    .transposed("att_kv")
}

/// Heads and head size from the tensors: 5.2's `att.time_faaaa [H, N]`;
/// 5.0 and 5.1 have per-head `att.time_decay [H]`, so N = C / H.
pub fn heads(f: &SafeTensorsFile, c: usize, version: Version) -> Result<(usize, usize)> {
    if version == Version::V5_2 {
        return faaaa_heads(f, c);
    }
    let name = "blocks.0.att.time_decay";
    let shape = f.get(name)?.shape;
    let h = if shape.len() == 1 { shape[0] } else { 0 };
    check_heads(name, shape, c, h, if h > 0 && c.is_multiple_of(h) { c / h } else { 0 })
}

/// Heads and head size from `att.time_faaaa [H, N]` (5.2 and 6).
pub fn faaaa_heads(f: &SafeTensorsFile, c: usize) -> Result<(usize, usize)> {
    let name = "blocks.0.att.time_faaaa";
    let shape = f.get(name)?.shape;
    let (h, n) = if shape.len() == 2 { (shape[0], shape[1]) } else { (0, 0) };
    check_heads(name, shape, c, h, n)
}

/// A per-head or per-channel vector (`[H]` or `[H, N]`) as one value per channel.
fn per_channel(ld: &mut BlockLoader, name: &str, n_head: usize, head_size: usize, per_head: bool) -> Result<Vec<f32>> {
    if per_head {
        let v = ld.vector(name, &[n_head])?;
        Ok(v.iter().flat_map(|&x| std::iter::repeat_n(x, head_size)).collect())
    } else {
        ld.vector(name, &[n_head, head_size])
    }
}

/// The blocks of an RWKV-5 checkpoint, one line per official tensor name.
pub fn load(
    ld: &mut BlockLoader,
    d: &Dims,
    version: Version,
    n_head: usize,
    head_size: usize,
) -> Result<Loaded<Block>> {
    let (f, c, n_layer) = (ld.f, d.c, d.n_layer);
    let ffn = f.shape("blocks.0.ffn.key.weight").and_then(|s| s.first().copied()).unwrap_or(0);
    let per_head = version != Version::V5_2;
    let gated = version != Version::V5_0;
    let mix = [1, 1, c];
    let mut blocks = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let p = format!("blocks.{l}.");
        let mut v = vec![0f32; VEC_COUNT * c];
        let mut one_minus = |ld: &mut BlockLoader, slot: usize, name: &str| -> Result<()> {
            let m = ld.vector(name, &mix)?;
            v[slot * c..(slot + 1) * c].iter_mut().zip(&m).for_each(|(d, m)| *d = 1.0 - m);
            Ok(())
        };
        let names = if gated { &["r", "k", "v", "g"][..] } else { &["r", "k", "v"][..] };
        for (i, n) in names.iter().enumerate() {
            one_minus(ld, MIX_R + i, &format!("{p}att.time_mix_{n}"))?;
        }
        one_minus(ld, FFN_MIX_K, &format!("{p}ffn.time_mix_k"))?;
        one_minus(ld, FFN_MIX_K + 1, &format!("{p}ffn.time_mix_r"))?;
        // w = exp(-exp(time_decay)), in f64 and rounded once.
        let decay = per_channel(ld, &format!("{p}att.time_decay"), n_head, head_size, per_head)?;
        let w: Vec<f32> = decay.iter().map(|&t| (-(t as f64).exp()).exp() as f32).collect();
        v[DECAY * c..(DECAY + 1) * c].copy_from_slice(&w);
        let u = if per_head {
            // time_first stores log(u).
            let first = per_channel(ld, &format!("{p}att.time_first"), n_head, head_size, true)?;
            first.iter().map(|&t| (t as f64).exp() as f32).collect()
        } else {
            ld.vector(&format!("{p}att.time_faaaa"), &[n_head, head_size])?
        };
        v[BONUS * c..(BONUS + 1) * c].copy_from_slice(&u);
        ld.vec_into(&mut v, LNX_W, &format!("{p}att.ln_x.weight"), &[c])?;
        ld.vec_into(&mut v, LNX_W + 1, &format!("{p}att.ln_x.bias"), &[c])?;
        ld.vec_into(&mut v, LN1_W, &format!("{p}ln1.weight"), &[c])?;
        ld.vec_into(&mut v, LN1_B, &format!("{p}ln1.bias"), &[c])?;
        ld.vec_into(&mut v, LN2_W, &format!("{p}ln2.weight"), &[c])?;
        ld.vec_into(&mut v, LN2_B, &format!("{p}ln2.bias"), &[c])?;
        let b = Block {
            vecs: ld.vectors("layer vectors", &v)?,
            receptance: ld.mat(&format!("{p}att.receptance.weight"), c, c)?,
            key: ld.mat(&format!("{p}att.key.weight"), c, c)?,
            value: ld.mat(&format!("{p}att.value.weight"), c, c)?,
            gate: if gated { Some(ld.mat(&format!("{p}att.gate.weight"), c, c)?) } else { None },
            output: ld.mat(&format!("{p}att.output.weight"), c, c)?,
            ffn: ChannelMix::load(ld, &p, ffn)?,
        };
        blocks.push(b);
    }
    Ok(Loaded { blocks, ffn, lora: Vec::new(), layout: state_layout(n_layer, c, n_head, head_size) })
}

/// The v5/v6 WKV over the chunk: y from planes R, K, V (and W for a dynamic
/// decay) and the layer's state (`gpu::kernels::record_wkv5`).
pub fn wkv<'a>(
    step: &Step<'a>,
    rec: &mut Recorder<'a>,
    st: &'a GpuBuffer,
    vecs: &'a GpuBuffer,
    bonus_slot: usize,
    decay_slot: usize,
    dynamic: bool,
) -> Result<()> {
    let (s, c, nh) = (step.s, step.info.n_embd, step.info.n_head);
    let longest = step.chunk.longest();
    let p = Wkv5Params {
        n_seq: step.batch as u32,
        n_head: nh as u32,
        head_size: step.info.head_size as u32,
        dim: c as u32,
        plane: s.plane_len(c) as u32,
        state_stride: step.stride as u32,
        state_offset: (2 * c) as u32, // att_kv, after att_x and ffn_x
        t_first: 0,
        t_count: 0,
        u_offset: (bonus_slot * c) as u32,
        w_offset: (decay_slot * c) as u32,
        w_dynamic: dynamic as u32,
    };
    let n = step.n() as u32;
    record_wkv5(rec, p, n, longest, &s.att, &s.seq_start, st, &s.y, vecs, s.wkv_tex.as_ref())
}

/// Records every layer for the tokens of `chunk` (x in `s.x`, after ln0).
pub fn record<'a>(blocks: &'a [Block], rec: &mut Recorder<'a>, step: &Step<'a>) -> Result<()> {
    let (s, n) = (step.s, step.n());
    let c = step.info.n_embd;
    let at = |p: u32| p as usize * s.plane_len(c); // plane p of mixed or att
    let att_x = 0; // offset within a layer's state (ffn_x is at c)
    for (l, b) in blocks.iter().enumerate() {
        let st = &step.state[l];
        // 1-2. xx = ln1(x); the mixes into mixed planes 0.. (r, k, v, g), and
        // xx's last row of each sequence into the state, for the next call.
        step.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN1_W, LN1_B, n)?;
        let n_mix = if b.gate.is_some() { 4 } else { 3 };
        step.token_shift(rec, st, &b.vecs, n_mix, MIX_R, att_x, true, false)?;

        // 3. r, k, v, g projections into the planes of att.
        b.receptance.linear(rec, &s.mixed, at(0), &s.att, at(plane::R), n, Act::None, false)?;
        b.key.linear(rec, &s.mixed, at(1), &s.att, at(plane::K), n, Act::None, false)?;
        b.value.linear(rec, &s.mixed, at(2), &s.att, at(plane::V), n, Act::None, false)?;
        if let Some(g) = &b.gate {
            g.linear(rec, &s.mixed, at(3), &s.att, at(plane::G), n, Act::Silu, false)?;
        }

        // 4. the WKV recurrence with the fixed decay.
        wkv(step, rec, st, &b.vecs, BONUS, DECAY, false)?;

        // 5-6. group norm (and gate); x += y Wo.
        step.group_norm(rec, &b.vecs, LNX_W, None, b.gate.is_some())?;
        b.output.linear(rec, &s.y, 0, &s.x, 0, n, Act::None, true)?;

        // 7-8. channel mix.
        step.channel_mix(rec, st, &b.vecs, LN2_W, FFN_MIX_K, &b.ffn)?;
    }
    Ok(())
}
