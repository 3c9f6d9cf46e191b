"""The official OpenAI Python SDK against the embedder's OpenAI-compatible HTTP API.

Run by tests/tests/openai.rs: python openai_client.py BASE_URL API_KEY MODEL < texts.json
Prints one JSON object: the vectors the SDK decoded (its default base64 encoding and float),
a `dimensions` request, and the status, type and message of each error the SDK raised.
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
texts = json.load(sys.stdin)
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
out = {}

# The SDK asks for base64 unless told otherwise, and decodes it itself.
r = client.embeddings.create(model=model, input=texts)
out["base64"] = [d.embedding for d in r.data]
out["indexes"] = [d.index for d in r.data]
out["usage"] = {"prompt_tokens": r.usage.prompt_tokens, "total_tokens": r.usage.total_tokens}
out["model"] = r.model

r = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
out["float_one"] = r.data[0].embedding

r = client.embeddings.create(model=model, input=texts[:2], dimensions=128, encoding_format="float")
out["dimensions"] = [d.embedding for d in r.data]

out["models"] = [m.id for m in client.models.list().data]


def error(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "class": type(e).__name__,
                "type": body.get("type"), "message": body.get("message")}
    return None


errors = {}
errors["unknown_model"] = error(lambda: client.embeddings.create(model="nobody/no-such-GGUF", input="x"))
errors["empty_input"] = error(lambda: client.embeddings.create(model=model, input=[]))
errors["token_ids"] = error(lambda: client.embeddings.create(model=model, input=[[1, 2, 3]]))
errors["bad_dimensions"] = error(
    lambda: client.embeddings.create(model=model, input="x", dimensions=100000, encoding_format="float"))
wrong_key = openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0)
errors["wrong_key"] = error(lambda: wrong_key.embeddings.create(model=model, input="x"))
out["errors"] = errors
print(json.dumps(out))
