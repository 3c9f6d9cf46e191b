#!/usr/bin/env python3
"""Convert a sentence-transformers BERT model (all-MiniLM-L6-v2) to GGUF.

Usage: convert_minilm_gguf.py SRC_DIR OUT.gguf [f16|f32|q8_0]

SRC_DIR is a Hugging Face model directory (config.json, model.safetensors,
vocab.txt, tokenizer.json, modules.json, 1_Pooling/config.json). The result is
an F16 (default), F32 or Q8_0 GGUF that llama.cpp loads as an embedding model (arch "bert").

This replays what llama.cpp's convert_hf_to_gguf.py does for `BertModel` with
`--outtype f16` / `--outtype f32`, but needs only gguf + numpy + safetensors (no torch, no
transformers), so it runs in the repo's small venv:
  * hparams: context/embedding/feed-forward length, blocks, heads, LN eps,
    non-causal attention, pooling type from the sentence-transformers Pooling
    module, token type count;
  * vocab: WordPiece tokens rewritten to llama.cpp's "phantom space" form
    (word-initial tokens get a U+2581 prefix, "##" continuations lose the "##",
    CONTROL tokens stay as they are); special ids and add_bos/add_eos come from
    gguf.SpecialVocab exactly as in llama.cpp;
  * tensors: HF names mapped with gguf's own TensorNameMap; position_ids and the
    pooler are dropped; 1-D tensors (norms, biases), position and token-type
    embeddings stay F32, every other tensor (matmul weights, token_embd) is F16
    (or everything F32 with f32; Q8_0 with q8_0, quantized by gguf's own numpy code,
    as llama-quantize would);
  * general.* metadata via gguf.Metadata.load on the model card, as llama.cpp.
"""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

ARCH = gguf.MODEL_ARCH.BERT
# convert_hf_to_gguf.py derives tokenizer.ggml.pre by hashing the tokenization of
# a fixed probe string; for the uncased BERT WordPiece tokenizer of this model
# that hash is 0876d13b..., which its lookup table resolves to "jina-v2-en"
# (checked once with the `tokenizers` package; not a dependency here).
# llama.cpp ignores the pre-tokenizer type for WPM vocabs anyway.
TOKENIZER_PRE = "jina-v2-en"
# Tensors llama.cpp keeps in F32 even for --outtype f16 (besides all 1-D ones).
KEEP_F32 = {gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES}
# HF tensors convert_hf_to_gguf.py's BertModel drops: only embeddings are needed.
SKIP = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def pooling_type(src: Path):
    """Pooling from the sentence-transformers Pooling module (_try_set_pooling_type)."""
    if not (src / "modules.json").is_file():
        return None
    for mod in load_json(src / "modules.json"):
        if mod["type"] == "sentence_transformers.models.Pooling":
            cfg = load_json(src / mod["path"] / "config.json")
            if cfg["pooling_mode_mean_tokens"]:
                return gguf.PoolingType.MEAN
            if cfg["pooling_mode_cls_token"]:
                return gguf.PoolingType.CLS
            if cfg.get("pooling_mode_lasttoken"):
                return gguf.PoolingType.LAST
            raise NotImplementedError("only MEAN, CLS and LAST pooling are supported")
    return None


def vocab(src: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens + types as get_vocab_base() builds them, then BertModel's phantom rewrite."""
    words = (src / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if words and words[-1] == "":
        words.pop()  # trailing newline
    assert len(words) <= n_vocab, (len(words), n_vocab)
    # Added tokens (from tokenizer.json) are CONTROL when flagged special,
    # else USER_DEFINED; for BERT these are [PAD] [UNK] [CLS] [SEP] [MASK].
    added = {}
    if (src / "tokenizer.json").is_file():
        added = {t["content"]: t["special"] for t in load_json(src / "tokenizer.json")["added_tokens"]}
    else:
        added = {t: True for t in load_json(src / "special_tokens_map.json").values()}

    tokens, types = [], []
    for i in range(n_vocab):
        if i >= len(words):  # ids the tokenizer does not define
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = words[i]
        if tok in added:
            types.append(gguf.TokenType.CONTROL if added[tok] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        # Phantom-space vocab: llama.cpp's WPM tokenizer splits on spaces turned
        # into U+2581, so word starts carry it and "##" continuations do not.
        if types[-1] != gguf.TokenType.CONTROL:
            tok = tok[2:] if tok.startswith("##") else "\u2581" + tok
        tokens.append(tok)
    return tokens, types


def convert(src: Path, out: Path, outtype: str = "f16") -> None:
    hp = load_json(src / "config.json")
    n_layer = hp["num_hidden_layers"]
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[ARCH])

    # Tensors first (llama.cpp does the same: the parameter count feeds size_label).
    tmap = gguf.get_tensor_name_map(ARCH, n_layer)
    n_params = 0
    with safe_open(src / "model.safetensors", framework="numpy") as st:
        for name in st.keys():
            hf_name = name.removeprefix("bert.")
            if hf_name in SKIP or hf_name.startswith("cls."):
                continue
            new_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ValueError(f"cannot map tensor {name!r}")
            data = st.get_tensor(name).astype(np.float32).squeeze()
            keep_f32 = data.ndim <= 1 or new_name.endswith("_norm.weight") or any(
                new_name == gguf.TENSOR_NAMES[t] + ".weight" for t in KEEP_F32)
            n_params += data.size
            if not keep_f32 and outtype == "f16":
                data = data.astype(np.float16)
            if not keep_f32 and outtype == "q8_0":
                q8 = gguf.GGMLQuantizationType.Q8_0
                w.add_tensor(new_name, gguf.quants.quantize(data, q8), raw_dtype=q8)
                continue
            w.add_tensor(new_name, data)

    # general.*: same source (model card README + config) and fallbacks as llama.cpp.
    meta = gguf.Metadata.load(None, src, "all-MiniLM-L6-v2", n_params)
    if meta.size_label is None:
        meta.size_label = gguf.size_label(n_params, 0, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)

    # Hyperparameters (TextModel.set_gguf_parameters + BertModel additions).
    w.add_block_count(n_layer)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_layer_norm_eps(hp["layer_norm_eps"])
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_causal_attention(False)
    if (pt := pooling_type(src)) is not None:
        w.add_pooling_type(pt)

    # Tokenizer (BertModel.set_vocab).
    tokens, types = vocab(src, hp["vocab_size"])
    w.add_token_type_count(hp.get("type_vocab_size", 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # bos=[CLS] eos=[SEP] unk sep pad cls mask, add_bos/add_eos from tokenizer.json's
    # TemplateProcessing post-processor -- gguf's SpecialVocab does all of it.
    gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check(out: Path, n_layer: int) -> None:
    """Read the file back and compare it with what gguf.constants says BERT has."""
    r = gguf.GGUFReader(str(out))
    arch = gguf.MODEL_ARCH_NAMES[ARCH]
    f = lambda key: r.fields[key].contents()  # noqa: E731
    assert f("general.architecture") == arch
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[ARCH]}
    tensors = {t.name: t for t in r.tensors}
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        generic = base.replace(base.split(".")[1], "{bid}", 1) if base.startswith("blk.") else base
        assert generic in allowed, f"{name} is not a BERT tensor"
    need = ["token_embd.weight", "position_embd.weight", "token_types.weight",
            "token_embd_norm.weight", "token_embd_norm.bias"]
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm",
                  "ffn_up", "ffn_down", "layer_output_norm"):
            need += [f"blk.{i}.{t}.weight", f"blk.{i}.{t}.bias"]
    assert sorted(need) == sorted(tensors), set(need) ^ set(tensors)

    n_embd, n_ff = f(f"{arch}.embedding_length"), f(f"{arch}.feed_forward_length")
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    # GGUF shapes are ggml order: innermost (input) dimension first.
    expect = {
        "token_embd.weight": [n_embd, n_vocab],
        "position_embd.weight": [n_embd, f(f"{arch}.context_length")],
        "token_types.weight": [n_embd, f("tokenizer.ggml.token_type_count")],
        "blk.0.attn_q.weight": [n_embd, n_embd],
        "blk.0.ffn_up.weight": [n_embd, n_ff],
        "blk.0.ffn_down.weight": [n_ff, n_embd],
    }
    for name, shape in expect.items():
        assert list(tensors[name].shape) == shape, (name, list(tensors[name].shape), shape)
    assert f(f"{arch}.block_count") == n_layer
    print(f"ok: {out} arch={arch} tensors={len(tensors)} vocab={n_vocab} "
          f"n_embd={n_embd} n_ff={n_ff} n_layer={n_layer} "
          f"pooling={f(f'{arch}.pooling_type')} name={f('general.name')!r}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["f16"], ["f32"], ["q8_0"]):
        sys.exit(f"usage: {sys.argv[0]} SRC_DIR OUT.gguf [f16|f32|q8_0]")
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    outtype = sys.argv[3] if len(sys.argv) == 4 else "f16"
    # Write to a temp name so an interrupted run never leaves a half-written OUT.
    tmp = out.with_name(out.name + ".tmp")
    convert(src, tmp, outtype)
    check(tmp, load_json(src / "config.json")["num_hidden_layers"])
    tmp.replace(out)


if __name__ == "__main__":
    main()
