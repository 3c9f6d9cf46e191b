//! llama-agent's loader: owns the model volume. Resolves model references against the
//! Hugging Face Hub (or a mirror), downloads resumably with MD5 in the same pass, publishes
//! atomically, evicts least recently used models under a size cap, and pins leased ones.

pub mod cache;
pub mod config;
pub mod error;
pub mod fetch;
mod file_stream;
pub mod hub;
pub mod loader;
mod metrics;
pub mod reference;
pub mod service;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use config::LoaderConfig;
pub use error::LoaderError;
use llama_agent_common::grpc::{Ready, ServeFailure};
use llama_agent_common::options::Plumbing;
use llama_agent_proto::loader::v1::loader_service_server::{LoaderServiceServer, SERVICE_NAME};
pub use loader::Loader;

/// How often last-used times reach the manifest; a crash loses at most this much LRU history.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Setup(#[from] llama_agent_common::grpc::GrpcSetupError),
    #[error(transparent)]
    Serve(#[from] ServeFailure),
}

const SERVICES: &[&str] = &[SERVICE_NAME];

/// The loader's router (health, reflection, LoaderService); ready as soon as the cache is open.
async fn build(
    config: &LoaderConfig,
    plumbing: &Plumbing,
) -> Result<(Ready, Arc<Loader>), ServeError> {
    let loader = Loader::new(config)?;
    let svc = LoaderServiceServer::new(service::LoaderGrpc::new(Arc::clone(&loader)))
        .max_decoding_message_size(plumbing.max_message_size)
        .max_encoding_message_size(plumbing.max_message_size);
    // Nothing to warm up: the cache is open.
    let warmup = Box::pin(std::future::ready(Ok(())));
    let ready = llama_agent_common::grpc::ready(svc, SERVICES, plumbing, warmup).await?;
    Ok((ready, loader))
}

fn spawn_flusher(loader: &Arc<Loader>) -> tokio::task::JoinHandle<()> {
    let loader = Arc::clone(loader);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tick.tick().await;
            if let Err(e) = loader.cache().flush() {
                tracing::warn!(error = %e, "writing last-used times");
            }
        }
    })
}

/// Serves the loader on `listener` until `shutdown` resolves. `main` and the tests call this.
pub async fn run(
    config: LoaderConfig,
    plumbing: Plumbing,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (ready, loader) = build(&config, &plumbing).await?;
    let flusher = spawn_flusher(&loader);
    tracing::info!(cache = %loader.cache().root().display(), "loader cache open");
    let served =
        llama_agent_common::grpc::serve_tcp("loader", ready, plumbing, listener, shutdown).await;
    flusher.abort();
    loader.cache().flush()?;
    Ok(served?)
}

/// The loader inside this process, reached through a channel that speaks the same gRPC.
pub async fn in_process(config: &LoaderConfig) -> Result<tonic::transport::Channel, ServeError> {
    let (ready, loader) = build(config, &Plumbing::plain()).await?;
    spawn_flusher(&loader);
    Ok(llama_agent_common::grpc::in_process_ready(ready).await?)
}
