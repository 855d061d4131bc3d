// Token shift with n_mix mixing vectors, four channels per invocation:
//   out[m, n, c] = x[n, c] + (prev[n, c] - x[n, c]) * (mix[m, c] + extra[m, n, c])
// where prev is the previous token of the same sequence, or the carried state
// (the last token's x from the previous call) for the first token of a
// sequence, and `extra` (RWKV-6's data-dependent mix) is zero unless
// extra_plane is set. With hand_over, the invocation of a sequence's first
// token also hands over the state for the next call: state[b, c] = x[last
// token of b, c]. It is the only one to touch state[b, c], and it reads
// before it writes, so no other ordering is needed (sequences with no tokens
// keep their state).
// dim and every offset are multiples of 4 (vec4 loads: one per-lane load
// where scalars take four on llvmpipe).

struct Params {
    n_tok: u32,
    dim: u32,
    n_mix: u32,
    mix_offset: u32,   // mix [n_mix, dim] in vecs
    state_stride: u32, // elements per sequence in state
    state_offset: u32, // this layer's shift state within a sequence
    out_plane: u32,    // elements between consecutive m in out
    hand_over: u32,    // 1: write each sequence's last x into the state
    extra_plane: u32,  // elements between consecutive m in extra; 0: no extra
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;         // [n_tok, dim / 4]
@group(0) @binding(2) var<storage, read> tok_seq: array<u32>;         // [n_tok] sequence of each token
@group(0) @binding(3) var<storage, read> seq_start: array<u32>;       // [n_seq + 1] first token of each sequence
@group(0) @binding(4) var<storage, read_write> state: array<vec4<f32>>; // [n_seq, state_stride / 4]
@group(0) @binding(5) var<storage, read> vecs: array<vec4<f32>>;      // per-layer vectors
@group(0) @binding(6) var<storage, read_write> out: array<vec4<f32>>; // [n_mix, out_plane / 4]
@group(0) @binding(7) var<storage, read> extra: array<vec4<f32>>;     // [n_mix, extra_plane / 4] if extra_plane > 0

// Tokens per invocation: the mix vectors are loaded once for all of them and
// each token's previous x is the one before it in the loop (TPW = 1 on GPUs,
// 8 on CPU adapters, where a storage-buffer load costs a per-lane loop).
override TPW: u32 = 1u;
// Most mixing vectors (v7: 6).
const MAX_MIX: u32 = 8u;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x; // channels 4c .. 4c + 3
    let n0 = gid.y * TPW; // tokens n0 .. n_end - 1
    let d4 = p.dim / 4u;
    if (c >= d4 || n0 >= p.n_tok) {
        return;
    }
    let n_end = min(n0 + TPW, p.n_tok);
    var mix: array<vec4<f32>, MAX_MIX>;
    for (var m = 0u; m < p.n_mix; m++) {
        mix[m] = vecs[p.mix_offset / 4u + m * d4 + c];
    }
    var last = vec4<f32>(0.0); // x of token n - 1
    for (var n = n0; n < n_end; n++) {
        let b = tok_seq[n];
        let cur = x[n * d4 + c];
        var prev = last;
        if (n == seq_start[b]) {
            let si = (b * p.state_stride + p.state_offset) / 4u + c;
            prev = state[si];
            if (p.hand_over == 1u) {
                state[si] = x[(seq_start[b + 1u] - 1u) * d4 + c];
            }
        } else if (n == n0) {
            prev = x[(n - 1u) * d4 + c];
        }
        last = cur;
        let d = prev - cur;
        for (var m = 0u; m < p.n_mix; m++) {
            var mx = mix[m];
            if (p.extra_plane > 0u) {
                mx += extra[(m * p.extra_plane) / 4u + n * d4 + c];
            }
            out[(m * p.out_plane) / 4u + n * d4 + c] = cur + d * mx;
        }
    }
}
