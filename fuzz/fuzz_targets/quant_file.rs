//! Fuzz target: see `rwkv_wgpu::fuzzing::quant_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv_wgpu::fuzzing::quant_file(data));
