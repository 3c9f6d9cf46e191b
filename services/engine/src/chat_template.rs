//! Chat templates as models ship them: the GGUF's `tokenizer.chat_template` is Jinja written
//! for Python's `jinja2` (Hugging Face's `apply_chat_template`), rendered here with minijinja
//! and its Python-compatible methods, as TGI does. llama.cpp's built-in matcher only guesses a
//! family from the text; this renders what the template says.

use std::sync::Arc;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

use crate::text::truncate;
use crate::EngineError;

/// Largest template accepted: real ones are a few KiB (the largest public ones about 30).
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;

/// How much of a template error's text a message quotes.
const QUOTE_BYTES: usize = 300;

/// One chat message as templates see it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls.
    pub tool_calls: Vec<TemplateToolCall>,
    /// A tool message: the call it answers and the tool's name (empty = not given).
    pub tool_call_id: String,
    pub name: String,
}

/// A tool call in a message, as OpenAI's `tool_calls` entries (templates read
/// `tool_call.function.name` and `tool_call.function.arguments`, an object).
#[derive(Clone, Debug, PartialEq)]
pub struct TemplateToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

/// What a template renders for one request.
#[derive(Clone, Debug, Default)]
pub struct RenderInput<'a> {
    pub messages: &'a [TemplateMessage],
    /// OpenAI-style tool definitions as JSON text (a list), when the request has tools.
    pub tools: Option<&'a str>,
    pub add_generation_prompt: bool,
    /// Template variables that replace the defaults (llama-server's `chat_template_kwargs`).
    pub variables: &'a [(&'a str, &'a str)],
}

/// The model's special tokens as templates see them, and whether its tokenizer adds them.
#[derive(Clone, Debug, Default)]
pub struct TemplateTokens {
    pub bos: String,
    pub eos: String,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// A compiled chat template with the model's special tokens.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    tokens: TemplateTokens,
    /// Whether the template renders a system message (found by rendering one): Gemma's raise
    /// on it, and llama.cpp's server then puts the system text in the first user message.
    system_role: bool,
    /// Whether the template renders `tools` (found by rendering one), and the call syntax
    /// its text shows.
    renders_tools: bool,
    tool_format: crate::tools::ToolFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error is the caller's (INVALID_ARGUMENT) with Jinja's words.
    pub fn new(source: &str, tokens: &TemplateTokens) -> Result<Self, EngineError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(EngineError::InvalidRequest(format!(
                "the chat template has {} bytes; at most {MAX_TEMPLATE_BYTES}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        // As Hugging Face's ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        // and llama.cpp's engine; minijinja, like both, drops one trailing newline.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(unknown_method);
        env.add_filter("tojson", tojson);
        env.add_filter("trim", trim_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let source = source.replace("\r\n", "\n").replace('\r', "\n");
        let tool_format = crate::tools::ToolFormat::detect(&source);
        env.add_template_owned(NAME, source)
            .map_err(|e| template_error("the chat template does not compile", &e))?;
        let mut template = Self {
            env: Arc::new(env),
            tokens: tokens.clone(),
            system_role: true,
            renders_tools: false,
            tool_format,
        };
        template.system_role = template.renders_system_messages();
        template.renders_tools = template.probe_tools();
        Ok(template)
    }

    /// Whether `tools` reach the prompt: a template without tool support ignores them.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    pub fn tool_format(&self) -> crate::tools::ToolFormat {
        self.tool_format
    }

    fn probe_tools(&self) -> bool {
        const PROBE: &str = "probe_tool_7f3a";
        let tools = format!(
            r#"[{{"type": "function", "function": {{"name": "{PROBE}", "description": "", "parameters": {{"type": "object", "properties": {{}}}}}}}}]"#
        );
        let user = [TemplateMessage {
            role: "user".into(),
            content: "hi".into(),
            ..Default::default()
        }];
        self.render_raw(&user, Some(&tools), true, &[])
            .is_ok_and(|text| text.contains(PROBE))
    }

    fn renders_system_messages(&self) -> bool {
        const PROBE: &str = "<system probe 7f3a>";
        let probe = [
            TemplateMessage {
                role: "system".into(),
                content: PROBE.into(),
                ..Default::default()
            },
            TemplateMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            },
        ];
        self.render_raw(&probe, None, false, &[])
            .is_ok_and(|text| text.contains(PROBE))
    }

    /// The prompt text for `input`, as llama.cpp's server renders it: messages adapted to what
    /// the template supports, then the leading BOS text dropped when the tokenizer adds BOS
    /// itself (and a trailing EOS when it adds EOS). A template that raises or fails is the
    /// caller's error.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<String, EngineError> {
        let mut messages: Vec<TemplateMessage> = input
            .messages
            .iter()
            .map(|m| TemplateMessage {
                // OpenAI's newer name for the system role.
                role: if m.role == "developer" {
                    "system".into()
                } else {
                    m.role.clone()
                },
                ..m.clone()
            })
            .collect();
        if !self.system_role && messages.first().is_some_and(|m| m.role == "system") {
            let system = messages.remove(0);
            if let Some(next) = messages.first_mut() {
                next.content = format!("{}\n{}", system.content, next.content);
            }
        }
        let mut text = self.render_raw(
            &messages,
            input.tools,
            input.add_generation_prompt,
            input.variables,
        )?;
        let t = &self.tokens;
        if t.add_bos && !t.bos.is_empty() && text.starts_with(&t.bos) {
            text.drain(..t.bos.len());
        }
        if t.add_eos && !t.eos.is_empty() && text.ends_with(&t.eos) {
            text.truncate(text.len() - t.eos.len());
        }
        Ok(text)
    }

    fn render_raw(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&str>,
        add_generation_prompt: bool,
        variables: &[(&str, &str)],
    ) -> Result<String, EngineError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut fields = vec![
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ];
                // Present only when set: templates test `message.tool_calls is defined`.
                if !m.tool_calls.is_empty() {
                    let calls: Vec<serde_json::Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments},
                            })
                        })
                        .collect();
                    fields.push(("tool_calls", Value::from_serialize(&calls)));
                }
                if !m.tool_call_id.is_empty() {
                    fields.push(("tool_call_id", Value::from(m.tool_call_id.as_str())));
                }
                if !m.name.is_empty() {
                    fields.push(("name", Value::from(m.name.as_str())));
                }
                Value::from_iter(fields)
            })
            .collect();
        let tools = match tools {
            None => Value::UNDEFINED,
            Some(json) => {
                let parsed: serde_json::Value = serde_json::from_str(json).map_err(|e| {
                    EngineError::InvalidRequest(format!("tools are not valid JSON: {e}"))
                })?;
                Value::from_serialize(&parsed)
            }
        };
        let now = chrono::Local::now();
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(messages)),
            ("tools", tools),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.tokens.bos.as_str())),
            ("eos_token", Value::from(self.tokens.eos.as_str())),
            // As llama.cpp's server: today's date for templates that print it (Llama 3.x).
            (
                "date_string",
                Value::from(now.format("%d %b %Y").to_string()),
            ),
            ("datetime", Value::from(now.format("%b %d %Y").to_string())),
        ];
        for &(name, value) in variables {
            ctx.retain(|(n, _)| *n != name);
            ctx.push((name, Value::from(value)));
        }
        let ctx = Value::from_iter(ctx);
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error("the chat template", &e))?;
        template
            .render(ctx)
            .map_err(|e| template_error("the chat template failed to render", &e))
    }
}

fn template_error(what: &str, e: &Error) -> EngineError {
    let detail = match e.kind() {
        // raise_exception(...): the template's own words, as Python's jinja2 shows them.
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            e.detail().unwrap_or_default().to_string()
        }
        _ => e.to_string(),
    };
    EngineError::InvalidRequest(format!("{what}: {}", truncate(&detail, QUOTE_BYTES)))
}

/// Whitespace as llama.cpp's template engine strips it: ASCII only (C's `isspace`), so a
/// no-break space at a message's edge survives, as it does in llama-server's prompts.
fn is_ascii_space(c: char) -> bool {
    c.is_ascii_whitespace() || c == '\x0b'
}

/// `trim` filter: `chars` if given, else ASCII whitespace.
fn trim_filter(text: String, chars: Option<String>) -> String {
    match chars {
        Some(set) => text.trim_matches(|c| set.contains(c)).to_string(),
        None => text.trim_matches(is_ascii_space).to_string(),
    }
}

/// Python string methods (minijinja-contrib's), with `strip`/`lstrip`/`rstrip` without
/// arguments trimming ASCII whitespace as `trim` does.
fn unknown_method(
    state: &minijinja::State<'_, '_>,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(text), true) = (value.as_str(), args.is_empty()) {
        let trimmed = match method {
            "strip" => Some(text.trim_matches(is_ascii_space)),
            "lstrip" => Some(text.trim_start_matches(is_ascii_space)),
            "rstrip" => Some(text.trim_end_matches(is_ascii_space)),
            _ => None,
        };
        if let Some(t) = trimmed {
            return Ok(Value::from(t));
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(fmt)`, which Llama 3.x templates call for today's date.
fn strftime_now(format: String) -> Result<Value, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: the format is not one strftime knows",
        )
    })?;
    Ok(Value::from(out))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as Hugging Face's
/// `tojson` filter: templates print tool definitions with it, and the model was trained on
/// that spacing (`{"a": 1, "b": [1, 2]}`), not minijinja's compact, HTML-escaped form.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    dump(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn dump(v: &Value, indent: Option<usize>, level: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let json = serde_json::to_value(v)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
            out.push_str(&json.to_string());
        }
        ValueKind::String => {
            out.push_str(&serde_json::Value::from(v.as_str().unwrap_or_default()).to_string())
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                dump(item, indent, level + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                let name = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                out.push_str(&serde_json::Value::from(name).to_string());
                out.push_str(": ");
                dump(&v.get_item(key)?, indent, level + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, level);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {}", v.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    #[test]
    fn renders_messages_with_python_methods_and_special_tokens() {
        let tokens = TemplateTokens {
            bos: "<s>".into(),
            eos: "</s>".into(),
            ..Default::default()
        };
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}<{{ m.role.upper() }}>{{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}<A>{% endif %}",
            &tokens,
        )
        .unwrap();
        let out = t
            .render(&RenderInput {
                messages: &[msg("user", " hi "), msg("assistant", "yo")],
                tools: None,
                add_generation_prompt: true,
                variables: &[],
            })
            .unwrap();
        assert_eq!(out, "<s><USER>hi\n<ASSISTANT>yo\n<A>");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}",
            &TemplateTokens::default(),
        )
        .unwrap();
        let tools = r#"[{"type": "function", "function": {"name": "f", "n": [1, 2.5, true, null], "é": "<&>"}}]"#;
        let out = t
            .render(&RenderInput {
                messages: &[],
                tools: Some(tools),
                add_generation_prompt: false,
                variables: &[],
            })
            .unwrap();
        let (compact, indented) = out.split_once('|').unwrap();
        assert_eq!(compact, tools);
        assert_eq!(
            indented,
            "{\n  \"type\": \"function\",\n  \"function\": {\n    \"name\": \"f\",\n    \"n\": [\n      1,\n      2.5,\n      true,\n      null\n    ],\n    \"é\": \"<&>\"\n  }\n}"
        );
    }

    #[test]
    fn errors_are_the_callers_with_jinja_words() {
        let none = TemplateTokens::default();
        let bad = ChatTemplate::new("{% for m in messages %}", &none).unwrap_err();
        assert!(bad.to_string().contains("does not compile"), "{bad}");
        let raising = ChatTemplate::new(
            "{{ raise_exception('Conversation roles must alternate user/assistant') }}",
            &none,
        )
        .unwrap();
        let e = raising.render(&RenderInput::default()).unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }
}
