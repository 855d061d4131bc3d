//! Each kernel's `Params` uniform matches, field by field, the `#[repr(C)]`
//! struct that mirrors it in `src/gpu/kernels.rs`.
//!
//! The Rust mirror and the WGSL struct are written by hand in two places and
//! nothing ties them together: a field added, dropped, swapped or retyped on
//! one side only still compiles and still dispatches, and the kernel then
//! reads garbage parameters on the GPU (wgpu checks only that the buffer is at
//! least as large as the struct). So this test parses every shader the way
//! `GpuContext::pipeline` assembles it (`common.wgsl`, then a reduce file,
//! then the kernel) with naga's WGSL front end, finds the uniform bound at
//! `@group(0) @binding(0)`, and checks against the Rust struct:
//!
//! - its size against `size_of`;
//! - each member's name, byte offset and type (`u32`, `i32`, `f32`, or an
//!   array of one) against the Rust field's, read with `offset_of!` and from
//!   the field's declared type. A name starting with `_` is padding on either
//!   side (`_pad: [u32; 3]` in Rust, `_p0`, `_p1`, `_p2` in WGSL): runs of
//!   padding need only cover the same bytes;
//! - that it is tightly packed (members at multiples of 4 bytes, each right
//!   after the previous one, no trailing padding), as the `Pod` Rust struct is.
//!
//! It also checks that every Rust struct fits the 64-byte slot a dispatch's
//! params get in the recorder's arena.
//!
//! Pure parsing: no GPU needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

use naga::proc::Layouter;
use naga::{AddressSpace, ArraySize, Handle, Module, ResourceBinding, Scalar, ScalarKind, Type, TypeInner};
use rwkv_wgpu::gpu::kernels::{
    AddBiasParams, AttentionCombineParams, AttentionParams, GatherParams, GeluParams, GroupNormParams, KvWriteParams,
    LayerNormParams, LinearParams, LinearTexParams, MulAddParams, RmsNormParams, RopeParams, SwigluParams,
    TokenShiftParams, V7PrepParams, Wkv4Params, Wkv5Params, Wkv7Params,
};

/// Bytes each dispatch's params get in the params arena: `slot_bytes` in
/// `src/gpu/recorder.rs` (64, rounded up to the uniform offset alignment, so
/// never less). `Recorder::submit` copies a struct into its slot without
/// checking its length, so a larger one would overwrite the next dispatch's
/// params (or run past the arena).
const ARENA_SLOT_BYTES: usize = 64;

/// Which `group_sum` files a kernel is assembled with in `GpuContext::pipeline`.
#[derive(Debug, Clone, Copy)]
enum Reduce {
    /// `reduce_subgroup.wgsl` or `reduce_workgroup.wgsl`, by adapter.
    Either,
    /// Only `reduce_subgroup.wgsl`: the kernel itself needs a fixed subgroup size.
    Subgroup,
}

/// The type of a `Params` field, on either side.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    Scalar(Scalar),
    Array(Scalar, u32),
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fn scalar(s: &Scalar) -> String {
            let prefix = match s.kind {
                ScalarKind::Uint => "u",
                ScalarKind::Sint => "i",
                ScalarKind::Float => "f",
                other => return format!("{other:?}{}", s.width * 8),
            };
            format!("{prefix}{}", s.width * 8)
        }
        match self {
            Ty::Scalar(s) => f.write_str(&scalar(s)),
            Ty::Array(s, n) => write!(f, "array<{}, {n}>", scalar(s)),
        }
    }
}

/// Rust scalar types a `Params` field may have, with naga's name for each.
trait RustScalar {
    const SCALAR: Scalar;
}
impl RustScalar for u32 {
    const SCALAR: Scalar = Scalar::U32;
}
impl RustScalar for i32 {
    const SCALAR: Scalar = Scalar::I32;
}
impl RustScalar for f32 {
    const SCALAR: Scalar = Scalar::F32;
}

/// Rust types a `Params` field may have: a scalar or an array of them.
trait FieldTy {
    const TY: Ty;
}
impl<T: RustScalar> FieldTy for T {
    const TY: Ty = Ty::Scalar(T::SCALAR);
}
impl<T: RustScalar, const N: usize> FieldTy for [T; N] {
    const TY: Ty = Ty::Array(T::SCALAR, N as u32);
}

/// One field of a `Params` struct (either side) or one run of padding.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    name: &'a str,
    offset: u32,
    size: u32,
    ty: Ty,
}

impl Field<'_> {
    fn is_padding(&self) -> bool {
        self.name.starts_with('_')
    }
}

/// `name` at `offset` in `S`; its type is that of the field `get` reads.
const fn field<S, T: FieldTy>(name: &'static str, offset: usize, _get: fn(&S) -> &T) -> Field<'static> {
    Field { name, offset: offset as u32, size: size_of::<T>() as u32, ty: T::TY }
}

/// A Rust `Params` struct: its name, size and fields.
struct Mirror {
    name: &'static str,
    size: usize,
    fields: &'static [Field<'static>],
}

/// `mirror!(Struct { a, b, _pad })`: the `Mirror` of `Struct`, offsets and
/// types read from the struct itself. Every field must be listed: the struct
/// is rebuilt from them, so a missing one is a compile error here ("missing
/// field `x` in initializer").
macro_rules! mirror {
    ($ty:ident { $($field:ident),* $(,)? }) => {{
        const { let _all_fields_listed = |s: $ty| $ty { $($field: s.$field),* }; }
        Mirror {
            name: stringify!($ty),
            size: size_of::<$ty>(),
            fields: &[$(field::<$ty, _>(stringify!($field), offset_of!($ty, $field), |s| &s.$field)),*],
        }
    }};
}

const LAYER_NORM: Mirror = mirror!(LayerNormParams { n_rows, dim, x_offset, y_offset, w_offset, b_offset, eps, _pad });
const RMS_NORM: Mirror = mirror!(RmsNormParams { n_rows, dim, x_offset, y_offset, w_offset, eps, _pad });
const ROPE: Mirror = mirror!(RopeParams { n_tok, n_head, head_dim, rotary, row_stride, offset, _pad });
const GELU: Mirror = mirror!(GeluParams { n, offset, _pad });
const TOKEN_SHIFT: Mirror = mirror!(TokenShiftParams {
    n_tok,
    dim,
    n_mix,
    mix_offset,
    state_stride,
    state_offset,
    out_plane,
    hand_over,
    extra_plane,
    _pad
});
const GATHER: Mirror = mirror!(GatherParams { n_out, dim, rows_offset, _pad });
const LINEAR: Mirror =
    mirror!(LinearParams { n_rows, d_in, d_out, row0, part_rows, x_offset, y_offset, act, accumulate, _pad });
const LINEAR_TEX: Mirror =
    mirror!(LinearTexParams { n_rows, d_in, d_out, layer_rows, y_offset, act, accumulate, _pad });
const V7_PREP: Mirror = mirror!(V7PrepParams { n_tok, dim, head_size, plane, layer0, w0, a0, v0, k_k, k_a, _pad });
const WKV7: Mirror =
    mirror!(Wkv7Params { n_seq, n_head, head_size, dim, plane, state_stride, state_offset, t_first, t_count, _pad });
const WKV5: Mirror = mirror!(Wkv5Params {
    n_seq,
    n_head,
    head_size,
    dim,
    plane,
    state_stride,
    state_offset,
    t_first,
    t_count,
    u_offset,
    w_offset,
    w_dynamic
});
const WKV4: Mirror = mirror!(Wkv4Params { n_seq, dim, plane, state_stride, state_offset, u_offset, w_offset, _pad });
const GROUP_NORM: Mirror =
    mirror!(GroupNormParams { n_tok, dim, head_size, plane, lnx_w, lnx_b, r_k, eps, bonus, gate, _pad });
const MUL_ADD: Mirror = mirror!(MulAddParams { n_tok, dim, a_offset, b_offset });
const ADD_BIAS: Mirror = mirror!(AddBiasParams { n_rows, dim, row_stride, x_offset, b_offset, _pad });
const SWIGLU: Mirror = mirror!(SwigluParams { n_rows, ffn, _pad });
const KV_WRITE: Mirror = mirror!(KvWriteParams { n_tok, row0, qkv_stride, k_offset, kv_dim, pos0, cap, _pad });
const ATTENTION: Mirror = mirror!(AttentionParams {
    n_tok,
    row0,
    t0,
    qkv_stride,
    n_head,
    n_kv_head,
    head_dim,
    pos0,
    cap,
    n_splits,
    split_keys,
    group_heads,
    scale,
    _pad
});
const ATTENTION_COMBINE: Mirror = mirror!(AttentionCombineParams { n_tok, row0, n_head, head_dim, n_splits, _pad });

/// One kernel: its shader, the Rust struct mirroring its `Params`, and the
/// reduce files it is assembled with.
struct Case {
    shader: &'static str,
    rust: &'static Mirror,
    reduce: Reduce,
}

macro_rules! case {
    ($shader:literal, $mirror:ident, $reduce:ident) => {
        Case { shader: $shader, rust: &$mirror, reduce: Reduce::$reduce }
    };
}

/// Every kernel shader and its Rust mirror (see `Kernel::source` and the
/// `record_*`/`dispatch` call sites for which struct each one is given).
const CASES: &[Case] = &[
    case!("layer_norm.wgsl", LAYER_NORM, Either),
    case!("rms_norm.wgsl", RMS_NORM, Either),
    case!("rope.wgsl", ROPE, Either),
    case!("gelu.wgsl", GELU, Either),
    case!("token_shift.wgsl", TOKEN_SHIFT, Either),
    case!("gather_rows.wgsl", GATHER, Either),
    case!("linear.wgsl", LINEAR, Either),
    case!("linear_sg.wgsl", LINEAR, Subgroup),
    case!("linear_tex.wgsl", LINEAR_TEX, Subgroup),
    case!("linear_q.wgsl", LINEAR, Either),
    case!("linear_q_tex.wgsl", LINEAR_TEX, Subgroup),
    case!("linear_qx_tex.wgsl", LINEAR_TEX, Subgroup),
    case!("v7_prep.wgsl", V7_PREP, Either),
    case!("wkv7.wgsl", WKV7, Either),
    case!("wkv7_tex.wgsl", WKV7, Subgroup),
    case!("wkv5.wgsl", WKV5, Either),
    case!("wkv5_tex.wgsl", WKV5, Subgroup),
    case!("wkv4.wgsl", WKV4, Either),
    case!("group_norm.wgsl", GROUP_NORM, Either),
    case!("mul_add.wgsl", MUL_ADD, Either),
    case!("add_bias.wgsl", ADD_BIAS, Either),
    case!("swiglu.wgsl", SWIGLU, Either),
    case!("kv_write.wgsl", KV_WRITE, Either),
    case!("attention.wgsl", ATTENTION, Either),
    case!("attention_lanes.wgsl", ATTENTION, Subgroup),
    case!("attention_combine.wgsl", ATTENTION_COMBINE, Either),
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

/// The type of a WGSL struct member, if it is one a Rust mirror can have.
fn wgsl_ty(module: &Module, ty: Handle<Type>) -> Result<Ty, String> {
    match module.types[ty].inner {
        TypeInner::Scalar(s) => Ok(Ty::Scalar(s)),
        TypeInner::Array { base, size: ArraySize::Constant(n), .. } => match module.types[base].inner {
            TypeInner::Scalar(s) => Ok(Ty::Array(s, n.get())),
            ref other => Err(format!("an array of {other:?}")),
        },
        ref other => Err(format!("{other:?}")),
    }
}

/// The uniform at `@group(0) @binding(0)`: its struct's name, its span in
/// bytes and its members.
fn params_layout(module: &Module) -> Result<(&str, u32, Vec<Field<'_>>), String> {
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
    let name = ty.name.as_deref().unwrap_or("<unnamed>");
    let TypeInner::Struct { members, span } = &ty.inner else {
        return Err(format!("`{var_name}` at @group(0) @binding(0) is not a struct but {:?}", ty.inner));
    };
    let mut layouter = Layouter::default();
    layouter.update(module.to_ctx()).map_err(|e| format!("layout: {e}"))?;
    let mut fields = Vec::new();
    for m in members {
        let member = m.name.as_deref().unwrap_or("<unnamed>");
        let ty =
            wgsl_ty(module, m.ty).map_err(|e| format!("`{name}.{member}` is {e}, not a scalar or an array of one"))?;
        fields.push(Field { name: member, offset: m.offset, size: layouter[m.ty].size, ty });
    }
    Ok((name, *span, fields))
}

/// `fields` by offset, each run of adjacent padding fields merged into one.
fn by_offset<'a>(fields: &[Field<'a>]) -> BTreeMap<u32, Field<'a>> {
    let mut sorted = fields.to_vec();
    sorted.sort_by_key(|f| f.offset);
    let mut merged: Vec<Field> = Vec::new();
    for f in sorted {
        match merged.last_mut() {
            Some(last) if last.is_padding() && f.is_padding() && last.offset + last.size == f.offset => {
                last.size += f.size
            }
            _ => merged.push(f),
        }
    }
    merged.into_iter().map(|f| (f.offset, f)).collect()
}

/// Whether a WGSL and a Rust field (or run of padding) at one offset agree.
fn same(wgsl: &Field, rust: &Field) -> bool {
    match (wgsl.is_padding(), rust.is_padding()) {
        (true, true) => wgsl.size == rust.size,
        (false, false) => wgsl.name == rust.name && wgsl.ty == rust.ty,
        _ => false,
    }
}

fn describe(field: Option<&Field>) -> String {
    match field {
        None => "nothing starting there".into(),
        Some(f) if f.is_padding() => format!("{} bytes of padding", f.size),
        Some(f) => format!("`{}: {}`", f.name, f.ty),
    }
}

/// Everything wrong with `case` assembled with `reduce` (empty: all good).
fn check(case: &Case, reduce: &str) -> Vec<String> {
    let rust = case.rust;
    let what = format!("{} (with {reduce}) vs {}", case.shader, rust.name);
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
    if span as usize != rust.size {
        errors.push(format!(
            "{what}: WGSL `{name}` is {span} bytes ({} members), Rust `{}` is {} bytes",
            members.len(),
            rust.name,
            rust.size
        ));
    }
    let mut end = 0;
    for &Field { name: member, offset, size, .. } in &members {
        if offset % 4 != 0 {
            errors.push(format!("{what}: `{name}.{member}` at byte {offset}, not a multiple of 4"));
        }
        if offset != end {
            errors.push(format!("{what}: `{name}.{member}` at byte {offset}, expected {end} (implicit padding)"));
        }
        end = offset + size;
    }
    let sum: u32 = members.iter().map(|m| m.size).sum();
    if sum != span {
        errors.push(format!("{what}: `{name}` members sum to {sum} bytes but it spans {span} (implicit padding)"));
    }

    // Field by field: same names (padding aside), offsets and types.
    let (wgsl, rust_fields) = (by_offset(&members), by_offset(rust.fields));
    let offsets: BTreeSet<u32> = wgsl.keys().chain(rust_fields.keys()).copied().collect();
    for offset in offsets {
        let (w, r) = (wgsl.get(&offset), rust_fields.get(&offset));
        if !matches!((w, r), (Some(w), Some(r)) if same(w, r)) {
            errors.push(format!(
                "{what}: at byte {offset}, WGSL `{name}` has {}, Rust `{}` has {}",
                describe(w),
                rust.name,
                describe(r)
            ));
        }
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

/// Every Rust `Params` fits the 64-byte slot `slot_bytes` (in
/// `src/gpu/recorder.rs`) gives each dispatch in the params arena: a larger
/// one would overwrite the params of the next dispatch.
#[test]
fn params_fit_an_arena_slot() {
    let mut too_big: Vec<_> = CASES
        .iter()
        .filter(|c| c.rust.size > ARENA_SLOT_BYTES)
        .map(|c| format!("{} ({} bytes)", c.rust.name, c.rust.size))
        .collect();
    too_big.sort();
    too_big.dedup();
    assert!(
        too_big.is_empty(),
        "Params structs larger than the {ARENA_SLOT_BYTES}-byte params arena slot (`slot_bytes`): {too_big:?}"
    );
}
