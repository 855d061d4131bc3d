// Causal attention of one sequence's query rows over its KV cache, as
// attention.wgsl computes it (same splits, same `part` layout, merged by
// attention_combine.wgsl), for CPU adapters: each lane owns keys, not
// channels. A workgroup (one subgroup of GS lanes) takes one query row, one
// split of `split_keys` positions and the GH query heads sharing one KV head;
// lane i reads whole key and value rows of positions k_begin + i,
// k_begin + i + GS, ... and keeps its own online softmax (running maximum,
// sum and output per head), so the loop has no cross-lane operation at all.
// At the split's end the lanes' partial results are merged in lane order
// (subgroupMax, subgroupAdd). On llvmpipe a storage load is a per-lane
// loop, so whole-row loads per lane cost the same per load as the
// channel-per-lane layout while the reductions per key disappear.
//
//   out[t, h] = softmax_j(scale · q[t, h] · k[j, h / G_all]) v[j, h / G_all],  j ≤ pos0 + t
//
// The cache is one layer's [2, cap, n_kv_head, head_dim] (keys, then
// values): f32, or f16 when KVF16, read 16 bytes a load (head_dim a
// multiple of 8). HD4 = head_dim / 4 and GH are override constants (loops
// of known length), GH · HD4 ≤ MAX_LANE.

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
    group_heads: u32, // query heads per workgroup (= GH, a divisor of n_head / n_kv_head)
    scale: f32,       // 1 / sqrt(head_dim)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override KVF16: u32 = 0u;
override HD4: u32 = 16u; // head_dim / 4
override GH: u32 = 1u;   // query heads per workgroup

const MAX_G: u32 = 8u;
const KB: u32 = 4u;        // keys per lane per tile
const MAX_GKB: u32 = 32u;  // MAX_G · KB
const MAX_LANE: u32 = 64u; // vec4s of queries (and of outputs) per lane: GH · HD4
const NEG: f32 = -3.0e38;  // "minus infinity" that stays finite in exp(a - b)

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;         // [rows, qkv_stride / 4]
@group(0) @binding(2) var<storage, read> cache: array<vec4<u32>>;       // [2, cap, n_kv_head, head_dim]
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;   // [rows, n_head * head_dim / 4]
@group(0) @binding(4) var<storage, read_write> part: array<vec4<f32>>;  // [n_tok, n_head, n_splits, 1 + head_dim / 4]

// Eight cache elements from vec4 index i (of four elements; i even) when
// KVF16, else four: one 16-byte load either way.
fn load8(i: u32) -> array<vec4<f32>, 2> {
    let w = cache[i / 2u];
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
        vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)),
    );
}

fn load4(i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(cache[i]);
}

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let g_all = p.n_head / p.n_kv_head;
    let per_kv = g_all / GH;
    let kh = wid.x / per_kv;
    let h0 = kh * g_all + (wid.x % per_kv) * GH;
    let t = wid.y;
    let s = wid.z;
    let row = p.row0 + t;
    let k_begin = s * p.split_keys;
    let k_end = min(k_begin + p.split_keys, p.pos0 + p.t0 + t + 1u);
    let kv4 = p.n_kv_head * HD4;

    var q: array<vec4<f32>, MAX_LANE>;
    let qb = row * (p.qkv_stride / 4u) + h0 * HD4;
    // Loops of at most 32 iterations index the per-lane arrays (as every
    // loop here): Mesa unrolls those, so the arrays become registers.
    for (var g = 0u; g < GH; g++) {
        for (var c = 0u; c < HD4; c++) {
            q[g * HD4 + c] = qkv[qb + g * HD4 + c] * p.scale;
        }
    }
    var m: array<f32, MAX_G>;
    var l: array<f32, MAX_G>;
    var acc: array<vec4<f32>, MAX_LANE>;
    for (var g = 0u; g < GH; g++) {
        m[g] = NEG;
        l[g] = 0.0;
    }
    for (var g = 0u; g < GH; g++) {
        for (var c = 0u; c < HD4; c++) {
            acc[g * HD4 + c] = vec4<f32>(0.0);
        }
    }

    // Tiles of KB keys per lane (GS · KB keys): key b of lane `lane` is
    // position base + b · GS + lane. Every lane runs the same tiles; a key
    // past the split's end reads the last valid position with weight 0.
    // The running maximum moves once per tile, so the outputs are rescaled
    // once per KB keys and each accumulator is loaded and stored once per
    // tile.
    for (var base = k_begin; base < k_end; base += GS * KB) {
        var kb: array<u32, KB>;
        var valid: array<bool, KB>;
        for (var b = 0u; b < KB; b++) {
            let j = base + b * GS + lane;
            valid[b] = j < k_end;
            kb[b] = min(j, k_end - 1u) * kv4 + kh * HD4;
        }
        var sc: array<f32, MAX_GKB>; // [KB, GH]
        for (var b = 0u; b < KB; b++) {
            for (var g = 0u; g < GH; g++) {
                sc[b * GH + g] = 0.0;
            }
        }
        if (KVF16 == 1u) {
            for (var c = 0u; c < HD4; c += 2u) {
                for (var b = 0u; b < KB; b++) {
                    let k = load8(kb[b] + c);
                    for (var g = 0u; g < GH; g++) {
                        sc[b * GH + g] += dot(q[g * HD4 + c], k[0]) + dot(q[g * HD4 + c + 1u], k[1]);
                    }
                }
            }
        } else {
            for (var c = 0u; c < HD4; c++) {
                for (var b = 0u; b < KB; b++) {
                    let k = load4(kb[b] + c);
                    for (var g = 0u; g < GH; g++) {
                        sc[b * GH + g] += dot(q[g * HD4 + c], k);
                    }
                }
            }
        }
        var alpha: array<f32, MAX_G>;
        for (var g = 0u; g < GH; g++) {
            var mn = m[g];
            for (var b = 0u; b < KB; b++) {
                mn = max(mn, select(NEG, sc[b * GH + g], valid[b]));
            }
            alpha[g] = exp(m[g] - mn);
            var sum = l[g] * alpha[g];
            for (var b = 0u; b < KB; b++) {
                let pj = select(0.0, exp(sc[b * GH + g] - mn), valid[b]);
                sc[b * GH + g] = pj;
                sum += pj;
            }
            l[g] = sum;
            m[g] = mn;
        }
        let vb = p.cap * kv4;
        if (KVF16 == 1u) {
            for (var c = 0u; c < HD4; c += 2u) {
                var v: array<array<vec4<f32>, 2>, KB>;
                for (var b = 0u; b < KB; b++) {
                    v[b] = load8(vb + kb[b] + c);
                }
                for (var g = 0u; g < GH; g++) {
                    let a = g * HD4 + c;
                    var lo = acc[a] * alpha[g];
                    var hi = acc[a + 1u] * alpha[g];
                    for (var b = 0u; b < KB; b++) {
                        lo += sc[b * GH + g] * v[b][0];
                        hi += sc[b * GH + g] * v[b][1];
                    }
                    acc[a] = lo;
                    acc[a + 1u] = hi;
                }
            }
        } else {
            for (var c = 0u; c < HD4; c++) {
                var v: array<vec4<f32>, KB>;
                for (var b = 0u; b < KB; b++) {
                    v[b] = load4(vb + kb[b] + c);
                }
                for (var g = 0u; g < GH; g++) {
                    let a = g * HD4 + c;
                    var o = acc[a] * alpha[g];
                    for (var b = 0u; b < KB; b++) {
                        o += sc[b * GH + g] * v[b];
                    }
                    acc[a] = o;
                }
            }
        }
    }

    // Merge the lanes: each lane's part rescaled to the workgroup maximum.
    for (var g = 0u; g < GH; g++) {
        let h = h0 + g;
        let mx = subgroupMax(m[g]);
        let f = exp(m[g] - mx);
        let sum = subgroupAdd(l[g] * f);
        let pb = ((t * p.n_head + h) * p.n_splits + s) * (1u + HD4);
        if (p.n_splits > 1u && lane == 0u) {
            part[pb] = vec4<f32>(mx, sum, 0.0, 0.0);
        }
        for (var c = 0u; c < HD4; c++) {
            let o = subgroupAdd(acc[g * HD4 + c] * f);
            if (lane == c % GS) {
                if (p.n_splits == 1u) {
                    out[row * (p.n_head * HD4) + h * HD4 + c] = o / sum;
                } else {
                    part[pb + 1u + c] = o;
                }
            }
        }
    }
}
