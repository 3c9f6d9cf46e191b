//! The request fields chat and text completions share, and how they become a GenerateRequest.
//! Besides OpenAI's fields, llama-server's sampling extensions (`top_k`, `min_p`,
//! `repeat_penalty`, `grammar`, `json_schema`, `cache_prompt`) are read as it reads them.

use llama_agent_common::openai::ApiError;
use llama_agent_proto::generator::v1 as pb;
use serde::Deserialize;
use serde_json::Value;

/// OpenAI's `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format`: `text`, `json_object`, or `json_schema` with its `schema`.
#[derive(Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<JsonSchema>,
}

#[derive(Deserialize)]
struct JsonSchema {
    #[serde(default)]
    schema: Option<Value>,
}

#[derive(Deserialize)]
pub struct Params {
    pub model: String,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<u32>,
    /// A negative seed means a random one, as in llama-server.
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    grammar: Option<String>,
    #[serde(default)]
    json_schema: Option<Value>,
    #[serde(default)]
    cache_prompt: Option<bool>,
}

impl Params {
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The request without its input and logprobs settings (those differ between chat and
    /// text completions).
    pub fn request(&self) -> Result<pb::GenerateRequest, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n must be 1: one choice per request"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(format!(
                    "{name} is not supported: use repeat_penalty (and repeat_last_n)"
                )));
            }
        }
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::invalid(
                    "max_tokens and max_completion_tokens differ: give one",
                ))
            }
            (a, b) => a.or(b).unwrap_or(0),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(pb::GenerateRequest {
            model: self.model.clone(),
            sampling: Some(pb::SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed: self.seed.and_then(|s| u64::try_from(s).ok()),
            }),
            max_tokens,
            stop,
            constraint: self.constraint()?,
            cache_prompt: self.cache_prompt,
            ..Default::default()
        })
    }

    fn constraint(&self) -> Result<Option<pb::generate_request::Constraint>, ApiError> {
        use pb::generate_request::Constraint;
        let format = match &self.response_format {
            None => None,
            Some(f) => match (f.kind.as_str(), &f.json_schema) {
                ("text", _) => None,
                // Any JSON object, as OpenAI's JSON mode promises.
                ("json_object", _) => Some(serde_json::json!({"type": "object"})),
                ("json_schema", Some(JsonSchema { schema: Some(s) })) => Some(s.clone()),
                ("json_schema", _) => {
                    return Err(ApiError::invalid(
                        "response_format json_schema needs json_schema.schema",
                    ))
                }
                _ => {
                    return Err(ApiError::invalid(
                        "response_format type must be text, json_object or json_schema",
                    ))
                }
            },
        };
        let given = [
            format.is_some(),
            self.json_schema.is_some(),
            self.grammar.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ApiError::invalid(
                "give one of response_format, json_schema and grammar",
            ));
        }
        Ok(match (format.or(self.json_schema.clone()), &self.grammar) {
            (Some(schema), _) => Some(Constraint::JsonSchema(schema.to_string())),
            (None, Some(g)) => Some(Constraint::Grammar(g.clone())),
            (None, None) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::generate_request::Constraint;

    fn params(body: Value) -> Result<pb::GenerateRequest, ApiError> {
        let mut body = body;
        body["model"] = "m".into();
        serde_json::from_value::<Params>(body).unwrap().request()
    }

    #[test]
    fn openai_fields_become_the_grpc_request() {
        let r = params(serde_json::json!({
            "max_completion_tokens": 7, "temperature": 0, "seed": -1, "stop": "\n",
            "response_format": {"type": "json_object"},
        }))
        .unwrap();
        assert_eq!(r.max_tokens, 7);
        assert_eq!(r.stop, ["\n"]);
        let s = r.sampling.unwrap();
        assert_eq!((s.temperature, s.seed), (Some(0.0), None));
        assert_eq!(
            r.constraint,
            Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()))
        );
        let r = params(
            serde_json::json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "string"}}}, "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(
            r.constraint,
            Some(Constraint::JsonSchema(r#"{"type":"string"}"#.into()))
        );
        assert_eq!(r.stop, ["a", "b"]);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let refused = [
            (serde_json::json!({"n": 2}), "n must be 1"),
            (
                serde_json::json!({"presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (
                serde_json::json!({"max_tokens": 1, "max_completion_tokens": 2}),
                "max_tokens",
            ),
            (
                serde_json::json!({"response_format": {"type": "xml"}}),
                "response_format",
            ),
            (
                serde_json::json!({"response_format": {"type": "json_schema"}}),
                "json_schema.schema",
            ),
            (
                serde_json::json!({"grammar": "root ::= \"a\"", "json_schema": {}}),
                "one of",
            ),
        ];
        for (body, want) in refused {
            let e = params(body.clone()).unwrap_err();
            assert!(e.message.contains(want), "{body}: {}", e.message);
        }
        assert!(params(serde_json::json!({"n": 1, "frequency_penalty": 0})).is_ok());
    }
}
