//! The engines' Prometheus metrics (default registry; the services expose it on `/metrics`).

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, register_gauge, register_histogram, register_int_counter,
    register_int_gauge, register_int_gauge_vec, Gauge, Histogram, IntCounter, IntGauge,
    IntGaugeVec,
};

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    exponential_buckets(start, factor, count).expect("valid buckets")
}

/// Requests accepted by an engine and not yet taken up by its thread, by engine kind.
pub static QUEUE_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llama_agent_engine_queue_depth",
        "Requests waiting for an engine thread, by engine (generate, embed).",
        &["engine"]
    )
    .expect("metric registers once")
});

pub static TTFT: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "llama_agent_generator_ttft_seconds",
        "Time from a request's arrival at the engine to its first generated token.",
        buckets(0.005, 2.0, 14)
    )
    .expect("metric registers once")
});

pub static INTER_TOKEN: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "llama_agent_generator_inter_token_seconds",
        "Time between consecutive generated tokens of one sequence.",
        buckets(0.001, 2.0, 14)
    )
    .expect("metric registers once")
});

pub static TOKENS_GENERATED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_generator_tokens_generated_total",
        "Tokens sampled by the generator."
    )
    .expect("metric registers once")
});

pub static PROMPT_TOKENS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_generator_prompt_tokens_total",
        "Prompt tokens of generation requests, cached or evaluated."
    )
    .expect("metric registers once")
});

pub static PROMPT_TOKENS_CACHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_generator_prompt_tokens_cached_total",
        "Prompt tokens whose KV cells were reused from the prompt cache instead of evaluated."
    )
    .expect("metric registers once")
});

pub static EMBED_BATCH_SEQUENCES: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "llama_agent_embedder_batch_sequences",
        "Texts packed into one llama.cpp embedding batch.",
        buckets(1.0, 2.0, 10)
    )
    .expect("metric registers once")
});

pub static EMBED_BATCH_TOKENS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "llama_agent_embedder_batch_tokens",
        "Tokens in one llama.cpp embedding batch.",
        buckets(8.0, 2.0, 12)
    )
    .expect("metric registers once")
});

pub static EMBED_TEXTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("llama_agent_embedder_texts_total", "Texts embedded.")
        .expect("metric registers once")
});

pub static EMBED_TOKENS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "llama_agent_embedder_tokens_total",
        "Tokens run through embedding models."
    )
    .expect("metric registers once")
});

/// Memory of each llama.cpp device (`CUDA0`, `CPU`), total and free, refreshed at start and
/// after every model load.
pub static DEVICE_MEMORY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llama_agent_device_memory_bytes",
        "Memory of each llama.cpp device, by device, description and kind (total, free).",
        &["device", "description", "kind"]
    )
    .expect("metric registers once")
});

/// 1, labelled with the CPU module this process loaded (`zen4`, `haswell`, ...).
pub static CPU_VARIANT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llama_agent_cpu_variant_info",
        "The llama.cpp CPU module in use (1, by variant).",
        &["variant"]
    )
    .expect("metric registers once")
});

/// Sequences holding a generation request (prompt, generating, or its events draining), over
/// every loaded model: the "running requests" gauge of the Inference Gateway's endpoint picker.
pub static GEN_RUNNING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "llama_agent_generator_requests_running",
        "Generation requests holding a sequence now, over all loaded models."
    )
    .expect("metric registers once")
});

/// KV cells of running requests, and the cells all loaded models' contexts have.
pub static GEN_KV_CELLS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llama_agent_generator_kv_cache_cells",
        "KV cache cells over all loaded models: held by running requests (used) and in all (total).",
        &["state"]
    )
    .expect("metric registers once")
});

/// `used / total` of [`GEN_KV_CELLS`]: the endpoint picker's KV-cache utilization (0 to 1).
/// Cells kept only for the prompt cache are not counted: the next request may take them.
pub static GEN_KV_USAGE: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "llama_agent_generator_kv_cache_usage_ratio",
        "Fraction of KV cache cells held by running requests, over all loaded models (0 to 1)."
    )
    .expect("metric registers once")
});
