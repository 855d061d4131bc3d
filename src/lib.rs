//! rwkv-wgpu: RWKV language models on any GPU through wgpu and WGSL compute
//! shaders.
//!
//! A [`Model`] holds a checkpoint's weights and is shared as `Arc<Model>`;
//! an [`Engine`] runs it (one GPU step over many sequences); a [`Session`]
//! owns one sequence's state; a [`Batcher`] runs many sessions in shared
//! steps. See `ARCHITECTURE.md` for the module graph.
//!
//! ```no_run
//! use std::sync::Arc;
//! use rwkv_wgpu::{Engine, EngineOptions, GpuContext, GpuOptions, LoadOptions, LogitsMode, Model};
//! # fn main() -> rwkv_wgpu::Result<()> {
//! let ctx = GpuContext::new(&GpuOptions::default())?;
//! let model = Arc::new(Model::load(&ctx, "model.safetensors", &LoadOptions::default())?);
//! let mut engine = Engine::new(model.clone(), &EngineOptions::default())?;
//! let mut state = model.new_state(1)?;
//! let logits = engine.forward(&mut state, &[&[510, 4419, 310]], LogitsMode::Last)?;
//! assert_eq!(logits[0].len(), model.info().vocab);
//! # Ok(()) }
//! ```

pub mod batcher;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod loader;
pub mod matrix;
pub mod model;
pub mod ops;
pub mod sampler;
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
pub mod npy;
#[doc(hidden)]
pub mod reference;
#[doc(hidden)]
pub mod synthetic;

pub use batcher::{BatchHandle, BatchThread, Batcher};
pub use engine::{Engine, EngineOptions, SeqInput, DEFAULT_CHUNK_TOKENS};
pub use error::{Error, Result};
pub use gpu::{GpuContext, GpuOptions, KernelPlan};
pub use loader::SafeTensorsFile;
pub use matrix::Matrix;
pub use model::{detect_version, LoadOptions, LogitsMode, Model, ModelInfo, Version};
pub use sampler::{Sampler, SamplerConfig};
pub use session::{GenerateOptions, Generation, Session, StopReason};
pub use state::{State, StateData};
pub use tensor::Dtype;
pub use tokenizer::{TextStream, Tokenizer};
