//! A tonic server with health and reflection (v1 and v1alpha) already mounted.

use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;

#[derive(Debug, thiserror::Error)]
pub enum GrpcSetupError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

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
pub async fn base_router(
    service_names: &[&str],
) -> Result<(Router, HealthReporter), GrpcSetupError> {
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
    let router = Server::builder()
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok((router, reporter))
}

/// Marks the whole server and each named service SERVING.
pub async fn set_serving(reporter: &HealthReporter, service_names: &[&str]) {
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    for name in service_names {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
}

/// Serves `router` on a bound listener until `shutdown` resolves, announcing
/// `<name> serving` with the address (scripts and tests read it to find ephemeral ports).
pub async fn serve_tcp(
    name: &str,
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "{name} serving");
    // Without TCP_NODELAY a response's last frame waits out the peer's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)));
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Byte buffer of each in-process connection: large enough that an embedding batch moves in
/// a few writes.
const IN_PROCESS_BUFFER: usize = 1 << 20;

/// Serves `router` inside this process and returns a channel to it: the CLI's no-server mode
/// runs exactly the code a remote client reaches, over in-memory pipes instead of TCP.
pub fn in_process(router: Router) -> tonic::transport::Channel {
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
