//! The kernels other adapters get, run here on lavapipe by asking for them:
//! weights in storage buffers (discrete GPUs) with the subgroup matrix kernel,
//! and without subgroups at all (the 64-invocation kernels with shared-memory
//! reductions). Each must match the golden logits and states like the
//! default (texture) path in golden.rs, head sizes 8 and 16 included.

mod common;

use common::*;
use rwkv_wgpu::gpu::{GpuContext, GpuOptions, WeightStore};
use rwkv_wgpu::LogitsMode;

fn check_path(what: &str, opts: GpuOptions) {
    if gpu().is_none() {
        return; // no adapter here (allowed only without CI; `gpu` panics under CI)
    }
    let ctx = GpuContext::new(&opts).unwrap();
    assert_eq!(ctx.weight_store(), WeightStore::Buffer, "{what}");
    assert_eq!(ctx.subgroup_size().is_none(), opts.no_subgroups, "{what}");
    let names = V7_FIXTURES.iter().chain(&["v6-L2-C128-V512-fp32", "v5.1-L3-C64-V512-fp16", "v4-L2-C128-V512-fp32"]);
    let main = names.map(|name| (model_path(name), fixture(&format!("golden/{name}.golden.safetensors"))));
    // Head sizes 8 and 16 (fixtures/headsize).
    let headsize = ["v5.0-L2-C64-V512-fp32-hs8", "v5.2-L2-C64-V512-fp16-hs8", "v6-L2-C64-V512-fp32-hs16"].map(|n| {
        let at = |kind: &str, ext: &str| fixture(&format!("headsize/{kind}/{n}.{ext}"));
        (at("models", "safetensors"), at("golden", "golden.safetensors"))
    });
    for (model, golden) in main.chain(headsize) {
        let name = model.file_stem().unwrap().to_string_lossy().into_owned();
        let mut model = engine(&ctx, model, 24);
        let g = Golden::load_at(golden);
        let mut state = model.new_state(1).unwrap();
        let logits = model.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
        let err = rel_l2(&logits, &g.logits);
        assert!(err <= LOGITS_REL_L2, "{what} {name}: logits relative L2 {err:.3e} > {LOGITS_REL_L2:e}");
        assert_eq!(top1_agreement(&logits, &g.logits, g.vocab), 1.0, "{what} {name}: top-1");
        for (field, shape, values) in &state.read(0).unwrap().fields {
            let (gshape, gvalues) = g.state("state", field);
            assert_eq!(shape, &gshape, "{what} {name}: state.{field} shape");
            let err = rel_l2(values, &gvalues);
            assert!(err <= STATE_REL_L2, "{what} {name}: state.{field} relative L2 {err:.3e} > {STATE_REL_L2:e}");
        }
    }
}

#[test]
fn buffer_weights_with_subgroups() {
    check_path("buffers + subgroups", GpuOptions { weight_store: Some(WeightStore::Buffer), ..Default::default() });
}

#[test]
fn buffer_weights_without_subgroups() {
    check_path(
        "buffers, no subgroups",
        GpuOptions { weight_store: Some(WeightStore::Buffer), no_subgroups: true, ..Default::default() },
    );
}
