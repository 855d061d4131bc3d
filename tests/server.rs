//! `rwkv serve` over real HTTP on loopback: the binary started on an
//! ephemeral port of 127.0.0.1, driven by a real HTTP client (ureq). Every
//! wait is bounded; every request count is small.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The longest any request in these tests may take (lavapipe on 2 cores,
/// with other tests running beside).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A server process, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rwkv"))
            .args(["serve", "--port", "0"])
            .args(args)
            .env("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rwkv serve");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut line = String::new();
        let base = loop {
            line.clear();
            assert!(Instant::now() < deadline, "the server did not start in time");
            if stderr.read_line(&mut line).unwrap() == 0 {
                panic!("the server exited before listening: {:?}", child.wait());
            }
            if let Some(at) = line.find("http://") {
                let addr: String = line[at..].chars().take_while(|c| !c.is_whitespace()).collect();
                break addr;
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, text) = get(&self.url("/metrics"));
        assert_eq!(status, 200);
        let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("{name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(REQUEST_TIMEOUT)).build().into()
}

fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn post_raw(url: &str, body: impl AsRef<[u8]>, key: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = agent().post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut r = req.send(body.as_ref()).unwrap();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry, r.body_mut().read_to_string().unwrap())
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = post_raw(url, body.to_string(), None);
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// A streamed request: the `data:` payloads, in order, up to and without `[DONE]`
/// (which must come last).
fn stream(url: &str, body: &Value) -> Vec<Value> {
    let r = agent().post(url).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers().get("content-type").unwrap().to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let reader = BufReader::new(r.into_body().into_reader());
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return events;
        }
        events.push(serde_json::from_str(data).unwrap());
    }
    panic!("the stream ended without [DONE]");
}

/// The text of a streamed answer (completion `text` or chat `delta.content`).
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            let c = &e["choices"][0];
            c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).map(String::from)
        })
        .collect()
}

fn error_of(v: &Value) -> (&str, &str) {
    (v["error"]["type"].as_str().unwrap(), v["error"]["message"].as_str().unwrap())
}

const PROMPT: &str = "It is a truth universally acknowledged";

/// `logit_bias` that bans the end-of-text token (id 0), so that a long
/// request runs to its `max_tokens`.
fn no_eos() -> Value {
    json!({"0": -100})
}

/// Tokens whose log probabilities `logprobs_are_the_models_own` checks.
const LOGPROB_TOKENS: usize = 6;

/// What the Rust API gives for PROMPT.
struct RustLogprobs {
    tokenizer: std::sync::Arc<rwkv_wgpu::Tokenizer>,
    /// The greedy continuation (end of text banned, as `no_eos` asks): each
    /// token's `logprob` with 3 alternatives.
    generated: Vec<rwkv_wgpu::TokenLogprob>,
    /// Prompt token j >= 1 given those before it, with 2 alternatives.
    prompt: Vec<rwkv_wgpu::TokenLogprob>,
}

fn rust_logprobs() -> Option<RustLogprobs> {
    use rwkv_wgpu::{LogitsMode, Sampler, SamplerConfig, Session};
    let (model, tokenizer, mut engine) = common::austen()?;
    let tokens = tokenizer.encode(PROMPT.as_bytes()).unwrap();
    let mut state = model.new_state(1).unwrap();
    let rows = engine.forward(&mut state, &[&tokens], LogitsMode::All).unwrap().remove(0);
    let vocab = model.info().vocab;
    let prompt = (1..tokens.len())
        .map(|j| rwkv_wgpu::logprob(&rows[(j - 1) * vocab..j * vocab], tokens[j], 2).unwrap())
        .collect();
    let mut s = Session::new(model, tokenizer.clone()).unwrap();
    s.feed_text(&mut engine, PROMPT.as_bytes()).unwrap();
    let mut sampler =
        Sampler::new(SamplerConfig { logit_bias: vec![(0, f32::NEG_INFINITY)], ..SamplerConfig::greedy() }).unwrap();
    let mut out = Vec::new();
    for _ in 0..LOGPROB_TOKENS {
        let logits = s.logits().unwrap();
        let token = sampler.sample(logits).unwrap();
        out.push(rwkv_wgpu::logprob(logits, token, 3).unwrap());
        s.feed(&mut engine, &[token]).unwrap();
    }
    Some(RustLogprobs { tokenizer, generated: out, prompt })
}

/// A JSON number as the f32 the server wrote.
fn f32_of(v: &Value) -> f32 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32
}

#[test]
fn logprobs_are_the_models_own() {
    let Some(RustLogprobs { tokenizer, generated: want, prompt }) = rust_logprobs() else { return };
    let text_of = |t: u32| String::from_utf8_lossy(tokenizer.token_bytes(t).unwrap()).into_owned();
    let s = Server::start(&[]);
    let n = LOGPROB_TOKENS;
    // Completions, whole: parallel arrays, alternatives by text, offsets.
    let (status, v) = post(
        &s.url("/v1/completions"),
        &json!({"prompt": PROMPT, "max_tokens": n, "temperature": 0, "logprobs": 3, "logit_bias": no_eos()}),
    );
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let text = v["choices"][0]["text"].as_str().unwrap();
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len(), n);
    assert_eq!(tokens.concat(), text);
    let mut offset = 0;
    for (i, w) in want.iter().enumerate() {
        assert_eq!(tokens[i], text_of(w.token));
        assert_eq!(f32_of(&lp["token_logprobs"][i]), w.logprob, "token {i}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3);
        for &(t, l) in &w.top {
            assert_eq!(f32_of(&top[&text_of(t)]), l, "token {i}, alternative {t}");
        }
        assert_eq!(lp["text_offset"][i], offset);
        offset += tokens[i].chars().count();
    }
    // Chat, streamed: each chunk carries the entries of the tokens it adds.
    let events = stream(
        &s.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": n, "temperature": 0,
                "logprobs": true, "top_logprobs": 2, "logit_bias": no_eos(), "stream": true}),
    );
    let mut entries = Vec::new();
    for e in &events {
        if let Some(content) = e["choices"][0]["logprobs"]["content"].as_array() {
            entries.extend(content.iter().cloned());
        }
    }
    assert_eq!(entries.len(), n, "{events:?}");
    for e in &entries {
        let bytes: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), e["token"].as_str().unwrap());
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(f32_of(&top[0]["logprob"]) >= f32_of(&top[1]["logprob"]));
        assert!(f32_of(&e["logprob"]) <= 0.0);
    }
    // Echo: the prompt's tokens first, the first without a log probability.
    let (status, v) = post(
        &s.url("/v1/completions"),
        &json!({"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": true, "logit_bias": no_eos()}),
    );
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(PROMPT), "{text}");
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), prompt.len() + 1 + 2);
    assert_eq!(tokens.iter().map(|t| t.as_str().unwrap()).collect::<String>(), text);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    for (j, w) in prompt.iter().enumerate() {
        assert_eq!(tokens[j + 1], text_of(w.token).as_str());
        assert_eq!(f32_of(&lp["token_logprobs"][j + 1]), w.logprob, "prompt token {}", j + 1);
        let top = lp["top_logprobs"][j + 1].as_object().unwrap();
        for &(t, l) in &w.top {
            assert_eq!(f32_of(&top[&text_of(t)]), l, "prompt token {}, alternative {t}", j + 1);
        }
    }
    // The generated tokens after the prompt are those of the run above.
    assert_eq!(f32_of(&lp["token_logprobs"][prompt.len() + 1]), want[0].logprob);
    // Scoring only (max_tokens 0), streamed: the prompt comes back, scored.
    let events = stream(
        &s.url("/v1/completions"),
        &json!({"prompt": PROMPT, "max_tokens": 0, "logprobs": 0, "echo": true, "stream": true}),
    );
    assert_eq!(streamed_text(&events), PROMPT);
    let scored: Vec<&Value> =
        events.iter().filter_map(|e| e["choices"][0]["logprobs"]["token_logprobs"].as_array()).flatten().collect();
    assert_eq!(scored.len(), prompt.len() + 1);
    assert!(scored[0].is_null());
    assert_eq!(f32_of(scored[prompt.len()]), prompt[prompt.len() - 1].logprob);
    // Echo without logprobs: the prompt, then the completion.
    let (_, v) = post(
        &s.url("/v1/completions"),
        &json!({"prompt": PROMPT, "max_tokens": 3, "echo": true, "logit_bias": no_eos()}),
    );
    assert!(v["choices"][0]["text"].as_str().unwrap().starts_with(PROMPT), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    // Not asked: null, as OpenAI answers.
    let (_, v) = post(&s.url("/v1/completions"), &json!({"prompt": PROMPT, "max_tokens": 2}));
    assert!(v["choices"][0]["logprobs"].is_null());
}

#[test]
fn endpoints_answer_as_openai_does() {
    let s = Server::start(&[]);
    let (status, health) = get(&s.url("/health"));
    assert_eq!((status, health.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, models) = get(&s.url("/v1/models"));
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!((status, models["data"][0]["id"].as_str()), (200, Some("austen-rwkv7")));

    // A completion, whole and streamed: the same text at temperature 0.
    let req = json!({"model": "any", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "unknown_field": 1});
    let (status, c) = post(&s.url("/v1/completions"), &req);
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    let text = c["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let u = &c["usage"];
    assert_eq!((u["completion_tokens"].as_u64(), u["prompt_tokens"].as_u64()), (Some(12), Some(9)));
    assert_eq!(u["total_tokens"].as_u64(), Some(21));
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let events = stream(&s.url("/v1/completions"), &sreq);
    assert_eq!(streamed_text(&events), text);
    let last = events.last().unwrap();
    assert_eq!(
        (last["choices"][0]["finish_reason"].as_str(), last["usage"]["completion_tokens"].as_u64()),
        (Some("length"), Some(12))
    );

    // Chat, whole and streamed; a stop text ends the answer without itself.
    let chat = json!({"messages": [{"role": "system", "content": "You are Elizabeth Bennet."},
        {"role": "user", "content": "Who is Mr. Darcy?"}], "max_tokens": 16, "temperature": 0});
    let (status, c) = post(&s.url("/v1/chat/completions"), &chat);
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    let reply = c["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!reply.is_empty() && !reply.starts_with(' '), "{reply:?}");
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let events = stream(&s.url("/v1/chat/completions"), &schat);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(streamed_text(&events), reply);
    assert!(events.last().unwrap()["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let word = reply.split(' ').nth(1).unwrap().to_string();
    let mut stopped = chat.clone();
    stopped["stop"] = json!([word]);
    let (_, c) = post(&s.url("/v1/chat/completions"), &stopped);
    let cut = c["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert!(reply.starts_with(cut) && !cut.contains(&word), "{cut:?} / {reply:?} / {word:?}");

    // Seeded sampling is repeatable.
    let seeded = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7});
    let a = post(&s.url("/v1/completions"), &seeded).1;
    let b = post(&s.url("/v1/completions"), &seeded).1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    let (status, v) = post(&s.url("/v1/nothing"), &json!({}));
    assert_eq!((status, error_of(&v).0), (404, "invalid_request_error"));
    assert!(s.metric("rwkv_requests_total") >= 7.0);
    assert!(s.metric("rwkv_generated_tokens_total") >= 60.0);
}

#[test]
fn concurrent_streams_equal_their_solo_runs() {
    let s = Server::start(&[]);
    let n = 32;
    let body = |i: usize| json!({"prompt": format!("Chapter {i}. {PROMPT}"), "max_tokens": 16, "temperature": 0, "seed": i, "stream": true});
    // Solo: one at a time.
    let solo: Vec<String> = (0..n).map(|i| streamed_text(&stream(&s.url("/v1/completions"), &body(i)))).collect();
    let steps_before = s.metric("rwkv_steps_total");
    // Together: 32 clients at once.
    let url = s.url("/v1/completions");
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (url, b) = (url.clone(), body(i));
            std::thread::spawn(move || streamed_text(&stream(&url, &b)))
        })
        .collect();
    let together: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for i in 0..n {
        assert_eq!(together[i], solo[i], "request {i}");
    }
    // They shared steps: 32 requests × (prompt + 16 tokens) alone would take
    // over 32 × 17 steps.
    let steps = s.metric("rwkv_steps_total") - steps_before;
    assert!(steps < (n * 17 / 2) as f64, "{steps} steps for {n} concurrent requests");
}

#[test]
fn a_prefix_cache_hit_answers_as_a_cold_start() {
    let cached = Server::start(&[]);
    let cold = Server::start(&["--prefix-cache-bytes", "0"]);
    let system = "You are Elizabeth Bennet, and you answer every question with wit. ".repeat(8);
    let ask = |q: &str| {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
               "max_tokens": 24, "temperature": 1.0, "seed": 3})
    };
    let questions = ["Who is Mr. Darcy?", "Where is Pemberley?", "Who is Mr. Darcy?"];
    for (i, q) in questions.iter().enumerate() {
        let (_, hot) = post(&cached.url("/v1/chat/completions"), &ask(q));
        let (_, reference) = post(&cold.url("/v1/chat/completions"), &ask(q));
        assert_eq!(hot["choices"][0], reference["choices"][0], "question {i}");
        assert_eq!(reference["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let reused = hot["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        let prompt = hot["usage"]["prompt_tokens"].as_u64().unwrap();
        match i {
            0 => assert_eq!(reused, 0),
            // The system prompt's state; the same question again: all but the last token.
            1 => assert!(reused > 100 && reused < prompt - 5, "{reused} of {prompt}"),
            _ => assert_eq!(reused, prompt - 1),
        }
    }
    assert_eq!(cached.metric("rwkv_prefix_cache_hits_total"), 2.0);
    assert_eq!(cold.metric("rwkv_prefix_cache_entries"), 0.0);
}

#[test]
fn bad_requests_get_errors_and_the_server_goes_on() {
    let s = Server::start(&["--max-tokens-cap", "1000", "--api-key", "sesame"]);
    let url = s.url("/v1/completions");
    let key = Some("sesame");
    // Without the key: 401, but /health needs none.
    let (status, _, body) = post_raw(&url, json!({"prompt": "a"}).to_string(), None);
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = post_raw(&url, json!({"prompt": "a"}).to_string(), Some("wrong"));
    assert_eq!(status, 401);
    assert_eq!(get(&s.url("/health")).0, 200);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"prompt\": ".to_vec(), "not valid JSON"),
        (b"\xff\xfe".to_vec(), "not valid JSON"),
        (br#"{"prompt": 42}"#.to_vec(), "`prompt`"),
        (br#"{"prompt": "a", "temperature": "warm"}"#.to_vec(), "`temperature`"),
        (br#"{"prompt": "a", "max_tokens": 1000000000}"#.to_vec(), "cap of 1000"),
        (br#"{"prompt": [1, 99999999]}"#.to_vec(), "out of range"),
        (br#"{"prompt": "a", "logit_bias": {"70000": 1}}"#.to_vec(), "out of range"),
        (format!("{{\"prompt\": \"{}\"}}", "x".repeat(10 << 20)).into_bytes(), "over 1048576 bytes"),
        (format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(), "not valid JSON"),
        (json!({"prompt": vec![1; 40_000], "echo": true, "logprobs": 1}).to_string().into_bytes(), "at most 32768"),
        (br#"{"prompt": "a", "logprobs": 21}"#.to_vec(), "`logprobs`"),
    ];
    for (body, expected) in &cases {
        let (status, _, text) = post_raw(&url, body, key);
        let v: Value = serde_json::from_str(&text).unwrap();
        let (kind, message) = error_of(&v);
        assert_eq!((status, kind), (400, "invalid_request_error"), "{message}");
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    let chat = s.url("/v1/chat/completions");
    let (status, _, text) = post_raw(&chat, json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(), key);
    assert_eq!(status, 400, "{text}");
    // Still serving.
    let (status, _, text) = post_raw(&url, json!({"prompt": PROMPT, "max_tokens": 4}).to_string(), key);
    assert_eq!(status, 200, "{text}");
    assert!(s.metric_with_key("rwkv_bad_requests_total", "sesame") >= cases.len() as f64 + 3.0);
}

impl Server {
    fn metric_with_key(&self, name: &str, key: &str) -> f64 {
        let mut r =
            agent().get(&self.url("/metrics")).header("Authorization", &format!("Bearer {key}")).call().unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

#[test]
fn overload_is_answered_429_and_service_resumes() {
    let s = Server::start(&["--max-sessions", "1", "--queue", "1"]);
    let url = s.url("/v1/completions");
    // Warm the kernels, so the long requests below hold their slots while
    // the others arrive.
    assert_eq!(post(&url, &json!({"prompt": PROMPT, "max_tokens": 2})).0, 200);
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                post_raw(&url, json!({"prompt": PROMPT, "max_tokens": 400, "logit_bias": no_eos()}).to_string(), None)
            })
        })
        .collect();
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let limited: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!(ok + limited.len(), 6, "{answers:?}");
    assert!(ok >= 1 && limited.len() >= 2, "{ok} answered, {} limited", limited.len());
    for (_, retry, body) in &limited {
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(body.contains("rate_limit_error"), "{body}");
    }
    assert_eq!(post(&url, &json!({"prompt": PROMPT, "max_tokens": 4})).0, 200);
    assert_eq!(s.metric("rwkv_rejected_total"), limited.len() as f64);
}

/// `--read-timeout` in `slow_clients_are_closed_and_the_connection_cap_holds`.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// How long past the read timeout a slow connection may stay open: the
/// timers' granularity and a loaded 2-core machine (the bound the test
/// asserts, so a connection that is never closed fails it).
const CLOSE_MARGIN: Duration = Duration::from_secs(10);

/// Reads until the server closes `conn` (or CLOSE_MARGIN past the read
/// timeout has gone); returns what it sent.
fn read_until_closed(conn: &mut std::net::TcpStream) -> String {
    conn.set_read_timeout(Some(READ_TIMEOUT + CLOSE_MARGIN)).unwrap();
    let mut got = Vec::new();
    let closed = conn.read_to_end(&mut got);
    assert!(closed.is_ok(), "still open {:?} after the read timeout: {closed:?}", CLOSE_MARGIN);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn slow_clients_are_closed_and_the_connection_cap_holds() {
    use std::io::Write;
    let s = Server::start(&["--read-timeout", "1", "--max-connections", "4"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    // Four connections take every slot and send half a request head each.
    let t0 = Instant::now();
    let mut slow: Vec<_> = (0..4)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    // A fifth client waits for a slot: served once the slow ones are closed.
    let (status, _) = get(&s.url("/health"));
    assert_eq!(status, 200);
    assert!(t0.elapsed() >= READ_TIMEOUT / 2, "served after {:?}: the cap of 4 did not hold", t0.elapsed());
    for c in &mut slow {
        let sent = read_until_closed(c);
        assert!(!sent.contains("200 OK"), "a half request was answered: {sent}");
    }
    // Whole headers, then a body that stops short: 408 after the timeout.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    let head =
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(b"{\"prompt\": ").unwrap();
    let t1 = Instant::now();
    let sent = read_until_closed(&mut c);
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
    assert!(sent.contains("--read-timeout"), "{sent}");
    assert!(t1.elapsed() >= READ_TIMEOUT / 2, "408 after {:?}", t1.elapsed());
    // The server goes on serving.
    assert_eq!(post(&s.url("/v1/completions"), &json!({"prompt": PROMPT, "max_tokens": 2})).0, 200);
}

/// How long `a_client_that_stops_reading_is_dropped` waits for the server to
/// drop the stalled stream: reading its 8000-token prompt (~10 s on 2
/// cores beside other tests), then `--write-timeout 1`.
const STALL_BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_client_that_stops_reading_is_dropped() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let s = Server::start(&["--write-timeout", "1", "--max-tokens-cap", "4000"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    // A small receive buffer, so the server's writes wait soon.
    let size: libc::c_int = 4096;
    let set = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    // An answer larger than the socket buffers can hold (the kernel grows
    // the server's send buffer to 4 MiB): a scored prompt of 8000 tokens
    // with 20 alternatives each (~800 bytes a token) in its first event,
    // then a long completion. The client never reads.
    let prompt: Vec<u32> = (0..8000u32).map(|i| 1 + (i * 7919) % 4000).collect();
    let body = json!({"prompt": [prompt], "max_tokens": 4000, "stream": true, "echo": true, "logprobs": 20,
                      "logit_bias": no_eos()})
    .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    let t0 = Instant::now();
    while s.metric("rwkv_cancelled_total") < 1.0 {
        assert!(t0.elapsed() < STALL_BOUND, "the stalled stream was not dropped in {STALL_BOUND:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The session is freed (the kernel still drains what the closed socket
    // had queued, at this client's tiny window), and the server serves on.
    assert_eq!(post(&s.url("/v1/completions"), &json!({"prompt": PROMPT, "max_tokens": 2})).0, 200);
}

#[test]
fn faults_leave_the_server_serving_at_its_idle_memory() {
    let s = Server::start(&["--max-tokens-cap", "4000"]);
    let url = s.url("/v1/completions");
    let long = json!({"prompt": PROMPT, "max_tokens": 4000, "stream": true, "logit_bias": no_eos()}).to_string();
    let warm = |_| post(&url, &json!({"prompt": PROMPT, "max_tokens": 8, "stream": false})).0;
    // Idle level: after a few requests have compiled the kernels.
    assert!((0..3).map(warm).all(|s| s == 200));
    let idle = s.rss_bytes();
    for round in 0..3 {
        // A client that reads a little of a stream and goes away.
        let r = agent().post(&url).header("Content-Type", "application/json").send(&long).unwrap();
        let mut reader = r.into_body().into_reader();
        let mut buf = [0u8; 2048];
        let _ = reader.read(&mut buf).unwrap();
        drop(reader);
        // 10 MB bodies, and max_tokens far past the cap.
        let (status, _, _) = post_raw(&url, vec![b' '; 10 << 20], None);
        assert_eq!(status, 400, "round {round}");
        let (status, _, _) = post_raw(&url, json!({"prompt": "a", "max_tokens": 1_000_000_000u64}).to_string(), None);
        assert_eq!(status, 400);
    }
    // The abandoned streams' sessions are freed within a few steps.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.metric("rwkv_active_sessions") > 0.0 {
        assert!(Instant::now() < deadline, "abandoned sessions are still active");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.metric("rwkv_cancelled_total"), 3.0);
    assert!((0..3).map(warm).all(|s| s == 200));
    let after = s.rss_bytes();
    eprintln!("RSS idle {} MiB, after the faults {} MiB", idle >> 20, after >> 20);
    assert!(after <= idle + RSS_SLACK, "RSS grew from {idle} to {after} bytes");
}

/// Memory the allocator may keep after the faults (freed pages it holds for
/// reuse, the HTTP runtime's buffers); a leak of the 10 MB bodies or of the
/// abandoned sessions' generations would pass it.
const RSS_SLACK: u64 = 24 << 20;

#[test]
fn sigterm_ends_requests_in_flight_within_the_grace_and_exits_0() {
    let mut s = Server::start(&["--shutdown-grace", "1", "--max-tokens-cap", "4000"]);
    let url = s.url("/v1/completions");
    assert_eq!(post(&url, &json!({"prompt": PROMPT, "max_tokens": 2})).0, 200);
    let body = json!({"prompt": PROMPT, "max_tokens": 4000, "stream": true, "logit_bias": no_eos()});
    let client = std::thread::spawn(move || stream(&url, &body));
    std::thread::sleep(Duration::from_millis(500));
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "still running 15 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // The stream was ended, with an error event and [DONE], not cut.
    let events = client.join().unwrap();
    let last = events.last().unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("shutting down"), "{last}");
}

/// A Transformer folder chats through its `chat_template` (rendered with
/// minijinja); without one, chat is a 400 that says so and completions work.
#[test]
fn a_transformer_chats_through_its_chat_template() {
    let src = common::fixture("transformer/models/llama-L2-D128-H4-KV4-F352-V4096-fp16-austen");
    let dir = common::TempDir::new("serve-template");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.0.join(f)).unwrap();
    }
    let plain = Server::start(&["--model", dir.0.to_str().unwrap()]);
    let chat = json!({"messages": [{"role": "user", "content": "Who is Emma?"}], "max_tokens": 8, "temperature": 0});
    let (status, v) = post(&plain.url("/v1/chat/completions"), &chat);
    assert_eq!(status, 400);
    assert!(error_of(&v).1.contains("no chat template"), "{v}");
    drop(plain);

    let template = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'].strip() }}\n{% endfor %}\
                    {% if add_generation_prompt %}ASSISTANT:{% endif %}";
    let config = json!({"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
    std::fs::write(dir.0.join("tokenizer_config.json"), config.to_string()).unwrap();
    let s = Server::start(&["--model", dir.0.to_str().unwrap()]);
    let (status, c) = post(&s.url("/v1/chat/completions"), &chat);
    assert_eq!(status, 200, "{c}");
    // The same as completing the rendered text.
    let rendered = json!({"prompt": "USER: Who is Emma?\nASSISTANT:", "max_tokens": 8, "temperature": 0});
    let (_, p) = post(&s.url("/v1/completions"), &rendered);
    assert_eq!(c["usage"], p["usage"]);
    assert_eq!(c["choices"][0]["message"]["content"], p["choices"][0]["text"]);
}
