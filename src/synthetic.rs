//! Synthetic RWKV checkpoints of any generation and shape, with
//! deterministic random weights and the official tensor names, for
//! benchmarks that need no download. Written to a safetensors
//! file tensor by tensor, so a 1.5B-shaped model never sits in RAM whole.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::loader::hf::Family;
use crate::loader::Dtype;
use crate::model::Version;

/// `L12-D768-V65536` (optionally `-F3072` for the FFN width; default 4·D).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub vocab: usize,
    pub ffn: usize,
}

/// The largest synthetic shape: far beyond any published RWKV (the 14B is
/// L61-D5120), small enough that every size computed from it fits a u64.
pub const MAX_SHAPE: Shape = Shape { n_layer: 256, n_embd: 1 << 16, vocab: 1 << 22, ffn: 1 << 18 };

impl FromStr for Shape {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("shape `{s}`: expected e.g. L12-D768-V65536 (optionally -F3072)"));
        let (mut l, mut d, mut v, mut f) = (None, None, None, None);
        for part in s.split('-') {
            let mut chars = part.chars();
            let k = chars.next().map(String::from).unwrap_or_default();
            let n = chars.as_str();
            let n: usize = n.parse().map_err(|_| bad())?;
            match k.as_str() {
                "L" => l = Some(n),
                "D" => d = Some(n),
                "V" => v = Some(n),
                "F" => f = Some(n),
                _ => return Err(bad()),
            }
        }
        let (n_layer, n_embd, vocab) = (l.ok_or_else(bad)?, d.ok_or_else(bad)?, v.ok_or_else(bad)?);
        if n_layer == 0 || vocab == 0 || n_embd == 0 || n_embd % 64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "shape `{s}`: layers and vocab must be > 0 and the width a multiple of 64 (head size)"
            )));
        }
        let ffn = f.unwrap_or(4 * n_embd.min(MAX_SHAPE.n_embd));
        let over = [
            ("layers", n_layer, MAX_SHAPE.n_layer),
            ("width", n_embd, MAX_SHAPE.n_embd),
            ("vocab", vocab, MAX_SHAPE.vocab),
            ("FFN width", ffn, MAX_SHAPE.ffn),
        ]
        .into_iter()
        .find(|&(_, n, max)| n > max || n == 0);
        if let Some((what, n, max)) = over {
            return Err(Error::InvalidArgument(format!("shape `{s}`: {what} {n} is outside 1..={max}")));
        }
        Ok(Shape { n_layer, n_embd, vocab, ffn })
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L{}-D{}-V{}-F{}", self.n_layer, self.n_embd, self.vocab, self.ffn)
    }
}

/// The official RWKV-7 LoRA width formula: max(32, round(k · C^e / 32) · 32).
fn lora(c: usize, k: f64, e: f64) -> usize {
    (((k * (c as f64).powf(e)) / 32.0).round() as usize * 32).max(32)
}

/// How a tensor is filled.
#[derive(Clone, Copy)]
enum Fill {
    Const(f32),
    Uniform(f32, f32),
}

/// The tensors of a v7 checkpoint of `shape`: (name, shape, fill).
fn v7_tensors(s: Shape) -> Vec<(String, Vec<usize>, Fill)> {
    let (c, f, v) = (s.n_embd, s.ffn, s.vocab);
    let h = c / 64;
    let (dw, da, dv, dg) = (lora(c, 1.8, 0.5), lora(c, 1.8, 0.5), lora(c, 1.3, 0.5), lora(c, 0.6, 0.8));
    let sc = 1.0 / (c as f32).sqrt();
    let u = |a: f32| Fill::Uniform(-a, a);
    let mut t = vec![
        ("emb.weight".to_string(), vec![v, c], u(1.0)),
        ("blocks.0.ln0.weight".into(), vec![c], Fill::Const(1.0)),
        ("blocks.0.ln0.bias".into(), vec![c], Fill::Const(0.0)),
    ];
    for l in 0..s.n_layer {
        let p = |n: &str| format!("blocks.{l}.{n}");
        let mix = vec![1, 1, c];
        for n in ["ln1", "ln2"] {
            t.push((p(&format!("{n}.weight")), vec![c], Fill::Const(1.0)));
            t.push((p(&format!("{n}.bias")), vec![c], Fill::Const(0.0)));
        }
        for n in ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"] {
            t.push((p(&format!("att.{n}")), mix.clone(), Fill::Uniform(0.0, 1.0)));
        }
        t.push((p("att.w0"), mix.clone(), Fill::Uniform(-2.0, 0.0)));
        t.push((p("att.w1"), vec![c, dw], u(0.1)));
        t.push((p("att.w2"), vec![dw, c], u(0.1)));
        t.push((p("att.a0"), mix.clone(), u(0.5)));
        t.push((p("att.a1"), vec![c, da], u(0.1)));
        t.push((p("att.a2"), vec![da, c], u(0.1)));
        if l > 0 {
            t.push((p("att.v0"), mix.clone(), u(0.5)));
            t.push((p("att.v1"), vec![c, dv], u(0.1)));
            t.push((p("att.v2"), vec![dv, c], u(0.1)));
        }
        t.push((p("att.g1"), vec![c, dg], u(0.1)));
        t.push((p("att.g2"), vec![dg, c], u(0.1)));
        t.push((p("att.k_k"), mix.clone(), Fill::Uniform(0.7, 1.0)));
        t.push((p("att.k_a"), mix.clone(), Fill::Uniform(0.8, 1.2)));
        t.push((p("att.r_k"), vec![h, 64], u(0.2)));
        for n in ["receptance", "key", "value", "output"] {
            t.push((p(&format!("att.{n}.weight")), vec![c, c], u(sc)));
        }
        t.push((p("att.ln_x.weight"), vec![c], Fill::Const(1.0)));
        t.push((p("att.ln_x.bias"), vec![c], Fill::Const(0.0)));
        t.push((p("ffn.x_k"), mix, Fill::Uniform(0.0, 1.0)));
        t.push((p("ffn.key.weight"), vec![f, c], u(sc)));
        t.push((p("ffn.value.weight"), vec![c, f], u(1.0 / (f as f32).sqrt())));
    }
    t.push(("ln_out.weight".into(), vec![c], Fill::Const(1.0)));
    t.push(("ln_out.bias".into(), vec![c], Fill::Const(0.0)));
    t.push(("head.weight".into(), vec![v, c], u(sc)));
    t
}

/// The tensors of a v4, v5.x or v6 checkpoint of `shape`, as the official
/// code names and shapes them (see the fixtures README).
fn v4_to_v6_tensors(s: Shape, version: Version) -> Vec<(String, Vec<usize>, Fill)> {
    let (c, f, v) = (s.n_embd, s.ffn, s.vocab);
    let h = c / 64;
    let sc = 1.0 / (c as f32).sqrt();
    let u = |a: f32| Fill::Uniform(-a, a);
    let mut t = vec![
        ("emb.weight".to_string(), vec![v, c], u(1.0)),
        ("blocks.0.ln0.weight".into(), vec![c], Fill::Const(1.0)),
        ("blocks.0.ln0.bias".into(), vec![c], Fill::Const(0.0)),
    ];
    // v6's LoRA widths as in the official 0.1B-1.6B checkpoints.
    let (d_mix, d_decay) = (32, 64);
    for l in 0..s.n_layer {
        let p = |n: &str| format!("blocks.{l}.{n}");
        let mix = vec![1, 1, c];
        for n in ["ln1", "ln2"] {
            t.push((p(&format!("{n}.weight")), vec![c], Fill::Const(1.0)));
            t.push((p(&format!("{n}.bias")), vec![c], Fill::Const(0.0)));
        }
        let mut projections = vec!["receptance", "key", "value", "output"];
        match version {
            Version::V4 => {
                t.push((p("att.time_decay"), vec![c], u(1.0)));
                t.push((p("att.time_first"), vec![c], u(1.0)));
                for n in ["k", "v", "r"] {
                    t.push((p(&format!("att.time_mix_{n}")), mix.clone(), Fill::Uniform(0.0, 1.0)));
                }
            }
            Version::V6 => {
                for n in ["x", "w", "k", "v", "r", "g"] {
                    t.push((p(&format!("att.time_maa_{n}")), mix.clone(), Fill::Uniform(0.0, 1.0)));
                }
                t.push((p("att.time_maa_w1"), vec![c, 5 * d_mix], u(0.1)));
                t.push((p("att.time_maa_w2"), vec![5, d_mix, c], u(0.1)));
                t.push((p("att.time_decay"), mix.clone(), Fill::Uniform(-2.0, 0.0)));
                t.push((p("att.time_decay_w1"), vec![c, d_decay], u(0.1)));
                t.push((p("att.time_decay_w2"), vec![d_decay, c], u(0.1)));
                t.push((p("att.time_faaaa"), vec![h, 64], u(0.5)));
                projections.push("gate");
            }
            _ => {
                let gated = version != Version::V5_0;
                let names: &[&str] = if gated { &["k", "v", "r", "g"] } else { &["k", "v", "r"] };
                for n in names {
                    t.push((p(&format!("att.time_mix_{n}")), mix.clone(), Fill::Uniform(0.0, 1.0)));
                }
                if version == Version::V5_2 {
                    t.push((p("att.time_decay"), vec![h, 64], Fill::Uniform(-2.0, 0.0)));
                    t.push((p("att.time_faaaa"), vec![h, 64], u(0.5)));
                } else {
                    t.push((p("att.time_decay"), vec![h], Fill::Uniform(-2.0, 0.0)));
                    t.push((p("att.time_first"), vec![h], u(0.5)));
                }
                if gated {
                    projections.push("gate");
                }
            }
        }
        for n in projections {
            t.push((p(&format!("att.{n}.weight")), vec![c, c], u(sc)));
        }
        if version != Version::V4 {
            t.push((p("att.ln_x.weight"), vec![c], Fill::Const(1.0)));
            t.push((p("att.ln_x.bias"), vec![c], Fill::Const(0.0)));
        }
        let ffn_mix = if version == Version::V6 { "time_maa" } else { "time_mix" };
        for n in ["k", "r"] {
            t.push((p(&format!("ffn.{ffn_mix}_{n}")), mix.clone(), Fill::Uniform(0.0, 1.0)));
        }
        t.push((p("ffn.key.weight"), vec![f, c], u(sc)));
        t.push((p("ffn.receptance.weight"), vec![c, c], u(sc)));
        t.push((p("ffn.value.weight"), vec![c, f], u(1.0 / (f as f32).sqrt())));
    }
    t.push(("ln_out.weight".into(), vec![c], Fill::Const(1.0)));
    t.push(("ln_out.bias".into(), vec![c], Fill::Const(0.0)));
    t.push(("head.weight".into(), vec![v, c], u(sc)));
    t
}

/// A Transformer of Hugging Face's layout: `smollm2-135m`, `pythia-160m`,
/// or `FAMILY-L30-D576-H9-KV3-F1536-V49152[-tied]` with FAMILY `llama`,
/// `qwen2` or `gpt_neox` (KV defaults to H: multi-head attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerShape {
    pub family: Family,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// The head is the embedding (`tie_word_embeddings`).
    pub tied: bool,
}

impl TransformerShape {
    /// SmolLM2-135M: a Llama of 30 layers, hidden 576, 9 heads of 64, 3 KV
    /// heads, FFN 1536, vocab 49152, tied head.
    pub const SMOLLM2_135M: Self = Self {
        family: Family::Llama,
        n_layer: 30,
        hidden: 576,
        n_head: 9,
        n_kv_head: 3,
        ffn: 1536,
        vocab: 49152,
        tied: true,
    };
    /// Pythia-160M: a GPT-NeoX of 12 layers, hidden 768, 12 heads, FFN
    /// 3072, vocab 50304, untied head (the RWKV paper's baseline).
    pub const PYTHIA_160M: Self = Self {
        family: Family::GptNeoX,
        n_layer: 12,
        hidden: 768,
        n_head: 12,
        n_kv_head: 12,
        ffn: 3072,
        vocab: 50304,
        tied: false,
    };

    fn family_name(&self) -> &'static str {
        match self.family {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::GptNeoX => "gpt_neox",
        }
    }

    /// The `config.json` Hugging Face would write for this shape (the rope
    /// and norm settings of SmolLM2 and Pythia).
    pub fn config_json(&self) -> String {
        let common = format!(
            "\"model_type\":\"{}\",\"num_hidden_layers\":{},\"hidden_size\":{},\"num_attention_heads\":{},\
             \"intermediate_size\":{},\"vocab_size\":{},\"tie_word_embeddings\":{},\"eos_token_id\":0",
            self.family_name(),
            self.n_layer,
            self.hidden,
            self.n_head,
            self.ffn,
            self.vocab,
            self.tied
        );
        match self.family {
            Family::GptNeoX => format!(
                "{{{common},\"rotary_pct\":0.25,\"rotary_emb_base\":10000,\"layer_norm_eps\":1e-5,\
                 \"use_parallel_residual\":true,\"max_position_embeddings\":2048}}"
            ),
            _ => format!(
                "{{{common},\"num_key_value_heads\":{},\"rope_theta\":100000.0,\"rms_norm_eps\":1e-5,\
                 \"max_position_embeddings\":8192}}",
                self.n_kv_head
            ),
        }
    }

    /// Its tensors with Hugging Face's names and shapes.
    fn tensors(&self) -> Vec<(String, Vec<usize>, Fill)> {
        let (c, f, v) = (self.hidden, self.ffn, self.vocab);
        let hd = c / self.n_head;
        let (q_dim, kv_dim) = (self.n_head * hd, self.n_kv_head * hd);
        let sc = 1.0 / (c as f32).sqrt();
        let u = |a: f32| Fill::Uniform(-a, a);
        let one = Fill::Const(1.0);
        let zero = Fill::Const(0.0);
        let mut t = Vec::new();
        match self.family {
            Family::Llama | Family::Qwen2 => {
                t.push(("model.embed_tokens.weight".to_string(), vec![v, c], u(1.0)));
                for l in 0..self.n_layer {
                    let p = |n: &str| format!("model.layers.{l}.{n}");
                    t.push((p("input_layernorm.weight"), vec![c], one));
                    t.push((p("post_attention_layernorm.weight"), vec![c], one));
                    for (n, rows) in [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)] {
                        t.push((p(&format!("self_attn.{n}.weight")), vec![rows, c], u(sc)));
                        if self.family == Family::Qwen2 {
                            t.push((p(&format!("self_attn.{n}.bias")), vec![rows], u(0.1)));
                        }
                    }
                    t.push((p("self_attn.o_proj.weight"), vec![c, q_dim], u(1.0 / (q_dim as f32).sqrt())));
                    t.push((p("mlp.gate_proj.weight"), vec![f, c], u(sc)));
                    t.push((p("mlp.up_proj.weight"), vec![f, c], u(sc)));
                    t.push((p("mlp.down_proj.weight"), vec![c, f], u(1.0 / (f as f32).sqrt())));
                }
                t.push(("model.norm.weight".into(), vec![c], one));
                if !self.tied {
                    t.push(("lm_head.weight".into(), vec![v, c], u(sc)));
                }
            }
            Family::GptNeoX => {
                t.push(("gpt_neox.embed_in.weight".to_string(), vec![v, c], u(1.0)));
                for l in 0..self.n_layer {
                    let p = |n: &str| format!("gpt_neox.layers.{l}.{n}");
                    for n in ["input_layernorm", "post_attention_layernorm"] {
                        t.push((p(&format!("{n}.weight")), vec![c], one));
                        t.push((p(&format!("{n}.bias")), vec![c], zero));
                    }
                    t.push((p("attention.query_key_value.weight"), vec![3 * c, c], u(sc)));
                    t.push((p("attention.query_key_value.bias"), vec![3 * c], u(0.1)));
                    t.push((p("attention.dense.weight"), vec![c, c], u(sc)));
                    t.push((p("attention.dense.bias"), vec![c], zero));
                    t.push((p("mlp.dense_h_to_4h.weight"), vec![f, c], u(sc)));
                    t.push((p("mlp.dense_h_to_4h.bias"), vec![f], zero));
                    t.push((p("mlp.dense_4h_to_h.weight"), vec![c, f], u(1.0 / (f as f32).sqrt())));
                    t.push((p("mlp.dense_4h_to_h.bias"), vec![c], zero));
                }
                t.push(("gpt_neox.final_layer_norm.weight".into(), vec![c], one));
                t.push(("gpt_neox.final_layer_norm.bias".into(), vec![c], zero));
                t.push(("embed_out.weight".into(), vec![v, c], u(sc)));
            }
        }
        t
    }
}

impl FromStr for TransformerShape {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "smollm2-135m" => return Ok(Self::SMOLLM2_135M),
            "pythia-160m" => return Ok(Self::PYTHIA_160M),
            _ => {}
        }
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "Transformer shape `{s}`: {why} (expected smollm2-135m, pythia-160m or e.g. \
                 llama-L30-D576-H9-KV3-F1536-V49152-tied)"
            ))
        };
        let mut parts = s.split('-');
        let family = match parts.next().unwrap_or("") {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "gpt_neox" | "gptneox" => Family::GptNeoX,
            other => return Err(bad(&format!("family `{other}` is not llama, qwen2 or gpt_neox"))),
        };
        let (mut l, mut d, mut h, mut kv, mut f, mut v, mut tied) = (None, None, None, None, None, None, false);
        for part in parts {
            if part == "tied" {
                tied = true;
                continue;
            }
            let (key, n) = match part.strip_prefix("KV") {
                Some(n) => ("KV", n),
                None => part.split_at(part.chars().next().map_or(0, char::len_utf8)),
            };
            let n: usize = n.parse().map_err(|_| bad(&format!("`{part}` is not a letter and a number")))?;
            let slot = match key {
                "L" => &mut l,
                "D" => &mut d,
                "H" => &mut h,
                "KV" => &mut kv,
                "F" => &mut f,
                "V" => &mut v,
                _ => return Err(bad(&format!("unknown part `{part}`"))),
            };
            *slot = Some(n);
        }
        let need = |x: Option<usize>, what: &str| x.ok_or_else(|| bad(&format!("no {what}")));
        let shape = Self {
            family,
            n_layer: need(l, "L (layers)")?,
            hidden: need(d, "D (hidden size)")?,
            n_head: need(h, "H (heads)")?,
            n_kv_head: kv.or(h).unwrap_or(0),
            ffn: need(f, "F (FFN width)")?,
            vocab: need(v, "V (vocab)")?,
            tied,
        };
        let limits = [
            ("layers", shape.n_layer, MAX_SHAPE.n_layer),
            ("hidden size", shape.hidden, MAX_SHAPE.n_embd),
            ("heads", shape.n_head, shape.hidden),
            ("KV heads", shape.n_kv_head, shape.n_head),
            ("FFN width", shape.ffn, MAX_SHAPE.ffn),
            ("vocab", shape.vocab, MAX_SHAPE.vocab),
        ];
        if let Some((what, n, max)) = limits.into_iter().find(|&(_, n, max)| n == 0 || n > max) {
            return Err(bad(&format!("{what} {n} is outside 1..={max}")));
        }
        if !shape.hidden.is_multiple_of(shape.n_head) || !shape.n_head.is_multiple_of(shape.n_kv_head) {
            return Err(bad("the hidden size must be a multiple of the heads, and the heads of the KV heads"));
        }
        if family == Family::GptNeoX && shape.n_kv_head != shape.n_head {
            return Err(bad("GPT-NeoX has as many KV heads as heads"));
        }
        Ok(shape)
    }
}

impl std::fmt::Display for TransformerShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-L{}-D{}-H{}", self.family_name(), self.n_layer, self.hidden, self.n_head)?;
        if self.n_kv_head != self.n_head {
            write!(f, "-KV{}", self.n_kv_head)?;
        }
        write!(f, "-F{}-V{}{}", self.ffn, self.vocab, if self.tied { "-tied" } else { "" })
    }
}

/// Writes a synthetic Transformer's weights (Hugging Face names) into an
/// open file (`path` names it in errors); its config is
/// [`TransformerShape::config_json`]. Returns the tensor bytes.
pub fn write_transformer_to(
    file: &std::fs::File,
    path: &Path,
    shape: TransformerShape,
    dtype: Dtype,
    seed: u64,
) -> Result<u64> {
    let metadata = format!("\"format\":\"pt\",\"synthetic\":\"{shape}\"");
    write_tensors(file, path, &metadata, &shape.tensors(), dtype, seed)
}

/// Writes a synthetic RWKV-7 checkpoint; returns its tensor bytes.
pub fn write_v7(path: &Path, shape: Shape, dtype: Dtype, seed: u64) -> Result<u64> {
    write(path, Version::V7, shape, dtype, seed)
}

/// Writes a synthetic checkpoint of any generation; returns its tensor bytes.
pub fn write(path: &Path, version: Version, shape: Shape, dtype: Dtype, seed: u64) -> Result<u64> {
    let io = |source| Error::Io { path: path.to_path_buf(), error: source };
    write_to(&std::fs::File::create(path).map_err(io)?, path, version, shape, dtype, seed)
}

/// As [`write`], into an open file (`path` names it in errors); e.g. an
/// unnamed temporary file that nothing can leave behind.
pub fn write_to(
    file: &std::fs::File,
    path: &Path,
    version: Version,
    shape: Shape,
    dtype: Dtype,
    seed: u64,
) -> Result<u64> {
    let tensors = match version {
        Version::V7 => v7_tensors(shape),
        other => v4_to_v6_tensors(shape, other),
    };
    let metadata = format!("\"rwkv_version\":\"{version}\",\"synthetic\":\"{shape}\"");
    write_tensors(file, path, &metadata, &tensors, dtype, seed)
}

/// Writes `tensors` as safetensors with `metadata` (JSON members) in the
/// header, each filled as it says; returns the tensor bytes.
fn write_tensors(
    file: &std::fs::File,
    path: &Path,
    metadata: &str,
    tensors: &[(String, Vec<usize>, Fill)],
    dtype: Dtype,
    seed: u64,
) -> Result<u64> {
    let dname = match dtype {
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
    };
    let mut header = format!("{{\"__metadata__\":{{{metadata}}}");
    let mut offset = 0usize;
    for (name, dims, _) in tensors {
        let bytes = dims.iter().product::<usize>() * dtype.size();
        let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{dname}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            dims.join(","),
            offset + bytes
        ));
        offset += bytes;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let io = |source| Error::Io { path: path.to_path_buf(), error: source };
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut rng = seed ^ 0x5EED;
    let mut buf = Vec::new();
    for (_, dims, fill) in tensors {
        let n: usize = dims.iter().product();
        buf.clear();
        for _ in 0..n {
            let x = match *fill {
                Fill::Const(c) => c,
                Fill::Uniform(a, b) => {
                    rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = rng;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    a + (b - a) * ((z >> 40) as f32 / (1u64 << 24) as f32)
                }
            };
            match dtype {
                Dtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                Dtype::F16 => buf.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                Dtype::BF16 => buf.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            }
        }
        w.write_all(&buf).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(offset as u64)
}
