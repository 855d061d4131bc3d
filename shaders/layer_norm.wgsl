// y[n, :] = (x[n, :] - mean) / sqrt(var + eps) * weight + bias   (biased variance)
// One workgroup per row; each invocation takes four channels at a time (dim
// and every offset are multiples of 4: one vec4 load where scalars take four
// per-lane loads on llvmpipe).

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
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;       // [n_rows, dim / 4] at x_offset
@group(0) @binding(2) var<storage, read> vecs: array<vec4<f32>>;    // per-layer vectors
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>; // [n_rows, dim / 4] at y_offset

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let d4 = p.dim / 4u;
    let xb = p.x_offset / 4u + row * d4;
    var s = vec4<f32>(0.0);
    for (var c = lid; c < d4; c += GS) {
        s += x[xb + c];
    }
    let mean = group_sum(s.x + s.y + s.z + s.w, lid) / f32(p.dim);
    var q = vec4<f32>(0.0);
    for (var c = lid; c < d4; c += GS) {
        let d = x[xb + c] - mean;
        q += d * d;
    }
    let var_ = group_sum(q.x + q.y + q.z + q.w, lid) / f32(p.dim);
    let rstd = 1.0 / sqrt(var_ + p.eps);
    let yb = p.y_offset / 4u + row * d4;
    let wb = p.w_offset / 4u;
    let bb = p.b_offset / 4u;
    for (var c = lid; c < d4; c += GS) {
        y[yb + c] = (x[xb + c] - mean) * rstd * vecs[wb + c] + vecs[bb + c];
    }
}
