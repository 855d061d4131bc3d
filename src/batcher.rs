//! Continuous batching: sessions with pending tokens share GPU steps.
//!
//! [`Batcher::step`] runs one step of an [`Engine`] over every session given
//! that has tokens pushed (`Session::push`): each takes a fair share of the
//! step's token budget (`chunk_tokens`, at least one token per session), so a
//! long prompt is read over several steps while other sessions decode beside
//! it. A session whose pending tokens are all read gets its last token's
//! logits. Sessions may join or leave between any two steps: the set passed
//! to each call is the batch. Each session's logits and state are
//! bit-identical to running it alone (the engine computes every token row the
//! same way whatever shares its step).
//!
//! [`BatchThread`] runs a batcher on its own thread for callers on other
//! threads: `BatchHandle::feed` hands it a session and tokens and gets the
//! session back once they are read; calls that overlap share steps. The
//! server and the C ABI are layers over these two.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{fair_shares, Engine, SeqInput};
use crate::error::{Error, Result};
use crate::model::{LogitsMode, Model};
use crate::session::Session;

pub struct Batcher {
    engine: Engine,
    /// Where the next step starts when more sessions wait than one step
    /// holds (round robin).
    turn: usize,
}

impl Batcher {
    pub fn new(engine: Engine) -> Self {
        Self { engine, turn: 0 }
    }

    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// One GPU step over the pending tokens of `sessions` (all on the
    /// engine's model): at most `Engine::max_sequences` of them, taken in
    /// turn when more wait. Returns the tokens each session read; a session
    /// that read its last pending token has new logits. After a GPU error
    /// the states of that step's sessions are undefined (reset them).
    pub fn step(&mut self, sessions: &mut [&mut Session]) -> Result<Vec<usize>> {
        for s in sessions.iter() {
            if !std::sync::Arc::ptr_eq(s.model(), self.engine.model()) {
                return Err(Error::InvalidArgument("a session runs a different model than the batcher".into()));
            }
        }
        let mut left: Vec<usize> = sessions.iter().map(|s| s.pending()).collect();
        let waiting: Vec<usize> = (0..left.len()).filter(|&i| left[i] > 0).collect();
        let max = self.engine.max_sequences();
        if waiting.len() > max {
            // This step takes `max` of them, starting where the last one stopped.
            let start = self.turn % waiting.len();
            let chosen: std::collections::HashSet<usize> =
                (0..max).map(|k| waiting[(start + k) % waiting.len()]).collect();
            for (i, l) in left.iter_mut().enumerate() {
                if !chosen.contains(&i) {
                    *l = 0;
                }
            }
            self.turn = self.turn.wrapping_add(max);
        }
        // The engine's budget: chunk_tokens, or one token per sequence.
        let active = left.iter().filter(|&&l| l > 0).count();
        let take = fair_shares(&left, self.engine.chunk_tokens().max(active));
        let mut parts: Vec<_> = sessions.iter_mut().map(|s| s.parts()).collect();
        let mut inputs = Vec::new();
        let mut who = Vec::new();
        for (i, (p, &n)) in parts.iter_mut().zip(&take).enumerate() {
            if n == 0 {
                continue;
            }
            let done = n == p.pending.len();
            let logits = if p.rows.is_some() { Some(LogitsMode::All) } else { done.then_some(LogitsMode::Last) };
            inputs.push(SeqInput { state: p.state, seq: 0, tokens: &p.pending[..n], logits });
            who.push(i);
        }
        if inputs.is_empty() {
            return Ok(take);
        }
        let logits = self.engine.step(&mut inputs)?;
        drop(inputs);
        let vocab = self.engine.info().vocab;
        for (&i, l) in who.iter().zip(logits) {
            let p = &mut parts[i];
            match &mut p.rows {
                // Every row kept; the last one is the logits once all are read.
                Some(rows) => {
                    if take[i] == p.pending.len() {
                        *p.logits = Some(l[l.len() - vocab..].to_vec());
                    }
                    **rows = l;
                }
                None if !l.is_empty() => *p.logits = Some(l),
                None => {}
            }
        }
        drop(parts);
        for (s, &n) in sessions.iter_mut().zip(&take) {
            s.consumed(n);
        }
        Ok(take)
    }

    /// Steps until no session has pending tokens.
    pub fn run(&mut self, sessions: &mut [&mut Session]) -> Result<()> {
        while sessions.iter().any(|s| s.pending() > 0) {
            self.step(sessions)?;
        }
        Ok(())
    }
}

/// A session handed to the batch thread, and where to send it back.
struct Job {
    session: Session,
    reply: mpsc::Sender<(Session, Result<()>)>,
}

/// What the batch thread is sent.
enum Msg {
    Job(Box<Job>),
    /// Finish the sessions in flight, then end.
    Stop,
}

/// A [`Batcher`] on its own thread. Dropping it stops the thread once the
/// sessions in flight are read (handles still alive then get an error).
pub struct BatchThread {
    handle: BatchHandle,
    thread: Option<JoinHandle<()>>,
}

/// Sends sessions to a [`BatchThread`]; cheap to clone, one per caller thread.
#[derive(Clone)]
pub struct BatchHandle {
    tx: mpsc::Sender<Msg>,
    model: Arc<Model>,
}

impl BatchThread {
    pub fn spawn(engine: Engine) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let model = engine.model().clone();
        let thread = std::thread::Builder::new()
            .name("rwkv-batcher".into())
            .spawn(move || batch_loop(Batcher::new(engine), rx))
            .map_err(|e| Error::Thread(format!("cannot start the batch thread: {e}")))?;
        Ok(Self { handle: BatchHandle { tx, model }, thread: Some(thread) })
    }

    pub fn handle(&self) -> BatchHandle {
        self.handle.clone()
    }
}

impl Drop for BatchThread {
    fn drop(&mut self) {
        let _ = self.handle.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A failed [`BatchHandle::feed`]: the error, and the session unless the
/// batch thread itself was lost. A session refused before any step (another
/// model, a bad token, a stopped thread) comes back untouched; after a
/// failed GPU step its state is undefined (reset it) and its pending tokens
/// are dropped.
#[derive(Debug)]
pub struct FeedError {
    pub session: Option<Box<Session>>,
    pub error: Error,
}

impl std::fmt::Display for FeedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for FeedError {}

impl BatchHandle {
    /// Pushes `tokens` onto `session` and returns it once they are read, with
    /// the last one's logits; sessions fed at the same time from other
    /// threads share the steps.
    pub fn feed(&self, mut session: Session, tokens: &[u32]) -> std::result::Result<Session, FeedError> {
        let refuse = |mut session: Session, error: Error| {
            session.clear_pending();
            Err(FeedError { session: Some(Box::new(session)), error })
        };
        // Checked here, so one caller's mistake cannot fail the others' step.
        if !Arc::ptr_eq(session.model(), &self.model) {
            let e = Error::InvalidArgument("the session runs a different model than the batch thread".into());
            return refuse(session, e);
        }
        if session.pending() > 0 {
            return refuse(session, Error::InvalidArgument("the session has tokens pushed already".into()));
        }
        if let Err(error) = session.push(tokens) {
            return refuse(session, error);
        }
        let (reply, rx) = mpsc::channel();
        if let Err(mpsc::SendError(Msg::Job(job))) = self.tx.send(Msg::Job(Box::new(Job { session, reply }))) {
            return refuse(job.session, Error::Thread("the batch thread has stopped".into()));
        }
        match rx.recv() {
            Ok((session, Ok(()))) => Ok(session),
            Ok((session, Err(error))) => Err(FeedError { session: Some(Box::new(session)), error }),
            Err(_) => Err(FeedError { session: None, error: Error::Thread("the batch thread ended".into()) }),
        }
    }
}

/// The longest the batch thread waits for sessions it just sent back.
const REGATHER_WAIT: Duration = Duration::from_millis(5);

/// Takes sessions as they come, steps every active one together, and sends
/// each back once its pending tokens are read (or the step failed). A panic
/// in a step fails that step's sessions; the thread goes on.
///
/// A session sent back is usually in a decode loop and returns with its next
/// token within microseconds (its caller samples and feeds again). Stepping
/// at once would split the callers into ragged steps (a step of the ones
/// back, then a step of the rest), so before each step the thread waits for
/// the sessions of the last step to come back: all of them, or up to half
/// the last step's time (at most `REGATHER_WAIT`), whichever is first. The
/// grouping changes no result (every session's bits are the same in any
/// batch), only how many share each step.
fn batch_loop(mut batcher: Batcher, rx: mpsc::Receiver<Msg>) {
    let mut active: Vec<Job> = Vec::new();
    let mut stopping = false;
    // Sessions sent back after the last step, and how long it took.
    let mut returned = 0usize;
    let mut last_step = Duration::ZERO;
    loop {
        if returned > 0 && !stopping {
            let deadline = Instant::now() + (last_step / 2).min(REGATHER_WAIT);
            while returned > 0 {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                match rx.recv_timeout(left) {
                    Ok(Msg::Job(job)) => {
                        active.push(*job);
                        returned -= 1;
                    }
                    Ok(Msg::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            returned = 0;
        }
        if active.is_empty() {
            if stopping {
                return;
            }
            match rx.recv() {
                Ok(Msg::Job(job)) => active.push(*job),
                Ok(Msg::Stop) | Err(_) => return,
            }
        }
        // Sessions that arrived since the last step join this one.
        for msg in rx.try_iter() {
            match msg {
                Msg::Job(job) => active.push(*job),
                Msg::Stop => stopping = true,
            }
        }
        let mut sessions: Vec<&mut Session> = active.iter_mut().map(|j| &mut j.session).collect();
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batcher.step(&mut sessions)));
        last_step = started.elapsed();
        let failed = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("a batched step panicked".to_string()),
        };
        let mut i = 0;
        while i < active.len() {
            if failed.is_some() || active[i].session.pending() == 0 {
                let mut job = active.swap_remove(i);
                job.session.clear_pending();
                let r = match &failed {
                    Some(msg) => Err(Error::Gpu(format!("batched step: {msg}"))),
                    None => Ok(()),
                };
                let _ = job.reply.send((job.session, r));
                returned += 1;
            } else {
                i += 1;
            }
        }
    }
}
