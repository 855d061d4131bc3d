// Appends one sequence's keys and values to its KV cache: for each of its
// `n_tok` token rows of the fused projection `qkv` (q heads, then k heads,
// then v heads; k already rotated), k and v go to cache positions
// pos0 .. pos0 + n_tok. The cache is one layer's [2, cap, kv_dim]: keys,
// then values from `cap * kv_dim`; f32, or f16 when KVF16 (two halves per
// u32, the lower element in the low half). One invocation per 4 channels.

struct Params {
    n_tok: u32,
    row0: u32,       // the sequence's first token row in qkv
    qkv_stride: u32, // elements per qkv row
    k_offset: u32,   // elements: the first key channel of a row (q width)
    kv_dim: u32,     // n_kv_head * head_dim
    pos0: u32,       // cache position of the first token
    cap: u32,        // positions the cache holds
    _p0: u32,
}

// 1: the cache is f16.
override KVF16: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;          // [rows, qkv_stride / 4]
@group(0) @binding(2) var<storage, read_write> cache: array<vec2<u32>>; // [2, cap, kv_dim]: f32 (2 words per vec4) or f16 (1)

fn store(i: u32, v: vec4<f32>) {
    if (KVF16 == 1u) {
        cache[i] = vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw));
    } else {
        let b = bitcast<vec4<u32>>(v);
        cache[2u * i] = b.xy;
        cache[2u * i + 1u] = b.zw;
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    let d4 = p.kv_dim / 4u;
    if (c >= d4 || t >= p.n_tok) {
        return;
    }
    let src = (p.row0 + t) * (p.qkv_stride / 4u) + p.k_offset / 4u + c;
    let dst = (p.pos0 + t) * d4 + c;
    store(dst, qkv[src]);
    store(p.cap * d4 + dst, qkv[src + d4]);
}
