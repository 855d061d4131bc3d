// The RWKV-7 recurrence of wkv7.wgsl for head size 64, shaped for CPU
// adapters (llvmpipe): the per-token vectors r, w, k, v, kk, a are read from
// a texture copy of `att` (texel fetches are vector gathers there; storage
// loads are per-lane loops), and each invocation's state row is sixteen
// named vec4 registers with every loop over it written out, because
// llvmpipe keeps dynamically indexed arrays in memory. No shared memory and
// no barriers: each invocation reads what it needs itself.
// One workgroup per (head, sequence); invocation i owns row i (value index)
// of the head's state S [64 x 64] and walks the sequence's tokens in order:
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
@group(0) @binding(1) var att: texture_2d_array<f32>;                // [PLANES, >= tokens, dim / 4]
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;     // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<vec4<f32>>; // [n_seq, state_stride / 4]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;       // [tokens, dim]

var<private> head_texel: u32; // first texel of this head in a row of att

// Texel m (elements 4m .. 4m + 3 of this head) of plane `pl` for token n.
fn ld(pl: u32, m: u32, n: u32) -> vec4<f32> {
    return textureLoad(att, vec2<u32>(head_texel + m, n), pl, 0);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let h = wid.x;
    let b = wid.y;
    head_texel = h * 16u;
    let sb = (b * p.state_stride + p.state_offset + h * 4096u + i * 64u) / 4u;
    var s0 = state[sb + 0u]; var s1 = state[sb + 1u]; var s2 = state[sb + 2u]; var s3 = state[sb + 3u];
    var s4 = state[sb + 4u]; var s5 = state[sb + 5u]; var s6 = state[sb + 6u]; var s7 = state[sb + 7u];
    var s8 = state[sb + 8u]; var s9 = state[sb + 9u]; var s10 = state[sb + 10u]; var s11 = state[sb + 11u];
    var s12 = state[sb + 12u]; var s13 = state[sb + 13u]; var s14 = state[sb + 14u]; var s15 = state[sb + 15u];
    let end = seq_start[b + 1u];
    let first = min(seq_start[b] + p.t_first, end);
    let last = min(first + p.t_count, end);
    for (var n = first; n < last; n++) {
        let v = ld(V, i / 4u, n)[i % 4u];
        let kk0 = ld(KK, 0u, n); let kk1 = ld(KK, 1u, n); let kk2 = ld(KK, 2u, n); let kk3 = ld(KK, 3u, n);
        let kk4 = ld(KK, 4u, n); let kk5 = ld(KK, 5u, n); let kk6 = ld(KK, 6u, n); let kk7 = ld(KK, 7u, n);
        let kk8 = ld(KK, 8u, n); let kk9 = ld(KK, 9u, n); let kk10 = ld(KK, 10u, n); let kk11 = ld(KK, 11u, n);
        let kk12 = ld(KK, 12u, n); let kk13 = ld(KK, 13u, n); let kk14 = ld(KK, 14u, n); let kk15 = ld(KK, 15u, n);
        let sa = dot(s0, kk0) + dot(s1, kk1) + dot(s2, kk2) + dot(s3, kk3) +
            dot(s4, kk4) + dot(s5, kk5) + dot(s6, kk6) + dot(s7, kk7) +
            dot(s8, kk8) + dot(s9, kk9) + dot(s10, kk10) + dot(s11, kk11) +
            dot(s12, kk12) + dot(s13, kk13) + dot(s14, kk14) + dot(s15, kk15);
        var acc = 0.0;
        s0 = s0 * ld(W, 0u, n) - sa * (kk0 * ld(A, 0u, n)) + v * ld(K, 0u, n); acc += dot(s0, ld(R, 0u, n));
        s1 = s1 * ld(W, 1u, n) - sa * (kk1 * ld(A, 1u, n)) + v * ld(K, 1u, n); acc += dot(s1, ld(R, 1u, n));
        s2 = s2 * ld(W, 2u, n) - sa * (kk2 * ld(A, 2u, n)) + v * ld(K, 2u, n); acc += dot(s2, ld(R, 2u, n));
        s3 = s3 * ld(W, 3u, n) - sa * (kk3 * ld(A, 3u, n)) + v * ld(K, 3u, n); acc += dot(s3, ld(R, 3u, n));
        s4 = s4 * ld(W, 4u, n) - sa * (kk4 * ld(A, 4u, n)) + v * ld(K, 4u, n); acc += dot(s4, ld(R, 4u, n));
        s5 = s5 * ld(W, 5u, n) - sa * (kk5 * ld(A, 5u, n)) + v * ld(K, 5u, n); acc += dot(s5, ld(R, 5u, n));
        s6 = s6 * ld(W, 6u, n) - sa * (kk6 * ld(A, 6u, n)) + v * ld(K, 6u, n); acc += dot(s6, ld(R, 6u, n));
        s7 = s7 * ld(W, 7u, n) - sa * (kk7 * ld(A, 7u, n)) + v * ld(K, 7u, n); acc += dot(s7, ld(R, 7u, n));
        s8 = s8 * ld(W, 8u, n) - sa * (kk8 * ld(A, 8u, n)) + v * ld(K, 8u, n); acc += dot(s8, ld(R, 8u, n));
        s9 = s9 * ld(W, 9u, n) - sa * (kk9 * ld(A, 9u, n)) + v * ld(K, 9u, n); acc += dot(s9, ld(R, 9u, n));
        s10 = s10 * ld(W, 10u, n) - sa * (kk10 * ld(A, 10u, n)) + v * ld(K, 10u, n); acc += dot(s10, ld(R, 10u, n));
        s11 = s11 * ld(W, 11u, n) - sa * (kk11 * ld(A, 11u, n)) + v * ld(K, 11u, n); acc += dot(s11, ld(R, 11u, n));
        s12 = s12 * ld(W, 12u, n) - sa * (kk12 * ld(A, 12u, n)) + v * ld(K, 12u, n); acc += dot(s12, ld(R, 12u, n));
        s13 = s13 * ld(W, 13u, n) - sa * (kk13 * ld(A, 13u, n)) + v * ld(K, 13u, n); acc += dot(s13, ld(R, 13u, n));
        s14 = s14 * ld(W, 14u, n) - sa * (kk14 * ld(A, 14u, n)) + v * ld(K, 14u, n); acc += dot(s14, ld(R, 14u, n));
        s15 = s15 * ld(W, 15u, n) - sa * (kk15 * ld(A, 15u, n)) + v * ld(K, 15u, n); acc += dot(s15, ld(R, 15u, n));
        y[n * p.dim + h * 64u + i] = acc;
    }
    state[sb + 0u] = s0; state[sb + 1u] = s1; state[sb + 2u] = s2; state[sb + 3u] = s3;
    state[sb + 4u] = s4; state[sb + 5u] = s5; state[sb + 6u] = s6; state[sb + 7u] = s7;
    state[sb + 8u] = s8; state[sb + 9u] = s9; state[sb + 10u] = s10; state[sb + 11u] = s11;
    state[sb + 12u] = s12; state[sb + 13u] = s13; state[sb + 14u] = s14; state[sb + 15u] = s15;
}
