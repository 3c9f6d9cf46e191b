#!/usr/bin/env bash
# Static checks of the contracts and the deployment files, plus a live scrape of each
# service's /metrics. One line per check; a failing check prints its tool's output, the other
# checks still run, and the script exits 1 at the end.
#
#   buf lint / buf breaking      proto/ (against the branch main, else HEAD)
#   kubectl kustomize            deploy/k8s and every deploy/overlays/*/ (rwo, rwo-hostpath),
#                                each validated by kubernetes-validate --strict
#   check-jsonschema             docker-compose*.yml against the compose specification
#   hadolint                     every Dockerfile
#   deploy invariants            scripts/deploy-invariants.py on the base and every overlay
#                                (single writer, read-only mounts, node-local model caches...)
#   promtool check metrics       a live scrape of dist/llama-agent/bin/llama-{loader,generator,embedder}
#                                (skipped only for a binary that is not built)
#   deploy/k8s/examples          parse, and query only metrics the live generator exports
#
# Tools: scripts/deploy-tools.sh (idempotent). Env: K8S_VERSIONS (space-separated, the oldest
# and the newest Kubernetes the manifests must validate against), START_TIMEOUT (seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BIN="$(scripts/deploy-tools.sh)"
export PATH="$BIN:$PATH"
K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.37.0}"
START_TIMEOUT="${START_TIMEOUT:-60}"

WORK="$(mktemp -d)"
PIDS=()
# Stops the services this script started (by pid; the loader last, its clients first), with
# SIGKILL for any still there after 10 s of graceful shutdown.
cleanup() {
    local i pid deadline=$((SECONDS + 10))
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

failed=0
# check NAME FUNCTION [ARGS...]: runs FUNCTION with its output captured; one line either way.
check() {
    local name="$1"
    shift
    local log="$WORK/check.log"
    if "$@" >"$log" 2>&1; then
        echo "ok    $name"
    else
        echo "FAIL  $name"
        sed 's/^/      /' "$log"
        failed=1
    fi
}
skip() { echo "skip  $1"; }

# ---------------------------------------------------------------------------------------------
# Contracts

buf_lint() { buf lint proto; }

# The branch main when this clone has it (locally or as origin/main), else HEAD: then only the
# working tree's uncommitted changes are compared, which the check line says.
BREAKING_AGAINST="main"
if git rev-parse -q --verify refs/heads/main >/dev/null; then
    BREAKING_REF="branch=main"
elif git rev-parse -q --verify refs/remotes/origin/main >/dev/null; then
    BREAKING_REF="ref=refs/remotes/origin/main"
    BREAKING_AGAINST="origin/main"
else
    BREAKING_REF="ref=HEAD"
    BREAKING_AGAINST="HEAD (no branch main in this clone)"
fi
buf_breaking() { buf breaking proto --against ".git#${BREAKING_REF},subdir=proto"; }

check "buf lint proto (STANDARD rules)" buf_lint
check "buf breaking proto against $BREAKING_AGAINST" buf_breaking

# ---------------------------------------------------------------------------------------------
# Kubernetes

# (Functions run by `check` sit in an if-condition, where errexit is off: each step says
# `|| return 1` itself.)
# k8s_validate DIR OUT: renders the kustomization DIR into OUT and validates it.
k8s_validate() {
    local dir="$1" out="$2"
    kubectl kustomize "$dir" >"$out" || { rm -f "$out"; return 1; }
    local v args=()
    for v in $K8S_VERSIONS; do
        args+=(-k "$v")
    done
    kubernetes-validate --strict --quiet "${args[@]}" "$out" >"$WORK/kv.out" 2>&1
    local rc=$?
    cat "$WORK/kv.out"
    # An unknown kind or apiVersion is only a WARN (exit 0) to kubernetes-validate: fail on it.
    ((rc == 0)) && ! grep -q . "$WORK/kv.out"
}
check "kubectl kustomize deploy/k8s | kubernetes-validate --strict (k8s ${K8S_VERSIONS// /, })" \
    k8s_validate deploy/k8s "$WORK/k8s.yaml"

# The overlays in the repository (deploy/overlays/NAME/, beside the base: kustomize refuses an
# overlay inside its base), each rendered to k8s-NAME.yaml for the invariants.
mapfile -t OVERLAYS < <(git ls-files --cached --others --exclude-standard -- 'deploy/overlays/*/kustomization.yaml' \
    | xargs -r -n1 dirname | sort -u)
RENDERED=()
for dir in "${OVERLAYS[@]}"; do
    out="$WORK/k8s-$(basename "$dir").yaml"
    check "kubectl kustomize $dir | kubernetes-validate --strict (k8s ${K8S_VERSIONS// /, })" \
        k8s_validate "$dir" "$out"
    RENDERED+=("$out")
done

# ---------------------------------------------------------------------------------------------
# Compose, Dockerfiles, cross-file invariants

COMPOSE_FILES=(docker-compose*.yml)
compose_schema() { check-jsonschema --builtin-schema vendor.compose-spec "${COMPOSE_FILES[@]}"; }
check "check-jsonschema compose-spec ${COMPOSE_FILES[*]}" compose_schema

mapfile -t DOCKERFILES < <(git ls-files --cached --others --exclude-standard \
    | grep -E '(^|/)([^/]*\.)?Dockerfile(\.[^/]*)?$' | sort)
if ((${#DOCKERFILES[@]})); then
    lint_dockerfiles() { hadolint --no-color --failure-threshold style "${DOCKERFILES[@]}"; }
    check "hadolint ${DOCKERFILES[*]}" lint_dockerfiles
else
    echo "FAIL  hadolint: no Dockerfile in the repository"
    failed=1
fi

invariants() {
    local args=() f
    for f in "$WORK/k8s.yaml" "${RENDERED[@]}"; do
        args+=(--k8s "$f")
    done
    "$BIN/python" scripts/deploy-invariants.py "${args[@]}" --compose docker-compose.yml
}
unrendered=()
for f in "$WORK/k8s.yaml" "${RENDERED[@]}"; do
    [[ -s "$f" ]] || unrendered+=("$(basename "$f" .yaml)")
done
if ((${#unrendered[@]} == 0)); then
    check "deploy invariants (scripts/deploy-invariants.py: deploy/k8s${OVERLAYS[*]:+ ${OVERLAYS[*]}})" invariants
else
    echo "FAIL  deploy invariants: not rendered: ${unrendered[*]} (see the kustomize checks)"
    failed=1
fi

# ---------------------------------------------------------------------------------------------
# Live /metrics scrapes, linted by promtool.

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_serving NAME LOG PID: the `<name> serving` log line's address, within START_TIMEOUT.
wait_serving() {
    local name="$1" log="$2" pid="$3" deadline=$((SECONDS + START_TIMEOUT)) line
    while ((SECONDS < deadline)); do
        line="$(grep -m1 "\"$name serving\"" "$log" 2>/dev/null || true)"
        if [[ -n "$line" ]]; then
            sed -E 's/.*"addr": *"([^"]+)".*/\1/' <<<"$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { echo "$name exited before serving:" >&2; cat "$log" >&2; return 1; }
        sleep 0.1
    done
    echo "$name not serving after ${START_TIMEOUT}s:" >&2
    cat "$log" >&2
    return 1
}

# scrape URL PID LOG: the first answer of URL (polled within START_TIMEOUT) into $WORK/scrape.
scrape() {
    local url="$1" pid="$2" log="$3" deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if curl -sf --max-time 5 "$url" -o "$WORK/scrape"; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { echo "the service exited:" >&2; cat "$log" >&2; return 1; }
        sleep 0.1
    done
    echo "no answer from $url after ${START_TIMEOUT}s:" >&2
    cat "$log" >&2
    return 1
}

# The relocatable folder users run (scripts/dist.sh).
DIST_BIN="${LLAMA_AGENT_DIST:-dist/llama-agent}/bin"

# promtool_service NAME [ARGS...]: starts $DIST_BIN/llama-NAME on ephemeral ports with
# ARGS, scrapes /metrics, lints it. Leaves LOADER_ADDR set when NAME is loader.
LOADER_ADDR=""
promtool_service() {
    local name="$1"
    shift
    local exe="$DIST_BIN/llama-$name" log="$WORK/$name.log" port pid help
    # Not `--help | grep -q`: grep leaving early fails the pipe under pipefail.
    help="$("$exe" --help 2>&1)" || true
    if ! grep -q -- '--metrics-listen' <<<"$help"; then
        echo "$exe has no --metrics-listen flag: rebuild it (scripts/dist.sh) or add the flag"
        return 1
    fi
    if [[ "$name" != loader && -z "$LOADER_ADDR" ]]; then
        echo "needs a running llama-loader, and the loader's check failed"
        return 1
    fi
    port="$(free_port)"
    # No preloads, token or TLS from the caller's environment: a bare service, ready at once.
    env -u LLAMA_GENERATOR_PRELOAD -u LLAMA_EMBEDDER_PRELOAD -u LLAMA_AGENT_TOKEN \
        -u LLAMA_AGENT_TOKEN_FILE -u LLAMA_AGENT_TLS_CERT -u LLAMA_AGENT_TLS_KEY \
        -u LLAMA_AGENT_TLS_CLIENT_CA -u LLAMA_AGENT_METRICS_LISTEN RUST_LOG=info \
        "$exe" --listen 127.0.0.1:0 --log-format json \
        --metrics-listen "127.0.0.1:$port" "$@" >"$WORK/$name.stdout" 2>"$log" &
    pid=$!
    PIDS+=("$pid")
    local addr
    addr="$(wait_serving "$name" "$log" "$pid")" || return 1
    [[ "$name" != loader ]] || LOADER_ADDR="$addr"
    scrape "http://127.0.0.1:$port/metrics" "$pid" "$log" || return 1
    grep -q '^# TYPE ' "$WORK/scrape" || { echo "empty scrape:"; cat "$WORK/scrape"; return 1; }
    cp "$WORK/scrape" "$WORK/$name.metrics"
    promtool check metrics <"$WORK/scrape"
}

# The autoscaling and routing examples (deploy/k8s/examples) parse, and every llama_agent_*
# metric they query is one a freshly started generator exports (before any model loads).
examples_metrics() {
    local f name missing=0
    [[ -s "$WORK/generator.metrics" ]] || { echo "no generator scrape (see its promtool check)"; return 1; }
    for f in deploy/k8s/examples/*.yaml; do
        "$BIN/python" -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$f" || return 1
    done
    for name in $(grep -ohE 'llama_agent_[a-z_]+' deploy/k8s/examples/*.yaml | sort -u); do
        if ! grep -qE "^$name(\{| )" "$WORK/generator.metrics"; then
            echo "$name (deploy/k8s/examples) is not in the generator's /metrics"
            missing=1
        fi
    done
    return "$missing"
}

if [[ ! -x "$DIST_BIN/llama-loader" ]]; then
    skip "promtool check metrics: $DIST_BIN/llama-loader not built (scripts/dist.sh)"
else
    mkdir -p "$WORK/cache"
    check "promtool check metrics <- llama-loader /metrics" \
        promtool_service loader --cache-dir "$WORK/cache"
    for svc in generator embedder; do
        if [[ ! -x "$DIST_BIN/llama-$svc" ]]; then
            skip "promtool check metrics: $DIST_BIN/llama-$svc not built"
        else
            check "promtool check metrics <- llama-$svc /metrics" \
                promtool_service "$svc" --loader-endpoint "http://$LOADER_ADDR"
        fi
    done
    check "deploy/k8s/examples parse and query metrics the generator exports" examples_metrics
fi

exit "$failed"
