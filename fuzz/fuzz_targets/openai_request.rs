//! Fuzz target: see `rwkv_wgpu::fuzzing::openai_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_wgpu::fuzzing::openai_request(data));
