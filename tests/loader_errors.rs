//! The loader turns every malformed file into a typed error naming what was
//! wrong; none of them panics.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use rwkv_wgpu::{Error, LoadOptions, Model};
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;

const BASE: &str = "v7-L2-C128-V512-fp32";

/// A file of this process in the temporary folder (`load_err` removes it).
fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rwkv-wgpu-loader-{}-{name}", std::process::id()))
}

/// The base fixture's tensors as (dtype, shape, bytes), to edit and re-serialize.
fn tensors() -> HashMap<String, (StDtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(model_path(BASE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn write(name: &str, t: &HashMap<String, (StDtype, Vec<usize>, Vec<u8>)>) -> PathBuf {
    let views: Vec<(String, TensorView)> =
        t.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let path = tmp(name);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

/// The error of loading `path`; `None` (skip) only off CI without an adapter.
fn load_err(path: &PathBuf) -> Option<Error> {
    let ctx = gpu()?;
    let result = Model::load(&ctx, path, &LoadOptions::default());
    std::fs::remove_file(path).ok();
    match result {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => Some(e),
    }
}

#[test]
fn missing_file() {
    let Some(e) = load_err(&tmp("does-not-exist.safetensors")) else { return };
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn truncated_files() {
    let bytes = std::fs::read(model_path(BASE)).unwrap();
    let cut = tmp("cut-data.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let Some(e) = load_err(&cut) else { return };
    assert!(matches!(e, Error::TruncatedFile { .. }), "{e}");
    assert!(e.to_string().contains("cut-data.safetensors"), "{e}");

    let tiny = tmp("tiny.safetensors");
    std::fs::write(&tiny, &bytes[..5]).unwrap();
    assert!(matches!(load_err(&tiny), Some(Error::TruncatedFile { .. })));

    let header_cut = tmp("cut-header.safetensors");
    std::fs::write(&header_cut, &bytes[..200]).unwrap();
    assert!(matches!(load_err(&header_cut), Some(Error::TruncatedFile { .. })));
}

#[test]
fn bad_header() {
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{not json at all");
    let path = tmp("bad-header.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let Some(e) = load_err(&path) else { return };
    assert!(matches!(e, Error::BadHeader { .. }), "{e}");
}

#[test]
fn missing_tensor() {
    let mut t = tensors();
    t.remove("blocks.1.att.key.weight");
    let Some(e) = load_err(&write("missing.safetensors", &t)) else { return };
    match e {
        Error::MissingTensor { name } => assert_eq!(name, "blocks.1.att.key.weight"),
        other => panic!("{other}"),
    }
}

#[test]
fn wrong_shape_and_rank() {
    let mut t = tensors();
    let (_, shape, bytes) = t.get_mut("blocks.0.att.receptance.weight").unwrap();
    *shape = vec![128, 127];
    bytes.truncate(128 * 127 * 4);
    let Some(e) = load_err(&write("shape.safetensors", &t)) else { return };
    match &e {
        Error::ShapeMismatch { name, expected, found } => {
            assert_eq!(name, "blocks.0.att.receptance.weight");
            assert_eq!(expected, &vec![128, 128]);
            assert_eq!(found, &vec![128, 127]);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("[128, 127]"), "{e}");

    let mut t = tensors();
    t.get_mut("blocks.1.att.x_r").unwrap().1 = vec![128];
    let Some(e) = load_err(&write("rank.safetensors", &t)) else { return };
    match e {
        Error::ShapeMismatch { name, expected, found } => {
            assert_eq!(name, "blocks.1.att.x_r");
            assert_eq!(expected, vec![1, 1, 128]);
            assert_eq!(found, vec![128]);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn unsupported_dtype() {
    let mut t = tensors();
    let (dtype, _, bytes) = t.get_mut("ln_out.weight").unwrap();
    let wide: Vec<u8> = bytes
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).to_le_bytes())
        .collect();
    *dtype = StDtype::F64;
    *bytes = wide;
    let Some(e) = load_err(&write("f64.safetensors", &t)) else { return };
    match e {
        Error::UnsupportedDtype { name, dtype } => {
            assert_eq!(name, "ln_out.weight");
            assert_eq!(dtype, "F64");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn not_rwkv() {
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), (StDtype::F32, vec![4, 2], vec![0u8; 32]));
    let Some(e) = load_err(&write("llama.safetensors", &t)) else { return };
    assert!(matches!(e, Error::NotRwkv { .. }), "{e}");
    assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
}

#[test]
fn other_generation_is_reported_not_misread() {
    // Without r_k (and with ln_x but no gate) the file reads as RWKV-5.0:
    // loading it names the first 5.0 tensor it lacks, not a v7 load.
    let mut t = tensors();
    for l in 0..2 {
        t.remove(&format!("blocks.{l}.att.r_k"));
    }
    let Some(e) = load_err(&write("v50.safetensors", &t)) else { return };
    match e {
        Error::MissingTensor { name } => assert_eq!(name, "blocks.0.att.time_decay"),
        other => panic!("{other}"),
    }
}

#[test]
fn unrecognised_layout_lists_what_was_found() {
    // Neither r_k, time_maa_x, ln_x nor v4's time_first: no generation.
    let mut t = tensors();
    for l in 0..2 {
        t.remove(&format!("blocks.{l}.att.r_k"));
        t.remove(&format!("blocks.{l}.att.ln_x.weight"));
    }
    let Some(e) = load_err(&write("unknown.safetensors", &t)) else { return };
    let msg = e.to_string();
    assert!(matches!(e, Error::NotRwkv { .. }), "{msg}");
    assert!(msg.contains("blocks.0.att.w0 [1, 1, 128]") && msg.contains("7: att.r_k"), "{msg}");
}
