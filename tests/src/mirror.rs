//! A local stand-in for the Hugging Face Hub's HTTP API, as the `hf-hub` crate and a
//! Range-resuming downloader use it: repo listings and file resolves, with injectable faults and
//! request counters. Serves files straight from disk so it can also be benchmarked.
//!
//! Endpoints:
//! - `GET /api/models/{owner}/{repo}/revision/{rev}[?blobs=true]` (also without `/revision/..`)
//! - `GET|HEAD /{owner}/{repo}/resolve/{rev}/{path}` with `Range` / `If-Range`
//! - `GET|DELETE /_mirror/stats`, `POST|DELETE /_mirror/faults`: control for the binary; never
//!   need the token.
//!
//! `rev` is `main` or the repo's commit; path segments are percent-decoded.

mod body;
mod faults;
mod range;
mod repo;
mod server;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use faults::{Fault, FaultScope};
pub use repo::{FileInfo, FileSource, RepoInfo, RepoSpec};
pub use stats::{parse_range, FileStats, MirrorStats};

use faults::FaultTable;
use repo::Repo;

/// What to serve, and how.
#[derive(Clone, Debug, Default)]
pub struct MirrorConfig {
    pub repos: Vec<RepoSpec>,
    /// When set, every hub request must carry `Authorization: Bearer <token>`, else 401.
    pub require_token: Option<String>,
    /// Faults in force from the first request.
    pub faults: Vec<(FaultScope, Fault)>,
    /// Where to listen; `None` = 127.0.0.1 on a free port.
    pub addr: Option<SocketAddr>,
}

impl MirrorConfig {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn repo(mut self, spec: RepoSpec) -> Self {
        self.repos.push(spec);
        self
    }

    pub fn require_token(mut self, token: impl Into<String>) -> Self {
        self.require_token = Some(token.into());
        self
    }

    pub fn fault(mut self, scope: FaultScope, fault: Fault) -> Self {
        self.faults.push((scope, fault));
        self
    }
}

pub(crate) struct State {
    repos: RwLock<HashMap<String, Arc<Repo>>>,
    faults: Mutex<FaultTable>,
    stats: Mutex<MirrorStats>,
    token: Option<String>,
}

/// A running mirror. Dropping it stops the server and cuts every open connection.
pub struct Mirror {
    state: Arc<State>,
    addr: SocketAddr,
    base_url: String,
    server: JoinHandle<()>,
    scratch: tempfile::TempDir,
    loads: AtomicU64,
}

impl Mirror {
    /// Hashes every file, binds, and starts serving on the current tokio runtime.
    pub async fn start(config: MirrorConfig) -> Result<Mirror> {
        let scratch = tempfile::Builder::new().prefix("hub-mirror-").tempdir()?;
        let mut faults = FaultTable::default();
        for (scope, fault) in config.faults {
            faults.set(scope, fault);
        }
        let state = Arc::new(State {
            repos: RwLock::new(HashMap::new()),
            faults: Mutex::new(faults),
            stats: Mutex::new(MirrorStats::default()),
            token: config.require_token,
        });
        let addr = config
            .addr
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let mirror = Mirror {
            server: tokio::spawn(serve(listener, Arc::clone(&state))),
            state,
            addr,
            base_url: format!("http://{addr}"),
            scratch,
            loads: AtomicU64::new(0),
        };
        for spec in config.repos {
            mirror.add_repo(spec).await?;
        }
        Ok(mirror)
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: the hub endpoint to give clients.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a repo, or replaces the one with the same id (its old commit then 404s).
    pub async fn add_repo(&self, spec: RepoSpec) -> Result<RepoInfo> {
        // Each load gets its own directory, so replacing a repo never rewrites a file that an
        // in-flight response is still reading.
        let n = self.loads.fetch_add(1, Ordering::Relaxed);
        let scratch = self.scratch.path().join(n.to_string());
        let repo = tokio::task::spawn_blocking(move || repo::load(spec, &scratch)).await??;
        let info = repo.info.clone();
        self.state
            .repos
            .write()
            .unwrap()
            .insert(info.id.clone(), Arc::new(repo));
        Ok(info)
    }

    /// Stops serving `id`; returns whether it was there.
    pub fn remove_repo(&self, id: &str) -> bool {
        self.state.repos.write().unwrap().remove(id).is_some()
    }

    pub fn repo(&self, id: &str) -> Option<RepoInfo> {
        let repos = self.state.repos.read().unwrap();
        repos.get(id).map(|r| r.info.clone())
    }

    /// Replaces the fault of `scope`; `Fault::default()` clears it.
    pub fn set_faults(&self, scope: FaultScope, fault: Fault) {
        self.state.faults.lock().unwrap().set(scope, fault);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn stats(&self) -> MirrorStats {
        self.state.stats.lock().unwrap().clone()
    }

    /// The counters of one file name; zeros if it saw no request.
    pub fn file_stats(&self, name: &str) -> FileStats {
        let stats = self.state.stats.lock().unwrap();
        stats.files.get(name).cloned().unwrap_or_default()
    }

    pub fn reset_stats(&self) {
        *self.state.stats.lock().unwrap() = MirrorStats::default();
    }

    /// Stops the server and cuts open connections, waiting until they are gone.
    pub async fn shutdown(mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Accepts connections until aborted; connections live in the JoinSet so aborting this task
/// drops them all, which is what "the hub went away" should look like.
async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of descriptors, most likely: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| server::handle(Arc::clone(&state), req));
                    let _ = http1::Builder::new()
                        .writev(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
