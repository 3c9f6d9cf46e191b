//! `llama-cli`: llama-agent from the command line. Every command talks gRPC through the client
//! crate, to a remote service (`--*-endpoint`) or to the same service run in this process.

mod agent;
mod cache;
mod chat;
mod embed;
mod generate;
mod inspect;
mod progress;
mod rerank;

use clap::{Parser, Subcommand};
use llama_agent_client::LoaderClient;
use llama_agent_common::telemetry::{self, LogFormat};
use llama_loader::LoaderConfig;
use tracing::Instrument;

#[derive(Parser, Debug)]
#[command(
    name = "llama-cli",
    version,
    about = "Local LLM inference on GGUF models: pull, cache, generate, embed, agents with MCP tools"
)]
struct Cli {
    /// Loader service (`host:port`, or replicas: `a:50051,b:50051`). Without it the loader
    /// runs inside this process.
    #[arg(long, env = "LLAMA_LOADER_ENDPOINT", global = true)]
    loader_endpoint: Option<String>,

    /// Log format on stderr (RUST_LOG sets the level; default warn).
    #[arg(long, env = "LLAMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Settings of the in-process loader (ignored with --loader-endpoint).
    #[command(flatten)]
    loader: LoaderConfig,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the model cache directory.
    CacheDir,
    /// Download a model into the cache (or import a local .gguf file) and print its path.
    Pull {
        /// `owner/repo`, `owner/repo:Q8_0`, `owner/repo/file.gguf`, with optional `@revision`; or a local path.
        model: String,
        /// Ask the hub again even when the model is cached.
        #[arg(long)]
        refresh: bool,
        /// Print the model as JSON instead of its path.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and manage the model cache.
    Cache {
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// Generate text, printed as it arrives.
    Generate(Box<generate::GenerateArgs>),
    /// Embed texts from a .txt/.jsonl file (or stdin) into a Parquet file.
    Embed(Box<embed::EmbedArgs>),
    /// What a model is, where it runs and how it is served (generator, or --embedder).
    Info(inspect::InfoArgs),
    /// A text as the model's token ids (and pieces).
    Tokenize(inspect::TokenizeArgs),
    /// Score documents from a .txt/.jsonl file against a query with a reranker, best first.
    Rerank(Box<rerank::RerankArgs>),
    /// One task with MCP tools: the model calls them until it answers (stdout, or JSON lines).
    Agent(Box<agent::AgentCmd>),
    /// An interactive chat in the terminal, with MCP tools and a resumable session file.
    Chat(Box<chat::ChatCmd>),
}

fn main() {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_none() {
        // Progress and results go to the terminal; logs only when asked for.
        std::env::set_var("RUST_LOG", "warn");
    }
    // In-process engines are freed before the process exits (llama_agent_engine::process).
    let result = llama_agent_engine::process::run(async {
        let telemetry = telemetry::init(cli.log_format, "llama-cli");
        // The root of this run's trace: every RPC below carries it to the services.
        let span = tracing::info_span!(
            "llama-cli",
            otel.name = %format!("llama-cli {}", cli.command.name())
        );
        let result = run(cli).instrument(span).await;
        telemetry.shutdown().await;
        result
    })
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    if let Err(e) = result {
        eprintln!("llama-cli: error: {e:#}");
        std::process::exit(1);
    }
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::CacheDir => "cache-dir",
            Command::Pull { .. } => "pull",
            Command::Cache { .. } => "cache",
            Command::Generate(_) => "generate",
            Command::Embed(_) => "embed",
            Command::Info(_) => "info",
            Command::Tokenize(_) => "tokenize",
            Command::Rerank(_) => "rerank",
            Command::Agent(_) => "agent",
            Command::Chat(_) => "chat",
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CacheDir => {
            let dir = match &cli.loader_endpoint {
                Some(ep) => LoaderClient::connect(ep)?.cache_status().await?.cache_dir,
                None => cli.loader.resolved_cache_dir()?.display().to_string(),
            };
            println!("{dir}");
            Ok(())
        }
        Command::Pull {
            model,
            refresh,
            json,
        } => {
            let loader = loader_client(&cli.loader_endpoint, &cli.loader).await?;
            cache::pull(&loader, &model, refresh, json).await
        }
        Command::Cache { command } => {
            let loader = loader_client(&cli.loader_endpoint, &cli.loader).await?;
            cache::run(&loader, command).await
        }
        Command::Generate(args) => {
            generate::run(*args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
        Command::Embed(args) => {
            embed::run(*args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
        Command::Info(args) => {
            inspect::info(args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
        Command::Tokenize(args) => {
            inspect::tokenize(args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
        Command::Rerank(args) => {
            rerank::run(*args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
        Command::Agent(args) => {
            agent::run(*args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
        Command::Chat(args) => {
            chat::run(*args, async || {
                loader_client(&cli.loader_endpoint, &cli.loader).await
            })
            .await
        }
    }
}

/// The remote loader, or one started in this process on the same code.
async fn loader_client(
    endpoint: &Option<String>,
    config: &LoaderConfig,
) -> anyhow::Result<LoaderClient> {
    Ok(match endpoint {
        Some(ep) => LoaderClient::connect(ep)?,
        None => LoaderClient::new(llama_loader::in_process(config).await?),
    })
}
