//! End-to-end numerics of every RWKV generation against the float64 golden
//! logits and states of the fixtures.

mod common;

use common::*;
use rwkv_wgpu::reference;
use rwkv_wgpu::{Engine, Error, LoadOptions, LogitsMode, SafeTensorsFile, State, StateData};

fn load_with(name: &str, opts: LoadOptions, chunk: usize) -> Option<Engine> {
    let ctx = gpu()?;
    Some(engine_with(&ctx, model_path(name), &opts, chunk))
}

fn load(name: &str, chunk: usize) -> Option<Engine> {
    load_with(name, LoadOptions::default(), chunk)
}

fn all_logits(model: &mut Engine, state: &mut State, tokens: &[u32]) -> Vec<f32> {
    model.forward(state, &[tokens], LogitsMode::All).unwrap().remove(0)
}

fn assert_matches_golden(what: &str, logits: &[f32], golden: &[f32], vocab: usize) {
    let err = rel_l2(logits, golden);
    let top1 = top1_agreement(logits, golden, vocab);
    eprintln!("{what}: rel L2 {err:.3e}, top-1 {top1}");
    assert!(err <= LOGITS_REL_L2, "{what}: relative L2 {err:.3e} > {LOGITS_REL_L2:e}");
    assert_eq!(top1, 1.0, "{what}: top-1 agreement {top1}");
}

fn assert_state_matches(what: &str, state: &StateData, g: &Golden, prefix: &str) {
    for (name, shape, values) in &state.fields {
        let (gshape, gvalues) = g.state(prefix, name);
        assert_eq!(shape, &gshape, "{what}: {prefix}.{name} shape");
        let err = rel_l2(values, &gvalues);
        eprintln!("{what}: {prefix}.{name} rel L2 {err:.3e}");
        assert!(err <= STATE_REL_L2, "{what}: {prefix}.{name} relative L2 {err:.3e}");
    }
}

#[test]
fn logits_match_golden_at_every_position() {
    for name in ALL_FIXTURES {
        let Some(mut model) = load(name, 256) else { return };
        let g = Golden::load(name);
        let mut state = model.new_state(1).unwrap();
        let logits = all_logits(&mut model, &mut state, &g.tokens);
        assert_matches_golden(name, &logits, &g.logits, g.vocab);
        assert_state_matches(name, &state.read(0).unwrap(), &g, "state");
    }
}

#[test]
fn chunkings_agree_and_state40_hands_over() {
    for name in ALL_FIXTURES {
        let Some(mut model) = load(name, 256) else { return };
        let g = Golden::load(name);
        let t = &g.tokens;
        let mut state = model.new_state(1).unwrap();
        let whole = all_logits(&mut model, &mut state, t);

        // One token per call.
        let mut state = model.new_state(1).unwrap();
        let mut one: Vec<f32> = Vec::new();
        for tok in t {
            one.extend(all_logits(&mut model, &mut state, std::slice::from_ref(tok)));
        }
        let err = rel_l2(&one, &whole);
        assert!(err <= LOGITS_REL_L2, "{name}: one-at-a-time vs whole {err:.3e}");

        // Uneven calls: 1, 7, 30, rest; the third boundary is token 38.
        let mut state = model.new_state(1).unwrap();
        let mut uneven: Vec<f32> = Vec::new();
        for (a, b) in [(0, 1), (1, 8), (8, 38), (38, t.len())] {
            uneven.extend(all_logits(&mut model, &mut state, &t[a..b]));
        }
        let err = rel_l2(&uneven, &whole);
        assert!(err <= LOGITS_REL_L2, "{name}: uneven calls vs whole {err:.3e}");

        // The model's own chunk cap splitting one call (chunks of 5).
        model.set_chunk_tokens(5).unwrap();
        let mut state = model.new_state(1).unwrap();
        let split = all_logits(&mut model, &mut state, t);
        let err = rel_l2(&split, &whole);
        assert!(err <= LOGITS_REL_L2, "{name}: chunk cap 5 vs whole {err:.3e}");
        model.set_chunk_tokens(256).unwrap();

        // State after 40 tokens, then the tail from it.
        let mut state = model.new_state(1).unwrap();
        model.forward(&mut state, &[&t[..g.tail_start]], LogitsMode::Last).unwrap();
        let s40 = state.read(0).unwrap();
        assert_state_matches(name, &s40, &g, "state40");
        let tail = all_logits(&mut model, &mut state, &t[g.tail_start..]);
        assert_matches_golden(&format!("{name} tail"), &tail, &g.logits_tail, g.vocab);

        // The stored golden state40 written into a fresh state gives the tail too.
        let golden40 = StateData {
            fields: s40
                .fields
                .iter()
                .map(|(n, _, _)| {
                    let (shape, v) = g.state("state40", n);
                    (n.clone(), shape, v)
                })
                .collect(),
        };
        let mut state = model.new_state(1).unwrap();
        state.write(0, &golden40).unwrap();
        let tail = all_logits(&mut model, &mut state, &t[g.tail_start..]);
        assert_matches_golden(&format!("{name} tail from golden state40"), &tail, &g.logits_tail, g.vocab);
    }
}

/// Steps longer than one WKV dispatch run (and than llvmpipe's loop limit,
/// about 500 tokens for head size 64) give the same logits as short steps.
#[test]
fn long_steps_match_short_steps() {
    let name = "v7-L2-C128-V512-fp32";
    let Some(mut model) = load(name, 700) else { return };
    let mut rng = Rng::new(12);
    let tokens: Vec<u32> = (0..700).map(|_| rng.below(512)).collect();
    let mut state = model.new_state(1).unwrap();
    let long = all_logits(&mut model, &mut state, &tokens);
    model.set_chunk_tokens(64).unwrap();
    let mut state = model.new_state(1).unwrap();
    let short = all_logits(&mut model, &mut state, &tokens);
    let err = rel_l2(&long, &short);
    assert!(err <= LOGITS_REL_L2, "700-token steps vs 64-token steps: {err:.3e}");
}

#[test]
fn batch_of_uneven_sequences_equals_single_runs() {
    for name in ["v7-L2-C128-V512-fp32", "v6-L2-C128-V512-fp32", "v5.2-L2-C128-V512-fp32", "v5.1-L2-C128-V512-fp32"] {
        batch_equals_single_runs(name);
    }
    batch_equals_single_runs("v5.0-L3-C64-V512-fp16");
    batch_equals_single_runs("v4-L2-C128-V512-fp32");
}

fn batch_equals_single_runs(name: &str) {
    // A small chunk cap so that the batch is split over many steps, with
    // sequences finishing in different steps.
    let Some(mut model) = load(name, 16) else { return };
    let g = Golden::load(name);
    let seqs: [&[u32]; 3] = [&g.tokens[..], &g.tokens[5..22], &g.tokens[30..33]];
    let mut state = model.new_state(3).unwrap();
    let batched = model.forward(&mut state, &seqs, LogitsMode::All).unwrap();
    let mut state = model.new_state(3).unwrap();
    let last = model.forward(&mut state, &seqs, LogitsMode::Last).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        let mut single_state = model.new_state(1).unwrap();
        let alone = all_logits(&mut model, &mut single_state, seq);
        // Each token row is computed by the same arithmetic in the same order
        // whatever else is in the batch, so the results are bit-identical.
        assert_eq!(batched[i], alone, "sequence {i}: batched logits differ from its single run");
        assert_eq!(last[i], alone[alone.len() - g.vocab..], "sequence {i}: last logits");
        assert_eq!(state.read(i).unwrap(), single_state.read(0).unwrap(), "sequence {i}: state");
    }
    // The first sequence is the golden one.
    assert_matches_golden(&format!("{name} batch seq 0"), &batched[0], &g.logits, g.vocab);
}

/// How far the logits after 10,000 repeated tokens may be from those after the
/// last 2,000 alone. Every fixture decay is e^w with w = -exp(time_decay) well
/// below 0, so 8,000 tokens of the same input wash the start out to far below
/// f32 resolution; what is left is f32 rounding over the two runs (measured
/// 3.9e-7). A state that overflowed, went NaN or stopped updating would be
/// off by O(1).
const FORGOTTEN_CONTEXT_REL_L2: f64 = 1e-5;

/// RWKV-4 keeps its sums over a running maximum exponent, so 10,000 tokens of
/// one repeated token stay finite (a plain exp(k) sum would overflow f32).
#[test]
fn v4_stays_finite_over_10000_repeated_tokens() {
    let name = "v4-L2-C128-V512-fp32";
    let Some(mut model) = load(name, 256) else { return };
    let tokens = vec![7u32; 10_000];
    let mut state = model.new_state(1).unwrap();
    let logits = model.forward(&mut state, &[&tokens], LogitsMode::All).unwrap().remove(0);
    assert_eq!(logits.len(), 10_000 * 512);
    assert!(logits.iter().all(|v| v.is_finite()), "v4 logits went non-finite");
    for (field, _, values) in state.read(0).unwrap().fields {
        assert!(values.iter().all(|v| v.is_finite()), "v4 state.{field} went non-finite");
    }
    // The last logits agree with a fresh run of the last 2,000 tokens only
    // if the state is still meaningful (the decays forget the first 8,000).
    let last = &logits[9_999 * 512..];
    let mut fresh = model.new_state(1).unwrap();
    let short = model.forward(&mut fresh, &[&tokens[8_000..]], LogitsMode::Last).unwrap().remove(0);
    let err = rel_l2(last, &short);
    eprintln!("v4 after 10,000 vs 2,000 repeated tokens: {err:.3e}");
    assert!(err <= FORGOTTEN_CONTEXT_REL_L2, "v4 after 10,000 vs 2,000 repeated tokens: {err:.3e}");
}

#[test]
fn weights_split_across_bindings_give_the_same_logits() {
    let name = "v7-L2-C128-V512-fp32";
    let Some(mut whole) = load(name, 64) else { return };
    // 10 KiB parts: emb and head [512, 128] f32 (256 KiB) become 26 parts each.
    let Some(mut split) = load_with(name, LoadOptions { max_part_bytes: Some(10 << 10), ..Default::default() }, 64)
    else {
        return;
    };
    let g = Golden::load(name);
    let mut s1 = whole.new_state(1).unwrap();
    let mut s2 = split.new_state(1).unwrap();
    let a = all_logits(&mut whole, &mut s1, &g.tokens);
    let b = all_logits(&mut split, &mut s2, &g.tokens);
    assert_eq!(a, b, "splitting weights into parts changed the logits");
}

#[test]
fn state_read_write_reset_clone() {
    let name = "v7-L3-C64-V512-fp16-l0v";
    let Some(mut model) = load(name, 32) else { return };
    let g = Golden::load(name);
    let t = &g.tokens;
    let mut state = model.new_state(2).unwrap();
    model.forward(&mut state, &[&t[..40], &t[..10]], LogitsMode::Last).unwrap();
    let s40 = state.read(0).unwrap();
    assert_state_matches("batch slot 0", &s40, &g, "state40");

    // A clone continues exactly like the original.
    let mut copy = state.try_clone().unwrap();
    let a = model.forward(&mut state, &[&t[40..], &[]], LogitsMode::All).unwrap();
    let b = model.forward(&mut copy, &[&t[40..], &[]], LogitsMode::All).unwrap();
    assert_eq!(a[0], b[0]);
    assert!(a[1].is_empty(), "a sequence given no tokens returns no logits");

    // Reset one sequence: it reads like a fresh state; the other is untouched.
    let before = state.read(1).unwrap();
    state.reset(Some(0)).unwrap();
    assert_eq!(state.read(1).unwrap(), before);
    let fresh = model.new_state(1).unwrap().read(0).unwrap();
    assert_eq!(state.read(0).unwrap(), fresh);
    let logits = model.forward(&mut state, &[&t[..], &[]], LogitsMode::All).unwrap().remove(0);
    assert_matches_golden("after reset", &logits, &g.logits, g.vocab);

    // Writing a state back from its own read is exact.
    let snapshot = state.read(0).unwrap();
    state.reset(None).unwrap();
    state.write(0, &snapshot).unwrap();
    assert_eq!(state.read(0).unwrap(), snapshot);

    // Wrong shapes and out-of-range sequences are errors.
    let mut bad = snapshot.clone();
    bad.fields[2].1 = vec![1, 2, 3];
    assert!(matches!(state.write(0, &bad), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(state.read(2), Err(Error::InvalidArgument(_))));
}

#[test]
fn bad_inputs_are_errors() {
    let name = "v7-L2-C128-V512-fp32";
    let Some(mut model) = load(name, 32) else { return };
    let mut state = model.new_state(1).unwrap();
    let e = model.forward(&mut state, &[&[1, 2, 512]], LogitsMode::Last).unwrap_err();
    assert!(matches!(e, Error::BadToken { position: 2, token: 512, vocab: 512, .. }), "{e}");
    let e = model.forward(&mut state, &[&[1], &[2]], LogitsMode::Last).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(matches!(model.set_chunk_tokens(0), Err(Error::InvalidArgument(_))));
    assert!(matches!(model.new_state(0), Err(Error::InvalidArgument(_))));
    let other = load("v7-L3-C64-V512-fp16-l0v", 8).unwrap();
    let mut other_state = other.new_state(1).unwrap();
    let e = model.forward(&mut other_state, &[&[1]], LogitsMode::Last).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// The CPU reference itself against the golden data (it is what the kernel
/// tests trust, so it must be right too). f64 against f32-stored golden
/// values: only the final f32 rounding differs.
#[test]
fn cpu_reference_matches_golden() {
    const REFERENCE_REL_L2: f64 = 1e-6;
    for name in V7_FIXTURES {
        let f = SafeTensorsFile::open(model_path(name)).unwrap();
        let m = reference::v7::V7::load(&f).unwrap();
        let g = Golden::load(name);
        let mut state = m.new_state();
        let mut logits = Vec::new();
        for &t in &g.tokens {
            logits.extend(m.forward(&mut state, t).iter().map(|v| *v as f32));
        }
        let err = rel_l2(&logits, &g.logits);
        eprintln!("reference {name}: rel L2 {err:.3e}");
        assert!(err <= REFERENCE_REL_L2, "reference {name}: {err:.3e}");
        let kv: Vec<f32> = state.att_kv.iter().map(|v| *v as f32).collect();
        assert!(rel_l2(&kv, &g.state("state", "att_kv").1) <= REFERENCE_REL_L2);
    }
}

/// What loading precompiles is what the steps record: prefill, decode, an
/// uneven batch and a gathered step of two sessions compile nothing more,
/// for every generation on each kernel path (the plan picks both), with
/// float weights and quantized at load (q4; int8 takes the same kernels
/// with another format constant).
#[test]
fn steps_compile_no_pipeline_that_loading_did_not() {
    use rwkv_wgpu::gpu::{GpuContext, GpuOptions, WeightStore};
    use rwkv_wgpu::SeqInput;
    if gpu().is_none() {
        return;
    }
    let paths = [
        GpuOptions::default(),
        GpuOptions { weight_store: Some(WeightStore::Buffer), ..Default::default() },
        GpuOptions { weight_store: Some(WeightStore::Buffer), no_subgroups: true, ..Default::default() },
    ];
    let quants = [None, Some(rwkv_wgpu::quant::Format::Q4)];
    for (opts, quant) in paths.iter().flat_map(|p| quants.map(|q| (p, q))) {
        for name in ALL_FIXTURES {
            let ctx = GpuContext::new(opts).unwrap();
            let mut e = engine_with(&ctx, model_path(name), &LoadOptions { quant, ..Default::default() }, 16);
            let compiled = ctx.pipeline_count();
            let t: Vec<u32> = (0..40).map(|i| (i * 7 % 500) as u32).collect();
            let mut s = e.new_state(1).unwrap();
            e.forward(&mut s, &[&t[..37]], LogitsMode::All).unwrap();
            e.forward(&mut s, &[&t[..1]], LogitsMode::Last).unwrap();
            let mut s2 = e.new_state(2).unwrap();
            e.forward(&mut s2, &[&t[..9], &t[..1]], LogitsMode::Last).unwrap();
            e.forward(&mut s2, &[&t[..1], &t[..1]], LogitsMode::Last).unwrap();
            let (mut a, mut b) = (e.new_state(1).unwrap(), e.new_state(1).unwrap());
            let mut seqs = [
                SeqInput { state: &mut a, seq: 0, tokens: &t[..3], logits: Some(LogitsMode::Last) },
                SeqInput { state: &mut b, seq: 0, tokens: &t[..1], logits: Some(LogitsMode::Last) },
            ];
            e.step(&mut seqs).unwrap();
            assert_eq!(
                ctx.pipeline_count(),
                compiled,
                "{name} ({}, quant {quant:?}): steps compiled pipelines loading did not",
                ctx.plan()
            );
        }
    }
}
