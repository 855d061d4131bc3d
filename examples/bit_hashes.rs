//! Prints a hash of the logits and states of every fixture on every kernel
//! path, for checking that a refactor leaves the arithmetic bit-identical:
//! run it before and after and compare the output (`diff`).
//!
//! `cargo run --release --example bit_hashes [FIXTURE_DIR]`

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rwkv_wgpu::gpu::{GpuOptions, WeightStore};
use rwkv_wgpu::{Engine, EngineOptions, GpuContext, LoadOptions, LogitsMode, Model, State};

fn engine(ctx: &GpuContext, file: &Path, chunk_tokens: usize) -> Engine {
    let model = Arc::new(Model::load(ctx, file, &LoadOptions::default()).unwrap());
    Engine::new(model, &EngineOptions { chunk_tokens }).unwrap()
}

/// FNV-1a over the bits of every value: equal hashes, equal bits.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn f32s(&mut self, v: &[f32]) {
        for x in v {
            for b in x.to_bits().to_le_bytes() {
                self.0 ^= b as u64;
                self.0 = self.0.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    fn state(&mut self, s: &State, seq: usize) {
        for (_, _, v) in s.read(seq).unwrap().fields {
            self.f32s(&v);
        }
    }
}

fn tokens(golden: &Path) -> Vec<u32> {
    let bytes = std::fs::read(golden).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    bytemuck::pod_collect_to_vec(st.tensor("tokens").unwrap().data())
}

fn main() {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("tests/fixtures"));
    let mut names: Vec<String> = std::fs::read_dir(dir.join("models"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".safetensors").map(String::from))
        .collect();
    names.sort();
    let paths = [
        ("texture", GpuOptions::default()),
        ("buffer+subgroups", GpuOptions { weight_store: Some(WeightStore::Buffer), ..Default::default() }),
        (
            "no-subgroups",
            GpuOptions { weight_store: Some(WeightStore::Buffer), no_subgroups: true, ..Default::default() },
        ),
    ];
    let mut all = Fnv::new();
    for (path, opts) in paths {
        let ctx = GpuContext::new(&opts).unwrap();
        for name in &names {
            let t = tokens(&dir.join(format!("golden/{name}.golden.safetensors")));
            let file = dir.join(format!("models/{name}.safetensors"));
            let mut line = Vec::new();
            for chunk in [256usize, 5] {
                let mut m = engine(&ctx, &file, chunk);
                let mut h = Fnv::new();
                let mut s = m.new_state(1).unwrap();
                h.f32s(&m.forward(&mut s, &[&t], LogitsMode::All).unwrap()[0]);
                h.state(&s, 0);
                line.push(format!("chunk{chunk}={:016x}", h.0));
                all.f32s(&[f32::from_bits(h.0 as u32), f32::from_bits((h.0 >> 32) as u32)]);
            }
            // An uneven batch over many steps, then mixed decode steps.
            let mut m = engine(&ctx, &file, 16);
            let mut h = Fnv::new();
            let seqs: [&[u32]; 3] = [&t[..40], &t[5..22], &t[30..33]];
            let mut s = m.new_state(3).unwrap();
            for out in m.forward(&mut s, &seqs, LogitsMode::All).unwrap() {
                h.f32s(&out);
            }
            for i in 40..50 {
                let step: [&[u32]; 3] = [&t[i..i + 1], if i % 2 == 0 { &t[i..i + 1] } else { &[] }, &t[i..i + 2]];
                for out in m.forward(&mut s, &step, LogitsMode::Last).unwrap() {
                    h.f32s(&out);
                }
            }
            for seq in 0..3 {
                h.state(&s, seq);
            }
            line.push(format!("batch={:016x}", h.0));
            all.f32s(&[f32::from_bits(h.0 as u32), f32::from_bits((h.0 >> 32) as u32)]);
            println!("{path:16} {name:28} {}", line.join(" "));
        }
    }
    println!("all {:016x}", all.0);
}
