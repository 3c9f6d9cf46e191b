//! llama.cpp engines. A llama.cpp context is not shareable across threads, so each engine
//! is one named thread owning its model and context, fed by a bounded channel; callers
//! submit work and receive results over channels and never block an async runtime.

mod backend;
pub mod chat_template;
pub mod embed;
mod error;
pub mod generate;
mod metrics;
mod model;
pub mod process;
mod queue;
pub mod text;
mod tokenizer;
pub mod tools;

pub use backend::init_backend;
pub use backend::{devices, Device};
pub use error::EngineError;
pub use llama_cpp_2::context::params::KvCacheType;
pub use model::{LoadOptions, ModelMeta, SpecialTokens, SplitMode};
pub use tokenizer::Tokenizer;
