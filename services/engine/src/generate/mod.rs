//! Text generation with continuous batching: up to `parallel` sequences share one llama.cpp
//! context and one decode step per token; new requests join between steps.

mod engine;
mod request;
mod sample;
mod slot;

pub use engine::{GenOccupancy, GenerateOptions, GenerationEngine};
pub use request::{ChatMessage, FinishReason, GenDone, GenEvent, GenRequest, Prompt, Sampling};
