//! The loader's Prometheus metrics (default registry; exposed on `/metrics`).

use std::sync::LazyLock;

use prometheus::{register_int_counter, register_int_counter_vec, IntCounter, IntCounterVec};

/// EnsureModel answers by outcome: `hit` (served from the cache) or `miss` (downloaded,
/// imported or re-verified first).
pub static ENSURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llama_agent_loader_cache_requests_total",
        "Models ensured, by cache outcome (hit, miss).",
        &["outcome"]
    )
    .expect("metric registers once")
});

pub static DOWNLOADED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_loader_downloaded_bytes_total",
        "Bytes received from the hub (resumed ranges included, re-downloads counted again)."
    )
    .expect("metric registers once")
});

pub static EVICTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_loader_evictions_total",
        "Models removed from the cache (least recently used, or on request)."
    )
    .expect("metric registers once")
});

pub static EVICTED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_loader_evicted_bytes_total",
        "Bytes freed by removing models from the cache."
    )
    .expect("metric registers once")
});

pub static STREAMED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_loader_streamed_bytes_total",
        "Bytes of cached files sent to services that read them over gRPC (ReadModelFile)."
    )
    .expect("metric registers once")
});
