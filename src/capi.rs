//! The C ABI: the library for apps in C, C++, Swift, C#, Go or Python
//! (ctypes/cffi). `include/rwkv.h` is generated from this file by cbindgen
//! (`cbindgen.toml`; `tests/c_api.rs` fails when the header is stale) and
//! `docs/c-api.md` is the guide. The data flows as through the Rust API:
//! context (the GPU) → model (weights, tokenizer, a batch thread) → sessions (one
//! sequence's state each) → text in, pieces of text out through a callback.
//!
//! Why it is built this way:
//! - **Handles are numbers, not addresses.** Each handle is a key into a
//!   registry of live objects, and keys are never reused, so a NULL, freed,
//!   foreign or wrong-kind handle is `RWKV_ERR_INVALID_HANDLE` (or
//!   `RWKV_ERR_NULL_ARGUMENT`), never a dereference of freed memory.
//! - **No panic crosses the boundary.** Every entry point runs inside
//!   `catch_unwind`; a panic (a bug) becomes `RWKV_ERR_INTERNAL`.
//! - **Errors are a status plus a message.** Every call returns
//!   `rwkv_status`; `rwkv_last_error()` is the message of the calling
//!   thread's last failed call (errno-style, thread-local).
//! - **Threads.** Contexts and models may be used from any thread at once.
//!   A session takes one call at a time: a second, concurrent or re-entrant
//!   call on it returns `RWKV_ERR_BUSY` instead of blocking. Each model runs
//!   on its own batch thread (`BatchThread`): feeds and generations on its
//!   sessions from several threads at once share GPU steps (continuous
//!   batching), with the same results as alone, bit for bit.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, TryLockError};

use crate::batcher::{BatchThread, FeedError};
use crate::engine::{Engine, EngineOptions, DEFAULT_CHUNK_TOKENS};
use crate::error::Error;
use crate::gpu::{GpuContext, GpuOptions};
use crate::model::{LoadOptions, Model};
use crate::quant::Format;
use crate::sampler::{Sampler, SamplerConfig};
use crate::session::{Decoder, EndTokens, GenerateOptions, Session, StopReason};
use crate::tokenizer::Tokenizer;

// ---------------------------------------------------------------------------
// Types seen from C
// ---------------------------------------------------------------------------

/// What a call did. `RWKV_OK` is 0; every other value is an error and
/// `rwkv_last_error()` says what was wrong.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rwkv_status {
    RWKV_OK = 0,
    /// A required pointer (handle, string, output) was NULL.
    RWKV_ERR_NULL_ARGUMENT = 1,
    /// A handle that is not live: freed, never created, or of another kind.
    RWKV_ERR_INVALID_HANDLE = 2,
    /// A string argument is not valid UTF-8.
    RWKV_ERR_INVALID_UTF8 = 3,
    /// A bad value: a token id outside the vocabulary, a sampler setting out
    /// of range, an unknown quantization, nothing to generate from.
    RWKV_ERR_INVALID_ARGUMENT = 4,
    /// An output buffer is too small; the count out-parameter holds the size
    /// needed.
    RWKV_ERR_BUFFER_TOO_SMALL = 5,
    /// The session is in another call (another thread's, or this thread's
    /// from a generate callback).
    RWKV_ERR_BUSY = 6,
    /// A file could not be read or written.
    RWKV_ERR_IO = 7,
    /// A model, state or config file is malformed or not supported.
    RWKV_ERR_BAD_FILE = 8,
    /// The tokenizer could not be loaded or does not fit the model.
    RWKV_ERR_TOKENIZER = 9,
    /// No GPU adapter, or the device could not be opened.
    RWKV_ERR_NO_DEVICE = 10,
    /// GPU memory ran out (or a configured limit, or a KV cache's context).
    RWKV_ERR_OUT_OF_MEMORY = 11,
    /// The GPU device was lost or reported an error.
    RWKV_ERR_DEVICE = 12,
    /// A bug in the library (a caught panic). The handle it happened on may
    /// be unusable; free it.
    RWKV_ERR_INTERNAL = 13,
}
use rwkv_status::*;

/// The GPU: one device, shared by the models loaded on it.
pub struct rwkv_context {
    _opaque: [u8; 0],
}

/// A model's weights on the GPU, its tokenizer, and a thread that runs its
/// sessions' steps.
pub struct rwkv_model {
    _opaque: [u8; 0],
}

/// One sequence of a model: its state, and the logits of the last token read.
pub struct rwkv_session {
    _opaque: [u8; 0],
}

/// Options of `rwkv_model_load`; start from `rwkv_load_options_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rwkv_load_options {
    /// Quantize the weight matrices at load: "int8" or "4bit" (also "q4");
    /// NULL keeps the file's floats.
    pub quant: *const c_char,
    /// Most tokens read in one GPU step while feeding a prompt; 0 for the
    /// default (128).
    pub chunk_tokens: u32,
}

/// A model's shape and sizes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rwkv_model_info {
    /// "RWKV-4" … "RWKV-7", "Llama", "Qwen2" or "GPT-NeoX", NUL-terminated.
    pub arch: [c_char; 32],
    /// True for a Transformer (its state is a KV cache that grows).
    pub is_transformer: bool,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub head_size: u32,
    /// Rows of the embedding: token ids are below this.
    pub vocab: u32,
    pub parameters: u64,
    /// GPU bytes of the weights.
    pub gpu_weight_bytes: u64,
    /// RWKV: bytes of one session's state. A Transformer: 0.
    pub state_bytes: u64,
    /// A Transformer: KV-cache bytes per token of context. RWKV: 0.
    pub kv_bytes_per_token: u64,
    /// The first token that ends generation (RWKV: 0), or -1 if none.
    pub eos_token: i64,
}

/// Settings of `rwkv_session_generate`; start from
/// `rwkv_generate_options_default()` and change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rwkv_generate_options {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 is greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Nucleus: keep the most likely tokens up to this probability; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens below min_p × the top probability; 0 keeps all.
    pub min_p: f32,
    /// Subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a generated token.
    pub frequency_penalty: f32,
    /// llama.cpp-style repetition penalty; 1 disables.
    pub repetition_penalty: f32,
    /// Per-token decay of the occurrence counts; 1 is no decay.
    pub penalty_decay: f32,
    /// Seed of the sampler's random numbers (the same seed, the same text).
    pub seed: u64,
    /// `n_stop` texts at which generation stops (not emitted); may be NULL
    /// when `n_stop` is 0.
    pub stop: *const *const c_char,
    pub n_stop: usize,
    /// Do not stop at the model's end-of-text token.
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rwkv_stop_reason {
    RWKV_STOP_MAX_TOKENS = 0,
    /// The model's end-of-text token (not read into the state).
    RWKV_STOP_EOS = 1,
    /// One of the stop texts (not emitted; its tokens were read).
    RWKV_STOP_TEXT = 2,
    /// The callback returned nonzero.
    RWKV_STOP_CANCELLED = 3,
}

/// What `rwkv_session_generate` did.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rwkv_generation {
    /// Tokens generated and read into the state (the final end token excluded).
    pub n_tokens: u32,
    pub stop_reason: rwkv_stop_reason,
}

/// Receives each piece of generated text: `len` bytes of UTF-8 at `piece`,
/// followed by a NUL (valid only during the call). Return 0 to go on,
/// nonzero to stop after this piece. It runs on the thread that called
/// `rwkv_session_generate`; it must not unwind (C++ exceptions, longjmp).
pub type rwkv_piece_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user_data: *mut c_void) -> i32>;

// ---------------------------------------------------------------------------
// Errors, panics and the last error
// ---------------------------------------------------------------------------

/// A failed call: its status and message.
struct Failure {
    status: rwkv_status,
    message: String,
}

type Outcome = std::result::Result<(), Failure>;

fn fail(status: rwkv_status, message: impl Into<String>) -> Failure {
    Failure { status, message: message.into() }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } | Error::NotAFile { .. } | Error::SameFile { .. } | Error::OutputExists { .. } => {
                RWKV_ERR_IO
            }
            Error::BadConfig { .. }
            | Error::BadState { .. }
            | Error::TruncatedFile { .. }
            | Error::BadHeader { .. }
            | Error::BadPth { .. }
            | Error::NotRwkv { .. }
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::UnsupportedDtype { .. }
            | Error::UnsupportedShape(_) => RWKV_ERR_BAD_FILE,
            Error::BadToken { .. } | Error::InvalidArgument(_) => RWKV_ERR_INVALID_ARGUMENT,
            Error::Tokenizer(_) => RWKV_ERR_TOKENIZER,
            Error::NoAdapter(_) | Error::RequestDevice { .. } => RWKV_ERR_NO_DEVICE,
            Error::OutOfMemory { .. } | Error::MemoryLimit { .. } | Error::ContextTooLong { .. } => {
                RWKV_ERR_OUT_OF_MEMORY
            }
            Error::DeviceLost(_) | Error::Gpu(_) => RWKV_ERR_DEVICE,
            Error::Thread(_) => RWKV_ERR_INTERNAL,
        };
        fail(status, e.to_string())
    }
}

thread_local! {
    /// The message of this thread's last failed call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message never holds a NUL of its own; if one did, it would end there.
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs one entry point: its failure or panic becomes a status and the
/// thread's last error.
fn guard(f: impl FnOnce() -> Outcome) -> rwkv_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => RWKV_OK,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (a bug in rwkv-wgpu, please report it): {what}"));
            RWKV_ERR_INTERNAL
        }
    }
}

// ---------------------------------------------------------------------------
// The registry of live handles
// ---------------------------------------------------------------------------

struct ModelEntry {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    /// Runs the model: sessions fed from several threads share its steps.
    batch: BatchThread,
}

struct SessionEntry {
    model: Arc<ModelEntry>,
    /// `None` only if the batch thread was lost with the session in it.
    session: Mutex<Option<Session>>,
}

enum Object {
    Context(GpuContext),
    Model(Arc<ModelEntry>),
    Session(Arc<SessionEntry>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Context(_) => "context",
            Object::Model(_) => "model",
            Object::Session(_) => "session",
        }
    }
}

struct Registry {
    /// Keys are never reused, so a freed handle stays invalid forever.
    next: u64,
    live: HashMap<u64, Object>,
}

/// Keys step by this, so handles look like (aligned) pointers to debuggers.
const KEY_STEP: u64 = 16;

static REGISTRY: LazyLock<Mutex<Registry>> =
    LazyLock::new(|| Mutex::new(Registry { next: KEY_STEP, live: HashMap::new() }));

fn registry() -> MutexGuard<'static, Registry> {
    // Each use is one insert, get or remove, so the map is whole even if a
    // panic poisoned the lock.
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn register(object: Object) -> u64 {
    let mut r = registry();
    let key = r.next;
    r.next += KEY_STEP;
    r.live.insert(key, object);
    key
}

fn key_of<T>(handle: *const T, kind: &str) -> std::result::Result<u64, Failure> {
    if handle.is_null() {
        return Err(fail(RWKV_ERR_NULL_ARGUMENT, format!("the {kind} handle is NULL")));
    }
    Ok(handle as usize as u64)
}

/// Looks a handle up; `pick` takes the object out of the right variant.
fn lookup<T, R>(handle: *const T, kind: &str, pick: impl Fn(&Object) -> Option<R>) -> std::result::Result<R, Failure> {
    let key = key_of(handle, kind)?;
    let r = registry();
    match r.live.get(&key) {
        Some(object) => pick(object).ok_or_else(|| {
            fail(RWKV_ERR_INVALID_HANDLE, format!("{handle:p} is a {} handle, not a {kind}", object.kind()))
        }),
        None => Err(fail(
            RWKV_ERR_INVALID_HANDLE,
            format!("{handle:p} is not a live {kind} handle (freed, or never created)"),
        )),
    }
}

fn context(handle: *const rwkv_context) -> std::result::Result<GpuContext, Failure> {
    lookup(handle, "context", |o| match o {
        Object::Context(c) => Some(c.clone()),
        _ => None,
    })
}

fn model(handle: *const rwkv_model) -> std::result::Result<Arc<ModelEntry>, Failure> {
    lookup(handle, "model", |o| match o {
        Object::Model(m) => Some(m.clone()),
        _ => None,
    })
}

fn session(handle: *const rwkv_session) -> std::result::Result<Arc<SessionEntry>, Failure> {
    lookup(handle, "session", |o| match o {
        Object::Session(s) => Some(s.clone()),
        _ => None,
    })
}

/// Removes a live handle of this kind; what it owns is dropped once no call
/// in flight holds it.
fn unregister<T>(handle: *const T, kind: &str, is_kind: impl Fn(&Object) -> bool) -> Outcome {
    let key = key_of(handle, kind)?;
    let removed = {
        let mut r = registry();
        match r.live.get(&key) {
            Some(o) if is_kind(o) => r.live.remove(&key),
            Some(o) => {
                return Err(fail(RWKV_ERR_INVALID_HANDLE, format!("{handle:p} is a {} handle, not a {kind}", o.kind())))
            }
            None => None,
        }
    };
    // Dropped outside the registry's lock: freeing GPU memory takes time.
    match removed {
        Some(object) => {
            drop(object);
            Ok(())
        }
        None => Err(fail(
            RWKV_ERR_INVALID_HANDLE,
            format!("{handle:p} is not a live {kind} handle (freed, or never created)"),
        )),
    }
}

impl SessionEntry {
    /// This session, for one call; never waits.
    fn lock(&self) -> std::result::Result<Held<'_>, Failure> {
        match self.session.try_lock() {
            Ok(s) => Ok(Held { slot: s, model: &self.model }),
            Err(TryLockError::WouldBlock) => Err(fail(
                RWKV_ERR_BUSY,
                "the session is in another call (a session takes one call at a time; from a generate callback, \
                 the session being generated is busy)",
            )),
            Err(TryLockError::Poisoned(_)) => Err(fail(
                RWKV_ERR_INTERNAL,
                "the session is unusable after an internal error in an earlier call: free it",
            )),
        }
    }
}

fn lost() -> Failure {
    fail(RWKV_ERR_INTERNAL, "the session was lost with its model's batch thread (a bug): free it")
}

/// A session held for one call, and the model whose batch thread reads its
/// tokens.
struct Held<'a> {
    slot: MutexGuard<'a, Option<Session>>,
    model: &'a ModelEntry,
}

impl Held<'_> {
    fn session(&mut self) -> std::result::Result<&mut Session, Failure> {
        self.slot.as_mut().ok_or_else(lost)
    }

    /// Reads `tokens` into the session on the model's batch thread, in steps
    /// shared with the other sessions being fed at the same time.
    fn read(&mut self, tokens: &[u32]) -> Outcome {
        if tokens.is_empty() {
            return Ok(());
        }
        let session = self.slot.take().ok_or_else(lost)?;
        match self.model.batch.handle().feed(session, tokens) {
            Ok(session) => {
                *self.slot = Some(session);
                Ok(())
            }
            Err(FeedError { session, error }) => {
                *self.slot = session.map(|s| *s);
                Err(error.into())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
unsafe fn text_arg<'a>(p: *const c_char, what: &str) -> std::result::Result<&'a str, Failure> {
    if p.is_null() {
        return Err(fail(RWKV_ERR_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    // SAFETY: the caller's promise.
    let bytes = unsafe { CStr::from_ptr(p) };
    bytes.to_str().map_err(|e| {
        fail(
            RWKV_ERR_INVALID_UTF8,
            format!("{what} is not valid UTF-8 (at byte {} of {})", e.valid_up_to(), bytes.count_bytes()),
        )
    })
}

/// A NUL-terminated path: any bytes on Unix (file names need not be UTF-8
/// there), UTF-8 elsewhere.
///
/// # Safety
/// As `text_arg`.
unsafe fn path_arg<'a>(p: *const c_char, what: &str) -> std::result::Result<&'a Path, Failure> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        if p.is_null() {
            return Err(fail(RWKV_ERR_NULL_ARGUMENT, format!("{what} is NULL")));
        }
        // SAFETY: the caller's promise.
        let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
        Ok(Path::new(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    // SAFETY: the caller's promise.
    unsafe { text_arg(p, what) }.map(Path::new)
}

/// An optional string argument: NULL is `None`.
///
/// # Safety
/// As `text_arg`.
unsafe fn optional_text_arg<'a>(p: *const c_char, what: &str) -> std::result::Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's promise.
    unsafe { text_arg(p, what) }.map(Some)
}

/// `n` elements at `p` (which may be NULL when `n` is 0).
///
/// # Safety
/// `p` points to `n` initialized elements that outlive `'a`, or `n` is 0.
unsafe fn slice_arg<'a, T>(p: *const T, n: usize, what: &str) -> std::result::Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(fail(RWKV_ERR_NULL_ARGUMENT, format!("{what} is NULL with a count of {n}")));
    }
    // SAFETY: the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Writes `value` through a required output pointer.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn write_out<T>(out: *mut T, value: T, what: &str) -> Outcome {
    if out.is_null() {
        return Err(fail(RWKV_ERR_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    // SAFETY: the caller's promise.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `src` to a caller's buffer of `cap` elements (plus a terminating
/// zero when `terminate`) and stores the count (without the terminator) in
/// `*n_out`, which is set even when the buffer is too small.
///
/// # Safety
/// `out` is valid for `cap` writes (or NULL with `cap` 0); `n_out` is NULL
/// or valid for a write.
unsafe fn copy_out<T: Copy + Default>(
    src: &[T],
    terminate: bool,
    out: *mut T,
    cap: usize,
    n_out: *mut usize,
    what: &str,
) -> Outcome {
    // SAFETY: the caller's promise.
    unsafe { write_out(n_out, src.len(), "the count output")? };
    let need = src.len() + usize::from(terminate);
    if cap < need {
        return Err(fail(
            RWKV_ERR_BUFFER_TOO_SMALL,
            format!("{what} needs room for {need} elements, the buffer holds {cap} (the count output has the size)"),
        ));
    }
    if out.is_null() {
        return Err(fail(RWKV_ERR_NULL_ARGUMENT, format!("the {what} buffer is NULL with a capacity of {cap}")));
    }
    // SAFETY: the caller's promise; `need <= cap`.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), out, src.len());
        if terminate {
            out.add(src.len()).write(T::default());
        }
    }
    Ok(())
}

/// Clears an output handle first, so it is NULL on every failure.
///
/// # Safety
/// `out` is NULL or valid for a write.
unsafe fn clear_handle_out<T>(out: *mut *mut T) {
    if !out.is_null() {
        // SAFETY: the caller's promise.
        unsafe { out.write(std::ptr::null_mut()) };
    }
}

// ---------------------------------------------------------------------------
// Library
// ---------------------------------------------------------------------------

/// The library's version, e.g. "0.1.0". Static; thread-safe.
#[no_mangle]
pub extern "C" fn rwkv_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the calling thread's last failed call ("" if none failed).
/// Valid until the next failed call on this thread. Thread-safe (each thread
/// has its own).
#[no_mangle]
pub extern "C" fn rwkv_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of a status ("RWKV_OK", "RWKV_ERR_BUSY", …; "unknown" for a
/// value that is not one). Static; thread-safe.
#[no_mangle]
pub extern "C" fn rwkv_status_name(status: i32) -> *const c_char {
    let name: &'static str = match status {
        0 => "RWKV_OK\0",
        1 => "RWKV_ERR_NULL_ARGUMENT\0",
        2 => "RWKV_ERR_INVALID_HANDLE\0",
        3 => "RWKV_ERR_INVALID_UTF8\0",
        4 => "RWKV_ERR_INVALID_ARGUMENT\0",
        5 => "RWKV_ERR_BUFFER_TOO_SMALL\0",
        6 => "RWKV_ERR_BUSY\0",
        7 => "RWKV_ERR_IO\0",
        8 => "RWKV_ERR_BAD_FILE\0",
        9 => "RWKV_ERR_TOKENIZER\0",
        10 => "RWKV_ERR_NO_DEVICE\0",
        11 => "RWKV_ERR_OUT_OF_MEMORY\0",
        12 => "RWKV_ERR_DEVICE\0",
        13 => "RWKV_ERR_INTERNAL\0",
        _ => "unknown\0",
    };
    name.as_ptr().cast()
}

// ---------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------

/// Opens a GPU device. `adapter` picks one by a substring of its name
/// ("NVIDIA", "llvmpipe") or a backend ("vulkan", "metal", "dx12", "gl");
/// NULL or "" picks the best found (discrete, integrated, virtual, CPU).
/// On success `*out` is the new context, else NULL. Thread-safe.
///
/// # Safety
/// `adapter` is NULL or a NUL-terminated string; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_context_create(adapter: *const c_char, out: *mut *mut rwkv_context) -> rwkv_status {
    guard(|| {
        // SAFETY (this and below): the function's contract.
        unsafe { clear_handle_out(out) };
        let adapter = unsafe { optional_text_arg(adapter, "adapter")? };
        if out.is_null() {
            return Err(fail(RWKV_ERR_NULL_ARGUMENT, "the context output is NULL"));
        }
        let ctx = GpuContext::new(&GpuOptions { adapter: adapter.map(str::to_owned), ..Default::default() })?;
        let key = register(Object::Context(ctx));
        unsafe { write_out(out, key as usize as *mut rwkv_context, "the context output") }
    })
}

/// Writes the adapter's name (e.g. "llvmpipe (LLVM 15.0.7, 256 bits)") as a
/// NUL-terminated string; `*n_out` is its length without the NUL (set even
/// when `cap` is too small). Thread-safe.
///
/// # Safety
/// `out` is valid for `cap` bytes (or NULL with `cap` 0); `n_out` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_context_adapter(
    ctx: *const rwkv_context,
    out: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> rwkv_status {
    guard(|| {
        let name = context(ctx)?.adapter().to_string();
        // SAFETY: the function's contract.
        unsafe { copy_out(name.as_bytes(), true, out.cast::<u8>(), cap, n_out, "the adapter name") }
    })
}

/// Frees a context. Models loaded on it keep the device open until they are
/// freed too. Thread-safe; the handle is invalid afterwards.
///
/// # Safety
/// None beyond passing a handle value (any value is checked).
#[no_mangle]
pub unsafe extern "C" fn rwkv_context_free(ctx: *mut rwkv_context) -> rwkv_status {
    guard(|| unregister(ctx, "context", |o| matches!(o, Object::Context(_))))
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/// The defaults: no quantization, the default prompt chunk. Thread-safe.
#[no_mangle]
pub extern "C" fn rwkv_load_options_default() -> rwkv_load_options {
    rwkv_load_options { quant: std::ptr::null(), chunk_tokens: 0 }
}

/// Loads a model: an RWKV v4–v7 `.safetensors` or `.pth` file, a file
/// written by `rwkv quantize`, or a Hugging Face folder (Llama, Qwen2,
/// GPT-NeoX). `tokenizer` is a `tokenizer.json` or `rwkv_vocab*.txt` path,
/// or "world"; NULL looks beside the model, then uses World for a
/// 65,536-token vocabulary. `opts` may be NULL for the defaults. On success
/// `*out` is the new model, else NULL and `rwkv_last_error()` names the file
/// and what was wrong. Paths (here and for states) are taken as bytes on
/// Unix, UTF-8 elsewhere; texts must be UTF-8. Thread-safe.
///
/// # Safety
/// Strings are NULL or NUL-terminated; `opts` is NULL or points to options;
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_model_load(
    ctx: *const rwkv_context,
    model_path: *const c_char,
    tokenizer: *const c_char,
    opts: *const rwkv_load_options,
    out: *mut *mut rwkv_model,
) -> rwkv_status {
    guard(|| {
        // SAFETY (this and below): the function's contract.
        unsafe { clear_handle_out(out) };
        let gpu = context(ctx)?;
        let path = unsafe { path_arg(model_path, "the model path")? };
        let tokenizer = if tokenizer.is_null() { None } else { Some(unsafe { path_arg(tokenizer, "the tokenizer")? }) };
        let opts = if opts.is_null() { rwkv_load_options_default() } else { unsafe { *opts } };
        let quant = unsafe { optional_text_arg(opts.quant, "the quantization")? }.map(Format::parse).transpose()?;
        if out.is_null() {
            return Err(fail(RWKV_ERR_NULL_ARGUMENT, "the model output is NULL"));
        }
        let chunk_tokens = match opts.chunk_tokens {
            0 => DEFAULT_CHUNK_TOKENS,
            n => n as usize,
        };
        let model = Model::load(&gpu, path, &LoadOptions { quant, ..Default::default() }).map_err(|e| {
            let f = Failure::from(e);
            fail(f.status, format!("loading {}: {}", path.display(), f.message))
        })?;
        let model = Arc::new(model);
        let vocab = model.info().vocab;
        let tokenizer = match tokenizer {
            Some(t) if t.as_os_str().eq_ignore_ascii_case("world") => Tokenizer::world()?,
            Some(t) => Tokenizer::from_file(t)?,
            None => Tokenizer::for_model(None, Some(path), vocab)?,
        };
        tokenizer.check_vocab(vocab)?;
        let tokenizer = Arc::new(tokenizer);
        let batch = BatchThread::spawn(Engine::new(model.clone(), &EngineOptions { chunk_tokens })?)?;
        let entry = ModelEntry { model, tokenizer, batch };
        let key = register(Object::Model(Arc::new(entry)));
        unsafe { write_out(out, key as usize as *mut rwkv_model, "the model output") }
    })
}

/// Frees a model. Its sessions keep it alive until they are freed too.
/// Thread-safe; the handle is invalid afterwards.
///
/// # Safety
/// None beyond passing a handle value (any value is checked).
#[no_mangle]
pub unsafe extern "C" fn rwkv_model_free(model: *mut rwkv_model) -> rwkv_status {
    guard(|| unregister(model, "model", |o| matches!(o, Object::Model(_))))
}

/// Fills `*out` with the model's shape and sizes. Thread-safe.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_model_get_info(model: *const rwkv_model, out: *mut rwkv_model_info) -> rwkv_status {
    guard(|| {
        let entry = self::model(model)?;
        let info = entry.model.info();
        let mut arch = [0 as c_char; 32];
        for (dst, b) in arch.iter_mut().zip(info.arch.to_string().bytes().take(31)) {
            *dst = b as c_char;
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let value = rwkv_model_info {
            arch,
            is_transformer: entry.model.is_transformer(),
            n_layer: count(info.n_layer),
            n_embd: count(info.n_embd),
            n_head: count(info.n_head),
            head_size: count(info.head_size),
            vocab: count(info.vocab),
            parameters: info.parameters,
            gpu_weight_bytes: info.gpu_weight_bytes,
            state_bytes: info.state_bytes_per_sequence,
            kv_bytes_per_token: info.kv_bytes_per_token,
            eos_token: info.eos.first().map_or(-1, |&t| i64::from(t)),
        };
        // SAFETY: the function's contract.
        unsafe { write_out(out, value, "the info output") }
    })
}

/// Tokenizes a NUL-terminated UTF-8 text into `out` (room for `cap` ids);
/// `*n_out` is the number of tokens (set even when `cap` is too small: call
/// with `out` NULL and `cap` 0 to learn the size). Thread-safe.
///
/// # Safety
/// `text` is NUL-terminated; `out` is valid for `cap` writes (or NULL with
/// `cap` 0); `n_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_tokenize(
    model: *const rwkv_model,
    text: *const c_char,
    out: *mut u32,
    cap: usize,
    n_out: *mut usize,
) -> rwkv_status {
    guard(|| {
        let entry = self::model(model)?;
        // SAFETY (this and below): the function's contract.
        let text = unsafe { text_arg(text, "the text")? };
        let tokens = entry.tokenizer.encode(text.as_bytes())?;
        unsafe { copy_out(&tokens, false, out, cap, n_out, "the token ids") }
    })
}

/// Writes the bytes of `n` token ids to `out`, NUL-terminated; `*n_out` is
/// their length without the NUL (set even when `cap` is too small: it needs
/// `*n_out + 1`). The bytes of a few tokens can end inside a UTF-8
/// character; `rwkv_session_generate` hands out whole characters only.
/// Thread-safe.
///
/// # Safety
/// `tokens` points to `n` ids (or is NULL with `n` 0); `out` is valid for
/// `cap` bytes (or NULL with `cap` 0); `n_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_detokenize(
    model: *const rwkv_model,
    tokens: *const u32,
    n: usize,
    out: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> rwkv_status {
    guard(|| {
        let entry = self::model(model)?;
        // SAFETY (this and below): the function's contract.
        let tokens = unsafe { slice_arg(tokens, n, "the token ids")? };
        let bytes = entry.tokenizer.decode(tokens)?;
        unsafe { copy_out(&bytes, true, out.cast::<u8>(), cap, n_out, "the text") }
    })
}

// ---------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------

/// A new session on a model, in the initial (zero) state. Thread-safe.
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_create(model: *const rwkv_model, out: *mut *mut rwkv_session) -> rwkv_status {
    guard(|| {
        // SAFETY (this and below): the function's contract.
        unsafe { clear_handle_out(out) };
        let entry = self::model(model)?;
        if out.is_null() {
            return Err(fail(RWKV_ERR_NULL_ARGUMENT, "the session output is NULL"));
        }
        let s = Session::new(entry.model.clone(), entry.tokenizer.clone())?;
        let key = register(Object::Session(Arc::new(SessionEntry { model: entry, session: Mutex::new(Some(s)) })));
        unsafe { write_out(out, key as usize as *mut rwkv_session, "the session output") }
    })
}

/// A new session that starts where `session` is (its state is copied on the
/// GPU, with its logits): one prompt read once, several continuations.
/// One call at a time per session (else `RWKV_ERR_BUSY`).
///
/// # Safety
/// `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_clone(session: *const rwkv_session, out: *mut *mut rwkv_session) -> rwkv_status {
    guard(|| {
        // SAFETY (this and below): the function's contract.
        unsafe { clear_handle_out(out) };
        let entry = self::session(session)?;
        if out.is_null() {
            return Err(fail(RWKV_ERR_NULL_ARGUMENT, "the session output is NULL"));
        }
        let copy = entry.lock()?.session()?.try_clone()?;
        let copy = SessionEntry { model: entry.model.clone(), session: Mutex::new(Some(copy)) };
        let key = register(Object::Session(Arc::new(copy)));
        unsafe { write_out(out, key as usize as *mut rwkv_session, "the session output") }
    })
}

/// Frees a session (a call in flight on it finishes first). Thread-safe;
/// the handle is invalid afterwards.
///
/// # Safety
/// None beyond passing a handle value (any value is checked).
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_free(session: *mut rwkv_session) -> rwkv_status {
    guard(|| unregister(session, "session", |o| matches!(o, Object::Session(_))))
}

/// Back to the initial state; the logits are gone until something is fed.
/// One call at a time per session (else `RWKV_ERR_BUSY`).
///
/// # Safety
/// None beyond passing a handle value (any value is checked).
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_reset(session: *const rwkv_session) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        let mut held = entry.lock()?;
        Ok(held.session()?.reset()?)
    })
}

/// Tokenizes a NUL-terminated UTF-8 text and reads it into the state;
/// `*n_tokens` (if not NULL) is the number of tokens read. One call at a
/// time per session (else `RWKV_ERR_BUSY`); sessions of one model fed from
/// several threads at once share GPU steps.
///
/// # Safety
/// `text` is NUL-terminated; `n_tokens` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_feed_text(
    session: *const rwkv_session,
    text: *const c_char,
    n_tokens: *mut usize,
) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        // SAFETY (this and below): the function's contract.
        let text = unsafe { text_arg(text, "the text")? };
        let mut held = entry.lock()?;
        let tokens = held.session()?.tokenizer().encode(text.as_bytes())?;
        held.read(&tokens)?;
        let n = tokens.len();
        if !n_tokens.is_null() {
            unsafe { n_tokens.write(n) };
        }
        Ok(())
    })
}

/// Reads `n` token ids into the state (each below the vocabulary size). One
/// call at a time per session (else `RWKV_ERR_BUSY`); sessions of one model
/// fed from several threads at once share GPU steps.
///
/// # Safety
/// `tokens` points to `n` ids (or is NULL with `n` 0).
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_feed_tokens(
    session: *const rwkv_session,
    tokens: *const u32,
    n: usize,
) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        // SAFETY: the function's contract.
        let tokens = unsafe { slice_arg(tokens, n, "the token ids")? };
        let mut held = entry.lock()?;
        held.read(tokens)
    })
}

/// Copies the logits after the last token read (one float per vocabulary
/// entry) to `out`; `*n_out` is their count (set even when `cap` is too
/// small). `RWKV_ERR_INVALID_ARGUMENT` before anything was fed. One call at
/// a time per session (else `RWKV_ERR_BUSY`).
///
/// # Safety
/// `out` is valid for `cap` writes (or NULL with `cap` 0); `n_out` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_logits(
    session: *const rwkv_session,
    out: *mut f32,
    cap: usize,
    n_out: *mut usize,
) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        let mut held = entry.lock()?;
        let logits = held.session()?.logits().ok_or_else(|| {
            fail(RWKV_ERR_INVALID_ARGUMENT, "no logits: nothing has been fed since the session started or was reset")
        })?;
        // SAFETY: the function's contract.
        unsafe { copy_out(logits, false, out, cap, n_out, "the logits") }
    })
}

/// The defaults: 200 tokens, temperature 1, top-p 1 (plain sampling), no
/// penalties, seed 0, no stop texts, stop at the model's end token.
/// Set `temperature` to 0 for greedy decoding. Thread-safe.
#[no_mangle]
pub extern "C" fn rwkv_generate_options_default() -> rwkv_generate_options {
    let s = SamplerConfig::default();
    let g = GenerateOptions::default();
    rwkv_generate_options {
        max_tokens: u32::try_from(g.max_tokens).unwrap_or(u32::MAX),
        temperature: s.temperature,
        top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
        top_p: s.top_p,
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        penalty_decay: s.penalty_decay,
        seed: s.seed,
        stop: std::ptr::null(),
        n_stop: 0,
        ignore_eos: false,
    }
}

/// Generates from the session's logits (feed a prompt first): samples a
/// token, reads it into the state, and passes each printable piece of text
/// to `callback` (may be NULL) until `max_tokens`, the end token, a stop
/// text, or the callback returning nonzero. `opts` may be NULL for the
/// defaults; `result` (may be NULL) receives the count and why it stopped.
/// One call at a time per session (else `RWKV_ERR_BUSY`); sessions of one
/// model generating on several threads at once share GPU steps, each with
/// the tokens it would get alone. The callback runs on this thread; from it,
/// any call works except on this session (`RWKV_ERR_BUSY`).
///
/// # Safety
/// `opts` is NULL or valid, with `stop` pointing to `n_stop` NUL-terminated
/// strings; `callback` is NULL or a function of that signature;
/// `user_data` is passed through untouched; `result` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_generate(
    session: *const rwkv_session,
    opts: *const rwkv_generate_options,
    callback: rwkv_piece_callback,
    user_data: *mut c_void,
    result: *mut rwkv_generation,
) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        // SAFETY (this and below): the function's contract.
        let o = if opts.is_null() { rwkv_generate_options_default() } else { unsafe { *opts } };
        let stops = unsafe { slice_arg(o.stop, o.n_stop, "the stop texts")? };
        let stop = stops
            .iter()
            .enumerate()
            .map(|(i, &p)| unsafe { text_arg(p, &format!("stop text {i}")) }.map(str::to_owned))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let generate = GenerateOptions {
            max_tokens: o.max_tokens as usize,
            stop,
            eos: if o.ignore_eos { EndTokens::Ignore } else { EndTokens::Model },
        };
        let mut sampler = Sampler::new(SamplerConfig {
            temperature: o.temperature,
            top_k: o.top_k as usize,
            top_p: o.top_p,
            min_p: o.min_p,
            presence_penalty: o.presence_penalty,
            frequency_penalty: o.frequency_penalty,
            repetition_penalty: o.repetition_penalty,
            penalty_decay: o.penalty_decay,
            logit_bias: Vec::new(),
            seed: o.seed,
        })?;
        // The loop of `Session::generate`, with each token read on the
        // model's batch thread (sharing steps with other sessions).
        let mut held = entry.lock()?;
        let tokenizer = entry.model.tokenizer.clone();
        let mut decoder = Decoder::new(&generate, &entry.model.model.info().eos);
        let mut piece = Vec::new();
        // Passes a piece to the callback; true when it asks to stop.
        let mut emit = |text: &str| {
            let Some(callback) = callback else { return false };
            piece.clear();
            piece.extend_from_slice(text.as_bytes());
            piece.push(0);
            // SAFETY: the function's contract; `piece` lives through the call.
            unsafe { callback(piece.as_ptr().cast(), text.len(), user_data) != 0 }
        };
        let mut n_tokens = 0u32;
        let stop = if decoder.is_full() {
            StopReason::MaxTokens
        } else {
            loop {
                let logits = held.session()?.logits().ok_or_else(|| {
                    fail(RWKV_ERR_INVALID_ARGUMENT, "nothing has been read yet: feed a prompt before generating")
                })?;
                let token = sampler.sample(logits)?;
                let out = decoder.next(token, &tokenizer);
                if out.stop != Some(StopReason::Eos) {
                    sampler.accept(token);
                    n_tokens = n_tokens.saturating_add(1);
                    held.read(&[token])?;
                }
                let mut stop = out.stop;
                if !out.text.is_empty() && emit(&out.text) && stop.is_none() {
                    stop = Some(StopReason::Cancelled);
                }
                if let Some(stop) = stop {
                    break stop;
                }
            }
        };
        if !result.is_null() {
            let stop_reason = match stop {
                StopReason::MaxTokens => rwkv_stop_reason::RWKV_STOP_MAX_TOKENS,
                StopReason::Eos => rwkv_stop_reason::RWKV_STOP_EOS,
                StopReason::StopSequence(_) => rwkv_stop_reason::RWKV_STOP_TEXT,
                StopReason::Cancelled => rwkv_stop_reason::RWKV_STOP_CANCELLED,
            };
            unsafe { result.write(rwkv_generation { n_tokens, stop_reason }) };
        }
        Ok(())
    })
}

/// Saves the session's state as a safetensors file (never over the model's
/// own file). One call at a time per session (else `RWKV_ERR_BUSY`).
///
/// # Safety
/// `path` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_save_state(session: *const rwkv_session, path: *const c_char) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        // SAFETY: the function's contract.
        let path = unsafe { path_arg(path, "the state path")? };
        let mut held = entry.lock()?;
        Ok(held.session()?.save_state(path)?)
    })
}

/// Replaces the session's state with one saved by `rwkv_session_save_state`
/// (or `rwkv generate --save-state`, or an official state-tuning file); the
/// logits are gone until something is fed. One call at a time per session
/// (else `RWKV_ERR_BUSY`).
///
/// # Safety
/// `path` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn rwkv_session_load_state(session: *const rwkv_session, path: *const c_char) -> rwkv_status {
    guard(|| {
        let entry = self::session(session)?;
        // SAFETY: the function's contract.
        let path = unsafe { path_arg(path, "the state path")? };
        let mut held = entry.lock()?;
        Ok(held.session()?.load_state(path)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        let status = guard(|| panic!("boom {}", 42));
        assert_eq!(status, RWKV_ERR_INTERNAL);
        let msg = unsafe { CStr::from_ptr(rwkv_last_error()) }.to_str().unwrap().to_owned();
        assert!(msg.contains("boom 42"), "{msg}");
    }
}
