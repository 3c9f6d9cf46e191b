//! ReadModelFile: the bytes of a cached file for a service that cannot see this volume (a
//! node-local cache on another node). A blocking thread reads ahead into a bounded channel
//! while the socket drains; a reader that hangs up stops it at the next block.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use llama_agent_proto::loader::v1 as pb;
use tokio::sync::mpsc;

use crate::error::{LoaderError, Result};
use crate::loader::Loader;

/// Bytes per message: large enough that per-message costs vanish on loopback, and a quarter
/// of gRPC's default 4 MiB message limit.
pub const BLOCK: usize = 1 << 20;
/// Messages read ahead of the network per stream: 4 MiB of memory per reader keeps the disk
/// busy while the socket drains.
const READ_AHEAD: usize = 4;
/// File names are echoed in errors up to this many characters.
const NAME_ECHO: usize = 120;

pub type Blocks = mpsc::Receiver<Result<pb::ReadModelFileResponse>>;

/// Opens `file` (empty: the primary file) of the cached model `model` at `offset` and streams
/// it: data messages, then one message with the whole file's MD5 from the manifest.
pub fn read(loader: &Loader, model: &str, file: &str, offset: u64) -> Result<Blocks> {
    let entry = loader.get(model)?;
    let record = if file.is_empty() {
        entry.files.first()
    } else {
        entry.files.iter().find(|f| f.name == file)
    }
    .ok_or_else(|| {
        let shown: String = file.chars().take(NAME_ECHO).collect();
        LoaderError::FileNotFound(format!("'{shown}' is not a file of {}", entry.key))
    })?
    .clone();
    if offset > record.size {
        return Err(LoaderError::OutOfRange(format!(
            "offset {offset} is past the end of {} ({} bytes)",
            record.name, record.size
        )));
    }
    let path = entry.file_path(loader.cache().root(), &record);
    let mut f = File::open(&path).map_err(|e| LoaderError::io(&path, e))?;
    let on_disk = f.metadata().map_err(|e| LoaderError::io(&path, e))?.len();
    if on_disk != record.size {
        return Err(LoaderError::Integrity {
            file: record.name.clone(),
            detail: format!(
                "the cached copy is {on_disk} bytes, the manifest says {} (llama-cli cache verify --repair)",
                record.size
            ),
        });
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| LoaderError::io(&path, e))?;

    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let size = record.size;
    std::thread::Builder::new()
        .name("loader-read-file".into())
        .spawn(move || {
            let mut left = size - offset;
            while left > 0 {
                let mut buf = vec![0u8; BLOCK.min(left as usize)];
                if let Err(e) = f.read_exact(&mut buf) {
                    let _ = tx.blocking_send(Err(LoaderError::io(&path, e)));
                    return;
                }
                left -= buf.len() as u64;
                crate::metrics::STREAMED_BYTES.inc_by(buf.len() as u64);
                let msg = pb::ReadModelFileResponse {
                    data: buf,
                    size_bytes: size,
                    md5: String::new(),
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return; // the reader hung up
                }
            }
            let _ = tx.blocking_send(Ok(pb::ReadModelFileResponse {
                data: Vec::new(),
                size_bytes: size,
                md5: record.md5,
            }));
        })
        .map_err(|e| LoaderError::io("loader-read-file thread", e))?;
    Ok(rx)
}
