//! The network side: connections take pieces in file order from a shared queue, and each piece
//! is fetched with its own attempts, backoff and Range resume.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{CONTENT_RANGE, IF_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::sync::mpsc;

use super::sink::Chunk;
use super::{FetchOptions, FetchProgress};
use crate::error::LoaderError;
use crate::hub::RemoteFile;

/// Why the connections stopped before every piece was in.
pub enum Stop {
    /// The hub cannot serve ranges of these bytes (it answered the whole file to a ranged
    /// request, another range, or 416): start again from zero on one connection.
    Restart(String),
    Fail(LoaderError),
}

/// What the connections of one round share.
pub struct Round<'a> {
    pub client: &'a reqwest::Client,
    pub remote: &'a RemoteFile,
    pub opts: &'a FetchOptions,
    pub queue: Mutex<VecDeque<(u64, u64)>>,
    pub tx: &'a mpsc::Sender<Chunk>,
    /// Bytes on disk or received; reported under this lock so progress never steps back.
    pub done: Mutex<u64>,
    pub resumed_from: u64,
    pub on_progress: &'a (dyn Fn(FetchProgress) + Send + Sync),
}

impl Round<'_> {
    /// One connection's work: pieces until the queue is empty.
    pub async fn connection(&self) -> Result<(), Stop> {
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            match next {
                Some((start, end)) => self.piece(start, end).await?,
                None => return Ok(()),
            }
        }
    }

    /// `[start, end)`, resumed after each interruption until done or out of attempts. `end` is
    /// `u64::MAX` when the hub did not say how big the file is.
    async fn piece(&self, start: u64, end: u64) -> Result<(), Stop> {
        let mut pos = start;
        let mut attempts = 0u32;
        let mut last_error = String::new();
        loop {
            if attempts >= self.opts.max_attempts {
                return Err(Stop::Fail(LoaderError::Download {
                    file: self.remote.name.clone(),
                    attempts,
                    last: last_error,
                }));
            }
            if attempts > 0 {
                let backoff = Duration::from_millis(200 * 2u64.pow(attempts.min(5)));
                tracing::warn!(file = %self.remote.name, offset = pos, attempts, error = %last_error, "download interrupted; resuming");
                tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
            }
            attempts += 1;
            match self.transfer(&mut pos, end).await? {
                None => return Ok(()),
                Some(why) => last_error = why,
            }
        }
    }

    /// One request for `[pos, end)`; `None` when the piece is complete, else why not.
    async fn transfer(&self, pos: &mut u64, end: u64) -> Result<Option<String>, Stop> {
        let size = self.remote.size;
        // The last piece asks for the rest of the file, as a one-connection download always did.
        let open = size == 0 || end >= size;
        let mut req = self.client.get(&self.remote.url);
        let ranged = *pos > 0 || !open;
        if ranged {
            let range = if open {
                format!("bytes={pos}-")
            } else {
                format!("bytes={pos}-{}", end - 1)
            };
            req = req.header(RANGE, range);
            if let Some(sha) = &self.remote.sha256 {
                // The hub's ETag of an LFS file is its SHA-256: a changed file answers 200.
                req = req.header(IF_RANGE, format!("\"{sha}\""));
            }
        }
        let stall = self.opts.stall_timeout;
        let response = match tokio::time::timeout(stall, req.send()).await {
            Err(_) => return Ok(Some("no response".into())),
            Ok(Err(e)) => return Ok(Some(e.to_string())),
            Ok(Ok(r)) => r,
        };
        match response.status() {
            StatusCode::PARTIAL_CONTENT if ranged => {
                let starts_at = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if starts_at != Some(*pos) {
                    return Err(Stop::Restart("the hub answered another range".into()));
                }
            }
            StatusCode::OK if !ranged => {}
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {
                return Err(Stop::Restart(
                    "the hub answered the whole file to a ranged request".into(),
                ))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Stop::Restart("range not satisfiable".into()))
            }
            StatusCode::NOT_FOUND => {
                return Err(Stop::Fail(LoaderError::FileNotFound(format!(
                    "{} is not on the hub ({})",
                    self.remote.name, self.remote.url
                ))))
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                return Ok(Some(format!("hub answered {s}")))
            }
            s => {
                return Err(Stop::Fail(LoaderError::Hub(format!(
                    "GET {} answered {s}",
                    self.remote.url
                ))))
            }
        }

        let mut body = response.bytes_stream();
        loop {
            let next = match tokio::time::timeout(stall, body.next()).await {
                Err(_) => return Ok(Some(format!("stalled for {stall:?}"))),
                Ok(n) => n,
            };
            let mut bytes = match next {
                None if size == 0 || *pos == end => return Ok(None),
                None => return Ok(Some(format!("connection closed at byte {pos}"))),
                Some(Err(e)) => return Ok(Some(e.to_string())),
                Some(Ok(bytes)) => bytes,
            };
            let len = bytes.len() as u64;
            if size > 0 && *pos + len > size {
                return Err(Stop::Fail(LoaderError::Integrity {
                    file: self.remote.name.clone(),
                    detail: format!("hub sent more than the listed {size} bytes"),
                }));
            }
            // A bounded range answered with more bytes: what was asked for is all we take.
            bytes.truncate((end - *pos).min(len) as usize);
            let len = bytes.len() as u64;
            let offset = *pos;
            *pos += len;
            crate::metrics::DOWNLOADED_BYTES.inc_by(len);
            self.tx
                .send(Chunk { offset, bytes })
                .await
                // The writer only hangs up when it failed; its own error is reported after.
                .map_err(|_| {
                    Stop::Fail(LoaderError::io(
                        "partial file",
                        std::io::Error::other("writer stopped"),
                    ))
                })?;
            self.report(len);
            if !open && *pos == end {
                return Ok(None);
            }
        }
    }

    fn report(&self, more: u64) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done += more;
        (self.on_progress)(FetchProgress {
            bytes_done: *done,
            bytes_total: self.remote.size,
            resumed_from: self.resumed_from,
            verifying: false,
        });
    }
}
