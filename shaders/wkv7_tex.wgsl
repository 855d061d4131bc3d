// The RWKV-7 recurrence of wkv7.wgsl for head size 64, shaped for CPU
// adapters (llvmpipe) with subgroups of 8, where a storage-buffer load is a
// per-lane loop and a texel fetch one gather:
// - the per-token vectors r, w, k, v, kk, a come from a texture copy of
//   `att`; every row needs all 64 of each, so lane l of a subgroup fetches
//   texels l and l + 8 and the others get them by subgroupBroadcast (11
//   fetches per lane and token instead of 81);
// - the state is read from a texture copy of this layer's state and
//   written back to the storage buffer;
// - each invocation's state row is sixteen named vec4 registers with every
//   loop over it written out, because llvmpipe keeps dynamically indexed
//   arrays in memory. No shared memory and no barriers.
// `main`: one workgroup per (head, sequence); invocation i owns row i (value
// index) of the head's state S [64 x 64] and walks the sequence's tokens in
// order. `decode` (at most one token per sequence, as in a decode step): one
// subgroup per (head, sequence); lane l takes rows l, l + 8, .., l + 56 in
// turn, so the token's vectors are fetched and broadcast once per head
// instead of once per 8 rows (`row_step`; `main` writes the same arithmetic
// out inline: through the Row/Tok structs it measured slower on prefill).
// Each row:
//   S[i, j] = S[i, j] * w[j] - (S kk)[i] * (kk[j] * a[j]) + v[i] * k[j]
//   y[i]    = sum_j S[i, j] * r[j]        (read out with the new state)
// The state layout is [head, value i, key j], the official one.

struct Params {
    n_seq: u32,
    n_head: u32,
    head_size: u32,    // 64
    dim: u32,
    plane: u32,        // unused here (planes are texture layers)
    state_stride: u32, // elements per sequence in state (a multiple of 4)
    state_offset: u32, // this layer's att_kv within a sequence (a multiple of 4)
    t_first: u32,      // walk tokens t_first .. t_first + t_count of each sequence
    t_count: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var att: texture_storage_2d_array<rgba32float, read>; // [PLANES, >= tokens, dim / 4]
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;     // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<vec4<f32>>; // [n_seq, state_stride / 4]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;       // [tokens, dim]
@group(0) @binding(5) var state_in: texture_storage_2d_array<rgba32float, read>; // [n_seq, n_head * 64, 16]: this layer's state

var<private> head_texel: u32; // first texel of this head in a row of att
var<private> head_row: u32; // this head's first row in state_in
var<private> seq: u32;

// Texel m (elements 4m .. 4m + 3 of this head) of plane `pl` for token n.
fn ld(pl: u32, m: u32, n: u32) -> vec4<f32> {
    return textureLoad(att, vec2<u32>(head_texel + m, n), pl);
}

// A state row: sixteen named vec4 registers (texels 0 .. 15).
struct Row { s0: vec4<f32>, s1: vec4<f32>, s2: vec4<f32>, s3: vec4<f32>, s4: vec4<f32>, s5: vec4<f32>, s6: vec4<f32>, s7: vec4<f32>, s8: vec4<f32>, s9: vec4<f32>, s10: vec4<f32>, s11: vec4<f32>, s12: vec4<f32>, s13: vec4<f32>, s14: vec4<f32>, s15: vec4<f32> }

// Token n's vectors kk, w, kk * a, k, r, each all 64 of the head: lane l
// fetches texels l and l + 8 and every lane gets all by subgroupBroadcast.
struct Tok {
    kk0: vec4<f32>, kk1: vec4<f32>, kk2: vec4<f32>, kk3: vec4<f32>, kk4: vec4<f32>, kk5: vec4<f32>, kk6: vec4<f32>, kk7: vec4<f32>, kk8: vec4<f32>, kk9: vec4<f32>, kk10: vec4<f32>, kk11: vec4<f32>, kk12: vec4<f32>, kk13: vec4<f32>, kk14: vec4<f32>, kk15: vec4<f32>,
    w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>, w4: vec4<f32>, w5: vec4<f32>, w6: vec4<f32>, w7: vec4<f32>, w8: vec4<f32>, w9: vec4<f32>, w10: vec4<f32>, w11: vec4<f32>, w12: vec4<f32>, w13: vec4<f32>, w14: vec4<f32>, w15: vec4<f32>,
    ka0: vec4<f32>, ka1: vec4<f32>, ka2: vec4<f32>, ka3: vec4<f32>, ka4: vec4<f32>, ka5: vec4<f32>, ka6: vec4<f32>, ka7: vec4<f32>, ka8: vec4<f32>, ka9: vec4<f32>, ka10: vec4<f32>, ka11: vec4<f32>, ka12: vec4<f32>, ka13: vec4<f32>, ka14: vec4<f32>, ka15: vec4<f32>,
    k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>, k4: vec4<f32>, k5: vec4<f32>, k6: vec4<f32>, k7: vec4<f32>, k8: vec4<f32>, k9: vec4<f32>, k10: vec4<f32>, k11: vec4<f32>, k12: vec4<f32>, k13: vec4<f32>, k14: vec4<f32>, k15: vec4<f32>,
    r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>, r4: vec4<f32>, r5: vec4<f32>, r6: vec4<f32>, r7: vec4<f32>, r8: vec4<f32>, r9: vec4<f32>, r10: vec4<f32>, r11: vec4<f32>, r12: vec4<f32>, r13: vec4<f32>, r14: vec4<f32>, r15: vec4<f32>,
}

// Texel m (elements 4m .. 4m + 3) of state row i of this head.
fn st_row(i: u32, m: u32) -> vec4<f32> {
    return textureLoad(state_in, vec2<u32>(m, head_row + i), seq);
}

fn row_load(i: u32) -> Row {
    return Row(st_row(i, 0u), st_row(i, 1u), st_row(i, 2u), st_row(i, 3u), st_row(i, 4u), st_row(i, 5u), st_row(i, 6u), st_row(i, 7u), st_row(i, 8u), st_row(i, 9u), st_row(i, 10u), st_row(i, 11u), st_row(i, 12u), st_row(i, 13u), st_row(i, 14u), st_row(i, 15u));
}

fn tok_load(l: u32, n: u32) -> Tok {
    let kkA = ld(KK, l, n); let kkB = ld(KK, l + 8u, n);
    let wA = ld(W, l, n); let wB = ld(W, l + 8u, n);
    let kaA = kkA * ld(A, l, n); let kaB = kkB * ld(A, l + 8u, n);
    let kA = ld(K, l, n); let kB = ld(K, l + 8u, n);
    let rA = ld(R, l, n); let rB = ld(R, l + 8u, n);
    return Tok(subgroupBroadcast(kkA, 0u), subgroupBroadcast(kkA, 1u), subgroupBroadcast(kkA, 2u), subgroupBroadcast(kkA, 3u), subgroupBroadcast(kkA, 4u), subgroupBroadcast(kkA, 5u), subgroupBroadcast(kkA, 6u), subgroupBroadcast(kkA, 7u), subgroupBroadcast(kkB, 0u), subgroupBroadcast(kkB, 1u), subgroupBroadcast(kkB, 2u), subgroupBroadcast(kkB, 3u), subgroupBroadcast(kkB, 4u), subgroupBroadcast(kkB, 5u), subgroupBroadcast(kkB, 6u), subgroupBroadcast(kkB, 7u), subgroupBroadcast(wA, 0u), subgroupBroadcast(wA, 1u), subgroupBroadcast(wA, 2u), subgroupBroadcast(wA, 3u), subgroupBroadcast(wA, 4u), subgroupBroadcast(wA, 5u), subgroupBroadcast(wA, 6u), subgroupBroadcast(wA, 7u), subgroupBroadcast(wB, 0u), subgroupBroadcast(wB, 1u), subgroupBroadcast(wB, 2u), subgroupBroadcast(wB, 3u), subgroupBroadcast(wB, 4u), subgroupBroadcast(wB, 5u), subgroupBroadcast(wB, 6u), subgroupBroadcast(wB, 7u), subgroupBroadcast(kaA, 0u), subgroupBroadcast(kaA, 1u), subgroupBroadcast(kaA, 2u), subgroupBroadcast(kaA, 3u), subgroupBroadcast(kaA, 4u), subgroupBroadcast(kaA, 5u), subgroupBroadcast(kaA, 6u), subgroupBroadcast(kaA, 7u), subgroupBroadcast(kaB, 0u), subgroupBroadcast(kaB, 1u), subgroupBroadcast(kaB, 2u), subgroupBroadcast(kaB, 3u), subgroupBroadcast(kaB, 4u), subgroupBroadcast(kaB, 5u), subgroupBroadcast(kaB, 6u), subgroupBroadcast(kaB, 7u), subgroupBroadcast(kA, 0u), subgroupBroadcast(kA, 1u), subgroupBroadcast(kA, 2u), subgroupBroadcast(kA, 3u), subgroupBroadcast(kA, 4u), subgroupBroadcast(kA, 5u), subgroupBroadcast(kA, 6u), subgroupBroadcast(kA, 7u), subgroupBroadcast(kB, 0u), subgroupBroadcast(kB, 1u), subgroupBroadcast(kB, 2u), subgroupBroadcast(kB, 3u), subgroupBroadcast(kB, 4u), subgroupBroadcast(kB, 5u), subgroupBroadcast(kB, 6u), subgroupBroadcast(kB, 7u), subgroupBroadcast(rA, 0u), subgroupBroadcast(rA, 1u), subgroupBroadcast(rA, 2u), subgroupBroadcast(rA, 3u), subgroupBroadcast(rA, 4u), subgroupBroadcast(rA, 5u), subgroupBroadcast(rA, 6u), subgroupBroadcast(rA, 7u), subgroupBroadcast(rB, 0u), subgroupBroadcast(rB, 1u), subgroupBroadcast(rB, 2u), subgroupBroadcast(rB, 3u), subgroupBroadcast(rB, 4u), subgroupBroadcast(rB, 5u), subgroupBroadcast(rB, 6u), subgroupBroadcast(rB, 7u));
}

// One token on state row s with value v: the new row, and in *y the row's output.
fn row_step(s: Row, t: Tok, v: f32, y: ptr<function, f32>) -> Row {
    let sa = dot(s.s0, t.kk0) + dot(s.s1, t.kk1) + dot(s.s2, t.kk2) + dot(s.s3, t.kk3) +
        dot(s.s4, t.kk4) + dot(s.s5, t.kk5) + dot(s.s6, t.kk6) + dot(s.s7, t.kk7) +
        dot(s.s8, t.kk8) + dot(s.s9, t.kk9) + dot(s.s10, t.kk10) + dot(s.s11, t.kk11) +
        dot(s.s12, t.kk12) + dot(s.s13, t.kk13) + dot(s.s14, t.kk14) + dot(s.s15, t.kk15);
    var acc = 0.0;
    let s0 = s.s0 * t.w0 - sa * t.ka0 + v * t.k0; acc += dot(s0, t.r0);
    let s1 = s.s1 * t.w1 - sa * t.ka1 + v * t.k1; acc += dot(s1, t.r1);
    let s2 = s.s2 * t.w2 - sa * t.ka2 + v * t.k2; acc += dot(s2, t.r2);
    let s3 = s.s3 * t.w3 - sa * t.ka3 + v * t.k3; acc += dot(s3, t.r3);
    let s4 = s.s4 * t.w4 - sa * t.ka4 + v * t.k4; acc += dot(s4, t.r4);
    let s5 = s.s5 * t.w5 - sa * t.ka5 + v * t.k5; acc += dot(s5, t.r5);
    let s6 = s.s6 * t.w6 - sa * t.ka6 + v * t.k6; acc += dot(s6, t.r6);
    let s7 = s.s7 * t.w7 - sa * t.ka7 + v * t.k7; acc += dot(s7, t.r7);
    let s8 = s.s8 * t.w8 - sa * t.ka8 + v * t.k8; acc += dot(s8, t.r8);
    let s9 = s.s9 * t.w9 - sa * t.ka9 + v * t.k9; acc += dot(s9, t.r9);
    let s10 = s.s10 * t.w10 - sa * t.ka10 + v * t.k10; acc += dot(s10, t.r10);
    let s11 = s.s11 * t.w11 - sa * t.ka11 + v * t.k11; acc += dot(s11, t.r11);
    let s12 = s.s12 * t.w12 - sa * t.ka12 + v * t.k12; acc += dot(s12, t.r12);
    let s13 = s.s13 * t.w13 - sa * t.ka13 + v * t.k13; acc += dot(s13, t.r13);
    let s14 = s.s14 * t.w14 - sa * t.ka14 + v * t.k14; acc += dot(s14, t.r14);
    let s15 = s.s15 * t.w15 - sa * t.ka15 + v * t.k15; acc += dot(s15, t.r15);
    *y = acc;
    return Row(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15);
}

// Stores row i of sequence b's state of this head.
fn row_store(b: u32, h: u32, i: u32, s: Row) {
    let sb = (b * p.state_stride + p.state_offset + h * 4096u + i * 64u) / 4u;
    state[sb + 0u] = s.s0;
    state[sb + 1u] = s.s1;
    state[sb + 2u] = s.s2;
    state[sb + 3u] = s.s3;
    state[sb + 4u] = s.s4;
    state[sb + 5u] = s.s5;
    state[sb + 6u] = s.s6;
    state[sb + 7u] = s.s7;
    state[sb + 8u] = s.s8;
    state[sb + 9u] = s.s9;
    state[sb + 10u] = s.s10;
    state[sb + 11u] = s.s11;
    state[sb + 12u] = s.s12;
    state[sb + 13u] = s.s13;
    state[sb + 14u] = s.s14;
    state[sb + 15u] = s.s15;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32, @builtin(subgroup_invocation_id) l: u32) {
    let h = wid.x;
    let b = wid.y;
    head_texel = h * 16u;
    head_row = h * 64u;
    seq = b;
    var s0 = st_row(i, 0u); var s1 = st_row(i, 1u); var s2 = st_row(i, 2u); var s3 = st_row(i, 3u);
    var s4 = st_row(i, 4u); var s5 = st_row(i, 5u); var s6 = st_row(i, 6u); var s7 = st_row(i, 7u);
    var s8 = st_row(i, 8u); var s9 = st_row(i, 9u); var s10 = st_row(i, 10u); var s11 = st_row(i, 11u);
    var s12 = st_row(i, 12u); var s13 = st_row(i, 13u); var s14 = st_row(i, 14u); var s15 = st_row(i, 15u);
    let end = seq_start[b + 1u];
    let first = min(seq_start[b] + p.t_first, end);
    let last = min(first + p.t_count, end);
    for (var n = first; n < last; n++) {
        let v = ld(V, i / 4u, n)[i % 4u];
        let kkA = ld(KK, l, n); let kkB = ld(KK, l + 8u, n);
        let wA = ld(W, l, n); let wB = ld(W, l + 8u, n);
        let kaA = kkA * ld(A, l, n); let kaB = kkB * ld(A, l + 8u, n);
        let kA = ld(K, l, n); let kB = ld(K, l + 8u, n);
        let rA = ld(R, l, n); let rB = ld(R, l + 8u, n);
        let kk0 = subgroupBroadcast(kkA, 0u);
        let kk1 = subgroupBroadcast(kkA, 1u);
        let kk2 = subgroupBroadcast(kkA, 2u);
        let kk3 = subgroupBroadcast(kkA, 3u);
        let kk4 = subgroupBroadcast(kkA, 4u);
        let kk5 = subgroupBroadcast(kkA, 5u);
        let kk6 = subgroupBroadcast(kkA, 6u);
        let kk7 = subgroupBroadcast(kkA, 7u);
        let kk8 = subgroupBroadcast(kkB, 0u);
        let kk9 = subgroupBroadcast(kkB, 1u);
        let kk10 = subgroupBroadcast(kkB, 2u);
        let kk11 = subgroupBroadcast(kkB, 3u);
        let kk12 = subgroupBroadcast(kkB, 4u);
        let kk13 = subgroupBroadcast(kkB, 5u);
        let kk14 = subgroupBroadcast(kkB, 6u);
        let kk15 = subgroupBroadcast(kkB, 7u);
        let sa = dot(s0, kk0) + dot(s1, kk1) + dot(s2, kk2) + dot(s3, kk3) +
            dot(s4, kk4) + dot(s5, kk5) + dot(s6, kk6) + dot(s7, kk7) +
            dot(s8, kk8) + dot(s9, kk9) + dot(s10, kk10) + dot(s11, kk11) +
            dot(s12, kk12) + dot(s13, kk13) + dot(s14, kk14) + dot(s15, kk15);
        var acc = 0.0;
        s0 = s0 * subgroupBroadcast(wA, 0u) - sa * subgroupBroadcast(kaA, 0u) + v * subgroupBroadcast(kA, 0u); acc += dot(s0, subgroupBroadcast(rA, 0u));
        s1 = s1 * subgroupBroadcast(wA, 1u) - sa * subgroupBroadcast(kaA, 1u) + v * subgroupBroadcast(kA, 1u); acc += dot(s1, subgroupBroadcast(rA, 1u));
        s2 = s2 * subgroupBroadcast(wA, 2u) - sa * subgroupBroadcast(kaA, 2u) + v * subgroupBroadcast(kA, 2u); acc += dot(s2, subgroupBroadcast(rA, 2u));
        s3 = s3 * subgroupBroadcast(wA, 3u) - sa * subgroupBroadcast(kaA, 3u) + v * subgroupBroadcast(kA, 3u); acc += dot(s3, subgroupBroadcast(rA, 3u));
        s4 = s4 * subgroupBroadcast(wA, 4u) - sa * subgroupBroadcast(kaA, 4u) + v * subgroupBroadcast(kA, 4u); acc += dot(s4, subgroupBroadcast(rA, 4u));
        s5 = s5 * subgroupBroadcast(wA, 5u) - sa * subgroupBroadcast(kaA, 5u) + v * subgroupBroadcast(kA, 5u); acc += dot(s5, subgroupBroadcast(rA, 5u));
        s6 = s6 * subgroupBroadcast(wA, 6u) - sa * subgroupBroadcast(kaA, 6u) + v * subgroupBroadcast(kA, 6u); acc += dot(s6, subgroupBroadcast(rA, 6u));
        s7 = s7 * subgroupBroadcast(wA, 7u) - sa * subgroupBroadcast(kaA, 7u) + v * subgroupBroadcast(kA, 7u); acc += dot(s7, subgroupBroadcast(rA, 7u));
        s8 = s8 * subgroupBroadcast(wB, 0u) - sa * subgroupBroadcast(kaB, 0u) + v * subgroupBroadcast(kB, 0u); acc += dot(s8, subgroupBroadcast(rB, 0u));
        s9 = s9 * subgroupBroadcast(wB, 1u) - sa * subgroupBroadcast(kaB, 1u) + v * subgroupBroadcast(kB, 1u); acc += dot(s9, subgroupBroadcast(rB, 1u));
        s10 = s10 * subgroupBroadcast(wB, 2u) - sa * subgroupBroadcast(kaB, 2u) + v * subgroupBroadcast(kB, 2u); acc += dot(s10, subgroupBroadcast(rB, 2u));
        s11 = s11 * subgroupBroadcast(wB, 3u) - sa * subgroupBroadcast(kaB, 3u) + v * subgroupBroadcast(kB, 3u); acc += dot(s11, subgroupBroadcast(rB, 3u));
        s12 = s12 * subgroupBroadcast(wB, 4u) - sa * subgroupBroadcast(kaB, 4u) + v * subgroupBroadcast(kB, 4u); acc += dot(s12, subgroupBroadcast(rB, 4u));
        s13 = s13 * subgroupBroadcast(wB, 5u) - sa * subgroupBroadcast(kaB, 5u) + v * subgroupBroadcast(kB, 5u); acc += dot(s13, subgroupBroadcast(rB, 5u));
        s14 = s14 * subgroupBroadcast(wB, 6u) - sa * subgroupBroadcast(kaB, 6u) + v * subgroupBroadcast(kB, 6u); acc += dot(s14, subgroupBroadcast(rB, 6u));
        s15 = s15 * subgroupBroadcast(wB, 7u) - sa * subgroupBroadcast(kaB, 7u) + v * subgroupBroadcast(kB, 7u); acc += dot(s15, subgroupBroadcast(rB, 7u));
        y[n * p.dim + h * 64u + i] = acc;
    }
    row_store(b, h, i, Row(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15));
}

@compute @workgroup_size(8)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) l: u32) {
    let h = wid.x;
    let b = wid.y;
    head_texel = h * 16u;
    head_row = h * 64u;
    seq = b;
    let n = seq_start[b];
    if (n < seq_start[b + 1u]) {
        let t = tok_load(l, n);
        for (var r = 0u; r < 8u; r++) {
            let i = l + 8u * r;
            let v = ld(V, i / 4u, n)[i % 4u];
            var acc = 0.0;
            let s = row_step(row_load(i), t, v, &acc);
            y[n * p.dim + h * 64u + i] = acc;
            row_store(b, h, i, s);
        }
    }
}
