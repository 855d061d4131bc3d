// RWKV-7 time-mix output, one workgroup per (head, token), in place on y:
//   y = GroupNorm(y) * ln_x.weight + ln_x.bias       (per head, eps 64e-5, biased variance)
//   y = y + (sum_j r[j] * k[j] * r_k[h, j]) * v       (the bonus)
//   y = y * g                                         (the gate)

struct Params {
    n_tok: u32,
    dim: u32,
    head_size: u32,
    plane: u32, // elements per plane of att
    lnx_w: u32, // offsets of [dim] vectors in vecs
    lnx_b: u32,
    r_k: u32,   // r_k [n_head, head_size] flattened to [dim]
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>; // [tokens, dim]
@group(0) @binding(2) var<storage, read> att: array<f32>;     // [PLANES, tokens, dim]
@group(0) @binding(3) var<storage, read> vecs: array<f32>;    // per-layer vectors

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let n = wid.y;
    let base = n * p.dim + h * p.head_size;
    var s = 0.0;
    var bonus = 0.0;
    for (var j = lid; j < p.head_size; j += GS) {
        s += y[base + j];
        bonus += att[R * p.plane + base + j] * att[K * p.plane + base + j] * vecs[p.r_k + h * p.head_size + j];
    }
    let mean = group_sum(s, lid) / f32(p.head_size);
    let bonus_sum = group_sum(bonus, lid);
    var q = 0.0;
    for (var j = lid; j < p.head_size; j += GS) {
        let d = y[base + j] - mean;
        q += d * d;
    }
    let rstd = 1.0 / sqrt(group_sum(q, lid) / f32(p.head_size) + p.eps);
    for (var j = lid; j < p.head_size; j += GS) {
        let c = h * p.head_size + j;
        let i = base + j;
        let normed = (y[i] - mean) * rstd * vecs[p.lnx_w + c] + vecs[p.lnx_b + c];
        y[i] = (normed + bonus_sum * att[V * p.plane + i]) * att[G * p.plane + i];
    }
}
