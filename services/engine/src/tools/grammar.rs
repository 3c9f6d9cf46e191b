//! The grammar that makes a tool call valid by construction: each call names one of the
//! request's tools and its arguments match that tool's schema. With `auto` the grammar waits
//! for the format's opening text (llama.cpp's lazy grammar), so the model may answer in prose;
//! with `required` or a named function it holds from the first token.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use serde_json::{json, Value};

use super::{ToolChoice, ToolFormat, ToolSpec};
use crate::EngineError;

/// A GBNF grammar (start rule `root`) and, for a lazy one, the patterns that switch it on
/// (llama.cpp feeds the grammar from the pattern's first group).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolGrammar {
    pub gbnf: String,
    pub triggers: Option<Vec<String>>,
}

/// Rule names of ours, kept apart from the names llama.cpp's schema conversion derives from
/// property names.
const CALLS_RULE: &str = "tool-calls-json";

/// Calls one answer may make with parallel calls on: more than models make, and a bound on a
/// model that keeps opening calls instead of ending its turn (small ones do).
pub const MAX_PARALLEL_CALLS: usize = 8;

impl ToolGrammar {
    /// None when tool_choice is `none`: the tools are only shown.
    pub fn new(spec: &ToolSpec, format: ToolFormat) -> Result<Option<Self>, EngineError> {
        let lazy = match spec.choice {
            ToolChoice::None => return Ok(None),
            ToolChoice::Auto => true,
            ToolChoice::Required | ToolChoice::Function(_) => false,
        };
        let call = call_schema(spec, format);
        let most = if spec.parallel { MAX_PARALLEL_CALLS } else { 1 };
        let many = |items: Value| json!({"type": "array", "items": items, "minItems": 1, "maxItems": most});
        let (schema, wrap, triggers) = match format {
            ToolFormat::Hermes => (
                call,
                // One block per call, as Qwen's and Hermes' templates show them.
                format!(
                    "root ::= tool-call-block{}\ntool-call-block ::= \"<tool_call>\" tool-call-nl {CALLS_RULE} tool-call-nl \"</tool_call>\"\ntool-call-nl ::= \"\" | \"\\n\"\n",
                    if spec.parallel {
                        format!(" (tool-call-nl tool-call-block){{0,{}}}", MAX_PARALLEL_CALLS - 1)
                    } else {
                        String::new()
                    }
                ),
                vec![r"[\s\S]*?(<tool_call>)[\s\S]*".to_string()],
            ),
            ToolFormat::Mistral => (
                many(call),
                format!("root ::= \"[TOOL_CALLS]\" {CALLS_RULE}\n"),
                vec![r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*".to_string()],
            ),
            // Llama 3.x calls one function per turn.
            ToolFormat::Llama3 => (
                call,
                format!("root ::= {CALLS_RULE}\n"),
                vec![r"^\s*(\{[\s\S]*)$".to_string()],
            ),
            ToolFormat::Generic => {
                let calls = json!({
                    "type": "object",
                    "properties": {"tool_calls": many(call)},
                    "required": ["tool_calls"],
                    "additionalProperties": false,
                });
                let schema = if lazy {
                    json!({"anyOf": [calls, {
                        "type": "object",
                        "properties": {"response": {"type": "string"}},
                        "required": ["response"],
                        "additionalProperties": false,
                    }]})
                } else {
                    calls
                };
                // The whole answer is JSON: constrained from the first token either way.
                return Ok(Some(Self {
                    gbnf: schema_grammar(&schema, "root")?,
                    triggers: None,
                }));
            }
        };
        let gbnf = format!("{wrap}{}", schema_grammar(&schema, CALLS_RULE)?);
        Ok(Some(Self {
            gbnf,
            triggers: lazy.then_some(triggers),
        }))
    }
}

impl ToolGrammar {
    /// llama.cpp's grammar sampler, lazy when there are triggers.
    pub fn sampler(&self, model: &LlamaModel) -> Result<LlamaSampler, EngineError> {
        let _ = crate::backend::take_first_error();
        let made = match &self.triggers {
            None => LlamaSampler::grammar(model, &self.gbnf, "root"),
            Some(t) => LlamaSampler::grammar_lazy_patterns(model, &self.gbnf, "root", t, &[]),
        };
        made.map_err(|_| {
            EngineError::InvalidRequest(format!(
                "the grammar made from the tools' schemas: {}",
                crate::backend::take_first_error().unwrap_or_else(|| "llama.cpp refused it".into())
            ))
        })
    }
}

/// One call: the name is one of the callable tools and the arguments match its schema.
fn call_schema(spec: &ToolSpec, format: ToolFormat) -> Value {
    let key = format.arguments_key();
    let one = |name: &str, parameters: &Value| {
        let mut properties = serde_json::Map::new();
        properties.insert("name".into(), json!({"const": name}));
        properties.insert(key.into(), parameters.clone());
        let mut required = vec![json!("name"), json!(key)];
        if format == ToolFormat::Mistral {
            // Mistral's templates refuse ids that are not 9 letters or digits.
            properties.insert(
                "id".into(),
                json!({"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}),
            );
            required.push(json!("id"));
        }
        json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        })
    };
    let calls: Vec<Value> = spec
        .callable()
        .into_iter()
        .map(|t| one(&t.name, &t.parameters))
        .collect();
    match <[Value; 1]>::try_from(calls) {
        Ok([only]) => only,
        Err(calls) => json!({ "anyOf": calls }),
    }
}

/// llama.cpp's conversion of a schema to GBNF, with its start rule named `root_name`.
fn schema_grammar(schema: &Value, root_name: &str) -> Result<String, EngineError> {
    let gbnf = llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|_| {
        EngineError::InvalidRequest(
            "a tool's parameters schema cannot be turned into a grammar: llama.cpp refused it \
             (an invalid `pattern`, a `minimum` above its `maximum`, or a construct it does not \
             support)"
                .into(),
        )
    })?;
    Ok(if root_name == "root" {
        gbnf
    } else {
        rename_rule(&gbnf, "root", root_name)
    })
}

/// Renames rule `from` (its definition and every reference) in a GBNF grammar, leaving
/// literals and character classes alone.
fn rename_rule(gbnf: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(gbnf.len() + 64);
    let mut chars = gbnf.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                out.push(c);
                while let Some((_, d)) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some((_, e)) = chars.next() {
                            out.push(e);
                        }
                    } else if d == close {
                        break;
                    }
                }
            }
            '#' => {
                // A comment runs to the end of the line.
                out.push(c);
                for (_, d) in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '-' || d == '_' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &gbnf[i..end];
                out.push_str(if word == from { to } else { word });
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renaming_leaves_literals_alone() {
        let g = "root ::= \"root\" [r-t] x # root\nx ::= root | \"\\\"root\"\n";
        assert_eq!(
            rename_rule(g, "root", "call"),
            "call ::= \"root\" [r-t] x # root\nx ::= call | \"\\\"root\"\n"
        );
    }
}
