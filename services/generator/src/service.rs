//! The gRPC face of the generator: validates, finds the model, streams engine events.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use llama_agent_engine::generate::{
    FinishReason, GenDone, GenEvent, GenRequest, GenerationEngine, Prompt, TemplateSource,
    TokenLogprob,
};
use llama_agent_engine::EngineError;
use llama_agent_models::{info, ModelPool};
use llama_agent_proto::generator::v1 as pb;
use llama_agent_proto::generator::v1::generator_service_server::GeneratorService;
use tonic::{Request, Response, Status};

use crate::validate;

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
        let checked = validate::request(&r)?;
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
                prompt: checked.prompt,
                sampling: checked.sampling,
                max_tokens: r.max_tokens,
                stop: checked.stop,
                constraint: checked.constraint,
                logprobs: checked.logprobs,
                cache_prompt: checked.cache_prompt,
                tools: checked.tools,
                stop_on_repetition: r.stop_on_repetition,
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
                    GenEvent::Chunk { text, tokens, logprobs } => {
                        let logprobs = logprobs.into_iter().map(token_logprob).collect();
                        yield Ok(pb::GenerateResponse {
                            event: Some(pb::generate_response::Event::Chunk(pb::TextChunk { text, token_ids: tokens, logprobs })),
                        });
                    }
                    GenEvent::ToolCall(d) => {
                        yield Ok(pb::GenerateResponse {
                            event: Some(pb::generate_response::Event::ToolCall(pb::ToolCallDelta {
                                index: d.index,
                                id: d.id,
                                name: d.name,
                                arguments_delta: d.arguments,
                            })),
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
    async fn apply_chat_template(
        &self,
        req: Request<pb::ApplyChatTemplateRequest>,
    ) -> Result<Response<pb::ApplyChatTemplateResponse>, Status> {
        let r = req.into_inner();
        require_model(&r.model)?;
        let chat = r.chat.unwrap_or_default();
        let Prompt::Chat { messages, template } =
            validate::chat(&chat, &r.chat_template, &r.chat_template_jinja)?
        else {
            unreachable!("validate::chat returns a chat");
        };
        // Rendered as Generate renders them (a choice does not change the prompt).
        let tools = crate::tools::spec_of(&r.tools, None, false)?;
        let (engine, info) = self
            .pool
            .get(&r.model)
            .await
            .map_err(GeneratorError::from)?;
        let renderer = engine.chat().clone();
        let tokenizer = engine.tokenizer().clone();
        // Rendering runs the template: a blocking task, not the async runtime.
        let rendered = tokio::task::spawn_blocking(move || {
            let (prompt, _) = renderer.render_with_tools(&messages, &template, tools.as_ref())?;
            let token_ids = tokenizer.tokenize(&prompt, true, true);
            Ok::<_, EngineError>((prompt, token_ids))
        })
        .await
        .map_err(|_| GeneratorError::from(EngineError::Stopped))?;
        let (prompt, token_ids) = rendered.map_err(GeneratorError::from)?;
        Ok(Response::new(pb::ApplyChatTemplateResponse {
            prompt,
            token_ids,
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
            chat_template_source: match engine.chat().source() {
                TemplateSource::File => "file",
                TemplateSource::Gguf => "gguf",
                TemplateSource::GgufBuiltinMatch => "gguf (llama.cpp built-in match)",
                TemplateSource::None => "",
            }
            .into(),
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
        FinishReason::ToolCalls => pb::FinishReason::ToolCalls,
        FinishReason::Repetition => pb::FinishReason::Repetition,
    };
    pb::GenerateResponse {
        event: Some(pb::generate_response::Event::Done(pb::GenerateDone {
            finish_reason: finish as i32,
            usage: Some(pb::Usage {
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                cached_prompt_tokens: d.cached_prompt_tokens,
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
            tool_calls: d
                .tool_calls
                .iter()
                .map(|c| pb::ToolCall {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments_json: c.arguments.clone(),
                })
                .collect(),
        })),
    }
}

fn token_logprob(t: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        id: t.id,
        token: String::from_utf8_lossy(&t.bytes).into_owned(),
        bytes: t.bytes,
        logprob: t.logprob,
        top_logprobs: t
            .top
            .into_iter()
            .map(|(id, bytes, logprob)| pb::TopLogprob {
                id,
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob,
            })
            .collect(),
    }
}
