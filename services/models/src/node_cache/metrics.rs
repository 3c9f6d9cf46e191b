//! The node cache's metrics (default registry; on `/metrics` of the generator and embedder).

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, IntGauge};

/// Model opens through the cache, by how: `shared` (the loader's path was visible), `hit`
/// (a local copy), `streamed` (copied from the loader first).
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "llama_agent_node_cache_requests_total",
        "Models opened through the node-local cache, by outcome (shared, hit, streamed).",
        &["outcome"]
    )
    .expect("metric registers once")
});

pub static STREAMED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "llama_agent_node_cache_streamed_bytes_total",
        "Bytes received from the loader into the node-local cache (resumes count once)."
    )
    .expect("metric registers once")
});

pub static EVICTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "llama_agent_node_cache_evictions_total",
        "Published copies deleted from the node-local cache to make room."
    )
    .expect("metric registers once")
});

pub static BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "llama_agent_node_cache_bytes",
        "Bytes in the node-local cache (published and partial copies)."
    )
    .expect("metric registers once")
});
