// x[n, c] += b[c] for `dim` channels of each of `n_rows` rows `row_stride`
// elements apart (the biases of Qwen2's q/k/v and of every GPT-NeoX
// projection). dim, row_stride and the offsets are multiples of 4.

struct Params {
    n_rows: u32,
    dim: u32,
    row_stride: u32,
    x_offset: u32, // elements: channel 0 of row 0
    b_offset: u32, // elements: the bias in vecs
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<vec4<f32>>; // [n_rows, row_stride / 4] at x_offset
@group(0) @binding(2) var<storage, read> vecs: array<vec4<f32>>;    // b [dim / 4] at b_offset

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n = gid.y;
    if (c >= p.dim / 4u || n >= p.n_rows) {
        return;
    }
    let i = (p.x_offset + n * p.row_stride) / 4u + c;
    x[i] = x[i] + vecs[p.b_offset / 4u + c];
}
