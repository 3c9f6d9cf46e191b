#!/usr/bin/env bash
# Set-up, then the main job on this machine (no internet hub here): a local hub mirror serves
# the test models, a llama-loader service pulls them through its real download path into the
# cache (LLAMA_CACHE_DIR, default ~/.cache/llama-loader), and llama-cli and grpcurl talk to it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh

BIN="$ROOT/dist/llama-agent/bin"      # scripts/dist.sh, run by setup.sh
MIRROR="$ROOT/target/release/hub-mirror"   # a test tool: the local hub here (no internet)
MODELS="${LLAMA_AGENT_MODELS_DIR:-$ROOT/models}"
WORK="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# Waits for a line matching $2 in file $1 and prints it.
wait_for() {
    for _ in $(seq 100); do
        if grep -m1 -E "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

"$MIRROR" \
    --repo "llama-agent-test/gemma-3-270m-GGUF=$MODELS/gemma-3-270m-Q4_K_M.gguf" \
    --repo "llama-agent-test/all-MiniLM-L6-v2-GGUF=$MODELS/all-MiniLM-L6-v2-F16.gguf" \
    >"$WORK/mirror.out" 2>"$WORK/mirror.err" &
export HF_ENDPOINT="$(wait_for "$WORK/mirror.out" '^listening on ' | sed 's/^listening on //')"
echo "hub mirror: $HF_ENDPOINT"

"$BIN/llama-loader" --listen 127.0.0.1:0 --log-format json 2>"$WORK/loader.log" &
ADDR="$(wait_for "$WORK/loader.log" '"loader serving"' | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
export LLAMA_LOADER_ENDPOINT="$ADDR"
echo "llama-loader: $ADDR"
"$ROOT/.venv/bin/grpcurl" -plaintext "$ADDR" list

for m in llama-agent-test/gemma-3-270m-GGUF llama-agent-test/all-MiniLM-L6-v2-GGUF:F16; do
    echo "== llama-cli pull $m"
    time "$BIN/llama-cli" pull "$m"
done
echo "== llama-cli pull again (cache hit)"
"$BIN/llama-cli" pull llama-agent-test/gemma-3-270m-GGUF
"$BIN/llama-cli" cache ls
"$BIN/llama-cli" cache status
"$BIN/llama-cli" cache verify llama-agent-test/gemma-3-270m-GGUF

# Generation: a llama-generator service leasing the model from the loader, streaming tokens.
"$BIN/llama-generator" --listen 127.0.0.1:0 --log-format json --threads "$(nproc)" 2>"$WORK/generator.log" &
GEN_ADDR="$(wait_for "$WORK/generator.log" '"generator serving"' | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
echo "llama-generator: $GEN_ADDR"
echo "== llama-cli generate (streamed from the service)"
"$BIN/llama-cli" generate --generator-endpoint "$GEN_ADDR" --model llama-agent-test/gemma-3-270m-GGUF \
    --prompt "The three most important inventions in history are" --max-tokens 64 --temperature 0.7 --seed 7
echo "== the loader now shows the generator's lease"
"$BIN/llama-cli" cache ls

# Embedding: the seed's job at test scale, in-process embedder leasing from the loader service.
seq 1 1000 | sed 's/^/Test sentence number /' > "$WORK/test_1k.txt"
echo "== llama-cli embed 1000 texts into Parquet"
time "$BIN/llama-cli" embed --model llama-agent-test/all-MiniLM-L6-v2-GGUF:F16 \
    --input "$WORK/test_1k.txt" --output "$WORK/test_1k.parquet" --batch-size 64 --max-length 512 --threads "$(nproc)"
"$ROOT/.venv/bin/python" - "$WORK/test_1k.parquet" <<'PY'
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(f"{t.num_rows} rows, schema: {t.schema.names}, dim {len(t.column('embedding')[0])}")
PY
