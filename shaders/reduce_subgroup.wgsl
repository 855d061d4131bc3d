// group_sum where the workgroup is one subgroup (GS = the subgroup size):
// the sum of `v` over the workgroup; every invocation gets the result.
fn group_sum(v: f32, lid: u32) -> f32 {
    return subgroupAdd(v);
}

// The largest `v` over the workgroup; every invocation gets it.
fn group_max(v: f32, lid: u32) -> f32 {
    return subgroupMax(v);
}

// Invocation `src`'s `v` (uniform `src`), for every invocation.
fn group_shuffle(v: f32, src: u32, lid: u32) -> f32 {
    return subgroupShuffle(v, src);
}
