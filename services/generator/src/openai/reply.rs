//! One generation's events reshaped as OpenAI's reply: one JSON body, or server-sent events
//! (a chunk per piece of text, the finish reason, usage when asked, then `data: [DONE]`).
//! Dropping the reply (the client went away) drops the gRPC stream, which stops the
//! generation between decode steps.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use llama_agent_common::openai::ApiError;
use llama_agent_proto::generator::v1 as pb;
use llama_agent_proto::generator::v1::generator_service_server::GeneratorService;
use pb::generate_response::Event as GenEvent;
use serde_json::{json, Value};

use super::Http;

/// Which of OpenAI's two APIs answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// What every piece of one reply carries, and the state streamed logprobs need.
pub struct Reply {
    pub kind: Kind,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    id: String,
    created: u64,
    /// Characters of completion text before the next chunk (text completions' `text_offset`).
    offset: usize,
}

impl Reply {
    pub fn new(kind: Kind, model: String) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Self {
            kind,
            model,
            stream: false,
            include_usage: false,
            logprobs: false,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            offset: 0,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One choice: `text` (the whole reply, or a streamed piece), its logprobs, and the
    /// finish reason (null until the last chunk).
    fn choice(
        &mut self,
        chunk: bool,
        text: String,
        logprobs: &[pb::TokenLogprob],
        finish: Option<&str>,
    ) -> Value {
        let logprobs = if self.logprobs {
            match self.kind {
                Kind::Chat => chat_logprobs(logprobs),
                Kind::Text => self.text_logprobs(logprobs),
            }
        } else {
            Value::Null
        };
        let mut c = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
        match (self.kind, chunk) {
            (Kind::Chat, false) => c["message"] = json!({"role": "assistant", "content": text}),
            // The finish chunk's delta is empty, as OpenAI's.
            (Kind::Chat, true) if finish.is_some() && text.is_empty() => c["delta"] = json!({}),
            (Kind::Chat, true) => c["delta"] = json!({"content": text}),
            (Kind::Text, _) => c["text"] = json!(text),
        }
        c
    }

    /// The legacy completions API's logprobs: parallel lists, top alternatives as maps.
    fn text_logprobs(&mut self, lps: &[pb::TokenLogprob]) -> Value {
        let mut offsets = Vec::with_capacity(lps.len());
        for t in lps {
            offsets.push(self.offset);
            self.offset += t.token.chars().count();
        }
        json!({
            "tokens": lps.iter().map(|t| &t.token).collect::<Vec<_>>(),
            "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
            "top_logprobs": lps.iter().map(|t| {
                t.top_logprobs.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>(),
            "text_offset": offsets,
        })
    }
}

fn chat_logprobs(lps: &[pb::TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top_logprobs
                .iter()
                .map(|a| json!({"token": a.token, "logprob": a.logprob, "bytes": a.bytes}))
                .collect();
            json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

fn finish_reason(d: &pb::GenerateDone) -> &'static str {
    match d.finish_reason() {
        pb::FinishReason::Length => "length",
        pb::FinishReason::ToolCalls => "tool_calls",
        // OpenAI has no word for a loop that was stopped: the answer ended early, as with a
        // stop sequence.
        pb::FinishReason::Repetition => "stop",
        // CANCELLED comes only from a passed deadline or a dropped client, and HTTP requests
        // carry no deadline: nobody reads this one.
        pb::FinishReason::Stop
        | pb::FinishReason::StopSequence
        | pb::FinishReason::Cancelled
        | pb::FinishReason::Unspecified => "stop",
    }
}

fn usage(d: &pb::GenerateDone) -> Value {
    let u = d.usage.unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// Runs `req` through the gRPC handler and answers as `reply` says. Errors before the first
/// token (a bad request, an unknown model, a full queue) are HTTP errors; a stream that
/// fails later ends with an error event in OpenAI's shape and no `[DONE]`.
pub async fn respond(
    h: &Http,
    req: pb::GenerateRequest,
    reply: Reply,
) -> Result<Response, ApiError> {
    let events = h
        .grpc
        .generate(tonic::Request::new(req))
        .await?
        .into_inner();
    if reply.stream {
        Ok(Sse::new(sse(events, reply)).into_response())
    } else {
        Ok(Json(whole(events, reply).await?).into_response())
    }
}

type Events = <crate::service::GeneratorGrpc as GeneratorService>::GenerateStream;

async fn whole(mut events: Events, mut r: Reply) -> Result<Value, ApiError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(GenEvent::Chunk(c)) => {
                text.push_str(&c.text);
                logprobs.extend(c.logprobs);
            }
            // The final message carries the calls whole.
            Some(GenEvent::ToolCall(_)) => {}
            Some(GenEvent::Done(d)) => {
                let mut choice = r.choice(false, text, &logprobs, Some(finish_reason(&d)));
                if !d.tool_calls.is_empty() && r.kind == Kind::Chat {
                    let calls: Vec<Value> = d
                        .tool_calls
                        .iter()
                        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}))
                        .collect();
                    if choice["message"]["content"] == "" {
                        choice["message"]["content"] = Value::Null;
                    }
                    choice["message"]["tool_calls"] = json!(calls);
                }
                let mut body = r.envelope(false, json!([choice]));
                body["usage"] = usage(&d);
                return Ok(body);
            }
            None => {}
        }
    }
    Err(tonic::Status::internal("the generation ended without its final message").into())
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn sse(mut events: Events, mut r: Reply) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        if r.kind == Kind::Chat {
            let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
            yield data(&r.envelope(true, role));
        }
        while let Some(ev) = events.next().await {
            match ev.map(|m| m.event) {
                Err(status) => {
                    yield data(&ApiError::from(status).body());
                    return;
                }
                Ok(Some(GenEvent::Chunk(c))) => {
                    let choice = r.choice(true, c.text, &c.logprobs, None);
                    yield data(&r.envelope(true, json!([choice])));
                }
                Ok(Some(GenEvent::ToolCall(t))) => {
                    // OpenAI's shape: the first delta of a call has its id, type and name.
                    let mut call = json!({"index": t.index, "function": {"arguments": t.arguments_delta}});
                    if !t.id.is_empty() {
                        call["id"] = json!(t.id);
                        call["type"] = json!("function");
                        call["function"]["name"] = json!(t.name);
                    }
                    let choice = json!([{"index": 0, "delta": {"tool_calls": [call]}, "logprobs": null, "finish_reason": null}]);
                    yield data(&r.envelope(true, choice));
                }
                Ok(Some(GenEvent::Done(d))) => {
                    let choice = r.choice(true, String::new(), &[], Some(finish_reason(&d)));
                    yield data(&r.envelope(true, json!([choice])));
                    if r.include_usage {
                        let mut last = r.envelope(true, json!([]));
                        last["usage"] = usage(&d);
                        yield data(&last);
                    }
                    break;
                }
                Ok(None) => {}
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}
