//! Retries with exponential backoff, for idempotent calls only.

use std::future::Future;
use std::time::Duration;

use tonic::Code;

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

    /// One unary call that changes nothing (tokenize, info...), retried as `run` retries:
    /// `call` gets a clone of `client` and of `req` for each attempt.
    pub(crate) async fn unary<C: Clone, Req: Clone, Resp, Fut>(
        &self,
        client: &C,
        req: Req,
        call: impl Fn(C, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, crate::ClientError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let r = self
            .run(|| call(client.clone(), tonic::Request::new(req.clone())))
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
        let mut backoff = self.initial_backoff;
        let mut attempt = 1;
        loop {
            match call().await {
                Err(s)
                    if attempt < self.max_attempts
                        && matches!(s.code(), Code::Unavailable | Code::ResourceExhausted) =>
                {
                    tracing::debug!(attempt, code = ?s.code(), "retrying after {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
