//! `/v1/chat/completions`: OpenAI's messages, rendered by the model's chat template.

use axum::extract::State;
use axum::response::Response;
use llama_agent_common::openai::{ApiError, ApiJson};
use llama_agent_engine::text::truncate;
use llama_agent_proto::generator::v1 as pb;
use serde::Deserialize;
use serde_json::Value;

use super::params::Params;
use super::reply::{respond, Kind, Reply};
use super::Http;

#[derive(Deserialize)]
pub struct ChatBody {
    #[serde(flatten)]
    params: Params,
    messages: Vec<Message>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    /// Null in an assistant message that only calls tools.
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Vec<Value>,
}

/// A message's content: text, or a list of parts of which only text parts are read.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

fn content(i: usize, c: Option<Content>) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (kind, _) => Err(ApiError::invalid(format!(
                    "message {i} has a content part of type \"{}\": only text parts are supported",
                    truncate(kind, 32)
                ))),
            })
            .collect(),
    }
}

fn messages(given: Vec<Message>) -> Result<pb::ChatMessages, ApiError> {
    let messages = given
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !m.tool_calls.is_empty() {
                return Err(ApiError::invalid(format!(
                    "message {i} carries tool_calls: tool calling is not supported yet"
                )));
            }
            Ok(pb::ChatMessage {
                role: m.role,
                content: content(i, m.content)?,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(pb::ChatMessages { messages })
}

pub async fn completions(
    State(h): State<Http>,
    ApiJson(body): ApiJson<ChatBody>,
) -> Result<Response, ApiError> {
    let tools_off = matches!(&body.tool_choice, Some(Value::String(s)) if s == "none");
    if !body.tools.is_empty() && !tools_off {
        return Err(ApiError::invalid(
            "tools are not supported yet: send no tools, or tool_choice \"none\"",
        ));
    }
    let mut req = body.params.request()?;
    req.input = Some(pb::generate_request::Input::Chat(messages(body.messages)?));
    req.logprobs = body.logprobs;
    req.top_logprobs = body.top_logprobs.unwrap_or(0);
    let mut reply = Reply::new(Kind::Chat, body.params.model.clone());
    reply.stream = body.params.stream;
    reply.include_usage = body.params.include_usage();
    reply.logprobs = body.logprobs;
    respond(&h, req, reply).await
}
