#!/usr/bin/env bash
# Runs on the GPU machine (no network, no Rust), over what scripts/gpu/pack.sh put in
# .gpu-pack/. Work lands in .gpu-work/ and is reused by later phases on the same machine.
#
#   scripts/gpu/bench.sh build    unpack; build libggml-cuda.so and llama.cpp's own tools (the
#                                 peers) from the same source; drop the module beside our binaries
#   scripts/gpu/bench.sh models [NAME...]  write the synthetic models (gemma3-1b, gemma3-4b: Q4_K_M;
#                                 qwen3-emb: Qwen3-Embedding-0.6B shape, Q8_0; default all) and unpack MiniLM Q8_0
#   scripts/gpu/bench.sh smoke    llama-cli generate/embed on the GPU: devices, layers, exit codes
#   scripts/gpu/bench.sh generate decode, TTFT and 1/16/64 streams against llama-bench,
#                                 llama-server and llama-batched-bench
#   scripts/gpu/bench.sh prompt-cache  TTFT with the prompt cache (shared 1,500-token system
#                                 prompt, 10-turn chat) against llama-server's cache_prompt
#   scripts/gpu/bench.sh cpu      the same machine's CPU: 1 and 8 streams, GPU module left out
#   scripts/gpu/bench.sh embed    llama-cli embed of 100k texts (MiniLM, Qwen3-Embedding shape)
#                                 against llama-server --embeddings (PEER_N texts); MiniLM on
#                                 the CPU too (EMBED_CPU=0: not)
#   scripts/gpu/bench.sh embed-sweep  ours only, 100k texts, per SWEEP="model:flags;..." setting
#   scripts/gpu/bench.sh embed-profile  where an embedding run's time goes (PROFILE="model:flags;...")
#   scripts/gpu/bench.sh embed-nsys  the busiest GPU kernels of one embedding run (NSYS="model:flags")
#   scripts/gpu/bench.sh embed-kprof  the same from a CUPTI injection library, where nsys is missing
#   scripts/gpu/bench.sh module default|cublas  which CUDA module our binaries load (cublas:
#                                 GGML_CUDA_FORCE_CUBLAS, built on first use)
#   scripts/gpu/bench.sh all      every phase in order
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PACK="$ROOT/.gpu-pack"
W="$ROOT/.gpu-work"
BIN="$W/llama-agent/bin"
PEERS="$W/bc/bin"
M="$W/models"
JOBS="$(nproc)"
mkdir -p "$W" "$M"
export PYTHONPATH="$W/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
# A second or third run of a phase must not be timed against a half-warm page cache.
say() { printf '\n== %s\n' "$*"; }

build() {
    [[ -d "$W/llama-agent" ]] || tar -C "$W" -xJf "$PACK/dist.tar.xz"
    [[ -d "$W/llama.cpp" ]] || tar -C "$W" -xJf "$PACK/llama.cpp.tar.xz"
    if [[ ! -f "$PEERS/libggml-cuda.so" ]]; then
        say "building libggml-cuda.so and the peers (commit $(cat "$PACK/COMMIT"))"
        cmake -S "$W/llama.cpp" -B "$W/bc" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
            -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=ON \
            -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >/dev/null
        # The peers' CPU modules: the generations a GPU host has (ggml picks the best one);
        # not the AMX one, which ours leaves out too (it dies with SIGILL on that VM).
        local cpu=""
        for v in x64 haswell skylakex icelake zen4; do cpu+=" ggml-cpu-$v"; done
        cmake --build "$W/bc" -j "$JOBS" --target ggml-cuda $cpu llama-bench llama-server \
            llama-quantize llama-batched-bench
    fi
    cp "$PEERS/libggml-cuda.so" "$BIN/"
    ls -la "$BIN" | grep -E 'cuda|cpu-' | awk '{print $5, $9}'
}

# The CUDA module with GGML_CUDA_FORCE_CUBLAS: quantized weights are dequantized to F16 and
# multiplied by cuBLAS (Hopper's wgmma kernels) instead of llama.cpp's int8 MMQ kernels.
build_cublas() {
    local bc="$W/bc-cublas"
    if [[ ! -f "$bc/bin/libggml-cuda.so" ]]; then
        say "building libggml-cuda.so with GGML_CUDA_FORCE_CUBLAS=ON"
        cmake -S "$W/llama.cpp" -B "$bc" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
            -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=ON -DGGML_CUDA_FORCE_CUBLAS=ON \
            -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >/dev/null
        cmake --build "$bc" -j "$JOBS" --target ggml-cuda
    fi
}

# Which CUDA module sits beside our binaries: default (MMQ) or cublas.
module() {
    case "${1:?default|cublas}" in
        default) cp "$PEERS/libggml-cuda.so" "$BIN/" ;;
        cublas) build_cublas; cp "$W/bc-cublas/bin/libggml-cuda.so" "$BIN/" ;;
        *) echo "module: default or cublas" >&2; return 2 ;;
    esac
    echo "CUDA module: $1"
}

models() {  # [NAME...]: gemma3-1b gemma3-4b qwen3-emb (default: all); MiniLM always
    local want=" ${*:-gemma3-1b gemma3-4b qwen3-emb} "
    local tmpl="$W/gemma3-vocab.gguf"
    [[ -f "$tmpl" ]] || xz -dc "$PACK/gemma3-vocab.gguf.xz" > "$tmpl"
    [[ -f "$M/minilm-q8_0.gguf" ]] || xz -dc "$PACK/all-MiniLM-L6-v2-Q8_0.gguf.xz" > "$M/minilm-q8_0.gguf"
    synth() {  # NAME QUANT SCRIPT ARGS...
        local name=$1 quant=$2 script=$3; shift 3
        [[ "$want" == *" ${name%-*} "* || "$want" == *" $name "* ]] || return 0
        [[ -f "$M/$name-$quant.gguf" ]] && return
        python3 "$PACK/$script" "$tmpl" "$M/$name-f16.gguf" "$@" >/dev/null
        "$PEERS/llama-quantize" "$M/$name-f16.gguf" "$M/$name-$quant.gguf" "$quant" "$JOBS" >/dev/null 2>&1
        # The embedding model's F16 file stays: cuBLAS against MMQ on the same shape.
        [[ $name == qwen3-emb* ]] || rm -f "$M/$name-f16.gguf"
    }
    synth gemma3-1b Q4_K_M synth_gemma3.py --embd 1152 --layers 26 --ff 6912 --heads 4 --kv 1 --head-dim 256
    synth gemma3-4b Q4_K_M synth_gemma3.py --embd 2560 --layers 34 --ff 10240 --heads 8 --kv 4 --head-dim 256
    synth qwen3-emb-0.6b Q8_0 synth_qwen3.py --embd 1024 --layers 28 --ff 3072 --heads 16 --kv 8 \
        --head-dim 128 --pooling last
    ls -la "$M"
}

# Short texts, one per line, the same every run.
texts() {
    python3 - "$1" "$2" <<'PY'
import sys
n, out = int(sys.argv[1]), sys.argv[2]
words = "the model reads a short sentence about cats and dogs while rain falls on quiet streets of old towns".split()
with open(out, "w") as f:
    for i in range(n):
        k = 10 + i % 8
        f.write(" ".join(words[(i + j * 7) % len(words)] for j in range(k)) + f" {i}\n")
PY
}

smoke() {
    say "llama-cli generate on the GPU (RUST_LOG=info: backends and model load lines)"
    local rc=0
    RUST_LOG=info "$BIN/llama-cli" generate --model "$M/gemma3-1b-Q4_K_M.gguf" --prompt "Hello there" \
        --max-tokens 32 --temperature 0 --json 2>"$W/smoke-gen.err" >"$W/smoke-gen.json" || rc=$?
    grep -E 'backends loaded|model loaded|engine stopped' "$W/smoke-gen.err" || true
    echo "exit code: $rc"; tail -c 600 "$W/smoke-gen.json"; echo
    texts 1000 "$W/t1k.txt"
    rc=0
    RUST_LOG=info "$BIN/llama-cli" embed --model "$M/minilm-q8_0.gguf" --input "$W/t1k.txt" \
        --output "$W/t1k.parquet" 2>"$W/smoke-emb.err" || rc=$?
    grep -E 'backends loaded|model loaded|engine stopped' "$W/smoke-emb.err" || true
    echo "exit code: $rc"
    grep -iE 'error|abort' "$W/smoke-gen.err" "$W/smoke-emb.err" | head -5 || true
}

generate() {
    for model in gemma3-1b gemma3-4b; do
        local streams=1,16,64
        [[ $model == gemma3-4b ]] && streams=1
        # One CPU thread on both sides: ours by default when the GPU holds every layer.
        say "$model: llama-agent vs llama-bench / llama-server (GPU, all layers, 1 CPU thread)"
        "$BIN/bench-generate" --model "$M/$model-Q4_K_M.gguf" --llama-bin "$PEERS" --ngl 99 \
            --threads 1 --tokens 128 --streams "$streams" --ctx-size 1024
    done
    say "llama-batched-bench (decode ceiling; 1B, 16-token prompts, 128 generated)"
    "$PEERS/llama-batched-bench" -m "$M/gemma3-1b-Q4_K_M.gguf" -ngl 99 -c 65536 -b 2048 -ub 512 \
        -npp 16 -ntg 128 -npl 1,16,64 2>/dev/null | grep -E '^\|' || true
}

prompt_cache() {
    say "prompt cache: gemma3-1b, all layers on the GPU, 1 CPU thread, 4 sequences on both sides"
    "$BIN/bench-prompt-cache" --model "$M/gemma3-1b-Q4_K_M.gguf" --llama-bin "$PEERS" --ngl 99 \
        --threads 1 --parallel 4 --rounds 3
}

cpu() {
    say "CPU side on $(nproc) cores (GGML_CUDA=0 for ours, -ngl 0 for the peers)"
    GGML_CUDA=0 "$BIN/bench-generate" --model "$M/gemma3-1b-Q4_K_M.gguf" --llama-bin "$PEERS" \
        --ngl 0 --threads "$JOBS" --tokens 64 --streams 1,8 --ctx-size 1024
}

embed() {
    texts 100000 "$W/t100k.txt"
    for model in minilm-q8_0 qwen3-emb-0.6b-Q8_0; do
        say "llama-cli embed, 100k texts, $model"
        rm -f "$W/out.parquet"
        local t0 t1 rc=0
        t0=$(date +%s.%N)
        "$BIN/llama-cli" embed --model "$M/$model.gguf" --input "$W/t100k.txt" \
            --output "$W/out.parquet" --batch-size 256 2>"$W/embed-$model.err" || rc=$?
        t1=$(date +%s.%N)
        python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'{s:.1f} s wall, {100000/s:,.0f} texts/s, exit {sys.argv[3]}')" "$t0" "$t1" "$rc"
        # The peer on the first 20k (MiniLM) or 10k texts: at its speed all 100k take minutes.
        local n=20000 pool=()
        [[ $model == qwen3* ]] && n=10000 pool=(--pooling last)
        n=${PEER_N:-$n}
        say "peer: llama-server --embeddings, $n texts, batches of 256, 4 in flight"
        "$PEERS/llama-server" -m "$M/$model.gguf" --embeddings "${pool[@]}" -ngl 99 -np 8 -c 8192 \
            -b 2048 -ub 2048 --port 18181 >"$W/peer-$model.log" 2>&1 &
        local pid=$!
        for _ in $(seq 240); do curl -sf localhost:18181/health >/dev/null 2>&1 && break; sleep 0.5; done
        python3 "$ROOT/scripts/gpu/peer_embed.py" 18181 "$W/t100k.txt" "$n" 256 4
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
    [[ ${EMBED_CPU:-1} == 1 ]] || return 0
    say "CPU (GGML_CUDA=0; the peer with no visible GPU), 20k texts, MiniLM"
    head -n 20000 "$W/t100k.txt" > "$W/t20k.txt"
    local t0 t1
    t0=$(date +%s.%N)
    GGML_CUDA=0 "$BIN/llama-cli" embed --model "$M/minilm-q8_0.gguf" --input "$W/t20k.txt" \
        --output "$W/out.parquet" --batch-size 256 2>/dev/null
    t1=$(date +%s.%N)
    python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'{s:.1f} s wall, {20000/s:,.0f} texts/s')" "$t0" "$t1"
    CUDA_VISIBLE_DEVICES= "$PEERS/llama-server" -m "$M/minilm-q8_0.gguf" --embeddings -ngl 0 -np 8 \
        -c 8192 -b 2048 -ub 2048 -t "$JOBS" --port 18181 >"$W/peer-cpu.log" 2>&1 &
    local pid=$!
    for _ in $(seq 240); do curl -sf localhost:18181/health >/dev/null 2>&1 && break; sleep 0.5; done
    python3 "$ROOT/scripts/gpu/peer_embed.py" 18181 "$W/t20k.txt" 20000 256 4
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

# Ours only, 100k texts, one run per setting: SWEEP="model:flags;..." (flags space-separated),
# e.g. SWEEP="minilm-q8_0:--contexts 4;minilm-q8_0:--contexts 8". Where the time goes, without
# the peers' minutes.
embed_sweep() {
    [[ -f "$W/t100k.txt" ]] || texts 100000 "$W/t100k.txt"
    local item model flags t0 t1 rc
    IFS=';' read -ra items <<< "${SWEEP:?SWEEP=model:flags;...}"
    for item in "${items[@]}"; do
        model=${item%%:*} flags=${item#*:}
        rm -f "$W/out.parquet"
        rc=0
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        "$BIN/llama-cli" embed --model "$M/$model.gguf" --input "$W/t100k.txt" \
            --output "$W/out.parquet" --batch-size 256 $flags 2>"$W/sweep.err" || rc=$?
        t1=$(date +%s.%N)
        python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'{sys.argv[4]} [{sys.argv[5]}]: {s:.1f} s wall, {100000/s:,.0f} texts/s, exit {sys.argv[3]}')" \
            "$t0" "$t1" "$rc" "$model" "$flags"
        ((rc == 0)) || tail -n 5 "$W/sweep.err"
    done
}

# One run per model (and SWEEP-style flags in PROFILE="model:flags;..."), with the engine's
# per-batch debug lines summarised by embed_profile.py and the GPU's utilisation sampled.
embed_profile() {
    [[ -f "$W/t100k.txt" ]] || texts 100000 "$W/t100k.txt"
    local item model flags t0 t1
    IFS=';' read -ra items <<< "${PROFILE:-minilm-q8_0:;qwen3-emb-0.6b-Q8_0:}"
    for item in "${items[@]}"; do
        model=${item%%:*} flags=${item#*:}
        say "profile: $model [$flags]"
        rm -f "$W/out.parquet"
        nvidia-smi dmon -s u -d 1 > "$W/dmon.txt" 2>&1 &
        local dmon=$!
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        RUST_LOG=info,llama_agent_engine=debug "$BIN/llama-cli" --log-format json embed \
            --model "$M/$model.gguf" --input "$W/t100k.txt" --output "$W/out.parquet" \
            --batch-size 256 $flags 2>"$W/profile.log" || tail -n 3 "$W/profile.log"
        t1=$(date +%s.%N)
        kill "$dmon"; wait "$dmon" 2>/dev/null || true
        python3 "$ROOT/scripts/gpu/embed_profile.py" "$W/profile.log" "$t0" "$t1"
        # SM utilisation (%) per second while it ran.
        awk '$1 ~ /^[0-9]+$/ {printf "%s ", $2} END {print ""}' "$W/dmon.txt" | sed 's/^/  sm% /'
    done
}

# Which kernels the GPU's time goes to (Nsight Systems, where the machine has it), on the first
# NSYS_N texts (default 10k) of one NSYS="model:flags" run: the busiest kernels, and how busy
# the GPU was against the run's wall time.
embed_nsys() {
    local nsys
    nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/*/bin/nsys 2>/dev/null | head -n 1) ||
        true
    [[ -n "$nsys" ]] || { echo "nsys: not on this machine"; return 0; }
    [[ -f "$W/t100k.txt" ]] || texts 100000 "$W/t100k.txt"
    local spec="${NSYS:-qwen3-emb-0.6b-Q8_0:}" n="${NSYS_N:-10000}"
    local model=${spec%%:*} flags=${spec#*:}
    head -n "$n" "$W/t100k.txt" > "$W/tn.txt"
    say "nsys: $model [$flags], $n texts"
    rm -f "$W/out.parquet" "$W/nsys".*
    # shellcheck disable=SC2086
    "$nsys" profile --trace=cuda --sample=none --cpuctxsw=none -o "$W/nsys" \
        "$BIN/llama-cli" embed --model "$M/$model.gguf" --input "$W/tn.txt" \
        --output "$W/out.parquet" --batch-size 256 $flags >/dev/null 2>"$W/nsys.err" || tail -n 3 "$W/nsys.err"
    "$nsys" stats --report cuda_gpu_kern_sum --format csv "$W/nsys.nsys-rep" 2>/dev/null |
        python3 -c "
import csv, sys
rows = [r for r in csv.DictReader(l for l in sys.stdin if l.count(',') > 3)]
total = sum(float(r['Total Time (ns)']) for r in rows)
print(f'kernels: {total/1e9:.2f} s in {sum(int(r[\"Instances\"]) for r in rows):,} launches')
for r in rows[:14]:
    t = float(r['Total Time (ns)'])
    print(f'  {100*t/total:5.1f}%  {t/1e9:6.2f} s  {int(r[\"Instances\"]):>8,}  {r[\"Name\"][:110]}')
"
}

# The busiest kernels of one run per PROFILE="model:flags;..." item, from a CUPTI injection
# library (scripts/gpu/kernel_profile.c): what the GPU's time goes to, where nsys is missing.
embed_kprof() {
    [[ -f "$W/t100k.txt" ]] || texts 100000 "$W/t100k.txt"
    local cuda inc lib krec
    cuda=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    inc=$(dirname "$(find "$cuda" /usr/include -name cupti.h 2>/dev/null | head -n 1)")
    lib=$(dirname "$(find "$cuda" /usr/lib -name 'libcupti.so*' 2>/dev/null | head -n 1)")
    krec=$(grep -oE 'CUpti_ActivityKernel[0-9]+' "$inc/cupti_activity.h" | sort -u -V | tail -n 1)
    gcc -O2 -shared -fPIC -DKREC="$krec" -I "$inc" "$ROOT/scripts/gpu/kernel_profile.c" \
        -L "$lib" -Wl,-rpath,"$lib" -lcupti -o "$W/kprof.so"
    local item model flags n="${KPROF_N:-100000}"
    head -n "$n" "$W/t100k.txt" > "$W/tk.txt"
    IFS=';' read -ra items <<< "${PROFILE:-qwen3-emb-0.6b-Q8_0:}"
    for item in "${items[@]}"; do
        model=${item%%:*} flags=${item#*:}
        say "kernels: $model [$flags], $n texts"
        rm -f "$W/out.parquet" "$W/kprof.txt"
        # shellcheck disable=SC2086
        CUDA_INJECTION64_PATH="$W/kprof.so" KPROF_OUT="$W/kprof.txt" "$BIN/llama-cli" embed \
            --model "$M/$model.gguf" --input "$W/tk.txt" --output "$W/out.parquet" \
            --batch-size 256 $flags >/dev/null 2>"$W/kprof.err" || tail -n 3 "$W/kprof.err"
        cat "$W/kprof.txt" 2>/dev/null || echo "no profile written"
    done
}

case "${1:-all}" in
    build) build ;;
    module) shift; module "$@" ;;
    embed-kprof) embed_kprof ;;
    models) shift; models "$@" ;;
    smoke) smoke ;;
    generate) generate ;;
    prompt-cache) prompt_cache ;;
    cpu) cpu ;;
    embed) embed ;;
    embed-sweep) embed_sweep ;;
    embed-profile) embed_profile ;;
    embed-nsys) embed_nsys ;;
    all) build; models; smoke; generate; prompt_cache; cpu; embed ;;
    *) echo "usage: $0 build|module default|cublas|models [NAME...]|smoke|generate|prompt-cache|cpu|embed|embed-sweep|embed-profile|embed-nsys|embed-kprof|all" >&2; exit 2 ;;
esac
