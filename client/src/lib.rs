//! One typed async client for llama-agent's services: endpoints, default deadlines, retries
//! with backoff for idempotent calls, server streams as `futures::Stream`.

pub mod embedder;
mod error;
pub mod generator;
pub mod loader;
mod retry;

pub use embedder::EmbedderClient;
pub use error::ClientError;
pub use generator::GeneratorClient;
pub use llama_agent_proto as proto;
pub use loader::LoaderClient;
pub use retry::RetryPolicy;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Deadline of unary calls unless the caller sets one.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// A lazily connecting channel to `uri` (`http://host:port`, or `host:port`).
pub fn channel(uri: &str) -> Result<Channel, ClientError> {
    let uri = if uri.contains("://") {
        uri.to_string()
    } else {
        format!("http://{uri}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| ClientError::InvalidEndpoint(format!("{uri}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}
