//! A file span as a response body: a blocking reader thread pulls large blocks off disk ahead of
//! the socket, and the async side applies the injected faults on the way out.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::faults::Fault;

/// Large blocks keep syscalls and wake-ups rare; this is benchmarked against curl on loopback.
pub(crate) const BLOCK: usize = 1 << 20;
/// Blocks read ahead of the socket.
const READ_AHEAD: usize = 4;
/// Time given to the connection to flush what was sent before an injected drop, so the client
/// reliably receives exactly `drop_after` bytes.
const FLUSH_GRACE: Duration = Duration::from_millis(50);

pub(crate) struct Plan {
    pub(crate) path: PathBuf,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) fault: Option<Fault>,
}

/// The body stream; `on_sent` is told about every block handed to the connection.
pub(crate) fn stream(
    plan: Plan,
    on_sent: impl Fn(u64) + Send + 'static,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    let Plan {
        path,
        start,
        len,
        fault,
    } = plan;
    let fault = fault.unwrap_or_default();
    async_stream::try_stream! {
        let (tx, mut rx) = mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || read_span(path, start, len, tx));
        let limit = fault.drop_after.filter(|&n| n < len);
        let stall = fault.stall_after.filter(|&n| n < len);
        let cut = limit.into_iter().chain(stall).min();
        let mut pace = fault.bytes_per_sec.filter(|&r| r > 0).map(Pacer::new);
        let mut sent = 0u64;
        while let Some(block) = rx.recv().await {
            let mut block = block?;
            if fault.corrupt && !block.is_empty() {
                block[0] = !block[0];
            }
            let mut block = Bytes::from(block);
            if let Some(cut) = cut {
                block.truncate(usize::try_from(cut - sent).unwrap_or(usize::MAX));
            }
            while !block.is_empty() {
                let piece = match pace.as_mut() {
                    Some(p) => {
                        let piece = block.split_to(p.slice.min(block.len()));
                        p.wait(piece.len() as u64).await;
                        piece
                    }
                    None => std::mem::take(&mut block),
                };
                sent += piece.len() as u64;
                on_sent(piece.len() as u64);
                yield piece;
            }
            if stall == Some(sent) {
                // Headers and bytes went out; nothing else will until the client hangs up.
                std::future::pending::<()>().await;
            }
            if limit == Some(sent) {
                // Let hyper flush what it has, then fail the body: hyper closes the connection
                // short of the promised Content-Length.
                tokio::time::sleep(FLUSH_GRACE).await;
                Err(io::Error::other("injected connection drop"))?;
            }
        }
        if sent < len && limit.is_none() {
            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while serving"))?;
        }
    }
}

/// Reads `len` bytes from `start` in blocks; stops when the receiver goes (client hung up).
fn read_span(path: PathBuf, start: u64, len: u64, tx: mpsc::Sender<io::Result<Vec<u8>>>) {
    let run = || -> io::Result<()> {
        let mut file = File::open(&path)?;
        file.seek(SeekFrom::Start(start))?;
        let mut left = len;
        while left > 0 {
            let want = left.min(BLOCK as u64);
            // read_to_end fills spare capacity directly, so the block is never zeroed first.
            let mut block = Vec::with_capacity(want as usize);
            (&mut file).take(want).read_to_end(&mut block)?;
            if block.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while serving",
                ));
            }
            left -= block.len() as u64;
            if tx.blocking_send(Ok(block)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        let _ = tx.blocking_send(Err(e));
    }
}

/// Spreads bytes evenly over time: each piece waits until the rate allows everything before it.
struct Pacer {
    rate: u64,
    slice: usize,
    began: Instant,
    owed: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            // About 20 pieces a second: smooth enough to kill a client at a predictable point.
            slice: usize::try_from(rate / 20).unwrap_or(BLOCK).clamp(1, BLOCK),
            began: Instant::now(),
            owed: 0,
        }
    }

    async fn wait(&mut self, piece: u64) {
        let due = self.began + Duration::from_secs_f64(self.owed as f64 / self.rate as f64);
        tokio::time::sleep_until(due).await;
        self.owed += piece;
    }
}
