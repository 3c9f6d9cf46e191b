//! llama-agent's versioned gRPC contracts. Every other crate uses these types; none generates its own.

/// Encoded `FileDescriptorSet` of every contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/llama_agent_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("llama_agent.common.v1");
    }
}

pub mod loader {
    pub mod v1 {
        tonic::include_proto!("llama_agent.loader.v1");
    }
}

pub mod generator {
    pub mod v1 {
        tonic::include_proto!("llama_agent.generator.v1");
    }
}

pub mod embedder {
    pub mod v1 {
        tonic::include_proto!("llama_agent.embedder.v1");
    }
}

/// The canonical upper-case name operators know from grpcurl (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
