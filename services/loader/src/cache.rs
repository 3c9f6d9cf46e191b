//! The cache's bookkeeping: manifest entries, LRU order, leases and space reservations.
//!
//! One std mutex guards it all: every critical section is short (no await inside), and
//! deciding what to evict must see entries, leases and reservations at once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{LoaderError, Result};
use crate::now_ms;
use crate::store::{Entry, Manifest, ManifestStore};

/// Longest lease a holder may take in one go; holders renew.
pub const MAX_LEASE_SECS: u32 = 24 * 3600;
pub const DEFAULT_LEASE_SECS: u32 = 600;

#[derive(Clone, Debug)]
pub struct LeaseRec {
    pub id: String,
    pub key: String,
    pub holder: String,
    pub expires_ms: i64,
}

pub struct Cache {
    root: PathBuf,
    max_bytes: u64,
    store: ManifestStore,
    state: Mutex<State>,
}

struct State {
    manifest: Manifest,
    leases: HashMap<String, LeaseRec>,
    /// Bytes promised to downloads in flight.
    reserved: u64,
    /// Partial files being written now (not stale, not evictable).
    active_parts: HashSet<PathBuf>,
    /// last_used changed since the manifest was written.
    dirty: bool,
}

#[derive(Clone, Debug)]
pub struct CacheStats {
    pub bytes_used: u64,
    pub entries: usize,
    pub leased_entries: usize,
    pub partial_bytes: u64,
}

/// Space promised to one download; given back when dropped.
pub struct Reservation {
    cache: Arc<Cache>,
    bytes: u64,
    parts: Vec<PathBuf>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.cache.lock();
        st.reserved -= self.bytes;
        for p in &self.parts {
            st.active_parts.remove(p);
        }
    }
}

impl Cache {
    /// Opens (or creates) the cache at `root`, dropping manifest entries whose files vanished
    /// and deleting files no entry owns (a publish interrupted between rename and manifest).
    pub fn open(root: &Path, max_bytes: u64) -> Result<Arc<Self>> {
        for dir in [root.join("models"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|e| LoaderError::io(&dir, e))?;
        }
        let store = ManifestStore::new(root);
        let mut manifest = store.load()?;
        let before = manifest.entries.len();
        manifest.entries.retain(|_, e| {
            let present = e.files.iter().all(|f| e.file_path(root, f).is_file());
            if !present {
                tracing::warn!(key = %e.key, "cached files missing; forgetting the entry");
            }
            present
        });
        let entries = &manifest.entries;
        manifest.aliases.retain(|_, key| entries.contains_key(key));
        if manifest.entries.len() != before {
            store.save(&manifest)?;
        }
        let owned: HashSet<PathBuf> = manifest
            .entries
            .values()
            .flat_map(|e| e.files.iter().map(|f| e.file_path(root, f)))
            .collect();
        remove_orphans(&root.join("models"), &owned);
        remove_stale_tmp(&root.join("tmp"));
        Ok(Arc::new(Self {
            root: root.to_path_buf(),
            max_bytes,
            store,
            state: Mutex::new(State {
                manifest,
                leases: HashMap::new(),
                reserved: 0,
                active_parts: HashSet::new(),
                dirty: false,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The entry an alias (or an entry key) names.
    pub fn lookup(&self, alias: &str) -> Option<Entry> {
        let st = self.lock();
        let key = st.manifest.aliases.get(alias).map_or(alias, |k| k.as_str());
        st.manifest.entries.get(key).cloned()
    }

    pub fn touch(&self, key: &str) {
        let mut st = self.lock();
        if let Some(e) = st.manifest.entries.get_mut(key) {
            e.last_used_ms = now_ms();
            st.dirty = true;
        }
    }

    /// Records a published entry and the aliases that lead to it, durably.
    pub fn publish(&self, mut entry: Entry, aliases: &[String]) -> Result<Entry> {
        let mut st = self.lock();
        let now = now_ms();
        entry.last_used_ms = now;
        if let Some(old) = st.manifest.entries.get(&entry.key) {
            entry.created_ms = old.created_ms;
        }
        for a in aliases {
            st.manifest.aliases.insert(a.clone(), entry.key.clone());
        }
        st.manifest.entries.insert(entry.key.clone(), entry.clone());
        self.store.save(&st.manifest)?;
        st.dirty = false;
        Ok(entry)
    }

    /// Updates the recorded state of files after a successful re-hash (new mtime).
    pub fn refresh_files(&self, entry: &Entry) -> Result<()> {
        let mut st = self.lock();
        if let Some(e) = st.manifest.entries.get_mut(&entry.key) {
            e.files = entry.files.clone();
            self.store.save(&st.manifest)?;
            st.dirty = false;
        }
        Ok(())
    }

    pub fn add_alias(&self, alias: &str, key: &str) -> Result<()> {
        let mut st = self.lock();
        if st.manifest.aliases.get(alias).map(String::as_str) == Some(key) {
            return Ok(());
        }
        st.manifest
            .aliases
            .insert(alias.to_string(), key.to_string());
        self.store.save(&st.manifest)?;
        st.dirty = false;
        Ok(())
    }

    /// Removes an entry and its files. A leased entry needs `force` (its leases go too).
    pub fn remove(&self, key: &str, force: bool) -> Result<u64> {
        let mut st = self.lock();
        prune_leases(&mut st);
        if !st.manifest.entries.contains_key(key) {
            return Err(LoaderError::NotCached(key.to_string()));
        }
        let holders = holders_of(&st, key);
        if !holders.is_empty() && !force {
            return Err(LoaderError::Leased {
                reference: key.to_string(),
                holders,
            });
        }
        st.leases.retain(|_, l| l.key != key);
        self.remove_locked(&mut st, key)
    }

    fn remove_locked(&self, st: &mut State, key: &str) -> Result<u64> {
        let Some(entry) = st.manifest.entries.remove(key) else {
            return Ok(0);
        };
        st.manifest.aliases.retain(|_, k| k != key);
        // Manifest first: a crash now leaves orphan files, which the next start deletes.
        self.store.save(&st.manifest)?;
        st.dirty = false;
        for f in &entry.files {
            let p = entry.file_path(&self.root, f);
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "removing evicted file");
            }
        }
        remove_empty_dirs(&self.root.join(&entry.dir), &self.root.join("models"));
        tracing::info!(key, bytes = entry.size(), "evicted");
        crate::metrics::EVICTIONS.inc();
        crate::metrics::EVICTED_BYTES.inc_by(entry.size());
        Ok(entry.size())
    }

    /// Promises `bytes` to a download writing `parts`, evicting least recently used unleased
    /// entries (and stale partial files) when they would not fit. Refuses, saying why, when
    /// even that cannot make room.
    pub fn reserve(self: &Arc<Self>, bytes: u64, parts: Vec<PathBuf>) -> Result<Reservation> {
        let mut st = self.lock();
        prune_leases(&mut st);
        // Our own partial file is part of `bytes`; other downloads in flight are covered by
        // their reservations; partial files nobody is writing are stale and may go first.
        let stale_parts: Vec<(PathBuf, u64)> = list_parts(&self.root.join("tmp"))
            .into_iter()
            .filter(|(p, _)| !parts.contains(p) && !st.active_parts.contains(p))
            .collect();
        let stale: u64 = stale_parts.iter().map(|(_, n)| n).sum();
        let entries: u64 = st.manifest.entries.values().map(Entry::size).sum();
        let used = entries + stale + st.reserved;
        let need = bytes;
        if used + need > self.max_bytes {
            let mut lru: Vec<(i64, String, u64)> = st
                .manifest
                .entries
                .values()
                .filter(|e| holders_of(&st, &e.key).is_empty())
                .map(|e| (e.last_used_ms, e.key.clone(), e.size()))
                .collect();
            lru.sort();
            let evictable: u64 = stale + lru.iter().map(|(_, _, n)| n).sum::<u64>();
            if used + need > self.max_bytes + evictable {
                let leased: u64 = entries - lru.iter().map(|(_, _, n)| n).sum::<u64>();
                return Err(LoaderError::CacheFull(format!(
                    "need {need} bytes but the cap is {} bytes with {} used, of which {leased} \
                     bytes are leased models that cannot be evicted and {} bytes belong to downloads \
                     in progress",
                    self.max_bytes,
                    used,
                    st.reserved
                )));
            }
            let mut over = used + need - self.max_bytes;
            for (p, n) in stale_parts {
                if over == 0 {
                    break;
                }
                crate::fetch::discard_part(&p);
                over = over.saturating_sub(n);
            }
            for (_, key, _) in lru {
                if over == 0 {
                    break;
                }
                over = over.saturating_sub(self.remove_locked(&mut st, &key)?);
            }
        }
        st.reserved += bytes;
        st.active_parts.extend(parts.iter().cloned());
        Ok(Reservation {
            cache: Arc::clone(self),
            bytes,
            parts,
        })
    }

    pub fn lease(&self, key: &str, ttl_secs: u32, holder: &str) -> Result<LeaseRec> {
        let ttl = lease_ttl(ttl_secs)?;
        let mut st = self.lock();
        if !st.manifest.entries.contains_key(key) {
            return Err(LoaderError::NotCached(key.to_string()));
        }
        let lease = LeaseRec {
            id: uuid::Uuid::new_v4().to_string(),
            key: key.to_string(),
            holder: if holder.is_empty() {
                "anonymous".into()
            } else {
                holder.to_string()
            },
            expires_ms: now_ms() + i64::from(ttl) * 1000,
        };
        st.leases.insert(lease.id.clone(), lease.clone());
        Ok(lease)
    }

    pub fn renew(&self, id: &str, ttl_secs: u32) -> Result<LeaseRec> {
        let ttl = lease_ttl(ttl_secs)?;
        let mut st = self.lock();
        prune_leases(&mut st);
        let lease = st
            .leases
            .get_mut(id)
            .ok_or_else(|| LoaderError::LeaseNotFound(id.to_string()))?;
        lease.expires_ms = now_ms() + i64::from(ttl) * 1000;
        Ok(lease.clone())
    }

    pub fn release(&self, id: &str) -> Result<()> {
        let mut st = self.lock();
        st.leases
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| LoaderError::LeaseNotFound(id.to_string()))
    }

    /// Every entry, most recently used first, with its live leases.
    pub fn list(&self) -> Vec<(Entry, Vec<LeaseRec>)> {
        let mut st = self.lock();
        prune_leases(&mut st);
        let mut out: Vec<(Entry, Vec<LeaseRec>)> = st
            .manifest
            .entries
            .values()
            .map(|e| {
                let leases = st
                    .leases
                    .values()
                    .filter(|l| l.key == e.key)
                    .cloned()
                    .collect();
                (e.clone(), leases)
            })
            .collect();
        out.sort_by_key(|(e, _)| std::cmp::Reverse(e.last_used_ms));
        out
    }

    pub fn stats(&self) -> CacheStats {
        let mut st = self.lock();
        prune_leases(&mut st);
        let leased: HashSet<&str> = st.leases.values().map(|l| l.key.as_str()).collect();
        CacheStats {
            bytes_used: st.manifest.entries.values().map(Entry::size).sum(),
            entries: st.manifest.entries.len(),
            leased_entries: leased.len(),
            partial_bytes: list_parts(&self.root.join("tmp"))
                .iter()
                .map(|(_, n)| n)
                .sum(),
        }
    }

    /// Writes last-used times when they changed; called periodically and at shutdown, so a
    /// cache hit never waits for an fsync.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        if st.dirty {
            self.store.save(&st.manifest)?;
            st.dirty = false;
        }
        Ok(())
    }
}

/// The lease length to use for a requested TTL (0 = default); too long is an error.
pub fn lease_ttl(ttl_secs: u32) -> Result<u32> {
    match ttl_secs {
        0 => Ok(DEFAULT_LEASE_SECS),
        t if t > MAX_LEASE_SECS => Err(LoaderError::InvalidArgument(format!(
            "lease ttl {t}s is over the {MAX_LEASE_SECS}s maximum; renew instead"
        ))),
        t => Ok(t),
    }
}

fn prune_leases(st: &mut State) {
    let now = now_ms();
    st.leases.retain(|_, l| l.expires_ms > now);
}

fn holders_of(st: &State, key: &str) -> String {
    let now = now_ms();
    let holders: Vec<&str> = st
        .leases
        .values()
        .filter(|l| l.key == key && l.expires_ms > now)
        .map(|l| l.holder.as_str())
        .collect();
    holders.join(", ")
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// Partial downloads (`*.part`) and their sizes.
fn list_parts(tmp: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return Vec::new();
    };
    rd.filter_map(|d| d.ok())
        .map(|d| d.path())
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .filter_map(|p| file_len(&p).map(|n| (p, n)))
        .collect()
}

/// Deletes files under `models/` that no entry owns.
fn remove_orphans(dir: &Path, owned: &HashSet<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for d in rd.filter_map(|d| d.ok()) {
        let p = d.path();
        if p.is_dir() {
            remove_orphans(&p, owned);
            let _ = std::fs::remove_dir(&p);
        } else if !owned.contains(&p) {
            tracing::warn!(path = %p.display(), "removing a file the manifest does not know");
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Keeps partial downloads that have a sidecar (they can resume); deletes anything else.
fn remove_stale_tmp(tmp: &Path) {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return;
    };
    for p in rd.filter_map(|d| d.ok()).map(|d| d.path()) {
        let keep = p.extension().is_some_and(|x| x == "part")
            && crate::fetch::meta_path(&p).is_file()
            || p.to_string_lossy().ends_with(".part.json") && p.with_extension("").is_file();
        if !keep {
            let _ = std::fs::remove_file(&p);
        }
    }
}

fn remove_empty_dirs(mut dir: &Path, stop: &Path) {
    while dir.starts_with(stop) && dir != stop {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
        match dir.parent() {
            Some(p) => dir = p,
            None => break,
        }
    }
}
