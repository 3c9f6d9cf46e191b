//! Embeddings: texts from any number of concurrent requests are packed, many sequences per
//! llama.cpp batch up to a token budget, on one engine thread per model (or a few, each with its
//! own context, sharing the model and its queue); vectors are pooled,
//! truncated (Matryoshka) and normalized here, so a request may choose its own pooling.
//! A reranker (pooling rank) is served the same way: each (query, document) pair is one
//! sequence, and llama.cpp's classification head gives its scores.

mod batcher;
mod engine;
mod layout;
mod pairs;
mod request;
mod vectors;

pub use engine::{EmbeddingEngine, EmbeddingOptions, Reply, Serving, MAX_CONTEXTS, MAX_SEQS};
pub use request::{EmbedParams, EmbedRequest, Embedded, Pooling, RerankRequest};
