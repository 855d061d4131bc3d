//! Shared test helpers: the GPU context (failing, not skipping, under CI),
//! fixture paths, golden data and error measures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rwkv_wgpu::{
    Engine, EngineOptions, GpuContext, GpuOptions, LoadOptions, LogitsMode, Model, SafeTensorsFile, Tokenizer,
};

/// An fp32 implementation lands around 1e-7..1e-6 on these fixtures; the
/// fixtures README sets 1e-5 as the bar for fp32 compute, and the common bugs
/// (GroupNorm eps, a dropped or transposed state) give 3e-4 and above.
pub const LOGITS_REL_L2: f64 = 1e-5;
/// Same bar for states and for chunked-vs-whole consistency.
pub const STATE_REL_L2: f64 = 1e-5;

/// The shared GPU context. With `CI` set, a missing adapter fails the test;
/// otherwise the test is skipped with a message.
pub fn gpu() -> Option<GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new(&GpuOptions::default()) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but no GPU adapter could be opened: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    })
    .clone()
}

/// The built-in Austen demo model's weights and tokenizer in assets/.
pub fn austen_model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/austen-rwkv7/austen-rwkv7-fp16.safetensors")
}

pub fn austen_tokenizer_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/austen-rwkv7/tokenizer.json")
}

/// The demo model through the Rust API, its tokenizer and an engine (None
/// only without a GPU outside CI, as `gpu`).
pub fn austen() -> Option<(Arc<Model>, Arc<Tokenizer>, Engine)> {
    let ctx = gpu()?;
    let model = Arc::new(Model::load(&ctx, austen_model_path(), &LoadOptions::default()).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_file(&austen_tokenizer_path()).unwrap());
    let engine = Engine::new(model.clone(), &EngineOptions::default()).unwrap();
    Some((model, tokenizer, engine))
}

/// A model loaded with `opts` and an engine for it with steps of `chunk` tokens.
pub fn engine_with(ctx: &GpuContext, path: impl AsRef<Path>, opts: &LoadOptions, chunk: usize) -> Engine {
    let model = Arc::new(Model::load(ctx, path, opts).unwrap());
    Engine::new(model, &EngineOptions { chunk_tokens: chunk }).unwrap()
}

/// A model with default load options and an engine for it with steps of `chunk` tokens.
pub fn engine(ctx: &GpuContext, path: impl AsRef<Path>, chunk: usize) -> Engine {
    engine_with(ctx, path, &LoadOptions::default(), chunk)
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

pub const V7_FIXTURES: [&str; 3] = ["v7-L2-C128-V512-fp32", "v7-L2-C128-V512-bf16", "v7-L3-C64-V512-fp16-l0v"];

/// Every generation's fixtures (from ../shared/fixtures): v7 first, then v6,
/// 5.2, 5.1, 5.0 and 4, each as fp32 (2 layers, 2 heads) and fp16 (3 layers,
/// one head, whose 5.0/5.1 per-head tensors have shape [1]).
pub const ALL_FIXTURES: [&str; 13] = [
    "v7-L2-C128-V512-fp32",
    "v7-L2-C128-V512-bf16",
    "v7-L3-C64-V512-fp16-l0v",
    "v6-L2-C128-V512-fp32",
    "v6-L3-C64-V512-fp16",
    "v5.2-L2-C128-V512-fp32",
    "v5.2-L3-C64-V512-fp16",
    "v5.1-L2-C128-V512-fp32",
    "v5.1-L3-C64-V512-fp16",
    "v5.0-L2-C128-V512-fp32",
    "v5.0-L3-C64-V512-fp16",
    "v4-L2-C128-V512-fp32",
    "v4-L3-C64-V512-fp16",
];

pub fn model_path(name: &str) -> PathBuf {
    fixture(&format!("models/{name}.safetensors"))
}

pub struct Golden {
    pub tokens: Vec<u32>,
    pub vocab: usize,
    /// [T, V]
    pub logits: Vec<f32>,
    /// [T - tail_start, V]
    pub logits_tail: Vec<f32>,
    pub tail_start: usize,
    file: SafeTensorsFile,
}

impl Golden {
    pub fn load(name: &str) -> Self {
        Self::load_at(fixture(&format!("golden/{name}.golden.safetensors")))
    }

    /// A golden file at any path (e.g. under `fixtures/headsize/`).
    pub fn load_at(path: PathBuf) -> Self {
        let file = SafeTensorsFile::open(path).unwrap();
        let tokens = raw_u32(&file, "tokens");
        let logits = file.get("logits").unwrap();
        let vocab = logits.shape[1];
        let logits = logits.to_f32();
        let logits_tail = file.get("logits_tail").unwrap().to_f32();
        let tail_start = tokens.len() - logits_tail.len() / vocab;
        Self { tokens, vocab, logits, logits_tail, tail_start, file }
    }

    /// A golden state tensor: `prefix` is "state" or "state40".
    pub fn state(&self, prefix: &str, field: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.file.get(&format!("{prefix}.{field}")).unwrap();
        (t.shape.to_vec(), t.to_f32())
    }
}

fn raw_u32(file: &SafeTensorsFile, name: &str) -> Vec<u32> {
    // The loader only hands out float tensors; parse the U32 tensor from the
    // safetensors header directly.
    let path = file.path();
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::U32);
    bytemuck::pod_collect_to_vec(v.data())
}

/// ‖a − b‖₂ / ‖b‖₂ in f64.
/// Batch == single, bit for bit: `seqs` in one step, each against its own
/// run from a fresh state (last-token logits).
#[allow(dead_code)]
pub fn assert_batch_is_single(engine: &mut Engine, seqs: &[&[u32]], what: &str) {
    let mut batch_state = engine.new_state(seqs.len()).unwrap();
    let batched = engine.forward(&mut batch_state, seqs, LogitsMode::Last).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let mut solo_state = engine.new_state(1).unwrap();
        let solo = engine.forward(&mut solo_state, &[s], LogitsMode::Last).unwrap().remove(0);
        let same = solo.iter().zip(&batched[i]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: sequence {i} of the batch differs from its own run");
    }
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = *x as f64 - *y as f64;
        num += d * d;
        den += (*y as f64) * (*y as f64);
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Share of rows whose argmax agrees.
pub fn top1_agreement(a: &[f32], b: &[f32], vocab: usize) -> f64 {
    let rows = a.len() / vocab;
    let same =
        (0..rows).filter(|&r| argmax(&a[r * vocab..(r + 1) * vocab]) == argmax(&b[r * vocab..(r + 1) * vocab])).count();
    same as f64 / rows as f64
}

/// Deterministic pseudo-random numbers for test inputs (xorshift64*); tests
/// need reproducible data, not statistical quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

/// A temporary folder, removed however the test ends (a failed assertion too).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let d = std::env::temp_dir().join(format!("rwkv-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
