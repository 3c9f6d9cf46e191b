//! Repos the mirror serves: their files on disk, hashed once at load so requests never hash.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A repo to serve: `id` is `owner/repo` (a bare `repo` also works).
#[derive(Clone, Debug)]
pub struct RepoSpec {
    pub id: String,
    pub files: Vec<FileSource>,
}

/// Where a file's bytes come from.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// An existing file, streamed from `path`; `name` is its path in the repo (may contain `/`).
    Disk { name: String, path: PathBuf },
    /// Bytes the mirror writes into a temporary directory it owns (removed with the mirror).
    Bytes { name: String, data: Vec<u8> },
}

impl FileSource {
    pub fn name(&self) -> &str {
        match self {
            Self::Disk { name, .. } | Self::Bytes { name, .. } => name,
        }
    }
}

impl RepoSpec {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            files: Vec::new(),
        }
    }

    /// Serves the disk file at `path` as `name`.
    pub fn file(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.files.push(FileSource::Disk {
            name: name.into(),
            path: path.into(),
        });
        self
    }

    /// Serves `data` as `name`.
    pub fn bytes(mut self, name: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.files.push(FileSource::Bytes {
            name: name.into(),
            data: data.into(),
        });
        self
    }

    /// Serves each disk file under its basename.
    pub fn disk_files<P: AsRef<Path>>(
        id: impl Into<String>,
        paths: impl IntoIterator<Item = P>,
    ) -> Result<Self> {
        let mut spec = Self::new(id);
        for path in paths {
            let path = path.as_ref();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{} has no usable file name", path.display()))?;
            spec = spec.file(name, path);
        }
        Ok(spec)
    }
}

/// What a loaded repo looks like to clients, for tests to compare against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoInfo {
    pub id: String,
    /// 40 hex; the same repo id with the same files always gets the same commit.
    pub commit: String,
    /// Sorted by name.
    pub files: Vec<FileInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    /// Where the bytes are served from (inside the mirror's temp dir for `FileSource::Bytes`).
    pub path: PathBuf,
    pub size: u64,
    /// 64 lowercase hex, also the file's ETag (quoted).
    pub sha256: String,
}

pub(crate) struct Repo {
    pub(crate) info: RepoInfo,
    by_name: BTreeMap<String, usize>,
}

impl Repo {
    pub(crate) fn file(&self, name: &str) -> Option<&FileInfo> {
        self.by_name.get(name).map(|&i| &self.info.files[i])
    }

    pub(crate) fn has_revision(&self, revision: &str) -> bool {
        revision == "main" || revision == self.info.commit
    }

    /// The body of `GET /api/models/{id}/revision/{rev}`; `blobs` adds sizes and LFS data as the
    /// hub does for `?blobs=true`.
    pub(crate) fn listing(&self, blobs: bool) -> Value {
        let info = &self.info;
        let siblings: Vec<Value> = info
            .files
            .iter()
            .map(|f| {
                if !blobs {
                    return json!({ "rfilename": f.name });
                }
                let pointer = lfs_pointer(&f.sha256, f.size);
                json!({
                    "rfilename": f.name,
                    "size": f.size,
                    "blobId": short_hash(&[pointer.as_bytes()]),
                    "lfs": { "sha256": f.sha256, "size": f.size, "pointerSize": pointer.len() },
                })
            })
            .collect();
        let author = info.id.split_once('/').map(|(owner, _)| owner);
        json!({
            "_id": &info.commit[..24],
            "id": info.id,
            "modelId": info.id,
            "author": author,
            "sha": info.commit,
            "private": false,
            "gated": false,
            "disabled": false,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
            "usedStorage": info.files.iter().map(|f| f.size).sum::<u64>(),
        })
    }
}

/// Loads a repo: materialises byte files under `scratch`, hashes everything. Blocking.
pub(crate) fn load(spec: RepoSpec, scratch: &Path) -> Result<Repo> {
    check_repo_id(&spec.id)?;
    let mut files = Vec::with_capacity(spec.files.len());
    for source in spec.files {
        let name = source.name().to_string();
        check_file_name(&name).with_context(|| format!("{}: file {name:?}", spec.id))?;
        let (path, size, sha256) = match source {
            FileSource::Disk { path, .. } => {
                let (size, sha256) = hash_file(&path)
                    .with_context(|| format!("{}: reading {}", spec.id, path.display()))?;
                (path, size, sha256)
            }
            FileSource::Bytes { data, .. } => {
                let path = scratch.join(&name);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, &data)
                    .with_context(|| format!("writing {}", path.display()))?;
                (path, data.len() as u64, hex::encode(Sha256::digest(&data)))
            }
        };
        files.push(FileInfo {
            name,
            path,
            size,
            sha256,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut by_name = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        if by_name.insert(f.name.clone(), i).is_some() {
            bail!("{}: file {:?} listed twice", spec.id, f.name);
        }
    }
    let mut parts: Vec<&[u8]> = vec![b"commit\0", spec.id.as_bytes()];
    for f in &files {
        parts.extend([
            b"\0".as_slice(),
            f.name.as_bytes(),
            b"\0",
            f.sha256.as_bytes(),
        ]);
    }
    let commit = short_hash(&parts);
    Ok(Repo {
        info: RepoInfo {
            id: spec.id,
            commit,
            files,
        },
        by_name,
    })
}

fn check_repo_id(id: &str) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    let ok = parts.len() <= 2 && parts.iter().all(|p| is_plain_segment(p)) && parts[0] != "api";
    if !ok {
        bail!("repo id {id:?} must be `owner/repo` or `repo`");
    }
    Ok(())
}

fn check_file_name(name: &str) -> Result<()> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && !name.ends_with('/')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("must be a relative path without `.` or `..`");
    }
    Ok(())
}

fn is_plain_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['\\', '?', '#'])
}

/// A deterministic 40-hex id (the hub's commit and blob ids are git SHA-1s; only the shape
/// matters to clients).
fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())[..40].to_string()
}

fn lfs_pointer(sha256: &str, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
