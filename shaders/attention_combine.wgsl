// Merges the splits attention.wgsl wrote for each (query row, head), in
// split order:
//   M = max_s m_s;  L = Σ_s e^(m_s - M) l_s;  out = Σ_s e^(m_s - M) acc_s / L
// One workgroup (GS invocations) per (head, row); each invocation takes
// vec4s of channels.

struct Params {
    n_tok: u32,
    row0: u32,   // first row in out
    n_head: u32,
    head_dim: u32,
    n_splits: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<vec4<f32>>;       // [n_tok, n_head, n_splits, 1 + head_dim / 4]
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>; // [rows, n_head * head_dim / 4]

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let h = wid.x;
    let t = wid.y;
    let hd4 = p.head_dim / 4u;
    let e = 1u + hd4;
    let pb = (t * p.n_head + h) * p.n_splits * e;
    var mx = -3.0e38;
    for (var s = 0u; s < p.n_splits; s++) {
        mx = max(mx, part[pb + s * e].x);
    }
    var l = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        let ml = part[pb + s * e];
        l = l + exp(ml.x - mx) * ml.y;
    }
    for (var c = lane; c < hd4; c += GS) {
        var o = vec4<f32>(0.0);
        for (var s = 0u; s < p.n_splits; s++) {
            o = o + exp(part[pb + s * e].x - mx) * part[pb + s * e + 1u + c];
        }
        out[(p.row0 + t) * (p.n_head * hd4) + h * hd4 + c] = o / l;
    }
}
