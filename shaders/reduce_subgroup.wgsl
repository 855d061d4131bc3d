// group_sum where the workgroup is one subgroup (GS = the subgroup size):
// the sum of `v` over the workgroup; every invocation gets the result.
fn group_sum(v: f32, lid: u32) -> f32 {
    return subgroupAdd(v);
}
