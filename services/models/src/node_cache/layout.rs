//! The cache directory: what a model's copy is called, where it lives, how it is locked,
//! published and measured. Blocking file-system calls only (callers run them off the runtime).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use llama_agent_client::proto::common::v1::ModelInfo;

use super::{Local, NodeCacheError, Pin};

/// One file of a model as the loader described it.
#[derive(Clone, Debug)]
pub struct FilePlan {
    pub name: String,
    pub size: u64,
    pub md5: String,
}

/// A model's copy: its id (the primary file's MD5), files and total size.
#[derive(Clone, Debug)]
pub struct Plan {
    pub reference: String,
    pub id: String,
    pub files: Vec<FilePlan>,
    pub total: u64,
}

impl Plan {
    /// Checks the loader's answer before any of it names a path: an MD5 of 32 hex digits and
    /// plain file names (nothing that could leave the cache directory).
    pub fn of(info: &ModelInfo) -> Result<Self, NodeCacheError> {
        let bad = |what: String| Err(NodeCacheError::BadAnswer(what));
        if info.files.is_empty() {
            return bad(format!("{} has no files", info.reference));
        }
        let mut files = Vec::with_capacity(info.files.len());
        for f in &info.files {
            let plain = !f.name.is_empty()
                && f.name.len() <= 255
                && f.name != "."
                && f.name != ".."
                && !f.name.contains(['/', '\0']);
            if !plain {
                return bad(format!(
                    "a file name of {} is not a plain name",
                    info.reference
                ));
            }
            if f.md5.len() != 32 || !f.md5.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("{} has no MD5", f.name));
            }
            files.push(FilePlan {
                name: f.name.clone(),
                size: f.size_bytes,
                md5: f.md5.to_ascii_lowercase(),
            });
        }
        Ok(Self {
            reference: info.reference.clone(),
            id: files[0].md5.clone(),
            total: files.iter().map(|f| f.size).sum(),
            files,
        })
    }
}

/// Whether every file of `info` is readable here at the loader's path with the loader's size.
pub fn visible(info: &ModelInfo) -> bool {
    !info.files.is_empty()
        && info.files.iter().all(|f| {
            File::open(&f.local_path)
                .and_then(|h| h.metadata())
                .is_ok_and(|m| m.is_file() && m.len() == f.size_bytes)
        })
}

/// A held flock on `locks/<id>.lock` (released on drop).
pub struct Lock {
    _file: File,
}

pub struct Layout {
    root: PathBuf,
    pub max_bytes: u64,
}

const DIRS: [&str; 4] = ["models", "partial", "locks", "trash"];

impl Layout {
    pub fn create(root: &Path, max_bytes: u64) -> std::io::Result<Self> {
        for d in DIRS {
            fs::create_dir_all(root.join(d))?;
        }
        // Writable, checked now rather than at the first model. The name is this process's:
        // processes sharing the directory (a hostPath cache) start at the same time.
        let probe = root
            .join("locks")
            .join(format!(".probe-{}", std::process::id()));
        File::create(&probe)?;
        fs::remove_file(&probe)?;
        let layout = Self {
            root: root.to_path_buf(),
            max_bytes,
        };
        // A crash mid-eviction leaves a copy in trash/.
        for e in fs::read_dir(root.join("trash"))?.flatten() {
            let _ = fs::remove_dir_all(e.path());
        }
        Ok(layout)
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn published_dir(&self, id: &str) -> PathBuf {
        self.root.join("models").join(id)
    }

    pub fn partial_dir(&self, id: &str) -> PathBuf {
        self.root.join("partial").join(id)
    }

    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    fn lock_file(&self, id: &str) -> Result<File, NodeCacheError> {
        let path = self.root.join("locks").join(format!("{id}.lock"));
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| NodeCacheError::io(path, e))
    }

    /// Waits for the exclusive lock of `id` (a process streaming it holds it until published).
    pub fn lock_exclusive(&self, id: &str) -> Result<Lock, NodeCacheError> {
        let f = self.lock_file(id)?;
        f.lock().map_err(|e| NodeCacheError::io("flock", e))?;
        Ok(Lock { _file: f })
    }

    /// The exclusive lock of `id` if nobody holds any lock on it (for eviction).
    pub fn try_lock_exclusive(&self, id: &str) -> Result<Option<Lock>, NodeCacheError> {
        let f = self.lock_file(id)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(Lock { _file: f })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(NodeCacheError::io("flock", e)),
        }
    }

    /// Whether the published copy of `plan` is whole (every file at its size).
    pub fn published(&self, plan: &Plan) -> bool {
        let dir = self.published_dir(&plan.id);
        plan.files.iter().all(|f| {
            fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.is_file() && m.len() == f.size)
        })
    }

    /// The published copy of `plan`, pinned (shared lock) and marked used; None when there is
    /// none. Waits while another process streams it.
    pub fn pin_published(&self, plan: &Plan) -> Result<Option<Local>, NodeCacheError> {
        let f = self.lock_file(&plan.id)?;
        f.lock_shared()
            .map_err(|e| NodeCacheError::io("flock", e))?;
        if !self.published(plan) {
            return Ok(None);
        }
        let dir = self.published_dir(&plan.id);
        // The directory's mtime is the copy's last use (nothing inside changes after publish).
        File::open(&dir)
            .and_then(|d| d.set_modified(SystemTime::now()))
            .map_err(|e| NodeCacheError::io(&dir, e))?;
        Ok(Some(Local {
            path: dir.join(&plan.files[0].name),
            pin: Some(Pin { _lock: f }),
        }))
    }

    /// partial/<id> becomes models/<id> in one rename, made durable.
    pub fn publish(&self, plan: &Plan) -> Result<(), NodeCacheError> {
        let from = self.partial_dir(&plan.id);
        let to = self.published_dir(&plan.id);
        if to.exists() {
            // Left incomplete by an older version or a hand: replaced whole.
            self.discard(&to)?;
        }
        sync_dir(&from)?;
        fs::rename(&from, &to).map_err(|e| NodeCacheError::io(&to, e))?;
        sync_dir(&self.models_dir())?;
        sync_dir(&self.root.join("partial"))
    }

    /// Moves a copy out of sight in one rename, then deletes it.
    pub fn discard(&self, dir: &Path) -> Result<(), NodeCacheError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let trash = self
            .trash_dir()
            .join(format!("{}-{nanos}", name.unwrap_or_default()));
        fs::rename(dir, &trash).map_err(|e| NodeCacheError::io(dir, e))?;
        // A process starting on the same directory empties trash/ too: gone is done.
        match fs::remove_dir_all(&trash) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(NodeCacheError::io(&trash, e))
            }
            _ => Ok(()),
        }
    }

    /// Copies on disk (published and partial): id, directory, bytes, last use.
    pub fn copies(&self) -> Vec<Copy> {
        let mut out = Vec::new();
        for (sub, published) in [("models", true), ("partial", false)] {
            let Ok(rd) = fs::read_dir(self.root.join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let dir = e.path();
                let Some(id) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                    continue;
                };
                let used = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(Copy {
                    bytes: dir_bytes(&dir),
                    id,
                    dir,
                    used,
                    published,
                });
            }
        }
        out
    }

    pub fn used_bytes(&self) -> u64 {
        self.copies().iter().map(|c| c.bytes).sum()
    }
}

pub struct Copy {
    pub id: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub used: SystemTime,
    pub published: bool,
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn sync_dir(dir: &Path) -> Result<(), NodeCacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NodeCacheError::io(dir, e))
}
