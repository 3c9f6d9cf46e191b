//! `llama-cli generate`: prints text as it arrives, then a one-line summary on stderr.

use std::io::Write;

use futures::StreamExt;
use llama_agent_client::proto::generator::v1 as pb;
use llama_agent_client::{GeneratorClient, LoaderClient};
use llama_generator::GeneratorConfig;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model reference (`owner/repo`, `owner/repo:Q8_0`, a file, a local path).
    #[arg(long)]
    model: String,
    /// The prompt (with --system or --chat, the user message).
    #[arg(long)]
    prompt: String,
    /// A system message: the prompt becomes a chat rendered with the model's template.
    #[arg(long)]
    system: Option<String>,
    /// Render the prompt as a user message with the chat template.
    #[arg(long)]
    chat: bool,
    /// A llama.cpp built-in template (`gemma`, `chatml`, `llama3`, ...) instead of the model's.
    #[arg(long)]
    chat_template: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 = greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Same seed + same request = same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Constrain the output to JSON that validates against this JSON Schema file.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to this GBNF grammar file (llama.cpp's format, start rule `root`).
    #[arg(long, value_name = "FILE")]
    grammar: Option<std::path::PathBuf>,
    /// Report each token's log-probability and its N most likely alternatives (0 to 20) in the
    /// --json output.
    #[arg(long, value_name = "N")]
    logprobs: Option<u32>,
    /// Print the final message (text, finish reason, usage, timings) as JSON instead.
    #[arg(long)]
    json: bool,
    /// Evaluate the whole prompt even when the generator holds a prefix of it (llama-server's
    /// `cache_prompt: false`).
    #[arg(long)]
    no_prompt_cache: bool,
    /// Print the prompt the chat template renders (and its token count) instead of generating.
    #[arg(long)]
    print_prompt: bool,
    /// Generator service (`host:port`), or its replicas (a comma-separated list, or a DNS
    /// name with several addresses). Without it the generator runs inside this process.
    #[arg(long, env = "LLAMA_GENERATOR_ENDPOINT")]
    generator_endpoint: Option<String>,
    /// Settings of the in-process generator (ignored with --generator-endpoint).
    #[command(flatten)]
    engine: GeneratorConfig,
}

impl GenerateArgs {
    fn request(&self) -> anyhow::Result<pb::GenerateRequest> {
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
        };
        // The template file goes with the request, so it also applies to a remote generator.
        let template_file = match &self.engine.chat_template_file {
            Some(path) => read("--chat-template-file", path)?,
            None => String::new(),
        };
        let constraint = match (&self.json_schema, &self.grammar) {
            (Some(path), _) => Some(pb::generate_request::Constraint::JsonSchema(read(
                "--json-schema",
                path,
            )?)),
            (None, Some(path)) => Some(pb::generate_request::Constraint::Grammar(read(
                "--grammar",
                path,
            )?)),
            (None, None) => None,
        };
        let chat = self.system.is_some()
            || self.chat
            || self.chat_template.is_some()
            || !template_file.is_empty();
        let input = if chat {
            let mut messages = Vec::new();
            if let Some(s) = &self.system {
                messages.push(pb::ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                    ..Default::default()
                });
            }
            messages.push(pb::ChatMessage {
                role: "user".into(),
                content: self.prompt.clone(),
                ..Default::default()
            });
            pb::generate_request::Input::Chat(pb::ChatMessages { messages })
        } else {
            pb::generate_request::Input::Prompt(self.prompt.clone())
        };
        Ok(pb::GenerateRequest {
            model: self.model.clone(),
            input: Some(input),
            chat_template: self.chat_template.clone().unwrap_or_default(),
            sampling: Some(pb::SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: None,
                seed: self.seed,
            }),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            constraint,
            logprobs: self.logprobs.is_some(),
            top_logprobs: self.logprobs.unwrap_or(0),
            chat_template_jinja: template_file,
            cache_prompt: self.no_prompt_cache.then_some(false),
            ..Default::default()
        })
    }
}

pub async fn run(
    args: GenerateArgs,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    let client = match &args.generator_endpoint {
        Some(ep) => GeneratorClient::connect(ep)?,
        None => {
            GeneratorClient::new(llama_generator::in_process(&args.engine, loader().await?).await?)
        }
    };
    let request = args.request()?;
    if args.print_prompt {
        return print_prompt(&client, request).await;
    }
    let mut stream = std::pin::pin!(client.generate_stream(request, None).await?);
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                if args.json {
                    text.push_str(&c.text);
                    logprobs.extend(c.logprobs.iter().map(logprob_json));
                } else {
                    stdout.write_all(c.text.as_bytes())?;
                    stdout.flush()?;
                }
            }
            Some(pb::generate_response::Event::Done(d)) => {
                let usage = d.usage.unwrap_or_default();
                let t = d.timings.unwrap_or_default();
                let finish = pb::FinishReason::try_from(d.finish_reason)
                    .map_or("UNKNOWN", |f| f.as_str_name())
                    .trim_start_matches("FINISH_REASON_");
                if args.json {
                    let mut v = json!({
                        "text": text, "finish_reason": finish,
                        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                        "cached_prompt_tokens": usage.cached_prompt_tokens,
                        "ttft_ms": t.ttft_ms, "queue_ms": t.queue_ms, "prompt_ms": t.prompt_ms,
                        "decode_ms": t.decode_ms, "decode_tokens_per_second": t.decode_tokens_per_second,
                        "model": d.model_reference, "model_md5": d.model_md5,
                    });
                    if args.logprobs.is_some() {
                        v["logprobs"] = serde_json::Value::Array(std::mem::take(&mut logprobs));
                    }
                    writeln!(stdout, "{v}")?;
                } else {
                    writeln!(stdout)?;
                    eprintln!(
                        "[{} prompt ({} cached) + {} generated tokens, finish {finish}, TTFT {:.0} ms, {:.1} tok/s]",
                        usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens, t.ttft_ms, t.decode_tokens_per_second
                    );
                }
                return Ok(());
            }
            // `generate` sends no tools, so no calls come.
            Some(pb::generate_response::Event::ToolCall(_)) | None => {}
        }
    }
    anyhow::bail!("the generator closed the stream without a final message")
}

/// One token's log-probabilities as OpenAI's API writes them.
fn logprob_json(t: &pb::TokenLogprob) -> serde_json::Value {
    let top: Vec<_> = t
        .top_logprobs
        .iter()
        .map(|a| json!({"id": a.id, "token": a.token, "bytes": a.bytes, "logprob": a.logprob}))
        .collect();
    json!({"id": t.id, "token": t.token, "bytes": t.bytes, "logprob": t.logprob, "top_logprobs": top})
}

/// `--print-prompt`: what the model would read, rendered by the generator.
async fn print_prompt(client: &GeneratorClient, req: pb::GenerateRequest) -> anyhow::Result<()> {
    let Some(pb::generate_request::Input::Chat(chat)) = req.input else {
        anyhow::bail!(
            "--print-prompt shows a chat's rendering: give --chat, --system or a template"
        );
    };
    let r = client
        .apply_chat_template(pb::ApplyChatTemplateRequest {
            model: req.model,
            chat: Some(chat),
            chat_template: req.chat_template,
            chat_template_jinja: req.chat_template_jinja,
            tools: req.tools,
        })
        .await?;
    print!("{}", r.prompt);
    eprintln!("[{} tokens]", r.token_ids.len());
    Ok(())
}
