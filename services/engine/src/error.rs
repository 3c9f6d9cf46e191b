#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("loading model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("{0}")]
    InvalidRequest(String),
    /// The model cannot do what was asked (embedding with a reranker, or the reverse).
    #[error("{0}")]
    Unsupported(String),
    #[error("request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the engine stopped")]
    Stopped,
    #[error("llama.cpp: {0}")]
    Llama(String),
    /// The model does not fit the device's free memory (sizes in the message).
    #[error("{0}")]
    DoesNotFit(String),
}
