// The time-mix output of RWKV-5, 6 and 7, one workgroup per (head, token),
// in place on y; each invocation takes four channels of the head at a time
// (head size and dim multiples of 4: vec4 loads):
//   y = GroupNorm(y) * ln_x.weight + ln_x.bias       (per head, biased variance)
//   y = y + (sum_j r[j] * k[j] * r_k[h, j]) * v       (v7's bonus, if `bonus`)
//   y = y * g                                         (the gate, if `gate`; g from att plane G)

struct Params {
    n_tok: u32,
    dim: u32,
    head_size: u32,
    plane: u32, // elements per plane of att
    lnx_w: u32, // offsets of [dim] vectors in vecs
    lnx_b: u32,
    r_k: u32,   // r_k [n_head, head_size] flattened to [dim]
    eps: f32,
    bonus: u32, // 1: add v7's bonus (reads planes R, K, V and r_k)
    gate: u32,  // 1: multiply by plane G
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<vec4<f32>>; // [tokens, dim / 4]
@group(0) @binding(2) var<storage, read> att: array<vec4<f32>>;     // [PLANES, tokens, dim / 4]
@group(0) @binding(3) var<storage, read> vecs: array<vec4<f32>>;    // per-layer vectors

fn hsum(v: vec4<f32>) -> f32 {
    return v.x + v.y + v.z + v.w;
}

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let n = wid.y;
    let pl = p.plane / 4u;
    let hs4 = p.head_size / 4u;
    let base = n * (p.dim / 4u) + h * hs4; // this head's first vec4 in y and in a plane
    let ch = h * hs4;                      // and in a [dim] vector
    var s = vec4<f32>(0.0);
    var bonus = vec4<f32>(0.0);
    for (var j = lid; j < hs4; j += GS) {
        s += y[base + j];
        if (p.bonus == 1u) {
            bonus += att[R * pl + base + j] * att[K * pl + base + j] * vecs[p.r_k / 4u + ch + j];
        }
    }
    let mean = group_sum(hsum(s), lid) / f32(p.head_size);
    let bonus_sum = group_sum(hsum(bonus), lid);
    var q = vec4<f32>(0.0);
    for (var j = lid; j < hs4; j += GS) {
        let d = y[base + j] - mean;
        q += d * d;
    }
    let rstd = 1.0 / sqrt(group_sum(hsum(q), lid) / f32(p.head_size) + p.eps);
    for (var j = lid; j < hs4; j += GS) {
        let c = ch + j;
        let i = base + j;
        let normed = (y[i] - mean) * rstd * vecs[p.lnx_w / 4u + c] + vecs[p.lnx_b / 4u + c];
        var out = normed;
        if (p.bonus == 1u) {
            out += bonus_sum * att[V * pl + i];
        }
        if (p.gate == 1u) {
            out *= att[G * pl + i];
        }
        y[i] = out;
    }
}
