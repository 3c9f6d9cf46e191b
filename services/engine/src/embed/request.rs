//! What an embedding request says and what comes back.

use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Average of every token's vector (special tokens included, as sentence-transformers).
    Mean,
    /// The first token's vector (BERT's [CLS]).
    Cls,
    /// The last token's vector (causal embedding models).
    Last,
    /// A cross-encoder's classification head over the whole (query, document) pair: scores,
    /// not vectors, computed by llama.cpp (rerankers only).
    Rank,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
            Pooling::Rank => "rank",
        }
    }
}

/// Per-request settings, already validated by the caller.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbedParams {
    /// `None`: the model's own pooling.
    pub pooling: Option<Pooling>,
    pub normalize: bool,
    /// Tokens per text at most (0 = as many as the engine takes).
    pub max_length: u32,
    /// Cut longer texts (reported per row) instead of rejecting the request.
    pub truncate: bool,
    /// Keep the first N dimensions (0 = all); renormalized when `normalize`.
    pub dimensions: u32,
    /// Text put before each text before it is tokenized (an instruction, a `query: ` prefix).
    pub prefix: String,
}

impl Default for EmbedParams {
    fn default() -> Self {
        Self {
            pooling: None,
            normalize: true,
            max_length: 0,
            truncate: true,
            dimensions: 0,
            prefix: String::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EmbedRequest {
    pub texts: Vec<String>,
    pub params: EmbedParams,
    /// Past this instant the request's remaining texts are dropped (gRPC deadline).
    pub deadline: Option<Instant>,
    /// The request's span, entered on the engine thread while it works for this request.
    pub span: tracing::Span,
}

/// A query scored against documents by a reranker, each pair one sequence.
#[derive(Clone, Debug)]
pub struct RerankRequest {
    pub query: String,
    pub documents: Vec<String>,
    /// Cut a document whose pair is too long (reported per row) instead of rejecting.
    pub truncate: bool,
    pub deadline: Option<Instant>,
    pub span: tracing::Span,
}

/// Row-major vectors, one per text, in request order. For a reranker, the classification
/// head's outputs per document (`dim` of them, the first being the score).
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    pub dim: usize,
    pub vectors: Vec<f32>,
    pub token_counts: Vec<u32>,
    pub truncated: Vec<bool>,
    pub pooling: Pooling,
    pub normalized: bool,
}
