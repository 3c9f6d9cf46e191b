//! Tool calling: the functions a request offers, how the model's template writes a call
//! (its format), the grammar that keeps a call's arguments valid against the tool's schema,
//! and the parser that turns what the model writes into calls as they form.
//!
//! The formats are the ones llama.cpp's server recognizes (common/chat): Hermes/Qwen
//! `<tool_call>` JSON, Llama 3.x JSON, Mistral `[TOOL_CALLS]`, and a generic JSON answer for
//! templates that render tools but show no call syntax of their own.

mod format;
mod grammar;
mod json_scan;
mod parse;

use serde_json::Value;

pub use format::ToolFormat;
pub use grammar::{ToolGrammar, MAX_PARALLEL_CALLS};
pub use parse::{ToolCall, ToolCallDelta, ToolOutput, ToolParser};

use crate::text::truncate;
use crate::EngineError;

/// Bounds that keep a request's tools to what a prompt can hold and a grammar can compile
/// between decode steps of other sequences.
pub const MAX_TOOLS: usize = 128;
const MAX_NAME_CHARS: usize = 64;
const MAX_SCHEMA_BYTES: usize = 64 << 10;
const QUOTE_BYTES: usize = 64;

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// A JSON Schema of the arguments object.
    pub parameters: Value,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text or calls; a call is constrained once the model starts it.
    #[default]
    Auto,
    /// The tools are shown, never called.
    None,
    /// Only calls, constrained from the first token.
    Required,
    /// Only a call of this function.
    Function(String),
}

/// What a request says about tools, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Several calls in one answer.
    pub parallel: bool,
}

impl Tool {
    /// Checks a tool as a request sends it: `parameters` is JSON Schema text (empty = any
    /// object).
    pub fn new(name: &str, description: &str, parameters: &str) -> Result<Self, EngineError> {
        let valid_name = !name.is_empty()
            && name.chars().count() <= MAX_NAME_CHARS
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(invalid(format!(
                "tool name \"{}\" is not 1 to {MAX_NAME_CHARS} letters, digits, '_' or '-'",
                truncate(name, QUOTE_BYTES)
            )));
        }
        if parameters.len() > MAX_SCHEMA_BYTES {
            return Err(invalid(format!(
                "tool \"{name}\": the parameters schema has {} bytes; at most {MAX_SCHEMA_BYTES}",
                parameters.len()
            )));
        }
        let parameters = if parameters.trim().is_empty() {
            serde_json::json!({"type": "object"})
        } else {
            serde_json::from_str(parameters).map_err(|e| {
                invalid(format!(
                    "tool \"{name}\": the parameters schema is not valid JSON: {e}"
                ))
            })?
        };
        match &parameters {
            Value::Object(o) => {
                if o.get("type").is_some_and(|t| t != "object") {
                    return Err(invalid(format!(
                        "tool \"{name}\": the parameters schema must describe an object (\"type\": \"object\")"
                    )));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "tool \"{name}\": the parameters schema is not a JSON object"
                )))
            }
        }
        crate::generate::Constraint::JsonSchema(parameters.to_string())
            .check()
            .map_err(|e| invalid(format!("tool \"{name}\": {e}")))?;
        Ok(Self {
            name: name.into(),
            description: description.into(),
            parameters,
        })
    }

    /// As OpenAI's `tools` entries, which chat templates are written for, in the order and
    /// with the fields llama.cpp's server gives them (a missing description is "").
    fn openai(&self) -> Value {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        })
    }
}

impl ToolSpec {
    pub fn new(tools: Vec<Tool>, choice: ToolChoice, parallel: bool) -> Result<Self, EngineError> {
        if tools.is_empty() {
            return Err(invalid(format!(
                "tool_choice {} needs tools",
                match &choice {
                    ToolChoice::Required => "required".to_string(),
                    ToolChoice::Function(f) => format!("\"{}\"", truncate(f, QUOTE_BYTES)),
                    _ => "auto".to_string(),
                }
            )));
        }
        if tools.len() > MAX_TOOLS {
            return Err(invalid(format!(
                "{} tools; at most {MAX_TOOLS}",
                tools.len()
            )));
        }
        for (i, t) in tools.iter().enumerate() {
            if tools[..i].iter().any(|u| u.name == t.name) {
                return Err(invalid(format!("tool \"{}\" is given twice", t.name)));
            }
        }
        if let ToolChoice::Function(f) = &choice {
            if !tools.iter().any(|t| &t.name == f) {
                return Err(invalid(format!(
                    "tool_choice names \"{}\", which is not one of the request's tools",
                    truncate(f, QUOTE_BYTES)
                )));
            }
        }
        Ok(Self {
            tools,
            choice,
            parallel,
        })
    }

    /// The tools as the template's `tools` variable (OpenAI's shape), as JSON text.
    pub fn template_json(&self) -> String {
        Value::Array(self.tools.iter().map(Tool::openai).collect()).to_string()
    }

    /// The tools calls may use: all of them, or the one `tool_choice` names.
    fn callable(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::Function(f) => self.tools.iter().filter(|t| &t.name == f).collect(),
            _ => self.tools.iter().collect(),
        }
    }
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidRequest(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl std::fmt::Debug, EngineError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn tools_are_checked() {
        assert!(Tool::new("get_time", "", r#"{"type":"object"}"#).is_ok());
        assert!(Tool::new("any", "", "").is_ok());
        assert!(err(Tool::new("bad name", "", "")).contains("letters, digits"));
        assert!(err(Tool::new(&"x".repeat(10_000), "", "")).len() < 200);
        assert!(err(Tool::new("f", "", "{")).contains("not valid JSON"));
        assert!(err(Tool::new("f", "", "[1]")).contains("not a JSON object"));
        assert!(err(Tool::new("f", "", r#"{"type":"string"}"#)).contains("describe an object"));
        let f = Tool::new("f", "", "").unwrap();
        assert!(err(ToolSpec::new(
            vec![f.clone(), f.clone()],
            ToolChoice::Auto,
            true
        ))
        .contains("twice"));
        assert!(err(ToolSpec::new(
            vec![f.clone()],
            ToolChoice::Function("g".into()),
            true
        ))
        .contains("not one of"));
        assert!(err(ToolSpec::new(vec![], ToolChoice::Required, true)).contains("needs tools"));
    }
}
