// y[n, :] = (x[n, :] - mean) / sqrt(var + eps) * weight + bias   (biased variance)
// One workgroup per run of TPW rows; each invocation takes four channels at a
// time (dim and every offset are multiples of 4: one vec4 load where scalars
// take four per-lane loads on llvmpipe). With TPW > 1 (CPU adapters) and rows
// of at most MAXC vec4s per invocation, weight and bias are loaded once per
// run and each x value once (kept for the variance and the output).

struct Params {
    n_rows: u32,
    dim: u32,
    x_offset: u32, // elements
    y_offset: u32, // elements
    w_offset: u32, // weight [dim] in vecs
    b_offset: u32, // bias [dim] in vecs
    eps: f32,
    _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;       // [n_rows, dim / 4] at x_offset
@group(0) @binding(2) var<storage, read> vecs: array<vec4<f32>>;    // per-layer vectors
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>; // [n_rows, dim / 4] at y_offset

// Rows per workgroup (see `GpuContext::elementwise_tokens`).
override TPW: u32 = 1u;
// Most vec4s of a row per invocation that are kept (dim <= 4 * MAXC * GS).
const MAXC: u32 = 64u;

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d4 = p.dim / 4u;
    let wb = p.w_offset / 4u;
    let bb = p.b_offset / 4u;
    let keep = TPW > 1u && d4 <= MAXC * GS;
    var w: array<vec4<f32>, MAXC>;
    var b: array<vec4<f32>, MAXC>;
    var xs: array<vec4<f32>, MAXC>;
    if (keep) {
        var q = 0u;
        for (var c = lid; c < d4; c += GS) {
            w[q] = vecs[wb + c];
            b[q] = vecs[bb + c];
            q++;
        }
    }
    let n0 = wid.x * TPW;
    let n_end = min(n0 + TPW, p.n_rows);
    for (var row = n0; row < n_end; row++) {
        let xb = p.x_offset / 4u + row * d4;
        var s = vec4<f32>(0.0);
        var q = 0u;
        for (var c = lid; c < d4; c += GS) {
            let v = x[xb + c];
            if (keep) {
                xs[q] = v;
            }
            s += v;
            q++;
        }
        let mean = group_sum(s.x + s.y + s.z + s.w, lid) / f32(p.dim);
        var sq = vec4<f32>(0.0);
        q = 0u;
        for (var c = lid; c < d4; c += GS) {
            var v: vec4<f32>;
            if (keep) {
                v = xs[q];
            } else {
                v = x[xb + c];
            }
            let d = v - mean;
            sq += d * d;
            q++;
        }
        let var_ = group_sum(sq.x + sq.y + sq.z + sq.w, lid) / f32(p.dim);
        let rstd = 1.0 / sqrt(var_ + p.eps);
        let yb = p.y_offset / 4u + row * d4;
        q = 0u;
        for (var c = lid; c < d4; c += GS) {
            if (keep) {
                y[yb + c] = (xs[q] - mean) * rstd * w[q] + b[q];
            } else {
                y[yb + c] = (x[xb + c] - mean) * rstd * vecs[wb + c] + vecs[bb + c];
            }
            q++;
        }
    }
}
