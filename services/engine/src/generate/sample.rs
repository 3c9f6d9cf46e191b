//! Picking each sequence's next token from its row of logits after a decode step.
//!
//! llama.cpp's `llama_sampler_sample` turns the whole vocabulary (262k entries for Gemma 3)
//! into candidates before its chain cuts them to the top k: about a millisecond per sequence,
//! serially on the engine thread, while the GPU waits. With 64 sequences that was most of
//! each step. Here the candidates are cut first (the k highest logits, found in one pass over
//! the row), the same chain runs on them, and rows are picked on several threads when there
//! are many. The chosen token is the one llama.cpp's own path would choose: top-k keeps
//! exactly these candidates in this order, and every later sampler only sees them.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use super::request::Sampling;

/// llama.cpp sorts up to this many top-k candidates with `std::partial_sort`, which keeps the
/// k highest logits in descending order: what `top_k` below produces.
const SHORTCUT_MAX_K: usize = 128;

/// Below this many logits in one step (all rows together) threads cost more than they save.
const PARALLEL_FROM_LOGITS: usize = 4 << 20;

/// Rows each sampling thread takes at least.
const ROWS_PER_THREAD: usize = 4;

/// A sequence's sampler chain and how its candidates may be cut before the chain runs.
pub(super) struct Picker {
    chain: LlamaSampler,
    cut: Cut,
    /// Candidate storage kept between steps (a full-vocabulary row is megabytes).
    scratch: Vec<LlamaTokenData>,
    /// Structured output: only tokens this grammar allows may be picked.
    grammar: Option<LlamaSampler>,
    /// Report log-probabilities, with this many alternatives.
    logprobs: Option<usize>,
}

/// A picked token, and its log-probabilities when the request asked for them.
pub(super) struct Picked {
    pub token: LlamaToken,
    /// The token's log-probability and `(id, logprob)` of the most likely tokens.
    pub logprobs: Option<(f32, Vec<(i32, f32)>)>,
}

enum Cut {
    /// Greedy without penalties: the first highest logit, as llama.cpp's greedy sampler picks.
    Argmax,
    /// No penalties and a small top-k: only the k highest logits can be chosen.
    TopK(usize),
    /// Penalties change logits anywhere in the vocabulary: the chain sees every token.
    Whole,
}

impl Picker {
    /// llama.cpp's sampler order: penalties, top-k, top-p, min-p, temperature, then the draw
    /// (or greedy when temperature is 0).
    pub fn new(s: &Sampling, n_vocab: i32) -> Self {
        let mut chain = Vec::new();
        let penalised = s.repeat_penalty != 1.0;
        if penalised {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                s.repeat_last_n,
                s.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        let greedy = s.temperature <= 0.0;
        if greedy {
            chain.push(LlamaSampler::greedy());
        } else {
            if s.top_k > 0 {
                chain.push(LlamaSampler::top_k(s.top_k));
            }
            if s.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(s.top_p, 1));
            }
            if s.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(s.min_p, 1));
            }
            chain.push(LlamaSampler::temp(s.temperature));
            chain.push(LlamaSampler::dist(s.seed));
        }
        let cut = match (penalised, greedy, usize::try_from(s.top_k)) {
            (true, _, _) => Cut::Whole,
            (false, true, _) => Cut::Argmax,
            (false, false, Ok(k)) if (1..=SHORTCUT_MAX_K).contains(&k) => Cut::TopK(k),
            _ => Cut::Whole,
        };
        Self {
            chain: LlamaSampler::chain_simple(chain),
            cut,
            scratch: Vec::new(),
            grammar: None,
            logprobs: None,
        }
    }

    pub fn with_grammar(mut self, grammar: LlamaSampler) -> Self {
        self.grammar = Some(grammar);
        self
    }

    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    /// Feeds tokens the sequence already holds to samplers with memory (the repeat penalty
    /// looks at the prompt too, as llama.cpp's server does).
    pub fn remember(&mut self, tokens: &[LlamaToken]) {
        self.chain.accept_many(tokens.iter());
    }

    /// The next token from one row of logits; the chain's (and grammar's) state moves past
    /// it. None when a grammar allows no token at all here.
    pub fn pick(&mut self, logits: &[f32]) -> Option<Picked> {
        // As llama.cpp's common sampler: sample as usual, and only when the grammar refuses
        // that token run the grammar over the whole vocabulary first and sample again. Most
        // steps then cost one grammar check instead of one per vocabulary entry.
        let mut token = self.choose(logits, false)?;
        if let Some(grammar) = &mut self.grammar {
            if !allows(grammar, token, logits) {
                let greedy = matches!(self.cut, Cut::Argmax);
                token = match greedy.then(|| best_allowed(grammar, logits)).flatten() {
                    Some(t) => t,
                    None => self.choose(logits, true)?,
                };
            }
        }
        self.chain.accept(token);
        if let Some(grammar) = &mut self.grammar {
            grammar.accept(token);
        }
        let logprobs = self
            .logprobs
            .map(|top| super::logprobs::from_logits(logits, token, top));
        Some(Picked { token, logprobs })
    }

    /// Runs the chain over this row's candidates: the cut ones, or with `grammar_first` the
    /// whole vocabulary after the grammar removed what it forbids.
    fn choose(&mut self, logits: &[f32], grammar_first: bool) -> Option<LlamaToken> {
        let mut candidates = std::mem::take(&mut self.scratch);
        candidates.clear();
        let cut = if grammar_first {
            &Cut::Whole
        } else {
            &self.cut
        };
        let sorted = match cut {
            Cut::Argmax => {
                candidates.push(argmax(logits));
                true
            }
            Cut::TopK(k) => {
                top_k(logits, *k, &mut candidates);
                true
            }
            Cut::Whole => {
                candidates.extend(
                    (0..)
                        .zip(logits)
                        .map(|(id, &l)| LlamaTokenData::new(LlamaToken(id), l, 0.0)),
                );
                false
            }
        };
        let mut array = LlamaTokenDataArray::new(candidates, sorted);
        if let (true, Some(grammar)) = (grammar_first, &mut self.grammar) {
            array.apply_sampler(grammar);
            if array.data.iter().all(|d| d.logit() == f32::NEG_INFINITY) {
                self.scratch = array.data;
                return None;
            }
        }
        array.apply_sampler(&mut self.chain);
        // Every chain ends in greedy or dist, which always select; the first candidate is
        // only a guard against a chain that did not.
        let token = array
            .selected_token()
            .or_else(|| array.data.first().map(LlamaTokenData::id))
            .unwrap_or(LlamaToken(0));
        self.scratch = array.data;
        Some(token)
    }
}

/// Greedy under a grammar picks the highest logit the grammar allows: when one of the few
/// highest is allowed, that is it, without the grammar walking the whole vocabulary.
const GREEDY_GRAMMAR_CANDIDATES: usize = 64;

/// The highest-logit token `grammar` allows among the [`GREEDY_GRAMMAR_CANDIDATES`] highest.
fn best_allowed(grammar: &mut LlamaSampler, logits: &[f32]) -> Option<LlamaToken> {
    let mut candidates = Vec::with_capacity(GREEDY_GRAMMAR_CANDIDATES);
    top_k(logits, GREEDY_GRAMMAR_CANDIDATES, &mut candidates);
    let mut array = LlamaTokenDataArray::new(candidates, true);
    array.apply_sampler(grammar);
    array
        .data
        .iter()
        .find(|d| d.logit() != f32::NEG_INFINITY)
        .map(LlamaTokenData::id)
}

/// Whether `grammar`, in its current state, lets `token` come next.
fn allows(grammar: &mut LlamaSampler, token: LlamaToken, logits: &[f32]) -> bool {
    let logit = usize::try_from(token.0)
        .ok()
        .and_then(|i| logits.get(i))
        .copied()
        .unwrap_or(0.0);
    let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, logit, 0.0)], true);
    one.apply_sampler(grammar);
    one.data[0].logit() != f32::NEG_INFINITY
}

/// Picks a token for every `(picker, logits row)`, on several threads when the rows are many
/// and long. Tokens come back in the order of `work`.
pub(super) fn pick_all(
    work: Vec<(&mut Picker, &[f32])>,
    max_threads: usize,
) -> Vec<Option<Picked>> {
    let logits: usize = work.iter().map(|(_, row)| row.len()).sum();
    let threads = if logits < PARALLEL_FROM_LOGITS {
        1
    } else {
        max_threads.min(work.len().div_ceil(ROWS_PER_THREAD)).max(1)
    };
    if threads == 1 {
        return work.into_iter().map(|(p, row)| p.pick(row)).collect();
    }
    let mut tokens: Vec<Option<Picked>> = (0..work.len()).map(|_| None).collect();
    let per_thread = work.len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut work = work.into_iter();
        for out in tokens.chunks_mut(per_thread) {
            let mine: Vec<_> = work.by_ref().take(out.len()).collect();
            s.spawn(move || {
                for ((picker, row), token) in mine.into_iter().zip(out) {
                    *token = picker.pick(row);
                }
            });
        }
    });
    tokens
}

/// The first highest logit.
fn argmax(logits: &[f32]) -> LlamaTokenData {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    LlamaTokenData::new(
        LlamaToken(best as i32),
        logits.get(best).copied().unwrap_or(0.0),
        0.0,
    )
}

/// The `k` highest logits, highest first; among equal logits the lower id comes first (where
/// llama.cpp's partial sort may keep another of two equal logits at the k-th place: both are
/// equally top-k).
pub(super) fn top_k(logits: &[f32], k: usize, out: &mut Vec<LlamaTokenData>) {
    let k = k.min(logits.len());
    // (logit, id), descending; at most k.
    let mut best: Vec<(f32, i32)> = Vec::with_capacity(k + 1);
    let insert = |best: &mut Vec<(f32, i32)>, l: f32, id: usize| {
        let at = best.partition_point(|&(b, _)| b >= l);
        best.insert(at, (l, id as i32));
        best.truncate(k);
    };
    let (head, rest) = logits.split_at(k);
    for (id, &l) in head.iter().enumerate() {
        insert(&mut best, l, id);
    }
    // Most blocks hold nothing above the k-th best: one branch-free comparison per logit.
    const BLOCK: usize = 64;
    for (b, block) in rest.chunks(BLOCK).enumerate() {
        let floor = best.last().map_or(f32::NEG_INFINITY, |&(l, _)| l);
        if !block.iter().fold(false, |any, &l| any | (l > floor)) {
            continue;
        }
        for (j, &l) in block.iter().enumerate() {
            if l > best.last().map_or(f32::NEG_INFINITY, |&(b, _)| b) {
                insert(&mut best, l, k + b * BLOCK + j);
            }
        }
    }
    out.extend(
        best.into_iter()
            .map(|(l, id)| LlamaTokenData::new(LlamaToken(id), l, 0.0)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` distinct logits over [-10, 10) in an order that changes with `seed`. Distinct,
    /// because among equal logits llama.cpp's partial sort keeps an order of its own.
    fn row(n: usize, seed: u64) -> Vec<f32> {
        let stride = 7919; // prime, so i -> i * stride mod n visits every value once
        (0..n as u64)
            .map(|i| ((i * stride + seed * 104_729) % n as u64) as f32 * 20.0 / n as f32 - 10.0)
            .collect()
    }

    /// What llama.cpp's own `llama_sampler_sample` does: every token is a candidate.
    fn whole_vocabulary(chain: &mut LlamaSampler, logits: &[f32]) -> LlamaToken {
        let mut array = LlamaTokenDataArray::new(
            (0..)
                .zip(logits)
                .map(|(id, &l)| LlamaTokenData::new(LlamaToken(id), l, 0.0))
                .collect(),
            false,
        );
        array.apply_sampler(chain);
        let token = array.selected_token().expect("the chain selects");
        chain.accept(token);
        token
    }

    #[test]
    fn top_k_keeps_the_highest_in_order() {
        let logits = row(10_000, 7);
        let mut out = Vec::new();
        top_k(&logits, 40, &mut out);
        let mut expected: Vec<(f32, i32)> = (0..).zip(&logits).map(|(i, &l)| (l, i)).collect();
        expected.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let got: Vec<(f32, i32)> = out.iter().map(|d| (d.logit(), d.id().0)).collect();
        assert_eq!(got, expected[..40]);
    }

    #[test]
    fn shortcuts_choose_what_the_whole_vocabulary_chooses() {
        for (name, sampling) in [
            (
                "defaults",
                Sampling {
                    seed: 11,
                    ..Default::default()
                },
            ),
            (
                "greedy",
                Sampling {
                    temperature: 0.0,
                    ..Default::default()
                },
            ),
            (
                "hot, wide",
                Sampling {
                    temperature: 1.5,
                    top_k: 128,
                    top_p: 1.0,
                    min_p: 0.0,
                    seed: 3,
                    ..Default::default()
                },
            ),
            (
                "penalties",
                Sampling {
                    repeat_penalty: 1.3,
                    seed: 5,
                    ..Default::default()
                },
            ),
        ] {
            let mut picker = Picker::new(&sampling, 5_000);
            let mut reference = Picker::new(&sampling, 5_000).chain;
            for step in 0..200 {
                let logits = row(5_000, step);
                assert_eq!(
                    picker.pick(&logits).map(|p| p.token),
                    Some(whole_vocabulary(&mut reference, &logits)),
                    "{name}, step {step}"
                );
            }
        }
    }

    #[test]
    fn many_rows_on_threads_match_one_thread() {
        let sampling = Sampling {
            seed: 9,
            ..Default::default()
        };
        let rows: Vec<Vec<f32>> = (0..24).map(|i| row(262_144, i)).collect();
        let pickers = || -> Vec<Picker> {
            rows.iter()
                .map(|_| Picker::new(&sampling, 262_144))
                .collect()
        };
        let pick = |pickers: &mut [Picker], threads| {
            let work = pickers.iter_mut().zip(&rows).map(|(p, r)| (p, &r[..]));
            pick_all(work.collect(), threads)
        };
        let (mut serial, mut threaded) = (pickers(), pickers());
        for _ in 0..3 {
            let tokens = |picked: Vec<Option<Picked>>| -> Vec<_> {
                picked.into_iter().map(|p| p.map(|p| p.token)).collect()
            };
            let one = tokens(pick(&mut serial, 1));
            let many = tokens(pick(&mut threaded, 4));
            assert_eq!(one, many);
        }
    }
}
