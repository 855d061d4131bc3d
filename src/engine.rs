//! The engine: what it takes to run a shared [`Model`]. It owns the
//! per-step buffers, the parameter arena and the x texture, and runs GPU
//! steps over the tokens of many sequences at once; the sequences may be
//! the sequences of one [`State`] (`forward`) or belong to the states of
//! different sessions (`step`, which the [`crate::batcher::Batcher`] uses).
//!
//! One step:
//! ```text
//!  1. rows = emb[tokens], read from the file           (`Model::embed`)
//!  2. x = LayerNorm(rows, ln0); the layers              (`Model::record_layers`)
//!  3. logits = LayerNorm(x[wanted rows], ln_out) head   (`Model::record_head`)
//! ```
//!
//! Every token row is computed by the same arithmetic in the same order,
//! whatever else is in the step and however a sequence's tokens are split
//! into steps, so a sequence's logits and state do not depend on its
//! company (tested bit for bit).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, ParamArena, Recorder, Workspace};
use crate::model::step::{Chunk, KvBind, Scratch, Step};
use crate::model::{LogitsMode, Model};
use crate::state::State;

/// Tokens per GPU step unless set otherwise.
pub const DEFAULT_CHUNK_TOKENS: usize = 128;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most tokens (summed over the batch) processed in one GPU step;
    /// per-step buffers are sized by it (clamped so each fits one binding).
    pub chunk_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { chunk_tokens: DEFAULT_CHUNK_TOKENS }
    }
}

/// One sequence's part of a [`Engine::step`].
pub struct SeqInput<'s> {
    /// The state the sequence lives in, and which of its sequences it is.
    pub state: &'s mut State,
    pub seq: usize,
    /// Tokens to read this step (may be empty).
    pub tokens: &'s [u32],
    /// Logits wanted: the last token's, every token's, or none.
    pub logits: Option<LogitsMode>,
}

/// The states a step's sequences live in: one state whose sequences are
/// the step's, bound as they are, or one sequence each of several states,
/// gathered into the engine's own state before the layers and scattered
/// back after them (exact copies).
enum Bound<'s> {
    Whole(&'s State),
    Gathered(Vec<(&'s State, usize)>),
}

pub struct Engine {
    model: Arc<Model>,
    chunk_tokens: usize,
    ws: Workspace,
    scratch: Option<Scratch>,
    arena: ParamArena,
    /// The state sequences of several states are gathered into for a step.
    gather: Option<State>,
}

impl Engine {
    pub fn new(model: Arc<Model>, opts: &EngineOptions) -> Result<Self> {
        let mut e = Self {
            model,
            chunk_tokens: 1,
            ws: Workspace::new(),
            scratch: None,
            arena: ParamArena::new(),
            gather: None,
        };
        e.set_chunk_tokens(opts.chunk_tokens)?;
        Ok(e)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn info(&self) -> &crate::model::ModelInfo {
        self.model.info()
    }

    /// A fresh (zero) state for `batch` sequences of this engine's model.
    pub fn new_state(&self, batch: usize) -> Result<State> {
        self.model.new_state(batch)
    }

    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens
    }

    /// Caps the tokens of one GPU step. The per-step buffers are sized by
    /// this cap; it is clamped so that every per-step buffer fits one binding.
    pub fn set_chunk_tokens(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidArgument("the chunk size must be at least 1 token".into()));
        }
        self.chunk_tokens = n.min(self.model.max_chunk_tokens());
        Ok(())
    }

    /// Most sequences one step may hold: each layer's state of the step's
    /// sequences must fit one storage binding, the per-step buffers must
    /// (one token per sequence at least), and where the texture WKV kernels
    /// run, one texture layer per sequence. `forward` refuses a state of more
    /// sequences; the batcher steps at most this many sessions at a time.
    pub fn max_sequences(&self) -> usize {
        let model = &*self.model;
        let ctx = model.context();
        let row = (model.state_layout().stride * 4).max(1) as u64;
        let mut max = ((ctx.max_binding_bytes() / row) as usize).min(model.max_chunk_tokens());
        if ctx.plan().wkv_textures(model.info().head_size) {
            max = max.min(ctx.max_texture_dims().1 as usize);
        }
        max.max(1)
    }

    fn check_batch(&self, batch: usize) -> Result<()> {
        let max = self.max_sequences();
        if batch > max {
            return Err(Error::InvalidArgument(format!(
                "{batch} sequences in one step; this model and adapter allow {max} (split them over several states)"
            )));
        }
        Ok(())
    }

    fn check_state(&self, state: &State) -> Result<()> {
        let layout = self.model.state_layout();
        if !state.context().same(self.model.context()) {
            return Err(Error::InvalidArgument("the state was made on another GPU context than the model".into()));
        }
        let l = state.layout();
        if l.n_layer != layout.n_layer || l.stride != layout.stride || l.kv != layout.kv {
            return Err(Error::InvalidArgument("the state was made for a different model".into()));
        }
        Ok(())
    }

    fn check_tokens(&self, sequence: usize, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.info().vocab;
        if let Some((p, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(Error::BadToken { sequence, position: p, token: t, vocab });
        }
        Ok(())
    }

    /// Reads `tokens[b]` into sequence `b` of `state` (one slice per sequence
    /// of the batch; slices may differ in length or be empty) and returns the
    /// logits `mode` asks for, one `Vec` per sequence. Runs as many steps of
    /// at most `max(chunk_tokens, batch)` tokens as it takes.
    pub fn forward(&mut self, state: &mut State, tokens: &[&[u32]], mode: LogitsMode) -> Result<Vec<Vec<f32>>> {
        let vocab = self.model.info().vocab;
        if tokens.len() != state.batch() {
            return Err(Error::InvalidArgument(format!(
                "{} token sequences for a state of batch {}",
                tokens.len(),
                state.batch()
            )));
        }
        self.check_state(state)?;
        self.check_batch(state.batch())?;
        for (s, seq) in tokens.iter().enumerate() {
            self.check_tokens(s, seq)?;
        }
        let batch = tokens.len();
        let cap = self.chunk_tokens.max(batch);
        let mut pos = vec![0usize; batch];
        let mut out: Vec<Vec<f32>> = tokens
            .iter()
            .map(|t| match mode {
                LogitsMode::All => Vec::with_capacity(t.len() * vocab),
                LogitsMode::Last => Vec::new(),
            })
            .collect();
        loop {
            let left: Vec<usize> = (0..batch).map(|b| tokens[b].len() - pos[b]).collect();
            if left.iter().all(|&l| l == 0) {
                break;
            }
            let take = fair_shares(&left, cap);
            let mut chunk = Chunk::default();
            let mut owners = Vec::new();
            for b in 0..batch {
                let seq = &tokens[b][pos[b]..pos[b] + take[b]];
                let last = pos[b] + take[b] == tokens[b].len();
                let want = match mode {
                    LogitsMode::All => Some(LogitsMode::All),
                    LogitsMode::Last => last.then_some(LogitsMode::Last),
                };
                chunk.push(b as u32, seq, want, &mut owners);
                pos[b] += take[b];
            }
            chunk.seq_start.push(chunk.tokens.len() as u32);
            for (b, &n) in take.iter().enumerate() {
                state.kv_reserve(b, state.context_len(b) + n)?;
            }
            let logits = self.run(&Bound::Whole(state), &chunk, cap)?;
            for (b, &n) in take.iter().enumerate() {
                state.kv_advance(b, n);
            }
            for (row, &b) in owners.iter().enumerate() {
                out[b].extend_from_slice(&logits[row * vocab..(row + 1) * vocab]);
            }
        }
        Ok(out)
    }

    /// One GPU step over the sequences of `seqs`, each in its own state
    /// (at most `max(chunk_tokens, seqs.len())` tokens in all). Returns the
    /// logits each asked for (`[vocab]` or `[tokens, vocab]`, empty for none).
    /// The states may belong to different sessions; each entry borrows its
    /// state mutably, so two entries cannot share one state (sequences of
    /// one state step together through `forward`).
    pub fn step(&mut self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.check_batch(seqs.len())?;
        let vocab = self.model.info().vocab;
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let cap = self.chunk_tokens.max(seqs.len());
        if total > cap {
            return Err(Error::InvalidArgument(format!(
                "a step of {total} tokens is over the engine's {cap} tokens per step"
            )));
        }
        for (i, s) in seqs.iter().enumerate() {
            self.check_state(s.state)?;
            self.check_tokens(i, s.tokens)?;
            if s.seq >= s.state.batch() {
                return Err(Error::InvalidArgument(format!(
                    "sequence {} is out of range for a state of batch {}",
                    s.seq,
                    s.state.batch()
                )));
            }
        }
        let mut chunk = Chunk::default();
        let mut owners = Vec::new();
        for (b, s) in seqs.iter().enumerate() {
            let want = if s.tokens.is_empty() { None } else { s.logits };
            chunk.push(b as u32, s.tokens, want, &mut owners);
        }
        chunk.seq_start.push(chunk.tokens.len() as u32);
        for s in seqs.iter_mut() {
            let len = s.state.context_len(s.seq);
            s.state.kv_reserve(s.seq, len + s.tokens.len())?;
        }
        let sources: Vec<(&State, usize)> = seqs.iter().map(|s| (&*s.state, s.seq)).collect();
        // One state whose sequences are exactly these, in order, is bound
        // as it is; anything else is gathered.
        let whole = sources.windows(2).all(|w| std::ptr::eq(w[0].0, w[1].0))
            && sources.iter().enumerate().all(|(b, &(_, seq))| seq == b)
            && sources.first().is_some_and(|(s, _)| s.batch() == sources.len());
        let bound = if whole { Bound::Whole(sources[0].0) } else { Bound::Gathered(sources) };
        let logits = self.run(&bound, &chunk, cap)?;
        for s in seqs.iter_mut() {
            s.state.kv_advance(s.seq, s.tokens.len());
        }
        let mut out = vec![Vec::new(); seqs.len()];
        for (row, &b) in owners.iter().enumerate() {
            out[b].extend_from_slice(&logits[row * vocab..(row + 1) * vocab]);
        }
        Ok(out)
    }

    /// Makes the per-step buffers hold `capacity` tokens of `batch`
    /// sequences, and sizes the params arena for the largest step they
    /// allow by recording that step (bound to `state`) without running it,
    /// so no later step allocates.
    fn ensure_scratch(&mut self, capacity: usize, batch: usize, state: &[GpuBuffer]) -> Result<()> {
        if let Some(s) = &self.scratch {
            if s.capacity >= capacity && s.batch >= batch {
                return Ok(());
            }
        }
        self.scratch = None;
        let scratch = self.model.scratch(&self.ws, capacity, batch)?;
        // One sequence of `capacity` tokens: the most matrix windows and WKV runs.
        let mut seq_start = vec![0, capacity as u32];
        seq_start.resize(batch + 1, capacity as u32);
        let chunk = Chunk { tokens: vec![0; capacity], tok_seq: vec![0; capacity], seq_start, head_rows: Vec::new() };
        let ctx = self.model.context();
        let layer_ops = {
            // (A Transformer's attention, per sequence, is not in this count:
            // the arena grows on the first step that needs more.)
            let step = step_view(&self.model, &scratch, state, &[], batch, &chunk);
            let mut rec = Recorder::new(ctx, &self.ws);
            self.model.record_layers(&mut rec, &step)?;
            rec.op_count()
        };
        let head_ops = {
            let mut rec = Recorder::new(ctx, &self.ws);
            self.model.record_head(&mut rec, &scratch, 0, scratch.head_cap)?;
            rec.op_count()
        };
        // One submission holds the layers, a head pass plus its copy out,
        // and for gathered steps a copy in and out per layer and sequence.
        let gathers = 2 * self.model.info().n_layer * batch;
        self.arena.reserve(ctx, layer_ops + head_ops + 1 + gathers)?;
        self.scratch = Some(scratch);
        Ok(())
    }

    /// The engine's gather state, with room for `batch` sequences.
    fn gather_state(&mut self, batch: usize) -> Result<()> {
        if self.gather.as_ref().is_none_or(|g| g.batch() < batch) {
            self.gather = None;
            self.gather = Some(self.model.new_state(batch)?);
        }
        Ok(())
    }

    /// Runs one chunk through every layer, updating the bound states, and
    /// returns the logits `[chunk.head_rows.len(), vocab]`.
    fn run(&mut self, bound: &Bound<'_>, chunk: &Chunk, capacity: usize) -> Result<Vec<f32>> {
        let n = chunk.tokens.len();
        let batch = chunk.seq_start.len() - 1;
        // A Transformer's caches are bound where they are: nothing is gathered.
        let kv = self.model.is_transformer();
        if let (Bound::Gathered(_), false) = (bound, kv) {
            self.gather_state(batch)?;
        }
        let gather = self.gather.take();
        let state: &[GpuBuffer] = match (bound, &gather) {
            (Bound::Whole(s), _) => s.buffers(),
            (Bound::Gathered(_), _) if kv => &[],
            (Bound::Gathered(_), Some(g)) => g.buffers(),
            (Bound::Gathered(_), None) => unreachable!("gather state made above"),
        };
        let result = self
            .ensure_scratch(capacity.max(n), batch, state)
            .and_then(|()| self.record_and_run(bound, state, chunk, batch));
        self.gather = gather;
        result
    }

    fn record_and_run(
        &mut self,
        bound: &Bound<'_>,
        state: &[GpuBuffer],
        chunk: &Chunk,
        batch: usize,
    ) -> Result<Vec<f32>> {
        let model = &*self.model;
        let ctx = model.context();
        let s = self.scratch.as_ref().expect("scratch made by ensure_scratch");
        let n = chunk.tokens.len();
        let q = ctx.queue();
        // Each sequence's KV cache (a Transformer), and its rows' positions.
        let seq_states: Vec<(&State, usize)> = match bound {
            Bound::Whole(st) => (0..batch).map(|b| (*st, b)).collect(),
            Bound::Gathered(sources) => sources.clone(),
        };
        let kv: Vec<KvBind<'_>> = if model.is_transformer() {
            seq_states
                .iter()
                .map(|(st, b)| {
                    let k = &st.kv[*b];
                    KvBind { layers: &k.layers, cap: k.cap, pos0: k.len }
                })
                .collect()
        } else {
            Vec::new()
        };
        if !kv.is_empty() {
            let mut positions = Vec::with_capacity(n);
            for (b, bind) in kv.iter().enumerate() {
                let (r0, r1) = (chunk.seq_start[b], chunk.seq_start[b + 1]);
                positions.extend((0..r1 - r0).map(|i| bind.pos0 as u32 + i));
            }
            model.write_positions(s, &positions);
        }
        // x rows = emb[tokens] into xx (ln0 reads them from there).
        let rows = model.embed(&chunk.tokens)?;
        q.write_buffer(s.xx.raw(), 0, bytemuck::cast_slice(&rows));
        q.write_buffer(s.tok_seq.raw(), 0, bytemuck::cast_slice(&chunk.tok_seq));
        q.write_buffer(s.seq_start.raw(), 0, bytemuck::cast_slice(&chunk.seq_start));
        if !chunk.head_rows.is_empty() {
            q.write_buffer(s.head_rows.raw(), 0, bytemuck::cast_slice(&chunk.head_rows));
        }

        let mut rec = Recorder::new(ctx, &self.ws);
        if n > 0 {
            let row = (model.state_layout().stride * 4) as u64;
            if let Bound::Gathered(sources) = bound {
                for (b, (src, seq)) in sources.iter().enumerate() {
                    for (from, to) in src.buffers().iter().zip(state) {
                        rec.copy(from, *seq as u64 * row, to, b as u64 * row, row);
                    }
                }
            }
            let step = step_view(model, s, state, &kv, batch, chunk);
            model.record_layers(&mut rec, &step)?;
            if let Bound::Gathered(sources) = bound {
                for (b, (dst, seq)) in sources.iter().enumerate() {
                    for (from, to) in state.iter().zip(dst.buffers()) {
                        rec.copy(from, b as u64 * row, to, *seq as u64 * row, row);
                    }
                }
            }
        }
        let vocab = model.info().vocab;
        let mut logits = vec![0f32; chunk.head_rows.len() * vocab];
        let mut done = 0;
        // The head runs over at most head_cap rows at a time (one binding of logits).
        loop {
            let rows = (chunk.head_rows.len() - done).min(s.head_cap);
            if rows > 0 {
                model.record_head(&mut rec, s, done, rows)?;
                rec.copy(&s.logits, 0, &s.staging, 0, (rows * vocab * 4) as u64);
            }
            rec.submit(&mut self.arena)?;
            if rows == 0 {
                break;
            }
            let out = &mut logits[done * vocab..(done + rows) * vocab];
            ctx.map_read(&s.staging, bytemuck::cast_slice_mut(out))?;
            done += rows;
            if done == chunk.head_rows.len() {
                break;
            }
            rec = Recorder::new(ctx, &self.ws);
        }
        ctx.check()?;
        Ok(logits)
    }
}

/// What a generation's `record` sees of one step.
fn step_view<'a>(
    model: &'a Model,
    s: &'a Scratch,
    state: &'a [GpuBuffer],
    kv: &'a [KvBind<'a>],
    batch: usize,
    chunk: &'a Chunk,
) -> Step<'a> {
    Step {
        kv,
        info: model.info(),
        stride: model.state_layout().stride,
        d_lora_max: model.d_lora_max(),
        s,
        state,
        batch,
        chunk,
    }
}

impl Chunk {
    /// Appends sequence `b`'s tokens for this step; with `logits`, marks the
    /// rows whose logits are wanted (every row, or the last), noting `b` as
    /// their owner.
    fn push(&mut self, b: u32, tokens: &[u32], logits: Option<LogitsMode>, owners: &mut Vec<usize>) {
        self.seq_start.push(self.tokens.len() as u32);
        let first = self.tokens.len() as u32;
        self.tok_seq.extend(std::iter::repeat_n(b, tokens.len()));
        self.tokens.extend_from_slice(tokens);
        let rows = match logits {
            _ if tokens.is_empty() => 0..0,
            Some(LogitsMode::All) => 0..tokens.len() as u32,
            Some(LogitsMode::Last) => tokens.len() as u32 - 1..tokens.len() as u32,
            None => 0..0,
        };
        for r in rows {
            self.head_rows.push(first + r);
            owners.push(b as usize);
        }
    }
}

/// Tokens each sequence takes in a step of `cap` tokens, given `left[b]`
/// tokens still to read: a fair share for every unfinished sequence, then
/// whatever is left to the first ones that can use it.
pub(crate) fn fair_shares(left: &[usize], cap: usize) -> Vec<usize> {
    let active = left.iter().filter(|&&l| l > 0).count();
    let mut take = vec![0usize; left.len()];
    if active == 0 {
        return take;
    }
    let mut budget = cap;
    let share = (cap / active).max(1);
    for (t, &l) in take.iter_mut().zip(left) {
        if l > 0 {
            *t = share.min(l).min(budget);
            budget -= *t;
        }
    }
    for (t, &l) in take.iter_mut().zip(left) {
        let extra = (l - *t).min(budget);
        *t += extra;
        budget -= extra;
    }
    take
}
