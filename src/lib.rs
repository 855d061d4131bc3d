//! rwkv-wgpu: RWKV language models on any GPU through wgpu and WGSL compute
//! shaders.
//!
//! A [`Model`] holds a checkpoint's weights and is shared as `Arc<Model>`;
//! an [`Engine`] runs it (one GPU step over many sequences); a [`Session`]
//! owns one sequence's state; a [`Batcher`] runs many sessions in shared
//! steps. See `ARCHITECTURE.md` for the module graph.
//!
//! ```no_run
//! # fn main() -> rwkv_wgpu::Result<()> {
//! use std::sync::Arc;
//! use rwkv_wgpu::{Batcher, Engine, EngineOptions, GenerateOptions, GpuContext, GpuOptions, LoadOptions, LogitsMode};
//! use rwkv_wgpu::{Model, Sampler, SamplerConfig, Session, Tokenizer};
//!
//! let ctx = GpuContext::new(&GpuOptions::default())?;
//! // The weights, loaded once and shared by every engine and session, on any thread.
//! let model = Arc::new(Model::load(&ctx, "rwkv7-world-0.1b.safetensors", &LoadOptions::default())?);
//! let tokenizer = Arc::new(Tokenizer::world()?);
//! // What running the model takes (per-step buffers); one per thread that runs steps.
//! let mut engine = Engine::new(model.clone(), &EngineOptions::default())?;
//!
//! // Text in, text out: a session owns one sequence's state.
//! let mut session = Session::new(model.clone(), tokenizer.clone())?;
//! session.feed_text(&mut engine, b"The Eiffel Tower is in")?;
//! let mut sampler = Sampler::new(SamplerConfig { temperature: 1.0, top_p: 0.9, seed: 42, ..Default::default() })?;
//! let out = session.generate(&mut engine, &mut sampler, &GenerateOptions::default(), |text| {
//!     print!("{text}");
//!     std::ops::ControlFlow::Continue(()) // Break(()) stops generating
//! })?;
//!
//! // Two sessions on the same model, driven in shared GPU steps (continuous batching:
//! // sessions may join or leave between any two steps; each gets the logits it would alone).
//! let mut batcher = Batcher::new(engine);
//! let mut a = Session::new(model.clone(), tokenizer.clone())?;
//! let mut b = Session::new(model.clone(), tokenizer.clone())?;
//! a.push_text(b"The capital of France is")?;
//! b.push_text(b"Once upon a time")?;
//! batcher.run(&mut [&mut a, &mut b])?; // both prompts read in the same steps
//! let mut greedy = Sampler::new(SamplerConfig::greedy())?;
//! for s in [&mut a, &mut b] {
//!     let next = greedy.sample(s.logits().unwrap())?;
//!     s.push(&[next])?;
//! }
//! batcher.step(&mut [&mut a, &mut b])?; // one step decodes both
//!
//! // Or logits for a batch of sequences of different lengths in one state; the state lives
//! // on the GPU and can be read, written, reset, cloned, saved and loaded.
//! let mut state = model.new_state(2)?;
//! let logits = batcher.engine().forward(&mut state, &[&[1, 2, 3], &[4]], LogitsMode::Last)?;
//! # let _ = (out, logits);
//! # Ok(()) }
//! ```

pub mod batcher;
pub mod capi;
pub mod chat;
pub mod engine;
pub mod error;
pub mod files;
pub mod gpu;
pub mod loader;
pub mod matrix;
pub mod model;
pub mod openai;
pub mod ops;
pub mod quant;
pub mod sampler;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod state;
pub mod tensor;
pub mod tokenizer;

// Test and benchmark support, not part of the stable API: the f64 CPU
// reference the tests check the GPU against, random checkpoints of any
// shape, .npy output and the benchmark driver behind `rwkv bench` and
// `cargo bench`. Public because integration tests, benches and the binary
// are separate crates; hidden from the docs because they may change freely.
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod compare;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod npy;
#[doc(hidden)]
pub mod reference;
#[doc(hidden)]
pub mod synthetic;

pub use batcher::{BatchHandle, BatchThread, Batcher};
pub use engine::{Engine, EngineOptions, SeqInput, DEFAULT_CHUNK_TOKENS};
pub use error::{Error, Result};
pub use gpu::kernels::KvDtype;
pub use gpu::{GpuContext, GpuOptions, KernelPlan};
pub use loader::SafeTensorsFile;
pub use matrix::Matrix;
pub use model::{detect_version, Arch, Family, LoadOptions, LogitsMode, Model, ModelInfo, Version};
pub use sampler::{logprob, Sampler, SamplerConfig, TokenLogprob};
pub use session::{Decoded, Decoder, EndTokens, GenerateOptions, Generation, Session, StopReason};
pub use state::{State, StateData};
pub use tensor::Dtype;
pub use tokenizer::{TextStream, Tokenizer};
