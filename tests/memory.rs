//! Nothing grows with the number of tokens: after the first chunk, the
//! tracked GPU bytes stay exactly where they are for 10,000 tokens.
//! (Its own test binary, so no other test allocates on the same context.)

mod common;

use common::*;
use rwkv_wgpu::LogitsMode;

#[test]
fn ten_thousand_tokens_in_chunks_allocate_nothing_new() {
    let Some(ctx) = gpu() else { return };
    let mut model = engine(&ctx, model_path("v7-L3-C64-V512-fp16-l0v"), 128);
    let mut state = model.new_state(1).unwrap();
    let mut rng = Rng::new(10);
    let tokens: Vec<u32> = (0..10_000).map(|_| rng.below(512)).collect();

    let first = model.forward(&mut state, &[&tokens[..128]], LogitsMode::Last).unwrap();
    let after_first = ctx.allocated_bytes();
    assert!(first[0].iter().all(|v| v.is_finite()));

    // The rest in calls of different sizes, each split into 128-token steps,
    // some asking for every position's logits.
    let mut pos = 128;
    let mut i = 0;
    while pos < tokens.len() {
        let len = [1, 500, 128, 37, 1000][i % 5].min(tokens.len() - pos);
        let mode = if i % 2 == 0 { LogitsMode::All } else { LogitsMode::Last };
        let out = model.forward(&mut state, &[&tokens[pos..pos + len]], mode).unwrap();
        assert!(out[0].iter().all(|v| v.is_finite()), "non-finite logits at token {pos}");
        assert_eq!(ctx.allocated_bytes(), after_first, "GPU bytes changed at token {pos}");
        pos += len;
        i += 1;
    }
    assert_eq!(ctx.allocated_bytes(), after_first);
    let s = state.read(0).unwrap();
    assert!(s.fields.iter().all(|(_, _, v)| v.iter().all(|x| x.is_finite())));
}
