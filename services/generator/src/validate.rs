//! Every field of a generation request, checked before any model is touched. Messages name
//! the field and never quote more than a bounded piece of what was sent.

use llama_agent_engine::generate::{
    ChatMessage, Constraint, Prompt, Sampling, TemplateChoice, MAX_TOP_LOGPROBS,
};
use llama_agent_engine::text::truncate;
use llama_agent_engine::tools::{ToolChoice, ToolSpec};
use llama_agent_proto::generator::v1 as pb;

use crate::service::GeneratorError;

/// Bounds on request fields: generous for real use, small enough that a request cannot make
/// the engine do unbounded work.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// How much of a caller's text an error message quotes.
const QUOTE_BYTES: usize = 64;
/// The roles chat templates are written for: OpenAI's, less the deprecated `function`;
/// `developer` (OpenAI's newer name for `system`) becomes `system`, as llama-server does.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A request that passed every check, in the engine's terms.
pub struct Checked {
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub constraint: Option<Constraint>,
    pub logprobs: Option<u32>,
    pub cache_prompt: bool,
    pub tools: Option<ToolSpec>,
}

fn bad<T>(m: String) -> Result<T, GeneratorError> {
    Err(GeneratorError::Invalid(m))
}

pub fn request(r: &pb::GenerateRequest) -> Result<Checked, GeneratorError> {
    if r.model.trim().is_empty() {
        return bad("model is required".into());
    }
    let prompt = match &r.input {
        None => return bad("give a prompt or chat messages".into()),
        Some(pb::generate_request::Input::Prompt(p)) if p.is_empty() => {
            return bad("the prompt is empty".into())
        }
        Some(pb::generate_request::Input::Prompt(p)) => Prompt::Text(p.clone()),
        Some(pb::generate_request::Input::Chat(c)) => {
            chat(c, &r.chat_template, &r.chat_template_jinja)?
        }
    };
    let stop = stops(&r.stop)?;
    let constraint = match &r.constraint {
        None => None,
        Some(pb::generate_request::Constraint::JsonSchema(s)) => {
            Some(Constraint::JsonSchema(s.clone()))
        }
        Some(pb::generate_request::Constraint::Grammar(g)) => Some(Constraint::Grammar(g.clone())),
    };
    if let Some(c) = &constraint {
        c.check()
            .map_err(|e| GeneratorError::Invalid(e.to_string()))?;
    }
    if r.top_logprobs > MAX_TOP_LOGPROBS {
        return bad(format!(
            "top_logprobs {} is more than {MAX_TOP_LOGPROBS}",
            r.top_logprobs
        ));
    }
    if r.top_logprobs > 0 && !r.logprobs {
        return bad("top_logprobs needs logprobs".into());
    }
    let tools = crate::tools::spec(r)?;
    if let Some(spec) = &tools {
        if matches!(prompt, Prompt::Text(_)) {
            return bad(
                "tools need chat messages: the chat template renders them into the prompt".into(),
            );
        }
        if constraint.is_some() && spec.choice != ToolChoice::None {
            return bad(
                "tools cannot be combined with json_schema or grammar: a call's arguments are already constrained by the tool's schema".into(),
            );
        }
    }
    Ok(Checked {
        prompt,
        sampling: sampling(r.sampling.unwrap_or_default())?,
        stop,
        constraint,
        logprobs: r.logprobs.then_some(r.top_logprobs),
        cache_prompt: r.cache_prompt.unwrap_or(true),
        tools,
    })
}

/// Chat messages and the template that renders them.
pub fn chat(c: &pb::ChatMessages, builtin: &str, jinja: &str) -> Result<Prompt, GeneratorError> {
    if c.messages.is_empty() {
        return bad("chat has no messages".into());
    }
    if let Some((i, m)) = c
        .messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        return bad(format!(
            "chat message {i} has role \"{}\"; roles are {}",
            truncate(&m.role, QUOTE_BYTES),
            ROLES.join(", ")
        ));
    }
    let template = if !jinja.is_empty() {
        TemplateChoice::Jinja(jinja.to_string())
    } else if !builtin.is_empty() {
        TemplateChoice::Builtin(builtin.to_string())
    } else {
        TemplateChoice::Served
    };
    let messages = c
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            crate::tools::check_tool_reply(i, m)?;
            Ok(ChatMessage {
                role: match m.role.as_str() {
                    "developer" => "system".into(),
                    role => role.into(),
                },
                content: m.content.clone(),
                tool_calls: crate::tools::message_calls(i, m)?,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect::<Result<Vec<_>, GeneratorError>>()?;
    Ok(Prompt::Chat { messages, template })
}

fn stops(stop: &[String]) -> Result<Vec<String>, GeneratorError> {
    if stop.len() > MAX_STOPS {
        return bad(format!(
            "at most {MAX_STOPS} stop sequences ({} given)",
            stop.len()
        ));
    }
    if let Some((i, s)) = stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return bad(format!(
            "stop sequence {i} has {} bytes; each must have 1 to {MAX_STOP_BYTES}",
            s.len()
        ));
    }
    Ok(stop.to_vec())
}

fn sampling(s: pb::SamplingParams) -> Result<Sampling, GeneratorError> {
    let d = Sampling::default();
    let in_range = |name: &str,
                    v: Option<f32>,
                    lo: f32,
                    hi: f32,
                    default: f32|
     -> Result<f32, GeneratorError> {
        match v {
            None => Ok(default),
            Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
            Some(x) => bad(format!("{name} {x} is outside [{lo}, {hi}]")),
        }
    };
    Ok(Sampling {
        temperature: in_range("temperature", s.temperature, 0.0, 10.0, d.temperature)?,
        top_k: match s.top_k {
            None => d.top_k,
            Some(k) if k <= 1_000_000 => k as i32,
            Some(k) => return bad(format!("top_k {k} is more than 1000000")),
        },
        top_p: positive("top_p", in_range("top_p", s.top_p, 0.0, 1.0, d.top_p)?)?,
        min_p: in_range("min_p", s.min_p, 0.0, 1.0, d.min_p)?,
        repeat_penalty: positive(
            "repeat_penalty",
            in_range(
                "repeat_penalty",
                s.repeat_penalty,
                0.0,
                10.0,
                d.repeat_penalty,
            )?,
        )?,
        repeat_last_n: match s.repeat_last_n {
            None => d.repeat_last_n,
            Some(n) if n <= 1 << 20 => n as i32,
            Some(n) => return bad(format!("repeat_last_n {n} is too large")),
        },
        // llama.cpp seeds are 32-bit; fold so every 64-bit seed still means one stream.
        seed: s.seed.map_or_else(rand_seed, |x| (x ^ (x >> 32)) as u32),
    })
}

fn positive(name: &str, v: f32) -> Result<f32, GeneratorError> {
    if v > 0.0 {
        Ok(v)
    } else {
        bad(format!("{name} must be greater than 0"))
    }
}

fn rand_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}
