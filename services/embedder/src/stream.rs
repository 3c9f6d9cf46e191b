//! EmbedStream: batches in, embedding batches out in the same order. A reader task submits
//! each incoming batch to the engine and queues its pending answer; the response stream
//! awaits those answers in order. The queue between them is short, so a slow reader stops
//! the reader task, which stops reading the client's messages: HTTP/2 flow control then
//! holds the client back, and memory stays bounded per stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use llama_agent_engine::embed::{EmbedParams, EmbedRequest, EmbeddingEngine, Reply};
use llama_agent_engine::EngineError;
use llama_agent_models::ModelPool;
use llama_agent_proto::embedder::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::convert::{check_count, embeddings_pb, params, pooling_pb};
use crate::service::require_model;
use crate::EmbedderError;

/// Batches of one stream submitted and not yet answered: enough that the engine has the next
/// batch while the previous answer travels, few enough that a stream holds little memory.
const IN_FLIGHT: usize = 4;

enum Pending {
    Batch {
        index: usize,
        ids: Vec<String>,
        reply: Reply,
    },
    Failed(Status),
}

/// What every batch of the stream shares.
struct Shared {
    engine: Arc<EmbeddingEngine>,
    model: String,
    params: EmbedParams,
    deadline: Option<Instant>,
    span: tracing::Span,
}

impl Shared {
    fn request(
        &self,
        index: usize,
        msg: pb::EmbedStreamRequest,
    ) -> Result<(Vec<String>, EmbedRequest), EmbedderError> {
        if !msg.model.is_empty() && msg.model != self.model {
            return Err(EmbedderError::Invalid(format!(
                "message {index} names model '{}' but the stream embeds with '{}'",
                msg.model, self.model
            )));
        }
        check_count(msg.items.len(), &format!("message {index}"))?;
        let (ids, texts) = msg.items.into_iter().map(|i| (i.id, i.text)).unzip();
        Ok((
            ids,
            EmbedRequest {
                texts,
                params: self.params.clone(),
                deadline: self.deadline,
                span: self.span.clone(),
            },
        ))
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::EmbedStreamResponse, Status>> + Send>>;

pub async fn start(
    pool: &ModelPool<EmbeddingEngine>,
    first: pb::EmbedStreamRequest,
    inbound: Streaming<pb::EmbedStreamRequest>,
    deadline: Option<Instant>,
) -> Result<Out, EmbedderError> {
    require_model(&first.model)?;
    let (params, dtype) = params(first.options.as_ref())?;
    let (engine, info) = pool.get(&first.model).await?;
    let shared = Shared {
        engine,
        model: first.model.clone(),
        params,
        deadline,
        span: tracing::Span::current(),
    };
    // Admission: the first batch is refused when the engine's queue is full; later batches
    // of an admitted stream wait for room (at most IN_FLIGHT of them are queued).
    let (ids, req) = shared.request(0, first)?;
    let reply = shared.engine.submit(req)?;
    let (tx, mut rx) = mpsc::channel::<Pending>(IN_FLIGHT);
    let _ = tx.try_send(Pending::Batch {
        index: 0,
        ids,
        reply,
    });
    tokio::spawn(read_batches(shared, inbound, tx));

    let md5 = info.md5;
    let out = async_stream::stream! {
        while let Some(p) = rx.recv().await {
            match p {
                Pending::Batch { index, ids, reply } => match reply.await {
                    Ok(Ok(e)) => yield Ok(pb::EmbedStreamResponse {
                        ids,
                        embeddings: Some(embeddings_pb(&e, dtype)),
                        model_md5: md5.clone(),
                        pooling: pooling_pb(e.pooling) as i32,
                        normalized: e.normalized,
                    }),
                    Ok(Err(e)) => {
                        let s = Status::from(EmbedderError::from(e));
                        yield Err(Status::new(s.code(), format!("message {index}: {}", s.message())));
                        break;
                    }
                    Err(_) => {
                        yield Err(Status::from(EmbedderError::from(EngineError::Stopped)));
                        break;
                    }
                },
                Pending::Failed(s) => {
                    yield Err(s);
                    break;
                }
            }
        }
    };
    Ok(Box::pin(out))
}

/// Reads the client's batches and submits them in order until the client half-closes, the
/// response side goes away, or a batch is bad (then its error is queued in its place).
async fn read_batches(
    shared: Shared,
    mut inbound: Streaming<pb::EmbedStreamRequest>,
    tx: mpsc::Sender<Pending>,
) {
    let mut index = 1;
    loop {
        let pending = match inbound.message().await {
            Ok(None) => return,
            Err(s) => Pending::Failed(s),
            Ok(Some(msg)) => {
                let submitted = match shared.request(index, msg) {
                    Ok((ids, req)) => shared
                        .engine
                        .submit_waiting(req)
                        .await
                        .map(|reply| (ids, reply))
                        .map_err(EmbedderError::from),
                    Err(e) => Err(e),
                };
                match submitted {
                    Ok((ids, reply)) => Pending::Batch { index, ids, reply },
                    Err(e) => Pending::Failed(Status::from(e)),
                }
            }
        };
        let failed = matches!(pending, Pending::Failed(_));
        if tx.send(pending).await.is_err() || failed {
            return;
        }
        index += 1;
    }
}
