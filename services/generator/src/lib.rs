//! llama-agent's generator: a stateless service streaming tokens from GGUF models. Models
//! come from the loader (leased while loaded); each loaded model is one engine thread that
//! decodes up to `--parallel` sequences per step.

pub mod config;
mod openai;
pub mod service;
mod tools;
mod validate;

use std::future::Future;
use std::sync::Arc;

pub use config::GeneratorConfig;
use llama_agent_client::LoaderClient;
use llama_agent_common::grpc::Ready;
pub use llama_agent_common::grpc::ServeError;
use llama_agent_common::options::Plumbing;
use llama_agent_engine::generate::{GenerateOptions, GenerationEngine};
use llama_agent_models::ModelPool;
use llama_agent_proto::generator::v1::generator_service_server::{
    GeneratorServiceServer, SERVICE_NAME,
};

const SERVICES: &[&str] = &[SERVICE_NAME];

fn pool(
    config: &GeneratorConfig,
    loader: LoaderClient,
    chat_template: Option<String>,
) -> Result<Arc<ModelPool<GenerationEngine>>, String> {
    let opts = GenerateOptions {
        load: config.device.load_options(config.threads()),
        ctx_per_seq: config.ctx_size,
        parallel: config.parallel,
        n_batch: config.batch_size,
        queue: config.queue_depth,
        chat_template,
    };
    let holder = llama_agent_models::lease_holder("llama-generator");
    let node_cache =
        llama_agent_models::node_cache::NodeCache::open(&config.node_cache, loader.clone())?;
    Ok(ModelPool::new(
        loader,
        holder,
        config.max_models,
        node_cache,
        Arc::new(move |path| GenerationEngine::load(path, opts.clone())),
    ))
}

/// The router (health, reflection, GeneratorService), its warm-up (preloads), and the pool
/// both fronts share.
async fn build(
    config: &GeneratorConfig,
    loader: LoaderClient,
    plumbing: &Plumbing,
) -> Result<(Ready, Arc<ModelPool<GenerationEngine>>), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let chat_template = config.chat_template().map_err(ServeError::Config)?;
    let pool = pool(config, loader, chat_template).map_err(ServeError::Config)?;
    llama_agent_engine::generate::register_serving_gauges();
    let svc = GeneratorServiceServer::new(service::GeneratorGrpc::new(Arc::clone(&pool)))
        .max_decoding_message_size(plumbing.max_message_size)
        .max_encoding_message_size(plumbing.max_message_size);
    let warmup = pool.warmup(config.preload.clone());
    let ready = llama_agent_common::grpc::ready(svc, SERVICES, plumbing, warmup).await?;
    Ok((ready, pool))
}

/// Serves the generator on `listener` (gRPC) and, when given, the OpenAI-compatible HTTP API
/// on `http`, until `shutdown` resolves (then both drain). `main` and the tests call this.
pub async fn run(
    config: GeneratorConfig,
    plumbing: Plumbing,
    loader: LoaderClient,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (ready, pool) = build(&config, loader, &plumbing).await?;
    let http = http.map(|listener| (listener, openai::router(pool)));
    Ok(llama_agent_common::openai::serve_with_grpc(
        "generator",
        ready,
        plumbing,
        listener,
        http,
        shutdown,
    )
    .await?)
}

/// The generator inside this process, reached through a channel that speaks the same gRPC.
pub async fn in_process(
    config: &GeneratorConfig,
    loader: LoaderClient,
) -> Result<tonic::transport::Channel, ServeError> {
    let (ready, _) = build(config, loader, &Plumbing::plain()).await?;
    Ok(llama_agent_common::grpc::in_process_ready(ready).await?)
}
