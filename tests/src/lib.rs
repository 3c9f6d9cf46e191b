//! Test support shared by llama-agent's integration tests and benchmarks.

pub mod http;
pub mod mirror;
pub mod peer;
pub mod support;
