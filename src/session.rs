//! A session: one sequence's state on the GPU, the logits of the last token
//! read, and text generation (sample → read the token → stream its text)
//! with stop sequences.

use crate::error::{Error, Result};
use crate::model::{LogitsMode, Model};
use crate::sampler::Sampler;
use crate::state::{State, StateData};
use crate::tokenizer::{TextStream, Tokenizer};

/// The end-of-text token of RWKV World and of the NeoX/BPE vocabularies.
pub const EOS: u32 = 0;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Text at which generation stops; the stop text itself is not emitted.
    pub stop: Vec<String>,
    /// Stop when this token is sampled (it is not read into the state).
    pub eos: Option<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 200, stop: Vec::new(), eos: Some(EOS) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    Eos,
    StopSequence(String),
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Every token sampled (and read into the state), without a final EOS.
    pub tokens: Vec<u32>,
    /// The text emitted through the callback.
    pub text: String,
    pub stop: StopReason,
}

pub struct Session<'m> {
    pub model: &'m mut Model,
    pub tokenizer: &'m Tokenizer,
    state: State,
    logits: Option<Vec<f32>>,
    /// What `reset` returns to: a tuned initial state, or the zero state.
    initial: Option<StateData>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m mut Model, tokenizer: &'m Tokenizer) -> Result<Self> {
        let state = model.new_state(1)?;
        Ok(Self { model, tokenizer, state, logits: None, initial: None })
    }

    /// Starts from `initial` (e.g. `Model::tuned_state`) now and after every
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

    /// Back to the initial state (the zero state unless one was set).
    pub fn reset(&mut self) -> Result<()> {
        self.logits = None;
        match &self.initial {
            Some(s) => self.state.write(0, s),
            None => self.state.reset(None),
        }
    }

    /// Logits after the last token read, if any was.
    pub fn logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// Reads tokens into the state.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut out = self.model.forward(&mut self.state, &[tokens], LogitsMode::Last)?;
        self.logits = Some(out.remove(0));
        Ok(())
    }

    /// Tokenizes and reads text; returns the number of tokens read.
    pub fn feed_text(&mut self, text: &[u8]) -> Result<usize> {
        let tokens = self.tokenizer.encode(text)?;
        self.feed(&tokens)?;
        Ok(tokens.len())
    }

    /// Samples up to `opts.max_tokens` tokens, reading each into the state and
    /// passing its text to `on_text` as soon as it is printable.
    pub fn generate(
        &mut self,
        sampler: &mut Sampler,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let mut stream = TextStream::new();
        let mut held = String::new(); // text that might start a stop sequence
        let mut emitted = String::new();
        let mut tokens = Vec::new();
        let mut emit = |s: &str, emitted: &mut String| {
            if !s.is_empty() {
                on_text(s);
                emitted.push_str(s);
            }
        };
        let mut stop = StopReason::MaxTokens;
        while tokens.len() < opts.max_tokens {
            let logits = self
                .logits
                .as_deref()
                .ok_or_else(|| Error::InvalidArgument("nothing has been read yet: give a prompt".into()))?;
            let token = sampler.sample(logits)?;
            if opts.eos == Some(token) {
                stop = StopReason::Eos;
                break;
            }
            sampler.accept(token);
            tokens.push(token);
            self.feed(&[token])?;
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
            emit(&held[..keep_from], &mut emitted);
            held.drain(..keep_from);
        }
        held.push_str(&stream.finish());
        emit(&held, &mut emitted);
        Ok(Generation { tokens, text: emitted, stop })
    }
}
