//! `llama-loader`: the model-volume service.

use clap::Parser;
use llama_agent_common::options::ServerOptions;
use llama_agent_common::telemetry::{self, LogFormat};
use llama_loader::LoaderConfig;

/// Serves llama_agent.loader.v1.LoaderService: resolves, downloads, verifies and caches GGUF models.
#[derive(Parser, Debug)]
#[command(name = "llama-loader", version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LLAMA_LOADER_LISTEN", default_value = "0.0.0.0:50051")]
    listen: std::net::SocketAddr,

    /// Log format on stderr.
    #[arg(long, env = "LLAMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(flatten)]
    server: ServerOptions,

    #[command(flatten)]
    loader: LoaderConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = telemetry::init(args.log_format, "llama-loader");
    let served = serve(args).await;
    telemetry.shutdown().await;
    served
}

async fn serve(args: Args) -> anyhow::Result<()> {
    args.loader.validate()?;
    let plumbing = args.server.resolve().await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    llama_loader::run(
        args.loader,
        plumbing,
        listener,
        llama_agent_common::signal::terminate(),
    )
    .await?;
    Ok(())
}
