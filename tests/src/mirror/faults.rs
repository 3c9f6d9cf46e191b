//! Injected failures, so tests can exercise resumes, integrity checks, kills mid-transfer and
//! hub outages without a flaky network.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// What goes wrong with a resolve response. Several effects may be combined; `Fault::default()`
/// is "nothing", and setting it clears the scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fault {
    /// Close the connection after this many body bytes of the response (the headers promised
    /// the full length, so the client sees a truncated body and resumes with `Range`).
    pub drop_after: Option<u64>,
    /// Send this many body bytes, then nothing more while holding the connection open: a
    /// stalled transfer, which the client must give up on by itself.
    pub stall_after: Option<u64>,
    /// Invert the first byte of every 1 MiB block of the body (block 0 starts at the response's
    /// first byte): same length, different SHA-256.
    pub corrupt: bool,
    /// Pace the body to about this rate.
    pub bytes_per_sec: Option<u64>,
    /// Answer a ranged GET with 200 and the whole file, as a server without Range support does
    /// (and as an If-Range miss on a changed file looks to the client).
    pub ignore_range: bool,
    /// Answer this status (with an empty JSON error) instead of the file.
    pub fail_status: Option<u16>,
    /// How many resolve GETs the fault applies to before it lifts itself; 0 = until replaced.
    pub times: u32,
}

impl Fault {
    pub fn drop_after(bytes: u64) -> Self {
        Self {
            drop_after: Some(bytes),
            ..Self::default()
        }
    }

    pub fn stall_after(bytes: u64) -> Self {
        Self {
            stall_after: Some(bytes),
            ..Self::default()
        }
    }

    pub fn corrupt() -> Self {
        Self {
            corrupt: true,
            ..Self::default()
        }
    }

    pub fn throttle(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: Some(bytes_per_sec),
            ..Self::default()
        }
    }

    pub fn ignore_range() -> Self {
        Self {
            ignore_range: true,
            ..Self::default()
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            fail_status: Some(status),
            ..Self::default()
        }
    }

    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    fn is_noop(&self) -> bool {
        self.drop_after.is_none()
            && self.stall_after.is_none()
            && !self.corrupt
            && self.bytes_per_sec.is_none()
            && !self.ignore_range
            && self.fail_status.is_none()
    }
}

/// Which files a fault covers. A file's own rule shadows the `All` rule while it lasts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultScope {
    All,
    /// A file name as listed in the repo (`rfilename`), in whichever repo it appears.
    File(String),
}

impl FaultScope {
    pub fn file(name: impl Into<String>) -> Self {
        Self::File(name.into())
    }
}

struct Rule {
    fault: Fault,
    /// `None` = forever.
    left: Option<u32>,
}

#[derive(Default)]
pub(crate) struct FaultTable {
    rules: HashMap<FaultScope, Rule>,
}

impl FaultTable {
    pub(crate) fn set(&mut self, scope: FaultScope, fault: Fault) {
        if fault.is_noop() {
            self.rules.remove(&scope);
            return;
        }
        let left = (fault.times > 0).then_some(fault.times);
        self.rules.insert(scope, Rule { fault, left });
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    /// The fault for this file's next response. `consume` counts it against `times`; HEADs don't,
    /// so a probe doesn't use up the fault meant for the transfer.
    pub(crate) fn take(&mut self, file: &str, consume: bool) -> Option<Fault> {
        let own = FaultScope::File(file.to_string());
        let scope = if self.rules.contains_key(&own) {
            own
        } else {
            FaultScope::All
        };
        let rule = self.rules.get_mut(&scope)?;
        let fault = rule.fault.clone();
        if consume {
            if let Some(left) = rule.left.as_mut() {
                *left -= 1;
                if *left == 0 {
                    self.rules.remove(&scope);
                }
            }
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_rule_shadows_all_and_expires() {
        let mut t = FaultTable::default();
        t.set(FaultScope::All, Fault::status(503));
        t.set(FaultScope::file("a"), Fault::corrupt().times(2));
        assert!(t.take("a", false).unwrap().corrupt);
        assert!(t.take("a", true).unwrap().corrupt);
        assert!(t.take("a", true).unwrap().corrupt);
        assert_eq!(t.take("a", true).unwrap().fail_status, Some(503));
        assert_eq!(t.take("b", true).unwrap().fail_status, Some(503));
        t.set(FaultScope::All, Fault::default());
        assert_eq!(t.take("b", true), None);
    }
}
