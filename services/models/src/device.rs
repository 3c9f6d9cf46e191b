//! Where the inference services run their models: the flags (each with its variable) that the
//! generator and the embedder share, validated and turned into the engine's load options.

use llama_agent_engine::{KvCacheType, LoadOptions, SplitMode};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct DeviceConfig {
    /// Model layers offloaded to the GPU (default: all of them when a GPU module loaded, else
    /// 0). `GGML_CUDA=0` keeps the CUDA module out, so everything runs on the CPU.
    #[arg(long, env = "LLAMA_N_GPU_LAYERS")]
    pub n_gpu_layers: Option<u32>,

    /// The GPU used with --split-mode none (and for small tensors otherwise).
    #[arg(long, env = "LLAMA_MAIN_GPU", default_value_t = 0)]
    pub main_gpu: u32,

    /// How a model spreads over several GPUs: none (--main-gpu only), layer, or row.
    #[arg(long, env = "LLAMA_SPLIT_MODE", value_enum, default_value_t = Split::Layer)]
    pub split_mode: Split,

    /// KV cache type of keys: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl.
    #[arg(long, env = "LLAMA_CACHE_TYPE_K", value_enum, default_value_t = CacheType::F16)]
    pub cache_type_k: CacheType,

    /// KV cache type of values (quantized values need flash attention).
    #[arg(long, env = "LLAMA_CACHE_TYPE_V", value_enum, default_value_t = CacheType::F16)]
    pub cache_type_v: CacheType,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Split {
    None,
    #[default]
    Layer,
    Row,
}

/// KV cache element types llama.cpp accepts for the cache.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum CacheType {
    F32,
    #[default]
    F16,
    Bf16,
    Q8_0,
    Q5_1,
    Q5_0,
    Q4_1,
    Q4_0,
    Iq4Nl,
}

impl CacheType {
    fn kv(self) -> KvCacheType {
        match self {
            CacheType::F32 => KvCacheType::F32,
            CacheType::F16 => KvCacheType::F16,
            CacheType::Bf16 => KvCacheType::BF16,
            CacheType::Q8_0 => KvCacheType::Q8_0,
            CacheType::Q5_1 => KvCacheType::Q5_1,
            CacheType::Q5_0 => KvCacheType::Q5_0,
            CacheType::Q4_1 => KvCacheType::Q4_1,
            CacheType::Q4_0 => KvCacheType::Q4_0,
            CacheType::Iq4Nl => KvCacheType::IQ4_NL,
        }
    }
}

impl DeviceConfig {
    /// The engine's load options with `threads` llama.cpp threads (`None`: the engine's choice).
    pub fn load_options(&self, threads: Option<usize>) -> LoadOptions {
        LoadOptions {
            n_gpu_layers: self.n_gpu_layers,
            main_gpu: self.main_gpu,
            split_mode: match self.split_mode {
                Split::None => SplitMode::None,
                Split::Layer => SplitMode::Layer,
                Split::Row => SplitMode::Row,
            },
            cache_type_k: self.cache_type_k.kv(),
            cache_type_v: self.cache_type_v.kv(),
            threads: threads.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }
}

/// llama.cpp threads when `--threads` is not given: `OMP_NUM_THREADS` (as the seed guide
/// says); without it the engine chooses (see `LoadOptions::threads`).
pub fn env_threads() -> Option<usize> {
    std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.split(',').next()?.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
}
