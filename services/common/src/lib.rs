//! What every llama-agent service binary shares, so that each service crate is only its own RPCs.

pub mod grpc;
pub mod signal;
pub mod telemetry;
