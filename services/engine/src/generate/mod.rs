//! Text generation with continuous batching: up to `parallel` sequences share one llama.cpp
//! context and one decode step per token; new requests join between steps.

mod chat;
mod constraint;
mod engine;
mod gauges;
mod logprobs;
mod prompt_cache;
mod repetition;
mod request;
mod sample;
mod slot;

pub use chat::{ChatRenderer, TemplateSource};
pub use constraint::{Constraint, MAX_CONSTRAINT_BYTES};
pub use engine::{GenOccupancy, GenerateOptions, GenerationEngine};
pub use gauges::register_serving_gauges;
pub use logprobs::{TokenLogprob, MAX_TOP_LOGPROBS};
pub use request::{
    ChatMessage, FinishReason, GenDone, GenEvent, GenRequest, Prompt, Sampling, TemplateChoice,
};
