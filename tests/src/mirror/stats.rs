//! Request counters, so tests can assert how the client used the hub ("8 concurrent pulls made
//! one download", "the second process resumed from byte X").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Resolve traffic for one file name (summed over repos that list the same name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStats {
    /// GETs without a `Range` header.
    pub full_gets: u64,
    /// GETs with a `Range` header (whatever the answer: 206, 200 after an If-Range miss, 416).
    pub range_gets: u64,
    pub heads: u64,
    /// Body bytes handed to the connection for this file.
    pub body_bytes: u64,
    /// Every `Range` header value seen on GETs, in arrival order (e.g. `"bytes=1048576-"`).
    pub ranges: Vec<String>,
    /// GET bodies being sent now, and the most at once: proof that a client's ranged
    /// requests really ran in parallel.
    pub in_flight: u64,
    pub peak_in_flight: u64,
}

impl FileStats {
    pub fn gets(&self) -> u64 {
        self.full_gets + self.range_gets
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStats {
    /// `GET /api/models/...` requests that passed the token check.
    pub listings: u64,
    /// Requests refused with 401.
    pub unauthorized: u64,
    /// Body bytes of all resolve responses.
    pub body_bytes: u64,
    /// Keyed by file name in the repo; only files that saw a request appear.
    pub files: BTreeMap<String, FileStats>,
}

impl MirrorStats {
    pub(crate) fn file(&mut self, name: &str) -> &mut FileStats {
        self.files.entry(name.to_string()).or_default()
    }
}

/// A Range the mirror recorded (`FileStats::ranges`), `bytes=A-B` or `bytes=A-`, as
/// (A, B + 1 or `size`).
pub fn parse_range(r: &str, size: u64) -> (u64, u64) {
    let (a, b) = r.strip_prefix("bytes=").unwrap().split_once('-').unwrap();
    let end = if b.is_empty() {
        size
    } else {
        b.parse::<u64>().unwrap() + 1
    };
    (a.parse().unwrap(), end)
}
