//! Sessions on one shared model, run together by the batcher: each
//! session's logits and state equal its solo run bit for bit, whoever joins
//! or leaves the steps around it, on every kernel path; sessions on two
//! threads share a batch thread; 32 sessions fit one step.

mod common;

use std::sync::Arc;

use common::*;
use rwkv_wgpu::gpu::{GpuContext, GpuOptions, WeightStore};
use rwkv_wgpu::{
    BatchThread, Batcher, Engine, EngineOptions, Error, LoadOptions, LogitsMode, Model, SeqInput, Session, StateData,
    Tokenizer,
};

const MODEL: &str = "v7-L2-C128-V512-fp32";

fn argmax_u32(v: &[f32]) -> u32 {
    argmax(v) as u32
}

/// One session's run alone: its prompt in one call, then `n` greedy tokens
/// one at a time. Returns the logits after the prompt and after each token,
/// and the final state.
fn solo(engine: &mut Engine, prompt: &[u32], n: usize) -> (Vec<Vec<f32>>, StateData) {
    let mut state = engine.new_state(1).unwrap();
    let mut logits = vec![engine.forward(&mut state, &[prompt], LogitsMode::Last).unwrap().remove(0)];
    for _ in 0..n {
        let t = argmax_u32(logits.last().unwrap());
        logits.push(engine.forward(&mut state, &[&[t]], LogitsMode::Last).unwrap().remove(0));
    }
    (logits, state.read(0).unwrap())
}

fn prompts(tokens: &[u32], lens: &[usize]) -> Vec<Vec<u32>> {
    lens.iter().enumerate().map(|(i, &l)| (0..l).map(|j| tokens[(3 * i + j) % tokens.len()]).collect()).collect()
}

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_spec("world").unwrap())
}

/// 8 sessions with prompts of 1 to 64 tokens join one by one (session i at
/// step 2 i) and each leaves after 50 greedy tokens; steps of at most 16
/// tokens, so long prompts are read over several steps beside other
/// sessions' decode tokens.
fn join_and_leave(ctx: &GpuContext, what: &str) {
    let model = Arc::new(Model::load(ctx, model_path(MODEL), &LoadOptions::default()).unwrap());
    let g = Golden::load(MODEL);
    let lens = [1, 64, 7, 12, 33, 3, 20, 48];
    let prompts = prompts(&g.tokens, &lens);
    const N: usize = 50;
    let mut solo_engine = Engine::new(model.clone(), &EngineOptions::default()).unwrap();
    let want: Vec<_> = prompts.iter().map(|p| solo(&mut solo_engine, p, N)).collect();

    let mut batcher = Batcher::new(Engine::new(model.clone(), &EngineOptions { chunk_tokens: 16 }).unwrap());
    let mut sessions: Vec<Session> = (0..8).map(|_| Session::new(model.clone(), tokenizer()).unwrap()).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 8];
    let mut joined = [false; 8];
    let mut step = 0;
    let mut shared_steps = 0;
    loop {
        // Join: session i pushes its prompt at step 2 i.
        for i in 0..8 {
            if !joined[i] && step >= 2 * i {
                sessions[i].push(&prompts[i]).unwrap();
                joined[i] = true;
            }
        }
        // The batch: joined sessions that still have tokens to read.
        let idx: Vec<usize> = (0..8).filter(|&i| sessions[i].pending() > 0).collect();
        if idx.is_empty() && joined.iter().all(|&j| j) {
            break;
        }
        shared_steps += (idx.len() > 1) as usize;
        let mut active: Vec<&mut Session> = sessions.iter_mut().filter(|s| s.pending() > 0).collect();
        batcher.step(&mut active).unwrap();
        // A session that read all its tokens has new logits: record them and
        // push the greedy token, until it has N; then it leaves.
        for i in idx {
            let s = &mut sessions[i];
            if s.pending() == 0 {
                let l = s.logits().unwrap().to_vec();
                if got[i].len() < N {
                    s.push(&[argmax_u32(&l)]).unwrap();
                }
                got[i].push(l);
            }
        }
        step += 1;
        assert!(step < 10_000, "{what}: the batch did not finish");
    }
    assert!(shared_steps > 50, "{what}: only {shared_steps} steps were shared");
    for (i, ((want_logits, want_state), s)) in want.iter().zip(&sessions).enumerate() {
        assert_eq!(got[i].len(), N + 1, "{what}: session {i} logits count");
        for (t, (a, b)) in got[i].iter().zip(want_logits).enumerate() {
            assert!(a == b, "{what}: session {i} (prompt {}) logits {t} differ from its solo run", lens[i]);
        }
        assert_eq!(&s.state().read(0).unwrap(), want_state, "{what}: session {i} state");
    }
}

#[test]
fn sessions_join_and_leave_bit_identical_to_solo_runs() {
    let Some(ctx) = gpu() else { return };
    join_and_leave(&ctx, "texture path");
}

#[test]
fn sessions_join_and_leave_on_the_buffer_paths() {
    if gpu().is_none() {
        return;
    }
    for (what, no_subgroups) in [("buffers + subgroups", false), ("buffers, no subgroups", true)] {
        let opts = GpuOptions { weight_store: Some(WeightStore::Buffer), no_subgroups, ..Default::default() };
        join_and_leave(&GpuContext::new(&opts).unwrap(), what);
    }
}

/// Two threads each own a session on one `Arc<Model>` and feed it through
/// one batch thread, token by token: both get their solo logits.
#[test]
fn two_threads_share_a_batch_thread() {
    let Some(ctx) = gpu() else { return };
    let model = Arc::new(Model::load(&ctx, model_path(MODEL), &LoadOptions::default()).unwrap());
    let g = Golden::load(MODEL);
    let prompts = prompts(&g.tokens, &[29, 5]);
    const N: usize = 30;
    let mut solo_engine = Engine::new(model.clone(), &EngineOptions::default()).unwrap();
    let want: Vec<_> = prompts.iter().map(|p| solo(&mut solo_engine, p, N).0).collect();

    let thread = BatchThread::spawn(Engine::new(model.clone(), &EngineOptions { chunk_tokens: 8 }).unwrap()).unwrap();
    let runs: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let (handle, model, prompt) = (thread.handle(), model.clone(), prompt.clone());
            std::thread::spawn(move || {
                let mut session = Session::new(model, tokenizer()).unwrap();
                let mut logits = Vec::new();
                let mut next = prompt;
                for _ in 0..=N {
                    session = handle.feed(session, &next).unwrap();
                    let l = session.logits().unwrap().to_vec();
                    next = vec![argmax_u32(&l)];
                    logits.push(l);
                }
                logits
            })
        })
        .collect();
    for (i, (run, want)) in runs.into_iter().zip(&want).enumerate() {
        let got = run.join().unwrap();
        assert!(got == *want, "thread {i}: logits differ from the solo run");
    }
}

/// 32 sessions decode in one step, each as it would alone.
#[test]
fn thirty_two_sessions_in_one_step() {
    let Some(ctx) = gpu() else { return };
    let model = Arc::new(Model::load(&ctx, model_path(MODEL), &LoadOptions::default()).unwrap());
    let g = Golden::load(MODEL);
    let lens: Vec<usize> = (0..32).map(|i| 1 + (i * 7) % 23).collect();
    let prompts = prompts(&g.tokens, &lens);
    let mut solo_engine = Engine::new(model.clone(), &EngineOptions::default()).unwrap();
    let want: Vec<_> = prompts.iter().map(|p| solo(&mut solo_engine, p, 1)).collect();

    let mut batcher = Batcher::new(Engine::new(model.clone(), &EngineOptions { chunk_tokens: 16 }).unwrap());
    let mut sessions: Vec<Session> = (0..32).map(|_| Session::new(model.clone(), tokenizer()).unwrap()).collect();
    for (s, p) in sessions.iter_mut().zip(&prompts) {
        s.push(p).unwrap();
    }
    batcher.run(&mut sessions.iter_mut().collect::<Vec<_>>()).unwrap();
    for (i, s) in sessions.iter_mut().enumerate() {
        assert!(s.logits().unwrap() == want[i].0[0], "session {i}: prompt logits");
        s.push(&[argmax_u32(s.logits().unwrap())]).unwrap();
    }
    // One token each: 32 sequences in one step (over the 16-token budget,
    // since every session gets at least one token).
    let d0 = ctx.dispatch_count();
    let read = batcher.step(&mut sessions.iter_mut().collect::<Vec<_>>()).unwrap();
    assert_eq!(read, vec![1; 32], "every session reads its token in the one step");
    let one_step = ctx.dispatch_count() - d0;
    for (i, s) in sessions.iter().enumerate() {
        assert_eq!(s.pending(), 0);
        assert!(s.logits().unwrap() == want[i].0[1], "session {i}: decode logits");
        assert_eq!(s.state().read(0).unwrap(), want[i].1, "session {i}: state");
    }
    // The same step for one session costs as many dispatches: one step, not 32.
    let mut one = Session::new(model.clone(), tokenizer()).unwrap();
    one.push(&[1]).unwrap();
    let d0 = ctx.dispatch_count();
    batcher.step(&mut [&mut one]).unwrap();
    assert_eq!(ctx.dispatch_count() - d0, one_step, "32 sessions took more than one step's dispatches");
}

#[test]
fn mismatched_models_and_oversized_steps_are_errors() {
    let Some(ctx) = gpu() else { return };
    let load = |name: &str| Arc::new(Model::load(&ctx, model_path(name), &LoadOptions::default()).unwrap());
    let (a, b) = (load(MODEL), load("v7-L3-C64-V512-fp16-l0v"));
    let mut engine = Engine::new(a.clone(), &EngineOptions { chunk_tokens: 4 }).unwrap();
    let mut other = Session::new(b.clone(), tokenizer()).unwrap();
    let e = other.feed(&mut engine, &[1]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    other.push(&[1]).unwrap();
    let mut batcher = Batcher::new(engine);
    let e = batcher.step(&mut [&mut other]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // A bad token is refused when pushed, naming it.
    let mut s = Session::new(a.clone(), tokenizer()).unwrap();
    let e = s.push(&[1, 512]).unwrap_err();
    assert!(matches!(e, Error::BadToken { token: 512, position: 1, .. }), "{e}");
    // One engine step over its token budget is refused.
    let mut state = a.new_state(1).unwrap();
    let tokens = [1u32; 5];
    let mut seqs = [SeqInput { state: &mut state, seq: 0, tokens: &tokens, logits: Some(LogitsMode::Last) }];
    let e = batcher.engine().step(&mut seqs).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // A session with tokens pushed for a batcher cannot be fed alone.
    s.push(&[1]).unwrap();
    let e = s.feed(batcher.engine(), &[2]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// What the server's prefix cache relies on: a prompt read in two parts,
/// the state after the first read back to the CPU and written into a fresh
/// session, gives the logits and state of reading it whole, bit for bit, at
/// every split point.
#[test]
fn a_prompt_split_through_a_saved_state_equals_it_whole() {
    let Some(ctx) = gpu() else { return };
    let model = Arc::new(Model::load(&ctx, model_path(MODEL), &LoadOptions::default()).unwrap());
    let g = Golden::load(MODEL);
    let prompt: Vec<u32> = (0..40).map(|j| g.tokens[j % g.tokens.len()]).collect();
    let mut engine = Engine::new(model.clone(), &EngineOptions { chunk_tokens: 16 }).unwrap();
    let mut whole = Session::new(model.clone(), tokenizer()).unwrap();
    whole.feed(&mut engine, &prompt).unwrap();
    let want_state = whole.state().read(0).unwrap();
    for split in [1, 7, 16, 17, 39] {
        let mut first = Session::new(model.clone(), tokenizer()).unwrap();
        first.feed(&mut engine, &prompt[..split]).unwrap();
        let saved = first.state().read(0).unwrap();
        let mut second = Session::new(model.clone(), tokenizer()).unwrap();
        second.state_mut().write(0, &saved).unwrap();
        second.feed(&mut engine, &prompt[split..]).unwrap();
        assert_eq!(second.logits().unwrap(), whole.logits().unwrap(), "split at {split}");
        assert_eq!(second.state().read(0).unwrap().fields, want_state.fields, "split at {split}");
    }
}

/// A session that keeps its rows (to score a prompt) gets, over the steps
/// that read its prompt beside another session's decode tokens, exactly the
/// logits of every prompt token that one `forward` over the whole prompt
/// gives; the other session is unaffected, and the rows stop when asked.
#[test]
fn kept_rows_equal_the_prompt_logits_read_whole() {
    let Some(ctx) = gpu() else { return };
    let model = Arc::new(Model::load(&ctx, model_path(MODEL), &LoadOptions::default()).unwrap());
    let g = Golden::load(MODEL);
    let prompt = prompts(&g.tokens, &[40]).remove(0);
    let vocab = model.info().vocab;
    let mut solo_engine = Engine::new(model.clone(), &EngineOptions::default()).unwrap();
    let mut state = solo_engine.new_state(1).unwrap();
    let want = solo_engine.forward(&mut state, &[&prompt], LogitsMode::All).unwrap().remove(0);
    let (other_want, _) = solo(&mut solo_engine, &prompt[..3], 12);

    let mut batcher = Batcher::new(Engine::new(model.clone(), &EngineOptions { chunk_tokens: 7 }).unwrap());
    let mut scoring = Session::new(model.clone(), tokenizer()).unwrap();
    let mut other = Session::new(model.clone(), tokenizer()).unwrap();
    scoring.keep_rows(true);
    scoring.push(&prompt).unwrap();
    other.push(&prompt[..3]).unwrap();
    let mut rows = Vec::new();
    let mut other_got = Vec::new();
    let mut steps = 0;
    while scoring.pending() > 0 {
        batcher.step(&mut [&mut scoring, &mut other]).unwrap();
        rows.extend(scoring.take_rows());
        if other.pending() == 0 {
            other_got.push(other.logits().unwrap().to_vec());
            other.push(&[argmax_u32(other.logits().unwrap())]).unwrap();
        }
        steps += 1;
    }
    assert!(steps >= 40 / 7, "the prompt was read in {steps} steps");
    assert_eq!(rows.len(), prompt.len() * vocab);
    assert!(rows == want, "kept rows differ from the prompt read whole");
    assert_eq!(scoring.logits().unwrap(), &want[(prompt.len() - 1) * vocab..]);
    assert!(other_got.len() >= 3, "the other session decoded {} tokens beside", other_got.len());
    assert!(other_got.iter().zip(&other_want).all(|(a, b)| a == b), "the other session changed");
    scoring.keep_rows(false);
    scoring.push(&[1]).unwrap();
    batcher.step(&mut [&mut scoring]).unwrap();
    assert!(scoring.take_rows().is_empty());
}
