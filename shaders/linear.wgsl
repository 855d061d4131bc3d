// Y[n, row0 + o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T)
// W is one row-range part of a [d_out, d_in] matrix: rows row0 .. row0+part_rows.
// One invocation: one output row o, TN consecutive tokens (the weight row is
// read once for all of them, which is what makes prefill a matrix-matrix product).

struct Params {
    n_rows: u32,     // tokens
    d_in: u32,
    d_out: u32,      // row stride of Y
    row0: u32,       // first output column this part writes
    part_rows: u32,  // rows of W in this part
    x_offset: u32,   // elements
    y_offset: u32,   // elements
    act: u32,        // 0 none, 1 tanh, 2 sigmoid, 3 relu^2
    accumulate: u32, // 1: Y += result
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;       // [part_rows, d_in] in WDTYPE
@group(0) @binding(2) var<storage, read> x: array<f32>;       // [n_rows, d_in] at x_offset
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // [n_rows, d_out] at y_offset

const TN: u32 = 4u;

fn weight(idx: u32) -> f32 {
    if (WDTYPE == 0u) {
        return bitcast<f32>(w[idx]);
    }
    return unpack_weight(w[idx >> 1u], (idx & 1u) == 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x;
    let n0 = gid.y * TN;
    if (o >= p.part_rows || n0 >= p.n_rows) {
        return;
    }
    // The TN = 4 token rows, unrolled by hand so that the d_in loop is the
    // only loop whatever the compiler unrolls: llvmpipe silently ends a loop
    // nest after 65535 iterations in all.
    let last = p.n_rows - 1u;
    let r0 = p.x_offset + n0 * p.d_in;
    let r1 = p.x_offset + min(n0 + 1u, last) * p.d_in;
    let r2 = p.x_offset + min(n0 + 2u, last) * p.d_in;
    let r3 = p.x_offset + min(n0 + 3u, last) * p.d_in;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    let wbase = o * p.d_in;
    for (var i = 0u; i < p.d_in; i++) {
        let wv = weight(wbase + i);
        acc[0] += wv * x[r0 + i];
        acc[1] += wv * x[r1 + i];
        acc[2] += wv * x[r2 + i];
        acc[3] += wv * x[r3 + i];
    }
    for (var t = 0u; t < TN; t++) {
        let n = n0 + t;
        if (n >= p.n_rows) {
            break;
        }
        var v = apply_act(acc[t], p.act);
        let yi = p.y_offset + n * p.d_out + p.row0 + o;
        if (p.accumulate == 1u) {
            v = v + y[yi];
        }
        y[yi] = v;
    }
}
