//! The generator's OpenAI-compatible HTTP front: `/v1/chat/completions` and `/v1/completions`
//! (streamed as server-sent events or whole) and `/v1/models`. A request becomes the
//! GenerateRequest it means and goes through the gRPC service's own handler, so validation,
//! limits, admission and errors are the gRPC side's; the reply is reshaped as OpenAI's.

mod chat;
mod completions;
mod params;
mod reply;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use llama_agent_engine::generate::GenerationEngine;
use llama_agent_models::ModelPool;
use serde_json::Value;

use crate::service::GeneratorGrpc;

#[derive(Clone)]
struct Http {
    grpc: Arc<GeneratorGrpc>,
    pool: Arc<ModelPool<GenerationEngine>>,
}

pub fn router(pool: Arc<ModelPool<GenerationEngine>>) -> Router {
    let state = Http {
        grpc: Arc::new(GeneratorGrpc::new(Arc::clone(&pool))),
        pool,
    };
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models))
        .with_state(state)
}

async fn models(State(h): State<Http>) -> Json<Value> {
    llama_agent_common::openai::model_list(h.pool.loaded().into_iter().map(|m| m.reference))
}
