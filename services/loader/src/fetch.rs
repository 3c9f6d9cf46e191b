//! Streams one remote file into a partial file: resumable with HTTP Range, MD5 and SHA-256
//! computed in the same pass, verified before the caller publishes it.
//!
//! The network side runs on the async runtime; a blocking writer thread writes while two more
//! threads compute MD5 and SHA-256, so all four overlap.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use reqwest::header::{CONTENT_RANGE, IF_RANGE, RANGE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::error::{LoaderError, Result};
use crate::hub::RemoteFile;

/// Chunks between the network and the writer. Hyper hands out chunks of up to a few hundred
/// KiB, so 64 bounds the bytes in flight to a few MiB while absorbing disk hiccups.
const WRITE_QUEUE_CHUNKS: usize = 64;
/// Chunks between the writer and each hash thread; same reasoning.
const HASH_QUEUE_CHUNKS: usize = 64;
const IO_BLOCK: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct FetchOptions {
    pub max_attempts: u32,
    /// A transfer that delivers nothing for this long is dropped and resumed.
    pub stall_timeout: Duration,
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
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct PartMeta {
    pub url: String,
    pub size: u64,
    pub sha256: Option<String>,
}

pub fn meta_path(part: &Path) -> PathBuf {
    let mut p = part.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

enum Chunk {
    Data(Bytes),
    /// The server ignored our Range: start the file again.
    Restart,
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
    let resume_from = prepare_part(remote, part)?;
    let total = remote.size;
    on_progress(FetchProgress {
        bytes_done: resume_from,
        bytes_total: total,
        resumed_from: resume_from,
        verifying: resume_from > 0,
    });

    let (tx, rx) = mpsc::channel(WRITE_QUEUE_CHUNKS);
    let writer_path = part.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_loop(&writer_path, resume_from, rx));

    let mut offset = resume_from;
    let mut attempts = 0u32;
    let mut last_error = String::new();
    let outcome: Result<()> = loop {
        if total > 0 && offset == total {
            break Ok(());
        }
        if attempts >= opts.max_attempts {
            break Err(LoaderError::Download {
                file: remote.name.clone(),
                attempts,
                last: last_error,
            });
        }
        if attempts > 0 {
            let backoff = Duration::from_millis(200 * 2u64.pow(attempts.min(5)));
            tracing::warn!(file = %remote.name, offset, attempts, error = %last_error, "download interrupted; resuming");
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
        }
        attempts += 1;
        match transfer(
            client,
            remote,
            &mut offset,
            &tx,
            opts,
            resume_from,
            on_progress,
        )
        .await
        {
            Ok(Transfer::Complete) => break Ok(()),
            Ok(Transfer::Retry(why)) => last_error = why,
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    let written = writer
        .await
        .map_err(|e| LoaderError::io(part, std::io::Error::other(e)))?
        .map_err(|e| LoaderError::io(part, e));
    outcome?;
    let digests = written?;

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

enum Transfer {
    Complete,
    Retry(String),
}

/// One HTTP request, from `offset` to the end or to the first failure.
async fn transfer(
    client: &reqwest::Client,
    remote: &RemoteFile,
    offset: &mut u64,
    tx: &mpsc::Sender<Chunk>,
    opts: &FetchOptions,
    resumed_from: u64,
    on_progress: &(dyn Fn(FetchProgress) + Send + Sync),
) -> Result<Transfer> {
    let mut req = client.get(&remote.url);
    if *offset > 0 {
        req = req.header(RANGE, format!("bytes={offset}-"));
        if let Some(sha) = &remote.sha256 {
            // The hub's ETag of an LFS file is its SHA-256: a changed file restarts from zero.
            req = req.header(IF_RANGE, format!("\"{sha}\""));
        }
    }
    let response = match tokio::time::timeout(opts.stall_timeout, req.send()).await {
        Err(_) => return Ok(Transfer::Retry("no response".into())),
        Ok(Err(e)) => return Ok(Transfer::Retry(e.to_string())),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let starts_at_offset = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok())
                == Some(*offset);
            if !starts_at_offset {
                restart(tx, offset).await?;
                return Ok(Transfer::Retry("server answered another range".into()));
            }
        }
        StatusCode::OK => {
            if *offset > 0 {
                restart(tx, offset).await?;
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            restart(tx, offset).await?;
            return Ok(Transfer::Retry("range not satisfiable".into()));
        }
        StatusCode::NOT_FOUND => {
            return Err(LoaderError::FileNotFound(format!(
                "{} is not on the hub ({})",
                remote.name, remote.url
            )))
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            return Ok(Transfer::Retry(format!("hub answered {s}")))
        }
        s => return Err(LoaderError::Hub(format!("GET {} answered {s}", remote.url))),
    }

    let mut body = response.bytes_stream();
    loop {
        let next = match tokio::time::timeout(opts.stall_timeout, body.next()).await {
            Err(_) => {
                return Ok(Transfer::Retry(format!(
                    "stalled for {:?}",
                    opts.stall_timeout
                )))
            }
            Ok(n) => n,
        };
        match next {
            None if remote.size == 0 || *offset == remote.size => return Ok(Transfer::Complete),
            None => {
                return Ok(Transfer::Retry(format!(
                    "connection closed at byte {offset}"
                )))
            }
            Some(Err(e)) => return Ok(Transfer::Retry(e.to_string())),
            Some(Ok(bytes)) => {
                *offset += bytes.len() as u64;
                crate::metrics::DOWNLOADED_BYTES.inc_by(bytes.len() as u64);
                if remote.size > 0 && *offset > remote.size {
                    return Err(LoaderError::Integrity {
                        file: remote.name.clone(),
                        detail: format!("hub sent more than the listed {} bytes", remote.size),
                    });
                }
                send(tx, Chunk::Data(bytes)).await?;
                on_progress(FetchProgress {
                    bytes_done: *offset,
                    bytes_total: remote.size,
                    resumed_from,
                    verifying: false,
                });
            }
        }
    }
}

async fn restart(tx: &mpsc::Sender<Chunk>, offset: &mut u64) -> Result<()> {
    *offset = 0;
    send(tx, Chunk::Restart).await
}

async fn send(tx: &mpsc::Sender<Chunk>, chunk: Chunk) -> Result<()> {
    // The writer only hangs up when it failed; its own error is reported after the join.
    tx.send(chunk)
        .await
        .map_err(|_| LoaderError::io("partial file", std::io::Error::other("writer stopped")))
}

/// Keeps a partial file whose sidecar describes the same remote bytes; starts afresh otherwise.
/// Returns how many bytes are already there.
fn prepare_part(remote: &RemoteFile, part: &Path) -> Result<u64> {
    let want = PartMeta {
        url: remote.url.clone(),
        size: remote.size,
        sha256: remote.sha256.clone(),
    };
    let meta = meta_path(part);
    let existing: Option<PartMeta> = std::fs::read(&meta)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let same_bytes = existing.is_some_and(|m| match (&m.sha256, &want.sha256) {
        (Some(a), Some(b)) => a == b && m.size == want.size,
        _ => m == want,
    });
    if same_bytes {
        if let Ok(md) = std::fs::metadata(part) {
            if md.len() <= remote.size || remote.size == 0 {
                return Ok(md.len());
            }
        }
    }
    if let Some(dir) = part.parent() {
        std::fs::create_dir_all(dir).map_err(|e| LoaderError::io(dir, e))?;
    }
    File::create(part).map_err(|e| LoaderError::io(part, e))?;
    crate::store::write_atomic(&meta, &serde_json::to_vec(&want).expect("plain struct"))?;
    Ok(0)
}

pub fn discard_part(part: &Path) {
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(meta_path(part));
}

enum HashMsg {
    Data(Bytes),
    Reset,
}

/// A hasher on its own thread: MD5 alone is ~600 MB/s on one core, so hashing and writing
/// each get a thread and the slowest of them, not their sum, sets the pace.
struct HashThread {
    tx: std_mpsc::SyncSender<HashMsg>,
    handle: std::thread::JoinHandle<String>,
}

impl HashThread {
    fn spawn<D: Digest + Send + 'static>(name: &str) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::sync_channel::<HashMsg>(HASH_QUEUE_CHUNKS);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut h = D::new();
                for msg in rx {
                    match msg {
                        HashMsg::Data(b) => h.update(&b),
                        HashMsg::Reset => h = D::new(),
                    }
                }
                hex::encode(h.finalize())
            })?;
        Ok(Self { tx, handle })
    }

    fn send(&self, msg: HashMsg) -> std::io::Result<()> {
        self.tx
            .send(msg)
            .map_err(|_| std::io::Error::other("hash thread stopped"))
    }

    fn finish(self) -> std::io::Result<String> {
        drop(self.tx);
        self.handle
            .join()
            .map_err(|_| std::io::Error::other("hash thread panicked"))
    }
}

fn write_loop(
    path: &Path,
    resume_from: u64,
    mut rx: mpsc::Receiver<Chunk>,
) -> std::io::Result<Digests> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    file.set_len(resume_from)?;
    let md5 = HashThread::spawn::<Md5>("loader-md5")?;
    let sha = HashThread::spawn::<Sha256>("loader-sha256")?;
    let both = |msg: &dyn Fn() -> HashMsg| -> std::io::Result<()> {
        md5.send(msg())?;
        sha.send(msg())
    };

    // A resumed download re-hashes the bytes already on disk first.
    let mut len = 0u64;
    file.seek(SeekFrom::Start(0))?;
    while len < resume_from {
        let mut block = vec![0u8; IO_BLOCK.min((resume_from - len) as usize)];
        file.read_exact(&mut block)?;
        len += block.len() as u64;
        let block = Bytes::from(block);
        both(&|| HashMsg::Data(block.clone()))?;
    }

    while let Some(chunk) = rx.blocking_recv() {
        match chunk {
            Chunk::Data(b) => {
                both(&|| HashMsg::Data(b.clone()))?;
                file.write_all(&b)?;
                len += b.len() as u64;
            }
            Chunk::Restart => {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
                len = 0;
                both(&|| HashMsg::Reset)?;
            }
        }
    }
    file.sync_all()?;
    Ok(Digests {
        size: len,
        md5: md5.finish()?,
        sha256: sha.finish()?,
    })
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
