#!/usr/bin/env bash
# Create (or refresh) the repo-local Python venv at <repo>/.venv with the pinned
# packages from scripts/requirements.txt. Idempotent: pip only runs when the
# requirements file changed since the last successful install (hash stamp).
# Prints the venv path on stdout; pip chatter goes to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQ="$ROOT/scripts/requirements.txt"
STAMP="$VENV/.requirements.sha256"

# Recreate the venv if it is missing or its interpreter no longer runs
# (e.g. the base python3 it was made from was removed or upgraded).
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    "${PYTHON:-python3}" -m venv --clear "$VENV"
fi

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2
    # Written only after pip succeeded, so a failed install is retried next time.
    echo "$want" > "$STAMP"
fi

echo "$VENV"
