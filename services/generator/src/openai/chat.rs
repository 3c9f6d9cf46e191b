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
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    /// Null in an assistant message that only calls tools.
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Vec<CallIn>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// A call in an assistant message: OpenAI's arguments are JSON text.
#[derive(Deserialize)]
struct CallIn {
    #[serde(default)]
    id: String,
    function: FunctionIn,
}

#[derive(Deserialize)]
struct FunctionIn {
    name: String,
    #[serde(default)]
    arguments: String,
}

/// A `tools` entry: `{"type": "function", "function": {...}}`.
#[derive(Deserialize)]
struct ToolIn {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionDef>,
}

#[derive(Deserialize)]
struct FunctionDef {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<Value>,
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
            Ok(pb::ChatMessage {
                role: m.role,
                content: content(i, m.content)?,
                tool_calls: m
                    .tool_calls
                    .into_iter()
                    .map(|c| pb::ToolCall {
                        id: c.id,
                        name: c.function.name,
                        arguments_json: c.function.arguments,
                    })
                    .collect(),
                tool_call_id: m.tool_call_id.unwrap_or_default(),
                name: m.name.unwrap_or_default(),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(pb::ChatMessages { messages })
}

fn tools(given: Vec<Value>) -> Result<Vec<pb::Tool>, ApiError> {
    given
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let t: ToolIn = serde_json::from_value(v).map_err(|e| {
                ApiError::invalid(format!("tools[{i}] is not a function tool: {e}"))
            })?;
            match (t.kind.as_str(), t.function) {
                ("function", Some(f)) => Ok(pb::Tool {
                    name: f.name,
                    description: f.description,
                    parameters_json: f.parameters.map(|p| p.to_string()).unwrap_or_default(),
                }),
                (kind, _) => Err(ApiError::invalid(format!(
                    "tools[{i}] has type \"{}\": only \"function\" tools (with a function) are supported",
                    truncate(kind, 32)
                ))),
            }
        })
        .collect()
}

/// `"auto"`, `"none"`, `"required"` or `{"type": "function", "function": {"name": ..}}`.
fn tool_choice(v: Option<Value>) -> Result<Option<pb::ToolChoice>, ApiError> {
    use pb::tool_choice::Mode;
    let choice = |mode: Mode, function: &str| {
        Some(pb::ToolChoice {
            mode: mode as i32,
            function: function.into(),
        })
    };
    Ok(match &v {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => choice(Mode::Auto, ""),
            "none" => choice(Mode::None, ""),
            "required" => choice(Mode::Required, ""),
            other => {
                return Err(ApiError::invalid(format!(
                    "tool_choice \"{}\" is not auto, none, required or a function",
                    truncate(other, 32)
                )))
            }
        },
        Some(Value::Object(o)) => match o.get("function").and_then(|f| f.get("name")) {
            Some(Value::String(name)) => choice(Mode::Function, name),
            _ => return Err(ApiError::invalid(
                "tool_choice object needs {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )),
        },
        Some(_) => return Err(ApiError::invalid("tool_choice is a string or an object")),
    })
}

pub async fn completions(
    State(h): State<Http>,
    ApiJson(body): ApiJson<ChatBody>,
) -> Result<Response, ApiError> {
    let mut req = body.params.request()?;
    req.input = Some(pb::generate_request::Input::Chat(messages(body.messages)?));
    req.tools = tools(body.tools)?;
    req.tool_choice = tool_choice(body.tool_choice)?;
    req.parallel_tool_calls = body.parallel_tool_calls;
    req.logprobs = body.logprobs;
    req.top_logprobs = body.top_logprobs.unwrap_or(0);
    let mut reply = Reply::new(Kind::Chat, body.params.model.clone());
    reply.stream = body.params.stream;
    reply.include_usage = body.params.include_usage();
    reply.logprobs = body.logprobs;
    respond(&h, req, reply).await
}
