// RWKV-7 time-mix preparation, one workgroup per (head, token); j runs over
// the head's channels, c = head * head_size + j. Inputs are the projections
// and LoRA outputs in the planes of `att`; results are written back in place:
//   kk  = normalize(k * k_k)                      (L2 over the head, eps 1e-12)
//   a   = sigmoid(a0 + a_lora)
//   k   = k * (1 + (a - 1) * k_a)
//   w   = exp(-e^-0.5 * sigmoid(w0 + w_lora))     (the decay)
//   v   = layer 0: v_first = v
//         else:    v + (v_first - v) * sigmoid(v0 + v_lora)

struct Params {
    n_tok: u32,
    dim: u32,
    head_size: u32,
    plane: u32,  // elements per plane of att
    layer0: u32, // 1 on the first layer
    w0: u32,     // offsets of [dim] vectors in vecs
    a0: u32,
    v0: u32,
    k_k: u32,
    k_a: u32,
    _p0: u32,
    _p1: u32,
}

const EXP_M_HALF: f32 = 0.60653065971263342; // e^-0.5

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> att: array<f32>; // [PLANES, tokens, dim]
@group(0) @binding(2) var<storage, read> vecs: array<f32>;      // per-layer vectors

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let n = wid.y;
    let base = n * p.dim + h * p.head_size;
    var sumsq = 0.0;
    for (var j = lid; j < p.head_size; j += GS) {
        let c = h * p.head_size + j;
        let kk = att[K * p.plane + base + j] * vecs[p.k_k + c];
        att[KK * p.plane + base + j] = kk;
        sumsq += kk * kk;
    }
    let inv_norm = 1.0 / max(sqrt(group_sum(sumsq, lid)), 1e-12);
    for (var j = lid; j < p.head_size; j += GS) {
        let c = h * p.head_size + j;
        let i = base + j;
        att[KK * p.plane + i] = att[KK * p.plane + i] * inv_norm;
        let a = sigmoid(vecs[p.a0 + c] + att[A * p.plane + i]);
        att[A * p.plane + i] = a;
        att[K * p.plane + i] = att[K * p.plane + i] * (1.0 + (a - 1.0) * vecs[p.k_a + c]);
        att[W * p.plane + i] = exp(-EXP_M_HALF * sigmoid(vecs[p.w0 + c] + att[W * p.plane + i]));
        let v = att[V * p.plane + i];
        if (p.layer0 == 1u) {
            att[V_FIRST * p.plane + i] = v;
        } else {
            let vf = att[V_FIRST * p.plane + i];
            att[V * p.plane + i] = v + (vf - v) * sigmoid(vecs[p.v0 + c] + att[V_GATE * p.plane + i]);
        }
    }
}
