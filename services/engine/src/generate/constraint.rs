//! Structured output: a JSON Schema or a GBNF grammar becomes llama.cpp's grammar sampler, so
//! that every token the sequence picks keeps the output inside the language.
//!
//! llama.cpp refuses a bad grammar or schema with a null and a reason in its log (or, for a
//! schema, an exception its C wrapper swallows); the checks here name the common problems
//! before llama.cpp sees the text, and the log carries the rest.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::GrammarError;
use serde_json::Value;

use crate::text::truncate;
use crate::EngineError;

/// Largest schema or grammar accepted: real ones are a few KiB; the grammar is compiled on
/// the engine thread, between decode steps of other sequences.
pub const MAX_CONSTRAINT_BYTES: usize = 64 << 10;

/// How much of a caller's text an error message quotes.
const QUOTE_BYTES: usize = 120;

#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// A JSON Schema, as JSON text.
    JsonSchema(String),
    /// A GBNF grammar with a `root` rule.
    Grammar(String),
}

impl Constraint {
    /// Checks what can be checked without a model: size, JSON syntax, local references.
    pub fn check(&self) -> Result<(), EngineError> {
        let (what, text) = match self {
            Self::JsonSchema(t) => ("JSON schema", t),
            Self::Grammar(t) => ("grammar", t),
        };
        if text.trim().is_empty() {
            return Err(invalid(format!("the {what} is empty")));
        }
        if text.len() > MAX_CONSTRAINT_BYTES {
            return Err(invalid(format!(
                "the {what} has {} bytes; at most {MAX_CONSTRAINT_BYTES}",
                text.len()
            )));
        }
        if let Self::JsonSchema(t) = self {
            check_schema(t)?;
        }
        Ok(())
    }

    /// The grammar sampler for `model`; errors name what is wrong with the text.
    pub(super) fn sampler(&self, model: &LlamaModel) -> Result<LlamaSampler, EngineError> {
        self.check()?;
        let grammar = match self {
            Self::Grammar(g) => g.clone(),
            Self::JsonSchema(s) => llama_cpp_2::json_schema_to_grammar(s).map_err(|_| {
                invalid(
                    "the JSON schema cannot be turned into a grammar: llama.cpp refused it (an \
                     invalid `pattern`, a `minimum` above its `maximum`, or a construct it does \
                     not support)"
                        .into(),
                )
            })?,
        };
        let _ = crate::backend::take_first_error();
        LlamaSampler::grammar(model, &grammar, "root").map_err(|e| {
            let why = match e {
                GrammarError::RootNotFound => "it has no `root` rule (where output starts)".into(),
                GrammarError::GrammarNullBytes => "it contains NUL bytes".into(),
                _ => crate::backend::take_first_error()
                    .unwrap_or_else(|| "llama.cpp refused it".into()),
            };
            invalid(match self {
                Self::Grammar(_) => format!("the grammar is not valid GBNF: {why}"),
                Self::JsonSchema(_) => format!("the grammar made from the JSON schema: {why}"),
            })
        })
    }
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidRequest(message)
}

/// JSON syntax, a schema's shape, and `$ref`s that must resolve inside the document.
fn check_schema(text: &str) -> Result<(), EngineError> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| invalid(format!("the JSON schema is not valid JSON: {e}")))?;
    if !(doc.is_object() || doc.is_boolean()) {
        return Err(invalid("a JSON schema is an object (or true/false)".into()));
    }
    check_refs(&doc, &doc)
}

fn check_refs(doc: &Value, at: &Value) -> Result<(), EngineError> {
    match at {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref") {
                let Some(r) = r.as_str() else {
                    return Err(invalid("a $ref is not a string".into()));
                };
                if resolve(doc, r).is_none() {
                    return Err(invalid(format!(
                        "$ref \"{}\" does not point inside the schema (only local references, \
                         such as \"#/$defs/name\", are followed)",
                        truncate(r, QUOTE_BYTES)
                    )));
                }
            }
            map.values().try_for_each(|v| check_refs(doc, v))
        }
        Value::Array(items) => items.iter().try_for_each(|v| check_refs(doc, v)),
        _ => Ok(()),
    }
}

/// A local reference (`#`, `#/a/b`), as a JSON pointer into the document.
fn resolve<'d>(doc: &'d Value, reference: &str) -> Option<&'d Value> {
    let pointer = reference.strip_prefix('#')?;
    if pointer.is_empty() {
        return Some(doc);
    }
    doc.pointer(pointer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(c: Constraint) -> String {
        c.check().unwrap_err().to_string()
    }

    #[test]
    fn schemas_are_checked_before_llama_cpp_sees_them() {
        let ok = r##"{"type":"object","properties":{"a":{"$ref":"#/$defs/x"}},"$defs":{"x":{"type":"integer"}}}"##;
        assert!(Constraint::JsonSchema(ok.into()).check().is_ok());
        assert!(message(Constraint::JsonSchema("{\"type\": ".into())).contains("not valid JSON"));
        assert!(message(Constraint::JsonSchema("[1]".into())).contains("is an object"));
        let remote = r#"{"$ref":"https://example.com/schema.json"}"#;
        assert!(message(Constraint::JsonSchema(remote.into())).contains("does not point inside"));
        let missing = r##"{"properties":{"a":{"$ref":"#/$defs/nope"}}}"##;
        assert!(message(Constraint::JsonSchema(missing.into())).contains("#/$defs/nope"));
        assert!(message(Constraint::Grammar(" ".into())).contains("empty"));
        let huge = format!("root ::= \"{}\"", "a".repeat(MAX_CONSTRAINT_BYTES));
        assert!(message(Constraint::Grammar(huge)).contains("at most"));
    }

    #[test]
    fn long_references_are_not_echoed_whole() {
        let long = format!(r##"{{"$ref":"#/{}"}}"##, "x".repeat(10_000));
        assert!(message(Constraint::JsonSchema(long)).len() < 400);
    }
}
