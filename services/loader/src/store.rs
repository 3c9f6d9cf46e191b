//! The cache manifest on disk: JSON replaced by write → fsync → rename → fsync(dir), so a
//! kill -9 at any moment leaves either the old manifest or the new one, never a torn one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{LoaderError, Result};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// By entry key: `owner/repo/file.gguf@revision` or `local:/abs/path.gguf`.
    pub entries: BTreeMap<String, Entry>,
    /// Canonical request reference → entry key (`owner/repo@main` → the file it picked), so a
    /// cache hit needs no hub round trip.
    pub aliases: BTreeMap<String, String>,
    /// The last use number handed out: LRU order is by use number, which (unlike a wall clock)
    /// never ties and never steps back. 0 in manifests written before it existed.
    #[serde(default)]
    pub last_use: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub source: Source,
    /// Directory of the files, relative to the cache root.
    pub dir: String,
    /// The primary file first (the first shard of a split model).
    pub files: Vec<FileRecord>,
    pub created_ms: i64,
    /// Wall time of the last use, for display only; order is `last_use`.
    pub last_used_ms: i64,
    /// Use number of the last use (see [`Manifest::last_use`]).
    #[serde(default)]
    pub last_use: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    Hub {
        repo: String,
        revision: String,
        commit: String,
    },
    Local {
        path: PathBuf,
        size: u64,
        mtime_ns: i64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    pub md5: String,
    #[serde(default)]
    pub sha256: Option<String>,
    /// mtime when the MD5 was last known good: a change triggers a re-hash.
    pub mtime_ns: i64,
}

impl Manifest {
    /// The next use number, recorded on `key`'s entry with the wall time.
    pub fn mark_used(&mut self, key: &str) -> Option<&Entry> {
        let entry = self.entries.get_mut(key)?;
        self.last_use += 1;
        entry.last_use = self.last_use;
        entry.last_used_ms = crate::now_ms();
        Some(entry)
    }

    /// Gives use numbers to entries of a manifest written before they existed (in their
    /// wall-clock order), and makes the counter at least every number in use.
    fn number_uses(&mut self) {
        let mut unnumbered: Vec<(i64, String)> = self
            .entries
            .values()
            .filter(|e| e.last_use == 0)
            .map(|e| (e.last_used_ms, e.key.clone()))
            .collect();
        unnumbered.sort();
        let newest = self.entries.values().map(|e| e.last_use).max().unwrap_or(0);
        self.last_use = self.last_use.max(newest);
        for (_, key) in unnumbered {
            self.last_use += 1;
            if let Some(e) = self.entries.get_mut(&key) {
                e.last_use = self.last_use;
            }
        }
    }
}

impl Entry {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn file_path(&self, root: &Path, file: &FileRecord) -> PathBuf {
        root.join(&self.dir).join(&file.name)
    }
}

pub struct ManifestStore {
    path: PathBuf,
}

impl ManifestStore {
    pub fn new(root: &Path) -> Self {
        Self {
            path: root.join("manifest.json"),
        }
    }

    /// A missing manifest is an empty cache. An unreadable one is set aside (never deleted) and
    /// the cache starts empty; files it described are then orphans and get cleaned.
    pub fn load(&self) -> Result<Manifest> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Manifest {
                    version: MANIFEST_VERSION,
                    ..Default::default()
                })
            }
            Err(e) => return Err(LoaderError::io(&self.path, e)),
        };
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(mut m) if m.version == MANIFEST_VERSION => {
                m.number_uses();
                Ok(m)
            }
            Ok(m) => Err(LoaderError::Manifest(format!(
                "{} has version {}, this loader reads {MANIFEST_VERSION}",
                self.path.display(),
                m.version
            ))),
            Err(e) => {
                let aside = self
                    .path
                    .with_extension(format!("corrupt-{}", crate::now_ms()));
                tracing::error!(error = %e, aside = %aside.display(), "manifest unreadable; starting with an empty cache");
                std::fs::rename(&self.path, &aside).map_err(|e| LoaderError::io(&self.path, e))?;
                Ok(Manifest {
                    version: MANIFEST_VERSION,
                    ..Default::default()
                })
            }
        }
    }

    pub fn save(&self, manifest: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| LoaderError::Manifest(e.to_string()))?;
        write_atomic(&self.path, &bytes)
    }
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // One temporary name per writer: two processes sharing a cache directory (two
    // in-process `llama-cli` runs) must not rename each other's half-written file away.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // A full disk must not also leave a stray temporary file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(LoaderError::io(path, e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LoaderError::io(dir, e))
}

pub fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

#[cfg(test)]
mod tests {
    use super::write_atomic;

    #[test]
    fn concurrent_atomic_writes_each_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        std::thread::scope(|s| {
            for writer in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_atomic(path, &[writer; 4096]).expect("every write lands");
                    }
                });
            }
        });
        let last = std::fs::read(&path).unwrap();
        assert_eq!(last.len(), 4096);
        assert!(
            last.iter().all(|b| *b == last[0]),
            "one writer's bytes, whole"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["manifest.json"], "no temporary file is left behind");
    }
}
