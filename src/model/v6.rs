//! RWKV-6 "Finch" on the GPU.
//!
//! Per layer, for the tokens x of a chunk (rows n, channels c):
//! ```text
//!  1. xx = LayerNorm(x, ln1); sx = (token shift of xx against att_x state) - xx
//!  2. xxx = xx + sx * time_maa_x
//!  3. m_i = tanh(xxx W1_i) W2_i for the five LoRAs i = w, k, v, r, g
//!     (time_maa_w1 [C, 5 D] split into five [C, D], time_maa_w2 [5, D, C])
//!  4. x_i = xx + sx * (time_maa_i + m_i)
//!  5. r = xr Wr, k = xk Wk, v = xv Wv, g = silu(xg Wg)
//!  6. w = exp(-exp(time_decay + tanh(xw Wd1) Wd2))            (per token)
//!  7. per head, state S [key j, value i]:
//!     y[i] = sum_j r[j] (u[j] k[j] v[i] + S[j, i]);  S[j, i] = k[j] v[i] + w[j] S[j, i]
//!     with u = time_faaaa
//!  8. y = GroupNorm(y, ln_x, eps 64e-5) * g; x = x + y Wo
//!  9. xx = LayerNorm(x, ln2); xk, xr = xx + sx * time_maa_{k,r}
//! 10. x = x + sigmoid(xr Wr) * (relu(xk Wk)^2 Wv)
//! ```
//!
//! Embedding, ln0, the head and the step around these layers are in
//! `model/mod.rs` and `engine.rs`.

use crate::error::Result;
use crate::gpu::kernels::{plane, Act};
use crate::gpu::{GpuBuffer, Recorder};
use crate::loader::SafeTensorsFile;
use crate::matrix::Matrix;
use crate::model::load::{BlockLoader, Dims, Loaded};
use crate::model::step::{ChannelMix, Step};
use crate::model::v5::{faaaa_heads, state_layout, wkv};
use crate::tensor::Tensor;

// Slots of the per-layer vector buffer `vecs [VEC_COUNT, C]`.
const MAA_X: usize = 0;
const MAA_W: usize = 1; // w, k, v, r, g at 1..6, the order of the LoRAs
const DECAY: usize = 6; // time_decay (before the data-dependent part)
const BONUS: usize = 7; // time_faaaa
const LNX_W: usize = 8; // and ln_x.bias at 9
const LN1_W: usize = 10;
const LN1_B: usize = 11;
const LN2_W: usize = 12;
const LN2_B: usize = 13;
const _: () = assert!(LN2_B == LN2_W + 1, "Step::channel_mix reads ln2's bias from the slot after its weight");
const FFN_MAA_K: usize = 14; // k, r at 14, 15
const VEC_COUNT: usize = 16;

// The five mixes, in the order of time_maa_w1's blocks: planes of `mixed`
// after step 4 (and of `att` for the m_i of step 3, and of `lora`).
const MIX_W: usize = 0;
const MIX_K: usize = 1;
const MIX_V: usize = 2;
const MIX_R: usize = 3;
const MIX_G: usize = 4;

pub struct Block {
    vecs: GpuBuffer,   // [VEC_COUNT, C] f32
    maa1: Vec<Matrix>, // 5 x stored [D, C]
    maa2: Vec<Matrix>, // 5 x stored [C, D]
    decay1: Matrix,    // stored [Dd, C]
    decay2: Matrix,    // stored [C, Dd]
    receptance: Matrix,
    key: Matrix,
    value: Matrix,
    gate: Matrix,
    output: Matrix,
    ffn: ChannelMix,
}

/// Heads and head size from `att.time_faaaa [H, N]`.
pub fn heads(f: &SafeTensorsFile, c: usize) -> Result<(usize, usize)> {
    faaaa_heads(f, c)
}

/// The blocks of an RWKV-6 checkpoint, one line per official tensor name.
pub fn load(ld: &mut BlockLoader, d: &Dims, n_head: usize, head_size: usize) -> Result<Loaded<Block>> {
    let (f, c, n_layer) = (ld.f, d.c, d.n_layer);
    let dim0 = |name: &str, axis: usize| f.shape(name).and_then(|s| s.get(axis).copied()).unwrap_or(0);
    let ffn = dim0("blocks.0.ffn.key.weight", 0);
    let d_mix = dim0("blocks.0.att.time_maa_w2", 1);
    let d_decay = dim0("blocks.0.att.time_decay_w1", 1);
    let mix = [1, 1, c];
    let mut blocks = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let p = format!("blocks.{l}.");
        let mut v = vec![0f32; VEC_COUNT * c];
        for (i, n) in ["x", "w", "k", "v", "r", "g"].iter().enumerate() {
            ld.vec_into(&mut v, MAA_X + i, &format!("{p}att.time_maa_{n}"), &mix)?;
        }
        ld.vec_into(&mut v, DECAY, &format!("{p}att.time_decay"), &mix)?;
        ld.vec_into(&mut v, BONUS, &format!("{p}att.time_faaaa"), &[n_head, head_size])?;
        ld.vec_into(&mut v, LNX_W, &format!("{p}att.ln_x.weight"), &[c])?;
        ld.vec_into(&mut v, LNX_W + 1, &format!("{p}att.ln_x.bias"), &[c])?;
        ld.vec_into(&mut v, LN1_W, &format!("{p}ln1.weight"), &[c])?;
        ld.vec_into(&mut v, LN1_B, &format!("{p}ln1.bias"), &[c])?;
        ld.vec_into(&mut v, LN2_W, &format!("{p}ln2.weight"), &[c])?;
        ld.vec_into(&mut v, LN2_B, &format!("{p}ln2.bias"), &[c])?;
        ld.vec_into(&mut v, FFN_MAA_K, &format!("{p}ffn.time_maa_k"), &mix)?;
        ld.vec_into(&mut v, FFN_MAA_K + 1, &format!("{p}ffn.time_maa_r"), &mix)?;

        // time_maa_w1 [C, 5 D]: block i is columns i D .. (i + 1) D.
        let w1 = f.expect(&format!("{p}att.time_maa_w1"), &[c, 5 * d_mix])?;
        let es = w1.dtype.size();
        let mut maa1 = Vec::with_capacity(5);
        for i in 0..5 {
            let bytes: Vec<u8> = (0..c)
                .flat_map(|r| {
                    let start = (r * 5 * d_mix + i * d_mix) * es;
                    w1.bytes[start..start + d_mix * es].iter().copied()
                })
                .collect();
            let shape = [c, d_mix];
            maa1.push(ld.lora_from(&Tensor { shape: &shape, bytes: &bytes, ..w1 }, d_mix, c)?);
        }
        ld.done(&w1)?;
        // time_maa_w2 [5, D, C]: block i is contiguous.
        let w2 = f.expect(&format!("{p}att.time_maa_w2"), &[5, d_mix, c])?;
        let block = d_mix * c * es;
        let mut maa2 = Vec::with_capacity(5);
        for i in 0..5 {
            let shape = [d_mix, c];
            let t = Tensor { shape: &shape, bytes: &w2.bytes[i * block..(i + 1) * block], ..w2 };
            maa2.push(ld.lora_from(&t, c, d_mix)?);
        }
        ld.done(&w2)?;

        blocks.push(Block {
            vecs: ld.vectors("layer vectors", &v)?,
            maa1,
            maa2,
            decay1: ld.lora(&format!("{p}att.time_decay_w1"), d_decay, c)?,
            decay2: ld.lora(&format!("{p}att.time_decay_w2"), c, d_decay)?,
            receptance: ld.mat(&format!("{p}att.receptance.weight"), c, c)?,
            key: ld.mat(&format!("{p}att.key.weight"), c, c)?,
            value: ld.mat(&format!("{p}att.value.weight"), c, c)?,
            gate: ld.mat(&format!("{p}att.gate.weight"), c, c)?,
            output: ld.mat(&format!("{p}att.output.weight"), c, c)?,
            ffn: ChannelMix::load(ld, &p, ffn)?,
        });
    }
    Ok(Loaded {
        blocks,
        ffn,
        lora: vec![("mix", d_mix), ("decay", d_decay)],
        layout: state_layout(n_layer, c, n_head, head_size),
    })
}

/// Records every layer for the tokens of `chunk` (x in `s.x`, after ln0).
pub fn record<'a>(blocks: &'a [Block], rec: &mut Recorder<'a>, step: &Step<'a>) -> Result<()> {
    let (s, n) = (step.s, step.n());
    let c = step.info.n_embd;
    let at = |p: usize| p * s.plane_len(c); // plane p of mixed or att
    let lora_at = |p: usize| p * s.capacity * step.d_lora_max; // plane p of lora
    let att_x = 0; // offset within a layer's state (ffn_x is at c)
    for (l, b) in blocks.iter().enumerate() {
        let st = &step.state[l];
        // 1-2. xx = ln1(x); xxx into mixed plane 0 (the state is handed over in 4).
        step.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN1_W, LN1_B, n)?;
        step.token_shift(rec, st, &b.vecs, 1, MAA_X, att_x, false, false)?;

        // 3. m_i = tanh(xxx W1_i) W2_i into att planes 0..5.
        for (i, (m1, m2)) in b.maa1.iter().zip(&b.maa2).enumerate() {
            m1.linear(rec, &s.mixed, 0, &s.lora, lora_at(i), n, Act::Tanh, false)?;
            m2.linear(rec, &s.lora, lora_at(i), &s.att, at(i), n, Act::None, false)?;
        }
        // 4. the five mixes into mixed planes 0..5, and xx's last row of each
        // sequence into the state, for the next call.
        step.token_shift(rec, st, &b.vecs, 5, MAA_W, att_x, true, true)?;

        // 5. r, k, v, g projections into the planes of att.
        let p = |x: u32| x as usize;
        b.receptance.linear(rec, &s.mixed, at(MIX_R), &s.att, at(p(plane::R)), n, Act::None, false)?;
        b.key.linear(rec, &s.mixed, at(MIX_K), &s.att, at(p(plane::K)), n, Act::None, false)?;
        b.value.linear(rec, &s.mixed, at(MIX_V), &s.att, at(p(plane::V)), n, Act::None, false)?;
        b.gate.linear(rec, &s.mixed, at(MIX_G), &s.att, at(p(plane::G)), n, Act::Silu, false)?;
        // 6. the data-dependent part of the decay into plane W (the WKV adds
        // time_decay and takes exp(-exp(.))).
        b.decay1.linear(rec, &s.mixed, at(MIX_W), &s.lora, 0, n, Act::Tanh, false)?;
        b.decay2.linear(rec, &s.lora, 0, &s.att, at(p(plane::W)), n, Act::None, false)?;

        // 7. the WKV recurrence with the per-token decay.
        wkv(step, rec, st, &b.vecs, BONUS, DECAY, true)?;

        // 8. group norm and gate; x += y Wo.
        step.group_norm(rec, &b.vecs, LNX_W, None, true)?;
        b.output.linear(rec, &s.y, 0, &s.x, 0, n, Act::None, true)?;

        // 9-10. channel mix.
        step.channel_mix(rec, st, &b.vecs, LN2_W, FFN_MAA_K, &b.ffn)?;
    }
    Ok(())
}
