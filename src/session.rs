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
        Ok(Self { model, tokenizer, state, logits: None, initial: None, pending: Vec::new() })
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

    /// Back to the initial state (the zero state unless one was set); pending
    /// tokens are dropped.
    pub fn reset(&mut self) -> Result<()> {
        self.logits = None;
        self.pending.clear();
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
    pub(crate) fn parts(&mut self) -> (&mut State, &[u32], &mut Option<Vec<f32>>) {
        (&mut self.state, &self.pending, &mut self.logits)
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
        let mut stream = TextStream::new();
        let mut held = String::new(); // text that might start a stop sequence
        let mut emitted = String::new();
        let mut tokens = Vec::new();
        let end: Vec<u32> = match &opts.eos {
            EndTokens::Model => self.model.info().eos.clone(),
            EndTokens::Ignore => Vec::new(),
            EndTokens::Tokens(t) => t.clone(),
        };
        // Passes text on; true when the reader asks to stop.
        let mut emit = |s: &str, emitted: &mut String| -> bool {
            if s.is_empty() {
                return false;
            }
            emitted.push_str(s);
            on_text(s).is_break()
        };
        let mut stop = StopReason::MaxTokens;
        while tokens.len() < opts.max_tokens {
            let logits = self
                .logits
                .as_deref()
                .ok_or_else(|| Error::InvalidArgument("nothing has been read yet: give a prompt".into()))?;
            let token = sampler.sample(logits)?;
            if end.contains(&token) {
                stop = StopReason::Eos;
                break;
            }
            sampler.accept(token);
            tokens.push(token);
            self.feed(engine, &[token])?;
            let bytes = self.tokenizer.token_bytes(token).unwrap_or_default();
            held.push_str(&stream.push(bytes));
            if let Some((at, s)) = opts
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| held.find(s.as_str()).map(|at| (at, s)))
                .min_by_key(|(at, _)| *at)
            {
                emit(&held[..at], &mut emitted);
                return Ok(Generation { tokens, text: emitted, stop: StopReason::StopSequence(s.clone()) });
            }
            // Emit all but the longest tail that could still begin a stop sequence.
            let keep_from = held
                .char_indices()
                .map(|(i, _)| i)
                .find(|&i| opts.stop.iter().any(|s| !s.is_empty() && s.starts_with(&held[i..])))
                .unwrap_or(held.len());
            if emit(&held[..keep_from], &mut emitted) {
                return Ok(Generation { tokens, text: emitted, stop: StopReason::Cancelled });
            }
            held.drain(..keep_from);
        }
        held.push_str(&stream.finish());
        emit(&held, &mut emitted);
        Ok(Generation { tokens, text: emitted, stop })
    }
}
