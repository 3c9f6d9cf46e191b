//! The gRPC face of the generator: validates, finds the model, streams engine events.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use llama_agent_engine::generate::{
    ChatMessage, FinishReason, GenDone, GenEvent, GenRequest, GenerationEngine, Prompt, Sampling,
};
use llama_agent_engine::EngineError;
use llama_agent_models::{info, ModelPool};
use llama_agent_proto::generator::v1 as pb;
use llama_agent_proto::generator::v1::generator_service_server::GeneratorService;
use tonic::{Request, Response, Status};

/// Bounds on request fields: generous for real use, small enough that a request cannot make
/// the engine do unbounded work.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// The generator's error type: the one every inference service shares (one mapping to gRPC).
pub use llama_agent_models::ServiceError as GeneratorError;

pub struct GeneratorGrpc {
    pool: Arc<ModelPool<GenerationEngine>>,
}

impl GeneratorGrpc {
    pub fn new(pool: Arc<ModelPool<GenerationEngine>>) -> Self {
        Self { pool }
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GeneratorService for GeneratorGrpc {
    type GenerateStream = GenStream;

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let deadline = llama_agent_common::grpc::deadline(req.metadata());
        let r = req.into_inner();
        let (prompt, sampling, stop) = validate(&r)?;
        let (engine, info) = self
            .pool
            .get(&r.model)
            .await
            .map_err(GeneratorError::from)?;
        if r.max_tokens > engine.ctx_per_seq() {
            return Err(GeneratorError::Invalid(format!(
                "max_tokens {} is more than the context of {} tokens per sequence",
                r.max_tokens,
                engine.ctx_per_seq()
            ))
            .into());
        }
        let mut events = engine
            .submit(GenRequest {
                prompt,
                sampling,
                max_tokens: r.max_tokens,
                stop,
                deadline,
                span: tracing::Span::current(),
            })
            .map_err(GeneratorError::from)?;
        // The first event tells whether the engine accepted the request (prompt fits, template
        // exists): a rejection is the RPC's status, not a half-open stream.
        let first = match events.recv().await {
            Some(GenEvent::Failed(e)) => return Err(GeneratorError::from(e).into()),
            Some(ev) => ev,
            None => return Err(GeneratorError::from(EngineError::Stopped).into()),
        };
        let (md5, reference) = (info.md5, info.reference);
        let stream = async_stream::stream! {
            // Holding the engine keeps the model loaded while this stream lives.
            let _engine = engine;
            let mut next = Some(first);
            while let Some(ev) = next.take() {
                match ev {
                    GenEvent::Chunk { text, tokens } => {
                        yield Ok(pb::GenerateResponse {
                            event: Some(pb::generate_response::Event::Chunk(pb::TextChunk { text, token_ids: tokens })),
                        });
                    }
                    GenEvent::Done(done) => {
                        yield Ok(done_message(&done, &md5, &reference));
                        break;
                    }
                    GenEvent::Failed(e) => {
                        yield Err(Status::from(GeneratorError::from(e)));
                        break;
                    }
                }
                next = events.recv().await;
                if next.is_none() {
                    yield Err(Status::from(GeneratorError::from(EngineError::Stopped)));
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = req.into_inner();
        require_model(&r.model)?;
        let (engine, info) = self
            .pool
            .get(&r.model)
            .await
            .map_err(GeneratorError::from)?;
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
        let (engine, info) = self
            .pool
            .get(&r.model)
            .await
            .map_err(GeneratorError::from)?;
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
        let (engine, info) = self
            .pool
            .get(&r.model)
            .await
            .map_err(GeneratorError::from)?;
        let o = engine.occupancy();
        Ok(Response::new(pb::GetModelInfoResponse {
            model: Some(info::served_model(engine.meta(), &info, was_loaded)),
            has_chat_template: engine.meta().has_chat_template,
            slots_total: o.slots_total,
            slots_in_use: o.slots_in_use,
            context_length_served: o.ctx_per_seq,
            kv_cells_used: o.kv_cells_used,
            kv_cells_total: o.kv_cells_total,
        }))
    }
}

fn require_model(model: &str) -> Result<(), GeneratorError> {
    if model.trim().is_empty() {
        return Err(GeneratorError::Invalid("model is required".into()));
    }
    Ok(())
}

fn done_message(d: &GenDone, md5: &str, reference: &str) -> pb::GenerateResponse {
    let finish = match d.finish {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::StopSequence => pb::FinishReason::StopSequence,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    };
    pb::GenerateResponse {
        event: Some(pb::generate_response::Event::Done(pb::GenerateDone {
            finish_reason: finish as i32,
            usage: Some(pb::Usage {
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
            }),
            timings: Some(pb::Timings {
                queue_ms: d.queue_ms,
                ttft_ms: d.ttft_ms,
                prompt_ms: d.prompt_ms,
                decode_ms: d.decode_ms,
                decode_tokens_per_second: d.decode_tokens_per_second(),
            }),
            model_md5: md5.to_string(),
            model_reference: reference.to_string(),
        })),
    }
}

/// Checks every field before any model is touched.
fn validate(r: &pb::GenerateRequest) -> Result<(Prompt, Sampling, Vec<String>), GeneratorError> {
    let bad = |m: String| Err(GeneratorError::Invalid(m));
    if r.model.trim().is_empty() {
        return bad("model is required".into());
    }
    let prompt = match &r.input {
        None => return bad("give a prompt or chat messages".into()),
        Some(pb::generate_request::Input::Prompt(p)) if p.is_empty() => {
            return bad("the prompt is empty".into())
        }
        Some(pb::generate_request::Input::Prompt(p)) => Prompt::Text(p.clone()),
        Some(pb::generate_request::Input::Chat(c)) => {
            if c.messages.is_empty() {
                return bad("chat has no messages".into());
            }
            if let Some(m) = c.messages.iter().find(|m| m.role.trim().is_empty()) {
                return bad(format!(
                    "a chat message has no role (content {:?})",
                    m.content
                ));
            }
            Prompt::Chat {
                messages: c
                    .messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
                template: Some(r.chat_template.clone()).filter(|t| !t.is_empty()),
            }
        }
    };
    let s = r.sampling.unwrap_or_default();
    let d = Sampling::default();
    let in_range = |name: &str,
                    v: Option<f32>,
                    lo: f32,
                    hi: f32,
                    default: f32|
     -> Result<f32, GeneratorError> {
        match v {
            None => Ok(default),
            Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
            Some(x) => Err(GeneratorError::Invalid(format!(
                "{name} {x} is outside [{lo}, {hi}]"
            ))),
        }
    };
    let sampling = Sampling {
        temperature: in_range("temperature", s.temperature, 0.0, 10.0, d.temperature)?,
        top_k: match s.top_k {
            None => d.top_k,
            Some(k) if k <= 1_000_000 => k as i32,
            Some(k) => return bad(format!("top_k {k} is more than 1000000")),
        },
        top_p: positive("top_p", in_range("top_p", s.top_p, 0.0, 1.0, d.top_p)?)?,
        min_p: in_range("min_p", s.min_p, 0.0, 1.0, d.min_p)?,
        repeat_penalty: positive(
            "repeat_penalty",
            in_range(
                "repeat_penalty",
                s.repeat_penalty,
                0.0,
                10.0,
                d.repeat_penalty,
            )?,
        )?,
        repeat_last_n: match s.repeat_last_n {
            None => d.repeat_last_n,
            Some(n) if n <= 1 << 20 => n as i32,
            Some(n) => return bad(format!("repeat_last_n {n} is too large")),
        },
        // llama.cpp seeds are 32-bit; fold so every 64-bit seed still means one stream.
        seed: s.seed.map_or_else(rand_seed, |x| (x ^ (x >> 32)) as u32),
    };
    if r.stop.len() > MAX_STOPS {
        return bad(format!(
            "at most {MAX_STOPS} stop sequences ({} given)",
            r.stop.len()
        ));
    }
    if let Some(s) = r
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return bad(format!(
            "stop sequence {s:?} must be 1 to {MAX_STOP_BYTES} bytes"
        ));
    }
    Ok((prompt, sampling, r.stop.clone()))
}

fn positive(name: &str, v: f32) -> Result<f32, GeneratorError> {
    if v > 0.0 {
        Ok(v)
    } else {
        Err(GeneratorError::Invalid(format!(
            "{name} must be greater than 0"
        )))
    }
}

fn rand_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}
