//! GPU context: adapter choice, device with the adapter's real limits, tracked
//! buffers, and errors turned into values instead of panics.

pub mod kernels;
mod plan;
mod recorder;

pub use kernels::{Act, Kernel, Pipeline, TexTile, WkvEntry, XSource, X_WINDOW_BYTES};
pub use plan::{KernelPlan, WeightStore};
pub use recorder::{Binding, ParamArena, Recorder, Workspace};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// How to choose the adapter and the kernels. The library reads no
/// environment variables: the `rwkv` binary maps `RWKV_ADAPTER`,
/// `RWKV_WEIGHTS`, `RWKV_NO_SUBGROUPS` and `RWKV_PROFILE` onto these fields.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Adapter name substring (`llvmpipe`, `NVIDIA`, ...) or backend name
    /// (`vulkan`, `metal`, `dx12`, `gl`); `None` chooses the best adapter
    /// found (discrete, then integrated, then virtual, then CPU).
    pub adapter: Option<String>,
    /// Where matrix weights live; `None` picks per adapter (textures on CPU
    /// adapters, see [`WeightStore`]).
    pub weight_store: Option<WeightStore>,
    /// Do not use subgroup operations even where the adapter has them: runs
    /// the kernels adapters without them get.
    pub no_subgroups: bool,
    /// Time every dispatch alone (slow; for finding hot kernels), reported by
    /// [`GpuContext::kernel_profile`].
    pub profile: bool,
    /// Most bytes of buffers and textures this context may hold at once
    /// (`None`: what the adapter gives). An allocation past it is an
    /// [`Error::MemoryLimit`] naming the bytes needed and the limit, as a
    /// real out-of-memory is an [`Error::OutOfMemory`]: never an abort.
    pub memory_limit: Option<u64>,
}

/// What was chosen, for printing.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

struct Shared {
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    adapter: AdapterSummary,
    /// Bytes of every live buffer made through this context.
    allocated: AtomicU64,
    /// First uncaptured error or device loss, reported at the next sync point.
    fault: Mutex<Option<Error>>,
    pipelines: Mutex<HashMap<Pipeline, wgpu::ComputePipeline>>,
    /// Which kernels run here, chosen once from the adapter and the options.
    plan: KernelPlan,
    dispatches: AtomicU64,
    /// With `GpuOptions::profile`: every dispatch is timed alone.
    profile: Option<Mutex<HashMap<Kernel, (u64, f64)>>>,
    /// `GpuOptions::memory_limit`.
    memory_limit: Option<u64>,
}

/// Cheap to clone; all clones share one device.
#[derive(Clone)]
pub struct GpuContext {
    shared: Arc<Shared>,
}

impl GpuContext {
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let wanted = opts.adapter.clone().filter(|s| !s.is_empty());
        let backends = match wanted.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("gl") | Some("gles") | Some("opengl") => wgpu::Backends::GL,
            _ => wgpu::Backends::PRIMARY,
        };
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            // Not `_from_env`: the library reads no environment variables
            // (wgpu's WGPU_* ones included); the binary maps its own.
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let found: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?})", i.name, i.backend)
            })
            .collect();
        let adapter = match &wanted {
            Some(w) => {
                let w = w.to_ascii_lowercase();
                adapters.into_iter().find(|a| {
                    let i = a.get_info();
                    i.name.to_ascii_lowercase().contains(&w) || format!("{:?}", i.backend).to_ascii_lowercase() == w
                })
            }
            None => adapters.into_iter().min_by_key(|a| match a.get_info().device_type {
                wgpu::DeviceType::DiscreteGpu => 0,
                wgpu::DeviceType::IntegratedGpu => 1,
                wgpu::DeviceType::VirtualGpu => 2,
                wgpu::DeviceType::Cpu => 3,
                wgpu::DeviceType::Other => 4,
            }),
        };
        let adapter = adapter.ok_or_else(|| {
            let what = match &wanted {
                Some(w) => format!(" matching `{w}`"),
                None => String::new(),
            };
            Error::NoAdapter(format!(
                "{what}; adapters found: [{}]{}",
                found.join(", "),
                if found.is_empty() {
                    " (install a Vulkan driver, e.g. Mesa's lavapipe: mesa-vulkan-drivers)"
                } else {
                    ""
                }
            ))
        })?;
        let info = adapter.get_info();
        let summary = AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: [info.driver.as_str(), info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
        };
        // The adapter's real limits: lavapipe allows 128 MiB storage bindings
        // where the WebGPU defaults stop at 128 MiB too, but discrete GPUs allow
        // far more, and defaults would cap workgroup storage and buffer counts.
        let limits = adapter.limits();
        // Subgroup operations, used only where every subgroup has one known
        // size (lavapipe: 8); the kernels that need them have fallbacks.
        let subgroup_size = (adapter.features().contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size == info.subgroup_max_size
            && (4..=128).contains(&info.subgroup_min_size)
            && !opts.no_subgroups)
            .then_some(info.subgroup_min_size);
        let features = if subgroup_size.is_some() { wgpu::Features::SUBGROUP } else { wgpu::Features::empty() };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("rwkv-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::RequestDevice { adapter: summary.name.clone(), detail: e.to_string() })?;
        // Textures need the subgroup kernel shape (one subgroup per row tile,
        // of at least 8 lanes: `linear_tex`'s prefill tile has lanes 0..7 fetch
        // its 8 tokens' x and share them by subgroupBroadcast), x windows, and
        // formats the kernels can read as storage textures.
        let readable = |f: wgpu::TextureFormat| {
            adapter.get_texture_format_features(f).allowed_usages.contains(wgpu::TextureUsages::STORAGE_BINDING)
        };
        let textures_fit = subgroup_size.is_some_and(|s| s >= 8)
            && limits.max_uniform_buffer_binding_size as u64 >= X_WINDOW_BYTES
            && readable(WEIGHT_TEXTURE_FORMAT)
            && readable(X_TEXTURE_FORMAT);
        let float_storage_textures = readable(X_TEXTURE_FORMAT);
        let weight_store = match opts.weight_store {
            Some(WeightStore::Buffer) => WeightStore::Buffer,
            Some(WeightStore::Texture) if textures_fit => WeightStore::Texture,
            _ if textures_fit && info.device_type == wgpu::DeviceType::Cpu => WeightStore::Texture,
            _ => WeightStore::Buffer,
        };
        let shared = Arc::new(Shared {
            device,
            queue,
            limits,
            adapter: summary,
            allocated: AtomicU64::new(0),
            fault: Mutex::new(None),
            pipelines: Mutex::new(HashMap::new()),
            plan: KernelPlan::new(weight_store, subgroup_size, float_storage_textures),
            dispatches: AtomicU64::new(0),
            profile: opts.profile.then(|| Mutex::new(HashMap::new())),
            memory_limit: opts.memory_limit,
        });
        // Validation errors and device loss become values reported by the next
        // `check`/sync point instead of wgpu's default panic.
        let weak = Arc::downgrade(&shared);
        shared.device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Some(s) = weak.upgrade() {
                let err = match &e {
                    wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory { what: "a GPU operation".into(), bytes: 0 },
                    other => Error::Gpu(other.to_string()),
                };
                s.fault.lock().unwrap().get_or_insert(err);
            }
        }));
        let weak = Arc::downgrade(&shared);
        shared.device.set_device_lost_callback(move |reason, msg| {
            if let Some(s) = weak.upgrade() {
                if reason != wgpu::DeviceLostReason::Destroyed {
                    s.fault.lock().unwrap().get_or_insert(Error::DeviceLost(format!("{reason:?}: {msg}")));
                }
            }
        });
        Ok(Self { shared })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.shared.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.shared.queue
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.shared.limits
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.shared.adapter
    }

    /// Pipelines compiled so far (ahead of time or on first use).
    pub fn pipeline_count(&self) -> usize {
        self.shared.pipelines.lock().unwrap().len()
    }

    /// Whether `other` is this context (a clone of it): buffers of one
    /// cannot be used with the other.
    pub fn same(&self, other: &GpuContext) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The kernels chosen for this adapter and these options: used both to
    /// compile pipelines ahead of time and to record every dispatch.
    pub fn plan(&self) -> &KernelPlan {
        &self.shared.plan
    }

    /// The subgroup size the subgroup kernels are built for, if the adapter
    /// has subgroups of one fixed size (and they were not turned off).
    pub fn subgroup_size(&self) -> Option<u32> {
        self.shared.plan.subgroup_size
    }

    /// Where matrices built for `linear` keep their weights on this adapter.
    pub fn weight_store(&self) -> WeightStore {
        self.shared.plan.weights
    }

    /// Largest width, height and layer count of a 2D texture array.
    pub fn max_texture_dims(&self) -> (u32, u32) {
        (self.shared.limits.max_texture_dimension_2d, self.shared.limits.max_texture_array_layers)
    }

    /// Creates a `[layers, height, width]` texture of `format` that kernels
    /// read with `textureLoad` and copies write; viewed as a `texture_2d_array`
    /// if `array`, else as a `texture_2d` (one layer).
    pub fn texture(
        &self,
        what: &str,
        width: u32,
        height: u32,
        layers: u32,
        format: wgpu::TextureFormat,
        array: bool,
    ) -> Result<GpuTexture> {
        let (max_dim, max_layers) = self.max_texture_dims();
        if width == 0 || height == 0 || layers == 0 || width > max_dim || height > max_dim || layers > max_layers {
            return Err(Error::InvalidArgument(format!(
                "{what}: texture of {layers} x {height} x {width} is outside the adapter's limits ({max_layers} layers of {max_dim} x {max_dim})"
            )));
        }
        let texel = format.block_copy_size(None).unwrap_or(16) as u64;
        let bytes = width as u64 * height as u64 * layers as u64 * texel;
        self.check_limit(what, bytes)?;
        let device = &self.shared.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let texture = device.create_texture(&wgpu::TextureDescriptor {
            label: Some(what),
            size: wgpu::Extent3d { width, height, depth_or_array_layers: layers },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::COPY_DST
                | wgpu::TextureUsages::STORAGE_BINDING,
            view_formats: &[],
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory { what: format!("{what}: {e}"), bytes });
        }
        let view = texture.create_view(&wgpu::TextureViewDescriptor {
            dimension: Some(if array { wgpu::TextureViewDimension::D2Array } else { wgpu::TextureViewDimension::D2 }),
            ..Default::default()
        });
        self.shared.allocated.fetch_add(bytes, Ordering::Relaxed);
        Ok(GpuTexture { texture, view, bytes, ctx: self.shared.clone() })
    }

    /// Largest buffer that one storage binding may cover.
    pub fn max_binding_bytes(&self) -> u64 {
        self.shared.limits.max_storage_buffer_binding_size.min(self.shared.limits.max_buffer_size)
    }

    /// Bytes of all live buffers allocated through this context.
    pub fn allocated_bytes(&self) -> u64 {
        self.shared.allocated.load(Ordering::Relaxed)
    }

    /// Compute dispatches recorded since the context was made.
    pub fn dispatch_count(&self) -> u64 {
        self.shared.dispatches.load(Ordering::Relaxed)
    }

    pub(crate) fn count_dispatches(&self, n: u64) {
        self.shared.dispatches.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn profiling(&self) -> bool {
        self.shared.profile.is_some()
    }

    pub(crate) fn record_kernel_time(&self, kernel: Kernel, secs: f64) {
        if let Some(p) = &self.shared.profile {
            let mut p = p.lock().unwrap();
            let e = p.entry(kernel).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += secs;
        }
    }

    /// Starts the profile's counts afresh.
    pub fn clear_kernel_profile(&self) {
        if let Some(p) = &self.shared.profile {
            p.lock().unwrap().clear();
        }
    }

    /// Per kernel: (dispatches, seconds), with `GpuOptions::profile`; slowest first.
    pub fn kernel_profile(&self) -> Vec<(Kernel, u64, f64)> {
        let Some(p) = &self.shared.profile else {
            return Vec::new();
        };
        let mut v: Vec<_> = p.lock().unwrap().iter().map(|(k, (n, t))| (*k, *n, *t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// The compiled pipeline for `key`, built on first use and cached.
    pub fn pipeline(&self, key: Pipeline) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.shared.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let plan = self.plan();
        let device = self.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let reduce = if plan.subgroup_size.is_some() { kernels::REDUCE_SUBGROUP } else { kernels::REDUCE_WORKGROUP };
        let kernel = key.kernel();
        let source = format!("{}\n{reduce}\n{}", kernels::COMMON, kernel.source());
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&format!("{kernel:?}")),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let mut constants = vec![("GS", plan.group_size() as f64)];
        constants.extend(key.constants(plan.subgroup_size)?);
        // Kernels without weights declare WDTYPE too (unused): f32.
        if !constants.iter().any(|(n, _)| *n == "WDTYPE") {
            constants.push(("WDTYPE", 0.0));
        }
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&format!("{key:?}")),
            layout: None,
            module: &module,
            entry_point: Some(key.entry()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("compiling kernel {key:?}: {e}")));
        }
        self.shared.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Returns (and clears) an error that happened asynchronously.
    pub fn check(&self) -> Result<()> {
        match self.shared.fault.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Creates a zeroed buffer (wgpu zero-initialises every buffer),
    /// reporting out-of-memory as an error.
    pub fn buffer(&self, what: &str, size: u64, usage: wgpu::BufferUsages) -> Result<GpuBuffer> {
        let size = size.max(4).next_multiple_of(4);
        self.create(what, size, usage, false)
    }

    /// Refuses an allocation of `bytes` that would pass the memory limit.
    fn check_limit(&self, what: &str, bytes: u64) -> Result<()> {
        if let Some(limit) = self.shared.memory_limit {
            let allocated = self.allocated_bytes();
            if allocated.saturating_add(bytes) > limit {
                return Err(Error::MemoryLimit { what: what.to_string(), bytes, allocated, limit });
            }
        }
        Ok(())
    }

    fn create(&self, what: &str, size: u64, usage: wgpu::BufferUsages, mapped: bool) -> Result<GpuBuffer> {
        let max = self.shared.limits.max_buffer_size;
        if size > max {
            return Err(Error::OutOfMemory {
                what: format!("{what} (larger than the adapter's max buffer size {max})"),
                bytes: size,
            });
        }
        self.check_limit(what, size)?;
        let device = &self.shared.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size,
            usage,
            mapped_at_creation: mapped,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory { what: format!("{what}: {e}"), bytes: size });
        }
        Ok(self.track(buffer, size))
    }

    /// Creates a buffer holding `bytes` (zero-padded to a multiple of 4),
    /// copied straight from `bytes` (e.g. a memory-mapped file) into the
    /// buffer's mapping: no second CPU copy of the data is made.
    pub fn buffer_from_bytes(&self, what: &str, bytes: &[u8], usage: wgpu::BufferUsages) -> Result<GpuBuffer> {
        self.buffer_from_bytes_releasing(what, bytes, usage, None)
    }

    /// As [`GpuContext::buffer_from_bytes`]; a large buffer is written
    /// UPLOAD_SLICE bytes at a time, each slice submitted (so wgpu frees its
    /// staging copy) and then passed to `release` (the model lets the OS drop
    /// those pages of the file mapping): a large tensor is never resident
    /// twice beside its GPU copy.
    pub fn buffer_from_bytes_releasing(
        &self,
        what: &str,
        bytes: &[u8],
        usage: wgpu::BufferUsages,
        release: Release,
    ) -> Result<GpuBuffer> {
        let size = (bytes.len() as u64).max(4).next_multiple_of(4);
        if bytes.len() > UPLOAD_SLICE && usage.contains(wgpu::BufferUsages::COPY_DST) {
            let buf = self.create(what, size, usage, false)?;
            for (i, chunk) in bytes.chunks(UPLOAD_SLICE).enumerate() {
                let padded;
                let data = if chunk.len() % 4 == 0 {
                    chunk
                } else {
                    padded = [chunk, &[0u8; 3][..4 - chunk.len() % 4]].concat();
                    &padded
                };
                self.queue().write_buffer(buf.raw(), (i * UPLOAD_SLICE) as u64, data);
                self.queue().submit([]);
                self.sync()?;
                if let Some(r) = release {
                    r(chunk);
                }
            }
            return Ok(buf);
        }
        let buf = self.create(what, size, usage, true)?;
        let buffer = buf.raw();
        {
            let mut view = buffer.get_mapped_range_mut(..).map_err(|e| Error::Gpu(format!("mapping {what}: {e}")))?;
            let mut w = view.slice(..);
            w.slice(..bytes.len()).copy_from_slice(bytes);
            if size as usize > bytes.len() {
                w.slice(bytes.len()..).copy_from_slice(&[0u8; 4][..size as usize - bytes.len()]);
            }
        }
        buffer.unmap();
        if let Some(r) = release {
            r(bytes);
        }
        Ok(buf)
    }

    /// A storage buffer holding `data` as f32.
    pub fn storage_f32(&self, what: &str, data: &[f32]) -> Result<GpuBuffer> {
        self.buffer_from_bytes(what, bytemuck::cast_slice(data), STORAGE)
    }

    /// A storage buffer holding `data` as u32.
    pub fn storage_u32(&self, what: &str, data: &[u32]) -> Result<GpuBuffer> {
        self.buffer_from_bytes(what, bytemuck::cast_slice(data), STORAGE)
    }

    fn track(&self, buffer: wgpu::Buffer, size: u64) -> GpuBuffer {
        self.shared.allocated.fetch_add(size, Ordering::Relaxed);
        GpuBuffer { buffer, size, ctx: self.shared.clone() }
    }

    /// Waits for all submitted work; reports device loss and async errors.
    pub fn sync(&self) -> Result<()> {
        self.shared
            .device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        self.check()
    }

    /// Copies `size` bytes at `offset` of `src` back to the CPU through
    /// `staging` (a MAP_READ | COPY_DST buffer at least `size` bytes long).
    pub fn read_into(
        &self,
        src: &GpuBuffer,
        offset: u64,
        size: u64,
        staging: &GpuBuffer,
        out: &mut [u8],
    ) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let mut enc = self.device().create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src.raw(), offset, staging.raw(), 0, size);
        self.queue().submit([enc.finish()]);
        self.map_read(staging, out)
    }

    /// Waits for the GPU, maps `staging` and copies its first `out.len()`
    /// bytes out. The copy into `staging` must already be submitted.
    pub fn map_read(&self, staging: &GpuBuffer, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let size = (out.len() as u64).next_multiple_of(4);
        let slice = staging.raw().slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.sync()?;
        rx.recv()
            .map_err(|_| Error::Gpu("buffer map callback dropped".into()))?
            .map_err(|e| Error::Gpu(format!("mapping a buffer for reading: {e}")))?;
        {
            let view = slice.get_mapped_range().map_err(|e| Error::Gpu(e.to_string()))?;
            out.copy_from_slice(&view[..out.len()]);
        }
        staging.raw().unmap();
        Ok(())
    }

    /// Reads `size` bytes of a buffer with a temporary staging buffer.
    pub fn read_bytes(&self, src: &GpuBuffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.buffer("readback staging", size, READBACK)?;
        let mut out = vec![0u8; size as usize];
        self.read_into(src, offset, size.next_multiple_of(4), &staging, &mut out)?;
        Ok(out)
    }

    /// Reads a whole buffer as f32.
    pub fn read_f32(&self, src: &GpuBuffer) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(src, 0, src.size())?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// Usage of every data buffer (activations and weights). UNIFORM lets a
/// window of an activation buffer be bound as `linear_tex`'s x directly.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::UNIFORM)
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);
pub const READBACK: wgpu::BufferUsages = wgpu::BufferUsages::MAP_READ.union(wgpu::BufferUsages::COPY_DST);

/// Hands memory the allocator holds but no longer uses back to the OS
/// (glibc keeps freed heap memory, e.g. after a shader compiler's work).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases pages of free heap memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Called with each slice of a tensor's bytes once it is uploaded (the model
/// lets the OS drop those pages of the file mapping with it).
pub type Release<'a> = Option<&'a dyn Fn(&[u8])>;

/// Bytes copied between two releases of source pages while uploading.
pub const UPLOAD_SLICE: usize = 1 << 20;

/// Format of textures of activations (x of `linear_tex`, att of `wkv7_tex`): four f32 per texel.
pub const X_TEXTURE_FORMAT: wgpu::TextureFormat = wgpu::TextureFormat::Rgba32Float;
/// Format of weight textures: four u32 words per texel (8 f16/bf16 or 4 f32).
pub const WEIGHT_TEXTURE_FORMAT: wgpu::TextureFormat = wgpu::TextureFormat::Rgba32Uint;

/// A texture counted in [`GpuContext::allocated_bytes`] while it lives.
pub struct GpuTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
    bytes: u64,
    ctx: Arc<Shared>,
}

impl GpuTexture {
    pub fn raw(&self) -> &wgpu::Texture {
        &self.texture
    }

    pub fn view(&self) -> &wgpu::TextureView {
        &self.view
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for GpuTexture {
    fn drop(&mut self) {
        self.ctx.allocated.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A GPU buffer whose bytes are counted in [`GpuContext::allocated_bytes`]
/// for as long as it lives.
pub struct GpuBuffer {
    buffer: wgpu::Buffer,
    size: u64,
    ctx: Arc<Shared>,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        self.ctx.allocated.fetch_sub(self.size, Ordering::Relaxed);
    }
}
