//! Downloads one remote file into a partial file over several ranged connections, resumable
//! piece by piece; MD5 and SHA-256 are computed over the bytes in file order as the contiguous
//! prefix grows, and checked before the caller publishes the file.
//!
//! A hub connection is often capped far below the link, so a large file is cut into pieces
//! (`--download-part-size`) that `--download-connections` connections take in file order, as
//! hf_transfer does with its 10 MB chunks. In-order pieces keep the prefix growing steadily, so
//! hashing keeps pace with the download instead of waiting for the end.

mod extents;
mod sink;
mod transfer;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{LoaderError, Result};
use crate::hub::RemoteFile;
pub use extents::Extents;
use sink::Sink;
use transfer::{Round, Stop};

pub(crate) const IO_BLOCK: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct FetchOptions {
    pub max_attempts: u32,
    /// A transfer that delivers nothing for this long is dropped and resumed.
    pub stall_timeout: Duration,
    /// Connections for one file.
    pub connections: usize,
    /// Bytes per ranged request; a file under two pieces uses one connection.
    pub part_size: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FetchProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub resumed_from: u64,
    /// Hashing the bytes already on disk before resuming.
    pub verifying: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    pub size: u64,
    pub md5: String,
    pub sha256: String,
}

/// Sidecar of a partial file: a resume only continues the same bytes.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct PartMeta {
    pub url: String,
    pub size: u64,
    pub sha256: Option<String>,
    /// Byte ranges on disk, fsynced before they were recorded. Absent in sidecars written
    /// before parallel pieces, when the file's length was the done prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<Extents>,
}

impl PartMeta {
    fn same_bytes(&self, other: &PartMeta) -> bool {
        match (&self.sha256, &other.sha256) {
            (Some(a), Some(b)) => a == b && self.size == other.size,
            _ => self.url == other.url && self.size == other.size && self.sha256 == other.sha256,
        }
    }
}

pub fn meta_path(part: &Path) -> PathBuf {
    let mut p = part.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// Downloads `remote` into `part`, resuming what an earlier attempt (or process) left there.
/// On success the part file is complete, fsynced and matches the hub's size and SHA-256.
pub async fn fetch(
    client: &reqwest::Client,
    remote: &RemoteFile,
    part: &Path,
    opts: &FetchOptions,
    on_progress: &(dyn Fn(FetchProgress) + Send + Sync),
) -> Result<Digests> {
    let mut on_disk = prepare_part(remote, part)?;
    let mut one_connection = false;
    let mut restarts = 0u32;
    let digests = loop {
        match round(
            client,
            remote,
            part,
            opts,
            on_disk,
            one_connection,
            on_progress,
        )
        .await?
        {
            Ok(digests) => break digests,
            Err(why) => {
                restarts += 1;
                if restarts > opts.max_attempts {
                    return Err(LoaderError::Download {
                        file: remote.name.clone(),
                        attempts: restarts,
                        last: why,
                    });
                }
                tracing::warn!(file = %remote.name, why, "the hub did not serve the range; downloading again from zero on one connection");
                on_disk = reset_part(remote, part)?;
                one_connection = true;
            }
        }
    };

    let total = remote.size;
    let mismatch = if total > 0 && digests.size != total {
        Some(format!("{} bytes, expected {total}", digests.size))
    } else {
        match &remote.sha256 {
            Some(want) if *want != digests.sha256 => {
                Some(format!("sha256 {} , expected {want}", digests.sha256))
            }
            _ => None,
        }
    };
    if let Some(detail) = mismatch {
        discard_part(part);
        return Err(LoaderError::Integrity {
            file: remote.name.clone(),
            detail,
        });
    }
    Ok(digests)
}

/// Fetches every missing byte once: the digests, or why the hub's ranges cannot be trusted.
async fn round(
    client: &reqwest::Client,
    remote: &RemoteFile,
    part: &Path,
    opts: &FetchOptions,
    on_disk: Extents,
    one_connection: bool,
    on_progress: &(dyn Fn(FetchProgress) + Send + Sync),
) -> Result<std::result::Result<Digests, String>> {
    let total = remote.size;
    let resumed_from = on_disk.total();
    on_progress(FetchProgress {
        bytes_done: resumed_from,
        bytes_total: total,
        resumed_from,
        verifying: resumed_from > 0,
    });
    let parallel =
        !one_connection && opts.connections > 1 && total >= opts.part_size.saturating_mul(2);
    let piece = if parallel { opts.part_size } else { u64::MAX };
    let queue = extents::pieces(&on_disk.missing(total), piece);
    let connections = if parallel {
        opts.connections.min(queue.len()).max(1)
    } else {
        1
    };
    let sink = Sink::start(part, want_meta(remote), on_disk)?;
    let round = Round {
        client,
        remote,
        opts,
        queue: Mutex::new(queue),
        tx: &sink.tx,
        done: Mutex::new(resumed_from),
        resumed_from,
        on_progress,
    };
    // The first failure drops the other connections (their requests with them).
    let outcome = futures::future::try_join_all((0..connections).map(|_| round.connection())).await;
    drop(round);
    let digests = sink.finish().await;
    match (outcome, digests) {
        // A disk error explains a "writer stopped" better than the network side can.
        (_, Err(e)) => Err(e),
        (Err(Stop::Fail(e)), _) => Err(e),
        (Err(Stop::Restart(why)), _) => Ok(Err(why)),
        (Ok(_), Ok(d)) => Ok(Ok(d)),
    }
}

fn want_meta(remote: &RemoteFile) -> PartMeta {
    PartMeta {
        url: remote.url.clone(),
        size: remote.size,
        sha256: remote.sha256.clone(),
        written: None,
    }
}

/// Keeps a partial file whose sidecar describes the same remote bytes; starts afresh otherwise.
/// Returns the bytes already there.
fn prepare_part(remote: &RemoteFile, part: &Path) -> Result<Extents> {
    let want = want_meta(remote);
    let existing: Option<PartMeta> = std::fs::read(meta_path(part))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let (Some(m), Ok(md)) = (existing, std::fs::metadata(part)) {
        if m.same_bytes(&want) {
            let len = md.len();
            let kept = match m.written {
                Some(w) if w.fits(len) && (remote.size == 0 || len == remote.size) => Some(w),
                // An older loader appended in order: the file's length was its progress.
                None if remote.size == 0 || len <= remote.size => Some(Extents::prefix_of(len)),
                _ => None,
            };
            if let Some(kept) = kept {
                // Full size from here on, whoever wrote it: the sidecar, not the length, says
                // what is there (so it is rewritten first).
                if remote.size > 0 && len != remote.size {
                    let meta = PartMeta {
                        written: Some(kept.clone()),
                        ..want.clone()
                    };
                    crate::store::write_atomic(
                        &meta_path(part),
                        &serde_json::to_vec(&meta).expect("plain struct"),
                    )?;
                    OpenOptions::new()
                        .write(true)
                        .open(part)
                        .and_then(|f| f.set_len(remote.size))
                        .map_err(|e| LoaderError::io(part, e))?;
                }
                return Ok(kept);
            }
        }
    }
    reset_part(remote, part)
}

/// An empty partial file of the remote's size (sparse: it takes no room until written) and a
/// sidecar saying nothing is there yet.
fn reset_part(remote: &RemoteFile, part: &Path) -> Result<Extents> {
    if let Some(dir) = part.parent() {
        std::fs::create_dir_all(dir).map_err(|e| LoaderError::io(dir, e))?;
    }
    File::create(part)
        .and_then(|f| f.set_len(remote.size))
        .map_err(|e| LoaderError::io(part, e))?;
    let meta = PartMeta {
        written: Some(Extents::default()),
        ..want_meta(remote)
    };
    crate::store::write_atomic(
        &meta_path(part),
        &serde_json::to_vec(&meta).expect("plain struct"),
    )?;
    Ok(Extents::default())
}

pub fn discard_part(part: &Path) {
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(meta_path(part));
}

/// MD5 and SHA-256 of a file on disk, for verification.
pub fn hash_file(path: &Path) -> std::io::Result<Digests> {
    hash_into(File::open(path)?, std::io::sink())
}

/// Copies a local file into `dest`, hashing in the same pass, and fsyncs it.
pub fn copy_hashing(src: &Path, dest: &Path) -> std::io::Result<Digests> {
    let mut out = BufWriter::with_capacity(IO_BLOCK, File::create(dest)?);
    let digests = hash_into(File::open(src)?, &mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(digests)
}

fn hash_into(mut input: impl Read, mut out: impl Write) -> std::io::Result<Digests> {
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    let mut block = vec![0u8; IO_BLOCK];
    let mut len = 0u64;
    loop {
        let n = input.read(&mut block)?;
        if n == 0 {
            break;
        }
        md5.update(&block[..n]);
        sha.update(&block[..n]);
        out.write_all(&block[..n])?;
        len += n as u64;
    }
    Ok(Digests {
        size: len,
        md5: hex::encode(md5.finalize()),
        sha256: hex::encode(sha.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(sha: &str) -> RemoteFile {
        RemoteFile {
            name: "m.gguf".into(),
            url: "http://hub/m.gguf".into(),
            size: 100,
            sha256: Some(sha.into()),
        }
    }

    fn write_meta(part: &Path, json: &str) {
        std::fs::write(meta_path(part), json).unwrap();
    }

    #[test]
    fn a_sidecar_keeps_only_what_it_vouches_for() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("tmp").join("x.part");
        let r = remote("aa");

        // Fresh: a sparse file of the full size and a sidecar that claims nothing.
        assert_eq!(prepare_part(&r, &part).unwrap(), Extents::default());
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 100);

        // Pieces recorded by this version resume as recorded.
        let json =
            r#"{"url":"http://other/m.gguf","size":100,"sha256":"aa","written":[[0,10],[40,60]]}"#;
        write_meta(&part, json);
        assert_eq!(
            prepare_part(&r, &part).unwrap().ranges(),
            [(0, 10), (40, 60)]
        );

        // Another file's bytes, or ranges no writer of ours records, start again.
        write_meta(&part, &json.replace("\"aa\"", "\"bb\""));
        assert_eq!(prepare_part(&r, &part).unwrap(), Extents::default());
        write_meta(&part, &json.replace("[40,60]", "[5,60]"));
        assert_eq!(prepare_part(&r, &part).unwrap(), Extents::default());
        write_meta(&part, &json.replace("[40,60]", "[40,160]"));
        assert_eq!(prepare_part(&r, &part).unwrap(), Extents::default());

        // A sidecar from before pieces: the file was appended in order, its length the prefix.
        std::fs::write(&part, [7u8; 30]).unwrap();
        write_meta(
            &part,
            r#"{"url":"http://hub/m.gguf","size":100,"sha256":"aa"}"#,
        );
        assert_eq!(prepare_part(&r, &part).unwrap().ranges(), [(0, 30)]);
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 100);
        assert_eq!(
            prepare_part(&r, &part).unwrap().ranges(),
            [(0, 30)],
            "and says so now"
        );
    }
}
