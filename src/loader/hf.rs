//! Hugging Face model folders, as `save_pretrained` writes them: a
//! `config.json`, `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, and usually a `tokenizer.json`. The
//! config is read in both key styles that checkpoints use: the older
//! `rope_theta` / `rope_scaling` / `rotary_pct` / `rotary_emb_base` and
//! transformers 5's `rope_parameters` block. Families: `llama`, `qwen2`,
//! `gpt_neox`; any other `model_type` is an error naming it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::loader::SafeTensorsFile;
use crate::tensor::Tensor;

/// Largest config.json or index read: real ones are a few KiB (an index of
/// a 70B model ~70 KiB); refusing more bounds the parser's memory.
pub const MAX_JSON_BYTES: usize = 16 << 20;

/// Largest dimension accepted from a config (widths, vocabularies, layers):
/// far beyond any published model, small enough that products fit a u64.
pub const MAX_CONFIG_DIM: usize = 1 << 24;

/// The model families the Transformer baseline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3.x, SmolLM2, TinyLlama: RMSNorm, SwiGLU, no biases.
    Llama,
    /// Qwen2/2.5: as Llama, with q/k/v biases.
    Qwen2,
    /// GPT-NeoX (Pythia): LayerNorm with bias, fused `query_key_value`,
    /// partial rotary, parallel or sequential residual, exact GELU.
    GptNeoX,
}

/// How RoPE's frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3's wavelength-dependent scaling (`rope_type: llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: usize,
    },
}

/// Rotary position embedding, as the config says.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Channels of each head that rotate (`partial_rotary_factor` /
    /// `rotary_pct` × head_dim; all of them for Llama and Qwen2), even.
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

/// A decoder-only Transformer's config, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub family: Family,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// RMSNorm (Llama, Qwen2) or LayerNorm (GPT-NeoX) epsilon.
    pub norm_eps: f64,
    pub rope: Rope,
    /// The head is the embedding (`lm_head.weight` absent).
    pub tied: bool,
    /// GPT-NeoX: attention and MLP read the same input (true), or run one
    /// after the other (false). Always false for Llama and Qwen2.
    pub parallel_residual: bool,
    /// Tokens that end generation (`eos_token_id`: one id or a list).
    pub eos: Vec<u32>,
    pub max_positions: usize,
}

/// The keys read from config.json; the rest are ignored, as transformers does.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    num_hidden_layers: Option<u64>,
    hidden_size: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    intermediate_size: Option<u64>,
    vocab_size: Option<u64>,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    use_parallel_residual: Option<bool>,
    eos_token_id: Option<Value>,
    max_position_embeddings: Option<u64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rotary_pct: Option<f64>,
    rotary_emb_base: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<Value>,
}

fn bad(path: &Path, detail: String) -> Error {
    Error::BadConfig { path: path.to_path_buf(), detail }
}

impl TransformerConfig {
    /// Reads `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_regular(path)?;
        Self::parse(&bytes, path)
    }

    /// Parses config.json's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        if bytes.len() > MAX_JSON_BYTES {
            return Err(bad(path, format!("{} bytes, more than the {MAX_JSON_BYTES} a config may have", bytes.len())));
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| bad(path, format!("not a config: {e}")))?;
        let family = match raw.model_type.as_deref() {
            Some("llama") => Family::Llama,
            Some("qwen2") => Family::Qwen2,
            Some("gpt_neox") => Family::GptNeoX,
            Some(other) => {
                return Err(bad(path, format!("model_type `{other}` is not supported (llama, qwen2 and gpt_neox are)")))
            }
            None => return Err(bad(path, "no model_type".into())),
        };
        let dim = |name: &str, v: Option<u64>| -> Result<usize> {
            let v = v.ok_or_else(|| bad(path, format!("no {name}")))?;
            if v == 0 || v > MAX_CONFIG_DIM as u64 {
                return Err(bad(path, format!("{name} {v} is outside 1..={MAX_CONFIG_DIM}")));
            }
            Ok(v as usize)
        };
        let n_layer = dim("num_hidden_layers", raw.num_hidden_layers)?;
        let hidden = dim("hidden_size", raw.hidden_size)?;
        let n_head = dim("num_attention_heads", raw.num_attention_heads)?;
        let n_kv_head = match raw.num_key_value_heads {
            Some(n) => dim("num_key_value_heads", Some(n))?,
            None => n_head,
        };
        let head_dim = match raw.head_dim {
            Some(d) => dim("head_dim", Some(d))?,
            None if hidden.is_multiple_of(n_head) => hidden / n_head,
            None => return Err(bad(path, format!("hidden_size {hidden} is not a multiple of {n_head} heads"))),
        };
        if !n_head.is_multiple_of(n_kv_head) {
            return Err(bad(
                path,
                format!("{n_head} attention heads are not a multiple of {n_kv_head} key/value heads"),
            ));
        }
        let ffn = dim("intermediate_size", raw.intermediate_size)?;
        let vocab = dim("vocab_size", raw.vocab_size)?;
        let norm_eps = match family {
            Family::GptNeoX => raw.layer_norm_eps.unwrap_or(1e-5),
            _ => raw.rms_norm_eps.unwrap_or(1e-6),
        };
        if !(norm_eps.is_finite() && norm_eps > 0.0) {
            return Err(bad(path, format!("norm epsilon {norm_eps} is not a positive number")));
        }
        let rope = rope(&raw, family, head_dim, path)?;
        let eos = match &raw.eos_token_id {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Number(n)) => vec![token_id(n, path)?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Number(n) => token_id(n, path),
                    other => Err(bad(path, format!("eos_token_id entry {other} is not a token id"))),
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(bad(path, format!("eos_token_id {other} is not a token id or a list"))),
        };
        let max_positions = match raw.max_position_embeddings {
            Some(n) => dim("max_position_embeddings", Some(n))?,
            None => 2048,
        };
        Ok(Self {
            family,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            norm_eps,
            rope,
            tied: raw.tie_word_embeddings.unwrap_or(false),
            parallel_residual: family == Family::GptNeoX && raw.use_parallel_residual.unwrap_or(true),
            eos,
            max_positions,
        })
    }
}

fn token_id(n: &serde_json::Number, path: &Path) -> Result<u32> {
    n.as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad(path, format!("eos_token_id {n} is not a token id")))
}

/// RoPE from either key style: transformers 5's `rope_parameters`
/// (`rope_theta`, `rope_type`, `partial_rotary_factor` and the llama3
/// factors) or the older top-level `rope_theta` / `rope_scaling` (Llama,
/// Qwen2) and `rotary_emb_base` / `rotary_pct` (GPT-NeoX).
fn rope(raw: &Raw, family: Family, head_dim: usize, path: &Path) -> Result<Rope> {
    let params = match &raw.rope_parameters {
        Some(Value::Object(m)) => Some(m.clone()),
        None | Some(Value::Null) => None,
        Some(other) => return Err(bad(path, format!("rope_parameters {other} is not an object"))),
    };
    let scaling_obj = match &raw.rope_scaling {
        Some(Value::Object(m)) => Some(m.clone()),
        None | Some(Value::Null) => None,
        Some(other) => return Err(bad(path, format!("rope_scaling {other} is not an object"))),
    };
    // Where the rope_type and its factors are: rope_parameters, else rope_scaling.
    let block = params.as_ref().or(scaling_obj.as_ref());
    let num =
        |m: Option<&serde_json::Map<String, Value>>, key: &str| m.and_then(|m| m.get(key)).and_then(Value::as_f64);
    let default_theta = if family == Family::GptNeoX { raw.rotary_emb_base } else { None };
    let theta = num(params.as_ref(), "rope_theta").or(raw.rope_theta).or(default_theta).unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 1.0) {
        return Err(bad(path, format!("rope theta {theta} is not a number above 1")));
    }
    let fraction = num(params.as_ref(), "partial_rotary_factor")
        .or(raw.partial_rotary_factor)
        .or(if family == Family::GptNeoX { raw.rotary_pct } else { None })
        .unwrap_or(1.0);
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(bad(path, format!("rotary fraction {fraction} is outside (0, 1]")));
    }
    // transformers: int(head_dim * partial_rotary_factor).
    let rotary_dim = (head_dim as f64 * fraction) as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(bad(path, format!("{rotary_dim} rotary channels of {head_dim}: must be a positive even number")));
    }
    let rope_type =
        block.and_then(|m| m.get("rope_type").or_else(|| m.get("type"))).and_then(Value::as_str).unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "llama3" => {
            let f = |key: &str| {
                num(block, key)
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| bad(path, format!("llama3 rope scaling without a positive {key}")))
            };
            let original = f("original_max_position_embeddings")?;
            if original > MAX_CONFIG_DIM as f64 {
                return Err(bad(path, format!("original_max_position_embeddings {original} is too large")));
            }
            RopeScaling::Llama3 {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position: original as usize,
            }
        }
        other => return Err(bad(path, format!("rope_type `{other}` is not supported (default and llama3 are)"))),
    };
    Ok(Rope { theta, rotary_dim, scaling })
}

impl Rope {
    /// The inverse frequencies `1 / theta^(2i / rotary_dim)` for i below
    /// rotary_dim / 2, in f32 as transformers computes them (its rotary
    /// angles are f32 even in an f64 model), with Llama 3's scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.rotary_dim;
        let base = self.theta as f32;
        let mut f: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
        if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } = self.scaling {
            let (factor, low, high, old) =
                (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position as f32);
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            for v in f.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *v;
                *v = if wavelen > low_wavelen {
                    *v / factor
                } else if wavelen < high_wavelen {
                    *v
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * *v / factor + smooth * *v
                };
            }
        }
        f
    }
}

/// A folder's weights: one `model.safetensors`, or the shards that
/// `model.safetensors.index.json` maps each tensor name to.
pub struct HfWeights {
    files: Vec<SafeTensorsFile>,
    /// Tensor name -> index into `files`.
    names: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl HfWeights {
    /// Opens the weights of the folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let bytes = crate::files::read_regular(&index)?;
            return Self::from_index(&bytes, &index, dir, |p| SafeTensorsFile::open(p));
        }
        Ok(Self::single(SafeTensorsFile::open(dir.join("model.safetensors"))?))
    }

    /// The shards an index lists, opened with `open`; each tensor the index
    /// names must be in the shard it names, and shard names must be plain
    /// file names in the folder.
    pub fn from_index(
        bytes: &[u8],
        index: &Path,
        dir: &Path,
        mut open: impl FnMut(&Path) -> Result<SafeTensorsFile>,
    ) -> Result<Self> {
        if bytes.len() > MAX_JSON_BYTES {
            return Err(bad(index, format!("{} bytes, more than the {MAX_JSON_BYTES} an index may have", bytes.len())));
        }
        let idx: Index = serde_json::from_slice(bytes).map_err(|e| bad(index, format!("not a shard index: {e}")))?;
        let mut shards: Vec<&String> = idx.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let mut files = Vec::new();
        let mut file_of: HashMap<&str, usize> = HashMap::new();
        for shard in shards {
            let plain = Path::new(shard).file_name().is_some_and(|n| n == shard.as_str());
            if !plain || !shard.ends_with(".safetensors") {
                return Err(bad(index, format!("shard `{shard}` is not a .safetensors file in the folder")));
            }
            file_of.insert(shard, files.len());
            files.push(open(&dir.join(shard))?);
        }
        let mut names = HashMap::new();
        for (name, shard) in &idx.weight_map {
            let i = file_of[shard.as_str()];
            if !files[i].contains(name) {
                return Err(bad(index, format!("tensor `{name}` is not in its shard {shard}")));
            }
            names.insert(name.clone(), i);
        }
        Ok(Self { files, names })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// A tensor of any shape, from whichever shard holds it.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        let i = *self.names.get(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        self.files[i].get(name)
    }

    /// Lets the OS drop the file pages of a tensor read from these files.
    pub fn release(&self, t: &Tensor) {
        if let Some(&i) = self.names.get(t.name) {
            self.files[i].release(t);
        }
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Result<&SafeTensorsFile> {
        let i = *self.names.get(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        Ok(&self.files[i])
    }

    /// The weights of one file (an RWKV checkpoint).
    pub fn single(file: SafeTensorsFile) -> Self {
        let names = file.names().map(|n| (n.to_string(), 0)).collect();
        Self { files: vec![file], names }
    }

    /// The shard files, for their paths and sizes.
    pub fn files(&self) -> &[SafeTensorsFile] {
        &self.files
    }
}

/// A Hugging Face model folder: its config and weights (the tokenizer is
/// read by `Tokenizer::for_model`, which looks next to the model).
pub struct HfFolder {
    pub dir: PathBuf,
    pub config: TransformerConfig,
    pub weights: HfWeights,
}

impl HfFolder {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            let detail = "a directory, not a regular file, and no config.json in it: \
                          not a Hugging Face model folder either";
            return Err(bad(dir, detail.to_string()));
        }
        let config = TransformerConfig::load(&config_path)?;
        let weights = HfWeights::open(dir)?;
        Ok(Self { dir: dir.to_path_buf(), config, weights })
    }
}
