//! The C ABI from C: `include/rwkv.h` is what cbindgen makes of src/capi.rs
//! today; the programs in examples/c/ and tests/c/ are compiled by `cc`
//! against the header and the shared (and static) library cargo built beside
//! this test, and run on the demo model in assets/. Their output is checked
//! against the same work done through the Rust API in this process.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use rwkv_wgpu::{GenerateOptions, Sampler, SamplerConfig, Session, StopReason};
use sha2::Digest;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// A C program that has not finished by then is hung: killed, and the test fails.
const PROGRAM_TIME_LIMIT: Duration = Duration::from_secs(300);
/// Greedy tokens generate.c is asked for.
const GENERATE_TOKENS: usize = 40;

use common::{austen_model_path as model_path, austen_tokenizer_path as tokenizer_path};

/// The profile folder this test runs from (target/release under `cargo
/// test --release`), with librwkv_wgpu.so and .a in it as `cargo build`
/// leaves them for users. `cargo test` compiles the library for the tests
/// but leaves the shared and static libraries in deps/, so this runs
/// `cargo build --lib` for the same profile once (a no-op when they are
/// current; the build lock is free while tests run).
fn lib_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
            let profile = dir.file_name().unwrap().to_str().unwrap().to_string();
            let profile = if profile == "debug" { "dev".to_string() } else { profile };
            let out = Command::new(env!("CARGO"))
                .args(["build", "--lib", "--profile", &profile])
                .env("CARGO_TARGET_DIR", dir.parent().unwrap())
                .current_dir(ROOT)
                .output()
                .unwrap();
            assert!(out.status.success(), "cargo build --lib failed:\n{}", String::from_utf8_lossy(&out.stderr));
            assert!(dir.join("librwkv_wgpu.so").is_file(), "no librwkv_wgpu.so in {}", dir.display());
            dir
        })
        .clone()
}

enum Link {
    Shared,
    Static,
}

/// Compiles one C file against include/rwkv.h, strictly (warnings are errors).
fn compile(source: &str, out: &Path, link: Link) -> PathBuf {
    let lib = lib_dir();
    let exe = out.join(Path::new(source).file_stem().unwrap());
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-pthread"])
        .arg("-I")
        .arg(Path::new(ROOT).join("include"))
        .arg(Path::new(ROOT).join(source))
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Shared => {
            cc.arg("-L").arg(&lib).arg("-lrwkv_wgpu").arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        // The system libraries Rust's std needs on Linux (what `--print
        // native-static-libs` lists for this crate).
        Link::Static => {
            cc.arg(lib.join("librwkv_wgpu.a")).args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
        }
    }
    let out = cc.output().expect("running cc (a C compiler is required by the tests)");
    assert!(out.status.success(), "cc {source} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// Runs a program with `stdin`, killing it past the time limit; returns
/// (success, stdout, stderr).
fn run(exe: &Path, args: &[&std::ffi::OsStr], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > PROGRAM_TIME_LIMIT {
            child.kill().unwrap();
            panic!("{} ran past {PROGRAM_TIME_LIMIT:?}: hung", exe.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.success(), out.join().unwrap(), err.join().unwrap())
}

#[test]
fn header_is_up_to_date() {
    let config = cbindgen::Config::from_file(Path::new(ROOT).join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(Path::new(ROOT).join("src/capi.rs"))
        .generate()
        .expect("cbindgen could not read src/capi.rs")
        .write(&mut generated);
    let header = Path::new(ROOT).join("include/rwkv.h");
    if std::env::var_os("RWKV_BLESS_HEADER").is_some() {
        std::fs::create_dir_all(header.parent().unwrap()).unwrap();
        std::fs::write(&header, &generated).unwrap();
    }
    let checked_in = std::fs::read(&header).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/rwkv.h is out of date with src/capi.rs: regenerate it with \
         RWKV_BLESS_HEADER=1 cargo test --release --test c_api header, and commit it"
    );
}

/// The greedy continuation the Rust API gives.
fn greedy_continuation(prompt: &str, max_tokens: usize) -> Option<String> {
    let (model, tokenizer, mut engine) = common::austen()?;
    let mut s = Session::new(model, tokenizer).unwrap();
    s.feed_text(&mut engine, prompt.as_bytes()).unwrap();
    let mut sampler = Sampler::new(SamplerConfig::greedy()).unwrap();
    let opts = GenerateOptions { max_tokens, ..Default::default() };
    Some(s.generate(&mut engine, &mut sampler, &opts, |_| std::ops::ControlFlow::Continue(())).unwrap().text)
}

#[test]
fn generate_c_prints_the_greedy_continuation() {
    let prompt = "It is a truth universally acknowledged";
    let Some(expected) = greedy_continuation(prompt, GENERATE_TOKENS) else { return };
    let tmp = TempDir::new("c-generate");
    let exe = compile("examples/c/generate.c", &tmp.0, Link::Shared);
    let n = GENERATE_TOKENS.to_string();
    let args = [model_path().into_os_string(), tokenizer_path().into_os_string(), prompt.into(), n.into()];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out, err) = run(&exe, &args, "");
    assert!(ok, "generate failed: {err}");
    assert!(!expected.is_empty());
    assert_eq!(out, format!("{expected}\n"), "the C program's continuation differs from the Rust API's");
    assert!(err.contains(&format!("[{GENERATE_TOKENS} tokens]")), "{err}");

    // Statically linked, the same program gives the same text.
    let static_dir = tmp.0.join("static");
    std::fs::create_dir_all(&static_dir).unwrap();
    let static_exe = compile("examples/c/generate.c", &static_dir, Link::Static);
    let (ok, static_out, err) = run(&static_exe, &args, "");
    assert!(ok, "generate (static) failed: {err}");
    assert_eq!(static_out, out);

    // A bad model path is an error message and exit 1, not a crash.
    let missing = tmp.0.join("missing.safetensors");
    let (ok, _, err) = run(&exe, &[missing.as_os_str(), args[1], args[2]], "");
    assert!(!ok && err.contains("RWKV_ERR_IO") && err.contains("missing.safetensors"), "{err}");
}

/// chat.c's settings (`rwkv chat`'s sampling, a turn ends at a blank line).
fn chat_settings(seed: u64) -> (SamplerConfig, GenerateOptions) {
    let sampler = SamplerConfig {
        temperature: 1.0,
        top_p: 0.5,
        presence_penalty: 0.4,
        frequency_penalty: 0.4,
        penalty_decay: 0.996,
        seed,
        ..Default::default()
    };
    (sampler, GenerateOptions { max_tokens: 200, stop: vec!["\n\n".into()], ..Default::default() })
}

#[test]
fn chat_c_keeps_the_conversation_and_its_saved_state() {
    let Some((model, tokenizer, mut engine)) = common::austen() else { return };
    let tmp = TempDir::new("c-chat");
    let saved = tmp.0.join("turn1.safetensors");
    let input = format!(
        "Who is Mr. Darcy?\n/save {0}\nWhat does Elizabeth think of him?\n/load {0}\nWhat does Elizabeth think of him?\n",
        saved.display()
    );

    // The same conversation through the Rust API: one session, only the new
    // text read each turn; the state saved after turn 1 and restored.
    let (sampler_cfg, opts) = chat_settings(42);
    let mut s = Session::new(model, tokenizer).unwrap();
    let mut expected = String::new();
    let mut ended = true;
    let mut state_after_turn1 = None;
    for (turn, line) in ["Who is Mr. Darcy?", "What does Elizabeth think of him?", "What does Elizabeth think of him?"]
        .iter()
        .enumerate()
    {
        if turn == 1 {
            state_after_turn1 = Some(s.state().read(0).unwrap());
        }
        if turn == 2 {
            s.state_mut().write(0, state_after_turn1.as_ref().unwrap()).unwrap();
        }
        let text = format!("{}User: {line}\n\nAssistant:", if ended { "" } else { "\n\n" });
        s.feed_text(&mut engine, text.as_bytes()).unwrap();
        let mut sampler = Sampler::new(sampler_cfg.clone()).unwrap();
        let g = s.generate(&mut engine, &mut sampler, &opts, |_| std::ops::ControlFlow::Continue(())).unwrap();
        expected.push_str(&g.text);
        expected.push('\n');
        ended = matches!(g.stop, StopReason::StopSequence(_));
    }

    let exe = compile("examples/c/chat.c", &tmp.0, Link::Shared);
    let (ok, out, err) = run(&exe, &[model_path().as_os_str(), tokenizer_path().as_os_str()], &input);
    assert!(ok, "chat failed: {err}");
    assert!(saved.is_file(), "/save wrote no state file");
    assert_eq!(out.lines().count(), 3, "one reply per turn: {out:?}");
    assert_eq!(out, expected, "the C chat differs from the same turns through the Rust API");
    assert!(out.lines().all(|l| !l.trim().is_empty()), "empty reply: {out:?}");
}

#[test]
fn abi_errors_c_gets_statuses_not_crashes() {
    if common::gpu().is_none() {
        return;
    }
    let hash = |p: &Path| sha2::Sha256::digest(std::fs::read(p).unwrap());
    let model_before = hash(&model_path());
    let tmp = TempDir::new("c-abi");
    let exe = compile("tests/c/abi_errors.c", &tmp.0, Link::Shared);
    let (ok, out, err) = run(&exe, &[model_path().as_os_str(), tokenizer_path().as_os_str(), tmp.0.as_os_str()], "");
    assert!(ok, "C ABI checks failed:\n{err}\n{out}");
    assert!(out.contains(", 0 failed"), "{out}");
    // The refused state save over the model left it as it was.
    assert_eq!(hash(&model_path()), model_before);
}

#[test]
fn threads_c_generates_on_many_threads_at_once() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = TempDir::new("c-threads");
    let exe = compile("examples/c/threads.c", &tmp.0, Link::Shared);
    // A small run: 4 threads of 8 tokens each (the benchmark's figures use 8 x 128).
    let (ok, out, err) =
        run(&exe, &[model_path().as_os_str(), tokenizer_path().as_os_str(), "4".as_ref(), "8".as_ref()], "");
    assert!(ok, "threads failed: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(v["threads"], 4);
    assert!(v["aggregate_tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
}
