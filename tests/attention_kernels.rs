//! The Transformer kernels against plain CPU implementations: the KV-cache
//! append (`kv_write`), causal grouped-query attention over the cache with
//! and without splits (`attention`, `attention_combine`), SwiGLU's product
//! and the bias add. Odd shapes: head dims 32/64/80/128, GQA ratios 1, 3
//! and 4, caches that cross the split size, rows not at the buffer's start.

#![allow(clippy::needless_range_loop)] // index loops mirror the kernels

mod common;

use common::*;
use half::f16;
use rwkv_wgpu::gpu::{GpuBuffer, GpuContext, ParamArena, Recorder, WeightStore, Workspace};
use rwkv_wgpu::ops::{self, Attention, AttentionShape};
use rwkv_wgpu::{GpuOptions, KvDtype};

/// Largest |gpu − cpu| / (1 + |cpu|) for attention in f32: a softmax over
/// up to ~700 scores (each a 128-term dot product) and a weighted sum of as
/// many values, with f32 exp: ~1e-6 from rounding; 1e-5 is ten times that
/// and far below a wrong position, head or split (O(0.1) errors).
const ATTENTION_TOL: f64 = 1e-5;

fn contexts() -> Vec<GpuContext> {
    let Some(default) = gpu() else { return Vec::new() };
    // On lavapipe the default plan runs attention_lanes.wgsl; the buffer
    // plan runs attention.wgsl as GPUs do, with subgroups and without (64-lane
    // shared-memory reductions and shuffles).
    let buffers = GpuOptions { weight_store: Some(WeightStore::Buffer), ..Default::default() };
    let no_subgroups = GpuOptions { no_subgroups: true, ..buffers.clone() };
    vec![default, GpuContext::new(&buffers).unwrap(), GpuContext::new(&no_subgroups).unwrap()]
}

fn run<'a>(ctx: &'a GpuContext, ws: &'a Workspace, f: impl FnOnce(&mut Recorder<'a>)) {
    let mut rec = Recorder::new(ctx, ws);
    f(&mut rec);
    rec.submit(&mut ParamArena::new()).unwrap();
    ctx.sync().unwrap();
}

/// A value as the cache stores it.
fn stored(x: f32, dtype: KvDtype) -> f64 {
    match dtype {
        KvDtype::F32 => x as f64,
        KvDtype::F16 => f16::from_f32(x).to_f64(),
    }
}

fn cache_bytes(v: &[f32], dtype: KvDtype) -> Vec<u8> {
    match dtype {
        KvDtype::F32 => bytemuck::cast_slice(v).to_vec(),
        KvDtype::F16 => bytemuck::cast_slice(&v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>()).to_vec(),
    }
}

struct Case {
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Positions already in the cache.
    pos0: usize,
    /// Query rows of the sequence.
    n: usize,
    split_keys: usize,
    part_slots: usize,
}

/// Runs kv_write and attention for one sequence whose rows start at row 3,
/// over a cache holding `pos0` random positions; returns the attention
/// output rows, the CPU result and the cache after the append.
fn attend(ctx: &GpuContext, c: &Case, dtype: KvDtype, seed: u64, one_row_at_a_time: bool) -> (Vec<f32>, Vec<f64>) {
    let ws = Workspace::new();
    let mut rng = Rng::new(seed);
    let shape = AttentionShape::new(c.n_head, c.n_kv_head, c.head_dim).unwrap();
    let (qd, kvd, qkvd) = (shape.q_dim(), shape.kv_dim(), shape.qkv_dim());
    let (row0, rows) = (3, 3 + c.n + 2);
    let cap = c.pos0 + c.n + 7;
    let qkv = rng.vec(rows * qkvd, 1.5);
    let old = rng.vec(2 * cap * kvd, 1.0); // [2, cap, kvd]; positions >= pos0 are overwritten
    let qkv_b = ctx.storage_f32("qkv", &qkv).unwrap();
    let cache = ctx.buffer_from_bytes("cache", &cache_bytes(&old, dtype), rwkv_wgpu::gpu::STORAGE).unwrap();
    let out = ctx.storage_f32("out", &vec![0f32; rows * qd]).unwrap();
    let part = ctx.storage_f32("part", &vec![0f32; 4 * Attention::part_len(&shape, c.part_slots)]).unwrap();
    let op = Attention {
        shape,
        dtype,
        split_keys: c.split_keys,
        qkv: &qkv_b,
        out: &out,
        part: &part,
        part_slots: c.part_slots,
    };
    run(ctx, &ws, |rec| {
        ops::kv_write(rec, &op, &cache, cap, row0, c.n, c.pos0).unwrap();
        if one_row_at_a_time {
            for t in 0..c.n {
                ops::attention(rec, &op, &cache, cap, row0 + t, 1, c.pos0 + t).unwrap();
            }
        } else {
            ops::attention(rec, &op, &cache, cap, row0, c.n, c.pos0).unwrap();
        }
    });

    // The cache: positions before pos0 untouched, then the rows' k and v.
    let got_cache: Vec<f64> = match dtype {
        KvDtype::F32 => ctx.read_f32(&cache).unwrap().iter().map(|&x| x as f64).collect(),
        KvDtype::F16 => {
            let b = ctx.read_bytes(&cache, 0, (2 * cap * kvd * 2) as u64).unwrap();
            bytemuck::pod_collect_to_vec::<u8, f16>(&b).iter().map(|x| x.to_f64()).collect()
        }
    };
    let key = |j: usize, i: usize| -> f64 {
        if j < c.pos0 {
            stored(old[j * kvd + i], dtype)
        } else {
            stored(qkv[(row0 + j - c.pos0) * qkvd + qd + i], dtype)
        }
    };
    let value = |j: usize, i: usize| -> f64 {
        if j < c.pos0 {
            stored(old[cap * kvd + j * kvd + i], dtype)
        } else {
            stored(qkv[(row0 + j - c.pos0) * qkvd + qd + kvd + i], dtype)
        }
    };
    for j in 0..c.pos0 + c.n {
        for i in 0..kvd {
            // f16: pack2x16float may round either way: within one f16 ulp.
            let tol = if dtype == KvDtype::F16 { 1e-3 } else { 0.0 };
            let (gk, gv) = (got_cache[j * kvd + i], got_cache[cap * kvd + j * kvd + i]);
            assert!((gk - key(j, i)).abs() <= tol * (1.0 + key(j, i).abs()), "cache key {j},{i}");
            assert!((gv - value(j, i)).abs() <= tol * (1.0 + value(j, i).abs()), "cache value {j},{i}");
        }
    }

    // attention on the CPU in f64, from the values the GPU cache holds.
    let (hd, g) = (c.head_dim, c.n_head / c.n_kv_head);
    let gk = |j: usize, i: usize| got_cache[j * kvd + i];
    let gv = |j: usize, i: usize| got_cache[cap * kvd + j * kvd + i];
    let mut want = vec![0f64; c.n * qd];
    for t in 0..c.n {
        let pos = c.pos0 + t;
        for h in 0..c.n_head {
            let kh = h / g;
            let q = &qkv[(row0 + t) * qkvd + h * hd..(row0 + t) * qkvd + (h + 1) * hd];
            let scores: Vec<f64> = (0..=pos)
                .map(|j| (0..hd).map(|i| q[i] as f64 * gk(j, kh * hd + i)).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..hd {
                want[t * qd + h * hd + i] = (0..=pos).map(|j| e[j] * gv(j, kh * hd + i)).sum::<f64>() / sum;
            }
        }
    }
    let got = ctx.read_f32(&out).unwrap()[row0 * qd..(row0 + c.n) * qd].to_vec();
    (got, want)
}

fn check(what: &str, got: &[f32], want: &[f64]) {
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        let e = (*g as f64 - w).abs() / (1.0 + w.abs());
        worst = if e.is_nan() { f64::INFINITY } else { worst.max(e) };
    }
    eprintln!("{what}: worst error {worst:.2e}");
    assert!(worst <= ATTENTION_TOL, "{what}: error {worst:.3e}");
}

fn cases(ctx: &GpuContext, dtype: KvDtype) -> Vec<Case> {
    let sk = |shape: (usize, usize, usize), preferred: usize| {
        let s = AttentionShape::new(shape.0, shape.1, shape.2).unwrap();
        ops::attention::split_keys(&s, ctx.plan(), dtype, preferred)
    };
    vec![
        // Multi-head (ratio 1), head dim 32, a fresh cache: one split.
        Case { n_head: 4, n_kv_head: 4, head_dim: 32, pos0: 0, n: 5, split_keys: sk((4, 4, 32), 512), part_slots: 8 },
        // GQA 3, head dim 64, 9 rows after 37 cached; splits of 64: 1 or 2 per row.
        Case { n_head: 6, n_kv_head: 2, head_dim: 64, pos0: 37, n: 9, split_keys: sk((6, 2, 64), 64), part_slots: 8 },
        // GQA 4, head dim 80, 3 rows after 130: three splits, rows in two dispatches.
        Case { n_head: 8, n_kv_head: 2, head_dim: 80, pos0: 130, n: 3, split_keys: sk((8, 2, 80), 64), part_slots: 4 },
        // GQA 4, head dim 128, one decode row after 600 (crossing the default 512).
        Case {
            n_head: 4,
            n_kv_head: 1,
            head_dim: 128,
            pos0: 600,
            n: 1,
            split_keys: sk((4, 1, 128), 512),
            part_slots: 8,
        },
        // Multi-query (ratio 3), head dim 32, 12 rows straddling a split.
        Case { n_head: 3, n_kv_head: 1, head_dim: 32, pos0: 58, n: 12, split_keys: sk((3, 1, 32), 64), part_slots: 16 },
    ]
}

#[test]
fn attention_matches_cpu_f32_and_f16() {
    for ctx in contexts() {
        let gs = ctx.plan().group_size();
        for dtype in [KvDtype::F32, KvDtype::F16] {
            for (i, c) in cases(&ctx, dtype).iter().enumerate() {
                let (got, want) = attend(&ctx, c, dtype, 100 + i as u64, false);
                let shape = AttentionShape::new(c.n_head, c.n_kv_head, c.head_dim).unwrap();
                let what = format!(
                    "attention H{} KV{} d{} pos0 {} n {} splits of {} {dtype} (group size {gs}, {:?})",
                    c.n_head,
                    c.n_kv_head,
                    c.head_dim,
                    c.pos0,
                    c.n,
                    c.split_keys,
                    shape.kernel(ctx.plan(), dtype).0
                );
                check(&what, &got, &want);
            }
        }
    }
}

/// A row's result depends only on its position: the rows in one dispatch
/// or one at a time (as decoding reads them) give the same bits. On a CPU
/// adapter a one-row dispatch of few workgroups runs attention_lanes with
/// one query head per workgroup, the whole step with all heads of a KV
/// head together (GQA cases here), so this also holds the two to the same bits.
#[test]
fn attention_rows_do_not_depend_on_their_step() {
    for ctx in contexts() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            for (i, c) in cases(&ctx, dtype).iter().enumerate() {
                let (whole, _) = attend(&ctx, c, dtype, 200 + i as u64, false);
                let (single, _) = attend(&ctx, c, dtype, 200 + i as u64, true);
                assert!(
                    whole.iter().zip(&single).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "case {i} {dtype}: rows in one dispatch differ from rows one at a time"
                );
            }
        }
    }
}

#[test]
fn attention_shapes_are_checked() {
    assert!(AttentionShape::new(6, 4, 64).is_err(), "heads not a multiple of the KV heads");
    assert!(AttentionShape::new(4, 4, 30).is_err(), "head dim not a multiple of 4");
    assert!(AttentionShape::new(4, 4, 512).is_err(), "head dim over the limit");
    assert!(AttentionShape::new(4, 0, 64).is_err());
}

fn zeros(ctx: &GpuContext, n: usize) -> GpuBuffer {
    ctx.storage_f32("zeros", &vec![0f32; n]).unwrap()
}

#[test]
fn swiglu_and_add_bias() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(7);
    for (rows, ffn) in [(1, 4), (5, 344), (3, 1540)] {
        let h = rng.vec(rows * 2 * ffn, 6.0);
        let hb = ctx.storage_f32("h", &h).unwrap();
        let yb = zeros(&ctx, rows * ffn);
        run(&ctx, &ws, |rec| ops::swiglu(rec, &hb, &yb, rows, ffn).unwrap());
        let mut want = vec![0f64; rows * ffn];
        for r in 0..rows {
            for i in 0..ffn {
                let (g, u) = (h[r * 2 * ffn + i] as f64, h[r * 2 * ffn + ffn + i] as f64);
                want[r * ffn + i] = g / (1.0 + (-g).exp()) * u;
            }
        }
        check(&format!("swiglu {rows}x{ffn}"), &ctx.read_f32(&yb).unwrap(), &want);
    }
    // Bias on 12 channels from element 8 of rows 40 apart, bias at slot 4.
    let (rows, stride, dim, off, boff) = (7, 40, 12, 8, 4);
    let x = rng.vec(rows * stride + off, 1.0);
    let v = rng.vec(boff + dim, 1.0);
    let (xb, vb) = (ctx.storage_f32("x", &x).unwrap(), ctx.storage_f32("v", &v).unwrap());
    run(&ctx, &ws, |rec| ops::add_bias(rec, &xb, off, stride, rows, dim, &vb, boff).unwrap());
    let mut want: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    for r in 0..rows {
        for c in 0..dim {
            want[off + r * stride + c] = (x[off + r * stride + c] + v[boff + c]) as f64;
        }
    }
    check("add_bias", &ctx.read_f32(&xb).unwrap(), &want);
}
