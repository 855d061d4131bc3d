//! The recurrent state: f32, on the GPU, one buffer per layer holding
//! `[batch, stride]` floats, where each layer of each sequence is a run of
//! named fields (v7: `att_x [C]`, `ffn_x [C]`, `att_kv [H, N, N]`). Its size
//! is fixed by the model and the batch: it never grows with the tokens read.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, READBACK, STORAGE};
use crate::loader::SafeTensorsFile;

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
        Self { n_layer, fields, stride: offset }
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

/// The GPU state of `batch` sequences.
pub struct State {
    ctx: GpuContext,
    layout: StateLayout,
    batch: usize,
    /// One `[batch, stride]` f32 buffer per layer.
    pub(crate) layers: Vec<GpuBuffer>,
}

impl State {
    pub(crate) fn new(ctx: &GpuContext, layout: StateLayout, batch: usize) -> Result<Self> {
        if batch == 0 {
            return Err(Error::InvalidArgument("a state needs a batch of at least 1".into()));
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
        Ok(Self { ctx: ctx.clone(), layout, batch, layers })
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

    /// Total GPU bytes of this state.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(|b| b.size()).sum()
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

    /// Returns sequence `seq` (or every sequence, with `None`) to the fresh state.
    pub fn reset(&mut self, seq: Option<usize>) -> Result<()> {
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
        let layers =
            self.layers.iter().map(|b| self.ctx.buffer("state", b.size(), STORAGE)).collect::<Result<Vec<_>>>()?;
        let mut enc = self.ctx.device().create_command_encoder(&Default::default());
        for (src, dst) in self.layers.iter().zip(&layers) {
            enc.copy_buffer_to_buffer(src.raw(), 0, dst.raw(), 0, src.size());
        }
        self.ctx.queue().submit([enc.finish()]);
        self.ctx.check()?;
        Ok(State { ctx: self.ctx.clone(), layout: self.layout.clone(), batch: self.batch, layers })
    }
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
    let kv = layout
        .field("att_kv")
        .ok_or_else(|| Error::InvalidArgument("RWKV-4 has no state tuning (no att_kv matrix state)".into()))?;
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
