//! End-to-end numerics of the Transformer baseline (Llama, Qwen2, GPT-NeoX)
//! against the float64 golden logits `transformers` computed for the
//! fixtures: every position of the prompt, then the tail tokens fed through
//! the KV cache, whole and in steps of 7 tokens, and in batches of
//! sequences of different lengths.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use rwkv_wgpu::{Engine, EngineOptions, KvDtype, LoadOptions, LogitsMode, Model, SafeTensorsFile};

/// The fixtures README's bar: relative L2 of the logits at every position.
const TRANSFORMER_REL_L2: f64 = 1e-5;
/// The golden's top-1 must be ours wherever its top-2 margin is at least this.
const TOP1_MARGIN: f32 = 1e-3;

pub const TRANSFORMER_FIXTURES: [&str; 7] = [
    "llama-L2-D128-H4-KV2-F344-V512-fp32",
    "llama-L3-D96-H3-KV1-F256-V512-bf16-tied",
    "llama3rope-L2-D128-H2-KV1-F320-V512-fp32",
    "qwen2-L2-D128-H4-KV2-F320-V512-fp16-tied",
    "gptneox-L2-D128-H4-F512-V512-fp32",
    "gptneox-L2-D64-H2-F256-V512-fp16-seqres",
    "llama-L2-D128-H4-KV4-F352-V4096-fp16-austen",
];

fn folder(name: &str) -> PathBuf {
    fixture(&format!("transformer/models/{name}"))
}

struct TGolden {
    tokens: Vec<u32>,
    logits: Vec<f32>,
    tokens_tail: Vec<u32>,
    logits_tail: Vec<f32>,
    vocab: usize,
}

fn golden(name: &str) -> TGolden {
    let path = fixture(&format!("transformer/golden/{name}.golden.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let u32s = |n: &str| bytemuck::pod_collect_to_vec::<u8, u32>(st.tensor(n).unwrap().data());
    let f32s = |n: &str| bytemuck::pod_collect_to_vec::<u8, f32>(st.tensor(n).unwrap().data());
    let vocab = st.tensor("logits").unwrap().shape()[1];
    let _ = SafeTensorsFile::open(&path).unwrap();
    TGolden {
        tokens: u32s("tokens"),
        logits: f32s("logits"),
        tokens_tail: u32s("tokens_tail"),
        logits_tail: f32s("logits_tail"),
        vocab,
    }
}

fn model(name: &str, kv: KvDtype) -> Option<Arc<Model>> {
    let ctx = gpu()?;
    let opts = LoadOptions { kv_cache: kv, ..Default::default() };
    Some(Arc::new(Model::load(&ctx, folder(name), &opts).unwrap()))
}

/// Asserts the bar on `[rows, vocab]` logits: relative L2 over all of them,
/// and the top-1 of every row whose golden top-2 margin is at least TOP1_MARGIN.
fn assert_close(what: &str, got: &[f32], want: &[f32], vocab: usize, bound: f64) {
    let err = rel_l2(got, want);
    let mut checked = 0;
    for (r, (g, w)) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)).enumerate() {
        let top = argmax(w);
        let second = w.iter().enumerate().filter(|(i, _)| *i != top).map(|(_, v)| *v).fold(f32::MIN, f32::max);
        if w[top] - second >= TOP1_MARGIN {
            checked += 1;
            assert_eq!(argmax(g), top, "{what}: top-1 of row {r}");
        }
    }
    eprintln!("{what}: rel L2 {err:.3e}, top-1 checked on {checked} rows");
    assert!(err <= bound, "{what}: relative L2 {err:.3e} > {bound:e}");
}

fn run_golden(name: &str, chunk: usize) {
    let Some(m) = model(name, KvDtype::F32) else { return };
    let g = golden(name);
    assert_eq!(m.info().vocab, g.vocab);
    let mut engine = Engine::new(m.clone(), &EngineOptions { chunk_tokens: chunk }).unwrap();
    let mut state = m.new_state(1).unwrap();
    let logits = engine.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
    assert_close(&format!("{name} chunk {chunk}"), &logits, &g.logits, g.vocab, TRANSFORMER_REL_L2);
    assert_eq!(state.context_len(0), g.tokens.len());
    // The tail, one token at a time through the cache.
    let mut tail = Vec::new();
    for &t in &g.tokens_tail {
        tail.extend(engine.forward(&mut state, &[&[t]], LogitsMode::Last).unwrap().remove(0));
    }
    assert_close(&format!("{name} chunk {chunk} tail"), &tail, &g.logits_tail, g.vocab, TRANSFORMER_REL_L2);
}

#[test]
fn logits_match_golden_whole() {
    for name in TRANSFORMER_FIXTURES {
        run_golden(name, 256);
    }
}

#[test]
fn logits_match_golden_in_steps_of_7() {
    for name in TRANSFORMER_FIXTURES {
        run_golden(name, 7);
    }
}
