// Causal attention of one sequence's query rows over its KV cache, with
// grouped-query heads, flash-decoding style:
//   out[t, h] = softmax_j(scale · q[t, h] · k[j, h / G]) v[j, h / G]
// over cache positions j ≤ pos0 + t (the row's own position). The keys are
// cut into splits of `split_keys` positions, counted from position 0; one
// workgroup (GS invocations) takes one query row, one split and up to
// `group_heads` query heads sharing a KV head (their keys and values are
// read once). Within a split it walks tiles of GS keys with an online
// softmax. With one split it writes the normalised output; with several it
// writes each split's (max, sum, unnormalised output) to `part`, and
// attention_combine.wgsl merges them in split order. A row's result thus
// depends only on its position, not on how the tokens were split into
// steps or on how many splits the dispatch has (empty splits add exact zeros).
//
// The cache is one layer's [2, cap, n_kv_head, head_dim] (keys, then
// values): f32, or f16 when KVF16. head_dim is a multiple of 4.

struct Params {
    n_tok: u32,       // query rows of this dispatch
    row0: u32,        // their first row in qkv and out
    t0: u32,          // row0's index within the sequence's rows of this step
    qkv_stride: u32,  // elements per qkv row (q heads first)
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    pos0: u32,        // cache position of the sequence's first row this step
    cap: u32,         // positions the cache holds
    n_splits: u32,
    split_keys: u32,  // positions per split, a multiple of GS
    group_heads: u32, // query heads per workgroup (<= MAX_G)
    scale: f32,       // 1 / sqrt(head_dim)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override KVF16: u32 = 0u;

const MAX_G: u32 = 8u;    // query heads per workgroup
const MAX_ACC: u32 = 16u; // vec4 accumulators per invocation (group_heads x ceil(head_dim / 4 / GS))
const QS: u32 = 256u;     // vec4s of the workgroup's query rows (group_heads x head_dim / 4)
const NEG: f32 = -3.0e38; // "minus infinity" that stays finite in exp(a - b)

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;         // [rows, qkv_stride / 4]
@group(0) @binding(2) var<storage, read> cache: array<vec2<u32>>;       // [2, cap, n_kv_head, head_dim]
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;   // [rows, n_head * head_dim / 4]
@group(0) @binding(4) var<storage, read_write> part: array<vec4<f32>>;  // [n_tok, n_head, n_splits, 1 + head_dim / 4]

var<workgroup> qs: array<vec4<f32>, QS>;

// Four cache elements from vec4 index i.
fn load_kv(i: u32) -> vec4<f32> {
    if (KVF16 == 1u) {
        let w = cache[i];
        return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    }
    return bitcast<vec4<f32>>(vec4<u32>(cache[2u * i], cache[2u * i + 1u]));
}

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let hd4 = p.head_dim / 4u;
    let g_all = p.n_head / p.n_kv_head;
    let per_kv = (g_all + p.group_heads - 1u) / p.group_heads;
    let kh = wid.x / per_kv;
    let h0 = kh * g_all + (wid.x % per_kv) * p.group_heads;
    let gh = min(p.group_heads, (kh + 1u) * g_all - h0);
    let t = wid.y;
    let s = wid.z;
    let row = p.row0 + t;
    let k_begin = s * p.split_keys;
    let k_end = min(k_begin + p.split_keys, p.pos0 + p.t0 + t + 1u);

    for (var i = lane; i < gh * hd4; i += GS) {
        qs[i] = qkv[row * (p.qkv_stride / 4u) + h0 * hd4 + i] * p.scale;
    }
    workgroupBarrier();

    let nj = (hd4 + GS - 1u) / GS;
    let kv4 = p.n_kv_head * hd4;
    var m: array<f32, MAX_G>;
    var l: array<f32, MAX_G>;
    var acc: array<vec4<f32>, MAX_ACC>;
    for (var g = 0u; g < MAX_G; g++) {
        m[g] = NEG;
        l[g] = 0.0;
    }
    for (var a = 0u; a < MAX_ACC; a++) {
        acc[a] = vec4<f32>(0.0);
    }

    for (var base = k_begin; base < k_end; base += GS) {
        // Scores of this invocation's key for each head.
        let j = base + lane;
        let valid = j < k_end;
        var sc: array<f32, MAX_G>;
        for (var g = 0u; g < MAX_G; g++) {
            sc[g] = 0.0;
        }
        if (valid) {
            let kb = j * kv4 + kh * hd4;
            for (var c = 0u; c < hd4; c++) {
                let k = load_kv(kb + c);
                for (var g = 0u; g < gh; g++) {
                    sc[g] += dot(qs[g * hd4 + c], k);
                }
            }
        }
        // Online softmax: rescale what came before to the new maximum.
        for (var g = 0u; g < gh; g++) {
            let sv = select(NEG, sc[g], valid);
            let mn = max(m[g], group_max(sv, lane));
            let alpha = exp(m[g] - mn);
            let pj = select(0.0, exp(sv - mn), valid);
            l[g] = l[g] * alpha + group_sum(pj, lane);
            m[g] = mn;
            for (var q = 0u; q < nj; q++) {
                acc[g * nj + q] *= alpha;
            }
            sc[g] = pj;
        }
        // Each invocation adds p · v over the tile's keys for its channels.
        let count = min(GS, k_end - base);
        for (var i = 0u; i < count; i++) {
            var pi: array<f32, MAX_G>;
            for (var g = 0u; g < gh; g++) {
                pi[g] = group_shuffle(sc[g], i, lane);
            }
            let vb = p.cap * kv4 + (base + i) * kv4 + kh * hd4;
            for (var q = 0u; q < nj; q++) {
                let c = lane + q * GS;
                if (c < hd4) {
                    let v = load_kv(vb + c);
                    for (var g = 0u; g < gh; g++) {
                        acc[g * nj + q] += pi[g] * v;
                    }
                }
            }
        }
    }

    for (var g = 0u; g < gh; g++) {
        let h = h0 + g;
        if (p.n_splits == 1u) {
            for (var q = 0u; q < nj; q++) {
                let c = lane + q * GS;
                if (c < hd4) {
                    out[row * (p.n_head * hd4) + h * hd4 + c] = acc[g * nj + q] / l[g];
                }
            }
        } else {
            let pb = ((t * p.n_head + h) * p.n_splits + s) * (1u + hd4);
            if (lane == 0u) {
                part[pb] = vec4<f32>(m[g], l[g], 0.0, 0.0);
            }
            for (var q = 0u; q < nj; q++) {
                let c = lane + q * GS;
                if (c < hd4) {
                    part[pb + 1u + c] = acc[g * nj + q];
                }
            }
        }
    }
}
