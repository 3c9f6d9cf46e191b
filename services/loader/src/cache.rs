//! The cache's bookkeeping: manifest entries, LRU order, leases and space reservations.
//!
//! One std mutex guards it all: every critical section is short (no await inside), and
//! deciding what to evict must see entries, leases and reservations at once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{LoaderError, Result};
use crate::store::{Entry, Manifest, ManifestStore};

/// Longest lease a holder may take in one go; holders renew.
pub const MAX_LEASE_SECS: u32 = 24 * 3600;
pub const DEFAULT_LEASE_SECS: u32 = 600;

#[derive(Clone, Debug)]
pub struct LeaseRec {
    pub id: String,
    pub key: String,
    pub holder: String,
    /// Monotonic, so a wall clock stepping back or forth neither keeps nor drops a lease.
    pub expires: Instant,
}

impl LeaseRec {
    /// The expiry as wall time, for display.
    pub fn expires_unix_ms(&self) -> i64 {
        let left = self.expires.saturating_duration_since(Instant::now());
        crate::now_ms() + left.as_millis() as i64
    }

    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }
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

    /// Records a use of `key` (it becomes the most recently used) and returns the entry.
    pub fn touch(&self, key: &str) -> Option<Entry> {
        let mut st = self.lock();
        let entry = st.manifest.mark_used(key).cloned();
        st.dirty |= entry.is_some();
        entry
    }

    /// Records a published entry (as just used) and the aliases that lead to it, durably.
    pub fn publish(&self, mut entry: Entry, aliases: &[String]) -> Result<Entry> {
        let mut st = self.lock();
        if let Some(old) = st.manifest.entries.get(&entry.key) {
            entry.created_ms = old.created_ms;
        }
        for a in aliases {
            st.manifest.aliases.insert(a.clone(), entry.key.clone());
        }
        let key = entry.key.clone();
        st.manifest.entries.insert(key.clone(), entry);
        let entry = st.manifest.mark_used(&key).cloned().expect("just inserted");
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
            let mut lru: Vec<(u64, String, u64)> = st
                .manifest
                .entries
                .values()
                .filter(|e| holders_of(&st, &e.key).is_empty())
                .map(|e| (e.last_use, e.key.clone(), e.size()))
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
            expires: lease_expiry(ttl),
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
        lease.expires = lease_expiry(ttl);
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
        out.sort_by_key(|(e, _)| std::cmp::Reverse(e.last_use));
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

fn lease_expiry(ttl_secs: u32) -> Instant {
    Instant::now() + Duration::from_secs(u64::from(ttl_secs))
}

fn prune_leases(st: &mut State) {
    let now = Instant::now();
    st.leases.retain(|_, l| l.live(now));
}

fn holders_of(st: &State, key: &str) -> String {
    let now = Instant::now();
    let holders: Vec<&str> = st
        .leases
        .values()
        .filter(|l| l.key == key && l.live(now))
        .map(|l| l.holder.as_str())
        .collect();
    holders.join(", ")
}

/// Bytes a file takes on disk: a partial download is sparse (sized up front, filled by pieces
/// in any order), so its length would overstate it.
fn file_len(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .ok()
        .map(|m| m.len().min(m.blocks() * 512))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileRecord, Source};

    const SIZE: u64 = 1000;

    /// An entry of one `SIZE`-byte file, written to disk so eviction has a file to remove.
    fn entry(root: &Path, name: &str) -> Entry {
        let dir = format!("models/local/{name}");
        std::fs::create_dir_all(root.join(&dir)).unwrap();
        std::fs::write(root.join(&dir).join("m.gguf"), vec![0u8; SIZE as usize]).unwrap();
        Entry {
            key: name.to_string(),
            source: Source::Local {
                path: PathBuf::from("/nowhere"),
                size: SIZE,
                mtime_ns: 0,
            },
            dir,
            files: vec![FileRecord {
                name: "m.gguf".into(),
                size: SIZE,
                md5: String::new(),
                sha256: None,
                mtime_ns: 0,
            }],
            created_ms: 0,
            last_used_ms: 0,
            last_use: 0,
        }
    }

    fn keys_by_recency(cache: &Cache) -> Vec<String> {
        cache.list().into_iter().map(|(e, _)| e.key).collect()
    }

    /// The keys `reserve` evicts, one entry's worth at a time, until `n` are gone.
    fn evict(cache: &Arc<Cache>, n: usize) -> Vec<String> {
        let mut gone = Vec::new();
        let mut held = Vec::new();
        for _ in 0..n {
            let before: HashSet<String> = keys_by_recency(cache).into_iter().collect();
            // The cache stays full (reservations held): room for one more means one eviction.
            held.push(cache.reserve(SIZE, Vec::new()).unwrap());
            let after: HashSet<String> = keys_by_recency(cache).into_iter().collect();
            let evicted: Vec<&String> = before.difference(&after).collect();
            assert_eq!(evicted.len(), 1, "one eviction per reservation");
            gone.push(evicted[0].clone());
        }
        gone
    }

    /// Many uses inside one millisecond keep their exact order (a wall clock would tie them),
    /// and the order survives a restart.
    #[test]
    fn lru_order_is_exact_within_one_millisecond_and_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let n = 40;
        let cache = Cache::open(dir.path(), SIZE * n as u64).unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("m{i:02}")).collect();
        for name in &names {
            cache.publish(entry(dir.path(), name), &[]).unwrap();
        }
        // Touch them in an order unrelated to publication, all within microseconds.
        let order: Vec<String> = (0..n).map(|i| names[(i * 17) % n].clone()).collect();
        for k in &order {
            assert!(cache.touch(k).is_some());
        }
        let newest_first: Vec<String> = order.iter().rev().cloned().collect();
        assert_eq!(keys_by_recency(&cache), newest_first);
        cache.flush().unwrap();
        drop(cache);

        let cache = Cache::open(dir.path(), SIZE * n as u64).unwrap();
        assert_eq!(keys_by_recency(&cache), newest_first);
        // A use after the restart is newer than every use before it.
        let revived = order[0].clone();
        cache.touch(&revived).unwrap();
        assert_eq!(keys_by_recency(&cache)[0], revived);
        // Eviction takes the least recently used, in exact order.
        assert_eq!(evict(&cache, 5), order[1..6].to_vec());
    }

    /// A manifest written before use numbers existed is ordered by its wall times once.
    #[test]
    fn manifests_without_use_numbers_keep_their_wall_clock_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = Manifest {
            version: crate::store::MANIFEST_VERSION,
            ..Default::default()
        };
        for (name, ms) in [("old", 100), ("new", 300), ("mid", 200)] {
            let mut e = entry(dir.path(), name);
            e.last_used_ms = ms;
            manifest.entries.insert(name.into(), e);
        }
        let mut json: serde_json::Value = serde_json::to_value(&manifest).unwrap();
        json.as_object_mut().unwrap().remove("last_use");
        for e in json["entries"].as_object_mut().unwrap().values_mut() {
            e.as_object_mut().unwrap().remove("last_use");
        }
        std::fs::write(dir.path().join("manifest.json"), json.to_string()).unwrap();
        let cache = Cache::open(dir.path(), SIZE * 3).unwrap();
        assert_eq!(keys_by_recency(&cache), ["new", "mid", "old"]);
        cache.touch("old").unwrap();
        assert_eq!(keys_by_recency(&cache), ["old", "new", "mid"]);
    }

    #[test]
    fn leases_expire_by_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), SIZE * 2).unwrap();
        cache.publish(entry(dir.path(), "a"), &[]).unwrap();
        let lease = cache.lease("a", 60, "gen-0").unwrap();
        let shown = lease.expires_unix_ms() - crate::now_ms();
        assert!((59_000..=60_000).contains(&shown), "{shown}");
        assert_eq!(cache.stats().leased_entries, 1);
        // An expired lease (as if its time had passed) no longer pins the entry.
        cache.lock().leases.get_mut(&lease.id).unwrap().expires = Instant::now();
        assert_eq!(cache.stats().leased_entries, 0);
        assert!(matches!(
            cache.renew(&lease.id, 60),
            Err(LoaderError::LeaseNotFound(_))
        ));
    }
}
