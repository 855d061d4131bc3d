//! Tokenizers: the RWKV World vocabulary (greedy longest match over bytes,
//! as the official TRIE_TOKENIZER), and any Hugging Face `tokenizer.json`
//! through the `tokenizers` crate. Both work on bytes: `encode` takes bytes,
//! `token_bytes` gives each token's exact bytes, and [`TextStream`] turns a
//! stream of token bytes into printable text without splitting characters.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The World vocabulary shipped with the library (RWKV-5, -6 and -7 World models).
pub const WORLD_VOCAB: &str = include_str!("../assets/rwkv_vocab_v20230424.txt");

pub enum Tokenizer {
    World(WorldTokenizer),
    Hf(HfTokenizer),
}

impl Tokenizer {
    /// The embedded World tokenizer.
    pub fn world() -> Result<Self> {
        Ok(Tokenizer::World(WorldTokenizer::parse(WORLD_VOCAB)?))
    }

    /// `world`, a World vocab `.txt` file, or a Hugging Face `tokenizer.json`.
    pub fn from_spec(spec: &str) -> Result<Self> {
        if spec.eq_ignore_ascii_case("world") {
            return Self::world();
        }
        Self::from_file(Path::new(spec))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_regular(path)?;
        if path.extension().is_some_and(|e| e == "txt") {
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::Tokenizer(format!("{} is not UTF-8 text", path.display())))?;
            Ok(Tokenizer::World(WorldTokenizer::parse(&text)?))
        } else {
            Ok(Tokenizer::Hf(HfTokenizer::from_bytes(&bytes, &path.display().to_string())?))
        }
    }

    /// The tokenizer for a model: `spec` if given; else a `tokenizer.json` or
    /// `rwkv_vocab*.txt` next to the model; else World when the vocab is 65536.
    pub fn for_model(spec: Option<&str>, model_path: Option<&Path>, vocab: usize) -> Result<Self> {
        let tok = match spec {
            Some(s) => Self::from_spec(s)?,
            None => match model_path.and_then(find_beside) {
                Some(p) => Self::from_file(&p)?,
                None if vocab == 65536 => Self::world()?,
                None => {
                    return Err(Error::Tokenizer(format!(
                        "no tokenizer found for this model (vocab {vocab}): pass --tokenizer with the model's \
                         tokenizer.json (or `world` for RWKV World models), or put tokenizer.json next to the model"
                    )))
                }
            },
        };
        tok.check_vocab(vocab)?;
        Ok(tok)
    }

    /// Errors if this tokenizer cannot belong to a model with `vocab` rows.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let n = self.vocab_size();
        if n > vocab || n * 2 < vocab {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has {n} tokens but the model's vocabulary has {vocab}: wrong tokenizer for this model"
            )));
        }
        Ok(())
    }

    /// One past the largest token id.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::World(w) => w.tokens.len(),
            Tokenizer::Hf(h) => h.bytes.len(),
        }
    }

    pub fn encode(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        match self {
            Tokenizer::World(w) => Ok(w.encode(bytes)),
            Tokenizer::Hf(h) => h.encode(bytes),
        }
    }

    /// The exact bytes of one token (`None` for an id the vocabulary lacks).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let table = match self {
            Tokenizer::World(w) => &w.tokens,
            Tokenizer::Hf(h) => &h.bytes,
        };
        table.get(id as usize).and_then(|t| t.as_deref())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            let b = self.token_bytes(id).ok_or_else(|| {
                Error::Tokenizer(format!("token id {id} is not in the vocabulary ({} ids)", self.vocab_size()))
            })?;
            out.extend_from_slice(b);
        }
        Ok(out)
    }

    pub fn name(&self) -> &str {
        match self {
            Tokenizer::World(_) => "world",
            Tokenizer::Hf(h) => &h.name,
        }
    }
}

/// The tokenizer of a model file (beside it) or of a Hugging Face folder (in it).
fn find_beside(model: &Path) -> Option<PathBuf> {
    let dir = if model.is_dir() { model } else { model.parent()? };
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Some(json);
    }
    let mut vocabs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("rwkv_vocab") && n.ends_with(".txt"))
        })
        .collect();
    vocabs.sort();
    vocabs.into_iter().next()
}

/// The RWKV World tokenizer.
pub struct WorldTokenizer {
    /// id -> bytes (id 0, `<|endoftext|>`, decodes to nothing).
    tokens: Vec<Option<Vec<u8>>>,
    trie: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>, // sorted by byte
    token: Option<u32>,
}

/// Whether a tokenizer.json section, or anything nested in it, has
/// `"type": kind`.
fn names_type(v: &serde_json::Value, kind: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("type").and_then(|t| t.as_str()) == Some(kind) || m.values().any(|x| names_type(x, kind))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| names_type(x, kind)),
        _ => false,
    }
}

/// Most token ids a tokenizer.json may have (the largest real vocabularies
/// have ~260k); the id table is sized by its largest id.
pub const MAX_HF_VOCAB: usize = 1 << 22;

/// Largest token id a World vocab may use: the World vocab has 65536; the
/// id table costs 24 bytes per id up to the largest, so this bounds it at
/// 24 MiB whatever the file says.
pub const MAX_WORLD_ID: usize = 1 << 20;
/// Longest World vocab line in bytes: a token of MAX_TOKEN_BYTES bytes, each
/// written as a 4-character escape, plus the id and the length. World tokens
/// are at most 128 bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;
const MAX_WORLD_LINE: usize = 4 * MAX_TOKEN_BYTES + 64;
/// Characters of a bad line shown in an error.
const SHOWN_LINE_CHARS: usize = 80;

impl WorldTokenizer {
    /// Parses `<id> <python literal> <byte length>` lines (LF or CRLF). Ids
    /// are unique, from 1 to MAX_WORLD_ID; lines are at most MAX_WORLD_LINE
    /// bytes, so memory stays a small multiple of the text.
    pub fn parse(text: &str) -> Result<Self> {
        let mut tokens: Vec<Option<Vec<u8>>> = vec![Some(Vec::new())];
        let mut trie = vec![TrieNode::default()];
        for (n, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let shown: String = line.chars().take(SHOWN_LINE_CHARS).collect();
            let more = if shown.len() < line.len() { format!(" ({} bytes in all)", line.len()) } else { String::new() };
            let bad = |why: &str| Error::Tokenizer(format!("World vocab line {}: {why}: {shown:?}{more}", n + 1));
            if line.len() > MAX_WORLD_LINE {
                return Err(bad(&format!("longer than {MAX_WORLD_LINE} bytes")));
            }
            let (id, rest) = line.split_once(' ').ok_or_else(|| bad("no id"))?;
            let (lit, len) = rest.rsplit_once(' ').ok_or_else(|| bad("no length"))?;
            let id: usize = id.parse().map_err(|_| bad("bad id"))?;
            let len: usize = len.parse().map_err(|_| bad("bad length"))?;
            let bytes = parse_py_literal(lit).ok_or_else(|| bad("bad literal"))?;
            if bytes.len() != len {
                return Err(bad(&format!("literal has {} bytes, line says {len}", bytes.len())));
            }
            if bytes.len() > MAX_TOKEN_BYTES {
                return Err(bad(&format!("a token of {} bytes, more than {MAX_TOKEN_BYTES}", bytes.len())));
            }
            if id == 0 {
                return Err(bad("id 0 is reserved for <|endoftext|>"));
            }
            if id > MAX_WORLD_ID {
                return Err(bad(&format!("id {id} is over the largest allowed, {MAX_WORLD_ID}")));
            }
            if tokens.get(id).is_some_and(|t| t.is_some()) {
                return Err(bad(&format!("id {id} appears twice")));
            }
            if tokens.len() <= id {
                tokens.resize(id + 1, None);
            }
            // Insert into the trie.
            let mut node = 0usize;
            for &b in &bytes {
                node = match trie[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => trie[node].children[i].1 as usize,
                    Err(i) => {
                        trie.push(TrieNode::default());
                        let new = trie.len() - 1;
                        trie[node].children.insert(i, (b, new as u32));
                        new
                    }
                };
            }
            trie[node].token = Some(id as u32);
            tokens[id] = Some(bytes);
        }
        // Greedy matching needs every single byte as a token of its own (a
        // longer token starting with the byte is not enough).
        for b in 0..=255u8 {
            let single = trie[0].children.binary_search_by_key(&b, |c| c.0).ok().map(|i| trie[0].children[i].1);
            if single.is_none_or(|n| trie[n as usize].token.is_none()) {
                return Err(Error::Tokenizer(format!("World vocab lacks the single byte {b:#04x}")));
            }
        }
        Ok(Self { tokens, trie })
    }

    /// Greedy longest match: at each position the longest vocabulary entry.
    pub fn encode(&self, bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::with_capacity(bytes.len() / 3 + 1);
        let mut pos = 0;
        while pos < bytes.len() {
            let (mut node, mut best) = (0usize, None);
            let mut i = pos;
            while i < bytes.len() {
                match self.trie[node].children.binary_search_by_key(&bytes[i], |c| c.0) {
                    Ok(k) => node = self.trie[node].children[k].1 as usize,
                    Err(_) => break,
                }
                i += 1;
                if let Some(t) = self.trie[node].token {
                    best = Some((t, i));
                }
            }
            // Every single byte is a token, so a match always exists.
            let (t, end) = best.expect("World vocab covers every byte");
            out.push(t);
            pos = end;
        }
        out
    }
}

/// Parses a Python `repr` of a `str` ('...' / "...") or `bytes` (b'...').
fn parse_py_literal(lit: &str) -> Option<Vec<u8>> {
    let (is_bytes, body) = match lit.strip_prefix('b') {
        Some(rest) => (true, rest),
        None => (false, lit),
    };
    let q = body.chars().next()?;
    if (q != '\'' && q != '"') || body.len() < 2 || !body.ends_with(q) {
        return None;
    }
    let body = &body[1..body.len() - 1];
    let mut out = Vec::new();
    let mut chars = body.chars();
    let push_char = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            push_char(&mut out, c);
            continue;
        }
        let e = chars.next()?;
        let mut hex = |n: usize| -> Option<u32> {
            let s: String = chars.by_ref().take(n).collect();
            if s.len() != n {
                return None;
            }
            u32::from_str_radix(&s, 16).ok()
        };
        match e {
            'n' => out.push(b'\n'),
            't' => out.push(b'\t'),
            'r' => out.push(b'\r'),
            '0' => out.push(0),
            'a' => out.push(7),
            'b' => out.push(8),
            'f' => out.push(12),
            'v' => out.push(11),
            '\\' | '\'' | '"' => out.push(e as u8),
            'x' => {
                let v = hex(2)?;
                if is_bytes {
                    out.push(v as u8);
                } else {
                    push_char(&mut out, char::from_u32(v)?);
                }
            }
            'u' if !is_bytes => push_char(&mut out, char::from_u32(hex(4)?)?),
            'U' if !is_bytes => push_char(&mut out, char::from_u32(hex(8)?)?),
            _ => return None,
        }
    }
    Some(out)
}

/// A Hugging Face tokenizer with a byte table for exact, streamable decoding.
pub struct HfTokenizer {
    inner: Box<tokenizers::Tokenizer>,
    bytes: Vec<Option<Vec<u8>>>,
    name: String,
}

impl HfTokenizer {
    pub fn from_bytes(json: &[u8], name: &str) -> Result<Self> {
        // Valid JSON first, and a decoder section that parses as a JSON value:
        // tokenizers 0.22 panics (`expect("Helper")`) on an error inside the
        // decoder section, e.g. a bad escape or a lone surrogate (found by
        // fuzzing), instead of returning it.
        #[derive(serde::Deserialize)]
        struct Probe {
            decoder: Option<serde_json::Value>,
            normalizer: Option<serde_json::Value>,
        }
        let probe = serde_json::from_slice::<Probe>(json)
            .map_err(|e| Error::Tokenizer(format!("{name} is not valid JSON: {e}")))?;
        // tokenizers' Precompiled (SentencePiece) normalizer panics on a
        // missing or malformed charsmap, at load or while encoding: refused.
        if [&probe.normalizer, &probe.decoder].into_iter().flatten().any(|v| names_type(v, "Precompiled")) {
            return Err(Error::Tokenizer(format!("{name}: Precompiled normalizers are not supported")));
        }
        // A tokenizers panic on anything else the fuzzer has not met is an
        // error too, not the end of the process.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json))
            .map_err(|_| Error::Tokenizer(format!("{name}: the tokenizers library failed on it")))?;
        let mut inner = parsed.map_err(|e| Error::Tokenizer(format!("{name} is not a usable tokenizer.json: {e}")))?;
        // Padding and truncation from the file would pad a text to any
        // length (memory from a small file) or silently drop tokens.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("{name}: cannot turn its truncation off: {e}")))?;
        let byte_level = matches!(inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        let unicode_to_byte = gpt2_unicode_to_byte();
        let added = inner.get_added_tokens_decoder();
        // Ids come from the file and may leave gaps: the table is sized by the
        // largest id, checked before anything is sized by it.
        let largest = inner.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
        let n = largest.max(inner.get_vocab_size(true));
        if n > MAX_HF_VOCAB {
            return Err(Error::Tokenizer(format!(
                "{name}: token ids up to {n}, more than the {MAX_HF_VOCAB} supported"
            )));
        }
        let mut bytes = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let b = if let Some(a) = added.get(&id) {
                Some(a.content.as_bytes().to_vec())
            } else if let Some(piece) = inner.id_to_token(id) {
                if byte_level {
                    // Byte-level BPE: each char of the piece stands for one byte.
                    piece.chars().map(|c| unicode_to_byte.get(&c).copied()).collect::<Option<Vec<u8>>>()
                } else {
                    inner.decode(&[id], false).ok().map(String::into_bytes)
                }
            } else {
                None
            };
            bytes.push(b);
        }
        Ok(Self { inner: Box::new(inner), bytes, name: name.to_string() })
    }

    fn encode(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            Error::Tokenizer(format!(
                "input is not valid UTF-8 (at byte {}); {} encodes text only (the World tokenizer takes any bytes)",
                e.valid_up_to(),
                self.name
            ))
        })?;
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", self.name)))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// GPT-2's byte <-> printable-character table used by byte-level BPE.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut extra = 0u32;
    for b in 0..=255u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
        map.insert(c, b as u8);
    }
    map
}

/// Turns token bytes into text as soon as they form valid UTF-8. A character
/// split across tokens is held back until complete; bytes that can never be
/// valid are shown escaped (`\xff`), never as U+FFFD and never dropped.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(n) => {
                            for b in &self.pending[good..good + n] {
                                out.push_str(&format!("\\x{b:02x}"));
                            }
                            self.pending.drain(..good + n);
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left (an unfinished character, shown escaped).
    pub fn finish(&mut self) -> String {
        let out = self.pending.iter().map(|b| format!("\\x{b:02x}")).collect();
        self.pending.clear();
        out
    }
}
