"""The official OpenAI Python SDK against the generator's OpenAI-compatible HTTP API.

Run by tests/tests/openai_generator.rs: python openai_generate_client.py BASE_URL API_KEY MODEL PROMPT
Prints one JSON object: what the SDK returned for text and chat completions, streamed and
not, with logprobs and a JSON schema, and the status and type of each error it raised.
"""

import json
import sys

import openai

base_url, api_key, model, prompt = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
out = {}
greedy = dict(model=model, temperature=0, max_tokens=16)
messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]


def usage(u):
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


r = client.completions.create(prompt=prompt, **greedy)
out["text"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
               "usage": usage(r.usage), "object": r.object, "id": r.id}

pieces, finish, used = [], None, None
for c in client.completions.create(prompt=prompt, stream=True,
                                   stream_options={"include_usage": True}, **greedy):
    if c.choices:
        pieces.append(c.choices[0].text)
        finish = c.choices[0].finish_reason or finish
    if c.usage:
        used = usage(c.usage)
out["text_stream"] = {"text": "".join(pieces), "finish_reason": finish, "usage": used,
                      "chunks": len(pieces)}

r = client.chat.completions.create(messages=messages, **greedy)
m = r.choices[0].message
out["chat"] = {"text": m.content, "role": m.role, "finish_reason": r.choices[0].finish_reason,
               "usage": usage(r.usage), "object": r.object}

pieces, roles, finish, used = [], [], None, None
for c in client.chat.completions.create(messages=messages, stream=True,
                                        stream_options={"include_usage": True}, **greedy):
    if c.choices:
        d = c.choices[0].delta
        if d.role:
            roles.append(d.role)
        if d.content:
            pieces.append(d.content)
        finish = c.choices[0].finish_reason or finish
    if c.usage:
        used = usage(c.usage)
out["chat_stream"] = {"text": "".join(pieces), "roles": roles, "finish_reason": finish,
                      "usage": used}

r = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=3, **greedy)
out["chat_logprobs"] = [
    {"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
     "top": [a.token for a in t.top_logprobs]}
    for t in r.choices[0].logprobs.content
]

schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
          "required": ["color"], "additionalProperties": False}
r = client.chat.completions.create(
    model=model, messages=messages, temperature=0.7, seed=7, max_tokens=64,
    response_format={"type": "json_schema", "json_schema": {"name": "color", "schema": schema}})
out["json_schema"] = {"text": r.choices[0].message.content,
                      "finish_reason": r.choices[0].finish_reason}

out["models"] = [m.id for m in client.models.list().data]

errors = {}
cases = {
    "unknown_model": lambda: client.chat.completions.create(
        model="test/no-such-model-GGUF", messages=messages, max_tokens=4),
    "two_choices": lambda: client.chat.completions.create(messages=messages, n=2, **greedy),
    "bad_role": lambda: client.chat.completions.create(
        messages=[{"role": "wizard", "content": "hi"}], **greedy),
    "tools": lambda: client.chat.completions.create(
        messages=messages, tools=[{"type": "function", "function": {
            "name": "now", "parameters": {"type": "object", "properties": {}}}}], **greedy),
    "bad_temperature": lambda: client.completions.create(
        prompt=prompt, model=model, temperature=-1, max_tokens=4),
    "wrong_key": lambda: openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    .completions.create(prompt=prompt, **greedy),
}
for name, call in cases.items():
    try:
        call()
        errors[name] = {"status": None}
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        errors[name] = {"status": e.status_code, "class": type(e).__name__,
                        "type": body.get("type"), "message": body.get("message")}
out["errors"] = errors
print(json.dumps(out))
