#!/usr/bin/env python3
"""Turn an embedding GGUF into a cross-encoder (reranker) GGUF for tests: llama.cpp pooling type
RANK (4) and a classification head, so llama-server --reranking scores (query, document) pairs.
The head's weights are random (a fixed seed) or taken from the model, so the scores rank nothing
meaningfully; they are a deterministic function of the pair that llama.cpp and the engine must
both compute. Same input + same options => the same bytes.

usage: make-reranker.py IN.gguf OUT.gguf [--seed 7] [--hidden-gain G] [--out-scale S] [--out-bias B]

Two styles, picked by IN's general.architecture (b11434: src/llama-graph.cpp build_pooling, case
LLAMA_POOLING_TYPE_RANK; src/models/bert.cpp, src/models/qwen3.cpp; conversion/qwen.py):

bert  -- BGE-reranker / BertForSequenceClassification style (e.g. all-MiniLM-L6-v2-F32.gguf):
         every tensor and key of IN, plus
           cls.weight        [n_embd, n_embd]  (numpy (n_embd, n_embd))  dense
           cls.bias          [n_embd]
           cls.output.weight [n_embd, 1]       (numpy (1, n_embd))       n_cls_out = 1
           cls.output.bias   [1]
         bert.pooling_type = 4 (was 1, mean) and bert.classifier.output_labels = ["LABEL_0"]
         (what convert_hf_to_gguf.py writes for a one-label BGE reranker; n_cls_out is the
         label count, 1 without the key too). llama.cpp: score = cls.output(tanh(cls(h_CLS))),
         h_CLS = the first token's final hidden state.
         The dense layer is scaled by the final layer norm's gain (the size of h), so tanh works
         in its curved range; the output layer by --out-scale, so scores spread over a few units.
qwen3 -- Qwen3-Reranker style (a causal decoder, e.g. one from ../shared/tools/synth_qwen3.py):
         every tensor and key of IN, plus
           cls.output.weight [n_embd, 2]  = rows of the (tied) LM head token_embd.weight for the
                                            tokens "yes" and "no", in that order, as the
                                            converter builds it from Qwen3-Reranker's lm_head
         qwen3.pooling_type = 4, qwen3.classifier.output_labels = ["yes", "no"] (n_cls_out 2),
         tokenizer.ggml.add_eos_token = false (a reranker prompt gets no end-of-text token),
         tokenizer.chat_template.rerank (+ tokenizer.chat_templates = ["rerank"]): Qwen3-Reranker's
         prompt with {query}/{document}; its <|im_start|>/<|im_end|> become this vocabulary's
         <start_of_turn>/<end_of_turn> when it has no <|im_start|> (gemma-3's does not), so the
         prompt still holds special tokens that only parse_special tokenization finds.
         llama.cpp: the last token's hidden state (causal RANK) -> cls.output -> softmax over the
         two; score = P("yes").
"""
import argparse
import sys

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGUFValueType as VT, PoolingType

QWEN3_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer "
    "the query\n<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("input")
ap.add_argument("output")
ap.add_argument("--seed", type=int, default=7, help="bert: seed of the head's random weights")
ap.add_argument("--hidden-gain", type=float, default=2.0,
                help="bert: std of the dense layer's pre-activation for a typical hidden state")
ap.add_argument("--out-scale", type=float, default=4.0,
                help="bert: std of the output layer's weights times sqrt(n_embd)")
ap.add_argument("--out-bias", type=float, default=0.0, help="bert: cls.output.bias")
a = ap.parse_args()

r = GGUFReader(a.input)
arch = r.fields["general.architecture"].contents()
if arch not in ("bert", "qwen3"):
    sys.exit(f"{a.input}: architecture {arch!r}; only bert and qwen3 are supported")
tensors = {t.name: t for t in r.tensors}
for name in ("cls.weight", "cls.output.weight"):
    if name in tensors:
        sys.exit(f"{a.input} already has {name}")


def arr(name):
    t = tensors[name]
    return np.asarray(t.data)  # numpy shape = GGUF shape reversed: (rows, n_embd)


n_embd = int(r.fields[f"{arch}.embedding_length"].contents())
tok_embd = arr("token_embd.weight")
if tok_embd.dtype not in (np.float32, np.float16):
    sys.exit(f"token_embd.weight is {tensors['token_embd.weight'].tensor_type.name}; need F32/F16")
wdt = tok_embd.dtype

# Keys: IN's, in order, with these replaced; then the added ones.
POOL = f"{arch}.pooling_type"
override = {POOL: (int(PoolingType.RANK), VT.UINT32)}
added = []  # (key, value, type, sub type)
head = []   # (tensor name, numpy array)

if arch == "bert":
    rng = np.random.default_rng(a.seed)
    n_layer = int(r.fields["bert.block_count"].contents())
    g = arr(f"blk.{n_layer - 1}.layer_output_norm.weight").astype(np.float64)
    b = arr(f"blk.{n_layer - 1}.layer_output_norm.bias").astype(np.float64)
    h_norm = float(np.sqrt(np.sum(g * g + b * b)))  # |h| of a typical final hidden state
    w1 = rng.standard_normal((n_embd, n_embd)) * (a.hidden_gain / h_norm)
    b1 = rng.standard_normal(n_embd) * 0.1
    w2 = rng.standard_normal((1, n_embd)) * (a.out_scale / np.sqrt(n_embd))
    head = [("cls.weight", w1.astype(wdt)), ("cls.bias", b1.astype(np.float32)),
            ("cls.output.weight", w2.astype(wdt)),
            ("cls.output.bias", np.array([a.out_bias], dtype=np.float32))]
    added.append(("bert.classifier.output_labels", ["LABEL_0"], VT.ARRAY, VT.STRING))
else:
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    index = {t: i for i, t in enumerate(toks)}
    if "output.weight" in tensors:
        sys.exit("qwen3: the head must be tied (no output.weight) for this script")
    try:
        yes, no = index["yes"], index["no"]
    except KeyError as e:
        sys.exit(f"qwen3: the vocabulary has no token {e}")
    head = [("cls.output.weight", np.stack([tok_embd[yes], tok_embd[no]]).astype(wdt))]
    override["tokenizer.ggml.add_eos_token"] = (False, VT.BOOL)
    added.append((f"{arch}.classifier.output_labels", ["yes", "no"], VT.ARRAY, VT.STRING))
    tmpl = QWEN3_RERANK_TEMPLATE
    if "<|im_start|>" not in index and "<start_of_turn>" in index:
        tmpl = tmpl.replace("<|im_start|>", "<start_of_turn>").replace("<|im_end|>", "<end_of_turn>")
    added.append(("tokenizer.chat_templates", ["rerank"], VT.ARRAY, VT.STRING))
    added.append(("tokenizer.chat_template.rerank", tmpl, VT.STRING, None))

w = GGUFWriter(a.output, arch)
for name, f in r.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    if name in ("tokenizer.chat_templates",) or name.startswith("tokenizer.chat_template."):
        sys.exit(f"{a.input} already has {name}")
    if name == f"{arch}.classifier.output_labels":
        sys.exit(f"{a.input} already has {name}")
    vt = f.types[0]
    sub = f.types[1] if vt == VT.ARRAY else None
    if name in override:
        val, vt = override.pop(name)
        sub = None
    else:
        val = f.contents()
    w.add_key_value(name, val, vt, sub)
for name, (val, vt) in override.items():  # keys IN lacks (e.g. pooling_type)
    w.add_key_value(name, val, vt, None)
for name, val, vt, sub in added:
    w.add_key_value(name, val, vt, sub)

for t in r.tensors:
    data = np.asarray(t.data)
    if data.dtype not in (np.float32, np.float16):
        sys.exit(f"{t.name}: {t.tensor_type.name}; only F32/F16 inputs are supported")
    w.add_tensor(t.name, data)
for name, data in head:
    w.add_tensor(name, np.ascontiguousarray(data))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

# Read it back: the keys and the head as written.
o = GGUFReader(a.output)
assert o.fields[POOL].contents() == 4, "pooling_type"
out_t = {t.name: t for t in o.tensors}
assert len(out_t) == len(tensors) + len(head), "tensor count"
for name, data in head:
    got = np.asarray(out_t[name].data)
    assert got.shape == data.shape and np.array_equal(got, data), name
for t in r.tensors[:3]:
    assert np.array_equal(np.asarray(out_t[t.name].data), np.asarray(t.data)), t.name
print(f"wrote {a.output}: {arch}, pooling rank, head "
      + ", ".join(f"{n} {[int(d) for d in out_t[n].shape]}" for n, _ in head), file=sys.stderr)
