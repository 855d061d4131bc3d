// Y[n, o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T)
// The product of linear.wgsl with the weights and x read from textures, for
// adapters where a texel fetch is much cheaper than a storage-buffer load
// (llvmpipe: one vector gather instead of a per-lane loop; see
// `gpu::WeightStore`). One workgroup of WG invocations (one subgroup on
// llvmpipe); each lane owns rows o, o + WG, .. and walks them whole (no
// cross-lane reduction): 8 rows for 1 token (`decode`), 16 rows for 8 tokens
// (`prefill`). Each x value loaded serves every row of the lane, each weight
// texel every token. Rows and tokens are
// written out explicitly (not as loops over arrays): llvmpipe keeps explicit
// accumulators in registers and array ones in memory.
// Needs d_in % 64 == 0 (whole texels of x rows, and copy rows of 256 bytes).

struct Params {
    n_rows: u32,      // tokens
    d_in: u32,        // weights per row
    d_out: u32,       // rows of W; row stride of y
    layer_rows: u32,  // rows per texture layer, a multiple of 16
    y_offset: u32,
    act: u32,
    accumulate: u32,
    _p0: u32,
}

override WG: u32 = 8u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var w: texture_storage_2d_array<rgba32uint, read>;           // [layers, layer_rows, d_in / 8] 16-bit (8 per texel) or [.., d_in / 4] f32
@group(0) @binding(2) var xt: texture_storage_2d<rgba32float, read>; // XU == 0: [>= n_rows, >= d_in / 4] f32, row n = token n
@group(0) @binding(3) var<uniform> xu: array<vec4<f32>, 4096>; // XU == 1: [n_rows, d_in / 4] (a 64 KiB window of the x buffer)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;  // [n_rows, d_out] at y_offset

// Where x comes from: 1 = a uniform-buffer window of the x buffer itself (no
// copy; every lane reads the same address, which llvmpipe serves with one
// scalar load), 0 = the x texture (rows too long for a 64 KiB window).
override XU: u32 = 0u;

// Rows per lane of `prefill`: 16, or 8 (LINEAR_TEX_PREFILL_LANE_ROWS_SMALL).
override PR: u32 = 16u;

// Texels per weight row and x texels per weight texel.
fn texels() -> u32 {
    return select(p.d_in / 8u, p.d_in / 4u, WDTYPE == 0u);
}

// The 4 x values at x texel i of token n.
fn xv(i: u32, n: u32) -> vec4<f32> {
    if (XU == 1u) {
        return xu[n * (p.d_in / 4u) + i];
    }
    return textureLoad(xt, vec2<u32>(i, n));
}

// The x texels that meet weight texel k of token n: a (and b for 16-bit).
fn xa(k: u32, n: u32) -> vec4<f32> {
    return xv(select(2u * k, k, WDTYPE == 0u), n);
}

fn xb(k: u32, n: u32) -> vec4<f32> {
    if (WDTYPE == 0u) {
        return vec4<f32>(0.0);
    }
    return xv(2u * k + 1u, n);
}

// Weight texel k of tile row r (row index clamped to the matrix; the
// clamped rows are computed but never written).
fn wt(k: u32, o: u32, layer: u32) -> vec4<u32> {
    let row = min(o, p.d_out - 1u) - layer * p.layer_rows;
    return textureLoad(w, vec2<u32>(k, row), layer);
}

// acc + the weights of texel q times x texels a, b.
fn wdot(q: vec4<u32>, a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    if (WDTYPE == 0u) {
        return fdot(bitcast<vec4<f32>>(q), a, acc);
    }
    return fdot(unpack_hi4(q), b, fdot(unpack_lo4(q), a, acc));
}

// Lane-owned result (no reduction): y[n, o].
fn store(v: f32, n: u32, o: u32) {
    if (n < p.n_rows && o < p.d_out) {
        var r = apply_act(v, p.act);
        let yi = p.y_offset + n * p.d_out + o;
        if (p.accumulate == 1u) {
            r = r + y[yi];
        }
        y[yi] = r;
    }
}

// One token: each lane owns 8 rows (o, o + WG, .., o + 7 WG) and walks the
// whole row. Every (row, token) sum runs in the same order as in `prefill`,
// so a token's logits do not depend on which kernel or batch it ran in.
@compute @workgroup_size(WG)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o0 = wid.x * 8u * WG; // a tile never straddles two layers
    let o = o0 + lid;
    let l = o0 / p.layer_rows;
    var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
    var s4 = 0.0; var s5 = 0.0; var s6 = 0.0; var s7 = 0.0;
    let nk = texels();
    for (var k = 0u; k < nk; k++) {
        let a = xa(k, 0u);
        let b = xb(k, 0u);
        s0 = wdot(wt(k, o, l), a, b, s0);
        s1 = wdot(wt(k, o + WG, l), a, b, s1);
        s2 = wdot(wt(k, o + 2u * WG, l), a, b, s2);
        s3 = wdot(wt(k, o + 3u * WG, l), a, b, s3);
        s4 = wdot(wt(k, o + 4u * WG, l), a, b, s4);
        s5 = wdot(wt(k, o + 5u * WG, l), a, b, s5);
        s6 = wdot(wt(k, o + 6u * WG, l), a, b, s6);
        s7 = wdot(wt(k, o + 7u * WG, l), a, b, s7);
    }
    store(s0, 0u, o); store(s1, 0u, o + WG); store(s2, 0u, o + 2u * WG); store(s3, 0u, o + 3u * WG);
    store(s4, 0u, o + 4u * WG); store(s5, 0u, o + 5u * WG); store(s6, 0u, o + 6u * WG); store(s7, 0u, o + 7u * WG);
}

// acc + one weight texel against the x texels of four tokens (acc.x: token 0, ...).
fn wdot4(q: vec4<u32>, a0: vec4<f32>, b0: vec4<f32>, a1: vec4<f32>, b1: vec4<f32>,
         a2: vec4<f32>, b2: vec4<f32>, a3: vec4<f32>, b3: vec4<f32>, acc: vec4<f32>) -> vec4<f32> {
    if (WDTYPE == 0u) {
        let f = bitcast<vec4<f32>>(q);
        return vec4<f32>(fdot(f, a0, acc.x), fdot(f, a1, acc.y), fdot(f, a2, acc.z), fdot(f, a3, acc.w));
    }
    let lo = unpack_lo4(q);
    let hi = unpack_hi4(q);
    return vec4<f32>(fdot(hi, b0, fdot(lo, a0, acc.x)), fdot(hi, b1, fdot(lo, a1, acc.y)),
                     fdot(hi, b2, fdot(lo, a2, acc.z)), fdot(hi, b3, fdot(lo, a3, acc.w)));
}

// Lane-owned results (no reduction): y[n + t, o] for the four tokens of `v`.
fn store4(v: vec4<f32>, n: u32, o: u32) {
    store(v.x, n, o);
    store(v.y, n + 1u, o);
    store(v.z, n + 2u, o);
    store(v.w, n + 3u, o);
}

// Several tokens: each lane owns PR rows (o, o + WG, .., o + (PR - 1) WG) for
// 8 tokens and walks the whole rows, so there is no cross-lane reduction; each
// weight texel serves 8 tokens and each x texel PR rows. (16 x 8 measured
// best on llvmpipe among 4/8/16 rows x 4/8/16 tokens; PR = 8 for matrices of
// at most 8 WG rows, the LoRA ranks, which a 16-row tile would leave half
// idle.) Lane l (of lanes
// 0..7; needs WG >= 8) fetches token n + l's two x texels and the others get
// them by subgroupBroadcast: 2 x loads per weight texel instead of 16. On
// llvmpipe this took ~15 % off the CPU time of a batch-8 decode step (the
// same sharing in `decode`, 2 loads per 8 weight texels, gained nothing).
@compute @workgroup_size(WG)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) sl: u32) {
    let o0 = wid.x * PR * WG; // a tile never straddles two layers
    let o = o0 + lid;
    let n = wid.y * 8u;
    let l = o0 / p.layer_rows;
    let last = p.n_rows - 1u; // tokens past the end re-read the last one, never written
    let nl = min(n + sl % 8u, last); // the token whose x this subgroup lane fetches
    // s<r>a: row o + r WG for tokens n .. n + 3; s<r>b: tokens n + 4 .. n + 7.
    var s0a = vec4<f32>(0.0); var s1a = vec4<f32>(0.0); var s2a = vec4<f32>(0.0); var s3a = vec4<f32>(0.0);
    var s4a = vec4<f32>(0.0); var s5a = vec4<f32>(0.0); var s6a = vec4<f32>(0.0); var s7a = vec4<f32>(0.0);
    var s8a = vec4<f32>(0.0); var s9a = vec4<f32>(0.0); var s10a = vec4<f32>(0.0); var s11a = vec4<f32>(0.0);
    var s12a = vec4<f32>(0.0); var s13a = vec4<f32>(0.0); var s14a = vec4<f32>(0.0); var s15a = vec4<f32>(0.0);
    var s0b = vec4<f32>(0.0); var s1b = vec4<f32>(0.0); var s2b = vec4<f32>(0.0); var s3b = vec4<f32>(0.0);
    var s4b = vec4<f32>(0.0); var s5b = vec4<f32>(0.0); var s6b = vec4<f32>(0.0); var s7b = vec4<f32>(0.0);
    var s8b = vec4<f32>(0.0); var s9b = vec4<f32>(0.0); var s10b = vec4<f32>(0.0); var s11b = vec4<f32>(0.0);
    var s12b = vec4<f32>(0.0); var s13b = vec4<f32>(0.0); var s14b = vec4<f32>(0.0); var s15b = vec4<f32>(0.0);
    let nk = texels();
    for (var k = 0u; k < nk; k++) {
        let al = xa(k, nl); let bl = xb(k, nl);
        let a0 = subgroupBroadcast(al, 0u); let b0 = subgroupBroadcast(bl, 0u);
        let a1 = subgroupBroadcast(al, 1u); let b1 = subgroupBroadcast(bl, 1u);
        let a2 = subgroupBroadcast(al, 2u); let b2 = subgroupBroadcast(bl, 2u);
        let a3 = subgroupBroadcast(al, 3u); let b3 = subgroupBroadcast(bl, 3u);
        let a4 = subgroupBroadcast(al, 4u); let b4 = subgroupBroadcast(bl, 4u);
        let a5 = subgroupBroadcast(al, 5u); let b5 = subgroupBroadcast(bl, 5u);
        let a6 = subgroupBroadcast(al, 6u); let b6 = subgroupBroadcast(bl, 6u);
        let a7 = subgroupBroadcast(al, 7u); let b7 = subgroupBroadcast(bl, 7u);
        let q0 = wt(k, o, l);
        s0a = wdot4(q0, a0, b0, a1, b1, a2, b2, a3, b3, s0a); s0b = wdot4(q0, a4, b4, a5, b5, a6, b6, a7, b7, s0b);
        let q1 = wt(k, o + WG, l);
        s1a = wdot4(q1, a0, b0, a1, b1, a2, b2, a3, b3, s1a); s1b = wdot4(q1, a4, b4, a5, b5, a6, b6, a7, b7, s1b);
        let q2 = wt(k, o + 2u * WG, l);
        s2a = wdot4(q2, a0, b0, a1, b1, a2, b2, a3, b3, s2a); s2b = wdot4(q2, a4, b4, a5, b5, a6, b6, a7, b7, s2b);
        let q3 = wt(k, o + 3u * WG, l);
        s3a = wdot4(q3, a0, b0, a1, b1, a2, b2, a3, b3, s3a); s3b = wdot4(q3, a4, b4, a5, b5, a6, b6, a7, b7, s3b);
        let q4 = wt(k, o + 4u * WG, l);
        s4a = wdot4(q4, a0, b0, a1, b1, a2, b2, a3, b3, s4a); s4b = wdot4(q4, a4, b4, a5, b5, a6, b6, a7, b7, s4b);
        let q5 = wt(k, o + 5u * WG, l);
        s5a = wdot4(q5, a0, b0, a1, b1, a2, b2, a3, b3, s5a); s5b = wdot4(q5, a4, b4, a5, b5, a6, b6, a7, b7, s5b);
        let q6 = wt(k, o + 6u * WG, l);
        s6a = wdot4(q6, a0, b0, a1, b1, a2, b2, a3, b3, s6a); s6b = wdot4(q6, a4, b4, a5, b5, a6, b6, a7, b7, s6b);
        let q7 = wt(k, o + 7u * WG, l);
        s7a = wdot4(q7, a0, b0, a1, b1, a2, b2, a3, b3, s7a); s7b = wdot4(q7, a4, b4, a5, b5, a6, b6, a7, b7, s7b);
        if (PR == 16u) {
            let q8 = wt(k, o + 8u * WG, l);
            s8a = wdot4(q8, a0, b0, a1, b1, a2, b2, a3, b3, s8a); s8b = wdot4(q8, a4, b4, a5, b5, a6, b6, a7, b7, s8b);
            let q9 = wt(k, o + 9u * WG, l);
            s9a = wdot4(q9, a0, b0, a1, b1, a2, b2, a3, b3, s9a); s9b = wdot4(q9, a4, b4, a5, b5, a6, b6, a7, b7, s9b);
            let q10 = wt(k, o + 10u * WG, l);
            s10a = wdot4(q10, a0, b0, a1, b1, a2, b2, a3, b3, s10a); s10b = wdot4(q10, a4, b4, a5, b5, a6, b6, a7, b7, s10b);
            let q11 = wt(k, o + 11u * WG, l);
            s11a = wdot4(q11, a0, b0, a1, b1, a2, b2, a3, b3, s11a); s11b = wdot4(q11, a4, b4, a5, b5, a6, b6, a7, b7, s11b);
            let q12 = wt(k, o + 12u * WG, l);
            s12a = wdot4(q12, a0, b0, a1, b1, a2, b2, a3, b3, s12a); s12b = wdot4(q12, a4, b4, a5, b5, a6, b6, a7, b7, s12b);
            let q13 = wt(k, o + 13u * WG, l);
            s13a = wdot4(q13, a0, b0, a1, b1, a2, b2, a3, b3, s13a); s13b = wdot4(q13, a4, b4, a5, b5, a6, b6, a7, b7, s13b);
            let q14 = wt(k, o + 14u * WG, l);
            s14a = wdot4(q14, a0, b0, a1, b1, a2, b2, a3, b3, s14a); s14b = wdot4(q14, a4, b4, a5, b5, a6, b6, a7, b7, s14b);
            let q15 = wt(k, o + 15u * WG, l);
            s15a = wdot4(q15, a0, b0, a1, b1, a2, b2, a3, b3, s15a); s15b = wdot4(q15, a4, b4, a5, b5, a6, b6, a7, b7, s15b);
        }
    }
    store4(s0a, n, o); store4(s1a, n, o + WG); store4(s2a, n, o + 2u * WG); store4(s3a, n, o + 3u * WG);
    store4(s4a, n, o + 4u * WG); store4(s5a, n, o + 5u * WG); store4(s6a, n, o + 6u * WG); store4(s7a, n, o + 7u * WG);
    store4(s0b, n + 4u, o); store4(s1b, n + 4u, o + WG); store4(s2b, n + 4u, o + 2u * WG); store4(s3b, n + 4u, o + 3u * WG);
    store4(s4b, n + 4u, o + 4u * WG); store4(s5b, n + 4u, o + 5u * WG); store4(s6b, n + 4u, o + 6u * WG); store4(s7b, n + 4u, o + 7u * WG);
    if (PR == 16u) {
        store4(s8a, n, o + 8u * WG); store4(s9a, n, o + 9u * WG); store4(s10a, n, o + 10u * WG); store4(s11a, n, o + 11u * WG);
        store4(s12a, n, o + 12u * WG); store4(s13a, n, o + 13u * WG); store4(s14a, n, o + 14u * WG); store4(s15a, n, o + 15u * WG);
        store4(s8b, n + 4u, o + 8u * WG); store4(s9b, n + 4u, o + 9u * WG); store4(s10b, n + 4u, o + 10u * WG); store4(s11b, n + 4u, o + 11u * WG);
        store4(s12b, n + 4u, o + 12u * WG); store4(s13b, n + 4u, o + 13u * WG); store4(s14b, n + 4u, o + 14u * WG); store4(s15b, n + 4u, o + 15u * WG);
    }
}
