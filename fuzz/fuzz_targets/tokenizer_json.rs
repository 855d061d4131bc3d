//! Fuzz target: see `rwkv_wgpu::fuzzing::tokenizer_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_wgpu::fuzzing::tokenizer_json(data));
