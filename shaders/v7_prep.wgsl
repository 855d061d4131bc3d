// RWKV-7 time-mix preparation, one workgroup per head and run of TPW tokens;
// each invocation takes four channels j .. j + 3 of the head at a time (head
// size and dim multiples of 4: vec4 loads), c = head * head_size + j, and
// loads its channels' per-layer vectors once for the run. Inputs are
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

// Tokens per workgroup (see `GpuContext::elementwise_tokens`).
override TPW: u32 = 1u;
// Most vec4s of one head per invocation (head size <= 64).
const MAXJ: u32 = 16u;

@compute @workgroup_size(GS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let pl = p.plane / 4u;
    let hs4 = p.head_size / 4u;
    let ch = h * hs4; // this head's first vec4 in a [dim] vector
    // This invocation's channels c = ch + j, j = lid, lid + GS, ..: vectors at [q].
    var k_k: array<vec4<f32>, MAXJ>;
    var a0: array<vec4<f32>, MAXJ>;
    var k_a: array<vec4<f32>, MAXJ>;
    var w0: array<vec4<f32>, MAXJ>;
    var v0: array<vec4<f32>, MAXJ>;
    var q = 0u;
    for (var j = lid; j < hs4; j += GS) {
        let c = ch + j;
        k_k[q] = vecs[p.k_k / 4u + c];
        a0[q] = vecs[p.a0 / 4u + c];
        k_a[q] = vecs[p.k_a / 4u + c];
        w0[q] = vecs[p.w0 / 4u + c];
        if (p.layer0 == 0u) {
            v0[q] = vecs[p.v0 / 4u + c];
        }
        q++;
    }
    let n0 = wid.y * TPW;
    let n_end = min(n0 + TPW, p.n_tok);
    for (var n = n0; n < n_end; n++) {
        let base = n * (p.dim / 4u) + ch; // this head's first vec4 in a plane
        var k: array<vec4<f32>, MAXJ>;
        var kk: array<vec4<f32>, MAXJ>;
        var sumsq = vec4<f32>(0.0);
        q = 0u;
        for (var j = lid; j < hs4; j += GS) {
            k[q] = att[K * pl + base + j];
            kk[q] = k[q] * k_k[q];
            sumsq += kk[q] * kk[q];
            q++;
        }
        let inv_norm = 1.0 / max(sqrt(group_sum(sumsq.x + sumsq.y + sumsq.z + sumsq.w, lid)), 1e-12);
        q = 0u;
        for (var j = lid; j < hs4; j += GS) {
            let i = base + j;
            att[KK * pl + i] = kk[q] * inv_norm;
            let a = sigmoid4(a0[q] + att[A * pl + i]);
            att[A * pl + i] = a;
            att[K * pl + i] = k[q] * (1.0 + (a - 1.0) * k_a[q]);
            att[W * pl + i] = exp(-EXP_M_HALF * sigmoid4(w0[q] + att[W * pl + i]));
            let v = att[V * pl + i];
            if (p.layer0 == 1u) {
                att[V_FIRST * pl + i] = v;
            } else {
                let vf = att[V_FIRST * pl + i];
                att[V * pl + i] = v + (vf - v) * sigmoid4(v0[q] + att[V_GATE * pl + i]);
            }
            q++;
        }
    }
}
