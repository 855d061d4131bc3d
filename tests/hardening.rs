//! Hostile but fair use of the `rwkv` binary (issue 12): no command loses or
//! truncates an input (sha256 before and after), nothing hangs on a FIFO or
//! a closed pipe, and chat keeps its session through failed commands.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// Longest any of these commands may take here (they take a few seconds; a
/// hang is what this catches).
const LIMIT: Duration = Duration::from_secs(60);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rwkv"))
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&bytes))
}

/// Waits for `child` at most LIMIT; kills it and fails if it is still
/// running. Its output is read on threads meanwhile, so a chatty child
/// cannot block on a full pipe and look like a hang.
fn finish(mut child: Child, what: &str) -> Output {
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

fn run(args: &[&str], cwd: &Path, stdin: &[u8], what: &str) -> Output {
    let mut child = bin()
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from a thread: a child that never reads stdin cannot block us.
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    finish(child, what)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `error: ` lines (lavapipe may add its own about XDG_RUNTIME_DIR).
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o).lines().filter(|l| l.starts_with("error: ") && !l.contains("XDG_RUNTIME_DIR")).map(String::from).collect()
}

/// The one `error: ` line of a failed command.
fn one_error(o: &Output, what: &str) -> String {
    assert_eq!(o.status.code(), Some(1), "{what}: exit status; stderr:\n{}", stderr(o));
    let errors = error_lines(o);
    assert_eq!(errors.len(), 1, "{what}: one error line; stderr:\n{}", stderr(o));
    errors[0].clone()
}

/// A fresh folder of its own for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rwkv-hardening-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// No temporary file of an atomic write is left in `dir`.
fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "a temporary file was left behind: {name}");
    }
}

#[test]
fn convert_never_writes_over_its_input() {
    let dir = scratch("convert-same");
    for src in [model_path("v7-L3-C64-V512-fp16-l0v"), fixture("pth/v7-L3-C64-V512-fp16-l0v.pth")] {
        let name = src.file_name().unwrap().to_str().unwrap().to_string();
        let x = dir.join(&name);
        std::fs::copy(&src, &x).unwrap();
        let before = sha256(&x);
        std::os::unix::fs::symlink(&x, dir.join("link")).unwrap();
        std::fs::hard_link(&x, dir.join("hard")).unwrap();
        let abs = x.to_str().unwrap().to_string();
        let dot = format!("./{name}");
        // The same file by every kind of name, with and without --force.
        for out in [name.as_str(), dot.as_str(), abs.as_str(), "link", "hard"] {
            for force in [false, true] {
                let mut args = vec!["convert", name.as_str(), out];
                if force {
                    args.push("--force");
                }
                let o = run(&args, &dir, b"", &format!("convert {name} {out}"));
                let e = one_error(&o, &format!("convert {name} {out}"));
                assert!(e.contains("same file as the input"), "{e}");
                assert_eq!(sha256(&x), before, "convert {name} {out} changed its input");
            }
        }
        no_temp_files(&dir);
        for f in [x, dir.join("link"), dir.join("hard")] {
            std::fs::remove_file(f).unwrap();
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn convert_replaces_an_output_only_with_force_and_leaves_nothing_when_it_fails() {
    let dir = scratch("convert-out");
    let src = model_path("v7-L3-C64-V512-fp16-l0v");
    let input_sha = sha256(&src);
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"precious").unwrap();
    let o = run(&["convert", src.to_str().unwrap(), "out.safetensors"], &dir, b"", "convert over a file");
    let e = one_error(&o, "convert over a file");
    assert!(e.contains("exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let o = run(&["convert", src.to_str().unwrap(), "out.safetensors", "--force"], &dir, b"", "convert --force");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(rwkv_wgpu::SafeTensorsFile::open(&out).is_ok());
    // A failing convert (a malicious input) leaves neither an output nor a temporary file.
    let evil = fixture("pth/malicious.pth");
    let evil_sha = sha256(&evil);
    let o = run(&["convert", evil.to_str().unwrap(), "new.safetensors"], &dir, b"", "convert malicious");
    one_error(&o, "convert malicious");
    assert!(!dir.join("new.safetensors").exists());
    // An output folder that does not exist: an error, nothing written.
    let o = run(&["convert", src.to_str().unwrap(), "no/such/dir/x.safetensors"], &dir, b"", "convert to nowhere");
    one_error(&o, "convert to nowhere");
    no_temp_files(&dir);
    assert_eq!(sha256(&src), input_sha);
    assert_eq!(sha256(&evil), evil_sha);
    std::fs::remove_dir_all(&dir).ok();
}

/// The demo model and its tokenizer copied into `dir`, for commands that
/// must name the model file.
fn demo_copy(dir: &Path) -> PathBuf {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/austen-rwkv7");
    let model = dir.join("austen.safetensors");
    std::fs::copy(assets.join("austen-rwkv7-fp16.safetensors"), &model).unwrap();
    std::fs::copy(assets.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    model
}

#[test]
fn chat_keeps_its_session_through_failed_commands() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("chat");
    let model = demo_copy(&dir);
    let model_sha = sha256(&model);
    let m = model.to_str().unwrap();
    // A state holding NaN.
    let nan = dir.join("nan.safetensors");
    let good = dir.join("good.safetensors");
    let mut stdin = Vec::new();
    stdin.extend_from_slice(format!("Hello.\n/save {m}\n/save {}\n/save\n/load\n", dir.display()).as_bytes());
    stdin.extend_from_slice(b"\xff\xfe not UTF-8\n");
    stdin.extend_from_slice(format!("/save {}\n/load {}\nAgain.\n/quit\n", good.display(), nan.display()).as_bytes());
    // Write the NaN state first: a good save with one value made NaN.
    let o = run(
        &["chat", "--model", m, "--seed", "1", "--max-tokens", "4"],
        &dir,
        format!("Hi.\n/save {}\n", nan.display()).as_bytes(),
        "chat save",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    poison(&nan);

    let o = run(&["chat", "--model", m, "--seed", "1", "--max-tokens", "4"], &dir, &stdin, "chat");
    assert!(o.status.success(), "the chat must survive its failed commands:\n{}", stderr(&o));
    let e = stderr(&o);
    let errors = error_lines(&o);
    assert_eq!(errors.len(), 6, "{e}");
    assert!(errors[0].contains("same file as the input"), "/save over the model: {}", errors[0]);
    assert!(errors[1].contains("directory"), "/save to a folder: {}", errors[1]);
    assert!(errors[2].contains("/save FILE") && errors[3].contains("/load FILE"), "{e}");
    assert!(errors[4].contains("UTF-8"), "{}", errors[4]);
    assert!(errors[5].contains("nan.safetensors") && errors[5].contains("NaN"), "/load of a NaN state: {}", errors[5]);
    // Both turns ran, and the good save happened between them.
    assert_eq!(String::from_utf8_lossy(&o.stdout).matches("Assistant:").count(), 2, "{e}");
    assert!(e.contains("[state saved to"), "{e}");
    assert_eq!(sha256(&model), model_sha, "chat changed the model file");
    no_temp_files(&dir);
    std::fs::remove_dir_all(&dir).ok();
}

/// Sets one value of a saved state (safetensors, f32) to NaN.
fn poison(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + header;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn fifos_and_folders_are_refused_not_waited_on() {
    let dir = scratch("fifo");
    let fifo = dir.join("pipe");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let f = fifo.to_str().unwrap();
    let d = dir.to_str().unwrap();
    let out = dir.join("x.safetensors");
    for args in [
        vec!["inspect", "--model", f],
        vec!["generate", "hi", "--state", f],
        vec!["generate", "hi", "--tokenizer", f],
        vec!["tokenize", "--tokenizer", f],
        vec!["convert", f, out.to_str().unwrap()],
        vec!["perplexity", f],
        vec!["logits", "--tokens-file", f, "--out", "x.npy"],
        vec!["inspect", "--model", d],
    ] {
        let what = args.join(" ");
        let o = run(&args, &dir, b"", &what);
        let e = one_error(&o, &what);
        assert!(e.contains("not a regular file"), "{what}: {e}");
        assert!(e.contains("FIFO") || e.contains("directory"), "{what}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generate_stops_when_its_reader_goes_away() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("pipe");
    let mut child = bin()
        .args(["generate", "It is a truth", "--max-tokens", "100000000", "--ignore-eos"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -c 20`: read 20 bytes, then close the pipe.
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 20];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let o = finish(child, "generate | head -c 20");
    assert!(o.status.success(), "a closed stdout ends generate quietly: {}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// Address space the parsing commands below may use (`ulimit -v`): the issue's
/// bound on peak memory for crafted inputs of at most 1 MB. A parser that
/// tried to allocate past it would abort (exit 134), not fail with an error.
const MEMORY_LIMIT_MIB: u64 = 512;

/// Runs the binary under `ulimit -v MEMORY_LIMIT_MIB` (no GPU: only
/// commands that parse files without opening an adapter).
fn run_limited(args: &[&str], dir: &Path, what: &str) -> Output {
    let kib = MEMORY_LIMIT_MIB * 1024;
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_rwkv"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, what)
}

/// A zip of stored (uncompressed) entries, as `torch.save` writes (the
/// reader does not check CRCs, so they are left 0).
fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let le16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in entries {
        let offset = out.len() as u32;
        le32(&mut out, 0x0403_4b50);
        for x in [20u16, 0, 0, 0, 0] {
            le16(&mut out, x);
        }
        for x in [0u32, data.len() as u32, data.len() as u32] {
            le32(&mut out, x);
        }
        le16(&mut out, name.len() as u16);
        le16(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        le32(&mut central, 0x0201_4b50);
        for x in [20u16, 20, 0, 0, 0, 0] {
            le16(&mut central, x);
        }
        for x in [0u32, data.len() as u32, data.len() as u32] {
            le32(&mut central, x);
        }
        for x in [name.len() as u16, 0, 0, 0, 0] {
            le16(&mut central, x);
        }
        le32(&mut central, 0);
        le32(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    le32(&mut out, 0x0605_4b50);
    for x in [0u16, 0, entries.len() as u16, entries.len() as u16] {
        le16(&mut out, x);
    }
    le32(&mut out, cd_size);
    le32(&mut out, cd_offset);
    le16(&mut out, 0);
    out
}

fn torch_zip(pickle: &[u8]) -> Vec<u8> {
    stored_zip(&[("archive/data.pkl", pickle), ("archive/byteorder", b"little"), ("archive/version", b"3\n")])
}

#[test]
fn pickle_bombs_are_refused_within_bounded_memory() {
    let dir = scratch("pickle");
    // One 64 KB string copied from the memo 100,000 times (266 KB).
    let mut strings = b"\x80\x02X\x00\x00\x01\x00".to_vec();
    strings.extend(std::iter::repeat_n(b'a', 1 << 16));
    strings.extend_from_slice(b"q\x00");
    for _ in 0..100_000 {
        strings.extend_from_slice(b"h\x00");
    }
    strings.push(b'.');
    // A 1 MB pickle of None opcodes (the was 16 MB; this one is the
    // largest crafted input the memory bound is promised for).
    let mut nones = b"\x80\x02".to_vec();
    nones.extend(std::iter::repeat_n(b'N', 1 << 20));
    nones.push(b'.');
    for (name, pickle) in [("strings", strings), ("nones", nones)] {
        let file = dir.join(format!("{name}.pth"));
        std::fs::write(&file, torch_zip(&pickle)).unwrap();
        assert!(std::fs::metadata(&file).unwrap().len() <= 1 << 21);
        let o = run_limited(&["convert", file.to_str().unwrap(), "out.safetensors"], &dir, name);
        let e = one_error(&o, name);
        assert!(e.contains("refused") && e.contains("MB of values"), "{name}: {e}");
    }
    // The repository's own memo bomb (640 bytes).
    let o = run_limited(&["convert", fixture("pth/memo_bomb.pth").to_str().unwrap(), "out.safetensors"], &dir, "bomb");
    assert!(one_error(&o, "memo_bomb").contains("refused"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hostile_world_vocabs_are_errors_within_bounded_memory() {
    let dir = scratch("vocab");
    let long = format!("1 '{}' {}\n", "a".repeat(10 << 20), 10 << 20);
    let cases: [(&str, String, &str); 5] = [
        ("long-line", long, "longer than"),
        ("big-id", "100000000 'a' 1\n".into(), "over the largest"),
        ("huge-id", "99999999999 'a' 1\n".into(), "over the largest"),
        ("max-id", "18446744073709551615 'a' 1\n".into(), "over the largest"),
        ("duplicate", "1 'a' 1\n1 'b' 1\n".into(), "appears twice"),
    ];
    for (name, text, want) in cases {
        let file = dir.join(format!("rwkv_vocab_{name}.txt"));
        std::fs::write(&file, &text).unwrap();
        let o = run_limited(&["tokenize", "--tokenizer", file.to_str().unwrap()], &dir, name);
        let e = one_error(&o, name);
        assert!(e.contains(want), "{name}: {e}");
        // The bad line is shown cut, not echoed whole.
        assert!(e.len() < 400, "{name}: an error of {} bytes", e.len());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes a safetensors file with `emb.weight` of `shape` (no data: a zero
/// dimension) and the block-0 tensor detection looks for.
fn zero_sized_emb(path: &Path, shape: &[u64]) {
    let header = format!(
        "{{\"emb.weight\":{{\"dtype\":\"F16\",\"shape\":{shape:?},\"data_offsets\":[0,0]}},\
          \"blocks.0.ln1.weight\":{{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}},\
          \"blocks.0.att.r_k\":{{\"dtype\":\"F16\",\"shape\":[1,4],\"data_offsets\":[8,16]}}}}"
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn zero_sized_tensors_with_huge_shapes_are_errors() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("shapes");
    for (name, shape) in [("2p40", [0u64, 1 << 40]), ("2p61", [0, 1 << 61]), ("wide", [0, 1 << 20])] {
        let file = dir.join(format!("{name}.safetensors"));
        zero_sized_emb(&file, &shape);
        let o = run(&["inspect", "--model", file.to_str().unwrap()], &dir, b"", name);
        let e = one_error(&o, name);
        assert!(e.contains("emb.weight"), "{name}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn synthetic_shapes_are_bounded_and_leave_no_file() {
    let dir = scratch("bench");
    for shape in ["L1-D4611686018427387904-V1", "L1-D64-V1-F0", "L100000-D64-V1", "L1-D64-V18446744073709551615"] {
        let o = run(&["bench", "--shape", shape], &dir, b"", shape);
        let e = one_error(&o, shape);
        assert!(e.contains("shape") && e.contains("outside"), "{shape}: {e}");
    }
    // A bench killed while it writes or loads its synthetic model leaves
    // nothing in the temporary folder (it opens the adapter first).
    if gpu().is_none() {
        return;
    }
    let child = bin()
        .args(["bench", "--shape", "L12-D768-V65536", "--pp", "8", "--tg", "2", "--batch", "1"])
        .env("TMPDIR", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it holds a file in the folder (its unnamed model file),
    // so the kill lands while that file exists.
    let t0 = Instant::now();
    let holds_file = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&dir)))
    };
    while !holds_file(child.id()) {
        assert!(t0.elapsed() < LIMIT, "the bench never opened its temporary file");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a killed bench left {left:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rough_edges_are_smoothed() {
    let dir = scratch("edges");
    // A negative temperature is the sampler's error, not clap's.
    let o = run(&["generate", "hi", "--temperature", "-1"], &dir, b"", "negative temperature");
    let e = one_error(&o, "negative temperature");
    assert!(e.contains("temperature"), "{e}");
    // Not a checkpoint at all, an empty zip, a missing file (the OS message once).
    let text = dir.join("notes.txt");
    std::fs::write(&text, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let empty_zip = dir.join("empty.pth");
    std::fs::write(&empty_zip, stored_zip(&[])).unwrap();
    for (file, want) in [
        (text.to_str().unwrap(), "not a safetensors or PyTorch .pth file"),
        (empty_zip.to_str().unwrap(), "no data.pkl"),
        ("/nonexistent/model.safetensors", "No such file"),
    ] {
        let o = run(&["convert", file, "out.safetensors"], &dir, b"", file);
        let e = one_error(&o, file);
        assert!(e.contains(want), "{file}: {e}");
        assert_eq!(e.matches("(os error").count(), e.contains("os error") as usize, "{file}: {e}");
    }
    // tokenize and detokenize default to the default model's tokenizer.
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/austen-rwkv7/tokenizer.json");
    let text = "It is a truth universally acknowledged.".as_bytes();
    let default = run(&["tokenize"], &dir, text, "tokenize");
    let named = run(&["tokenize", "--tokenizer", assets.to_str().unwrap()], &dir, text, "tokenize --tokenizer");
    assert!(default.status.success() && default.stdout == named.stdout, "{}", stderr(&default));
    let back = run(&["detokenize"], &dir, &default.stdout, "detokenize");
    assert_eq!(back.stdout, text);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn logits_read_token_ids_from_a_file_or_stdin() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("ids");
    let model = model_path("v7-L3-C64-V512-fp16-l0v");
    let m = model.to_str().unwrap();
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[5, 17, 300,\n 2]").unwrap();
    let spaced = dir.join("ids.txt");
    std::fs::write(&spaced, "5 17\n300, 2\n").unwrap();
    let mut outs = Vec::new();
    for (i, (args, stdin)) in [
        (vec!["--tokens", "5,17,300,2"], &b""[..]),
        (vec!["--tokens-file", ids.to_str().unwrap()], &b""[..]),
        (vec!["--tokens-file", spaced.to_str().unwrap()], &b""[..]),
        (vec!["--tokens-file", "-"], &b"[5,17,300,2]"[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = format!("l{i}.npy");
        let mut a = vec!["logits", "--model", m, "--all", "--out", out.as_str()];
        a.extend(args);
        let o = run(&a, &dir, stdin, "logits");
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(std::fs::read(dir.join(&out)).unwrap());
    }
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "the same ids gave different logits");
    std::fs::remove_dir_all(&dir).ok();
}

/// A long prompt shows a progress bar when stderr is a terminal (`script`
/// gives the command one), and its text is the same as without.
#[test]
fn long_prompts_show_progress_on_a_terminal() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("progress");
    let prompt =
        "It is a truth universally acknowledged, that a single man in possession of a good fortune. ".repeat(300);
    std::fs::write(dir.join("prompt.txt"), &prompt).unwrap();
    let cmd = format!("{} generate --temperature 0 --max-tokens 4 < prompt.txt", env!("CARGO_BIN_EXE_rwkv"));
    let child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = finish(child, "generate on a terminal");
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{shown}");
    assert!(shown.contains("prompt ") && shown.contains(" tokens,"), "no progress bar:\n{shown}");
    // Read in pieces or at once, the greedy text is the same.
    let plain = run(&["generate", "--temperature", "0", "--max-tokens", "4"], &dir, prompt.as_bytes(), "generate");
    let text = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(shown.contains(text.trim()), "terminal run: {shown}\npiped run: {text}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A model that does not fit the GPU (here: a memory limit set low) is a
/// typed error naming the bytes needed and the limit, when loading and
/// when a step needs more, never an abort.
#[test]
fn a_model_larger_than_the_gpu_memory_is_an_error() {
    if gpu().is_none() {
        return;
    }
    use rwkv_wgpu::{GpuContext, GpuOptions, LoadOptions, LogitsMode, Model};
    let name = "v7-L2-C128-V512-fp32";
    let weights =
        Model::load(&gpu().unwrap(), model_path(name), &LoadOptions::default()).unwrap().info().gpu_weight_bytes;
    // Too small for the weights.
    let ctx = GpuContext::new(&GpuOptions { memory_limit: Some(weights / 2), ..Default::default() }).unwrap();
    let e = Model::load(&ctx, model_path(name), &LoadOptions::default()).err().expect("must not fit");
    assert!(matches!(e, rwkv_wgpu::Error::MemoryLimit { limit, .. } if limit == weights / 2), "{e}");
    // Room for the weights but not for a long step's buffers.
    let ctx = GpuContext::new(&GpuOptions { memory_limit: Some(weights + (1 << 20)), ..Default::default() }).unwrap();
    let mut engine = engine_with(&ctx, model_path(name), &LoadOptions::default(), 4096);
    let mut state = engine.new_state(1).unwrap();
    let tokens = vec![1u32; 4096];
    let e = engine.forward(&mut state, &[&tokens], LogitsMode::Last).unwrap_err();
    assert!(matches!(e, rwkv_wgpu::Error::MemoryLimit { .. }), "{e}");
    // The same through the binary: one line naming both figures.
    let dir = scratch("oom");
    let o = run(
        &["inspect", "--gpu-memory-limit", "100000", "--model", model_path(name).to_str().unwrap()],
        &dir,
        b"",
        "oom",
    );
    let e = one_error(&o, "inspect under a memory limit");
    assert!(e.contains("needs") && e.contains("limit of 100000 bytes"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The review's findings after the first round (each failed before its fix).
#[test]
fn second_round_inputs_are_errors_not_crashes() {
    let dir = scratch("round2");
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/austen-rwkv7");
    let demo: serde_json::Value =
        serde_json::from_slice(&std::fs::read(assets.join("tokenizer.json")).unwrap()).unwrap();
    let write = |name: &str, v: &serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
        p
    };
    let text = b"hello world it is";
    let plain = run(&["tokenize", "--tokenizer", assets.join("tokenizer.json").to_str().unwrap()], &dir, text, "t");
    // Padding to 300,000,000 and truncation to 1 token in the file: ignored.
    let mut padded = demo.clone();
    padded["padding"] = serde_json::json!({"strategy": {"Fixed": 300000000}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"});
    padded["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0});
    let p = write("padded.json", &padded);
    let o = run_limited(&["tokenize", "--tokenizer", p.to_str().unwrap()], &dir, "padded");
    assert!(o.status.success(), "{}", stderr(&o));
    // (run_limited gives no stdin: compare on empty input, then the real text unlimited)
    let o = run(&["tokenize", "--tokenizer", p.to_str().unwrap()], &dir, text, "padded text");
    assert_eq!(o.stdout, plain.stdout, "padding/truncation from the file changed the ids");
    // A Precompiled normalizer (tokenizers panics on it): refused.
    let mut pre = demo.clone();
    pre["normalizer"] = serde_json::json!({"type": "Precompiled"});
    let p = write("precompiled.json", &pre);
    let e = one_error(&run(&["tokenize", "--tokenizer", p.to_str().unwrap()], &dir, text, "pre"), "pre");
    assert!(e.contains("Precompiled"), "{e}");
    // Non-ASCII in a shape.
    let e = one_error(&run(&["bench", "--shape", "é1"], &dir, b"", "shape"), "shape");
    assert!(e.contains("shape"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn outputs_never_replace_a_tokenizer_state_or_ids_file() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("inputs");
    let model = demo_copy(&dir);
    let m = model.to_str().unwrap();
    let tok = dir.join("tokenizer.json");
    let tok_sha = sha256(&tok);
    let o = run(&["chat", "--model", m, "--max-tokens", "2"], &dir, b"/save tokenizer.json\n/quit\n", "chat save");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("same file as the input"), "{}", stderr(&o));
    assert_eq!(sha256(&tok), tok_sha, "chat /save replaced the tokenizer next to the model");
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[1, 2, 3]").unwrap();
    let ids_sha = sha256(&ids);
    let o = run(&["logits", "--model", m, "--tokens-file", "ids.json", "--out", "ids.json"], &dir, b"", "logits");
    assert!(one_error(&o, "logits over its ids").contains("same file as the input"));
    assert_eq!(sha256(&ids), ids_sha);
    // 500,000 ids (1 MB) with --all: refused before holding 8 GB of logits.
    std::fs::write(&ids, "0 ".repeat(500_000)).unwrap();
    let o = run(&["logits", "--model", m, "--tokens-file", "ids.json", "--all", "--out", "l.npy"], &dir, b"", "big");
    assert!(one_error(&o, "logits of 1 MB of ids").contains("MB"));
    // Closing stdout early ends a command quietly.
    let mut child =
        bin().args(["inspect", "--model", m]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let o = finish(child, "inspect | (closed)");
    assert!(o.status.success(), "a closed stdout: {}", stderr(&o));
    no_temp_files(&dir);
    std::fs::remove_dir_all(&dir).ok();
}

/// A short soak through the library: GPU bytes constant after the first
/// step, every logit finite (`rwkv bench --soak` runs the long one).
#[test]
fn soak_keeps_gpu_memory_flat() {
    let Some(ctx) = gpu() else { return };
    let mut e = engine(&ctx, model_path("v7-L3-C64-V512-fp16-l0v"), 16);
    let samples = rwkv_wgpu::bench::soak(&ctx, &mut e, 400, 100, |_| {}).unwrap();
    assert_eq!(samples.len(), 5);
    assert!(samples.windows(2).all(|w| w[0].gpu_bytes == w[1].gpu_bytes), "{samples:?}");
}

/// A turn that fails (here: a loaded state of huge but finite values makes
/// the logits non-finite) is reported and undone; the chat goes on.
#[test]
fn a_failed_chat_turn_is_undone_and_the_chat_goes_on() {
    if gpu().is_none() {
        return;
    }
    let dir = scratch("turn");
    let model = demo_copy(&dir);
    let m = model.to_str().unwrap();
    let big = dir.join("big.safetensors");
    let o = run(
        &["chat", "--model", m, "--max-tokens", "2"],
        &dir,
        format!("/save {}\n", big.display()).as_bytes(),
        "save",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Every value 1e38: finite, so /load takes it.
    let mut bytes = std::fs::read(&big).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for v in bytes[8 + header..].chunks_exact_mut(4) {
        v.copy_from_slice(&1e38f32.to_le_bytes());
    }
    std::fs::write(&big, bytes).unwrap();
    let stdin = format!("/load {}\nHi.\n/reset\nAgain.\n/quit\n", big.display());
    let o = run(&["chat", "--model", m, "--max-tokens", "4", "--seed", "3"], &dir, stdin.as_bytes(), "chat");
    assert!(o.status.success(), "the chat must survive a failed turn:\n{}", stderr(&o));
    let errors = error_lines(&o);
    assert!(errors.len() == 1 && errors[0].contains("turn 1"), "{}", stderr(&o));
    assert!(stderr(&o).contains("[turn 2:"), "the next turn runs: {}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// A command killed (SIGKILL: no handler runs) while it writes its output
/// leaves nothing in the output's folder, neither a partial output nor a
/// temporary file: outputs are written as an `O_TMPFILE` and named only when
/// complete (`files::write_atomic`, Linux x86-64). The test waits until the
/// `rwkv quantize` child holds a file in the folder other than its input
/// (that is, while it writes), then kills it; a run that finishes first is
/// tried again, at most ATTEMPTS times.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn a_command_killed_while_writing_leaves_nothing() {
    const ATTEMPTS: usize = 5;
    let dir = TempDir::new("killed-write");
    let model = dir.0.as_path().join("m.safetensors");
    let out = dir.0.as_path().join("q.safetensors");
    let shape = "L2-D512-V65536".parse().unwrap();
    rwkv_wgpu::synthetic::write_v7(&model, shape, rwkv_wgpu::Dtype::F16, 1).unwrap();
    let input_sha = sha256(&model);
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(dir.0.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        v.sort();
        v
    };
    for _ in 0..ATTEMPTS {
        let mut child = bin()
            .args(["quantize"])
            .arg(&model)
            .arg(&out)
            .args(["--to", "int8"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
        let start = Instant::now();
        let mut caught = false;
        while !caught && start.elapsed() < LIMIT && child.try_wait().unwrap().is_none() {
            caught = std::fs::read_dir(&fds)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir.0.as_path()) && t != model));
            if !caught {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if caught {
            child.kill().unwrap();
            child.wait().unwrap();
            assert_eq!(listing(), vec!["m.safetensors".to_string()], "left behind by a killed quantize");
            assert_eq!(sha256(&model), input_sha);
            return;
        }
        child.kill().ok();
        child.wait().unwrap();
        let _ = std::fs::remove_file(&out);
    }
    panic!("rwkv quantize was never caught writing its output in {ATTEMPTS} runs");
}
