// x[n, c] += a[n, c] * b[n, c], four channels per invocation (the channel
// mix output of RWKV-4, 5 and 6: x += sigmoid(r) * (k Wv), r already
// activated). dim and the offsets are multiples of 4.

struct Params {
    n_tok: u32,
    dim: u32,
    a_offset: u32, // elements
    b_offset: u32, // elements
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;       // [n_tok, dim / 4] at a_offset
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;       // [n_tok, dim / 4] at b_offset
@group(0) @binding(3) var<storage, read_write> x: array<vec4<f32>>; // [n_tok, dim / 4]

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n = gid.y;
    let d4 = p.dim / 4u;
    if (c >= d4 || n >= p.n_tok) {
        return;
    }
    let i = n * d4 + c;
    x[i] = x[i] + a[p.a_offset / 4u + i] * b[p.b_offset / 4u + i];
}
