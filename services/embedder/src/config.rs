//! Embedder settings: flags with environment fallbacks, validated before anything binds.

use llama_agent_engine::embed::{MAX_CONTEXTS, MAX_SEQS};

#[derive(clap::Args, Clone, Debug)]
pub struct EmbedderConfig {
    /// llama.cpp threads (default: OMP_NUM_THREADS, else every core, or one when every layer
    /// is on a GPU).
    #[arg(long, env = "LLAMA_EMBEDDER_THREADS")]
    pub threads: Option<usize>,

    /// GPU offload, split and KV cache settings.
    #[command(flatten)]
    pub device: llama_agent_models::device::DeviceConfig,

    /// The node-local model cache, for clusters where the loader's volume is not shared.
    #[command(flatten)]
    pub node_cache: llama_agent_models::node_cache::NodeCacheConfig,

    /// Models kept loaded; the least recently used is unloaded (and its lease released) first.
    #[arg(long, env = "LLAMA_EMBEDDER_MAX_MODELS", default_value_t = 1)]
    pub max_models: usize,

    /// Tokens per llama.cpp batch, packed from many texts (and requests). Also the most
    /// tokens one text may have: a text is never split across batches. Default: 512; 2048
    /// for causal decoders wholly on a GPU. An encoder's attention spans the whole packed
    /// batch, so bigger batches of short texts do quadratic work for nothing.
    #[arg(long, env = "LLAMA_EMBEDDER_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<u32>,

    /// Flash attention (where llama.cpp supports it): about twice as fast on CPU, but it rounds
    /// attention inputs to F16, so a vector then depends on its batch by up to ~2e-4 per value.
    /// `false` gives packing-independent vectors (to ~1e-6 on F32 weights).
    #[arg(long, env = "LLAMA_EMBEDDER_FLASH_ATTENTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub flash_attention: bool,

    /// Pad every batch to the full batch shape with a sequence nobody reads (default: for an
    /// encoder wholly on a GPU). Batches of one shape let llama.cpp's CUDA backend replay a
    /// captured CUDA graph instead of launching each kernel, which pays where a small
    /// model's kernels are short (MiniLM: 10-20% faster on an H200); where the GPU's
    /// arithmetic is the limit (a 0.6B decoder) and on a CPU, padding is only work. Off
    /// where the batch is longer than the model's context (the padding's positions would
    /// not exist).
    #[arg(long, env = "LLAMA_EMBEDDER_PAD_BATCHES", action = clap::ArgAction::Set)]
    pub pad_batches: Option<bool>,

    /// Texts per llama.cpp batch at most (default: 64; 256 for causal decoders on a GPU).
    #[arg(long, env = "LLAMA_EMBEDDER_MAX_SEQS_PER_BATCH")]
    pub max_seqs_per_batch: Option<u32>,

    /// llama.cpp contexts of one model embedding batches at the same time, each on its own
    /// thread, sharing the model's weights and its queue (default: 4 when every layer is on a
    /// GPU, where one thread cannot launch a small model's kernels fast enough to keep the GPU
    /// busy; else 1). Each context takes whole requests.
    #[arg(long, env = "LLAMA_EMBEDDER_CONTEXTS")]
    pub contexts: Option<u32>,

    /// Requests (or stream batches) waiting for the engine, per model, before RESOURCE_EXHAUSTED.
    #[arg(long, env = "LLAMA_EMBEDDER_QUEUE_DEPTH", default_value_t = 64)]
    pub queue_depth: usize,

    /// Models to load before reporting SERVING (repeatable).
    #[arg(long, env = "LLAMA_EMBEDDER_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            threads: None,
            device: Default::default(),
            node_cache: Default::default(),
            max_models: 1,
            max_batch_tokens: None,
            flash_attention: true,
            pad_batches: None,
            max_seqs_per_batch: None,
            contexts: None,
            queue_depth: 64,
            preload: Vec::new(),
        }
    }
}

impl EmbedderConfig {
    pub fn threads(&self) -> Option<usize> {
        self.threads
            .or_else(llama_agent_models::device::env_threads)
    }

    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (
                self.threads == Some(0),
                "--threads must be at least 1".to_string(),
            ),
            (
                self.max_models == 0,
                "--max-models must be at least 1".to_string(),
            ),
            (
                self.max_batch_tokens.is_some_and(|n| n < 8),
                "--max-batch-tokens must be at least 8".to_string(),
            ),
            (
                self.max_seqs_per_batch
                    .is_some_and(|n| n == 0 || n > MAX_SEQS),
                format!("--max-seqs-per-batch must be 1 to {MAX_SEQS}"),
            ),
            (
                self.contexts.is_some_and(|n| n == 0 || n > MAX_CONTEXTS),
                format!("--contexts must be 1 to {MAX_CONTEXTS}"),
            ),
            (
                self.queue_depth == 0,
                "--queue-depth must be at least 1".to_string(),
            ),
        ];
        match checks.into_iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(msg),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_counts_are_refused_by_name() {
        let with = |f: fn(&mut EmbedderConfig)| {
            let mut c = EmbedderConfig::default();
            f(&mut c);
            c.validate()
        };
        assert!(with(|_| {}).is_ok());
        assert!(with(|c| c.contexts = Some(MAX_CONTEXTS)).is_ok());
        let refused = [
            (with(|c| c.contexts = Some(0)), "--contexts"),
            (with(|c| c.contexts = Some(MAX_CONTEXTS + 1)), "--contexts"),
            (with(|c| c.max_batch_tokens = Some(4)), "--max-batch-tokens"),
            (
                with(|c| c.max_seqs_per_batch = Some(0)),
                "--max-seqs-per-batch",
            ),
            (with(|c| c.threads = Some(0)), "--threads"),
        ];
        for (got, flag) in refused {
            assert!(
                got.as_ref().is_err_and(|m| m.contains(flag)),
                "{flag}: {got:?}"
            );
        }
    }
}
