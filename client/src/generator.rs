//! Client of llama_agent.generator.v1.GeneratorService.

use std::sync::Arc;

use crate::affinity::{prefix_key, prompt_prefix, Warmth, CHAT_PREFIX_MESSAGES};
use crate::balance::watched;
use crate::replicas::ReplicaSet;
use futures::{Stream, StreamExt};
use llama_agent_proto::generator::v1 as pb;
use llama_agent_proto::generator::v1::generator_service_client::GeneratorServiceClient;

use crate::{ClientError, RetryPolicy};

#[derive(Clone)]
pub struct GeneratorClient {
    replicas: Arc<ReplicaSet>,
    retry: RetryPolicy,
}

/// The whole answer of one Generate stream, for callers that do not stream.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<i32>,
    /// One per token id when the request asked for `logprobs`.
    pub logprobs: Vec<pb::TokenLogprob>,
    /// The tool calls the model made, assembled from their deltas (finish `TOOL_CALLS`).
    pub tool_calls: Vec<pb::ToolCall>,
    pub done: pb::GenerateDone,
}

impl GeneratorClient {
    crate::call::constructors!();

    fn over(replicas: Arc<ReplicaSet>) -> Self {
        Self {
            replicas,
            retry: RetryPolicy::default(),
        }
    }

    /// Generate as a stream of chunks ending with the done message. Opening the stream is
    /// retried on UNAVAILABLE and RESOURCE_EXHAUSTED, on another replica (nothing was
    /// generated yet); a stream that breaks midway is reported, never replayed. The replica
    /// that served the same conversation opening is preferred (its prompt cache holds it),
    /// then one that served the model. Dropping the stream cancels the generation.
    pub async fn generate_stream(
        &self,
        req: pb::GenerateRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<impl Stream<Item = Result<pb::GenerateResponse, ClientError>>, ClientError> {
        let warmth = generate_warmth(&req);
        let (stream, guard) = self
            .retry
            .spread(&self.replicas, &warmth, |t| {
                let mut request = tonic::Request::new(req.clone());
                if let Some(d) = deadline {
                    request.set_timeout(d);
                }
                async move { GeneratorServiceClient::new(t).generate(request).await }
            })
            .await?;
        Ok(watched(stream.into_inner(), guard).map(|r| r.map_err(ClientError::from)))
    }

    /// Generate to the end; `on_chunk` sees each chunk as it arrives.
    pub async fn generate(
        &self,
        req: pb::GenerateRequest,
        mut on_chunk: impl FnMut(&pb::TextChunk),
    ) -> Result<Generated, ClientError> {
        let mut stream = std::pin::pin!(self.generate_stream(req, None).await?);
        let mut out = Generated::default();
        while let Some(msg) = stream.next().await {
            match msg?.event {
                Some(pb::generate_response::Event::Chunk(c)) => {
                    on_chunk(&c);
                    out.text.push_str(&c.text);
                    out.token_ids.extend_from_slice(&c.token_ids);
                    out.logprobs.extend(c.logprobs);
                }
                Some(pb::generate_response::Event::ToolCall(d)) => {
                    add_tool_call_delta(&mut out.tool_calls, d)
                }
                Some(pb::generate_response::Event::Done(d)) => {
                    out.done = d;
                    return Ok(out);
                }
                None => {}
            }
        }
        Err(ClientError::Incomplete)
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
                GeneratorServiceClient::new(t).tokenize(r).await
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
                GeneratorServiceClient::new(t).detokenize(r).await
            })
            .await
    }

    /// The prompt a chat becomes with the model's (or the named) template, and its tokens.
    pub async fn apply_chat_template(
        &self,
        req: pb::ApplyChatTemplateRequest,
    ) -> Result<pb::ApplyChatTemplateResponse, ClientError> {
        let warmth = Warmth::model(&req.model);
        self.retry
            .unary(&self.replicas, &warmth, req, |t, r| async move {
                GeneratorServiceClient::new(t).apply_chat_template(r).await
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
                GeneratorServiceClient::new(t).get_model_info(r).await
            })
            .await
    }
}

/// Adds a streamed piece of a tool call to `calls`: the first delta of a call (its index is
/// the next one) opens it with its id and name, later ones extend its arguments. A delta for
/// an index past the next is a generator bug; it opens the next call rather than leave gaps.
pub fn add_tool_call_delta(calls: &mut Vec<pb::ToolCall>, d: pb::ToolCallDelta) {
    let i = d.index as usize;
    if i >= calls.len() {
        calls.push(pb::ToolCall::default());
    }
    let i = i.min(calls.len() - 1);
    let call = &mut calls[i];
    if !d.id.is_empty() {
        call.id = d.id;
    }
    if !d.name.is_empty() {
        call.name = d.name;
    }
    call.arguments_json.push_str(&d.arguments_delta);
}

/// What makes a generator warm for `req`: its model, and its conversation's opening (the
/// first messages, or the first bytes of a raw prompt) whose prompt cache it may still hold.
fn generate_warmth(req: &pb::GenerateRequest) -> Warmth {
    use pb::generate_request::Input;
    let prefix = match &req.input {
        Some(Input::Prompt(p)) => prompt_prefix(p).map(|p| prefix_key(&req.model, [p])),
        Some(Input::Chat(c)) if c.messages.len() >= CHAT_PREFIX_MESSAGES => Some(prefix_key(
            &req.model,
            c.messages[..CHAT_PREFIX_MESSAGES]
                .iter()
                .flat_map(|m| [m.role.as_str(), m.content.as_str()]),
        )),
        _ => None,
    };
    Warmth {
        prefix,
        ..Warmth::model(&req.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(turns: &[(&str, &str)]) -> pb::GenerateRequest {
        pb::GenerateRequest {
            model: "m".into(),
            input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                messages: turns
                    .iter()
                    .map(|(r, c)| pb::ChatMessage {
                        role: r.to_string(),
                        content: c.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn tool_call_deltas_assemble_into_whole_calls() {
        let d = |index: u32, id: &str, name: &str, args: &str| pb::ToolCallDelta {
            index,
            id: id.into(),
            name: name.into(),
            arguments_delta: args.into(),
        };
        let mut calls = Vec::new();
        for delta in [
            d(0, "call_a", "get_time", ""),
            d(0, "", "", "{\"timezone\": "),
            d(1, "call_b", "list_tables", "{}"),
            d(0, "", "", "\"UTC\"}"),
        ] {
            add_tool_call_delta(&mut calls, delta);
        }
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("call_a", "get_time")
        );
        assert_eq!(calls[0].arguments_json, "{\"timezone\": \"UTC\"}");
        assert_eq!(calls[1].arguments_json, "{}");
    }

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        let first = chat(&[("system", "be brief"), ("user", "hi")]);
        let later = chat(&[
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "hello"),
            ("user", "more"),
        ]);
        let other = chat(&[("system", "be brief"), ("user", "bye")]);
        fn key(r: &pb::GenerateRequest) -> Option<u64> {
            generate_warmth(r).prefix
        }
        assert!(key(&first).is_some());
        assert_eq!(key(&first), key(&later));
        assert_ne!(key(&first), key(&other));
        assert_eq!(key(&chat(&[("user", "hi")])), None);
        let long = "x".repeat(1000);
        let prompt = |p: &str| pb::GenerateRequest {
            model: "m".into(),
            input: Some(pb::generate_request::Input::Prompt(p.into())),
            ..Default::default()
        };
        assert_eq!(
            key(&prompt(&long)),
            key(&prompt(&format!("{long} and more")))
        );
        assert_eq!(key(&prompt("short")), None);
        assert_eq!(generate_warmth(&first).model.as_deref(), Some("m"));
    }
}
