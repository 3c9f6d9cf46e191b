//! A conversation the client owns: its messages (tool calls and tool results included), the
//! tools offered, sampling and template choices. The generator is stateless: every turn sends
//! the whole session again, and its prompt cache evaluates only what is new.

use std::path::Path;

use llama_agent_proto::generator::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// The version of the session file format.
pub const SESSION_FORMAT: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A call the model made: `arguments` is the JSON object it wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: String,
    /// An assistant message: the tools it called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool message: the call it answers and the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A function offered to the model; `parameters` is its JSON Schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub parameters: serde_json::Value,
}

/// Which tools the model may (or must) call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "function")]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    Function(String),
}

impl ToolChoice {
    /// `auto`, `none`, `required`, or the name of one function.
    pub fn parse(s: &str) -> Self {
        match s {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            name => ToolChoice::Function(name.to_string()),
        }
    }

    fn to_pb(&self) -> pb::ToolChoice {
        use pb::tool_choice::Mode;
        let (mode, function) = match self {
            ToolChoice::Auto => (Mode::Auto, String::new()),
            ToolChoice::None => (Mode::None, String::new()),
            ToolChoice::Required => (Mode::Required, String::new()),
            ToolChoice::Function(f) => (Mode::Function, f.clone()),
        };
        pb::ToolChoice {
            mode: mode as i32,
            function,
        }
    }
}

/// Sampling settings, as `pb::SamplingParams` (unset: the generator's defaults).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub format: u32,
    pub model: String,
    /// A llama.cpp built-in template name instead of the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// A Jinja template's text (kept in the session so a resumed chat renders the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_jinja: Option<String>,
    #[serde(default)]
    pub sampling: Sampling,
    /// Tokens per generation at most (0: the generator's default).
    #[serde(default)]
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    #[serde(default)]
    pub tool_choice: ToolChoice,
    /// Ask the generator to end a generation that loops on itself.
    #[serde(default)]
    pub stop_on_repetition: bool,
    #[serde(default)]
    pub messages: Vec<Message>,
}

impl Session {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            format: SESSION_FORMAT,
            model: model.into(),
            chat_template: None,
            chat_template_jinja: None,
            sampling: Sampling::default(),
            max_tokens: 0,
            stop: Vec::new(),
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            stop_on_repetition: false,
            messages: Vec::new(),
        }
    }

    fn push(&mut self, role: Role, content: impl Into<String>) {
        self.messages.push(Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        });
    }

    pub fn push_system(&mut self, content: impl Into<String>) {
        self.push(Role::System, content);
    }

    pub fn push_user(&mut self, content: impl Into<String>) {
        self.push(Role::User, content);
    }

    /// An answer: its text and the tools it called (none for a final answer).
    pub fn push_assistant(&mut self, content: impl Into<String>, tool_calls: Vec<ToolCall>) {
        self.push(Role::Assistant, content);
        if let Some(m) = self.messages.last_mut() {
            m.tool_calls = tool_calls;
        }
    }

    /// The result of the call `call_id` of tool `name`.
    pub fn push_tool(
        &mut self,
        call_id: impl Into<String>,
        name: impl Into<String>,
        content: impl Into<String>,
    ) {
        self.push(Role::Tool, content);
        if let Some(m) = self.messages.last_mut() {
            m.tool_call_id = Some(call_id.into());
            m.name = Some(name.into());
        }
    }

    /// The request for the next answer: the whole conversation, with `tool_choice`.
    pub fn request(&self, tool_choice: &ToolChoice) -> pb::GenerateRequest {
        let messages = self.messages.iter().map(message_to_pb).collect();
        let tools: Vec<pb::Tool> = self
            .tools
            .iter()
            .map(|t| pb::Tool {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters_json: if t.parameters.is_null() {
                    String::new()
                } else {
                    t.parameters.to_string()
                },
            })
            .collect();
        let s = &self.sampling;
        pb::GenerateRequest {
            model: self.model.clone(),
            input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                messages,
            })),
            chat_template: self.chat_template.clone().unwrap_or_default(),
            chat_template_jinja: self.chat_template_jinja.clone().unwrap_or_default(),
            sampling: Some(pb::SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                min_p: s.min_p,
                repeat_penalty: s.repeat_penalty,
                repeat_last_n: None,
                seed: s.seed,
            }),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            // No tools, no choice: a request without tools is plain chat.
            tool_choice: (!tools.is_empty()).then(|| tool_choice.to_pb()),
            tools,
            stop_on_repetition: self.stop_on_repetition,
            ..Default::default()
        }
    }

    pub fn to_json(&self) -> String {
        // A session is plain data (strings, numbers, JSON values): it always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str, path: &str) -> Result<Self, AgentError> {
        let s: Session = serde_json::from_str(text).map_err(|source| AgentError::SessionParse {
            path: path.to_string(),
            source,
        })?;
        if s.format != SESSION_FORMAT {
            return Err(AgentError::SessionFormat {
                path: path.to_string(),
                found: s.format,
            });
        }
        Ok(s)
    }

    /// Reads a session file; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, AgentError> {
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_json(&text, &shown).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AgentError::SessionIo {
                path: shown,
                source,
            }),
        }
    }

    /// Writes the session to `path` through a temporary file renamed over it, so a crash
    /// mid-write leaves the previous turn's file whole.
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let io = |source| AgentError::SessionIo {
            path: path.display().to_string(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, self.to_json()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn message_to_pb(m: &Message) -> pb::ChatMessage {
    pb::ChatMessage {
        role: m.role.as_str().to_string(),
        content: m.content.clone(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| pb::ToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments_json: c.arguments.to_string(),
            })
            .collect(),
        tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conversation() -> Session {
        let mut s = Session::new("owner/repo:Q8_0");
        s.chat_template_jinja = Some("{{ messages }}".into());
        s.sampling.temperature = Some(0.0);
        s.sampling.seed = Some(7);
        s.max_tokens = 64;
        s.tools.push(ToolSpec {
            name: "get_current_time".into(),
            description: "The time in a timezone".into(),
            parameters: json!({"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}),
        });
        s.tool_choice = ToolChoice::Function("get_current_time".into());
        s.push_system("Be brief.");
        s.push_user("What time is it in Paris? «ünïcode»");
        s.push_assistant(
            "",
            vec![ToolCall {
                id: "call_abc".into(),
                name: "get_current_time".into(),
                arguments: json!({"timezone": "Europe/Paris"}),
            }],
        );
        s.push_tool("call_abc", "get_current_time", "{\"datetime\": \"12:00\"}");
        s.push_assistant("It is noon.", Vec::new());
        s
    }

    #[test]
    fn a_session_survives_a_save_and_load() {
        let s = conversation();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.json");
        assert!(Session::load(&path).unwrap().is_none());
        s.save(&path).unwrap();
        let back = Session::load(&path).unwrap().unwrap();
        assert_eq!(back, s);
        // The same request, byte for byte, from the restored session.
        assert_eq!(back.request(&back.tool_choice), s.request(&s.tool_choice));
        // Saving again over it leaves no temporary file behind.
        back.save(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("chat.json")]);
    }

    #[test]
    fn the_request_carries_tool_calls_and_results_with_their_ids() {
        let s = conversation();
        let r = s.request(&ToolChoice::Required);
        let Some(pb::generate_request::Input::Chat(chat)) = &r.input else {
            panic!("a chat request");
        };
        let roles: Vec<_> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "assistant"]);
        let call = &chat.messages[2].tool_calls[0];
        assert_eq!(call.id, "call_abc");
        let args: serde_json::Value = serde_json::from_str(&call.arguments_json).unwrap();
        assert_eq!(args, json!({"timezone": "Europe/Paris"}));
        assert_eq!(chat.messages[3].tool_call_id, "call_abc");
        assert_eq!(chat.messages[3].name, "get_current_time");
        assert_eq!(r.tools.len(), 1);
        let schema: serde_json::Value = serde_json::from_str(&r.tools[0].parameters_json).unwrap();
        assert_eq!(schema["required"], json!(["timezone"]));
        assert_eq!(
            r.tool_choice.unwrap().mode,
            pb::tool_choice::Mode::Required as i32
        );
        assert_eq!(r.chat_template_jinja, "{{ messages }}");
        assert_eq!(r.sampling.unwrap().seed, Some(7));

        // Without tools the request is a plain chat: no tool choice either.
        let mut plain = Session::new("m");
        plain.push_user("hi");
        assert!(plain.request(&ToolChoice::Required).tool_choice.is_none());
    }

    #[test]
    fn a_broken_or_foreign_file_is_refused_by_name() {
        let e = Session::from_json("{not json", "x.json").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("session file x.json is not a session"),
            "{e}"
        );
        let mut v: serde_json::Value = serde_json::from_str(&conversation().to_json()).unwrap();
        v["format"] = json!(99);
        let e = Session::from_json(&v.to_string(), "x.json").unwrap_err();
        assert!(e.to_string().contains("format 99"), "{e}");
    }

    #[test]
    fn tool_choice_parses_modes_and_names() {
        assert_eq!(ToolChoice::parse("auto"), ToolChoice::Auto);
        assert_eq!(ToolChoice::parse("none"), ToolChoice::None);
        assert_eq!(ToolChoice::parse("required"), ToolChoice::Required);
        assert_eq!(
            ToolChoice::parse("get_time"),
            ToolChoice::Function("get_time".into())
        );
    }
}
