#!/usr/bin/env bash
# The decoder-embedding benchmark (BENCHMARKS.md): a Qwen3-Embedding-0.6B-shaped GGUF (1024 x 28
# layers, 16/8 heads of 128, FFN 3072, last-token pooling, random seeded weights, Q8_0; the
# tokenizer of the synthetic test decoder: gemma-3's 262k vocabulary, so its LM head is larger
# than the real model's 152k one) embedded by `llama-cli embed` and by llama.cpp's
# `llama-server --embeddings --pooling last` with the same batches, in one run of bench-embed.
#
#   scripts/bench-decoder-embed.sh [bench-embed flags, e.g. --max-batch-tokens 1024]
#
# Needs scripts/setup.sh and scripts/build-llama-tools.sh (llama-quantize is built here if missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BIN="$ROOT/.bench/llama.cpp/build/bin"
OUT="$ROOT/.bench/models"
MODEL="$OUT/qwen3-emb-0.6b-Q8_0.gguf"
mkdir -p "$OUT"
[[ -x "$BIN/llama-server" ]] || { echo "run scripts/build-llama-tools.sh first" >&2; exit 1; }
if [[ ! -x "$BIN/llama-quantize" ]]; then
    cmake --build "$ROOT/.bench/llama.cpp/build" --config Release -j "${JOBS:-2}" --target llama-quantize >/dev/null
fi
if [[ ! -f "$MODEL" ]]; then
    "$ROOT/.venv/bin/python" "$ROOT/../shared/tools/synth_qwen3.py" \
        "$ROOT/models/synth-qwen3-embedding-F32.gguf" "$OUT/qwen3-emb-0.6b-f16.gguf" \
        --embd 1024 --layers 28 --ff 3072 --heads 16 --kv 8 --head-dim 128 --pooling last \
        --dtype f16 --seed 7 >/dev/null
    "$BIN/llama-quantize" "$OUT/qwen3-emb-0.6b-f16.gguf" "$MODEL.tmp" Q8_0 2 >/dev/null 2>&1
    mv "$MODEL.tmp" "$MODEL"
    rm -f "$OUT/qwen3-emb-0.6b-f16.gguf"
fi
cargo build --release --locked --workspace --bins >/dev/null
# Through cargo, which puts llama.cpp's libraries (in the build script's folder) on the path.
exec cargo run --release --locked --quiet -p llama-agent-tests --bin bench-embed -- \
    --model "$MODEL" --pooling last --counts 300 --batches 32 --rss-counts 300 "$@"
