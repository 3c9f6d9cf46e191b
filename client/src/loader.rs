//! Client of llama_agent.loader.v1.LoaderService.

use std::time::Duration;

use std::sync::Arc;

use crate::affinity::Warmth;
use crate::balance::watched;
use crate::call::Transport;
use crate::replicas::ReplicaSet;
use futures::{Stream, StreamExt};
use llama_agent_proto::common::v1::ModelInfo;
use llama_agent_proto::loader::v1 as pb;
use llama_agent_proto::loader::v1::loader_service_client::LoaderServiceClient;
use tonic::{IntoRequest, Request};

use crate::{ClientError, RetryPolicy, DEFAULT_DEADLINE};

#[derive(Clone)]
pub struct LoaderClient {
    replicas: Arc<ReplicaSet>,
    retry: RetryPolicy,
    deadline: Duration,
}

/// The final answer of an EnsureModel stream.
#[derive(Clone, Debug)]
pub struct Ensured {
    pub model: ModelInfo,
    pub lease: Option<pb::Lease>,
    pub cache_hit: bool,
}

impl LoaderClient {
    crate::call::constructors!();

    // Messages are small (ReadModelFile sends 1 MiB blocks): the default 4 MiB limits suffice.
    fn over(replicas: Arc<ReplicaSet>) -> Self {
        Self {
            replicas,
            retry: RetryPolicy::default(),
            deadline: DEFAULT_DEADLINE,
        }
    }

    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// EnsureModel as a stream of progress events and the final model. Opening the stream is
    /// retried (ensuring is idempotent); a stream that breaks midway is the caller's to redo.
    pub async fn ensure_stream(
        &self,
        req: pb::EnsureModelRequest,
    ) -> Result<impl Stream<Item = Result<pb::EnsureModelResponse, ClientError>>, ClientError> {
        let warmth = Warmth::model(&req.model);
        let (stream, guard) = self
            .retry
            .spread(&self.replicas, &warmth, |t| {
                let req = req.clone();
                async move { LoaderServiceClient::new(t).ensure_model(req).await }
            })
            .await?;
        Ok(watched(stream.into_inner(), guard).map(|r| r.map_err(ClientError::from)))
    }

    /// EnsureModel to the end; `on_progress` sees every progress event.
    pub async fn ensure(
        &self,
        req: pb::EnsureModelRequest,
        mut on_progress: impl FnMut(&pb::Progress),
    ) -> Result<Ensured, ClientError> {
        let mut stream = std::pin::pin!(self.ensure_stream(req).await?);
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            match msg.event {
                Some(pb::ensure_model_response::Event::Progress(p)) => on_progress(&p),
                Some(pb::ensure_model_response::Event::Model(model)) => {
                    // Read to the trailers: dropping a stream early resets it on the wire.
                    while let Some(rest) = stream.next().await {
                        rest?;
                    }
                    return Ok(Ensured {
                        model,
                        lease: msg.lease,
                        cache_hit: msg.cache_hit,
                    });
                }
                None => {}
            }
        }
        Err(ClientError::Incomplete)
    }

    /// One unary call with the default deadline, retried per `retry` (on another replica).
    async fn unary<Req, Resp, F, Fut>(
        &self,
        req: Req,
        retry: &RetryPolicy,
        deadline: Option<Duration>,
        call: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(LoaderServiceClient<Transport>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let (r, _done) = retry
            .spread(&self.replicas, &Warmth::default(), |t| {
                let mut request = req.clone().into_request();
                if let Some(d) = deadline {
                    request.set_timeout(d);
                }
                call(LoaderServiceClient::new(t), request)
            })
            .await?;
        Ok(r.into_inner())
    }

    pub async fn get_model(&self, model: &str) -> Result<ModelInfo, ClientError> {
        let req = pb::GetModelRequest {
            model: model.to_string(),
        };
        let r = self
            .unary(
                req,
                &self.retry,
                Some(self.deadline),
                |mut c, r| async move { c.get_model(r).await },
            )
            .await?;
        r.model.ok_or(ClientError::Incomplete)
    }

    pub async fn list_models(&self) -> Result<Vec<pb::CachedModel>, ClientError> {
        let r = self
            .unary(
                pb::ListModelsRequest {},
                &self.retry,
                Some(self.deadline),
                |mut c, r| async move { c.list_models(r).await },
            )
            .await?;
        Ok(r.models)
    }

    pub async fn cache_status(&self) -> Result<pb::CacheStatusResponse, ClientError> {
        self.unary(
            pb::CacheStatusRequest {},
            &self.retry,
            Some(self.deadline),
            |mut c, r| async move { c.cache_status(r).await },
        )
        .await
    }

    /// Not retried: a retry after a lost answer would report NOT_FOUND for a done eviction.
    pub async fn evict_model(
        &self,
        model: &str,
        force: bool,
    ) -> Result<pb::EvictModelResponse, ClientError> {
        let req = pb::EvictModelRequest {
            model: model.to_string(),
            force,
        };
        self.unary(
            req,
            &RetryPolicy::none(),
            Some(self.deadline),
            |mut c, r| async move { c.evict_model(r).await },
        )
        .await
    }

    /// Hashing a large model takes a while: no default deadline.
    pub async fn verify_model(
        &self,
        model: &str,
        repair: bool,
    ) -> Result<pb::VerifyModelResponse, ClientError> {
        let req = pb::VerifyModelRequest {
            model: model.to_string(),
            repair,
        };
        self.unary(req, &self.retry, None, |mut c, r| async move {
            c.verify_model(r).await
        })
        .await
    }

    /// Not retried: each call makes a new lease.
    pub async fn lease_model(
        &self,
        model: &str,
        ttl_seconds: u32,
        holder: &str,
    ) -> Result<pb::LeaseModelResponse, ClientError> {
        let req = pb::LeaseModelRequest {
            model: model.to_string(),
            ttl_seconds,
            holder: holder.to_string(),
        };
        self.unary(
            req,
            &RetryPolicy::none(),
            Some(self.deadline),
            |mut c, r| async move { c.lease_model(r).await },
        )
        .await
    }

    pub async fn renew_lease(
        &self,
        lease_id: &str,
        ttl_seconds: u32,
    ) -> Result<pb::Lease, ClientError> {
        let req = pb::RenewLeaseRequest {
            lease_id: lease_id.to_string(),
            ttl_seconds,
        };
        let r = self
            .unary(
                req,
                &self.retry,
                Some(self.deadline),
                |mut c, r| async move { c.renew_lease(r).await },
            )
            .await?;
        r.lease.ok_or(ClientError::Incomplete)
    }

    pub async fn release_lease(&self, lease_id: &str) -> Result<(), ClientError> {
        let req = pb::ReleaseLeaseRequest {
            lease_id: lease_id.to_string(),
        };
        self.unary(
            req,
            &self.retry,
            Some(self.deadline),
            |mut c, r| async move { c.release_lease(r).await },
        )
        .await?;
        Ok(())
    }

    /// ReadModelFile: the bytes of one file of a cached model from `offset`, then a last
    /// message with the whole file's MD5. Opening is retried (reading is idempotent); a stream
    /// that breaks midway is resumed by the caller from the bytes it has.
    pub async fn read_model_file(
        &self,
        model: &str,
        file: &str,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<pb::ReadModelFileResponse, ClientError>>, ClientError>
    {
        let req = pb::ReadModelFileRequest {
            model: model.to_string(),
            file: file.to_string(),
            offset,
        };
        let (stream, guard) = self
            .retry
            .spread(&self.replicas, &Warmth::model(model), |t| {
                let req = req.clone();
                async move { LoaderServiceClient::new(t).read_model_file(req).await }
            })
            .await?;
        Ok(watched(stream.into_inner(), guard).map(|r| r.map_err(ClientError::from)))
    }
}
