//! Log-probabilities of generated tokens, as OpenAI and llama-server's `n_probs` report them:
//! a softmax over the whole vocabulary's raw logits, before any sampling setting shapes them.

use llama_cpp_2::token::LlamaToken;

/// OpenAI's bound on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// The chosen token's log-probability and the most likely tokens at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: i32,
    /// The token's bytes (special tokens as their text).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// `(id, bytes, logprob)`, most likely first; among equal logits the lower id first.
    pub top: Vec<(i32, Vec<u8>, f32)>,
}

/// `(chosen logprob, [(id, logprob)] of the `top_n` most likely)` from one row of logits.
pub(super) fn from_logits(
    logits: &[f32],
    chosen: LlamaToken,
    top_n: usize,
) -> (f32, Vec<(i32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64: 262k terms summed in f32 lose about 1e-4 of the total.
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_z) as f32;
    let chosen_logit = usize::try_from(chosen.0)
        .ok()
        .and_then(|i| logits.get(i))
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    let mut top = Vec::new();
    if top_n > 0 {
        super::sample::top_k(logits, top_n, &mut top);
    }
    (
        logprob(chosen_logit),
        top.iter().map(|d| (d.id().0, logprob(d.logit()))).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (chosen, top) = from_logits(&logits, LlamaToken(2), 3);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(chosen) - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<i32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        let total: f64 = logits.iter().map(|&l| (f64::from(l) - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
