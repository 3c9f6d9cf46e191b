#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine with Rust: system packages, the project's
# Python venv and tools (grpcurl, gguf, pyarrow, buf, kubectl, promtool...), the test models, and a release build of every binary laid out in dist/llama-agent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# cmake + libclang: llama.cpp (llama-cpp-sys-2); curl: the download benchmark's peer.
APT_PACKAGES=(cmake libclang-dev curl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The venv (grpcurl, gguf, pyarrow, OTLP receiver...) and the deployment validators (buf,
# kubectl, kubernetes-validate, check-jsonschema, hadolint, promtool).
scripts/deploy-tools.sh >/dev/null
scripts/fetch-test-models.sh

# Release only: the dev profile would build llama.cpp a second time. dist.sh builds every binary
# and lays out dist/llama-agent/bin (binaries, llama.cpp's libraries and CPU modules), the
# relocatable folder the README, the main job, CI and the images run.
scripts/dist.sh >/dev/null
