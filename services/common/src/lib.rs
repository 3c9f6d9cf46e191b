//! What every llama-agent service binary shares, so that each service crate is only its own RPCs.

pub mod gate;
pub mod grpc;
pub mod linger;
pub mod metrics;
pub mod openai;
pub mod options;
pub mod signal;
pub mod telemetry;
