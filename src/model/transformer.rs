//! The Transformer baseline: decoder-only Llama, Qwen2 and GPT-NeoX models
//! from Hugging Face folders, on the same matrix kernels, norms, recorder,
//! engine and sessions as RWKV. What it keeps between tokens is a KV cache
//! per sequence (`state::KvLayout`), which grows with the context.
//!
//! Per layer, for the tokens x of a step (rows n):
//! ```text
//!  1. xn = Norm(x, input_layernorm)         RMSNorm (Llama, Qwen2) or LayerNorm with bias (GPT-NeoX)
//!  2. qkv = xn Wqkv (+ b)                   q, k, v projections fused: [q heads | k heads | v heads]
//!  3. q, k = RoPE(q, k) at each row's position   rotate-half on the first rotary_dim channels of each head
//!  4. per sequence: cache[pos0 ..] = k, v; att = softmax(q k^T / sqrt(d), causal) v   (grouped-query)
//!  5. x = x + att Wo (+ b)
//!  6. Llama, Qwen2:  x = x + (silu(xn2 Wgate) * (xn2 Wup)) Wdown,   xn2 = RMSNorm(x, post_attention_layernorm)
//!     GPT-NeoX:      x = x + gelu(xn2 W4h + b) W4 + b,  xn2 = LayerNorm(x_in, post_attention_layernorm)
//!                    with x_in the layer's input (parallel residual) or x after step 5 (sequential)
//! ```
//! then `logits = Norm(x, final norm) head` (`Model::record_head`).
//!
//! Official names, one line per tensor at load. Two fusions are made at load
//! and are exact (rows only move): q, k and v become one matrix (GPT-NeoX's
//! `query_key_value`, stored per head as (q, k, v) blocks, is regrouped the
//! same way), and Llama's gate and up projections become one [2F, C] matrix.

use crate::error::{Error, Result};
use crate::gpu::kernels::{Act, KvDtype, Pipeline};
use crate::gpu::{GpuBuffer, GpuContext, Recorder};
use crate::loader::hf::{Family, HfFolder, HfWeights, TransformerConfig};
use crate::matrix::{tally, Matrix};
use crate::model::info::Progress;
use crate::model::step::Step;
use crate::ops::{self, Attention, AttentionShape};
use crate::quant::{Encoding, Format};
use crate::state::{KvLayout, KvLimit, StateLayout};
use crate::tensor::{Dtype, Tensor};

/// Positions per split of the attention kernel where the loop budget of
/// llvmpipe allows (see `ops::attention::split_keys`): a 32k-token decode
/// step then runs 64 splits per KV head in parallel.
pub const SPLIT_KEYS: usize = 512;
/// (query row, split) pairs the attention's partial buffer holds: with
/// SPLIT_KEYS, contexts up to 512 x 512 = 262144 positions.
pub const PART_SLOTS: usize = 512;

/// A layer's normalisation: weights (and bias) at slots of the layer's
/// vector buffer.
#[derive(Debug, Clone, Copy)]
enum Norm {
    Rms { w: usize },
    Layer { w: usize, b: usize },
}

// Slots of each layer's vector buffer `vecs [VEC_COUNT, W]` (W the widest
// vector: 2F, qkv_dim or C).
const NORM1_W: usize = 0;
const NORM1_B: usize = 1;
const NORM2_W: usize = 2;
const NORM2_B: usize = 3;
const QKV_B: usize = 4;
const O_B: usize = 5;
const UP_B: usize = 6;
const DOWN_B: usize = 7;
/// GPT-NeoX's parallel residual: dense.bias + dense_4h_to_h.bias, added once.
const OUT_B: usize = 8;
const VEC_COUNT: usize = 9;

pub struct Block {
    vecs: GpuBuffer, // [VEC_COUNT, W]
    qkv: Matrix,     // [q_dim + 2 kv_dim, C]
    o: Matrix,       // [C, q_dim]
    up: Matrix,      // Llama, Qwen2: [2F, C] gate then up; GPT-NeoX: [F, C]
    down: Matrix,    // [C, F]
}

/// The layers of a Transformer and what every step needs of its config.
pub struct Layers {
    pub config: TransformerConfig,
    pub shape: AttentionShape,
    pub kv_dtype: KvDtype,
    pub split_keys: usize,
    /// RoPE inverse frequencies `[rotary_dim / 2]` f32, as transformers computes them.
    pub inv_freq: Vec<f32>,
    /// Elements per slot of each block's `vecs`.
    width: usize,
    blocks: Vec<Block>,
}

/// What loading returns besides the layers.
pub struct Loaded {
    pub layers: Layers,
    pub head: Matrix,
    /// Final norm weight and bias (zero for RMSNorm), `[2, C]`.
    pub final_norm: Vec<f32>,
    pub parameters: u64,
    pub gpu_bytes: u64,
    /// GPU bytes of the matrices by encoding.
    pub matrices: Vec<(Encoding, u64)>,
    pub dtype: Dtype,
    pub layout: StateLayout,
}

/// Official tensor names per family.
struct Names {
    embed: &'static str,
    head: &'static str,
    final_norm: &'static str,
}

impl Family {
    fn names(self) -> Names {
        match self {
            Family::Llama | Family::Qwen2 => {
                Names { embed: "model.embed_tokens.weight", head: "lm_head.weight", final_norm: "model.norm" }
            }
            Family::GptNeoX => Names {
                embed: "gpt_neox.embed_in.weight",
                head: "embed_out.weight",
                final_norm: "gpt_neox.final_layer_norm",
            },
        }
    }
}

/// The embedding's official name for `family`.
pub fn embedding_name(family: Family) -> &'static str {
    family.names().embed
}

/// Reads a folder's tensors by official name, checking shapes and dtype,
/// counting parameters and GPU bytes, dropping each tensor's file pages
/// once uploaded and reporting progress.
struct HfLoader<'f> {
    ctx: &'f GpuContext,
    w: &'f HfWeights,
    dtype: Dtype,
    quant: Option<Format>,
    max_part: u64,
    parameters: u64,
    gpu_bytes: u64,
    matrices: Vec<(Encoding, u64)>,
    done: u64,
    total: u64,
    progress: Option<Progress>,
}

impl<'f> HfLoader<'f> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor<'f>> {
        let t = self.w.get(name)?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch { name: name.into(), expected: shape.to_vec(), found: t.shape.to_vec() });
        }
        if t.dtype != self.dtype {
            return Err(Error::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{} (the model's other weights are {})", t.dtype.name(), self.dtype.name()),
            });
        }
        Ok(t)
    }

    fn finish(&mut self, t: &Tensor) {
        self.parameters += t.len() as u64;
        self.done += t.bytes.len() as u64;
        self.w.release(t);
        if let Some(p) = &self.progress {
            p(self.done.min(self.total), self.total);
        }
    }

    /// A vector widened to f32 into `dst`.
    fn vector(&mut self, name: &str, dst: &mut [f32]) -> Result<()> {
        let t = self.tensor(name, &[dst.len()])?;
        dst.copy_from_slice(&t.to_f32());
        self.finish(&t);
        Ok(())
    }

    /// Several `[rows_i, cols]` tensors stacked by rows into one matrix;
    /// `order` (if given) lists, for each output row block of `block` rows,
    /// the row block of the concatenation it takes (GPT-NeoX's regrouping).
    fn stacked(
        &mut self,
        what: &str,
        parts: &[(&str, usize)],
        cols: usize,
        order: Option<(&[usize], usize)>,
    ) -> Result<Matrix> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let row_bytes = cols * self.dtype.size();
        let mut bytes = Vec::with_capacity(rows * row_bytes);
        for &(name, r) in parts {
            let t = self.tensor(name, &[r, cols])?;
            bytes.extend_from_slice(t.bytes);
            self.finish(&t);
        }
        if let Some((order, block)) = order {
            let b = block * row_bytes;
            let src = std::mem::take(&mut bytes);
            for &i in order {
                bytes.extend_from_slice(&src[i * b..(i + 1) * b]);
            }
        }
        let store = self.ctx.weight_store();
        let m = Matrix::upload_encoded(
            self.ctx,
            store,
            what,
            self.quant,
            self.dtype,
            rows,
            cols,
            &bytes,
            self.max_part,
            None,
        )?;
        self.gpu_bytes += m.bytes();
        tally(&mut self.matrices, &m);
        Ok(m)
    }

    fn vectors(&mut self, what: &str, v: &[f32]) -> Result<GpuBuffer> {
        let b = self.ctx.storage_f32(what, v)?;
        self.gpu_bytes += b.size();
        Ok(b)
    }
}

/// GPT-NeoX's `query_key_value` rows are per head (q, k, v) blocks of
/// head_dim rows; this is the order that regroups them as all q heads, all
/// k heads, all v heads.
fn neox_qkv_order(n_head: usize) -> Vec<usize> {
    let mut order = Vec::with_capacity(3 * n_head);
    for part in 0..3 {
        for h in 0..n_head {
            order.push(h * 3 + part);
        }
    }
    order
}

/// Loads the layers, the final norm and the head of a folder.
pub fn load(
    ctx: &GpuContext,
    folder: &HfFolder,
    kv_dtype: KvDtype,
    quant: Option<Format>,
    max_part: u64,
    progress: Option<Progress>,
) -> Result<Loaded> {
    let cfg = &folder.config;
    let w = &folder.weights;
    let (c, f) = (cfg.hidden, cfg.ffn);
    let shape = AttentionShape::new(cfg.n_head, cfg.n_kv_head, cfg.head_dim)?;
    let (q_dim, kv_dim, qkv_dim) = (shape.q_dim(), shape.kv_dim(), shape.qkv_dim());
    if !c.is_multiple_of(4) || !f.is_multiple_of(4) {
        return Err(Error::UnsupportedShape(format!(
            "hidden size {c} and intermediate size {f} must be multiples of 4"
        )));
    }
    let names = cfg.family.names();
    let dtype = w.get(names.embed)?.dtype;
    let total = w.files().iter().map(|f| f.data_bytes()).sum();
    let mut ld = HfLoader {
        ctx,
        w,
        dtype,
        quant,
        max_part,
        parameters: 0,
        gpu_bytes: 0,
        matrices: Vec::new(),
        done: 0,
        total,
        progress,
    };
    // The embedding stays in the files (read by row, see `Model::embed`).
    let emb = ld.tensor(names.embed, &[cfg.vocab, c])?;
    ld.finish(&emb);

    let width = (2 * f).max(qkv_dim).max(c);
    let neox = cfg.family == Family::GptNeoX;
    let mut blocks = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let mut v = vec![0f32; VEC_COUNT * width];
        let at = |s: usize, n: usize| s * width..s * width + n;
        let block = match cfg.family {
            Family::Llama | Family::Qwen2 => {
                let p = format!("model.layers.{i}.");
                ld.vector(&format!("{p}input_layernorm.weight"), &mut v[at(NORM1_W, c)])?;
                ld.vector(&format!("{p}post_attention_layernorm.weight"), &mut v[at(NORM2_W, c)])?;
                let a = format!("{p}self_attn.");
                let qkv = ld.stacked(
                    "qkv",
                    &[
                        (&format!("{a}q_proj.weight"), q_dim),
                        (&format!("{a}k_proj.weight"), kv_dim),
                        (&format!("{a}v_proj.weight"), kv_dim),
                    ],
                    c,
                    None,
                )?;
                if cfg.family == Family::Qwen2 {
                    let b = QKV_B * width;
                    ld.vector(&format!("{a}q_proj.bias"), &mut v[b..b + q_dim])?;
                    ld.vector(&format!("{a}k_proj.bias"), &mut v[b + q_dim..b + q_dim + kv_dim])?;
                    ld.vector(&format!("{a}v_proj.bias"), &mut v[b + q_dim + kv_dim..b + qkv_dim])?;
                }
                let o = ld.stacked("o_proj", &[(&format!("{a}o_proj.weight"), c)], q_dim, None)?;
                let m = format!("{p}mlp.");
                let up = ld.stacked(
                    "gate_up",
                    &[(&format!("{m}gate_proj.weight"), f), (&format!("{m}up_proj.weight"), f)],
                    c,
                    None,
                )?;
                let down = ld.stacked("down_proj", &[(&format!("{m}down_proj.weight"), c)], f, None)?;
                Block { vecs: ld.vectors("layer vectors", &v)?, qkv, o, up, down }
            }
            Family::GptNeoX => {
                let p = format!("gpt_neox.layers.{i}.");
                for (name, s) in [("input_layernorm", NORM1_W), ("post_attention_layernorm", NORM2_W)] {
                    ld.vector(&format!("{p}{name}.weight"), &mut v[at(s, c)])?;
                    ld.vector(&format!("{p}{name}.bias"), &mut v[at(s + 1, c)])?;
                }
                let a = format!("{p}attention.");
                let order = neox_qkv_order(cfg.n_head);
                let qkv = ld.stacked(
                    "query_key_value",
                    &[(&format!("{a}query_key_value.weight"), 3 * q_dim)],
                    c,
                    Some((&order, cfg.head_dim)),
                )?;
                let mut b = vec![0f32; 3 * q_dim];
                ld.vector(&format!("{a}query_key_value.bias"), &mut b)?;
                let hd = cfg.head_dim;
                for (o, &i) in order.iter().enumerate() {
                    v[QKV_B * width + o * hd..QKV_B * width + (o + 1) * hd].copy_from_slice(&b[i * hd..(i + 1) * hd]);
                }
                let o = ld.stacked("dense", &[(&format!("{a}dense.weight"), c)], q_dim, None)?;
                ld.vector(&format!("{a}dense.bias"), &mut v[at(O_B, c)])?;
                let m = format!("{p}mlp.");
                let up = ld.stacked("dense_h_to_4h", &[(&format!("{m}dense_h_to_4h.weight"), f)], c, None)?;
                ld.vector(&format!("{m}dense_h_to_4h.bias"), &mut v[at(UP_B, f)])?;
                let down = ld.stacked("dense_4h_to_h", &[(&format!("{m}dense_4h_to_h.weight"), c)], f, None)?;
                ld.vector(&format!("{m}dense_4h_to_h.bias"), &mut v[at(DOWN_B, c)])?;
                for j in 0..c {
                    v[OUT_B * width + j] = v[O_B * width + j] + v[DOWN_B * width + j];
                }
                Block { vecs: ld.vectors("layer vectors", &v)?, qkv, o, up, down }
            }
        };
        blocks.push(block);
    }
    let mut final_norm = vec![0f32; 2 * c];
    ld.vector(&format!("{}.weight", names.final_norm), &mut final_norm[..c])?;
    if neox {
        ld.vector(&format!("{}.bias", names.final_norm), &mut final_norm[c..])?;
    }
    let head = if cfg.tied {
        // The head is the embedding: uploaded (once more) as a matrix.
        let t = w.get(names.embed)?;
        let (store, v) = (ctx.weight_store(), cfg.vocab);
        let m = Matrix::upload_encoded(ctx, store, "head (tied)", quant, dtype, v, c, t.bytes, max_part, None)?;
        w.release(&t);
        ld.gpu_bytes += m.bytes();
        tally(&mut ld.matrices, &m);
        m
    } else {
        ld.stacked(names.head, &[(names.head, cfg.vocab)], c, None)?
    };
    let split_keys = ops::attention::split_keys(&shape, ctx.plan(), kv_dtype, SPLIT_KEYS);
    // One layer's cache buffer must fit a binding; the splits the partial buffer.
    let kv = KvLayout {
        n_kv_head: cfg.n_kv_head,
        head_dim: cfg.head_dim,
        dtype: kv_dtype,
        max_positions: 0,
        limited_by: KvLimit::Binding,
    };
    let by_binding = (ctx.max_binding_bytes() / kv.bytes_per_position_layer()) as usize;
    let by_splits = split_keys * PART_SLOTS;
    let (max_positions, limited_by) =
        if by_binding <= by_splits { (by_binding, KvLimit::Binding) } else { (by_splits, KvLimit::AttentionSplits) };
    let layout = StateLayout::kv_cache(cfg.n_layer, KvLayout { max_positions, limited_by, ..kv });
    let layers =
        Layers { config: cfg.clone(), shape, kv_dtype, split_keys, inv_freq: cfg.rope.inv_freq(), width, blocks };
    let (parameters, gpu_bytes, matrices) = (ld.parameters, ld.gpu_bytes, ld.matrices);
    Ok(Loaded { layers, head, final_norm, parameters, gpu_bytes, matrices, dtype, layout })
}

impl Layers {
    fn norm1(&self) -> Norm {
        match self.config.family {
            Family::GptNeoX => Norm::Layer { w: NORM1_W, b: NORM1_B },
            _ => Norm::Rms { w: NORM1_W },
        }
    }

    fn norm2(&self) -> Norm {
        match self.config.family {
            Family::GptNeoX => Norm::Layer { w: NORM2_W, b: NORM2_B },
            _ => Norm::Rms { w: NORM2_W },
        }
    }

    /// The pipelines these layers record, for compiling at load.
    pub fn pipelines(&self, ctx: &GpuContext) -> Vec<Pipeline> {
        let plan = ctx.plan();
        let mut v = vec![Pipeline::Rope, Pipeline::KvWrite(self.kv_dtype), Pipeline::AttentionCombine];
        v.extend(self.shape.kernels(plan, self.kv_dtype));
        match self.config.family {
            Family::GptNeoX => v.extend([plan.layer_norm(), Pipeline::AddBias, Pipeline::Gelu]),
            Family::Qwen2 => v.extend([plan.rms_norm(), Pipeline::AddBias, Pipeline::Swiglu]),
            Family::Llama => v.extend([plan.rms_norm(), Pipeline::Swiglu]),
        }
        v
    }

    /// The matrices' (rows, columns), for the small-tile pipelines.
    pub fn matrix_shapes(&self) -> Vec<(usize, usize)> {
        let b = &self.blocks[0];
        [&b.qkv, &b.o, &b.up, &b.down].iter().map(|m| (m.rows, m.cols)).collect()
    }

    /// Widest per-token row of the step buffers (elements).
    pub fn widest_row(&self) -> usize {
        self.width.max(self.config.ffn * 2)
    }

    fn norm<'a>(
        &self,
        rec: &mut Recorder<'a>,
        norm: Norm,
        x: &'a GpuBuffer,
        y: &'a GpuBuffer,
        vecs: &'a GpuBuffer,
        n: usize,
    ) -> Result<()> {
        let (c, eps) = (self.config.hidden, self.config.norm_eps as f32);
        match norm {
            Norm::Rms { w } => ops::rms_norm(rec, x, y, vecs, w * self.width, n, c, eps),
            Norm::Layer { w, b } => ops::layer_norm(rec, x, y, vecs, w * self.width, b * self.width, n, c, eps),
        }
    }

    /// Records every layer for one step (see the module doc). The rows of
    /// `s.x` hold the embeddings; each sequence's rows read and extend its
    /// own cache (`step.kv`), at the positions whose (cos, sin) pairs the
    /// engine wrote to `t.cs`.
    pub fn record<'a>(&'a self, rec: &mut Recorder<'a>, step: &Step<'a>) -> Result<()> {
        let (s, n) = (step.s, step.n());
        let t = s.transformer.as_ref().expect("transformer step buffers");
        let cfg = &self.config;
        let (c, f, w) = (cfg.hidden, cfg.ffn, self.width);
        let sh = &self.shape;
        let op = Attention {
            shape: *sh,
            dtype: self.kv_dtype,
            split_keys: self.split_keys,
            qkv: &t.qkv,
            out: &t.att,
            part: &t.part,
            part_slots: t.part_slots,
        };
        let neox = cfg.family == Family::GptNeoX;
        let parallel = neox && cfg.parallel_residual;
        for (l, b) in self.blocks.iter().enumerate() {
            // 1. xn = norm1(x) (and, for a parallel residual, xn2 = norm2(x) now).
            self.norm(rec, self.norm1(), &s.x, &s.xx, &b.vecs, n)?;
            if parallel {
                self.norm(rec, self.norm2(), &s.x, &s.y, &b.vecs, n)?;
            }
            // 2. qkv = xn Wqkv (+ b).
            b.qkv.linear(rec, &s.xx, 0, &t.qkv, 0, n, Act::None, false)?;
            if cfg.family != Family::Llama {
                ops::add_bias(rec, &t.qkv, 0, sh.qkv_dim(), n, sh.qkv_dim(), &b.vecs, QKV_B * w)?;
            }
            // 3. RoPE on the q and k heads (adjacent in each row).
            let heads = sh.n_head + sh.n_kv_head;
            ops::rope(rec, &t.qkv, &t.cs, n, heads, sh.head_dim, cfg.rope.rotary_dim, sh.qkv_dim(), 0)?;
            // 4. Per sequence: append k, v to its cache; attend over it.
            for (seq, kv) in step.kv.iter().enumerate() {
                let (r0, r1) = (step.chunk.seq_start[seq] as usize, step.chunk.seq_start[seq + 1] as usize);
                if r1 == r0 {
                    continue;
                }
                let cache = &kv.layers[l];
                ops::kv_write(rec, &op, cache, kv.cap, r0, r1 - r0, kv.pos0)?;
                ops::attention(rec, &op, cache, kv.cap, r0, r1 - r0, kv.pos0)?;
            }
            // 5. x += att Wo (+ b).
            b.o.linear(rec, &t.att, 0, &s.x, 0, n, Act::None, true)?;
            if neox && !parallel {
                ops::add_bias(rec, &s.x, 0, c, n, c, &b.vecs, O_B * w)?;
            }
            // 6. The MLP.
            if neox {
                if !parallel {
                    self.norm(rec, self.norm2(), &s.x, &s.y, &b.vecs, n)?;
                }
                b.up.linear(rec, &s.y, 0, &t.h, 0, n, Act::None, false)?;
                ops::add_bias(rec, &t.h, 0, f, n, f, &b.vecs, UP_B * w)?;
                ops::gelu(rec, &t.h, 0, n * f)?;
                b.down.linear(rec, &t.h, 0, &s.x, 0, n, Act::None, true)?;
                let bias = if parallel { OUT_B } else { DOWN_B };
                ops::add_bias(rec, &s.x, 0, c, n, c, &b.vecs, bias * w)?;
            } else {
                self.norm(rec, self.norm2(), &s.x, &s.xx, &b.vecs, n)?;
                b.up.linear(rec, &s.xx, 0, &t.h, 0, n, Act::None, false)?;
                ops::swiglu(rec, &t.h, &s.ffn, n, f)?;
                b.down.linear(rec, &s.ffn, 0, &s.x, 0, n, Act::None, true)?;
            }
        }
        Ok(())
    }
}
