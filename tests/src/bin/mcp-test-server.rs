//! An MCP server (rmcp) for the agent's fault cases: a tool that answers, one that takes its
//! time (timeouts), one that fails (`isError`), one that makes the server exit (restarts),
//! and one that tells its process id (so a test can kill the server from outside).
//! On stdio by default; `--http ADDR` serves streamable HTTP at `http://ADDR/mcp` instead and
//! prints `listening on URL` first.

use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoArgs {
    /// The text to send back.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SlowArgs {
    /// How long to wait before answering, in seconds.
    seconds: u64,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct FailArgs {
    /// The error message.
    message: String,
}

#[derive(Debug, Clone)]
struct FaultServer {
    #[allow(dead_code)] // read by the tool_handler macro
    tool_router: ToolRouter<Self>,
}

impl FaultServer {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }
}

#[tool_router]
impl FaultServer {
    #[tool(description = "Sends the text back.")]
    fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        text
    }

    #[tool(description = "Answers after the given number of seconds.")]
    async fn slow(&self, Parameters(SlowArgs { seconds }): Parameters<SlowArgs>) -> String {
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        format!("waited {seconds} s")
    }

    #[tool(description = "Fails with the given message.")]
    fn fail(&self, Parameters(FailArgs { message }): Parameters<FailArgs>) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(message)])
    }

    #[tool(description = "Makes the server exit without answering.")]
    fn exit(&self) -> String {
        std::process::exit(3)
    }

    #[tool(description = "The server's process id.")]
    fn pid(&self) -> String {
        std::process::id().to_string()
    }
}

#[tool_handler]
impl ServerHandler for FaultServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            let server = FaultServer::new().serve(rmcp::transport::stdio()).await?;
            server.waiting().await?;
        }
        [flag, addr] if flag == "--http" => serve_http(addr).await?,
        _ => anyhow::bail!("usage: mcp-test-server [--http ADDR]"),
    }
    Ok(())
}

async fn serve_http(addr: &str) -> anyhow::Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let service = StreamableHttpService::new(
        || Ok(FaultServer::new()),
        std::sync::Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}/mcp", listener.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    axum::serve(listener, router).await?;
    Ok(())
}
