//! Load on a running `rwkv serve`, from another process on loopback: the
//! figures of docs/performance.md's *Serving* section.
//!
//! ```sh
//! rwkv serve --port 8080 &
//! cargo run --release --example serve_load -- http://127.0.0.1:8080 clients 1,8,32
//! cargo run --release --example serve_load -- http://127.0.0.1:8080 prefix
//! ```
//!
//! `clients`: for each count C, C clients each send `REQUESTS` streamed
//! completions one after another (128 tokens, end-of-text banned so each
//! runs to its length); prints aggregate tokens/s, time to first token
//! (p50, p99) and per-client tokens/s. `prefix`: a ~2,000-token system
//! prompt; time to first token of cold requests (a new system prompt each)
//! and of requests that share a cached one (a new question each).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const REQUESTS: usize = 4;
const TOKENS: usize = 128;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(600))).build().into()
}

/// One streamed request: (time to the first text, completion tokens, total time).
fn streamed(base: &str, path: &str, body: &Value) -> (f64, u64, f64) {
    let t0 = Instant::now();
    let r = agent().post(&format!("{base}{path}")).send(body.to_string()).expect("request");
    let mut first = None;
    let mut tokens = 0;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.expect("read");
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).expect("json");
        let c = &v["choices"][0];
        let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
        if first.is_none() && !text.is_empty() {
            first = Some(t0.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    (first.unwrap_or(f64::NAN), tokens, t0.elapsed().as_secs_f64())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn clients(base: &str, counts: &[usize]) {
    // Warm the kernels.
    streamed(base, "/v1/completions", &json!({"prompt": "Emma", "max_tokens": 8, "stream": true}));
    let mut one = None;
    for &c in counts {
        let t0 = Instant::now();
        let threads: Vec<_> = (0..c)
            .map(|i| {
                let base = base.to_string();
                std::thread::spawn(move || {
                    (0..REQUESTS)
                        .map(|r| {
                            let body = json!({"prompt": format!("Chapter {i}.{r} It is a truth universally acknowledged"),
                                "max_tokens": TOKENS, "temperature": 1.0, "seed": i * 100 + r,
                                "logit_bias": {"0": -100}, "stream": true});
                            streamed(&base, "/v1/completions", &body)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let runs: Vec<(f64, u64, f64)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let wall = t0.elapsed().as_secs_f64();
        let tokens: u64 = runs.iter().map(|r| r.1).sum();
        let mut ttft: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let per_client: f64 = runs.iter().map(|r| r.1 as f64 / r.2).sum::<f64>() / runs.len() as f64;
        let aggregate = tokens as f64 / wall;
        let ratio = *one.get_or_insert(aggregate);
        println!(
            "{{\"clients\": {c}, \"requests\": {}, \"tokens\": {tokens}, \"aggregate_tokens_per_s\": {aggregate:.1}, \
             \"vs_one_client\": {:.2}, \"per_request_tokens_per_s\": {per_client:.1}, \"ttft_p50_ms\": {:.1}, \"ttft_p99_ms\": {:.1}}}",
            runs.len(),
            aggregate / ratio,
            percentile(&mut ttft, 0.5) * 1e3,
            percentile(&mut ttft, 0.99) * 1e3,
        );
    }
}

fn prefix(base: &str) {
    let paragraph = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
                     must be in want of a wife. However little known the feelings or views of such a man may be \
                     on his first entering a neighbourhood, this truth is so well fixed in the minds of the \
                     surrounding families, that he is considered the rightful property of some one or other of \
                     their daughters. ";
    // A nonce per run: a system prompt is cold the first time this server sees it.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let system = move |k: usize| format!("Run {run}, rule {k}. You are Elizabeth Bennet. {}", paragraph.repeat(24));
    let ask = |k: usize, q: usize| {
        json!({"messages": [{"role": "system", "content": system(k)},
                            {"role": "user", "content": format!("Question {q}: who is Mr. Darcy?")}],
               "max_tokens": 4, "temperature": 0, "stream": true})
    };
    streamed(base, "/v1/completions", &json!({"prompt": "Emma", "max_tokens": 8, "stream": true}));
    let mut whole = ask(1000, 0);
    whole["stream"] = json!(false);
    let mut r = agent().post(&format!("{base}/v1/chat/completions")).send(whole.to_string()).expect("request");
    let answer: Value = serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
    let usage = &answer["usage"];
    let mut cold: Vec<f64> = (0..5).map(|k| streamed(base, "/v1/chat/completions", &ask(k, 0)).0).collect();
    let mut hot: Vec<f64> = (1..6).map(|q| streamed(base, "/v1/chat/completions", &ask(0, q)).0).collect();
    let (c, h) = (percentile(&mut cold, 0.5), percentile(&mut hot, 0.5));
    println!(
        "{{\"prompt_tokens\": {}, \"ttft_cold_ms\": {:.1}, \"ttft_cached_ms\": {:.1}, \"speedup\": {:.1}}}",
        usage["prompt_tokens"],
        c * 1e3,
        h * 1e3,
        c / h
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args.get(1).map(String::as_str).unwrap_or("http://127.0.0.1:8080").trim_end_matches('/').to_string();
    match args.get(2).map(String::as_str).unwrap_or("clients") {
        "clients" => {
            let counts: Vec<usize> = args
                .get(3)
                .map(String::as_str)
                .unwrap_or("1,8,32")
                .split(',')
                .map(|s| s.parse().expect("client counts, e.g. 1,8,32"))
                .collect();
            clients(&base, &counts)
        }
        "prefix" => prefix(&base),
        other => panic!("unknown mode {other}: clients or prefix"),
    }
}
