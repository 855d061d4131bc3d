//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run with
//! cargo-fuzz) and of their corpus replay under plain `cargo test`
//! (`tests/fuzz_corpus.rs`): each parses untrusted bytes the way a command
//! does and uses what it got. None may panic or abort; every failure must be
//! a typed `Error`. Memory is bounded by the parsers' named limits (the
//! fuzzer runs with `-rss_limit_mb=512 -malloc_limit_mb=512`).

use crate::error::Error;
use crate::loader::{pth, SafeTensorsFile};
use crate::state::{StateData, StateLayout};
use crate::tokenizer::{HfTokenizer, Tokenizer, WorldTokenizer};

/// Reads every tensor of a parsed checkpoint as a loader would (shapes,
/// dtypes, values), and its generation.
fn use_checkpoint(f: &SafeTensorsFile) {
    let _ = crate::model::detect_version(f);
    let mut names: Vec<String> = f.names().map(String::from).collect();
    names.sort();
    for n in names {
        let _ = f.shape(&n);
        if let Ok(t) = f.get(&n) {
            // Element count and bytes agree (the parser checked them).
            assert_eq!(t.bytes.len(), t.len() * t.dtype.size(), "tensor {n}");
            let _ = t.to_f32();
        }
    }
}

/// A safetensors header and tensor table (or anything else a `--model`
/// file could hold).
pub fn safetensors(data: &[u8]) {
    if let Ok(f) = SafeTensorsFile::from_vec("fuzz.safetensors", data.to_vec()) {
        use_checkpoint(&f);
    }
}

/// A PyTorch `.pth`: the zip directory and the pickle.
pub fn pth(data: &[u8]) {
    let _ = pth::index(data);
    if let Ok(f) = SafeTensorsFile::from_vec("fuzz.pth", data.to_vec()) {
        use_checkpoint(&f);
    }
}

/// A pre-quantized checkpoint (`rwkv quantize`): its metadata's format and
/// version, then every quantized matrix's scheme, codes and scales read into
/// the kernels' row layout, as `BlockLoader::mat` does.
pub fn quant_file(data: &[u8]) {
    let Ok(f) = SafeTensorsFile::from_vec("fuzz.safetensors", data.to_vec()) else { return };
    let Ok(Some(format)) = crate::quant::file_format(f.metadata()) else { return };
    let mut names: Vec<String> = f.names().filter(|n| !n.ends_with(".scales")).map(String::from).collect();
    names.sort();
    for name in names {
        let (Some(codes), Some(scales)) = (f.shape(&name), f.shape(&format!("{name}.scales"))) else { continue };
        let [rows, code_cols] = codes[..] else { continue };
        let cols = code_cols * 8 / format.bits();
        let Ok(scheme) = crate::quant::file_scheme(format, &name, rows, cols, scales) else { continue };
        let (Ok(c), Ok(s)) = (f.expect_u8(&name, &[rows, code_cols]), f.get(&format!("{name}.scales"))) else {
            continue;
        };
        if let Ok(rows) = crate::quant::gpu_rows_from_parts(scheme, rows, cols, c, s.bytes) {
            assert_eq!(rows.len(), codes[0] * crate::quant::Encoding::Blocks(scheme).row_bytes(cols));
        }
    }
}

/// A World vocab (`rwkv_vocab*.txt`), then the tokenizer used on its own text.
pub fn world_vocab(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(w) = WorldTokenizer::parse(text) {
        let tok = Tokenizer::World(w);
        if let Ok(ids) = tok.encode(data) {
            let _ = tok.decode(&ids);
        }
    }
}

/// A Hugging Face `tokenizer.json`, then the tokenizer used on its own text.
pub fn tokenizer_json(data: &[u8]) {
    if let Ok(h) = HfTokenizer::from_bytes(data, "fuzz tokenizer.json") {
        let tok = Tokenizer::Hf(h);
        let sample = &data[..data.len().min(256)];
        if let Ok(ids) = tok.encode(sample) {
            let _ = tok.decode(&ids);
        }
    }
}

/// A state file: a saved state, and an official state-tuning file for a
/// small RWKV-7 layout (2 layers, 2 heads of 4).
pub fn state_file(data: &[u8]) {
    let Ok(f) = SafeTensorsFile::from_vec("fuzz-state.safetensors", data.to_vec()) else { return };
    let layout =
        StateLayout::new(2, &[("att_x", vec![8], 0.0), ("ffn_x", vec![8], 0.0), ("att_kv", vec![2, 4, 4], 0.0)]);
    for layout in [layout.clone(), layout.transposed("att_kv")] {
        if let Ok(s) = crate::state::load_from(&f, &layout) {
            check_finite(&s);
        }
        if let Ok(s) = crate::state::load_tuned_from(&f, &layout) {
            check_finite(&s);
        }
    }
}

/// What the state loaders promise: every value finite.
fn check_finite(s: &StateData) {
    for (name, _, v) in &s.fields {
        assert!(v.iter().all(|x| x.is_finite()), "state field {name} holds a non-finite value");
    }
}

/// A Hugging Face `config.json`, and the same bytes as a shard index
/// (`model.safetensors.index.json`; no shard is opened).
pub fn hf_config(data: &[u8]) {
    use crate::loader::hf::{HfWeights, TransformerConfig};
    use std::path::Path;
    if let Ok(c) = TransformerConfig::parse(data, Path::new("config.json")) {
        let _ = c.rope.inv_freq();
    }
    let no_shards = |p: &Path| Err(Error::MissingTensor { name: p.display().to_string() });
    let _ = HfWeights::from_index(data, Path::new("index.json"), Path::new("."), no_shards);
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 8] = [
    ("quant_file", quant_file),
    ("safetensors", safetensors),
    ("pth", pth),
    ("world_vocab", world_vocab),
    ("tokenizer_json", tokenizer_json),
    ("state_file", state_file),
    ("hf_config", hf_config),
    ("openai_request", openai_request),
];

/// A request body of `/v1/completions` or `/v1/chat/completions`, read as
/// the server reads it; a chat's messages rendered in RWKV's format and
/// tokenized, a completion's sampler built.
pub fn openai_request(data: &[u8]) {
    use crate::openai::{parse_chat, parse_completion, Limits, Prompt};
    static WORLD: std::sync::OnceLock<WorldTokenizer> = std::sync::OnceLock::new();
    let limits = Limits::default();
    if let Ok(r) = parse_completion(data, &limits) {
        assert!(r.generation.max_tokens <= limits.max_tokens_cap);
        assert!(r.generation.stop.len() <= limits.max_stops);
        if let Prompt::Tokens(t) = &r.prompt {
            assert!(!t.is_empty());
        }
        let _ = crate::sampler::Sampler::new(r.generation.sampler);
    }
    if let Ok(r) = parse_chat(data, &limits) {
        assert!(!r.messages.is_empty());
        let pieces = crate::chat::ChatFormat::Rwkv.render(&r.messages).expect("RWKV's format renders any messages");
        assert_eq!(pieces.len(), r.messages.len() + 1);
        let world = WORLD
            .get_or_init(|| WorldTokenizer::parse(crate::tokenizer::WORLD_VOCAB).expect("the built-in vocab parses"));
        for p in pieces {
            let _ = world.encode(p.as_bytes());
        }
    }
}
