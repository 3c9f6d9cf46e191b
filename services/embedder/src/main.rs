//! `llama-embedder`: the embedding service.

use clap::Parser;
use llama_agent_client::LoaderClient;
use llama_agent_common::options::ServerOptions;
use llama_agent_common::telemetry::{self, LogFormat};
use llama_embedder::EmbedderConfig;

/// Serves llama_agent.embedder.v1.EmbedderService on GGUF models the loader provides.
#[derive(Parser, Debug)]
#[command(name = "llama-embedder", version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LLAMA_EMBEDDER_LISTEN", default_value = "0.0.0.0:50053")]
    listen: std::net::SocketAddr,

    /// Also serve the OpenAI-compatible HTTP API (`/v1/embeddings`, `/v1/rerank`,
    /// `/v1/models`) on this address (off when unset).
    #[arg(long, env = "LLAMA_EMBEDDER_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,

    /// The loader service (`host:port`).
    #[arg(long, env = "LLAMA_LOADER_ENDPOINT", default_value = "127.0.0.1:50051")]
    loader_endpoint: String,

    /// Log format on stderr.
    #[arg(long, env = "LLAMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(flatten)]
    server: ServerOptions,

    #[command(flatten)]
    embedder: EmbedderConfig,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Engines are freed before the process exits (llama_agent_engine::process).
    llama_agent_engine::process::run(async {
        let telemetry = telemetry::init(args.log_format, "llama-embedder");
        let served = serve(args).await;
        telemetry.shutdown().await;
        served
    })?
}

async fn serve(args: Args) -> anyhow::Result<()> {
    args.embedder.validate().map_err(anyhow::Error::msg)?;
    let plumbing = args.server.resolve().await?;
    let loader = LoaderClient::connect(&args.loader_endpoint)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let http = llama_agent_common::openai::bind(args.http_listen).await?;
    llama_embedder::run(
        args.embedder,
        plumbing,
        loader,
        listener,
        http,
        llama_agent_common::signal::terminate(),
    )
    .await?;
    Ok(())
}
