//! Fuzz target: see `rwkv_wgpu::fuzzing::hf_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_wgpu::fuzzing::hf_config(data));
