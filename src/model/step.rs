//! What one GPU step of any RWKV generation shares: the chunk of tokens, the
//! per-step buffers, and the RWKV-shaped helpers the layers of `v4.rs` ..
//! `v7.rs` are written with (norms and token shifts by vector slot, the
//! v4-v6 channel mix). They call the model-agnostic ops of `crate::ops`.

use crate::error::Result;
use crate::gpu::kernels::{plane, Act};
use crate::gpu::{GpuBuffer, GpuContext, Recorder, WeightStore, Workspace, READBACK, STORAGE, X_WINDOW_BYTES};
use crate::matrix::Matrix;
use crate::model::info::ModelInfo;
use crate::model::load::BlockLoader;
use crate::ops::{self, GroupNorm, TokenShift, WkvTextures};

/// LayerNorm eps of ln0, ln1, ln2 and ln_out.
pub const LN_EPS: f32 = 1e-5;
/// GroupNorm eps of ln_x in v5.2, v6 and v7 (the official 64e-5, i.e.
/// 1e-5 * head_size_divisor²) and, equivalently, of v5.0/5.1, which divide
/// by the head_size_divisor 8 before a GroupNorm of eps 1e-5.
pub const GN_EPS: f32 = 64e-5;
/// Rows of logits computed per head pass when every position's logits are
/// wanted (bounds the logits and staging buffers: 2 x 4 MiB for a 65536
/// vocab; 64 rows cost 24 MiB more resident memory for no measured speed).
pub const HEAD_ROWS: usize = 16;
/// Planes of the LoRA hidden buffer `lora [LORA_PLANES, tokens, Dmax]`
/// (v7 uses 4: w, a, v, g; v6 5: the five token-shift LoRAs).
pub const LORA_PLANES: usize = 5;

/// One GPU step: the tokens of every sequence laid end to end.
#[derive(Debug, Default, Clone)]
pub struct Chunk {
    /// `[n_tok]` token ids.
    pub tokens: Vec<u32>,
    /// `[n_tok]` sequence of each token.
    pub tok_seq: Vec<u32>,
    /// `[batch + 1]` first token row of each sequence; sequence b owns rows
    /// `seq_start[b] .. seq_start[b+1]` (possibly none).
    pub seq_start: Vec<u32>,
    /// Token rows whose logits are wanted, in output order.
    pub head_rows: Vec<u32>,
}

impl Chunk {
    /// Tokens of the longest sequence in this step.
    pub fn longest(&self) -> u32 {
        self.seq_start.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
}

/// Per-step buffers, sized by the chunk capacity (tokens) and batch.
pub struct Scratch {
    pub capacity: usize,
    pub batch: usize,
    pub head_cap: usize,
    pub tok_seq: GpuBuffer,   // [cap] u32
    pub seq_start: GpuBuffer, // [batch + 1] u32
    pub head_rows: GpuBuffer, // [cap] u32
    pub x: GpuBuffer,         // [cap, C] residual stream
    pub xx: GpuBuffer,        // [cap, C] LayerNorm output
    pub mixed: GpuBuffer,     // [6, cap, C] token-shifted inputs
    pub att: GpuBuffer,       // [plane::COUNT, cap, C]
    pub lora: GpuBuffer,      // [LORA_PLANES, cap, Dmax]
    pub y: GpuBuffer,         // [cap, C]
    pub ffn: GpuBuffer,       // [cap, F]
    pub head_x: GpuBuffer,    // [head_cap, C]
    pub head_xn: GpuBuffer,   // [head_cap, C]
    pub logits: GpuBuffer,    // [head_cap, V]
    pub staging: GpuBuffer,   // [head_cap, V] for reading logits back
    /// att's WKV planes and a layer's state as textures for `wkv7_tex.wgsl`
    /// and `wkv5_tex.wgsl` (v5-v7 on CPU adapters, head size 64 only).
    pub wkv_tex: Option<WkvTextures>,
    /// A Transformer's step buffers (`mixed`, `att` and `lora` are then 1 element).
    pub transformer: Option<TransformerScratch>,
}

/// The step buffers only a Transformer uses (its residual, norm outputs and
/// MLP product are `x`, `xx`/`y` and `ffn` of [`Scratch`]).
pub struct TransformerScratch {
    pub qkv: GpuBuffer, // [cap, q_dim + 2 kv_dim]
    pub att: GpuBuffer, // [cap, q_dim] attention output
    pub h: GpuBuffer,   // [cap, 2F] gate and up (GPT-NeoX: [cap, F])
    pub cs: GpuBuffer,  // [cap, rotary_dim / 2] (cos, sin) pairs
    /// `[part_slots, n_head, 1 + head_dim / 4]` vec4s: the attention's split partials.
    pub part: GpuBuffer,
    pub part_slots: usize,
}

/// The sizes of a Transformer's step buffers, per token.
#[derive(Debug, Clone, Copy)]
pub struct TransformerDims {
    pub qkv_dim: usize,
    pub q_dim: usize,
    pub h_dim: usize,
    pub rotary_dim: usize,
    /// vec4s of the partial buffer per slot.
    pub part_per_slot: usize,
    pub part_slots: usize,
}

/// A sequence's KV cache as a step binds it.
pub struct KvBind<'a> {
    /// One `[2, cap, kv_dim]` buffer per layer.
    pub layers: &'a [GpuBuffer],
    pub cap: usize,
    /// Position of the sequence's first token in this step.
    pub pos0: usize,
}

impl Scratch {
    /// Buffers for steps of up to `capacity` tokens of up to `batch`
    /// sequences of a model with `info`, whose widest LoRA is `d_lora_max`
    /// and whose state has `stride` floats per layer and sequence. The x
    /// texture of `ws` is grown to its full size now, so no step allocates.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &GpuContext,
        ws: &Workspace,
        info: &ModelInfo,
        stride: usize,
        d_lora_max: usize,
        capacity: usize,
        batch: usize,
        transformer: Option<TransformerDims>,
    ) -> Result<Self> {
        let (c, f, v) = (info.n_embd, info.ffn, info.vocab);
        // RWKV's planes; one element each for a Transformer, which has none.
        let rwkv = |n: usize| if transformer.is_some() { 1 } else { n };
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
            let width = (f.max(c).max(d_lora_max).max(transformer.map_or(0, |d| d.q_dim)) / 4) as u32;
            ws.x_texture(ctx, width, capacity.min(ctx.max_texture_dims().0 as usize) as u32)?;
        }
        let wkv_tex = transformer.is_none()
            && info.n_head > 0
            && ctx.weight_store() == WeightStore::Texture
            && WkvTextures::fit(ctx, info.head_size, c, stride, capacity, batch);
        Ok(Self {
            capacity,
            batch,
            head_cap,
            tok_seq: f32s("token sequence", capacity)?,
            seq_start: f32s("sequence starts", batch + 1)?,
            head_rows: f32s("head rows", capacity)?,
            x: f32s("x", capacity * c)?,
            xx: f32s("xx", capacity * c)?,
            mixed: f32s("mixed", rwkv(6 * capacity * c))?,
            att: f32s("att", rwkv(plane::COUNT as usize * capacity * c))?,
            lora: f32s("lora", rwkv(LORA_PLANES * capacity * d_lora_max.max(1)))?,
            y: f32s("y", capacity * c)?,
            ffn: f32s("ffn", capacity * f)?,
            head_x: f32s("head x", head_cap * c)?,
            head_xn: f32s("head xn", head_cap * c)?,
            logits: f32s("logits", head_cap * v)?,
            staging: ctx.buffer("logits staging", (head_cap * v * 4) as u64, READBACK)?,
            wkv_tex: if wkv_tex { Some(WkvTextures::new(ctx, c, capacity, batch)?) } else { None },
            transformer: match transformer {
                Some(d) => Some(TransformerScratch {
                    qkv: f32s("qkv", capacity * d.qkv_dim)?,
                    att: f32s("attention out", capacity * d.q_dim)?,
                    h: f32s("mlp hidden", capacity * d.h_dim)?,
                    cs: f32s("rope cos sin", capacity * d.rotary_dim.max(2))?,
                    part: f32s("attention splits", 4 * d.part_slots * d.part_per_slot)?,
                    part_slots: d.part_slots,
                }),
                None => None,
            },
        })
    }

    /// Elements per plane of `mixed` and `att`.
    pub fn plane_len(&self, c: usize) -> usize {
        self.capacity * c
    }
}

/// Everything a generation's `record` needs for one step: the model's
/// dimensions, the per-step buffers, the state buffers and the chunk.
pub struct Step<'a> {
    pub info: &'a ModelInfo,
    /// State floats per layer and sequence.
    pub stride: usize,
    /// Columns of the `lora` planes (the widest LoRA, padded).
    pub d_lora_max: usize,
    pub s: &'a Scratch,
    /// One `[batch, stride]` buffer per layer (RWKV).
    pub state: &'a [GpuBuffer],
    /// Each sequence's KV cache (Transformers).
    pub kv: &'a [KvBind<'a>],
    pub batch: usize,
    pub chunk: &'a Chunk,
}

/// The channel-mix matrices of v4, v5 and v6 (`Step::channel_mix`).
pub struct ChannelMix {
    pub key: Matrix,        // [F, C]
    pub value: Matrix,      // [C, F]
    pub receptance: Matrix, // [C, C]
}

impl ChannelMix {
    /// `blocks.{l}.ffn.{key,value,receptance}.weight`; `p` is `blocks.{l}.`.
    pub fn load(ld: &mut BlockLoader, p: &str, ffn: usize) -> Result<Self> {
        let c = ld.c;
        Ok(Self {
            key: ld.mat(&format!("{p}ffn.key.weight"), ffn, c)?,
            value: ld.mat(&format!("{p}ffn.value.weight"), c, ffn)?,
            receptance: ld.mat(&format!("{p}ffn.receptance.weight"), c, c)?,
        })
    }
}

impl<'a> Step<'a> {
    /// Tokens in this step.
    pub fn n(&self) -> usize {
        self.chunk.tokens.len()
    }

    /// y = LayerNorm(x) with the weight at vector slot `w_slot` and the bias
    /// at `b_slot` of `vecs [slots, C]`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        rec: &mut Recorder<'a>,
        x: &'a GpuBuffer,
        y: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        w_slot: usize,
        b_slot: usize,
        n: usize,
    ) -> Result<()> {
        let c = self.info.n_embd;
        ops::layer_norm(rec, x, y, vecs, w_slot * c, b_slot * c, n, c, LN_EPS)
    }

    /// `mixed[m, n, :] = xx[n] + (prev - xx[n]) * (vecs[mix_slot + m] + extra[m, n])`
    /// for n_mix mixes, prev being the token before (the state for a
    /// sequence's first token). With `hand_over` the state at `state_offset`
    /// takes each sequence's last xx. `extra` (v6's data-dependent mix) is
    /// planes of `att`.
    #[allow(clippy::too_many_arguments)]
    pub fn token_shift(
        &self,
        rec: &mut Recorder<'a>,
        st: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        n_mix: u32,
        mix_slot: usize,
        state_offset: usize,
        hand_over: bool,
        extra: bool,
    ) -> Result<()> {
        let (s, c) = (self.s, self.info.n_embd);
        let op = TokenShift {
            x: &s.xx,
            tok_seq: &s.tok_seq,
            seq_start: &s.seq_start,
            state: st,
            state_stride: self.stride,
            state_offset,
            vecs,
            mix_offset: mix_slot * c,
            n_mix,
            out: &s.mixed,
            out_plane: s.plane_len(c),
            extra: Some(&s.att).filter(|_| extra),
            hand_over,
        };
        ops::token_shift(rec, &op, self.n(), c)
    }

    /// y = GroupNorm(y) per head with ln_x at `lnx_slot` (weight) and the
    /// slot after (bias); then v7's bonus with r_k at `r_k_slot`, if given,
    /// and the gate from att plane G, if `gate`.
    pub fn group_norm(
        &self,
        rec: &mut Recorder<'a>,
        vecs: &'a GpuBuffer,
        lnx_slot: usize,
        r_k_slot: Option<usize>,
        gate: bool,
    ) -> Result<()> {
        let (s, c) = (self.s, self.info.n_embd);
        let op = GroupNorm {
            y: &s.y,
            att: &s.att,
            plane: s.plane_len(c),
            vecs,
            w_offset: lnx_slot * c,
            b_offset: (lnx_slot + 1) * c,
            bonus: r_k_slot.map(|slot| slot * c),
            gate,
            head_size: self.info.head_size,
            eps: GN_EPS,
        };
        ops::group_norm(rec, &op, self.n(), c)
    }

    /// The channel mix of v4, v5 and v6 (steps named as in those files):
    ///   xx = LayerNorm(x, ln2); xk, xr = token-shift mixes of xx (slots
    ///   `mix_slot`, `mix_slot + 1`; the state's ffn_x takes the last row)
    ///   x += sigmoid(xr Wr) * (relu(xk Wk)^2 Wv)
    /// with ln2's weight at `ln2_slot` and its bias in the slot after.
    pub fn channel_mix(
        &self,
        rec: &mut Recorder<'a>,
        st: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        ln2_slot: usize,
        mix_slot: usize,
        ffn: &'a ChannelMix,
    ) -> Result<()> {
        let (s, c, n) = (self.s, self.info.n_embd, self.n());
        self.layer_norm(rec, &s.x, &s.xx, vecs, ln2_slot, ln2_slot + 1, n)?;
        // ffn_x follows att_x [C] in every generation's layer state.
        self.token_shift(rec, st, vecs, 2, mix_slot, c, true, false)?;
        let plane = s.plane_len(c);
        ffn.receptance.linear(rec, &s.mixed, plane, &s.y, 0, n, Act::Sigmoid, false)?;
        ffn.key.linear(rec, &s.mixed, 0, &s.ffn, 0, n, Act::ReluSq, false)?;
        ffn.value.linear(rec, &s.ffn, 0, &s.att, 0, n, Act::None, false)?;
        ops::mul_add(rec, &s.y, &s.att, &s.x, n, c)
    }
}
