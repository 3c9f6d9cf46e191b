//! A tonic server with health and reflection (v1 and v1alpha) already mounted, behind the
//! gate (auth, spans, metrics), optionally over TLS; served until a signal, then drained.

use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::gate::GateLayer;
use crate::options::Plumbing;

#[derive(Debug, thiserror::Error)]
pub enum GrpcSetupError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS set-up: {0}")]
    Tls(tonic::transport::Error),
}

/// Every service's router: its services behind the gate.
pub type ServiceRouter = Router<Stack<GateLayer, Identity>>;

/// Services every server carries besides its own.
const PLUMBING: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A router carrying grpc.health.v1 and server reflection listing `service_names` and the
/// plumbing only (so `grpcurl list` on the loader does not advertise the generator), plus the
/// health reporter.
/// Every service starts NOT_SERVING; the caller flips it once it is ready.
async fn base_router(
    service_names: &[&str],
    plumbing: &Plumbing,
) -> Result<(ServiceRouter, HealthReporter), GrpcSetupError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    for name in service_names {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::NotServing)
            .await;
    }

    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(llama_agent_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        for name in PLUMBING.iter().chain(service_names) {
            b = b.with_service_name(*name);
        }
        b
    };
    let mut server = Server::builder();
    if let Some(tls) = &plumbing.tls {
        server = server
            .tls_config(tls.clone())
            .map_err(GrpcSetupError::Tls)?;
    }
    let router = server
        .layer(GateLayer::new(plumbing.token.clone()))
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok((router, reporter))
}

/// Marks the whole server and each named service SERVING.
pub async fn set_serving(reporter: &HealthReporter, service_names: &[&str]) {
    set_all(
        reporter,
        service_names,
        tonic_health::ServingStatus::Serving,
    )
    .await;
}

async fn set_all(
    reporter: &HealthReporter,
    service_names: &[&str],
    status: tonic_health::ServingStatus,
) {
    reporter.set_service_status("", status).await;
    for name in service_names {
        reporter.set_service_status(*name, status).await;
    }
}

/// A router and what serving it needs.
pub struct Ready {
    pub router: ServiceRouter,
    pub health: HealthReporter,
    pub service_names: &'static [&'static str],
    /// Work before SERVING (preloading models), run while health already answers NOT_SERVING.
    pub warmup: futures::future::BoxFuture<'static, Result<(), String>>,
}

/// Why an inference service (generator, embedder) did not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Setup(#[from] GrpcSetupError),
    #[error(transparent)]
    Serve(#[from] ServeFailure),
}

/// `service` (its message limits already set) on the base router, with its warm-up.
pub async fn ready<S>(
    service: S,
    service_names: &'static [&'static str],
    plumbing: &Plumbing,
    warmup: futures::future::BoxFuture<'static, Result<(), String>>,
) -> Result<Ready, GrpcSetupError>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (router, health) = base_router(service_names, plumbing).await?;
    Ok(Ready {
        router: router.add_service(service),
        health,
        service_names,
        warmup,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ServeFailure {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Warmup(String),
}

/// Serves on a bound listener (and `/metrics` on the plumbing's) until `shutdown` resolves,
/// announcing `<name> serving` with the address (scripts and tests read it to find ephemeral
/// ports). On shutdown: health turns NOT_SERVING, new connections and streams are refused
/// (HTTP/2 GOAWAY), and in-flight calls get the grace period to finish before the rest are cut;
/// each connection closes once its streams are done, lingering until the client has read all.
pub async fn serve_tcp(
    name: &str,
    ready: Ready,
    plumbing: Plumbing,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeFailure> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // One state that every part watches: the metrics server and the grace timer start on
    // the drain; the result says whether the warm-up failed.
    let (phase, phase_rx) = tokio::sync::watch::channel(Phase::Running);
    if let Some(metrics) = plumbing.metrics {
        // Logged before the service's own line, which tests and scripts wait for.
        if let Ok(addr) = metrics.local_addr() {
            tracing::info!(%addr, "metrics listening");
        }
        let mut phase = phase_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = phase.wait_for(|p| *p != Phase::Running).await;
            };
            if let Err(e) = crate::metrics::serve(metrics, stopped).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    tracing::info!(%addr, tls = plumbing.tls.is_some(), auth = plumbing.token.is_some(), "{name} serving");
    // Without TCP_NODELAY a response's last frame waits out the peer's delayed ACK (~40 ms).
    // Closing connections linger, so a drained stream's last frames are not reset away.
    let incoming = futures::StreamExt::map(
        tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(std::time::Duration::from_secs(60))),
        |conn| conn.map(crate::linger::Lingering::new),
    );
    let Ready {
        router,
        health,
        service_names,
        warmup,
    } = ready;
    let warm_health = health.clone();
    let warm_phase = phase.clone();
    tokio::spawn(async move {
        match warmup.await {
            Ok(()) => set_serving(&warm_health, service_names).await,
            Err(e) => {
                tracing::error!(error = %e, "warm-up failed; stopping");
                warm_phase.send_if_modified(|p| p.leave(Phase::WarmupFailed(e)));
            }
        }
    });
    let mut failed = phase_rx.clone();
    let signal = async move {
        tokio::select! {
            _ = shutdown => {
                phase.send_if_modified(|p| p.leave(Phase::Draining));
            }
            _ = failed.wait_for(|p| matches!(p, Phase::WarmupFailed(_))) => {}
        }
        tracing::info!(
            grace_s = plumbing.grace_period.as_secs(),
            "draining: no new calls"
        );
        set_all(
            &health,
            service_names,
            tonic_health::ServingStatus::NotServing,
        )
        .await;
    };
    let served = router.serve_with_incoming_shutdown(incoming, signal);
    let grace = plumbing.grace_period;
    let mut drain_seen = phase_rx.clone();
    let grace_over = async move {
        let _ = drain_seen.wait_for(|p| *p != Phase::Running).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = served => {
            tracing::info!("{name} stopped");
            r?;
        }
        _ = grace_over => {
            tracing::warn!("grace period over: cutting the calls still running");
        }
    }
    let end = phase_rx.borrow().clone();
    match end {
        Phase::WarmupFailed(e) => Err(ServeFailure::Warmup(e)),
        Phase::Running | Phase::Draining => Ok(()),
    }
}

/// A served router's life.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    /// Taking calls (health may still say NOT_SERVING while the warm-up runs).
    Running,
    Draining,
    WarmupFailed(String),
}

impl Phase {
    /// Moves to `next` only from Running: whichever of shutdown and a failed warm-up comes
    /// first decides how the server ends. True when it moved.
    fn leave(&mut self, next: Phase) -> bool {
        let running = *self == Phase::Running;
        if running {
            *self = next;
        }
        running
    }
}

/// Runs the warm-up, then serves the router inside this process (see [`in_process`]).
pub async fn in_process_ready(ready: Ready) -> Result<tonic::transport::Channel, ServeFailure> {
    ready.warmup.await.map_err(ServeFailure::Warmup)?;
    set_serving(&ready.health, ready.service_names).await;
    Ok(in_process(ready.router))
}

/// Byte buffer of each in-process connection: large enough that an embedding batch moves in
/// a few writes.
const IN_PROCESS_BUFFER: usize = 1 << 20;

/// Serves `router` inside this process and returns a channel to it: the CLI's no-server mode
/// runs exactly the code a remote client reaches, over in-memory pipes instead of TCP.
pub fn in_process(router: ServiceRouter) -> tonic::transport::Channel {
    // Connections are opened once and again only after a failure: a few slots suffice.
    let (tx, rx) = tokio::sync::mpsc::channel::<tokio::io::DuplexStream>(4);
    tokio::spawn(async move {
        let incoming = futures::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Ok::<_, std::io::Error>,
        );
        if let Err(e) = router.serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "in-process server stopped");
        }
    });
    tonic::transport::Endpoint::from_static("http://in-process.invalid")
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let tx = tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(IN_PROCESS_BUFFER);
                tx.send(server)
                    .await
                    .map_err(|_| std::io::Error::other("in-process server stopped"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        }))
}

/// When the caller's `grpc-timeout` runs out, as an instant (`None` without one).
pub fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (value, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let value: u64 = value.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(value.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(value.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_millis(value),
        "u" => std::time::Duration::from_micros(value),
        "n" => std::time::Duration::from_nanos(value),
        _ => return None,
    };
    std::time::Instant::now().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_timeouts_parse() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(super::deadline(&md).is_none());
        md.insert("grpc-timeout", "250m".parse().unwrap());
        let d = super::deadline(&md).unwrap() - std::time::Instant::now();
        assert!(
            d <= std::time::Duration::from_millis(250) && d > std::time::Duration::from_millis(200)
        );
        md.insert("grpc-timeout", "7x".parse().unwrap());
        assert!(super::deadline(&md).is_none());
    }
}
