// The time-mix output of RWKV-5, 6 and 7, one workgroup per head and run of
// TPW tokens, in place on y; each invocation takes four channels of the head
// at a time (head size and dim multiples of 4: vec4 loads), loads its
// channels' per-layer vectors once for the run and each y value once:
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

// Tokens per workgroup (see `GpuContext::elementwise_tokens`).
override TPW: u32 = 1u;
// Most vec4s of one head per invocation (head size <= 64).
const MAXJ: u32 = 16u;

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let pl = p.plane / 4u;
    let hs4 = p.head_size / 4u;
    let ch = h * hs4; // this head's first vec4 in a [dim] vector
    // This invocation's channels j = lid, lid + GS, ..: vectors at [q].
    var lw: array<vec4<f32>, MAXJ>;
    var lb: array<vec4<f32>, MAXJ>;
    var rk: array<vec4<f32>, MAXJ>;
    var q = 0u;
    for (var j = lid; j < hs4; j += GS) {
        lw[q] = vecs[p.lnx_w / 4u + ch + j];
        lb[q] = vecs[p.lnx_b / 4u + ch + j];
        if (p.bonus == 1u) {
            rk[q] = vecs[p.r_k / 4u + ch + j];
        }
        q++;
    }
    let n0 = wid.y * TPW;
    let n_end = min(n0 + TPW, p.n_tok);
    for (var n = n0; n < n_end; n++) {
        let base = n * (p.dim / 4u) + ch; // this head's first vec4 in y and in a plane
        var yv: array<vec4<f32>, MAXJ>;
        var s = vec4<f32>(0.0);
        var bonus = vec4<f32>(0.0);
        q = 0u;
        for (var j = lid; j < hs4; j += GS) {
            yv[q] = y[base + j];
            s += yv[q];
            if (p.bonus == 1u) {
                bonus += att[R * pl + base + j] * att[K * pl + base + j] * rk[q];
            }
            q++;
        }
        let mean = group_sum(hsum(s), lid) / f32(p.head_size);
        let bonus_sum = group_sum(hsum(bonus), lid);
        var sq = vec4<f32>(0.0);
        q = 0u;
        for (var j = lid; j < hs4; j += GS) {
            let d = yv[q] - mean;
            sq += d * d;
            q++;
        }
        let rstd = 1.0 / sqrt(group_sum(hsum(sq), lid) / f32(p.head_size) + p.eps);
        q = 0u;
        for (var j = lid; j < hs4; j += GS) {
            let i = base + j;
            var out = (yv[q] - mean) * rstd * lw[q] + lb[q];
            if (p.bonus == 1u) {
                out += bonus_sum * att[V * pl + i];
            }
            if (p.gate == 1u) {
                out *= att[G * pl + i];
            }
            y[i] = out;
            q++;
        }
    }
}
