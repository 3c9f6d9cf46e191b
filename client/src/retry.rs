//! Retries with exponential backoff, for idempotent calls only.

use std::future::Future;
use std::time::Duration;

use tonic::Code;

use crate::affinity::Warmth;
use crate::balance::InFlight;
use crate::call::Transport;
use crate::replicas::ReplicaSet;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    /// Never retry (for calls whose effects must not repeat).
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// One unary call that changes nothing (tokenize, info...), retried as `spread` retries,
    /// on another replica each time: `call` gets the replica's transport and a clone of `req`.
    pub(crate) async fn unary<Req: Clone, Resp, Fut>(
        &self,
        set: &ReplicaSet,
        warmth: &Warmth,
        req: Req,
        call: impl Fn(Transport, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, crate::ClientError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let (r, _done) = self
            .spread(set, warmth, |t| call(t, tonic::Request::new(req.clone())))
            .await?;
        Ok(r.into_inner())
    }

    /// Runs `call` until it succeeds, fails with a code retrying cannot fix, or runs out of
    /// attempts. UNAVAILABLE (server restarting, connection refused) and RESOURCE_EXHAUSTED
    /// (queue full) are worth another try; everything else is the answer.
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = Backoff::new(self);
        loop {
            match call().await {
                Err(s) if retryable(s.code()) => backoff.wait(s)?.await,
                other => return other,
            }
        }
    }

    /// As [`run`](Self::run), over the replicas of `set`: each attempt goes to the replica
    /// [`pick`](crate::balance::pick) chooses (warm for `warmth`), a retry to another one than
    /// those tried. The answer comes with the guard that keeps its call counted on the replica
    /// (a stream keeps it as long as it lives).
    pub(crate) async fn spread<T, F, Fut>(
        &self,
        set: &ReplicaSet,
        warmth: &Warmth,
        mut call: F,
    ) -> Result<(T, InFlight), tonic::Status>
    where
        F: FnMut(Transport) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = Backoff::new(self);
        let mut tried = Vec::new();
        loop {
            let guard = set.choose(&tried, warmth);
            let r = call(guard.replica().transport.clone()).await;
            set.settle(&guard, warmth, &r);
            match r {
                Ok(v) => return Ok((v, guard)),
                Err(s) if !retryable(s.code()) => return Err(s),
                Err(s) => {
                    tracing::debug!(replica = guard.addr(), code = ?s.code(), "trying another replica");
                    tried.push(guard.replica().id);
                    drop(guard);
                    backoff.wait(s)?.await;
                }
            }
        }
    }
}

/// Worth another attempt: the server was not there or was full.
pub(crate) fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

/// The pauses between the attempts of one call.
struct Backoff {
    next: Duration,
    max: Duration,
    attempts_left: u32,
}

impl Backoff {
    fn new(p: &RetryPolicy) -> Self {
        Self {
            next: p.initial_backoff,
            max: p.max_backoff,
            attempts_left: p.max_attempts.saturating_sub(1),
        }
    }

    /// The pause before the next attempt, or `last` (the error to report) when none is left.
    fn wait(&mut self, last: tonic::Status) -> Result<tokio::time::Sleep, tonic::Status> {
        if self.attempts_left == 0 {
            return Err(last);
        }
        self.attempts_left -= 1;
        let pause = self.next;
        tracing::debug!(code = ?last.code(), "retrying after {pause:?}");
        self.next = (self.next * 2).min(self.max);
        Ok(tokio::time::sleep(pause))
    }
}
