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
            EmbedderError::Engine(e) => match e {
                EngineError::InvalidRequest(_) => Status::invalid_argument(msg),
                EngineError::QueueFull(_) => Status::resource_exhausted(msg),
                EngineError::Stopped => Status::unavailable(msg),
                EngineError::Load { .. } => Status::failed_precondition(msg),
                EngineError::Backend(_) | EngineError::Llama(_) => Status::internal(msg),
            },
        }
    }
}
