//! Every GPU kernel against a plain CPU implementation, on random inputs
//! whose shapes are not multiples of the workgroup size (64) or of the
//! linear kernel's token tile (4).

#![allow(clippy::needless_range_loop)] // index loops mirror the kernels

mod common;

use common::*;
use half::{bf16, f16};
use rwkv_wgpu::gpu::kernels::*;

use rwkv_wgpu::gpu::{
    GpuBuffer, GpuContext, ParamArena, Pipeline, Recorder, WeightStore, Workspace, STORAGE, X_WINDOW_BYTES,
};
use rwkv_wgpu::ops::{record_wkv5, record_wkv7, WkvTextures};
use rwkv_wgpu::quant::{self, quantize, Encoding, Format, Scheme};
use rwkv_wgpu::reference::{layer_norm, sigmoid};
use rwkv_wgpu::Dtype;
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

/// Tokens per invocation of the element-wise kernels on this adapter.
fn tpw(ctx: &GpuContext) -> u32 {
    ctx.plan().elementwise_tokens()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

/// Records what `f` records into one submission and waits for it; `ws`
/// holds the x texture texture matrices copy x into.
fn run<'a>(ctx: &'a GpuContext, ws: &'a Workspace, f: impl FnOnce(&mut Recorder<'a>)) {
    let mut rec = Recorder::new(ctx, ws);
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
        Act::Silu => x * sigmoid(x),
    }
}

/// erf in f64 to ~1e-13: its Taylor series near 0, else 1 - erfc by the
/// continued fraction (Rust's std has no erf).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let r = if z <= 2.5 {
        let (mut term, mut sum) = (z, z);
        for n in 1..80 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(z) = exp(-z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))).
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

/// RoPE against the CPU in f64 (with the f32 angles transformers uses):
/// grouped heads at a row stride and offset, partial rotary (GPT-NeoX's
/// quarter of a head), positions up to 32k.
#[test]
fn rope_rotates_half_of_each_head() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(41);
    for (n_head, head_dim, rotary) in [(3usize, 32usize, 32usize), (4, 32, 8), (2, 64, 64)] {
        let n = 5;
        let (offset, stride) = (4, n_head * head_dim + 12);
        let x = rng.vec(offset + n * stride, 2.0);
        let positions: Vec<u32> = vec![0, 1, 17, 4095, 32767];
        let theta = 10000f32;
        let inv_freq: Vec<f32> = (0..rotary / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / rotary as f32)).collect();
        let cs = rwkv_wgpu::ops::rope_cos_sin(&positions, &inv_freq);
        let (xb, csb) = (ctx.storage_f32("x", &x).unwrap(), ctx.storage_f32("cs", &cs).unwrap());
        run(&ctx, &ws, |rec| {
            rwkv_wgpu::ops::rope(rec, &xb, &csb, n, n_head, head_dim, rotary, stride, offset).unwrap()
        });
        let mut want = f64s(&x);
        let half = rotary / 2;
        for t in 0..n {
            for h in 0..n_head {
                let base = offset + t * stride + h * head_dim;
                for i in 0..half {
                    let angle = (positions[t] as f32 * inv_freq[i]) as f64;
                    let (c, s) = (angle.cos(), angle.sin());
                    let (a, b) = (x[base + i] as f64, x[base + i + half] as f64);
                    want[base + i] = a * c - b * s;
                    want[base + i + half] = b * c + a * s;
                }
            }
        }
        check(&format!("rope {n_head}x{head_dim} rotary {rotary}"), &ctx.read_f32(&xb).unwrap(), &want);
    }
}

#[test]
fn exact_gelu_matches_erf() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    // From -12 to 12 (both tails), at an offset.
    let vals: Vec<f32> = (0..245).map(|i| -12.0 + 0.1 * (i as f32 - 4.0)).collect();
    let xb = ctx.storage_f32("x", &vals).unwrap();
    run(&ctx, &ws, |rec| rwkv_wgpu::ops::gelu(rec, &xb, 4, vals.len() - 4).unwrap());
    let gelu = |x: f64| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let want: Vec<f64> = vals.iter().enumerate().map(|(i, &v)| if i < 4 { v as f64 } else { gelu(v as f64) }).collect();
    check("gelu", &ctx.read_f32(&xb).unwrap(), &want);
    // The reference itself: erf at known points.
    assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-13);
    assert!((erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-13);
}

fn zeros(ctx: &GpuContext, n: usize) -> GpuBuffer {
    ctx.buffer("out", (n * 4) as u64, STORAGE).unwrap()
}

#[test]
fn linear_all_dtypes_acts_and_parts() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
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
            run(&ctx, &ws, |rec| m.linear(rec, &xb, x_off, &yb, 5, n, act, accumulate).unwrap());
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
    let ws = Workspace::new();
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
                let key = Pipeline::LinearSg { weights: dtype, tokens: tn };
                run(&ctx, &ws, |rec| rec.dispatch(key, &params, &[&wbuf, &xb, &yb], groups).unwrap());
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

/// x for a texture matrix: exactly as long as its rows (copied into the x
/// texture), or with a uniform window of slack after it (`windowed`: read
/// in place through the window).
fn x_buffer(ctx: &GpuContext, x: &[f32], windowed: bool) -> GpuBuffer {
    let slack = if windowed { (X_WINDOW_BYTES / 4) as usize } else { 0 };
    let xs: Vec<f32> = x.iter().copied().chain(std::iter::repeat_n(0.0, slack)).collect();
    ctx.storage_f32("x", &xs).unwrap()
}

/// The block-quantized matrix kernels (`linear_q.wgsl` on buffers,
/// `linear_q_tex.wgsl` on textures) against the CPU product with
/// `Quantized::dequantize`'s exact weights: int8 and q4, blocks of 32 and
/// 64, one token and several (not multiples of either kernel's token tile),
/// rows not a multiple of a row tile and split over three parts or layers,
/// X at an offset, Y accumulated, and x read through the x texture and the
/// uniform window. Each token's row of a batched product must equal the
/// product of that token alone, bit for bit (batch == single).
#[test]
fn linear_quantized_kernels() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut stores = vec![WeightStore::Buffer];
    if ctx.subgroup_size().is_some() {
        stores.push(WeightStore::Texture);
    } else if std::env::var_os("CI").is_some() {
        panic!("CI runs on lavapipe, which has fixed-size subgroups: the texture kernel must be tested");
    }
    let mut rng = Rng::new(31);
    let tile = ctx.plan().texture_tile_rows();
    for store in stores {
        for format in [Format::Int8, Format::Q4] {
            for block in [32, 64] {
                let scheme = Scheme { format, block };
                // (tokens, d_in, d_out, act, accumulate, windowed)
                let mut cases = vec![
                    (1, 192, 2 * tile + 7, Act::None, false, false),
                    (1, 192, 150, Act::Tanh, true, true),
                    (2, 192, 150, Act::Sigmoid, false, true),
                    (7, 256, 2 * tile + 7, Act::ReluSq, true, false),
                    (9, 192, 37, Act::None, false, true),
                    (17, 64, 150, Act::Silu, false, false),
                    // 12 blocks of 64 (768 wide): a scale texel and a half.
                    (3, 768, 20, Act::None, true, true),
                ];
                if block == 32 {
                    // Columns that are whole blocks of 32 but not 64 wide
                    // (texture matrices fall back to buffers).
                    cases.push((5, 96, 40, Act::None, false, false));
                }
                for (n, d_in, d_out, act, accumulate, windowed) in cases {
                    let w = rng.vec(d_out * d_in, 0.3);
                    let q = quantize(scheme, &w, d_out, d_in).unwrap();
                    let wv = q.dequantize();
                    let row_bytes = q.bytes() / d_out;
                    let part = (tile * row_bytes) as u64;
                    let m = Matrix::upload_quantized(&ctx, store, "w", &q, part).unwrap();
                    let want_store = if d_in % 64 == 0 { store } else { WeightStore::Buffer };
                    assert_eq!(m.store(), want_store, "{scheme} [{d_out}, {d_in}]");
                    assert_eq!(m.part_count(), d_out.div_ceil(tile));
                    let x_off = 8;
                    let x = rng.vec(x_off + n * d_in, 1.0);
                    let y0 = rng.vec(5 + n * d_out, 1.0);
                    let (xb, yb) = (x_buffer(&ctx, &x, windowed), ctx.storage_f32("y", &y0).unwrap());
                    run(&ctx, &ws, |rec| m.linear(rec, &xb, x_off, &yb, 5, n, act, accumulate).unwrap());
                    let got = ctx.read_f32(&yb).unwrap();
                    // linear_qx_tex quantizes x per block of 64 first: its
                    // reference product is with those x values.
                    let qx = store == WeightStore::Texture && ctx.plan().qx_groups(Encoding::Blocks(scheme));
                    let xr: Vec<f64> = if qx {
                        let mut xr = f64s(&x[..x_off]);
                        for row in x[x_off..].chunks(d_in) {
                            let (codes, scales) = quant::quantize_x(format, row);
                            xr.extend(codes.iter().enumerate().map(|(i, &c)| c as f64 * scales[i / 64] as f64));
                        }
                        xr
                    } else {
                        f64s(&x)
                    };
                    let mut want = f64s(&y0);
                    for t in 0..n {
                        for o in 0..d_out {
                            let acc: f64 = (0..d_in).map(|i| wv[o * d_in + i] as f64 * xr[x_off + t * d_in + i]).sum();
                            let v = act_ref(act, acc);
                            let yi = 5 + t * d_out + o;
                            want[yi] = if accumulate { want[yi] + v } else { v };
                        }
                    }
                    let what = format!("{store:?} {scheme} n={n} [{d_out}, {d_in}] {act:?} windowed={windowed}");
                    check(&what, &got, &want);
                    // Batch == single: token t alone, from its own x row.
                    if n > 1 {
                        for t in [0, n / 2, n - 1] {
                            let y1 = ctx.storage_f32("y1", &y0[5 + t * d_out..5 + (t + 1) * d_out]).unwrap();
                            let xb1 = x_buffer(&ctx, &x[x_off + t * d_in..x_off + (t + 1) * d_in], windowed);
                            run(&ctx, &ws, |rec| m.linear(rec, &xb1, 0, &y1, 0, 1, act, accumulate).unwrap());
                            let solo = ctx.read_f32(&y1).unwrap();
                            let batched = &got[5 + t * d_out..5 + (t + 1) * d_out];
                            let same = solo.iter().zip(batched).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{what}: token {t} alone differs from its row of the batch");
                        }
                    }
                }
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
    let ws = Workspace::new();
    if ctx.subgroup_size().is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("CI runs on lavapipe, which has fixed-size subgroups: the texture kernel must be tested");
        }
        return;
    }
    let mut rng = Rng::new(21);
    // Layers hold whole prefill tiles (128 rows on lavapipe): 2 tiles + 1
    // rows in layers of one tile are three layers there.
    let tile = ctx.plan().texture_tile_rows();
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
    // At most 8 rows per lane (LoRA ranks): the 8-row prefill tile.
    cases.push((Dtype::F32, 9, 192, 64, tile, Act::Sigmoid, true));
    cases.push((Dtype::BF16, 17, 128, 37, tile, Act::None, false));
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
        let (xb, yb) = (x_buffer(&ctx, &x, windowed), ctx.storage_f32("y", &y0).unwrap());
        run(&ctx, &ws, |rec| m.linear(rec, &xb, x_off, &yb, 5, n, act, accumulate).unwrap());
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
    let ws = Workspace::new();
    let mut rng = Rng::new(11);
    let (n, d_in, d_out) = (5, 16384 + 3, 3);
    let w = rng.vec(d_out * d_in, 0.05);
    let m = Matrix::upload(&ctx, "w", Dtype::F32, d_out, d_in, bytemuck::cast_slice(&w), 1 << 30).unwrap();
    let x = rng.vec(n * d_in, 1.0);
    let (xb, yb) = (ctx.storage_f32("x", &x).unwrap(), zeros(&ctx, n * d_out));
    run(&ctx, &ws, |rec| m.linear(rec, &xb, 0, &yb, 0, n, Act::None, false).unwrap());
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
    let ws = Workspace::new();
    // Pre-activations from -200 to 200 and tiny ones: tanh must not overflow
    // to NaN and must keep small values accurate.
    let vals: Vec<f32> = vec![-200.0, -20.0, -1.0, -1e-4, 0.0, 3e-4, 0.3, 5.0, 90.0, 200.0];
    let m = Matrix::upload(&ctx, "one", Dtype::F32, 1, 1, bytemuck::cast_slice(&[1f32]), 1 << 20).unwrap();
    let xb = ctx.storage_f32("x", &vals).unwrap();
    let yb = zeros(&ctx, vals.len());
    run(&ctx, &ws, |rec| m.linear(rec, &xb, 0, &yb, 0, vals.len(), Act::Tanh, false).unwrap());
    let got = ctx.read_f32(&yb).unwrap();
    let want: Vec<f64> = vals.iter().map(|v| (*v as f64).tanh()).collect();
    check("tanh", &got, &want);
}

/// RMSNorm against the CPU in f64: rows not a multiple of a run of 8,
/// widths not a multiple of the 64-lane tree, x and y at offsets.
#[test]
fn rms_norm_rows() {
    let Some(default) = gpu() else { return };
    // Also with no subgroups (64-lane shared-memory sums, one row per workgroup).
    let opts =
        rwkv_wgpu::GpuOptions { weight_store: Some(WeightStore::Buffer), no_subgroups: true, ..Default::default() };
    let plain = GpuContext::new(&opts).unwrap();
    for ctx in [default, plain] {
        rms_norm_on(&ctx);
    }
}

fn rms_norm_on(ctx: &GpuContext) {
    let ws = Workspace::new();
    let mut rng = Rng::new(33);
    for (rows, dim) in [(1, 64), (5, 100), (11, 576), (3, 2052)] {
        let x = rng.vec(8 + rows * dim, 3.0);
        let vecs = rng.vec(2 * dim, 1.0); // weight at slot 1
        let xb = ctx.storage_f32("x", &x[8..]).unwrap();
        let vb = ctx.storage_f32("vecs", &vecs).unwrap();
        let yb = zeros(ctx, rows * dim);
        run(ctx, &ws, |rec| rwkv_wgpu::ops::rms_norm(rec, &xb, &yb, &vb, dim, rows, dim, 1e-6).unwrap());
        let mut want = vec![0f64; rows * dim];
        for r in 0..rows {
            let row = &x[8 + r * dim..8 + (r + 1) * dim];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let rstd = 1.0 / (ms + 1e-6).sqrt();
            for c in 0..dim {
                want[r * dim + c] = row[c] as f64 * rstd * vecs[dim + c] as f64;
            }
        }
        let what = format!("rms_norm {rows}x{dim} ({})", ctx.plan());
        check(&what, &ctx.read_f32(&yb).unwrap(), &want);
    }
}

#[test]
fn layer_norm_rows() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(3);
    // 5 rows (one partial run of 8 on CPU adapters), 11 rows (two runs),
    // 11 rows of 2052 (rows too long to keep per invocation: read per pass).
    for (rows, dim) in [(5, 100), (11, 100), (11, 2052)] {
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
        run(&ctx, &ws, |rec| rec.dispatch(ctx.plan().layer_norm(), &p, &[&xb, &vb, &yb], p.groups(tpw(&ctx))).unwrap());
        let got = ctx.read_f32(&yb).unwrap();
        let (w, b) = (f64s(&vecs[dim..2 * dim]), f64s(&vecs[2 * dim..]));
        let mut want = vec![0.0; 12];
        for r in 0..rows {
            want.extend(layer_norm(&f64s(&x[r * dim..(r + 1) * dim]), &w, &b, 1e-5));
        }
        check(&format!("layer_norm {rows}x{dim}"), &got, &want);
    }
}

/// `seq_start` of sequences of `lens` tokens laid end to end: [0, l0, l0 + l1, ..].
fn starts(lens: &[usize]) -> Vec<u32> {
    let mut s = vec![0u32];
    for l in lens {
        s.push(s.last().unwrap() + *l as u32);
    }
    s
}

/// Three sequences of 4, 0 and 5 tokens.
fn three_sequences() -> (Vec<u32>, Vec<u32>) {
    let seq_start = vec![0u32, 4, 4, 9];
    let tok_seq = vec![0, 0, 0, 0, 2, 2, 2, 2, 2];
    (seq_start, tok_seq)
}

/// Token shift with and without the state hand-over, and with RWKV-6's
/// per-token extra mix.
#[test]
fn token_shift_and_state_hand_over() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(4);
    let (dim, n_mix, n_seq) = (68, 3, 3);
    let (seq_start, tok_seq) = three_sequences();
    let n = tok_seq.len();
    let (stride, off) = (2 * dim + 8, dim + 4);
    let x = rng.vec(n * dim, 1.0);
    let state = rng.vec(n_seq * stride, 1.0);
    let vecs = rng.vec((1 + n_mix) * dim, 1.0); // mixes from slot 1
    let out_plane = n * dim + 4;
    let extra = rng.vec(n_mix * out_plane, 0.3);
    for (hand_over, with_extra) in [(true, false), (false, true)] {
        let (xb, sb, vb, eb) = (
            ctx.storage_f32("x", &x).unwrap(),
            ctx.storage_f32("state", &state).unwrap(),
            ctx.storage_f32("vecs", &vecs).unwrap(),
            ctx.storage_f32("extra", &extra).unwrap(),
        );
        let (tsb, ssb) =
            (ctx.storage_u32("tok_seq", &tok_seq).unwrap(), ctx.storage_u32("seq_start", &seq_start).unwrap());
        let out = zeros(&ctx, n_mix * out_plane);
        let shift = TokenShiftParams {
            n_tok: n as u32,
            dim: dim as u32,
            n_mix: n_mix as u32,
            mix_offset: dim as u32,
            state_stride: stride as u32,
            state_offset: off as u32,
            out_plane: out_plane as u32,
            hand_over: hand_over as u32,
            extra_plane: if with_extra { out_plane as u32 } else { 0 },
            _pad: [0; 3],
        };
        let rows = shift.groups(tpw(&ctx));
        let bindings = [&xb, &tsb, &ssb, &sb, &vb, &out, &eb];
        run(&ctx, &ws, |rec| rec.dispatch(ctx.plan().token_shift(), &shift, &bindings, rows).unwrap());
        let got = ctx.read_f32(&out).unwrap();
        let mut want = vec![0.0; n_mix * out_plane];
        for t in 0..n {
            let b = tok_seq[t] as usize;
            for c in 0..dim {
                let cur = x[t * dim + c] as f64;
                let prev =
                    if t as u32 == seq_start[b] { state[b * stride + off + c] } else { x[(t - 1) * dim + c] } as f64;
                for m in 0..n_mix {
                    let o = m * out_plane + t * dim + c;
                    let e = if with_extra { extra[o] as f64 } else { 0.0 };
                    want[o] = cur + (prev - cur) * (vecs[(1 + m) * dim + c] as f64 + e);
                }
            }
        }
        check(&format!("token_shift (hand over {hand_over}, extra {with_extra})"), &got, &want);

        let got = ctx.read_f32(&sb).unwrap();
        let mut want = f64s(&state);
        for b in 0..n_seq {
            let (s, e) = (seq_start[b] as usize, seq_start[b + 1] as usize);
            if hand_over && e > s {
                for c in 0..dim {
                    want[b * stride + off + c] = x[(e - 1) * dim + c] as f64;
                }
            }
        }
        check(&format!("token_shift state (hand over {hand_over})"), &got, &want);
    }
}

#[test]
fn gather_rows() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(5);
    let dim = 70;
    let x = rng.vec(9 * dim, 1.0);
    let rows = vec![99u32, 8, 3, 0, 3]; // first entry skipped by rows_offset
    let (xb, rb) = (ctx.storage_f32("x", &x).unwrap(), ctx.storage_u32("rows", &rows).unwrap());
    let out = zeros(&ctx, 4 * dim);
    let p = GatherParams { n_out: 4, dim: dim as u32, rows_offset: 1, _pad: 0 };
    run(&ctx, &ws, |rec| rec.dispatch(Pipeline::GatherRows, &p, &[&rb, &xb, &out], [2, 4, 1]).unwrap());
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
    let ws = Workspace::new();
    let mut rng = Rng::new(6);
    // head_size 40 (< 64 invocations), 2 heads, 11 tokens (a full and a
    // partial run of 8 on CPU adapters), planes with spare capacity.
    let (hs, nh, n, cap) = (40, 2, 11, 12);
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
        run(&ctx, &ws, |rec| {
            rec.dispatch(ctx.plan().v7_prep(), &params, &[&ab, &vb], params.groups(tpw(&ctx))).unwrap()
        });
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
    let ws = Workspace::new();
    let mut rng = Rng::new(seed);
    let nh = 2;
    let dim = nh * hs;
    let seq_start = starts(seq_lens);
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
    if tex && !WkvTextures::fit(ctx, hs, dim, stride, cap, n_seq) {
        // The texture WKV kernels are a CPU-adapter path (subgroups of 8);
        // where the plan chose textures they must run (lavapipe, CI).
        assert!(ctx.weight_store() != WeightStore::Texture, "the texture store must run wkv7_tex");
        return;
    }
    let wkv_tex = tex.then(|| WkvTextures::new(ctx, dim, cap, n_seq).unwrap());
    run(ctx, &ws, |rec| record_wkv7(rec, params, n as u32, longest, &ab, &ssb, &sb, &yb, wkv_tex.as_ref()).unwrap());
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
    // At most one token per sequence (a batch decode step): the `decode` entry.
    check_wkv7(&ctx, 64, &[1, 0, 1, 1], 13, true);
}

#[test]
fn wkv7_long_chunk() {
    let Some(ctx) = gpu() else { return };
    // One long sequence (a 600-token prefill chunk) and a short one.
    check_wkv7(&ctx, 64, &[600, 3], 9, false);
    check_wkv7(&ctx, 64, &[600, 3], 12, true);
}

#[test]
fn group_norm_bonus_gate() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(8);
    // 11 tokens: a full and a partial run of 8 on CPU adapters.
    let (hs, nh, n, cap) = (40, 3, 11, 13);
    let dim = hs * nh;
    let p = cap * dim;
    let att = rng.vec(plane::COUNT as usize * p, 1.0);
    let y: Vec<f32> = rng.vec(n * dim, 3.0).iter().map(|v| v + 0.5).collect();
    let vecs = rng.vec(3 * dim, 1.0); // ln_x w, ln_x b, r_k
                                      // v7 (bonus and gate), v5.1-v6 (gate), v5.0 (neither).
    for (bonus, gate) in [(true, true), (false, true), (false, false)] {
        let (yb, ab, vb) = (
            ctx.storage_f32("y", &y).unwrap(),
            ctx.storage_f32("att", &att).unwrap(),
            ctx.storage_f32("vecs", &vecs).unwrap(),
        );
        let params = GroupNormParams {
            n_tok: n as u32,
            dim: dim as u32,
            head_size: hs as u32,
            plane: p as u32,
            lnx_w: 0,
            lnx_b: dim as u32,
            r_k: 2 * dim as u32,
            eps: 64e-5,
            bonus: bonus as u32,
            gate: gate as u32,
            _pad: [0; 2],
        };
        let groups = params.groups(tpw(&ctx));
        run(&ctx, &ws, |rec| rec.dispatch(ctx.plan().group_norm(), &params, &[&yb, &ab, &vb], groups).unwrap());
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
                let r_k_sum: f64 =
                    (0..hs).map(|j| g(plane::R, o + j) * g(plane::K, o + j) * vecs[2 * dim + c0 + j] as f64).sum();
                for i in 0..hs {
                    let mut v = gn[i];
                    if bonus {
                        v += r_k_sum * g(plane::V, o + i);
                    }
                    if gate {
                        v *= g(plane::G, o + i);
                    }
                    want[o + i] = v;
                }
            }
        }
        check(&format!("group_norm (bonus {bonus}, gate {gate})"), &ctx.read_f32(&yb).unwrap(), &want);
    }
}

/// The RWKV-5/6 WKV against the CPU, with a fixed (v5) and a per-token (v6)
/// decay, over sequences of 4, 0 and 5 tokens and one of 600 (three runs):
/// `wkv5.wgsl`, and `wkv5_tex.wgsl` where the adapter runs it.
#[test]
fn wkv5_fixed_and_dynamic_decay() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let cases = [(&[4usize, 0, 5][..], false, 20), (&[4, 0, 5], true, 21), (&[600, 3], true, 22)];
    for ((seq_lens, dynamic, seed), tex) in cases.iter().flat_map(|c| [(*c, false), (*c, true)]) {
        let mut rng = Rng::new(seed);
        let (hs, nh) = (64, 2);
        let dim = nh * hs;
        let seq_start = starts(seq_lens);
        let n = *seq_start.last().unwrap() as usize;
        let n_seq = seq_lens.len();
        let cap = n + 1;
        let p = cap * dim;
        let att = planes(&mut rng, n, dim, cap);
        // vecs: u, then the decay: fixed w in (0.5, 1), or the time_decay
        // added to plane W before exp(-exp(.)).
        let mut vecs = rng.vec(2 * dim, 0.5);
        if !dynamic {
            vecs[dim..].iter_mut().for_each(|w| *w = 0.75 + 0.24 * *w);
        }
        // State rows of other layers around this one's (for wkv5_tex: sequences
        // whole 256-byte rows apart, this layer at a 16-byte offset).
        let (stride, off) = if tex { (nh * hs * hs + 64, 4) } else { (nh * hs * hs + 5, 3) };
        let state = rng.vec(n_seq * stride, 0.5);
        let (ab, ssb, sb, vb) = (
            ctx.storage_f32("att", &att).unwrap(),
            ctx.storage_u32("seq_start", &seq_start).unwrap(),
            ctx.storage_f32("state", &state).unwrap(),
            ctx.storage_f32("vecs", &vecs).unwrap(),
        );
        let yb = zeros(&ctx, n * dim);
        let longest = seq_lens.iter().copied().max().unwrap_or(0) as u32;
        let params = Wkv5Params {
            n_seq: n_seq as u32,
            n_head: nh as u32,
            head_size: hs as u32,
            dim: dim as u32,
            plane: p as u32,
            state_stride: stride as u32,
            state_offset: off as u32,
            t_first: 0,
            t_count: 0,
            u_offset: 0,
            w_offset: dim as u32,
            w_dynamic: dynamic as u32,
        };
        if tex && !WkvTextures::fit(&ctx, hs, dim, stride, cap, n_seq) {
            assert!(ctx.weight_store() != WeightStore::Texture, "the texture store must run wkv5_tex");
            continue;
        }
        let wkv_tex = tex.then(|| WkvTextures::new(&ctx, dim, cap, n_seq).unwrap());
        run(&ctx, &ws, |rec| {
            record_wkv5(rec, params, n as u32, longest, &ab, &ssb, &sb, &yb, &vb, wkv_tex.as_ref()).unwrap()
        });
        let mut s = f64s(&state);
        let mut y = vec![0f64; n * dim];
        let g = |pl: u32, i: usize| att[pl as usize * p + i] as f64;
        for b in 0..n_seq {
            for t in seq_start[b] as usize..seq_start[b + 1] as usize {
                for h in 0..nh {
                    let base = t * dim + h * hs;
                    let w: Vec<f64> = (0..hs)
                        .map(|j| {
                            let d = vecs[dim + h * hs + j] as f64;
                            if dynamic {
                                (-(d + g(plane::W, base + j)).exp()).exp()
                            } else {
                                d
                            }
                        })
                        .collect();
                    for i in 0..hs {
                        let mut acc = 0.0;
                        for j in 0..hs {
                            let si = b * stride + off + h * hs * hs + i * hs + j; // GPU layout [head, value i, key j]
                            let kv = g(plane::K, base + j) * g(plane::V, base + i);
                            acc += g(plane::R, base + j) * (vecs[h * hs + j] as f64 * kv + s[si]);
                            s[si] = kv + w[j] * s[si];
                        }
                        y[base + i] = acc;
                    }
                }
            }
        }
        let what = format!("wkv5 (dynamic {dynamic}, tex {tex}) lens={seq_lens:?}");
        check(&format!("{what} y"), &ctx.read_f32(&yb).unwrap(), &y);
        check(&format!("{what} state"), &ctx.read_f32(&sb).unwrap(), &s);
    }
}

/// The RWKV-4 WKV against the CPU (the same running-max form in f64), and
/// finite over 10,000 tokens of one repeated input with a large k.
#[test]
fn wkv4_recurrence_and_long_run() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(23);
    let dim = 12;
    for seq_lens in [vec![4usize, 0, 5], vec![10_000]] {
        let long = seq_lens[0] == 10_000;
        let seq_start = starts(&seq_lens);
        let n = *seq_start.last().unwrap() as usize;
        let n_seq = seq_lens.len();
        let p = n * dim;
        let mut att = rng.vec(plane::COUNT as usize * p, 1.0);
        if long {
            // One token repeated: k = 30 (e^30 overflows nothing only in the
            // running-max form), the same v and r everywhere.
            for t in 0..n {
                for c in 0..dim {
                    att[plane::K as usize * p + t * dim + c] = 30.0;
                    att[plane::V as usize * p + t * dim + c] = att[plane::V as usize * p + c];
                    att[plane::R as usize * p + t * dim + c] = 0.5;
                }
            }
        }
        // u, then w = -exp(decay) < 0.
        let mut vecs = rng.vec(2 * dim, 1.0);
        vecs[dim..].iter_mut().for_each(|w| *w = -(*w as f64).exp() as f32);
        let (stride, off) = (3 * dim + 4, 4);
        let mut state = rng.vec(n_seq * stride, 1.0);
        for b in 0..n_seq {
            for c in 0..dim {
                state[b * stride + off + dim + c] = state[b * stride + off + dim + c].abs() + 0.1;
                // bb > 0
            }
        }
        let (ab, ssb, sb, vb) = (
            ctx.storage_f32("att", &att).unwrap(),
            ctx.storage_u32("seq_start", &seq_start).unwrap(),
            ctx.storage_f32("state", &state).unwrap(),
            ctx.storage_f32("vecs", &vecs).unwrap(),
        );
        let yb = zeros(&ctx, n * dim);
        let params = Wkv4Params {
            n_seq: n_seq as u32,
            dim: dim as u32,
            plane: p as u32,
            state_stride: stride as u32,
            state_offset: off as u32,
            u_offset: 0,
            w_offset: dim as u32,
            _pad: 0,
        };
        let groups = [(dim as u32).div_ceil(64), n_seq as u32, 1];
        run(&ctx, &ws, |rec| rec.dispatch(Pipeline::Wkv4, &params, &[&ab, &ssb, &sb, &yb, &vb], groups).unwrap());
        let mut s = f64s(&state);
        let mut y = vec![0f64; n * dim];
        let g = |pl: u32, i: usize| att[pl as usize * p + i] as f64;
        for b in 0..n_seq {
            for c in 0..dim {
                let si = b * stride + off + c;
                let (u, w) = (vecs[c] as f64, vecs[dim + c] as f64);
                let (mut aa, mut bb, mut pp) = (s[si], s[si + dim], s[si + 2 * dim]);
                for t in seq_start[b] as usize..seq_start[b + 1] as usize {
                    let (k, v) = (g(plane::K, t * dim + c), g(plane::V, t * dim + c));
                    let ww = u + k;
                    let q = pp.max(ww);
                    let (e1, e2) = ((pp - q).exp(), (ww - q).exp());
                    y[t * dim + c] = g(plane::R, t * dim + c) * (e1 * aa + e2 * v) / (e1 * bb + e2);
                    let ww = pp + w;
                    let q = ww.max(k);
                    let (e1, e2) = ((ww - q).exp(), (k - q).exp());
                    aa = e1 * aa + e2 * v;
                    bb = e1 * bb + e2;
                    pp = q;
                }
                (s[si], s[si + dim], s[si + 2 * dim]) = (aa, bb, pp);
            }
        }
        let got = ctx.read_f32(&yb).unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "wkv4: non-finite output over {seq_lens:?} tokens");
        check(&format!("wkv4 y lens={}", seq_lens.len()), &got, &y);
        check(&format!("wkv4 state lens={}", seq_lens.len()), &ctx.read_f32(&sb).unwrap(), &s);
    }
}

#[test]
fn mul_add_rows() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
    let mut rng = Rng::new(24);
    let (n, dim) = (3, 24);
    let (a, b, x) = (rng.vec(n * dim + 8, 1.0), rng.vec(n * dim + 4, 1.0), rng.vec(n * dim, 1.0));
    let (ab, bb, xb) =
        (ctx.storage_f32("a", &a).unwrap(), ctx.storage_f32("b", &b).unwrap(), ctx.storage_f32("x", &x).unwrap());
    let p = MulAddParams { n_tok: n as u32, dim: dim as u32, a_offset: 8, b_offset: 4 };
    run(&ctx, &ws, |rec| rec.dispatch(Pipeline::MulAdd, &p, &[&ab, &bb, &xb], [1, n as u32, 1]).unwrap());
    let want: Vec<f64> = (0..n * dim).map(|i| x[i] as f64 + a[8 + i] as f64 * b[4 + i] as f64).collect();
    check("mul_add", &ctx.read_f32(&xb).unwrap(), &want);
}

/// A matrix larger than the adapter's storage-binding limit (lavapipe: 128
/// MiB, less than a 65536 x 2048 f16 head) still multiplies: it is split
/// into parts (buffers) or layers (textures) by rows.
#[test]
fn matrix_larger_than_one_binding() {
    let Some(ctx) = gpu() else { return };
    let ws = Workspace::new();
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
        run(&ctx, &ws, |rec| m.linear(rec, &xb, 0, &yb, 0, 1, Act::None, false).unwrap());
        check("linear over texture layers", &ctx.read_f32(&yb).unwrap(), &want);
    }
    let m = Matrix::upload_to(&ctx, WeightStore::Buffer, "big", Dtype::F16, rows, cols, &bytes, part, None).unwrap();
    drop(bytes);
    assert_eq!(m.part_count(), 2);
    assert!(m.bytes() > ctx.max_binding_bytes().min(128 << 20));
    let yb = zeros(&ctx, rows);
    run(&ctx, &ws, |rec| m.linear(rec, &xb, 0, &yb, 0, 1, Act::None, false).unwrap());
    check("linear over two parts", &ctx.read_f32(&yb).unwrap(), &want);
}
