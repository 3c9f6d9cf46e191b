//! Which bytes of a partial file are on disk, and the pieces still to fetch.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Half-open byte ranges `[start, end)`, sorted and merged. Pieces are handed out in file order,
/// so a download in progress has at most about one range per connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Extents(Vec<(u64, u64)>);

impl Extents {
    pub fn prefix_of(len: u64) -> Self {
        let mut e = Self::default();
        e.insert(0, len);
        e
    }

    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let at = self.0.partition_point(|&(s, _)| s < start);
        self.0.insert(at, (start, end));
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(s, e) in &self.0 {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.0 = merged;
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Length of the run that starts at byte 0.
    pub fn prefix(&self) -> u64 {
        match self.0.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Sorted, disjoint, non-empty ranges that end by `len`: what a sidecar may claim about a
    /// file of `len` bytes (anything else came from another program or a torn edit).
    pub fn fits(&self, len: u64) -> bool {
        self.0.iter().all(|&(s, e)| s < e && e <= len) && self.0.windows(2).all(|w| w[0].1 < w[1].0)
    }

    /// The ranges of `[0, size)` not covered; `size` 0 (unknown) is everything after the prefix.
    pub fn missing(&self, size: u64) -> Vec<(u64, u64)> {
        if size == 0 {
            return vec![(self.prefix(), u64::MAX)];
        }
        let mut out = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.0 {
            if s > at {
                out.push((at, s.min(size)));
            }
            at = at.max(e);
        }
        if at < size {
            out.push((at, size));
        }
        out
    }
}

/// Splits `missing` into pieces of at most `piece` bytes, in file order.
pub fn pieces(missing: &[(u64, u64)], piece: u64) -> VecDeque<(u64, u64)> {
    let piece = piece.max(1);
    let mut out = VecDeque::new();
    for &(mut s, e) in missing {
        while s < e {
            let end = if e - s > piece { s + piece } else { e };
            out.push_back((s, end));
            s = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_merge_and_missing_is_the_complement() {
        let mut e = Extents::default();
        e.insert(10, 20);
        e.insert(30, 40);
        e.insert(0, 5);
        assert_eq!(e.ranges(), [(0, 5), (10, 20), (30, 40)]);
        assert_eq!(e.prefix(), 5);
        assert_eq!(e.missing(50), [(5, 10), (20, 30), (40, 50)]);
        e.insert(5, 10);
        e.insert(20, 30);
        assert_eq!(e.ranges(), [(0, 40)]);
        assert_eq!((e.prefix(), e.total()), (40, 40));
        e.insert(35, 45);
        assert_eq!(e.ranges(), [(0, 45)]);
        e.insert(7, 7);
        assert_eq!(e.missing(45), []);
        assert_eq!(Extents::default().missing(0), [(0, u64::MAX)]);
        assert_eq!(Extents::prefix_of(9).missing(0), [(9, u64::MAX)]);
    }

    #[test]
    fn fits_refuses_what_no_writer_of_ours_records() {
        assert!(Extents(vec![(0, 5), (6, 9)]).fits(9));
        assert!(!Extents(vec![(0, 5), (6, 10)]).fits(9));
        assert!(!Extents(vec![(0, 5), (5, 9)]).fits(9), "unmerged");
        assert!(!Extents(vec![(6, 9), (0, 5)]).fits(9), "unsorted");
        assert!(!Extents(vec![(3, 3)]).fits(9), "empty range");
    }

    #[test]
    fn pieces_cover_the_holes_in_order() {
        let p = pieces(&[(0, 10), (20, 25)], 4);
        assert_eq!(Vec::from(p), [(0, 4), (4, 8), (8, 10), (20, 24), (24, 25)]);
        assert_eq!(
            Vec::from(pieces(&[(3, u64::MAX)], u64::MAX)),
            [(3, u64::MAX)]
        );
    }
}
