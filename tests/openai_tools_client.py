"""The official OpenAI Python SDK calling tools through the generator's HTTP API.

Run by tests/tests/tools.rs: python openai_tools_client.py BASE_URL MODEL TOOLS_JSON
Prints one JSON object: the calls of a whole reply and of a streamed one (assembled from the
SDK's deltas as OpenAI documents), their finish reasons, and the errors of bad tool requests.
"""

import json
import sys

import openai

base_url, model, tools = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=300)
ask = dict(model=model, temperature=0, max_tokens=120, tools=tools,
           messages=[{"role": "user", "content": "What is the weather in Paris?"}])
out = {}


def calls(cs):
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in cs]


r = client.chat.completions.create(tool_choice="required", **ask)
m = r.choices[0].message
out["whole"] = {"calls": calls(m.tool_calls or []), "content": m.content,
                "finish_reason": r.choices[0].finish_reason}

assembled, finish, text = {}, None, ""
for c in client.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True, **ask):
    if not c.choices:
        continue
    d = c.choices[0].delta
    text += d.content or ""
    for t in d.tool_calls or []:
        a = assembled.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
        a["id"] = t.id or a["id"]
        a["name"] = (t.function.name if t.function else None) or a["name"]
        a["arguments"] += (t.function.arguments or "") if t.function else ""
    finish = c.choices[0].finish_reason or finish
out["stream"] = {"calls": [assembled[i] for i in sorted(assembled)], "text": text,
                 "finish_reason": finish}

# The call and its result go back, as an agent does; with tool_choice none the model answers.
call = out["whole"]["calls"][0]
r = client.chat.completions.create(
    model=model, temperature=0, max_tokens=8, tools=tools, tool_choice="none",
    messages=ask["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 18 C"}])
out["answer"] = {"finish_reason": r.choices[0].finish_reason,
                 "tool_calls": r.choices[0].message.tool_calls}

errors = {}
cases = {
    "unknown_function": lambda: client.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "nope"}}, **ask),
    "bad_tool_type": lambda: client.chat.completions.create(
        **{**ask, "tools": [{"type": "retrieval"}]}),
    "bad_schema": lambda: client.chat.completions.create(
        **{**ask, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "string"}}}]}),
}
for name, run in cases.items():
    try:
        run()
        errors[name] = {"status": None}
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        errors[name] = {"status": e.status_code, "type": body.get("type"),
                        "message": body.get("message")}
out["errors"] = errors
print(json.dumps(out))
