//! Which tokens of an embedding batch are output rows, and how a batch is padded to one
//! fixed shape.
//!
//! A batch whose shapes repeat lets llama.cpp's CUDA backend replay the CUDA graph it
//! captured for the first such batch instead of launching each of its hundreds of kernels
//! (it captures only after two calls with identical shapes). Packed batches of real texts
//! vary in tokens and outputs from one to the next, so with padding on, every batch is
//! filled to the token budget by one more sequence whose rows nobody reads, and its output
//! count is held constant by flagging extra rows that are read past.

use std::ops::Range;

/// The rows of a sequence of `len` tokens that `pooling` reads, as a range of positions.
pub(super) fn output_positions(
    pooling: super::request::Pooling,
    len: usize,
    select: bool,
) -> Range<usize> {
    use super::request::Pooling;
    match pooling {
        _ if !select => 0..len,
        Pooling::Mean => 0..len,
        Pooling::Cls | Pooling::Rank => 0..1,
        Pooling::Last => len - 1..len,
    }
}

/// The batch shape a context was made for.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub tokens: usize,
    pub seqs: usize,
    /// Only the rows a sequence's pooling reads are output (else every token).
    pub select: bool,
    /// Every batch is padded to `tokens` tokens and a fixed number of outputs.
    pub pad: bool,
}

impl Shape {
    /// Sequences of real texts one batch may hold: padding takes one sequence id.
    pub fn real_seqs(&self) -> usize {
        if self.pad {
            self.seqs.saturating_sub(1).max(1)
        } else {
            self.seqs
        }
    }

    /// Whether padding can be done at all: it needs a sequence id of its own.
    pub fn pads(&self) -> bool {
        self.pad && self.seqs >= 2
    }
}

/// One sequence of a batch: its length and the positions its pooling reads.
#[derive(Clone, Debug)]
pub(super) struct Part {
    pub len: usize,
    pub needed: Range<usize>,
}

/// Where a batch's output rows come from.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// Per sequence: rows flagged beyond those its pooling reads (its first positions outside
    /// the needed range, in order), and the output index of its first needed row.
    pub extra: Vec<usize>,
    pub out_first: Vec<usize>,
    /// The padding sequence's tokens, and how many of them (its first) are output.
    pub pad_len: usize,
    pub pad_outputs: usize,
    pub n_outputs: usize,
}

impl Layout {
    pub fn new(parts: &[Part], shape: &Shape) -> Self {
        let n_tokens: usize = parts.iter().map(|p| p.len).sum();
        let needed: usize = parts.iter().map(|p| p.needed.len()).sum();
        let pad_len = if shape.pads() {
            shape.tokens.saturating_sub(n_tokens)
        } else {
            0
        };
        // The output count every padded batch has: one row per sequence where that is all
        // that is read; every token where a request pools them all (mean pooling).
        let n_outputs = if !shape.pads() {
            needed
        } else if !shape.select {
            n_tokens + pad_len
        } else {
            let per_seq = shape.seqs.min(shape.tokens);
            if needed <= per_seq {
                per_seq
            } else {
                n_tokens + pad_len
            }
        };
        let mut spare = n_outputs - needed;
        let pad_outputs = spare.min(pad_len);
        spare -= pad_outputs;
        let (mut extra, mut out_first) = (Vec::new(), Vec::new());
        let mut base = 0;
        for p in parts {
            let e = spare.min(p.len - p.needed.len());
            spare -= e;
            extra.push(e);
            out_first.push(base + e.min(p.needed.start));
            base += p.needed.len() + e;
        }
        debug_assert_eq!(spare, 0, "a full batch has a row for every output");
        Self {
            extra,
            out_first,
            pad_len,
            pad_outputs,
            n_outputs,
        }
    }

    /// Whether token `pos` of sequence `i` is an output row.
    pub fn is_output(&self, parts: &[Part], i: usize, pos: usize) -> bool {
        let p = &parts[i];
        if p.needed.contains(&pos) {
            return true;
        }
        let rank = if pos < p.needed.start {
            pos
        } else {
            pos - p.needed.len()
        };
        rank < self.extra[i]
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::Pooling;
    use super::*;

    #[test]
    fn outputs_are_the_rows_the_pooling_reads() {
        assert_eq!(output_positions(Pooling::Last, 5, true), 4..5);
        assert_eq!(output_positions(Pooling::Cls, 5, true), 0..1);
        assert_eq!(output_positions(Pooling::Mean, 5, true), 0..5);
        assert_eq!(output_positions(Pooling::Last, 1, true), 0..1);
        // An encoder (or a reranker) outputs every token whatever the pooling.
        assert_eq!(output_positions(Pooling::Last, 5, false), 0..5);
        assert_eq!(output_positions(Pooling::Cls, 3, false), 0..3);
    }

    fn part(len: usize, pooling: Pooling) -> Part {
        Part {
            len,
            needed: output_positions(pooling, len, true),
        }
    }

    /// The output rows a layout flags, as (sequence, position), in batch order; the padding
    /// sequence is `parts.len()`.
    fn flagged(parts: &[Part], l: &Layout) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            out.extend(
                (0..p.len)
                    .filter(|&pos| l.is_output(parts, i, pos))
                    .map(|pos| (i, pos)),
            );
        }
        out.extend((0..l.pad_outputs).map(|pos| (parts.len(), pos)));
        out
    }

    /// Each sequence's needed rows are where `out_first` says, and the count is `n_outputs`.
    fn check(parts: &[Part], l: &Layout) {
        let rows = flagged(parts, l);
        assert_eq!(rows.len(), l.n_outputs);
        for (i, p) in parts.iter().enumerate() {
            let want: Vec<_> = p.needed.clone().map(|pos| (i, pos)).collect();
            assert_eq!(
                rows[l.out_first[i]..][..want.len()],
                want[..],
                "sequence {i}"
            );
        }
    }

    #[test]
    fn unpadded_batches_output_only_what_is_read() {
        let shape = Shape {
            tokens: 64,
            seqs: 8,
            select: true,
            pad: false,
        };
        let parts = [
            part(5, Pooling::Last),
            part(3, Pooling::Mean),
            part(4, Pooling::Cls),
        ];
        let l = Layout::new(&parts, &shape);
        assert_eq!((l.pad_len, l.n_outputs), (0, 5));
        assert_eq!(l.out_first, [0, 1, 4]);
        check(&parts, &l);
    }

    #[test]
    fn padded_batches_have_one_shape() {
        let shape = Shape {
            tokens: 32,
            seqs: 8,
            select: true,
            pad: true,
        };
        for parts in [
            vec![part(5, Pooling::Last), part(3, Pooling::Last)],
            vec![part(30, Pooling::Last)],
            vec![part(16, Pooling::Last), part(16, Pooling::Cls)],
            vec![part(1, Pooling::Last); 7],
        ] {
            let l = Layout::new(&parts, &shape);
            let tokens: usize = parts.iter().map(|p| p.len).sum::<usize>() + l.pad_len;
            assert_eq!((tokens, l.n_outputs), (32, 8), "{parts:?}");
            check(&parts, &l);
        }
    }

    #[test]
    fn mean_pooling_outputs_every_token_of_a_padded_batch() {
        let shape = Shape {
            tokens: 32,
            seqs: 4,
            select: true,
            pad: true,
        };
        let parts = [
            part(6, Pooling::Mean),
            part(5, Pooling::Cls),
            part(4, Pooling::Last),
        ];
        let l = Layout::new(&parts, &shape);
        assert_eq!((l.pad_len, l.pad_outputs, l.n_outputs), (17, 17, 32));
        check(&parts, &l);
    }

    #[test]
    fn encoders_output_every_token_and_the_padding() {
        let shape = Shape {
            tokens: 16,
            seqs: 4,
            select: false,
            pad: true,
        };
        let parts = [
            Part {
                len: 5,
                needed: 0..5,
            },
            Part {
                len: 3,
                needed: 0..3,
            },
        ];
        let l = Layout::new(&parts, &shape);
        assert_eq!((l.pad_len, l.pad_outputs, l.n_outputs), (8, 8, 16));
        assert_eq!(l.out_first, [0, 5]);
        check(&parts, &l);
    }

    #[test]
    fn one_sequence_id_leaves_no_room_to_pad() {
        let shape = Shape {
            tokens: 16,
            seqs: 1,
            select: true,
            pad: true,
        };
        assert_eq!(shape.real_seqs(), 1);
        let parts = [part(5, Pooling::Last)];
        let l = Layout::new(&parts, &shape);
        assert_eq!((l.pad_len, l.n_outputs), (0, 1));
    }
}
