// The RWKV-5 / RWKV-6 recurrence (matrix-valued state, per-channel decay and
// bonus). One workgroup per (head, sequence); invocation i owns column i
// (value index) of the head's state S [key j, value i], kept in registers for
// the whole dispatch, and walks the sequence's tokens in order:
//   y[i]    = sum_j r[j] * (u[j] * k[j] * v[i] + S[j, i])
//   S[j, i] = k[j] * v[i] + w[j] * S[j, i]
// The decay w is per channel and fixed (v5: from vecs at w_offset, already
// exp(-exp(time_decay))) or per token (v6, w_dynamic: exp(-exp(d)) with
// d = vecs[w_offset] + plane W, the data-dependent part from the LoRA).
// The state is kept as [head, value i, key j] (the transpose of the official
// v5/v6 layout, see `StateField::transposed`), so invocation i's column of
// the official matrix is one contiguous row.

struct Params {
    n_seq: u32,
    n_head: u32,
    head_size: u32,
    dim: u32,
    plane: u32,        // elements per plane of att
    state_stride: u32, // elements per sequence in state
    state_offset: u32, // this layer's att_kv within a sequence
    t_first: u32,      // walk tokens t_first .. t_first + t_count of each sequence
    t_count: u32,      // (llvmpipe caps a loop nest at 65535 iterations in all)
    u_offset: u32,     // bonus u [dim] in vecs
    w_offset: u32,     // decay [dim] in vecs
    w_dynamic: u32,    // 1: per-token decay from plane W (v6)
}

const MAX_N: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> att: array<f32>;         // [PLANES, tokens, dim]: R, W, K, V
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;   // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<f32>; // [n_seq, state_stride]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;     // [tokens, dim]
@group(0) @binding(5) var<storage, read> vecs: array<f32>;        // per-layer vectors

var<workgroup> sr: array<f32, 64>;
var<workgroup> sw: array<f32, 64>;
var<workgroup> sk: array<f32, 64>;
var<workgroup> su: array<f32, 64>;
var<workgroup> bounds: vec2<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let h = wid.x;
    let b = wid.y;
    let nh = p.head_size;
    let c = h * nh + i;
    let sbase = b * p.state_stride + p.state_offset + h * nh * nh + i * nh;
    var s: array<f32, MAX_N>;
    var w_fixed = 0.0;
    if (i < nh) {
        for (var j = 0u; j < nh; j++) {
            s[j] = state[sbase + j];
        }
        su[i] = vecs[p.u_offset + c];
        w_fixed = vecs[p.w_offset + c];
    }
    if (i == 0u) {
        let end = seq_start[b + 1u];
        let first = min(seq_start[b] + p.t_first, end);
        bounds = vec2<u32>(first, min(first + p.t_count, end));
    }
    let range = workgroupUniformLoad(&bounds);
    for (var n = range.x; n < range.y; n++) {
        let base = n * p.dim + h * nh;
        if (i < nh) {
            sr[i] = att[R * p.plane + base + i];
            sk[i] = att[K * p.plane + base + i];
            if (p.w_dynamic == 1u) {
                sw[i] = exp(-exp(w_fixed + att[W * p.plane + base + i]));
            } else {
                sw[i] = w_fixed;
            }
        }
        workgroupBarrier();
        if (i < nh) {
            let v = att[V * p.plane + base + i];
            var acc = 0.0;
            for (var j = 0u; j < nh; j++) {
                let kv = sk[j] * v;
                acc += sr[j] * (su[j] * kv + s[j]);
                s[j] = kv + sw[j] * s[j];
            }
            y[base + i] = acc;
        }
        workgroupBarrier();
    }
    if (i < nh) {
        for (var j = 0u; j < nh; j++) {
            state[sbase + j] = s[j];
        }
    }
}
