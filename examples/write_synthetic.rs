//! Writes a synthetic RWKV-7 checkpoint of a shape to a file, for memory
//! and speed measurements on model files (`rwkv quantize`, `bench --model`):
//! `cargo run --release --example write_synthetic -- L24-D2048-V65536 OUT.safetensors [f16]`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape, out, rest @ ..] = &args[..] else {
        anyhow::bail!("usage: write_synthetic SHAPE OUT.safetensors [f32|f16|bf16]");
    };
    let shape: rwkv_wgpu::synthetic::Shape = shape.parse()?;
    let dtype = match rest.first().map(String::as_str).unwrap_or("f16") {
        "f32" => rwkv_wgpu::Dtype::F32,
        "f16" => rwkv_wgpu::Dtype::F16,
        "bf16" => rwkv_wgpu::Dtype::BF16,
        other => anyhow::bail!("dtype {other}: f32, f16 or bf16"),
    };
    let file = std::fs::File::create(out)?;
    let name = format!("synthetic v7 {shape}");
    rwkv_wgpu::synthetic::write_to(&file, Path::new(&name), rwkv_wgpu::Version::V7, shape, dtype, 1)?;
    eprintln!("wrote {name} ({}) to {out}", dtype.name());
    Ok(())
}
