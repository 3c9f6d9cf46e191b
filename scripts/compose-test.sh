#!/usr/bin/env bash
# The Compose stack for real: images built without a registry (scripts/images-local.sh), then
# docker-compose.yml (with the test override deploy/docker/compose.test.yml) brought up and
# used through its published ports and its network. One line per check; the first failing check
# prints its output and the tail of the stack's logs, and the script exits 1. Everything it
# started (the stack, its volume, the hub mirror, the relay) goes on exit, even on failure.
#
#   images        base (debootstrap, if not imported yet) + loader, generator, embedder images
#   healthy       loader, then generator and embedder (their preloads pulled through the loader
#                 from the hub mirror) report healthy; published ports on 127.0.0.1 only
#   pull/generate/embed   dist/llama-agent/bin/llama-cli on the host, through the published ports
#   single writer the volume's files are uid 10001's; the loader mounts it read-write, and a
#                 write from the generator or the embedder fails (read-only mount)
#   restart       the generator's process killed: restarted by the policy, serving again
#   scale         --scale embedder=2; one `llama-cli embed` job from a container on the compose
#                 network (http://embedder:50053: Compose's DNS, both replicas) spreads over both
#                 (their /metrics), one replica is killed mid-job, and every row is in the
#                 Parquet output exactly once, in input order
#   pre-warmed    a loader image built with the models in /models at build time (from the mirror,
#                 build on the host network) serves a pull with no hub reachable
#
# No Docker engine (`docker info` fails): says so and exits 0 with a SKIP line, no check run.
# Env: LLAMA_AGENT_DIST (dist/llama-agent), LLAMA_AGENT_MODELS_DIR (models), HUB_MIRROR
# (target/release/hub-mirror), START_TIMEOUT (seconds per wait, 300), EMBED_ROWS (480: MiniLM
# embeds 30-60 texts/s on 2 busy cores, and the job must outlast the replica's kill).
set -euo pipefail
shopt -s inherit_errexit
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! docker_info="$(docker info 2>&1)"; then
    echo "SKIP  compose test: no Docker engine here (docker info failed); the stack was NOT tested:"
    { grep -iE 'error|cannot|denied' <<<"$docker_info" || tail -n 3 <<<"$docker_info"; } \
        | head -n 3 | sed 's/^/      /'
    exit 0
fi

DIST="${LLAMA_AGENT_DIST:-$ROOT/dist/llama-agent}"
export LLAMA_AGENT_DIST="$DIST"
MODELS="${LLAMA_AGENT_MODELS_DIR:-$ROOT/models}"
HUB_MIRROR="${HUB_MIRROR:-$ROOT/target/release/hub-mirror}"
PY="$ROOT/.venv/bin/python"
CLI="$DIST/bin/llama-cli"
START_TIMEOUT="${START_TIMEOUT:-300}"
EMBED_ROWS="${EMBED_ROWS:-480}"
REGISTRY="${LLAMA_AGENT_REGISTRY:-llama-agent}"
VERSION="${LLAMA_AGENT_VERSION:-0.1.0}"
PROJECT=llama-agent-ctest
GEMMA=unsloth/gemma-3-270m-it-GGUF:Q4_K_M
MINILM=second-state/All-MiniLM-L6-v2-Embedding-GGUF
export LLAMA_GENERATOR_PRELOAD="$GEMMA" LLAMA_EMBEDDER_PRELOAD="$MINILM"
# The caller's settings stay out of the test stack.
unset LLAMA_AGENT_TOKEN HF_TOKEN OTEL_EXPORTER_OTLP_ENDPOINT LLAMA_LOADER_ENDPOINT \
    LLAMA_GENERATOR_ENDPOINT LLAMA_EMBEDDER_ENDPOINT

# Compose v2 when the engine has it, else Debian's docker-compose 1.29 (all this machine has),
# which needs --compatibility to apply deploy.resources as container limits.
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
    COMPOSE_V1=0
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose --compatibility)
    COMPOSE_V1=1
else
    echo "FAIL  compose test: Docker is here but neither 'docker compose' nor docker-compose is"
    exit 1
fi

WORK="$(mktemp -d /tmp/llama-agent-compose-test.XXXXXX)"
PIDS=()
STEP="set-up"
JOB=""

compose() {
    "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose.yml" \
        -f "$ROOT/deploy/docker/compose.test.yml" "$@"
}

finish() {
    local rc=$?
    set +e
    if ((rc != 0)); then
        echo "FAIL  $STEP"
        [[ -s "$WORK/step.log" ]] && tail -n 40 "$WORK/step.log" | sed 's/^/      /'
        if [[ -s "$WORK/compose.yml" ]]; then
            echo "      --- docker compose logs (tail) ---"
            compose logs --no-color --tail=25 2>&1 | sed 's/^/      /'
        fi
    fi
    [[ -n "$JOB" ]] && docker rm -f "$JOB" >/dev/null 2>&1
    docker rm -f "$PROJECT-prewarmed" >/dev/null 2>&1
    docker volume rm "$PROJECT-prewarmed" >/dev/null 2>&1
    [[ -s "$WORK/compose.yml" ]] && compose down -v --remove-orphans -t 5 >/dev/null 2>&1
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap finish EXIT
# Interrupted or terminated: exit through finish too.
trap 'exit 130' INT
trap 'exit 143' TERM

# step NAME FUNCTION: runs it with its output in $WORK/step.log (printed if it fails: errexit
# ends the script there and finish reports it); one line either way.
step() {
    STEP="$1"
    local t0=$SECONDS
    : >"$WORK/step.log"
    : >"$WORK/note"
    "$2" >>"$WORK/step.log" 2>&1
    echo "ok    $1 ($((SECONDS - t0)) s)$([[ -s "$WORK/note" ]] && echo ": $(cat "$WORK/note")")"
    if [[ -n "${COMPOSE_TEST_LOGS:-}" ]]; then
        cat "$WORK/step.log" >>"$COMPOSE_TEST_LOGS"
    fi
}

# note TEXT: what the step's line says after "ok".
note() { echo "$*" >"$WORK/note"; }

# wait_healthy SERVICE [N]: N containers of SERVICE running and healthy, within START_TIMEOUT.
wait_healthy() {
    local svc="$1" n="${2:-1}" deadline=$((SECONDS + START_TIMEOUT)) id st healthy
    while :; do
        healthy=0
        for id in $(compose ps -q "$svc"); do
            st="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")"
            case "$st" in
                "running healthy") healthy=$((healthy + 1)) ;;
                *unhealthy) echo "$svc ($id) is unhealthy"; return 1 ;;
            esac
        done
        if ((healthy >= n)); then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "$svc: $healthy of $n containers healthy after ${START_TIMEOUT}s"
            return 1
        fi
        sleep 1
    done
}

# port SERVICE PORT [INDEX]: the published host address of a container port ("127.0.0.1:N").
port() {
    local addr
    addr="$(compose port --index="${3:-1}" "$1" "$2")"
    [[ "$addr" == 127.0.0.1:* ]] || { echo "$1:$2 published on '$addr', not 127.0.0.1"; return 1; }
    echo "$addr"
}

# metric URL NAME: the sum of a metric's samples on a /metrics page (0 when absent).
metric() {
    curl -sf --max-time 5 "$1" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

# ---------------------------------------------------------------------------------------------

images() {
    scripts/images-local.sh
}

# The hub mirror serves the test models under the compose file's default preload names. It
# listens on 127.0.0.1 only (tests/src/bin/hub-mirror.rs), so a relay on the engine's bridge
# gateway (host.docker.internal through host-gateway in compose.test.yml) forwards to it.
mirror() {
    local line gateway
    "$HUB_MIRROR" --repo "${GEMMA%%:*}=$MODELS/gemma-3-270m-Q4_K_M.gguf" \
        --repo "$MINILM=$MODELS/all-MiniLM-L6-v2-F16.gguf" >"$WORK/mirror.out" 2>"$WORK/mirror.err" &
    PIDS+=("$!")
    # Its first stdout line, once bound (the files are hashed first).
    for _ in $(seq 1 600); do
        line="$(head -n 1 "$WORK/mirror.out")"
        [[ -n "$line" ]] && break
        kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/mirror.err"; return 1; }
        sleep 0.1
    done
    MIRROR_URL="${line#listening on }"
    [[ "$MIRROR_URL" == http://127.0.0.1:* ]] || { echo "mirror said: $line"; return 1; }
    # What host-gateway means to this engine (the default bridge's address, or the daemon's
    # host-gateway-ip), asked of the engine itself.
    gateway="$(docker run --rm --add-host host.docker.internal:host-gateway \
        --entrypoint getent "${LLAMA_AGENT_BASE_IMAGE:-llama-agent/debian:bookworm}" \
        hosts host.docker.internal | awk '{ print $1 }')"
    [[ "$gateway" =~ ^[0-9]+(\.[0-9]+){3}$ ]] || { echo "host-gateway is '$gateway', not an IPv4 address"; return 1; }
    cat >"$WORK/relay.py" <<'EOF'
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

async def main():
    server = await asyncio.start_server(handle, sys.argv[1], 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
EOF
    "$PY" "$WORK/relay.py" "$gateway" "${MIRROR_URL##*:}" >"$WORK/relay.out" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 1 100); do
        [[ -s "$WORK/relay.out" ]] && break
        sleep 0.1
    done
    local relay_port
    relay_port="$(head -n 1 "$WORK/relay.out")"
    [[ "$relay_port" =~ ^[0-9]+$ ]] || { cat "$WORK/relay.out"; return 1; }
    export HF_ENDPOINT="http://host.docker.internal:$relay_port"
    echo "mirror $MIRROR_URL, relay $gateway:$relay_port"
}

# The compose file as users run it, with what the test needs changed in a copy: host ports
# published on 127.0.0.1 but ephemeral (no clash with other stacks, and scaled replicas can
# publish too); with Compose v1, the two v2-only keys dropped (top-level `name`: -p names the
# project; healthcheck `start_interval`: engines before 25 ignore it anyway).
render() {
    COMPOSE_V1="$COMPOSE_V1" "$PY" - docker-compose.yml "$WORK/compose.yml" <<'EOF'
import os, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
v1 = os.environ["COMPOSE_V1"] == "1"
if v1:
    doc.pop("name", None)
for svc in doc["services"].values():
    if v1:
        svc.get("healthcheck", {}).pop("start_interval", None)
    ports = []
    for p in svc.get("ports", []):
        assert p.startswith("${LLAMA_AGENT_BIND:-127.0.0.1}:"), p
        ports.append("127.0.0.1::" + p.rsplit(":", 1)[1])
    svc["ports"] = ports
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
EOF
    compose config -q
}

up() {
    # Leftovers of a run that could not clean up (killed hard) would be reused: remove them.
    compose down -v --remove-orphans -t 5
    docker rm -f "$PROJECT-prewarmed" "$PROJECT-embed-job" 2>/dev/null || true
    docker volume rm "$PROJECT-prewarmed" 2>/dev/null || true
    compose up -d --no-build
    wait_healthy loader
    wait_healthy generator
    wait_healthy embedder
    compose ps
}

pull() {
    local addr out
    addr="$(port loader 50051)"
    out="$("$CLI" --loader-endpoint "http://$addr" pull "$GEMMA")"
    echo "$out"
    [[ "$out" == /models/* ]] || { echo "not a path in the volume: $out"; return 1; }
}

generate() {
    local addr out
    addr="$(port generator 50052)"
    out="$("$CLI" generate --generator-endpoint "http://$addr" --model "$GEMMA" \
        --prompt "The capital of France is" --max-tokens 8 --temperature 0)"
    echo "$out"
    [[ -n "${out//[[:space:]]/}" ]] || { echo "no text generated"; return 1; }
}

embed() {
    local addr
    addr="$(port embedder 50053)"
    printf '%s\n' "a cat sat on the mat" "containers without a registry" "third row" >"$WORK/small.txt"
    "$CLI" embed --embedder-endpoint "http://$addr" --model "$MINILM" \
        --input "$WORK/small.txt" --output "$WORK/small.parquet"
    "$PY" - "$WORK/small.parquet" <<'EOF'
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
assert t.num_rows == 3, t.num_rows
dims = {len(v) for v in t.column("embedding").to_pylist()}
assert dims == {384}, dims
print("3 rows, 384 dimensions")
EOF
}

single_writer() {
    local svc id rw bad
    for svc in loader generator embedder; do
        id="$(compose ps -q "$svc")"
        rw="$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/models"}}{{.RW}}{{end}}{{end}}' "$id")"
        echo "$svc: /models read-write=$rw"
        [[ "$svc" == loader && "$rw" == true ]] || [[ "$svc" != loader && "$rw" == false ]] \
            || { echo "$svc: /models should be read-write only in the loader"; return 1; }
    done
    bad="$(compose exec -T loader find /models -mindepth 1 \( ! -uid 10001 -o ! -gid 10001 \) -print)"
    [[ -z "$bad" ]] || { echo "not owned by 10001:10001: $bad"; return 1; }
    compose exec -T loader find /models -name '*.gguf' -printf '%U:%G %s %p\n'
    for svc in generator embedder; do
        if compose exec -T "$svc" touch /models/written-by-"$svc" 2>"$WORK/touch.err"; then
            echo "$svc could write to /models"
            return 1
        fi
        grep -q 'Read-only file system' "$WORK/touch.err" || { cat "$WORK/touch.err"; return 1; }
        echo "$svc: $(cat "$WORK/touch.err")"
    done
}

# `docker kill` counts as a manual stop: engine 20.10 then restarts no container, whatever the
# policy (measured: `unless-stopped` and `always` both stay exited). A crash is the process
# dying on its own: SIGKILL to the container's main process from the host, which
# `restart: unless-stopped` restarts.
restart() {
    local id pid count
    id="$(compose ps -q generator)"
    count="$(docker inspect -f '{{.RestartCount}}' "$id")"
    pid="$(docker inspect -f '{{.State.Pid}}' "$id")"
    kill -9 "$pid"
    local deadline=$((SECONDS + START_TIMEOUT))
    until (($(docker inspect -f '{{.RestartCount}}' "$id") > count)); do
        ((SECONDS < deadline)) || { echo "generator not restarted"; return 1; }
        sleep 0.5
    done
    note "restart count $count -> $(docker inspect -f '{{.RestartCount}}' "$id")"
    echo "generator restarted by the policy (restarts: $count -> $(docker inspect -f '{{.RestartCount}}' "$id"))"
    wait_healthy generator
    generate
}

# One embed job over two replicas found through Compose's DNS, one replica killed mid-job.
scale() {
    compose up -d --no-build --no-recreate --scale embedder=2
    wait_healthy embedder 2
    echo "$(date +%T) both replicas healthy"
    local m1 m2 id2
    m1="http://$(port embedder 9090 1)/metrics"
    m2="http://$(port embedder 9090 2)/metrics"
    id2="$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter label=com.docker.compose.service=embedder \
        --filter label=com.docker.compose.container-number=2)"
    [[ -n "$id2" ]] || { echo "no second embedder"; return 1; }
    local base1 base2
    base1="$(metric "$m1" llama_agent_embedder_texts_total)"
    base2="$(metric "$m2" llama_agent_embedder_texts_total)"
    mkdir -m 0777 "$WORK/job"
    "$PY" -c 'import sys
for i in range(int(sys.argv[1])):
    print(f"row {i}: a sentence about container {i % 97} and volume {i % 13}")' "$EMBED_ROWS" \
        >"$WORK/job/in.txt"
    # The client runs on the compose network (the embedder image has llama-cli), where
    # `embedder` resolves to every replica.
    JOB="$PROJECT-embed-job"
    docker run -d --name "$JOB" --network "${PROJECT}_default" --read-only --tmpfs /tmp \
        -v "$WORK/job:/job" --entrypoint /opt/llama-agent/bin/llama-cli \
        "$REGISTRY/embedder:$VERSION" embed --model "$MINILM" --batch-size 8 \
        --input /job/in.txt --output /job/out.parquet \
        --embedder-endpoint http://embedder:50053 >/dev/null
    # Both replicas have answered, and the job is still running: kill replica 2 (SIGKILL).
    local n1 n2 deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        n1=$(($(metric "$m1" llama_agent_embedder_texts_total) - base1))
        n2=$(($(metric "$m2" llama_agent_embedder_texts_total) - base2))
        ((n1 > 0 && n2 > 0)) && break
        [[ "$(docker inspect -f '{{.State.Running}}' "$JOB")" == true ]] \
            || { echo "job ended before both replicas served ($n1, $n2)"; docker logs "$JOB"; return 1; }
        ((SECONDS < deadline)) || { echo "replicas served $n1 and $n2 texts"; return 1; }
        sleep 0.2
    done
    docker kill "$id2" >/dev/null
    echo "$(date +%T) replica 2 killed"
    local running
    running="$(docker inspect -f '{{.State.Running}}' "$JOB")"
    echo "spread before the kill: replica 1 $n1 texts, replica 2 $n2 texts; job running at the kill: $running"
    [[ "$running" == true ]] || { echo "the job had ended before the kill"; return 1; }
    local rc
    rc="$(docker wait "$JOB")"
    echo "$(date +%T) job ended ($rc)"
    docker logs "$JOB" 2>&1 | tail -n 5
    ((rc == 0)) || { echo "embed job exited $rc"; return 1; }
    local all1
    all1=$(($(metric "$m1" llama_agent_embedder_texts_total) - base1))
    echo "replica 1 served $all1 texts in all"
    note "replica 1 $n1 + replica 2 $n2 texts when replica 2 was killed; $EMBED_ROWS rows, each once, in order (replica 1: $all1 texts in all)"
    "$PY" - "$WORK/job/in.txt" "$WORK/job/out.parquet" <<'EOF'
import sys, pyarrow.parquet as pq
texts = open(sys.argv[1]).read().splitlines()
t = pq.read_table(sys.argv[2])
got = t.column("text").to_pylist()
assert got == texts, f"{len(got)} rows out, {len(texts)} in; first difference at " + str(
    next((i for i, (a, b) in enumerate(zip(got, texts)) if a != b), min(len(got), len(texts))))
assert all(len(v) == 384 for v in t.column("embedding").to_pylist())
print(f"{len(got)} rows: every input row once, in order")
EOF
}

# A loader image with the model in /models at build time (the mirror reached over the host
# network during the build). Started on a fresh named volume at /models, as in
# docker-compose.yml (Docker copies the image's /models into an empty volume), with no hub
# reachable: the pull is answered from the image's files.
prewarmed() {
    HF_ENDPOINT="$MIRROR_URL" scripts/images-local.sh prewarmed "$MINILM"
    local image="$REGISTRY/loader:$VERSION-prewarmed" name="$PROJECT-prewarmed"
    docker run --rm --entrypoint find "$image" /models -name '*.gguf' -printf '%U:%G %s %p\n' \
        | tee "$WORK/prewarmed.ls"
    grep -q '^10001:10001 .*\.gguf$' "$WORK/prewarmed.ls" || { echo "no model in the image's /models"; return 1; }
    docker run -d --name "$name" --read-only --tmpfs /tmp -v "$name:/models" \
        -p 127.0.0.1::50051 --health-interval 1s -e HF_ENDPOINT=http://127.0.0.1:9 "$image" >/dev/null
    local addr deadline=$((SECONDS + START_TIMEOUT))
    addr="$(docker port "$name" 50051/tcp | head -n 1)"
    until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" == healthy ]]; do
        ((SECONDS < deadline)) || { docker logs "$name"; return 1; }
        sleep 0.5
    done
    local path
    path="$("$CLI" --loader-endpoint "http://$addr" pull "$MINILM")"
    echo "$path"
    [[ "$path" == /models/*.gguf ]] || { echo "not a cached path: $path"; return 1; }
    note "$(awk '{ print $1, $2 " bytes" }' "$WORK/prewarmed.ls" | head -n 1) in the image; pulled with HF_ENDPOINT=http://127.0.0.1:9"
    docker rm -f "$name" >/dev/null
    docker volume rm "$name" >/dev/null
}

T0=$SECONDS
step "images: base + loader, generator, embedder ($REGISTRY/*:$VERSION)" images
step "hub mirror on 127.0.0.1, relayed to the bridge gateway" mirror
step "compose file rendered for the test (${COMPOSE[*]})" render
step "stack up: loader, generator, embedder healthy (preloads through the mirror)" up
step "llama-cli pull through the loader's published port" pull
step "llama-cli generate through the generator's published port" generate
step "llama-cli embed through the embedder's published port" embed
step "model volume: uid 10001, written by the loader only" single_writer
step "generator crash (SIGKILL of its process): restarted, serving again" restart
step "--scale embedder=2: one embed job over both via DNS, a replica killed mid-job, no row lost" scale
step "pre-warmed loader image: model in /models at build time, served with no hub" prewarmed
echo "compose test: all checks passed in $((SECONDS - T0)) s"
