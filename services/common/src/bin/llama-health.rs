//! `llama-health`: asks a llama-agent service (any gRPC server with grpc.health.v1) whether it
//! is SERVING; exit 0 if so, 1 if not, 2 if it cannot be asked. For Docker HEALTHCHECK and
//! exec probes, where grpcurl is not in the image.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser, Debug)]
#[command(name = "llama-health", version)]
struct Args {
    /// The server (`http://host:port`, `https://host:port`).
    #[arg(
        long,
        env = "LLAMA_HEALTH_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,

    /// The service to ask about (empty: the whole server).
    #[arg(long, default_value = "")]
    service: String,

    /// PEM CA bundle to trust for an https endpoint.
    #[arg(long, env = "LLAMA_AGENT_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate, for servers that require mutual TLS (with --tls-client-key).
    #[arg(long, env = "LLAMA_AGENT_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,

    /// PEM key of --tls-client-cert.
    #[arg(long, env = "LLAMA_AGENT_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,

    /// Seconds before giving up.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

async fn check(args: &Args) -> Result<ServingStatus, String> {
    let timeout = Duration::from_secs(args.timeout);
    let mut endpoint = Endpoint::from_shared(args.endpoint.clone())
        .map_err(|e| format!("{}: {e}", args.endpoint))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if args.endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.tls_client_cert, &args.tls_client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(reply.into_inner().status())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match check(&args).await {
        Ok(ServingStatus::Serving) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!(
                "llama-health: {} is {}",
                args.endpoint,
                status.as_str_name()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("llama-health: {}: {e}", args.endpoint);
            ExitCode::from(2)
        }
    }
}
