//! One error type for the library. Every variant names what was wrong:
//! the file, the tensor, the expected and the found shape or dtype.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message, not a separate source, so a
    /// printed chain does not repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error("{path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },

    #[error("{output} is the same file as the input {input}: refusing to overwrite an input")]
    SameFile { output: PathBuf, input: PathBuf },

    #[error("{path} exists (use --force to replace it)")]
    OutputExists { path: PathBuf },

    #[error("{path}: {detail}")]
    BadConfig { path: PathBuf, detail: String },

    #[error("state file {path}: {detail}")]
    BadState { path: PathBuf, detail: String },

    #[error("{path} is truncated: {detail}")]
    TruncatedFile { path: PathBuf, detail: String },

    #[error("{path} has a bad safetensors header: {detail}")]
    BadHeader { path: PathBuf, detail: String },

    #[error("{path} is not a readable PyTorch checkpoint: {detail}")]
    BadPth { path: PathBuf, detail: String },

    #[error("{path} is not an RWKV checkpoint: {detail}")]
    NotRwkv { path: PathBuf, detail: String },

    #[error("missing tensor `{name}`")]
    MissingTensor { name: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("tensor `{name}`: dtype {dtype} is not supported (expected F32, F16 or BF16)")]
    UnsupportedDtype { name: String, dtype: String },

    #[error("unsupported model shape: {0}")]
    UnsupportedShape(String),

    #[error("token id {token} at position {position} of sequence {sequence} is out of range (vocab {vocab})")]
    BadToken { sequence: usize, position: usize, token: u32, vocab: usize },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("no GPU adapter found{0}")]
    NoAdapter(String),

    #[error("cannot open a device on adapter `{adapter}`: {detail}")]
    RequestDevice { adapter: String, detail: String },

    #[error("GPU out of memory while allocating {what} ({bytes} bytes)")]
    OutOfMemory { what: String, bytes: u64 },

    /// An allocation that would pass `GpuOptions::memory_limit`.
    #[error("GPU memory limit: {what} needs {bytes} bytes with {allocated} already allocated, over the limit of {limit} bytes")]
    MemoryLimit { what: String, bytes: u64, allocated: u64, limit: u64 },

    /// A Transformer's KV cache cannot hold the context.
    #[error("a context of {tokens} tokens does not fit: {why}; at most {fits} tokens fit")]
    ContextTooLong { tokens: usize, fits: usize, why: String },

    #[error("batch thread: {0}")]
    Thread(String),

    #[error("GPU device lost: {0}")]
    DeviceLost(String),

    #[error("GPU error: {0}")]
    Gpu(String),
}
