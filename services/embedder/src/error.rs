//! The embedder's error type: the one every inference service shares, with its one mapping to
//! gRPC statuses (llama_agent_models::ServiceError).

pub use llama_agent_models::ServiceError as EmbedderError;
