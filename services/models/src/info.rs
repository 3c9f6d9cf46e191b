//! The answers both inference services give about a served model: what it is, where it runs,
//! and its tokenizer both ways (off the async runtime: a long text takes a while).

use llama_agent_client::proto::common::v1 as common;
use llama_agent_client::proto::common::v1::ModelInfo;
use llama_agent_engine::{ModelMeta, Tokenizer};

use crate::ServiceError;

/// The model part of GetModelInfo: `meta` from the engine, `info` from the loader.
pub fn served_model(meta: &ModelMeta, info: &ModelInfo, was_loaded: bool) -> common::ServedModel {
    let s = meta.special;
    common::ServedModel {
        reference: info.reference.clone(),
        md5: info.md5.clone(),
        file: info.file.clone(),
        architecture: meta.architecture.clone(),
        parameters: meta.n_params,
        size_bytes: meta.size,
        quantization: meta.quantization.clone(),
        context_length_trained: meta.n_ctx_train,
        vocab_size: meta.n_vocab.max(0) as u32,
        embedding_length: meta.n_embd.max(0) as u32,
        layers: meta.n_layer,
        special_tokens: Some(common::SpecialTokens {
            bos: s.bos,
            eos: s.eos,
            eot: s.eot,
            sep: s.sep,
            nl: s.nl,
            pad: s.pad,
            add_bos: s.add_bos,
            add_eos: s.add_eos,
        }),
        was_loaded,
        gpu_layers: meta.gpu_layers,
        placement: meta.placement.clone(),
        cpu_variant: meta.cpu_variant.clone(),
        devices: llama_agent_engine::devices()
            .into_iter()
            .map(|d| common::Device {
                name: d.name,
                description: d.description,
                gpu: d.gpu,
                memory_total_bytes: d.memory_total,
                memory_free_bytes: d.memory_free,
            })
            .collect(),
        threads: meta.threads,
    }
}

/// Token ids of `text`, and each token's bytes when `with_pieces`.
pub async fn tokenize(
    tokenizer: Tokenizer,
    text: String,
    add_special: bool,
    parse_special: bool,
    with_pieces: bool,
) -> Result<(Vec<i32>, Vec<Vec<u8>>), ServiceError> {
    blocking(move || {
        let ids = tokenizer.tokenize(&text, add_special, parse_special);
        let pieces = if with_pieces {
            tokenizer.pieces(&ids)?
        } else {
            Vec::new()
        };
        Ok((ids, pieces))
    })
    .await
}

/// The text of `ids`.
pub async fn detokenize(
    tokenizer: Tokenizer,
    ids: Vec<i32>,
    render_special: bool,
) -> Result<String, ServiceError> {
    blocking(move || Ok(tokenizer.detokenize(&ids, render_special)?)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ServiceError::Engine(llama_agent_engine::EngineError::Backend(e.to_string()))
    })?
}
