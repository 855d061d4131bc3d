//! `rwkv`: the command-line tool.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rwkv_wgpu::{GpuContext, GpuOptions, LoadOptions, LogitsMode, Model};

#[derive(Parser)]
#[command(name = "rwkv", version, about = "RWKV language models on any GPU (wgpu + WGSL)")]
struct Cli {
    /// GPU adapter to use: a substring of its name (e.g. `llvmpipe`, `nvidia`)
    /// or a backend (`vulkan`, `metal`, `dx12`, `gl`). Default: $RWKV_ADAPTER,
    /// else the best one found.
    #[arg(long, global = true)]
    adapter: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run token ids through a model and write the logits as a .npy file.
    Logits {
        /// Model file (.safetensors with the official RWKV tensor names).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Write logits for every position ([T, V]) instead of the last ([1, V]).
        #[arg(long)]
        all: bool,
        /// Most tokens processed in one GPU step.
        #[arg(long, default_value_t = rwkv_wgpu::model::DEFAULT_CHUNK_TOKENS)]
        chunk: usize,
        /// Output .npy file (f32).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a model's version, dimensions and memory use.
    Inspect {
        /// Model file (.safetensors).
        #[arg(long)]
        model: PathBuf,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn gpu(cli: &Cli) -> Result<GpuContext> {
    let ctx = GpuContext::new(&GpuOptions {
        adapter: cli.adapter.clone(),
    })?;
    eprintln!("adapter: {}", ctx.adapter());
    Ok(ctx)
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Logits {
            model,
            tokens,
            all,
            chunk,
            out,
        } => {
            if *chunk == 0 {
                bail!("--chunk must be at least 1");
            }
            let ctx = gpu(&cli)?;
            let opts = LoadOptions {
                chunk_tokens: *chunk,
                ..Default::default()
            };
            let mut m = Model::load(&ctx, model, &opts).with_context(|| format!("loading {}", model.display()))?;
            let vocab = m.info().vocab;
            let mut state = m.new_state(1)?;
            let mode = if *all { LogitsMode::All } else { LogitsMode::Last };
            let logits = m.forward(&mut state, &[tokens], mode)?.remove(0);
            let rows = logits.len() / vocab;
            let bytes = rwkv_wgpu::npy::encode_f32(&[rows, vocab], &logits);
            std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote [{rows}, {vocab}] logits to {}", out.display());
        }
        Command::Inspect { model } => {
            let ctx = gpu(&cli)?;
            let m = Model::load(&ctx, model, &LoadOptions::default())
                .with_context(|| format!("loading {}", model.display()))?;
            let i = m.info();
            println!("file            {}", model.display());
            println!("version         RWKV-{}", i.version);
            println!("layers          {}", i.n_layer);
            println!("width           {}", i.n_embd);
            println!("heads           {} x {}", i.n_head, i.head_size);
            println!("vocab           {}", i.vocab);
            println!("ffn             {}", i.ffn);
            let lora: Vec<String> = i.lora.iter().map(|(n, d)| format!("{n} {d}")).collect();
            println!("lora            {}", lora.join(", "));
            println!("parameters      {}", i.parameters);
            println!("dtype           {}", i.dtype.name());
            println!("weight bytes    {}", i.weight_bytes);
            println!("state bytes     {} per sequence", i.state_bytes_per_sequence);
            println!("gpu bytes       {}", ctx.allocated_bytes());
            println!("adapter         {}", ctx.adapter());
        }
    }
    Ok(())
}
