//! The `rwkv` binary: `logits` writes checkable .npy files, `inspect`
//! reports the model, and bad input gives a one-line error and a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::*;

fn rwkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rwkv")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `error: ...` lines (the Vulkan loader may print its own noise).
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o).lines().filter(|l| l.starts_with("error: ") && !l.contains("XDG_RUNTIME_DIR")).map(String::from).collect()
}

#[test]
fn logits_npy_matches_golden() {
    if gpu().is_none() {
        return;
    }
    let name = "v7-L2-C128-V512-fp32";
    let g = Golden::load(name);
    let tokens: Vec<String> = g.tokens.iter().map(|t| t.to_string()).collect();
    let tokens = tokens.join(",");
    let dir = std::env::temp_dir().join(format!("rwkv-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = model_path(name);
    let model = model.to_str().unwrap();

    let all = dir.join("all.npy");
    let o = rwkv(&[
        "logits",
        "--model",
        model,
        "--tokens",
        &tokens,
        "--all",
        "--chunk",
        "7",
        "--out",
        all.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("adapter: "), "rwkv must say which adapter it uses");
    let (shape, data) = rwkv_wgpu::npy::decode_f32(&std::fs::read(&all).unwrap()).unwrap();
    assert_eq!(shape, vec![g.tokens.len(), g.vocab]);
    let err = rel_l2(&data, &g.logits);
    assert!(err <= LOGITS_REL_L2, "--all logits rel L2 {err:.3e}");

    let last = dir.join("last.npy");
    let o = rwkv(&["logits", "--model", model, "--tokens", &tokens, "--out", last.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, data) = rwkv_wgpu::npy::decode_f32(&std::fs::read(&last).unwrap()).unwrap();
    assert_eq!(shape, vec![1, g.vocab]);
    let err = rel_l2(&data, &g.logits[(g.tokens.len() - 1) * g.vocab..]);
    assert!(err <= LOGITS_REL_L2, "last logits rel L2 {err:.3e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_reports_the_model() {
    if gpu().is_none() {
        return;
    }
    let o = rwkv(&["inspect", "--model", model_path("v7-L3-C64-V512-fp16-l0v").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    for want in [
        "RWKV-7",
        "layers          3",
        "width           64",
        "heads           1 x 64",
        "vocab           512",
        "F16",
        "adapter",
    ] {
        assert!(out.contains(want), "inspect output lacks `{want}`:\n{out}");
    }
    // The kernel plan the adapter got, as the library chose it.
    let ctx = gpu().unwrap();
    let plan = format!("kernels         {}", ctx.plan());
    assert!(out.contains(&plan), "inspect output lacks `{plan}`:\n{out}");
    // The environment picks another plan (only the binary reads it).
    let o = Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(["inspect", "--model", model_path("v7-L3-C64-V512-fp16-l0v").to_str().unwrap()])
        .env("RWKV_WEIGHTS", "buffer")
        .env("RWKV_NO_SUBGROUPS", "1")
        .output()
        .unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("no subgroups") && out.contains("matrices: linear (weights in buffers"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_rwkv")).args(["inspect"]).env("RWKV_WEIGHTS", "disk").output().unwrap();
    assert_eq!(error_lines(&o), ["error: RWKV_WEIGHTS=disk: expected `buffer` or `texture`"]);
}

/// `inspect` tells each generation apart, on .pth as on .safetensors, and
/// `convert` writes a .pth as a safetensors file with the same tensors.
#[test]
fn inspect_every_generation_and_convert_pth() {
    if gpu().is_none() {
        return;
    }
    for (file, want) in [
        (model_path("v4-L2-C128-V512-fp32"), "RWKV-4"),
        (model_path("v5.0-L3-C64-V512-fp16"), "RWKV-5.0"),
        (model_path("v5.1-L3-C64-V512-fp16"), "RWKV-5.1"),
        (model_path("v5.2-L2-C128-V512-fp32"), "RWKV-5.2"),
        (model_path("v6-L2-C128-V512-fp32"), "RWKV-6"),
        (fixture("pth/v7-L2-C128-V512-bf16.pth"), "RWKV-7"),
    ] {
        let o = rwkv(&["inspect", "--model", file.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8(o.stdout).unwrap();
        assert!(out.contains(&format!("model           {want}\n")), "{}: want {want}:\n{out}", file.display());
    }

    let dir = std::env::temp_dir().join(format!("rwkv-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("converted.safetensors");
    let src = fixture("pth/v7-L3-C64-V512-fp16-l0v.pth");
    let o = rwkv(&["convert", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("RWKV-7"), "{}", stderr(&o));
    let a = rwkv_wgpu::SafeTensorsFile::open(&out).unwrap();
    let b = rwkv_wgpu::SafeTensorsFile::open(model_path("v7-L3-C64-V512-fp16-l0v")).unwrap();
    let mut names: Vec<&str> = b.names().collect();
    names.sort_unstable();
    assert_eq!(a.names().count(), names.len());
    for n in names {
        let (x, y) = (a.get(n).unwrap(), b.get(n).unwrap());
        assert!(x.shape == y.shape && x.dtype == y.dtype && x.bytes == y.bytes, "converted `{n}` differs");
    }
    // Refuses to overwrite its input; a malicious .pth is one error line.
    let o = rwkv(&["convert", src.to_str().unwrap(), src.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let evil = fixture("pth/malicious.pth");
    let o = rwkv(&["convert", evil.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let errors = error_lines(&o);
    assert!(errors.len() == 1 && errors[0].contains("refused"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_a_one_line_error() {
    let model = model_path("v7-L2-C128-V512-fp32");
    let model = model.to_str().unwrap();
    let out = std::env::temp_dir().join("rwkv-cli-never-written.npy");
    let out = out.to_str().unwrap();

    let o = rwkv(&["logits", "--model", model, "--tokens", "1", "--out", out, "--bogus"]);
    assert_eq!(o.status.code(), Some(2), "unknown flag: {}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));

    let o = rwkv(&["logits", "--model", model, "--tokens", "1,x", "--out", out]);
    assert_eq!(o.status.code(), Some(2), "bad token list: {}", stderr(&o));

    if gpu().is_none() {
        return;
    }
    for (args, what) in [
        (vec!["logits", "--model", "/nonexistent/model.safetensors", "--tokens", "1", "--out", out], "nonexistent"),
        (vec!["logits", "--model", model, "--tokens", "1,99999", "--out", out], "99999"),
        (vec!["logits", "--model", model, "--tokens", "1", "--chunk", "0", "--out", out], "--chunk"),
        (vec!["inspect", "--model", "/nonexistent/model.safetensors"], "nonexistent"),
    ] {
        let o = rwkv(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let errors = error_lines(&o);
        assert_eq!(errors.len(), 1, "{args:?}: want one error line, got {}", stderr(&o));
        assert!(errors[0].contains(what), "{args:?}: error should name `{what}`: {}", errors[0]);
        assert!(!stderr(&o).contains("panicked"));
    }
}

#[test]
fn bench_reports_json_on_a_synthetic_model() {
    if gpu().is_none() {
        return;
    }
    let o = rwkv(&[
        "bench",
        "--shape",
        "L2-D128-V512",
        "--pp",
        "9",
        "--tg",
        "3",
        "--batch",
        "1,2",
        "--repeat",
        "1",
        "--deep",
        "300",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "decode_batch2_tokens_per_s",
        "peak_rss_bytes",
        "gpu_bytes",
        "dispatches_per_token",
        "decode_cpu_ms_per_token",
        "prefill_cpu_ms_per_token",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} missing or zero in {out}");
    }
    // Nothing grows with the context: the same GPU bytes after 300 tokens as after 100.
    assert!(v["gpu_bytes_at_100"].as_u64().is_some_and(|b| b > 0), "{out}");
    assert_eq!(v["gpu_bytes_after_deep"], v["gpu_bytes_at_100"], "{out}");
    let o = rwkv(&["bench", "--shape", "L2-D100-V512", "--pp", "4", "--tg", "2"]);
    assert_eq!(o.status.code(), Some(1), "a width that is not a multiple of 64: {}", stderr(&o));

    // Synthetic checkpoints of the other generations load (detected from
    // their tensors) and run; an unknown version is an error.
    for version in ["4", "5.0", "5.1", "5.2", "6"] {
        let args = ["bench", "--version", version, "--shape", "L2-D128-V512", "--pp", "4", "--tg", "2", "--batch", "1"];
        let o = rwkv(&[&args[..], &["--repeat", "1", "--json"]].concat());
        assert!(o.status.success(), "--version {version}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["model"].as_str().is_some_and(|m| m.contains(&format!("v{version} "))), "{v}");
        assert!(v["decode_tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    }
    let o = rwkv(&["bench", "--version", "3", "--shape", "L2-D128-V512"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// A Hugging Face folder works through every command as an RWKV file does:
/// `inspect` names the family and the KV cache, `logits --chunk 7` matches
/// the float64 golden, `generate` stops at the config's `eos_token_id` (2
/// here, not RWKV's 0), and a chat `/save`d KV cache is a `--state` later.
#[test]
fn transformer_folder_through_the_cli() {
    if gpu().is_none() {
        return;
    }
    let name = "llama-L2-D128-H4-KV4-F352-V4096-fp16-austen";
    let folder = fixture(&format!("transformer/models/{name}"));
    let m = folder.to_str().unwrap();

    // 2 layers x (key + value) x 4 KV heads x 32 x 2 bytes = 1024 bytes per token in f16.
    for (kv, bytes) in [("f16", 1024), ("f32", 2048)] {
        let o = rwkv(&["inspect", "--model", m, "--kv-cache", kv]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8(o.stdout).unwrap();
        assert!(out.contains("model           Llama\n"), "{out}");
        assert!(out.contains("heads           4 x 32, 4 KV heads\n"), "{out}");
        assert!(out.contains(&format!("kv cache        {bytes} bytes per token of context ({kv})\n")), "{out}");
        assert!(out.contains("end tokens      2\n"), "{out}");
    }

    let g = Golden::load_at(fixture(&format!("transformer/golden/{name}.golden.safetensors")));
    let tokens: Vec<String> = g.tokens.iter().map(|t| t.to_string()).collect();
    let dir = std::env::temp_dir().join(format!("rwkv-cli-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("all.npy");
    let o = rwkv(&[
        "logits",
        "--model",
        m,
        "--kv-cache",
        "f32",
        "--tokens",
        &tokens.join(","),
        "--all",
        "--chunk",
        "7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, data) = rwkv_wgpu::npy::decode_f32(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(shape, vec![g.tokens.len(), g.vocab]);
    let err = rel_l2(&data, &g.logits);
    assert!(err <= LOGITS_REL_L2, "--all logits of {name} rel L2 {err:.3e}");

    // Token 2 forced: generation ends at once; token 0 forced: it is no end token here.
    let gen = |bias: &str| {
        let o = rwkv(&["generate", "It was", "--model", m, "--max-tokens", "5", "--logit-bias", bias]);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let e = gen("2=100");
    assert!(e.contains("generated 0 tokens") && e.contains("stop: end of text"), "{e}");
    let e = gen("0=100");
    assert!(e.contains("generated 5 tokens") && e.contains("stop: max tokens"), "{e}");

    // The KV cache saved by chat is read back as a --state.
    let saved = dir.join("chat.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(["chat", "--model", m, "--max-tokens", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "Good morning\n/save {}", saved.display()).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let st = rwkv_wgpu::SafeTensorsFile::open(&saved).unwrap();
    let key = st.shape("key").unwrap().to_vec();
    assert_eq!((key[0], key[2], key[3]), (2, 4, 32), "key {key:?}");
    assert!(key[1] > 3, "the chat read its prompt into the cache: {key:?}");
    let o = rwkv(&["generate", " and", "--model", m, "--state", saved.to_str().unwrap(), "--max-tokens", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // An RWKV state is not a KV cache.
    let o = rwkv(&["generate", " and", "--model", m, "--state", model_path("v7-L2-C128-V512-fp32").to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(error_lines(&o).len(), 1, "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GPU weight bytes over f16's at the 128-wide test shape: measured 0.566
/// (int8) and 0.321 (q4), above the 0.1B shape's 0.523 and 0.273 because a
/// row's f16 scales pad to 16 bytes and the vectors stay f32. The bounds
/// round those up; the head left in floats (0.11 of the f16 bytes) would
/// take either past them.
const INT8_BYTES: f64 = 0.58;
const Q4_BYTES: f64 = 0.34;

/// `--quant` and `rwkv quantize` through the binary: `bench --json` reports
/// `quant` and `gpu_weight_bytes` (a quarter to a half of f16's), `quantize`
/// writes a file that `inspect --tensors` shows as codes and scales and that
/// `logits` reads, and a bad format, an existing output and re-quantizing
/// are one-line errors that leave the files alone.
#[test]
fn quantized_weights_through_the_cli() {
    if gpu().is_none() {
        return;
    }
    let mut gpu_weights = Vec::new();
    for quant in [None, Some("int8"), Some("4bit")] {
        let mut args = vec![
            "bench",
            "--shape",
            "L2-D128-V512",
            "--pp",
            "9",
            "--tg",
            "2",
            "--batch",
            "1",
            "--repeat",
            "1",
            "--json",
        ];
        args.extend(quant.map(|q| ["--quant", q]).into_iter().flatten());
        let o = rwkv(&args);
        assert!(o.status.success(), "{quant:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let want = match quant {
            None => serde_json::Value::Null,
            Some("int8") => "int8".into(),
            _ => "q4".into(),
        };
        assert_eq!(v["quant"], want, "{v}");
        gpu_weights.push(v["gpu_weight_bytes"].as_u64().expect("gpu_weight_bytes") as f64);
    }
    let (int8, q4) = (gpu_weights[1] / gpu_weights[0], gpu_weights[2] / gpu_weights[0]);
    assert!(int8 <= INT8_BYTES && q4 <= Q4_BYTES, "GPU weight bytes vs f16: int8 {int8:.3}, q4 {q4:.3}");

    let tmp = TempDir::new("cli-quant");
    let dir = &tmp.0;
    let model = model_path("v7-L2-C128-V512-fp32");
    let out = dir.join("q4.safetensors");
    let (model, out_s) = (model.to_str().unwrap(), out.to_str().unwrap());
    let o = rwkv(&["quantize", model, out_s, "--to", "4bit"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = rwkv(&["inspect", "--model", out_s, "--tokenizer", "world", "--tensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("a pre-quantized q4 file"), "{text}");
    assert!(text.contains("head.weight [512, 64] q4 codes (U8)"), "{text}");
    assert!(text.contains("head.weight.scales [512, 2] F16 block scales"), "{text}");
    let npy = dir.join("l.npy");
    let o = rwkv(&[
        "logits",
        "--model",
        out_s,
        "--tokenizer",
        "world",
        "--tokens",
        "1,2,3",
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let before = std::fs::read(&out).unwrap();
    for (args, says) in [
        (vec!["quantize", model, out_s, "--to", "int8"], "exists"),
        (vec!["quantize", model, dir.join("x").to_str().unwrap(), "--to", "nf3"], "unknown weight format"),
        (vec!["quantize", out_s, dir.join("y").to_str().unwrap(), "--to", "int8"], "already quantized"),
        (vec!["inspect", "--model", out_s, "--tokenizer", "world", "--quant", "int8"], "pre-quantized to q4"),
    ] {
        let o = rwkv(&args);
        // 1: a failed command; 2: an argument clap refuses.
        assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(says) && e.lines().filter(|l| l.starts_with("error")).count() == 1, "{args:?}: {e}");
    }
    assert_eq!(std::fs::read(&out).unwrap(), before, "a failed command changed the file");
    assert!(!dir.join("y").exists());
}
