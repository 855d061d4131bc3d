// The RWKV-7 recurrence. One workgroup per (head, sequence); invocation i owns
// row i (value index) of the head's state S [head_size x head_size], kept in
// registers for the whole dispatch, and walks the sequence's tokens in order:
//   S[i, j] = S[i, j] * w[j] - (S kk)[i] * (kk[j] * a[j]) + v[i] * k[j]
//   y[i]    = sum_j S[i, j] * r[j]        (read out with the new state)
// The state layout is [head, value i, key j], the official one.

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
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

const MAX_N: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> att: array<f32>;         // [PLANES, tokens, dim]
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;   // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<f32>; // [n_seq, state_stride]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;     // [tokens, dim]

var<workgroup> sr: array<f32, 64>;
var<workgroup> sw: array<f32, 64>;
var<workgroup> sk: array<f32, 64>;
var<workgroup> skk: array<f32, 64>;
var<workgroup> skka: array<f32, 64>;
var<workgroup> bounds: vec2<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let h = wid.x;
    let b = wid.y;
    let nh = p.head_size;
    let sbase = b * p.state_stride + p.state_offset + h * nh * nh + i * nh;
    var s: array<f32, MAX_N>;
    if (i < nh) {
        for (var j = 0u; j < nh; j++) {
            s[j] = state[sbase + j];
        }
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
            sw[i] = att[W * p.plane + base + i];
            sk[i] = att[K * p.plane + base + i];
            let kk = att[KK * p.plane + base + i];
            skk[i] = kk;
            skka[i] = kk * att[A * p.plane + base + i];
        }
        workgroupBarrier();
        if (i < nh) {
            var sa = 0.0;
            for (var j = 0u; j < nh; j++) {
                sa += s[j] * skk[j];
            }
            let v = att[V * p.plane + base + i];
            var acc = 0.0;
            for (var j = 0u; j < nh; j++) {
                let sj = s[j] * sw[j] - sa * skka[j] + v * sk[j];
                s[j] = sj;
                acc += sj * sr[j];
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
