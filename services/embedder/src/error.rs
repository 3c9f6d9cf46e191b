//! The embedder's one error type, and its one mapping to gRPC statuses.

use llama_agent_engine::EngineError;
use llama_agent_models::PoolError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum EmbedderError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<EmbedderError> for Status {
    fn from(e: EmbedderError) -> Self {
        let msg = e.to_string();
        match e {
            EmbedderError::Invalid(_) => Status::invalid_argument(msg),
            EmbedderError::Pool(p) => Status::new(p.code(), msg),
            EmbedderError::Engine(e) => Status::new(llama_agent_models::engine_code(&e), msg),
        }
    }
}
