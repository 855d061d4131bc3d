// The exact GELU in place: x = x Φ(x) = 0.5 x (1 + erf(x / √2)), written as
// 0.5 x erfc(-x / √2) (no cancellation for x < 0), for `n` elements from
// `offset`. GPT-NeoX's MLP activation.

struct Params {
    n: u32,
    offset: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>; // [n] at offset

// erfc(x), fractional error below 1.2e-7 everywhere (the Chebyshev fit of
// Numerical Recipes' erfcc); WGSL has no erf.
fn erfc_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let q = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(q);
    return select(2.0 - r, r, x >= 0.0);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    let v = x[p.offset + i];
    x[p.offset + i] = 0.5 * v * erfc_approx(-v * 0.70710678118654752);
}
