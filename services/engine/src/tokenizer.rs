//! A loaded model's tokenizer, usable from any thread: llama.cpp's vocabulary is read-only
//! once loaded, so tokenizing needs neither the engine thread nor a context.

use std::sync::Arc;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::EngineError;

/// Shares the model with its engine thread. The engine handle drops this before closing the
/// queue, so the engine thread's own reference is the last and frees the model there.
#[derive(Clone)]
pub struct Tokenizer {
    model: Arc<LlamaModel>,
}

impl Tokenizer {
    pub(crate) fn new(model: Arc<LlamaModel>) -> Self {
        Self { model }
    }

    /// `text` as token ids; `add_special` adds BOS/EOS/SEP as the model does for its input,
    /// `parse_special` turns special-token text (`<start_of_turn>`) into those tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Each token's bytes (special tokens as their text).
    pub fn pieces(&self, ids: &[i32]) -> Result<Vec<Vec<u8>>, EngineError> {
        self.check(ids)?;
        let vocab = self.model.vocab();
        Ok(ids
            .iter()
            .map(|&id| vocab.token_to_piece(LlamaToken(id), true, None))
            .collect())
    }

    /// The text of `ids`; special tokens render as their text only with `render_special`.
    /// Bytes that are not UTF-8 (a list cut inside a character) become U+FFFD.
    pub fn detokenize(&self, ids: &[i32], render_special: bool) -> Result<String, EngineError> {
        self.check(ids)?;
        if ids.is_empty() {
            return Ok(String::new());
        }
        let tokens: Vec<LlamaToken> = ids.iter().map(|&id| LlamaToken(id)).collect();
        let bytes = self
            .model
            .vocab()
            .detokenize(&tokens, !render_special, render_special);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// llama.cpp reads a token's entry unchecked: an id outside the vocabulary is refused here.
    fn check(&self, ids: &[i32]) -> Result<(), EngineError> {
        let n = self.model.n_vocab();
        match ids.iter().position(|&id| id < 0 || id >= n) {
            Some(i) => Err(EngineError::InvalidRequest(format!(
                "token id {} at position {i} is outside the vocabulary (0 to {})",
                ids[i],
                n - 1
            ))),
            None => Ok(()),
        }
    }
}
