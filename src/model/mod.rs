//! A loaded model: the immutable weights of one RWKV checkpoint and their
//! info. It is `Send + Sync` and shared as `Arc<Model>` by every engine and
//! session that runs it; running it (per-step buffers, the parameter arena)
//! is the job of [`crate::engine::Engine`].
//!
//! The generations live one per file (`v4.rs` .. `v7.rs`) on top of the
//! shared step (`step.rs`) and loading (`load.rs`) code; this file holds the
//! one match over the generations, for loading, compiling and recording.

pub mod info;
pub mod load;
pub mod step;
pub mod transformer;
pub mod v4;
pub mod v5;
pub mod v6;
pub mod v7;

pub use info::{Arch, Family, ModelInfo, Progress, Version};
pub use step::{Chunk, GN_EPS, LN_EPS};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::kernels::KvDtype;
use crate::gpu::{GpuBuffer, GpuContext, Pipeline, Recorder};
use crate::loader::hf::{HfFolder, HfWeights};
use crate::loader::SafeTensorsFile;
use crate::matrix::Matrix;
use crate::quant::{Encoding, Format};
use crate::state::{State, StateLayout};
use crate::tensor::Tensor;
use load::{BlockLoader, Dims};
use step::{Scratch, Step};

/// The end-of-text token of RWKV World and of the NeoX/BPE vocabularies RWKV uses.
pub const RWKV_EOS: u32 = 0;

/// Detects the generation from tensor names and shapes:
/// `r_k` → 7, `time_maa_x` → 6, `ln_x` without a gate → 5.0,
/// `time_decay` of shape `[H]` → 5.1, `[H, N]` → 5.2, otherwise 4.
pub fn detect_version(f: &SafeTensorsFile) -> Result<Version> {
    if !f.contains("emb.weight") || !f.contains("blocks.0.ln1.weight") {
        let mut names: Vec<&str> = f.names().collect();
        names.sort_unstable();
        let shown: Vec<&str> = names.iter().take(8).copied().collect();
        return Err(Error::NotRwkv {
            path: f.path().to_path_buf(),
            detail: format!(
                "no `emb.weight` / `blocks.0.ln1.weight`; found {} tensors: [{}{}]",
                names.len(),
                shown.join(", "),
                if names.len() > shown.len() { ", ..." } else { "" }
            ),
        });
    }
    let a = "blocks.0.att.";
    let has = |n: &str| f.contains(&format!("{a}{n}"));
    Ok(if has("r_k") {
        Version::V7
    } else if has("time_maa_x") {
        Version::V6
    } else if has("ln_x.weight") {
        if !has("gate.weight") {
            Version::V5_0
        } else if f.shape(&format!("{a}time_decay")).is_some_and(|s| s.len() == 1) {
            Version::V5_1
        } else {
            Version::V5_2
        }
    } else if has("time_first") && has("time_decay") && has("time_mix_k") {
        Version::V4
    } else {
        let mut names: Vec<String> = f
            .names()
            .filter(|n| n.starts_with("blocks.0."))
            .map(|n| format!("{n} {:?}", f.shape(n).unwrap_or(&[])))
            .collect();
        names.sort_unstable();
        return Err(Error::NotRwkv {
            path: f.path().to_path_buf(),
            detail: format!(
                "no RWKV generation's layout (4: att.time_first/time_decay/time_mix_k, 5: att.ln_x, 6: att.time_maa_x, \
                 7: att.r_k); block 0 has: [{}]",
                names.join(", ")
            ),
        });
    })
}

/// Which logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// `[vocab]` for the last token of each sequence (empty for a sequence given no tokens).
    Last,
    /// `[tokens, vocab]` for every token of each sequence.
    All,
}

#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Split weight matrices into parts of at most this many bytes (default:
    /// the adapter's storage-binding limit). Smaller values exist for tests.
    pub max_part_bytes: Option<u64>,
    /// Upload progress callback (the CLI draws a progress bar with it).
    pub progress: Option<Progress>,
    /// A Transformer's KV cache element type (f16 unless set).
    pub kv_cache: KvDtype,
    /// Quantize the weight matrices (the head and LoRAs included) to this
    /// format as they are uploaded; `None` keeps the checkpoint's floats.
    pub quant: Option<Format>,
}

/// The layers of each generation.
pub(crate) enum Layers {
    V4(Vec<v4::Block>),
    V5(Vec<v5::Block>),
    V6(Vec<v6::Block>),
    V7(Vec<v7::Block>),
    Transformer(Box<transformer::Layers>),
}

// Slots of the model-wide vector buffer `globals [4, C]` (a Transformer's
// final norm weight and bias take the ln_out slots).
const LN0_W: usize = 0;
const LN0_B: usize = 1;
const LNOUT_W: usize = 2;
const LNOUT_B: usize = 3;

/// A loaded model: its weights on the GPU and their info. Immutable once
/// loaded, so it is shared (`Arc<Model>`) by any number of engines and
/// sessions on any threads.
pub struct Model {
    ctx: GpuContext,
    info: ModelInfo,
    layout: StateLayout,
    /// Widest LoRA, padded as stored (columns of the `lora` planes).
    d_lora_max: usize,
    /// The checkpoint (or a folder's shards), kept mapped for the embedding
    /// [V, C]: it is read one row per token on the CPU (as llama.cpp does),
    /// so its V x C table never takes GPU memory and only the rows used
    /// become resident.
    weights: HfWeights,
    /// The embedding's official name (`emb.weight`, `model.embed_tokens.weight`, ...).
    emb_name: &'static str,
    /// The checkpoint file, or a Transformer's folder.
    path: PathBuf,
    globals: GpuBuffer, // [4, C]: ln0 w/b, ln_out w/b
    layers: Layers,
    head: Matrix, // [V, C]
}

// A model is shared across threads (sessions, the batcher, a C handle).
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
};

impl Model {
    /// Loads an RWKV checkpoint (`.safetensors` or `.pth`) with the official
    /// tensor names, or a Hugging Face Transformer folder (`config.json`
    /// and `model.safetensors` or shards).
    pub fn load(ctx: &GpuContext, path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::load_folder(ctx, path, opts);
        }
        Self::from_file(ctx, SafeTensorsFile::open(path)?, opts)
    }

    /// Loads a Hugging Face folder of a Llama, Qwen2 or GPT-NeoX model.
    pub fn load_folder(ctx: &GpuContext, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::from_folder(ctx, HfFolder::open(dir)?, opts)
    }

    /// Loads an opened folder (or one made in memory: a config and an
    /// opened weights file, as `rwkv compare` makes a synthetic one).
    pub fn from_folder(ctx: &GpuContext, folder: HfFolder, opts: &LoadOptions) -> Result<Self> {
        let cfg = folder.config.clone();
        let max_part = opts.max_part_bytes.unwrap_or(u64::MAX).min(ctx.max_binding_bytes());
        let l = transformer::load(ctx, &folder, opts.kv_cache, opts.quant, max_part, opts.progress.clone())?;
        let c = cfg.hidden;
        let mut g = vec![0f32; 4 * c];
        g[LNOUT_W * c..(LNOUT_W + 2) * c].copy_from_slice(&l.final_norm);
        let globals = ctx.storage_f32("final norm", &g)?;
        let info = ModelInfo {
            arch: Arch::Transformer(cfg.family),
            n_layer: cfg.n_layer,
            n_embd: c,
            n_head: cfg.n_head,
            head_size: cfg.head_dim,
            n_kv_head: cfg.n_kv_head,
            vocab: cfg.vocab,
            ffn: cfg.ffn,
            lora: Vec::new(),
            dtype: l.dtype,
            parameters: l.parameters,
            weight_bytes: folder.weights.files().iter().map(|f| f.data_bytes()).sum(),
            gpu_weight_bytes: l.gpu_bytes + globals.size(),
            quant: opts.quant,
            matrix_bytes: l.matrices,
            state_bytes_per_sequence: 0,
            kv_bytes_per_token: l.layout.kv_bytes_per_position(),
            eos: cfg.eos.clone(),
        };
        let model = Self {
            ctx: ctx.clone(),
            info,
            layout: l.layout,
            d_lora_max: 0,
            weights: folder.weights,
            emb_name: transformer::embedding_name(cfg.family),
            path: folder.dir,
            globals,
            layers: Layers::Transformer(Box::new(l.layers)),
            head: l.head,
        };
        for p in model.pipelines() {
            ctx.pipeline(p)?;
        }
        crate::gpu::trim_heap();
        Ok(model)
    }

    /// Loads from an opened checkpoint (a mapped file or built-in bytes):
    /// the generation and the head shape from the tensors, the pipelines it
    /// will use compiled, then ln0, the layers, ln_out and the head uploaded.
    pub fn from_file(ctx: &GpuContext, file: SafeTensorsFile, opts: &LoadOptions) -> Result<Self> {
        let version = detect_version(&file)?;
        let f = &file;
        let d = Dims::read(f)?;
        let (n_head, head_size) = match version {
            Version::V4 => (0, 0),
            Version::V5_0 | Version::V5_1 | Version::V5_2 => v5::heads(f, d.c, version)?,
            Version::V6 => v6::heads(f, d.c)?,
            Version::V7 => v7::heads(f, d.c)?,
        };
        let ffn = f.shape("blocks.0.ffn.key.weight").and_then(|s| s.first().copied()).unwrap_or(d.c);
        // A pre-quantized file's format is the model's: its other matrices
        // (LoRAs) are quantized to it at load.
        let quant = match (crate::quant::file_format(f.metadata())?, opts.quant) {
            (Some(stored), Some(asked)) if stored != asked => {
                return Err(Error::InvalidArgument(format!(
                    "{} is pre-quantized to {stored}: --quant {asked} cannot re-quantize it (leave --quant out, \
                     or quantize the float checkpoint)",
                    f.path().display()
                )))
            }
            (Some(stored), _) => Some(stored),
            (None, asked) => asked,
        };
        compile_pipelines(ctx, version, &d, head_size, ffn, quant)?;

        let max_part = opts.max_part_bytes.unwrap_or(u64::MAX).min(ctx.max_binding_bytes());
        let mut ld = BlockLoader::new(ctx, f, d.c, quant, max_part, opts.progress.clone());
        // The embedding stays in the file (see `Model::file`); its pages are
        // dropped now and read back row by row as tokens use them.
        ld.skip("emb.weight")?;
        let mut g = vec![0f32; 4 * d.c];
        ld.vec_into(&mut g, LN0_W, "blocks.0.ln0.weight", &[d.c])?;
        ld.vec_into(&mut g, LN0_B, "blocks.0.ln0.bias", &[d.c])?;
        ld.vec_into(&mut g, LNOUT_W, "ln_out.weight", &[d.c])?;
        ld.vec_into(&mut g, LNOUT_B, "ln_out.bias", &[d.c])?;
        let globals = ld.vectors("ln0/ln_out", &g)?;

        let (layers, ffn, lora, layout) = match version {
            Version::V4 => {
                let l = v4::load(&mut ld, &d)?;
                (Layers::V4(l.blocks), l.ffn, l.lora, l.layout)
            }
            Version::V5_0 | Version::V5_1 | Version::V5_2 => {
                let l = v5::load(&mut ld, &d, version, n_head, head_size)?;
                (Layers::V5(l.blocks), l.ffn, l.lora, l.layout)
            }
            Version::V6 => {
                let l = v6::load(&mut ld, &d, n_head, head_size)?;
                (Layers::V6(l.blocks), l.ffn, l.lora, l.layout)
            }
            Version::V7 => {
                let l = v7::load(&mut ld, &d, n_head, head_size)?;
                (Layers::V7(l.blocks), l.ffn, l.lora, l.layout)
            }
        };
        let head = ld.mat("head.weight", d.vocab, d.c)?;
        let d_lora_max = lora.iter().map(|&(_, w)| ctx.plan().lora_rank(w)).max().unwrap_or(0);
        let info = ModelInfo {
            arch: Arch::Rwkv(version),
            n_layer: d.n_layer,
            n_embd: d.c,
            n_head,
            head_size,
            n_kv_head: 0,
            vocab: d.vocab,
            ffn,
            lora,
            dtype: d.dtype,
            parameters: ld.parameters,
            weight_bytes: f.data_bytes(),
            gpu_weight_bytes: ld.gpu_bytes,
            quant,
            matrix_bytes: ld.matrices.clone(),
            state_bytes_per_sequence: layout.bytes_per_sequence(),
            kv_bytes_per_token: 0,
            eos: vec![RWKV_EOS],
        };
        let path = file.path().to_path_buf();
        let weights = HfWeights::single(file);
        Ok(Self {
            ctx: ctx.clone(),
            info,
            layout,
            d_lora_max,
            weights,
            emb_name: "emb.weight",
            path,
            globals,
            layers,
            head,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The checkpoint's path (a name, for a built-in model; the folder, for
    /// a Transformer).
    pub fn file_path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a Transformer (its state is a KV cache).
    pub fn is_transformer(&self) -> bool {
        matches!(self.layers, Layers::Transformer(_))
    }

    /// The Transformer's layers, if it is one.
    pub(crate) fn transformer(&self) -> Option<&transformer::Layers> {
        match &self.layers {
            Layers::Transformer(t) => Some(t),
            _ => None,
        }
    }

    /// The pipelines this model's steps record, compiled at load.
    pub fn pipelines(&self) -> Vec<Pipeline> {
        let plan = self.ctx.plan();
        let Some(t) = self.transformer() else {
            let d = Dims {
                vocab: self.info.vocab,
                c: self.info.n_embd,
                n_layer: self.info.n_layer,
                dtype: self.info.dtype,
            };
            let version = self.info.version().expect("an RWKV model");
            return pipelines(&self.ctx, version, &d, self.info.head_size, self.info.ffn, self.info.quant);
        };
        let mut v = vec![Pipeline::GatherRows];
        v.extend(t.pipelines(&self.ctx));
        let mut shapes = t.matrix_shapes();
        shapes.push((self.info.vocab, self.info.n_embd));
        for (rows, cols) in shapes {
            let e = Encoding::choose(self.info.quant, self.info.dtype, cols);
            v.extend(plan.linear_pipelines(e));
            v.extend(plan.small_tile(e, rows, cols));
        }
        let mut seen = std::collections::HashSet::new();
        v.retain(|p| seen.insert(*p));
        v
    }

    /// The GPU context the weights live on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Where each field of a sequence's state lives.
    pub fn state_layout(&self) -> &StateLayout {
        &self.layout
    }

    /// A fresh (zero) state for `batch` sequences.
    pub fn new_state(&self, batch: usize) -> Result<State> {
        State::new(&self.ctx, self.layout.clone(), batch)
    }

    /// Largest chunk whose per-step buffers each fit one storage binding.
    pub fn max_chunk_tokens(&self) -> usize {
        let max = self.ctx.max_binding_bytes() as usize;
        let c = self.info.n_embd;
        if let Some(t) = self.transformer() {
            return (max / (t.widest_row() * 4)).clamp(1, 4096);
        }
        let widest =
            [crate::gpu::kernels::plane::COUNT as usize * c, self.info.ffn, step::LORA_PLANES * self.d_lora_max.max(1)];
        (max / (widest.into_iter().max().unwrap() * 4)).clamp(1, 4096)
    }

    /// Columns of the `lora` planes: the widest LoRA, padded as stored.
    pub(crate) fn d_lora_max(&self) -> usize {
        self.d_lora_max
    }

    /// Per-step buffers for steps of up to `capacity` tokens of `batch` sequences.
    pub(crate) fn scratch(&self, ws: &crate::gpu::Workspace, capacity: usize, batch: usize) -> Result<Scratch> {
        let dims = self.transformer().map(|t| {
            let sh = &t.shape;
            step::TransformerDims {
                qkv_dim: sh.qkv_dim(),
                q_dim: sh.q_dim(),
                h_dim: 2 * self.info.ffn,
                rotary_dim: t.config.rope.rotary_dim,
                part_per_slot: crate::ops::Attention::part_len(sh, 1),
                part_slots: transformer::PART_SLOTS,
            }
        });
        Scratch::new(&self.ctx, ws, &self.info, self.layout.stride, self.d_lora_max, capacity, batch, dims)
    }

    /// Writes what a step needs besides its tokens: a Transformer's RoPE
    /// (cos, sin) pairs for the positions of the step's token rows.
    pub(crate) fn write_positions(&self, s: &Scratch, positions: &[u32]) {
        if let (Some(t), Some(ts)) = (self.transformer(), &s.transformer) {
            let cs = crate::ops::rope_cos_sin(positions, &t.inv_freq);
            self.ctx.queue().write_buffer(ts.cs.raw(), 0, bytemuck::cast_slice(&cs));
        }
    }

    /// `emb[tokens]` [n, C], read from the file and widened exactly to f32.
    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let file = self.weights.file_of(self.emb_name)?;
        let emb = file.get(self.emb_name)?;
        let c = self.info.n_embd;
        let row_bytes = c * emb.dtype.size();
        let mut raw = vec![0u8; tokens.len() * row_bytes];
        for (&t, out) in tokens.iter().zip(raw.chunks_exact_mut(row_bytes)) {
            file.read_into(&emb, t as usize * row_bytes, out)?;
        }
        let row = Tensor { bytes: &raw, ..emb };
        Ok((0..tokens.len() * c).map(|i| row.at(i)).collect())
    }

    /// Records one step's layers: `x = LayerNorm(emb rows in s.xx, ln0)`,
    /// then every layer of the model's generation.
    pub(crate) fn record_layers<'a>(&'a self, rec: &mut Recorder<'a>, step: &Step<'a>) -> Result<()> {
        let (s, c) = (step.s, self.info.n_embd);
        if let Layers::Transformer(t) = &self.layers {
            // x = the embedding rows (no ln0).
            rec.copy(&s.xx, 0, &s.x, 0, (step.n() * c * 4) as u64);
            return t.record(rec, step);
        }
        crate::ops::layer_norm(rec, &s.xx, &s.x, &self.globals, LN0_W * c, LN0_B * c, step.n(), c, LN_EPS)?;
        match &self.layers {
            Layers::V4(blocks) => v4::record(blocks, rec, step),
            Layers::V5(blocks) => v5::record(blocks, rec, step),
            Layers::V6(blocks) => v6::record(blocks, rec, step),
            Layers::V7(blocks) => v7::record(blocks, rec, step),
            Layers::Transformer(_) => unreachable!("recorded above"),
        }
    }

    /// logits[0..rows] = LayerNorm(x[head_rows[first..first+rows]], ln_out) @ head.T
    pub(crate) fn record_head<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        s: &'a Scratch,
        first: usize,
        rows: usize,
    ) -> Result<()> {
        let c = self.info.n_embd;
        crate::ops::gather_rows(rec, &s.head_rows, first, &s.x, &s.head_x, rows, c)?;
        let (w, b) = (LNOUT_W * c, LNOUT_B * c);
        match self.transformer().map(|t| &t.config) {
            None => crate::ops::layer_norm(rec, &s.head_x, &s.head_xn, &self.globals, w, b, rows, c, LN_EPS)?,
            Some(cfg) if cfg.family == Family::GptNeoX => {
                let eps = cfg.norm_eps as f32;
                crate::ops::layer_norm(rec, &s.head_x, &s.head_xn, &self.globals, w, b, rows, c, eps)?
            }
            Some(cfg) => {
                crate::ops::rms_norm(rec, &s.head_x, &s.head_xn, &self.globals, w, rows, c, cfg.norm_eps as f32)?
            }
        }
        self.head.linear(rec, &s.head_xn, 0, &s.logits, 0, rows, crate::gpu::Act::None, false)
    }
}

/// The pipelines a model of `version` uses on this adapter, asked of the
/// kernel plan as recording asks it (`tests/golden.rs` checks that steps of
/// every generation on each kernel path compile nothing more).
fn pipelines(
    ctx: &GpuContext,
    version: Version,
    d: &Dims,
    head_size: usize,
    ffn: usize,
    quant: Option<Format>,
) -> Vec<Pipeline> {
    let plan = ctx.plan();
    let mut v = vec![plan.layer_norm(), plan.token_shift(), Pipeline::GatherRows];
    let tex = plan.wkv_textures(head_size);
    match version {
        // Both WKV entries: decode (one token per sequence) and main.
        Version::V7 => v.extend([plan.v7_prep(), plan.wkv7(tex, 1), plan.wkv7(tex, 2), plan.group_norm()]),
        Version::V4 => v.extend([Pipeline::Wkv4, Pipeline::MulAdd]),
        _ => v.extend([plan.wkv5(tex), plan.group_norm(), Pipeline::MulAdd]),
    }
    // The matrix kernels of each encoding the matrices get (by their input
    // width, with `quant`), and the 8-row prefill tile for the matrices
    // small enough to take it: LoRA down-projections (v6, v7: rank <= 64,
    // from C), and every matrix of a model that narrow ([C, C], [C, F] and
    // [F, C]). LoRA up-projections take a rank as input: padded to 64 on
    // the texture store; on buffers a rank of 32 takes blocks of 32, one of
    // 16 (no block divides it) stays in floats.
    let c = d.c;
    let mut rows_and_inputs = vec![(c, c), (ffn, c), (c, ffn), (d.vocab, c)];
    if matches!(version, Version::V6 | Version::V7) {
        rows_and_inputs.push((64, c));
        if quant.is_some() {
            rows_and_inputs.extend([(c, plan.lora_rank(32)), (c, plan.lora_rank(16))]);
        }
    }
    for (rows, cols) in rows_and_inputs {
        let e = Encoding::choose(quant, d.dtype, cols);
        v.extend(plan.linear_pipelines(e));
        v.extend(plan.small_tile(e, rows, cols));
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|p| seen.insert(*p));
    v
}

/// Compiles the pipelines a model uses before any weight is uploaded:
/// shader compilation (LLVM, on CPU adapters) needs tens of MiB of scratch
/// memory, which then overlaps a small process instead of the loaded model,
/// and is handed back to the OS afterwards. Anything missed compiles on
/// first use.
fn compile_pipelines(
    ctx: &GpuContext,
    version: Version,
    d: &Dims,
    head_size: usize,
    ffn: usize,
    quant: Option<Format>,
) -> Result<()> {
    for p in pipelines(ctx, version, d, head_size, ffn, quant) {
        ctx.pipeline(p)?;
    }
    crate::gpu::trim_heap();
    Ok(())
}
