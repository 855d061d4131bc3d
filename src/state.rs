//! The state a model carries between tokens, on the GPU.
//!
//! RWKV's is recurrent: f32, one buffer per layer holding `[batch, stride]`
//! floats, where each layer of each sequence is a run of named fields (v7:
//! `att_x [C]`, `ffn_x [C]`, `att_kv [H, N, N]`). Its size is fixed by the
//! model and the batch: it never grows with the tokens read.
//!
//! A Transformer's is its KV cache ([`KvLayout`]): per sequence, one buffer
//! per layer holding `[2, cap, n_kv_head, head_dim]` (keys, then values) in
//! f16 or f32, grown in blocks of KV_BLOCK positions as tokens are read.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gpu::kernels::KvDtype;
use crate::gpu::{GpuBuffer, GpuContext, READBACK, STORAGE};
use crate::loader::SafeTensorsFile;
use crate::sampler::SplitMix64;

/// One field of a layer's state.
#[derive(Debug, Clone)]
pub struct StateField {
    pub name: &'static str,
    /// Shape of the field within one layer (e.g. `[C]` or `[H, N, N]`).
    pub shape: Vec<usize>,
    /// Element offset within the layer's run.
    pub offset: usize,
    /// Value of the fresh state.
    pub init: f32,
    /// Kept on the GPU with its last two axes swapped (`[H, N, N]` matrices
    /// transposed: v5/v6's official [key, value] stored as [value, key], the
    /// layout their WKV kernels read row by row). `read` and `write` use the
    /// official layout.
    pub transposed: bool,
}

impl StateField {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Copies one layer's values between the official layout (`official`)
    /// and the GPU layout (`gpu`), in the direction `to_gpu`.
    fn convert(&self, official: &mut [f32], gpu: &mut [f32], to_gpu: bool) {
        if !self.transposed {
            if to_gpu {
                gpu.copy_from_slice(official);
            } else {
                official.copy_from_slice(gpu);
            }
            return;
        }
        let n = self.shape[self.shape.len() - 1];
        let m = self.shape[self.shape.len() - 2];
        for (o, g) in official.chunks_exact_mut(m * n).zip(gpu.chunks_exact_mut(m * n)) {
            for a in 0..m {
                for b in 0..n {
                    // official [a, b] <-> gpu [b, a]
                    if to_gpu {
                        g[b * m + a] = o[a * n + b];
                    } else {
                        o[a * n + b] = g[b * m + a];
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where each field lives; made by the model.
#[derive(Debug, Clone)]
pub struct StateLayout {
    pub n_layer: usize,
    pub fields: Vec<StateField>,
    /// Floats per layer per sequence.
    pub stride: usize,
    /// A Transformer's KV cache (then there are no fields).
    pub kv: Option<KvLayout>,
}

/// Positions a KV cache grows by (at least; it grows by half its size
/// when that is more, so a long prompt does not copy its cache often).
pub const KV_BLOCK: usize = 256;

/// The KV cache of a Transformer: what one position of one layer holds.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayout {
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
    /// Most positions a sequence's cache may hold: one layer's buffer must
    /// fit a storage binding, and the attention's split buffer the splits.
    pub max_positions: usize,
    /// Which of the two sets `max_positions`.
    pub limited_by: KvLimit,
}

/// What bounds a KV cache's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLimit {
    /// One layer's cache must fit a storage binding.
    Binding,
    /// The attention's buffer of split partial results holds that many splits.
    AttentionSplits,
}

impl KvLayout {
    /// Bytes one position takes in one layer (its key and its value).
    pub fn bytes_per_position_layer(&self) -> u64 {
        (2 * self.n_kv_head * self.head_dim * self.dtype.size()) as u64
    }
}

impl StateLayout {
    pub fn new(n_layer: usize, fields: &[(&'static str, Vec<usize>, f32)]) -> Self {
        let mut offset = 0;
        let fields = fields
            .iter()
            .map(|(name, shape, init)| {
                let f = StateField { name, shape: shape.clone(), offset, init: *init, transposed: false };
                offset += f.len();
                f
            })
            .collect();
        Self { n_layer, fields, stride: offset, kv: None }
    }

    /// A Transformer's KV cache layout.
    pub fn kv_cache(n_layer: usize, kv: KvLayout) -> Self {
        Self { n_layer, fields: Vec::new(), stride: 0, kv: Some(kv) }
    }

    /// Bytes a sequence's KV cache takes per position (all layers); 0 for
    /// a recurrent state.
    pub fn kv_bytes_per_position(&self) -> u64 {
        self.kv.as_ref().map_or(0, |kv| self.n_layer as u64 * kv.bytes_per_position_layer())
    }

    /// Marks `name` as stored transposed in its last two axes (see
    /// `StateField::transposed`).
    pub fn transposed(mut self, name: &str) -> Self {
        for f in self.fields.iter_mut().filter(|f| f.name == name) {
            f.transposed = true;
        }
        self
    }

    pub fn field(&self, name: &str) -> Option<&StateField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Bytes of state per sequence.
    pub fn bytes_per_sequence(&self) -> u64 {
        (self.n_layer * self.stride * 4) as u64
    }

    fn fresh_layer(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.stride];
        for f in &self.fields {
            v[f.offset..f.offset + f.len()].fill(f.init);
        }
        v
    }
}

/// One sequence's state on the CPU: each field stacked over layers, in the
/// layout of the golden files (`att_x [L, C]`, `att_kv [L, H, N, N]`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct StateData {
    /// (name, shape including the leading layer axis, values)
    pub fields: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl StateData {
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.fields.iter().find(|f| f.0 == name).map(|f| f.2.as_slice())
    }
}

/// One sequence's KV cache.
pub(crate) struct KvSeq {
    /// Positions read so far.
    pub len: usize,
    /// Positions the buffers hold.
    pub cap: usize,
    /// One `[2, cap, kv_dim]` buffer per layer (none while `cap` is 0).
    pub layers: Vec<GpuBuffer>,
}

/// The GPU state of `batch` sequences.
pub struct State {
    ctx: GpuContext,
    layout: StateLayout,
    batch: usize,
    /// One `[batch, stride]` f32 buffer per layer (recurrent states).
    pub(crate) layers: Vec<GpuBuffer>,
    /// One KV cache per sequence (Transformers).
    pub(crate) kv: Vec<KvSeq>,
}

impl State {
    pub(crate) fn new(ctx: &GpuContext, layout: StateLayout, batch: usize) -> Result<Self> {
        if batch == 0 {
            return Err(Error::InvalidArgument("a state needs a batch of at least 1".into()));
        }
        if layout.kv.is_some() {
            let kv = (0..batch).map(|_| KvSeq { len: 0, cap: 0, layers: Vec::new() }).collect();
            return Ok(Self { ctx: ctx.clone(), layout, batch, layers: Vec::new(), kv });
        }
        // Each layer's [batch, stride] buffer is bound whole by the kernels.
        let max = (ctx.max_binding_bytes() / (layout.stride * 4).max(1) as u64) as usize;
        if batch > max {
            return Err(Error::InvalidArgument(format!(
                "a state of {batch} sequences: each layer's {} bytes per sequence allow at most {max} in one binding",
                layout.stride * 4
            )));
        }
        let fresh = layout.fresh_layer();
        let mut all = Vec::with_capacity(batch * layout.stride);
        for _ in 0..batch {
            all.extend_from_slice(&fresh);
        }
        let layers = (0..layout.n_layer).map(|_| ctx.storage_f32("state", &all)).collect::<Result<_>>()?;
        Ok(Self { ctx: ctx.clone(), layout, batch, layers, kv: Vec::new() })
    }

    /// Tokens sequence `seq` has read into its KV cache (a recurrent state
    /// does not count them: 0).
    pub fn context_len(&self, seq: usize) -> usize {
        self.kv.get(seq).map_or(0, |k| k.len)
    }

    /// Makes sequence `seq`'s KV cache hold `positions` positions, growing
    /// it by at least KV_BLOCK (or half its size) with its contents copied.
    /// Past the layout's limit or the GPU memory limit, the error names the
    /// context length that fits.
    pub(crate) fn kv_reserve(&mut self, seq: usize, positions: usize) -> Result<()> {
        let cap = self.kv.get(seq).map_or(0, |s| s.cap);
        let grown = (cap + cap / 2).max(positions).next_multiple_of(KV_BLOCK);
        self.kv_grow(seq, positions, grown)
    }

    /// Makes room in sequence `seq`'s KV cache for `positions` positions
    /// now, exactly, so that the steps up to that context neither grow nor
    /// copy it (an application that knows its context length; a benchmark).
    /// Nothing for a recurrent state, whose size is fixed.
    pub fn reserve(&mut self, seq: usize, positions: usize) -> Result<()> {
        self.check_seq(seq)?;
        self.kv_grow(seq, positions, positions)
    }

    /// Grows sequence `seq`'s cache to hold at least `positions` positions,
    /// to `wanted` of them if the limits allow.
    fn kv_grow(&mut self, seq: usize, positions: usize, wanted: usize) -> Result<()> {
        let Some(kv) = self.layout.kv.clone() else { return Ok(()) };
        let cur = &self.kv[seq];
        if positions <= cur.cap {
            return Ok(());
        }
        let per_layer = kv.bytes_per_position_layer();
        let n_layer = self.layout.n_layer as u64;
        if positions > kv.max_positions {
            return Err(Error::ContextTooLong {
                tokens: positions,
                fits: kv.max_positions,
                why: match kv.limited_by {
                    KvLimit::Binding => {
                        format!("one layer's KV cache must fit a storage binding ({per_layer} bytes per position)")
                    }
                    KvLimit::AttentionSplits => "the attention kernel's split buffer holds no more positions".into(),
                },
            });
        }
        let mut cap = wanted.max(positions).min(kv.max_positions);
        // Grow by as much as the memory limit allows, but at least to `positions`.
        let layers = loop {
            match self.alloc_kv(cap) {
                Ok(l) => break l,
                Err(Error::MemoryLimit { limit, .. }) if cap > positions => {
                    // Measured after the failed attempt's layers were freed again.
                    let free = limit.saturating_sub(self.ctx.allocated_bytes()) / (per_layer * n_layer);
                    cap = (free as usize).max(positions).min(cap - 1);
                }
                Err(Error::MemoryLimit { limit, .. }) => {
                    // What fits: the old cache stays allocated while it is copied into
                    // the new one, so the longest context reachable now is the larger
                    // of the current capacity and what the free bytes hold.
                    let free = limit.saturating_sub(self.ctx.allocated_bytes());
                    let fits = (cur.cap as u64).max(free / (per_layer * n_layer)) as usize;
                    return Err(Error::ContextTooLong {
                        tokens: positions,
                        fits,
                        why: format!(
                            "the GPU memory limit of {limit} bytes ({} bytes of KV cache per token)",
                            per_layer * n_layer
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        };
        let cur = &self.kv[seq];
        if cur.len > 0 {
            let mut enc = self.ctx.device().create_command_encoder(&Default::default());
            let half = per_layer / 2; // bytes of one position's keys (or values)
            for (old, new) in cur.layers.iter().zip(&layers) {
                let used = cur.len as u64 * half;
                enc.copy_buffer_to_buffer(old.raw(), 0, new.raw(), 0, used);
                enc.copy_buffer_to_buffer(old.raw(), cur.cap as u64 * half, new.raw(), cap as u64 * half, used);
            }
            self.ctx.queue().submit([enc.finish()]);
        }
        let s = &mut self.kv[seq];
        s.layers = layers;
        s.cap = cap;
        self.ctx.check()
    }

    fn alloc_kv(&self, cap: usize) -> Result<Vec<GpuBuffer>> {
        let kv = self.layout.kv.as_ref().expect("a KV layout");
        let bytes = cap as u64 * kv.bytes_per_position_layer();
        (0..self.layout.n_layer).map(|_| self.ctx.buffer("KV cache", bytes, STORAGE)).collect()
    }

    /// Marks `n` more positions of sequence `seq`'s KV cache as read.
    pub(crate) fn kv_advance(&mut self, seq: usize, n: usize) {
        if let Some(k) = self.kv.get_mut(seq) {
            k.len += n;
        }
    }

    /// Forgets all but the first `len` tokens sequence `seq`'s KV cache has
    /// read (its buffers are kept), as if only those had been read: to
    /// regenerate an answer, or to decode again from the same context.
    /// A recurrent state cannot go back: an error, unless `len` is 0 (then
    /// it is a reset).
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        self.check_seq(seq)?;
        if self.layout.kv.is_none() {
            if len == 0 {
                return self.reset(Some(seq));
            }
            return Err(Error::InvalidArgument(
                "a recurrent state holds no tokens to go back to: reset it, or keep a clone".into(),
            ));
        }
        let s = &mut self.kv[seq];
        if len > s.len {
            return Err(Error::InvalidArgument(format!(
                "truncating sequence {seq} to {len} tokens: it has read only {}",
                s.len
            )));
        }
        s.len = len;
        Ok(())
    }

    /// Fills sequence `seq`'s state with deterministic pseudo-random values
    /// in [-1, 1): a KV cache of `context` positions, or a recurrent state
    /// (whose size does not depend on `context`). For benchmarks: a decode
    /// step's cost depends on the cache's length, not on its content, and a
    /// real prefill of a long context takes minutes on a CPU adapter.
    pub fn fill_random(&mut self, seq: usize, context: usize, seed: u64) -> Result<()> {
        self.check_seq(seq)?;
        // Written in pieces of at most this many values (4 MiB of f32).
        const PIECE: usize = 1 << 20;
        let mut rng = SplitMix64(seed ^ 0xF111_0000 ^ (seq as u64) << 32);
        let Some(kv) = self.layout.kv.clone() else {
            let row = (self.layout.stride * 4) as u64;
            for buf in &self.layers {
                let v: Vec<f32> = (0..self.layout.stride).map(|_| uniform(&mut rng)).collect();
                self.ctx.queue().write_buffer(buf.raw(), seq as u64 * row, bytemuck::cast_slice(&v));
            }
            return self.ctx.check();
        };
        self.kv[seq].len = 0;
        self.kv_reserve(seq, context.max(1))?;
        let s = &mut self.kv[seq];
        let half = kv.bytes_per_position_layer() / 2;
        let per_half = context * kv.n_kv_head * kv.head_dim;
        for buf in &s.layers {
            for base in [0, s.cap as u64 * half] {
                let mut done = 0;
                while done < per_half {
                    let n = PIECE.min(per_half - done);
                    let offset = base + (done * kv.dtype.size()) as u64;
                    let v: Vec<f32> = (0..n).map(|_| uniform(&mut rng)).collect();
                    match kv.dtype {
                        KvDtype::F32 => self.ctx.queue().write_buffer(buf.raw(), offset, bytemuck::cast_slice(&v)),
                        KvDtype::F16 => {
                            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                            self.ctx.queue().write_buffer(buf.raw(), offset, bytemuck::cast_slice(&h));
                        }
                    }
                    done += n;
                }
            }
            // Staged uploads of one layer at a time, not of the whole cache.
            self.ctx.queue().submit([]);
        }
        s.len = context;
        self.ctx.check()
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn layout(&self) -> &StateLayout {
        &self.layout
    }

    /// The context the state's buffers live on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// One `[batch, stride]` f32 buffer per layer.
    pub(crate) fn buffers(&self) -> &[GpuBuffer] {
        &self.layers
    }

    /// Total GPU bytes of this state (a KV cache's as allocated).
    pub fn bytes(&self) -> u64 {
        self.layers.iter().chain(self.kv.iter().flat_map(|s| &s.layers)).map(|b| b.size()).sum()
    }

    fn check_seq(&self, seq: usize) -> Result<()> {
        if seq >= self.batch {
            return Err(Error::InvalidArgument(format!(
                "sequence {seq} is out of range for a state of batch {}",
                self.batch
            )));
        }
        Ok(())
    }

    /// Copies one sequence's state back to the CPU.
    pub fn read(&self, seq: usize) -> Result<StateData> {
        self.check_seq(seq)?;
        if let Some(kv) = &self.layout.kv {
            return self.read_kv(seq, kv);
        }
        let row = (self.layout.stride * 4) as u64;
        let l = self.layout.n_layer;
        let staging = self.ctx.buffer("state readback", row * l as u64, READBACK)?;
        let mut enc = self.ctx.device().create_command_encoder(&Default::default());
        for (i, buf) in self.layers.iter().enumerate() {
            enc.copy_buffer_to_buffer(buf.raw(), seq as u64 * row, staging.raw(), i as u64 * row, row);
        }
        self.ctx.queue().submit([enc.finish()]);
        let mut bytes = vec![0u8; (row * l as u64) as usize];
        self.ctx.map_read(&staging, &mut bytes)?;
        let flat: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        let fields = self
            .layout
            .fields
            .iter()
            .map(|f| {
                let mut values = vec![0f32; l * f.len()];
                let mut gpu = vec![0f32; f.len()];
                for (layer, out) in values.chunks_exact_mut(f.len()).enumerate() {
                    let start = layer * self.layout.stride + f.offset;
                    gpu.copy_from_slice(&flat[start..start + f.len()]);
                    f.convert(out, &mut gpu, false);
                }
                let mut shape = vec![l];
                shape.extend_from_slice(&f.shape);
                (f.name.to_string(), shape, values)
            })
            .collect();
        Ok(StateData { fields })
    }

    /// Overwrites one sequence's state. Every field of the layout must be
    /// present with its exact shape.
    pub fn write(&mut self, seq: usize, data: &StateData) -> Result<()> {
        self.check_seq(seq)?;
        if let Some(kv) = self.layout.kv.clone() {
            return self.write_kv(seq, &kv, data);
        }
        let l = self.layout.n_layer;
        let mut layers = vec![self.layout.fresh_layer(); l];
        for f in &self.layout.fields {
            let mut expected = vec![l];
            expected.extend_from_slice(&f.shape);
            let (_, shape, values) = data
                .fields
                .iter()
                .find(|d| d.0 == f.name)
                .ok_or_else(|| Error::MissingTensor { name: format!("state.{}", f.name) })?;
            if *shape != expected || values.len() != l * f.len() {
                return Err(Error::ShapeMismatch { name: format!("state.{}", f.name), expected, found: shape.clone() });
            }
            for (layer, dst) in layers.iter_mut().enumerate() {
                let mut official = values[layer * f.len()..(layer + 1) * f.len()].to_vec();
                f.convert(&mut official, &mut dst[f.offset..f.offset + f.len()], true);
            }
        }
        let row = (self.layout.stride * 4) as u64;
        for (buf, values) in self.layers.iter().zip(&layers) {
            self.ctx.queue().write_buffer(buf.raw(), seq as u64 * row, bytemuck::cast_slice(values));
        }
        self.ctx.check()
    }

    /// A KV cache as fields `key` and `value`, `[L, len, n_kv_head, head_dim]` f32.
    fn read_kv(&self, seq: usize, kv: &KvLayout) -> Result<StateData> {
        let s = &self.kv[seq];
        let l = self.layout.n_layer;
        let half = kv.bytes_per_position_layer() / 2;
        let used = s.len as u64 * half;
        let mut keys = Vec::with_capacity(l * s.len * kv.n_kv_head * kv.head_dim);
        let mut values = keys.clone();
        for buf in &s.layers {
            for (out, offset) in [(&mut keys, 0), (&mut values, s.cap as u64 * half)] {
                let bytes = self.ctx.read_bytes(buf, offset, used)?;
                match kv.dtype {
                    KvDtype::F32 => out.extend_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)),
                    KvDtype::F16 => out.extend(
                        bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes).into_iter().map(half::f16::to_f32),
                    ),
                }
            }
        }
        let shape = vec![l, s.len, kv.n_kv_head, kv.head_dim];
        Ok(StateData { fields: vec![("key".into(), shape.clone(), keys), ("value".into(), shape, values)] })
    }

    /// Replaces a KV cache by fields `key` and `value` as `read` gives them.
    fn write_kv(&mut self, seq: usize, kv: &KvLayout, data: &StateData) -> Result<()> {
        let l = self.layout.n_layer;
        let get = |name: &str| {
            data.fields
                .iter()
                .find(|f| f.0 == name)
                .ok_or_else(|| Error::MissingTensor { name: format!("state.{name}") })
        };
        let (keys, values) = (get("key")?, get("value")?);
        let len = keys.1.get(1).copied().unwrap_or(0);
        let expected = vec![l, len, kv.n_kv_head, kv.head_dim];
        for f in [keys, values] {
            if f.1 != expected || f.2.len() != expected.iter().product::<usize>() {
                return Err(Error::ShapeMismatch { name: format!("state.{}", f.0), expected, found: f.1.clone() });
            }
        }
        self.kv[seq].len = 0;
        self.kv_reserve(seq, len.max(1))?;
        let s = &mut self.kv[seq];
        let per_layer = len * kv.n_kv_head * kv.head_dim;
        let half = kv.bytes_per_position_layer() / 2;
        for (i, buf) in s.layers.iter().enumerate() {
            for (src, offset) in [(&keys.2, 0), (&values.2, s.cap as u64 * half)] {
                let v = &src[i * per_layer..(i + 1) * per_layer];
                match kv.dtype {
                    KvDtype::F32 => self.ctx.queue().write_buffer(buf.raw(), offset, bytemuck::cast_slice(v)),
                    KvDtype::F16 => {
                        let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                        self.ctx.queue().write_buffer(buf.raw(), offset, bytemuck::cast_slice(&h));
                    }
                }
            }
        }
        s.len = len;
        self.ctx.check()
    }

    /// Returns sequence `seq` (or every sequence, with `None`) to the fresh state.
    pub fn reset(&mut self, seq: Option<usize>) -> Result<()> {
        if self.layout.kv.is_some() {
            // Emptied, its buffers kept for the next context.
            if let Some(s) = seq {
                self.check_seq(s)?;
            }
            for (i, k) in self.kv.iter_mut().enumerate() {
                if seq.is_none_or(|s| s == i) {
                    k.len = 0;
                }
            }
            return Ok(());
        }
        let fresh = self.layout.fresh_layer();
        let row = (self.layout.stride * 4) as u64;
        let seqs: Vec<usize> = match seq {
            Some(s) => {
                self.check_seq(s)?;
                vec![s]
            }
            None => (0..self.batch).collect(),
        };
        if fresh.iter().all(|v| *v == 0.0) {
            // Cleared on the GPU: no upload (a batch of 32 states of the 0.1B
            // shape would otherwise stage 77 MB).
            let mut enc = self.ctx.device().create_command_encoder(&Default::default());
            for buf in &self.layers {
                for &s in &seqs {
                    enc.clear_buffer(buf.raw(), s as u64 * row, Some(row));
                }
            }
            self.ctx.queue().submit([enc.finish()]);
        } else {
            for buf in &self.layers {
                for &s in &seqs {
                    self.ctx.queue().write_buffer(buf.raw(), s as u64 * row, bytemuck::cast_slice(&fresh));
                }
            }
        }
        self.ctx.check()
    }

    /// A new state with the same contents, copied on the GPU.
    pub fn try_clone(&self) -> Result<State> {
        if self.layout.kv.is_some() {
            let mut enc = self.ctx.device().create_command_encoder(&Default::default());
            let mut kv = Vec::with_capacity(self.kv.len());
            for s in &self.kv {
                let layers = s
                    .layers
                    .iter()
                    .map(|b| {
                        let n = self.ctx.buffer("KV cache", b.size(), STORAGE)?;
                        enc.copy_buffer_to_buffer(b.raw(), 0, n.raw(), 0, b.size());
                        Ok(n)
                    })
                    .collect::<Result<Vec<_>>>()?;
                kv.push(KvSeq { len: s.len, cap: s.cap, layers });
            }
            self.ctx.queue().submit([enc.finish()]);
            self.ctx.check()?;
            return Ok(State {
                ctx: self.ctx.clone(),
                layout: self.layout.clone(),
                batch: self.batch,
                layers: Vec::new(),
                kv,
            });
        }
        let layers =
            self.layers.iter().map(|b| self.ctx.buffer("state", b.size(), STORAGE)).collect::<Result<Vec<_>>>()?;
        let mut enc = self.ctx.device().create_command_encoder(&Default::default());
        for (src, dst) in self.layers.iter().zip(&layers) {
            enc.copy_buffer_to_buffer(src.raw(), 0, dst.raw(), 0, src.size());
        }
        self.ctx.queue().submit([enc.finish()]);
        self.ctx.check()?;
        Ok(State { ctx: self.ctx.clone(), layout: self.layout.clone(), batch: self.batch, layers, kv: Vec::new() })
    }
}

/// Uniform in [-1, 1), for `State::fill_random`.
fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// The `format` metadata of a saved state.
const STATE_FORMAT: &str = "rwkv-wgpu state";

/// Writes one sequence's state as safetensors: one f32 tensor per field with
/// its layer axis first (`att_x [L, C]`, `ffn_x [L, C]`, `att_kv [L, H, N, N]`
/// in the official [head, key, value] order of each generation; v4's
/// `att_x`, `ffn_x`, `aa`, `bb`, `pp`), the names and layout of the
/// reference fixtures' states. Written atomically
/// ([`crate::files::write_atomic`]): a failed save leaves no partial file,
/// and `path` must not be one of `inputs` (the model file in use, say).
pub fn save(state: &StateData, path: &Path, inputs: &[&Path]) -> Result<()> {
    let bad = |detail: String| Error::InvalidArgument(format!("saving the state to {}: {detail}", path.display()));
    let views: Vec<(String, safetensors::tensor::TensorView)> = state
        .fields
        .iter()
        .map(|(name, shape, values)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(values),
            )
            .map_err(|e| bad(format!("field {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), STATE_FORMAT.to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))?;
    crate::files::write_atomic(path, inputs, crate::files::Overwrite::Replace, |tmp| {
        std::fs::write(tmp, &bytes).map_err(|source| Error::Io { path: path.to_path_buf(), error: source })
    })
}

/// Reads a state written by [`save`] for `layout`: exactly the layout's
/// fields with their shapes (nothing else of the file is read, so naming a
/// model file reads no weights), every value finite. Errors name the file.
pub fn load(path: &Path, layout: &StateLayout) -> Result<StateData> {
    load_from(&SafeTensorsFile::open(path)?, layout)
}

/// As [`load`], from an opened file.
pub fn load_from(f: &SafeTensorsFile, layout: &StateLayout) -> Result<StateData> {
    let bad = |detail: String| Error::BadState { path: f.path().to_path_buf(), detail };
    let mut fields = Vec::new();
    if let Some(kv) = &layout.kv {
        // A KV cache: `key` and `value` [L, len, n_kv_head, head_dim], len from the file.
        let len = f
            .shape("key")
            .and_then(|s| s.get(1).copied())
            .ok_or_else(|| bad("no `key` tensor: not a KV cache saved from a Transformer".into()))?;
        if len > kv.max_positions {
            return Err(bad(format!("{len} positions of KV cache; this model holds at most {}", kv.max_positions)));
        }
        for name in ["key", "value"] {
            let shape = vec![layout.n_layer, len, kv.n_kv_head, kv.head_dim];
            let t = f.expect(name, &shape).map_err(|e| bad(e.to_string()))?;
            let values = t.to_f32();
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("field `{name}` holds {} at element {i}", values[i])));
            }
            fields.push((name.to_string(), shape, values));
        }
    }
    for field in &layout.fields {
        let mut shape = vec![layout.n_layer];
        shape.extend_from_slice(&field.shape);
        let t = f.expect(field.name, &shape).map_err(|e| bad(e.to_string()))?;
        let values = t.to_f32();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("field `{}` holds {} at element {i}", field.name, values[i])));
        }
        fields.push((field.name.to_string(), shape, values));
    }
    Ok(StateData { fields })
}

/// Reads an official state-tuning file (`blocks.N.att.time_state [H, N, N]`
/// for every layer, RWKV-5 to 7) as one sequence's state for `layout`: the
/// token-shift parts are zero and att_kv is the tuned matrix. The tuning
/// code stores it as [head, value i, key j], the layout the GPU keeps
/// (RWKV-7's own; v5/v6's transposed one, whose official [key, value]
/// order is restored here as ChatRWKV does).
pub fn load_tuned(path: &Path, layout: &StateLayout) -> Result<StateData> {
    load_tuned_from(&SafeTensorsFile::open(path)?, layout)
}

/// As [`load_tuned`], from an opened file.
pub fn load_tuned_from(f: &SafeTensorsFile, layout: &StateLayout) -> Result<StateData> {
    let path = f.path();
    let bad = |detail: String| Error::BadState { path: path.to_path_buf(), detail };
    let kv = layout.field("att_kv").ok_or_else(|| {
        Error::InvalidArgument(
            "state tuning is for RWKV-5 to 7: this model (RWKV-4 or a Transformer) has no att_kv matrix state".into(),
        )
    })?;
    let [h, n, _] = kv.shape[..] else {
        return Err(Error::InvalidArgument(format!("att_kv of shape {:?} is not [H, N, N]", kv.shape)));
    };
    let l = layout.n_layer;
    if f.contains(&format!("blocks.{l}.att.time_state")) {
        return Err(bad(format!("tuned for a model of more than this one's {l} layers")));
    }
    let mut values = Vec::with_capacity(l * h * n * n);
    for layer in 0..l {
        let t = f.expect(&format!("blocks.{layer}.att.time_state"), &[h, n, n])?;
        let v = t.to_f32();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("blocks.{layer}.att.time_state holds {} at element {i}", v[i])));
        }
        if kv.transposed {
            for head in 0..h {
                let m = &v[head * n * n..(head + 1) * n * n];
                values.extend((0..n * n).map(|e| m[(e % n) * n + e / n]));
            }
        } else {
            values.extend_from_slice(&v);
        }
    }
    let fields = layout
        .fields
        .iter()
        .map(|field| {
            let mut shape = vec![l];
            shape.extend_from_slice(&field.shape);
            let data = if field.name == "att_kv" { values.clone() } else { vec![field.init; l * field.len()] };
            (field.name.to_string(), shape, data)
        })
        .collect();
    Ok(StateData { fields })
}

/// A state-tuning file (it has `blocks.0.att.time_state`) or a saved state,
/// whichever `path` holds.
pub fn load_any(path: &Path, layout: &StateLayout) -> Result<StateData> {
    let f = SafeTensorsFile::open(path)?;
    if f.contains("blocks.0.att.time_state") {
        load_tuned_from(&f, layout)
    } else {
        load_from(&f, layout)
    }
}
