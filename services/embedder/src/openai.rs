//! The embedder's OpenAI-compatible HTTP front: `/v1/embeddings`, `/v1/rerank` (the shape
//! llama.cpp's server and Jina use) and `/v1/models`. Each request goes through the gRPC
//! service's own handlers, so validation, limits and errors are the gRPC side's.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use llama_agent_common::openai::{ApiError, ApiJson};
use llama_agent_engine::embed::EmbeddingEngine;
use llama_agent_models::ModelPool;
use llama_agent_proto::embedder::v1 as pb;
use llama_agent_proto::embedder::v1::embedder_service_server::EmbedderService;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::service::EmbedderGrpc;

#[derive(Clone)]
struct Http {
    grpc: Arc<EmbedderGrpc>,
    pool: Arc<ModelPool<EmbeddingEngine>>,
}

pub fn router(pool: Arc<ModelPool<EmbeddingEngine>>) -> Router {
    let state = Http {
        grpc: Arc::new(EmbedderGrpc::new(Arc::clone(&pool))),
        pool,
    };
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/rerank", post(rerank))
        .route("/v1/models", get(models))
        .with_state(state)
}

/// OpenAI's `input`: one text or a list of them. Token ids are part of OpenAI's API but not
/// of ours: they are refused by name rather than misread.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

fn token_input(n: usize) -> ApiError {
    ApiError::invalid(format!(
        "input as token ids ({n} given) is not supported: send text (a string or a list of strings)"
    ))
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Input,
    /// `float` (default) or `base64` (little-endian f32, what OpenAI's SDKs ask for).
    #[serde(default)]
    encoding_format: Option<String>,
    /// Matryoshka truncation, renormalised.
    #[serde(default)]
    dimensions: Option<u32>,
}

async fn embeddings(
    State(h): State<Http>,
    ApiJson(body): ApiJson<EmbeddingsBody>,
) -> Result<Json<Value>, ApiError> {
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => return Err(ApiError::invalid("encoding_format must be float or base64")),
    };
    let texts = match body.input {
        Input::Text(t) => vec![t],
        Input::Texts(t) => t,
        Input::Tokens(ids) => return Err(token_input(ids.len())),
        Input::TokenLists(lists) => return Err(token_input(lists.len())),
    };
    let req = pb::EmbedRequest {
        model: body.model.clone(),
        texts,
        options: Some(pb::EmbedOptions {
            dimensions: body.dimensions.unwrap_or(0),
            dtype: pb::DType::F32 as i32,
            ..Default::default()
        }),
    };
    let r = h.grpc.embed(tonic::Request::new(req)).await?.into_inner();
    let e = r
        .embeddings
        .ok_or_else(|| ApiError::from(tonic::Status::internal("no embeddings in the reply")))?;
    let row_bytes = e.dim as usize * 4;
    let data: Vec<Value> = e
        .data
        .chunks_exact(row_bytes.max(1))
        .enumerate()
        .map(|(i, row)| {
            let embedding = if base64 {
                json!(base64::engine::general_purpose::STANDARD.encode(row))
            } else {
                let v: Vec<f32> = row
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = e.token_counts.iter().map(|&n| u64::from(n)).sum();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

#[derive(Deserialize)]
struct RerankBody {
    model: String,
    query: String,
    documents: Vec<String>,
    #[serde(default)]
    top_n: Option<u32>,
    #[serde(default)]
    return_documents: bool,
}

async fn rerank(
    State(h): State<Http>,
    ApiJson(body): ApiJson<RerankBody>,
) -> Result<Json<Value>, ApiError> {
    let req = pb::RerankRequest {
        model: body.model.clone(),
        query: body.query,
        documents: body.documents,
        top_n: body.top_n,
        return_documents: body.return_documents,
        ..Default::default()
    };
    let r = h.grpc.rerank(tonic::Request::new(req)).await?.into_inner();
    let results: Vec<Value> = r
        .results
        .into_iter()
        .map(|x| {
            let mut v = json!({"index": x.index, "relevance_score": x.logit});
            if let Some(d) = x.document {
                v["document"] = json!({"text": d});
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "model": body.model,
        "results": results,
        "usage": {"prompt_tokens": r.prompt_tokens, "total_tokens": r.prompt_tokens},
    })))
}

async fn models(State(h): State<Http>) -> Json<Value> {
    llama_agent_common::openai::model_list(h.pool.loaded().into_iter().map(|m| m.reference))
}
