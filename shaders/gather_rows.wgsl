// out[r, c] = x[rows[r], c]: picks the last token of each sequence for the head.

struct Params {
    n_out: u32,
    dim: u32,
    rows_offset: u32, // first entry of rows to use
    _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> rows: array<u32>;      // [rows_offset + n_out]
@group(0) @binding(2) var<storage, read> x: array<f32>;         // [*, dim]
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [n_out, dim]

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let r = gid.y;
    if (c >= p.dim || r >= p.n_out) {
        return;
    }
    out[r * p.dim + c] = x[rows[p.rows_offset + r] * p.dim + c];
}
