//! The quality cost of the block quantizers (`rwkv_wgpu::quant`) on a real
//! trained model: every matrix of the built-in Austen RWKV-7 (the head and
//! the LoRAs included) quantized and read back, its perplexity on the
//! model's validation text measured on the GPU against the f16 model's.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use rwkv_wgpu::quant::{self, Encoding, Format, Scheme};
use rwkv_wgpu::{Engine, EngineOptions, LoadOptions, LogitsMode, Model, SafeTensorsFile, Tokenizer};
use safetensors::tensor::{Dtype, TensorView};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/austen-rwkv7");
/// The f16 model's perplexity on val.txt, as `rwkv perplexity` prints it
/// (3 decimals: the f32 copy must round to the same figure).
const F16_PERPLEXITY: f64 = 44.818;
const F16_PRINTED: f64 = 5e-4;
/// Issue 14's bars: int8 within +0.1 %, 4-bit within +1.0 % of f16.
const INT8_MAX: f64 = 44.86;
const FOUR_BIT_MAX: f64 = 45.27;

/// The checkpoint with every matrix quantized by `scheme` and read back, as f32.
fn fake_quantized(scheme: Option<Scheme>) -> Vec<u8> {
    let bytes = std::fs::read(Path::new(ASSETS).join("austen-rwkv7-fp16.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let shape = t.shape().to_vec();
        let mut v: Vec<f32> =
            bytemuck::pod_collect_to_vec::<u8, half::f16>(t.data()).iter().map(|h| h.to_f32()).collect();
        if let Some(s) = scheme {
            v = quant::round_trip(s, &name, &shape, &v).unwrap().unwrap_or(v);
        }
        out.push((name.to_string(), shape, bytemuck::cast_slice(&v).to_vec()));
    }
    let views = out.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()));
    safetensors::tensor::serialize(views, None).unwrap()
}

/// Perplexity of the validation text, read in one stream from the zero state.
fn perplexity(ctx: &rwkv_wgpu::GpuContext, checkpoint: Vec<u8>, ids: &[u32]) -> f64 {
    perplexity_with(ctx, checkpoint, ids, None)
}

/// As `perplexity`, the checkpoint quantized at load to `quant`.
fn perplexity_with(ctx: &rwkv_wgpu::GpuContext, checkpoint: Vec<u8>, ids: &[u32], quant: Option<Format>) -> f64 {
    let mut file = rwkv_wgpu::files::unnamed_file(&std::env::temp_dir()).unwrap();
    file.write_all(&checkpoint).unwrap();
    let f = SafeTensorsFile::from_file(file, "quantized").unwrap();
    let opts = LoadOptions { quant, ..Default::default() };
    let model = std::sync::Arc::new(Model::from_file(ctx, f, &opts).unwrap());
    let mut engine = Engine::new(model.clone(), &EngineOptions::default()).unwrap();
    let mut state = model.new_state(1).unwrap();
    let vocab = model.info().vocab;
    let mut nll = 0f64;
    // 1024 tokens at a time: 16 MiB of logits.
    for (k, chunk) in ids[..ids.len() - 1].chunks(1024).enumerate() {
        let logits = engine.forward(&mut state, &[chunk], LogitsMode::All).unwrap().remove(0);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let next = ids[k * 1024 + i + 1] as usize;
            let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            nll += max + sum.ln() - row[next] as f64;
        }
    }
    (nll / (ids.len() - 1) as f64).exp()
}

#[test]
fn quantized_austen_perplexity_within_the_bars() {
    let Some(ctx) = gpu() else { return };
    let tok = Tokenizer::from_file(&Path::new(ASSETS).join("tokenizer.json")).unwrap();
    let ids = tok.encode(&std::fs::read(Path::new(ASSETS).join("val.txt")).unwrap()).unwrap();
    let base = perplexity(&ctx, fake_quantized(None), &ids);
    eprintln!("f16 (as f32): perplexity {base:.3}");
    assert!((base - F16_PERPLEXITY).abs() < F16_PRINTED, "the f16 baseline moved: {base}");
    for (format, max) in [(Format::Int8, INT8_MAX), (Format::Q4, FOUR_BIT_MAX)] {
        for block in [32, 64] {
            let scheme = Scheme { format, block };
            let p = perplexity(&ctx, fake_quantized(Some(scheme)), &ids);
            eprintln!("{scheme}: perplexity {p:.3} ({:+.2} %)", (p / base - 1.0) * 100.0);
            assert!(p <= max, "{scheme}: perplexity {p:.3} > {max}");
        }
    }
}

/// Relative L2 distance of the logits of every fixture model (each
/// generation; fp32, fp16 and bf16 checkpoints) quantized at load, from the
/// float64 golden logits at every position. The fixtures' weights are
/// random (no trained model's outliers and smooth rows), which 4 bits
/// represent coarsely. Measured on lavapipe with x in f32 (the kernels of
/// buffers and other adapters): int8 6.6e-3 .. 1.19e-2, q4 9.9e-2 ..
/// 2.08e-1. With `linear_qx_tex.wgsl` (lavapipe's, which quantizes x per
/// block of 64 too: 7 bits for int8, 8 for q4): int8 1.67e-2 .. 3.86e-2, q4
/// 9.9e-2 .. 2.07e-1 (v5.0 fp16 the worst throughout). The bounds are those
/// maxima with a quarter of headroom; a kernel or layout error gives
/// differences of order 1.
const INT8_FIXTURE_REL_L2: f64 = 1.5e-2;
const INT8_7BIT_X_FIXTURE_REL_L2: f64 = 4.8e-2;
const Q4_FIXTURE_REL_L2: f64 = 2.6e-1;

#[test]
fn quantized_fixture_logits_stay_close_and_batch_equals_single() {
    let Some(ctx) = gpu() else { return };
    let int8_x = Encoding::Blocks(Scheme { format: Format::Int8, block: 64 });
    let int8 = if ctx.plan().qx_groups(int8_x) { INT8_7BIT_X_FIXTURE_REL_L2 } else { INT8_FIXTURE_REL_L2 };
    for (format, bound) in [(Format::Int8, int8), (Format::Q4, Q4_FIXTURE_REL_L2)] {
        let mut worst = 0f64;
        for name in ALL_FIXTURES {
            let opts = LoadOptions { quant: Some(format), ..Default::default() };
            let mut engine = engine_with(&ctx, model_path(name), &opts, 256);
            let info = engine.info().clone();
            assert_eq!(info.quant, Some(format));
            assert!(
                info.matrix_bytes.iter().any(|(e, _)| matches!(e, Encoding::Blocks(s) if s.format == format)),
                "{name}: no matrix was quantized to {format}: {:?}",
                info.matrix_bytes
            );
            let g = Golden::load(name);
            let mut state = engine.new_state(1).unwrap();
            let logits = engine.forward(&mut state, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
            let err = rel_l2(&logits, &g.logits);
            eprintln!("{name} {format}: rel L2 {err:.3e} from the golden logits");
            assert!(err <= bound, "{name} {format}: rel L2 {err:.3e} > {bound:e}");
            worst = worst.max(err);
            // Batch == single, bit for bit: three sequences of different
            // lengths in one step, each against its own run.
            let lens = [g.tokens.len(), 5, 1];
            let seqs: Vec<&[u32]> = lens.iter().map(|&n| &g.tokens[..n]).collect();
            assert_batch_is_single(&mut engine, &seqs, &format!("{name} {format}"));
        }
        eprintln!("{format}: worst rel L2 {worst:.3e}");
    }
}

/// The Austen model quantized on the GPU at load (`--quant`, blocks of 64)
/// computes what the round-tripped f32 checkpoint of the same weights does:
/// where x stays f32 the perplexities differ only by f32 summation order
/// (measured equal to 4 decimals: int8 44.8165, q4 44.9035 on buffers; 1e-4
/// relative allows for the order and catches any weight read wrong, which
/// moves the third decimal).
const SAME_WEIGHTS_PPL: f64 = 1e-4;
/// The same where the matrices run `linear_qx_tex.wgsl` (textures,
/// subgroups of 8: lavapipe), which also quantizes x per block of 64 (7 bits
/// for int8 weights, 8 for Q4): measured int8 44.8140 against 44.8165
/// (−5.6e-5) and q4 44.9004 against 44.9035 (−6.9e-5); 8-bit x moved q4 by
/// +1.6e-4 on the f64 reference (`docs/performance.md`). 3e-4 allows for
/// these (the kernel itself is held to 1e-5 of each output by
/// `tests/kernels.rs`).
const SAME_WEIGHTS_8BIT_X_PPL: f64 = 3e-4;

#[test]
fn quantized_at_load_austen_perplexity() {
    let Some(ctx) = gpu() else { return };
    let tok = Tokenizer::from_file(&Path::new(ASSETS).join("tokenizer.json")).unwrap();
    let ids = tok.encode(&std::fs::read(Path::new(ASSETS).join("val.txt")).unwrap()).unwrap();
    let f16 = std::fs::read(Path::new(ASSETS).join("austen-rwkv7-fp16.safetensors")).unwrap();
    for (format, max) in [(Format::Int8, INT8_MAX), (Format::Q4, FOUR_BIT_MAX)] {
        let p = perplexity_with(&ctx, f16.clone(), &ids, Some(format));
        let scheme = Scheme { format, block: format.default_block() };
        let round_trip = perplexity(&ctx, fake_quantized(Some(scheme)), &ids);
        eprintln!("{format} at load: perplexity {p:.4} (round-tripped weights: {round_trip:.4})");
        assert!(p <= max, "{format}: perplexity {p:.3} > {max}");
        let bound =
            if ctx.plan().qx_groups(Encoding::Blocks(scheme)) { SAME_WEIGHTS_8BIT_X_PPL } else { SAME_WEIGHTS_PPL };
        assert!((p / round_trip - 1.0).abs() <= bound, "{format}: {p} vs {round_trip}");
    }
}

/// `rwkv quantize`'s files: loading one gives the logits, bit for bit, of
/// the float checkpoint quantized at load (the same quantizer, the same GPU
/// rows), with no float pass over its matrices; the metadata's format and
/// version are checked, and a pre-quantized file is never re-quantized.
#[test]
fn pre_quantized_files_load_as_quantizing_at_load_does() {
    use rwkv_wgpu::files::Overwrite;
    use rwkv_wgpu::loader::quantize_file;
    let Some(ctx) = gpu() else { return };
    let dir = TempDir::new("pre-quantized");
    for name in ["v7-L2-C128-V512-fp32", "v6-L3-C64-V512-fp16", "v5.2-L2-C128-V512-fp32", "v4-L3-C64-V512-fp16"] {
        for format in [Format::Int8, Format::Q4] {
            let src = SafeTensorsFile::open(model_path(name)).unwrap();
            let out = dir.0.join(format!("{name}-{format}.safetensors"));
            let summary = quantize_file(&src, &out, format, Overwrite::Refuse).unwrap();
            assert!(!summary.quantized.is_empty() && summary.bytes_out < summary.bytes_in, "{summary:?}");
            // Written once; a second run without --force is refused and
            // leaves the file as it was.
            let before = std::fs::read(&out).unwrap();
            assert!(quantize_file(&src, &out, format, Overwrite::Refuse).is_err());
            assert_eq!(std::fs::read(&out).unwrap(), before);

            let g = Golden::load(name);
            let at_load = LoadOptions { quant: Some(format), ..Default::default() };
            let mut a = engine_with(&ctx, model_path(name), &at_load, 256);
            let mut b = engine_with(&ctx, &out, &LoadOptions::default(), 256);
            assert_eq!(b.info().quant, Some(format), "{name}: the file's format is the model's");
            assert_eq!(a.info().gpu_weight_bytes, b.info().gpu_weight_bytes);
            let (mut sa, mut sb) = (a.new_state(1).unwrap(), b.new_state(1).unwrap());
            let la = a.forward(&mut sa, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
            let lb = b.forward(&mut sb, &[&g.tokens], LogitsMode::All).unwrap().remove(0);
            assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} {format}: logits differ");

            // Re-quantizing it, to the other format at load or as a file, is refused.
            let other = if format == Format::Int8 { Format::Q4 } else { Format::Int8 };
            let opts = LoadOptions { quant: Some(other), ..Default::default() };
            let e = Model::load(&ctx, &out, &opts).err().expect("a second format is refused").to_string();
            assert!(e.contains("pre-quantized") && e.contains(format.name()), "{e}");
            let q = SafeTensorsFile::open(&out).unwrap();
            let e = quantize_file(&q, &dir.0.join("again.safetensors"), other, Overwrite::Refuse).unwrap_err();
            assert!(e.to_string().contains("already quantized"), "{e}");
        }
    }
    // A format or a layout version this runtime does not read: a clear error.
    let src = SafeTensorsFile::open(model_path("v7-L2-C128-V512-fp32")).unwrap();
    let good = dir.0.join("v7-L2-C128-V512-fp32-int8.safetensors");
    for (key, value, says) in [
        (quant::FILE_FORMAT_KEY, "q9", "unknown weight format \"q9\""),
        (quant::FILE_VERSION_KEY, "2", "layout version \"2\""),
    ] {
        let bytes = std::fs::read(&good).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        meta.insert(key.to_string(), value.to_string());
        let bad = dir.0.join(format!("bad-{value}.safetensors"));
        safetensors::serialize_to_file(st.tensors(), Some(meta), &bad).unwrap();
        let e = Model::load(&ctx, &bad, &LoadOptions::default()).err().expect("refused").to_string();
        assert!(e.contains(says), "{e}");
    }
    drop(src);
}
