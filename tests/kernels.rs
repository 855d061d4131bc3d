//! Every GPU kernel against a plain CPU implementation, on random inputs
//! whose shapes are not multiples of the workgroup size (64) or of the
//! linear kernel's token tile (4).

#![allow(clippy::needless_range_loop)] // index loops mirror the kernels

mod common;

use common::*;
use half::{bf16, f16};
use rwkv_wgpu::gpu::kernels::*;

use rwkv_wgpu::gpu::{GpuBuffer, GpuContext, Kernel, ParamArena, Recorder, WeightStore, STORAGE, X_WINDOW_BYTES};
use rwkv_wgpu::loader::Dtype;
use rwkv_wgpu::reference::{layer_norm, sigmoid};
use rwkv_wgpu::Matrix;

/// Largest |gpu − cpu| / (1 + |cpu|) allowed for a single kernel in f32.
/// Dot products here have up to ~300 terms of O(1) values: f32 rounding gives
/// about 1e-6 relative; transcendental functions (exp, tanh) on lavapipe are
/// within a few ulp. 1e-5 is ten times that and far below any indexing bug,
/// which gives O(1) errors.
const KERNEL_TOL: f64 = 1e-5;

/// The same bound for a dot product along one whole row of 16384 terms, as
/// the texture kernel's `prefill` sums it (one lane, one f32 accumulator):
/// the rounding error of a sequential f32 sum grows as about sqrt(N) x 2^-24
/// relative to the result, 128 x 6e-8 = 7.6e-6 here (1.04e-5 measured on
/// random data); ten times that still catches any indexing bug.
const LONG_ROW_TOL: f64 = 1e-4;

fn check(name: &str, gpu: &[f32], cpu: &[f64]) {
    check_tol(name, gpu, cpu, KERNEL_TOL);
}

fn check_tol(name: &str, gpu: &[f32], cpu: &[f64], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{name}: length");
    let mut worst = 0f64;
    let mut at = 0;
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let e = (*g as f64 - c).abs() / (1.0 + c.abs());
        if e.is_nan() || e > worst {
            worst = if e.is_nan() { f64::INFINITY } else { e };
            at = i;
        }
    }
    assert!(worst <= tol, "{name}: error {worst:.3e} at {at} (gpu {}, cpu {})", gpu[at], cpu[at]);
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

fn run<'a>(ctx: &'a GpuContext, f: impl FnOnce(&mut Recorder<'a>)) {
    let mut rec = Recorder::new(ctx);
    f(&mut rec);
    rec.submit(&mut ParamArena::new()).unwrap();
    ctx.sync().unwrap();
}

/// Encodes `v` in `dtype` and returns (bytes, the values as stored, widened).
fn encode(v: &[f32], dtype: Dtype) -> (Vec<u8>, Vec<f64>) {
    match dtype {
        Dtype::F32 => (bytemuck::cast_slice(v).to_vec(), f64s(v)),
        Dtype::F16 => {
            let h: Vec<f16> = v.iter().map(|x| f16::from_f32(*x)).collect();
            (bytemuck::cast_slice(&h).to_vec(), h.iter().map(|x| x.to_f64()).collect())
        }
        Dtype::BF16 => {
            let h: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
            (bytemuck::cast_slice(&h).to_vec(), h.iter().map(|x| x.to_f64()).collect())
        }
    }
}

/// The linear kernels' activation, on the CPU.
fn act_ref(act: Act, x: f64) -> f64 {
    match act {
        Act::None => x,
        Act::Tanh => x.tanh(),
        Act::Sigmoid => sigmoid(x),
        Act::ReluSq => x.max(0.0).powi(2),
    }
}

fn zeros(ctx: &GpuContext, n: usize) -> GpuBuffer {
    ctx.buffer("out", (n * 4) as u64, STORAGE).unwrap()
}

#[test]
fn linear_all_dtypes_acts_and_parts() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(1);
    // d_out 77 split into parts of 30 rows (3 parts), d_in 101 (odd: f16
    // rows straddle u32 words), 7 tokens (not a multiple of 4).
    let (n, d_in, d_out) = (7, 101, 77);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for (act, accumulate) in [(Act::None, false), (Act::Tanh, false), (Act::Sigmoid, true), (Act::ReluSq, true)] {
            let w = rng.vec(d_out * d_in, 0.3);
            let (wb, wv) = encode(&w, dtype);
            let part_bytes = (30 * d_in * dtype.size()) as u64;
            let m =
                Matrix::upload_to(&ctx, WeightStore::Buffer, "w", dtype, d_out, d_in, &wb, part_bytes, None).unwrap();
            assert_eq!((m.part_count(), m.store()), (3, WeightStore::Buffer));
            // X sits at an offset inside a larger buffer, as planes do.
            let x_off = 13;
            let x = rng.vec(x_off + n * d_in, 1.0);
            let y0 = rng.vec(5 + n * d_out, 1.0);
            let xb = ctx.storage_f32("x", &x).unwrap();
            let yb = ctx.storage_f32("y", &y0).unwrap();
            run(&ctx, |rec| m.linear(rec, &xb, x_off, &yb, 5, n, act, accumulate).unwrap());
            let got = ctx.read_f32(&yb).unwrap();
            let mut want = f64s(&y0);
            for t in 0..n {
                for o in 0..d_out {
                    let mut acc = 0f64;
                    for i in 0..d_in {
                        acc += wv[o * d_in + i] * x[x_off + t * d_in + i] as f64;
                    }
                    let v = act_ref(act, acc);
                    let yi = 5 + t * d_out + o;
                    want[yi] = if accumulate { want[yi] + v } else { v };
                }
            }
            check(&format!("linear {dtype:?} {act:?}"), &got, &want);
        }
    }
}

/// The subgroup matmul (`linear_sg.wgsl`, used where the adapter has fixed
/// subgroups, as lavapipe does) against the CPU, for every dtype, one token
/// (decode, TN 1) and several (prefill, TN 4), rows not a multiple of its
/// 16-row tile, and X at an offset.
#[test]
fn linear_subgroup_kernel() {
    let Some(ctx) = gpu() else { return };
    if ctx.subgroup_size().is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("CI runs on lavapipe, which has fixed-size subgroups: the subgroup kernel must be tested");
        }
        return;
    }
    let mut rng = Rng::new(14);
    let (d_in, d_out) = (104, 37);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for (n, tn) in [(1usize, 1u32), (7, LINEAR_TN)] {
            for (act, accumulate) in
                [(Act::None, false), (Act::Tanh, true), (Act::ReluSq, false), (Act::Sigmoid, false)]
            {
                let w = rng.vec(d_out * d_in, 0.3);
                let (wb, wv) = encode(&w, dtype);
                let wbuf = ctx.buffer_from_bytes("w", &wb, STORAGE).unwrap();
                let x_off = 8;
                let x = rng.vec(x_off + n * d_in, 1.0);
                let y0 = rng.vec(3 + n * (d_out + 2), 1.0);
                let (xb, yb) = (ctx.storage_f32("x", &x).unwrap(), ctx.storage_f32("y", &y0).unwrap());
                // Y rows are d_out + 2 wide and this matrix fills columns 2.. (row0 = 2).
                let params = LinearParams {
                    n_rows: n as u32,
                    d_in: d_in as u32,
                    d_out: (d_out + 2) as u32,
                    row0: 2,
                    part_rows: d_out as u32,
                    x_offset: x_off as u32,
                    y_offset: 3,
                    act: act as u32,
                    accumulate: accumulate as u32,
                    _pad: [0; 3],
                };
                let groups = [(d_out as u32).div_ceil(LINEAR_SG_ROWS), (n as u32).div_ceil(tn), 1];
                let variant = wdtype(dtype) | (tn << 8);
                run(&ctx, |rec| rec.dispatch(Kernel::LinearSg, variant, &params, &[&wbuf, &xb, &yb], groups).unwrap());
                let mut want = f64s(&y0);
                for t in 0..n {
                    for o in 0..d_out {
                        let acc: f64 = (0..d_in).map(|i| wv[o * d_in + i] * x[x_off + t * d_in + i] as f64).sum();
                        let v = act_ref(act, acc);
                        let yi = 3 + t * (d_out + 2) + 2 + o;
                        want[yi] = if accumulate { want[yi] + v } else { v };
                    }
                }
                check(&format!("linear_sg {dtype:?} n={n} {act:?}"), &ctx.read_f32(&yb).unwrap(), &want);
            }
        }
    }
}

/// The texture matrix kernel (`linear_tex.wgsl`, lavapipe's default store)
/// against the CPU: every dtype, one token (`decode`) and several
/// (`prefill`, token counts not a multiple of its 4-token tile), rows not a
/// multiple of either row tile and split over three texture layers, X at an
/// offset, Y accumulated; also rows as long as a 7B model's FFN, and more
/// tokens than one texture is high where the adapter's limit allows a test.
#[test]
fn linear_texture_kernel() {
    let Some(ctx) = gpu() else { return };
    if ctx.subgroup_size().is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("CI runs on lavapipe, which has fixed-size subgroups: the texture kernel must be tested");
        }
        return;
    }
    let mut rng = Rng::new(21);
    // Layers hold whole prefill tiles (64 rows on lavapipe): 150 rows in
    // layers of one tile are three layers there.
    let tile = rwkv_wgpu::matrix::texture_tile_rows(&ctx);
    let (d_in, d_out) = (192, 150);
    let max_tex = ctx.max_texture_dims().0 as usize;
    let mut cases = vec![];
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for (n, act, accumulate) in [
            (1, Act::None, false),
            (1, Act::Tanh, true),
            (2, Act::Sigmoid, false),
            (7, Act::ReluSq, true),
            (9, Act::None, false),
        ] {
            cases.push((dtype, n, d_in, d_out, tile, act, accumulate));
        }
    }
    cases.push((Dtype::F16, 3, 16384, 5, tile, Act::None, false));
    cases.push((Dtype::F32, 1, 16384, 5, tile, Act::None, true));
    cases.push((Dtype::BF16, 17, 64, 2 * tile + 1, tile, Act::Tanh, false));
    // 101 tokens of 192: two uniform windows (80 + 21 tokens).
    cases.push((Dtype::F16, 101, 192, 70, tile, Act::None, true));
    if max_tex <= 16384 {
        cases.push((Dtype::F16, max_tex + 3, 64, 5, tile, Act::None, false));
    }
    for ((dtype, n, d_in, d_out, layer_rows, act, accumulate), windowed) in
        cases.into_iter().flat_map(|c| [(c, false), (c, true)])
    {
        if windowed && n > max_tex {
            continue; // this case is about splitting at the texture height
        }
        let w = rng.vec(d_out * d_in, 0.3);
        let (wb, wv) = encode(&w, dtype);
        let part_bytes = (layer_rows * d_in * dtype.size()) as u64;
        let m = Matrix::upload_to(&ctx, WeightStore::Texture, "w", dtype, d_out, d_in, &wb, part_bytes, None).unwrap();
        assert_eq!((m.part_count(), m.store()), (d_out.div_ceil(layer_rows), WeightStore::Texture));
        let x_off = 8;
        let x = rng.vec(x_off + n * d_in, 1.0);
        let y0 = rng.vec(5 + n * d_out, 1.0);
        // x exactly as long as its rows: copied into the x texture; with a
        // uniform window of slack after it: read in place, window by window.
        let slack = if windowed { (X_WINDOW_BYTES / 4) as usize } else { 0 };
        let xs: Vec<f32> = x.iter().copied().chain(std::iter::repeat_n(0.0, slack)).collect();
        let (xb, yb) = (ctx.storage_f32("x", &xs).unwrap(), ctx.storage_f32("y", &y0).unwrap());
        run(&ctx, |rec| m.linear(rec, &xb, x_off, &yb, 5, n, act, accumulate).unwrap());
        let mut want = f64s(&y0);
        for t in 0..n {
            for o in 0..d_out {
                let acc: f64 = (0..d_in).map(|i| wv[o * d_in + i] * x[x_off + t * d_in + i] as f64).sum();
                let v = act_ref(act, acc);
                let yi = 5 + t * d_out + o;
                want[yi] = if accumulate { want[yi] + v } else { v };
            }
        }
        let tol = if d_in > 4096 { LONG_ROW_TOL } else { KERNEL_TOL };
        check_tol(
            &format!("linear_tex {dtype:?} n={n} d_in={d_in} {act:?} windowed={windowed}"),
            &ctx.read_f32(&yb).unwrap(),
            &want,
            tol,
        );
    }
    // Shapes a texture cannot hold fall back to buffers.
    let m = Matrix::upload_to(&ctx, WeightStore::Texture, "w", Dtype::F16, 3, 100, &[0u8; 600], 1 << 20, None).unwrap();
    assert_eq!(m.store(), WeightStore::Buffer);
}

/// Rows as long as the widest real FFN (16384 for a 7B model): llvmpipe
/// silently stops loop nests after 65535 iterations, so the kernel's d_in
/// loop must not nest another loop.
#[test]
fn linear_long_rows() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(11);
    let (n, d_in, d_out) = (5, 16384 + 3, 3);
    let w = rng.vec(d_out * d_in, 0.05);
    let m = Matrix::upload(&ctx, "w", Dtype::F32, d_out, d_in, bytemuck::cast_slice(&w), 1 << 30).unwrap();
    let x = rng.vec(n * d_in, 1.0);
    let (xb, yb) = (ctx.storage_f32("x", &x).unwrap(), zeros(&ctx, n * d_out));
    run(&ctx, |rec| m.linear(rec, &xb, 0, &yb, 0, n, Act::None, false).unwrap());
    let want: Vec<f64> = (0..n)
        .flat_map(|t| {
            let (w, x) = (&w, &x);
            (0..d_out).map(move |o| (0..d_in).map(|i| w[o * d_in + i] as f64 * x[t * d_in + i] as f64).sum())
        })
        .collect();
    check("linear d_in 16387", &ctx.read_f32(&yb).unwrap(), &want);
}

#[test]
fn linear_tanh_extremes_stay_finite() {
    let Some(ctx) = gpu() else { return };
    // Pre-activations from -200 to 200 and tiny ones: tanh must not overflow
    // to NaN and must keep small values accurate.
    let vals: Vec<f32> = vec![-200.0, -20.0, -1.0, -1e-4, 0.0, 3e-4, 0.3, 5.0, 90.0, 200.0];
    let m = Matrix::upload(&ctx, "one", Dtype::F32, 1, 1, bytemuck::cast_slice(&[1f32]), 1 << 20).unwrap();
    let xb = ctx.storage_f32("x", &vals).unwrap();
    let yb = zeros(&ctx, vals.len());
    run(&ctx, |rec| m.linear(rec, &xb, 0, &yb, 0, vals.len(), Act::Tanh, false).unwrap());
    let got = ctx.read_f32(&yb).unwrap();
    let want: Vec<f64> = vals.iter().map(|v| (*v as f64).tanh()).collect();
    check("tanh", &got, &want);
}

#[test]
fn layer_norm_rows() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(3);
    let (rows, dim) = (5, 100);
    let x: Vec<f32> = rng.vec(rows * dim, 2.0).iter().map(|v| v + 0.7).collect();
    let vecs = rng.vec(3 * dim, 1.0); // weight at slot 1, bias at slot 2
    let xb = ctx.storage_f32("x", &x).unwrap();
    let vb = ctx.storage_f32("vecs", &vecs).unwrap();
    let yb = zeros(&ctx, rows * dim + 12);
    let p = LayerNormParams {
        n_rows: rows as u32,
        dim: dim as u32,
        x_offset: 0,
        y_offset: 12,
        w_offset: dim as u32,
        b_offset: 2 * dim as u32,
        eps: 1e-5,
        _pad: 0,
    };
    run(&ctx, |rec| rec.dispatch(Kernel::LayerNorm, 0, &p, &[&xb, &vb, &yb], [rows as u32, 1, 1]).unwrap());
    let got = ctx.read_f32(&yb).unwrap();
    let (w, b) = (f64s(&vecs[dim..2 * dim]), f64s(&vecs[2 * dim..]));
    let mut want = vec![0.0; 12];
    for r in 0..rows {
        want.extend(layer_norm(&f64s(&x[r * dim..(r + 1) * dim]), &w, &b, 1e-5));
    }
    check("layer_norm", &got, &want);
}

/// Three sequences of 4, 0 and 5 tokens.
fn three_sequences() -> (Vec<u32>, Vec<u32>) {
    let seq_start = vec![0u32, 4, 4, 9];
    let tok_seq = vec![0, 0, 0, 0, 2, 2, 2, 2, 2];
    (seq_start, tok_seq)
}

#[test]
fn token_shift_and_state_hand_over() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(4);
    let (dim, n_mix, n_seq) = (68, 3, 3);
    let (seq_start, tok_seq) = three_sequences();
    let n = tok_seq.len();
    let (stride, off) = (2 * dim + 8, dim + 4);
    let x = rng.vec(n * dim, 1.0);
    let state = rng.vec(n_seq * stride, 1.0);
    let vecs = rng.vec((1 + n_mix) * dim, 1.0); // mixes from slot 1
    let out_plane = n * dim + 4;
    let (xb, sb, vb) = (
        ctx.storage_f32("x", &x).unwrap(),
        ctx.storage_f32("state", &state).unwrap(),
        ctx.storage_f32("vecs", &vecs).unwrap(),
    );
    let (tsb, ssb) = (ctx.storage_u32("tok_seq", &tok_seq).unwrap(), ctx.storage_u32("seq_start", &seq_start).unwrap());
    let out = zeros(&ctx, n_mix * out_plane);
    let shift = TokenShiftParams {
        n_tok: n as u32,
        dim: dim as u32,
        n_mix: n_mix as u32,
        mix_offset: dim as u32,
        state_stride: stride as u32,
        state_offset: off as u32,
        out_plane: out_plane as u32,
        _pad: 0,
    };
    let rows = [(dim as u32 / 4).div_ceil(64), n as u32, 1];
    run(&ctx, |rec| rec.dispatch(Kernel::TokenShift, 0, &shift, &[&xb, &tsb, &ssb, &sb, &vb, &out], rows).unwrap());
    let got = ctx.read_f32(&out).unwrap();
    let mut want = vec![0.0; n_mix * out_plane];
    for t in 0..n {
        let b = tok_seq[t] as usize;
        for c in 0..dim {
            let cur = x[t * dim + c] as f64;
            let prev = if t as u32 == seq_start[b] { state[b * stride + off + c] } else { x[(t - 1) * dim + c] } as f64;
            for m in 0..n_mix {
                want[m * out_plane + t * dim + c] = cur + (prev - cur) * vecs[(1 + m) * dim + c] as f64;
            }
        }
    }
    check("token_shift", &got, &want);

    let got = ctx.read_f32(&sb).unwrap();
    let mut want = f64s(&state);
    for b in 0..n_seq {
        let (s, e) = (seq_start[b] as usize, seq_start[b + 1] as usize);
        if e > s {
            for c in 0..dim {
                want[b * stride + off + c] = x[(e - 1) * dim + c] as f64;
            }
        }
    }
    check("token_shift state hand-over", &got, &want);
}

#[test]
fn gather_rows() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(5);
    let dim = 70;
    let x = rng.vec(9 * dim, 1.0);
    let rows = vec![99u32, 8, 3, 0, 3]; // first entry skipped by rows_offset
    let (xb, rb) = (ctx.storage_f32("x", &x).unwrap(), ctx.storage_u32("rows", &rows).unwrap());
    let out = zeros(&ctx, 4 * dim);
    let p = GatherParams { n_out: 4, dim: dim as u32, rows_offset: 1, _pad: 0 };
    run(&ctx, |rec| rec.dispatch(Kernel::GatherRows, 0, &p, &[&rb, &xb, &out], [2, 4, 1]).unwrap());
    let want: Vec<f64> = rows[1..].iter().flat_map(|&r| f64s(&x[r as usize * dim..(r as usize + 1) * dim])).collect();
    check("gather_rows", &ctx.read_f32(&out).unwrap(), &want);
}

/// Random RWKV-7 activation planes for `n` tokens of `dim` channels.
fn planes(rng: &mut Rng, n: usize, dim: usize, cap: usize) -> Vec<f32> {
    let mut att = rng.vec(plane::COUNT as usize * cap * dim, 1.0);
    let p = cap * dim;
    // Decays in (0.5, 1) and a in (0, 1) as the prep kernel makes them.
    for i in 0..n * dim {
        att[plane::W as usize * p + i] = 0.75 + 0.24 * att[plane::W as usize * p + i];
        att[plane::A as usize * p + i] = 0.5 + 0.49 * att[plane::A as usize * p + i];
    }
    att
}

#[test]
fn v7_prep_both_layer_kinds() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(6);
    // head_size 40 (< 64 invocations), 2 heads, 5 tokens, planes with spare capacity.
    let (hs, nh, n, cap) = (40, 2, 5, 6);
    let dim = hs * nh;
    let p = cap * dim;
    for layer0 in [true, false] {
        let att = rng.vec(plane::COUNT as usize * p, 1.5);
        let vecs = rng.vec(5 * dim, 1.0); // w0, a0, v0, k_k, k_a
        let (ab, vb) = (ctx.storage_f32("att", &att).unwrap(), ctx.storage_f32("vecs", &vecs).unwrap());
        let params = V7PrepParams {
            n_tok: n as u32,
            dim: dim as u32,
            head_size: hs as u32,
            plane: p as u32,
            layer0: layer0 as u32,
            w0: 0,
            a0: dim as u32,
            v0: 2 * dim as u32,
            k_k: 3 * dim as u32,
            k_a: 4 * dim as u32,
            _pad: [0; 2],
        };
        run(&ctx, |rec| rec.dispatch(Kernel::V7Prep, 0, &params, &[&ab, &vb], [nh as u32, n as u32, 1]).unwrap());
        let got = ctx.read_f32(&ab).unwrap();
        let mut want = f64s(&att);
        let at = |pl: u32, i: usize| pl as usize * p + i;
        let vec = |slot: usize, c: usize| vecs[slot * dim + c] as f64;
        for t in 0..n {
            for h in 0..nh {
                let base = t * dim + h * hs;
                let kk: Vec<f64> = (0..hs).map(|j| att[at(plane::K, base + j)] as f64 * vec(3, h * hs + j)).collect();
                let norm = kk.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                for j in 0..hs {
                    let (i, c) = (base + j, h * hs + j);
                    want[at(plane::KK, i)] = kk[j] / norm;
                    let a = sigmoid(vec(1, c) + att[at(plane::A, i)] as f64);
                    want[at(plane::A, i)] = a;
                    want[at(plane::K, i)] = att[at(plane::K, i)] as f64 * (1.0 + (a - 1.0) * vec(4, c));
                    want[at(plane::W, i)] = (-(-0.5f64).exp() * sigmoid(vec(0, c) + att[at(plane::W, i)] as f64)).exp();
                    let v = att[at(plane::V, i)] as f64;
                    if layer0 {
                        want[at(plane::V_FIRST, i)] = v;
                    } else {
                        let vf = att[at(plane::V_FIRST, i)] as f64;
                        want[at(plane::V, i)] = v + (vf - v) * sigmoid(vec(2, c) + att[at(plane::V_GATE, i)] as f64);
                    }
                }
            }
        }
        check(&format!("v7_prep layer0={layer0}"), &got, &want);
    }
}

/// The WKV kernel against the CPU. `tex`: `wkv7_tex.wgsl` (head size 64,
/// the planes read from a texture copy of att) instead of `wkv7.wgsl`.
fn check_wkv7(ctx: &GpuContext, hs: usize, seq_lens: &[usize], seed: u64, tex: bool) {
    let mut rng = Rng::new(seed);
    let nh = 2;
    let dim = nh * hs;
    let mut seq_start = vec![0u32];
    for l in seq_lens {
        seq_start.push(seq_start.last().unwrap() + *l as u32);
    }
    let n = *seq_start.last().unwrap() as usize;
    let n_seq = seq_lens.len();
    let cap = n + 1;
    let p = cap * dim;
    let mut att = planes(&mut rng, n, dim, cap);
    // kk is unit-norm per head in the real model.
    for t in 0..n {
        for h in 0..nh {
            let base = plane::KK as usize * p + t * dim + h * hs;
            let norm = att[base..base + hs].iter().map(|v| v * v).sum::<f32>().sqrt();
            att[base..base + hs].iter_mut().for_each(|v| *v /= norm);
        }
    }
    // State rows of other layers around this one's (for wkv7_tex: sequences
    // whole 256-byte rows apart, this layer at a 16-byte offset).
    let (stride, off) = if tex { (nh * hs * hs + 64, 4) } else { (nh * hs * hs + 3, 3) };
    let state = rng.vec(n_seq * stride, 0.5);
    let (ab, ssb, sb) = (
        ctx.storage_f32("att", &att).unwrap(),
        ctx.storage_u32("seq_start", &seq_start).unwrap(),
        ctx.storage_f32("state", &state).unwrap(),
    );
    let yb = zeros(ctx, n * dim);
    let params = Wkv7Params {
        n_seq: n_seq as u32,
        n_head: nh as u32,
        head_size: hs as u32,
        dim: dim as u32,
        plane: p as u32,
        state_stride: stride as u32,
        state_offset: off as u32,
        t_first: 0,
        t_count: 0,
        _pad: [0; 3],
    };
    // Walk the tokens in runs, as the model does.
    let longest = seq_lens.iter().copied().max().unwrap_or(0) as u32;
    let wkv_tex = tex.then(|| {
        assert!(Wkv7Textures::fit(ctx, hs, dim, stride, cap, n_seq), "wkv7_tex.wgsl does not fit this test's shape");
        Wkv7Textures::new(ctx, dim, cap, n_seq).unwrap()
    });
    run(ctx, |rec| record_wkv7(rec, params, n as u32, longest, &ab, &ssb, &sb, &yb, wkv_tex.as_ref()).unwrap());
    let mut s = f64s(&state);
    let mut y = vec![0f64; n * dim];
    let g = |pl: u32, i: usize| att[pl as usize * p + i] as f64;
    for b in 0..n_seq {
        for t in seq_start[b] as usize..seq_start[b + 1] as usize {
            for h in 0..nh {
                let base = t * dim + h * hs;
                for i in 0..hs {
                    let row = b * stride + off + h * hs * hs + i * hs;
                    let sa: f64 = (0..hs).map(|j| s[row + j] * g(plane::KK, base + j)).sum();
                    let mut acc = 0.0;
                    for j in 0..hs {
                        let kk_a = g(plane::KK, base + j) * g(plane::A, base + j);
                        s[row + j] = s[row + j] * g(plane::W, base + j) - sa * kk_a
                            + g(plane::V, base + i) * g(plane::K, base + j);
                        acc += s[row + j] * g(plane::R, base + j);
                    }
                    y[base + i] = acc;
                }
            }
        }
    }
    check(&format!("wkv7 (tex {tex}) y hs={hs} lens={seq_lens:?}"), &ctx.read_f32(&yb).unwrap(), &y);
    check(&format!("wkv7 (tex {tex}) state hs={hs} lens={seq_lens:?}"), &ctx.read_f32(&sb).unwrap(), &s);
}

#[test]
fn wkv7_recurrence_over_uneven_sequences() {
    let Some(ctx) = gpu() else { return };
    // Three sequences of 4, 0 and 5 tokens; head sizes 64 and 24.
    check_wkv7(&ctx, 64, &[4, 0, 5], 7, false);
    check_wkv7(&ctx, 24, &[4, 0, 5], 8, false);
    check_wkv7(&ctx, 64, &[4, 0, 5], 10, true);
    check_wkv7(&ctx, 64, &[1], 11, true);
}

#[test]
fn wkv7_long_chunk() {
    let Some(ctx) = gpu() else { return };
    // One long sequence (a 600-token prefill chunk) and a short one.
    check_wkv7(&ctx, 64, &[600, 3], 9, false);
    check_wkv7(&ctx, 64, &[600, 3], 12, true);
}

#[test]
fn v7_out_group_norm_bonus_gate() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(8);
    let (hs, nh, n, cap) = (40, 3, 5, 7);
    let dim = hs * nh;
    let p = cap * dim;
    let att = rng.vec(plane::COUNT as usize * p, 1.0);
    let y: Vec<f32> = rng.vec(n * dim, 3.0).iter().map(|v| v + 0.5).collect();
    let vecs = rng.vec(3 * dim, 1.0); // ln_x w, ln_x b, r_k
    let (yb, ab, vb) = (
        ctx.storage_f32("y", &y).unwrap(),
        ctx.storage_f32("att", &att).unwrap(),
        ctx.storage_f32("vecs", &vecs).unwrap(),
    );
    let params = V7OutParams {
        n_tok: n as u32,
        dim: dim as u32,
        head_size: hs as u32,
        plane: p as u32,
        lnx_w: 0,
        lnx_b: dim as u32,
        r_k: 2 * dim as u32,
        eps: 64e-5,
    };
    run(&ctx, |rec| rec.dispatch(Kernel::V7Out, 0, &params, &[&yb, &ab, &vb], [nh as u32, n as u32, 1]).unwrap());
    let g = |pl: u32, i: usize| att[pl as usize * p + i] as f64;
    let mut want = vec![0f64; n * dim];
    for t in 0..n {
        for h in 0..nh {
            let o = t * dim + h * hs;
            let c0 = h * hs;
            let gn = layer_norm(
                &f64s(&y[o..o + hs]),
                &f64s(&vecs[c0..c0 + hs]),
                &f64s(&vecs[dim + c0..dim + c0 + hs]),
                64e-5,
            );
            let bonus: f64 =
                (0..hs).map(|j| g(plane::R, o + j) * g(plane::K, o + j) * vecs[2 * dim + c0 + j] as f64).sum();
            for i in 0..hs {
                want[o + i] = (gn[i] + bonus * g(plane::V, o + i)) * g(plane::G, o + i);
            }
        }
    }
    check("v7_out", &ctx.read_f32(&yb).unwrap(), &want);
}

/// A matrix larger than the adapter's storage-binding limit (lavapipe: 128
/// MiB, less than a 65536 x 2048 f16 head) still multiplies: it is split
/// into parts (buffers) or layers (textures) by rows.
#[test]
fn matrix_larger_than_one_binding() {
    let Some(ctx) = gpu() else { return };
    let cols = 2048;
    let row_bytes = (cols * 2) as u64;
    // Use the real limit where it is small (lavapipe); adapters with huge
    // bindings get a 128 MiB part size so the split is still exercised.
    let part = ctx.max_binding_bytes().min(128 << 20);
    let rows = (part / row_bytes) as usize + 5;
    // Small integers / 16: exact in f16, so the CPU sum is exact too.
    let val = |r: usize, c: usize| (((r * 7 + c * 3) % 17) as f32 - 8.0) / 16.0;
    let mut bytes = Vec::with_capacity(rows * cols * 2);
    for r in 0..rows {
        for c in 0..cols {
            bytes.extend_from_slice(&f16::from_f32(val(r, c)).to_le_bytes());
        }
    }
    let x: Vec<f32> = (0..cols).map(|c| ((c % 5) as f32 - 2.0) / 4.0).collect();
    let xb = ctx.storage_f32("x", &x).unwrap();
    let want: Vec<f64> = (0..rows).map(|r| (0..cols).map(|c| val(r, c) as f64 * x[c] as f64).sum()).collect();
    // In textures (where the adapter has them: layers of at most 16384 rows
    // on lavapipe, so three here), then in buffers (two parts).
    if ctx.subgroup_size().is_some() {
        let m =
            Matrix::upload_to(&ctx, WeightStore::Texture, "big", Dtype::F16, rows, cols, &bytes, part, None).unwrap();
        assert_eq!(m.store(), WeightStore::Texture);
        assert!(m.part_count() >= 2);
        let yb = zeros(&ctx, rows);
        run(&ctx, |rec| m.linear(rec, &xb, 0, &yb, 0, 1, Act::None, false).unwrap());
        check("linear over texture layers", &ctx.read_f32(&yb).unwrap(), &want);
    }
    let m = Matrix::upload_to(&ctx, WeightStore::Buffer, "big", Dtype::F16, rows, cols, &bytes, part, None).unwrap();
    drop(bytes);
    assert_eq!(m.part_count(), 2);
    assert!(m.bytes() > ctx.max_binding_bytes().min(128 << 20));
    let yb = zeros(&ctx, rows);
    run(&ctx, |rec| m.linear(rec, &xb, 0, &yb, 0, 1, Act::None, false).unwrap());
    check("linear over two parts", &ctx.read_f32(&yb).unwrap(), &want);
}
