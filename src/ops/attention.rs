//! The Transformer's attention ops: the KV-cache append and causal
//! attention over the cache (`kv_write.wgsl`, `attention.wgsl`,
//! `attention_combine.wgsl`). One sequence per call: each sequence's cache
//! is its own buffer, so sequences of different lengths share a step
//! without copying any cache.

use crate::error::{Error, Result};
use crate::gpu::kernels::{
    AttentionCombineParams, AttentionParams, KvDtype, KvWriteParams, ATTENTION_LANES_MAX_ACC, ATTENTION_LANES_MAX_G,
    ATTENTION_MAX_ACC, ATTENTION_MAX_G, ATTENTION_QS, MAX_ATTENTION_HEAD_DIM, WG,
};
use crate::gpu::{GpuBuffer, KernelPlan, Pipeline, Recorder};

/// The shape of a model's attention: query heads, KV heads, head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Checks what the kernels take: heads a whole multiple of the KV
    /// heads, the head dim a multiple of 4 up to MAX_ATTENTION_HEAD_DIM.
    pub fn new(n_head: usize, n_kv_head: usize, head_dim: usize) -> Result<Self> {
        if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(Error::UnsupportedShape(format!(
                "{n_head} attention heads over {n_kv_head} KV heads: the heads must be a whole multiple of the KV heads"
            )));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(4) || head_dim > MAX_ATTENTION_HEAD_DIM {
            return Err(Error::UnsupportedShape(format!(
                "head dim {head_dim}: a multiple of 4 up to {MAX_ATTENTION_HEAD_DIM} is supported"
            )));
        }
        Ok(Self { n_head, n_kv_head, head_dim })
    }

    /// Elements of the q part of a fused qkv row.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Elements of the k part (and of the v part) of a fused qkv row.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Elements per fused qkv row: q, k, v.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Query heads of one `attention.wgsl` workgroup: all heads sharing a
    /// KV head where the invocation's accumulators and the shared query
    /// rows allow.
    pub fn group_heads(&self, group_size: u32) -> usize {
        let hd4 = self.head_dim / 4;
        let per_lane = hd4.div_ceil(group_size as usize);
        let g = self.n_head / self.n_kv_head;
        g.min(ATTENTION_MAX_G).min(ATTENTION_MAX_ACC / per_lane).min(ATTENTION_QS / hd4).max(1)
    }

    /// Vec4 accumulators (and query vec4s) per query head per lane of
    /// `attention_lanes.wgsl`: a whole head row.
    fn lane_acc_per_head(&self) -> usize {
        self.head_dim / 4
    }

    /// Query heads of one `attention_lanes.wgsl` workgroup: the largest
    /// divisor of the heads per KV head whose accumulators fit a lane's.
    pub fn lane_group_heads(&self) -> usize {
        let per_head = self.lane_acc_per_head();
        let g_all = self.n_head / self.n_kv_head;
        (1..=g_all.min(ATTENTION_LANES_MAX_G))
            .rev()
            .find(|g| g_all.is_multiple_of(*g) && g * per_head <= ATTENTION_LANES_MAX_ACC)
            .unwrap_or(1)
    }

    /// Every attention pipeline `attention` may record for this shape and
    /// cache type (for compiling at load).
    pub fn kernels(&self, plan: &KernelPlan, dtype: KvDtype) -> Vec<Pipeline> {
        match self.kernel(plan, dtype).0 {
            Pipeline::AttentionLanes { dtype, hd4, g } if g > 1 => {
                vec![Pipeline::AttentionLanes { dtype, hd4, g }, Pipeline::AttentionLanes { dtype, hd4, g: 1 }]
            }
            p => vec![p],
        }
    }

    /// The attention pipeline the plan runs for this shape and cache type,
    /// and its query heads per workgroup.
    pub fn kernel(&self, plan: &KernelPlan, dtype: KvDtype) -> (Pipeline, usize) {
        // attention_lanes reads 16 bytes a load: 8 f16 or 4 f32 elements.
        let whole_slices = dtype == KvDtype::F32 || self.head_dim.is_multiple_of(8);
        if plan.attention_by_lanes() && whole_slices {
            let g = self.lane_group_heads();
            (Pipeline::AttentionLanes { dtype, hd4: (self.head_dim / 4) as u32, g: g as u32 }, g)
        } else {
            (Pipeline::Attention(dtype), self.group_heads(plan.group_size()))
        }
    }
}

/// The threads a CPU adapter runs workgroups on (llvmpipe starts one per
/// core): an `attention_lanes` dispatch of fewer than two workgroups per
/// thread runs one query head per workgroup instead (see `attention`).
fn cpu_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(4, |n| n.get()))
}

/// Keys per lane per tile of `attention_lanes.wgsl` (its `KB`).
const LANES_KB: usize = 4;

/// llvmpipe (lavapipe) silently stops a loop nest after 65535 iterations
/// in all; a split's tile loop stays below this many.
const LOOP_BUDGET: usize = 60_000;

/// Positions per split of `attention.wgsl` for this shape and workgroup
/// size: `preferred` (a multiple of the group size), lowered where a
/// split's loop iterations would pass LOOP_BUDGET.
pub fn split_keys(shape: &AttentionShape, plan: &KernelPlan, dtype: KvDtype, preferred: usize) -> usize {
    let gs = plan.group_size() as usize;
    let hd4 = shape.head_dim / 4;
    let per_tile = if let (Pipeline::AttentionLanes { g, .. }, _) = shape.kernel(plan, dtype) {
        // attention_lanes, per tile of LANES_KB keys per lane: the scores
        // and the p·v loop (head_dim/4 x KB x g each), the softmax update.
        let g = g as usize;
        2 * hd4 * (1 + LANES_KB * (g + 1)) + g * (3 * LANES_KB + 4) + 2 * LANES_KB
    } else {
        // attention: the score loop, the softmax update, the p·v loop.
        let gh = shape.group_heads(gs as u32);
        let nj = hd4.div_ceil(gs);
        hd4 * (gh + 1) + gh * (nj + 1) + gs * (gh + nj * (gh + 1) + 1) + 4
    };
    let tiles = (LOOP_BUDGET / per_tile).max(1);
    (tiles * gs).min(preferred.max(gs)) / gs * gs
}

/// What `attention` runs with: the shape, the cache type, the split size
/// and the step buffers.
pub struct Attention<'a> {
    pub shape: AttentionShape,
    pub dtype: KvDtype,
    /// Positions per split (`split_keys`).
    pub split_keys: usize,
    /// `[rows, qkv_dim]` the fused projections, q and k rotated.
    pub qkv: &'a GpuBuffer,
    /// `[rows, q_dim]` the output.
    pub out: &'a GpuBuffer,
    /// `[part_slots, n_head, 1 + head_dim / 4]` vec4s of split partials.
    pub part: &'a GpuBuffer,
    pub part_slots: usize,
}

impl Attention<'_> {
    /// Longest context (positions) the partial buffer's slots allow.
    pub fn max_positions(&self) -> usize {
        self.split_keys * self.part_slots
    }

    /// Vec4s of `part` for `slots` (query row, split) pairs.
    pub fn part_len(shape: &AttentionShape, slots: usize) -> usize {
        slots * shape.n_head * (1 + shape.head_dim / 4)
    }
}

/// Appends rows `row0 .. row0 + n` of `qkv` (their k and v parts) to a
/// cache layer `[2, cap, kv_dim]` at positions `pos0 ..`.
#[allow(clippy::too_many_arguments)]
pub fn kv_write<'a>(
    rec: &mut Recorder<'a>,
    op: &Attention<'a>,
    cache: &'a GpuBuffer, // [2, cap, kv_dim]
    cap: usize,
    row0: usize,
    n: usize,
    pos0: usize,
) -> Result<()> {
    if pos0 + n > cap {
        return Err(Error::InvalidArgument(format!("kv_write: positions {pos0}..{} past the cache's {cap}", pos0 + n)));
    }
    let s = &op.shape;
    let p = KvWriteParams {
        n_tok: n as u32,
        row0: row0 as u32,
        qkv_stride: s.qkv_dim() as u32,
        k_offset: s.q_dim() as u32,
        kv_dim: s.kv_dim() as u32,
        pos0: pos0 as u32,
        cap: cap as u32,
        _pad: 0,
    };
    let groups = [(s.kv_dim() as u32 / 4).div_ceil(WG), n as u32, 1];
    rec.dispatch(Pipeline::KvWrite(op.dtype), &p, &[op.qkv, cache], groups)
}

/// Causal attention of rows `row0 .. row0 + n` (positions `pos0 ..`) over
/// a cache layer already holding positions `0 .. pos0 + n`, into `op.out`.
/// Splits of `split_keys` positions run in parallel workgroups and are
/// merged by `attention_combine.wgsl`; rows go in as many dispatches as the
/// partial buffer takes.
#[allow(clippy::too_many_arguments)]
pub fn attention<'a>(
    rec: &mut Recorder<'a>,
    op: &Attention<'a>,
    cache: &'a GpuBuffer, // [2, cap, kv_dim]
    cap: usize,
    row0: usize,
    n: usize,
    pos0: usize,
) -> Result<()> {
    let s = &op.shape;
    let positions = pos0 + n;
    if positions > cap {
        return Err(Error::InvalidArgument(format!("attention: {positions} positions past the cache's {cap}")));
    }
    let n_splits = positions.div_ceil(op.split_keys).max(1);
    if n_splits > op.part_slots {
        return Err(Error::InvalidArgument(format!(
            "attention over {positions} positions: at most {} fit the split buffer",
            op.max_positions()
        )));
    }
    let rows_per = if n_splits == 1 { n } else { (op.part_slots / n_splits).max(1) };
    let (mut pipeline, mut gh) = s.kernel(rec.ctx().plan(), op.dtype);
    if let Pipeline::AttentionLanes { dtype, hd4, g } = pipeline {
        // Too few workgroups to fill the cores (a short context: one split
        // per KV head): one query head each instead, reading the keys once
        // per head. Each head's arithmetic is the same either way.
        let groups = s.n_kv_head * (s.n_head / s.n_kv_head / g as usize) * rows_per.min(n) * n_splits;
        if g > 1 && groups < 2 * cpu_threads() {
            (pipeline, gh) = (Pipeline::AttentionLanes { dtype, hd4, g: 1 }, 1);
        }
    }
    let per_kv = (s.n_head / s.n_kv_head).div_ceil(gh);
    let mut t0 = 0;
    while t0 < n {
        let m = rows_per.min(n - t0);
        let p = AttentionParams {
            n_tok: m as u32,
            row0: (row0 + t0) as u32,
            t0: t0 as u32,
            qkv_stride: s.qkv_dim() as u32,
            n_head: s.n_head as u32,
            n_kv_head: s.n_kv_head as u32,
            head_dim: s.head_dim as u32,
            pos0: pos0 as u32,
            cap: cap as u32,
            n_splits: n_splits as u32,
            split_keys: op.split_keys as u32,
            group_heads: gh as u32,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            _pad: [0; 3],
        };
        let groups = [(s.n_kv_head * per_kv) as u32, m as u32, n_splits as u32];
        rec.dispatch(pipeline, &p, &[op.qkv, cache, op.out, op.part], groups)?;
        if n_splits > 1 {
            let c = AttentionCombineParams {
                n_tok: m as u32,
                row0: (row0 + t0) as u32,
                n_head: s.n_head as u32,
                head_dim: s.head_dim as u32,
                n_splits: n_splits as u32,
                _pad: [0; 3],
            };
            rec.dispatch(Pipeline::AttentionCombine, &c, &[op.part, op.out], [s.n_head as u32, m as u32, 1])?;
        }
        t0 += m;
    }
    Ok(())
}
