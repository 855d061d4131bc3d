//! Loading a checkpoint, detecting its RWKV generation, and running it over
//! batches of token sequences in bounded chunks.

mod runtime;
pub mod v4;
pub mod v5;
pub mod v6;
pub mod v7;

pub use runtime::{GN_EPS, LN_EPS};

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::loader::{Dtype, SafeTensorsFile};
use crate::state::{State, StateData};

/// RWKV generations, as ChatRWKV tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5_0,
    V5_1,
    V5_2,
    V6,
    V7,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V4 => "4",
            Version::V5_0 => "5.0",
            Version::V5_1 => "5.1",
            Version::V5_2 => "5.2",
            Version::V6 => "6",
            Version::V7 => "7",
        })
    }
}

impl std::str::FromStr for Version {
    type Err = Error;
    /// "4", "5.0", "5.1", "5.2", "6" or "7" (a leading `v` is allowed).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim_start_matches(['v', 'V']) {
            "4" => Version::V4,
            "5.0" => Version::V5_0,
            "5.1" => Version::V5_1,
            "5" | "5.2" => Version::V5_2,
            "6" => Version::V6,
            "7" => Version::V7,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "RWKV version `{other}`: expected 4, 5.0, 5.1, 5.2, 6 or 7"
                )))
            }
        })
    }
}

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

/// Called as weights are uploaded with (bytes done, bytes in all).
pub type Progress = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

#[derive(Clone)]
pub struct LoadOptions {
    /// Split weight matrices into parts of at most this many bytes (default:
    /// the adapter's storage-binding limit). Smaller values exist for tests.
    pub max_part_bytes: Option<u64>,
    /// Most tokens (summed over the batch) processed in one GPU step;
    /// per-step buffers are sized by it.
    pub chunk_tokens: usize,
    /// Upload progress callback (the CLI draws a progress bar with it).
    pub progress: Option<Progress>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { max_part_bytes: None, chunk_tokens: DEFAULT_CHUNK_TOKENS, progress: None }
    }
}

pub const DEFAULT_CHUNK_TOKENS: usize = 128;

/// Dimensions and sizes, derived from the tensor shapes.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub version: Version,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub head_size: usize,
    pub vocab: usize,
    pub ffn: usize,
    /// Named LoRA widths (v7: decay, aaa, mv, gate).
    pub lora: Vec<(&'static str, usize)>,
    pub dtype: Dtype,
    pub parameters: u64,
    /// Bytes of the checkpoint's weights, as stored in the file.
    pub weight_bytes: u64,
    /// GPU bytes of the uploaded weights (all but the embedding, which is
    /// read from the file; LoRAs may be padded for the adapter's kernels).
    pub gpu_weight_bytes: u64,
    pub state_bytes_per_sequence: u64,
}

/// What a model's loader uploads with: the context, the part size and the
/// progress report.
pub(crate) struct Uploader<'a> {
    pub ctx: &'a GpuContext,
    pub max_part: u64,
    total: u64,
    done: std::cell::Cell<u64>,
    progress: Option<Progress>,
}

/// Upload bytes between two flushes of wgpu's upload staging.
const FLUSH_BYTES: u64 = 32 << 20;

impl Uploader<'_> {
    /// Called once a tensor has been uploaded: reports progress, lets the OS
    /// drop the tensor's pages of the file mapping, and every FLUSH_BYTES
    /// submits the pending copies so wgpu frees its staging buffers. Peak
    /// memory while loading stays near the GPU copy of the weights instead of
    /// the file plus the staging plus the GPU copy.
    pub fn uploaded(&self, file: &SafeTensorsFile, t: &crate::loader::Tensor) -> Result<()> {
        let before = self.done.get();
        self.done.set(before + t.bytes.len() as u64);
        file.release(t);
        if self.done.get() / FLUSH_BYTES != before / FLUSH_BYTES {
            self.ctx.queue().submit([]);
            self.ctx.sync()?;
        }
        if let Some(p) = &self.progress {
            p(self.done.get().min(self.total), self.total);
        }
        Ok(())
    }
}

/// One GPU step: the tokens of every sequence laid end to end.
#[derive(Debug, Default, Clone)]
pub struct Chunk {
    /// [n_tok] token ids.
    pub tokens: Vec<u32>,
    /// [n_tok] sequence of each token.
    pub tok_seq: Vec<u32>,
    /// [batch + 1] first token row of each sequence; sequence b owns rows
    /// `seq_start[b] .. seq_start[b+1]` (possibly none).
    pub seq_start: Vec<u32>,
    /// Token rows whose logits are wanted, in output order.
    pub head_rows: Vec<u32>,
}

/// A loaded model, ready to run.
pub struct Model {
    rt: runtime::Runtime,
    chunk_tokens: usize,
}

impl Model {
    /// Loads a safetensors checkpoint with the official tensor names.
    pub fn load(ctx: &GpuContext, path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        Self::from_file(ctx, SafeTensorsFile::open(path.as_ref())?, opts)
    }

    /// Loads from an opened checkpoint (a mapped file or built-in bytes).
    pub fn from_file(ctx: &GpuContext, file: SafeTensorsFile, opts: &LoadOptions) -> Result<Self> {
        let version = detect_version(&file)?;
        let max_part = opts.max_part_bytes.unwrap_or(u64::MAX).min(ctx.max_binding_bytes());
        let uploader = Uploader {
            ctx,
            max_part,
            total: file.data_bytes(),
            done: std::cell::Cell::new(0),
            progress: opts.progress.clone(),
        };
        let rt = runtime::Runtime::load(&uploader, file, version)?;
        // Weights live on the GPU; the model keeps the file mapping for the
        // embedding rows only (their pages were dropped during the upload).
        let mut model = Self { rt, chunk_tokens: 1 };
        model.set_chunk_tokens(opts.chunk_tokens)?;
        Ok(model)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.rt.info
    }

    /// The initial state of an official state-tuning run (`blocks.N.att.time_state
    /// [H, N, N]` for every layer, RWKV-5 to 7), as one sequence's state: the
    /// token-shift parts are zero and att_kv is the tuned matrix. The tuning
    /// code stores it as [head, value i, key j]: RWKV-7's own layout, and the
    /// transpose of v5/v6's [head, key j, value i] (ChatRWKV transposes it
    /// on load for those too).
    pub fn tuned_state(&self, f: &SafeTensorsFile) -> Result<StateData> {
        let i = self.info();
        if i.version == Version::V4 {
            return Err(Error::InvalidArgument("RWKV-4 has no state tuning (no att_kv matrix state)".into()));
        }
        let (l, h, n, c) = (i.n_layer, i.n_head, i.head_size, i.n_embd);
        let mut kv = Vec::with_capacity(l * h * n * n);
        for layer in 0..l {
            let t = f.expect(&format!("blocks.{layer}.att.time_state"), &[h, n, n])?;
            let v = t.to_f32();
            if i.version == Version::V7 {
                kv.extend_from_slice(&v);
            } else {
                for head in 0..h {
                    let m = &v[head * n * n..(head + 1) * n * n];
                    kv.extend((0..n * n).map(|e| m[(e % n) * n + e / n]));
                }
            }
        }
        Ok(StateData {
            fields: vec![
                ("att_x".into(), vec![l, c], vec![0.0; l * c]),
                ("ffn_x".into(), vec![l, c], vec![0.0; l * c]),
                ("att_kv".into(), vec![l, h, n, n], kv),
            ],
        })
    }

    /// A fresh (zero) state for `batch` sequences.
    pub fn new_state(&self, batch: usize) -> Result<State> {
        self.rt.new_state(batch)
    }

    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens
    }

    /// Caps the tokens of one GPU step. The per-step buffers are sized by
    /// this cap; it is clamped so that every per-step buffer fits one binding.
    pub fn set_chunk_tokens(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidArgument("the chunk size must be at least 1 token".into()));
        }
        let max = self.rt.max_chunk_tokens();
        self.chunk_tokens = n.min(max);
        Ok(())
    }

    /// Reads `tokens[b]` into sequence `b` of `state` (one slice per sequence
    /// of the batch; slices may differ in length or be empty) and returns the
    /// logits `mode` asks for, one `Vec` per sequence.
    pub fn forward(&mut self, state: &mut State, tokens: &[&[u32]], mode: LogitsMode) -> Result<Vec<Vec<f32>>> {
        let (vocab, n_layer) = (self.info().vocab, self.info().n_layer);
        if tokens.len() != state.batch() {
            return Err(Error::InvalidArgument(format!(
                "{} token sequences for a state of batch {}",
                tokens.len(),
                state.batch()
            )));
        }
        let expected = self.rt.layout.stride;
        if state.layout().n_layer != n_layer || state.layout().stride != expected {
            return Err(Error::InvalidArgument("the state was made for a different model".into()));
        }
        for (s, seq) in tokens.iter().enumerate() {
            if let Some((p, &t)) = seq.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
                return Err(Error::BadToken { sequence: s, position: p, token: t, vocab });
            }
        }
        let batch = tokens.len();
        let cap = self.chunk_tokens.max(batch);
        let mut pos = vec![0usize; batch];
        let mut out: Vec<Vec<f32>> = tokens
            .iter()
            .map(|t| match mode {
                LogitsMode::All => Vec::with_capacity(t.len() * vocab),
                LogitsMode::Last => Vec::new(),
            })
            .collect();
        loop {
            let active: Vec<usize> = (0..batch).filter(|&b| pos[b] < tokens[b].len()).collect();
            if active.is_empty() {
                break;
            }
            // A fair share of the step for every unfinished sequence, then
            // whatever is left to the first ones that can use it.
            let mut take = vec![0usize; batch];
            let mut budget = cap;
            let share = (cap / active.len()).max(1);
            for &b in &active {
                take[b] = share.min(tokens[b].len() - pos[b]).min(budget);
                budget -= take[b];
            }
            for &b in &active {
                let extra = (tokens[b].len() - pos[b] - take[b]).min(budget);
                take[b] += extra;
                budget -= extra;
            }
            let mut chunk = Chunk::default();
            let mut owners = Vec::new();
            for b in 0..batch {
                chunk.seq_start.push(chunk.tokens.len() as u32);
                let seq = &tokens[b][pos[b]..pos[b] + take[b]];
                for _ in seq {
                    chunk.tok_seq.push(b as u32);
                }
                let first_row = chunk.tokens.len() as u32;
                chunk.tokens.extend_from_slice(seq);
                match mode {
                    LogitsMode::All => {
                        for r in 0..seq.len() as u32 {
                            chunk.head_rows.push(first_row + r);
                            owners.push(b);
                        }
                    }
                    LogitsMode::Last => {
                        if !seq.is_empty() && pos[b] + take[b] == tokens[b].len() {
                            chunk.head_rows.push(first_row + seq.len() as u32 - 1);
                            owners.push(b);
                        }
                    }
                }
                pos[b] += take[b];
            }
            chunk.seq_start.push(chunk.tokens.len() as u32);
            let logits = self.rt.step(state, &chunk, cap)?;
            for (row, &b) in owners.iter().enumerate() {
                out[b].extend_from_slice(&logits[row * vocab..(row + 1) * vocab]);
            }
        }
        Ok(out)
    }
}
