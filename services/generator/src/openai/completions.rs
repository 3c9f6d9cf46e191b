//! `/v1/completions`: OpenAI's legacy text completion, the prompt tokenized as is.

use axum::extract::State;
use axum::response::Response;
use llama_agent_common::openai::{ApiError, ApiJson};
use llama_agent_proto::generator::v1 as pb;
use serde::Deserialize;

use super::params::Params;
use super::reply::{respond, Kind, Reply};
use super::Http;

#[derive(Deserialize)]
pub struct CompletionBody {
    #[serde(flatten)]
    params: Params,
    prompt: PromptInput,
    /// How many alternatives to report per token (0 to 20); absent: no logprobs.
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    best_of: Option<u32>,
}

/// OpenAI's `prompt`: text, a list of texts (one choice each), or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

fn token_ids(n: usize) -> ApiError {
    ApiError::invalid(format!(
        "prompt as token ids ({n} given) is not supported: send text"
    ))
}

fn prompt(p: PromptInput) -> Result<String, ApiError> {
    match p {
        PromptInput::Text(t) => Ok(t),
        PromptInput::Texts(mut v) if v.len() == 1 => Ok(v.remove(0)),
        PromptInput::Texts(v) => Err(ApiError::invalid(format!(
            "prompt is a list of {} texts: send one prompt per request",
            v.len()
        ))),
        PromptInput::Tokens(ids) => Err(token_ids(ids.len())),
        PromptInput::TokenLists(lists) => Err(token_ids(lists.len())),
    }
}

pub async fn completions(
    State(h): State<Http>,
    ApiJson(body): ApiJson<CompletionBody>,
) -> Result<Response, ApiError> {
    if body.echo {
        return Err(ApiError::invalid("echo is not supported"));
    }
    if body.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported"));
    }
    if body.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("best_of must be 1"));
    }
    let mut req = body.params.request()?;
    req.input = Some(pb::generate_request::Input::Prompt(prompt(body.prompt)?));
    req.logprobs = body.logprobs.is_some();
    req.top_logprobs = body.logprobs.unwrap_or(0);
    let mut reply = Reply::new(Kind::Text, body.params.model.clone());
    reply.stream = body.params.stream;
    reply.include_usage = body.params.include_usage();
    reply.logprobs = body.logprobs.is_some();
    respond(&h, req, reply).await
}
