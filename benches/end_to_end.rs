//! End-to-end figures (as `rwkv bench`): `cargo bench --bench end_to_end`.
//! RWKV_BENCH_SHAPE (default L12-D768-V65536, the 0.1B shape), RWKV_BENCH_PP
//! (default 64) and RWKV_BENCH_TG (default 16) choose the work; the defaults
//! are small because lavapipe on two cores is slow.

use rwkv_wgpu::bench::{run, BenchConfig};
use rwkv_wgpu::synthetic::{write_v7, Shape};
use rwkv_wgpu::{Dtype, GpuContext, GpuOptions, Model};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let ctx = match GpuContext::new(&GpuOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            return;
        }
    };
    let shape: Shape = env("RWKV_BENCH_SHAPE", "L12-D768-V65536").parse().expect("RWKV_BENCH_SHAPE");
    let cfg = BenchConfig {
        prefill: env("RWKV_BENCH_PP", "64").parse().expect("RWKV_BENCH_PP"),
        decode: env("RWKV_BENCH_TG", "16").parse().expect("RWKV_BENCH_TG"),
        batches: vec![1, 8],
        repeat: 3,
        deep_context: 0,
        quant: std::env::var("RWKV_BENCH_QUANT").ok().map(|q| q.parse().expect("RWKV_BENCH_QUANT: int8 or 4bit")),
    };
    let file = std::env::temp_dir().join(format!("rwkv-bench-e2e-{}.safetensors", std::process::id()));
    write_v7(&file, shape, Dtype::F16, 1).expect("writing the synthetic model");
    let report = run(&ctx, &format!("synthetic v7 {shape} F16"), &cfg, |o| Model::load(&ctx, &file, o));
    let _ = std::fs::remove_file(&file);
    print!("{}", report.expect("bench").to_table());
}
