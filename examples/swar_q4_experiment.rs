//! An experiment for issue 14 (not used by the runtime): can a 4-bit matrix
//! product beat f16 on llvmpipe, which is bound by instructions, not bytes?
//! The runtime's q4 kernel converts every code to f32 (a mask, a conversion,
//! a multiply and an add a weight). This kernel (swar_q4_experiment.wgsl)
//! quantizes x to int8 per block of 32 (as llama.cpp's Q8_0 does) and keeps
//! two rows' codes in the 16-bit halves of one u32, so one integer multiply
//! by an x code makes two products and one add sums two; the halves are
//! flushed every 16 inputs, before they can overflow. A lane owns 8 rows
//! whose codes for one input share one u32. Each workgroup quantizes x into
//! workgroup memory first (its lanes a block each), then all lanes read it.
//! Checked against the same arithmetic on the CPU in f64, then timed at the
//! 0.1B model's head shape (65536 x 768, one token), median of 15.
//!
//!   cargo run --release --example swar_q4_experiment
//!   cargo bench --bench kernels -- 65536x768x1     (the runtime's kernels, for comparison)
//!
//! Measured (2026-12-06, this machine's lavapipe): 5.88 / 6.20 / 6.05 ms
//! against the runtime's f16 13.2 ms, int8 8.9 ms and q4 8.5-11.1 ms. With x
//! quantized on the CPU instead: 4.14 / 4.22 / 4.19 ms; quantized by every lane
//! inside the product loop: 8.9-12.4 ms.
use rwkv_wgpu::gpu::{GpuContext, GpuOptions};
use wgpu::util::DeviceExt;

fn main() {
    let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
    let (dev, q) = (ctx.device(), ctx.queue());
    let (d_in, d_out) = (768usize, 65536usize);
    let nb = d_in / 32;
    let mut seed = 12345u64;
    let mut rnd = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let codes: Vec<u8> = (0..d_out * d_in).map(|_| (rnd() % 16) as u8).collect(); // n = c + 8
    let wsc: Vec<f32> = (0..d_out * nb).map(|_| 0.001 + (rnd() % 1000) as f32 * 1e-5).collect();
    let x: Vec<f32> = (0..d_in).map(|_| (rnd() % 2001) as f32 / 1000.0 - 1.0).collect();
    // x per block of 32: int8 codes with an f32 scale, as the kernel makes
    // them (the same f32 operations; WGSL's round is to even).
    let mut xq = vec![0i32; d_in];
    let mut xscale = vec![0f32; nb];
    for b in 0..nb {
        let m = x[b * 32..b * 32 + 32].iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        let inv = 1.0 / s;
        for i in b * 32..b * 32 + 32 {
            xq[i] = (x[i] * inv).round_ties_even() as i32;
        }
        xscale[b] = s;
    }
    let mut xf = vec![[0f32; 4]; 1024];
    for i in 0..d_in {
        xf[i / 4][i % 4] = x[i];
    }
    // Texture words: texel (k, g) word c = input 4k + c, nibble r = row 8g + r.
    let (tw, th) = (d_in / 4, d_out / 8);
    let mut words = vec![0u32; tw * th * 4];
    for g in 0..th {
        for i in 0..d_in {
            let mut v = 0u32;
            for r in 0..8 {
                v |= (codes[(8 * g + r) * d_in + i] as u32) << (4 * r);
            }
            words[(g * tw + i / 4) * 4 + i % 4] = v;
        }
    }
    let mut sc = vec![0f32; th * 2 * nb * 4];
    for g in 0..th {
        for b in 0..nb {
            for r in 0..8 {
                sc[(g * 2 * nb + 2 * b + r / 4) * 4 + r % 4] = wsc[(8 * g + r) * nb + b];
            }
        }
    }
    let tex = |w: usize, h: usize, f: wgpu::TextureFormat, data: &[u8]| {
        let t = dev.create_texture(&wgpu::TextureDescriptor {
            label: None,
            size: wgpu::Extent3d { width: w as u32, height: h as u32, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: f,
            usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        q.write_texture(
            wgpu::TexelCopyTextureInfo {
                texture: &t,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            data,
            wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some((w * 16) as u32), rows_per_image: None },
            wgpu::Extent3d { width: w as u32, height: h as u32, depth_or_array_layers: 1 },
        );
        t
    };
    let wt = tex(tw, th, wgpu::TextureFormat::Rgba32Uint, bytemuck::cast_slice(&words));
    let st = tex(2 * nb, th, wgpu::TextureFormat::Rgba32Float, bytemuck::cast_slice(&sc));
    let buf = |data: &[u8], usage| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: data, usage })
    };
    let pbuf = buf(bytemuck::cast_slice(&[d_in as u32, d_out as u32, 0, 0]), wgpu::BufferUsages::UNIFORM);
    let xfb = buf(bytemuck::cast_slice(&xf), wgpu::BufferUsages::UNIFORM);
    let yb = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (d_out * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let rb = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (d_out * 4) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let src = include_str!("swar_q4_experiment.wgsl");
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let wv = wt.create_view(&Default::default());
    let sv = st.create_view(&Default::default());
    let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipe.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: pbuf.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(&wv) },
            wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::TextureView(&sv) },
            wgpu::BindGroupEntry { binding: 3, resource: xfb.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 5, resource: yb.as_entire_binding() },
        ],
    });
    let run = |copy: bool| {
        let mut enc = dev.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups((th / 8) as u32, 1, 1);
        }
        if copy {
            enc.copy_buffer_to_buffer(&yb, 0, &rb, 0, (d_out * 4) as u64);
        }
        q.submit([enc.finish()]);
        dev.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).unwrap();
    };
    run(true);
    rb.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    dev.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).unwrap();
    let y: Vec<f32> = bytemuck::cast_slice(&rb.slice(..).get_mapped_range().unwrap()).to_vec();
    rb.unmap();
    let mut worst = 0f64;
    for o in 0..d_out {
        let mut s = 0f64;
        for b in 0..nb {
            let mut d = 0i64;
            for i in b * 32..b * 32 + 32 {
                d += (codes[o * d_in + i] as i64 - 8) * xq[i] as i64;
            }
            s += wsc[o * nb + b] as f64 * xscale[b] as f64 * d as f64;
        }
        worst = worst.max((s - y[o] as f64).abs() / (s.abs() + 1e-3));
    }
    let mut times = Vec::new();
    for _ in 0..15 {
        let t = std::time::Instant::now();
        run(false);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("q4 codes x int8 x, 16-bit fields, {d_out}x{d_in}: median {:.2} ms (min {:.2}); worst rel error against the CPU {worst:.2e}", times[7], times[0]);
    // The f32 sums of 24 blocks against f64 (bound: a few f32 roundings).
    assert!(worst < 1e-3, "the kernel disagrees with the CPU: {worst:.2e}");
}
