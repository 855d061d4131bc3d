//! What a model is, as plain values: its generation and its dimensions.
//! A leaf of the model module: loading, the step, each generation and the
//! engine read these without depending on each other.

use std::fmt;

use crate::error::{Error, Result};
pub use crate::loader::hf::Family;
use crate::quant::{Encoding, Format};
use crate::tensor::Dtype;

/// RWKV generations, as ChatRWKV tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5_0,
    V5_1,
    V5_2,
    V6,
    V7,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V4 => "4",
            Version::V5_0 => "5.0",
            Version::V5_1 => "5.1",
            Version::V5_2 => "5.2",
            Version::V6 => "6",
            Version::V7 => "7",
        })
    }
}

impl std::str::FromStr for Version {
    type Err = Error;
    /// "4", "5.0", "5.1", "5.2", "6" or "7" (a leading `v` is allowed).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim_start_matches(['v', 'V']) {
            "4" => Version::V4,
            "5.0" => Version::V5_0,
            "5.1" => Version::V5_1,
            "5" | "5.2" => Version::V5_2,
            "6" => Version::V6,
            "7" => Version::V7,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "RWKV version `{other}`: expected 4, 5.0, 5.1, 5.2, 6 or 7"
                )))
            }
        })
    }
}

/// What kind of model: an RWKV generation or a Transformer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Rwkv(Version),
    Transformer(Family),
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::Rwkv(v) => write!(f, "RWKV-{v}"),
            Arch::Transformer(Family::Llama) => f.write_str("Llama"),
            Arch::Transformer(Family::Qwen2) => f.write_str("Qwen2"),
            Arch::Transformer(Family::GptNeoX) => f.write_str("GPT-NeoX"),
        }
    }
}

/// Called as weights are uploaded with (bytes done, bytes in all).
pub type Progress = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Dimensions and sizes, derived from the tensor shapes.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub head_size: usize,
    /// A Transformer's key/value heads (grouped-query attention); 0 for RWKV.
    pub n_kv_head: usize,
    pub vocab: usize,
    pub ffn: usize,
    /// Named LoRA widths (v7: decay, aaa, mv, gate).
    pub lora: Vec<(&'static str, usize)>,
    pub dtype: Dtype,
    pub parameters: u64,
    /// Bytes of the checkpoint's weights, as stored in the file.
    pub weight_bytes: u64,
    /// GPU bytes of the uploaded weights (all but the embedding, which is
    /// read from the file; LoRAs may be padded for the adapter's kernels).
    pub gpu_weight_bytes: u64,
    /// The format the matrices were quantized to at load, if any.
    pub quant: Option<Format>,
    /// GPU bytes of the weight matrices by encoding (with `quant`, a matrix
    /// whose columns no block divides stays in the checkpoint's floats).
    pub matrix_bytes: Vec<(Encoding, u64)>,
    /// RWKV: the whole state. A Transformer: 0 (see `kv_bytes_per_token`).
    pub state_bytes_per_sequence: u64,
    /// A Transformer's KV cache bytes per token of context (all layers); 0 for RWKV.
    pub kv_bytes_per_token: u64,
    /// Tokens that end generation: a Transformer's `eos_token_id` (one or
    /// several; none if the config names none), RWKV's end of text `[0]`.
    pub eos: Vec<u32>,
}

impl ModelInfo {
    /// The RWKV generation, if this is an RWKV model.
    pub fn version(&self) -> Option<Version> {
        match self.arch {
            Arch::Rwkv(v) => Some(v),
            Arch::Transformer(_) => None,
        }
    }
}
