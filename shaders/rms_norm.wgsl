// y[n, :] = x[n, :] / sqrt(mean(x[n, :]^2) + eps) * weight   (RMSNorm, as Llama and Qwen2)
// One workgroup per run of TPW rows; each invocation takes four channels at a
// time (dim and every offset are multiples of 4). The sum of squares is one
// `group_sum` per row (a subgroup, or a 64-lane tree).

struct Params {
    n_rows: u32,
    dim: u32,
    x_offset: u32, // elements
    y_offset: u32, // elements
    w_offset: u32, // weight [dim] in vecs
    eps: f32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;       // [n_rows, dim / 4] at x_offset
@group(0) @binding(2) var<storage, read> vecs: array<vec4<f32>>;    // weight [dim / 4] at w_offset
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>; // [n_rows, dim / 4] at y_offset

// Rows per workgroup (see `KernelPlan::elementwise_tokens`).
override TPW: u32 = 1u;

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d4 = p.dim / 4u;
    let wb = p.w_offset / 4u;
    let n0 = wid.x * TPW;
    let n_end = min(n0 + TPW, p.n_rows);
    for (var row = n0; row < n_end; row++) {
        let xb = p.x_offset / 4u + row * d4;
        var sq = vec4<f32>(0.0);
        for (var c = lid; c < d4; c += GS) {
            let v = x[xb + c];
            sq += v * v;
        }
        let ms = group_sum(sq.x + sq.y + sq.z + sq.w, lid) / f32(p.dim);
        let rstd = 1.0 / sqrt(ms + p.eps);
        let yb = p.y_offset / 4u + row * d4;
        for (var c = lid; c < d4; c += GS) {
            y[yb + c] = x[xb + c] * rstd * vecs[wb + c];
        }
    }
}
