//! Compiles the contracts with protox (pure Rust), so no system `protoc` is needed.
//! Generated code and the descriptor set (served by reflection) stay in OUT_DIR.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "llama_agent/common/v1/common.proto",
    "llama_agent/loader/v1/loader.proto",
    "llama_agent/generator/v1/generator.proto",
    "llama_agent/embedder/v1/embedder.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out.join("llama_agent_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
