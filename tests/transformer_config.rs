//! Hugging Face folders (`fixtures/transformer`, written by transformers):
//! config.json in both key styles, sharded weights, and refusals.

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use rwkv_wgpu::loader::hf::{Family, HfFolder, HfWeights, RopeScaling, TransformerConfig};
use rwkv_wgpu::Error;

fn folder(name: &str) -> PathBuf {
    fixture(&format!("transformer/models/{name}"))
}

#[test]
fn every_fixture_config_reads_as_its_manifest_says() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("transformer/manifest.json")).unwrap()).unwrap();
    let models = manifest["models"].as_array().unwrap();
    assert_eq!(models.len(), 7);
    for m in models {
        let name = m["name"].as_str().unwrap();
        let f = HfFolder::open(&folder(name)).unwrap();
        let c = &f.config;
        let n = |k: &str| m[k].as_u64().unwrap() as usize;
        assert_eq!((c.n_layer, c.hidden, c.n_head, c.ffn, c.vocab), (n("L"), n("D"), n("H"), n("F"), n("V")), "{name}");
        assert_eq!(c.n_kv_head, m.get("KV").and_then(|v| v.as_u64()).map_or(c.n_head, |v| v as usize), "{name}");
        let family = match m["arch"].as_str().unwrap() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "gpt_neox" => Family::GptNeoX,
            other => panic!("{other}"),
        };
        assert_eq!(c.family, family, "{name}");
        assert_eq!(c.tied, name.ends_with("-tied") || name.ends_with("-austen"), "{name}: tied");
        assert_eq!(c.tied, !f.weights.contains("lm_head.weight") && c.family != Family::GptNeoX, "{name}");
        // Every tensor of every shard is found by name.
        for t in f.weights.names().collect::<Vec<_>>() {
            f.weights.get(t).unwrap();
        }
    }
}

#[test]
fn rope_in_both_key_styles() {
    let c = |name: &str| TransformerConfig::load(&folder(name).join("config.json")).unwrap();
    // Legacy GPT-NeoX keys: rotary_pct 0.25 of a head of 32, parallel residual.
    let neox = c("gptneox-L2-D128-H4-F512-V512-fp32");
    assert_eq!((neox.rope.rotary_dim, neox.head_dim, neox.parallel_residual), (8, 32, true));
    // transformers 5 rope_parameters: partial_rotary_factor 0.5, sequential residual.
    let seq = c("gptneox-L2-D64-H2-F256-V512-fp16-seqres");
    assert_eq!((seq.rope.rotary_dim, seq.parallel_residual, seq.rope.theta), (16, false, 10000.0));
    // Llama 3 scaling, legacy rope_scaling block.
    let l3 = c("llama3rope-L2-D128-H2-KV1-F320-V512-fp32");
    assert_eq!(l3.rope.theta, 500000.0);
    assert_eq!(
        l3.rope.scaling,
        RopeScaling::Llama3 { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 64 }
    );
    // Its inverse frequencies: high ones kept, low ones divided by the factor.
    let plain = rwkv_wgpu::loader::hf::Rope { scaling: RopeScaling::None, ..l3.rope.clone() }.inv_freq();
    let scaled = l3.rope.inv_freq();
    assert_eq!(scaled.len(), 32);
    assert_eq!(scaled[0], plain[0], "the highest frequency is kept");
    assert_eq!(scaled[31], plain[31] / 32.0, "the lowest is divided by the factor");
    assert_eq!(c("qwen2-L2-D128-H4-KV2-F320-V512-fp16-tied").rope.theta, 1e6);
    assert_eq!(c("llama-L3-D96-H3-KV1-F256-V512-bf16-tied").rope.theta, 5e5);
}

#[test]
fn shards_follow_their_index() {
    let dir = folder("qwen2-L2-D128-H4-KV2-F320-V512-fp16-tied");
    let w = HfWeights::open(&dir).unwrap();
    assert_eq!(w.files().len(), 3);
    let total: usize = w.files().iter().map(|f| f.names().count()).sum();
    assert_eq!(w.names().count(), total);
    assert!(w.contains("model.layers.0.self_attn.q_proj.bias"), "qwen2 has q/k/v biases");
    // An index naming a tensor its shard lacks, or a shard outside the folder.
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let open = |p: &Path| rwkv_wgpu::SafeTensorsFile::open(p);
    let moved = text.replacen("model-00001-of-00003", "model-00002-of-00003", 1);
    let e = HfWeights::from_index(moved.as_bytes(), &index, &dir, open).err().expect("must not open");
    assert!(e.to_string().contains("is not in its shard"), "{e}");
    let escape = text.replacen("model-00001-of-00003.safetensors", "../x.safetensors", 1);
    let e = HfWeights::from_index(escape.as_bytes(), &index, &dir, open).err().expect("must not open");
    assert!(e.to_string().contains("not a .safetensors file in the folder"), "{e}");
}

#[test]
fn bad_configs_are_errors_naming_what_is_wrong() {
    let p = Path::new("config.json");
    let base = std::fs::read_to_string(folder("llama-L2-D128-H4-KV2-F344-V512-fp32").join("config.json")).unwrap();
    let cases = [
        (base.replace("\"llama\"", "\"mistral\""), "model_type `mistral`"),
        (base.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"), "not a multiple of 3"),
        (base.replace("\"hidden_size\": 128", "\"hidden_size\": 0"), "hidden_size 0"),
        (base.replace("\"vocab_size\": 512", "\"vocab_size\": 99999999999"), "vocab_size 99999999999"),
        (
            base.replace("\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}"),
            "rope_type `yarn`",
        ),
        (base.replace("\"eos_token_id\": 2", "\"eos_token_id\": -1"), "eos_token_id"),
        ("[1, 2]".to_string(), "not a config"),
    ];
    for (text, want) in cases {
        let e = TransformerConfig::parse(text.as_bytes(), p).err().unwrap_or_else(|| panic!("accepted: {want}"));
        assert!(matches!(e, Error::BadConfig { .. }) && e.to_string().contains(want), "{want}: {e}");
    }
}
