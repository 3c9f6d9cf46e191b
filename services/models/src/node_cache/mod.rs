//! The node-local model cache (`--model-cache-dir`), for clusters where the loader and the
//! services share no volume: a model whose files this process cannot see at the loader's paths
//! is streamed from the loader (ReadModelFile), checked against the loader's MD5, published
//! whole, and kept under its own size cap, least recently used out first. Leases stay with the
//! loader (the pool holds one while a model is loaded); this cache only holds copies.
//!
//! One directory per model, named by its primary file's MD5:
//!   models/<md5>/<files>    published copies (the directory appears whole, by rename)
//!   partial/<md5>/<files>   copies being streamed; a restarted service resumes them
//!   locks/<md5>.lock        flock: shared while an engine uses the files (eviction skips them),
//!                           exclusive while streaming or evicting. Processes sharing the
//!                           directory (a hostPath cache) respect each other's locks, so a
//!                           node streams each model once.
//!   trash/                  evicted copies on their way out (emptied at start)

mod copy;
mod layout;
mod metrics;
mod room;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use llama_agent_client::proto::common::v1::ModelInfo;
use llama_agent_client::{ClientError, LoaderClient};
use llama_agent_common::options::parse_size;

pub use layout::Plan;
use layout::{Layout, Lock};

#[derive(clap::Args, Clone, Debug)]
pub struct NodeCacheConfig {
    /// Node-local model cache: a model whose files this service cannot see at the loader's
    /// paths (no shared volume) is streamed from the loader into this directory, verified and
    /// kept. Unset: the loader's paths are opened directly.
    #[arg(long, env = "LLAMA_MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,

    /// Size cap of the node-local cache in bytes (suffixes as LLAMA_CACHE_MAX_SIZE); copies no
    /// loaded model uses are deleted past it, least recently used first.
    #[arg(long, env = "LLAMA_MODEL_CACHE_MAX_SIZE", default_value = "20G", value_parser = parse_size)]
    pub model_cache_max_size: u64,
}

impl Default for NodeCacheConfig {
    fn default() -> Self {
        Self {
            model_cache_dir: None,
            model_cache_max_size: 20_000_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeCacheError {
    #[error("streaming the model from the loader: {0}")]
    Loader(#[from] ClientError),
    #[error("node model cache full: {0}")]
    Full(String),
    #[error("node model cache: {0}")]
    Integrity(String),
    #[error("node model cache: the loader's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("node model cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node model cache: {0}")]
    Busy(String),
}

impl NodeCacheError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Loader(e) => e.code(),
            Self::Full(_) => tonic::Code::ResourceExhausted,
            Self::Integrity(_) => tonic::Code::DataLoss,
            Self::BadAnswer(_) => tonic::Code::Internal,
            // A full disk is the node's capacity, like the cap; other I/O is ours.
            Self::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                    tonic::Code::ResourceExhausted
                }
                _ => tonic::Code::Internal,
            },
            Self::Busy(_) => tonic::Code::Unavailable,
        }
    }
}

/// A model's files as this process opens them.
pub struct Local {
    /// The primary file (the first shard of a split model).
    pub path: PathBuf,
    /// Held while the files are in use: eviction (in any process) skips the copy.
    pub pin: Option<Pin>,
}

/// A shared lock on a node-cache copy; dropping it lets eviction take the copy.
pub struct Pin {
    _lock: File,
}

pub struct NodeCache {
    layout: Arc<Layout>,
    loader: LoaderClient,
}

/// Rounds of "publish, then pin" before giving up: a copy evicted by another process between
/// the two steps each time means the cache is far too small for its load.
const PIN_ROUNDS: usize = 3;

impl NodeCache {
    /// Creates the directories and checks they are writable, before the service binds.
    pub fn open(
        config: &NodeCacheConfig,
        loader: LoaderClient,
    ) -> Result<Option<Arc<Self>>, String> {
        let Some(root) = &config.model_cache_dir else {
            return Ok(None);
        };
        if config.model_cache_max_size == 0 {
            return Err("--model-cache-max-size must be above 0".into());
        }
        let layout = Layout::create(root, config.model_cache_max_size)
            .map_err(|e| format!("--model-cache-dir: {e}"))?;
        metrics::BYTES.set(layout.used_bytes() as i64);
        tracing::info!(dir = %root.display(), max_bytes = config.model_cache_max_size, "node-local model cache");
        Ok(Some(Arc::new(Self {
            layout: Arc::new(layout),
            loader,
        })))
    }

    /// Where to open `info`'s files: the loader's own paths when this process sees them (a
    /// shared volume), else a verified local copy, streamed from the loader on first use.
    pub async fn materialize(&self, info: &ModelInfo) -> Result<Local, NodeCacheError> {
        let plan = Plan::of(info)?;
        let visible = {
            let info = info.clone();
            blocking(move || Ok(layout::visible(&info))).await?
        };
        if visible {
            metrics::REQUESTS.with_label_values(&["shared"]).inc();
            return Ok(Local {
                path: PathBuf::from(&info.local_path),
                pin: None,
            });
        }
        self.local_copy(&plan).await
    }

    /// The pinned local copy of `plan`, streamed from the loader unless it is here already.
    pub async fn local_copy(&self, plan: &Plan) -> Result<Local, NodeCacheError> {
        let mut streamed = false;
        for _ in 0..PIN_ROUNDS {
            let (layout, p) = (Arc::clone(&self.layout), plan.clone());
            if let Some(local) = blocking(move || layout.pin_published(&p)).await? {
                let outcome = if streamed { "streamed" } else { "hit" };
                metrics::REQUESTS.with_label_values(&[outcome]).inc();
                return Ok(local);
            }
            // Not here: stream it under the exclusive lock. A process already streaming it
            // holds that lock; waiting for it, then finding its copy, streams the model once.
            let (layout, p) = (Arc::clone(&self.layout), plan.clone());
            let lock: Lock = blocking(move || layout.lock_exclusive(&p.id)).await?;
            let (layout, p) = (Arc::clone(&self.layout), plan.clone());
            if !blocking(move || Ok(layout.published(&p))).await? {
                self.stream(plan).await?;
                streamed = true;
            }
            drop(lock);
        }
        Err(NodeCacheError::Busy(format!(
            "the copy of {} was evicted {PIN_ROUNDS} times before it could be used; raise --model-cache-max-size",
            plan.reference
        )))
    }

    /// Makes room, streams every file into partial/, publishes. The exclusive lock is held.
    async fn stream(&self, plan: &Plan) -> Result<(), NodeCacheError> {
        let (layout, p) = (Arc::clone(&self.layout), plan.clone());
        let evicted = blocking(move || room::make_room(&layout, &p)).await?;
        for id in evicted {
            tracing::info!(copy = %id, "node cache: evicted (least recently used)");
        }
        let started = std::time::Instant::now();
        let dir = self.layout.partial_dir(&plan.id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| NodeCacheError::io(&dir, e))?;
        tracing::info!(model = %plan.reference, bytes = plan.total, "node cache: streaming the model from the loader");
        for file in &plan.files {
            copy::fetch(&self.loader, &plan.reference, file, &dir.join(&file.name)).await?;
        }
        let (layout, p) = (Arc::clone(&self.layout), plan.clone());
        blocking(move || layout.publish(&p)).await?;
        metrics::BYTES.set(self.layout.used_bytes() as i64);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            model = %plan.reference,
            bytes = plan.total,
            mb_per_s = (plan.total as f64 / 1e6 / secs.max(1e-9)) as u64,
            "node cache: model copied and verified"
        );
        Ok(())
    }
}

/// File-system work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeCacheError> + Send + 'static,
) -> Result<T, NodeCacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeCacheError::io("node cache task", std::io::Error::other(e)))?
}
