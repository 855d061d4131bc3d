//! The OpenAI API's request bodies, read and checked: `/v1/completions` and
//! `/v1/chat/completions`. Every field the server honours is taken from the
//! JSON by name with its type and range checked, so an error names the field
//! (`param`, as OpenAI's error objects do); fields we do not know are
//! ignored, as OpenAI's clients expect. No I/O and no async here: the server
//! and the fuzz target (`fuzzing::openai_request`) call the same functions.

use serde_json::{Map, Value};

use crate::sampler::SamplerConfig;

/// A request we refuse: the message and the offending field, answered with
/// 400 and `{"error": {"message", "type": "invalid_request_error", "param"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
    pub param: Option<String>,
}

impl RequestError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), param: None }
    }

    fn field(param: &str, message: impl Into<String>) -> Self {
        Self { message: format!("`{param}`: {}", message.into()), param: Some(param.to_string()) }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

type Parsed<T> = std::result::Result<T, RequestError>;

/// What a completion prompt may be: text, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// What both endpoints share: how to sample, when to stop, how to answer.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Already checked against the server's cap.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Whether `seed` was given (else the server picks one per request).
    pub seeded: bool,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Report each generated token's log probability and this many most
    /// likely alternatives (`logprobs` / `top_logprobs`); None: off.
    pub logprobs: Option<usize>,
    /// Completions: answer the prompt before the completion, and with
    /// `logprobs` the prompt tokens' log probabilities too.
    pub echo: bool,
}

#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub generation: Generation,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub generation: Generation,
}

/// The server's limits that a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most `max_tokens` a request may ask for.
    pub max_tokens_cap: usize,
    /// `max_tokens` when a completion request gives none (OpenAI: 16).
    pub completion_default: usize,
    /// `max_tokens` when a chat request gives none.
    pub chat_default: usize,
    /// Most token ids `logit_bias` may name.
    pub max_logit_bias: usize,
    /// Most stop strings (OpenAI: 4), and most bytes of each.
    pub max_stops: usize,
    pub max_stop_bytes: usize,
    /// Most alternatives `logprobs` (completions) or `top_logprobs` (chat)
    /// may ask for per token (OpenAI: 5 and 20).
    pub max_top_logprobs: usize,
    /// Most prompt tokens `echo` with `logprobs` may score (their answer
    /// takes ~40 bytes a token, plus ~40 per alternative).
    pub max_scored_prompt: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens_cap: 4096,
            completion_default: 16,
            chat_default: 512,
            max_logit_bias: 1024,
            max_stops: 4,
            max_stop_bytes: 256,
            max_top_logprobs: 20,
            max_scored_prompt: 32768,
        }
    }
}

/// The body of `POST /v1/completions`.
pub fn parse_completion(body: &[u8], limits: &Limits) -> Parsed<CompletionRequest> {
    let obj = object(body)?;
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => return Err(RequestError::field("prompt", "is required")),
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => match items.as_slice() {
            [Value::String(s)] => Prompt::Text(s.clone()),
            _ => return Err(RequestError::field("prompt", "give one prompt per request (an array of one string)")),
        },
        Some(Value::Array(items)) => {
            // One prompt of token ids, or a batch of one (`[[ids]]`, as
            // evaluation harnesses send tokenized prompts).
            let items = match items.as_slice() {
                [Value::Array(inner)] => inner,
                _ if items.iter().any(Value::is_array) => {
                    return Err(RequestError::field(
                        "prompt",
                        "give one prompt per request (an array of one array of token ids)",
                    ))
                }
                _ => items,
            };
            let ids: Option<Vec<u32>> = items.iter().map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok())).collect();
            match ids {
                Some(ids) if !ids.is_empty() => Prompt::Tokens(ids),
                _ => return Err(RequestError::field("prompt", "must be a string or a non-empty array of token ids")),
            }
        }
        Some(_) => return Err(RequestError::field("prompt", "must be a string or an array of token ids")),
    };
    if matches!(&prompt, Prompt::Text(t) if t.is_empty()) {
        return Err(RequestError::field("prompt", "is empty"));
    }
    let mut generation = generation(&obj, limits, limits.completion_default)?;
    // The legacy API: `logprobs` is the number of alternatives (0: the
    // sampled token's only).
    generation.logprobs = top_count(&obj, "logprobs", limits)?;
    generation.echo = match obj.get("echo") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError::field("echo", "must be true or false")),
    };
    Ok(CompletionRequest { prompt, generation })
}

/// The body of `POST /v1/chat/completions`.
pub fn parse_chat(body: &[u8], limits: &Limits) -> Parsed<ChatRequest> {
    let obj = object(body)?;
    let items = match obj.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(RequestError::field("messages", "is empty")),
        None | Some(Value::Null) => return Err(RequestError::field("messages", "is required")),
        Some(_) => return Err(RequestError::field("messages", "must be an array of {role, content}")),
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let m = m.as_object().ok_or_else(|| RequestError::field(&param, "must be an object {role, content}"))?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(RequestError::field(
                    &format!("{param}.role"),
                    format!("`{other}` is not supported (system, developer, user, assistant)"),
                ))
            }
            None => return Err(RequestError::field(&format!("{param}.role"), "is required (a string)")),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text ones, joined.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(RequestError::field(
                                &format!("{param}.content"),
                                "only text parts ({\"type\": \"text\", \"text\": …}) are supported",
                            ))
                        }
                    }
                }
                text
            }
            None | Some(Value::Null) if role == Role::Assistant => String::new(),
            _ => return Err(RequestError::field(&format!("{param}.content"), "must be a string or text parts")),
        };
        messages.push(Message { role, content });
    }
    let mut generation = generation(&obj, limits, limits.chat_default)?;
    let wanted = match obj.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError::field("logprobs", "must be true or false")),
    };
    let top = top_count(&obj, "top_logprobs", limits)?;
    generation.logprobs = match (wanted, top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(_)) => return Err(RequestError::field("top_logprobs", "needs `logprobs: true`")),
        (false, None) => None,
    };
    Ok(ChatRequest { messages, generation })
}

fn object(body: &[u8]) -> Parsed<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(RequestError::new("the request body must be a JSON object")),
        Err(e) => Err(RequestError::new(format!("the request body is not valid JSON: {e}"))),
    }
}

/// A number field in `range`, or `default` when absent or null.
fn number(obj: &Map<String, Value>, name: &str, range: std::ops::RangeInclusive<f64>, default: f64) -> Parsed<f64> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(RequestError::field(name, format!("{v} is outside {}..={}", range.start(), range.end())))
            }
        }
        Some(_) => Err(RequestError::field(name, "must be a number")),
    }
}

/// A non-negative integer field, or None when absent or null.
fn count(obj: &Map<String, Value>, name: &str) -> Parsed<Option<u64>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| RequestError::field(name, "must be a non-negative integer")),
    }
}

/// A count of alternative tokens per token, at most the server's limit.
fn top_count(obj: &Map<String, Value>, name: &str, limits: &Limits) -> Parsed<Option<usize>> {
    match count(obj, name)? {
        Some(n) if n > limits.max_top_logprobs as u64 => {
            Err(RequestError::field(name, format!("{n} is over {}", limits.max_top_logprobs)))
        }
        n => Ok(n.map(|n| n as usize)),
    }
}

fn generation(obj: &Map<String, Value>, limits: &Limits, default_max: usize) -> Parsed<Generation> {
    // Chat's newer name first, as OpenAI reads it.
    let (max_name, max) = match count(obj, "max_completion_tokens")? {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", count(obj, "max_tokens")?),
    };
    let max_tokens = match max {
        None => default_max.min(limits.max_tokens_cap),
        Some(n) if n > limits.max_tokens_cap as u64 => {
            return Err(RequestError::field(
                max_name,
                format!("{n} is over this server's cap of {}", limits.max_tokens_cap),
            ))
        }
        Some(n) => n as usize,
    };
    if let Some(n) = count(obj, "n")? {
        if n != 1 {
            return Err(RequestError::field("n", "only n = 1 is supported"));
        }
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        // OpenAI's seed is a signed integer; any integer is a seed.
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| RequestError::field("seed", "must be an integer"))?,
        ),
    };
    let top_k = count(obj, "top_k")?.unwrap_or(0);
    let sampler = SamplerConfig {
        temperature: number(obj, "temperature", 0.0..=2.0, 1.0)? as f32,
        top_p: number(obj, "top_p", 0.0..=1.0, 1.0)? as f32,
        top_k: usize::try_from(top_k).unwrap_or(usize::MAX),
        min_p: number(obj, "min_p", 0.0..=1.0, 0.0)? as f32,
        presence_penalty: number(obj, "presence_penalty", -2.0..=2.0, 0.0)? as f32,
        frequency_penalty: number(obj, "frequency_penalty", -2.0..=2.0, 0.0)? as f32,
        repetition_penalty: 1.0,
        penalty_decay: 1.0,
        logit_bias: logit_bias(obj, limits)?,
        seed: seed.unwrap_or(0),
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| RequestError::field("stop", "must be a string or an array of strings"))?,
        Some(_) => return Err(RequestError::field("stop", "must be a string or an array of strings")),
    };
    if stop.len() > limits.max_stops {
        return Err(RequestError::field("stop", format!("at most {} stop strings", limits.max_stops)));
    }
    if stop.iter().any(|s| s.len() > limits.max_stop_bytes) {
        return Err(RequestError::field("stop", format!("a stop string is over {} bytes", limits.max_stop_bytes)));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError::field("stream", "must be true or false")),
    };
    Ok(Generation { max_tokens, sampler, seeded: seed.is_some(), stop, stream, logprobs: None, echo: false })
}

/// `logit_bias`: `{"token id": bias}` with bias in -100..=100, as OpenAI's;
/// -100 bans the token outright.
fn logit_bias(obj: &Map<String, Value>, limits: &Limits) -> Parsed<Vec<(u32, f32)>> {
    let map = match obj.get("logit_bias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(RequestError::field("logit_bias", "must be an object {\"token id\": bias}")),
    };
    if map.len() > limits.max_logit_bias {
        return Err(RequestError::field("logit_bias", format!("at most {} tokens", limits.max_logit_bias)));
    }
    map.iter()
        .map(|(k, v)| {
            let id: u32 =
                k.parse().map_err(|_| RequestError::field("logit_bias", format!("`{k}` is not a token id")))?;
            let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                RequestError::field("logit_bias", format!("the bias of {k} must be a number in -100..=100"))
            })?;
            Ok((id, if b <= -100.0 { f32::NEG_INFINITY } else { b as f32 }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_tokens_cap: 100, ..Limits::default() }
    }

    #[test]
    fn completion_fields_are_read_and_unknown_ones_ignored() {
        let body = br#"{"model": "x", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_k": 3,
            "stop": ["\n"], "seed": -1, "logit_bias": {"7": -100, "8": 2.5}, "stream": true, "whatever": [1]}"#;
        let r = parse_completion(body, &limits()).unwrap();
        assert_eq!(r.prompt, Prompt::Text("Hi".into()));
        let g = r.generation;
        assert_eq!((g.max_tokens, g.sampler.top_k, g.sampler.temperature, g.stream, g.seeded), (5, 3, 0.0, true, true));
        assert_eq!(g.sampler.seed, u64::MAX);
        assert_eq!(g.stop, vec!["\n".to_string()]);
        assert_eq!(g.sampler.logit_bias, vec![(7, f32::NEG_INFINITY), (8, 2.5)]);
        let r = parse_completion(br#"{"prompt": [1, 2, 3]}"#, &limits()).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2, 3]));
        let r = parse_completion(br#"{"prompt": [[4, 5]]}"#, &limits()).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![4, 5]));
        assert_eq!(r.generation.max_tokens, 16);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"{", None),
            (b"[1]", None),
            (br#"{"prompt": 3}"#, Some("prompt")),
            (br#"{"prompt": "a", "max_tokens": 1000000000}"#, Some("max_tokens")),
            (br#"{"prompt": "a", "max_tokens": -1}"#, Some("max_tokens")),
            (br#"{"prompt": "a", "temperature": "hot"}"#, Some("temperature")),
            (br#"{"prompt": "a", "top_p": 2}"#, Some("top_p")),
            (br#"{"prompt": "a", "stop": [1]}"#, Some("stop")),
            (br#"{"prompt": "a", "n": 2}"#, Some("n")),
            (br#"{"prompt": "a", "logit_bias": {"x": 1}}"#, Some("logit_bias")),
            (br#"{"prompt": "a", "stream": "yes"}"#, Some("stream")),
            (br#"{"prompt": ["a", "b"]}"#, Some("prompt")),
            (br#"{"prompt": [1, -2]}"#, Some("prompt")),
            (br#"{"prompt": [[1], [2]]}"#, Some("prompt")),
            (br#"{"prompt": [[]]}"#, Some("prompt")),
            (br#"{"prompt": [1, [2]]}"#, Some("prompt")),
            (br#"{"prompt": "a", "logprobs": 21}"#, Some("logprobs")),
            (br#"{"prompt": "a", "logprobs": true}"#, Some("logprobs")),
            (br#"{"prompt": "a", "echo": 1}"#, Some("echo")),
        ];
        for (body, param) in cases {
            let e = parse_completion(body, &limits()).unwrap_err();
            assert_eq!(e.param.as_deref(), *param, "{}: {e}", String::from_utf8_lossy(body));
        }
        let e = parse_chat(br#"{"messages": [{"role": "robot", "content": "x"}]}"#, &limits()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse_chat(br#"{"messages": []}"#, &limits()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let chat = |extra: &str| {
            parse_chat(format!(r#"{{"messages": [{{"role": "user", "content": "x"}}]{extra}}}"#).as_bytes(), &limits())
        };
        assert_eq!(chat(r#", "top_logprobs": 2"#).unwrap_err().param.as_deref(), Some("top_logprobs"));
        assert_eq!(
            chat(r#", "logprobs": true, "top_logprobs": 21"#).unwrap_err().param.as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(chat(r#", "logprobs": 1"#).unwrap_err().param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn logprobs_are_asked_for_as_each_endpoint_does() {
        let completion = |body: &[u8]| parse_completion(body, &limits()).unwrap().generation.logprobs;
        assert_eq!(completion(br#"{"prompt": "a"}"#), None);
        assert_eq!(completion(br#"{"prompt": "a", "logprobs": null, "echo": false}"#), None);
        assert_eq!(completion(br#"{"prompt": "a", "logprobs": 0}"#), Some(0));
        assert_eq!(completion(br#"{"prompt": "a", "logprobs": 5}"#), Some(5));
        let chat = |extra: &str| {
            let body = format!(r#"{{"messages": [{{"role": "user", "content": "x"}}]{extra}}}"#);
            parse_chat(body.as_bytes(), &limits()).unwrap().generation.logprobs
        };
        assert_eq!(chat(""), None);
        assert_eq!(chat(r#", "logprobs": false"#), None);
        assert_eq!(chat(r#", "logprobs": true"#), Some(0));
        assert_eq!(chat(r#", "logprobs": true, "top_logprobs": 20"#), Some(20));
    }

    #[test]
    fn chat_messages_and_content_parts() {
        let body = br#"{"messages": [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 7}"#;
        let r = parse_chat(body, &limits()).unwrap();
        assert_eq!(r.messages[0], Message { role: Role::System, content: "Be brief.".into() });
        assert_eq!(r.messages[1], Message { role: Role::User, content: "Hello there".into() });
        assert_eq!(r.generation.max_tokens, 7);
        assert!(!r.generation.seeded);
    }
}
