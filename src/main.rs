//! `rwkv`: the command-line tool.

use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rwkv_wgpu::chat::{ChatFormat, RWKV_TURN_END};
use rwkv_wgpu::files::{write_atomic, Overwrite};
use rwkv_wgpu::gpu::WeightStore;
use rwkv_wgpu::openai::{Message, Role};
use rwkv_wgpu::quant::Format;
use rwkv_wgpu::state::StateData;
use rwkv_wgpu::tokenizer::HfTokenizer;
use rwkv_wgpu::{
    EndTokens, Engine, EngineOptions, GenerateOptions, GpuContext, GpuOptions, KvDtype, LoadOptions, LogitsMode, Model,
    SafeTensorsFile, Sampler, SamplerConfig, Session, StopReason, Tokenizer, DEFAULT_CHUNK_TOKENS,
};

/// The built-in demo model: a 4.1M-parameter RWKV-7 trained on Jane Austen
/// (assets/austen-rwkv7/README.md), used when no --model is given.
const DEMO_MODEL: &[u8] = include_bytes!("../assets/austen-rwkv7/austen-rwkv7-fp16.safetensors");
const DEMO_TOKENIZER: &[u8] = include_bytes!("../assets/austen-rwkv7/tokenizer.json");
const DEMO_NAME: &str = "built-in austen-rwkv7 (fp16)";

#[derive(Parser)]
#[command(name = "rwkv", version, about = "RWKV language models on any GPU (wgpu + WGSL)")]
struct Cli {
    /// GPU adapter: a substring of its name (e.g. `llvmpipe`, `nvidia`) or a
    /// backend (`vulkan`, `metal`, `dx12`, `gl`). Default: $RWKV_ADAPTER, else the best found.
    #[arg(long, global = true)]
    adapter: Option<String>,

    /// Most GPU bytes to use (buffers and textures); past it loading or a
    /// step is an error naming the bytes needed, as on a smaller GPU.
    #[arg(long, global = true, value_name = "BYTES")]
    gpu_memory_limit: Option<u64>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model file: .safetensors with the official RWKV tensor names, or an
    /// official PyTorch .pth (RWKV-4, 5.x, 6 or 7, detected from the tensors);
    /// or a Hugging Face folder (config.json, model.safetensors or shards with
    /// model.safetensors.index.json, tokenizer.json) of a Llama, Qwen2 or
    /// GPT-NeoX model. Default: the built-in Jane Austen demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A Transformer's KV cache element type: f16 (half the memory) or f32.
    #[arg(long, default_value_t = KvDtype::F16)]
    kv_cache: KvDtype,
    /// Quantize the weight matrices (the head and LoRAs too) as they load:
    /// `int8` (one f16 scale per block of 64 weights) or `4bit` (also `q4`:
    /// llama.cpp's Q4_0 codes, a searched f16 scale per block of 64).
    /// Matrices whose inputs no block of 32 or 64 divides stay as stored.
    #[arg(long)]
    quant: Option<Format>,
    /// Tokenizer: `world` (the RWKV World vocab, built in), a `rwkv_vocab*.txt`,
    /// or a Hugging Face `tokenizer.json`. Default: tokenizer.json or
    /// rwkv_vocab*.txt next to the model, else World for 65536-token models.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Most tokens processed in one GPU step (bounds per-step GPU memory).
    #[arg(long, default_value_t = DEFAULT_CHUNK_TOKENS)]
    chunk: usize,
}

#[derive(Args, Clone)]
struct StateArgs {
    /// Initial state: an official state-tuning file (`blocks.N.att.time_state`,
    /// .pth or .safetensors) or a state saved with chat's /save. /reset
    /// returns to it.
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability
    /// (1: off). Default 0.9 for generate, 0.5 for chat.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Drop tokens less likely than min-p × the most likely one (0: off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Subtracted from the logit of every token already generated.
    /// Default 0 for generate, 0.4 for chat.
    #[arg(long, allow_negative_numbers = true)]
    presence_penalty: Option<f32>,
    /// Subtracted per occurrence of a token already generated.
    /// Default 0 for generate, 0.4 for chat.
    #[arg(long, allow_negative_numbers = true)]
    frequency_penalty: Option<f32>,
    /// Divide positive (multiply negative) logits of generated tokens by this (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Per-token decay of the occurrence counts used by the penalties (1: none).
    /// Default 1 for generate, 0.996 for chat.
    #[arg(long, allow_negative_numbers = true)]
    penalty_decay: Option<f32>,
    /// Add BIAS to the logit of token ID, as ID=BIAS (repeatable; -inf bans).
    #[arg(long, value_name = "ID=BIAS")]
    logit_bias: Vec<String>,
    /// Stop when this text is generated (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Random seed (default: from the clock). Same seed, model and prompt: same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep going past the end-of-text token (RWKV: id 0; a Transformer: the
    /// config's `eos_token_id`).
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming the text as it is generated.
    Generate {
        /// The prompt; read from stdin when absent or `-`.
        prompt: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Multi-turn chat on stdin (`User: …` / `Assistant: …`), keeping the
    /// state between turns. Commands: /reset, /save FILE, /load FILE (a saved
    /// or state-tuned state), /quit.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Read raw bytes on stdin, print their token ids as a JSON array.
    Tokenize {
        /// `world`, a rwkv_vocab*.txt or a tokenizer.json. Default: the
        /// built-in demo model's tokenizer (the default model's).
        #[arg(long)]
        tokenizer: Option<String>,
    },
    /// Read a JSON array of token ids on stdin, write their raw bytes to stdout.
    Detokenize {
        /// `world`, a rwkv_vocab*.txt or a tokenizer.json. Default: the
        /// built-in demo model's tokenizer (the default model's).
        #[arg(long)]
        tokenizer: Option<String>,
    },
    /// Loss and perplexity of a model on a text file (read from the zero state in one stream).
    Perplexity {
        /// Text file to score.
        file: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Run token ids through a model and write the logits as a .npy file.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required_unless_present = "tokens_file", conflicts_with = "tokens_file")]
        tokens: Vec<u32>,
        /// Token ids from a file (`-`: stdin), as a JSON array or separated by
        /// commas or white space: for sequences too long for a command line.
        #[arg(long)]
        tokens_file: Option<PathBuf>,
        /// Write logits for every position ([T, V]) instead of the last ([1, V]).
        #[arg(long)]
        all: bool,
        /// Output .npy file (f32).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure load time, prefill and decode speed, memory and bytes per
    /// token, on a model file or on a synthetic model of a given shape.
    Bench {
        /// Model file; without it a synthetic model of --shape is generated.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Synthetic model shape, e.g. L12-D768-V65536 (0.1B) or L24-D2048-V65536 (1.5B).
        #[arg(long, default_value = "L12-D768-V65536")]
        shape: String,
        /// Weight dtype of the synthetic model: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// RWKV generation of the synthetic model: 4, 5.0, 5.1, 5.2, 6 or 7.
        #[arg(long = "version", default_value = "7")]
        rwkv_version: String,
        /// Prompt tokens for the prefill figure.
        #[arg(long, default_value_t = 512)]
        pp: usize,
        /// Generated tokens per decode figure.
        #[arg(long, default_value_t = 128)]
        tg: usize,
        /// Decode batch sizes (batch 1 is always measured).
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batch: Vec<usize>,
        /// Runs per figure; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Also measure decode after this many tokens of context (e.g. 10000).
        #[arg(long, default_value_t = 0)]
        deep: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Quantize the weight matrices (the head and LoRAs too) as they load:
        /// `int8` (one f16 scale per block of 64 weights) or `4bit` (also `q4`:
        /// llama.cpp's Q4_0 codes, a searched f16 scale per block of 64).
        /// Matrices whose inputs no block of 32 or 64 divides stay as stored.
        #[arg(long)]
        quant: Option<Format>,
        /// Instead of the figures: generate this many tokens (e.g. 100000)
        /// and print RSS and GPU bytes every 10,000 (a long-run check).
        #[arg(long, default_value_t = 0)]
        soak: usize,
    },
    /// RWKV and a Transformer side by side as the context grows: decode
    /// latency, state or KV-cache memory, GPU bytes, peak RSS and prefill
    /// time, on the same GPU and kernels; offline (synthetic weights by default).
    Compare {
        /// The RWKV side: a model file, or a synthetic shape such as
        /// L12-D768-V65536 (the RWKV-7 0.1B) or L12-D768-V50277 with
        /// --rwkv-version 4 (the RWKV-4 169M of the RWKV paper).
        #[arg(long, default_value = "L12-D768-V65536")]
        rwkv: String,
        /// RWKV generation of a synthetic --rwkv shape: 4, 5.0, 5.1, 5.2, 6 or 7.
        #[arg(long, default_value = "7")]
        rwkv_version: String,
        /// The Transformer side: a Hugging Face folder, or a synthetic shape:
        /// smollm2-135m (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads),
        /// pythia-160m (GPT-NeoX, the RWKV paper's baseline), or e.g.
        /// llama-L30-D576-H9-KV3-F1536-V49152-tied.
        #[arg(long, default_value = "smollm2-135m")]
        transformer: String,
        /// Context lengths to decode at.
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096,16384,32768")]
        contexts: Vec<usize>,
        /// Weight dtype of the synthetic models: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// The Transformer's KV cache element type: f16 or f32.
        #[arg(long, default_value_t = KvDtype::F16)]
        kv_cache: KvDtype,
        /// Quantize the weight matrices (the head and LoRAs too) as they load:
        /// `int8` (one f16 scale per block of 64 weights) or `4bit` (also `q4`:
        /// llama.cpp's Q4_0 codes, a searched f16 scale per block of 64).
        /// Matrices whose inputs no block of 32 or 64 divides stay as stored.
        #[arg(long)]
        quant: Option<Format>,
        /// Tokens decoded per measurement.
        #[arg(long, default_value_t = 16)]
        tg: usize,
        /// Longest context reached by a real prefill (timed); longer ones are
        /// filled with random values of the right shape (rows marked filled).
        #[arg(long, default_value_t = 4096)]
        prefill_max: usize,
        /// Also decode these batch sizes in one step, at --batch-context
        /// (the serving case, where the KV cache multiplies), e.g. 1,8,32.
        #[arg(long, value_delimiter = ',')]
        batch: Vec<usize>,
        /// Context of every sequence of the --batch rows.
        #[arg(long, default_value_t = 1024)]
        batch_context: usize,
        /// Decode measurements per row; the median is reported.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the chart (decode latency and memory against the
        /// context, log scales) to this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Write an RWKV checkpoint with its matrices quantized (int8 or 4bit),
    /// to load with no float pass and half or a quarter of the memory.
    Quantize {
        /// The float checkpoint to read (.pth or .safetensors).
        input: PathBuf,
        /// The .safetensors file to write (never the input itself).
        output: PathBuf,
        /// The weight format: int8, or 4bit (also q4).
        #[arg(long)]
        to: Format,
        /// Replace the output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Serve the OpenAI API over HTTP (completions, chat, streaming) with
    /// continuous batching and a prefix state cache; see docs/serving.md.
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        state: StateArgs,
        /// Address to listen on (0.0.0.0 to serve other machines).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0: any free port; the address is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Require `Authorization: Bearer KEY` (all endpoints but /health).
        #[arg(long, env = "RWKV_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Most requests read or generated at once (sessions in the batch).
        #[arg(long, default_value_t = 32)]
        max_sessions: usize,
        /// Most requests waiting beyond those; more are answered 429.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Largest request body, in bytes; larger ones are answered 400.
        #[arg(long, default_value_t = 1 << 20)]
        max_body_bytes: usize,
        /// Most `max_tokens` a request may ask for; more is answered 400.
        #[arg(long, default_value_t = 4096)]
        max_tokens_cap: usize,
        /// Bytes of RWKV states kept for prompt prefixes (LRU; 0: off).
        #[arg(long, default_value_t = 256 << 20)]
        prefix_cache_bytes: usize,
        /// Seconds requests in flight get to finish after SIGINT/SIGTERM.
        #[arg(long, default_value_t = 10.0)]
        shutdown_grace: f64,
        /// Seconds a connection has to send a request's headers (also while
        /// idle between requests), and again its body; then it is closed.
        #[arg(long, default_value_t = 30.0)]
        read_timeout: f64,
        /// Seconds a connection may take no bytes of an answer (a client
        /// that stopped reading) before it is closed.
        #[arg(long, default_value_t = 30.0)]
        write_timeout: f64,
        /// Most connections open at once; more wait to be accepted.
        #[arg(long, default_value_t = 512)]
        max_connections: usize,
    },
    /// Print a model's version, dimensions and memory use.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// Also list every tensor of the file: name, shape and format (its
        /// element type, or the block format of a pre-quantized matrix).
        #[arg(long)]
        tensors: bool,
    },
    /// Write a checkpoint (.pth or .safetensors) as .safetensors, official
    /// tensor names, dtypes and values unchanged.
    Convert {
        /// The checkpoint to read, e.g. RWKV-x060-World-1B6.pth.
        input: PathBuf,
        /// The .safetensors file to write (never the input itself).
        output: PathBuf,
        /// Replace the output if it exists.
        #[arg(long)]
        force: bool,
    },
}

/// `println!` to stdout that ends the process quietly (exit 0) when the
/// reader has gone (`| head`), as a closed pipe is no error of ours
/// (`println!` would panic there), and with one error line on any other
/// write error.
macro_rules! out {
    ($($arg:tt)*) => {{
        let mut o = std::io::stdout().lock();
        if let Err(e) = writeln!(o, $($arg)*).and_then(|_| o.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

fn main() {
    // A bug must still end in one line and a non-zero exit, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error: {msg}{at} (a bug: please report it)");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return;
        }
        Err(e) => {
            // One line: clap's first line, which names the problem.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see `rwkv --help`)");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The GPU options: `--adapter`, and the environment variables, which only
/// the binary reads (the library takes everything as options):
/// `RWKV_ADAPTER` (as `--adapter`), `RWKV_WEIGHTS=buffer|texture`,
/// `RWKV_NO_SUBGROUPS` and `RWKV_PROFILE` (time every kernel, for `bench`).
fn gpu_options(cli: &Cli) -> Result<GpuOptions> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let weight_store = match env("RWKV_WEIGHTS").as_deref() {
        None => None,
        Some("buffer") => Some(WeightStore::Buffer),
        Some("texture") => Some(WeightStore::Texture),
        Some(other) => bail!("RWKV_WEIGHTS={other}: expected `buffer` or `texture`"),
    };
    Ok(GpuOptions {
        adapter: cli.adapter.clone().or_else(|| env("RWKV_ADAPTER")),
        weight_store,
        no_subgroups: std::env::var_os("RWKV_NO_SUBGROUPS").is_some(),
        profile: std::env::var_os("RWKV_PROFILE").is_some(),
        memory_limit: cli.gpu_memory_limit,
    })
}

fn gpu(cli: &Cli) -> Result<GpuContext> {
    let ctx = GpuContext::new(&gpu_options(cli)?)?;
    match ctx.subgroup_size() {
        Some(n) => eprintln!("adapter: {} [subgroups of {n}]", ctx.adapter()),
        None => eprintln!("adapter: {}", ctx.adapter()),
    }
    Ok(ctx)
}

/// A loaded model with an engine to run it, and its tokenizer if asked for.
struct Loaded {
    model: Arc<Model>,
    engine: Engine,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl Loaded {
    fn tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone().expect("loaded with its tokenizer")
    }
}

/// Loads the model (with a progress bar on a terminal), an engine for it,
/// and its tokenizer.
fn load(ctx: &GpuContext, args: &ModelArgs, need_tokenizer: bool) -> Result<Loaded> {
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let mut opts = LoadOptions { kv_cache: args.kv_cache, quant: args.quant, ..Default::default() };
    let bar = (std::io::stdout().is_terminal() && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    if let Some(bar) = &bar {
        let bar = bar.clone();
        opts.progress = Some(Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        }));
    }
    let model = match &args.model {
        Some(p) => Model::load(ctx, p, &opts).with_context(|| format!("loading {}", p.display()))?,
        None => SafeTensorsFile::from_static(DEMO_NAME, DEMO_MODEL)
            .and_then(|f| Model::from_file(ctx, f, &opts))
            .with_context(|| format!("loading {DEMO_NAME}"))?,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let model = Arc::new(model);
    let engine = Engine::new(model.clone(), &EngineOptions { chunk_tokens: args.chunk })?;
    if !need_tokenizer {
        return Ok(Loaded { model, engine, tokenizer: None });
    }
    let vocab = model.info().vocab;
    let tok = match (&args.model, &args.tokenizer) {
        (None, None) => {
            let t = demo_tokenizer()?;
            t.check_vocab(vocab)?;
            t
        }
        (path, spec) => Tokenizer::for_model(spec.as_deref(), path.as_deref(), vocab)?,
    };
    Ok(Loaded { model, engine, tokenizer: Some(Arc::new(tok)) })
}

fn sampler_config(s: &SamplingArgs, chat: bool) -> Result<SamplerConfig> {
    let mut bias = Vec::new();
    for b in &s.logit_bias {
        let (id, v) = b.split_once('=').ok_or_else(|| anyhow!("--logit-bias wants ID=BIAS, got `{b}`"))?;
        let id: u32 = id.trim().parse().map_err(|_| anyhow!("--logit-bias: `{id}` is not a token id"))?;
        let v: f32 = match v.trim() {
            "-inf" => f32::NEG_INFINITY,
            other => other.parse().map_err(|_| anyhow!("--logit-bias: `{other}` is not a number"))?,
        };
        bias.push((id, v));
    }
    // Chat defaults follow the RWKV chat tools: a narrower nucleus and decayed penalties.
    let (top_p, presence, frequency, decay) = if chat { (0.5, 0.4, 0.4, 0.996) } else { (0.9, 0.0, 0.0, 1.0) };
    Ok(SamplerConfig {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p.unwrap_or(top_p),
        min_p: s.min_p,
        presence_penalty: s.presence_penalty.unwrap_or(presence),
        frequency_penalty: s.frequency_penalty.unwrap_or(frequency),
        repetition_penalty: s.repetition_penalty,
        penalty_decay: s.penalty_decay.unwrap_or(decay),
        logit_bias: bias,
        seed: s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        }),
    })
}

fn generate_options(s: &SamplingArgs, extra_stop: &[&str]) -> GenerateOptions {
    let mut stop = s.stop.clone();
    stop.extend(extra_stop.iter().map(|s| s.to_string()));
    GenerateOptions {
        max_tokens: s.max_tokens,
        stop,
        eos: if s.ignore_eos { EndTokens::Ignore } else { EndTokens::Model },
    }
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
    Ok(buf)
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Generate { prompt, model, state, sampling } => {
            generate(&cli, prompt.as_deref(), model, state, sampling)
        }
        Command::Chat { model, state, sampling } => chat(&cli, model, state, sampling),
        Command::Convert { input, output, force } => convert(input, output, *force),
        Command::Quantize { input, output, to, force } => quantize(input, output, *to, *force),
        Command::Tokenize { tokenizer } => tokenize(tokenizer.as_deref()),
        Command::Detokenize { tokenizer } => detokenize(tokenizer.as_deref()),
        Command::Perplexity { file, model } => perplexity_cmd(&cli, file, model),
        Command::Logits { model, tokens, tokens_file, all, out } => {
            let tokens = match tokens_file {
                Some(f) => read_ids(f)?,
                None => tokens.clone(),
            };
            if tokens.is_empty() {
                bail!("no token ids given");
            }
            logits(&cli, model, &tokens, *all, out, tokens_file.as_deref())
        }
        Command::Bench { .. } => bench(&cli),
        Command::Compare { .. } => compare(&cli),
        Command::Inspect { model, tensors } => inspect(&cli, model, *tensors),
        Command::Serve { .. } => serve(&cli),
    }
}

/// What `generate` and `chat` start from: the model and an engine, a session
/// in its initial state (`--state`), and the sampler (chat's defaults with `chat`).
fn start_session(
    cli: &Cli,
    model: &ModelArgs,
    state: &StateArgs,
    sampling: &SamplingArgs,
    chat: bool,
) -> Result<(Loaded, Session, Sampler)> {
    let sampler = Sampler::new(sampler_config(sampling, chat)?)?;
    let ctx = gpu(cli)?;
    let m = load(&ctx, model, true)?;
    let mut session = Session::new(m.model.clone(), m.tokenizer())?;
    if let Some(s) = initial_state(&m.model, state)? {
        session.set_initial_state(s)?;
    }
    Ok((m, session, sampler))
}

/// `rwkv generate`: continue a prompt, streaming the text.
fn generate(
    cli: &Cli,
    prompt: Option<&str>,
    model: &ModelArgs,
    state: &StateArgs,
    sampling: &SamplingArgs,
) -> Result<()> {
    let prompt = match prompt {
        Some("-") | None => read_stdin()?,
        Some(p) => p.as_bytes().to_vec(),
    };
    if prompt.is_empty() {
        bail!("empty prompt: give the text to continue as an argument or on stdin");
    }
    let (mut m, mut session, mut sampler) = start_session(cli, model, state, sampling, false)?;
    let t0 = Instant::now();
    let n_prompt = feed_text(&mut session, &mut m.engine, &prompt)?;
    let t1 = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    // A closed stdout (`| head`) ends generation at once.
    let g = session.generate(&mut m.engine, &mut sampler, &generate_options(sampling, &[]), |text| {
        match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_err = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e).context("writing to stdout");
    }
    if out.is_terminal() {
        writeln!(out)?;
    }
    let dt = t1.elapsed().as_secs_f64();
    eprintln!(
        "\n[prompt: {n_prompt} tokens in {:.2} s; generated {} tokens in {dt:.2} s, {:.2} tokens/s; stop: {}; seed {}]",
        (t1 - t0).as_secs_f64(),
        g.tokens.len(),
        g.tokens.len() as f64 / dt.max(1e-9),
        stop_name(&g.stop),
        sampler.config().seed
    );
    Ok(())
}

/// `rwkv convert`: a checkpoint rewritten as safetensors (atomically, never
/// over the input, over an existing file only with --force).
fn convert(input: &Path, output: &Path, force: bool) -> Result<()> {
    let src = SafeTensorsFile::open(input).with_context(|| format!("reading {}", input.display()))?;
    let version = rwkv_wgpu::detect_version(&src).map(|v| format!("RWKV-{v}"));
    let overwrite = if force { Overwrite::Replace } else { Overwrite::Refuse };
    let (n, skipped) = rwkv_wgpu::loader::convert_to_safetensors(&src, output, overwrite)?;
    if !skipped.is_empty() {
        eprintln!("skipped {} tensors that are not f32/f16/bf16: {}", skipped.len(), skipped.join(", "));
    }
    eprintln!(
        "wrote {n} tensors ({}) to {}",
        version.unwrap_or_else(|e| format!("not recognised as RWKV: {e}")),
        output.display()
    );
    Ok(())
}

/// `rwkv quantize`: a pre-quantized copy of an RWKV checkpoint.
fn quantize(input: &Path, output: &Path, to: Format, force: bool) -> Result<()> {
    let src = SafeTensorsFile::open(input).with_context(|| format!("reading {}", input.display()))?;
    let version =
        rwkv_wgpu::detect_version(&src).with_context(|| format!("{} is no RWKV checkpoint", input.display()))?;
    let overwrite = if force { Overwrite::Replace } else { Overwrite::Refuse };
    let s = rwkv_wgpu::loader::quantize_file(&src, output, to, overwrite)?;
    if !s.skipped.is_empty() {
        eprintln!("skipped {} tensors that are not f32/f16/bf16: {}", s.skipped.len(), s.skipped.join(", "));
    }
    let by: Vec<String> = s.quantized.iter().map(|(scheme, n)| format!("{n} as {scheme}")).collect();
    eprintln!(
        "wrote RWKV-{version} to {}: {} matrices quantized ({}), {} tensors as they were; {:.1} MiB -> {:.1} MiB",
        output.display(),
        s.quantized.iter().map(|(_, n)| n).sum::<usize>(),
        by.join(", "),
        s.copied,
        s.bytes_in as f64 / (1 << 20) as f64,
        s.bytes_out as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// `--tokenizer` of tokenize/detokenize, or the default model's tokenizer.
fn tokenizer_or_demo(spec: Option<&str>) -> Result<Tokenizer> {
    Ok(match spec {
        Some(s) => Tokenizer::from_spec(s)?,
        None => demo_tokenizer()?,
    })
}

/// The built-in demo model's tokenizer.
fn demo_tokenizer() -> Result<Tokenizer> {
    Ok(Tokenizer::Hf(HfTokenizer::from_bytes(DEMO_TOKENIZER, "built-in austen tokenizer.json")?))
}

/// `rwkv tokenize`: bytes on stdin to a JSON array of ids.
fn tokenize(tokenizer: Option<&str>) -> Result<()> {
    let tok = tokenizer_or_demo(tokenizer)?;
    let ids = tok.encode(&read_stdin()?)?;
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    out!("[{}]", list.join(", "));
    Ok(())
}

/// `rwkv detokenize`: a JSON array of ids on stdin to raw bytes.
fn detokenize(tokenizer: Option<&str>) -> Result<()> {
    let tok = tokenizer_or_demo(tokenizer)?;
    let text = String::from_utf8(read_stdin()?).map_err(|_| anyhow!("stdin is not a JSON array of ids"))?;
    let ids = parse_id_array(&text)?;
    // Every id checked first, then the bytes written token by token: a
    // vocabulary of long tokens repeated many times is never held whole.
    if let Some(&bad) = ids.iter().find(|&&id| tok.token_bytes(id).is_none()) {
        bail!("token id {bad} is not in the vocabulary ({} ids)", tok.vocab_size());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for &id in &ids {
        if let Err(e) = out.write_all(tok.token_bytes(id).unwrap_or_default()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e).context("writing to stdout");
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// `rwkv perplexity`: loss, perplexity and bits per byte of a text file.
fn perplexity_cmd(cli: &Cli, file: &Path, model: &ModelArgs) -> Result<()> {
    let text = rwkv_wgpu::files::read_regular(file)?;
    let ctx = gpu(cli)?;
    let mut m = load(&ctx, model, true)?;
    let tok = m.tokenizer();
    let ids = tok.encode(&text)?;
    if ids.len() < 2 {
        bail!("{} has {} tokens; perplexity needs at least 2", file.display(), ids.len());
    }
    let vocab = m.model.info().vocab;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!(
            "the tokenizer gave token {bad}, outside the model's vocabulary of {vocab}: wrong tokenizer for this model"
        );
    }
    let t0 = Instant::now();
    let r = perplexity(&mut m.engine, &tok, &ids)?;
    out!("tokens {}  loss {:.6} nats/token  perplexity {:.3}  bits/byte {:.6}", ids.len(), r.0, r.0.exp(), r.1);
    eprintln!("[{:.1} tokens/s]", ids.len() as f64 / t0.elapsed().as_secs_f64());
    Ok(())
}

/// `rwkv logits`: token ids through the model, logits to a .npy file.
fn logits(cli: &Cli, model: &ModelArgs, tokens: &[u32], all: bool, out: &Path, ids: Option<&Path>) -> Result<()> {
    let ctx = gpu(cli)?;
    let mut m = load(&ctx, model, false)?;
    let vocab = m.model.info().vocab;
    // The logits are held in memory and written as one .npy: bounded.
    let rows = if all { tokens.len() } else { 1 };
    if rows.saturating_mul(vocab).saturating_mul(4) > MAX_LOGITS_BYTES {
        bail!(
            "{rows} x {vocab} logits are {} MB, over the {} MB `logits` writes; ask for fewer tokens with --all",
            (rows * vocab * 4) >> 20,
            MAX_LOGITS_BYTES >> 20
        );
    }
    let mut state = m.model.new_state(1)?;
    let mode = if all { LogitsMode::All } else { LogitsMode::Last };
    let logits = m.engine.forward(&mut state, &[tokens], mode)?.remove(0);
    let rows = logits.len() / vocab;
    let bytes = rwkv_wgpu::npy::encode_f32(&[rows, vocab], &logits);
    let mut inputs = input_files(model, None);
    inputs.extend(ids.map(Path::to_path_buf));
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    write_atomic(out, &inputs, Overwrite::Replace, |tmp| {
        std::fs::write(tmp, &bytes).map_err(|source| rwkv_wgpu::Error::Io { path: out.to_path_buf(), error: source })
    })?;
    eprintln!("wrote [{rows}, {vocab}] logits to {}", out.display());
    Ok(())
}

/// `rwkv bench`: speed and memory on a model file or a synthetic model.
fn bench(cli: &Cli) -> Result<()> {
    let Command::Bench { model, shape, dtype, rwkv_version, pp, tg, batch, repeat, deep, json, quant, soak } =
        &cli.command
    else {
        unreachable!("called for the bench command")
    };
    if *pp == 0 || *tg == 0 || batch.contains(&0) {
        bail!("--pp, --tg and --batch must be at least 1");
    }
    let cfg = rwkv_wgpu::bench::BenchConfig {
        prefill: *pp,
        decode: *tg,
        batches: batch.clone(),
        repeat: *repeat,
        deep_context: *deep,
        quant: *quant,
    };
    // Arguments first: a bad shape is an error before any adapter is opened.
    let version: rwkv_wgpu::Version = rwkv_version.parse()?;
    let shape: rwkv_wgpu::synthetic::Shape = shape.parse()?;
    let dt = weight_dtype(dtype)?;
    let ctx = gpu(cli)?;
    if *soak > 0 {
        let path = model.as_ref().ok_or_else(|| anyhow!("--soak runs on a model file: give --model"))?;
        let m = Arc::new(Model::load(&ctx, path, &LoadOptions { quant: *quant, ..Default::default() })?);
        let mut engine = Engine::new(m, &EngineOptions::default())?;
        out!("{:>10}  {:>12}  {:>12}  {:>10}", "tokens", "RSS bytes", "GPU bytes", "tokens/s");
        rwkv_wgpu::bench::soak(&ctx, &mut engine, *soak, 10_000, |s| {
            out!("{:>10}  {:>12}  {:>12}  {:>10.1}", s.tokens, s.rss_bytes, s.gpu_bytes, s.tokens_per_s);
        })?;
        return Ok(());
    }
    let report = match model {
        Some(path) => {
            let name = path.display().to_string();
            rwkv_wgpu::bench::run(&ctx, &name, &cfg, |o| Model::load(&ctx, path, o))?
        }
        None => {
            // An unnamed file in the temporary folder: nothing is left there
            // whatever ends the process (an error, Ctrl-C, a kill).
            let name = format!("synthetic v{version} {shape} {}", dt.name());
            let tmp = std::env::temp_dir();
            let file = rwkv_wgpu::files::unnamed_file(&tmp)
                .with_context(|| format!("making a temporary file in {}", tmp.display()))?;
            rwkv_wgpu::synthetic::write_to(&file, Path::new(&name), version, shape, dt, 1)
                .context("writing the synthetic model")?;
            rwkv_wgpu::bench::run(&ctx, &name, &cfg, |o| {
                Model::from_file(&ctx, SafeTensorsFile::from_file(file, &name)?, o)
            })?
        }
    };
    if *json {
        out!("{}", report.to_json());
    } else {
        out!("{}", report.to_table().trim_end());
    }
    for (k, n, t) in ctx.kernel_profile() {
        eprintln!("profile {k:?}: {n} dispatches, {:.3} s, {:.3} ms each", t, t * 1e3 / n as f64);
    }
    Ok(())
}

/// A synthetic weight dtype named on the command line.
fn weight_dtype(name: &str) -> Result<rwkv_wgpu::Dtype> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" | "fp32" => rwkv_wgpu::Dtype::F32,
        "f16" | "fp16" => rwkv_wgpu::Dtype::F16,
        "bf16" => rwkv_wgpu::Dtype::BF16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    })
}

/// One side of `compare`: a model on disk, or a synthetic shape.
enum Side {
    Path(PathBuf),
    Rwkv(rwkv_wgpu::Version, rwkv_wgpu::synthetic::Shape),
    Transformer(rwkv_wgpu::synthetic::TransformerShape),
}

impl Side {
    fn load(&self, ctx: &GpuContext, dtype: rwkv_wgpu::Dtype, opts: &LoadOptions) -> Result<(String, Model)> {
        // Synthetic weights go to an unnamed file in the temporary folder:
        // nothing is left there whatever ends the process.
        let unnamed = || {
            let tmp = std::env::temp_dir();
            rwkv_wgpu::files::unnamed_file(&tmp)
                .with_context(|| format!("making a temporary file in {}", tmp.display()))
        };
        Ok(match self {
            Side::Path(p) => (p.display().to_string(), Model::load(ctx, p, opts)?),
            Side::Rwkv(version, shape) => {
                let name = format!("synthetic RWKV v{version} {shape} {}", dtype.name());
                let file = unnamed()?;
                rwkv_wgpu::synthetic::write_to(&file, Path::new(&name), *version, *shape, dtype, 1)
                    .context("writing the synthetic RWKV model")?;
                let m = Model::from_file(ctx, SafeTensorsFile::from_file(file, &name)?, opts)?;
                (name, m)
            }
            Side::Transformer(shape) => {
                let name = format!("synthetic {shape} {}", dtype.name());
                let file = unnamed()?;
                rwkv_wgpu::synthetic::write_transformer_to(&file, Path::new(&name), *shape, dtype, 1)
                    .context("writing the synthetic Transformer")?;
                let config = rwkv_wgpu::loader::hf::TransformerConfig::parse(
                    shape.config_json().as_bytes(),
                    Path::new(&format!("{name} config.json")),
                )?;
                let folder = rwkv_wgpu::loader::hf::HfFolder {
                    dir: PathBuf::from(&name),
                    config,
                    weights: rwkv_wgpu::loader::hf::HfWeights::single(SafeTensorsFile::from_file(file, &name)?),
                };
                (name, Model::from_folder(ctx, folder, opts)?)
            }
        })
    }
}

/// `rwkv compare`: RWKV and a Transformer side by side.
fn compare(cli: &Cli) -> Result<()> {
    let Command::Compare {
        rwkv,
        rwkv_version,
        transformer,
        contexts,
        dtype,
        kv_cache,
        quant,
        tg,
        prefill_max,
        batch,
        batch_context,
        repeat,
        json,
        svg,
    } = &cli.command
    else {
        unreachable!("called for the compare command")
    };
    // Arguments first: a bad shape is an error before any adapter is opened.
    if contexts.is_empty() || contexts.contains(&0) || batch.contains(&0) || *tg == 0 || *batch_context == 0 {
        bail!("--contexts, --batch, --batch-context and --tg must be at least 1");
    }
    let dt = weight_dtype(dtype)?;
    let rwkv_side = if Path::new(rwkv).exists() {
        Side::Path(rwkv.into())
    } else {
        let shape = rwkv.parse().with_context(|| format!("--rwkv {rwkv}: no such file, and not a shape"))?;
        Side::Rwkv(rwkv_version.parse()?, shape)
    };
    let transformer_side = if Path::new(transformer).exists() {
        Side::Path(transformer.into())
    } else {
        let shape = transformer
            .parse()
            .with_context(|| format!("--transformer {transformer}: no such folder, and not a shape"))?;
        Side::Transformer(shape)
    };
    let cfg = rwkv_wgpu::compare::CompareConfig {
        contexts: contexts.clone(),
        decode: *tg,
        prefill_max: *prefill_max,
        batches: batch.clone(),
        batch_context: *batch_context,
        repeat: *repeat,
    };
    let ctx = gpu(cli)?;
    let opts = LoadOptions { kv_cache: *kv_cache, quant: *quant, ..Default::default() };
    let mut sides = Vec::new();
    for (spec, which, flag) in [
        (&rwkv_side, rwkv_wgpu::compare::Side::Rwkv, "--rwkv"),
        (&transformer_side, rwkv_wgpu::compare::Side::Transformer, "--transformer"),
    ] {
        let (name, model) = spec.load(&ctx, dt, &opts).with_context(|| format!("loading {flag}"))?;
        let is_transformer = which == rwkv_wgpu::compare::Side::Transformer;
        if model.is_transformer() != is_transformer {
            bail!(
                "{flag} {name}: is {}, not {}",
                model.info().arch,
                if is_transformer { "a Transformer" } else { "an RWKV model" }
            );
        }
        eprintln!("measuring {name}");
        sides.push(rwkv_wgpu::compare::measure(&ctx, which, &name, model, &cfg)?);
        // With RWKV_PROFILE: where this side's time went (kernels it ran alone).
        for (k, n, t) in ctx.kernel_profile() {
            eprintln!("profile {k:?}: {n} dispatches, {:.3} s, {:.3} ms each", t, t * 1e3 / n as f64);
        }
        ctx.clear_kernel_profile();
    }
    let (t_info, mut t_rows) = sides.pop().expect("two sides");
    let (r_info, mut rows) = sides.pop().expect("two sides");
    rows.append(&mut t_rows);
    let cmp =
        rwkv_wgpu::compare::Comparison { adapter: ctx.adapter().to_string(), rwkv: r_info, transformer: t_info, rows };
    if let Some(path) = svg {
        let chart = cmp.to_svg()?;
        // Never over a model file the run read.
        let inputs: Vec<&Path> = [rwkv.as_str(), transformer.as_str()].into_iter().map(Path::new).collect();
        rwkv_wgpu::files::write_atomic(path, &inputs, rwkv_wgpu::files::Overwrite::Replace, |tmp| {
            std::fs::write(tmp, chart.as_bytes()).map_err(|e| rwkv_wgpu::Error::Io { path: path.clone(), error: e })
        })?;
        eprintln!("wrote the chart to {}", path.display());
    }
    if *json {
        out!("{}", cmp.to_json());
    } else {
        out!("{}", cmp.to_table().trim_end());
    }
    Ok(())
}

/// `rwkv inspect`: version, dimensions, memory and the kernel plan.
fn inspect(cli: &Cli, model: &ModelArgs, tensors: bool) -> Result<()> {
    let ctx = gpu(cli)?;
    let m = load(&ctx, model, false)?;
    let i = m.model.info();
    let name = model.model.as_ref().map(|p| p.display().to_string()).unwrap_or(DEMO_NAME.into());
    out!("file            {name}");
    out!("model           {}", i.arch);
    out!("layers          {}", i.n_layer);
    out!("width           {}", i.n_embd);
    match (i.n_head, m.model.is_transformer()) {
        (0, _) => out!("heads           none (RWKV-4 mixes per channel)"),
        (h, true) => out!("heads           {h} x {}, {} KV heads", i.head_size, i.n_kv_head),
        (h, false) => out!("heads           {h} x {}", i.head_size),
    }
    out!("vocab           {}", i.vocab);
    out!("ffn             {}", i.ffn);
    if !m.model.is_transformer() {
        let lora: Vec<String> = i.lora.iter().map(|(n, d)| format!("{n} {d}")).collect();
        out!("lora            {}", if lora.is_empty() { "none".into() } else { lora.join(", ") });
    }
    out!("parameters      {}", i.parameters);
    out!("dtype           {}", i.dtype.name());
    out!("weight bytes    {}", i.weight_bytes);
    out!("on the GPU      {} (the embedding is read from the file)", i.gpu_weight_bytes);
    let by: Vec<String> = i.matrix_bytes.iter().map(|(e, b)| format!("{e} {b}")).collect();
    // A single-file RWKV checkpoint: whether it is pre-quantized, and its tensors.
    let file = model.model.as_deref().filter(|p| p.is_file()).map(SafeTensorsFile::open).transpose()?;
    let stored = file.as_ref().map(|f| rwkv_wgpu::quant::file_format(f.metadata())).transpose()?.flatten();
    let how = match (stored, i.quant) {
        (Some(f), _) => format!(" (a pre-quantized {f} file)"),
        (None, Some(f)) => format!(" (quantized to {f} at load)"),
        (None, None) => String::new(),
    };
    out!("matrices        {}{how}", by.join(", "));
    if tensors {
        let Some(f) = &file else { bail!("--tensors lists the tensors of a model file: give --model FILE") };
        let mut names: Vec<&str> = f.names().collect();
        names.sort_unstable();
        for name in names {
            let shape = f.shape(name).unwrap_or_default();
            let dtype = f.dtype_name(name).unwrap_or_default();
            let what = match (stored, f.contains(&format!("{name}.scales"))) {
                (Some(fmt), true) => format!("{fmt} codes ({dtype})"),
                (Some(_), false) if name.ends_with(".scales") => format!("{dtype} block scales"),
                _ => dtype,
            };
            out!("tensor          {name} {shape:?} {what}");
        }
    }
    if m.model.is_transformer() {
        out!("kv cache        {} bytes per token of context ({})", i.kv_bytes_per_token, model.kv_cache);
    } else {
        out!("state bytes     {} per sequence", i.state_bytes_per_sequence);
    }
    let eos: Vec<String> = i.eos.iter().map(|t| t.to_string()).collect();
    out!("end tokens      {}", if eos.is_empty() { "none".into() } else { eos.join(", ") });
    out!("gpu bytes       {}", ctx.allocated_bytes());
    out!("adapter         {}", ctx.adapter());
    out!("kernels         {}", ctx.plan());
    Ok(())
}

/// Most bytes of logits `rwkv logits` holds and writes (1 GiB).
const MAX_LOGITS_BYTES: usize = 1 << 30;

/// The files a command reads, which no output may replace: the model, the
/// tokenizer given or found next to it, and the `--state` file.
fn input_files(model: &ModelArgs, state: Option<&Path>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = model.model.iter().cloned().collect();
    if let Some(t) = model.tokenizer.as_deref().filter(|t| *t != "world") {
        v.push(PathBuf::from(t));
    }
    if let Some(dir) = model.model.as_deref().and_then(Path::parent) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        v.push(dir.join("tokenizer.json"));
        if let Ok(entries) = std::fs::read_dir(dir) {
            v.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("rwkv_vocab") && n.ends_with(".txt"))
            }));
        }
    }
    v.extend(state.map(Path::to_path_buf));
    v
}

/// Prompts of at least this many tokens show a progress bar (on a terminal).
const PROGRESS_TOKENS: usize = 4096;

/// Reads `text` into the session; a long prompt is read in pieces under a
/// progress bar when stderr is a terminal (the pieces give the same state
/// and logits as one call: every step computes each token the same way).
fn feed_text(session: &mut Session, engine: &mut Engine, text: &[u8]) -> Result<usize> {
    let tokens = session.tokenizer().encode(text)?;
    if tokens.len() < PROGRESS_TOKENS || !std::io::stderr().is_terminal() {
        session.feed(engine, &tokens)?;
        return Ok(tokens.len());
    }
    let bar = indicatif::ProgressBar::new(tokens.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("prompt {bar:40} {pos}/{len} tokens, {per_sec}, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for piece in tokens.chunks(engine.chunk_tokens() * 4) {
        session.feed(engine, piece)?;
        bar.inc(piece.len() as u64);
    }
    bar.finish_and_clear();
    Ok(tokens.len())
}

fn stop_name(s: &StopReason) -> String {
    match s {
        StopReason::MaxTokens => "max tokens".into(),
        StopReason::Eos => "end of text".into(),
        StopReason::StopSequence(t) => format!("{t:?}"),
        StopReason::Cancelled => "cancelled".into(),
    }
}

/// Mean negative log-likelihood (nats/token) of ids[1..] given their prefix,
/// and bits per byte of those tokens. Logits are taken chunk by chunk.
fn perplexity(m: &mut Engine, tok: &Tokenizer, ids: &[u32]) -> Result<(f64, f64)> {
    let vocab = m.info().vocab;
    let mut state = m.new_state(1)?;
    let step = m.chunk_tokens().max(1);
    let (mut nll, mut bytes) = (0f64, 0usize);
    let inputs = &ids[..ids.len() - 1];
    for (c, chunk) in inputs.chunks(step).enumerate() {
        let logits = m.forward(&mut state, &[chunk], LogitsMode::All)?.remove(0);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let target = ids[c * step + i + 1] as usize;
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - row[target] as f64;
            bytes += tok.token_bytes(target as u32).map_or(0, |b| b.len());
        }
    }
    let n = (ids.len() - 1) as f64;
    Ok((nll / n, nll / std::f64::consts::LN_2 / bytes.max(1) as f64))
}

/// Token ids from a file or stdin (`-`): a JSON array, or ids separated by
/// commas or white space.
fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = if path == Path::new("-") { read_stdin()? } else { rwkv_wgpu::files::read_regular(path)? };
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{}: not text", path.display()))?;
    let t = text.trim();
    if t.starts_with('[') {
        return parse_id_array(t);
    }
    t.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().map_err(|_| anyhow!("{}: `{s}` is not a token id", path.display())))
        .collect()
}

fn parse_id_array(text: &str) -> Result<Vec<u32>> {
    let t = text.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| anyhow!("stdin is not a JSON array of ids, e.g. [1, 2, 3]"))?;
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    inner.split(',').map(|s| s.trim().parse::<u32>().map_err(|_| anyhow!("`{}` is not a token id", s.trim()))).collect()
}

fn chat(cli: &Cli, model: &ModelArgs, state: &StateArgs, sampling: &SamplingArgs) -> Result<()> {
    let (mut m, mut session, mut sampler) = start_session(cli, model, state, sampling, true)?;
    let engine = &mut m.engine;
    let opts = generate_options(sampling, &[RWKV_TURN_END]);
    // No /save may replace what the chat reads.
    let inputs = input_files(model, state.state.as_deref());
    let protected: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let interactive = std::io::stdin().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut turn = 0;
    let mut raw = Vec::new();
    let mut stdin = std::io::stdin().lock();
    loop {
        if interactive {
            eprint!("> ");
        }
        raw.clear();
        if std::io::BufRead::read_until(&mut stdin, b'\n', &mut raw).context("reading stdin")? == 0 {
            break;
        }
        // A line that is not UTF-8 is reported and skipped; the chat goes on.
        let Ok(line) = std::str::from_utf8(&raw) else {
            eprintln!("error: that line is not valid UTF-8; nothing was read");
            continue;
        };
        let msg = line.trim();
        if msg.is_empty() {
            continue;
        }
        if let Some(cmd) = msg.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').map_or((cmd, ""), |(a, b)| (a, b.trim()));
            match (name, arg) {
                ("quit" | "exit", _) => break,
                ("reset", _) => {
                    session.reset()?;
                    sampler.reset();
                    eprintln!("[state reset]");
                }
                // A failed save or load is reported; the session and its state go on.
                ("save", "") => eprintln!("error: /save needs a file: /save FILE"),
                ("load", "") => eprintln!("error: /load needs a file: /load FILE"),
                ("save", f) => match session.save_state_beside(Path::new(f), &protected) {
                    Ok(()) => eprintln!("[state saved to {f}]"),
                    Err(e) => eprintln!("error: saving the state to {f}: {e:#}"),
                },
                ("load", f) => match session.load_state(Path::new(f)) {
                    Ok(()) => eprintln!("[state loaded from {f}]"),
                    Err(e) => eprintln!("error: state {f}: {e:#}"),
                },
                _ => eprintln!("error: unknown command `/{cmd}` (try /reset, /save FILE, /load FILE, /quit)"),
            }
            continue;
        }
        turn += 1;
        // A turn that fails (a GPU memory limit, logits gone non-finite from a
        // loaded state) is reported and undone: the state goes back to where
        // the turn began and the chat goes on.
        let before = session.state().read(0)?;
        let mut closed = false;
        let result = chat_turn(&mut session, engine, &mut sampler, &opts, &mut out, msg, turn, &mut closed);
        if closed {
            break;
        }
        if let Err(e) = result {
            let _ = writeln!(out);
            eprintln!("error: turn {turn}: {e:#} (the state is as before the turn)");
            session.state_mut().write(0, &before)?;
        }
    }
    Ok(())
}

/// One chat turn: the user's message read, the reply generated and printed.
#[allow(clippy::too_many_arguments)]
fn chat_turn(
    session: &mut Session,
    engine: &mut Engine,
    sampler: &mut Sampler,
    opts: &GenerateOptions,
    out: &mut std::io::StdoutLock,
    msg: &str,
    turn: usize,
    closed: &mut bool,
) -> Result<()> {
    // The state holds everything said so far: only this turn is read.
    let prompt = ChatFormat::Rwkv.render(&[Message { role: Role::User, content: msg.to_string() }])?.concat();
    let n_prompt = feed_text(session, engine, prompt.as_bytes())?;
    write!(out, "Assistant:")?;
    out.flush()?;
    let t0 = Instant::now();
    let g = session.generate(engine, sampler, opts, |text| {
        *closed = out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err();
        if *closed {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    if *closed {
        return Ok(());
    }
    writeln!(out)?;
    out.flush()?;
    if g.stop != StopReason::StopSequence(RWKV_TURN_END.into()) {
        // Keep the format for the next turn when the reply ended otherwise.
        session.feed_text(engine, RWKV_TURN_END.as_bytes())?;
    }
    eprintln!(
        "[turn {turn}: read {n_prompt} prompt tokens, generated {} tokens, {:.2} tokens/s]",
        g.tokens.len(),
        g.tokens.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn serve(cli: &Cli) -> Result<()> {
    let Command::Serve {
        model,
        state,
        host,
        port,
        api_key,
        max_sessions,
        queue,
        max_body_bytes,
        max_tokens_cap,
        prefix_cache_bytes,
        shutdown_grace,
        read_timeout,
        write_timeout,
        max_connections,
    } = &cli.command
    else {
        unreachable!("serve is called for `rwkv serve`")
    };
    if *max_sessions == 0 {
        bail!("--max-sessions must be at least 1");
    }
    if !(shutdown_grace.is_finite() && *shutdown_grace >= 0.0 && *shutdown_grace <= 86400.0) {
        bail!("--shutdown-grace must be a number of seconds from 0 to a day");
    }
    for (flag, secs) in [("--read-timeout", read_timeout), ("--write-timeout", write_timeout)] {
        if !(secs.is_finite() && *secs > 0.0 && *secs <= 86400.0) {
            bail!("{flag} must be a number of seconds above 0 and at most a day");
        }
    }
    if *max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    // Bind first: a port in use is reported before the model loads.
    let listener = std::net::TcpListener::bind((host.as_str(), *port))
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let ctx = gpu(cli)?;
    let m = load(&ctx, model, true)?;
    let initial = initial_state(&m.model, state)?;
    let tokenizer = m.tokenizer();
    let is_transformer = matches!(m.model.info().arch, rwkv_wgpu::Arch::Transformer(_));
    let chat = match &model.model {
        Some(p) => ChatFormat::for_model(is_transformer, p)?,
        None => ChatFormat::Rwkv,
    };
    let name = match &model.model {
        Some(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
        None => "austen-rwkv7".to_string(),
    };
    let config = rwkv_wgpu::server::ServerConfig {
        api_key: api_key.clone(),
        max_sessions: *max_sessions,
        queue: *queue,
        max_body_bytes: *max_body_bytes,
        limits: rwkv_wgpu::openai::Limits { max_tokens_cap: *max_tokens_cap, ..Default::default() },
        prefix_cache_bytes: *prefix_cache_bytes,
        shutdown_grace: std::time::Duration::from_secs_f64(*shutdown_grace),
        read_timeout: std::time::Duration::from_secs_f64(*read_timeout),
        write_timeout: std::time::Duration::from_secs_f64(*write_timeout),
        max_connections: *max_connections,
    };
    let addr = listener.local_addr().context("the listening address")?;
    eprintln!("model: {name}; listening on http://{addr} (OpenAI API under /v1; Ctrl-C stops)");
    let served = rwkv_wgpu::server::Served { engine: m.engine, tokenizer, chat, initial, name };
    rwkv_wgpu::server::run(served, config, listener, rwkv_wgpu::server::shutdown_signal())?;
    eprintln!("stopped");
    Ok(())
}

/// `--state FILE`: an official state-tuning file (`blocks.0.att.time_state`)
/// or a state saved with /save.
fn initial_state(m: &Model, args: &StateArgs) -> Result<Option<StateData>> {
    args.state
        .as_deref()
        .map(|path| {
            rwkv_wgpu::state::load_any(path, m.state_layout())
                .with_context(|| format!("reading the state {}", path.display()))
        })
        .transpose()
}
