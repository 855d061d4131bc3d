//! Tokenizers against the official cases: World (ChatRWKV's TRIE_TOKENIZER)
//! and GPT-NeoX 20B (Hugging Face tokenizers), plus the demo model's BPE.

mod common;

use common::fixture;
use rwkv_wgpu::tokenizer::WorldTokenizer;
use rwkv_wgpu::{TextStream, Tokenizer};
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn cases(file: &str) -> Vec<Value> {
    std::fs::read_to_string(fixture(&format!("tokenizer/{file}")))
        .unwrap()
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

/// Streams `ids` one token at a time and returns the text.
fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut s = TextStream::new();
    let mut out = String::new();
    for &i in ids {
        out.push_str(&s.push(tok.token_bytes(i).unwrap()));
    }
    out.push_str(&s.finish());
    out
}

fn check_cases(tok: &Tokenizer, file: &str, expect_encode: usize, expect_decode: usize) {
    let (mut enc, mut dec) = (0, 0);
    for c in cases(file) {
        // NeoX encode cases give the text only.
        let bytes = match c["bytes_hex"].as_str() {
            Some(h) => hex(h),
            None => c["text"].as_str().unwrap().as_bytes().to_vec(),
        };
        let want = ids(&c);
        let id = c["id"].as_str().unwrap();
        match c["kind"].as_str().unwrap() {
            "encode" => {
                // The HF tokenizer takes text; World takes any bytes.
                if c["utf8_valid"].as_bool().unwrap() || matches!(tok, Tokenizer::World(_)) {
                    assert_eq!(tok.encode(&bytes).unwrap(), want, "{id}: encode");
                    enc += 1;
                }
                if c.get("nfc_changes_text").and_then(Value::as_bool) != Some(true) {
                    assert_eq!(tok.decode(&want).unwrap(), bytes, "{id}: decode");
                }
            }
            "decode" => {
                assert_eq!(tok.decode(&want).unwrap(), bytes, "{id}: decode");
                dec += 1;
            }
            k => panic!("unknown kind {k}"),
        }
        // Streaming never prints a replacement character for a split
        // character, and gives the exact text when the bytes are valid.
        let text = stream(tok, &want);
        let original = tok.decode(&want).unwrap();
        match std::str::from_utf8(&original) {
            Ok(s) => assert_eq!(text, s, "{id}: streamed text"),
            Err(_) => assert!(text.contains("\\x"), "{id}: invalid bytes must show escaped"),
        }
        assert!(!text.contains('\u{FFFD}') || String::from_utf8_lossy(&original) == text, "{id}: U+FFFD in stream");
    }
    assert_eq!((enc, dec), (expect_encode, expect_decode), "{file}: cases run");
}

#[test]
fn world_cases() {
    check_cases(&Tokenizer::world().unwrap(), "world-cases.jsonl", 353, 35);
}

#[test]
fn world_vocab_with_crlf_line_endings() {
    let crlf = rwkv_wgpu::tokenizer::WORLD_VOCAB.replace('\n', "\r\n");
    let tok = Tokenizer::World(WorldTokenizer::parse(&crlf).unwrap());
    check_cases(&tok, "world-cases.jsonl", 353, 35);
}

#[test]
fn world_vocab_errors() {
    assert!(WorldTokenizer::parse("1 'a' 2\n").is_err(), "length mismatch");
    assert!(WorldTokenizer::parse("x 'a' 1\n").is_err(), "bad id");
    assert!(WorldTokenizer::parse("1 'a' 1\n").is_err(), "missing single bytes");
}

#[test]
fn neox_cases() {
    let tok = Tokenizer::from_file(&fixture("tokenizer/20B_tokenizer.json")).unwrap();
    let n = cases("neox-cases.jsonl");
    let encodable = n.iter().filter(|c| c["kind"] == "encode" && c["utf8_valid"].as_bool().unwrap()).count();
    let decodes = n.iter().filter(|c| c["kind"] == "decode").count();
    assert!(encodable > 50 && decodes > 5);
    check_cases(&tok, "neox-cases.jsonl", encodable, decodes);
}

#[test]
fn austen_tokenizer_examples_and_held_out_text() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tok =
        Tokenizer::from_file(std::path::Path::new(&format!("{root}/assets/austen-rwkv7/tokenizer.json"))).unwrap();
    assert_eq!(
        tok.encode(b"It is a truth universally acknowledged").unwrap(),
        vec![1020, 364, 259, 1912, 464, 73, 1189, 555, 2702]
    );
    assert_eq!(tok.encode(b"Elizabeth").unwrap(), vec![2058]);
    let val = std::fs::read(format!("{root}/assets/austen-rwkv7/val.txt")).unwrap();
    let ids = tok.encode(&val).unwrap();
    assert_eq!(ids.len(), 12_460);
    assert_eq!(tok.decode(&ids).unwrap(), val);
    assert!(tok.encode(b"\xff\xfe").is_err(), "HF tokenizers take text only: a clear error");
}

#[test]
fn text_stream_holds_split_characters() {
    let mut s = TextStream::new();
    let e_acute = "é".as_bytes(); // c3 a9
    assert_eq!(s.push(b"caf"), "caf");
    assert_eq!(s.push(&e_acute[..1]), "");
    assert_eq!(s.push(&e_acute[1..]), "é");
    // A 4-byte emoji split three ways.
    let crab = "🦀".as_bytes();
    assert_eq!(s.push(&crab[..1]), "");
    assert_eq!(s.push(&crab[1..3]), "");
    assert_eq!(s.push(&crab[3..]), "🦀");
    // A byte that can never start a character is shown escaped at once.
    assert_eq!(s.push(b"a\xffb"), "a\\xffb");
    // An unfinished character at the very end is shown escaped, not dropped.
    assert_eq!(s.push(&e_acute[..1]), "");
    assert_eq!(s.finish(), "\\xc3");
    assert_eq!(s.finish(), "");
}

#[test]
fn decode_rejects_unknown_ids() {
    let tok = Tokenizer::world().unwrap();
    assert!(tok.decode(&[65535]).is_err());
    assert!(tok.decode(&[u32::MAX]).is_err());
    assert_eq!(tok.decode(&[0]).unwrap(), b"", "id 0 is end of text");
}
