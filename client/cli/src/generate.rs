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
    /// Print the final message (text, finish reason, usage, timings) as JSON instead.
    #[arg(long)]
    json: bool,
    /// Generator service (`host:port`). Without it the generator runs inside this process.
    #[arg(long, env = "LLAMA_GENERATOR_ENDPOINT")]
    generator_endpoint: Option<String>,
    /// Settings of the in-process generator (ignored with --generator-endpoint).
    #[command(flatten)]
    engine: GeneratorConfig,
}

impl GenerateArgs {
    fn request(&self) -> pb::GenerateRequest {
        let input = if self.system.is_some() || self.chat || self.chat_template.is_some() {
            let mut messages = Vec::new();
            if let Some(s) = &self.system {
                messages.push(pb::ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(pb::ChatMessage {
                role: "user".into(),
                content: self.prompt.clone(),
            });
            pb::generate_request::Input::Chat(pb::ChatMessages { messages })
        } else {
            pb::generate_request::Input::Prompt(self.prompt.clone())
        };
        pb::GenerateRequest {
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
        }
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
    let mut stream = std::pin::pin!(client.generate_stream(args.request(), None).await?);
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                if args.json {
                    text.push_str(&c.text);
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
                    let v = json!({
                        "text": text, "finish_reason": finish,
                        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                        "ttft_ms": t.ttft_ms, "queue_ms": t.queue_ms, "prompt_ms": t.prompt_ms,
                        "decode_ms": t.decode_ms, "decode_tokens_per_second": t.decode_tokens_per_second,
                        "model": d.model_reference, "model_md5": d.model_md5,
                    });
                    writeln!(stdout, "{v}")?;
                } else {
                    writeln!(stdout)?;
                    eprintln!(
                        "[{} prompt + {} generated tokens, finish {finish}, TTFT {:.0} ms, {:.1} tok/s]",
                        usage.prompt_tokens, usage.completion_tokens, t.ttft_ms, t.decode_tokens_per_second
                    );
                }
                return Ok(());
            }
            None => {}
        }
    }
    anyhow::bail!("the generator closed the stream without a final message")
}
