// SwiGLU's product (Llama, Qwen2 MLP): y[n, i] = silu(h[n, i]) * h[n, F + i],
// where h holds each token's gate and up projections side by side
// ([gate; up] weights fused into one [2F, C] matrix). F is a multiple of 4.

struct Params {
    n_rows: u32,
    ffn: u32, // F
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> h: array<vec4<f32>>;       // [n_rows, 2F / 4]: gate, then up
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>; // [n_rows, F / 4]

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n = gid.y;
    let f4 = p.ffn / 4u;
    if (c >= f4 || n >= p.n_rows) {
        return;
    }
    let g = h[n * 2u * f4 + c];
    let u = h[n * 2u * f4 + f4 + c];
    y[n * f4 + c] = g / (1.0 + exp(-g)) * u;
}
