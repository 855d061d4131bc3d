//! The scheduler: one thread that owns the [`Batcher`] and every request in
//! flight (continuous batching).
//!
//! Each turn of its loop:
//! 1. takes the requests that arrived (into a FIFO queue) and starts as many
//!    as `max_sessions` allows: a session, from the prefix cache's longest
//!    matching state when there is one, with its prompt's first segment pushed;
//! 2. samples the next token of every session whose prompt is read, sends its
//!    text to the request's channel, and pushes the token (or ends it: an end
//!    token, a stop text, `max_tokens`);
//! 3. drops the requests whose client went away (their channel is closed);
//! 4. runs one batched step over every session with tokens pushed: prompt
//!    chunks and decode tokens of different requests share it;
//! 5. caches the state of a session that just read a segment ending at a
//!    cache point, and pushes its next segment.
//!
//! A prompt is pushed in segments that end at its cache points (the end of
//! the messages before the last one, and one token before its end), so the
//! state there can be kept; the engine reads a prompt bit-identically however
//! it is split, which is what makes a cache hit equal a cold start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::prefix_cache::PrefixCache;
use crate::batcher::Batcher;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::{Sampler, TokenLogprob};
use crate::session::{Decoder, GenerateOptions, Session, StopReason};
use crate::state::StateData;
use crate::tokenizer::Tokenizer;

/// How often the tokens/s gauge is updated.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// What a request's handler hears from the scheduler.
#[derive(Debug)]
pub enum Event {
    /// The prompt's tokens and, after the first, each one's log probability
    /// given those before it (requests with `echo` and `logprobs`), sent
    /// once the prompt is read, before anything generated.
    PromptLogprobs(Vec<(u32, Option<TokenLogprob>)>),
    /// A sampled token's log probability (requests that ask for them), sent
    /// before the text it gives.
    Logprob(TokenLogprob),
    /// The next piece of generated text.
    Text(String),
    /// The generation ended.
    Done(Finish),
    /// It failed (a GPU error) or was cancelled by shutdown; no more events.
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Finish {
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens not read thanks to the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// Slots for requests queued or in flight; a request without one is
/// answered 429 at once.
pub struct Admission {
    taken: AtomicUsize,
    limit: usize,
}

/// A request's slot, given back when dropped (whoever holds it last).
pub struct Ticket(Arc<Admission>);

impl Admission {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { taken: AtomicUsize::new(0), limit })
    }

    pub fn try_take(self: &Arc<Self>) -> Option<Ticket> {
        self.taken
            .fetch_update(Relaxed, Relaxed, |n| (n < self.limit).then_some(n + 1))
            .ok()
            .map(|_| Ticket(self.clone()))
    }

    pub fn taken(&self) -> usize {
        self.taken.load(Relaxed)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Relaxed);
    }
}

/// One request, as the handler hands it over.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Prompt lengths after which the state is worth caching.
    pub cache_at: Vec<usize>,
    pub sampler: Sampler,
    pub options: GenerateOptions,
    /// Send each sampled token's log probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Score the prompt too (`echo` with `logprobs`): `Event::PromptLogprobs`,
    /// with `logprobs` alternatives; the prompt is then read whole, not from
    /// the prefix cache.
    pub score_prompt: bool,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
    pub ticket: Ticket,
}

pub struct SchedulerConfig {
    /// Most requests read or generated at once; more wait in the queue.
    pub max_sessions: usize,
    /// Bytes of the prefix state cache (0: off).
    pub prefix_cache_bytes: usize,
    /// After a stop, requests in flight get this long to finish.
    pub shutdown_grace: Duration,
}

enum Msg {
    Job(Box<Job>),
    Stop,
}

/// The scheduler thread and the way to reach it.
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

/// Hands requests to the scheduler; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
}

impl SchedulerHandle {
    /// Queues a request. Fails only when the scheduler has ended.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Box<Job>> {
        self.tx.send(Msg::Job(Box::new(job))).map_err(|e| match e.0 {
            Msg::Job(job) => job,
            Msg::Stop => unreachable!("a job was sent"),
        })
    }

    /// Stops taking new requests; those in flight get the grace period.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

impl Scheduler {
    pub fn spawn(
        mut batcher: Batcher,
        tokenizer: Arc<Tokenizer>,
        initial: Option<StateData>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let model = batcher.engine().model().clone();
        let thread = std::thread::Builder::new()
            .name("rwkv-scheduler".into())
            .spawn(move || {
                let mut s = Loop {
                    batcher,
                    model,
                    tokenizer,
                    initial,
                    cache: PrefixCache::new(config.prefix_cache_bytes),
                    config,
                    metrics,
                    queue: VecDeque::new(),
                    active: Vec::new(),
                    deadline: None,
                    rate_mark: (Instant::now(), 0),
                };
                s.run(rx)
            })
            .map_err(|e| Error::Thread(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Self { tx, thread: Some(thread) })
    }

    pub fn handle(&self) -> SchedulerHandle {
        SchedulerHandle { tx: self.tx.clone() }
    }

    /// Waits for the thread to end (after `stop`, once requests are done).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request being read or generated.
struct Active {
    job: Job,
    session: Session,
    decoder: Decoder,
    /// Prompt tokens pushed so far (read once `session.pending()` is 0).
    pushed: usize,
    cached_tokens: usize,
    /// Echo with logprobs: the prompt's tokens scored so far (the first has
    /// none); None once sent or when not asked.
    scored: Option<Vec<(u32, Option<TokenLogprob>)>>,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.pushed < self.job.prompt.len() || self.session.pending() > 0
    }

    /// Pushes the prompt up to its next cache point (or its end).
    fn push_segment(&mut self) -> Result<()> {
        let len = self.job.prompt.len();
        let end = self.job.cache_at.iter().copied().filter(|&c| c > self.pushed && c < len).min().unwrap_or(len);
        self.session.push(&self.job.prompt[self.pushed..end])?;
        self.pushed = end;
        Ok(())
    }

    fn finish(&self, stop: StopReason) -> Event {
        Event::Done(Finish {
            stop,
            prompt_tokens: self.job.prompt.len(),
            cached_tokens: self.cached_tokens,
            completion_tokens: self.decoder.generated(),
        })
    }
}

struct Loop {
    batcher: Batcher,
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    initial: Option<StateData>,
    cache: PrefixCache,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    queue: VecDeque<Job>,
    active: Vec<Active>,
    /// Set by a stop: requests still in flight then are cancelled.
    deadline: Option<Instant>,
    /// (when, generated tokens then): the tokens/s gauge's last mark.
    rate_mark: (Instant, u64),
}

impl Loop {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            // 1. Requests that arrived; block when there is nothing to do.
            if self.active.is_empty() && self.queue.is_empty() {
                if self.deadline.is_some() {
                    return;
                }
                self.metrics.set_tokens_per_second(0.0);
                match rx.recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => return,
                }
            }
            while let Ok(msg) = rx.try_recv() {
                self.take(msg);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                for a in self.active.drain(..) {
                    let _ = a.job.events.send(Event::Error("the server is shutting down".into()));
                    self.metrics.cancelled.fetch_add(1, Relaxed);
                }
                continue;
            }
            self.start_waiting();
            // 2. The next token of every session whose prompt is read.
            let mut i = 0;
            while i < self.active.len() {
                match self.decode(i) {
                    Ok(None) => i += 1,
                    Ok(Some(last)) => {
                        let a = self.active.swap_remove(i);
                        if a.job.events.send(last).is_err() {
                            self.metrics.cancelled.fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => {
                        let a = self.active.swap_remove(i);
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                    }
                }
            }
            // 3. Clients gone.
            self.drop_gone();
            // 4. One step over everything pushed.
            self.step();
            self.score_prompts();
            // 5. Segments read: cache, push the next.
            let cache = &mut self.cache;
            self.active.retain_mut(|a| {
                if a.session.pending() > 0 || a.pushed == a.job.prompt.len() {
                    return true;
                }
                if a.job.cache_at.contains(&a.pushed) && !cache.contains(&a.job.prompt[..a.pushed]) {
                    if let Ok(state) = a.session.state().read(0) {
                        cache.insert(a.job.prompt[..a.pushed].to_vec(), state);
                    }
                }
                match a.push_segment() {
                    Ok(()) => true,
                    Err(e) => {
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                        false
                    }
                }
            });
            self.drop_gone();
            self.gauges();
        }
    }

    /// Scores the prompt tokens the last step read for requests that echo
    /// their prompt with logprobs: the rows of the step give the log
    /// probability of each next prompt token. Once the whole prompt is
    /// read, sends the scores (before any token is sampled).
    fn score_prompts(&mut self) {
        let vocab = self.model.info().vocab;
        self.active.retain_mut(|a| {
            let Some(scored) = &mut a.scored else { return true };
            let top = a.job.logprobs.unwrap_or(0);
            for row in a.session.take_rows().chunks_exact(vocab) {
                // This row follows prompt token scored.len() - 1.
                let Some(&next) = a.job.prompt.get(scored.len()) else { break };
                match crate::sampler::logprob(row, next, top) {
                    Ok(lp) => scored.push((next, Some(lp))),
                    Err(e) => {
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                        return false;
                    }
                }
            }
            if !a.prefilling() {
                a.session.keep_rows(false);
                let scored = a.scored.take().unwrap_or_default();
                let _ = a.job.events.send(Event::PromptLogprobs(scored));
            }
            true
        });
    }

    /// Drops the requests whose client went away.
    fn drop_gone(&mut self) {
        let before = self.active.len();
        self.active.retain(|a| !a.job.events.is_closed());
        self.metrics.cancelled.fetch_add((before - self.active.len()) as u64, Relaxed);
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Job(job) if self.deadline.is_some() => {
                let _ = job.events.send(Event::Error("the server is shutting down".into()));
            }
            Msg::Job(job) => self.queue.push_back(*job),
            Msg::Stop => {
                self.deadline = Some(Instant::now() + self.config.shutdown_grace);
                for job in self.queue.drain(..) {
                    let _ = job.events.send(Event::Error("the server is shutting down".into()));
                    self.metrics.cancelled.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Starts queued requests while sessions are free.
    fn start_waiting(&mut self) {
        while self.active.len() < self.config.max_sessions {
            let Some(job) = self.queue.pop_front() else { break };
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                continue;
            }
            if let Some(a) = self.start(job) {
                self.active.push(a);
            }
        }
    }

    /// A session for `job`, from the longest cached prefix of its prompt,
    /// with its first segment pushed; None when that failed (the request
    /// has its error).
    fn start(&mut self, job: Job) -> Option<Active> {
        let result = (|| {
            let mut session = Session::new(self.model.clone(), self.tokenizer.clone())?;
            // Scoring the prompt needs the logits of each of its tokens.
            session.keep_rows(job.score_prompt);
            let cached = if job.score_prompt { None } else { self.cache.lookup(&job.prompt) };
            let cached_tokens = match (&self.initial, cached) {
                (_, Some((n, state))) => session.state_mut().write(0, state).map(|_| n)?,
                (Some(initial), None) => session.set_initial_state(initial.clone()).map(|_| 0)?,
                (None, None) => 0,
            };
            Ok::<_, Error>((session, cached_tokens))
        })();
        let (session, cached_tokens) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = job.events.send(Event::Error(e.to_string()));
                return None;
            }
        };
        if cached_tokens > 0 {
            self.metrics.prefix_hits.fetch_add(1, Relaxed);
            self.metrics.prefix_tokens_reused.fetch_add(cached_tokens as u64, Relaxed);
        } else {
            self.metrics.prefix_misses.fetch_add(1, Relaxed);
        }
        self.metrics.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
        let decoder = Decoder::new(&job.options, &self.model.info().eos);
        let scored = job.score_prompt.then(|| vec![(job.prompt[0], None)]);
        let mut a = Active { job, session, decoder, pushed: cached_tokens, cached_tokens, scored };
        match a.push_segment() {
            Ok(()) => Some(a),
            Err(e) => {
                let _ = a.job.events.send(Event::Error(e.to_string()));
                None
            }
        }
    }

    /// Samples and takes the next token of session `i` if its prompt is
    /// read; returns the last event when the request ends.
    fn decode(&mut self, i: usize) -> Result<Option<Event>> {
        let a = &mut self.active[i];
        if a.prefilling() {
            return Ok(None);
        }
        if a.decoder.is_full() {
            return Ok(Some(a.finish(StopReason::MaxTokens)));
        }
        let logits = a.session.logits().ok_or_else(|| Error::InvalidArgument("no logits after the prompt".into()))?;
        let token = a.job.sampler.sample(logits)?;
        let logprob = match a.job.logprobs {
            Some(top) => Some(crate::sampler::logprob(logits, token, top)?),
            None => None,
        };
        // The first token sampled: a request ends at an end token, so until
        // then every sample is counted by the decoder.
        if a.decoder.generated() == 0 {
            self.metrics.observe_ttft(a.job.received.elapsed().as_secs_f64());
        }
        let out = a.decoder.next(token, &self.tokenizer);
        if out.stop != Some(StopReason::Eos) {
            a.job.sampler.accept(token);
            self.metrics.generated_tokens.fetch_add(1, Relaxed);
            // An end token is not part of the answer, nor is its logprob.
            if let Some(lp) = logprob {
                if a.job.events.send(Event::Logprob(lp)).is_err() {
                    return Ok(Some(Event::Error("the client went away".into())));
                }
            }
        }
        if !out.text.is_empty() && a.job.events.send(Event::Text(out.text)).is_err() {
            return Ok(Some(Event::Error("the client went away".into())));
        }
        if let Some(stop) = out.stop {
            return Ok(Some(a.finish(stop)));
        }
        a.session.push(&[token])?;
        Ok(None)
    }

    /// One batched step over every session with tokens pushed. A failed
    /// step fails the requests in it (their states are undefined).
    fn step(&mut self) {
        let mut sessions: Vec<&mut Session> =
            self.active.iter_mut().map(|a| &mut a.session).filter(|s| s.pending() > 0).collect();
        if sessions.is_empty() {
            return;
        }
        let batcher = &mut self.batcher;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batcher.step(&mut sessions)));
        self.metrics.steps.fetch_add(1, Relaxed);
        let failed = match result {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "a batched step panicked".to_string(),
        };
        self.active.retain(|a| {
            if a.session.pending() == 0 {
                return true;
            }
            let _ = a.job.events.send(Event::Error(format!("batched step: {failed}")));
            false
        });
    }

    fn gauges(&mut self) {
        let m = &self.metrics;
        m.queued.store(self.queue.len() as u64, Relaxed);
        m.active.store(self.active.len() as u64, Relaxed);
        m.prefix_cache_bytes.store(self.cache.bytes() as u64, Relaxed);
        m.prefix_cache_entries.store(self.cache.len() as u64, Relaxed);
        let (t0, n0) = self.rate_mark;
        if t0.elapsed() >= RATE_WINDOW {
            let n = m.generated_tokens.load(Relaxed);
            m.set_tokens_per_second((n - n0) as f64 / t0.elapsed().as_secs_f64());
            self.rate_mark = (Instant::now(), n);
        }
    }
}
