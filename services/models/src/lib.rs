//! Loaded models for a stateless service: a reference is resolved (and downloaded) by the
//! loader, leased so the loader never evicts it while open, loaded once, shared by every
//! request, and unloaded least-recently-used first past `max_models` (its lease released).
//! Models already loaded keep serving when the loader is unreachable.

pub mod device;
pub mod info;
pub mod node_cache;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llama_agent_client::proto::common::v1::ModelInfo;
use llama_agent_client::proto::loader::v1::EnsureModelRequest;
use llama_agent_client::{ClientError, LoaderClient};
use llama_agent_engine::EngineError;
use node_cache::{NodeCache, NodeCacheError, Pin};

static LOAD_SECONDS: std::sync::LazyLock<prometheus::Histogram> = std::sync::LazyLock::new(|| {
    prometheus::register_histogram!(
        "llama_agent_model_load_seconds",
        "Time to load a model file into an engine (after the loader provided it).",
        prometheus::exponential_buckets(0.05, 2.0, 12).expect("valid buckets")
    )
    .expect("metric registers once")
});

static LOADED: std::sync::LazyLock<prometheus::IntGauge> = std::sync::LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "llama_agent_models_loaded",
        "Models loaded in this process."
    )
    .expect("metric registers once")
});

/// Leases are taken for this long and renewed at a third of it, so two missed renewals
/// still leave the model pinned.
const LEASE_TTL_SECS: u32 = 300;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("loader: {0}")]
    Loader(#[from] ClientError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    NodeCache(#[from] NodeCacheError),
}

impl PoolError {
    /// The gRPC code a caller should see: the loader's own code passes through.
    pub fn code(&self) -> tonic::Code {
        match self {
            PoolError::Loader(e) => e.code(),
            PoolError::Engine(e) => engine_code(e),
            PoolError::NodeCache(e) => e.code(),
        }
    }
}

/// What an inference RPC (generate, embed) fails with, and its one mapping to gRPC statuses.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::Invalid(_) => tonic::Status::invalid_argument(msg),
            ServiceError::Pool(p) => tonic::Status::new(p.code(), msg),
            ServiceError::Engine(e) => tonic::Status::new(engine_code(&e), msg),
        }
    }
}

/// The gRPC code of an engine error, the same in every service that runs an engine.
fn engine_code(e: &EngineError) -> tonic::Code {
    match e {
        EngineError::InvalidRequest(_) => tonic::Code::InvalidArgument,
        EngineError::QueueFull(_) | EngineError::DoesNotFit(_) => tonic::Code::ResourceExhausted,
        EngineError::Stopped => tonic::Code::Unavailable,
        // The file is there but llama.cpp cannot use it (unsupported architecture, bad GGUF).
        EngineError::Load { .. } | EngineError::Unsupported(_) => tonic::Code::FailedPrecondition,
        EngineError::Backend(_) | EngineError::Llama(_) => tonic::Code::Internal,
    }
}

/// How a service names itself on its leases: `llama-generator@<pod or pid>`.
pub fn lease_holder(service: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| std::process::id().to_string());
    format!("{service}@{host}")
}

pub type LoadFn<E> = dyn Fn(&Path) -> Result<E, EngineError> + Send + Sync;

struct Loaded<E> {
    engine: Arc<E>,
    info: ModelInfo,
    lease_id: String,
    /// Keeps a node-cache copy from eviction while the engine has its files open.
    _pin: Option<Pin>,
    /// Use number of the last use: exact LRU order (two uses never tie, unlike clock reads).
    last_use: u64,
}

struct State<E> {
    /// Request reference → the cache entry it resolved to (`owner/repo` → `owner/repo/f.gguf@main`).
    aliases: HashMap<String, String>,
    /// By cache entry reference.
    loaded: HashMap<String, Loaded<E>>,
    /// The last use number handed out.
    uses: u64,
}

impl<E> State<E> {
    /// Takes the least recently used models (never `keep`) out until `limit` remain.
    fn unload_over(&mut self, limit: usize, keep: &str) -> Vec<(String, Loaded<E>)> {
        let mut out = Vec::new();
        while self.loaded.len() > limit {
            let oldest = self
                .loaded
                .iter()
                .filter(|(k, _)| *k != keep)
                .min_by_key(|(_, l)| l.last_use)
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            if let Some(l) = self.loaded.remove(&oldest) {
                self.aliases.retain(|_, k| *k != oldest);
                out.push((oldest, l));
            }
        }
        out
    }

    /// Marks `key` as used now; its engine and info when it is loaded.
    fn use_loaded(&mut self, key: &str) -> Option<(Arc<E>, ModelInfo)> {
        self.uses += 1;
        let l = self.loaded.get_mut(key)?;
        l.last_use = self.uses;
        Some((Arc::clone(&l.engine), l.info.clone()))
    }
}

pub struct ModelPool<E> {
    loader: LoaderClient,
    holder: String,
    max_models: usize,
    load: Arc<LoadFn<E>>,
    /// Copies of models this process cannot see at the loader's paths (`--model-cache-dir`).
    node_cache: Option<Arc<NodeCache>>,
    state: Mutex<State<E>>,
    /// One load at a time per reference; different models load concurrently.
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl<E: Send + Sync + 'static> ModelPool<E> {
    pub fn new(
        loader: LoaderClient,
        holder: impl Into<String>,
        max_models: usize,
        node_cache: Option<Arc<NodeCache>>,
        load: Arc<LoadFn<E>>,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            loader,
            holder: holder.into(),
            max_models: max_models.max(1),
            load,
            node_cache,
            state: Mutex::new(State {
                aliases: HashMap::new(),
                loaded: HashMap::new(),
                uses: 0,
            }),
            loading: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(u64::from(LEASE_TTL_SECS / 3)));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.renew_leases().await;
            }
        });
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<E>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, reference: &str) -> Option<(Arc<E>, ModelInfo)> {
        let mut st = self.lock();
        let key = st.aliases.get(reference).cloned()?;
        st.use_loaded(&key)
    }

    /// The engine for `reference`, loading it (through the loader) when needed.
    pub async fn get(&self, reference: &str) -> Result<(Arc<E>, ModelInfo), PoolError> {
        if let Some(hit) = self.cached(reference) {
            return Ok(hit);
        }
        let gate = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            loading.retain(|_, g| Arc::strong_count(g) > 1);
            Arc::clone(loading.entry(reference.to_string()).or_default())
        };
        let _held = gate.lock().await;
        if let Some(hit) = self.cached(reference) {
            return Ok(hit);
        }
        let ensured = self
            .loader
            .ensure(
                EnsureModelRequest {
                    model: reference.to_string(),
                    lease_ttl_seconds: LEASE_TTL_SECS,
                    lease_holder: self.holder.clone(),
                    ..Default::default()
                },
                |_| {},
            )
            .await?;
        let info = ensured.model;
        let lease_id = ensured.lease.map(|l| l.lease_id).unwrap_or_default();
        let key = info.reference.clone();
        // Another alias may already have loaded the same file.
        let existing = {
            let mut st = self.lock();
            st.aliases.insert(reference.to_string(), key.clone());
            st.use_loaded(&key)
        };
        if let Some(hit) = existing {
            self.release(lease_id).await;
            return Ok(hit);
        }

        let (path, pin) = match &self.node_cache {
            None => (std::path::PathBuf::from(&info.local_path), None),
            Some(cache) => {
                // The new copy may need the room of the model this pool would unload after
                // loading: unload it first, so its copy can be evicted.
                let out = self.lock().unload_over(self.max_models - 1, &key);
                self.unloaded(out).await;
                match cache.materialize(&info).await {
                    Ok(local) => (local.path, local.pin),
                    Err(e) => {
                        self.release(lease_id).await;
                        return Err(e.into());
                    }
                }
            }
        };
        let load = Arc::clone(&self.load);
        let started = Instant::now();
        let engine = tokio::task::spawn_blocking(move || load(&path))
            .await
            .map_err(|e| EngineError::Backend(format!("model load task: {e}")))?;
        let engine = match engine {
            Ok(e) => Arc::new(e),
            Err(e) => {
                self.release(lease_id).await;
                return Err(e.into());
            }
        };
        // The engine logs the load itself (file, CPU module, device, layers offloaded).
        tracing::debug!(model = %key, ms = started.elapsed().as_millis() as u64, "model loaded");
        LOAD_SECONDS.observe(started.elapsed().as_secs_f64());
        LOADED.inc();
        let evicted = {
            let mut st = self.lock();
            st.loaded.insert(
                key.clone(),
                Loaded {
                    engine: Arc::clone(&engine),
                    info: info.clone(),
                    lease_id,
                    _pin: pin,
                    last_use: 0,
                },
            );
            st.use_loaded(&key);
            st.unload_over(self.max_models, &key)
        };
        self.unloaded(evicted).await;
        Ok((engine, info))
    }

    /// Loads `models` before a service reports SERVING; the first failure names its model.
    pub async fn preload(&self, models: &[String]) -> Result<(), (String, PoolError)> {
        for model in models {
            self.get(model).await.map_err(|e| (model.clone(), e))?;
        }
        Ok(())
    }

    /// The preloads as a service's warm-up: done before health reports SERVING.
    pub fn warmup(
        self: &Arc<Self>,
        models: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let pool = Arc::clone(self);
        Box::pin(async move {
            pool.preload(&models)
                .await
                .map_err(|(model, e)| format!("preloading {model}: {e}"))
        })
    }

    /// Whether `reference` (as a request names it) is loaded now.
    pub fn is_loaded(&self, reference: &str) -> bool {
        let st = self.lock();
        st.aliases
            .get(reference)
            .is_some_and(|key| st.loaded.contains_key(key))
    }

    /// Models loaded now, most recently used first.
    pub fn loaded(&self) -> Vec<ModelInfo> {
        let st = self.lock();
        let mut v: Vec<&Loaded<E>> = st.loaded.values().collect();
        v.sort_by_key(|l| std::cmp::Reverse(l.last_use));
        v.into_iter().map(|l| l.info.clone()).collect()
    }

    /// Models taken out of the pool: their leases released (requests still running keep their
    /// engine until they end).
    async fn unloaded(&self, models: Vec<(String, Loaded<E>)>) {
        for (key, l) in models {
            tracing::info!(model = %key, "model unloaded (least recently used)");
            LOADED.dec();
            self.release(l.lease_id).await;
        }
    }

    async fn release(&self, lease_id: String) {
        if lease_id.is_empty() {
            return;
        }
        if let Err(e) = self.loader.release_lease(&lease_id).await {
            tracing::warn!(lease = %lease_id, error = %e, "releasing a lease");
        }
    }

    /// Keeps every loaded model pinned; a loader that restarted lost its leases, so those are
    /// taken again.
    async fn renew_leases(&self) {
        let leases: Vec<(String, String)> = self
            .lock()
            .loaded
            .iter()
            .map(|(k, l)| (k.clone(), l.lease_id.clone()))
            .collect();
        for (key, id) in leases {
            match self.loader.renew_lease(&id, LEASE_TTL_SECS).await {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {
                    match self
                        .loader
                        .lease_model(&key, LEASE_TTL_SECS, &self.holder)
                        .await
                    {
                        Ok(r) => {
                            if let (Some(lease), Some(l)) =
                                (r.lease, self.lock().loaded.get_mut(&key))
                            {
                                l.lease_id = lease.lease_id;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(model = %key, error = %e, "re-leasing a loaded model")
                        }
                    }
                }
                Err(e) => tracing::warn!(model = %key, error = %e, "renewing a lease"),
            }
        }
    }
}
