//! What every engine shares: a named thread that owns the model (llama.cpp contexts are not
//! `Send`), started and awaited until it reports ready, and the bounded queue in front of it,
//! whose capacity is the waiting line (`try_submit` on a full queue is RESOURCE_EXHAUSTED) and
//! whose depth is a metric.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::EngineError;

/// How an engine thread reports that its model and context are ready (or why not).
pub(crate) type ReadyTx<R> = std::sync::mpsc::SyncSender<Result<R, EngineError>>;

/// `r`'s value; its error goes to the waiting `spawn` as the engine's start-up failure (and
/// the thread should return).
pub(crate) fn or_report<T, R>(r: Result<T, EngineError>, ready: &ReadyTx<R>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let _ = ready.send(Err(e));
            None
        }
    }
}

/// The submitting side, held by the engine handle.
pub(crate) struct Queue<J> {
    jobs: mpsc::Sender<J>,
    capacity: usize,
    kind: &'static str,
}

/// The engine thread's side.
pub(crate) struct Jobs<J> {
    rx: mpsc::Receiver<J>,
    kind: &'static str,
}

impl<J: Send + 'static> Queue<J> {
    /// Starts `run` on a thread named `llama-<short>-<file>` (short: Linux keeps 15 bytes of a
    /// thread name) behind a queue of `capacity`, and waits for it to report ready. `kind`
    /// labels the queue-depth metric.
    pub fn spawn<R: Send + 'static>(
        (short, kind): (&'static str, &'static str),
        path: &Path,
        capacity: usize,
        run: impl FnOnce(&Path, Jobs<J>, ReadyTx<R>) + Send + 'static,
    ) -> Result<(Self, R), EngineError> {
        let (jobs, rx) = mpsc::channel::<J>(capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path: PathBuf = path.to_path_buf();
        // Counted before the thread exists, so a wait that starts now cannot miss it.
        let live = Live::enter();
        std::thread::Builder::new()
            .name(format!(
                "llama-{short}-{}",
                name.chars().take(20).collect::<String>()
            ))
            .spawn(move || {
                let _live = live;
                // `run` owns model and context: both are freed when it returns.
                run(&path, Jobs { rx, kind }, ready_tx);
                tracing::info!(model = %path.display(), "{kind} engine stopped; model freed");
            })
            .map_err(|e| EngineError::Backend(e.to_string()))?;
        let ready = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        let queue = Self {
            jobs,
            capacity,
            kind,
        };
        Ok((queue, ready))
    }

    /// Queues a job without waiting: a full queue is `QueueFull`.
    pub fn try_submit(&self, job: J) -> Result<(), EngineError> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::QueueFull(self.capacity),
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
        })?;
        self.queued();
        Ok(())
    }

    /// Queues a job, waiting for room (for callers whose own backlog is already bounded).
    pub async fn submit_waiting(&self, job: J) -> Result<(), EngineError> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| EngineError::Stopped)?;
        self.queued();
        Ok(())
    }

    fn queued(&self) {
        crate::metrics::QUEUE_DEPTH
            .with_label_values(&[self.kind])
            .inc();
    }
}

impl<J> Jobs<J> {
    /// The next job, sleeping until one comes; `None` once every handle is gone.
    pub fn wait(&mut self) -> Option<J> {
        let job = self.rx.blocking_recv();
        self.taken(job.is_some());
        job
    }

    /// The next job if one is waiting.
    pub fn next(&mut self) -> Option<J> {
        let job = self.rx.try_recv().ok();
        self.taken(job.is_some());
        job
    }

    fn taken(&self, some: bool) {
        if some {
            crate::metrics::QUEUE_DEPTH
                .with_label_values(&[self.kind])
                .dec();
        }
    }
}

/// One queue drained by several engine threads of a model. The thread sleeping until a job
/// comes holds the lock; the others, busy with batches of their own, only look (`next`
/// never waits for the lock) and so never stall behind it.
pub(crate) struct SharedJobs<J>(Mutex<Jobs<J>>);

impl<J> SharedJobs<J> {
    pub fn new(jobs: Jobs<J>) -> Self {
        Self(Mutex::new(jobs))
    }

    /// The next job, sleeping until one comes; `None` once every handle is gone.
    pub fn wait(&self) -> Option<J> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).wait()
    }

    /// The next job if one is waiting and no other thread is waiting for one.
    pub fn next(&self) -> Option<J> {
        match self.0.try_lock() {
            Ok(mut jobs) => jobs.next(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().next(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// Engine threads not yet finished: each owns a llama.cpp model and context, which must be
/// freed before the process exits (a GPU backend aborts when its runtime is torn down first).
static LIVE: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

fn live_count() -> MutexGuard<'static, usize> {
    LIVE.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// One running engine thread, counted in [`LIVE`] while it lives.
struct Live;

impl Live {
    fn enter() -> Self {
        *live_count() += 1;
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        *live_count() -= 1;
        LIVE.1.notify_all();
    }
}

/// Waits until every engine thread has freed its model and context (their queues must be
/// gone: the engines dropped), at most `limit`. False when some were still running.
pub fn wait_engines_stopped(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut n = live_count();
    while *n > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        n = LIVE
            .1
            .wait_timeout(n, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}
