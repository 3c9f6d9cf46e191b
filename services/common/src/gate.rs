//! The layer in front of every RPC: one span per call (child of the caller's W3C trace
//! context), the bearer-token check (health stays open for probes), and the per-method
//! request, in-flight and duration metrics, counted when the call's status is known.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics;

/// Paths anyone may call: Kubernetes' gRPC probes cannot send headers.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone, Debug, Default)]
pub struct GateLayer {
    /// The whole expected `authorization` value; `None` turns auth off.
    token: Option<Arc<str>>,
}

impl GateLayer {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(Arc::from),
        }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            token: self.token.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Gate<S> {
    inner: S,
    token: Option<Arc<str>>,
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let (service, method) = split_path(&path);
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(req.headers())));
        let _ = span.set_parent(parent);
        let call = metrics::Call::start(service, method);
        if let Some(token) = &self.token {
            let given = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes);
            if !path.starts_with(OPEN_PREFIX) && !given.is_some_and(|g| same(g, token.as_bytes())) {
                let status = if given.is_some() {
                    tonic::Status::unauthenticated("wrong bearer token")
                } else {
                    tonic::Status::unauthenticated(
                        "missing bearer token: send `authorization: Bearer <token>`",
                    )
                };
                call.finish(status.code());
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        // The ready service answers this call; a fresh clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let resp = inner.call(req).await?;
                let (parts, body) = resp.into_parts();
                // A trailers-only answer (an error before any message) carries the status here.
                let code = status_of(&parts.headers);
                Ok(http::Response::from_parts(
                    parts,
                    Body::new(Observed {
                        inner: body,
                        call: Some(call),
                        code,
                    }),
                ))
            }
            .instrument(span),
        )
    }
}

/// Reads W3C `traceparent` / `tracestate` from the request headers.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

fn split_path(path: &str) -> (String, String) {
    let mut it = path.trim_start_matches('/').splitn(2, '/');
    let service = it.next().unwrap_or_default().to_string();
    let method = it.next().unwrap_or_default().to_string();
    (service, method)
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

/// A response body that records the call's status when its trailers pass (or, dropped before
/// them, records CANCELLED: the client went away).
struct Observed {
    inner: Body,
    call: Option<metrics::Call>,
    code: Option<tonic::Code>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    self.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.code = Some(status.code()),
            Poll::Ready(None) => {
                let code = self.code.unwrap_or(tonic::Code::Ok);
                if let Some(call) = self.call.take() {
                    call.finish(code);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(self.code.unwrap_or(tonic::Code::Cancelled));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::same(b"Bearer abc", b"Bearer abc"));
        assert!(!super::same(b"Bearer abd", b"Bearer abc"));
        assert!(!super::same(b"Bearer ab", b"Bearer abc"));
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            super::split_path("/llama_agent.loader.v1.LoaderService/EnsureModel"),
            (
                "llama_agent.loader.v1.LoaderService".to_string(),
                "EnsureModel".to_string()
            )
        );
    }
}
