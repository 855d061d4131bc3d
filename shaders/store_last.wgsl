// state[b, state_offset + c] = x[last token of sequence b, c], for every
// sequence that had tokens in this step (the token-shift state hand-over).

struct Params {
    n_seq: u32,
    dim: u32,
    state_stride: u32,
    state_offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;           // [n_tok, dim]
@group(0) @binding(2) var<storage, read> seq_start: array<u32>;   // [n_seq + 1]
@group(0) @binding(3) var<storage, read_write> state: array<f32>; // [n_seq, state_stride]

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let b = gid.y;
    if (c >= p.dim || b >= p.n_seq) {
        return;
    }
    let end = seq_start[b + 1u];
    if (end > seq_start[b]) {
        state[b * p.state_stride + p.state_offset + c] = x[(end - 1u) * p.dim + c];
    }
}
