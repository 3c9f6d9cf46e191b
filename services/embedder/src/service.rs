//! The gRPC face of the embedder: validates, finds the model, hands texts to its engine.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use llama_agent_engine::embed::{EmbedRequest, EmbeddingEngine, Pooling};
use llama_agent_engine::EngineError;
use llama_agent_models::{info, ModelPool};
use llama_agent_proto::embedder::v1 as pb;
use llama_agent_proto::embedder::v1::embedder_service_server::EmbedderService;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{check_count, embeddings_pb, params, pooling_pb};
use crate::EmbedderError;

pub struct EmbedderGrpc {
    pool: Arc<ModelPool<EmbeddingEngine>>,
}

impl EmbedderGrpc {
    pub fn new(pool: Arc<ModelPool<EmbeddingEngine>>) -> Self {
        Self { pool }
    }
}

pub(crate) fn require_model(model: &str) -> Result<(), EmbedderError> {
    if model.trim().is_empty() {
        return Err(EmbedderError::Invalid("model is required".into()));
    }
    Ok(())
}

type EmbedStream = Pin<Box<dyn Stream<Item = Result<pb::EmbedStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EmbedderService for EmbedderGrpc {
    type EmbedStreamStream = EmbedStream;

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model, texts = req.get_ref().texts.len()))]
    async fn embed(
        &self,
        req: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let deadline = llama_agent_common::grpc::deadline(req.metadata());
        let r = req.into_inner();
        require_model(&r.model)?;
        check_count(r.texts.len(), "the request")?;
        let (params, dtype) = params(r.options.as_ref())?;
        let (engine, info) = self.pool.get(&r.model).await.map_err(EmbedderError::from)?;
        let reply = engine
            .submit(EmbedRequest {
                texts: r.texts,
                params,
                deadline,
                span: tracing::Span::current(),
            })
            .map_err(EmbedderError::from)?;
        let out = reply
            .await
            .map_err(|_| EmbedderError::from(EngineError::Stopped))?
            .map_err(EmbedderError::from)?;
        Ok(Response::new(pb::EmbedResponse {
            embeddings: Some(embeddings_pb(&out, dtype)),
            model_md5: info.md5,
            pooling: pooling_pb(out.pooling) as i32,
            normalized: out.normalized,
        }))
    }

    #[tracing::instrument(skip_all, fields(model = tracing::field::Empty))]
    async fn embed_stream(
        &self,
        req: Request<Streaming<pb::EmbedStreamRequest>>,
    ) -> Result<Response<EmbedStream>, Status> {
        let deadline = llama_agent_common::grpc::deadline(req.metadata());
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its first message"))?;
        tracing::Span::current().record("model", first.model.as_str());
        let out = crate::stream::start(&self.pool, first, inbound, deadline).await?;
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = req.into_inner();
        require_model(&r.model)?;
        let (engine, info) = self.pool.get(&r.model).await.map_err(EmbedderError::from)?;
        let tokenizer = engine.tokenizer().clone();
        let (ids, pieces) = info::tokenize(
            tokenizer,
            r.text,
            r.add_special,
            r.parse_special,
            r.with_pieces,
        )
        .await?;
        Ok(Response::new(pb::TokenizeResponse {
            ids,
            pieces,
            model_md5: info.md5,
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let r = req.into_inner();
        require_model(&r.model)?;
        let (engine, info) = self.pool.get(&r.model).await.map_err(EmbedderError::from)?;
        let text = info::detokenize(engine.tokenizer().clone(), r.ids, r.render_special).await?;
        Ok(Response::new(pb::DetokenizeResponse {
            text,
            model_md5: info.md5,
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn get_model_info(
        &self,
        req: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::GetModelInfoResponse>, Status> {
        let r = req.into_inner();
        require_model(&r.model)?;
        let was_loaded = self.pool.is_loaded(&r.model);
        let (engine, info) = self.pool.get(&r.model).await.map_err(EmbedderError::from)?;
        let serving = engine.serving();
        Ok(Response::new(pb::GetModelInfoResponse {
            model: Some(info::served_model(engine.meta(), &info, was_loaded)),
            dimensions: engine.dim() as u32,
            pooling: pooling_pb(engine.pooling()) as i32,
            max_tokens_per_text: engine.max_tokens_per_text(),
            causal: serving.causal,
            max_batch_tokens: serving.max_batch_tokens,
            max_texts_per_batch: serving.max_seqs_per_batch,
            contexts: serving.contexts,
            reranker: engine.pooling() == Pooling::Rank,
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model, documents = req.get_ref().documents.len()))]
    async fn rerank(
        &self,
        req: Request<pb::RerankRequest>,
    ) -> Result<Response<pb::RerankResponse>, Status> {
        let deadline = llama_agent_common::grpc::deadline(req.metadata());
        let out = crate::rerank::rerank(&self.pool, req.into_inner(), deadline).await?;
        Ok(Response::new(out))
    }
}
