//! A reranker's input: the query and one document as one sequence, in the form llama.cpp's
//! server builds (`format_prompt_rerank`), so our scores are llama-server's `/v1/rerank`
//! scores for the same GGUF.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::EngineError;

/// How a pair becomes tokens, read once from the GGUF.
pub(super) enum PairFormat {
    /// `tokenizer.chat_template.rerank` with `{query}` and `{document}` replaced, special
    /// tokens parsed (Qwen3-Reranker style).
    Template(String),
    /// `[BOS] query [EOS] [SEP] document [EOS]`, each special token where the vocabulary adds
    /// it (BGE-reranker style cross-encoders: `[CLS] query [SEP] document [SEP]`).
    Joined {
        bos: Option<LlamaToken>,
        sep: Option<LlamaToken>,
        eos: Option<LlamaToken>,
    },
}

/// Tries at cutting a templated document to fit: a cut changes how the text around the cut
/// tokenizes, so the rendered pair is measured again.
const TEMPLATE_CUT_TRIES: usize = 4;

impl PairFormat {
    pub fn for_model(model: &LlamaModel) -> Self {
        // Read as metadata: llama-cpp-2's `chat_template(Some(name))` hands llama.cpp a
        // pointer to a name it has already dropped (0.1.160), and found no template here.
        if let Ok(t) = model.meta_val_str("tokenizer.chat_template.rerank") {
            return Self::Template(t);
        }
        let vocab = model.vocab();
        let some = |t: LlamaToken| (t.0 >= 0).then_some(t);
        // llama.cpp falls back to [SEP] when the vocabulary has no EOS.
        let eos = some(vocab.eos()).or_else(|| some(vocab.sep()));
        Self::Joined {
            bos: vocab.should_add_bos().then(|| some(vocab.bos())).flatten(),
            sep: vocab.should_add_sep().then(|| some(vocab.sep())).flatten(),
            eos: vocab.should_add_eos().then_some(eos).flatten(),
        }
    }

    /// The pair's tokens, at most `cap` of them, and whether the document was cut to fit
    /// (only when `truncate`). `query` is `(text, tokens without specials)`, made once per
    /// request.
    pub fn tokens(
        &self,
        model: &LlamaModel,
        query: (&str, &[LlamaToken]),
        doc: &str,
        cap: usize,
        truncate: bool,
    ) -> Result<(Vec<LlamaToken>, bool), String> {
        let vocab = model.vocab();
        match self {
            Self::Joined { bos, sep, eos } => {
                let mut doc_tokens = vocab.tokenize(doc.as_bytes(), false, false);
                let frame = bos.iter().count() + sep.iter().count() + 2 * eos.iter().count();
                let fixed = frame + query.1.len();
                let excess = (fixed + doc_tokens.len()).saturating_sub(cap);
                if excess > 0 {
                    check_room(fixed, cap, fixed + doc_tokens.len(), truncate)?;
                    doc_tokens.truncate(doc_tokens.len() - excess);
                }
                let mut t = Vec::with_capacity(fixed + doc_tokens.len());
                t.extend(bos);
                t.extend_from_slice(query.1);
                t.extend(eos);
                t.extend(sep);
                t.extend(doc_tokens);
                t.extend(eos);
                Ok((t, excess > 0))
            }
            Self::Template(template) => {
                let render = |doc: &str| {
                    let prompt = template
                        .replace("{query}", query.0)
                        .replace("{document}", doc);
                    vocab.tokenize(prompt.as_bytes(), false, true)
                };
                let whole = render(doc);
                if whole.len() <= cap {
                    return Ok((whole, false));
                }
                let doc_tokens = vocab.tokenize(doc.as_bytes(), false, false);
                let fixed = whole.len().saturating_sub(doc_tokens.len());
                check_room(fixed, cap, whole.len(), truncate)?;
                let mut keep = doc_tokens.len().saturating_sub(whole.len() - cap);
                for _ in 0..TEMPLATE_CUT_TRIES {
                    let cut = vocab.detokenize(&doc_tokens[..keep], false, false);
                    let t = render(&String::from_utf8_lossy(&cut));
                    if t.len() <= cap {
                        return Ok((t, true));
                    }
                    keep = keep.saturating_sub(t.len() - cap);
                }
                Err(format!(
                    "could not cut the document to {cap} tokens with the model's rerank template"
                ))
            }
        }
    }
}

/// Whether a pair of `len` tokens may be cut to `cap` when `fixed` of them are not the
/// document's.
fn check_room(fixed: usize, cap: usize, len: usize, truncate: bool) -> Result<(), String> {
    if fixed >= cap {
        return Err(format!(
            "the query and its special tokens take {fixed} tokens, leaving no room for a \
             document in the {cap} a pair may have"
        ));
    }
    if !truncate {
        return Err(format!(
            "has {len} tokens with the query, more than the {cap} a pair may have; set \
             truncate to cut the document"
        ));
    }
    Ok(())
}

/// `EngineError` for a pair that cannot be scored, naming the document.
pub(super) fn pair_error(row: usize, reason: String) -> EngineError {
    EngineError::InvalidRequest(format!("document {row}: {reason}"))
}
