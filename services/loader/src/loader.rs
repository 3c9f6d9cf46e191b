//! The loader's core: turns references into verified cached files. Knows nothing of gRPC.
//!
//! Concurrent `ensure` calls for one reference share a single flight: the first spawns the
//! work, every caller (the first included) follows its progress through a watch channel, so a
//! caller that goes away does not abort a download others wait for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::cache::{Cache, LeaseRec};
use crate::config::LoaderConfig;
use crate::error::{LoaderError, Result};
use crate::fetch::{self, FetchOptions, FetchProgress};
use crate::hub::{Hub, RemoteFile};
use crate::now_ms;
use crate::reference::{revision_dir, HubRef, ModelRef};
use crate::store::{mtime_ns, Entry, FileRecord, Source};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Resolving,
    Waiting,
    Evicting,
    Downloading,
    Importing,
    Verifying,
}

/// Progress over the whole model (all shards): bytes done and total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressEvent {
    pub stage: Stage,
    pub file: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub resumed_from: u64,
}

impl ProgressEvent {
    fn stage(stage: Stage) -> Self {
        Self {
            stage,
            file: String::new(),
            bytes_done: 0,
            bytes_total: 0,
            resumed_from: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Ensured {
    pub entry: Entry,
    pub cache_hit: bool,
    pub lease: Option<LeaseRec>,
}

#[derive(Clone, Debug)]
pub enum EnsureEvent {
    Progress(ProgressEvent),
    /// Boxed: far larger than a progress event, which streams often.
    Done(Box<Ensured>),
}

#[derive(Clone, Debug, Default)]
pub struct EnsureOptions {
    /// Ask the hub again even when cached.
    pub refresh: bool,
    /// Take a lease of this many seconds with the result (0 = none).
    pub lease_ttl_secs: u32,
    pub lease_holder: String,
}

#[derive(Clone)]
enum Flight {
    Progress(ProgressEvent),
    Done(std::result::Result<Entry, Arc<LoaderError>>),
}

pub struct VerifyOutcome {
    pub ok: bool,
    pub detail: String,
    pub repaired: bool,
    pub entry: Entry,
}

pub struct Loader {
    cache: Arc<Cache>,
    hub: Hub,
    fetch: FetchOptions,
    local_import: bool,
    flights: Mutex<HashMap<String, watch::Receiver<Flight>>>,
    /// One writer per entry key, whatever alias led there (`repo` and `repo:Q4_K_M` may pick
    /// the same file).
    entry_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

type EventStream = std::pin::Pin<
    Box<dyn Stream<Item = std::result::Result<EnsureEvent, Arc<LoaderError>>> + Send>,
>;

impl Loader {
    pub fn new(config: &LoaderConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let root = config.resolved_cache_dir()?;
        let cache = Cache::open(&root, config.cache_max_size)?;
        let token = config.hf_token.as_ref().map(|s| s.0.clone());
        let hub = Hub::new(&config.hf_endpoint, token)?;
        Ok(Arc::new(Self {
            cache,
            hub,
            fetch: FetchOptions {
                max_attempts: config.download_attempts,
                stall_timeout: config.stall_timeout(),
                connections: config.download_connections as usize,
                part_size: config.download_part_size,
            },
            local_import: config.local_import,
            flights: Mutex::new(HashMap::new()),
            entry_locks: Mutex::new(HashMap::new()),
        }))
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn downloads_in_flight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// Resolves `reference`, downloading or importing it when needed. Bad references fail
    /// here; everything after comes through the stream, ending in one `Done` or one error.
    pub fn ensure(self: &Arc<Self>, reference: &str, opts: EnsureOptions) -> Result<EventStream> {
        let mref = ModelRef::parse(reference)?;
        if let ModelRef::Local(_) = mref {
            if !self.local_import {
                return Err(LoaderError::InvalidArgument(
                    "local paths are disabled on this loader (--local-import=false)".into(),
                ));
            }
        }
        if opts.lease_ttl_secs > crate::cache::MAX_LEASE_SECS {
            return Err(LoaderError::InvalidArgument(format!(
                "lease ttl {}s is over the {}s maximum",
                opts.lease_ttl_secs,
                crate::cache::MAX_LEASE_SECS
            )));
        }
        if !opts.refresh {
            if let Some(entry) = self.quick_hit(&mref) {
                let done = self.finish(entry, true, &opts);
                return Ok(Box::pin(futures::stream::once(async move {
                    done.map(|d| EnsureEvent::Done(Box::new(d)))
                })));
            }
        }
        let (mut rx, joined) = self.join_flight(mref, opts.refresh);
        let this = Arc::clone(self);
        Ok(Box::pin(async_stream::stream! {
            if joined {
                yield Ok(EnsureEvent::Progress(ProgressEvent::stage(Stage::Waiting)));
            }
            loop {
                let state = rx.borrow_and_update().clone();
                match state {
                    Flight::Progress(p) => yield Ok(EnsureEvent::Progress(p)),
                    Flight::Done(Ok(entry)) => {
                        yield this.finish(entry, false, &opts).map(|d| EnsureEvent::Done(Box::new(d)));
                        break;
                    }
                    Flight::Done(Err(e)) => {
                        yield Err(e);
                        break;
                    }
                }
                if rx.changed().await.is_err() {
                    yield Err(Arc::new(LoaderError::ShuttingDown));
                    break;
                }
            }
        }))
    }

    /// Runs `ensure` to the end, ignoring progress.
    pub async fn ensure_done(
        self: &Arc<Self>,
        reference: &str,
        opts: EnsureOptions,
    ) -> std::result::Result<Ensured, Arc<LoaderError>> {
        use futures::StreamExt;
        let mut s = self.ensure(reference, opts).map_err(Arc::new)?;
        while let Some(ev) = s.next().await {
            if let EnsureEvent::Done(d) = ev? {
                return Ok(*d);
            }
        }
        Err(Arc::new(LoaderError::ShuttingDown))
    }

    fn finish(
        &self,
        entry: Entry,
        cache_hit: bool,
        opts: &EnsureOptions,
    ) -> std::result::Result<Ensured, Arc<LoaderError>> {
        let outcome = if cache_hit { "hit" } else { "miss" };
        crate::metrics::ENSURES.with_label_values(&[outcome]).inc();
        let lease = if opts.lease_ttl_secs > 0 {
            Some(
                self.cache
                    .lease(&entry.key, opts.lease_ttl_secs, &opts.lease_holder)
                    .map_err(Arc::new)?,
            )
        } else {
            None
        };
        Ok(Ensured {
            entry,
            cache_hit,
            lease,
        })
    }

    /// A cached entry whose files still have the recorded size and mtime: served without
    /// hashing or network. Anything else goes through a flight, which re-checks.
    fn quick_hit(&self, mref: &ModelRef) -> Option<Entry> {
        let entry = self.cache.lookup(&alias_of(mref))?;
        if let (
            ModelRef::Local(p),
            Source::Local {
                size, mtime_ns: m, ..
            },
        ) = (mref, &entry.source)
        {
            let md = std::fs::metadata(p).ok()?;
            if md.len() != *size || mtime_ns(&md) != *m {
                return None;
            }
        }
        let unchanged = entry.files.iter().all(|f| {
            std::fs::metadata(entry.file_path(self.cache.root(), f))
                .is_ok_and(|md| md.len() == f.size && mtime_ns(&md) == f.mtime_ns)
        });
        if !unchanged {
            return None;
        }
        self.cache.touch(&entry.key);
        Some(entry)
    }

    /// The flight for `mref`, started if none is in the air; true when it was already flying.
    fn join_flight(
        self: &Arc<Self>,
        mref: ModelRef,
        refresh: bool,
    ) -> (watch::Receiver<Flight>, bool) {
        let key = format!("{mref}{}", if refresh { "#refresh" } else { "" });
        let mut flights = lock(&self.flights);
        if let Some(rx) = flights.get(&key) {
            return (rx.clone(), true);
        }
        let (tx, rx) = watch::channel(Flight::Progress(ProgressEvent::stage(Stage::Resolving)));
        flights.insert(key.clone(), rx.clone());
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let report = |p: ProgressEvent| {
                tx.send_replace(Flight::Progress(p));
            };
            let result = this.fly(&mref, refresh, &report).await.map_err(Arc::new);
            if let Err(e) = &result {
                tracing::info!(reference = %mref, error = %e, "ensure failed");
            }
            // Remove first: a caller arriving after Done starts a fresh flight (and finds the
            // cache), rather than reading a stale failure.
            lock(&this.flights).remove(&key);
            tx.send_replace(Flight::Done(result));
        });
        (rx, false)
    }

    async fn fly(
        &self,
        mref: &ModelRef,
        refresh: bool,
        report: &(dyn Fn(ProgressEvent) + Send + Sync),
    ) -> Result<Entry> {
        match mref {
            ModelRef::Hub(h) => self.fly_hub(h, refresh, false, report).await,
            ModelRef::Local(p) => self.import_local(p, report).await,
        }
    }

    async fn fly_hub(
        &self,
        h: &HubRef,
        refresh: bool,
        force: bool,
        report: &(dyn Fn(ProgressEvent) + Send + Sync),
    ) -> Result<Entry> {
        let alias = h.to_string();
        let mut force = force;
        if !refresh && !force {
            if let Some(entry) = self.cache.lookup(&alias) {
                match self.recheck(&entry, report).await? {
                    true => return Ok(entry_touched(&self.cache, entry)),
                    false => force = true,
                }
            }
        }
        report(ProgressEvent::stage(Stage::Resolving));
        let resolved = self.hub.resolve(h).await?;
        let primary = resolved.files[0].name.clone();
        let key = format!("{}/{}@{}", h.repo, primary, h.revision);
        let guard = self.entry_lock(&key);
        let _held = guard.lock().await;

        if !force {
            if let Some(entry) = self.cache.lookup(&key) {
                let same_commit = matches!(&entry.source, Source::Hub { commit, .. } if *commit == resolved.commit);
                if same_commit && self.recheck(&entry, report).await? {
                    self.cache.add_alias(&alias, &key)?;
                    return Ok(entry_touched(&self.cache, entry));
                }
            }
        }

        let total: u64 = resolved.files.iter().map(|f| f.size).sum();
        let parts: Vec<PathBuf> = resolved
            .files
            .iter()
            .map(|f| self.part_path(&key, &f.name))
            .collect();
        report(ProgressEvent {
            bytes_total: total,
            ..ProgressEvent::stage(Stage::Evicting)
        });
        let _reservation = self.cache.reserve(total, parts.clone())?;

        let dir = format!("models/hf/{}/{}", h.repo, revision_dir(&h.revision));
        let mut records = Vec::with_capacity(resolved.files.len());
        let mut done_before = 0u64;
        for (remote, part) in resolved.files.iter().zip(&parts) {
            let digests = self
                .download(remote, part, done_before, total, report)
                .await?;
            check_gguf_magic(part, &remote.name)?;
            let dest = self.cache.root().join(&dir).join(&remote.name);
            let mtime = publish_file(part, &dest)?;
            records.push(FileRecord {
                name: remote.name.clone(),
                size: digests.size,
                md5: digests.md5,
                sha256: Some(digests.sha256),
                mtime_ns: mtime,
            });
            done_before += remote.size;
        }
        let entry = Entry {
            key: key.clone(),
            source: Source::Hub {
                repo: h.repo.clone(),
                revision: h.revision.clone(),
                commit: resolved.commit,
            },
            dir,
            files: records,
            created_ms: now_ms(),
            last_used_ms: now_ms(),
            last_use: 0,
        };
        tracing::info!(key, bytes = total, "model cached");
        self.cache.publish(entry, &[alias, key.clone()])
    }

    /// One file, retried from scratch once if the finished bytes fail their check (a corrupt
    /// transfer is not resumable: its bytes are unknown).
    async fn download(
        &self,
        remote: &RemoteFile,
        part: &Path,
        done_before: u64,
        total: u64,
        report: &(dyn Fn(ProgressEvent) + Send + Sync),
    ) -> Result<fetch::Digests> {
        let on_progress = |p: FetchProgress| {
            report(ProgressEvent {
                stage: if p.verifying {
                    Stage::Verifying
                } else {
                    Stage::Downloading
                },
                file: remote.name.clone(),
                bytes_done: done_before + p.bytes_done,
                bytes_total: total,
                resumed_from: p.resumed_from,
            })
        };
        match fetch::fetch(self.hub.client(), remote, part, &self.fetch, &on_progress).await {
            Err(LoaderError::Integrity { detail, .. }) => {
                tracing::warn!(file = %remote.name, detail, "downloaded bytes failed their check; fetching again");
                fetch::fetch(self.hub.client(), remote, part, &self.fetch, &on_progress).await
            }
            other => other,
        }
    }

    async fn import_local(
        &self,
        path: &Path,
        report: &(dyn Fn(ProgressEvent) + Send + Sync),
    ) -> Result<Entry> {
        let local_err = |e| LoaderError::LocalFile {
            path: path.to_path_buf(),
            source: e,
        };
        let src = tokio::fs::canonicalize(path).await.map_err(local_err)?;
        let md = tokio::fs::metadata(&src).await.map_err(local_err)?;
        if !md.is_file() {
            return Err(LoaderError::InvalidArgument(format!(
                "{} is not a file",
                src.display()
            )));
        }
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| crate::reference::check_file_path(n).is_ok())
            .ok_or_else(|| LoaderError::InvalidArgument(format!(
                "{}: a local model must be a .gguf file named with letters, digits, '-', '_' and '.'",
                src.display()
            )))?
            .to_string();
        check_gguf_magic(&src, &name)?;
        let key = format!("local:{}", src.display());
        let guard = self.entry_lock(&key);
        let _held = guard.lock().await;
        let (size, mtime) = (md.len(), mtime_ns(&md));
        if let Some(entry) = self.cache.lookup(&key) {
            let same_source = matches!(&entry.source, Source::Local { size: s, mtime_ns: m, .. } if *s == size && *m == mtime);
            if same_source && self.recheck(&entry, report).await? {
                return Ok(entry_touched(&self.cache, entry));
            }
        }
        let part = self.part_path(&key, &name);
        let _reservation = self.cache.reserve(size, vec![part.clone()])?;
        report(ProgressEvent {
            stage: Stage::Importing,
            file: name.clone(),
            bytes_done: 0,
            bytes_total: size,
            resumed_from: 0,
        });
        let (src2, part2) = (src.clone(), part.clone());
        let digests = tokio::task::spawn_blocking(move || fetch::copy_hashing(&src2, &part2))
            .await
            .map_err(|e| LoaderError::io(&part, std::io::Error::other(e)))?
            .map_err(|e| LoaderError::io(&part, e))?;
        let dir = format!("models/local/{}", &digests.md5[..16]);
        let mtime_cached = publish_file(&part, &self.cache.root().join(&dir).join(&name))?;
        let entry = Entry {
            key: key.clone(),
            source: Source::Local {
                path: src,
                size,
                mtime_ns: mtime,
            },
            dir,
            files: vec![FileRecord {
                name,
                size: digests.size,
                md5: digests.md5,
                sha256: Some(digests.sha256),
                mtime_ns: mtime_cached,
            }],
            created_ms: now_ms(),
            last_used_ms: now_ms(),
            last_use: 0,
        };
        self.cache.publish(entry, &[key])
    }

    /// Re-hashes files whose size or mtime moved since they were recorded. True when every
    /// file still has its recorded MD5 (the new mtimes are then recorded).
    async fn recheck(
        &self,
        entry: &Entry,
        report: &(dyn Fn(ProgressEvent) + Send + Sync),
    ) -> Result<bool> {
        let mut updated = entry.clone();
        let mut changed = false;
        for f in updated.files.iter_mut() {
            let path = entry.file_path(self.cache.root(), f);
            let Ok(md) = std::fs::metadata(&path) else {
                return Ok(false);
            };
            if md.len() != f.size {
                tracing::warn!(path = %path.display(), "cached file has the wrong size");
                return Ok(false);
            }
            if mtime_ns(&md) == f.mtime_ns {
                continue;
            }
            report(ProgressEvent {
                stage: Stage::Verifying,
                file: f.name.clone(),
                bytes_done: 0,
                bytes_total: f.size,
                resumed_from: 0,
            });
            let digests = hash_blocking(path.clone()).await?;
            if digests.md5 != f.md5 {
                tracing::warn!(path = %path.display(), expected = %f.md5, found = %digests.md5, "cached file is corrupt");
                return Ok(false);
            }
            f.mtime_ns = mtime_ns(&md);
            changed = true;
        }
        if changed {
            self.cache.refresh_files(&updated)?;
        }
        Ok(true)
    }

    /// Looks a reference up in the cache only.
    pub fn get(&self, reference: &str) -> Result<Entry> {
        let mref = ModelRef::parse(reference)?;
        self.cache
            .lookup(&alias_of(&mref))
            .ok_or(LoaderError::NotCached(reference.to_string()))
    }

    pub fn evict(&self, reference: &str, force: bool) -> Result<(String, u64)> {
        let entry = self.get(reference)?;
        let freed = self.cache.remove(&entry.key, force)?;
        Ok((entry.key, freed))
    }

    pub fn lease(&self, reference: &str, ttl_secs: u32, holder: &str) -> Result<(LeaseRec, Entry)> {
        crate::cache::lease_ttl(ttl_secs)?;
        let entry = self.get(reference)?;
        let lease = self.cache.lease(&entry.key, ttl_secs, holder)?;
        Ok((lease, entry))
    }

    /// Hashes every file of a cached model against the manifest; with `repair`, fetches a hub
    /// model again (or re-imports a local one) when the check fails.
    pub async fn verify(self: &Arc<Self>, reference: &str, repair: bool) -> Result<VerifyOutcome> {
        let entry = self.get(reference)?;
        let mut problems = Vec::new();
        for f in &entry.files {
            let path = entry.file_path(self.cache.root(), f);
            match hash_blocking(path.clone()).await {
                Ok(d) if d.md5 == f.md5 && d.size == f.size => {}
                Ok(d) => problems.push(format!(
                    "{}: md5 {} (expected {}), {} bytes (expected {})",
                    f.name, d.md5, f.md5, d.size, f.size
                )),
                Err(e) => problems.push(format!("{}: {e}", f.name)),
            }
        }
        if problems.is_empty() {
            return Ok(VerifyOutcome {
                ok: true,
                detail: String::new(),
                repaired: false,
                entry,
            });
        }
        let detail = problems.join("; ");
        if !repair {
            return Ok(VerifyOutcome {
                ok: false,
                detail,
                repaired: false,
                entry,
            });
        }
        let repaired = match &entry.source {
            Source::Hub { repo, revision, .. } => {
                let h = HubRef {
                    repo: repo.clone(),
                    selector: crate::reference::FileSelector::File(entry.files[0].name.clone()),
                    revision: revision.clone(),
                };
                self.fly_hub(&h, true, true, &|_| {}).await?
            }
            Source::Local { path, .. } => self.import_local(&path.clone(), &|_| {}).await?,
        };
        Ok(VerifyOutcome {
            ok: false,
            detail,
            repaired: true,
            entry: repaired,
        })
    }

    fn part_path(&self, key: &str, file: &str) -> PathBuf {
        let digest = Sha256::digest(format!("{key}\n{file}"));
        self.cache
            .root()
            .join("tmp")
            .join(format!("{}.part", hex::encode(&digest[..16])))
    }

    fn entry_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.entry_locks);
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(locks.entry(key.to_string()).or_default())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The entry as recorded after this use (the one given if it went meanwhile).
fn entry_touched(cache: &Cache, entry: Entry) -> Entry {
    cache.touch(&entry.key).unwrap_or(entry)
}

/// The alias a reference is cached under: its canonical text.
fn alias_of(mref: &ModelRef) -> String {
    match mref {
        ModelRef::Local(p) => format!(
            "local:{}",
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
        ),
        ModelRef::Hub(h) => h.to_string(),
    }
}

async fn hash_blocking(path: PathBuf) -> Result<fetch::Digests> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || fetch::hash_file(&p))
        .await
        .map_err(|e| LoaderError::io(&path, std::io::Error::other(e)))?
        .map_err(|e| LoaderError::io(&path, e))
}

/// A GGUF file starts with the magic `GGUF`: anything else (an HTML error page, a truncated
/// file) must never be published.
fn check_gguf_magic(path: &Path, name: &str) -> Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if ok {
        Ok(())
    } else {
        Err(LoaderError::Integrity {
            file: name.to_string(),
            detail: "not a GGUF file (bad magic)".into(),
        })
    }
}

/// Moves a verified, fsynced partial file to its place atomically; returns its mtime.
fn publish_file(part: &Path, dest: &Path) -> Result<i64> {
    let dir = dest.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(dir).map_err(|e| LoaderError::io(dir, e))?;
    std::fs::rename(part, dest).map_err(|e| LoaderError::io(dest, e))?;
    let _ = std::fs::remove_file(fetch::meta_path(part));
    crate::store::sync_dir(dir)?;
    let md = std::fs::metadata(dest).map_err(|e| LoaderError::io(dest, e))?;
    Ok(mtime_ns(&md))
}
