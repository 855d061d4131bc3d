// Y[n, o] (= or +=) act( sum_i X[n, i] * W[o, i] )   (x @ W.T)
// The product of linear.wgsl with the weights and x read from textures, for
// adapters where a texel fetch is much cheaper than a storage-buffer load
// (llvmpipe: one vector gather instead of a per-lane loop; see
// `gpu::WeightStore`). One workgroup of WG invocations (= one subgroup):
// `decode` covers 16 rows of one token, `prefill` 8 rows of 4 tokens. The
// lanes walk a row's texels; each x texel is loaded once per tile and used
// for every row, each weight texel once and used for every token. Rows and
// tokens are written out explicitly (not as loops over arrays): llvmpipe
// keeps explicit accumulators in registers and array ones in memory.
// Needs d_in % 64 == 0 (whole texels of x rows, and copy rows of 256 bytes).

struct Params {
    n_rows: u32,      // tokens
    d_in: u32,        // weights per row
    d_out: u32,       // rows of W; row stride of y
    layer_rows: u32,  // rows per texture layer, a multiple of 16
    y_offset: u32,
    act: u32,
    accumulate: u32,
    _p0: u32,
}

override WG: u32 = 8u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var w: texture_2d_array<u32>;           // [layers, layer_rows, d_in / 8] 16-bit (8 per texel) or [.., d_in / 4] f32
@group(0) @binding(2) var xt: texture_2d<f32>;                // [>= n_rows, >= d_in / 4] f32, row n = token n
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // [n_rows, d_out] at y_offset

// Texels per weight row and x texels per weight texel.
fn texels() -> u32 {
    return select(p.d_in / 8u, p.d_in / 4u, WDTYPE == 0u);
}

// The x texels that meet weight texel k of token n: a (and b for 16-bit).
fn xa(k: u32, n: u32) -> vec4<f32> {
    return textureLoad(xt, vec2<u32>(select(2u * k, k, WDTYPE == 0u), n), 0);
}

fn xb(k: u32, n: u32) -> vec4<f32> {
    if (WDTYPE == 0u) {
        return vec4<f32>(0.0);
    }
    return textureLoad(xt, vec2<u32>(2u * k + 1u, n), 0);
}

// Weight texel k of tile row r (row index clamped to the matrix; the
// clamped rows are computed but never written).
fn wt(k: u32, o: u32, layer: u32) -> vec4<u32> {
    let row = min(o, p.d_out - 1u) - layer * p.layer_rows;
    return textureLoad(w, vec2<u32>(k, row), layer, 0);
}

// The weights of texel q times x texels a, b.
fn wdot(q: vec4<u32>, a: vec4<f32>, b: vec4<f32>) -> f32 {
    if (WDTYPE == 0u) {
        return dot(bitcast<vec4<f32>>(q), a);
    }
    return dot(unpack_lo4(q), a) + dot(unpack_hi4(q), b);
}

// Reduces a lane's partial sum over the subgroup; lane 0 stores it.
fn put(partial: f32, lid: u32, n: u32, o: u32) {
    let s = subgroupAdd(partial);
    if (lid == 0u && n < p.n_rows && o < p.d_out) {
        var r = apply_act(s, p.act);
        let yi = p.y_offset + n * p.d_out + o;
        if (p.accumulate == 1u) {
            r = r + y[yi];
        }
        y[yi] = r;
    }
}

@compute @workgroup_size(WG)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wid.x * 16u;
    let l = o / p.layer_rows; // a tile never straddles two layers
    var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
    var s4 = 0.0; var s5 = 0.0; var s6 = 0.0; var s7 = 0.0;
    var s8 = 0.0; var s9 = 0.0; var s10 = 0.0; var s11 = 0.0;
    var s12 = 0.0; var s13 = 0.0; var s14 = 0.0; var s15 = 0.0;
    let nk = texels();
    for (var k = lid; k < nk; k += WG) {
        let a = xa(k, 0u);
        let b = xb(k, 0u);
        s0 += wdot(wt(k, o, l), a, b);
        s1 += wdot(wt(k, o + 1u, l), a, b);
        s2 += wdot(wt(k, o + 2u, l), a, b);
        s3 += wdot(wt(k, o + 3u, l), a, b);
        s4 += wdot(wt(k, o + 4u, l), a, b);
        s5 += wdot(wt(k, o + 5u, l), a, b);
        s6 += wdot(wt(k, o + 6u, l), a, b);
        s7 += wdot(wt(k, o + 7u, l), a, b);
        s8 += wdot(wt(k, o + 8u, l), a, b);
        s9 += wdot(wt(k, o + 9u, l), a, b);
        s10 += wdot(wt(k, o + 10u, l), a, b);
        s11 += wdot(wt(k, o + 11u, l), a, b);
        s12 += wdot(wt(k, o + 12u, l), a, b);
        s13 += wdot(wt(k, o + 13u, l), a, b);
        s14 += wdot(wt(k, o + 14u, l), a, b);
        s15 += wdot(wt(k, o + 15u, l), a, b);
    }
    put(s0, lid, 0u, o); put(s1, lid, 0u, o + 1u); put(s2, lid, 0u, o + 2u); put(s3, lid, 0u, o + 3u);
    put(s4, lid, 0u, o + 4u); put(s5, lid, 0u, o + 5u); put(s6, lid, 0u, o + 6u); put(s7, lid, 0u, o + 7u);
    put(s8, lid, 0u, o + 8u); put(s9, lid, 0u, o + 9u); put(s10, lid, 0u, o + 10u); put(s11, lid, 0u, o + 11u);
    put(s12, lid, 0u, o + 12u); put(s13, lid, 0u, o + 13u); put(s14, lid, 0u, o + 14u); put(s15, lid, 0u, o + 15u);
}

// One weight texel against the x texels of four tokens: the four dot products.
fn wdot4(q: vec4<u32>, a0: vec4<f32>, b0: vec4<f32>, a1: vec4<f32>, b1: vec4<f32>,
         a2: vec4<f32>, b2: vec4<f32>, a3: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    if (WDTYPE == 0u) {
        let f = bitcast<vec4<f32>>(q);
        return vec4<f32>(dot(f, a0), dot(f, a1), dot(f, a2), dot(f, a3));
    }
    let lo = unpack_lo4(q);
    let hi = unpack_hi4(q);
    return vec4<f32>(dot(lo, a0) + dot(hi, b0), dot(lo, a1) + dot(hi, b1),
                     dot(lo, a2) + dot(hi, b2), dot(lo, a3) + dot(hi, b3));
}

fn put4(partial: vec4<f32>, lid: u32, n: u32, o: u32) {
    put(partial.x, lid, n, o);
    put(partial.y, lid, n + 1u, o);
    put(partial.z, lid, n + 2u, o);
    put(partial.w, lid, n + 3u, o);
}

@compute @workgroup_size(WG)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wid.x * 8u;
    let n = wid.y * 4u;
    let l = o / p.layer_rows;
    let last = p.n_rows - 1u; // tokens past the end re-read the last one, never written
    let n1 = min(n + 1u, last);
    let n2 = min(n + 2u, last);
    let n3 = min(n + 3u, last);
    // s_r holds row o + r for the four tokens n .. n + 3.
    var s0 = vec4<f32>(0.0); var s1 = vec4<f32>(0.0); var s2 = vec4<f32>(0.0); var s3 = vec4<f32>(0.0);
    var s4 = vec4<f32>(0.0); var s5 = vec4<f32>(0.0); var s6 = vec4<f32>(0.0); var s7 = vec4<f32>(0.0);
    let nk = texels();
    for (var k = lid; k < nk; k += WG) {
        let a0 = xa(k, n); let b0 = xb(k, n);
        let a1 = xa(k, n1); let b1 = xb(k, n1);
        let a2 = xa(k, n2); let b2 = xb(k, n2);
        let a3 = xa(k, n3); let b3 = xb(k, n3);
        s0 += wdot4(wt(k, o, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s1 += wdot4(wt(k, o + 1u, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s2 += wdot4(wt(k, o + 2u, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s3 += wdot4(wt(k, o + 3u, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s4 += wdot4(wt(k, o + 4u, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s5 += wdot4(wt(k, o + 5u, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s6 += wdot4(wt(k, o + 6u, l), a0, b0, a1, b1, a2, b2, a3, b3);
        s7 += wdot4(wt(k, o + 7u, l), a0, b0, a1, b1, a2, b2, a3, b3);
    }
    put4(s0, lid, n, o); put4(s1, lid, n, o + 1u); put4(s2, lid, n, o + 2u); put4(s3, lid, n, o + 3u);
    put4(s4, lid, n, o + 4u); put4(s5, lid, n, o + 5u); put4(s6, lid, n, o + 6u); put4(s7, lid, n, o + 7u);
}
