//! End-to-end speed measurement, in the spirit of llama-bench: load time,
//! prefill and decode throughput (medians over repeats after a warm-up that
//! compiles every pipeline), memory, dispatches and bytes per token.

use std::time::Instant;

use crate::engine::{Engine, EngineOptions};
use crate::error::Result;
use crate::gpu::GpuContext;
use crate::model::{LoadOptions, LogitsMode, Model};
use crate::quant::{Encoding, Format};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt tokens for the prefill figure (pp).
    pub prefill: usize,
    /// Generated tokens for the decode figures (tg).
    pub decode: usize,
    /// Batch sizes for decode (1 is always measured).
    pub batches: Vec<usize>,
    pub repeat: usize,
    /// Also measure decode after this many tokens of context (0: skip).
    pub deep_context: usize,
    /// Quantize the weights at load (`--quant`).
    pub quant: Option<Format>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self { prefill: 512, decode: 128, batches: vec![1, 8, 32], repeat: 3, deep_context: 0, quant: None }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DecodeFigure {
    pub batch: usize,
    /// Aggregate tokens/s over the batch.
    pub tokens_per_s: f64,
    pub cpu_ms_per_token: f64,
}

#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub model: String,
    pub adapter: String,
    pub weight_bytes: u64,
    /// The format the matrices were quantized to at load, if any.
    pub quant: Option<Format>,
    /// GPU bytes of the weights alone (matrices and vectors; the embedding
    /// stays in the file).
    pub gpu_weight_bytes: u64,
    /// GPU bytes of the matrices by encoding.
    pub matrix_bytes: Vec<(Encoding, u64)>,
    pub load_s: f64,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub prefill_cpu_ms_per_token: f64,
    pub decode: Vec<DecodeFigure>,
    pub dispatches_per_token: f64,
    /// Weight bytes one decoded token reads at batch 1: the GPU weights and
    /// one embedding row.
    pub weight_bytes_per_token: u64,
    pub gpu_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Decode tokens/s (batch 1) and GPU bytes after 100 tokens of context
    /// and after `deep_context` tokens.
    pub deep_context: usize,
    pub near_decode_tokens_per_s: f64,
    pub near_decode_cpu_ms_per_token: f64,
    pub gpu_bytes_near: u64,
    pub deep_decode_tokens_per_s: f64,
    pub deep_decode_cpu_ms_per_token: f64,
    pub gpu_bytes_after_deep: u64,
}

impl BenchReport {
    pub fn decode_at(&self, batch: usize) -> f64 {
        self.decode.iter().find(|d| d.batch == batch).map_or(0.0, |d| d.tokens_per_s)
    }

    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"model\":{:?},\"adapter\":{:?},\"weight_bytes\":{},\"load_s\":{:.3},\"prefill_tokens\":{},\
             \"prefill_tokens_per_s\":{:.3},\"prefill_cpu_ms_per_token\":{:.3},\"decode_tokens_per_s\":{:.3},\
             \"decode_cpu_ms_per_token\":{:.3},\"dispatches_per_token\":{:.1},\"weight_bytes_per_token\":{},\
             \"decode_gb_per_s\":{:.3},\"gpu_bytes\":{},\"peak_rss_bytes\":{}",
            self.model,
            self.adapter,
            self.weight_bytes,
            self.load_s,
            self.prefill_tokens,
            self.prefill_tokens_per_s,
            self.prefill_cpu_ms_per_token,
            self.decode_at(1),
            self.decode.first().map_or(0.0, |d| d.cpu_ms_per_token),
            self.dispatches_per_token,
            self.weight_bytes_per_token,
            self.weight_bytes_per_token as f64 * self.decode_at(1) / 1e9,
            self.gpu_bytes,
            self.peak_rss_bytes
        );
        let quant = self.quant.map_or("null".to_string(), |f| format!("{:?}", f.name()));
        let by: Vec<String> = self.matrix_bytes.iter().map(|(e, b)| format!("{:?}:{b}", e.to_string())).collect();
        s.push_str(&format!(
            ",\"quant\":{quant},\"gpu_weight_bytes\":{},\"matrix_bytes\":{{{}}}",
            self.gpu_weight_bytes,
            by.join(",")
        ));
        for d in &self.decode {
            if d.batch != 1 {
                s.push_str(&format!(
                    ",\"decode_batch{}_tokens_per_s\":{:.3},\"decode_batch{}_cpu_ms_per_token\":{:.3}",
                    d.batch, d.tokens_per_s, d.batch, d.cpu_ms_per_token
                ));
            }
        }
        if self.deep_context > 0 {
            s.push_str(&format!(
                ",\"deep_context\":{},\"decode_at_100_tokens_per_s\":{:.3},\"decode_at_100_cpu_ms_per_token\":{:.3},\
                 \"gpu_bytes_at_100\":{},\"deep_decode_tokens_per_s\":{:.3},\"deep_decode_cpu_ms_per_token\":{:.3},\
                 \"gpu_bytes_after_deep\":{}",
                self.deep_context,
                self.near_decode_tokens_per_s,
                self.near_decode_cpu_ms_per_token,
                self.gpu_bytes_near,
                self.deep_decode_tokens_per_s,
                self.deep_decode_cpu_ms_per_token,
                self.gpu_bytes_after_deep
            ));
        }
        s.push('}');
        s
    }

    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let gb = |b: u64| b as f64 / (1u64 << 30) as f64;
        t.push_str(&format!("model              {}\n", self.model));
        t.push_str(&format!("adapter            {}\n", self.adapter));
        t.push_str(&format!("weights            {:.3} GiB, loaded in {:.2} s\n", gb(self.weight_bytes), self.load_s));
        let by: Vec<String> =
            self.matrix_bytes.iter().map(|(e, b)| format!("{e} {:.1} MiB", *b as f64 / (1 << 20) as f64)).collect();
        t.push_str(&format!(
            "on the GPU         {:.1} MiB of weights{}; matrices: {}\n",
            self.gpu_weight_bytes as f64 / (1 << 20) as f64,
            self.quant.map_or(String::new(), |f| format!(" (quantized to {} at load)", f.name())),
            by.join(", ")
        ));
        t.push_str(&format!(
            "prefill pp{}       {:.2} tokens/s ({:.2} CPU ms/token)\n",
            self.prefill_tokens, self.prefill_tokens_per_s, self.prefill_cpu_ms_per_token
        ));
        for d in &self.decode {
            t.push_str(&format!(
                "decode batch {:<4}  {:.2} tokens/s ({:.2} CPU ms/token)\n",
                d.batch, d.tokens_per_s, d.cpu_ms_per_token
            ));
        }
        t.push_str(&format!(
            "per decoded token  {:.0} dispatches, {:.1} MiB of weights read = {:.2} GB/s at batch 1\n",
            self.dispatches_per_token,
            self.weight_bytes_per_token as f64 / (1 << 20) as f64,
            self.weight_bytes_per_token as f64 * self.decode_at(1) / 1e9
        ));
        if self.deep_context > 0 {
            t.push_str(&format!(
                "decode at context 100: {:.2} tokens/s ({:.2} CPU ms/token), GPU bytes {}\n\
                 decode at context {}: {:.2} tokens/s ({:.2} CPU ms/token), GPU bytes {}\n",
                self.near_decode_tokens_per_s,
                self.near_decode_cpu_ms_per_token,
                self.gpu_bytes_near,
                self.deep_context,
                self.deep_decode_tokens_per_s,
                self.deep_decode_cpu_ms_per_token,
                self.gpu_bytes_after_deep
            ));
        }
        t.push_str(&format!("GPU bytes          {:.3} GiB\n", gb(self.gpu_bytes)));
        t.push_str(&format!("peak RSS           {:.3} GiB\n", gb(self.peak_rss_bytes)));
        t
    }
}

/// CPU time (user + system) of this process in seconds, where the OS tells it.
pub fn cpu_seconds() -> f64 {
    // The process's CPU clock (user + system, all threads), in nanoseconds:
    // /proc/self/stat counts 10 ms ticks, too coarse for a few short steps.
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
        }
        const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
        let mut t = Timespec { sec: 0, nsec: 0 };
        // SAFETY: clock_gettime writes one timespec to the pointer given.
        if unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0 {
            return t.sec as f64 + t.nsec as f64 * 1e-9;
        }
    }
    0.0
}

/// A `/proc/self/status` figure given in kB (`VmHWM:`, `VmRSS:`), in bytes
/// (Linux; 0 elsewhere).
fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Starts a new peak for [`peak_rss_bytes`] at the current resident size
/// (Linux: `/proc/self/clear_refs`; elsewhere nothing). Returns whether
/// it did.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Deterministic token ids below `vocab`.
pub(crate) fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decode of `n` steps for every sequence of `state`; returns
/// (seconds, cpu seconds).
pub(crate) fn decode_run(model: &mut Engine, state: &mut crate::State, n: usize, seed: u64) -> Result<(f64, f64)> {
    let b = state.batch();
    let vocab = model.info().vocab;
    let mut next: Vec<u32> = tokens(b, vocab, seed);
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..n {
        let seqs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let logits = model.forward(state, &refs, LogitsMode::Last)?;
        next = logits.iter().map(|l| argmax(l)).collect();
    }
    Ok((t0.elapsed().as_secs_f64(), cpu_seconds() - c0))
}

/// Loads the model with `load` (timed) and measures it.
pub fn run(
    ctx: &GpuContext,
    name: &str,
    cfg: &BenchConfig,
    load: impl FnOnce(&LoadOptions) -> Result<Model>,
) -> Result<BenchReport> {
    // Default options, as users get them: prompts run in chunks of 128 tokens.
    let opts = LoadOptions { quant: cfg.quant, ..Default::default() };
    let t0 = Instant::now();
    let mut model = Engine::new(std::sync::Arc::new(load(&opts)?), &EngineOptions::default())?;
    let load_s = t0.elapsed().as_secs_f64();
    let info = model.info().clone();
    let vocab = info.vocab;
    let repeat = cfg.repeat.max(1);
    let mut batches = vec![1];
    batches.extend(cfg.batches.iter().copied().filter(|&b| b > 1));

    // Warm-up: every pipeline compiled, every per-step buffer allocated. One
    // state per batch size is reused (reset) for every run, as an
    // application would, so peak memory is that of the largest batch.
    let largest = batches.iter().copied().max().unwrap_or(1);
    let mut warm = model.new_state(largest)?;
    decode_run(&mut model, &mut warm, 2, 1)?;
    drop(warm);
    let prompt = tokens(cfg.prefill, vocab, 7);
    let mut s = model.new_state(1)?;
    model.forward(&mut s, &[&prompt], LogitsMode::Last)?;

    // Prefill.
    let (mut pp, mut pp_cpu) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        s.reset(None)?;
        let (t, c) = (Instant::now(), cpu_seconds());
        model.forward(&mut s, &[&prompt], LogitsMode::Last)?;
        pp.push(cfg.prefill as f64 / t.elapsed().as_secs_f64());
        pp_cpu.push((cpu_seconds() - c) * 1e3 / cfg.prefill as f64);
    }

    // Decode.
    let mut decode = Vec::new();
    let mut dispatches_per_token = 0.0;
    drop(s);
    for &b in &batches {
        let (mut tps, mut cpu) = (Vec::new(), Vec::new());
        let mut s = model.new_state(b)?;
        for r in 0..repeat {
            s.reset(None)?;
            let d0 = ctx.dispatch_count();
            let (secs, cpus) = decode_run(&mut model, &mut s, cfg.decode, 100 + r as u64)?;
            if b == 1 {
                dispatches_per_token = (ctx.dispatch_count() - d0) as f64 / cfg.decode as f64;
            }
            let n = (b * cfg.decode) as f64;
            tps.push(n / secs);
            cpu.push(cpus * 1e3 / n);
        }
        decode.push(DecodeFigure { batch: b, tokens_per_s: median(tps), cpu_ms_per_token: median(cpu) });
    }
    let gpu_bytes = ctx.allocated_bytes();

    // Decode at position 100 and deep into a context: nothing should depend
    // on the position, neither speed nor memory. Both states exist before
    // either is measured, and the two are measured alternately so the
    // machine's drift hits both alike.
    let (mut near_tps, mut deep_tps, mut gpu_near, mut gpu_after) = (0.0, 0.0, 0, 0);
    let (mut near_cpu, mut deep_cpu) = (0.0, 0.0);
    if cfg.deep_context > 0 {
        let near = 100.min(cfg.deep_context);
        let ctx_tokens = tokens(cfg.deep_context, vocab, 11);
        let mut near_s = model.new_state(1)?;
        model.forward(&mut near_s, &[&ctx_tokens[..near]], LogitsMode::Last)?;
        let mut deep_s = near_s.try_clone()?;
        gpu_near = ctx.allocated_bytes();
        model.forward(&mut deep_s, &[&ctx_tokens[near..]], LogitsMode::Last)?;
        gpu_after = ctx.allocated_bytes();
        let (mut nt, mut nc, mut dt, mut dc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let n = cfg.decode as f64;
        for r in 0..repeat {
            let (t, c) = decode_run(&mut model, &mut near_s, cfg.decode, 300 + r as u64)?;
            nt.push(n / t);
            nc.push(c * 1e3 / n);
            let (t, c) = decode_run(&mut model, &mut deep_s, cfg.decode, 300 + r as u64)?;
            dt.push(n / t);
            dc.push(c * 1e3 / n);
        }
        (near_tps, near_cpu, deep_tps, deep_cpu) = (median(nt), median(nc), median(dt), median(dc));
    }

    let emb_row_bytes = (info.n_embd * info.dtype.size()) as u64;
    Ok(BenchReport {
        model: name.to_string(),
        adapter: ctx.adapter().to_string(),
        weight_bytes: info.weight_bytes,
        quant: info.quant,
        gpu_weight_bytes: info.gpu_weight_bytes,
        matrix_bytes: info.matrix_bytes.clone(),
        load_s,
        prefill_tokens: cfg.prefill,
        prefill_tokens_per_s: median(pp),
        prefill_cpu_ms_per_token: median(pp_cpu),
        decode,
        dispatches_per_token,
        weight_bytes_per_token: info.gpu_weight_bytes + emb_row_bytes,
        gpu_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        deep_context: cfg.deep_context,
        near_decode_tokens_per_s: near_tps,
        near_decode_cpu_ms_per_token: near_cpu,
        gpu_bytes_near: gpu_near,
        deep_decode_tokens_per_s: deep_tps,
        deep_decode_cpu_ms_per_token: deep_cpu,
        gpu_bytes_after_deep: gpu_after,
    })
}

/// One sample of a soak run.
#[derive(Debug, Clone)]
pub struct SoakSample {
    /// Tokens generated so far.
    pub tokens: usize,
    /// Resident memory of the process now (not its peak), bytes.
    pub rss_bytes: u64,
    /// Bytes of every live GPU buffer and texture.
    pub gpu_bytes: u64,
    /// Decode speed over the tokens since the previous sample.
    pub tokens_per_s: f64,
}

/// Resident set size of this process now, in bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// Generates `tokens` tokens greedily from a one-token prompt, one step per
/// token, and samples memory every `every` tokens (the first sample at 0,
/// after one warm-up step has allocated the per-step buffers). What must
/// hold over a long run: RSS and GPU bytes flat, logits finite.
pub fn soak(
    ctx: &GpuContext,
    model: &mut Engine,
    tokens: usize,
    every: usize,
    mut report: impl FnMut(&SoakSample),
) -> Result<Vec<SoakSample>> {
    let mut warm = model.new_state(1)?;
    model.forward(&mut warm, &[&[1]], LogitsMode::Last)?;
    drop(warm);
    let mut state = model.new_state(1)?;
    let mut next = 1u32;
    let mut samples = Vec::new();
    let mut t = Instant::now();
    for n in 0..=tokens {
        if n % every.max(1) == 0 || n == tokens {
            let since = samples.last().map_or(0, |s: &SoakSample| s.tokens);
            let dt = t.elapsed().as_secs_f64();
            let s = SoakSample {
                tokens: n,
                rss_bytes: rss_bytes(),
                gpu_bytes: ctx.allocated_bytes(),
                tokens_per_s: if n > since { (n - since) as f64 / dt.max(1e-9) } else { 0.0 },
            };
            report(&s);
            samples.push(s);
            t = Instant::now();
        }
        if n == tokens {
            break;
        }
        let logits = model.forward(&mut state, &[&[next]], LogitsMode::Last)?.remove(0);
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(crate::Error::Gpu(format!("soak: logit {i} is {} after {n} tokens", logits[i])));
        }
        next = argmax(&logits);
    }
    Ok(samples)
}
