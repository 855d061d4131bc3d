//! rwkv-wgpu: RWKV language models on any GPU through wgpu and WGSL compute
//! shaders.
//!
//! ```no_run
//! use rwkv_wgpu::{GpuContext, GpuOptions, LoadOptions, LogitsMode, Model};
//! # fn main() -> rwkv_wgpu::Result<()> {
//! let ctx = GpuContext::new(&GpuOptions::default())?;
//! let mut model = Model::load(&ctx, "model.safetensors", &LoadOptions::default())?;
//! let mut state = model.new_state(1)?;
//! let logits = model.forward(&mut state, &[&[510, 4419, 310]], LogitsMode::Last)?;
//! assert_eq!(logits[0].len(), model.info().vocab);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod error;
pub mod gpu;
pub mod loader;
pub mod matrix;
pub mod model;
pub mod npy;
pub mod pth;
pub mod reference;
pub mod sampler;
pub mod session;
pub mod state;
pub mod synthetic;
pub mod tokenizer;

pub use error::{Error, Result};
pub use gpu::{GpuContext, GpuOptions};
pub use loader::{Dtype, SafeTensorsFile};
pub use matrix::Matrix;
pub use model::{detect_version, LoadOptions, LogitsMode, Model, ModelInfo, Version};
pub use sampler::{Sampler, SamplerConfig};
pub use session::{GenerateOptions, Generation, Session, StopReason};
pub use state::{State, StateData};
pub use tokenizer::{TextStream, Tokenizer};
