//! A chat request's prompt text: the service's template file, the model's own Jinja template,
//! a template sent with the request, or one of llama.cpp's built-ins by name. Rendering needs
//! the model's vocabulary and template only, so it runs on any thread (the engine thread for
//! generation, a blocking task for ApplyChatTemplate).

use std::sync::Arc;

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::request::{ChatMessage, TemplateChoice};
use crate::chat_template::{
    ChatTemplate, RenderInput, TemplateMessage, TemplateTokens, TemplateToolCall,
};
use crate::text::truncate;
use crate::tools::{ToolChoice, ToolFormat, ToolSpec};
use crate::EngineError;

/// Where the chat template that requests get by default comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// The service's template file.
    File,
    /// The GGUF's `tokenizer.chat_template`, rendered as Jinja.
    Gguf,
    /// The GGUF's template, which minijinja cannot compile: llama.cpp's built-in family match.
    GgufBuiltinMatch,
    None,
}

/// Shares the model with its engine thread, as `Tokenizer` does (and is dropped before it).
#[derive(Clone)]
pub struct ChatRenderer {
    model: Arc<LlamaModel>,
    served: Option<ChatTemplate>,
    source: TemplateSource,
    tokens: TemplateTokens,
}

impl ChatRenderer {
    /// The template requests get by default: the service's file, else the model's own Jinja.
    pub(super) fn new(model: Arc<LlamaModel>, file: Option<&str>) -> Result<Self, EngineError> {
        let tokens = template_tokens(&model);
        let (served, source) = match file {
            Some(text) => (
                Some(ChatTemplate::new(text, &tokens)?),
                TemplateSource::File,
            ),
            None => match model.meta_val_str("tokenizer.chat_template") {
                Err(_) => (None, TemplateSource::None),
                Ok(text) => match ChatTemplate::new(&text, &tokens) {
                    Ok(t) => (Some(t), TemplateSource::Gguf),
                    Err(e) => {
                        tracing::warn!(error = %e, "the model's chat template; llama.cpp's built-in match renders chats instead");
                        (None, TemplateSource::GgufBuiltinMatch)
                    }
                },
            },
        };
        Ok(Self {
            model,
            served,
            source,
            tokens,
        })
    }

    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// The prompt text of a conversation, ending with the assistant's turn opened.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        choice: &TemplateChoice,
    ) -> Result<String, EngineError> {
        self.render_with_tools(messages, choice, None)
            .map(|(text, _)| text)
    }

    /// As `render`, with the request's tools in the template's `tools`; also the call syntax
    /// the template shows. A template that does not render tools cannot take them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        choice: &TemplateChoice,
        tools: Option<&ToolSpec>,
    ) -> Result<(String, Option<ToolFormat>), EngineError> {
        let sent;
        let (jinja, which) = match choice {
            TemplateChoice::Builtin(name) => {
                if tools.is_some() {
                    return Err(no_tools(&format!(
                        "llama.cpp's built-in template \"{}\"",
                        truncate(name, 64)
                    )));
                }
                return Ok((self.render_builtin(messages, Some(name))?, None));
            }
            TemplateChoice::Jinja(source) => {
                sent = ChatTemplate::new(source, &self.tokens)?;
                (&sent, "the request's chat_template_jinja")
            }
            TemplateChoice::Served => match &self.served {
                Some(t) if self.source == TemplateSource::File => {
                    (t, "the generator's --chat-template-file")
                }
                Some(t) => (t, "the model's own chat template"),
                None if tools.is_some() => {
                    return Err(no_tools(match self.source {
                        TemplateSource::None => "this model (it has no chat template)",
                        _ => "the model's chat template (it is rendered by llama.cpp's built-in match, not as Jinja)",
                    }))
                }
                None => return Ok((self.render_builtin(messages, None)?, None)),
            },
        };
        let format = match tools {
            Some(_) if !jinja.renders_tools() => return Err(no_tools(which)),
            Some(_) => Some(jinja.tool_format()),
            None => None,
        };
        let mut messages: Vec<TemplateMessage> = messages.iter().map(template_message).collect();
        if let (Some(spec), Some(ToolFormat::Generic)) = (tools, format) {
            // The generic format's answer is JSON the template does not describe: say so,
            // as llama.cpp's generic handler does.
            let required = spec.choice != ToolChoice::Auto;
            let say = ToolFormat::generic_instruction(required);
            match messages.first_mut() {
                Some(m) if m.role == "system" => m.content = format!("{}\n\n{say}", m.content),
                _ => messages.insert(
                    0,
                    TemplateMessage {
                        role: "system".into(),
                        content: say.into(),
                        ..Default::default()
                    },
                ),
            }
        }
        let tools_json = tools.map(ToolSpec::template_json);
        let text = jinja.render(&RenderInput {
            messages: &messages,
            tools: tools_json.as_deref(),
            add_generation_prompt: true,
            variables: &[],
        })?;
        Ok((text, format))
    }

    /// llama.cpp's built-in templates: by name, or the family it matches the GGUF's to.
    fn render_builtin(
        &self,
        messages: &[ChatMessage],
        name: Option<&str>,
    ) -> Result<String, EngineError> {
        let tmpl = match name {
            Some(name) => LlamaChatTemplate::new(name).map_err(|_| {
                EngineError::InvalidRequest("chat template name contains NUL".into())
            })?,
            None => self.model.chat_template(None).map_err(|_| {
                EngineError::InvalidRequest(
                    "this model has no chat template in its file; name one (e.g. \"gemma\", \"chatml\"), send a Jinja template, or send a plain prompt".into(),
                )
            })?,
        };
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::InvalidRequest(format!("chat message: {e}")))?;
        self.model
            .apply_chat_template(&tmpl, &chat, true)
            .map_err(|e| {
                EngineError::InvalidRequest(match name {
                    Some(name) => format!(
                        "chat template '{}' is not one llama.cpp knows ({e})",
                        truncate(name, 64)
                    ),
                    None => format!("applying the model's chat template: {e}"),
                })
            })
    }
}

/// `bos_token` and `eos_token` as templates see them (the tokens' text, or empty), and
/// whether tokenizing adds them anyway.
fn template_tokens(model: &LlamaModel) -> TemplateTokens {
    let vocab = model.vocab();
    let text = |t: LlamaToken| {
        if t.0 < 0 {
            return String::new();
        }
        String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
    };
    TemplateTokens {
        bos: text(vocab.bos()),
        eos: text(vocab.eos()),
        add_bos: vocab.should_add_bos(),
        add_eos: vocab.should_add_eos(),
    }
}

fn no_tools(which: &str) -> EngineError {
    EngineError::InvalidRequest(format!(
        "{which} does not render tools: send a Jinja template that does (chat_template_jinja, \
         or the generator's --chat-template-file), such as the model family's tool-use template"
    ))
}

/// A message as templates see it; a call's arguments are an object there (templates print
/// them with `tojson`).
fn template_message(m: &ChatMessage) -> TemplateMessage {
    TemplateMessage {
        role: m.role.clone(),
        content: m.content.clone(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| TemplateToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: serde_json::from_str(&c.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone())),
            })
            .collect(),
        tool_call_id: m.tool_call_id.clone(),
        name: m.name.clone(),
    }
}
