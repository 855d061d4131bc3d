//! `rwkv serve`: an OpenAI-compatible HTTP server (axum on tokio) over the
//! engine's batcher. The HTTP side reads and checks requests
//! ([`crate::openai`]), renders chat prompts ([`crate::chat`]), tokenizes,
//! takes an admission slot (429 when none is left) and hands the request to
//! the [`scheduler`], which runs every request in shared GPU steps and sends
//! its text back over a channel: collected into one JSON answer, or
//! forwarded as server-sent events. docs/serving.md describes the API.

pub mod metrics;
pub mod prefix_cache;
pub mod scheduler;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::batcher::Batcher;
use crate::chat::ChatFormat;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::openai::{self, Limits, Prompt, RequestError};
use crate::sampler::{Sampler, TokenLogprob};
use crate::session::{EndTokens, GenerateOptions, StopReason};
use crate::state::StateData;
use crate::tokenizer::Tokenizer;
use metrics::Metrics;
use scheduler::{Admission, Event, Finish, Job, Scheduler, SchedulerConfig, SchedulerHandle};

/// What the server runs: a model's engine, its tokenizer and chat format.
pub struct Served {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub chat: ChatFormat,
    /// A tuned initial state every request starts from (`--state`).
    pub initial: Option<StateData>,
    /// The id `/v1/models` lists and answers carry.
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `Authorization: Bearer KEY` required on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// Most requests read or generated at once.
    pub max_sessions: usize,
    /// Most requests waiting beyond those; past it: 429.
    pub queue: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    pub limits: Limits,
    /// Bytes of the prefix state cache (RWKV only; 0: off).
    pub prefix_cache_bytes: usize,
    /// On SIGINT/SIGTERM, requests in flight get this long to finish.
    pub shutdown_grace: Duration,
    /// A connection gets this long to send a request's headers (also while
    /// idle between requests), and again its body; then it is closed (a
    /// late body is answered 408).
    pub read_timeout: Duration,
    /// A connection that takes no bytes of an answer for this long (a
    /// client that stopped reading) is closed.
    pub write_timeout: Duration,
    /// Most connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            max_sessions: 32,
            queue: 64,
            max_body_bytes: 1 << 20,
            limits: Limits::default(),
            prefix_cache_bytes: 256 << 20,
            shutdown_grace: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

/// `Retry-After` on a 429, in seconds.
const RETRY_AFTER_S: u32 = 1;

struct App {
    scheduler: SchedulerHandle,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    tokenizer: Arc<Tokenizer>,
    chat: ChatFormat,
    name: String,
    vocab: usize,
    config: ServerConfig,
    created: u64,
    next_id: AtomicU64,
    stopping: AtomicBool,
}

/// Serves on `listener` until `shutdown` resolves, then stops taking
/// requests, gives those in flight `shutdown_grace` to finish (cancelling
/// the rest) and returns. Blocks; runs its own tokio runtime.
pub fn run(
    served: Served,
    config: ServerConfig,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rwkv-http")
        .build()
        .map_err(|e| Error::Thread(format!("cannot start the HTTP runtime: {e}")))?;
    let Served { engine, tokenizer, chat, initial, name } = served;
    let vocab = engine.info().vocab;
    // The prefix cache holds RWKV states; a Transformer's KV cache grows with
    // the prompt, so it is not cached.
    let cache_bytes =
        if matches!(engine.info().arch, crate::model::Arch::Transformer(_)) { 0 } else { config.prefix_cache_bytes };
    let metrics = Arc::new(Metrics::default());
    let mut batcher = Batcher::new(engine);
    warm_up(&mut batcher, &tokenizer)?;
    let scheduler = Scheduler::spawn(
        batcher,
        tokenizer.clone(),
        initial,
        SchedulerConfig {
            max_sessions: config.max_sessions.max(1),
            prefix_cache_bytes: cache_bytes,
            shutdown_grace: config.shutdown_grace,
        },
        metrics.clone(),
    )?;
    let app = Arc::new(App {
        scheduler: scheduler.handle(),
        admission: Admission::new(config.max_sessions.max(1) + config.queue),
        metrics,
        tokenizer,
        chat,
        name,
        vocab,
        created: now(),
        next_id: AtomicU64::new(1),
        stopping: AtomicBool::new(false),
        config,
    });
    let result = runtime.block_on(async move {
        listener.set_nonblocking(true).map_err(|e| Error::Thread(format!("listener: {e}")))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|e| Error::Thread(format!("listener: {e}")))?;
        serve_connections(app, listener, shutdown).await;
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    scheduler.join();
    result
}

/// Accepts connections until `shutdown` resolves, each served by hyper with
/// the read timeout and at most `max_connections` open at once (the rest
/// wait in the listen backlog); then stops the scheduler (requests in flight
/// get the grace period) and waits for the connections to close, dropping
/// those still open past the grace period and a margin for the last events.
async fn serve_connections(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(app.config.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(router(app.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(app.config.read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors or a connection reset before it
                // was taken: wait a little rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Streamed tokens are small writes: send each at once.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteDeadline { io: stream, limit: app.config.write_timeout, stalled: None });
        let conn = graceful.watch(http.serve_connection(io, service.clone()));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    app.stopping.store(true, Relaxed);
    app.scheduler.stop();
    let bound = app.config.shutdown_grace + Duration::from_secs(2);
    let _ = tokio::time::timeout(bound, graceful.shutdown()).await;
}

/// A connection's socket whose writes may wait at most `limit` for the
/// client to take bytes: a client that stops reading an answer (a stream it
/// never consumes) would otherwise hold its connection, and the events
/// queued for it, for ever.
struct WriteDeadline<T> {
    io: T,
    limit: Duration,
    /// Armed when a write first waits; disarmed by any progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    /// What a write that made progress, or still waits, returns.
    fn progress<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no bytes of its answer within --write-timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs the kinds of step the server will (a prompt chunk, a decode token,
/// two sessions in one step) before it listens, so that drivers which
/// compile kernels on first use (lavapipe: about 2 s) do so now and not in
/// the first client's time to first token.
fn warm_up(batcher: &mut Batcher, tokenizer: &Arc<Tokenizer>) -> Result<()> {
    let model = batcher.engine().model().clone();
    let mut a = crate::session::Session::new(model.clone(), tokenizer.clone())?;
    let mut b = crate::session::Session::new(model, tokenizer.clone())?;
    a.push(&[0, 0, 0])?;
    b.push(&[0])?;
    batcher.run(&mut [&mut a, &mut b])?;
    a.push(&[0])?;
    b.push(&[0])?;
    batcher.run(&mut [&mut a, &mut b])?;
    a.push(&[0])?;
    batcher.run(&mut [&mut a])
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .with_state(app)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An OpenAI-style error answer.
fn error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": Value::Null}});
    (status, axum::Json(body)).into_response()
}

fn bad_request(app: &App, e: &RequestError) -> Response {
    app.metrics.bad_requests.fetch_add(1, Relaxed);
    error(StatusCode::BAD_REQUEST, "invalid_request_error", &e.message, e.param.as_deref())
}

fn authorized(app: &App, headers: &HeaderMap) -> std::result::Result<(), Response> {
    let Some(key) = &app.config.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return Ok(());
    }
    app.metrics.bad_requests.fetch_add(1, Relaxed);
    Err(error(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "a valid API key is required: Authorization: Bearer KEY",
        None,
    ))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.stopping.load(Relaxed) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting down", None);
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&app, &headers) {
        return r;
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&app, &headers) {
        return r;
    }
    let m = json!({"id": app.name, "object": "model", "created": app.created, "owned_by": "rwkv-wgpu"});
    axum::Json(json!({"object": "list", "data": [m]})).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint", None)
}

/// Past the body limit the rest of a body is still read (and dropped), up
/// to this many bytes, so that the client, still sending, hears the 400
/// instead of a reset connection; beyond it the connection is closed.
const DRAIN_LIMIT: usize = 64 << 20;

/// The body, up to the size limit.
async fn read_body(app: &App, body: Body) -> std::result::Result<Vec<u8>, Response> {
    use tokio_stream::StreamExt;
    let limit = app.config.max_body_bytes;
    let too_big =
        || bad_request(app, &RequestError::new(format!("the request body is over {limit} bytes (--max-body-bytes)")));
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + app.config.read_timeout;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                let secs = app.config.read_timeout.as_secs_f64();
                let message = format!("the request body did not arrive within {secs} s (--read-timeout)");
                return Err(error(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", &message, None));
            }
        };
        let Ok(chunk) = chunk else {
            return Err(bad_request(app, &RequestError::new("the request body could not be read")));
        };
        total = total.saturating_add(chunk.len());
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > limit {
        return Err(too_big());
    }
    Ok(buf)
}

/// The key checked, then the body read: what both completion endpoints start with.
async fn authorized_body(app: &App, headers: &HeaderMap, body: Body) -> std::result::Result<Vec<u8>, Response> {
    authorized(app, headers)?;
    read_body(app, body).await
}

/// Which endpoint a request came through: how its answer is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let body = match authorized_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req = match openai::parse_completion(&body, &app.config.limits) {
        Ok(r) => r,
        Err(e) => return bad_request(&app, &e),
    };
    let prompt = match req.prompt {
        Prompt::Text(text) => match app.tokenizer.encode(text.as_bytes()) {
            Ok(t) => t,
            Err(e) => return bad_request(&app, &RequestError::new(e.to_string())),
        },
        Prompt::Tokens(t) => t,
    };
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= app.vocab) {
        return bad_request(&app, &RequestError::new(format!("token id {t} is out of range (vocab {})", app.vocab)));
    }
    // Cache the state one token before the end: a longer prompt that starts
    // with this one, or the same prompt again, starts from there.
    let cache_at = vec![prompt.len().saturating_sub(1)];
    submit(app, Kind::Completion, prompt, cache_at, req.generation, Vec::new()).await
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let body = match authorized_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req = match openai::parse_chat(&body, &app.config.limits) {
        Ok(r) => r,
        Err(e) => return bad_request(&app, &e),
    };
    let pieces = match app.chat.render(&req.messages) {
        Ok(p) => p,
        Err(e) => return bad_request(&app, &RequestError::new(e.to_string())),
    };
    let mut prompt = Vec::new();
    let mut ends = Vec::new();
    for piece in &pieces {
        match app.tokenizer.encode(piece.as_bytes()) {
            Ok(t) => prompt.extend(t),
            Err(e) => return bad_request(&app, &RequestError::new(e.to_string())),
        }
        ends.push(prompt.len());
    }
    // Cache after the messages before the last one (a shared system prompt,
    // the conversation so far) and one token before the end.
    let mut cache_at = vec![prompt.len().saturating_sub(1)];
    if ends.len() >= 3 {
        cache_at.push(ends[ends.len() - 3]);
    }
    let stops = app.chat.stops();
    submit(app, Kind::Chat, prompt, cache_at, req.generation, stops).await
}

/// Admits a request and answers it: one JSON object, or a stream of events.
async fn submit(
    app: Arc<App>,
    kind: Kind,
    prompt: Vec<u32>,
    cache_at: Vec<usize>,
    generation: openai::Generation,
    extra_stops: Vec<String>,
) -> Response {
    app.metrics.requests.fetch_add(1, Relaxed);
    if prompt.is_empty() {
        return bad_request(&app, &RequestError::new("the prompt has no tokens"));
    }
    if let Some((id, _)) = generation.sampler.logit_bias.iter().find(|(id, _)| *id as usize >= app.vocab) {
        return bad_request(
            &app,
            &RequestError {
                message: format!("logit_bias: token id {id} is out of range (vocab {})", app.vocab),
                param: Some("logit_bias".into()),
            },
        );
    }
    let mut sampler_cfg = generation.sampler.clone();
    if !generation.seeded {
        // A different draw per request, as OpenAI's API gives without a seed.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        sampler_cfg.seed = nanos ^ app.next_id.load(Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    let sampler = match Sampler::new(sampler_cfg) {
        Ok(s) => s,
        Err(e) => return bad_request(&app, &RequestError::new(e.to_string())),
    };
    if app.stopping.load(Relaxed) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down", None);
    }
    let Some(ticket) = app.admission.try_take() else {
        app.metrics.rejected.fetch_add(1, Relaxed);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "the server is at its limit of queued requests; retry later",
            None,
        );
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        return r;
    };
    let limit = app.config.limits.max_scored_prompt;
    let score_prompt = generation.echo && generation.logprobs.is_some();
    if score_prompt && prompt.len() > limit {
        let message =
            format!("`echo` with `logprobs` scores at most {limit} prompt tokens; this prompt has {}", prompt.len());
        return bad_request(&app, &RequestError { message, param: Some("echo".into()) });
    }
    let echo = (kind == Kind::Completion && generation.echo)
        .then(|| String::from_utf8_lossy(&app.tokenizer.decode(&prompt).unwrap_or_default()).into_owned());
    let mut stop = generation.stop.clone();
    stop.extend(extra_stops);
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt,
        cache_at,
        sampler,
        options: GenerateOptions { max_tokens: generation.max_tokens, stop, eos: EndTokens::Model },
        logprobs: generation.logprobs,
        score_prompt,
        events,
        received: Instant::now(),
        ticket,
    };
    if app.scheduler.submit(job).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the scheduler has stopped", None);
    }
    let id = app.next_id.fetch_add(1, Relaxed);
    let answer = Answer {
        id: match kind {
            Kind::Completion => format!("cmpl-{id}"),
            Kind::Chat => format!("chatcmpl-{id}"),
        },
        kind,
        model: app.name.clone(),
        created: now(),
        // RWKV's reply follows `Assistant:` with a space.
        trim_start: kind == Kind::Chat && matches!(app.chat, ChatFormat::Rwkv),
        logprobs: generation.logprobs.map(|_| Logprobs { tokenizer: app.tokenizer.clone(), chars: 0 }),
        echo,
    };
    if generation.stream {
        stream(answer, rx)
    } else {
        collect(answer, rx).await
    }
}

/// How a request's answer is written.
struct Answer {
    id: String,
    kind: Kind,
    model: String,
    created: u64,
    trim_start: bool,
    /// Set when the request asked for log probabilities.
    logprobs: Option<Logprobs>,
    /// The prompt's text, answered before the completion (`echo`).
    echo: Option<String>,
}

/// A token of the answer and its log probability (none for a prompt's first).
type Scored = (u32, Option<TokenLogprob>);

fn generated(lp: TokenLogprob) -> Scored {
    (lp.token, Some(lp))
}

/// How sampled tokens' log probabilities are written.
struct Logprobs {
    tokenizer: Arc<Tokenizer>,
    /// Characters of completion text before the next token (`text_offset`).
    chars: usize,
}

impl Logprobs {
    /// A token's bytes, and as text (invalid UTF-8, a part of a character,
    /// as U+FFFD; the bytes are exact).
    fn token(&self, t: u32) -> (&[u8], String) {
        let bytes = self.tokenizer.token_bytes(t).unwrap_or(&[]);
        (bytes, String::from_utf8_lossy(bytes).into_owned())
    }

    /// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`
    /// (chat has no echo, so every token has its log probability).
    fn chat(&self, tokens: &[Scored]) -> Value {
        let entry = |t: u32, logprob: f32| {
            let (bytes, text) = self.token(t);
            json!({"token": text, "logprob": logprob, "bytes": bytes})
        };
        let content: Vec<Value> = tokens
            .iter()
            .filter_map(|(_, lp)| lp.as_ref())
            .map(|lp| {
                let mut e = entry(lp.token, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
                e
            })
            .collect();
        json!({"content": content})
    }

    /// The completions API's `logprobs`: parallel arrays of tokens, their
    /// log probabilities, `{token: logprob}` of the alternatives (both null
    /// for an echoed prompt's first token), and character offsets into the
    /// answer's text.
    fn completion(&mut self, tokens: &[Scored]) -> Value {
        let mut texts = Vec::with_capacity(tokens.len());
        let mut offsets = Vec::with_capacity(tokens.len());
        let mut values = Vec::with_capacity(tokens.len());
        let mut tops = Vec::with_capacity(tokens.len());
        for (token, lp) in tokens {
            let text = self.token(*token).1;
            offsets.push(self.chars);
            self.chars += text.chars().count();
            texts.push(text);
            let Some(lp) = lp else {
                values.push(Value::Null);
                tops.push(Value::Null);
                continue;
            };
            values.push(json!(lp.logprob));
            let mut top = serde_json::Map::new();
            for &(t, l) in &lp.top {
                // Two tokens may read the same (parts of a character): the likelier is kept.
                top.entry(self.token(t).1).or_insert(json!(l));
            }
            tops.push(Value::Object(top));
        }
        json!({"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
    }
}

fn finish_reason(stop: &StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

impl Answer {
    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice: its text (a message, a delta or plain text), the log
    /// probabilities of the tokens it adds, and its finish reason.
    fn choice(&mut self, text: Option<&str>, tokens: &[Scored], finish: Option<&str>, stream: bool) -> Value {
        let logprobs = match (&mut self.logprobs, self.kind) {
            (None, _) => Value::Null,
            (Some(l), Kind::Chat) => l.chat(tokens),
            (Some(l), Kind::Completion) => l.completion(tokens),
        };
        match (self.kind, stream) {
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or("")},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    fn body(&self, choice: Value, stream: bool) -> Value {
        json!({"id": self.id, "object": self.object(stream), "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// Drops the leading whitespace of a chat reply until text starts.
    fn trim(&mut self, text: String) -> String {
        if !self.trim_start {
            return text;
        }
        let t = text.trim_start();
        if !t.is_empty() {
            self.trim_start = false;
        }
        t.to_string()
    }
}

/// Waits for the whole generation and answers it as one object.
async fn collect(mut answer: Answer, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = answer.echo.take().unwrap_or_default();
    let mut tokens = Vec::new();
    loop {
        match rx.recv().await {
            // The prompt's scores come first, before anything generated.
            Some(Event::PromptLogprobs(scored)) => tokens.extend(scored),
            Some(Event::Logprob(lp)) => tokens.push(generated(lp)),
            Some(Event::Text(t)) => {
                let t = answer.trim(t);
                text.push_str(&t);
            }
            Some(Event::Done(f)) => {
                let choice = answer.choice(Some(&text), &tokens, Some(finish_reason(&f.stop)), false);
                let mut body = answer.body(choice, false);
                body["usage"] = usage(&f);
                return axum::Json(body).into_response();
            }
            Some(Event::Error(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", &e, None),
            None => return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the scheduler ended", None),
        }
    }
}

/// Forwards the generation as server-sent events: a chunk per piece of
/// text (with the log probabilities of the tokens since the last chunk, when
/// asked), a last chunk with the finish reason and usage, then `[DONE]`. When
/// the client goes away the forwarder ends, dropping the receiver, and the
/// scheduler frees the session at its next step.
fn stream(mut answer: Answer, mut rx: UnboundedReceiver<Event>) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<std::result::Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
        if answer.kind == Kind::Chat {
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null});
            if tx.send(data(answer.body(first, true))).await.is_err() {
                return;
            }
        }
        // The echoed prompt: at once, or with its scores when they come.
        let mut echo = answer.echo.take();
        if answer.logprobs.is_none() {
            if let Some(prompt) = echo.take() {
                let chunk = answer.choice(Some(&prompt), &[], None, true);
                if tx.send(data(answer.body(chunk, true))).await.is_err() {
                    return;
                }
            }
        }
        // Tokens whose text has not been sent yet (held back as a possible
        // stop sequence, or leading whitespace trimmed).
        let mut tokens = Vec::new();
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                e = rx.recv() => e,
            };
            let chunk = match event {
                Some(Event::PromptLogprobs(scored)) => {
                    let prompt = echo.take().unwrap_or_default();
                    let choice = answer.choice(Some(&prompt), &scored, None, true);
                    answer.body(choice, true)
                }
                Some(Event::Logprob(lp)) => {
                    tokens.push(generated(lp));
                    continue;
                }
                Some(Event::Text(t)) => {
                    let t = answer.trim(t);
                    if t.is_empty() {
                        continue;
                    }
                    let choice = answer.choice(Some(&t), &std::mem::take(&mut tokens), None, true);
                    answer.body(choice, true)
                }
                Some(Event::Done(f)) => {
                    let choice = answer.choice(None, &tokens, Some(finish_reason(&f.stop)), true);
                    let mut last = answer.body(choice, true);
                    last["usage"] = usage(&f);
                    let _ = tx.send(data(last)).await;
                    break;
                }
                Some(Event::Error(e)) => {
                    let _ = tx.send(data(json!({"error": {"message": e, "type": "server_error", "param": Value::Null, "code": Value::Null}}))).await;
                    break;
                }
                None => break,
            };
            if tx.send(data(chunk)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}
