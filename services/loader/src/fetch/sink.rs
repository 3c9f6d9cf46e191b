//! The disk side of a download. One writer thread puts chunks at their offsets; a feeder thread
//! hands the contiguous prefix, in file order, to an MD5 thread and a SHA-256 thread; a
//! checkpoint thread records (after fsync) which bytes are on disk, so a restarted loader
//! resumes every piece, not only the prefix.
//!
//! Memory is bounded by the queues, never by the file: chunks the hashers cannot take yet stay
//! on disk (in the page cache) and are read back when the prefix reaches them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::sync::mpsc;

use super::extents::Extents;
use super::{Digests, PartMeta, IO_BLOCK};
use crate::error::{LoaderError, Result};

/// Chunks between the connections and the writer, shared by all of them. Hyper hands out chunks
/// of at most a few hundred KiB, so this bounds the bytes in flight to a few MiB.
const WRITE_QUEUE_CHUNKS: usize = 64;
/// Written chunks between the writer and the feeder; same bound.
const FEED_QUEUE_CHUNKS: usize = 64;
/// Blocks between the feeder and each hasher: up to 16 MiB when the feeder reads back 1 MiB
/// blocks, a few MiB when it forwards network chunks. Both hashers share each block.
const HASH_QUEUE_BLOCKS: usize = 16;
/// How often the sidecar records progress: a kill -9 costs at most this much transfer, and one
/// fsync a second is noise next to a network-bound download.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

pub struct Chunk {
    pub offset: u64,
    pub bytes: Bytes,
}

pub struct Sink {
    pub tx: mpsc::Sender<Chunk>,
    writer: JoinHandle<io::Result<()>>,
    feeder: JoinHandle<io::Result<Digests>>,
    stop_checkpoints: std_mpsc::Sender<()>,
    checkpoints: JoinHandle<Result<()>>,
    path: PathBuf,
}

impl Sink {
    /// Starts the threads for `part`, whose bytes in `on_disk` are already there (and are
    /// hashed first). `meta` is the sidecar to keep up to date.
    pub fn start(part: &Path, meta: PartMeta, on_disk: Extents) -> Result<Self> {
        let io_err = |e| LoaderError::io(part, e);
        let file = OpenOptions::new().write(true).open(part).map_err(io_err)?;
        let reader = File::open(part).map_err(io_err)?;
        let syncer = File::open(part).map_err(io_err)?;
        let written = Arc::new(Mutex::new(on_disk.clone()));
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        let (feed_tx, feed_rx) = std_mpsc::sync_channel(FEED_QUEUE_CHUNKS);
        let (stop_checkpoints, stop_rx) = std_mpsc::channel();

        let w = Arc::clone(&written);
        let writer =
            spawn("loader-writer", move || write_loop(&file, rx, &w, &feed_tx)).map_err(io_err)?;
        let known = on_disk.clone();
        let feeder =
            spawn("loader-feeder", move || feed_loop(&reader, known, feed_rx)).map_err(io_err)?;
        let meta_path = super::meta_path(part);
        let checkpoints = spawn("loader-checkpoint", move || {
            checkpoint_loop(&syncer, &meta_path, meta, on_disk, &written, &stop_rx)
        })
        .map_err(io_err)?;
        Ok(Self {
            tx,
            writer,
            feeder,
            stop_checkpoints,
            checkpoints,
            path: part.to_path_buf(),
        })
    }

    /// Waits for every queued chunk to be written, hashed and recorded (fsynced); the digests
    /// are of the contiguous prefix, whose length is `size`.
    pub async fn finish(self) -> Result<Digests> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || self.finish_blocking())
            .await
            .map_err(|e| LoaderError::io(&path, io::Error::other(e)))?
    }

    fn finish_blocking(self) -> Result<Digests> {
        let io_err = |e| LoaderError::io(&self.path, e);
        drop(self.tx);
        let written = join(self.writer).map_err(io_err);
        let _ = self.stop_checkpoints.send(());
        let recorded = self
            .checkpoints
            .join()
            .map_err(|_| io_err(io::Error::other("checkpoint thread panicked")))
            .and_then(|r| r);
        let digests = join(self.feeder).map_err(io_err);
        written?;
        recorded?;
        digests
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

fn join<T>(h: JoinHandle<io::Result<T>>) -> io::Result<T> {
    h.join()
        .map_err(|_| io::Error::other("download thread panicked"))?
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_loop(
    file: &File,
    mut rx: mpsc::Receiver<Chunk>,
    written: &Mutex<Extents>,
    feed: &std_mpsc::SyncSender<Chunk>,
) -> io::Result<()> {
    while let Some(c) = rx.blocking_recv() {
        file.write_all_at(&c.bytes, c.offset)?;
        lock(written).insert(c.offset, c.offset + c.bytes.len() as u64);
        feed.send(c)
            .map_err(|_| io::Error::other("hash feeder stopped"))?;
    }
    Ok(())
}

/// Hashes the prefix in order: a chunk that continues it goes straight to the hashers (the
/// one-connection case, no read-back); anything ahead of it is read back from the file once the
/// prefix reaches it.
fn feed_loop(
    file: &File,
    mut known: Extents,
    rx: std_mpsc::Receiver<Chunk>,
) -> io::Result<Digests> {
    let md5 = HashThread::spawn::<Md5>("loader-md5")?;
    let sha = HashThread::spawn::<Sha256>("loader-sha256")?;
    let send = |b: Bytes| -> io::Result<()> {
        md5.send(b.clone())?;
        sha.send(b)
    };
    let mut hashed = 0u64;
    catch_up(file, &known, &mut hashed, &send)?;
    for c in rx {
        let end = c.offset + c.bytes.len() as u64;
        known.insert(c.offset, end);
        if c.offset <= hashed && hashed < end {
            send(c.bytes.slice((hashed - c.offset) as usize..))?;
            hashed = end;
        }
        catch_up(file, &known, &mut hashed, &send)?;
    }
    Ok(Digests {
        size: hashed,
        md5: md5.finish()?,
        sha256: sha.finish()?,
    })
}

fn catch_up(
    file: &File,
    known: &Extents,
    hashed: &mut u64,
    send: &dyn Fn(Bytes) -> io::Result<()>,
) -> io::Result<()> {
    let prefix = known.prefix();
    while *hashed < prefix {
        let n = (prefix - *hashed).min(IO_BLOCK as u64) as usize;
        let mut block = vec![0u8; n];
        file.read_exact_at(&mut block, *hashed)?;
        send(Bytes::from(block))?;
        *hashed += n as u64;
    }
    Ok(())
}

/// Every second, and once when stopped: fsync the data, then record what it covers. The order
/// matters: a sidecar never claims bytes that a power cut could still lose.
fn checkpoint_loop(
    file: &File,
    meta_path: &Path,
    meta: PartMeta,
    mut recorded: Extents,
    written: &Mutex<Extents>,
    stop: &std_mpsc::Receiver<()>,
) -> Result<()> {
    loop {
        let stopping = !matches!(
            stop.recv_timeout(CHECKPOINT_EVERY),
            Err(std_mpsc::RecvTimeoutError::Timeout)
        );
        let now = lock(written).clone();
        if now != recorded || stopping {
            file.sync_all().map_err(|e| LoaderError::io(meta_path, e))?;
        }
        if now != recorded {
            let m = PartMeta {
                written: Some(now.clone()),
                ..meta.clone()
            };
            crate::store::write_atomic(meta_path, &serde_json::to_vec(&m).expect("plain struct"))?;
            recorded = now;
        }
        if stopping {
            return Ok(());
        }
    }
}

/// A hasher on its own thread: MD5 alone is ~600 MB/s on one core, so hashing and writing
/// each get a thread and the slowest of them, not their sum, sets the pace.
struct HashThread {
    tx: std_mpsc::SyncSender<Bytes>,
    handle: JoinHandle<String>,
}

impl HashThread {
    fn spawn<D: Digest + Send + 'static>(name: &str) -> io::Result<Self> {
        let (tx, rx) = std_mpsc::sync_channel::<Bytes>(HASH_QUEUE_BLOCKS);
        let handle = spawn(name, move || {
            let mut h = D::new();
            for b in rx {
                h.update(&b);
            }
            hex::encode(h.finalize())
        })?;
        Ok(Self { tx, handle })
    }

    fn send(&self, b: Bytes) -> io::Result<()> {
        self.tx
            .send(b)
            .map_err(|_| io::Error::other("hash thread stopped"))
    }

    fn finish(self) -> io::Result<String> {
        drop(self.tx);
        self.handle
            .join()
            .map_err(|_| io::Error::other("hash thread panicked"))
    }
}
