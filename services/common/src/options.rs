//! What every service binary takes besides its own settings: metrics, drain, auth, TLS and
//! message limits. Resolved (files read, sockets bound) into [`Plumbing`] before serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The default cap on one gRPC message each way: an embedding batch of 2048 texts at 4096
/// dimensions in f32 is 32 MiB, so 64 MiB leaves room without letting one call hold gigabytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

#[derive(clap::Args, Clone, Debug)]
pub struct ServerOptions {
    /// Serve Prometheus `/metrics` on this address (off when unset).
    #[arg(long, env = "LLAMA_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Seconds in-flight RPCs get to finish after SIGTERM/SIGINT before the process exits.
    #[arg(long, env = "LLAMA_AGENT_GRACE_PERIOD", default_value_t = 30)]
    pub grace_period: u64,

    /// Bearer token every RPC but health must carry (`authorization: Bearer <token>`).
    #[arg(long, env = "LLAMA_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the bearer token (a Kubernetes Secret mounted as a file).
    #[arg(long, env = "LLAMA_AGENT_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// PEM certificate chain: serve gRPC over TLS.
    #[arg(long, env = "LLAMA_AGENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "LLAMA_AGENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "LLAMA_AGENT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "LLAMA_AGENT_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Server settings ready to use: files read and checked, the metrics socket bound.
#[derive(Debug)]
pub struct Plumbing {
    /// The whole `authorization` value expected (`Bearer <token>`).
    pub token: Option<String>,
    pub tls: Option<ServerTlsConfig>,
    pub max_message_size: usize,
    pub grace_period: Duration,
    pub metrics: Option<tokio::net::TcpListener>,
}

impl Plumbing {
    /// No auth, no TLS, no metrics socket: in-process servers and tests.
    pub fn plain() -> Self {
        Self {
            token: None,
            tls: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            grace_period: Duration::from_secs(30),
            metrics: None,
        }
    }
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, OptionsError> {
    std::fs::read(path).map_err(|source| OptionsError::Read {
        what,
        path: path.clone(),
        source,
    })
}

impl ServerOptions {
    /// Checks everything and binds the metrics address; errors name the flag at fault.
    pub async fn resolve(&self) -> Result<Plumbing, OptionsError> {
        if self.max_message_size < 1024 {
            return Err(OptionsError::Invalid(
                "--max-message-size must be at least 1024 bytes".into(),
            ));
        }
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => {
                Some(String::from_utf8(read("token file", path)?).map_err(|_| {
                    OptionsError::Invalid(format!("{} is not UTF-8", path.display()))
                })?)
            }
            (None, None) => None,
        };
        // An empty variable (compose's `LLAMA_AGENT_TOKEN=`) means no auth, not an empty token.
        let token = match token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) if t.bytes().all(|b| b.is_ascii_graphic()) => Some(format!("Bearer {t}")),
            Some(_) => {
                return Err(OptionsError::Invalid(
                    "the token must be printable ASCII without spaces".into(),
                ))
            }
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let identity =
                    Identity::from_pem(read("TLS certificate", cert)?, read("TLS key", key)?);
                let mut tls = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &self.tls_client_ca {
                    tls = tls.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
                }
                Some(tls)
            }
            _ => None,
        };
        let metrics = match self.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| OptionsError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(Plumbing {
            token,
            tls,
            max_message_size: self.max_message_size,
            grace_period: Duration::from_secs(self.grace_period),
            metrics,
        })
    }
}

/// `107374182400`, `100G`, `100GB` (decimal) or `100GiB` (binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 50000000000, 50G, 48GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("107374182400"), Ok(107_374_182_400));
        assert_eq!(parse_size("50G"), Ok(50_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5 MB"), Ok(1_500_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
