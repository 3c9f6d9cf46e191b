//! One typed async client for llama-agent's services: endpoints, default deadlines, retries
//! with backoff for idempotent calls, server streams as `futures::Stream`. An endpoint may
//! name several replicas (a list, or a DNS name with several addresses): calls spread over
//! them by power of two choices, and retries move to another replica.

mod affinity;
mod balance;
mod call;
pub mod embedder;
mod error;
pub mod generator;
pub mod loader;
mod replicas;
mod retry;

pub use call::{CallContext, ConnectOptions, Transport};
pub use embedder::EmbedderClient;
pub use error::ClientError;
pub use generator::GeneratorClient;
pub use llama_agent_proto as proto;
pub use loader::LoaderClient;
pub use replicas::{parse_endpoints, Target, MAX_REPLICAS, RESOLVE_EVERY};
pub use retry::RetryPolicy;

use std::time::Duration;

/// Deadline of unary calls unless the caller sets one.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
