// Y[n, row0 + o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T), W block-quantized
// The buffer-store kernel for block-quantized weights (`quant.rs`: each row
// holds its codes, then one f16 scale per block of QB weights, padded to 16
// bytes; a weight is code * scale). For GPUs: one workgroup of GS
// invocations per ROWS rows and TN tokens; the lanes walk a row's code words
// side by side (adjacent lanes, adjacent words), each word's codes widened to
// f32 and times x summed in f32, then times its block's scale; the lanes'
// partial sums are combined with group_sum. A (row, token) sum does not
// depend on the other tokens of the dispatch. Needs d_in % QB == 0 and
// x_offset % 4 == 0.

struct Params {
    n_rows: u32,     // tokens
    d_in: u32,
    d_out: u32,      // row stride of Y
    row0: u32,       // first output column this part writes
    part_rows: u32,  // rows of W in this part
    x_offset: u32,   // elements, a multiple of 4
    y_offset: u32,   // elements
    act: u32,
    accumulate: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

// Code format: 0 = int8 (4 codes per word), 1 = Q4 (8 per word).
override QF: u32 = 0u;
// Weights per block (one scale each): 32 or 64.
override QB: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;       // [part_rows, code_words() + scale_words()]
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>; // [n_rows, d_in / 4] at x_offset / 4
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // [n_rows, d_out] at y_offset

// Tokens per workgroup: 1 (decode) or 4.
override TN: u32 = 4u;

const ROWS: u32 = 4u;

fn per_word() -> u32 {
    return select(4u, 8u, QF == 1u);
}

fn code_words() -> u32 {
    return p.d_in / per_word();
}

// Scale words per row: 2 bytes per block, padded to 16 bytes.
fn scale_words() -> u32 {
    return (2u * (p.d_in / QB) + 15u) / 16u * 4u;
}

// Code word j of a row times x row `xr` (vec4 index), codes centred.
fn word_dot(q: u32, j: u32, xr: u32) -> f32 {
    if (QF == 0u) {
        return fdot(i8x4(q), x[xr + j], 0.0);
    }
    return fdot(u4hi(q) - 8.0, x[xr + 2u * j + 1u], fdot(u4lo(q) - 8.0, x[xr + 2u * j], 0.0));
}

fn finish(v: f32, n: u32, o: u32) {
    var r = apply_act(v, p.act);
    let yi = p.y_offset + n * p.d_out + p.row0 + o;
    if (p.accumulate == 1u) {
        r = r + y[yi];
    }
    y[yi] = r;
}

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n0 = wid.y * TN;
    if (n0 >= p.n_rows) {
        return; // the whole workgroup leaves together
    }
    let last = p.n_rows - 1u;
    let row4 = p.d_in / 4u;
    let xo = p.x_offset / 4u;
    let r0 = xo + n0 * row4;
    let r1 = xo + min(n0 + 1u, last) * row4;
    let r2 = xo + min(n0 + 2u, last) * row4;
    let r3 = xo + min(n0 + 3u, last) * row4;
    let cw = code_words();
    let stride = cw + scale_words();
    for (var r = 0u; r < ROWS; r++) {
        let o = wid.x * ROWS + r;
        let base = min(o, p.part_rows - 1u) * stride; // rows past the part are computed, never written
        var a0 = 0.0; var a1 = 0.0; var a2 = 0.0; var a3 = 0.0;
        for (var j = lid; j < cw; j += GS) {
            let q = w[base + j];
            let blk = j * per_word() / QB;
            let h = unpack2x16float(w[base + cw + blk / 2u]);
            let s = select(h.x, h.y, (blk & 1u) == 1u);
            a0 = fma(s, word_dot(q, j, r0), a0);
            if (TN > 1u) {
                a1 = fma(s, word_dot(q, j, r1), a1);
                a2 = fma(s, word_dot(q, j, r2), a2);
                a3 = fma(s, word_dot(q, j, r3), a3);
            }
        }
        let s0 = group_sum(a0, lid);
        let s1 = group_sum(a1, lid);
        let s2 = group_sum(a2, lid);
        let s3 = group_sum(a3, lid);
        if (lid == 0u && o < p.part_rows) {
            finish(s0, n0, o);
            if (TN > 1u) {
                if (n0 + 1u < p.n_rows) { finish(s1, n0 + 1u, o); }
                if (n0 + 2u < p.n_rows) { finish(s2, n0 + 2u, o); }
                if (n0 + 3u < p.n_rows) { finish(s3, n0 + 3u, o); }
            }
        }
    }
}
