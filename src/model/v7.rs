//! RWKV-7 "Goose" (x070) on the GPU.
//!
//! Per layer, for the tokens x of a chunk (rows n, channels c):
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
//!
//! Then logits = LayerNorm(x, ln_out) head. Embedding rows go through ln0 first.

use crate::error::{Error, Result};
use crate::gpu::kernels::{
    plane, record_wkv7, Act, GatherParams, LayerNormParams, TokenShiftParams, V7OutParams, V7PrepParams, Wkv7Params,
    Wkv7Textures, MAX_HEAD_SIZE, WG,
};
use crate::gpu::{GpuBuffer, GpuContext, Kernel, ParamArena, Recorder, WeightStore, READBACK, STORAGE, X_WINDOW_BYTES};
use crate::loader::{Dtype, SafeTensorsFile, Tensor};
use crate::matrix::Matrix;
use crate::model::{Chunk, ModelInfo, Uploader, Version};
use crate::state::{State, StateLayout};

/// LayerNorm eps of ln0, ln1, ln2 and ln_out.
pub const LN_EPS: f32 = 1e-5;
/// Rows of logits computed per head pass when every position's logits are
/// wanted (bounds the logits and staging buffers: 2 x 4 MiB for a 65536
/// vocab; 64 rows cost 24 MiB more resident memory for no measured speed).
const HEAD_ROWS: usize = 16;
/// GroupNorm eps of ln_x (the official 64e-5, i.e. 1e-5 * head_size).
pub const GN_EPS: f32 = 64e-5;

// Slots of the per-layer vector buffer `vecs [VEC_COUNT, C]`. The six token
// shift mixes come first, in the order of the activation planes R W K V A G.
const X_R: usize = 0; // x_r .. x_g occupy slots 0..6
const W0: usize = 6;
const A0: usize = 7;
const V0: usize = 8;
const K_K: usize = 9;
const K_A: usize = 10;
const R_K: usize = 11;
const LNX_W: usize = 12;
const LNX_B: usize = 13;
const LN1_W: usize = 14;
const LN1_B: usize = 15;
const LN2_W: usize = 16;
const LN2_B: usize = 17;
const FFN_X_K: usize = 18;
const VEC_COUNT: usize = 19;
// Slots of the model-wide vector buffer.
const LN0_W: usize = 0;
const LN0_B: usize = 1;
const LNOUT_W: usize = 2;
const LNOUT_B: usize = 3;

// Planes of the LoRA hidden buffer `lora [4, tokens, D]`.
const LORA_W: usize = 0;
const LORA_A: usize = 1;
const LORA_V: usize = 2;
const LORA_G: usize = 3;

struct Block {
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

/// Per-step buffers, sized by the chunk capacity (tokens) and batch.
struct Scratch {
    capacity: usize,
    batch: usize,
    head_cap: usize,
    tok_seq: GpuBuffer,   // [cap] u32
    seq_start: GpuBuffer, // [batch + 1] u32
    head_rows: GpuBuffer, // [cap] u32
    x: GpuBuffer,         // [cap, C] residual stream
    xx: GpuBuffer,        // [cap, C] LayerNorm output
    mixed: GpuBuffer,     // [6, cap, C] token-shifted inputs
    att: GpuBuffer,       // [plane::COUNT, cap, C]
    lora: GpuBuffer,      // [4, cap, Dmax]
    y: GpuBuffer,         // [cap, C]
    ffn: GpuBuffer,       // [cap, F]
    head_x: GpuBuffer,    // [head_cap, C]
    head_xn: GpuBuffer,   // [head_cap, C]
    logits: GpuBuffer,    // [head_cap, V]
    staging: GpuBuffer,   // [head_cap, V] for reading logits back
    /// att's WKV planes and a layer's state as textures for `wkv7_tex.wgsl`
    /// (CPU adapters, head size 64 only).
    wkv_tex: Option<Wkv7Textures>,
}

pub struct V7 {
    ctx: GpuContext,
    pub info: ModelInfo,
    layout: StateLayout,
    d_lora_max: usize,
    /// The checkpoint, kept mapped for `emb.weight` [V, C]: the embedding is
    /// read one row per token on the CPU (as llama.cpp does), so its V x C
    /// table never takes GPU memory and only the rows used become resident.
    file: SafeTensorsFile,
    globals: GpuBuffer, // [4, C]: ln0 w/b, ln_out w/b
    blocks: Vec<Block>,
    head: Matrix, // [V, C]
    scratch: Option<Scratch>,
    arena: std::cell::RefCell<ParamArena>,
}

/// Compiles the pipelines this model uses before any weight is uploaded:
/// shader compilation (LLVM, on CPU adapters) needs tens of MiB of scratch
/// memory, which then overlaps a small process instead of the loaded model,
/// and is handed back to the OS afterwards. Anything missed compiles on
/// first use as before.
fn compile_kernels(ctx: &GpuContext, dtype: Dtype, head_size: usize) -> Result<()> {
    let mut kernels = vec![
        (Kernel::LayerNorm, 0),
        (Kernel::TokenShift, 0),
        (Kernel::GatherRows, 0),
        (Kernel::V7Prep, 0),
        (Kernel::V7Out, 0),
    ];
    kernels.push(if ctx.weight_store() == WeightStore::Texture && head_size == 64 && ctx.subgroup_size() == Some(8) {
        (Kernel::Wkv7Tex, 0)
    } else {
        (Kernel::Wkv7, 0)
    });
    kernels.extend(Matrix::kernels(ctx, dtype));
    for (kernel, variant) in kernels {
        ctx.pipeline(kernel, variant)?;
    }
    crate::gpu::trim_heap();
    Ok(())
}

impl V7 {
    pub(crate) fn load(up: &Uploader, file: SafeTensorsFile) -> Result<Self> {
        let f = &file;
        let (ctx, max_part) = (up.ctx, up.max_part);
        // Dimensions from shapes.
        let emb_t = f.get("emb.weight")?;
        if emb_t.shape.len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "emb.weight".into(),
                expected: vec![0, 0],
                found: emb_t.shape.to_vec(),
            });
        }
        let (vocab, c) = (emb_t.shape[0], emb_t.shape[1]);
        let mut n_layer = 0;
        while f.contains(&format!("blocks.{n_layer}.ln1.weight")) {
            n_layer += 1;
        }
        let rk = f.get("blocks.0.att.r_k")?;
        if rk.shape.len() != 2 || rk.shape[0] * rk.shape[1] != c {
            return Err(Error::ShapeMismatch {
                name: "blocks.0.att.r_k".into(),
                expected: vec![c / 64, 64],
                found: rk.shape.to_vec(),
            });
        }
        let (n_head, head_size) = (rk.shape[0], rk.shape[1]);
        // The element-wise kernels read four channels at a time.
        if head_size > MAX_HEAD_SIZE || !head_size.is_multiple_of(4) {
            return Err(Error::UnsupportedShape(format!(
                "head size {head_size} (from blocks.0.att.r_k {:?}); a multiple of 4 up to {MAX_HEAD_SIZE} is supported",
                rk.shape
            )));
        }
        let width = |name: &str, axis: usize| -> Result<usize> {
            let t = f.get(name)?;
            t.shape.get(axis).copied().ok_or_else(|| Error::ShapeMismatch {
                name: name.into(),
                expected: vec![c, 0],
                found: t.shape.to_vec(),
            })
        };
        let ffn = width("blocks.0.ffn.key.weight", 0)?;
        let d_w = width("blocks.0.att.w1", 1)?;
        let d_a = width("blocks.0.att.a1", 1)?;
        let d_g = width("blocks.0.att.g1", 1)?;
        let d_v = if n_layer > 1 { width("blocks.1.att.v1", 1)? } else { 0 };
        // LoRA ranks padded with zero weights to whole 64-column rows where
        // matrices live in textures (the texture kernel's shape); exact.
        let rank = |d: usize| if ctx.weight_store() == WeightStore::Texture { d.next_multiple_of(64) } else { d };
        let d_lora_max = rank(d_w).max(rank(d_a)).max(rank(d_g)).max(rank(d_v));
        let dtype = emb_t.dtype;
        compile_kernels(ctx, dtype, head_size)?;

        // The embedding stays in the file (see `V7::file`); its pages are
        // dropped now and read back row by row as tokens use them.
        let mut parameters = emb_t.len() as u64;
        up.uploaded(f, &emb_t)?;
        let mut mat = |name: String, rows: usize, cols: usize, lora: bool| -> Result<Matrix> {
            let t = if lora { f.expect(&name, &[cols, rows])? } else { f.expect(&name, &[rows, cols])? };
            parameters += t.len() as u64;
            let m = if lora {
                // Pad the rank (the side that is not C) only.
                let pad = |d: usize| if d == c { d } else { rank(d) };
                Matrix::from_tensor_transposed(ctx, &t, pad(rows), pad(cols), max_part)?
            } else {
                Matrix::from_tensor(ctx, f, &t, max_part)?
            };
            up.uploaded(f, &t)?;
            Ok(m)
        };
        let mut vec_params = 0u64;
        let mut vec_into = |dst: &mut [f32], slot: usize, name: String, shape: &[usize]| -> Result<()> {
            let t = f.expect(&name, shape)?;
            vec_params += t.len() as u64;
            for (i, v) in dst[slot * c..(slot + 1) * c].iter_mut().enumerate() {
                *v = t.at(i);
            }
            up.uploaded(f, &t)
        };

        let mut g = vec![0f32; 4 * c];
        vec_into(&mut g, LN0_W, "blocks.0.ln0.weight".into(), &[c])?;
        vec_into(&mut g, LN0_B, "blocks.0.ln0.bias".into(), &[c])?;
        vec_into(&mut g, LNOUT_W, "ln_out.weight".into(), &[c])?;
        vec_into(&mut g, LNOUT_B, "ln_out.bias".into(), &[c])?;
        let globals = ctx.storage_f32("ln0/ln_out", &g)?;

        let mix = [1, 1, c];
        let mut blocks = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let p = format!("blocks.{l}.");
            let mut v = vec![0f32; VEC_COUNT * c];
            for (i, n) in ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"].iter().enumerate() {
                vec_into(&mut v, X_R + i, format!("{p}att.{n}"), &mix)?;
            }
            vec_into(&mut v, W0, format!("{p}att.w0"), &mix)?;
            vec_into(&mut v, A0, format!("{p}att.a0"), &mix)?;
            if l > 0 {
                vec_into(&mut v, V0, format!("{p}att.v0"), &mix)?;
            }
            vec_into(&mut v, K_K, format!("{p}att.k_k"), &mix)?;
            vec_into(&mut v, K_A, format!("{p}att.k_a"), &mix)?;
            vec_into(&mut v, R_K, format!("{p}att.r_k"), &[n_head, head_size])?;
            vec_into(&mut v, LNX_W, format!("{p}att.ln_x.weight"), &[c])?;
            vec_into(&mut v, LNX_B, format!("{p}att.ln_x.bias"), &[c])?;
            vec_into(&mut v, LN1_W, format!("{p}ln1.weight"), &[c])?;
            vec_into(&mut v, LN1_B, format!("{p}ln1.bias"), &[c])?;
            vec_into(&mut v, LN2_W, format!("{p}ln2.weight"), &[c])?;
            vec_into(&mut v, LN2_B, format!("{p}ln2.bias"), &[c])?;
            vec_into(&mut v, FFN_X_K, format!("{p}ffn.x_k"), &mix)?;
            blocks.push(Block {
                vecs: ctx.storage_f32("layer vectors", &v)?,
                receptance: mat(format!("{p}att.receptance.weight"), c, c, false)?,
                key: mat(format!("{p}att.key.weight"), c, c, false)?,
                value: mat(format!("{p}att.value.weight"), c, c, false)?,
                output: mat(format!("{p}att.output.weight"), c, c, false)?,
                w1: mat(format!("{p}att.w1"), d_w, c, true)?,
                w2: mat(format!("{p}att.w2"), c, d_w, true)?,
                a1: mat(format!("{p}att.a1"), d_a, c, true)?,
                a2: mat(format!("{p}att.a2"), c, d_a, true)?,
                // Layer 0 has no value residual: its v0/v1/v2, if present, are ignored.
                v12: if l > 0 {
                    Some((mat(format!("{p}att.v1"), d_v, c, true)?, mat(format!("{p}att.v2"), c, d_v, true)?))
                } else {
                    None
                },
                g1: mat(format!("{p}att.g1"), d_g, c, true)?,
                g2: mat(format!("{p}att.g2"), c, d_g, true)?,
                ffn_key: mat(format!("{p}ffn.key.weight"), ffn, c, false)?,
                ffn_value: mat(format!("{p}ffn.value.weight"), c, ffn, false)?,
            });
        }
        let head = mat("head.weight".into(), vocab, c, false)?;

        let mut gpu_weight_bytes = head.bytes() + globals.size();
        for b in &blocks {
            gpu_weight_bytes += b.vecs.size();
            for m in [
                &b.receptance,
                &b.key,
                &b.value,
                &b.output,
                &b.w1,
                &b.w2,
                &b.a1,
                &b.a2,
                &b.g1,
                &b.g2,
                &b.ffn_key,
                &b.ffn_value,
            ] {
                gpu_weight_bytes += m.bytes();
            }
            if let Some((v1, v2)) = &b.v12 {
                gpu_weight_bytes += v1.bytes() + v2.bytes();
            }
        }
        let layout = state_layout(n_layer, c, n_head, head_size);
        let info = ModelInfo {
            version: Version::V7,
            n_layer,
            n_embd: c,
            n_head,
            head_size,
            vocab,
            ffn,
            lora: vec![("decay", d_w), ("aaa", d_a), ("mv", d_v), ("gate", d_g)],
            dtype,
            parameters: parameters + vec_params,
            weight_bytes: f.data_bytes(),
            gpu_weight_bytes,
            state_bytes_per_sequence: layout.bytes_per_sequence(),
        };
        Ok(Self {
            ctx: ctx.clone(),
            info,
            layout,
            d_lora_max,
            file,
            globals,
            blocks,
            head,
            scratch: None,
            arena: std::cell::RefCell::new(ParamArena::new()),
        })
    }

    pub fn state_layout(&self) -> &StateLayout {
        &self.layout
    }

    pub fn new_state(&self, batch: usize) -> Result<State> {
        State::new(&self.ctx, self.layout.clone(), batch)
    }

    /// Largest chunk whose per-step buffers each fit one storage binding.
    pub fn max_chunk_tokens(&self) -> usize {
        let max = self.ctx.max_binding_bytes() as usize;
        let c = self.info.n_embd;
        let per_token = [plane::COUNT as usize * c, self.info.ffn, 4 * self.d_lora_max].into_iter().max().unwrap() * 4;
        (max / per_token).clamp(1, 4096)
    }

    fn ensure_scratch(&mut self, capacity: usize, state: &State) -> Result<()> {
        let batch = state.batch();
        if let Some(s) = &self.scratch {
            if s.capacity >= capacity && s.batch >= batch {
                return Ok(());
            }
        }
        self.scratch = None;
        let ctx = &self.ctx;
        let (c, f, v) = (self.info.n_embd, self.info.ffn, self.info.vocab);
        // The head runs over at most head_cap rows per pass: all of a batch's
        // last tokens at once, and at least HEAD_ROWS for all-position logits,
        // but never [chunk, vocab] (128 MiB for 512 tokens of a 65536 vocab).
        let head_cap = capacity.min(batch.max(HEAD_ROWS)).min((ctx.max_binding_bytes() as usize / (v * 4)).max(1));
        // Every activation buffer has X_WINDOW_BYTES of slack at the end, so a
        // texture matrix can bind a full uniform window at any row (see Matrix::linear).
        let f32s = |what: &str, n: usize| ctx.buffer(what, (n * 4) as u64 + X_WINDOW_BYTES, STORAGE);
        if ctx.weight_store() == WeightStore::Texture {
            // The x texture of texture matrices at its full size now, so no
            // later step allocates (its widest input is the FFN's).
            let width = (f.max(c).max(self.d_lora_max) / 4) as u32;
            ctx.x_texture(width, capacity.min(ctx.max_texture_dims().0 as usize) as u32)?;
        }
        self.scratch = Some(Scratch {
            capacity,
            batch,
            head_cap,
            tok_seq: f32s("token sequence", capacity)?,
            seq_start: f32s("sequence starts", batch + 1)?,
            head_rows: f32s("head rows", capacity)?,
            x: f32s("x", capacity * c)?,
            xx: f32s("xx", capacity * c)?,
            mixed: f32s("mixed", 6 * capacity * c)?,
            att: f32s("att", plane::COUNT as usize * capacity * c)?,
            lora: f32s("lora", 4 * capacity * self.d_lora_max.max(1))?,
            y: f32s("y", capacity * c)?,
            ffn: f32s("ffn", capacity * f)?,
            head_x: f32s("head x", head_cap * c)?,
            head_xn: f32s("head xn", head_cap * c)?,
            logits: f32s("logits", head_cap * v)?,
            staging: ctx.buffer("logits staging", (head_cap * v * 4) as u64, READBACK)?,
            wkv_tex: match self.wkv_from_texture(capacity, batch) {
                true => Some(Wkv7Textures::new(ctx, c, capacity, batch)?),
                false => None,
            },
        });
        self.reserve_params(capacity, state, head_cap)
    }

    /// Sizes the params arena for the largest step the scratch allows (one
    /// sequence of `capacity` tokens: the most matrix windows and WKV runs),
    /// by recording that step (bound to `state`) without running it, so no
    /// later step allocates.
    fn reserve_params(&self, capacity: usize, state: &State, head_cap: usize) -> Result<()> {
        let batch = state.batch();
        let mut seq_start = vec![0, capacity as u32];
        seq_start.resize(batch + 1, capacity as u32);
        let chunk = Chunk { tokens: vec![0; capacity], tok_seq: vec![0; capacity], seq_start, head_rows: Vec::new() };
        let s = self.scratch.as_ref().unwrap();
        let mut rec = Recorder::new(&self.ctx);
        self.record_layers(&mut rec, s, state, &chunk, batch)?;
        let layer_ops = rec.op_count();
        let mut rec = Recorder::new(&self.ctx);
        self.record_head(&mut rec, s, 0, head_cap)?;
        // One submission holds the layers and a head pass plus its copy out.
        self.arena.borrow_mut().reserve(&self.ctx, layer_ops + rec.op_count() + 1)
    }

    /// Whether the WKV runs as `wkv7_tex.wgsl`: on adapters that keep weights
    /// in textures (CPU), where that kernel fits the shape.
    fn wkv_from_texture(&self, capacity: usize, batch: usize) -> bool {
        let i = &self.info;
        self.ctx.weight_store() == WeightStore::Texture
            && Wkv7Textures::fit(&self.ctx, i.head_size, i.n_embd, self.layout.stride, capacity, batch)
    }

    /// Runs one chunk through every layer, updating `state`, and returns the
    /// logits `[chunk.head_rows.len(), vocab]`.
    pub(crate) fn step(&mut self, state: &mut State, chunk: &Chunk, capacity: usize) -> Result<Vec<f32>> {
        let n = chunk.tokens.len();
        let batch = state.batch();
        self.ensure_scratch(capacity.max(n), state)?;
        let s = self.scratch.as_ref().unwrap();
        let q = self.ctx.queue();
        // x rows = emb[tokens], read from the file and widened exactly to f32.
        let emb = self.file.get("emb.weight")?;
        let c = self.info.n_embd;
        let row_bytes = c * emb.dtype.size();
        let mut raw = vec![0u8; n * row_bytes];
        for (&t, out) in chunk.tokens.iter().zip(raw.chunks_exact_mut(row_bytes)) {
            self.file.read_into(&emb, t as usize * row_bytes, out)?;
        }
        let row = Tensor { bytes: &raw, ..emb };
        let rows: Vec<f32> = (0..n * c).map(|i| row.at(i)).collect();
        q.write_buffer(s.xx.raw(), 0, bytemuck::cast_slice(&rows));
        q.write_buffer(s.tok_seq.raw(), 0, bytemuck::cast_slice(&chunk.tok_seq));
        q.write_buffer(s.seq_start.raw(), 0, bytemuck::cast_slice(&chunk.seq_start));
        if !chunk.head_rows.is_empty() {
            q.write_buffer(s.head_rows.raw(), 0, bytemuck::cast_slice(&chunk.head_rows));
        }

        let mut rec = Recorder::new(&self.ctx);
        if n > 0 {
            self.record_layers(&mut rec, s, state, chunk, batch)?;
        }
        let vocab = self.info.vocab;
        let mut logits = vec![0f32; chunk.head_rows.len() * vocab];
        let mut done = 0;
        // The head runs over at most head_cap rows at a time (one binding of logits).
        loop {
            let rows = (chunk.head_rows.len() - done).min(s.head_cap);
            if rows > 0 {
                self.record_head(&mut rec, s, done, rows)?;
                rec.copy(&s.logits, 0, &s.staging, 0, (rows * vocab * 4) as u64);
            }
            rec.submit(&mut self.arena.borrow_mut())?;
            if rows == 0 {
                break;
            }
            let out = &mut logits[done * vocab..(done + rows) * vocab];
            self.ctx.map_read(&s.staging, bytemuck::cast_slice_mut(out))?;
            done += rows;
            if done == chunk.head_rows.len() {
                break;
            }
            rec = Recorder::new(&self.ctx);
        }
        self.ctx.check()?;
        Ok(logits)
    }

    fn record_layers<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        state: &'a State,
        chunk: &Chunk,
        batch: usize,
    ) -> Result<()> {
        let n = chunk.tokens.len();
        let longest = chunk.seq_start.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let c = self.info.n_embd;
        let (nh, hs) = (self.info.n_head, self.info.head_size);
        let cap = s.capacity;
        let plane_len = cap * c; // elements per plane of mixed and att
        let lora_plane = cap * self.d_lora_max;
        let stride = self.layout.stride;
        let (att_x, ffn_x, att_kv) = (0, c, 2 * c); // offsets within a layer's state
        let at = |p: u32| p as usize * plane_len;
        let vi = |slot: usize| (slot * c) as u32;

        // ln0: x = LayerNorm(emb[tokens]) (xx holds the embedding rows, see `step`).
        self.layer_norm(rec, &s.xx, &s.x, &self.globals, LN0_W, LN0_B, n)?;

        for (l, b) in self.blocks.iter().enumerate() {
            let st = &state.layers[l];
            // 1-2. xx = ln1(x); the six token-shift mixes into `mixed` (and xx's
            // last row of each sequence into the state, for the next call).
            self.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN1_W, LN1_B, n)?;
            self.token_shift(rec, s, st, &b.vecs, n, 6, X_R, att_x)?;

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
            rec.dispatch(Kernel::V7Prep, 0, &prep, &[&s.att, &b.vecs], [nh as u32, n as u32, 1])?;

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
            let out = V7OutParams {
                n_tok: n as u32,
                dim: c as u32,
                head_size: hs as u32,
                plane: plane_len as u32,
                lnx_w: vi(LNX_W),
                lnx_b: vi(LNX_B),
                r_k: vi(R_K),
                eps: GN_EPS,
            };
            rec.dispatch(Kernel::V7Out, 0, &out, &[&s.y, &s.att, &b.vecs], [nh as u32, n as u32, 1])?;

            // 10. x += y Wo.
            b.output.linear(rec, &s.y, 0, &s.x, 0, n, Act::None, true)?;

            // 11. channel mix: xx = ln2(x), one token-shift mix into mixed plane 0
            // (and the state hand-over, as in 1-2).
            self.layer_norm(rec, &s.x, &s.xx, &b.vecs, LN2_W, LN2_B, n)?;
            self.token_shift(rec, s, st, &b.vecs, n, 1, FFN_X_K, ffn_x)?;

            // 12. x += relu(xk Wkey)^2 Wvalue.
            b.ffn_key.linear(rec, &s.mixed, 0, &s.ffn, 0, n, Act::ReluSq, false)?;
            b.ffn_value.linear(rec, &s.ffn, 0, &s.x, 0, n, Act::None, true)?;
        }
        Ok(())
    }

    /// logits[0..rows] = LayerNorm(x[head_rows[first..first+rows]], ln_out) @ head.T
    fn record_head<'a>(&'a self, rec: &mut Recorder<'a>, s: &'a Scratch, first: usize, rows: usize) -> Result<()> {
        let c = self.info.n_embd;
        let gather = GatherParams { n_out: rows as u32, dim: c as u32, rows_offset: first as u32, _pad: 0 };
        rec.dispatch(
            Kernel::GatherRows,
            0,
            &gather,
            &[&s.head_rows, &s.x, &s.head_x],
            [(c as u32).div_ceil(WG), rows as u32, 1],
        )?;
        self.layer_norm(rec, &s.head_x, &s.head_xn, &self.globals, LNOUT_W, LNOUT_B, rows)?;
        self.head.linear(rec, &s.head_xn, 0, &s.logits, 0, rows, Act::None, false)
    }

    /// mixed[m, n, :] = xx[n] + (prev - xx[n]) * vecs[mix_slot + m] for n_mix
    /// mixes, prev being the token before (the state for a sequence's first
    /// token); the state at `state_offset` takes each sequence's last xx.
    #[allow(clippy::too_many_arguments)]
    fn token_shift<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        st: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        n: usize,
        n_mix: u32,
        mix_slot: usize,
        state_offset: usize,
    ) -> Result<()> {
        let c = self.info.n_embd;
        let p = TokenShiftParams {
            n_tok: n as u32,
            dim: c as u32,
            n_mix,
            mix_offset: (mix_slot * c) as u32,
            state_stride: self.layout.stride as u32,
            state_offset: state_offset as u32,
            out_plane: (s.capacity * c) as u32,
            _pad: 0,
        };
        let groups = [(c as u32 / 4).div_ceil(WG), n as u32, 1];
        rec.dispatch(Kernel::TokenShift, 0, &p, &[&s.xx, &s.tok_seq, &s.seq_start, st, vecs, &s.mixed], groups)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_norm<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        x: &'a GpuBuffer,
        y: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        w_slot: usize,
        b_slot: usize,
        n: usize,
    ) -> Result<()> {
        let c = self.info.n_embd;
        let p = LayerNormParams {
            n_rows: n as u32,
            dim: c as u32,
            x_offset: 0,
            y_offset: 0,
            w_offset: (w_slot * c) as u32,
            b_offset: (b_slot * c) as u32,
            eps: LN_EPS,
            _pad: 0,
        };
        rec.dispatch(Kernel::LayerNorm, 0, &p, &[x, vecs, y], [n as u32, 1, 1])
    }
}

/// Per layer and sequence: `att_x [C]`, `ffn_x [C]`, `att_kv [H, N, N]`
/// indexed [head, value i, key j].
fn state_layout(n_layer: usize, c: usize, n_head: usize, head_size: usize) -> StateLayout {
    StateLayout::new(
        n_layer,
        &[("att_x", vec![c], 0.0), ("ffn_x", vec![c], 0.0), ("att_kv", vec![n_head, head_size, head_size], 0.0)],
    )
}
