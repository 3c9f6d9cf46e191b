//! What every call carries: the bearer token and the caller's W3C trace context, so one
//! `llama-cli` run is one trace across the services it reaches.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataKey, MetadataMap};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::ClientError;

/// The transport under every client: a channel whose calls pass through [`CallContext`].
pub type Transport = InterceptedService<Channel, CallContext>;

/// How to reach a secured deployment. [`ConnectOptions::from_env`] reads the variables the
/// services themselves use, so a token set once serves the CLI and service-to-service calls.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// PEM CA bundle to trust for `https://` endpoints (the system roots are not used).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that require mutual TLS.
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::InvalidEndpoint(format!("reading {}: {e}", path.display())))
}

impl ConnectOptions {
    /// `LLAMA_AGENT_TOKEN` (or the file named by `LLAMA_AGENT_TOKEN_FILE`), `LLAMA_AGENT_TLS_CA`,
    /// `LLAMA_AGENT_TLS_CLIENT_CERT`, `LLAMA_AGENT_TLS_CLIENT_KEY`; unset or empty means none.
    pub fn from_env() -> Result<Self, ClientError> {
        let token = match (env("LLAMA_AGENT_TOKEN"), env("LLAMA_AGENT_TOKEN_FILE")) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(
                String::from_utf8(read(&PathBuf::from(&f))?)
                    .map_err(|_| ClientError::InvalidEndpoint(format!("{f} is not UTF-8")))?,
            ),
            (None, None) => None,
        };
        Ok(Self {
            token: token
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            tls_ca: env("LLAMA_AGENT_TLS_CA").map(PathBuf::from),
            tls_client_cert: env("LLAMA_AGENT_TLS_CLIENT_CERT").map(PathBuf::from),
            tls_client_key: env("LLAMA_AGENT_TLS_CLIENT_KEY").map(PathBuf::from),
        })
    }

    fn tls(&self) -> Result<Option<ClientTlsConfig>, ClientError> {
        let mut tls = ClientTlsConfig::new();
        let mut any = false;
        if let Some(ca) = &self.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            any = true;
        }
        match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                any = true;
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::InvalidEndpoint(
                    "a TLS client certificate needs its key, and the key its certificate".into(),
                ))
            }
        }
        Ok(any.then_some(tls))
    }
}

/// The constructors every client has, built on its own `fn over(Arc<ReplicaSet>) -> Self`,
/// and `with_retry` (every client has a `retry` policy).
macro_rules! constructors {
    () => {
        /// Over any channel (an in-process one: no token, the trace context still travels).
        pub fn new(channel: tonic::transport::Channel) -> Self {
            Self::over($crate::replicas::ReplicaSet::single($crate::call::plain(
                channel,
            )))
        }

        /// To `uri` with the token and TLS settings of the environment (see
        /// [`ConnectOptions::from_env`](crate::ConnectOptions::from_env)). `uri` names one
        /// server, or several replicas: a comma-separated list, or a DNS name with several
        /// addresses (see [`parse_endpoints`](crate::parse_endpoints)).
        pub fn connect(uri: &str) -> Result<Self, $crate::ClientError> {
            Self::connect_with(uri, &$crate::ConnectOptions::from_env()?)
        }

        pub fn connect_with(
            uri: &str,
            opts: &$crate::ConnectOptions,
        ) -> Result<Self, $crate::ClientError> {
            Ok(Self::over($crate::replicas::ReplicaSet::connect(
                uri, opts,
            )?))
        }

        pub fn with_retry(mut self, retry: $crate::RetryPolicy) -> Self {
            self.retry = retry;
            self
        }

        /// How many replicas the endpoint names, once its DNS names were first looked up
        /// (waiting a few seconds at most for that).
        pub async fn replica_count(&self) -> usize {
            self.replicas.count().await
        }
    };
}
pub(crate) use constructors;

/// A lazily connecting transport to `uri` (`http://host:port`, `https://host:port`, or
/// `host:port`).
pub fn connect(uri: &str, opts: &ConnectOptions) -> Result<Transport, ClientError> {
    let uri = if uri.contains("://") {
        uri.to_string()
    } else {
        format!("http://{uri}")
    };
    let endpoint = endpoint(&uri)?;
    let tls = uri.starts_with("https://").then_some(None);
    finish(endpoint, &uri, tls, opts)
}

/// A lazily connecting transport to `addr` (`scheme://ip:port`), one address that `name`
/// resolved to: calls carry the name as authority and TLS checks the name's certificate.
pub(crate) fn connect_as(
    addr: &str,
    name: &crate::replicas::Target,
    opts: &ConnectOptions,
) -> Result<Transport, ClientError> {
    let origin: tonic::transport::Uri = name
        .uri
        .parse()
        .map_err(|e| ClientError::InvalidEndpoint(format!("{}: {e}", name.uri)))?;
    let endpoint = endpoint(addr)?.origin(origin);
    let tls = (name.scheme == "https").then_some(Some(name.host.as_str()));
    finish(endpoint, addr, tls, opts)
}

fn endpoint(uri: &str) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(uri.to_string())
        .map_err(|e| ClientError::InvalidEndpoint(format!("{uri}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true))
}

/// `tls`: `None` for plaintext, `Some(domain)` for TLS (checking `domain` when given, else
/// the URI's host).
fn finish(
    mut endpoint: Endpoint,
    uri: &str,
    tls: Option<Option<&str>>,
    opts: &ConnectOptions,
) -> Result<Transport, ClientError> {
    if let Some(domain) = tls {
        let mut tls = opts.tls()?.unwrap_or_else(ClientTlsConfig::new);
        if let Some(d) = domain {
            tls = tls.domain_name(d.trim_start_matches('[').trim_end_matches(']'));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ClientError::InvalidEndpoint(format!("{uri}: {e}")))?;
    }
    wrap(endpoint.connect_lazy(), opts)
}

/// A channel (an in-process one) with the trace context but no token.
pub fn plain(channel: Channel) -> Transport {
    InterceptedService::new(channel, CallContext::default())
}

/// Any channel with the call context on top.
pub fn wrap(channel: Channel, opts: &ConnectOptions) -> Result<Transport, ClientError> {
    let token = match &opts.token {
        Some(t) => Some(
            AsciiMetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                ClientError::InvalidEndpoint("the token must be printable ASCII".into())
            })?,
        ),
        None => None,
    };
    Ok(InterceptedService::new(channel, CallContext { token }))
}

/// Adds the token and the current span's trace context to each call's metadata.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    token: Option<AsciiMetadataValue>,
}

impl tonic::service::Interceptor for CallContext {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut Metadata(req.metadata_mut()))
        });
        Ok(req)
    }
}

struct Metadata<'a>(&'a mut MetadataMap);

impl opentelemetry::propagation::Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            AsciiMetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}
