//! `rwkv compare` and what it stands on: synthetic Transformers of Hugging
//! Face's layout, a recurrent state filled or cut back, and the command's
//! JSON, memory figures and chart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use rwkv_wgpu::loader::hf::{HfFolder, HfWeights, TransformerConfig};
use rwkv_wgpu::synthetic::{Shape, TransformerShape};
use rwkv_wgpu::{Dtype, Engine, EngineOptions, Family, LoadOptions, LogitsMode, Model, SafeTensorsFile, Version};

fn rwkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rwkv")).args(args).output().unwrap()
}

/// The `error: ...` lines (the Vulkan loader may print its own noise).
fn error_lines(o: &Output) -> Vec<String> {
    let e = String::from_utf8_lossy(&o.stderr);
    e.lines().filter(|l| l.starts_with("error: ") && !l.contains("XDG_RUNTIME_DIR")).map(String::from).collect()
}

fn synthetic_transformer(ctx: &rwkv_wgpu::GpuContext, shape: TransformerShape) -> Model {
    let file = rwkv_wgpu::files::unnamed_file(&std::env::temp_dir()).unwrap();
    let name = shape.to_string();
    rwkv_wgpu::synthetic::write_transformer_to(&file, Path::new(&name), shape, Dtype::F16, 3).unwrap();
    let config = TransformerConfig::parse(shape.config_json().as_bytes(), Path::new("config.json")).unwrap();
    let weights = HfWeights::single(SafeTensorsFile::from_file(file, &name).unwrap());
    let folder = HfFolder { dir: PathBuf::from(&name), config, weights };
    Model::from_folder(ctx, folder, &LoadOptions::default()).unwrap()
}

#[test]
fn transformer_shapes_parse_and_name_what_is_wrong() {
    let s: TransformerShape = "smollm2-135m".parse().unwrap();
    assert_eq!(s, TransformerShape::SMOLLM2_135M);
    assert_eq!(s.to_string(), "llama-L30-D576-H9-KV3-F1536-V49152-tied");
    assert_eq!(s.to_string().parse::<TransformerShape>().unwrap(), s);
    let p: TransformerShape = "Pythia-160M".parse().unwrap();
    assert_eq!(p.to_string(), "gpt_neox-L12-D768-H12-F3072-V50304");
    // The configs are what transformers would read: the published dimensions.
    for (shape, layers, hidden, heads, kv, ffn, vocab, tied) in
        [(s, 30, 576, 9, 3, 1536, 49152, true), (p, 12, 768, 12, 12, 3072, 50304, false)]
    {
        let c = TransformerConfig::parse(shape.config_json().as_bytes(), Path::new("config.json")).unwrap();
        assert_eq!(
            (c.n_layer, c.hidden, c.n_head, c.n_kv_head, c.ffn, c.vocab),
            (layers, hidden, heads, kv, ffn, vocab)
        );
        assert_eq!((c.head_dim, c.tied), (64, tied));
    }
    for (bad, names) in [
        ("mamba-L2-D128-H4-F256-V512", "mamba"),
        ("llama-L2-D100-H3-F256-V512", "multiple"),
        ("llama-L2-D128-H4-KV3-F256-V512", "multiple"),
        ("llama-L0-D128-H4-F256-V512", "layers 0"),
        ("llama-L2-D128-H4-F256", "no V"),
        ("llama-L2-D128-H4-F256-V512-X3", "X3"),
        ("gpt_neox-L2-D128-H4-KV2-F256-V512", "KV heads"),
        ("llama-L2-D128-H4-Fx-V512", "Fx"),
    ] {
        let e = bad.parse::<TransformerShape>().unwrap_err().to_string();
        assert!(e.contains(bad) && e.contains(names), "{bad}: {e}");
    }
}

#[test]
fn synthetic_transformers_load_and_run() {
    let Some(ctx) = gpu() else { return };
    for (spec, family) in [
        ("llama-L2-D128-H4-KV2-F256-V512", Family::Llama),
        ("qwen2-L1-D64-H2-KV1-F128-V300-tied", Family::Qwen2),
        ("gpt_neox-L2-D128-H4-F256-V512", Family::GptNeoX),
    ] {
        let shape: TransformerShape = spec.parse().unwrap();
        let m = synthetic_transformer(&ctx, shape);
        let i = m.info().clone();
        assert_eq!(i.arch, rwkv_wgpu::Arch::Transformer(family));
        assert_eq!(
            (i.n_layer, i.n_embd, i.n_kv_head, i.vocab),
            (shape.n_layer, shape.hidden, shape.n_kv_head, shape.vocab)
        );
        // Keys and values, f16, every layer.
        assert_eq!(
            i.kv_bytes_per_token,
            (shape.n_layer * 2 * shape.n_kv_head * (shape.hidden / shape.n_head) * 2) as u64
        );
        let mut engine = Engine::new(std::sync::Arc::new(m), &EngineOptions::default()).unwrap();
        let mut state = engine.new_state(1).unwrap();
        let logits = engine.forward(&mut state, &[&[1, 2, 3, 4, 5]], LogitsMode::All).unwrap().remove(0);
        assert_eq!(logits.len(), 5 * shape.vocab);
        assert!(logits.iter().all(|v| v.is_finite()), "{spec}");
    }
}

/// A recurrent state has no length: `fill_random` fills it, `reserve` does
/// nothing, and `truncate` is a reset at 0 and an error otherwise.
#[test]
fn recurrent_states_fill_but_do_not_truncate() {
    let Some(ctx) = gpu() else { return };
    let file = rwkv_wgpu::files::unnamed_file(&std::env::temp_dir()).unwrap();
    let shape: Shape = "L2-D128-V512".parse().unwrap();
    rwkv_wgpu::synthetic::write_to(&file, Path::new("v7"), Version::V7, shape, Dtype::F16, 1).unwrap();
    let m = Model::from_file(&ctx, SafeTensorsFile::from_file(file, "v7").unwrap(), &LoadOptions::default()).unwrap();
    let mut state = m.new_state(2).unwrap();
    let fresh = state.read(1).unwrap();
    let bytes = state.bytes();
    state.reserve(1, 100_000).unwrap();
    assert_eq!(state.bytes(), bytes);
    state.fill_random(1, 5000, 4).unwrap();
    let filled = state.read(1).unwrap();
    assert_ne!(filled, fresh);
    assert_eq!(state.read(0).unwrap(), fresh, "the other sequence is untouched");
    for (name, _, values) in &filled.fields {
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)), "{name}");
    }
    assert!(state.truncate(1, 3).is_err());
    state.truncate(1, 0).unwrap();
    assert_eq!(state.read(1).unwrap(), fresh);
}

/// The default command's shapes at a few short contexts: every row there,
/// real and filled, memory as the layouts say, the chart written.
#[test]
fn compare_reports_rows_memory_and_chart() {
    if gpu().is_none() {
        return;
    }
    let tmp = TempDir::new("compare");
    let dir = tmp.0.clone();
    let svg = dir.join("chart.svg");
    let tg = 3;
    let o = rwkv(&[
        "compare",
        "--rwkv",
        "L2-D128-V512",
        "--transformer",
        "llama-L2-D128-H4-KV2-F256-V512",
        "--contexts",
        "64,300",
        "--prefill-max",
        "64",
        "--tg",
        "3",
        "--repeat",
        "2",
        "--batch",
        "1,3",
        "--batch-context",
        "40",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rwkv_state = j["rwkv"]["state_bytes_per_sequence"].as_u64().unwrap();
    let kv = j["transformer"]["kv_bytes_per_token"].as_u64().unwrap();
    // 2 layers x (keys + values) x 2 KV heads x 32 x f16.
    assert_eq!(kv, 2 * 2 * 2 * 32 * 2);
    assert!(rwkv_state > 0 && j["rwkv"]["kv_bytes_per_token"] == 0);
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    let mut seen = Vec::new();
    for r in rows {
        let side = r["model"].as_str().unwrap();
        let (context, batch) = (r["context"].as_u64().unwrap(), r["batch"].as_u64().unwrap());
        let sweep = r["sweep"].as_str().unwrap();
        seen.push(format!("{side} {sweep} {context} {batch}"));
        let ms = r["decode_ms_per_token"].as_f64().unwrap();
        let cpu = r["decode_cpu_ms_per_token"].as_f64().unwrap();
        assert!(ms > 0.0 && ms.is_finite() && cpu > 0.0, "{r}");
        assert!(r["gpu_bytes"].as_u64().unwrap() > r["memory_bytes"].as_u64().unwrap());
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
        // Filled past --prefill-max and in the batch sweep; otherwise prefilled and timed.
        let filled = context > 64 || sweep == "batch";
        assert_eq!(r["filled"], filled, "{r}");
        assert_eq!(r["prefill_ms"].is_null(), filled, "{r}");
        let memory = r["memory_bytes"].as_u64().unwrap();
        let want = match side {
            "rwkv" => batch * rwkv_state,
            _ => batch * (context + tg) * kv,
        };
        assert_eq!(memory, want, "{r}");
    }
    assert_eq!(
        seen,
        [
            "rwkv context 64 1",
            "rwkv context 300 1",
            "rwkv batch 40 1",
            "rwkv batch 40 3",
            "transformer context 64 1",
            "transformer context 300 1",
            "transformer batch 40 1",
            "transformer batch 40 3"
        ]
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg"), "{}", &chart[..100.min(chart.len())]);
    for title in ["Decode latency vs context", "State / KV cache vs context", "vs batch (context 40)", "Transformer"] {
        assert!(chart.contains(title), "{title}");
    }

    // The table names the findings.
    let o =
        rwkv(&["compare", "--rwkv", "L1-D64-V256", "--transformer", "llama-L1-D64-H2-F128-V256", "--contexts", "8,40"]);
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    for s in ["weights read at context 8", "RWKV from context 8 to 40", "memory grows 256 bytes per token"] {
        assert!(table.contains(s), "{s}:\n{table}");
    }
}

/// `--svg` never replaces a model file the run read.
#[test]
fn the_chart_never_replaces_an_input() {
    if gpu().is_none() {
        return;
    }
    let model = std::env::temp_dir().join(format!("rwkv-compare-input-{}.safetensors", std::process::id()));
    std::fs::copy(model_path("v7-L2-C128-V512-fp32"), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let m = model.to_str().unwrap();
    let o =
        rwkv(&["compare", "--rwkv", m, "--transformer", "llama-L1-D64-H2-F128-V256", "--contexts", "8", "--svg", m]);
    let after = std::fs::read(&model).unwrap();
    std::fs::remove_file(&model).ok();
    assert!(!o.status.success());
    let e = error_lines(&o);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("same file"), "{}", e[0]);
    assert!(after == before, "the model file changed");
}

#[test]
fn compare_arguments_are_one_line_errors() {
    let rwkv_file = model_path("v7-L2-C128-V512-fp32");
    let folder = fixture("transformer/models/llama-L2-D128-H4-KV2-F344-V512-fp32");
    let (rwkv_file, folder) = (rwkv_file.to_str().unwrap(), folder.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--transformer", "nonsense"], "nonsense"),
        (vec!["--rwkv", "L2-D100-V512"], "multiple of 64"),
        (vec!["--contexts", "0,5"], "at least 1"),
        (vec!["--tg", "0"], "at least 1"),
        (vec!["--dtype", "f8"], "f8"),
        (vec!["--rwkv", folder, "--contexts", "8"], "not an RWKV model"),
        (vec!["--transformer", rwkv_file, "--contexts", "8"], "not a Transformer"),
    ];
    for (args, names) in cases {
        let mut all = vec!["compare"];
        all.extend(&args);
        if names.starts_with("not a") && gpu().is_none() {
            continue;
        }
        let o = rwkv(&all);
        let what = all.join(" ");
        assert!(!o.status.success(), "{what}");
        let e = error_lines(&o);
        assert_eq!(e.len(), 1, "{what}: {e:?}");
        assert!(e[0].contains(names), "{what}: {}", e[0]);
    }
}
