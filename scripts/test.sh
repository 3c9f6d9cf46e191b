#!/usr/bin/env bash
# Set-up, then every check CI runs: formatting, clippy, the deployment validators, and the
# whole test suite (unit and integration tests on real models, real gRPC servers, a real hub mirror).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/setup.sh
cargo fmt --all --check
# --release shares the build scripts' output (llama.cpp) with the release build above.
cargo clippy --release --locked --workspace --all-targets -- -D warnings
# Contracts (buf lint/breaking), Dockerfile, compose, kustomize manifests, live /metrics.
scripts/validate-deploy.sh
# The Compose stack for real: images without a registry, health, calls, scale, pre-warm (skips, saying so, without a Docker engine).
scripts/compose-test.sh

export LLAMA_AGENT_MODELS_DIR="${LLAMA_AGENT_MODELS_DIR:-$ROOT/models}"
export GRPCURL="${GRPCURL:-$ROOT/.venv/bin/grpcurl}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
set -o pipefail
cargo test --release --locked --workspace 2>&1 | tee "$LOG"
# One closing line for the whole suite (cargo prints one per test binary, the last often 0).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$LOG"
