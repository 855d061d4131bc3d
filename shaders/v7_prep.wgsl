// RWKV-7 time-mix preparation, one workgroup per (head, token); each
// invocation takes four channels j .. j + 3 of the head at a time (head size
// and dim multiples of 4: vec4 loads), c = head * head_size + j. Inputs are
// the projections and LoRA outputs in the planes of `att`; results are
// written back in place:
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
@group(0) @binding(1) var<storage, read_write> att: array<vec4<f32>>; // [PLANES, tokens, dim / 4]
@group(0) @binding(2) var<storage, read> vecs: array<vec4<f32>>;      // per-layer vectors

fn sigmoid4(x: vec4<f32>) -> vec4<f32> {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let n = wid.y;
    let pl = p.plane / 4u;
    let hs4 = p.head_size / 4u;
    let base = n * (p.dim / 4u) + h * hs4; // this head's first vec4 in a plane
    let ch = h * hs4;                      // and in a [dim] vector
    var sumsq = vec4<f32>(0.0);
    for (var j = lid; j < hs4; j += GS) {
        let kk = att[K * pl + base + j] * vecs[p.k_k / 4u + ch + j];
        att[KK * pl + base + j] = kk;
        sumsq += kk * kk;
    }
    let inv_norm = 1.0 / max(sqrt(group_sum(sumsq.x + sumsq.y + sumsq.z + sumsq.w, lid)), 1e-12);
    for (var j = lid; j < hs4; j += GS) {
        let c = ch + j;
        let i = base + j;
        att[KK * pl + i] = att[KK * pl + i] * inv_norm;
        let a = sigmoid4(vecs[p.a0 / 4u + c] + att[A * pl + i]);
        att[A * pl + i] = a;
        att[K * pl + i] = att[K * pl + i] * (1.0 + (a - 1.0) * vecs[p.k_a / 4u + c]);
        att[W * pl + i] = exp(-EXP_M_HALF * sigmoid4(vecs[p.w0 / 4u + c] + att[W * pl + i]));
        let v = att[V * pl + i];
        if (p.layer0 == 1u) {
            att[V_FIRST * pl + i] = v;
        } else {
            let vf = att[V_FIRST * pl + i];
            att[V * pl + i] = v + (vf - v) * sigmoid4(vecs[p.v0 / 4u + c] + att[V_GATE * pl + i]);
        }
    }
}
