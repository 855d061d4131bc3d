//! A session: one sequence of a shared model. It owns its state on the GPU,
//! the logits of the last token read, tokens waiting for a batched step,
//! and text generation (sample → read the token → stream its text) with
//! stop sequences. It borrows nothing: sessions live side by side on one
//! `Arc<Model>` and move between threads. Running it takes an
//! [`Engine`] (alone: `feed`, `generate`) or a [`crate::batcher::Batcher`]
//! (with other sessions in shared steps: `push`, then `Batcher::step`).

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{LogitsMode, Model};
use crate::sampler::Sampler;
use crate::state::{State, StateData};
use crate::tokenizer::{TextStream, Tokenizer};

/// The end-of-text token of RWKV World and of the NeoX/BPE vocabularies.
pub use crate::model::RWKV_EOS as EOS;

/// Which sampled tokens end a generation (they are not read into the state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EndTokens {
    /// The model's own: [`ModelInfo::eos`](crate::ModelInfo::eos), i.e. a
    /// Transformer's `eos_token_id`, RWKV's token 0.
    #[default]
    Model,
    /// None: only `max_tokens` and the stop texts end it.
    Ignore,
    /// These.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Text at which generation stops; the stop text itself is not emitted.
    pub stop: Vec<String>,
    /// Tokens that end the generation.
    pub eos: EndTokens,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 200, stop: Vec::new(), eos: EndTokens::Model }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    Eos,
    StopSequence(String),
    /// The text callback returned `ControlFlow::Break` (the reader went away).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Every token sampled (and read into the state), without a final EOS.
    pub tokens: Vec<u32>,
    /// The text emitted through the callback.
    pub text: String,
    pub stop: StopReason,
}

pub struct Session {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    state: State,
    logits: Option<Vec<f32>>,
    /// What `reset` returns to: a tuned initial state, or the zero state.
    initial: Option<StateData>,
    /// Tokens pushed for a batcher, not read yet.
    pending: Vec<u32>,
    /// Whether a batcher keeps the logits of every token it reads (`rows`),
    /// not only the last one's.
    keep_rows: bool,
    /// `[tokens, vocab]`: the logits of the tokens the last batcher step
    /// read, when `keep_rows` is on.
    rows: Vec<f32>,
}

/// A session as a batcher step sees it.
pub(crate) struct StepParts<'a> {
    pub state: &'a mut State,
    pub pending: &'a [u32],
    /// The logits after the last pending token, once it is read.
    pub logits: &'a mut Option<Vec<f32>>,
    /// Where every read token's logits go, when the session keeps them.
    pub rows: Option<&'a mut Vec<f32>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("arch", &self.model.info().arch)
            .field("pending", &self.pending.len())
            .field("has_logits", &self.logits.is_some())
            .finish()
    }
}

// Sessions are handed between threads (a server's tasks, the batch thread).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Session>();
};

impl Session {
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let state = model.new_state(1)?;
        Ok(Self {
            model,
            tokenizer,
            state,
            logits: None,
            initial: None,
            pending: Vec::new(),
            keep_rows: false,
            rows: Vec::new(),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Starts from `initial` (e.g. from `state::load_tuned`) now and after every
    /// `reset`.
    pub fn set_initial_state(&mut self, initial: StateData) -> Result<()> {
        self.state.write(0, &initial)?;
        self.logits = None;
        self.initial = Some(initial);
        Ok(())
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut State {
        self.logits = None;
        &mut self.state
    }

    /// Saves this session's state as safetensors (see [`crate::state::save`]);
    /// never over the model's own file.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        self.save_state_beside(path, &[])
    }

    /// As `save_state`, and never over any of `inputs` either (the
    /// tokenizer, the initial state file: whatever the caller reads).
    pub fn save_state_beside(&self, path: &Path, inputs: &[&Path]) -> Result<()> {
        let mut all = vec![self.model.file_path()];
        all.extend_from_slice(inputs);
        crate::state::save(&self.state.read(0)?, path, &all)
    }

    /// Replaces this session's state with one saved by `save_state` or an
    /// official state-tuning file (see [`crate::state::load_any`]).
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let data = crate::state::load_any(path, self.model.state_layout())?;
        self.state_mut().write(0, &data)
    }

    /// A second session on the same model that starts where this one is: its
    /// state (copied on the GPU), logits, initial state, pending tokens and
    /// kept rows.
    /// The two then go their own ways (a fork: one prompt, several answers).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            model: self.model.clone(),
            tokenizer: self.tokenizer.clone(),
            state: self.state.try_clone()?,
            logits: self.logits.clone(),
            initial: self.initial.clone(),
            pending: self.pending.clone(),
            keep_rows: self.keep_rows,
            rows: self.rows.clone(),
        })
    }

    /// Back to the initial state (the zero state unless one was set); pending
    /// tokens are dropped.
    pub fn reset(&mut self) -> Result<()> {
        self.logits = None;
        self.pending.clear();
        self.rows.clear();
        match &self.initial {
            Some(s) => self.state.write(0, s),
            None => self.state.reset(None),
        }
    }

    /// Logits after the last token read, if any was.
    pub fn logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    fn check_engine(&self, engine: &Engine) -> Result<()> {
        if !Arc::ptr_eq(engine.model(), &self.model) {
            return Err(Error::InvalidArgument("the engine runs a different model than the session".into()));
        }
        if !self.pending.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} tokens pushed for a batcher are not read yet",
                self.pending.len()
            )));
        }
        Ok(())
    }

    /// Reads tokens into the state, alone, with `engine` (which must run
    /// this session's model).
    pub fn feed(&mut self, engine: &mut Engine, tokens: &[u32]) -> Result<()> {
        self.check_engine(engine)?;
        if tokens.is_empty() {
            return Ok(());
        }
        let mut out = engine.forward(&mut self.state, &[tokens], LogitsMode::Last)?;
        self.logits = Some(out.remove(0));
        Ok(())
    }

    /// Tokenizes and reads text; returns the number of tokens read.
    pub fn feed_text(&mut self, engine: &mut Engine, text: &[u8]) -> Result<usize> {
        let tokens = self.tokenizer.encode(text)?;
        self.feed(engine, &tokens)?;
        Ok(tokens.len())
    }

    /// Queues tokens for the next steps of a batcher; once they are all read,
    /// `logits` holds the last one's. Checked against the vocabulary now.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.info().vocab;
        if let Some((p, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(Error::BadToken { sequence: 0, position: self.pending.len() + p, token: t, vocab });
        }
        if !tokens.is_empty() {
            // The logits of the last token read no longer describe the state
            // once these are: none until they are all read.
            self.logits = None;
        }
        self.pending.extend_from_slice(tokens);
        Ok(())
    }

    /// Tokenizes text and queues it (see `push`); returns the token count.
    pub fn push_text(&mut self, text: &[u8]) -> Result<usize> {
        let tokens = self.tokenizer.encode(text)?;
        self.push(&tokens)?;
        Ok(tokens.len())
    }

    /// Tokens pushed and not read yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// For the batcher: this session's state, its pending tokens, and where
    /// the logits go.
    /// For the batcher: what one step reads and writes of this session.
    pub(crate) fn parts(&mut self) -> StepParts<'_> {
        StepParts {
            state: &mut self.state,
            pending: &self.pending,
            logits: &mut self.logits,
            rows: if self.keep_rows { Some(&mut self.rows) } else { None },
        }
    }

    /// Makes batcher steps keep the logits of every token they read from
    /// this session (to score a prompt), not only the last one's.
    pub fn keep_rows(&mut self, on: bool) {
        self.keep_rows = on;
        self.rows.clear();
    }

    /// With `keep_rows`: the logits `[tokens, vocab]` of the tokens the last
    /// batcher step read, row i after its i-th token; taken, so the next
    /// call gives only newer rows.
    pub fn take_rows(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.rows)
    }

    /// Drops the tokens pushed and not read.
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    /// For the batcher: the first `n` pending tokens were read.
    pub(crate) fn consumed(&mut self, n: usize) {
        self.pending.drain(..n);
    }

    /// Samples up to `opts.max_tokens` tokens, reading each into the state and
    /// passing its text to `on_text` as soon as it is printable; `on_text`
    /// returning `ControlFlow::Break` stops generation after that token
    /// (`StopReason::Cancelled`: a closed pipe, a client gone).
    pub fn generate(
        &mut self,
        engine: &mut Engine,
        sampler: &mut Sampler,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut decoder = Decoder::new(opts, &self.model.info().eos);
        let mut tokens = Vec::new();
        let mut emitted = String::new();
        if decoder.is_full() {
            return Ok(Generation { tokens, text: emitted, stop: StopReason::MaxTokens });
        }
        loop {
            let logits = self
                .logits
                .as_deref()
                .ok_or_else(|| Error::InvalidArgument("nothing has been read yet: give a prompt".into()))?;
            let token = sampler.sample(logits)?;
            let out = decoder.next(token, &self.tokenizer);
            if out.stop != Some(StopReason::Eos) {
                sampler.accept(token);
                tokens.push(token);
                self.feed(engine, &[token])?;
            }
            let mut stop = out.stop;
            if !out.text.is_empty() {
                emitted.push_str(&out.text);
                if on_text(&out.text).is_break() && stop.is_none() {
                    stop = Some(StopReason::Cancelled);
                }
            }
            if let Some(stop) = stop {
                return Ok(Generation { tokens, text: emitted, stop });
            }
        }
    }
}

/// Turns sampled tokens into text, one token at a time, and says when a
/// generation ends: at an end token, at a stop text (neither is emitted) or
/// after `max_tokens`. Text that might be the start of a stop text is held
/// back until it is known not to be; text that is not yet whole UTF-8 waits
/// for the bytes that complete it. `Session::generate` and the server's
/// scheduler both drive one.
#[derive(Debug)]
pub struct Decoder {
    stream: TextStream,
    /// Text that might start a stop sequence.
    held: String,
    stops: Vec<String>,
    end: Vec<u32>,
    max_tokens: usize,
    generated: usize,
}

/// What one token gave: text to emit now, and whether the generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub text: String,
    pub stop: Option<StopReason>,
}

impl Decoder {
    /// `model_eos`: the model's end tokens, used for `EndTokens::Model`.
    pub fn new(opts: &GenerateOptions, model_eos: &[u32]) -> Self {
        let end = match &opts.eos {
            EndTokens::Model => model_eos.to_vec(),
            EndTokens::Ignore => Vec::new(),
            EndTokens::Tokens(t) => t.clone(),
        };
        let stops = opts.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self { stream: TextStream::new(), held: String::new(), stops, end, max_tokens: opts.max_tokens, generated: 0 }
    }

    /// Tokens taken so far (an end token is not counted).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// True once `max_tokens` tokens were taken, or for `max_tokens` 0 at once.
    pub fn is_full(&self) -> bool {
        self.generated >= self.max_tokens
    }

    /// Takes the next sampled token. `stop: Some(Eos)` means the token ends
    /// the generation and is not part of it (do not read it into the state);
    /// any other stop comes with the token taken.
    pub fn next(&mut self, token: u32, tokenizer: &Tokenizer) -> Decoded {
        if self.is_full() {
            return Decoded { text: self.finish(), stop: Some(StopReason::MaxTokens) };
        }
        if self.end.contains(&token) {
            return Decoded { text: self.finish(), stop: Some(StopReason::Eos) };
        }
        self.generated += 1;
        let bytes = tokenizer.token_bytes(token).unwrap_or_default();
        let piece = self.stream.push(bytes);
        self.held.push_str(&piece);
        if let Some((at, s)) =
            self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min_by_key(|(at, _)| *at)
        {
            let stop = Some(StopReason::StopSequence(s.clone()));
            let text = self.held[..at].to_string();
            self.held.clear();
            return Decoded { text, stop };
        }
        if self.is_full() {
            return Decoded { text: self.finish(), stop: Some(StopReason::MaxTokens) };
        }
        // Emit all but the longest tail that could still begin a stop sequence.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let text: String = self.held.drain(..keep_from).collect();
        Decoded { text, stop: None }
    }

    /// The text still held back (at the end of a generation).
    fn finish(&mut self) -> String {
        self.held.push_str(&self.stream.finish());
        std::mem::take(&mut self.held)
    }
}
