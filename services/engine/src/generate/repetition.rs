//! A stopping criterion for runaway generations: the same few tokens looping (a base model
//! repeating a line, a chat model stuck in a list) would otherwise run to the token limit.

use std::collections::VecDeque;

/// The longest loop looked for, in tokens (a repeated sentence or line).
const MAX_PERIOD: usize = 32;
/// A loop counts once it has repeated this many times...
const MIN_REPEATS: usize = 4;
/// ...over at least this many tokens, so a short run of the same token (`----`) is not one.
const MIN_SPAN: usize = 32;
/// The tokens kept: enough for the longest loop's repeats.
const WINDOW: usize = MAX_PERIOD * MIN_REPEATS;

#[derive(Default)]
pub(super) struct Repetition {
    last: VecDeque<i32>,
}

impl Repetition {
    /// Adds a generated token; true once the newest tokens are a loop.
    pub fn push(&mut self, token: i32) -> bool {
        if self.last.len() == WINDOW {
            self.last.pop_front();
        }
        self.last.push_back(token);
        let n = self.last.len();
        (1..=MAX_PERIOD).any(|period| {
            let span = (period * MIN_REPEATS).max(MIN_SPAN);
            span <= n && (n - span + period..n).all(|i| self.last[i] == self.last[i - period])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_loop(tokens: impl IntoIterator<Item = i32>) -> Option<usize> {
        let mut r = Repetition::default();
        tokens.into_iter().position(|t| r.push(t))
    }

    #[test]
    fn loops_are_found_and_prose_is_not() {
        // A 5-token line repeated: found once 32 tokens loop.
        let line = [7, 8, 9, 10, 11];
        assert_eq!(first_loop((0..100).map(|i| line[i % 5])), Some(31));
        // A 30-token sentence needs four repeats.
        assert_eq!(first_loop((0..200).map(|i| i % 30)), Some(119));
        // Text that never repeats, and a short run of one token.
        assert_eq!(first_loop((0..1000).map(|i| i * 7 % 1009)), None);
        let mut run: Vec<i32> = (0..50).collect();
        run.extend([5; 20]);
        run.extend(100..150);
        assert_eq!(first_loop(run), None);
    }
}
