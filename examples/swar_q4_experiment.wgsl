// The experiment of examples/swar_q4_experiment.rs (not a runtime kernel):
// y[o] = sum_b wscale[o, b] xscale[b] sum_{i in b} (n[o, i] - 8) (x'[i] - 128),
// q4 codes n (0..15) times int8 x codes, two rows per u32 (16-bit fields).
struct P { d_in: u32, d_out: u32, _a: u32, _b: u32 }
override WG: u32 = 8u;
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var w: texture_storage_2d<rgba32uint, read>;   // [d_out / 8 groups, d_in / 4]: word c of texel k = input 4k + c, nibble r = row 8g + r (code + 8)
@group(0) @binding(2) var ws: texture_storage_2d<rgba32float, read>; // [d_out / 8, 2 * d_in / 32]: the 8 rows' scales of block b
@group(0) @binding(3) var<uniform> xf: array<vec4<f32>, 1024>;       // [d_in / 4]: x (f32), quantized per block of 32 below
@group(0) @binding(5) var<storage, read_write> y: array<f32>;        // [d_out]

const M: u32 = 0x000F000Fu;

// x's int8 codes + 128, each block's scale and code sum, made once per workgroup.
var<workgroup> xq: array<vec4<u32>, 192>;
var<workgroup> xscale: array<f32, 24>;
var<workgroup> xcsum: array<u32, 24>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = gid.x;
    // Lane l quantizes blocks l, l + WG, ..: scale = max |x| / 127.
    for (var b = lid; b < p.d_in / 32u; b += WG) {
        var m = 0.0;
        for (var t = 0u; t < 8u; t++) {
            let v = abs(xf[b * 8u + t]);
            m = max(m, max(max(v.x, v.y), max(v.z, v.w)));
        }
        let xs = select(m / 127.0, 1.0, m == 0.0);
        let inv = 1.0 / xs;
        var sum = 0u;
        for (var t = 0u; t < 8u; t++) {
            let c = vec4<u32>(vec4<i32>(round(xf[b * 8u + t] * inv)) + 128);
            xq[b * 8u + t] = c;
            sum += c.x + c.y + c.z + c.w;
        }
        xscale[b] = xs;
        xcsum[b] = sum;
    }
    workgroupBarrier();
    var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0; var s4 = 0.0; var s5 = 0.0; var s6 = 0.0; var s7 = 0.0;
    let nb = p.d_in / 32u;
    for (var b = 0u; b < nb; b++) {
        let xs = xscale[b];
        let xsum = xcsum[b];
        var r0 = 0u; var r1 = 0u; var r2 = 0u; var r3 = 0u; var r4 = 0u; var r5 = 0u; var r6 = 0u; var r7 = 0u;
        var c0 = 0u; var c1 = 0u; var c2 = 0u; var c3 = 0u;
        for (var h = 0u; h < 2u; h++) {
            var a0 = 0u; var a1 = 0u; var a2 = 0u; var a3 = 0u;
            for (var k = 0u; k < 4u; k++) {
                let kk = b * 8u + h * 4u + k;
                let q = textureLoad(w, vec2<u32>(kk, g));
                let x = xq[kk];
                var m0 = q.x & M; var m1 = (q.x >> 4u) & M; var m2 = (q.x >> 8u) & M; var m3 = (q.x >> 12u) & M;
                a0 += m0 * x.x; a1 += m1 * x.x; a2 += m2 * x.x; a3 += m3 * x.x; c0 += m0; c1 += m1; c2 += m2; c3 += m3;
                m0 = q.y & M; m1 = (q.y >> 4u) & M; m2 = (q.y >> 8u) & M; m3 = (q.y >> 12u) & M;
                a0 += m0 * x.y; a1 += m1 * x.y; a2 += m2 * x.y; a3 += m3 * x.y; c0 += m0; c1 += m1; c2 += m2; c3 += m3;
                m0 = q.z & M; m1 = (q.z >> 4u) & M; m2 = (q.z >> 8u) & M; m3 = (q.z >> 12u) & M;
                a0 += m0 * x.z; a1 += m1 * x.z; a2 += m2 * x.z; a3 += m3 * x.z; c0 += m0; c1 += m1; c2 += m2; c3 += m3;
                m0 = q.w & M; m1 = (q.w >> 4u) & M; m2 = (q.w >> 8u) & M; m3 = (q.w >> 12u) & M;
                a0 += m0 * x.w; a1 += m1 * x.w; a2 += m2 * x.w; a3 += m3 * x.w; c0 += m0; c1 += m1; c2 += m2; c3 += m3;
            }
            r0 += a0 & 0xFFFFu; r4 += a0 >> 16u; r1 += a1 & 0xFFFFu; r5 += a1 >> 16u;
            r2 += a2 & 0xFFFFu; r6 += a2 >> 16u; r3 += a3 & 0xFFFFu; r7 += a3 >> 16u;
        }
        // sum c x = sum n x' - 128 sum n - 8 sum x' + 8 * 128 * 32
        let k0 = 32768 - 8 * i32(xsum);
        let sa = textureLoad(ws, vec2<u32>(2u * b, g)) * xs;
        let sb = textureLoad(ws, vec2<u32>(2u * b + 1u, g)) * xs;
        s0 += sa.x * f32(i32(r0) - 128 * i32(c0 & 0xFFFFu) + k0);
        s1 += sa.y * f32(i32(r1) - 128 * i32(c1 & 0xFFFFu) + k0);
        s2 += sa.z * f32(i32(r2) - 128 * i32(c2 & 0xFFFFu) + k0);
        s3 += sa.w * f32(i32(r3) - 128 * i32(c3 & 0xFFFFu) + k0);
        s4 += sb.x * f32(i32(r4) - 128 * i32(c0 >> 16u) + k0);
        s5 += sb.y * f32(i32(r5) - 128 * i32(c1 >> 16u) + k0);
        s6 += sb.z * f32(i32(r6) - 128 * i32(c2 >> 16u) + k0);
        s7 += sb.w * f32(i32(r7) - 128 * i32(c3 >> 16u) + k0);
    }
    let o = g * 8u;
    y[o] = s0; y[o + 1u] = s1; y[o + 2u] = s2; y[o + 3u] = s3;
    y[o + 4u] = s4; y[o + 5u] = s5; y[o + 6u] = s6; y[o + 7u] = s7;
}
