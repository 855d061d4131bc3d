// The RWKV-5/6 recurrence of wkv5.wgsl for head size 64, shaped for CPU
// adapters (llvmpipe) with subgroups of 8 like wkv7_tex.wgsl: the per-token
// vectors r, k, v (and v6's decay) come from a texture copy of `att`, lane l
// of a subgroup fetching texels l and l + 8 and sharing them by
// subgroupBroadcast; the state is read from a texture copy of the layer's
// state and written back to the storage buffer; each invocation's state row
// is sixteen named vec4 registers. No shared memory and no barriers.
// One workgroup per (head, sequence); invocation i owns row i (value index)
// of the head's state, kept as S [value i, key j] (the transpose of the
// official v5/v6 layout, see `StateField::transposed`):
//   y[i]    = sum_j r[j] (u[j] k[j] v[i] + S[i, j])   (the old state)
//   S[i, j] = S[i, j] w[j] + v[i] k[j]
// w is fixed per channel (v5: vecs at w_offset, already exp(-exp(.))) or per
// token (v6: exp(-exp(vecs[w_offset] + plane W))).

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
    u_offset: u32,     // bonus u [dim] in vecs
    w_offset: u32,     // decay [dim] in vecs
    w_dynamic: u32,    // 1: per-token decay from plane W (v6)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var att: texture_storage_2d_array<rgba32float, read>; // [PLANES, >= tokens, dim / 4]
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;     // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<vec4<f32>>; // [n_seq, state_stride / 4]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;       // [tokens, dim]
@group(0) @binding(5) var state_in: texture_storage_2d_array<rgba32float, read>; // [n_seq, n_head * 64, 16]: this layer's state
@group(0) @binding(6) var<storage, read> vecs: array<vec4<f32>>;    // per-layer vectors

var<private> head_texel: u32; // first texel of this head in a row of att
var<private> state_row: vec2<u32>; // this invocation's state row in state_in
var<private> seq: u32;

// Texel m (elements 4m .. 4m + 3 of this head) of plane `pl` for token n.
fn ld(pl: u32, m: u32, n: u32) -> vec4<f32> {
    return textureLoad(att, vec2<u32>(head_texel + m, n), pl);
}

// Texel m (elements 4m .. 4m + 3) of this invocation's state row.
fn st(m: u32) -> vec4<f32> {
    return textureLoad(state_in, state_row + vec2<u32>(m, 0u), seq);
}

// The decay of texel m of this head for token n.
fn decay(fixed: vec4<f32>, m: u32, n: u32) -> vec4<f32> {
    if (p.w_dynamic == 1u) {
        return exp(-exp(fixed + ld(W, m, n)));
    }
    return fixed;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32, @builtin(subgroup_invocation_id) l: u32) {
    let h = wid.x;
    let b = wid.y;
    head_texel = h * 16u;
    state_row = vec2<u32>(0u, h * 64u + i);
    seq = b;
    let sb = (b * p.state_stride + p.state_offset + h * 4096u + i * 64u) / 4u;
    var s0 = st(0u); var s1 = st(1u); var s2 = st(2u); var s3 = st(3u);
    var s4 = st(4u); var s5 = st(5u); var s6 = st(6u); var s7 = st(7u);
    var s8 = st(8u); var s9 = st(9u); var s10 = st(10u); var s11 = st(11u);
    var s12 = st(12u); var s13 = st(13u); var s14 = st(14u); var s15 = st(15u);
    // This lane's texels l and l + 8 of u and of the fixed decay.
    let uA = vecs[(p.u_offset / 4u) + head_texel + l];
    let uB = vecs[(p.u_offset / 4u) + head_texel + l + 8u];
    let fA = vecs[(p.w_offset / 4u) + head_texel + l];
    let fB = vecs[(p.w_offset / 4u) + head_texel + l + 8u];
    let end = seq_start[b + 1u];
    let first = min(seq_start[b] + p.t_first, end);
    let last = min(first + p.t_count, end);
    for (var n = first; n < last; n++) {
        let v = ld(V, i / 4u, n)[i % 4u];
        let rA = ld(R, l, n); let rB = ld(R, l + 8u, n);
        let kA = ld(K, l, n); let kB = ld(K, l + 8u, n);
        let wA = decay(fA, l, n); let wB = decay(fB, l + 8u, n);
        // sum_j r[j] u[j] k[j], over the subgroup's 16 texels.
        let ruk = subgroupAdd(dot(rA * uA, kA) + dot(rB * uB, kB));
        var acc = v * ruk;
        acc += dot(s0, subgroupBroadcast(rA, 0u)); s0 = s0 * subgroupBroadcast(wA, 0u) + v * subgroupBroadcast(kA, 0u);
        acc += dot(s1, subgroupBroadcast(rA, 1u)); s1 = s1 * subgroupBroadcast(wA, 1u) + v * subgroupBroadcast(kA, 1u);
        acc += dot(s2, subgroupBroadcast(rA, 2u)); s2 = s2 * subgroupBroadcast(wA, 2u) + v * subgroupBroadcast(kA, 2u);
        acc += dot(s3, subgroupBroadcast(rA, 3u)); s3 = s3 * subgroupBroadcast(wA, 3u) + v * subgroupBroadcast(kA, 3u);
        acc += dot(s4, subgroupBroadcast(rA, 4u)); s4 = s4 * subgroupBroadcast(wA, 4u) + v * subgroupBroadcast(kA, 4u);
        acc += dot(s5, subgroupBroadcast(rA, 5u)); s5 = s5 * subgroupBroadcast(wA, 5u) + v * subgroupBroadcast(kA, 5u);
        acc += dot(s6, subgroupBroadcast(rA, 6u)); s6 = s6 * subgroupBroadcast(wA, 6u) + v * subgroupBroadcast(kA, 6u);
        acc += dot(s7, subgroupBroadcast(rA, 7u)); s7 = s7 * subgroupBroadcast(wA, 7u) + v * subgroupBroadcast(kA, 7u);
        acc += dot(s8, subgroupBroadcast(rB, 0u)); s8 = s8 * subgroupBroadcast(wB, 0u) + v * subgroupBroadcast(kB, 0u);
        acc += dot(s9, subgroupBroadcast(rB, 1u)); s9 = s9 * subgroupBroadcast(wB, 1u) + v * subgroupBroadcast(kB, 1u);
        acc += dot(s10, subgroupBroadcast(rB, 2u)); s10 = s10 * subgroupBroadcast(wB, 2u) + v * subgroupBroadcast(kB, 2u);
        acc += dot(s11, subgroupBroadcast(rB, 3u)); s11 = s11 * subgroupBroadcast(wB, 3u) + v * subgroupBroadcast(kB, 3u);
        acc += dot(s12, subgroupBroadcast(rB, 4u)); s12 = s12 * subgroupBroadcast(wB, 4u) + v * subgroupBroadcast(kB, 4u);
        acc += dot(s13, subgroupBroadcast(rB, 5u)); s13 = s13 * subgroupBroadcast(wB, 5u) + v * subgroupBroadcast(kB, 5u);
        acc += dot(s14, subgroupBroadcast(rB, 6u)); s14 = s14 * subgroupBroadcast(wB, 6u) + v * subgroupBroadcast(kB, 6u);
        acc += dot(s15, subgroupBroadcast(rB, 7u)); s15 = s15 * subgroupBroadcast(wB, 7u) + v * subgroupBroadcast(kB, 7u);
        y[n * p.dim + h * 64u + i] = acc;
    }
    state[sb + 0u] = s0; state[sb + 1u] = s1; state[sb + 2u] = s2; state[sb + 3u] = s3;
    state[sb + 4u] = s4; state[sb + 5u] = s5; state[sb + 6u] = s6; state[sb + 7u] = s7;
    state[sb + 8u] = s8; state[sb + 9u] = s9; state[sb + 10u] = s10; state[sb + 11u] = s11;
    state[sb + 12u] = s12; state[sb + 13u] = s13; state[sb + 14u] = s14; state[sb + 15u] = s15;
}
