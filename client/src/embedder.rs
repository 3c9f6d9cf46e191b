//! Client of llama_agent.embedder.v1.EmbedderService.

use std::time::Duration;

use std::sync::Arc;

use crate::affinity::Warmth;
use crate::balance::{watched, Replica};
use crate::call::Transport;
use crate::replicas::ReplicaSet;
use futures::{Stream, StreamExt};
use llama_agent_proto::embedder::v1 as pb;
use llama_agent_proto::embedder::v1::embedder_service_client::EmbedderServiceClient;
use tokio::sync::mpsc;
use tonic::IntoRequest;

use crate::{ClientError, RetryPolicy, DEFAULT_DEADLINE};

/// Largest message sent or accepted: a batch of wide vectors (the server's own limit).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Stream batches queued on the client before `send` waits: with the server's own bounded
/// pipeline this keeps a producer that outruns the model from buffering its whole input.
const STREAM_SEND_AHEAD: usize = 2;

#[derive(Clone)]
pub struct EmbedderClient {
    replicas: Arc<ReplicaSet>,
    retry: RetryPolicy,
    deadline: Duration,
}

impl EmbedderClient {
    crate::call::constructors!();

    fn over(replicas: Arc<ReplicaSet>) -> Self {
        Self {
            replicas,
            retry: RetryPolicy::default(),
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// The service's client over one replica's transport.
    fn svc(t: Transport) -> EmbedderServiceClient<Transport> {
        EmbedderServiceClient::new(t)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Deadline of each unary `embed` call (streams have none unless the caller sets one).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Embeds `req.texts` in one call. Retried on UNAVAILABLE and RESOURCE_EXHAUSTED, on
    /// another replica (embedding is idempotent).
    pub async fn embed(&self, req: pb::EmbedRequest) -> Result<pb::EmbedResponse, ClientError> {
        let warmth = Warmth::model(&req.model);
        let (r, _done) = self
            .retry
            .spread(&self.replicas, &warmth, |t| {
                let mut request = req.clone().into_request();
                request.set_timeout(self.deadline);
                async move { Self::svc(t).embed(request).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Opens EmbedStream with its first batch (which names the model and options), on the
    /// replica [`pick`](crate::balance::pick) chooses. Batches go in with
    /// [`EmbedSender::send`]; answers come out of the stream in the same order. Not retried:
    /// a stream that fails is the caller's to resume (elsewhere: a replica that failed at
    /// the transport level gets no new calls for a while).
    pub async fn embed_stream(
        &self,
        first: pb::EmbedStreamRequest,
    ) -> Result<
        (
            EmbedSender,
            impl Stream<Item = Result<pb::EmbedStreamResponse, ClientError>>,
        ),
        ClientError,
    > {
        let warmth = Warmth::model(&first.model);
        let guard = self.replicas.choose(&[], &warmth);
        let (tx, rx) = mpsc::channel(STREAM_SEND_AHEAD);
        // The server answers the call once it has read the first batch.
        tx.send(first).await.map_err(|_| ClientError::Incomplete)?;
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let opened = Self::svc(guard.replica().transport.clone())
            .embed_stream(outbound)
            .await;
        self.replicas.settle(&guard, &warmth, &opened);
        let inbound = opened?.into_inner();
        let replica = Arc::clone(guard.replica());
        Ok((
            EmbedSender { tx, replica },
            watched(inbound, guard).map(|r| r.map_err(ClientError::from)),
        ))
    }

    /// The model's tokenizer: `req.text` as token ids (and pieces), retried on UNAVAILABLE
    /// and RESOURCE_EXHAUSTED (it changes nothing).
    /// These calls have no deadline: the service loads the model first when needed (a
    /// download, then a load), as `ensure` and `generate` do.
    pub async fn tokenize(
        &self,
        req: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        let warmth = Warmth::model(&req.model);
        self.retry
            .unary(&self.replicas, &warmth, req, |t, r| async move {
                Self::svc(t).tokenize(r).await
            })
            .await
    }

    /// The text of `req.ids`.
    pub async fn detokenize(
        &self,
        req: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeResponse, ClientError> {
        let warmth = Warmth::model(&req.model);
        self.retry
            .unary(&self.replicas, &warmth, req, |t, r| async move {
                Self::svc(t).detokenize(r).await
            })
            .await
    }

    /// What `model` is, where it runs and how it is served (loading it when needed).
    pub async fn model_info(&self, model: &str) -> Result<pb::GetModelInfoResponse, ClientError> {
        let req = pb::GetModelInfoRequest {
            model: model.to_string(),
        };
        let warmth = Warmth::model(model);
        self.retry
            .unary(&self.replicas, &warmth, req, |t, r| async move {
                Self::svc(t).get_model_info(r).await
            })
            .await
    }

    /// Scores `req.documents` against `req.query` with a reranker, best first. Retried on
    /// UNAVAILABLE and RESOURCE_EXHAUSTED (scoring changes nothing); no deadline, like
    /// `tokenize`, since the service may load the model first.
    pub async fn rerank(&self, req: pb::RerankRequest) -> Result<pb::RerankResponse, ClientError> {
        let warmth = Warmth::model(&req.model);
        self.retry
            .unary(&self.replicas, &warmth, req, |t, r| async move {
                Self::svc(t).rerank(r).await
            })
            .await
    }
}

/// The sending half of an EmbedStream; dropping it (or `finish`) half-closes the stream.
pub struct EmbedSender {
    tx: mpsc::Sender<pb::EmbedStreamRequest>,
    replica: Arc<Replica>,
}

impl EmbedSender {
    /// Queues a batch, waiting while the server is behind (flow control reaches back here).
    pub async fn send(&self, items: Vec<pb::TextItem>) -> Result<(), ClientError> {
        let msg = pb::EmbedStreamRequest {
            items,
            ..Default::default()
        };
        self.tx.send(msg).await.map_err(|_| ClientError::Incomplete)
    }

    /// No more batches: the server answers what it has and ends the stream.
    pub fn finish(self) {}

    /// The stream's replica started draining (SIGTERM): it should get no new batches; what
    /// it has, it answers before it stops.
    pub fn replica_draining(&self) -> bool {
        self.replica.is_draining()
    }

    /// The stream's replica (`http://10.0.0.7:50053`), for logs.
    pub fn replica(&self) -> &str {
        &self.replica.addr
    }
}

/// The vectors of `e` as f32 rows (f16 widened), or `None` when the bytes do not hold
/// `count * dim` values of the declared type.
pub fn decode_vectors(e: &pb::Embeddings) -> Option<Vec<f32>> {
    let n = e.count as usize * e.dim as usize;
    match pb::DType::try_from(e.dtype).ok()? {
        pb::DType::F16 => (e.data.len() == n * 2).then(|| {
            e.data
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect()
        }),
        pb::DType::F32 | pb::DType::Unspecified => (e.data.len() == n * 4).then(|| {
            e.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }),
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let man = f32::from(h & 0x3ff);
    match exp {
        0 => sign * man * 2f32.powi(-24),
        0x1f if man == 0.0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        e => sign * (1.0 + man / 1024.0) * 2f32.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_decode_from_both_dtypes() {
        let f32s = pb::Embeddings {
            dtype: pb::DType::F32 as i32,
            dim: 2,
            count: 1,
            data: [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            ..Default::default()
        };
        assert_eq!(decode_vectors(&f32s), Some(vec![1.5, -2.0]));
        let f16s = pb::Embeddings {
            dtype: pb::DType::F16 as i32,
            dim: 3,
            count: 1,
            data: [0x3c00u16, 0xc000, 0x0001]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            ..Default::default()
        };
        assert_eq!(decode_vectors(&f16s), Some(vec![1.0, -2.0, 2f32.powi(-24)]));
        let short = pb::Embeddings {
            dim: 4,
            count: 1,
            data: vec![0; 8],
            ..Default::default()
        };
        assert_eq!(decode_vectors(&short), None);
    }
}
