// Prepended to every kernel (WGSL has no includes).

// Weight encoding of the `w` binding of kernels that read weights:
// 0 = f32, 1 = f16 (two per u32, element 2i in the low half), 2 = bf16 (likewise).
override WDTYPE: u32 = 0u;

// One weight element widened to f32 (exact). For f32 `word` is the element;
// for 16-bit types it holds two elements and `odd` picks the upper one.
fn unpack_weight(word: u32, odd: bool) -> f32 {
    if (WDTYPE == 0u) {
        return bitcast<f32>(word);
    }
    if (WDTYPE == 1u) {
        let p = unpack2x16float(word);
        return select(p.x, p.y, odd);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, odd));
}

// Weights 0..3 and 4..7 of a vec4<u32> word of eight 16-bit weights, widened
// exactly to f32 (f16 through unpack2x16float, bf16 by shifting into place).
fn unpack_lo4(q: vec4<u32>) -> vec4<f32> {
    if (WDTYPE == 1u) {
        return vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
    }
    return bitcast<vec4<f32>>(vec4<u32>(q.x << 16u, q.x & 0xffff0000u, q.y << 16u, q.y & 0xffff0000u));
}

fn unpack_hi4(q: vec4<u32>) -> vec4<f32> {
    if (WDTYPE == 1u) {
        return vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
    }
    return bitcast<vec4<f32>>(vec4<u32>(q.z << 16u, q.z & 0xffff0000u, q.w << 16u, q.w & 0xffff0000u));
}

// Block-quantized codes (quant.rs) widened to f32 (exact). int8: the 4
// codes of a word in byte order, sign-extended.
fn i8x4(q: u32) -> vec4<f32> {
    let v = vec4<i32>(bitcast<i32>(q << 24u), bitcast<i32>(q << 16u), bitcast<i32>(q << 8u), bitcast<i32>(q));
    return vec4<f32>(v >> vec4<u32>(24u));
}

// Q4: nibbles 0..3 and 4..7 of a word (codes + 8, 0..15).
fn u4lo(q: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(q & 15u, (q >> 4u) & 15u, (q >> 8u) & 15u, (q >> 12u) & 15u));
}

fn u4hi(q: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>((q >> 16u) & 15u, (q >> 20u) & 15u, (q >> 24u) & 15u, q >> 28u));
}

// acc + w . a as a chain of fused multiply-adds (one instruction each on
// llvmpipe with FMA hardware, where dot() is four multiplies and three adds).
fn fdot(w: vec4<f32>, a: vec4<f32>, acc: f32) -> f32 {
    return fma(w.w, a.w, fma(w.z, a.z, fma(w.y, a.y, fma(w.x, a.x, acc))));
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// tanh without overflow for large |x| and with small absolute error near 0.
fn tanh_safe(x: f32) -> f32 {
    let ax = abs(x);
    if (ax < 0.0005) {
        return x - x * x * x / 3.0;
    }
    let e = exp(-2.0 * ax);
    return sign(x) * (1.0 - e) / (1.0 + e);
}

// Invocations of the kernels that reduce over a row (layer_norm, v7_prep,
// v7_out), each summing with `group_sum`: one subgroup where the adapter has
// subgroups of one fixed size (subgroupAdd, no barriers: llvmpipe pays
// dearly for barriers), else 64 with a shared-memory tree. The pipeline sets
// GS and prepends reduce_subgroup.wgsl or reduce_workgroup.wgsl.
override GS: u32 = 64u;

// Planes of the RWKV-7 time-mix activation buffer `att [PLANES, tokens, dim]`,
// as `gpu::kernels::plane` in Rust.
const R: u32 = 0u;
const W: u32 = 1u;
const K: u32 = 2u;
const V: u32 = 3u;
const A: u32 = 4u;
const G: u32 = 5u;
const KK: u32 = 6u;
const V_FIRST: u32 = 7u;
const V_GATE: u32 = 8u;

// The activation a linear kernel applies before storing: 0 none, 1 tanh,
// 2 sigmoid, 3 relu^2, 4 silu (`gpu::kernels::Act`). The exact GELU is its
// own kernel (gelu.wgsl): in here its erfc would grow every matrix kernel's
// compiled code (~13 MB more JIT memory on llvmpipe for the 0.1B model).
fn apply_act(v: f32, act: u32) -> f32 {
    switch act {
        case 1u: { return tanh_safe(v); }
        case 2u: { return sigmoid(v); }
        case 3u: { let r = max(v, 0.0); return r * r; }
        case 4u: { return v * sigmoid(v); }
        default: { return v; }
    }
}
