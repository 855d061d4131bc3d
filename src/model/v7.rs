//! RWKV-7 "Goose" (x070) on the GPU.
//!
//! Per layer, for the tokens x of a chunk (rows n, channels c):
//! ```text
//!  1. xx = LayerNorm(x, ln1); shifted = token shift of xx against att_x state
//!  2. xr, xw, xk, xv, xa, xg = xx + (shifted - xx) * x_{r,w,k,v,a,g}
//!  3. r = xr Wr, k = xk Wk, v = xv Wv
//!  4. w = exp(-e^-0.5 sigmoid(w0 + tanh(xw w1) w2))       (decay)
//!  5. a = sigmoid(a0 + (xa a1) a2); g = sigmoid(xg g1) g2
//!  6. layer 0: v_first = v; else v += (v_first - v) sigmoid(v0 + (xv v1) v2)
//!  7. kk = normalize(k * k_k) per head; k = k (1 + (a - 1) k_a)
//!  8. per head: S = S diag(w) - (S kk)(kk a)^T + v k^T; y = S r
//!  9. y = GroupNorm(y, ln_x, eps 64e-5) + (r k r_k).sum per head * v; y = y * g
//! 10. x = x + y Wo
//! 11. xx = LayerNorm(x, ln2); xk = xx + (shifted - xx) * ffn.x_k
//! 12. x = x + relu(xk Wkey)^2 Wvalue
//! ```
//!
//! Embedding, ln0, the head and the step around these layers are in
//! `model/mod.rs` and `engine.rs`.

use crate::error::{Error, Result};
use crate::gpu::kernels::{plane, Act, V7PrepParams, Wkv7Params};
use crate::gpu::{GpuBuffer, Recorder};
use crate::loader::SafeTensorsFile;
use crate::matrix::Matrix;
use crate::model::load::{check_heads, BlockLoader, Dims, Loaded};
use crate::model::step::Step;
use crate::ops::{self, record_wkv7};
use crate::state::StateLayout;

// Slots of the per-layer vector buffer `vecs [VEC_COUNT, C]`. The six token
// shift mixes come first, in the order of the activation planes R W K V A G.
const X_R: usize = 0; // x_r .. x_g occupy slots 0..6
const W0: usize = 6;
const A0: usize = 7;
const V0: usize = 8;
const K_K: usize = 9;
const K_A: usize = 10;
const R_K: usize = 11;
const LNX_W: usize = 12; // and ln_x.bias at 13
const LN1_W: usize = 14;
const LN1_B: usize = 15;
const LN2_W: usize = 16;
const LN2_B: usize = 17;
const FFN_X_K: usize = 18;
const VEC_COUNT: usize = 19;

// Planes of the LoRA hidden buffer `lora [LORA_PLANES, tokens, D]`.
const LORA_W: usize = 0;
const LORA_A: usize = 1;
const LORA_V: usize = 2;
const LORA_G: usize = 3;

pub struct Block {
    vecs: GpuBuffer, // [VEC_COUNT, C] f32
    receptance: Matrix,
    key: Matrix,
    value: Matrix,
    output: Matrix,
    w1: Matrix, // stored [Dw, C]
    w2: Matrix, // stored [C, Dw]
    a1: Matrix,
    a2: Matrix,
    v12: Option<(Matrix, Matrix)>, // absent on layer 0
    g1: Matrix,
    g2: Matrix,
    ffn_key: Matrix,   // [F, C]
    ffn_value: Matrix, // [C, F]
}

/// Per layer and sequence: `att_x [C]`, `ffn_x [C]`, `att_kv [H, N, N]`
/// indexed [head, value i, key j].
fn state_layout(n_layer: usize, c: usize, n_head: usize, head_size: usize) -> StateLayout {
    StateLayout::new(
        n_layer,
        &[("att_x", vec![c], 0.0), ("ffn_x", vec![c], 0.0), ("att_kv", vec![n_head, head_size, head_size], 0.0)],
    )
}

/// Heads and head size from `att.r_k [H, N]`.
pub fn heads(f: &SafeTensorsFile, c: usize) -> Result<(usize, usize)> {
    let name = "blocks.0.att.r_k";
    let shape = f.get(name)?.shape;
    let (h, n) = if shape.len() == 2 { (shape[0], shape[1]) } else { (0, 0) };
    check_heads(name, shape, c, h, n)
}

/// The blocks of an RWKV-7 checkpoint, one line per official tensor name.
pub fn load(ld: &mut BlockLoader, d: &Dims, n_head: usize, head_size: usize) -> Result<Loaded<Block>> {
    let (f, c, n_layer) = (ld.f, d.c, d.n_layer);
    let width = |name: &str, axis: usize| -> Result<usize> {
        // By shape only: a pre-quantized file's matrices are U8 codes.
        let shape = f.shape(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        shape.get(axis).copied().ok_or_else(|| Error::ShapeMismatch {
            name: name.into(),
            expected: vec![c, 0],
            found: shape.to_vec(),
        })
    };
    let ffn = width("blocks.0.ffn.key.weight", 0)?;
    let d_w = width("blocks.0.att.w1", 1)?;
    let d_a = width("blocks.0.att.a1", 1)?;
    let d_g = width("blocks.0.att.g1", 1)?;
    let d_v = if n_layer > 1 { width("blocks.1.att.v1", 1)? } else { 0 };

    let mix = [1, 1, c];
    let mut blocks = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let p = format!("blocks.{l}.");
        let mut v = vec![0f32; VEC_COUNT * c];
        for (i, n) in ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"].iter().enumerate() {
            ld.vec_into(&mut v, X_R + i, &format!("{p}att.{n}"), &mix)?;
        }
        ld.vec_into(&mut v, W0, &format!("{p}att.w0"), &mix)?;
        ld.vec_into(&mut v, A0, &format!("{p}att.a0"), &mix)?;
        if l > 0 {
            ld.vec_into(&mut v, V0, &format!("{p}att.v0"), &mix)?;
        }
        ld.vec_into(&mut v, K_K, &format!("{p}att.k_k"), &mix)?;
        ld.vec_into(&mut v, K_A, &format!("{p}att.k_a"), &mix)?;
        ld.vec_into(&mut v, R_K, &format!("{p}att.r_k"), &[n_head, head_size])?;
        ld.vec_into(&mut v, LNX_W, &format!("{p}att.ln_x.weight"), &[c])?;
        ld.vec_into(&mut v, LNX_W + 1, &format!("{p}att.ln_x.bias"), &[c])?;
        ld.vec_into(&mut v, LN1_W, &format!("{p}ln1.weight"), &[c])?;
        ld.vec_into(&mut v, LN1_B, &format!("{p}ln1.bias"), &[c])?;
        ld.vec_into(&mut v, LN2_W, &format!("{p}ln2.weight"), &[c])?;
        ld.vec_into(&mut v, LN2_B, &format!("{p}ln2.bias"), &[c])?;
        ld.vec_into(&mut v, FFN_X_K, &format!("{p}ffn.x_k"), &mix)?;
        blocks.push(Block {
            vecs: ld.vectors("layer vectors", &v)?,
            receptance: ld.mat(&format!("{p}att.receptance.weight"), c, c)?,
            key: ld.mat(&format!("{p}att.key.weight"), c, c)?,
            value: ld.mat(&format!("{p}att.value.weight"), c, c)?,
            output: ld.mat(&format!("{p}att.output.weight"), c, c)?,
            w1: ld.lora(&format!("{p}att.w1"), d_w, c)?,
            w2: ld.lora(&format!("{p}att.w2"), c, d_w)?,
            a1: ld.lora(&format!("{p}att.a1"), d_a, c)?,
            a2: ld.lora(&format!("{p}att.a2"), c, d_a)?,
            // Layer 0 has no value residual: its v0/v1/v2, if present, are ignored.
            v12: if l > 0 {
                Some((ld.lora(&format!("{p}att.v1"), d_v, c)?, ld.lora(&format!("{p}att.v2"), c, d_v)?))
            } else {
                None
            },
            g1: ld.lora(&format!("{p}att.g1"), d_g, c)?,
            g2: ld.lora(&format!("{p}att.g2"), c, d_g)?,
            ffn_key: ld.mat(&format!("{p}ffn.key.weight"), ffn, c)?,
            ffn_value: ld.mat(&format!("{p}ffn.value.weight"), c, ffn)?,
        });
    }
    Ok(Loaded {
        blocks,
        ffn,
        lora: vec![("decay", d_w), ("aaa", d_a), ("mv", d_v), ("gate", d_g)],
        layout: state_layout(n_layer, c, n_head, head_size),
    })
}

/// Records every layer for the tokens of `chunk` (x in `s.x`, after ln0).
pub fn record<'a>(blocks: &'a [Block], rec: &mut Recorder<'a>, step: &Step<'a>) -> Result<()> {
    let (s, n, batch) = (step.s, step.n(), step.batch);
    let longest = step.chunk.longest();
    let c = step.info.n_embd;
    let (nh, hs) = (step.info.n_head, step.info.head_size);
    let plane_len = s.plane_len(c); // elements per plane of mixed and att
    let lora_plane = s.capacity * step.d_lora_max;
    let stride = step.stride;
    let (att_x, ffn_x, att_kv) = (0, c, 2 * c); // offsets within a layer's state
    let at = |p: u32| p as usize * plane_len;
    let vi = |slot: usize| (slot * c) as u32;

    for (l, b) in blocks.iter().enumerate() {
        let st = &step.state[l];
        // 1-2. xx = ln1(x); the six token-shift mixes into `mixed` (and xx's
        // last row of each sequence into the state, for the next call).
        step.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN1_W, LN1_B, n)?;
        step.token_shift(rec, st, &b.vecs, 6, X_R, att_x, true, false)?;

        // 3. r, k, v projections.
        let mixed = |p: u32| at(p);
        b.receptance.linear(rec, &s.mixed, mixed(plane::R), &s.att, at(plane::R), n, Act::None, false)?;
        b.key.linear(rec, &s.mixed, mixed(plane::K), &s.att, at(plane::K), n, Act::None, false)?;
        b.value.linear(rec, &s.mixed, mixed(plane::V), &s.att, at(plane::V), n, Act::None, false)?;
        // 4-6. LoRAs: hidden = act(x @ m1), out = hidden @ m2.
        let lora =
            |rec: &mut Recorder<'a>, m1: &'a Matrix, m2: &'a Matrix, src: u32, hid: usize, act: Act, dst: u32| {
                m1.linear(rec, &s.mixed, mixed(src), &s.lora, hid * lora_plane, n, act, false)?;
                m2.linear(rec, &s.lora, hid * lora_plane, &s.att, at(dst), n, Act::None, false)
            };
        lora(rec, &b.w1, &b.w2, plane::W, LORA_W, Act::Tanh, plane::W)?;
        lora(rec, &b.a1, &b.a2, plane::A, LORA_A, Act::None, plane::A)?;
        if let Some((v1, v2)) = &b.v12 {
            lora(rec, v1, v2, plane::V, LORA_V, Act::None, plane::V_GATE)?;
        }
        lora(rec, &b.g1, &b.g2, plane::G, LORA_G, Act::Sigmoid, plane::G)?;

        // 4-7. decay, a, value residual, kk, k (in place in `att`).
        let prep = V7PrepParams {
            n_tok: n as u32,
            dim: c as u32,
            head_size: hs as u32,
            plane: plane_len as u32,
            layer0: (l == 0) as u32,
            w0: vi(W0),
            a0: vi(A0),
            v0: vi(V0),
            k_k: vi(K_K),
            k_a: vi(K_A),
            _pad: [0; 2],
        };
        ops::v7_prep(rec, &prep, &s.att, &b.vecs)?;

        // 8. the WKV recurrence, one workgroup per (head, sequence),
        // in runs of WKV_TOKENS_PER_DISPATCH tokens.
        let wkv = Wkv7Params {
            n_seq: batch as u32,
            n_head: nh as u32,
            head_size: hs as u32,
            dim: c as u32,
            plane: plane_len as u32,
            state_stride: stride as u32,
            state_offset: att_kv as u32,
            t_first: 0,
            t_count: 0,
            _pad: [0; 3],
        };
        record_wkv7(rec, wkv, n as u32, longest, &s.att, &s.seq_start, st, &s.y, s.wkv_tex.as_ref())?;

        // 9. group norm, bonus, gate.
        step.group_norm(rec, &b.vecs, LNX_W, Some(R_K), true)?;

        // 10. x += y Wo.
        b.output.linear(rec, &s.y, 0, &s.x, 0, n, Act::None, true)?;

        // 11. channel mix: xx = ln2(x), one token-shift mix into mixed plane 0
        // (and the state hand-over, as in 1-2).
        step.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN2_W, LN2_B, n)?;
        step.token_shift(rec, st, &b.vecs, 1, FFN_X_K, ffn_x, true, false)?;

        // 12. x += relu(xk Wkey)^2 Wvalue.
        b.ffn_key.linear(rec, &s.mixed, 0, &s.ffn, 0, n, Act::ReluSq, false)?;
        b.ffn_value.linear(rec, &s.ffn, 0, &s.x, 0, n, Act::None, true)?;
    }
    Ok(())
}
