//! One file from the loader into partial/: resumed from the bytes already there, written and
//! hashed on two threads while the next block arrives, checked against the loader's MD5.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use llama_agent_client::{ClientError, LoaderClient};
use md5::{Digest, Md5};
use tokio::sync::mpsc;

use super::layout::FilePlan;
use super::{metrics, NodeCacheError};

/// Streams that break are resumed this many times (with backoff) before the load fails.
const MAX_ATTEMPTS: u32 = 6;
/// Blocks (1 MiB each) queued to the writer and to the hasher: 4 MiB each bounds memory while
/// absorbing disk hiccups.
const QUEUE_BLOCKS: usize = 4;

enum Failure {
    /// The stream broke (loader restarted, connection reset): resume from the bytes written.
    Broken(NodeCacheError),
    /// The bytes assembled are not the loader's file (a torn earlier copy): start over.
    Mismatch(String),
    Fatal(NodeCacheError),
}

/// Leaves `dest` holding the whole file, fsynced, with the loader's MD5.
pub async fn fetch(
    loader: &LoaderClient,
    model: &str,
    file: &FilePlan,
    dest: &Path,
) -> Result<(), NodeCacheError> {
    let mut attempts = 0;
    let mut started_over = false;
    loop {
        attempts += 1;
        match attempt(loader, model, file, dest).await {
            Ok(()) => return Ok(()),
            Err(Failure::Broken(e)) if attempts < MAX_ATTEMPTS => {
                tracing::warn!(file = %file.name, attempts, error = %e, "node cache: stream broke; resuming");
                let backoff = Duration::from_millis(200 * 2u64.pow(attempts.min(5)));
                tokio::time::sleep(backoff).await;
            }
            Err(Failure::Mismatch(detail)) if !started_over => {
                tracing::warn!(file = %file.name, %detail, "node cache: copy does not match; starting over");
                started_over = true;
                let path = dest.to_path_buf();
                tokio::task::spawn_blocking(move || std::fs::remove_file(&path))
                    .await
                    .map_err(|e| NodeCacheError::io(dest, std::io::Error::other(e)))?
                    .map_err(|e| NodeCacheError::io(dest, e))?;
            }
            Err(Failure::Broken(e) | Failure::Fatal(e)) => return Err(e),
            Err(Failure::Mismatch(detail)) => {
                return Err(NodeCacheError::Integrity(format!(
                    "{} copied twice and wrong both times: {detail}",
                    file.name
                )))
            }
        }
    }
}

/// One ReadModelFile stream from the end of what `dest` holds.
async fn attempt(
    loader: &LoaderClient,
    model: &str,
    file: &FilePlan,
    dest: &Path,
) -> Result<(), Failure> {
    let have = match std::fs::metadata(dest) {
        Ok(m) if m.len() <= file.size => m.len(),
        Ok(m) => {
            return Err(Failure::Mismatch(format!(
                "{} bytes, over the size",
                m.len()
            )))
        }
        Err(_) => 0,
    };
    let (to_writer, writer) = spawn_writer(dest.to_path_buf()).map_err(Failure::Fatal)?;
    let (to_hasher, hasher) = spawn_hasher(dest.to_path_buf(), have);
    let received = receive(loader, model, file, have, &to_writer, &to_hasher).await;
    drop((to_writer, to_hasher));
    let written = join(writer, dest).map_err(Failure::Fatal)?;
    let (md5, trailer) = match received {
        Ok(trailer) => (join(hasher, dest).map_err(Failure::Fatal)?, trailer),
        Err(e) => return Err(e),
    };
    let size = have + written;
    if size != file.size {
        return Err(Failure::Mismatch(format!(
            "{size} bytes, expected {}",
            file.size
        )));
    }
    if trailer != file.md5 || md5 != file.md5 {
        return Err(Failure::Mismatch(format!(
            "md5 {md5}, the loader says {trailer} (and {} when the model was ensured)",
            file.md5
        )));
    }
    Ok(())
}

/// Reads the stream into the two queues; the loader's closing MD5.
async fn receive(
    loader: &LoaderClient,
    model: &str,
    file: &FilePlan,
    mut offset: u64,
    to_writer: &Blocks,
    to_hasher: &Blocks,
) -> Result<String, Failure> {
    let stream = loader
        .read_model_file(model, &file.name, offset)
        .await
        .map_err(classify)?;
    let mut stream = std::pin::pin!(stream);
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(classify)?;
        if msg.size_bytes != file.size {
            return Err(Failure::Fatal(NodeCacheError::BadAnswer(format!(
                "{} is {} bytes on the loader, {} when the model was ensured",
                file.name, msg.size_bytes, file.size
            ))));
        }
        if !msg.md5.is_empty() {
            return Ok(msg.md5.to_ascii_lowercase());
        }
        offset += msg.data.len() as u64;
        if offset > file.size {
            return Err(Failure::Mismatch(format!("more than {} bytes", file.size)));
        }
        metrics::STREAMED_BYTES.inc_by(msg.data.len() as u64);
        let block = Arc::new(msg.data);
        // A closed queue means its thread failed; its error is read when it is joined.
        if to_writer.send(Arc::clone(&block)).await.is_err() || to_hasher.send(block).await.is_err()
        {
            return Err(Failure::Broken(NodeCacheError::io(
                "node cache writer",
                std::io::Error::other("stopped"),
            )));
        }
    }
    Err(Failure::Broken(ClientError::Incomplete.into()))
}

fn classify(e: ClientError) -> Failure {
    use tonic::Code;
    match e.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted => Failure::Broken(e.into()),
        _ => Failure::Fatal(e.into()),
    }
}

type Worker<T> = std::thread::JoinHandle<std::io::Result<T>>;
/// Blocks shared by the writer and the hasher.
type Blocks = mpsc::Sender<Arc<Vec<u8>>>;

/// Appends blocks to `dest`, fsyncs at the end; the bytes written.
fn spawn_writer(dest: PathBuf) -> Result<(Blocks, Worker<u64>), NodeCacheError> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&dest)
        .map_err(|e| NodeCacheError::io(&dest, e))?;
    let (tx, mut rx) = mpsc::channel::<Arc<Vec<u8>>>(QUEUE_BLOCKS);
    let handle = std::thread::Builder::new()
        .name("node-cache-write".into())
        .spawn(move || {
            let mut n = 0u64;
            while let Some(block) = rx.blocking_recv() {
                f.write_all(&block)?;
                n += block.len() as u64;
            }
            f.sync_all()?;
            Ok(n)
        })
        .map_err(|e| NodeCacheError::io("node-cache-write thread", e))?;
    Ok((tx, handle))
}

/// MD5 of the first `have` bytes already in `dest`, then of every block; hex.
fn spawn_hasher(dest: PathBuf, have: u64) -> (Blocks, Worker<String>) {
    let (tx, mut rx) = mpsc::channel::<Arc<Vec<u8>>>(QUEUE_BLOCKS);
    let handle = std::thread::spawn(move || {
        let mut md5 = Md5::new();
        if have > 0 {
            let mut f = File::open(&dest)?.take(have);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                md5.update(&buf[..n]);
            }
        }
        while let Some(block) = rx.blocking_recv() {
            md5.update(&block[..]);
        }
        Ok(hex::encode(md5.finalize()))
    });
    (tx, handle)
}

fn join<T>(worker: Worker<T>, dest: &Path) -> Result<T, NodeCacheError> {
    worker
        .join()
        .map_err(|_| NodeCacheError::io(dest, std::io::Error::other("worker panicked")))?
        .map_err(|e| NodeCacheError::io(dest, e))
}
