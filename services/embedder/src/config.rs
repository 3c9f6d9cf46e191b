//! Embedder settings: flags with environment fallbacks, validated before anything binds.

use llama_agent_engine::embed::MAX_SEQS;

#[derive(clap::Args, Clone, Debug)]
pub struct EmbedderConfig {
    /// llama.cpp threads (default: OMP_NUM_THREADS, else every core).
    #[arg(long, env = "LLAMA_EMBEDDER_THREADS")]
    pub threads: Option<usize>,

    /// GPU offload, split and KV cache settings.
    #[command(flatten)]
    pub device: llama_agent_models::device::DeviceConfig,

    /// Models kept loaded; the least recently used is unloaded (and its lease released) first.
    #[arg(long, env = "LLAMA_EMBEDDER_MAX_MODELS", default_value_t = 1)]
    pub max_models: usize,

    /// Tokens per llama.cpp batch, packed from many texts (and requests). Also the most
    /// tokens one text may have: a text is never split across batches. Attention runs over
    /// the whole packed batch, so bigger is not faster: 512 measured as fast as 2048 on short
    /// texts with a third less memory; raise it for long texts.
    #[arg(long, env = "LLAMA_EMBEDDER_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: u32,

    /// Flash attention (where llama.cpp supports it): about twice as fast on CPU, but it rounds
    /// attention inputs to F16, so a vector then depends on its batch by up to ~2e-4 per value.
    /// `false` gives packing-independent vectors (to ~1e-6 on F32 weights).
    #[arg(long, env = "LLAMA_EMBEDDER_FLASH_ATTENTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub flash_attention: bool,

    /// Texts per llama.cpp batch at most.
    #[arg(long, env = "LLAMA_EMBEDDER_MAX_SEQS_PER_BATCH", default_value_t = 64)]
    pub max_seqs_per_batch: u32,

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
            max_models: 1,
            max_batch_tokens: 512,
            flash_attention: true,
            max_seqs_per_batch: 64,
            queue_depth: 64,
            preload: Vec::new(),
        }
    }
}

impl EmbedderConfig {
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(llama_agent_models::device::default_threads)
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
                self.max_batch_tokens < 8,
                "--max-batch-tokens must be at least 8".to_string(),
            ),
            (
                self.max_seqs_per_batch == 0 || self.max_seqs_per_batch > MAX_SEQS,
                format!("--max-seqs-per-batch must be 1 to {MAX_SEQS}"),
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
