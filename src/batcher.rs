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

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::engine::{fair_shares, Engine, SeqInput};
use crate::error::{Error, Result};
use crate::model::LogitsMode;
use crate::session::Session;

pub struct Batcher {
    engine: Engine,
}

impl Batcher {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// One GPU step over the pending tokens of `sessions` (all on the
    /// engine's model). Returns the tokens each session read; a session
    /// that read its last pending token has new logits.
    pub fn step(&mut self, sessions: &mut [&mut Session]) -> Result<Vec<usize>> {
        for s in sessions.iter() {
            if !std::sync::Arc::ptr_eq(s.model(), self.engine.model()) {
                return Err(Error::InvalidArgument("a session runs a different model than the batcher".into()));
            }
        }
        let left: Vec<usize> = sessions.iter().map(|s| s.pending()).collect();
        // The engine's budget: chunk_tokens, or one token per sequence.
        let active = left.iter().filter(|&&l| l > 0).count();
        let take = fair_shares(&left, self.engine.chunk_tokens().max(active));
        let mut parts: Vec<_> = sessions.iter_mut().map(|s| s.parts()).collect();
        let mut inputs = Vec::new();
        let mut who = Vec::new();
        for (i, ((state, pending, _), &n)) in parts.iter_mut().zip(&take).enumerate() {
            if n == 0 {
                continue;
            }
            let done = n == pending.len();
            inputs.push(SeqInput { state, seq: 0, tokens: &pending[..n], logits: done.then_some(LogitsMode::Last) });
            who.push(i);
        }
        if inputs.is_empty() {
            return Ok(take);
        }
        let logits = self.engine.step(&mut inputs)?;
        drop(inputs);
        for (&i, l) in who.iter().zip(logits) {
            if !l.is_empty() {
                *parts[i].2 = Some(l);
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

/// A [`Batcher`] on its own thread. Dropping it (and every handle) ends the
/// thread once the sessions in flight are read.
pub struct BatchThread {
    handle: Option<BatchHandle>,
    thread: Option<JoinHandle<()>>,
}

/// Sends sessions to a [`BatchThread`]; cheap to clone, one per caller thread.
#[derive(Clone)]
pub struct BatchHandle {
    tx: mpsc::Sender<Job>,
}

impl BatchThread {
    pub fn spawn(engine: Engine) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("rwkv-batcher".into())
            .spawn(move || batch_loop(Batcher::new(engine), rx))
            .map_err(|e| Error::InvalidArgument(format!("cannot start the batch thread: {e}")))?;
        Ok(Self { handle: Some(BatchHandle { tx }), thread: Some(thread) })
    }

    pub fn handle(&self) -> BatchHandle {
        self.handle.clone().expect("present until drop")
    }
}

impl Drop for BatchThread {
    fn drop(&mut self) {
        self.handle = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A failed [`BatchHandle::feed`]: the error, and the session unless the
/// batch thread itself was lost (its pending tokens dropped).
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
        if let Err(error) = session.push(tokens) {
            return Err(FeedError { session: Some(Box::new(session)), error });
        }
        let (reply, rx) = mpsc::channel();
        if let Err(mpsc::SendError(mut job)) = self.tx.send(Job { session, reply }) {
            job.session.clear_pending();
            let error = Error::InvalidArgument("the batch thread has stopped".into());
            return Err(FeedError { session: Some(Box::new(job.session)), error });
        }
        match rx.recv() {
            Ok((session, Ok(()))) => Ok(session),
            Ok((session, Err(error))) => Err(FeedError { session: Some(Box::new(session)), error }),
            Err(_) => Err(FeedError { session: None, error: Error::Gpu("the batch thread ended".into()) }),
        }
    }
}

/// Takes sessions as they come, steps every active one together, and sends
/// each back once its pending tokens are read (or the step failed).
fn batch_loop(mut batcher: Batcher, rx: mpsc::Receiver<Job>) {
    let mut active: Vec<Job> = Vec::new();
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(job) => active.push(job),
                Err(_) => return,
            }
        }
        // Sessions that arrived since the last step join this one.
        active.extend(rx.try_iter());
        let mut sessions: Vec<&mut Session> = active.iter_mut().map(|j| &mut j.session).collect();
        let result = batcher.step(&mut sessions);
        let failed = result.err().map(|e| e.to_string());
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
            } else {
                i += 1;
            }
        }
    }
}
