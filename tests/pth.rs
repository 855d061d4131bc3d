//! Official PyTorch `.pth` checkpoints: files written by torch.save itself
//! (tests/fixtures/make_pth.py) load to exactly the tensors of the
//! safetensors they came from, run to the golden logits, and a pickle that
//! would run code is refused.

mod common;

use common::*;
use rwkv_wgpu::{Dtype, Error, LogitsMode, SafeTensorsFile};

fn pth(name: &str) -> std::path::PathBuf {
    fixture(&format!("pth/{name}.pth"))
}

/// (pth file, source fixture, dtype the pth stores)
const CASES: [(&str, &str, Dtype); 4] = [
    ("v7-L3-C64-V512-fp16-l0v", "v7-L3-C64-V512-fp16-l0v", Dtype::F16),
    // The same entries with every size and offset in zip64 fields (as in
    // checkpoints over 4 GiB).
    ("v7-L3-C64-V512-fp16-l0v-zip64", "v7-L3-C64-V512-fp16-l0v", Dtype::F16),
    ("v7-L2-C128-V512-bf16", "v7-L2-C128-V512-bf16", Dtype::BF16),
    ("v4-L3-C64-V512-fp16-f32", "v4-L3-C64-V512-fp16", Dtype::F32),
];

#[test]
fn pth_tensors_equal_the_safetensors_source() {
    for (file, source, dtype) in CASES {
        let p = SafeTensorsFile::open(pth(file)).unwrap();
        let s = SafeTensorsFile::open(model_path(source)).unwrap();
        let mut names: Vec<&str> = p.names().collect();
        let mut want: Vec<&str> = s.names().collect();
        names.sort_unstable();
        want.sort_unstable();
        assert_eq!(names, want, "{file}: tensor names");
        for name in want {
            let (a, b) = (p.get(name).unwrap(), s.get(name).unwrap());
            assert_eq!(a.shape, b.shape, "{file}: {name} shape");
            assert_eq!(a.dtype, dtype, "{file}: {name} dtype");
            if a.dtype == b.dtype {
                assert!(a.bytes == b.bytes, "{file}: {name} bytes differ");
            } else {
                assert_eq!(a.to_f32(), b.to_f32(), "{file}: {name} values differ");
            }
        }
    }
}

#[test]
fn pth_models_match_golden() {
    let Some(ctx) = gpu() else { return };
    for (file, source, _) in CASES {
        let mut model = engine(&ctx, pth(file), rwkv_wgpu::DEFAULT_CHUNK_TOKENS);
        let g = Golden::load(source);
        let mut state = model.new_state(1).unwrap();
        let logits = model.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
        let err = rel_l2(&logits, &g.logits);
        assert!(err <= LOGITS_REL_L2, "{file}: logits relative L2 {err:.3e}");
        assert_eq!(top1_agreement(&logits, &g.logits, g.vocab), 1.0, "{file}: top-1");
    }
}

#[test]
fn malicious_pickle_is_refused() {
    let e = SafeTensorsFile::open(pth("malicious")).err().expect("a pickle calling os.system must not load");
    let msg = e.to_string();
    assert!(matches!(e, Error::BadPth { .. }), "{msg}");
    assert!(msg.contains("refused") && msg.contains("system"), "{msg}");
}

/// Pickles that build no code but would exhaust memory or the stack: a
/// tuple doubled through the memo 40 times, and lists nested 1,000 deep.
#[test]
fn resource_bombs_are_refused() {
    for (file, what) in [("memo_bomb", "values"), ("deep", "nested")] {
        let e = SafeTensorsFile::open(pth(file)).err().expect("must not load");
        let msg = e.to_string();
        assert!(matches!(e, Error::BadPth { .. }) && msg.contains(what), "{file}: {msg}");
    }
}

#[test]
fn broken_pth_files_are_errors() {
    let bytes = std::fs::read(pth("v7-L3-C64-V512-fp16-l0v")).unwrap();
    let dir = std::env::temp_dir().join(format!("rwkv-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Truncated: the zip directory at the end is gone.
    let cut = dir.join("truncated.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = SafeTensorsFile::open(&cut).err().expect("a truncated .pth must not load");
    assert!(matches!(e, Error::BadPth { .. }), "{e}");
    // Bytes of the zip header and the pickle (the first entry) flipped one
    // at a time must give an error or a checkpoint, never a panic: the parser
    // checks every length, index and size.
    for i in (0..bytes.len().min(4096)).step_by(7) {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        let p = dir.join("flipped.pth");
        std::fs::write(&p, &b).unwrap();
        let _ = SafeTensorsFile::open(&p);
    }
    std::fs::remove_dir_all(&dir).ok();
}
