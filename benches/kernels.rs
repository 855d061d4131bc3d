//! Kernel micro-benchmarks: achieved GB/s and GFLOP/s of the matrix kernels,
//! the WKV recurrence and the norms, against this machine's measured memory
//! bandwidth (a CPU copy and a GPU buffer copy). `cargo bench --bench kernels`.
//! Medians of several runs; each run records many dispatches in one
//! submission so per-submission overhead is spread out.

use std::time::Instant;

use rwkv_wgpu::bench::cpu_seconds;
use rwkv_wgpu::gpu::kernels::{Act, LayerNormParams, Wkv7Params, WKV_TOKENS_PER_DISPATCH};
use rwkv_wgpu::gpu::{GpuContext, GpuOptions, ParamArena, Pipeline, Recorder, Workspace, STORAGE, X_WINDOW_BYTES};
use rwkv_wgpu::ops::{record_wkv7, WkvTextures};
use rwkv_wgpu::quant::Format;
use rwkv_wgpu::{Dtype, Matrix};

/// Timed runs per figure (the median is printed): 5, or $RWKV_BENCH_RUNS
/// (more for steadier medians, or to keep a kernel running under a profiler).
fn runs() -> usize {
    std::env::var("RWKV_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median wall and CPU seconds (this process, all threads: on a CPU adapter
/// the kernels' own threads; steadier than wall time on a shared machine) of
/// `record`, which returns its own wall time, after one warm-up run.
fn time(mut record: impl FnMut() -> f64) -> (f64, f64) {
    record(); // warm-up: compile, first touch
    let (mut wall, mut cpu) = (vec![], vec![]);
    for _ in 0..runs() {
        let c0 = cpu_seconds();
        wall.push(record());
        cpu.push(cpu_seconds() - c0);
    }
    (median(wall), median(cpu))
}

/// The x texture's home: one for the whole run (a bench process is short).
fn workspace() -> &'static Workspace {
    static WS: std::sync::OnceLock<Workspace> = std::sync::OnceLock::new();
    WS.get_or_init(Workspace::new)
}

fn submit_timed<'a>(ctx: &'a GpuContext, arena: &mut ParamArena, f: impl FnOnce(&mut Recorder<'a>)) -> f64 {
    let mut rec = Recorder::new(ctx, workspace());
    f(&mut rec);
    let t = Instant::now();
    rec.submit(arena).unwrap();
    ctx.sync().unwrap();
    t.elapsed().as_secs_f64()
}

/// Whether to run a section: all, or those whose name contains the filter
/// given after `--`: `bandwidth`, `linear ROWSxCOLSxTOKENS` (e.g. `linear
/// 65536x768x8`), `wkv7_buffer`, `wkv7_tex`, `layer_norm`; so `cargo bench
/// --bench kernels -- wkv` runs both WKV sections.
fn wanted(section: &str) -> bool {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    filter.is_none_or(|f| section.contains(&f) || f.starts_with(section))
}

fn main() {
    let ctx = match GpuContext::new(&GpuOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            return;
        }
    };
    println!("adapter: {} (subgroups: {:?})", ctx.adapter(), ctx.subgroup_size());
    let mut arena = ParamArena::new();

    if wanted("bandwidth") {
        bandwidth(&ctx, &mut arena);
    }
    // "linear", or a shape such as 768x768x1 (every format at that shape).
    if wanted("linear ") || std::env::args().skip(1).any(|a| a.contains('x') && !a.starts_with("--")) {
        linear(&ctx, &mut arena);
    }
    if wanted("wkv7_buffer") || wanted("wkv7_tex") {
        wkv(&ctx, &mut arena);
    }
    if wanted("layer_norm") {
        layer_norm(&ctx, &mut arena);
    }
}

/// Bandwidth probes: a CPU memcpy and a GPU buffer copy.
fn bandwidth(ctx: &GpuContext, arena: &mut ParamArena) {
    let n = 256usize << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let cpu = median(
        (0..runs())
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let cpu_gbs = 2.0 * n as f64 / cpu / 1e9; // read + write
    let a = ctx.buffer("probe a", n as u64, STORAGE).unwrap();
    let b = ctx.buffer("probe b", n as u64, STORAGE).unwrap();
    let (gpu_copy, _) = time(|| {
        let mut rec = Recorder::new(ctx, workspace());
        rec.copy(&a, 0, &b, 0, n as u64);
        let t = Instant::now();
        rec.submit(arena).unwrap();
        ctx.sync().unwrap();
        t.elapsed().as_secs_f64()
    });
    let gpu_gbs = 2.0 * n as f64 / gpu_copy / 1e9;
    println!("bandwidth: CPU memcpy {cpu_gbs:.2} GB/s, GPU buffer copy {gpu_gbs:.2} GB/s (read + write)");
    drop((a, b, src, dst));
}

fn linear(ctx: &GpuContext, arena: &mut ParamArena) {
    // Matrix kernels, f16 weights and quantized from them (int8, q4), shapes
    // of the 0.1B model (C 768, LoRA ranks padded to 64, F 3072, V 65536).
    let shapes = [(768usize, 768usize), (64, 768), (768, 64), (3072, 768), (768, 3072), (65536, 768)];
    for ((rows, cols), quant) in
        shapes.into_iter().flat_map(|s| [(s, None), (s, Some(Format::Int8)), (s, Some(Format::Q4))])
    {
        let name = quant.map_or("f16", Format::name);
        if !(0..3).any(|i| wanted(&format!("linear {name} {rows}x{cols}x{}", [1, 8, 64][i]))) {
            continue;
        }
        let bytes: Vec<u8> =
            (0..rows * cols).flat_map(|i| half::f16::from_f32(((i % 13) as f32 - 6.0) / 64.0).to_le_bytes()).collect();
        let (store, part) = (ctx.weight_store(), ctx.max_binding_bytes());
        let m = Matrix::upload_encoded(ctx, store, "w", quant, Dtype::F16, rows, cols, &bytes, part, None).unwrap();
        for tokens in [1usize, 8, 64] {
            if !wanted(&format!("linear {name} {rows}x{cols}x{tokens}")) {
                continue;
            }
            // With a uniform window of slack, as the model's activation buffers
            // have: texture matrices read x in place, as in the model.
            let x = ctx.storage_f32("x", &vec![0.5f32; tokens * cols + (X_WINDOW_BYTES / 4) as usize]).unwrap();
            let y = ctx.buffer("y", (tokens * rows * 4) as u64, STORAGE).unwrap();
            let reps = if rows * cols * tokens > 50_000_000 { 2 } else { 20 };
            let (t, cpu) = time(|| {
                submit_timed(ctx, arena, |rec| {
                    for _ in 0..reps {
                        m.linear(rec, &x, 0, &y, 0, tokens, Act::None, false).unwrap();
                    }
                })
            });
            let (t, cpu) = (t / reps as f64, cpu / reps as f64);
            let gbs = m.bytes() as f64 / t / 1e9;
            let gflops = 2.0 * (rows * cols * tokens) as f64 / t / 1e9;
            println!(
                "linear {name:>4} [{rows}x{cols}] x {tokens:>2} tokens: {:8.3} ms ({:8.3} CPU ms)  {gbs:6.2} GB/s weights  {gflops:6.2} GFLOP/s",
                t * 1e3,
                cpu * 1e3
            );
        }
    }
}

fn wkv(ctx: &GpuContext, arena: &mut ParamArena) {
    // WKV (the storage-buffer kernel, wkv7.wgsl): 12 heads of 64, 1 and 512 tokens of one sequence.
    let (nh, hs) = (12usize, 64usize);
    let c = nh * hs;
    for tokens in [1usize, 512].into_iter().filter(|_| wanted("wkv7_buffer")) {
        let att = ctx.storage_f32("att", &vec![0.1f32; 9 * tokens * c]).unwrap();
        let seq = ctx.storage_u32("seq", &[0, tokens as u32]).unwrap();
        let state = ctx.buffer("state", (nh * hs * hs * 4) as u64, STORAGE).unwrap();
        let y = ctx.buffer("y", (tokens * c * 4) as u64, STORAGE).unwrap();
        let (t, cpu) = time(|| {
            submit_timed(ctx, arena, |rec| {
                for t_first in (0..tokens as u32).step_by(WKV_TOKENS_PER_DISPATCH as usize) {
                    let p = Wkv7Params {
                        n_seq: 1,
                        n_head: nh as u32,
                        head_size: hs as u32,
                        dim: c as u32,
                        plane: (tokens * c) as u32,
                        state_stride: (nh * hs * hs) as u32,
                        state_offset: 0,
                        t_first,
                        t_count: WKV_TOKENS_PER_DISPATCH,
                        _pad: [0; 3],
                    };
                    rec.dispatch(Pipeline::Wkv7, &p, &[&att, &seq, &state, &y], [nh as u32, 1, 1]).unwrap();
                }
            })
        });
        let flops = 6.0 * (tokens * nh * hs * hs) as f64;
        println!(
            "wkv7 12x64 heads x {tokens:>3} tokens: {:8.3} ms ({:8.3} CPU ms)  {:6.2} GFLOP/s",
            t * 1e3,
            cpu * 1e3,
            flops / t / 1e9
        );
    }

    // WKV as a decode step runs it on CPU adapters (wkv7_tex.wgsl with its
    // att and state copies): 12 heads of 64, one token of each of 1 and 8
    // sequences; 12 layers' worth per submission, as in one step.
    for n_seq in [1usize, 8].into_iter().filter(|_| wanted("wkv7_tex")) {
        let stride = nh * hs * hs;
        if !WkvTextures::fit(ctx, hs, c, stride, n_seq, n_seq) {
            println!("wkv7_tex: not used on this adapter");
            break;
        }
        let tex = WkvTextures::new(ctx, c, n_seq, n_seq).unwrap();
        let att = ctx.storage_f32("att", &vec![0.1f32; 9 * n_seq * c]).unwrap();
        let starts: Vec<u32> = (0..=n_seq as u32).collect();
        let seq = ctx.storage_u32("seq", &starts).unwrap();
        let state = ctx.buffer("state", (n_seq * stride * 4) as u64, STORAGE).unwrap();
        let y = ctx.buffer("y", (n_seq * c * 4) as u64, STORAGE).unwrap();
        let p = Wkv7Params {
            n_seq: n_seq as u32,
            n_head: nh as u32,
            head_size: hs as u32,
            dim: c as u32,
            plane: (n_seq * c) as u32,
            state_stride: stride as u32,
            state_offset: 0,
            t_first: 0,
            t_count: 0,
            _pad: [0; 3],
        };
        let layers = 12;
        let (t, cpu) = time(|| {
            submit_timed(ctx, arena, |rec| {
                for _ in 0..layers {
                    record_wkv7(rec, p, n_seq as u32, 1, &att, &seq, &state, &y, Some(&tex)).unwrap();
                }
            })
        });
        let (t, cpu) = (t / layers as f64, cpu / layers as f64);
        println!(
            "wkv7_tex 12x64 heads, {n_seq} sequence(s) x 1 token: {:8.3} ms ({:8.3} CPU ms) per layer",
            t * 1e3,
            cpu * 1e3
        );
    }
}

fn layer_norm(ctx: &GpuContext, arena: &mut ParamArena) {
    let c = 768usize;
    // LayerNorm over [1, 768], [8, 768] (batch-8 decode) and [512, 768].
    for rows in [1usize, 8, 512] {
        let x = ctx.storage_f32("x", &vec![0.3f32; rows * c]).unwrap();
        let v = ctx.storage_f32("v", &vec![1.0f32; 2 * c]).unwrap();
        let y = ctx.buffer("y", (rows * c * 4) as u64, STORAGE).unwrap();
        let p = LayerNormParams {
            n_rows: rows as u32,
            dim: c as u32,
            x_offset: 0,
            y_offset: 0,
            w_offset: 0,
            b_offset: c as u32,
            eps: 1e-5,
            _pad: 0,
        };
        let reps = 20;
        let (t, cpu) = time(|| {
            submit_timed(ctx, arena, |rec| {
                for _ in 0..reps {
                    rec.dispatch(ctx.plan().layer_norm(), &p, &[&x, &v, &y], p.groups(ctx.plan().elementwise_tokens()))
                        .unwrap();
                }
            })
        });
        let (t, cpu) = (t / reps as f64, cpu / reps as f64);
        println!(
            "layer_norm [{rows}x{c}]: {:8.3} ms ({:8.3} CPU ms)  {:6.2} GB/s",
            t * 1e3,
            cpu * 1e3,
            (2 * rows * c * 4) as f64 / t / 1e9
        );
    }
}
