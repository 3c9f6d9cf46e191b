#!/usr/bin/env bash
# How one `llama-cli embed` job splits over embedder replicas (BENCHMARKS.md): a loader and N
# embedders on loopback, each with T llama.cpp threads; one job of TEXTS texts over all of them
# (`--embedder-endpoint a,b,...`), then each replica's share (llama_agent_embedder_texts_total
# and gRPC calls, from its /metrics) and the job's time, next to the same job on one embedder
# with N x T threads. Each phase runs alone, so no two llama.cpp processes spin on the same core
# unless the replicas' threads add up to more than the cores.
#
#   scripts/bench-replicas.sh [TEXTS=20000] [N=2] [T=1] [MODEL=models/all-MiniLM-L6-v2-F32.gguf]
#
# Needs scripts/setup.sh (the dist binaries and the test models).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEXTS="${1:-20000}" N="${2:-2}" T="${3:-1}" MODEL="${4:-$ROOT/models/all-MiniLM-L6-v2-F32.gguf}"
BIN="$ROOT/dist/llama-agent/bin"
WORK="$(mktemp -d)"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$ROOT/.venv/bin/python" - "$TEXTS" > "$WORK/input.txt" <<'PY'
import random, sys
random.seed(1)
words = "river mountain cloud signal engine harbor lantern orbit meadow copper violet anchor".split()
for i in range(int(sys.argv[1])):
    print(f"{i}: " + " ".join(random.choice(words) for _ in range(random.randint(4, 40))))
PY

wait_up() { # PORT
    for _ in $(seq 300); do
        "$BIN/llama-health" --endpoint "http://127.0.0.1:$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "nothing serving on port $1" >&2
    exit 1
}

start() { # NAME ARGS...: a service in the background, its log in $WORK
    local name="$1"
    shift
    RUST_LOG=warn "$BIN/$name" "$@" >"$WORK/$name.$RANDOM.log" 2>&1 &
    PIDS+=($!)
}

texts_served() { # METRICS_PORT
    curl -sf "http://127.0.0.1:$1/metrics" |
        awk '/^llama_agent_embedder_texts_total / { t = $2 }
             /^llama_agent_grpc_requests_total\{.*EmbedStream/ { c += $2 }
             END { printf "%d texts in %d streams", t, c }'
}

# A phase: REPLICAS THREADS -> the job's seconds and each replica's share.
phase() {
    local replicas="$1" threads="$2" endpoints=() i
    start llama-loader --listen 127.0.0.1:59100 --cache-dir "$WORK/cache"
    wait_up 59100
    for ((i = 0; i < replicas; i++)); do
        start llama-embedder --listen "127.0.0.1:$((59110 + i))" --metrics-listen "127.0.0.1:$((59130 + i))" \
            --loader-endpoint http://127.0.0.1:59100 --threads "$threads" --preload "$MODEL"
        endpoints+=("http://127.0.0.1:$((59110 + i))")
    done
    for ((i = 0; i < replicas; i++)); do wait_up $((59110 + i)); done
    local list start end
    list="$(IFS=,; echo "${endpoints[*]}")"
    start="$(date +%s.%N)"
    "$BIN/llama-cli" embed --model "$MODEL" --input "$WORK/input.txt" --output "$WORK/out.parquet" \
        --embedder-endpoint "$list" --loader-endpoint http://127.0.0.1:59100 2>"$WORK/cli.log" ||
        { cat "$WORK/cli.log" >&2; exit 1; }
    end="$(date +%s.%N)"
    local secs
    secs="$(awk "BEGIN { print $end - $start }")"
    printf '%d replica(s) x %d thread(s): %d texts in %.2f s = %.0f texts/s\n' \
        "$replicas" "$threads" "$TEXTS" "$secs" "$(awk "BEGIN { print $TEXTS / $secs }")"
    for ((i = 0; i < replicas; i++)); do
        echo "  replica $i: $(texts_served $((59130 + i)))"
    done
    "$ROOT/.venv/bin/python" -c "import pyarrow.parquet as pq, sys; t = pq.read_table(sys.argv[1]); \
ids = t.column('id').to_pylist(); assert len(ids) == len(set(ids)) == int(sys.argv[2]), len(ids); \
print('  output:', len(ids), 'rows, each input row once')" "$WORK/out.parquet" "$TEXTS"
    kill "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    PIDS=()
    rm -rf "$WORK/cache" "$WORK/out.parquet"
    echo "$secs" >"$WORK/secs.$replicas"
}

phase "$N" "$T"
phase 1 "$((N * T))"
printf 'ratio (%d replicas / 1): %.2fx\n' "$N" "$(awk "BEGIN { print $(cat "$WORK/secs.1") / $(cat "$WORK/secs.$N") }")"
