//! One engine's share of the process-wide serving gauges (running requests, KV cells in use)
//! that Kubernetes' inference gateway routes by and an autoscaler scales on. Several models
//! may be loaded at once, so each engine adds what changed since it last published and takes
//! its share back when its model is unloaded.

use std::sync::Mutex;

use crate::metrics::{GEN_KV_CELLS, GEN_KV_USAGE, GEN_RUNNING, QUEUE_DEPTH};

/// Puts the gauges in the registry at zero before any model is loaded: an endpoint picker or
/// an autoscaler query reads a missing series as an error, not as an idle replica.
pub fn register_serving_gauges() {
    QUEUE_DEPTH.with_label_values(&["generate"]);
    GEN_RUNNING.get();
    for state in ["used", "total"] {
        GEN_KV_CELLS.with_label_values(&[state]);
    }
    ratio();
}

pub(super) struct Gauges {
    running: i64,
    used: i64,
    total: i64,
}

impl Gauges {
    /// An engine whose context has `total` KV cells.
    pub fn new(total: u64) -> Self {
        let total = i64::try_from(total).unwrap_or(i64::MAX);
        GEN_KV_CELLS.with_label_values(&["total"]).add(total);
        ratio();
        Self {
            running: 0,
            used: 0,
            total,
        }
    }

    /// `running` requests hold `used` cells now.
    pub fn publish(&mut self, running: usize, used: u64) {
        let running = running as i64;
        let used = i64::try_from(used).unwrap_or(i64::MAX);
        if (running, used) == (self.running, self.used) {
            return;
        }
        GEN_RUNNING.add(running - self.running);
        GEN_KV_CELLS
            .with_label_values(&["used"])
            .add(used - self.used);
        (self.running, self.used) = (running, used);
        ratio();
    }
}

impl Drop for Gauges {
    fn drop(&mut self) {
        self.publish(0, 0);
        GEN_KV_CELLS.with_label_values(&["total"]).sub(self.total);
        ratio();
    }
}

/// Sets the ratio from the cell gauges. Engines of several models publish from their own
/// threads: reading both gauges and setting the ratio under one lock means the last ratio
/// set was read after every update before it, so a slow engine cannot leave a stale one.
fn ratio() {
    static RATIO: Mutex<()> = Mutex::new(());
    let _one_at_a_time = RATIO.lock().unwrap_or_else(|e| e.into_inner());
    let total = GEN_KV_CELLS.with_label_values(&["total"]).get();
    let used = GEN_KV_CELLS.with_label_values(&["used"]).get();
    GEN_KV_USAGE.set(if total > 0 {
        used as f64 / total as f64
    } else {
        0.0
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // The gauges are process-wide, so one test walks two engines through their lives.
    #[test]
    fn engines_add_their_share_and_take_it_back() {
        let cells = |s: &str| GEN_KV_CELLS.with_label_values(&[s]).get();
        let mut a = Gauges::new(1000);
        let mut b = Gauges::new(3000);
        assert_eq!(cells("total"), 4000);
        a.publish(2, 500);
        b.publish(1, 500);
        assert_eq!(GEN_RUNNING.get(), 3);
        assert_eq!(cells("used"), 1000);
        assert!((GEN_KV_USAGE.get() - 0.25).abs() < 1e-12);
        a.publish(1, 100);
        assert_eq!((GEN_RUNNING.get(), cells("used")), (2, 600));
        drop(b);
        assert_eq!(
            (GEN_RUNNING.get(), cells("used"), cells("total")),
            (1, 100, 1000)
        );
        assert!((GEN_KV_USAGE.get() - 0.1).abs() < 1e-12);
        drop(a);
        assert_eq!(
            (GEN_RUNNING.get(), cells("used"), cells("total")),
            (0, 0, 0)
        );
        assert_eq!(GEN_KV_USAGE.get(), 0.0);
    }
}
