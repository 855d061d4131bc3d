// The RWKV-4 recurrence, one invocation per (channel, sequence), walking the
// sequence's tokens in order. The state keeps the numerator aa, the
// denominator bb and their common exponent pp (aa e^pp and bb e^pp are the
// true sums), so no exponential overflows however long the sequence:
//   ww = u + k;  q = max(pp, ww);  e1 = exp(pp - q);  e2 = exp(ww - q)
//   y  = r * (e1 aa + e2 v) / (e1 bb + e2)          (r already sigmoid)
//   ww = pp + w; q = max(ww, k);   e1 = exp(ww - q);  e2 = exp(k - q)
//   aa = e1 aa + e2 v;  bb = e1 bb + e2;  pp = q
// with u = time_first and w = -exp(time_decay) per channel.

struct Params {
    n_seq: u32,
    dim: u32,
    plane: u32,        // elements per plane of att
    state_stride: u32, // elements per sequence in state
    state_offset: u32, // this layer's aa within a sequence; bb, pp follow at +dim, +2 dim
    u_offset: u32,     // time_first [dim] in vecs
    w_offset: u32,     // -exp(time_decay) [dim] in vecs
    _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> att: array<f32>;         // [PLANES, tokens, dim]: R, K, V
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;   // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<f32>; // [n_seq, state_stride]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;     // [tokens, dim]
@group(0) @binding(5) var<storage, read> vecs: array<f32>;        // per-layer vectors

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let b = gid.y;
    if (c >= p.dim || b >= p.n_seq) {
        return;
    }
    let si = b * p.state_stride + p.state_offset + c;
    var aa = state[si];
    var bb = state[si + p.dim];
    var pp = state[si + 2u * p.dim];
    let u = vecs[p.u_offset + c];
    let w = vecs[p.w_offset + c];
    for (var n = seq_start[b]; n < seq_start[b + 1u]; n++) {
        let i = n * p.dim + c;
        let k = att[K * p.plane + i];
        let v = att[V * p.plane + i];
        var ww = u + k;
        var q = max(pp, ww);
        var e1 = exp(pp - q);
        var e2 = exp(ww - q);
        y[i] = att[R * p.plane + i] * (e1 * aa + e2 * v) / (e1 * bb + e2);
        ww = pp + w;
        q = max(ww, k);
        e1 = exp(ww - q);
        e2 = exp(k - q);
        aa = e1 * aa + e2 * v;
        bb = e1 * bb + e2;
        pp = q;
    }
    state[si] = aa;
    state[si + p.dim] = bb;
    state[si + 2u * p.dim] = pp;
}
