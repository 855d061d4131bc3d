// Y[n, o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T), W block-quantized
// linear_tex.wgsl for block-quantized weights (`quant.rs`): each row of W holds
// its codes, then one f16 scale per block of QB weights; a weight is
// code * scale. Codes are decoded to f32 in the kernel and every sum is f32:
// per row and token, the codes of one block times x are summed (d), then
// s += scale * (d - OFFSET xsum) (the codes read as c + OFFSET; see lo_codes).
// `decode` (1 token, 8 rows per lane) and `prefill` (8 tokens, 8 rows per
// lane) run every (row, token) sum in the same order, so a token's logits do
// not depend on the batch or kernel it ran in. Lanes own rows, as in
// linear_tex.wgsl, and rows and tokens are written out explicitly (llvmpipe
// keeps explicit accumulators in registers).
// Needs d_in % 64 == 0 and d_in % QB == 0.

struct Params {
    n_rows: u32,      // tokens
    d_in: u32,        // weights per row
    d_out: u32,       // rows of W; row stride of y
    layer_rows: u32,  // rows per texture layer, a multiple of 8 WG
    y_offset: u32,
    act: u32,
    accumulate: u32,
    _p0: u32,
}

override WG: u32 = 8u;
// Where x comes from: 1 = a uniform-buffer window of the x buffer, 0 = the x texture.
override XU: u32 = 0u;
// Code format: 0 = int8 (4 codes per word, 16 per texel), 1 = Q4 (8 per word, 32 per texel).
override QF: u32 = 0u;
// Weights per block (one scale each): 32 or 64.
override QB: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var w: texture_storage_2d_array<rgba32uint, read>; // [layers, layer_rows, d_in / per_texel() code texels + ceil(d_in / QB / 8) scale texels]
@group(0) @binding(2) var xt: texture_storage_2d<rgba32float, read>;     // XU == 0: [>= n_rows, >= d_in / 4] f32, row n = token n
@group(0) @binding(3) var<uniform> xu: array<vec4<f32>, 4096>;          // XU == 1: [n_rows, d_in / 4] (a 64 KiB window of the x buffer)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;           // [n_rows, d_out] at y_offset

// Codes per texel, code texels per block and per row.
fn per_texel() -> u32 {
    return select(16u, 32u, QF == 1u);
}

fn block_texels() -> u32 {
    return QB / per_texel();
}

fn code_texels() -> u32 {
    return p.d_in / per_texel();
}

// The 4 x values at x texel i of token n.
fn xv(i: u32, n: u32) -> vec4<f32> {
    if (XU == 1u) {
        return xu[n * (p.d_in / 4u) + i];
    }
    return textureLoad(xt, vec2<u32>(i, n));
}

// Texel k of row o (clamped to the matrix; clamped rows are never written).
fn wt(k: u32, o: u32, layer: u32) -> vec4<u32> {
    let row = min(o, p.d_out - 1u) - layer * p.layer_rows;
    return textureLoad(w, vec2<u32>(k, row), layer);
}

// Scale i (0..7) of a scale texel.
fn scale(g: vec4<u32>, i: u32) -> f32 {
    let word = select(select(g.x, g.y, i >= 2u), select(g.z, g.w, i >= 6u), i >= 4u);
    let h = unpack2x16float(word);
    return select(h.x, h.y, (i & 1u) == 1u);
}

// The codes of word q as exact f32 without shifting them down: each code
// plus OFFSET (int8: c + 128 by flipping its sign bit; Q4: stored as c + 8)
// is masked in place, so code k reads as (c + OFFSET) * 2^(8k) (int8) or
// 2^(4k) (Q4), and the x it meets is pre-scaled by 2^-(8k) or 2^-(4k)
// (exact: powers of two). That is a mask and a conversion per weight where
// shifting down and sign-extending took two or three operations more, and
// the products are the same floats as c * x. The highest code is shifted
// down instead (a u32 beyond 2^31 does not convert as a signed integer).
// lo: int8 codes 0..3 and Q4 codes 0..3; hi: Q4 codes 4..7.
fn lo_codes(q: u32) -> vec4<f32> {
    if (QF == 0u) {
        let u = q ^ 0x80808080u;
        return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(u & 0xffu, u & 0xff00u, u & 0xff0000u, u >> 24u)));
    }
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(q & 0xfu, q & 0xf0u, q & 0xf00u, q & 0xf000u)));
}

fn hi_codes(q: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(q & 0xf0000u, q & 0xf00000u, q & 0xf000000u, q >> 28u)));
}

// The code offset subtracted once per block: sum (c + OFFSET) x - OFFSET sum x.
fn offset() -> f32 {
    return select(128.0, 8.0, QF == 1u);
}

// An x texel pre-scaled for the codes it meets: int8, and Q4's even texels,
// meet `lo_codes`; Q4's odd texels `hi_codes`.
fn prescale(x: vec4<f32>, odd: bool) -> vec4<f32> {
    if (QF == 0u) {
        return x * vec4<f32>(1.0, 0.00390625, 1.52587890625e-05, 1.0);
    }
    if (odd) {
        return x * vec4<f32>(1.52587890625e-05, 9.5367431640625e-07, 5.9604644775390625e-08, 1.0);
    }
    return x * vec4<f32>(1.0, 0.0625, 0.00390625, 0.000244140625);
}

// acc + the codes of word q times pre-scaled x: int8 a (4 values), Q4 a then b (8).
fn wdot(q: u32, a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    if (QF == 0u) {
        return fdot(lo_codes(q), a, acc);
    }
    return fdot(hi_codes(q), b, fdot(lo_codes(q), a, acc));
}

// acc + the 4 x values of a texel (the offset's sum of x, in x order).
fn xsum1(a: vec4<f32>, acc: f32) -> f32 {
    return acc + a.x + a.y + a.z + a.w;
}

// A row's sum after one block: s + scale * (d - OFFSET xs).
fn block_end(s: f32, g: vec4<u32>, i: u32, d: f32, xs: f32) -> f32 {
    return fma(scale(g, i), fma(-offset(), xs, d), s);
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

// x texel of word c (0..3) of code texel k: the first (a) and, for Q4, the
// second (b) of its two.
fn xa_index(k: u32, c: u32) -> u32 {
    return select(4u * k + c, 8u * k + 2u * c, QF == 1u);
}

// acc + one code texel of a row against x words x0..x7 (int8: x0..x3).
fn tdot(q: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
        x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>, acc: f32) -> f32 {
    if (QF == 0u) {
        return wdot(q.w, x3, x3, wdot(q.z, x2, x2, wdot(q.y, x1, x1, wdot(q.x, x0, x0, acc))));
    }
    return wdot(q.w, x6, x7, wdot(q.z, x4, x5, wdot(q.y, x2, x3, wdot(q.x, x0, x1, acc))));
}

// One token: each lane owns 8 rows (o, o + WG, .., o + 7 WG). For each group
// of 8 blocks the lane reads its rows' scale texels, then per block sums the
// codes times x (d<r>) and folds them in with the scale.
@compute @workgroup_size(WG)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o0 = wid.x * 8u * WG; // a tile never straddles two layers
    let o = o0 + lid;
    let l = o0 / p.layer_rows;
    var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
    var s4 = 0.0; var s5 = 0.0; var s6 = 0.0; var s7 = 0.0;
    let ct = code_texels();
    let tb = block_texels();
    let nb = p.d_in / QB;
    for (var j = 0u; j < nb; j += 8u) {
        let sk = ct + j / 8u;
        let g0 = wt(sk, o, l); let g1 = wt(sk, o + WG, l); let g2 = wt(sk, o + 2u * WG, l); let g3 = wt(sk, o + 3u * WG, l);
        let g4 = wt(sk, o + 4u * WG, l); let g5 = wt(sk, o + 5u * WG, l); let g6 = wt(sk, o + 6u * WG, l); let g7 = wt(sk, o + 7u * WG, l);
        let jend = min(j + 8u, nb);
        for (var b = j; b < jend; b++) {
            var d0 = 0.0; var d1 = 0.0; var d2 = 0.0; var d3 = 0.0;
            var d4 = 0.0; var d5 = 0.0; var d6 = 0.0; var d7 = 0.0;
            var xs = 0.0;
            for (var t = 0u; t < tb; t++) {
                let k = b * tb + t;
                let xb = k * (per_texel() / 4u); // the code texel's first x texel
                var x0 = xv(xb, 0u); var x1 = xv(xb + 1u, 0u); var x2 = xv(xb + 2u, 0u); var x3 = xv(xb + 3u, 0u);
                var x4 = vec4<f32>(0.0); var x5 = vec4<f32>(0.0); var x6 = vec4<f32>(0.0); var x7 = vec4<f32>(0.0);
                xs = xsum1(x3, xsum1(x2, xsum1(x1, xsum1(x0, xs))));
                if (QF == 1u) {
                    x4 = xv(xb + 4u, 0u); x5 = xv(xb + 5u, 0u); x6 = xv(xb + 6u, 0u); x7 = xv(xb + 7u, 0u);
                    xs = xsum1(x7, xsum1(x6, xsum1(x5, xsum1(x4, xs))));
                }
                x0 = prescale(x0, false); x1 = prescale(x1, true); x2 = prescale(x2, false); x3 = prescale(x3, true);
                x4 = prescale(x4, false); x5 = prescale(x5, true); x6 = prescale(x6, false); x7 = prescale(x7, true);
                d0 = tdot(wt(k, o, l), x0, x1, x2, x3, x4, x5, x6, x7, d0);
                d1 = tdot(wt(k, o + WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d1);
                d2 = tdot(wt(k, o + 2u * WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d2);
                d3 = tdot(wt(k, o + 3u * WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d3);
                d4 = tdot(wt(k, o + 4u * WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d4);
                d5 = tdot(wt(k, o + 5u * WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d5);
                d6 = tdot(wt(k, o + 6u * WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d6);
                d7 = tdot(wt(k, o + 7u * WG, l), x0, x1, x2, x3, x4, x5, x6, x7, d7);
            }
            let i = b - j;
            s0 = block_end(s0, g0, i, d0, xs); s1 = block_end(s1, g1, i, d1, xs);
            s2 = block_end(s2, g2, i, d2, xs); s3 = block_end(s3, g3, i, d3, xs);
            s4 = block_end(s4, g4, i, d4, xs); s5 = block_end(s5, g5, i, d5, xs);
            s6 = block_end(s6, g6, i, d6, xs); s7 = block_end(s7, g7, i, d7, xs);
        }
    }
    store(s0, 0u, o); store(s1, 0u, o + WG); store(s2, 0u, o + 2u * WG); store(s3, 0u, o + 3u * WG);
    store(s4, 0u, o + 4u * WG); store(s5, 0u, o + 5u * WG); store(s6, 0u, o + 6u * WG); store(s7, 0u, o + 7u * WG);
}

// acc + word q of a row against the x words of four tokens (acc.x: token 0, ..).
fn wdot4(q: u32, a0: vec4<f32>, b0: vec4<f32>, a1: vec4<f32>, b1: vec4<f32>,
         a2: vec4<f32>, b2: vec4<f32>, a3: vec4<f32>, b3: vec4<f32>, acc: vec4<f32>) -> vec4<f32> {
    let lo = lo_codes(q);
    if (QF == 0u) {
        return vec4<f32>(fdot(lo, a0, acc.x), fdot(lo, a1, acc.y), fdot(lo, a2, acc.z), fdot(lo, a3, acc.w));
    }
    let hi = hi_codes(q);
    return vec4<f32>(fdot(hi, b0, fdot(lo, a0, acc.x)), fdot(hi, b1, fdot(lo, a1, acc.y)),
                     fdot(hi, b2, fdot(lo, a2, acc.z)), fdot(hi, b3, fdot(lo, a3, acc.w)));
}

fn block_end4(s: vec4<f32>, g: vec4<u32>, i: u32, d: vec4<f32>, xs: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(block_end(s.x, g, i, d.x, xs.x), block_end(s.y, g, i, d.y, xs.y),
                     block_end(s.z, g, i, d.z, xs.z), block_end(s.w, g, i, d.w, xs.w));
}

fn store4(v: vec4<f32>, n: u32, o: u32) {
    store(v.x, n, o);
    store(v.y, n + 1u, o);
    store(v.z, n + 2u, o);
    store(v.w, n + 3u, o);
}

// Word c of a texel.
fn word(q: vec4<u32>, c: u32) -> u32 {
    return select(select(q.x, q.y, c == 1u), select(q.z, q.w, c == 3u), c >= 2u);
}

// Eight tokens: each lane owns 8 rows (o, o + WG, .., o + 7 WG) for tokens
// n .. n + 7. Lane l (of 0..7; needs WG >= 8) fetches token n + l's x words
// and the others get them by subgroupBroadcast; each decoded word serves 8
// tokens. The sums run word by word in the order of `decode`.
@compute @workgroup_size(WG)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) sl: u32) {
    let o0 = wid.x * 8u * WG;
    let o = o0 + lid;
    let n = wid.y * 8u;
    let l = o0 / p.layer_rows;
    let last = p.n_rows - 1u; // tokens past the end re-read the last one, never written
    let nl = min(n + sl % 8u, last);
    // s<r>a: row o + r WG for tokens n .. n + 3; s<r>b: tokens n + 4 .. n + 7.
    var s0a = vec4<f32>(0.0); var s1a = vec4<f32>(0.0); var s2a = vec4<f32>(0.0); var s3a = vec4<f32>(0.0);
    var s4a = vec4<f32>(0.0); var s5a = vec4<f32>(0.0); var s6a = vec4<f32>(0.0); var s7a = vec4<f32>(0.0);
    var s0b = vec4<f32>(0.0); var s1b = vec4<f32>(0.0); var s2b = vec4<f32>(0.0); var s3b = vec4<f32>(0.0);
    var s4b = vec4<f32>(0.0); var s5b = vec4<f32>(0.0); var s6b = vec4<f32>(0.0); var s7b = vec4<f32>(0.0);
    let ct = code_texels();
    let tb = block_texels();
    let nb = p.d_in / QB;
    for (var j = 0u; j < nb; j += 8u) {
        let sk = ct + j / 8u;
        let g0 = wt(sk, o, l); let g1 = wt(sk, o + WG, l); let g2 = wt(sk, o + 2u * WG, l); let g3 = wt(sk, o + 3u * WG, l);
        let g4 = wt(sk, o + 4u * WG, l); let g5 = wt(sk, o + 5u * WG, l); let g6 = wt(sk, o + 6u * WG, l); let g7 = wt(sk, o + 7u * WG, l);
        let jend = min(j + 8u, nb);
        for (var b = j; b < jend; b++) {
            var d0a = vec4<f32>(0.0); var d1a = vec4<f32>(0.0); var d2a = vec4<f32>(0.0); var d3a = vec4<f32>(0.0);
            var d4a = vec4<f32>(0.0); var d5a = vec4<f32>(0.0); var d6a = vec4<f32>(0.0); var d7a = vec4<f32>(0.0);
            var d0b = vec4<f32>(0.0); var d1b = vec4<f32>(0.0); var d2b = vec4<f32>(0.0); var d3b = vec4<f32>(0.0);
            var d4b = vec4<f32>(0.0); var d5b = vec4<f32>(0.0); var d6b = vec4<f32>(0.0); var d7b = vec4<f32>(0.0);
            var xs = 0.0; // this lane's token's sum of x over the block
            for (var t = 0u; t < tb; t++) {
                let k = b * tb + t;
                let q0 = wt(k, o, l); let q1 = wt(k, o + WG, l); let q2 = wt(k, o + 2u * WG, l); let q3 = wt(k, o + 3u * WG, l);
                let q4 = wt(k, o + 4u * WG, l); let q5 = wt(k, o + 5u * WG, l); let q6 = wt(k, o + 6u * WG, l); let q7 = wt(k, o + 7u * WG, l);
                for (var c = 0u; c < 4u; c++) {
                    let xi = xa_index(k, c);
                    var al = xv(xi, nl);
                    var bl = vec4<f32>(0.0);
                    xs = xsum1(al, xs);
                    if (QF == 1u) {
                        bl = xv(xi + 1u, nl);
                        xs = xsum1(bl, xs);
                    }
                    al = prescale(al, false);
                    bl = prescale(bl, true);
                    let a0 = subgroupBroadcast(al, 0u); let b0 = subgroupBroadcast(bl, 0u);
                    let a1 = subgroupBroadcast(al, 1u); let b1 = subgroupBroadcast(bl, 1u);
                    let a2 = subgroupBroadcast(al, 2u); let b2 = subgroupBroadcast(bl, 2u);
                    let a3 = subgroupBroadcast(al, 3u); let b3 = subgroupBroadcast(bl, 3u);
                    let a4 = subgroupBroadcast(al, 4u); let b4 = subgroupBroadcast(bl, 4u);
                    let a5 = subgroupBroadcast(al, 5u); let b5 = subgroupBroadcast(bl, 5u);
                    let a6 = subgroupBroadcast(al, 6u); let b6 = subgroupBroadcast(bl, 6u);
                    let a7 = subgroupBroadcast(al, 7u); let b7 = subgroupBroadcast(bl, 7u);
                    let w0 = word(q0, c);
                    d0a = wdot4(w0, a0, b0, a1, b1, a2, b2, a3, b3, d0a); d0b = wdot4(w0, a4, b4, a5, b5, a6, b6, a7, b7, d0b);
                    let w1 = word(q1, c);
                    d1a = wdot4(w1, a0, b0, a1, b1, a2, b2, a3, b3, d1a); d1b = wdot4(w1, a4, b4, a5, b5, a6, b6, a7, b7, d1b);
                    let w2 = word(q2, c);
                    d2a = wdot4(w2, a0, b0, a1, b1, a2, b2, a3, b3, d2a); d2b = wdot4(w2, a4, b4, a5, b5, a6, b6, a7, b7, d2b);
                    let w3 = word(q3, c);
                    d3a = wdot4(w3, a0, b0, a1, b1, a2, b2, a3, b3, d3a); d3b = wdot4(w3, a4, b4, a5, b5, a6, b6, a7, b7, d3b);
                    let w4 = word(q4, c);
                    d4a = wdot4(w4, a0, b0, a1, b1, a2, b2, a3, b3, d4a); d4b = wdot4(w4, a4, b4, a5, b5, a6, b6, a7, b7, d4b);
                    let w5 = word(q5, c);
                    d5a = wdot4(w5, a0, b0, a1, b1, a2, b2, a3, b3, d5a); d5b = wdot4(w5, a4, b4, a5, b5, a6, b6, a7, b7, d5b);
                    let w6 = word(q6, c);
                    d6a = wdot4(w6, a0, b0, a1, b1, a2, b2, a3, b3, d6a); d6b = wdot4(w6, a4, b4, a5, b5, a6, b6, a7, b7, d6b);
                    let w7 = word(q7, c);
                    d7a = wdot4(w7, a0, b0, a1, b1, a2, b2, a3, b3, d7a); d7b = wdot4(w7, a4, b4, a5, b5, a6, b6, a7, b7, d7b);
                }
            }
            let xsa = vec4<f32>(subgroupBroadcast(xs, 0u), subgroupBroadcast(xs, 1u),
                                subgroupBroadcast(xs, 2u), subgroupBroadcast(xs, 3u));
            let xsb = vec4<f32>(subgroupBroadcast(xs, 4u), subgroupBroadcast(xs, 5u),
                                subgroupBroadcast(xs, 6u), subgroupBroadcast(xs, 7u));
            let i = b - j;
            s0a = block_end4(s0a, g0, i, d0a, xsa); s0b = block_end4(s0b, g0, i, d0b, xsb);
            s1a = block_end4(s1a, g1, i, d1a, xsa); s1b = block_end4(s1b, g1, i, d1b, xsb);
            s2a = block_end4(s2a, g2, i, d2a, xsa); s2b = block_end4(s2b, g2, i, d2b, xsb);
            s3a = block_end4(s3a, g3, i, d3a, xsa); s3b = block_end4(s3b, g3, i, d3b, xsb);
            s4a = block_end4(s4a, g4, i, d4a, xsa); s4b = block_end4(s4b, g4, i, d4b, xsb);
            s5a = block_end4(s5a, g5, i, d5a, xsa); s5b = block_end4(s5b, g5, i, d5b, xsb);
            s6a = block_end4(s6a, g6, i, d6a, xsa); s6b = block_end4(s6b, g6, i, d6b, xsb);
            s7a = block_end4(s7a, g7, i, d7a, xsa); s7b = block_end4(s7b, g7, i, d7b, xsb);
        }
    }
    store4(s0a, n, o); store4(s1a, n, o + WG); store4(s2a, n, o + 2u * WG); store4(s3a, n, o + 3u * WG);
    store4(s4a, n, o + 4u * WG); store4(s5a, n, o + 5u * WG); store4(s6a, n, o + 6u * WG); store4(s7a, n, o + 7u * WG);
    store4(s0b, n + 4u, o); store4(s1b, n + 4u, o + WG); store4(s2b, n + 4u, o + 2u * WG); store4(s3b, n + 4u, o + 3u * WG);
    store4(s4b, n + 4u, o + 4u * WG); store4(s5b, n + 4u, o + 5u * WG); store4(s6b, n + 4u, o + 6u * WG); store4(s7b, n + 4u, o + 7u * WG);
}
