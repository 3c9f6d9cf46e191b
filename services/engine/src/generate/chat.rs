//! A chat request's prompt text: the service's template file, the model's own Jinja template,
//! a template sent with the request, or one of llama.cpp's built-ins by name. Rendering needs
//! the model's vocabulary and template only, so it runs on any thread (the engine thread for
//! generation, a blocking task for ApplyChatTemplate).

use std::sync::Arc;

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::request::{ChatMessage, TemplateChoice};
use crate::chat_template::{ChatTemplate, RenderInput, TemplateMessage, TemplateTokens};
use crate::text::truncate;
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
        let sent;
        let jinja = match choice {
            TemplateChoice::Builtin(name) => return self.render_builtin(messages, Some(name)),
            TemplateChoice::Jinja(source) => {
                sent = ChatTemplate::new(source, &self.tokens)?;
                &sent
            }
            TemplateChoice::Served => match &self.served {
                Some(t) => t,
                None => return self.render_builtin(messages, None),
            },
        };
        let messages: Vec<TemplateMessage> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        jinja.render(&RenderInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: true,
            variables: &[],
        })
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
