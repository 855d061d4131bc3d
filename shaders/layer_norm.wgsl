// y[n, :] = (x[n, :] - mean) / sqrt(var + eps) * weight + bias   (biased variance)
// One workgroup per row.

struct Params {
    n_rows: u32,
    dim: u32,
    x_offset: u32, // elements
    y_offset: u32, // elements
    w_offset: u32, // weight [dim] in vecs
    b_offset: u32, // bias [dim] in vecs
    eps: f32,
    _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // [n_rows, dim] at x_offset
@group(0) @binding(2) var<storage, read> vecs: array<f32>;    // per-layer vectors
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // [n_rows, dim] at y_offset

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let xb = p.x_offset + row * p.dim;
    var s = 0.0;
    for (var c = lid; c < p.dim; c += GS) {
        s += x[xb + c];
    }
    let mean = group_sum(s, lid) / f32(p.dim);
    var q = 0.0;
    for (var c = lid; c < p.dim; c += GS) {
        let d = x[xb + c] - mean;
        q += d * d;
    }
    let var_ = group_sum(q, lid) / f32(p.dim);
    let rstd = 1.0 / sqrt(var_ + p.eps);
    let yb = p.y_offset + row * p.dim;
    for (var c = lid; c < p.dim; c += GS) {
        y[yb + c] = (x[xb + c] - mean) * rstd * vecs[p.w_offset + c] + vecs[p.b_offset + c];
    }
}
