//! Records the dispatches of one step, then encodes them into a single
//! command buffer and one submission. Every dispatch's `Params` goes into one
//! uniform buffer (the arena), in slots at the uniform offset alignment,
//! written once per submission. The engine reserves the arena for its largest
//! step when it sizes its per-step buffers; a submission with more operations
//! than reserved grows it.

use std::sync::{Arc, Mutex};

use bytemuck::Pod;

use super::{GpuBuffer, GpuContext, GpuTexture, Kernel, Pipeline, STORAGE, X_TEXTURE_FORMAT, X_WINDOW_BYTES};
use crate::error::{Error, Result};

/// One resource bound to a dispatch (bindings 1.., after the params).
#[derive(Clone)]
pub enum Binding<'a> {
    Buffer(&'a GpuBuffer),
    /// `size` bytes from byte `offset` (bound as a uniform or storage window).
    Range(&'a GpuBuffer, u64, u64),
    /// A buffer shared through the context (bound whole).
    Shared(Arc<GpuBuffer>),
    Texture(Arc<GpuTexture>),
}

enum Op<'a> {
    Dispatch {
        kernel: Kernel,
        pipeline: wgpu::ComputePipeline,
        params: Vec<u8>,
        bindings: Vec<Binding<'a>>,
        groups: [u32; 3],
    },
    /// `size` = [width, height, layers] texels from `src` into `dst`.
    CopyToTexture {
        src: &'a GpuBuffer,
        src_offset: u64,
        bytes_per_row: u32,
        rows_per_image: u32,
        dst: Arc<GpuTexture>,
        size: [u32; 3],
    },
    Copy {
        src: &'a GpuBuffer,
        src_offset: u64,
        dst: &'a GpuBuffer,
        dst_offset: u64,
        size: u64,
    },
}

pub struct Recorder<'a> {
    ctx: &'a GpuContext,
    ws: &'a Workspace,
    ops: Vec<Op<'a>>,
}

/// Textures and buffers that recorded ops share within one execution
/// object (an engine): the x texture `linear_tex` copies x into when it does
/// not fit a uniform window, and the uniform bound where a kernel declares a
/// window it does not read. Each is made on first use and grown, never
/// shrunk; an engine reserves the x texture's full size up front.
#[derive(Default)]
pub struct Workspace {
    /// `[tokens, d_in / 4]` rgba32float texels.
    x_texture: Mutex<Option<Arc<GpuTexture>>>,
    dummy_uniform: Mutex<Option<Arc<GpuBuffer>>>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// A 64 KiB buffer bound as the uniform window of a kernel reading x
    /// from its texture instead.
    pub fn dummy_uniform(&self, ctx: &GpuContext) -> Result<Arc<GpuBuffer>> {
        let mut slot = self.dummy_uniform.lock().unwrap();
        if let Some(b) = slot.as_ref() {
            return Ok(b.clone());
        }
        let b = Arc::new(ctx.buffer("unused uniform window", X_WINDOW_BYTES, STORAGE)?);
        *slot = Some(b.clone());
        Ok(b)
    }

    /// The x texture, at least `width` x `height` texels.
    pub fn x_texture(&self, ctx: &GpuContext, width: u32, height: u32) -> Result<Arc<GpuTexture>> {
        let mut slot = self.x_texture.lock().unwrap();
        if let Some(t) = slot.as_ref() {
            let size = t.raw().size();
            if size.width >= width && size.height >= height {
                return Ok(t.clone());
            }
        }
        let (w, h) = match slot.as_ref() {
            Some(t) => (t.raw().size().width.max(width), t.raw().size().height.max(height)),
            None => (width, height),
        };
        // Dropping the old one here is safe: recorded work holds its own Arc.
        *slot = None;
        let t = Arc::new(ctx.texture("x texture", w, h, 1, X_TEXTURE_FORMAT, false)?);
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// The uniform buffer that holds every dispatch's parameters.
#[derive(Default)]
pub struct ParamArena {
    buffer: Option<GpuBuffer>,
    bytes: Vec<u8>,
}

impl ParamArena {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes room for the params of a submission of `ops` operations now,
    /// so that submissions up to that size allocate nothing.
    pub fn reserve(&mut self, ctx: &GpuContext, ops: usize) -> Result<()> {
        let need = (ops.max(1) * slot_bytes(ctx)) as u64;
        if self.buffer.as_ref().is_none_or(|b| b.size() < need) {
            self.buffer = None;
            self.buffer =
                Some(ctx.buffer("params arena", need, wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST)?);
        }
        Ok(())
    }
}

/// Bytes per dispatch's params in the arena (64, at the uniform offset alignment).
fn slot_bytes(ctx: &GpuContext) -> usize {
    let align = (ctx.limits().min_uniform_buffer_offset_alignment as usize).max(16);
    64usize.next_multiple_of(align)
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a GpuContext, ws: &'a Workspace) -> Self {
        Self { ctx, ws, ops: Vec::new() }
    }

    /// Records one dispatch of `pipeline`: binding 0 is `params`, bindings
    /// 1.. are `buffers` in order, bound whole.
    pub fn dispatch<P: Pod>(
        &mut self,
        pipeline: Pipeline,
        params: &P,
        buffers: &[&'a GpuBuffer],
        groups: [u32; 3],
    ) -> Result<()> {
        let bindings = buffers.iter().map(|b| Binding::Buffer(b)).collect();
        self.dispatch_with(pipeline, params, bindings, groups)
    }

    /// As [`Recorder::dispatch`], with textures among the bindings.
    pub fn dispatch_with<P: Pod>(
        &mut self,
        key: Pipeline,
        params: &P,
        bindings: Vec<Binding<'a>>,
        groups: [u32; 3],
    ) -> Result<()> {
        let kernel = key.kernel();
        let max = self.ctx.limits().max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::InvalidArgument(format!(
                "{kernel:?} needs {groups:?} workgroups, over the adapter's limit of {max} per dimension"
            )));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let pipeline = self.ctx.pipeline(key)?;
        self.ops.push(Op::Dispatch { kernel, pipeline, params: bytemuck::bytes_of(params).to_vec(), bindings, groups });
        Ok(())
    }

    /// Records a copy of `size` = [width, height, layers] texels from `src`
    /// (rows `bytes_per_row` apart, layers `rows_per_image` rows apart, from
    /// `src_offset`) into `dst` at its origin, ordered with the dispatches
    /// around it. `bytes_per_row` must be a multiple of 256.
    pub fn copy_to_texture(
        &mut self,
        src: &'a GpuBuffer,
        src_offset: u64,
        bytes_per_row: u32,
        rows_per_image: u32,
        dst: Arc<GpuTexture>,
        size: [u32; 3],
    ) {
        if !size.contains(&0) {
            self.ops.push(Op::CopyToTexture { src, src_offset, bytes_per_row, rows_per_image, dst, size });
        }
    }

    /// Records a buffer copy, ordered with the dispatches around it.
    pub fn copy(&mut self, src: &'a GpuBuffer, src_offset: u64, dst: &'a GpuBuffer, dst_offset: u64, size: u64) {
        if size > 0 {
            self.ops.push(Op::Copy { src, src_offset, dst, dst_offset, size });
        }
    }

    pub fn ctx(&self) -> &'a GpuContext {
        self.ctx
    }

    /// The shared textures of the execution object recording.
    pub fn workspace(&self) -> &'a Workspace {
        self.ws
    }

    /// Operations (dispatches and copies) recorded so far.
    pub fn op_count(&self) -> usize {
        self.ops.len()
    }

    /// Encodes everything recorded into one command buffer and submits it.
    pub fn submit(self, arena: &mut ParamArena) -> Result<()> {
        let ctx = self.ctx;
        let slot = slot_bytes(ctx);
        let n = self.ops.len();
        arena.reserve(ctx, n)?;
        let arena_buf = arena.buffer.as_ref().unwrap();
        arena.bytes.clear();
        arena.bytes.resize(n * slot, 0);
        for (i, op) in self.ops.iter().enumerate() {
            if let Op::Dispatch { params, .. } = op {
                arena.bytes[i * slot..i * slot + params.len()].copy_from_slice(params);
            }
        }
        if !arena.bytes.is_empty() {
            ctx.queue().write_buffer(arena_buf.raw(), 0, &arena.bytes);
        }

        let device = ctx.device();
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rwkv step") });
        let mut dispatches = 0u64;
        let profiling = ctx.profiling();
        let mut i = 0;
        while i < n {
            match &self.ops[i] {
                Op::Copy { src, src_offset, dst, dst_offset, size } => {
                    enc.copy_buffer_to_buffer(src.raw(), *src_offset, dst.raw(), *dst_offset, *size);
                    i += 1;
                    continue;
                }
                Op::CopyToTexture { src, src_offset, bytes_per_row, rows_per_image, dst, size } => {
                    enc.copy_buffer_to_texture(
                        wgpu::TexelCopyBufferInfo {
                            buffer: src.raw(),
                            layout: wgpu::TexelCopyBufferLayout {
                                offset: *src_offset,
                                bytes_per_row: Some(*bytes_per_row),
                                rows_per_image: Some(*rows_per_image),
                            },
                        },
                        dst.raw().as_image_copy(),
                        wgpu::Extent3d { width: size[0], height: size[1], depth_or_array_layers: size[2] },
                    );
                    i += 1;
                    continue;
                }
                Op::Dispatch { .. } => {}
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            while i < n {
                let Op::Dispatch { kernel, pipeline, params, bindings, groups } = &self.ops[i] else {
                    break;
                };
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: arena_buf.raw(),
                        offset: (i * slot) as u64,
                        size: wgpu::BufferSize::new(params.len() as u64),
                    }),
                }];
                for (b, res) in bindings.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: b as u32 + 1,
                        resource: match res {
                            Binding::Buffer(buf) => buf.raw().as_entire_binding(),
                            Binding::Shared(buf) => buf.raw().as_entire_binding(),
                            Binding::Range(buf, offset, size) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: buf.raw(),
                                offset: *offset,
                                size: wgpu::BufferSize::new(*size),
                            }),
                            Binding::Texture(t) => wgpu::BindingResource::TextureView(t.view()),
                        },
                    });
                }
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &entries,
                });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                dispatches += 1;
                i += 1;
                if profiling {
                    // One dispatch per submission, timed to completion.
                    drop(pass);
                    let t = std::time::Instant::now();
                    ctx.queue().submit([std::mem::replace(
                        &mut enc,
                        device.create_command_encoder(&Default::default()),
                    )
                    .finish()]);
                    ctx.sync()?;
                    ctx.record_kernel_time(*kernel, t.elapsed().as_secs_f64());
                    break;
                }
            }
        }
        ctx.queue().submit([enc.finish()]);
        ctx.count_dispatches(dispatches);
        ctx.check()
    }
}
