//! One typed async client for llama-agent's services: endpoints, default deadlines, retries
//! with backoff for idempotent calls, server streams as `futures::Stream`. An endpoint may
//! name several replicas (a list, or a DNS name with several addresses): calls spread over
//! them by power of two choices, and retries move to another replica.
//!
//! The agent side: a [`Session`] (a conversation with its tools, saved as JSON), MCP tool
//! servers ([`McpTools`]) and the loop that runs the model's tool calls ([`Agent`]).

mod affinity;
pub mod agent;
mod balance;
mod call;
pub mod embedder;
mod error;
pub mod generator;
pub mod loader;
pub mod mcp;
mod replicas;
mod retry;
pub mod session;

pub use agent::{Agent, AgentEvent, AgentOutcome, Finish};
pub use call::{CallContext, ConnectOptions, Transport};
pub use embedder::EmbedderClient;
pub use error::{AgentError, ClientError};
pub use generator::GeneratorClient;
pub use llama_agent_proto as proto;
pub use loader::LoaderClient;
pub use mcp::{McpOptions, McpTools, ServerSpec, ToolOutcome};
pub use replicas::{parse_endpoints, Target, MAX_REPLICAS, RESOLVE_EVERY};
pub use retry::RetryPolicy;
pub use session::{Session, ToolChoice};

use std::time::Duration;

/// Deadline of unary calls unless the caller sets one.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
