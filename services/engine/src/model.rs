//! Loading a GGUF model with llama.cpp, on the devices the backend found.

use std::path::Path;
use std::time::Instant;

use llama_cpp_2::context::params::KvCacheType;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::model::LlamaModel;

use crate::backend::{self, Backend};
use crate::{init_backend, EngineError};

/// How a model is spread over the devices, and its KV cache.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Layers offloaded to the GPU; `None`: every layer when a GPU module loaded, else none.
    pub n_gpu_layers: Option<u32>,
    /// The GPU that holds the whole model with split mode `none` (and small tensors otherwise).
    pub main_gpu: u32,
    pub split_mode: SplitMode,
    /// KV cache element types (llama.cpp's default: F16).
    pub cache_type_k: KvCacheType,
    pub cache_type_v: KvCacheType,
    /// llama.cpp threads for decoding and prompt processing; `None`: see [`threads`].
    pub threads: Option<u32>,
}

/// How a model spreads over several GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitMode {
    /// One GPU (`main_gpu`).
    None,
    /// Whole layers per GPU, in proportion to their memory.
    #[default]
    Layer,
    /// Rows of each tensor across GPUs.
    Row,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            n_gpu_layers: None,
            main_gpu: 0,
            split_mode: SplitMode::Layer,
            cache_type_k: KvCacheType::F16,
            cache_type_v: KvCacheType::F16,
            threads: None,
        }
    }
}

/// What a loaded model is and where it runs, for answers and validation.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub n_ctx_train: u32,
    pub n_embd: i32,
    pub n_vocab: i32,
    pub n_layer: u32,
    pub n_params: u64,
    /// Bytes of the weights.
    pub size: u64,
    /// The weight type `general.file_type` names (`Q4_K_M`), or empty.
    pub quantization: String,
    pub has_chat_template: bool,
    pub architecture: String,
    pub special: SpecialTokens,
    /// Layers on a GPU, of `n_layer + 1` (the output layer counts).
    pub gpu_layers: u32,
    /// `CUDA0 (27/27 layers)` or `CPU`.
    pub placement: String,
    pub cpu_variant: String,
    /// llama.cpp threads of each context.
    pub threads: u32,
}

/// A model's special tokens; -1 where it has none.
#[derive(Clone, Copy, Debug)]
pub struct SpecialTokens {
    pub bos: i32,
    pub eos: i32,
    pub eot: i32,
    pub sep: i32,
    pub nl: i32,
    pub pad: i32,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// llama.cpp's "every layer" (more than any model has; the output layer counts too).
const ALL_LAYERS: u32 = 9999;

pub(crate) fn load(path: &Path, opts: &LoadOptions) -> Result<LlamaModel, EngineError> {
    let backend = init_backend()?;
    let started = Instant::now();
    let gpu_layers = gpu_layers(backend, opts);
    if gpu_layers > 0 {
        check_fits(path, opts)?;
    }
    let split = match opts.split_mode {
        SplitMode::None => LlamaSplitMode::None,
        SplitMode::Layer => LlamaSplitMode::Layer,
        SplitMode::Row => LlamaSplitMode::Row,
    };
    // mmap (the default): the page cache shares the file across processes and reloads.
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(gpu_layers)
        .with_main_gpu(opts.main_gpu as i32)
        .with_split_mode(split);
    let model = LlamaModel::load_from_file(backend.llama(), path, &params).map_err(|e| {
        EngineError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    })?;
    let devices = backend::devices();
    backend::record_memory(&devices);
    tracing::info!(
        file = %path.file_name().unwrap_or_default().to_string_lossy(),
        cpu = %backend.cpu_variant,
        device = %placement(backend, &model, gpu_layers),
        ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(model)
}

fn gpu_layers(backend: &Backend, opts: &LoadOptions) -> u32 {
    opts.n_gpu_layers
        .unwrap_or(if backend.has_gpu() { ALL_LAYERS } else { 0 })
}

/// CPU threads of a model's contexts when none were asked for.
/// With every layer on a GPU, the CPU only runs a few small ops per batch, and each one pays an
/// OpenMP barrier across all threads: on the H200 machine, embedding MiniLM ran at 9.5k texts/s
/// with 1 thread against 7.7k with 16.
const THREADS_ALL_ON_GPU: u32 = 1;

/// The threads for `model`'s contexts: the asked-for count, else every core, or
/// [`THREADS_ALL_ON_GPU`] when the GPU holds every layer.
pub(crate) fn threads(model: &LlamaModel, opts: &LoadOptions) -> i32 {
    let n = opts.threads.unwrap_or_else(|| {
        if all_on_gpu(model, opts) {
            THREADS_ALL_ON_GPU
        } else {
            std::thread::available_parallelism().map_or(4, |n| n.get() as u32)
        }
    });
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Whether a GPU holds every layer of `model` (and its output layer).
pub(crate) fn all_on_gpu(model: &LlamaModel, opts: &LoadOptions) -> bool {
    init_backend().is_ok_and(|b| b.has_gpu() && gpu_layers(b, opts) > model.n_layer())
}

/// `CUDA0 (27/27 layers)`, or `CPU`.
fn placement(backend: &Backend, model: &LlamaModel, gpu_layers: u32) -> String {
    let gpus: Vec<&str> = backend
        .devices
        .iter()
        .filter(|d| d.gpu)
        .map(|d| d.name.as_str())
        .collect();
    if gpus.is_empty() || gpu_layers == 0 {
        return "CPU".into();
    }
    // llama.cpp offloads the last `gpu_layers` of n_layer + 1 (the output layer).
    let total = model.n_layer() + 1;
    format!(
        "{} ({}/{total} layers)",
        gpus.join("+"),
        gpu_layers.min(total)
    )
}

/// A model that cannot fit is refused before llama.cpp tries (a failed device allocation
/// there can abort the process): its file size against the free memory of the GPUs.
fn check_fits(path: &Path, opts: &LoadOptions) -> Result<(), EngineError> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let devices = backend::devices();
    let gpus: Vec<&backend::Device> = devices.iter().filter(|d| d.gpu).collect();
    let free: u64 = match opts.split_mode {
        SplitMode::None => gpus
            .get(opts.main_gpu as usize)
            .map_or(0, |d| d.memory_free),
        SplitMode::Layer | SplitMode::Row => gpus.iter().map(|d| d.memory_free).sum(),
    };
    // Only a full offload is checked: with fewer layers the share on the GPU is the caller's call.
    if opts.n_gpu_layers.is_none_or(|n| n >= ALL_LAYERS) && !gpus.is_empty() && size > free {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(EngineError::DoesNotFit(format!(
            "the model's weights take {:.2} GiB but the GPU has {:.2} GiB free; \
             offload fewer layers (--n-gpu-layers) or free the GPU",
            gib(size),
            gib(free)
        )));
    }
    Ok(())
}

pub(crate) fn meta(model: &LlamaModel, opts: &LoadOptions) -> ModelMeta {
    let vocab = model.vocab();
    let id = |t: llama_cpp_2::token::LlamaToken| if t.0 < 0 { -1 } else { t.0 };
    let (gpu_layers, placement, cpu_variant) = match init_backend() {
        Ok(b) => {
            let n = gpu_layers(b, opts).min(model.n_layer() + 1);
            let n = if b.has_gpu() { n } else { 0 };
            (n, placement(b, model, n), b.cpu_variant.clone())
        }
        Err(_) => (0, "CPU".into(), String::new()),
    };
    ModelMeta {
        n_ctx_train: model.n_ctx_train(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
        n_layer: model.n_layer(),
        n_params: model.n_params(),
        size: model.size(),
        quantization: model
            .meta_val_str("general.file_type")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map(file_type_name)
            .unwrap_or_default(),
        has_chat_template: model.chat_template(None).is_ok(),
        architecture: model
            .meta_val_str("general.architecture")
            .unwrap_or_default(),
        special: SpecialTokens {
            bos: id(vocab.bos()),
            eos: id(vocab.eos()),
            eot: id(vocab.eot()),
            sep: id(vocab.sep()),
            nl: id(vocab.nl()),
            pad: id(vocab.pad()),
            add_bos: vocab.should_add_bos(),
            add_eos: vocab.should_add_eos(),
        },
        gpu_layers,
        placement,
        cpu_variant,
        threads: threads(model, opts).max(0) as u32,
    }
}

/// llama.h's `llama_ftype` values by name (the common ones; others print as a number).
fn file_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        25 => "IQ4_NL",
        30 => "IQ4_XS",
        32 => "BF16",
        _ => return format!("file type {t}"),
    };
    name.to_string()
}
