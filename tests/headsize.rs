//! Head sizes other than 64 (`fixtures/headsize`: 8 and 16, as rwkv.cpp's
//! small test models have): v5.x and v6 take the head count and size from
//! their tensors like v7, match the float64 golden logits and states with
//! the main fixtures' tolerances (whole, chunked, batch == single), and
//! shapes that contradict each other or exceed the kernels are clear errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use rwkv_wgpu::{Error, LoadOptions, LogitsMode, Model, SafeTensorsFile, StateData};

const HEADSIZE_FIXTURES: [&str; 5] = [
    "v5.0-L2-C64-V512-fp32-hs8",
    "v5.1-L2-C64-V512-fp32-hs16",
    "v5.2-L2-C64-V512-fp16-hs8",
    "v6-L2-C64-V512-fp32-hs16",
    "v7-L2-C64-V512-fp32-hs16",
];

fn model_file(name: &str) -> PathBuf {
    fixture(&format!("headsize/models/{name}.safetensors"))
}

fn golden(name: &str) -> Golden {
    Golden::load_at(fixture(&format!("headsize/golden/{name}.golden.safetensors")))
}

fn check_logits(what: &str, logits: &[f32], golden: &[f32], vocab: usize) {
    let err = rel_l2(logits, golden);
    eprintln!("{what}: rel L2 {err:.3e}");
    assert!(err <= LOGITS_REL_L2, "{what}: logits relative L2 {err:.3e} > {LOGITS_REL_L2:e}");
    assert_eq!(top1_agreement(logits, golden, vocab), 1.0, "{what}: top-1");
}

fn check_state(what: &str, state: &StateData, g: &Golden, prefix: &str) {
    for (field, shape, values) in &state.fields {
        let (gshape, gvalues) = g.state(prefix, field);
        assert_eq!(shape, &gshape, "{what}: {prefix}.{field} shape");
        let err = rel_l2(values, &gvalues);
        assert!(err <= STATE_REL_L2, "{what}: {prefix}.{field} relative L2 {err:.3e} > {STATE_REL_L2:e}");
    }
}

#[test]
fn head_sizes_8_and_16_match_golden() {
    let Some(ctx) = gpu() else { return };
    for name in HEADSIZE_FIXTURES {
        let g = golden(name);
        let mut e = engine(&ctx, model_file(name), 256);
        let i = e.info().clone();
        let hs = if name.ends_with("hs8") { 8 } else { 16 };
        assert_eq!((i.n_head, i.head_size), (i.n_embd / hs, hs), "{name}: heads read from the tensors");

        // Whole.
        let mut state = e.new_state(1).unwrap();
        let whole = e.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
        check_logits(name, &whole, &g.logits, g.vocab);
        check_state(name, &state.read(0).unwrap(), &g, "state");

        // Chunks of 5: state after 40 tokens, then the tail from it.
        e.set_chunk_tokens(5).unwrap();
        let mut state = e.new_state(1).unwrap();
        e.forward(&mut state, &[&g.tokens[..g.tail_start]], LogitsMode::Last).unwrap();
        check_state(&format!("{name} chunked"), &state.read(0).unwrap(), &g, "state40");
        let tail = e.forward(&mut state, &[&g.tokens[g.tail_start..]], LogitsMode::All).unwrap().remove(0);
        check_logits(&format!("{name} tail"), &tail, &g.logits_tail, g.vocab);

        // A batch of uneven sequences equals their single runs bit for bit.
        let seqs: [&[u32]; 3] = [&g.tokens[..], &g.tokens[3..20], &g.tokens[30..31]];
        let mut state = e.new_state(3).unwrap();
        let batched = e.forward(&mut state, &seqs, LogitsMode::All).unwrap();
        for (b, seq) in seqs.iter().enumerate() {
            let mut single = e.new_state(1).unwrap();
            let alone = e.forward(&mut single, &[seq], LogitsMode::All).unwrap().remove(0);
            assert_eq!(batched[b], alone, "{name}: sequence {b} batched vs alone");
            assert_eq!(state.read(b).unwrap(), single.read(0).unwrap(), "{name}: sequence {b} state");
        }
        assert_eq!(batched[0], whole, "{name}: chunks of 5 vs whole");
    }
}

/// Rewrites the checkpoint `src` with the shapes in `reshape` replaced (the
/// same bytes: a reshape) and returns the new file.
fn reshaped(src: &PathBuf, reshape: &[(&str, Vec<usize>)], tag: &str) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shapes: HashMap<&str, &Vec<usize>> = reshape.iter().map(|(n, s)| (*n, s)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let shape = shapes.get(name.as_str()).map(|s| (*s).clone()).unwrap_or_else(|| t.shape().to_vec());
            let view = safetensors::tensor::TensorView::new(t.dtype(), shape, t.data()).unwrap();
            (name, view)
        })
        .collect();
    let out = std::env::temp_dir().join(format!("rwkv-headsize-{tag}-{}.safetensors", std::process::id()));
    std::fs::write(&out, safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()).unwrap();
    out
}

fn load_err(path: &PathBuf) -> Option<Error> {
    let ctx = gpu()?;
    let e = Model::load(&ctx, path, &LoadOptions::default()).err().expect("the file must be refused");
    std::fs::remove_file(path).ok();
    Some(e)
}

#[test]
fn contradicting_or_oversized_head_shapes_are_errors() {
    if gpu().is_none() {
        return;
    }
    // Layer 1 of a 4 x 16 v6 model with an 8 x 8 bonus: names that tensor.
    let f = reshaped(&model_file("v6-L2-C64-V512-fp32-hs16"), &[("blocks.1.att.time_faaaa", vec![8, 8])], "v6");
    let Some(e) = load_err(&f) else { return };
    assert!(matches!(&e, Error::ShapeMismatch { name, .. } if name == "blocks.1.att.time_faaaa"), "{e}");
    assert!(e.to_string().contains("[4, 16]"), "{e}");

    // 5.2 whose decay says 8 x 8 where its bonus says 4 x 16.
    let f = reshaped(&model_file("v5.2-L2-C64-V512-fp16-hs8"), &[("blocks.0.att.time_faaaa", vec![4, 16])], "v52");
    let Some(e) = load_err(&f) else { return };
    assert!(matches!(&e, Error::ShapeMismatch { name, .. } if name == "blocks.0.att.time_decay"), "{e}");

    // 5.0 with 3 heads of a 64-wide model: no whole head size.
    let f = reshaped(&model_file("v5.0-L2-C64-V512-fp32-hs8"), &[("blocks.0.att.time_decay", vec![2, 4])], "v50");
    let Some(e) = load_err(&f) else { return };
    assert!(matches!(&e, Error::ShapeMismatch { name, .. } if name == "blocks.0.att.time_decay"), "{e}");

    // One head of 128 (r_k [1, 128]) is beyond the WKV kernels' 64: the
    // error names the limit.
    let src = model_path("v7-L2-C128-V512-fp32");
    let mut shapes = vec![];
    let names: Vec<String> = (0..2).map(|l| format!("blocks.{l}.att.r_k")).collect();
    for n in &names {
        shapes.push((n.as_str(), vec![1, 128]));
    }
    let f = reshaped(&src, &shapes, "v7");
    let Some(e) = load_err(&f) else { return };
    assert!(matches!(e, Error::UnsupportedShape(_)), "{e}");
    assert!(e.to_string().contains("head size 128") && e.to_string().contains("up to 64"), "{e}");
    let _ = SafeTensorsFile::open(&src).unwrap();
}
