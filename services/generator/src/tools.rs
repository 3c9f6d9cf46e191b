//! A request's tools and the tool calls in its messages, checked and in the engine's terms.

use llama_agent_engine::text::truncate;
use llama_agent_engine::tools::{Tool, ToolCall, ToolChoice, ToolSpec};
use llama_agent_proto::generator::v1 as pb;

use crate::service::GeneratorError;

/// Calls one assistant message may carry: more than any model makes in one answer.
const MAX_CALLS_PER_MESSAGE: usize = 128;
const MAX_ID_BYTES: usize = 128;
const QUOTE_BYTES: usize = 64;

fn bad<T>(m: String) -> Result<T, GeneratorError> {
    Err(GeneratorError::Invalid(m))
}

/// The request's tools, or None when it has none (and no tool_choice that needs them).
pub fn spec(r: &pb::GenerateRequest) -> Result<Option<ToolSpec>, GeneratorError> {
    spec_of(
        &r.tools,
        r.tool_choice.as_ref(),
        r.parallel_tool_calls.unwrap_or(false),
    )
}

pub fn spec_of(
    tools: &[pb::Tool],
    choice: Option<&pb::ToolChoice>,
    parallel: bool,
) -> Result<Option<ToolSpec>, GeneratorError> {
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(c) => match pb::tool_choice::Mode::try_from(c.mode) {
            Ok(pb::tool_choice::Mode::Unspecified | pb::tool_choice::Mode::Auto) => {
                ToolChoice::Auto
            }
            Ok(pb::tool_choice::Mode::None) => ToolChoice::None,
            Ok(pb::tool_choice::Mode::Required) => ToolChoice::Required,
            Ok(pb::tool_choice::Mode::Function) if c.function.is_empty() => {
                return bad("tool_choice FUNCTION needs the function's name".into())
            }
            Ok(pb::tool_choice::Mode::Function) => ToolChoice::Function(c.function.clone()),
            Err(_) => {
                return bad(format!(
                    "tool_choice mode {} is not one of the enum's",
                    c.mode
                ))
            }
        },
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Auto | ToolChoice::None) {
        return Ok(None);
    }
    let tools = tools
        .iter()
        .map(|t| Tool::new(&t.name, &t.description, &t.parameters_json))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GeneratorError::Invalid(e.to_string()))?;
    ToolSpec::new(tools, choice, parallel)
        .map(Some)
        .map_err(|e| GeneratorError::Invalid(e.to_string()))
}

/// An assistant message's calls: ids bounded, names given, arguments a JSON object.
pub fn message_calls(i: usize, m: &pb::ChatMessage) -> Result<Vec<ToolCall>, GeneratorError> {
    if m.tool_calls.is_empty() {
        return Ok(Vec::new());
    }
    if m.role != "assistant" {
        return bad(format!(
            "chat message {i} has tool_calls but role \"{}\"; only assistant messages call tools",
            truncate(&m.role, QUOTE_BYTES)
        ));
    }
    if m.tool_calls.len() > MAX_CALLS_PER_MESSAGE {
        return bad(format!(
            "chat message {i} has {} tool calls; at most {MAX_CALLS_PER_MESSAGE}",
            m.tool_calls.len()
        ));
    }
    m.tool_calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            if c.name.is_empty() || c.id.len() > MAX_ID_BYTES || c.name.len() > MAX_ID_BYTES {
                return bad(format!(
                    "chat message {i}, tool call {j}: a name is required, and id and name have at most {MAX_ID_BYTES} bytes"
                ));
            }
            let args = if c.arguments_json.trim().is_empty() { "{}" } else { &c.arguments_json };
            match serde_json::from_str::<serde_json::Value>(args) {
                Ok(serde_json::Value::Object(_)) => Ok(ToolCall {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: args.to_string(),
                }),
                _ => bad(format!(
                    "chat message {i}, tool call {j} (\"{}\"): arguments_json is not a JSON object",
                    truncate(&c.name, QUOTE_BYTES)
                )),
            }
        })
        .collect()
}

/// A tool message's call id and name, bounded.
pub fn check_tool_reply(i: usize, m: &pb::ChatMessage) -> Result<(), GeneratorError> {
    if m.tool_call_id.len() > MAX_ID_BYTES || m.name.len() > MAX_ID_BYTES {
        return bad(format!(
            "chat message {i}: tool_call_id and name have at most {MAX_ID_BYTES} bytes"
        ));
    }
    Ok(())
}
