#!/usr/bin/env bash
# Builds the release binaries and lays out one relocatable folder, as llama.cpp's releases and
# Ollama ship: dist/llama-agent/bin/ holds llama-cli, llama-loader, llama-generator,
# llama-embedder and llama-health, llama.cpp's shared libraries (the .so.0 names the binaries
# ask for) and every CPU variant module (libggml-cpu-<variant>.so), all found through $ORIGIN
# (.cargo/config.toml); at start the services load the best CPU module this machine can run,
# and any GPU module dropped beside them (libggml-cuda.so, see scripts/gpu/). Copy or move the
# folder anywhere. Prints the folder's path as its last line.
#
#   scripts/dist.sh [DEST]      (default dist/llama-agent)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST="${1:-$ROOT/dist/llama-agent}"
BINS=(llama-cli llama-loader llama-generator llama-embedder llama-health)

cargo build --release --locked --workspace --bins >&2
# llama-cpp-sys-2's install tree: the newest one holds this build's libraries.
OUT="$(ls -td target/release/build/llama-cpp-sys-2-*/out 2>/dev/null | while read -r d; do
    [[ -d "$d/backends" ]] && { echo "$d"; break; }; done)"
[[ -n "$OUT" ]] || { echo "dist: llama.cpp's build output (out/backends) not found" >&2; exit 1; }
LIBDIR="$OUT/lib"
[[ -d "$LIBDIR" ]] || LIBDIR="$OUT/lib64"

rm -rf "$DEST"
mkdir -p "$DEST/bin"
for b in "${BINS[@]}"; do
    # Line tables (the release profile keeps them for the tests' backtraces) would make the
    # folder ~370 MB; symbols stay, so a backtrace still names functions.
    objcopy --strip-debug "target/release/$b" "$DEST/bin/$b"
done
# -P keeps the soname links (libllama.so.0 -> libllama.so.0.0.N). libllama-common holds
# llama.cpp's JSON-schema-to-grammar converter and the grammar sampler's C++ wrappers.
for lib in libllama libllama-common libggml libggml-base; do
    cp -P "$LIBDIR/$lib".so* "$DEST/bin/"
done
cp "$OUT"/backends/libggml-*.so "$DEST/bin/"
echo "$DEST"
