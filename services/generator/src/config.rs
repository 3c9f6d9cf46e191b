//! Generator settings: flags with environment fallbacks, validated before anything binds.

#[derive(clap::Args, Clone, Debug)]
pub struct GeneratorConfig {
    /// llama.cpp threads (default: OMP_NUM_THREADS, else every core, or one when every layer
    /// is on a GPU).
    #[arg(long, env = "LLAMA_GENERATOR_THREADS")]
    pub threads: Option<usize>,

    /// GPU offload, split and KV cache settings.
    #[command(flatten)]
    pub device: llama_agent_models::device::DeviceConfig,

    /// The node-local model cache, for clusters where the loader's volume is not shared.
    #[command(flatten)]
    pub node_cache: llama_agent_models::node_cache::NodeCacheConfig,

    /// Models kept loaded; the least recently used is unloaded (and its lease released) first.
    #[arg(long, env = "LLAMA_GENERATOR_MAX_MODELS", default_value_t = 1)]
    pub max_models: usize,

    /// Sequences decoded together in one context (continuous batching).
    #[arg(long, env = "LLAMA_GENERATOR_PARALLEL", default_value_t = 4)]
    pub parallel: u32,

    /// Context per sequence in tokens (0 = the model's, at most 4096).
    #[arg(long, env = "LLAMA_GENERATOR_CTX_SIZE", default_value_t = 4096)]
    pub ctx_size: u32,

    /// Tokens per decode call (prompt chunks plus one per generating sequence).
    #[arg(long, env = "LLAMA_GENERATOR_BATCH_SIZE", default_value_t = 512)]
    pub batch_size: u32,

    /// Requests waiting for a free sequence, per model, before RESOURCE_EXHAUSTED.
    #[arg(long, env = "LLAMA_GENERATOR_QUEUE_DEPTH", default_value_t = 64)]
    pub queue_depth: usize,

    /// Models to load before reporting SERVING (repeatable).
    #[arg(long, env = "LLAMA_GENERATOR_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,

    /// A Jinja chat template that replaces every model's own for chat requests that name none.
    #[arg(long, env = "LLAMA_GENERATOR_CHAT_TEMPLATE_FILE")]
    pub chat_template_file: Option<std::path::PathBuf>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            threads: None,
            device: Default::default(),
            node_cache: Default::default(),
            max_models: 1,
            parallel: 4,
            ctx_size: 4096,
            batch_size: 512,
            queue_depth: 64,
            preload: Vec::new(),
            chat_template_file: None,
        }
    }
}

impl GeneratorConfig {
    pub fn threads(&self) -> Option<usize> {
        self.threads
            .or_else(llama_agent_models::device::env_threads)
    }

    /// The template file's text, checked to compile.
    pub fn chat_template(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.chat_template_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--chat-template-file {}: {e}", path.display()))?;
        llama_agent_engine::chat_template::ChatTemplate::new(&text, &Default::default())
            .map_err(|e| format!("--chat-template-file {}: {e}", path.display()))?;
        Ok(Some(text))
    }

    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.threads == Some(0), "--threads must be at least 1"),
            (self.max_models == 0, "--max-models must be at least 1"),
            (
                self.parallel == 0 || self.parallel > 256,
                "--parallel must be 1 to 256",
            ),
            (
                self.batch_size < self.parallel,
                "--batch-size must be at least --parallel",
            ),
            (self.queue_depth == 0, "--queue-depth must be at least 1"),
            (
                self.ctx_size != 0 && self.ctx_size < 16,
                "--ctx-size must be 0 or at least 16",
            ),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(msg.to_string()),
            None => Ok(()),
        }
    }
}
