//! Each kernel's `Params` uniform has the byte size of the `#[repr(C)]`
//! struct that mirrors it in `src/gpu/kernels.rs`.
//!
//! The Rust mirror and the WGSL struct are written by hand in two places and
//! nothing ties them together: a field added, dropped or padded on one side
//! only still compiles and still dispatches, and the kernel then reads
//! garbage parameters on the GPU (wgpu checks only that the buffer is at
//! least as large as the struct). So this test parses every shader the way
//! `GpuContext::pipeline` assembles it (`common.wgsl`, then a reduce file,
//! then the kernel) with naga's WGSL front end, finds the uniform bound at
//! `@group(0) @binding(0)`, and checks its size against `size_of` of the Rust
//! struct. It also checks that the WGSL struct is tightly packed (members at
//! multiples of 4 bytes, each right after the previous one, no trailing
//! padding), so its size is the sum of its fields as in the `Pod` Rust struct.
//!
//! Pure parsing: no GPU needed.

use std::mem::size_of;
use std::path::PathBuf;

use naga::proc::Layouter;
use naga::{AddressSpace, Module, ResourceBinding, TypeInner};
use rwkv_wgpu::gpu::kernels::{
    GatherParams, GroupNormParams, LayerNormParams, LinearParams, LinearTexParams, MulAddParams, RmsNormParams,
    TokenShiftParams, V7PrepParams, Wkv4Params, Wkv5Params, Wkv7Params,
};

/// Which `group_sum` files a kernel is assembled with in `GpuContext::pipeline`.
#[derive(Debug, Clone, Copy)]
enum Reduce {
    /// `reduce_subgroup.wgsl` or `reduce_workgroup.wgsl`, by adapter.
    Either,
    /// Only `reduce_subgroup.wgsl`: the kernel itself needs a fixed subgroup size.
    Subgroup,
}

/// One kernel: its shader, the Rust struct mirroring its `Params`, and that
/// struct's size.
struct Case {
    shader: &'static str,
    rust: &'static str,
    size: usize,
    reduce: Reduce,
}

macro_rules! case {
    ($shader:literal, $ty:ident, $reduce:ident) => {
        Case { shader: $shader, rust: stringify!($ty), size: size_of::<$ty>(), reduce: Reduce::$reduce }
    };
}

/// Every kernel shader and its Rust mirror (see `Kernel::source` and the
/// `record_*`/`dispatch` call sites for which struct each one is given).
const CASES: &[Case] = &[
    case!("layer_norm.wgsl", LayerNormParams, Either),
    case!("rms_norm.wgsl", RmsNormParams, Either),
    case!("token_shift.wgsl", TokenShiftParams, Either),
    case!("gather_rows.wgsl", GatherParams, Either),
    case!("linear.wgsl", LinearParams, Either),
    case!("linear_sg.wgsl", LinearParams, Subgroup),
    case!("linear_tex.wgsl", LinearTexParams, Subgroup),
    case!("v7_prep.wgsl", V7PrepParams, Either),
    case!("wkv7.wgsl", Wkv7Params, Either),
    case!("wkv7_tex.wgsl", Wkv7Params, Subgroup),
    case!("wkv5.wgsl", Wkv5Params, Either),
    case!("wkv5_tex.wgsl", Wkv5Params, Subgroup),
    case!("wkv4.wgsl", Wkv4Params, Either),
    case!("group_norm.wgsl", GroupNormParams, Either),
    case!("mul_add.wgsl", MulAddParams, Either),
];

/// The files prepended to every kernel. They are not kernels and declare no
/// `Params` (and no bindings) of their own.
const COMMON: &str = "common.wgsl";
const REDUCE_SUBGROUP: &str = "reduce_subgroup.wgsl";
const REDUCE_WORKGROUP: &str = "reduce_workgroup.wgsl";

fn shader_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders")
}

fn read_shader(name: &str) -> String {
    let path = shader_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The source `GpuContext::pipeline` compiles for `kernel` with `reduce`.
fn assemble(kernel: &str, reduce: &str) -> String {
    format!("{}\n{}\n{}", read_shader(COMMON), read_shader(reduce), read_shader(kernel))
}

/// One member of the WGSL `Params`: name, byte offset, byte size.
type Member = (String, u32, u32);

/// The uniform at `@group(0) @binding(0)`: its struct's name, its span in
/// bytes and its members.
fn params_layout(module: &Module) -> Result<(String, u32, Vec<Member>), String> {
    let target = ResourceBinding { group: 0, binding: 0 };
    let (_, var) = module
        .global_variables
        .iter()
        .find(|(_, v)| v.binding.as_ref() == Some(&target))
        .ok_or("no global variable at @group(0) @binding(0)")?;
    let var_name = var.name.as_deref().unwrap_or("<unnamed>");
    if var.space != AddressSpace::Uniform {
        return Err(format!("`{var_name}` at @group(0) @binding(0) is in {:?}, not var<uniform>", var.space));
    }
    let ty = &module.types[var.ty];
    let TypeInner::Struct { members, span } = &ty.inner else {
        return Err(format!("`{var_name}` at @group(0) @binding(0) is not a struct but {:?}", ty.inner));
    };
    let mut layouter = Layouter::default();
    layouter.update(module.to_ctx()).map_err(|e| format!("layout: {e}"))?;
    let members = members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset, layouter[m.ty].size)).collect();
    Ok((ty.name.clone().unwrap_or_else(|| "<unnamed>".into()), *span, members))
}

/// Everything wrong with `case` assembled with `reduce` (empty: all good).
fn check(case: &Case, reduce: &str) -> Vec<String> {
    let what = format!("{} (with {reduce}) vs {}", case.shader, case.rust);
    let source = assemble(case.shader, reduce);
    let module = match naga::front::wgsl::parse_str(&source) {
        Ok(m) => m,
        Err(e) => return vec![format!("{what}: WGSL does not parse:\n{}", e.emit_to_string(&source))],
    };
    let (name, span, members) = match params_layout(&module) {
        Ok(l) => l,
        Err(e) => return vec![format!("{what}: {e}")],
    };
    let mut errors = Vec::new();
    if name != "Params" {
        errors.push(format!("{what}: the uniform's struct is `{name}`, expected `Params`"));
    }
    if span as usize != case.size {
        errors.push(format!(
            "{what}: WGSL `{name}` is {span} bytes ({} members), Rust `{}` is {} bytes",
            members.len(),
            case.rust,
            case.size
        ));
    }
    let mut end = 0;
    for (member, offset, size) in &members {
        if offset % 4 != 0 {
            errors.push(format!("{what}: `{name}.{member}` at byte {offset}, not a multiple of 4"));
        }
        if *offset != end {
            errors.push(format!("{what}: `{name}.{member}` at byte {offset}, expected {end} (implicit padding)"));
        }
        end = offset + size;
    }
    let sum: u32 = members.iter().map(|(_, _, size)| size).sum();
    if sum != span {
        errors.push(format!("{what}: `{name}` members sum to {sum} bytes but it spans {span} (implicit padding)"));
    }
    errors
}

#[test]
fn params_match_rust_mirrors() {
    let mut errors = Vec::new();
    for case in CASES {
        let reduces: &[&str] = match case.reduce {
            Reduce::Either => &[REDUCE_SUBGROUP, REDUCE_WORKGROUP],
            Reduce::Subgroup => &[REDUCE_SUBGROUP],
        };
        for reduce in reduces {
            errors.extend(check(case, reduce));
        }
    }
    assert!(errors.is_empty(), "Params layout mismatches:\n{}", errors.join("\n"));
}

/// A new shader must get a row in `CASES` (or be a prepended file).
#[test]
fn every_shader_is_covered() {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(shader_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let prepended = [COMMON, REDUCE_SUBGROUP, REDUCE_WORKGROUP].contains(&name.as_str());
        if name.ends_with(".wgsl") && !prepended && !CASES.iter().any(|c| c.shader == name) {
            missing.push(name);
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "shaders with no row in CASES of tests/params_layout.rs: {missing:?}");
}

/// The prepended files hold no `Params` (nor any binding) to check.
#[test]
fn prepended_files_bind_nothing() {
    for reduce in [REDUCE_SUBGROUP, REDUCE_WORKGROUP] {
        let source = format!("{}\n{}", read_shader(COMMON), read_shader(reduce));
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{COMMON} + {reduce}:\n{}", e.emit_to_string(&source)));
        let bound: Vec<_> = module.global_variables.iter().filter(|(_, v)| v.binding.is_some()).collect();
        assert!(bound.is_empty(), "{COMMON} + {reduce} declare bindings: {bound:?}");
    }
}
