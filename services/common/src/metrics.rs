//! Prometheus metrics: the per-RPC families every service shares, and the `/metrics` endpoint
//! that exposes them with whatever the other crates registered in the default registry.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "llama_agent_grpc_requests_total",
        "gRPC calls finished, by service, method and status code.",
        &["service", "method", "code"]
    )
    .expect("metric registers once")
});

static IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "llama_agent_grpc_requests_in_flight",
        "gRPC calls started and not yet finished (streams included).",
        &["service", "method"]
    )
    .expect("metric registers once")
});

static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "llama_agent_grpc_request_duration_seconds",
        "Time from a call's arrival to its status (the whole stream for streaming calls).",
        &["service", "method"],
        prometheus::exponential_buckets(0.0005, 4.0, 10).expect("valid buckets")
    )
    .expect("metric registers once")
});

/// One call being counted: in flight until `finish` (or drop, as CANCELLED).
pub struct Call {
    service: String,
    method: String,
    started: Instant,
    done: bool,
}

impl Call {
    pub fn start(service: String, method: String) -> Self {
        IN_FLIGHT.with_label_values(&[&service, &method]).inc();
        Self {
            service,
            method,
            started: Instant::now(),
            done: false,
        }
    }

    pub fn finish(mut self, code: tonic::Code) {
        self.record(code);
    }

    fn record(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = [self.service.as_str(), self.method.as_str()];
        IN_FLIGHT.with_label_values(&labels).dec();
        DURATION
            .with_label_values(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        REQUESTS
            .with_label_values(&[
                &self.service,
                &self.method,
                llama_agent_proto::code_name(code),
            ])
            .inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// The text exposition of everything registered in the default registry, process metrics
/// (RSS, CPU, open files) included.
pub fn render() -> String {
    register_process_collector();
    let families = prometheus::gather();
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
}

fn register_process_collector() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = prometheus::register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    });
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                render(),
            )
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
