//! HTTP handling: the two hub endpoints the client uses, plus `/_mirror/*` for out-of-process
//! control of the binary.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use http::header::{
    ACCEPT_RANGES, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE,
    RANGE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::json;

use super::body::{self, Plan};
use super::faults::{Fault, FaultScope};
use super::range::{self, Span};
use super::State;

pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(route(&state, req).await)
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let raw: Vec<String> = req
        .uri()
        .path()
        .split('/')
        .skip(1)
        .map(String::from)
        .collect();
    let Some(segs) = raw
        .iter()
        .map(|s| percent_decode_str(s).decode_utf8().map(|c| c.into_owned()))
        .collect::<Result<Vec<_>, _>>()
        .ok()
    else {
        return error(StatusCode::BAD_REQUEST, None, "path is not UTF-8");
    };
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    if segs.first() == Some(&"_mirror") {
        return control(state, req, &segs[1..]).await;
    }
    if let Some(token) = &state.token {
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if presented != Some(format!("Bearer {token}").as_str()) {
            state.stats.lock().unwrap().unauthorized += 1;
            return error(
                StatusCode::UNAUTHORIZED,
                None,
                "Invalid credentials in Authorization header",
            );
        }
    }
    if let ["api", "models", rest @ ..] = segs.as_slice() {
        return match split_api(rest) {
            Some((id, rev)) if req.method() == Method::GET => {
                let blobs = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "blobs=true" || kv == "blobs=1"));
                listing(state, &id, rev, blobs)
            }
            Some(_) => error(StatusCode::METHOD_NOT_ALLOWED, None, "method not allowed"),
            None => error(StatusCode::NOT_FOUND, None, "Not Found"),
        };
    }
    match split_resolve(&segs) {
        Some((id, rev, file)) if req.method() == Method::GET || req.method() == Method::HEAD => {
            resolve(state, &req, &id, rev, &file)
        }
        Some(_) => error(StatusCode::METHOD_NOT_ALLOWED, None, "method not allowed"),
        None => error(StatusCode::NOT_FOUND, None, "Not Found"),
    }
}

/// `{owner}/{repo}[/revision/{rev}]` or `{repo}[/revision/{rev}]` → (id, revision).
fn split_api<'a>(rest: &[&'a str]) -> Option<(String, &'a str)> {
    match rest {
        [owner, repo, "revision", rev] => Some((format!("{owner}/{repo}"), rev)),
        [repo, "revision", rev] => Some((repo.to_string(), rev)),
        [owner, repo] => Some((format!("{owner}/{repo}"), "main")),
        [repo] => Some((repo.to_string(), "main")),
        _ => None,
    }
}

/// `{owner}/{repo}/resolve/{rev}/{path...}` or `{repo}/resolve/{rev}/{path...}`.
fn split_resolve<'a>(segs: &[&'a str]) -> Option<(String, &'a str, String)> {
    let (id, rest) = match segs {
        [repo, "resolve", rest @ ..] => (repo.to_string(), rest),
        [owner, repo, "resolve", rest @ ..] => (format!("{owner}/{repo}"), rest),
        _ => return None,
    };
    match rest {
        [rev, path @ ..] if !path.is_empty() => Some((id, rev, path.join("/"))),
        _ => None,
    }
}

fn listing(state: &State, id: &str, rev: &str, blobs: bool) -> Response<Body> {
    state.stats.lock().unwrap().listings += 1;
    let repo = state.repos.read().unwrap().get(id).cloned();
    match repo {
        Some(repo) if repo.has_revision(rev) => json_response(StatusCode::OK, &repo.listing(blobs)),
        _ => error(
            StatusCode::NOT_FOUND,
            Some("RepoNotFound"),
            "Repository not found",
        ),
    }
}

fn resolve(
    state: &Arc<State>,
    req: &Request<Incoming>,
    id: &str,
    rev: &str,
    name: &str,
) -> Response<Body> {
    let Some(repo) = state.repos.read().unwrap().get(id).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            Some("RepoNotFound"),
            "Repository not found",
        );
    };
    if !repo.has_revision(rev) {
        return error(
            StatusCode::NOT_FOUND,
            Some("RevisionNotFound"),
            "Invalid rev id",
        );
    }
    let Some(file) = repo.file(name) else {
        return error(
            StatusCode::NOT_FOUND,
            Some("EntryNotFound"),
            "Entry not found",
        );
    };
    let is_get = req.method() == Method::GET;
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let range_header = header(RANGE);
    {
        let mut stats = state.stats.lock().unwrap();
        let s = stats.file(name);
        match (is_get, range_header) {
            (false, _) => s.heads += 1,
            (true, None) => s.full_gets += 1,
            (true, Some(r)) => {
                s.range_gets += 1;
                s.ranges.push(r.to_string());
            }
        }
    }
    let fault = state.faults.lock().unwrap().take(name, is_get);
    if let Some(status) = fault.as_ref().and_then(|f| f.fail_status) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return error(status, None, "injected failure");
    }

    let etag = format!("\"{}\"", file.sha256);
    let total = file.size;
    let mut builder = Response::builder()
        .header(ETAG, &etag)
        .header("x-linked-etag", &etag)
        .header("x-repo-commit", &repo.info.commit)
        .header("x-linked-size", total)
        .header(ACCEPT_RANGES, "bytes")
        .header(CONTENT_TYPE, "application/octet-stream");
    let range_header = range_header.filter(|_| !fault.as_ref().is_some_and(|f| f.ignore_range));
    let (start, len) = match range::span(range_header, header(IF_RANGE), &etag, total) {
        Span::Full => {
            builder = builder.status(StatusCode::OK);
            (0, total)
        }
        Span::Partial { start, end } => {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_RANGE, format!("bytes {start}-{end}/{total}"));
            (start, end - start + 1)
        }
        Span::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(CONTENT_RANGE, format!("bytes */{total}"))
                .header(CONTENT_LENGTH, 0)
                .body(empty())
                .unwrap();
        }
    };
    builder = builder.header(CONTENT_LENGTH, len);
    if !is_get {
        return builder.body(empty()).unwrap();
    }
    let plan = Plan {
        path: file.path.clone(),
        start,
        len,
        fault,
    };
    let counter = Arc::clone(state);
    let name = name.to_string();
    let sending = Sending::start(Arc::clone(state), name.clone());
    let stream = body::stream(plan, move |n| {
        // The stream owns the guard: the body counts as in flight until hyper drops it.
        let _sending = &sending;
        let mut stats = counter.stats.lock().unwrap();
        stats.body_bytes += n;
        stats.file(&name).body_bytes += n;
    });
    let body = StreamBody::new(stream.map_ok(Frame::data));
    builder.body(BodyExt::boxed_unsync(body)).unwrap()
}

/// A GET body being sent, counted in the file's `in_flight` until dropped.
struct Sending {
    state: Arc<State>,
    name: String,
}

impl Sending {
    fn start(state: Arc<State>, name: String) -> Self {
        {
            let mut stats = state.stats.lock().unwrap();
            let s = stats.file(&name);
            s.in_flight += 1;
            s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
        }
        Self { state, name }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        let mut stats = self.state.stats.lock().unwrap();
        let s = stats.file(&self.name);
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

/// Body of `POST /_mirror/faults`: the fault's fields plus an optional `file` scope.
#[derive(Deserialize)]
struct FaultRequest {
    #[serde(default)]
    file: Option<String>,
    #[serde(flatten)]
    fault: Fault,
}

async fn control(state: &State, req: Request<Incoming>, segs: &[&str]) -> Response<Body> {
    match (req.method().clone(), segs) {
        (Method::GET, ["stats"]) => {
            let stats = state.stats.lock().unwrap().clone();
            json_response(StatusCode::OK, &serde_json::to_value(stats).unwrap())
        }
        (Method::DELETE, ["stats"]) => {
            *state.stats.lock().unwrap() = Default::default();
            json_response(StatusCode::OK, &json!({}))
        }
        (Method::POST, ["faults"]) => {
            let Ok(body) = req.into_body().collect().await else {
                return error(StatusCode::BAD_REQUEST, None, "unreadable body");
            };
            match serde_json::from_slice::<FaultRequest>(&body.to_bytes()) {
                Ok(r) => {
                    let scope = r.file.map_or(FaultScope::All, FaultScope::File);
                    state.faults.lock().unwrap().set(scope, r.fault);
                    json_response(StatusCode::OK, &json!({}))
                }
                Err(e) => error(StatusCode::BAD_REQUEST, None, &e.to_string()),
            }
        }
        (Method::DELETE, ["faults"]) => {
            state.faults.lock().unwrap().clear();
            json_response(StatusCode::OK, &json!({}))
        }
        _ => error(StatusCode::NOT_FOUND, None, "Not Found"),
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(value).unwrap());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, bytes.len())
        .body(
            Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap()
}

/// The hub's error shape: `{"error": ...}`, with `X-Error-Code` where the hub sends one.
fn error(status: StatusCode, code: Option<&str>, message: &str) -> Response<Body> {
    let mut response = json_response(status, &json!({ "error": message }));
    if let Some(code) = code {
        response
            .headers_mut()
            .insert("x-error-code", HeaderValue::from_str(code).unwrap());
        response
            .headers_mut()
            .insert("x-error-message", HeaderValue::from_str(message).unwrap());
    }
    response
}
