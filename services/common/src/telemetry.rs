//! Logging and tracing set-up shared by the binaries: `RUST_LOG`-filtered logs on stderr (text
//! or JSON), spans exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and the
//! W3C trace-context propagator that carries a trace across services in gRPC metadata.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is still buffered.
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (off the async runtime: the flush blocks).
    pub async fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.shutdown() {
                    eprintln!("flushing traces: {e}");
                }
            })
            .await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

/// Logs to stderr filtered by `RUST_LOG` (default `info`); with an OTLP endpoint, spans go
/// there too, named `service` unless `OTEL_SERVICE_NAME` says otherwise. Spans always get W3C
/// ids, so a trace arriving in metadata is carried on even when this process exports nothing.
/// Safe to call twice (tests): the second call changes nothing. Must run inside a Tokio runtime
/// when exporting.
pub fn init(format: LogFormat, service: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export_error = None;
    if let Some(endpoint) = otlp_endpoint() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => export_error = Some(format!("OTLP exporter for {endpoint}: {e}")),
        }
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("llama-agent"));

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into log files and collectors.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        // The engine threads are named per model and context; a collector can tell them apart.
        LogFormat::Json => fmt.json().with_thread_names(true).boxed(),
    };
    // Spans go out at info whatever RUST_LOG says (the CLI logs only warnings), without the
    // transport's own (which would also trace every export).
    let otel_filter = EnvFilter::new(
        "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off,\
         opentelemetry_sdk=off,opentelemetry_otlp=off,llama.cpp=off",
    );
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel.with_filter(otel_filter))
        .try_init()
        .is_ok();
    if let Some(e) = export_error {
        tracing::warn!("{e}; spans are not exported");
    }
    if installed {
        opentelemetry::global::set_tracer_provider(provider.clone());
        Telemetry {
            provider: Some(provider),
        }
    } else {
        Telemetry { provider: None }
    }
}
