// Y[n, row0 + o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T)
// The same product as linear.wgsl, shaped for adapters with a fixed subgroup
// size: one workgroup of WG invocations (= one subgroup) per ROWS output rows
// and TN tokens. Each lane reads whole vec4 words of the weight row (eight
// f16/bf16 weights or four f32) and the matching vec4s of x: few, wide loads,
// which is what llvmpipe needs most. Partial sums are combined with
// subgroupAdd (no barriers). Needs d_in % 8 == 0 (16-bit) or % 4 == 0 (f32)
// and x_offset % 4 == 0; TN (1 for decode, 4 for prefill) is a pipeline constant.

struct Params {
    n_rows: u32,
    d_in: u32,
    d_out: u32,
    row0: u32,
    part_rows: u32,
    x_offset: u32,
    y_offset: u32,
    act: u32,
    accumulate: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

override WG: u32 = 8u;
override TN: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;  // [part_rows, d_in] in WDTYPE
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;  // [n_rows, d_in] at x_offset
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // [n_rows, d_out] at y_offset

const ROWS: u32 = 16u;

fn finish(v: f32, n: u32, o: u32) {
    var r = apply_act(v, p.act);
    let yi = p.y_offset + n * p.d_out + p.row0 + o;
    if (p.accumulate == 1u) {
        r = r + y[yi];
    }
    y[yi] = r;
}

// 16-bit weights over a full tile of ROWS rows: the lanes walk the row's
// words; x is loaded once per word position and reused for RG rows (all 16
// for one token; 4 rows at a time for 4 tokens, to stay within 16 vec4
// accumulators). Loads are what llvmpipe pays for, so this is the fast path.
fn tile16(o_first: u32, n0: u32, lid: u32) {
    let row4 = p.d_in / 4u;
    let row8 = p.d_in / 8u;
    let last = p.n_rows - 1u;
    let xo = p.x_offset / 4u;
    var rt: array<u32, 4>;
    for (var t = 0u; t < TN; t++) {
        rt[t] = xo + min(n0 + t, last) * row4;
    }
    let rg = 16u / TN; // rows per group
    var acc: array<vec4<f32>, 16>; // [row in group][token]
    for (var g = 0u; g < ROWS; g += rg) {
        for (var i = 0u; i < 16u; i++) {
            acc[i] = vec4<f32>(0.0);
        }
        for (var k = lid; k < row8; k += WG) {
            var xs: array<vec4<f32>, 8>;
            for (var t = 0u; t < TN; t++) {
                xs[2u * t] = x[rt[t] + 2u * k];
                xs[2u * t + 1u] = x[rt[t] + 2u * k + 1u];
            }
            var base = (o_first + g) * row8 + k;
            for (var r = 0u; r < rg; r++) {
                let q = w[base];
                let lo = unpack_lo4(q);
                let hi = unpack_hi4(q);
                for (var t = 0u; t < TN; t++) {
                    acc[r * TN + t] += lo * xs[2u * t] + hi * xs[2u * t + 1u];
                }
                base += row8;
            }
        }
        for (var r = 0u; r < rg; r++) {
            for (var t = 0u; t < TN; t++) {
                let a = acc[r * TN + t];
                let s = subgroupAdd(a.x + a.y + a.z + a.w);
                if (lid == 0u && n0 + t < p.n_rows) {
                    finish(s, n0 + t, o_first + g + r);
                }
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wid.y * TN;
    let o_first = wid.x * ROWS;
    if (n0 >= p.n_rows) {
        return; // the whole workgroup leaves together
    }
    if (WDTYPE != 0u && o_first + ROWS <= p.part_rows) {
        tile16(o_first, n0, lid);
        return;
    }
    let o_end = min(o_first + ROWS, p.part_rows);
    let last = p.n_rows - 1u;
    let row4 = p.d_in / 4u; // vec4s of x per token
    let xo = p.x_offset / 4u;
    let r0 = xo + n0 * row4;
    let r1 = xo + min(n0 + 1u, last) * row4;
    let r2 = xo + min(n0 + 2u, last) * row4;
    let r3 = xo + min(n0 + 3u, last) * row4;
    for (var o = o_first; o < o_end; o++) {
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var a2 = vec4<f32>(0.0);
        var a3 = vec4<f32>(0.0);
        if (WDTYPE == 0u) {
            let base = o * row4;
            for (var j = 0u; j < row4; j += WG) {
                let k = min(j + lid, row4 - 1u);
                let m = select(0.0, 1.0, j + lid < row4);
                let wv = m * bitcast<vec4<f32>>(w[base + k]);
                a0 += wv * x[r0 + k];
                if (TN > 1u) {
                    a1 += wv * x[r1 + k];
                    a2 += wv * x[r2 + k];
                    a3 += wv * x[r3 + k];
                }
            }
        } else {
            let row8 = p.d_in / 8u; // vec4<u32> words (8 weights) per row
            let base = o * row8;
            // A uniform loop (every lane runs every trip; the tail lanes
            // re-read the last word with weight 0): llvmpipe runs uniform
            // loops without per-lane masks.
            for (var j = 0u; j < row8; j += WG) {
                let k = min(j + lid, row8 - 1u);
                let m = select(0.0, 1.0, j + lid < row8);
                let q = w[base + k];
                let lo = m * unpack_lo4(q);
                let hi = m * unpack_hi4(q);
                a0 += lo * x[r0 + 2u * k] + hi * x[r0 + 2u * k + 1u];
                if (TN > 1u) {
                    a1 += lo * x[r1 + 2u * k] + hi * x[r1 + 2u * k + 1u];
                    a2 += lo * x[r2 + 2u * k] + hi * x[r2 + 2u * k + 1u];
                    a3 += lo * x[r3 + 2u * k] + hi * x[r3 + 2u * k + 1u];
                }
            }
        }
        let s0 = subgroupAdd(a0.x + a0.y + a0.z + a0.w);
        let s1 = subgroupAdd(a1.x + a1.y + a1.z + a1.w);
        let s2 = subgroupAdd(a2.x + a2.y + a2.z + a2.w);
        let s3 = subgroupAdd(a3.x + a3.y + a3.z + a3.w);
        if (lid == 0u) {
            finish(s0, n0, o);
            if (TN > 1u) {
                if (n0 + 1u < p.n_rows) { finish(s1, n0 + 1u, o); }
                if (n0 + 2u < p.n_rows) { finish(s2, n0 + 2u, o); }
                if (n0 + 3u < p.n_rows) { finish(s3, n0 + 3u, o); }
            }
        }
    }
}
