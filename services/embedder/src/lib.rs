//! llama-agent's embedder: a stateless service embedding batches of texts with GGUF models.
//! Models come from the loader (leased while loaded); each loaded model is one engine thread
//! that packs texts of every concurrent request into llama.cpp batches.

pub mod config;
mod convert;
mod error;
mod openai;
mod rerank;
pub mod service;
mod stream;

use std::future::Future;
use std::sync::Arc;

pub use config::EmbedderConfig;
pub use convert::MAX_TEXTS;
pub use error::EmbedderError;
use llama_agent_client::LoaderClient;
use llama_agent_common::grpc::Ready;
pub use llama_agent_common::grpc::ServeError;
use llama_agent_common::options::Plumbing;
use llama_agent_engine::embed::{EmbeddingEngine, EmbeddingOptions};
use llama_agent_models::ModelPool;
use llama_agent_proto::embedder::v1::embedder_service_server::{
    EmbedderServiceServer, SERVICE_NAME,
};

const SERVICES: &[&str] = &[SERVICE_NAME];

fn pool(
    config: &EmbedderConfig,
    loader: LoaderClient,
) -> Result<Arc<ModelPool<EmbeddingEngine>>, String> {
    let opts = EmbeddingOptions {
        load: config.device.load_options(config.threads()),
        max_batch_tokens: config.max_batch_tokens,
        max_seqs_per_batch: config.max_seqs_per_batch,
        contexts: config.contexts,
        queue: config.queue_depth,
        flash_attention: config.flash_attention,
        pad_batches: config.pad_batches,
    };
    let holder = llama_agent_models::lease_holder("llama-embedder");
    let node_cache =
        llama_agent_models::node_cache::NodeCache::open(&config.node_cache, loader.clone())?;
    Ok(ModelPool::new(
        loader,
        holder,
        config.max_models,
        node_cache,
        Arc::new(move |path| EmbeddingEngine::load(path, opts.clone())),
    ))
}

/// The router (health, reflection, EmbedderService), its warm-up (preloads), and the pool
/// both fronts share.
async fn build(
    config: &EmbedderConfig,
    loader: LoaderClient,
    plumbing: &Plumbing,
) -> Result<(Ready, Arc<ModelPool<EmbeddingEngine>>), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let pool = pool(config, loader).map_err(ServeError::Config)?;
    let svc = EmbedderServiceServer::new(service::EmbedderGrpc::new(Arc::clone(&pool)))
        .max_decoding_message_size(plumbing.max_message_size)
        .max_encoding_message_size(plumbing.max_message_size);
    let warmup = pool.warmup(config.preload.clone());
    let ready = llama_agent_common::grpc::ready(svc, SERVICES, plumbing, warmup).await?;
    Ok((ready, pool))
}

/// Serves the embedder on `listener` (gRPC) and, when given, the OpenAI-compatible HTTP API
/// on `http`, until `shutdown` resolves (then both drain). `main` and the tests call this.
pub async fn run(
    config: EmbedderConfig,
    plumbing: Plumbing,
    loader: LoaderClient,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (ready, pool) = build(&config, loader, &plumbing).await?;
    let http = http.map(|listener| (listener, openai::router(pool)));
    Ok(llama_agent_common::openai::serve_with_grpc(
        "embedder", ready, plumbing, listener, http, shutdown,
    )
    .await?)
}

/// The embedder inside this process, reached through a channel that speaks the same gRPC.
pub async fn in_process(
    config: &EmbedderConfig,
    loader: LoaderClient,
) -> Result<tonic::transport::Channel, ServeError> {
    let (ready, _) = build(config, loader, &Plumbing::plain()).await?;
    Ok(llama_agent_common::grpc::in_process_ready(ready).await?)
}
