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

// Sum of `v` over a 64-invocation workgroup; every invocation gets the result.
// Call from uniform control flow only.
var<workgroup> red_buf: array<f32, 64>;
fn workgroup_sum(v: f32, lid: u32) -> f32 {
    red_buf[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_buf[lid] = red_buf[lid] + red_buf[lid + s];
        }
        workgroupBarrier();
    }
    let r = red_buf[0];
    workgroupBarrier();
    return r;
}
