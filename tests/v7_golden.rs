//! End-to-end RWKV-7 numerics against the float64 golden logits and states.

mod common;

use common::*;
use rwkv_wgpu::{LoadOptions, LogitsMode, Model, StateData};

fn load(name: &str, chunk: usize) -> Option<Model> {
    let ctx = gpu()?;
    let opts = LoadOptions {
        chunk_tokens: chunk,
        ..Default::default()
    };
    Some(Model::load(&ctx, model_path(name), &opts).unwrap())
}

#[test]
fn logits_match_golden_at_every_position() {
    for name in V7_FIXTURES {
        let Some(mut model) = load(name, 256) else { return };
        let g = Golden::load(name);
        let mut state = model.new_state(1).unwrap();
        let logits = model.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
        let err = rel_l2(&logits, &g.logits);
        let top1 = top1_agreement(&logits, &g.logits, g.vocab);
        eprintln!("{name}: rel L2 {err:.3e}, top-1 {top1}");
        assert!(err <= LOGITS_REL_L2, "{name}: relative L2 {err:.3e} > {LOGITS_REL_L2:e}");
        assert_eq!(top1, 1.0, "{name}: top-1 agreement {top1}");
    }
}
