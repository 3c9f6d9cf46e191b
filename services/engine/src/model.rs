//! Loading a GGUF model with llama.cpp.

use std::path::Path;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

use crate::{init_backend, EngineError};

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Layers to offload to the GPU (0 on CPU-only builds).
    pub n_gpu_layers: u32,
    /// llama.cpp threads for decoding and prompt processing.
    pub threads: i32,
}

/// What a loaded model is, for answers and validation.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub n_ctx_train: u32,
    pub n_embd: i32,
    pub n_vocab: i32,
    pub has_chat_template: bool,
    pub architecture: String,
}

pub(crate) fn load(path: &Path, opts: &LoadOptions) -> Result<LlamaModel, EngineError> {
    let backend = init_backend()?;
    // mmap (the default): the page cache shares the file across processes and reloads.
    let params = LlamaModelParams::default().with_n_gpu_layers(opts.n_gpu_layers);
    LlamaModel::load_from_file(backend, path, &params).map_err(|e| EngineError::Load {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn meta(model: &LlamaModel) -> ModelMeta {
    ModelMeta {
        n_ctx_train: model.n_ctx_train(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
        has_chat_template: model.chat_template(None).is_ok(),
        architecture: model
            .meta_val_str("general.architecture")
            .unwrap_or_default(),
    }
}
