# Sourced by the make-*-fixture.sh scripts, which run llama.cpp's llama-server as the peer: a
# free port for it, starting it and waiting until it is healthy, the command line recorded in a
# fixture, and stopping it (SERVER_PID) and removing the scratch folder ($WORK) however the
# script ends. Needs PY (a Python interpreter), BIN (llama.cpp's tools) and a `log` function.
# shellcheck shell=bash

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

WORK=""
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
# launch_server LOGFILE: starts "$BIN/llama-server" "${SERVER_ARGS[@]}" (listening on $PORT),
# sets SERVER_PID, and returns once /health says ok; the script exits with the log's tail if
# the server dies or is not healthy in ~120 s (2 busy cores). Environment given before the
# call (TZ=UTC launch_server ...) reaches the server.
launch_server() {
  local logfile="$1"
  "$BIN/llama-server" "${SERVER_ARGS[@]}" > "$logfile" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      log "llama-server exited early:"; tail -30 "$logfile" >&2; exit 1
    fi
    if curl -fsS -m 2 "http://127.0.0.1:$PORT/health" 2>/dev/null | grep -q '"ok"'; then return 0; fi
    sleep 0.2
  done
  log "llama-server not healthy after 120s"; tail -30 "$logfile" >&2; exit 1
}

# server_cmd [PREFIX]: the command as recorded in a fixture, from the repo root; the port (the
# last argument) is a placeholder.
server_cmd() {
  local n=$(( ${#SERVER_ARGS[@]} - 1 ))
  printf '%s.bench/llama.cpp/build/bin/llama-server %s PORT' "${1:+$1 }" "${SERVER_ARGS[*]:0:$n}"
}

cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
