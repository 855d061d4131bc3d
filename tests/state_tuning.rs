//! State-tuned initial states (`blocks.N.att.time_state`, the official
//! state-tuning output): read in the tuning code's [head, value, key] layout,
//! which is RWKV-7's own and the transpose of v5/v6's, and kept by a session
//! across resets.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use rwkv_wgpu::state::load_tuned;
use rwkv_wgpu::{Error, LoadOptions, LogitsMode, Model, Session, Tokenizer};

/// A time_state file from the golden state40 att_kv of `name` ([L, H, N, N]
/// in the model's own layout), written as the tuning code stores it.
fn time_state_file(name: &str, transpose: bool) -> (std::path::PathBuf, Vec<f32>) {
    let g = Golden::load(name);
    let (shape, kv) = g.state("state40", "att_kv");
    let (l, h, n) = (shape[0], shape[1], shape[2]);
    let mut tensors = Vec::new();
    for layer in 0..l {
        let mut m = kv[layer * h * n * n..(layer + 1) * h * n * n].to_vec();
        if transpose {
            for head in 0..h {
                let src = kv[(layer * h + head) * n * n..(layer * h + head + 1) * n * n].to_vec();
                for i in 0..n {
                    for j in 0..n {
                        m[head * n * n + i * n + j] = src[j * n + i];
                    }
                }
            }
        }
        tensors.push((format!("blocks.{layer}.att.time_state"), vec![h, n, n], m));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, v)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(v))
                    .unwrap(),
            )
        })
        .collect();
    // One file per call: the tests run in parallel and write the same model's file.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("rwkv-time-state-{}-{call}-{name}.safetensors", std::process::id()));
    std::fs::write(&path, safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()).unwrap();
    (path, kv)
}

#[test]
fn time_state_loads_in_each_generation_layout() {
    let Some(ctx) = gpu() else { return };
    // v7 keeps the tuning layout; v6 and v5 transpose it.
    for (name, transpose) in
        [("v7-L2-C128-V512-fp32", false), ("v6-L2-C128-V512-fp32", true), ("v5.2-L3-C64-V512-fp16", true)]
    {
        let model = Model::load(&ctx, model_path(name), &LoadOptions::default()).unwrap();
        let (path, kv) = time_state_file(name, transpose);
        let s = load_tuned(&path, model.state_layout()).unwrap();
        assert_eq!(s.get("att_kv").unwrap(), &kv[..], "{name}: att_kv from time_state");
        assert!(s.get("att_x").unwrap().iter().all(|v| *v == 0.0), "{name}: att_x starts at zero");
        std::fs::remove_file(&path).ok();
    }
    // RWKV-4 has no matrix state to tune; a file for another shape is an error.
    let v4 = Model::load(&ctx, model_path("v4-L2-C128-V512-fp32"), &LoadOptions::default()).unwrap();
    let (path, _) = time_state_file("v7-L2-C128-V512-fp32", false);
    assert!(matches!(load_tuned(&path, v4.state_layout()), Err(Error::InvalidArgument(_))));
    let v5 = Model::load(&ctx, model_path("v5.2-L3-C64-V512-fp16"), &LoadOptions::default()).unwrap();
    assert!(matches!(load_tuned(&path, v5.state_layout()), Err(Error::ShapeMismatch { .. })));
    std::fs::remove_file(&path).ok();
}

#[test]
fn session_starts_from_and_resets_to_the_tuned_state() {
    let Some(ctx) = gpu() else { return };
    let name = "v6-L2-C128-V512-fp32";
    let mut model = engine(&ctx, model_path(name), rwkv_wgpu::DEFAULT_CHUNK_TOKENS);
    let (path, _) = time_state_file(name, true);
    let tuned = load_tuned(&path, model.model().state_layout()).unwrap();
    std::fs::remove_file(&path).ok();
    let g = Golden::load(name);
    // The same tokens from the tuned state, through a session and directly.
    let mut state = model.new_state(1).unwrap();
    state.write(0, &tuned).unwrap();
    let direct = model.forward(&mut state, &[&g.tokens[..5]], LogitsMode::Last).unwrap().remove(0);
    let mut fresh = model.new_state(1).unwrap();
    let from_zero = model.forward(&mut fresh, &[&g.tokens[..5]], LogitsMode::Last).unwrap().remove(0);
    assert_ne!(direct, from_zero, "the tuned state must change the logits");

    let tok = Arc::new(Tokenizer::from_spec("world").unwrap());
    let mut session = Session::new(model.model().clone(), tok).unwrap();
    session.set_initial_state(tuned.clone()).unwrap();
    session.feed(&mut model, &g.tokens[..5]).unwrap();
    assert_eq!(session.logits().unwrap(), &direct[..]);
    session.reset().unwrap();
    assert_eq!(session.state().read(0).unwrap(), tuned, "reset returns to the tuned state");
    session.feed(&mut model, &g.tokens[..5]).unwrap();
    assert_eq!(session.logits().unwrap(), &direct[..]);
}
