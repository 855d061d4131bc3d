#!/usr/bin/env bash
# The official `openai` Python client against `rwkv serve`: non-streamed and
# streamed chat and completions, log probabilities (chat's, streamed too, and
# a prompt scored with echo), with an API key. Installs the client into a
# test-only virtualenv (target/openai-venv); `cargo test` does not need it.
# Usage: scripts/openai_client_check.sh   (from the repository root, after `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openai-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'openai>=1.40'
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
log=$(mktemp)
target/release/rwkv serve --port 0 --api-key check-key 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
    grep -q 'listening on' "$log" && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
url=$(grep -o 'http://[0-9.:]*' "$log" | head -1)
"$venv/bin/python" - "$url/v1" <<'PY'
import sys
from openai import OpenAI, AuthenticationError

client = OpenAI(base_url=sys.argv[1], api_key="check-key")
model = client.models.list().data[0].id
assert model == "austen-rwkv7", model

msgs = [{"role": "user", "content": "Who is Mr. Darcy?"}]
chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
text = chat.choices[0].message.content
assert text and chat.usage.completion_tokens > 0, chat
parts = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, stream=True))
streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
assert streamed == text, (streamed, text)
assert parts[-1].choices[0].finish_reason in ("stop", "length")

prompt = "It is a truth universally acknowledged"
comp = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
assert comp.usage.completion_tokens == 12 and comp.choices[0].finish_reason == "length", comp
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

# Log probabilities, read through the client's own types.
chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                      logprobs=True, top_logprobs=3)
content = chat.choices[0].logprobs.content
assert len(content) == chat.usage.completion_tokens, chat
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode("utf-8", "replace") == t.token, t
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob, t
parts = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
streamed = [t for c in parts if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content], (streamed, content)
scored = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
lp = scored.choices[0].logprobs
assert scored.choices[0].text == prompt and "".join(lp.tokens) == prompt, scored
assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:]), lp
assert len(lp.top_logprobs) == len(lp.tokens) and lp.text_offset[0] == 0, lp

try:
    OpenAI(base_url=sys.argv[1], api_key="wrong").completions.create(model=model, prompt="x", max_tokens=1)
    raise SystemExit("a wrong key was accepted")
except AuthenticationError:
    pass
print(f"openai client OK: chat {text!r}; completion {comp.choices[0].text!r}; "
      f"prompt log likelihood {sum(lp.token_logprobs[1:]):.3f} over {len(lp.tokens)} tokens")
PY
