// out[n, c] = W[tokens[n] - row0, c] for the tokens whose row lies in this part
// of the [vocab, dim] table (one dispatch per part). Reads one row per token.

struct Params {
    n_tok: u32,
    dim: u32,
    row0: u32,      // first vocab row of this part
    part_rows: u32, // rows in this part
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;    // [n_tok]
@group(0) @binding(2) var<storage, read> w: array<u32>;         // [part_rows, dim] in WDTYPE
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [n_tok, dim]

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n = gid.y;
    if (c >= p.dim || n >= p.n_tok) {
        return;
    }
    let t = tokens[n];
    if (t < p.row0 || t >= p.row0 + p.part_rows) {
        return;
    }
    let idx = (t - p.row0) * p.dim + c;
    var v: f32;
    if (WDTYPE == 0u) {
        v = bitcast<f32>(w[idx]);
    } else {
        v = unpack_weight(w[idx >> 1u], (idx & 1u) == 1u);
    }
    out[n * p.dim + c] = v;
}
