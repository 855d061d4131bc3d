// Rotary position embedding, "rotate half" form (Llama, Qwen2, GPT-NeoX), in
// place on the first `rotary` channels of each head of each token's row:
//   for i < rotary / 2, with (c, s) = cs[t, i]:
//     x[i]            = x[i] c - x[i + rotary/2] s
//     x[i + rotary/2] = x[i + rotary/2] c + x[i] s
// The cosines and sines are computed on the CPU per step from f32 angles, as
// transformers computes them (WGSL's sin and cos are not accurate for the
// large angles of long contexts). One invocation per (pair, head) and token.

struct Params {
    n_tok: u32,
    n_head: u32,
    head_dim: u32,
    rotary: u32,     // rotated channels per head (even, <= head_dim)
    row_stride: u32, // elements between tokens' rows
    offset: u32,     // element of token 0, head 0
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>; // [n_tok, row_stride] at offset: heads of head_dim
@group(0) @binding(2) var<storage, read> cs: array<vec2<f32>>; // [n_tok, rotary / 2] (cos, sin)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.rotary / 2u;
    let t = gid.y;
    if (t >= p.n_tok || gid.x >= half * p.n_head) {
        return;
    }
    let h = gid.x / half;
    let i = gid.x % half;
    let base = p.offset + t * p.row_stride + h * p.head_dim;
    let a = x[base + i];
    let b = x[base + i + half];
    let r = cs[t * half + i];
    x[base + i] = a * r.x - b * r.y;
    x[base + i + half] = b * r.x + a * r.y;
}
