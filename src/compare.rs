//! `rwkv compare`: an RWKV model and a Transformer side by side on the same
//! GPU, the same matrix kernels and the same engine, as the context grows.
//!
//! RWKV reads each token in constant time and memory; a Transformer's KV
//! cache grows by `kv_bytes_per_token` per token and every decoded token
//! reads all of it. For each context N and each model, one sequence is
//! brought to N tokens (a real prefill up to `prefill_max`, beyond it a
//! cache or state filled with random values: a decode step's cost depends
//! on the cache length, not its content) and `decode` tokens are decoded
//! greedily, `repeat` times from the same N (a KV cache is cut back to N;
//! a recurrent state goes on, its cost being the same at every position).
//! The batch axis decodes B sequences of context `batch_context` in one step.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::bench::{decode_run, median, peak_rss_bytes, reset_peak_rss, tokens};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::gpu::kernels::Kernel;
use crate::gpu::GpuContext;
use crate::model::{LogitsMode, Model};

#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Context lengths of the decode rows.
    pub contexts: Vec<usize>,
    /// Tokens decoded per measurement (tg).
    pub decode: usize,
    /// Longest context brought there by a real prefill; longer ones are filled.
    pub prefill_max: usize,
    /// Batch sizes of the batch rows (empty: none).
    pub batches: Vec<usize>,
    /// Context of every sequence in the batch rows.
    pub batch_context: usize,
    /// Decode measurements per row (the median is reported).
    pub repeat: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            contexts: vec![256, 1024, 4096, 16384, 32768],
            decode: 16,
            prefill_max: 4096,
            batches: Vec::new(),
            batch_context: 1024,
            repeat: 5,
        }
    }
}

/// Which side of the comparison a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Rwkv,
    Transformer,
}

/// What a model is and what one decoded token reads.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub arch: String,
    pub layers: usize,
    pub width: usize,
    pub parameters: u64,
    pub dtype: String,
    /// Weight bytes on the GPU (a tied head counts twice: it is uploaded
    /// as a matrix besides the embedding the file keeps).
    pub gpu_weight_bytes: u64,
    /// Weight bytes one decode step reads: every GPU weight once, and one
    /// embedding row per token.
    pub weight_bytes_per_token: u64,
    /// RWKV's state per sequence (0 for a Transformer).
    pub state_bytes_per_sequence: u64,
    /// A Transformer's KV cache per token of context (0 for RWKV).
    pub kv_bytes_per_token: u64,
}

/// Which axis a row is a point of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sweep {
    /// One sequence at growing contexts.
    Context,
    /// Growing batches at one context.
    Batch,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: Side,
    pub sweep: Sweep,
    /// Tokens each sequence has read before the decoded ones.
    pub context: usize,
    /// Sequences decoded in one step.
    pub batch: usize,
    /// Wall time per decoded token (per step / batch).
    pub decode_ms_per_token: f64,
    /// Process CPU time per decoded token.
    pub decode_cpu_ms_per_token: f64,
    /// GPU bytes of the state or KV cache of the batch after the decode
    /// (a KV cache holds `context + decode` positions then).
    pub memory_bytes: u64,
    /// Every live GPU buffer: weights, state or cache, step buffers.
    pub gpu_bytes: u64,
    /// Peak resident memory of the process during this row.
    pub peak_rss_bytes: u64,
    /// Wall time of the prefill of `context` tokens (null if filled).
    pub prefill_ms: Option<f64>,
    /// The state or cache was filled with random values, not prefilled.
    pub filled: bool,
    /// With `--profile`: bytes the attention kernel read from the KV cache
    /// per second of its own time (Transformer only).
    pub attention_gb_per_s: Option<f64>,
    /// With `--profile`: weight bytes per second of the matrix kernels' time.
    pub linear_gb_per_s: Option<f64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub adapter: String,
    pub rwkv: ModelSummary,
    pub transformer: ModelSummary,
    pub rows: Vec<Row>,
}

fn summary(name: &str, model: &Model) -> ModelSummary {
    let i = model.info();
    ModelSummary {
        name: name.to_string(),
        arch: i.arch.to_string(),
        layers: i.n_layer,
        width: i.n_embd,
        parameters: i.parameters,
        dtype: i.dtype.name().to_string(),
        gpu_weight_bytes: i.gpu_weight_bytes,
        weight_bytes_per_token: i.gpu_weight_bytes + (i.n_embd * i.dtype.size()) as u64,
        state_bytes_per_sequence: i.state_bytes_per_sequence,
        kv_bytes_per_token: i.kv_bytes_per_token,
    }
}

/// Seconds the profile has counted for `kernels` so far.
fn kernel_seconds(ctx: &GpuContext, kernels: &[Kernel]) -> f64 {
    ctx.kernel_profile().iter().filter(|(k, _, _)| kernels.contains(k)).map(|(_, _, t)| t).sum()
}

const ATTENTION_KERNELS: [Kernel; 2] = [Kernel::Attention, Kernel::AttentionLanes];
const MATRIX_KERNELS: [Kernel; 6] =
    [Kernel::Linear, Kernel::LinearSg, Kernel::LinearTex, Kernel::LinearQ, Kernel::LinearQTex, Kernel::LinearQxTex];

/// Measures one model at every context and batch of `cfg`.
pub fn measure(
    ctx: &GpuContext,
    side: Side,
    name: &str,
    model: Model,
    cfg: &CompareConfig,
) -> Result<(ModelSummary, Vec<Row>)> {
    if cfg.decode == 0 || cfg.contexts.iter().chain(&cfg.batches).any(|&n| n == 0) {
        return Err(Error::InvalidArgument("contexts, batches and decoded tokens must be at least 1".into()));
    }
    let info = summary(name, &model);
    let mut engine = Engine::new(Arc::new(model), &EngineOptions::default())?;
    let vocab = engine.info().vocab;
    // Warm-up: every pipeline a prefill chunk and a decode step use
    // compiled, and one measurement's worth of decoding run (the first
    // rows after loading read slow on lavapipe without it).
    let mut warm = engine.new_state(1)?;
    engine.forward(&mut warm, &[&tokens(8, vocab, 1)], LogitsMode::Last)?;
    decode_run(&mut engine, &mut warm, cfg.decode.max(2), 2)?;
    drop(warm);

    let mut rows = Vec::new();
    let mut points: Vec<(Sweep, usize, usize)> = cfg.contexts.iter().map(|&n| (Sweep::Context, n, 1)).collect();
    points.extend(cfg.batches.iter().map(|&b| (Sweep::Batch, cfg.batch_context, b)));
    for (sweep, context, batch) in points {
        let by_batch = sweep == Sweep::Batch;
        reset_peak_rss();
        let mut state = engine.new_state(batch)?;
        for seq in 0..batch {
            state.reserve(seq, context + cfg.decode)?;
        }
        let filled = by_batch || context > cfg.prefill_max;
        let mut prefill_ms = None;
        if filled {
            for seq in 0..batch {
                state.fill_random(seq, context, 1000 + seq as u64)?;
            }
        } else {
            let prompt = tokens(context, vocab, 7);
            let t = Instant::now();
            engine.forward(&mut state, &[&prompt], LogitsMode::Last)?;
            prefill_ms = Some(t.elapsed().as_secs_f64() * 1e3);
        }
        let (attn0, lin0) = (kernel_seconds(ctx, &ATTENTION_KERNELS), kernel_seconds(ctx, &MATRIX_KERNELS));
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        for r in 0..cfg.repeat.max(1) {
            if side == Side::Transformer {
                for seq in 0..batch {
                    state.truncate(seq, context)?;
                }
            }
            let (secs, cpus) = decode_run(&mut engine, &mut state, cfg.decode, 100 + r as u64)?;
            let n = (batch * cfg.decode) as f64;
            wall.push(secs * 1e3 / n);
            cpu.push(cpus * 1e3 / n);
        }
        let (mut attention_gb_per_s, mut linear_gb_per_s) = (None, None);
        if ctx.profiling() {
            let runs = cfg.repeat.max(1) as f64;
            let steps = runs * cfg.decode as f64;
            let linear = kernel_seconds(ctx, &MATRIX_KERNELS) - lin0;
            linear_gb_per_s = Some(info.weight_bytes_per_token as f64 * steps / linear.max(1e-12) / 1e9);
            if side == Side::Transformer {
                // Positions read per step: context + 1 .. context + decode, per sequence.
                let positions: f64 = (1..=cfg.decode).map(|k| (context + k) as f64).sum::<f64>() * batch as f64;
                let attention = kernel_seconds(ctx, &ATTENTION_KERNELS) - attn0;
                let bytes = positions * runs * info.kv_bytes_per_token as f64;
                attention_gb_per_s = Some(bytes / attention.max(1e-12) / 1e9);
            }
        }
        rows.push(Row {
            model: side,
            sweep,
            context,
            batch,
            decode_ms_per_token: median(wall),
            decode_cpu_ms_per_token: median(cpu),
            memory_bytes: state.bytes(),
            gpu_bytes: ctx.allocated_bytes(),
            peak_rss_bytes: peak_rss_bytes(),
            prefill_ms,
            filled,
            attention_gb_per_s,
            linear_gb_per_s,
        });
    }
    Ok((info, rows))
}

impl Comparison {
    /// One side's rows of one sweep.
    fn rows_of(&self, side: Side, sweep: Sweep) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(move |r| r.model == side && r.sweep == sweep)
    }

    /// The rows as a table.
    pub fn to_table(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut t = format!("adapter  {}\n", self.adapter);
        for (label, s) in [("rwkv", &self.rwkv), ("transformer", &self.transformer)] {
            t.push_str(&format!(
                "{label:<12} {} ({}, {} layers, width {}, {:.1} M parameters, {}), {:.1} MiB of weights read per token, {}\n",
                s.name,
                s.arch,
                s.layers,
                s.width,
                s.parameters as f64 / 1e6,
                s.dtype,
                mib(s.weight_bytes_per_token),
                if s.kv_bytes_per_token > 0 {
                    format!("KV cache {} bytes per token", s.kv_bytes_per_token)
                } else {
                    format!("state {} bytes per sequence", s.state_bytes_per_sequence)
                }
            ));
        }
        t.push_str(&format!(
            "{:<12} {:>7} {:>5} {:>10} {:>10} {:>12} {:>10} {:>10} {:>11} {:>6}\n",
            "model",
            "context",
            "batch",
            "ms/token",
            "CPU ms/tok",
            "memory MiB",
            "GPU MiB",
            "RSS MiB",
            "prefill ms",
            "filled"
        ));
        for r in &self.rows {
            t.push_str(&format!(
                "{:<12} {:>7} {:>5} {:>10.2} {:>10.2} {:>12.2} {:>10.1} {:>10.1} {:>11} {:>6}\n",
                match r.model {
                    Side::Rwkv => "rwkv",
                    Side::Transformer => "transformer",
                },
                r.context,
                r.batch,
                r.decode_ms_per_token,
                r.decode_cpu_ms_per_token,
                mib(r.memory_bytes),
                mib(r.gpu_bytes),
                mib(r.peak_rss_bytes),
                r.prefill_ms.map_or("-".to_string(), |p| format!("{p:.0}")),
                if r.filled { "yes" } else { "no" }
            ));
        }
        for line in self.findings() {
            t.push_str(&line);
            t.push('\n');
        }
        t
    }

    /// What the rows show, in sentences: weight bandwidth at the shortest
    /// context, RWKV's flatness, the KV cache's growth against the bytes read.
    pub fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let context_rows = |side| self.rows_of(side, Sweep::Context).collect::<Vec<_>>();
        let (rw, tf) = (context_rows(Side::Rwkv), context_rows(Side::Transformer));
        let (Some(r0), Some(t0), Some(r1), Some(t1)) = (rw.first(), tf.first(), rw.last(), tf.last()) else {
            return out;
        };
        let gbs = |bytes: u64, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        let (rg, tg) = (
            gbs(self.rwkv.weight_bytes_per_token, r0.decode_ms_per_token),
            gbs(self.transformer.weight_bytes_per_token, t0.decode_ms_per_token),
        );
        out.push(format!(
            "weights read at context {}: RWKV {rg:.2} GB/s, Transformer {tg:.2} GB/s ({:.2}x RWKV's)",
            t0.context,
            tg / rg
        ));
        if r1.context > r0.context {
            out.push(format!(
                "RWKV from context {} to {}: decode {:.2} -> {:.2} ms/token ({:+.1} %), state {} -> {} bytes",
                r0.context,
                r1.context,
                r0.decode_ms_per_token,
                r1.decode_ms_per_token,
                (r1.decode_ms_per_token / r0.decode_ms_per_token - 1.0) * 100.0,
                r0.memory_bytes,
                r1.memory_bytes
            ));
        }
        if t1.context > t0.context {
            let per_token = (t1.memory_bytes - t0.memory_bytes) as f64 / (t1.context - t0.context) as f64;
            // Predicted: the shortest context's time plus the extra cache
            // bytes read at the weight bandwidth measured there.
            let extra = (t1.context - t0.context) as f64 * self.transformer.kv_bytes_per_token as f64;
            let predicted = t0.decode_ms_per_token + extra / (tg * 1e9) * 1e3;
            out.push(format!(
                "Transformer from context {} to {}: memory grows {per_token:.0} bytes per token (KV cache {} bytes per token); \
                 decode {:.2} -> {:.2} ms/token, {predicted:.2} predicted by the bytes read at {tg:.2} GB/s",
                t0.context,
                t1.context,
                self.transformer.kv_bytes_per_token,
                t0.decode_ms_per_token,
                t1.decode_ms_per_token
            ));
            // The slope between the two longest contexts: what each extra
            // byte of cache costs, as a read rate.
            let tp = tf[tf.len() - 2];
            let dt = (t1.decode_ms_per_token - tp.decode_ms_per_token) * 1e-3;
            if dt > 0.0 {
                let bytes = (t1.context - tp.context) as f64 * self.transformer.kv_bytes_per_token as f64;
                out.push(format!(
                    "Transformer from context {} to {}: each token reads {:.1} MB more cache and takes {:.2} ms more: \
                     the cache is read at {:.2} GB/s",
                    tp.context,
                    t1.context,
                    bytes / 1e6,
                    dt * 1e3,
                    bytes / dt / 1e9
                ));
            }
        }
        for r in &tf {
            if let (Some(a), Some(l)) = (r.attention_gb_per_s, r.linear_gb_per_s) {
                out.push(format!(
                    "profiled at context {}: attention reads the KV cache at {a:.2} GB/s, the matrix kernels read weights at {l:.2} GB/s",
                    r.context
                ));
            }
        }
        out
    }

    /// The rows as JSON: `{"adapter", "rwkv": {…}, "transformer": {…}, "rows": […]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain numbers and strings serialize")
    }

    /// An SVG chart: decode latency and state/cache memory against the
    /// context (log scales), and against the batch when batch rows exist.
    #[cfg(feature = "chart")]
    pub fn to_svg(&self) -> Result<String> {
        chart::svg(self)
    }
}

#[cfg(feature = "chart")]
mod chart {
    use plotters::prelude::*;

    use super::{Comparison, Row, Side, Sweep};
    use crate::error::{Error, Result};

    const RWKV_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
    const TRANSFORMER_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);

    type Series = Vec<(Side, Vec<(f64, f64)>)>;

    fn err(e: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(format!("drawing the chart: {e}"))
    }

    /// One log-log panel of both sides' series.
    fn panel(
        area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
        title: &str,
        x_desc: &str,
        y_desc: &str,
        series: &Series,
    ) -> Result<()> {
        let all = series.iter().flat_map(|(_, s)| s.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 || y0 <= 0.0 {
            return Ok(());
        }
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x0 / 1.3..x1 * 1.3).log_scale(), (y0 / 1.5..y1 * 1.5).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(10)
            .light_line_style(WHITE)
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| if *y >= 10.0 { format!("{y:.0}") } else { format!("{y:.2}") })
            .draw()
            .map_err(err)?;
        for (side, points) in series {
            let (color, label) = match side {
                Side::Rwkv => (RWKV_COLOR, "RWKV"),
                Side::Transformer => (TRANSFORMER_COLOR, "Transformer"),
            };
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
            // Each point's value beside it: log axes have few labels.
            let text = |v: f64| if v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") };
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Text::new(text(y), (x, y), ("sans-serif", 11).into_font().color(&color))),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    }

    pub(super) fn svg(c: &Comparison) -> Result<String> {
        let batch_axis = c.rows.iter().any(|r| r.sweep == Sweep::Batch);
        let height = if batch_axis { 830 } else { 450 };
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (1000, height)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let title = format!("{} vs {}", c.rwkv.name, c.transformer.name);
            let root = root.titled(&title, ("sans-serif", 16)).map_err(err)?;
            let adapter = c.adapter.split(" (").next().unwrap_or(&c.adapter).to_string();
            root.draw(&Text::new(adapter, (10, 0), ("sans-serif", 12))).map_err(err)?;
            let rows = if batch_axis { 2 } else { 1 };
            let areas = root.split_evenly((rows, 2));
            let series = |sweep: Sweep, y: &dyn Fn(&Row) -> f64| -> Series {
                [Side::Rwkv, Side::Transformer]
                    .into_iter()
                    .map(|s| {
                        let x = |r: &Row| if sweep == Sweep::Batch { r.batch as f64 } else { r.context as f64 };
                        (s, c.rows_of(s, sweep).map(|r| (x(r), y(r))).collect())
                    })
                    .collect()
            };
            let ms = |r: &Row| r.decode_ms_per_token;
            let mib = |r: &Row| r.memory_bytes as f64 / (1u64 << 20) as f64;
            let by_context = Sweep::Context;
            panel(
                &areas[0],
                "Decode latency vs context",
                "context (tokens)",
                "ms per token",
                &series(by_context, &ms),
            )?;
            panel(
                &areas[1],
                "State / KV cache vs context",
                "context (tokens)",
                "MiB per sequence",
                &series(by_context, &mib),
            )?;
            if batch_axis {
                let ctx = c.rows.iter().find(|r| r.sweep == Sweep::Batch).map_or(0, |r| r.context);
                panel(
                    &areas[2],
                    &format!("Decode latency vs batch (context {ctx})"),
                    "sequences per step",
                    "ms per token",
                    &series(Sweep::Batch, &ms),
                )?;
                panel(
                    &areas[3],
                    &format!("State / KV cache vs batch (context {ctx})"),
                    "sequences per step",
                    "MiB for the batch",
                    &series(Sweep::Batch, &mib),
                )?;
            }
            root.present().map_err(err)?;
        }
        Ok(out)
    }
}
