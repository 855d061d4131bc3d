// group_sum for adapters without fixed-size subgroups (GS = 64): the sum of
// `v` over the workgroup; every invocation gets the result. Call from
// uniform control flow only.
var<workgroup> red_buf: array<f32, 64>;
fn group_sum(v: f32, lid: u32) -> f32 {
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

// The largest `v` over the workgroup; every invocation gets it. Call from
// uniform control flow only.
fn group_max(v: f32, lid: u32) -> f32 {
    red_buf[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_buf[lid] = max(red_buf[lid], red_buf[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red_buf[0];
    workgroupBarrier();
    return r;
}

// Invocation `src`'s `v` (uniform `src`), for every invocation. Call from
// uniform control flow only.
fn group_shuffle(v: f32, src: u32, lid: u32) -> f32 {
    red_buf[lid] = v;
    workgroupBarrier();
    let r = red_buf[src];
    workgroupBarrier();
    return r;
}
