//! What every RWKV generation shares on the GPU: the embedding rows read from
//! the file, ln0, the per-step buffers, the head, and one step of a chunk.
//! The layers themselves are in `v4.rs`, `v5.rs`, `v6.rs` and `v7.rs`.
//!
//! One step, for the tokens of a chunk (rows n, channels c):
//!  1. x = LayerNorm(emb[tokens], ln0)         (embedding rows from the file)
//!  2. the layers of the model's generation    (`Layers::record`)
//!  3. logits = LayerNorm(x[wanted rows], ln_out) head

use crate::error::{Error, Result};
use crate::gpu::kernels::{
    plane, Act, GatherParams, GroupNormParams, LayerNormParams, MulAddParams, TokenShiftParams, WkvTextures, WG,
};
use crate::gpu::{GpuBuffer, GpuContext, Kernel, ParamArena, Recorder, WeightStore, READBACK, STORAGE, X_WINDOW_BYTES};
use crate::loader::{Dtype, SafeTensorsFile, Tensor};
use crate::matrix::Matrix;
use crate::model::{v4, v5, v6, v7, Chunk, ModelInfo, Uploader, Version};
use crate::state::{State, StateLayout};

/// LayerNorm eps of ln0, ln1, ln2 and ln_out.
pub const LN_EPS: f32 = 1e-5;
/// GroupNorm eps of ln_x in v5.2, v6 and v7 (the official 64e-5, i.e.
/// 1e-5 * head_size_divisor²) and, equivalently, of v5.0/5.1, which divide
/// by the head_size_divisor 8 before a GroupNorm of eps 1e-5.
pub const GN_EPS: f32 = 64e-5;
/// Rows of logits computed per head pass when every position's logits are
/// wanted (bounds the logits and staging buffers: 2 x 4 MiB for a 65536
/// vocab; 64 rows cost 24 MiB more resident memory for no measured speed).
const HEAD_ROWS: usize = 16;
/// Planes of the LoRA hidden buffer `lora [LORA_PLANES, tokens, Dmax]`
/// (v7 uses 4: w, a, v, g; v6 5: the five token-shift LoRAs).
pub const LORA_PLANES: usize = 5;

// Slots of the model-wide vector buffer `globals [4, C]`.
const LN0_W: usize = 0;
const LN0_B: usize = 1;
const LNOUT_W: usize = 2;
const LNOUT_B: usize = 3;

/// The layers of each generation.
pub(crate) enum Layers {
    V4(Vec<v4::Block>),
    V5(Vec<v5::Block>),
    V6(Vec<v6::Block>),
    V7(Vec<v7::Block>),
}

/// The channel-mix matrices of v4, v5 and v6 (`Runtime::channel_mix`).
pub(crate) struct ChannelMix {
    key: Matrix,        // [F, C]
    value: Matrix,      // [C, F]
    receptance: Matrix, // [C, C]
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

    pub fn gpu_bytes(&self) -> u64 {
        self.key.bytes() + self.value.bytes() + self.receptance.bytes()
    }
}

/// Per-step buffers, sized by the chunk capacity (tokens) and batch.
pub(crate) struct Scratch {
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
}

impl Scratch {
    /// Elements per plane of `mixed` and `att`.
    pub fn plane_len(&self, c: usize) -> usize {
        self.capacity * c
    }
}

pub(crate) struct Runtime {
    pub ctx: GpuContext,
    pub info: ModelInfo,
    pub layout: StateLayout,
    /// Widest LoRA (columns of the `lora` planes).
    pub d_lora_max: usize,
    /// The checkpoint, kept mapped for `emb.weight` [V, C]: the embedding is
    /// read one row per token on the CPU (as llama.cpp does), so its V x C
    /// table never takes GPU memory and only the rows used become resident.
    file: SafeTensorsFile,
    globals: GpuBuffer, // [4, C]: ln0 w/b, ln_out w/b
    layers: Layers,
    head: Matrix, // [V, C]
    scratch: Option<Scratch>,
    arena: std::cell::RefCell<ParamArena>,
}

/// The dimensions every generation shares, from the tensor shapes.
pub(crate) struct Dims {
    pub vocab: usize,
    pub c: usize,
    pub n_layer: usize,
    pub dtype: Dtype,
}

impl Dims {
    pub fn read(f: &SafeTensorsFile) -> Result<Self> {
        let emb = f.get("emb.weight")?;
        if emb.shape.len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "emb.weight".into(),
                expected: vec![0, 0],
                found: emb.shape.to_vec(),
            });
        }
        let (vocab, c) = (emb.shape[0], emb.shape[1]);
        // The element-wise kernels read four channels at a time.
        if c == 0 || !c.is_multiple_of(4) {
            return Err(Error::UnsupportedShape(format!(
                "n_embd {c} (from emb.weight {:?}); a multiple of 4 is supported",
                emb.shape
            )));
        }
        let mut n_layer = 0;
        while f.contains(&format!("blocks.{n_layer}.ln1.weight")) {
            n_layer += 1;
        }
        Ok(Self { vocab, c, n_layer, dtype: emb.dtype })
    }
}

/// Uploads a checkpoint's tensors by official name, counting parameters and
/// reporting progress; each version's loader builds its blocks with it.
pub(crate) struct BlockLoader<'a, 'f> {
    pub up: &'a Uploader<'a>,
    pub f: &'f SafeTensorsFile,
    pub c: usize,
    pub parameters: u64,
}

impl BlockLoader<'_, '_> {
    /// LoRA ranks are padded with zero weights to whole 64-column rows where
    /// matrices live in textures (the texture kernel's shape); exact.
    pub fn rank(&self, d: usize) -> usize {
        if self.up.ctx.weight_store() == WeightStore::Texture {
            d.next_multiple_of(64)
        } else {
            d
        }
    }

    /// A linear weight `[rows, cols]` used as `x @ W.T`.
    pub fn mat(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (f, up) = (self.f, self.up);
        let t = f.expect(name, &[rows, cols])?;
        self.parameters += t.len() as u64;
        let m = Matrix::from_tensor(up.ctx, f, &t, up.max_part)?;
        up.uploaded(f, &t)?;
        Ok(m)
    }

    /// A LoRA tensor `[cols, rows]` (`[in, out]`, used as `x @ W`), stored
    /// transposed as `[rows, cols]` with its rank padded (see `rank`).
    pub fn lora(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let f = self.f;
        let t = f.expect(name, &[cols, rows])?;
        let m = self.lora_from(&t, rows, cols)?;
        self.done(&t)?;
        Ok(m)
    }

    /// As `lora` for a tensor already read (or a slice of one).
    pub fn lora_from(&mut self, t: &Tensor, rows: usize, cols: usize) -> Result<Matrix> {
        let c = self.c;
        let pad = |d: usize| if d == c { d } else { self.rank(d) };
        let m = Matrix::from_tensor_transposed(self.up.ctx, t, pad(rows), pad(cols), self.up.max_part)?;
        self.parameters += t.len() as u64;
        Ok(m)
    }

    /// Reports a tensor read through `lora_from` or `vector` as uploaded.
    pub fn done(&self, t: &Tensor) -> Result<()> {
        self.up.uploaded(self.f, t)
    }

    /// A vector tensor of exactly `shape` (C elements in all), widened to f32.
    pub fn vector(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.f.expect(name, shape)?;
        self.parameters += t.len() as u64;
        let v = t.to_f32();
        self.up.uploaded(self.f, &t)?;
        Ok(v)
    }

    /// `vector` written into slot `slot` of a `[slots, C]` buffer.
    pub fn vec_into(&mut self, dst: &mut [f32], slot: usize, name: &str, shape: &[usize]) -> Result<()> {
        let v = self.vector(name, shape)?;
        let c = self.c;
        dst[slot * c..(slot + 1) * c].copy_from_slice(&v);
        Ok(())
    }
}

/// Compiles the pipelines a model uses before any weight is uploaded:
/// shader compilation (LLVM, on CPU adapters) needs tens of MiB of scratch
/// memory, which then overlaps a small process instead of the loaded model,
/// and is handed back to the OS afterwards. Anything missed compiles on
/// first use as before.
fn compile_kernels(ctx: &GpuContext, version: Version, d: &Dims, head_size: usize) -> Result<()> {
    let dtype = d.dtype;
    let mut kernels = vec![(Kernel::LayerNorm, 0), (Kernel::TokenShift, 0), (Kernel::GatherRows, 0)];
    // The texture WKV kernels, where they will run (see `WkvTextures::fit`).
    let tex = ctx.weight_store() == WeightStore::Texture && head_size == 64 && ctx.subgroup_size() == Some(8);
    kernels.extend(match version {
        Version::V7 if tex => {
            vec![(Kernel::V7Prep, 0), (Kernel::Wkv7Tex, 0), (Kernel::Wkv7Tex, 1), (Kernel::GroupNorm, 0)]
        }
        Version::V7 => vec![(Kernel::V7Prep, 0), (Kernel::Wkv7, 0), (Kernel::GroupNorm, 0)],
        Version::V4 => vec![(Kernel::Wkv4, 0), (Kernel::MulAdd, 0)],
        _ if tex => vec![(Kernel::Wkv5Tex, 0), (Kernel::GroupNorm, 0), (Kernel::MulAdd, 0)],
        _ => vec![(Kernel::Wkv5, 0), (Kernel::GroupNorm, 0), (Kernel::MulAdd, 0)],
    });
    kernels.extend(Matrix::kernels(ctx, dtype));
    // v6 and v7 have LoRAs (down-projections of rank <= 64 from C wide inputs).
    if matches!(version, Version::V6 | Version::V7) {
        kernels.extend(Matrix::small_tile_kernel(ctx, dtype, d.c));
    }
    for (kernel, variant) in kernels {
        ctx.pipeline(kernel, variant)?;
    }
    crate::gpu::trim_heap();
    Ok(())
}

impl Runtime {
    /// Loads a checkpoint of `version`: ln0, the layers (by the version's
    /// loader), ln_out and the head.
    pub fn load(up: &Uploader, file: SafeTensorsFile, version: Version) -> Result<Self> {
        let ctx = up.ctx;
        let f = &file;
        let d = Dims::read(f)?;
        let head_size = match version {
            Version::V4 => 0,
            Version::V7 => f.shape("blocks.0.att.r_k").and_then(|s| s.get(1).copied()).unwrap_or(0),
            _ => 64,
        };
        compile_kernels(ctx, version, &d, head_size)?;

        // The embedding stays in the file (see `Runtime::file`); its pages
        // are dropped now and read back row by row as tokens use them.
        let emb = f.get("emb.weight")?;
        up.uploaded(f, &emb)?;
        let mut ld = BlockLoader { up, f, c: d.c, parameters: emb.len() as u64 };
        let mut g = vec![0f32; 4 * d.c];
        ld.vec_into(&mut g, LN0_W, "blocks.0.ln0.weight", &[d.c])?;
        ld.vec_into(&mut g, LN0_B, "blocks.0.ln0.bias", &[d.c])?;
        ld.vec_into(&mut g, LNOUT_W, "ln_out.weight", &[d.c])?;
        ld.vec_into(&mut g, LNOUT_B, "ln_out.bias", &[d.c])?;
        let globals = ctx.storage_f32("ln0/ln_out", &g)?;

        let (layers, mut info, layout) = match version {
            Version::V4 => v4::load(&mut ld, &d)?,
            Version::V5_0 | Version::V5_1 | Version::V5_2 => v5::load(&mut ld, &d, version)?,
            Version::V6 => v6::load(&mut ld, &d)?,
            Version::V7 => v7::load(&mut ld, &d)?,
        };
        let head = ld.mat("head.weight", d.vocab, d.c)?;
        info.parameters = ld.parameters;
        info.weight_bytes = f.data_bytes();
        info.gpu_weight_bytes += head.bytes() + globals.size();
        info.state_bytes_per_sequence = layout.bytes_per_sequence();
        let d_lora_max = info.lora.iter().map(|&(_, w)| ld.rank(w)).max().unwrap_or(0);
        Ok(Self {
            ctx: ctx.clone(),
            info,
            layout,
            d_lora_max,
            file,
            globals,
            layers,
            head,
            scratch: None,
            arena: std::cell::RefCell::new(ParamArena::new()),
        })
    }

    pub fn new_state(&self, batch: usize) -> Result<State> {
        State::new(&self.ctx, self.layout.clone(), batch)
    }

    /// Largest chunk whose per-step buffers each fit one storage binding.
    pub fn max_chunk_tokens(&self) -> usize {
        let max = self.ctx.max_binding_bytes() as usize;
        let c = self.info.n_embd;
        let widest = [plane::COUNT as usize * c, self.info.ffn, LORA_PLANES * self.d_lora_max.max(1)];
        (max / (widest.into_iter().max().unwrap() * 4)).clamp(1, 4096)
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
        let i = &self.info;
        let wkv_tex = i.version != Version::V4
            && ctx.weight_store() == WeightStore::Texture
            && WkvTextures::fit(ctx, i.head_size, c, self.layout.stride, capacity, batch);
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
            lora: f32s("lora", LORA_PLANES * capacity * self.d_lora_max.max(1))?,
            y: f32s("y", capacity * c)?,
            ffn: f32s("ffn", capacity * f)?,
            head_x: f32s("head x", head_cap * c)?,
            head_xn: f32s("head xn", head_cap * c)?,
            logits: f32s("logits", head_cap * v)?,
            staging: ctx.buffer("logits staging", (head_cap * v * 4) as u64, READBACK)?,
            wkv_tex: if wkv_tex { Some(WkvTextures::new(ctx, c, capacity, batch)?) } else { None },
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
        self.record_layers(&mut rec, s, state, &chunk)?;
        let layer_ops = rec.op_count();
        let mut rec = Recorder::new(&self.ctx);
        self.record_head(&mut rec, s, 0, head_cap)?;
        // One submission holds the layers and a head pass plus its copy out.
        self.arena.borrow_mut().reserve(&self.ctx, layer_ops + rec.op_count() + 1)
    }

    /// Runs one chunk through every layer, updating `state`, and returns the
    /// logits `[chunk.head_rows.len(), vocab]`.
    pub fn step(&mut self, state: &mut State, chunk: &Chunk, capacity: usize) -> Result<Vec<f32>> {
        let n = chunk.tokens.len();
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
            self.record_layers(&mut rec, s, state, chunk)?;
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

    /// ln0, then every layer of the model's generation.
    fn record_layers<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        state: &'a State,
        chunk: &Chunk,
    ) -> Result<()> {
        let n = chunk.tokens.len();
        // x = LayerNorm(emb[tokens]) (xx holds the embedding rows, see `step`).
        self.layer_norm(rec, &s.xx, &s.x, &self.globals, LN0_W, LN0_B, n)?;
        match &self.layers {
            Layers::V4(blocks) => v4::record(self, blocks, rec, s, state, chunk),
            Layers::V5(blocks) => v5::record(self, blocks, rec, s, state, chunk),
            Layers::V6(blocks) => v6::record(self, blocks, rec, s, state, chunk),
            Layers::V7(blocks) => v7::record(self, blocks, rec, s, state, chunk),
        }
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

    /// mixed[m, n, :] = xx[n] + (prev - xx[n]) * (vecs[mix_slot + m] + extra[m, n])
    /// for n_mix mixes, prev being the token before (the state for a
    /// sequence's first token). With `hand_over` the state at `state_offset`
    /// takes each sequence's last xx. `extra` (v6's data-dependent mix) is
    /// planes of `att`.
    #[allow(clippy::too_many_arguments)]
    pub fn token_shift<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        st: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        n: usize,
        n_mix: u32,
        mix_slot: usize,
        state_offset: usize,
        hand_over: bool,
        extra: bool,
    ) -> Result<()> {
        let c = self.info.n_embd;
        if n_mix > TokenShiftParams::MAX_MIX {
            return Err(Error::InvalidArgument(format!(
                "token shift: {n_mix} mixing vectors, at most {}",
                TokenShiftParams::MAX_MIX
            )));
        }
        let p = TokenShiftParams {
            n_tok: n as u32,
            dim: c as u32,
            n_mix,
            mix_offset: (mix_slot * c) as u32,
            state_stride: self.layout.stride as u32,
            state_offset: state_offset as u32,
            out_plane: s.plane_len(c) as u32,
            hand_over: hand_over as u32,
            extra_plane: if extra { s.plane_len(c) as u32 } else { 0 },
            _pad: [0; 3],
        };
        let groups = p.groups(rec.ctx());
        let bindings = [&s.xx, &s.tok_seq, &s.seq_start, st, vecs, &s.mixed, &s.att];
        rec.dispatch(Kernel::TokenShift, 0, &p, &bindings, groups)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm<'a>(
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
        rec.dispatch(Kernel::LayerNorm, 0, &p, &[x, vecs, y], p.groups(rec.ctx()))
    }

    /// y = GroupNorm(y) per head with ln_x at `lnx_slot` (weight) and the
    /// slot after (bias); then v7's bonus with r_k at `r_k_slot`, if given,
    /// and the gate from att plane G, if `gate`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        vecs: &'a GpuBuffer,
        n: usize,
        lnx_slot: usize,
        r_k_slot: Option<usize>,
        gate: bool,
    ) -> Result<()> {
        let i = &self.info;
        let c = i.n_embd;
        let p = GroupNormParams {
            n_tok: n as u32,
            dim: c as u32,
            head_size: i.head_size as u32,
            plane: s.plane_len(c) as u32,
            lnx_w: (lnx_slot * c) as u32,
            lnx_b: ((lnx_slot + 1) * c) as u32,
            r_k: (r_k_slot.unwrap_or(0) * c) as u32,
            eps: GN_EPS,
            bonus: r_k_slot.is_some() as u32,
            gate: gate as u32,
            _pad: [0; 2],
        };
        rec.dispatch(Kernel::GroupNorm, 0, &p, &[&s.y, &s.att, vecs], p.groups(rec.ctx()))
    }

    /// The channel mix of v4, v5 and v6 (steps named as in those files):
    ///   xx = LayerNorm(x, ln2); xk, xr = token-shift mixes of xx (slots
    ///   `mix_slot`, `mix_slot + 1`; the state's ffn_x takes the last row)
    ///   x += sigmoid(xr Wr) * (relu(xk Wk)^2 Wv)
    /// with ln2's weight at `ln2_slot` and its bias in the slot after.
    #[allow(clippy::too_many_arguments)]
    pub fn channel_mix<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        st: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        n: usize,
        ln2_slot: usize,
        mix_slot: usize,
        ffn: &'a ChannelMix,
    ) -> Result<()> {
        let c = self.info.n_embd;
        self.layer_norm(rec, &s.x, &s.xx, vecs, ln2_slot, ln2_slot + 1, n)?;
        // ffn_x follows att_x [C] in every generation's layer state.
        self.token_shift(rec, s, st, vecs, n, 2, mix_slot, c, true, false)?;
        let plane = s.plane_len(c);
        ffn.receptance.linear(rec, &s.mixed, plane, &s.y, 0, n, Act::Sigmoid, false)?;
        ffn.key.linear(rec, &s.mixed, 0, &s.ffn, 0, n, Act::ReluSq, false)?;
        ffn.value.linear(rec, &s.ffn, 0, &s.att, 0, n, Act::None, false)?;
        let p = MulAddParams { n_tok: n as u32, dim: c as u32, a_offset: 0, b_offset: 0 };
        rec.dispatch(Kernel::MulAdd, 0, &p, &[&s.y, &s.att, &s.x], [(c as u32 / 4).div_ceil(WG), n as u32, 1])
    }
}
