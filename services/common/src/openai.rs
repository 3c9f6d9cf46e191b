//! What every OpenAI-compatible HTTP front shares: errors in OpenAI's shape, mapped once from
//! the gRPC status the same request would get; JSON bodies whose rejections are such errors;
//! the bearer token of the gRPC side; and serving until the service drains.

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Json;
use tokio::net::TcpListener;

use crate::grpc::{self, Ready, ServeFailure};
use crate::options::Plumbing;

/// Longest error message sent back: serde's messages can quote the body.
const MAX_MESSAGE: usize = 300;

/// An error as OpenAI's API returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type` (the names llama.cpp's server uses for the same statuses).
    pub kind: &'static str,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
        }
    }
}

/// The one mapping from a gRPC code to an HTTP status and an error type.
pub fn http_status(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code::*;
    match code {
        InvalidArgument | OutOfRange | FailedPrecondition => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        AlreadyExists | Aborted => (StatusCode::CONFLICT, "invalid_request_error"),
        Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable_error"),
        DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        Cancelled => (StatusCode::REQUEST_TIMEOUT, "timeout_error"),
        Unimplemented => (StatusCode::NOT_IMPLEMENTED, "not_supported_error"),
        Ok | Unknown | Internal | DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let (status, kind) = http_status(s.code());
        Self {
            status,
            message: s.message().to_string(),
            kind,
        }
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl ApiError {
    /// `{"error": {...}}`: the response body, and a failed stream's last event.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": bounded(self.message.clone()),
            "type": self.kind,
            "param": null,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A JSON body; one that does not parse (or is too large) is an [`ApiError`].
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            // OpenAI answers 400 for a body that parses but lacks or mistypes a field
            // (axum's 422); a body too large or not JSON keeps its own status.
            Err(r) => Err(ApiError {
                status: match r.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    other => other,
                },
                message: r.body_text(),
                kind: "invalid_request_error",
            }),
        }
    }
}

/// Routes no path matches: an error in OpenAI's shape, not an empty 404.
pub async fn no_route(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "no route {} {}",
            req.method(),
            bounded(req.uri().path().to_string())
        ),
        kind: "not_found_error",
    }
}

/// Wraps `router` with the service's settings: the bearer token every request must carry
/// (`Authorization: Bearer <token>`, as OpenAI SDKs send their API key), the body limit of
/// the gRPC side, and the fallback route.
pub fn wrap(router: axum::Router, token: Option<String>, max_body: usize) -> axum::Router {
    let router = router
        .fallback(no_route)
        .layer(axum::extract::DefaultBodyLimit::max(max_body));
    match token {
        None => router,
        Some(expected) => router.layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let expected = expected.clone();
                async move {
                    let given = req.headers().get(http::header::AUTHORIZATION);
                    match given {
                        Some(g) if crate::gate::same(g.as_bytes(), expected.as_bytes()) => {
                            next.run(req).await
                        }
                        Some(_) => ApiError::from(tonic::Status::unauthenticated("wrong API key"))
                            .into_response(),
                        None => ApiError::from(tonic::Status::unauthenticated(
                            "missing API key: send `Authorization: Bearer <token>`",
                        ))
                        .into_response(),
                    }
                }
            },
        )),
    }
}

/// `/v1/models`: the models loaded now (a model the loader can fetch is served on first use
/// too).
pub fn model_list(references: impl IntoIterator<Item = String>) -> Json<serde_json::Value> {
    let data: Vec<serde_json::Value> = references
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llama-agent"}))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

/// The address of an HTTP front, bound before anything is served (None: no front).
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding the HTTP address {addr}: {e}")))
}

/// Serves a service's gRPC side as [`grpc::serve_tcp`] does and, when given, its OpenAI
/// front (`router` on its own listener, with the service's token and body limit) beside
/// it. The front stops taking requests when the gRPC side starts draining, and gets the
/// same grace period to finish.
pub async fn serve_with_grpc(
    name: &str,
    ready: Ready,
    plumbing: Plumbing,
    listener: TcpListener,
    http: Option<(TcpListener, axum::Router)>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeFailure> {
    let grace = plumbing.grace_period;
    let front = http.map(|(listener, router)| {
        let app = wrap(router, plumbing.token.clone(), plumbing.max_message_size);
        Front::spawn(listener, app)
    });
    let shutdown = async {
        shutdown.await;
        if let Some(f) = &front {
            f.stop();
        }
    };
    let served = grpc::serve_tcp(name, ready, plumbing, listener, shutdown).await;
    if let Some(f) = front {
        f.finish(grace).await;
    }
    served
}

struct Front {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Front {
    fn spawn(listener: TcpListener, app: axum::Router) -> Self {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "openai http listening");
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(listener, app, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Self { stop, task }
    }

    /// No new requests; those in flight go on.
    fn stop(&self) {
        let _ = self.stop.send(true);
    }

    async fn finish(self, grace: std::time::Duration) {
        self.stop();
        match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "openai http server failed"),
            Err(_) => tracing::warn!("openai http requests still running after the grace period"),
            _ => {}
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight finish.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Streamed replies wait out delayed ACKs without TCP_NODELAY.
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_an_error_status() {
        for n in 1..=16 {
            let (status, kind) = http_status(tonic::Code::from(n));
            assert!(status.is_client_error() || status.is_server_error(), "{n}");
            assert!(!kind.is_empty());
        }
        assert_eq!(http_status(tonic::Code::NotFound).0, StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::ResourceExhausted).0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = bounded("é".repeat(400));
        assert!(s.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert!(s.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
    }
}
