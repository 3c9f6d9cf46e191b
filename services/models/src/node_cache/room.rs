//! Room for a new copy under the cap: copies no process uses (no lock held on them) go, least
//! recently used first; partial copies of other models count and go the same way.

use super::layout::{Layout, Plan};
use super::{metrics, NodeCacheError};

/// Frees space for `plan` (whose own partial bytes already count); the ids evicted. The caller
/// holds `plan`'s exclusive lock.
pub fn make_room(layout: &Layout, plan: &Plan) -> Result<Vec<String>, NodeCacheError> {
    let cap = layout.max_bytes;
    if plan.total > cap {
        return Err(NodeCacheError::Full(format!(
            "{} is {} bytes; the cache holds at most {cap} (--model-cache-max-size)",
            plan.reference, plan.total
        )));
    }
    let mut copies = layout.copies();
    let own: u64 = copies
        .iter()
        .filter(|c| c.id == plan.id)
        .map(|c| c.bytes)
        .sum();
    copies.retain(|c| c.id != plan.id);
    let mut used: u64 = copies.iter().map(|c| c.bytes).sum();
    let need = plan.total.saturating_sub(own);
    copies.sort_by_key(|c| c.used);
    let mut evicted = Vec::new();
    let mut in_use = 0u64;
    for c in copies {
        if used + need <= cap {
            break;
        }
        // A copy someone holds (an engine uses it, or another process streams it) stays.
        let Some(_lock) = layout.try_lock_exclusive(&c.id)? else {
            in_use += c.bytes;
            continue;
        };
        layout.discard(&c.dir)?;
        used -= c.bytes;
        if c.published {
            metrics::EVICTIONS.inc();
        }
        evicted.push(c.id);
    }
    metrics::BYTES.set((used + own) as i64);
    if used + need > cap {
        return Err(NodeCacheError::Full(format!(
            "{} needs {need} more bytes; {used} of {cap} are taken ({in_use} by copies in use)",
            plan.reference
        )));
    }
    Ok(evicted)
}
