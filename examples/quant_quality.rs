//! The quality cost of each block quantization scheme, measured before the
//! GPU kernels exist: every matrix of an RWKV checkpoint (the head and the
//! LoRAs included; the embedding stays in the file) is quantized and read
//! back exactly (`quant::Quantized::dequantize`), and the result written as
//! an f32 checkpoint whose perplexity `rwkv perplexity` then measures.
//! The GPU kernels will compute the same products (code · scale, in f32).
//!
//! ```sh
//! cargo run --release --example quant_quality -- assets/austen-rwkv7/austen-rwkv7-fp16.safetensors /tmp/q
//! for f in /tmp/q/*.safetensors; do
//!     rwkv perplexity assets/austen-rwkv7/val.txt --model $f --tokenizer assets/austen-rwkv7/tokenizer.json
//! done
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use rwkv_wgpu::quant::{self, Format, Scheme};
use safetensors::tensor::{Dtype, TensorView};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: quant_quality MODEL.safetensors OUT_DIR");
        std::process::exit(2);
    }
    let bytes = std::fs::read(&args[1]).expect("reading the model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let out = PathBuf::from(&args[2]);
    std::fs::create_dir_all(&out).expect("making the output folder");
    let f32s = |t: &TensorView| -> Vec<f32> {
        match t.dtype() {
            Dtype::F32 => bytemuck::pod_collect_to_vec(t.data()),
            Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(t.data()).iter().map(|h| h.to_f32()).collect(),
            Dtype::BF16 => {
                bytemuck::pod_collect_to_vec::<u8, half::bf16>(t.data()).iter().map(|h| h.to_f32()).collect()
            }
            d => panic!("dtype {d:?}"),
        }
    };
    let mut schemes = vec![None];
    for format in [Format::Int8, Format::Q4] {
        for block in [32, 64] {
            schemes.push(Some(Scheme { format, block }));
        }
    }
    for scheme in schemes {
        let mut tensors: HashMap<String, (Vec<usize>, Vec<u8>)> = HashMap::new();
        let (mut quantized, mut smaller_block, mut code_bytes, mut float_bytes) = (0usize, 0usize, 0usize, 0usize);
        for (name, t) in st.tensors() {
            let shape = t.shape().to_vec();
            let mut v = f32s(&t);
            if let (Some(s), Some(axis)) = (scheme, quant::input_axis(&name, &shape)) {
                let cols = shape[axis];
                if cols % s.block != 0 {
                    smaller_block += 1;
                }
                let block = if cols % s.block == 0 { s.block } else { 32 };
                code_bytes += v.len() * s.format.bits() / 8 + 2 * v.len() / block;
                v = quant::round_trip(s, &name, &shape, &v).expect("quantizing").expect("a matrix");
                quantized += 1;
            } else {
                float_bytes += v.len() * 2;
            }
            tensors.insert(name.to_string(), (shape, bytemuck::cast_slice(&v).to_vec()));
        }
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, (shape, b))| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
            .collect();
        let name = scheme.map_or("f16".to_string(), |s| format!("{}-{}", s.format.name(), s.block));
        let path = out.join(format!("{name}.safetensors"));
        safetensors::tensor::serialize_to_file(views, None, &path).expect("writing");
        println!(
            "{}: {quantized} matrices quantized ({smaller_block} with blocks of 32), {code_bytes} bytes of codes and scales, {float_bytes} bytes of f16 tensors",
            path.display()
        );
    }
}
