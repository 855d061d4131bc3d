//! End-to-end numerics of the Transformer baseline (Llama, Qwen2, GPT-NeoX)
//! against the float64 golden logits `transformers` computed for the
//! fixtures: every position of the prompt, then the tail tokens fed through
//! the KV cache, whole and in steps of 7 tokens, and in batches of
//! sequences of different lengths.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use rwkv_wgpu::quant::Format;
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

fn kv_f32() -> LoadOptions {
    LoadOptions { kv_cache: KvDtype::F32, ..Default::default() }
}

fn model(name: &str, kv: KvDtype) -> Option<Arc<Model>> {
    let ctx = gpu()?;
    let opts = LoadOptions { kv_cache: kv, ..Default::default() };
    Some(Arc::new(Model::load(&ctx, folder(name), &opts).unwrap()))
}

/// A fixture with an f32 cache, its golden, and an engine for it.
fn f32_cache_engine(name: &str) -> (Arc<Model>, TGolden, Engine) {
    let m = model(name, KvDtype::F32).unwrap();
    let engine = Engine::new(m.clone(), &EngineOptions::default()).unwrap();
    (m, golden(name), engine)
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

/// The f16 cache rounds each key and value once (2^-11 relative): measured
/// 3.5e-4 rel L2 at most over the fixtures; twice that is the bound, still
/// 14x under what a wrong position or head gives (> 1e-2).
const F16_CACHE_REL_L2: f64 = 7e-4;

#[test]
fn f16_cache_stays_close() {
    for name in TRANSFORMER_FIXTURES {
        let Some(m) = model(name, KvDtype::F16) else { return };
        let g = golden(name);
        let mut engine = Engine::new(m.clone(), &EngineOptions { chunk_tokens: 64 }).unwrap();
        let mut state = m.new_state(1).unwrap();
        let logits = engine.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
        let err = rel_l2(&logits, &g.logits);
        eprintln!("{name} f16 cache: rel L2 {err:.3e}");
        assert!(err <= F16_CACHE_REL_L2, "{name} f16 cache: relative L2 {err:.3e}");
        assert_eq!(
            m.info().kv_bytes_per_token,
            (m.info().n_layer * 2 * m.info().n_kv_head * m.info().head_size * 2) as u64
        );
    }
}

/// Eight sequences of different lengths in one state, and the same eight
/// from eight states in gathered steps, each give their solo logits: bit
/// for bit (a row's arithmetic does not depend on what shares its step).
#[test]
fn batched_sequences_equal_solo() {
    for name in [
        "llama-L2-D128-H4-KV2-F344-V512-fp32",
        "gptneox-L2-D64-H2-F256-V512-fp16-seqres",
        "qwen2-L2-D128-H4-KV2-F320-V512-fp16-tied",
    ] {
        let Some(m) = model(name, KvDtype::F32) else { return };
        let g = golden(name);
        let lens = [1usize, 64, 7, 33, 2, 50, 17, 9];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| g.tokens.iter().cycle().skip(i * 5).take(n).copied().collect())
            .collect();
        let mut engine = Engine::new(m.clone(), &EngineOptions { chunk_tokens: 40 }).unwrap();
        let solo: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| {
                let mut st = m.new_state(1).unwrap();
                engine.forward(&mut st, &[s], LogitsMode::All).unwrap().remove(0)
            })
            .collect();
        // One state of 8 sequences (steps of 40 tokens shared fairly).
        let mut batch = m.new_state(8).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let got = engine.forward(&mut batch, &refs, LogitsMode::All).unwrap();
        for (i, (a, b)) in got.iter().zip(&solo).enumerate() {
            assert_close(&format!("{name} batch seq {i}"), a, b, g.vocab, TRANSFORMER_REL_L2);
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: seq {i} differs from solo");
        }
        // Eight states, decoding one token each in a gathered step after their prompts.
        let mut states: Vec<_> = (0..8).map(|_| m.new_state(1).unwrap()).collect();
        for (st, s) in states.iter_mut().zip(&seqs) {
            engine.forward(st, &[&s[..s.len() - 1]], LogitsMode::Last).unwrap();
        }
        let lasts: Vec<[u32; 1]> = seqs.iter().map(|s| [*s.last().unwrap()]).collect();
        let mut inputs: Vec<rwkv_wgpu::SeqInput> = states
            .iter_mut()
            .zip(&lasts)
            .map(|(st, t)| rwkv_wgpu::SeqInput { state: st, seq: 0, tokens: t, logits: Some(LogitsMode::Last) })
            .collect();
        let got = engine.step(&mut inputs).unwrap();
        for (i, (a, s)) in got.iter().zip(&solo).enumerate() {
            let want = &s[s.len() - g.vocab..];
            assert!(a.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: gathered seq {i} differs");
        }
        for (st, s) in states.iter().zip(&seqs) {
            assert_eq!(st.context_len(0), s.len());
        }
    }
}

/// A state's cache can be read, written back, cloned and reset; a context
/// past the memory limit is an error naming the length that fits.
#[test]
fn kv_state_round_trip_and_limits() {
    if gpu().is_none() {
        return;
    }
    let name = "llama-L2-D128-H4-KV2-F344-V512-fp32";
    let (m, g, mut engine) = f32_cache_engine(name);
    let mut state = m.new_state(1).unwrap();
    engine.forward(&mut state, &[&g.tokens[..40]], LogitsMode::Last).unwrap();
    let saved = state.read(0).unwrap();
    assert_eq!(saved.fields[0].1, vec![2, 40, 2, 32]);
    let copy = state.try_clone().unwrap();
    // Read on, then roll back to the saved cache and read the rest again.
    engine.forward(&mut state, &[&g.tokens[40..50]], LogitsMode::Last).unwrap();
    state.write(0, &saved).unwrap();
    assert_eq!(state.context_len(0), 40);
    let a = engine.forward(&mut state, &[&g.tokens[40..]], LogitsMode::All).unwrap().remove(0);
    let mut copy = copy;
    let b = engine.forward(&mut copy, &[&g.tokens[40..]], LogitsMode::All).unwrap().remove(0);
    assert_eq!(a, b);
    assert_close("after rollback", &a, &g.logits[40 * g.vocab..], g.vocab, TRANSFORMER_REL_L2);
    state.reset(None).unwrap();
    assert_eq!(state.context_len(0), 0);
    let a = engine.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
    assert_close("after reset", &a, &g.logits, g.vocab, TRANSFORMER_REL_L2);

    // A context whose memory limit leaves KV_HEADROOM bytes beyond what the model, the
    // engine and one empty state take (measured in a fresh unlimited context first).
    const KV_HEADROOM: u64 = 1 << 20;
    let per_token = m.info().kv_bytes_per_token;
    let too_many = (KV_HEADROOM / per_token) as usize * 2;
    let long: Vec<u32> = g.tokens.iter().cycle().take(too_many).copied().collect();
    let base = {
        // The engine's scratch grows to its full size on the first long forward;
        // the state (and its KV cache) is dropped before measuring.
        let c = rwkv_wgpu::GpuContext::new(&Default::default()).unwrap();
        let lm = Arc::new(Model::load(&c, folder(name), &kv_f32()).unwrap());
        let mut e = Engine::new(lm.clone(), &EngineOptions::default()).unwrap();
        e.forward(&mut lm.new_state(1).unwrap(), &[&long], LogitsMode::Last).unwrap();
        c.allocated_bytes()
    };
    let limited = rwkv_wgpu::GpuContext::new(&rwkv_wgpu::GpuOptions {
        memory_limit: Some(base + KV_HEADROOM),
        ..Default::default()
    })
    .unwrap();
    let lm = Arc::new(Model::load(&limited, folder(name), &kv_f32()).unwrap());
    let mut le = Engine::new(lm.clone(), &EngineOptions::default()).unwrap();
    let mut st = lm.new_state(1).unwrap();
    match le.forward(&mut st, &[&long], LogitsMode::Last) {
        Err(rwkv_wgpu::Error::ContextTooLong { tokens, fits, .. }) => {
            eprintln!("context {tokens}: {fits} fit");
            assert!(fits < tokens && fits > 0, "{fits} of {tokens}");
            assert!(fits as u64 <= KV_HEADROOM / per_token, "{fits} fit in {KV_HEADROOM} bytes?");
        }
        other => panic!("expected ContextTooLong, got {:?}", other.map(|_| ())),
    }
}

/// `reserve` allocates exactly the positions asked and later steps up to
/// them neither grow nor copy the cache; `truncate` goes back to a shorter
/// context exactly (the same logits as the first time, bit for bit);
/// `fill_random` makes a cache of the length asked, with values in [-1, 1).
#[test]
fn kv_reserve_truncate_and_fill() {
    if gpu().is_none() {
        return;
    }
    let (m, g, mut engine) = f32_cache_engine("llama-L2-D128-H4-KV2-F344-V512-fp32");
    let per_token = m.info().kv_bytes_per_token;
    let mut state = m.new_state(2).unwrap();
    // 77: not a multiple of the growth block.
    state.reserve(0, 77).unwrap();
    assert_eq!(state.bytes(), 77 * per_token);
    let first = engine.forward(&mut state, &[&g.tokens[..40], &[1]], LogitsMode::Last).unwrap();
    let again_from = engine.forward(&mut state, &[&g.tokens[40..60], &[2]], LogitsMode::Last).unwrap();
    assert_eq!(state.context_len(0), 60);
    // Sequence 1 grew on its own (by a block); sequence 0 stayed as reserved.
    let seq1_bytes = state.bytes() - 77 * per_token;
    assert!(seq1_bytes > 0 && seq1_bytes.is_multiple_of(per_token));
    state.truncate(0, 40).unwrap();
    assert_eq!(state.context_len(0), 40);
    let replay = engine.forward(&mut state, &[&g.tokens[40..60], &[2]], LogitsMode::Last).unwrap();
    assert_eq!(replay[0], again_from[0], "the same context, the same logits");
    assert_eq!(state.bytes(), 77 * per_token + seq1_bytes, "nothing grew");
    assert_ne!(first[0], replay[0]);
    assert!(state.truncate(0, 61).is_err(), "past what was read");
    assert!(state.truncate(2, 0).is_err(), "no sequence 2");

    state.fill_random(1, 300, 9).unwrap();
    assert_eq!(state.context_len(1), 300);
    let data = state.read(1).unwrap();
    assert_eq!(data.fields[0].1, vec![2, 300, 2, 32]);
    let keys = &data.fields[0].2;
    assert!(keys.iter().all(|v| (-1.0..1.0).contains(v)));
    let mean = keys.iter().map(|&v| v as f64).sum::<f64>() / keys.len() as f64;
    let var = keys.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / keys.len() as f64;
    // Uniform on [-1, 1): mean 0 (standard error 0.003 over 38400 samples),
    // variance 1/3 (standard error 0.0015): FILL_STAT_TOL is over six of either.
    const FILL_STAT_TOL: f64 = 0.02;
    assert!(mean.abs() < FILL_STAT_TOL && (var - 1.0 / 3.0).abs() < FILL_STAT_TOL, "mean {mean}, variance {var}");
    let logits = engine.forward(&mut state, &[&[3], &[4]], LogitsMode::Last).unwrap();
    assert!(logits[1].iter().all(|v| v.is_finite()));
    assert_eq!(state.context_len(1), 301);
}

/// Transformers quantized at load (`--quant`), every matrix the block
/// format's columns allow (the rest stay in floats: the F344 fixture's down
/// projection, 344 wide, is no multiple of 32): relative L2 of the logits from
/// the float64 golden at every position, and batch == single bit for bit.
/// The fixtures' weights are random, which quantization represents coarsely;
/// measured on lavapipe (`linear_qx_tex`, x quantized too): int8 2.26e-2 ..
/// 4.89e-2, q4 1.43e-1 .. 2.89e-1 (the Qwen2 and the 3-layer bf16 Llama the
/// worst). The bounds are those maxima with a quarter of headroom; a kernel
/// or layout error gives order 1.
const INT8_TRANSFORMER_REL_L2: f64 = 6.1e-2;
const Q4_TRANSFORMER_REL_L2: f64 = 3.6e-1;

#[test]
fn quantized_transformers_stay_close_and_batch_equals_single() {
    let Some(ctx) = gpu() else { return };
    for (format, bound) in [(Format::Int8, INT8_TRANSFORMER_REL_L2), (Format::Q4, Q4_TRANSFORMER_REL_L2)] {
        let mut worst = 0f64;
        for name in TRANSFORMER_FIXTURES {
            let opts = LoadOptions { quant: Some(format), kv_cache: KvDtype::F32, ..Default::default() };
            let m = Arc::new(Model::load(&ctx, folder(name), &opts).unwrap());
            assert_eq!(m.info().quant, Some(format));
            let g = golden(name);
            let mut engine = Engine::new(m.clone(), &EngineOptions::default()).unwrap();
            let mut state = m.new_state(1).unwrap();
            let logits = engine.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
            let err = rel_l2(&logits, &g.logits);
            eprintln!("{name} {format}: rel L2 {err:.3e} from the golden logits");
            assert!(err <= bound, "{name} {format}: rel L2 {err:.3e} > {bound:e}");
            worst = worst.max(err);
            let seqs: [&[u32]; 3] = [&g.tokens, &g.tokens[..5], &g.tokens[..1]];
            assert_batch_is_single(&mut engine, &seqs, &format!("{name} {format}"));
        }
        eprintln!("{format}: worst rel L2 {worst:.3e}");
    }
}
