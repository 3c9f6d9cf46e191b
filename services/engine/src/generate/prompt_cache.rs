//! The prompt cache: each sequence of the context keeps the KV cells of the last tokens it
//! held, and a new request goes where the longest prefix of its prompt already is. Chat and
//! agent workloads resend the same system prompt, tools and conversation on every turn; only
//! what follows the shared prefix is evaluated. When the longest prefix is in a sequence
//! that is busy (another request still running, or evaluating that same prefix right now), it
//! is copied from there once it is evaluated, rather than evaluated twice.
//!
//! This file only plans; the engine applies the plan to llama.cpp's memory.

use llama_cpp_2::token::LlamaToken;

/// Shorter shared prefixes are evaluated again: they save next to nothing, and a prompt that
/// shares only its first tokens (BOS, a template's opening) with another then gets exactly the
/// numbers it gets alone. Any reuse splits the prompt's evaluation in two batches, and llama.cpp's
/// kernels round differently for different batch shapes.
pub(super) const MIN_REUSE_TOKENS: usize = 16;

/// Copying a sequence's KV cells copies its whole stream (llama.cpp copies across streams
/// only whole); below this many shared tokens evaluating them again is as cheap.
pub(super) const MIN_COPY_TOKENS: usize = 64;

/// What a sequence's KV cells hold: its tokens, in position order from 0.
pub(super) struct PromptCache {
    tokens: Vec<Vec<LlamaToken>>,
    /// When each sequence was last given a request, to pick the least recently used on ties.
    used: Vec<u64>,
    clock: u64,
    /// The model's sliding attention window (0 = none): its layers keep only the last
    /// `n_swa` positions, so a prefix is reusable only while those cells are still there.
    n_swa: usize,
}

/// Where a request goes and what it reuses.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub seq: usize,
    /// Tokens of the prompt already in `seq`: cells past them are dropped.
    pub keep: usize,
    /// A busy sequence that holds (or will soon hold) a longer prefix: copy from it.
    pub share: Option<Share>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) struct Share {
    pub src: usize,
    /// Prompt tokens to take from `src` once it holds them.
    pub upto: usize,
}

/// A sequence that is serving a request: what it holds, and what it is still evaluating.
pub(super) struct Busy<'a> {
    pub seq: usize,
    /// The prompt it is evaluating, if it has not finished it yet.
    pub evaluating: Option<&'a [LlamaToken]>,
}

impl PromptCache {
    pub fn new(sequences: usize, n_swa: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); sequences],
            used: vec![0; sequences],
            clock: 0,
            n_swa,
        }
    }

    pub fn tokens(&self, seq: usize) -> &[LlamaToken] {
        &self.tokens[seq]
    }

    /// KV cells holding tokens, over all sequences.
    pub fn cells(&self) -> u64 {
        self.tokens.iter().map(|t| t.len() as u64).sum()
    }

    /// A token was put in `seq`'s cells at the next position.
    pub fn push(&mut self, seq: usize, token: LlamaToken) {
        self.tokens[seq].push(token);
    }

    /// `seq` now holds only its first `len` tokens.
    pub fn truncate(&mut self, seq: usize, len: usize) {
        self.tokens[seq].truncate(len);
    }

    /// `dst` now holds `src`'s first `len` tokens.
    pub fn copy(&mut self, src: usize, dst: usize, len: usize) {
        let prefix = self.tokens[src][..len.min(self.tokens[src].len())].to_vec();
        self.tokens[dst] = prefix;
    }

    /// Chooses a free sequence for `prompt`. `pos_min(seq)` is the lowest position still in
    /// the sequence's cells (llama.cpp drops cells that left a sliding window).
    pub fn plan(
        &mut self,
        prompt: &[LlamaToken],
        free: &[usize],
        busy: &[Busy<'_>],
        pos_min: impl Fn(usize) -> i32,
    ) -> Option<Plan> {
        let (seq, keep) = free
            .iter()
            .map(|&s| (s, self.usable(s, prompt, &pos_min)))
            .max_by(|a, b| a.1.cmp(&b.1).then(self.used[b.0].cmp(&self.used[a.0])))?;
        self.clock += 1;
        self.used[seq] = self.clock;
        let share = busy
            .iter()
            .map(|b| {
                let held = self.usable(b.seq, prompt, &pos_min);
                let coming = b
                    .evaluating
                    .map_or(0, |p| usable_len(common_prefix(p, prompt), prompt));
                Share {
                    src: b.seq,
                    upto: held.max(coming),
                }
            })
            .filter(|s| s.upto >= keep + MIN_COPY_TOKENS)
            .max_by_key(|s| s.upto);
        Some(Plan { seq, keep, share })
    }

    /// Prompt tokens `seq`'s cells can give a request: the common prefix, less the last
    /// prompt token (its logits are needed), and nothing when a sliding window already dropped
    /// cells the rest of the prompt would attend to.
    pub fn usable(
        &self,
        seq: usize,
        prompt: &[LlamaToken],
        pos_min: &impl Fn(usize) -> i32,
    ) -> usize {
        let n = usable_len(common_prefix(&self.tokens[seq], prompt), prompt);
        if n < MIN_REUSE_TOKENS {
            return 0;
        }
        // As llama-server: the window before position n must still be in the cells.
        let needed_from = n.saturating_sub(self.n_swa);
        if self.n_swa > 0 && pos_min(seq) > needed_from as i32 {
            return 0;
        }
        n
    }
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// At most all but the last prompt token: that one is evaluated for the first logits.
fn usable_len(common: usize, prompt: &[LlamaToken]) -> usize {
    common.min(prompt.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        ids.into_iter().map(LlamaToken).collect()
    }

    fn no_window(_: usize) -> i32 {
        0
    }

    #[test]
    fn a_request_goes_where_its_longest_prefix_is() {
        let mut cache = PromptCache::new(3, 0);
        for t in toks(0..100) {
            cache.push(1, t);
        }
        for t in toks(0..10) {
            cache.push(2, t);
        }
        let prompt = toks((0..80).chain(500..510));
        let plan = cache.plan(&prompt, &[0, 1, 2], &[], no_window).unwrap();
        assert_eq!((plan.seq, plan.keep, plan.share), (1, 80, None));
        // The whole prompt cached: the last token is evaluated again for its logits.
        let plan = cache.plan(&toks(0..50), &[1], &[], no_window).unwrap();
        assert_eq!(plan.keep, 49);
        // A few shared tokens are not worth a split evaluation.
        let plan = cache
            .plan(&toks((0..10).chain(300..340)), &[2], &[], no_window)
            .unwrap();
        assert_eq!(plan.keep, 0);
    }

    #[test]
    fn ties_go_to_the_least_recently_used() {
        let mut cache = PromptCache::new(2, 0);
        let first = cache.plan(&toks(0..5), &[0, 1], &[], no_window).unwrap();
        let second = cache.plan(&toks(0..5), &[0, 1], &[], no_window).unwrap();
        assert_ne!(first.seq, second.seq);
    }

    #[test]
    fn a_busy_sequence_with_a_longer_prefix_is_shared() {
        let mut cache = PromptCache::new(2, 0);
        let system = toks(0..300);
        let asking: Vec<_> = system.iter().copied().chain(toks(900..910)).collect();
        // Sequence 0 is still evaluating the same system prompt (nothing in its cells yet).
        let busy = [Busy {
            seq: 0,
            evaluating: Some(&asking),
        }];
        let other: Vec<_> = system.iter().copied().chain(toks(700..720)).collect();
        let plan = cache.plan(&other, &[1], &busy, no_window).unwrap();
        assert_eq!(
            plan,
            Plan {
                seq: 1,
                keep: 0,
                share: Some(Share { src: 0, upto: 300 })
            }
        );
        // A short shared prefix is evaluated again rather than copied.
        let short: Vec<_> = toks(0..10).into_iter().chain(toks(800..900)).collect();
        assert_eq!(
            cache.plan(&short, &[1], &busy, no_window).unwrap().share,
            None
        );
    }

    #[test]
    fn a_sliding_window_that_dropped_needed_cells_forbids_reuse() {
        let mut cache = PromptCache::new(1, 512);
        for t in toks(0..2000) {
            cache.push(0, t);
        }
        let prompt = toks(0..1000);
        // Cells from 1200 on: the window before position 999 is gone.
        assert_eq!(cache.usable(0, &prompt, &|_| 1200), 0);
        // Cells from 400 on: positions 487..999 are there.
        assert_eq!(cache.usable(0, &prompt, &|_| 400), 999);
    }
}
