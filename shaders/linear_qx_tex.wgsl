// Y[n, o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T), W in int8 or Q4 blocks of 64
// The quantized texture kernel of subgroups of 8 (lavapipe): weight codes
// times x quantized in the kernel, summed as exact integers, several
// products per u32 operation. llvmpipe is bound by operations, not bytes:
// this does about 1.5 (int8) to 2 (Q4) times fewer than decoding each code
// to f32 as linear_q_tex.wgsl does.
//
// Weights (`quant.rs`, `QxGroups`): each texture row holds a group of 8 rows
// of W. Per block of 64 inputs it holds BT texels: the codes, then the 8
// rows' f16 scales sw (word j: rows 2j, 2j + 1), then the 8 rows' sums of
// their stored codes N (u16, same order). Codes are stored offset to be
// non-negative: n = code + 8 (Q4, 0..15) or n = code + 128 (int8, 1..255).
// - Q4 (QF 1, BT 18): 16 code texels; texel t, word c = input 4t + c of the
//   block, nibble r = row r of the group.
// - int8 (QF 0, BT 34): for each 4 inputs i..i+3, a texel of rows 0..3 and
//   one of rows 4..7, word r = row r's bytes n[i+1], n[i+3], n[i], n[i+2].
//
// x, per token and block of 64 (as llama.cpp's Q8_0): sx = max |x| / XL,
// codes xc = round(x / sx) in -XL..XL, held as x' = xc + XO (Q4: XL 127,
// XO 128, 8 bits; int8: XL 63, XO 64, 7 bits), and X = sum x'. Then per row
// and block the code product is the exact integer
//   sum_i code xc = sum_i n x' - XO N - WO X + WO XO 64   (WO: 8 or 128),
// and the row's sum is s += (sw * sx) * f32(that) (|x - sx xc| <= sx / 2).
//
// - Q4: (word >> 4j) & 0x000F000F holds rows j and j + 4 in the two 16-bit
//   halves of a u32, so one multiply by x' makes two products and one add
//   sums two; a half reaches at most 16 * 15 * 255 = 61200 < 65536 before
//   it is flushed into per-row sums every 16 inputs.
// - int8: word & 0x00FF00FF is n[i+1] + 2^16 n[i]; times x'[i] + 2^16
//   x'[i+1] its upper half is n[i] x'[i] + n[i+1] x'[i+1] (<= 2 * 255 *
//   127 = 64770 < 65536; the lower half, n[i+1] x'[i] <= 32385, carries
//   nothing into it), so one multiply and a shift make a two-term dot.
//
// A workgroup is one subgroup of 8 lanes (needs WG == subgroup size == 8);
// lane l owns row group 8 wid.x + l. For each block the lanes quantize 8 of
// its 64 inputs each (subgroupMax, subgroupAdd) and hand their codes to the
// others by subgroupBroadcast, so no lane reads x more than once a block.
// `decode` (1 token) and `prefill` (QT tokens) do the same operations for
// every (row, token), so a token's result does not depend on the batch.
// Needs d_in % 64 == 0.

struct Params {
    n_rows: u32,      // tokens
    d_in: u32,        // weights per row
    d_out: u32,       // rows of W; row stride of y
    layer_rows: u32,  // rows of W per texture layer (layer_rows / 8 texture rows), a multiple of 8 WG
    y_offset: u32,
    act: u32,
    accumulate: u32,
    _p0: u32,
}

override WG: u32 = 8u;
// Where x comes from: 1 = a uniform-buffer window of the x buffer, 0 = the x texture.
override XU: u32 = 0u;
// Code format: 0 = int8, 1 = Q4.
override QF: u32 = 1u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var w: texture_storage_2d_array<rgba32uint, read>; // [layers, layer_rows / 8, BT d_in / 64] row groups
@group(0) @binding(2) var xt: texture_storage_2d<rgba32float, read>;     // XU == 0: [>= n_rows, >= d_in / 4] f32, row n = token n
@group(0) @binding(3) var<uniform> xu: array<vec4<f32>, 4096>;          // XU == 1: [n_rows, d_in / 4] (a 64 KiB window of the x buffer)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;           // [n_rows, d_out] at y_offset

// Tokens per `prefill` workgroup (LINEAR_QX_TOKENS in kernels.rs).
const QT: u32 = 4u;

// Texels per block of a row group.
fn bt() -> u32 {
    return select(34u, 18u, QF == 1u);
}

// x code range and offset.
fn xl() -> f32 {
    return select(63.0, 127.0, QF == 1u);
}

fn xo() -> i32 {
    return select(64, 128, QF == 1);
}

// Weight code offset.
fn wo() -> i32 {
    return select(128, 8, QF == 1);
}

// The 4 x values at x texel i of token n.
fn xv(i: u32, n: u32) -> vec4<f32> {
    if (XU == 1u) {
        return xu[n * (p.d_in / 4u) + i];
    }
    return textureLoad(xt, vec2<u32>(i, n));
}

// Texel k of row group g (clamped to the matrix; clamped rows are never written).
fn wt(k: u32, g: u32, layer: u32) -> vec4<u32> {
    let row = min(g, (p.d_out - 1u) / 8u) - layer * (p.layer_rows / 8u);
    return textureLoad(w, vec2<u32>(k, row), layer);
}

// One token's block of x, quantized: this lane's codes x' of inputs
// 8 lane .. 8 lane + 7 of the block (Q4: one a word, a then b; int8: as the
// pairs x'[i] + 2^16 x'[i + 1] in a, b unused), the block's scale and X.
struct Xq {
    a: vec4<u32>,
    b: vec4<u32>,
    s: f32,
    sum: u32,
}

fn quantize(n: u32, b: u32, lane: u32) -> Xq {
    let i = b * 16u + 2u * lane;
    let v0 = xv(i, n);
    let v1 = xv(i + 1u, n);
    let a = max(abs(v0), abs(v1));
    let m = subgroupMax(max(max(a.x, a.y), max(a.z, a.w)));
    let s = select(m / xl(), 1.0, m == 0.0);
    let inv = 1.0 / s;
    let lim = vec4<i32>(i32(xl()));
    let ca = vec4<u32>(clamp(vec4<i32>(round(v0 * inv)), -lim, lim) + xo());
    let cb = vec4<u32>(clamp(vec4<i32>(round(v1 * inv)), -lim, lim) + xo());
    let t = ca + cb;
    let sum = subgroupAdd(t.x + t.y + t.z + t.w);
    if (QF == 1u) {
        return Xq(ca, cb, s, sum);
    }
    let pairs = vec4<u32>(ca.x, ca.z, cb.x, cb.z) | (vec4<u32>(ca.y, ca.w, cb.y, cb.w) << vec4<u32>(16u));
    return Xq(pairs, vec4<u32>(0u), s, sum);
}

// Per-row integer sums of one block, rows 0..3 (lo) and 4..7 (hi), and
// Q4's 16-bit-half accumulator (rows j and j + 4 in acc[j]).
struct Block {
    lo: vec4<u32>,
    hi: vec4<u32>,
    acc: vec4<u32>,
}

// Q4: the 16-bit halves of acc added to the per-row sums, acc emptied.
fn flush(r: Block) -> Block {
    return Block(r.lo + (r.acc & vec4<u32>(0xFFFFu)), r.hi + (r.acc >> vec4<u32>(16u)), vec4<u32>(0u));
}

// Q4: rows j and j + 4 of the group (j = 0..3) of code word q, in 16-bit halves.
fn nib(q: u32) -> vec4<u32> {
    return (vec4<u32>(q) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(0x000F000Fu);
}

// Q4: acc + code texel q times the x' of its 4 inputs.
fn tdot(q: vec4<u32>, x: vec4<u32>, acc: vec4<u32>) -> vec4<u32> {
    return acc + nib(q.x) * x.x + nib(q.y) * x.y + nib(q.z) * x.z + nib(q.w) * x.w;
}

// int8: the two-term dots of 4 rows' words q (4 inputs each) with x' pairs xa, xb.
fn pdot(q: vec4<u32>, xa: u32, xb: u32) -> vec4<u32> {
    let m = vec4<u32>(0x00FF00FFu);
    return (((q & m) * xa) >> vec4<u32>(16u)) + ((((q >> vec4<u32>(8u)) & m) * xb) >> vec4<u32>(16u));
}

// Block state after lane la's 8 inputs (texels k + .. of group g), given
// that lane's codes a, b. Q4 flushes its halves after every odd lane.
fn lane_step(r: Block, k: u32, g: u32, l: u32, la: u32, a: vec4<u32>, b: vec4<u32>) -> Block {
    if (QF == 1u) {
        var acc = tdot(wt(k + 2u * la, g, l), a, r.acc);
        acc = tdot(wt(k + 2u * la + 1u, g, l), b, acc);
        let o = Block(r.lo, r.hi, acc);
        if ((la & 1u) == 0u) {
            return o;
        }
        return flush(o);
    }
    let t = k + 4u * la;
    let lo = r.lo + pdot(wt(t, g, l), a.x, a.y) + pdot(wt(t + 2u, g, l), a.z, a.w);
    let hi = r.hi + pdot(wt(t + 1u, g, l), a.x, a.y) + pdot(wt(t + 3u, g, l), a.z, a.w);
    return Block(lo, hi, r.acc);
}

// The group's f32 sums after block k (its first texel): s + (sw * sx) * f32(code product).
struct Sums {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn fold(s: Sums, k: u32, g: u32, l: u32, r: Block, x: Xq) -> Sums {
    let sc = wt(k + bt() - 2u, g, l);
    let ns = wt(k + bt() - 1u, g, l);
    let sw_lo = vec4<f32>(unpack2x16float(sc.x), unpack2x16float(sc.y));
    let sw_hi = vec4<f32>(unpack2x16float(sc.z), unpack2x16float(sc.w));
    let n_lo = vec4<i32>(vec4<u32>(ns.x, ns.x >> 16u, ns.y, ns.y >> 16u) & vec4<u32>(0xFFFFu));
    let n_hi = vec4<i32>(vec4<u32>(ns.z, ns.z >> 16u, ns.w, ns.w >> 16u) & vec4<u32>(0xFFFFu));
    let k0 = vec4<i32>(wo() * xo() * 64 - wo() * i32(x.sum));
    let t_lo = vec4<i32>(r.lo) - xo() * n_lo + k0;
    let t_hi = vec4<i32>(r.hi) - xo() * n_hi + k0;
    return Sums(s.lo + (sw_lo * x.s) * vec4<f32>(t_lo), s.hi + (sw_hi * x.s) * vec4<f32>(t_hi));
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

fn store_group(s: Sums, n: u32, g: u32) {
    let o = 8u * g;
    store(s.lo.x, n, o); store(s.lo.y, n, o + 1u); store(s.lo.z, n, o + 2u); store(s.lo.w, n, o + 3u);
    store(s.hi.x, n, o + 4u); store(s.hi.y, n, o + 5u); store(s.hi.z, n, o + 6u); store(s.hi.w, n, o + 7u);
}

// One token. subgroupBroadcast takes a constant lane: the 8 lanes written out.
@compute @workgroup_size(WG)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let g0 = wid.x * WG; // a workgroup never straddles two layers
    let g = g0 + lane;
    let l = g0 * 8u / p.layer_rows;
    var s = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    let z = vec4<u32>(0u);
    for (var b = 0u; b < p.d_in / 64u; b++) {
        let x = quantize(0u, b, lane);
        let k = b * bt();
        var r = Block(z, z, z);
        r = lane_step(r, k, g, l, 0u, subgroupBroadcast(x.a, 0u), subgroupBroadcast(x.b, 0u));
        r = lane_step(r, k, g, l, 1u, subgroupBroadcast(x.a, 1u), subgroupBroadcast(x.b, 1u));
        r = lane_step(r, k, g, l, 2u, subgroupBroadcast(x.a, 2u), subgroupBroadcast(x.b, 2u));
        r = lane_step(r, k, g, l, 3u, subgroupBroadcast(x.a, 3u), subgroupBroadcast(x.b, 3u));
        r = lane_step(r, k, g, l, 4u, subgroupBroadcast(x.a, 4u), subgroupBroadcast(x.b, 4u));
        r = lane_step(r, k, g, l, 5u, subgroupBroadcast(x.a, 5u), subgroupBroadcast(x.b, 5u));
        r = lane_step(r, k, g, l, 6u, subgroupBroadcast(x.a, 6u), subgroupBroadcast(x.b, 6u));
        r = lane_step(r, k, g, l, 7u, subgroupBroadcast(x.a, 7u), subgroupBroadcast(x.b, 7u));
        s = fold(s, k, g, l, r, x);
    }
    store_group(s, 0u, g);
}

// QT tokens' block states.
struct Block4 {
    t0: Block,
    t1: Block,
    t2: Block,
    t3: Block,
}

// lane_step for 4 tokens, given lane la's codes of each (a<t>, b<t>). Each
// token's step reads the same texels and decodes the same codes: the
// compiler shares those among the four.
fn lane_step4(r: Block4, k: u32, g: u32, l: u32, la: u32, a0: vec4<u32>, a1: vec4<u32>, a2: vec4<u32>, a3: vec4<u32>,
              b0: vec4<u32>, b1: vec4<u32>, b2: vec4<u32>, b3: vec4<u32>) -> Block4 {
    return Block4(lane_step(r.t0, k, g, l, la, a0, b0), lane_step(r.t1, k, g, l, la, a1, b1),
                  lane_step(r.t2, k, g, l, la, a2, b2), lane_step(r.t3, k, g, l, la, a3, b3));
}

// QT tokens n .. n + QT - 1 (tokens past the end re-read the last one, never written).
@compute @workgroup_size(WG)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let g0 = wid.x * WG;
    let g = g0 + lane;
    let l = g0 * 8u / p.layer_rows;
    let n = wid.y * QT;
    let last = p.n_rows - 1u;
    var s0 = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    var s1 = s0; var s2 = s0; var s3 = s0;
    let z = vec4<u32>(0u);
    for (var b = 0u; b < p.d_in / 64u; b++) {
        let x0 = quantize(n, b, lane);
        let x1 = quantize(min(n + 1u, last), b, lane);
        let x2 = quantize(min(n + 2u, last), b, lane);
        let x3 = quantize(min(n + 3u, last), b, lane);
        let k = b * bt();
        var r = Block4(Block(z, z, z), Block(z, z, z), Block(z, z, z), Block(z, z, z));
        r = lane_step4(r, k, g, l, 0u, subgroupBroadcast(x0.a, 0u), subgroupBroadcast(x1.a, 0u), subgroupBroadcast(x2.a, 0u), subgroupBroadcast(x3.a, 0u),
                       subgroupBroadcast(x0.b, 0u), subgroupBroadcast(x1.b, 0u), subgroupBroadcast(x2.b, 0u), subgroupBroadcast(x3.b, 0u));
        r = lane_step4(r, k, g, l, 1u, subgroupBroadcast(x0.a, 1u), subgroupBroadcast(x1.a, 1u), subgroupBroadcast(x2.a, 1u), subgroupBroadcast(x3.a, 1u),
                       subgroupBroadcast(x0.b, 1u), subgroupBroadcast(x1.b, 1u), subgroupBroadcast(x2.b, 1u), subgroupBroadcast(x3.b, 1u));
        r = lane_step4(r, k, g, l, 2u, subgroupBroadcast(x0.a, 2u), subgroupBroadcast(x1.a, 2u), subgroupBroadcast(x2.a, 2u), subgroupBroadcast(x3.a, 2u),
                       subgroupBroadcast(x0.b, 2u), subgroupBroadcast(x1.b, 2u), subgroupBroadcast(x2.b, 2u), subgroupBroadcast(x3.b, 2u));
        r = lane_step4(r, k, g, l, 3u, subgroupBroadcast(x0.a, 3u), subgroupBroadcast(x1.a, 3u), subgroupBroadcast(x2.a, 3u), subgroupBroadcast(x3.a, 3u),
                       subgroupBroadcast(x0.b, 3u), subgroupBroadcast(x1.b, 3u), subgroupBroadcast(x2.b, 3u), subgroupBroadcast(x3.b, 3u));
        r = lane_step4(r, k, g, l, 4u, subgroupBroadcast(x0.a, 4u), subgroupBroadcast(x1.a, 4u), subgroupBroadcast(x2.a, 4u), subgroupBroadcast(x3.a, 4u),
                       subgroupBroadcast(x0.b, 4u), subgroupBroadcast(x1.b, 4u), subgroupBroadcast(x2.b, 4u), subgroupBroadcast(x3.b, 4u));
        r = lane_step4(r, k, g, l, 5u, subgroupBroadcast(x0.a, 5u), subgroupBroadcast(x1.a, 5u), subgroupBroadcast(x2.a, 5u), subgroupBroadcast(x3.a, 5u),
                       subgroupBroadcast(x0.b, 5u), subgroupBroadcast(x1.b, 5u), subgroupBroadcast(x2.b, 5u), subgroupBroadcast(x3.b, 5u));
        r = lane_step4(r, k, g, l, 6u, subgroupBroadcast(x0.a, 6u), subgroupBroadcast(x1.a, 6u), subgroupBroadcast(x2.a, 6u), subgroupBroadcast(x3.a, 6u),
                       subgroupBroadcast(x0.b, 6u), subgroupBroadcast(x1.b, 6u), subgroupBroadcast(x2.b, 6u), subgroupBroadcast(x3.b, 6u));
        r = lane_step4(r, k, g, l, 7u, subgroupBroadcast(x0.a, 7u), subgroupBroadcast(x1.a, 7u), subgroupBroadcast(x2.a, 7u), subgroupBroadcast(x3.a, 7u),
                       subgroupBroadcast(x0.b, 7u), subgroupBroadcast(x1.b, 7u), subgroupBroadcast(x2.b, 7u), subgroupBroadcast(x3.b, 7u));
        s0 = fold(s0, k, g, l, r.t0, x0);
        s1 = fold(s1, k, g, l, r.t1, x1);
        s2 = fold(s2, k, g, l, r.t2, x2);
        s3 = fold(s3, k, g, l, r.t3, x3);
    }
    store_group(s0, n, g);
    store_group(s1, n + 1u, g);
    store_group(s2, n + 2u, g);
    store_group(s3, n + 3u, g);
}
