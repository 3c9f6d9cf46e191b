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
