//! Chat messages into prompt text, the way each model was trained to read them.
//!
//! - RWKV (World and the demo model): `System: …\n\nUser: …\n\nAssistant: …\n\n`
//!   and a final `Assistant:`, as `rwkv chat` and BlinkDL's chat demos write
//!   it; a blank line ends a turn, so blank lines inside a message become
//!   single newlines and the reply stops at `\n\n`.
//! - A Hugging Face folder: the `chat_template` of its `tokenizer_config.json`
//!   (or `chat_template.jinja`), rendered with minijinja and Python's string
//!   methods (`minijinja-contrib`'s pycompat), with `add_generation_prompt`.
//!
//! The prompt comes back as pieces, one per message, tokenized one by one:
//! a piece's tokens never depend on what follows, so the tokens of a
//! conversation's first messages are the same in every later request, and a
//! state cached after them (the server's prefix cache) is a true prefix.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::openai::{Message, Role};

/// The reply ends at a blank line in RWKV's chat format.
pub const RWKV_TURN_END: &str = "\n\n";

#[derive(Debug, Clone)]
pub enum ChatFormat {
    /// `User: …\n\nAssistant:`.
    Rwkv,
    /// A Jinja chat template and the special-token strings it may use.
    Template { source: String, bos: String, eos: String },
    /// A Transformer folder without a chat template: chat is refused with
    /// this reason (completions still work).
    None(String),
}

impl ChatFormat {
    /// RWKV models use RWKV's format; a Transformer folder its template.
    pub fn for_model(is_transformer: bool, model_path: &Path) -> Result<Self> {
        if !is_transformer {
            return Ok(ChatFormat::Rwkv);
        }
        let dir = if model_path.is_dir() { model_path } else { model_path.parent().unwrap_or(Path::new(".")) };
        Self::from_folder(dir)
    }

    /// The template of a Hugging Face folder: `chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// named templates of which `default` is used).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::BadConfig { path: config_path.clone(), detail: format!("not JSON: {e}") })?,
            Err(_) => Value::Null,
        };
        let token = |name: &str| match config.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
            None => String::new(),
        };
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(s) => Some(s),
            Err(_) => match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            },
        };
        let Some(source) = source else {
            return Ok(ChatFormat::None(format!(
                "{} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); use /v1/completions",
                dir.display()
            )));
        };
        let format = ChatFormat::Template { source, bos: token("bos_token"), eos: token("eos_token") };
        // A template that does not compile is an error at start, not per request.
        format.environment()?;
        Ok(format)
    }

    /// Text at which a reply stops, beside the model's end tokens.
    pub fn stops(&self) -> Vec<String> {
        match self {
            ChatFormat::Rwkv => vec![RWKV_TURN_END.to_string()],
            _ => Vec::new(),
        }
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>> {
        let ChatFormat::Template { source, .. } = self else {
            return Err(Error::InvalidArgument("not a template".into()));
        };
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.clone())
            .map_err(|e| Error::InvalidArgument(format!("the chat template does not compile: {e}")))?;
        Ok(env)
    }

    /// The prompt as pieces: each is tokenized on its own and the tokens
    /// concatenated. RWKV: one piece per message and the final `Assistant:`.
    /// A template renders the whole conversation as one piece.
    pub fn render(&self, messages: &[Message]) -> Result<Vec<String>> {
        match self {
            ChatFormat::Rwkv => {
                let mut pieces: Vec<String> = messages
                    .iter()
                    .map(|m| {
                        let name = match m.role {
                            Role::System => "System",
                            Role::User => "User",
                            Role::Assistant => "Assistant",
                        };
                        format!("{name}: {}{RWKV_TURN_END}", one_turn(&m.content))
                    })
                    .collect();
                pieces.push("Assistant:".to_string());
                Ok(pieces)
            }
            ChatFormat::Template { bos, eos, .. } => {
                let env = self.environment()?;
                let msgs: Vec<Value> = messages
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
                    .collect();
                let ctx = minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                };
                let text = env
                    .get_template("chat")
                    .and_then(|t| t.render(ctx))
                    .map_err(|e| Error::InvalidArgument(format!("the chat template failed: {e}")))?;
                Ok(vec![text])
            }
            ChatFormat::None(why) => Err(Error::InvalidArgument(why.clone())),
        }
    }
}

/// A message as one RWKV turn: trimmed, CRLF as LF, blank lines collapsed
/// (a blank line would end the turn).
fn one_turn(content: &str) -> String {
    let mut s = content.trim().replace("\r\n", "\n");
    while s.contains("\n\n") {
        s = s.replace("\n\n", "\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> Message {
        Message { role, content: content.into() }
    }

    #[test]
    fn rwkv_format_one_piece_per_message() {
        let m = [msg(Role::System, "Be kind."), msg(Role::User, " Hi\n\n\nthere "), msg(Role::Assistant, "Hello.")];
        let p = ChatFormat::Rwkv.render(&m).unwrap();
        assert_eq!(p, ["System: Be kind.\n\n", "User: Hi\nthere\n\n", "Assistant: Hello.\n\n", "Assistant:"]);
    }

    #[test]
    fn template_renders_with_python_methods() {
        let source =
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].strip() }}{{ eos_token }}\
                      {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let f = ChatFormat::Template { source: source.into(), bos: "<s>".into(), eos: "</s>".into() };
        let p = f.render(&[msg(Role::User, " hi ")]).unwrap();
        assert_eq!(p, ["<s><|user|>hi</s><|assistant|>"]);
        let bad = ChatFormat::Template {
            source: "{{ raise_exception('no system role') }}".into(),
            bos: String::new(),
            eos: String::new(),
        };
        let e = bad.render(&[msg(Role::User, "x")]).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }
}
