//! `llama-cli agent`: one task with MCP tools, the final answer on stdout (or one JSON line
//! per step with `--json`); and the settings it shares with `llama-cli chat`.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use llama_agent_client::agent::{Agent, AgentEvent, Finish};
use llama_agent_client::mcp::shown;
use llama_agent_client::session::{Sampling, Session, ToolChoice};
use llama_agent_client::{GeneratorClient, LoaderClient, McpOptions, McpTools, ServerSpec};
use llama_generator::GeneratorConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Settings of `agent` and `chat`: the model, its tools, sampling, where the generator is.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Model reference (`owner/repo`, `owner/repo:Q8_0`, a file, a local path).
    #[arg(long)]
    pub model: Option<String>,
    /// The system message.
    #[arg(long)]
    pub system: Option<String>,
    /// An MCP server to start, as a command line ('CMD ARGS'; repeatable).
    #[arg(long = "mcp-server", value_name = "CMD ARGS")]
    pub mcp_servers: Vec<String>,
    /// An MCP server over streamable HTTP (`http://host:port/mcp`; repeatable).
    #[arg(long = "mcp-url", value_name = "URL")]
    pub mcp_urls: Vec<String>,
    /// `auto`, `none`, `required`, or a tool's name (for the first step of each task; then auto).
    #[arg(long, value_name = "auto|none|required|NAME")]
    pub tool_choice: Option<String>,
    /// Generations per task at most (each answer that calls tools is one).
    #[arg(long, default_value_t = 8)]
    pub max_steps: u32,
    /// Seconds one tool call may take.
    #[arg(long, default_value_t = 60)]
    pub tool_timeout: u64,
    /// A llama.cpp built-in template (`gemma`, `chatml`, `llama3`, ...) instead of the model's.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Tokens per generation at most (default 512).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Same seed + same request = same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Let a generation that repeats itself run on (by default the generator ends it).
    #[arg(long)]
    pub no_repetition_stop: bool,
    /// Generator service (`host:port`, or replicas). Without it the generator runs inside
    /// this process.
    #[arg(long, env = "LLAMA_GENERATOR_ENDPOINT")]
    pub generator_endpoint: Option<String>,
    /// Settings of the in-process generator (ignored with --generator-endpoint; its
    /// --chat-template-file goes with each request, so it applies to a remote one too).
    #[command(flatten)]
    pub engine: GeneratorConfig,
}

#[derive(clap::Args, Debug)]
pub struct AgentCmd {
    #[command(flatten)]
    pub common: AgentArgs,
    /// The task.
    #[arg(long)]
    pub prompt: String,
    /// One JSON object per line per step: tool_call, tool_result, then final.
    #[arg(long)]
    pub json: bool,
}

const DEFAULT_MAX_TOKENS: u32 = 512;

impl AgentArgs {
    /// The checks that need no server: flags that cannot work together.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_steps == 0 {
            bail!("--max-steps must be at least 1");
        }
        if self.tool_timeout == 0 {
            bail!("--tool-timeout must be at least 1 second");
        }
        for url in &self.mcp_urls {
            if url.starts_with("https://") {
                bail!(
                    "--mcp-url {}: only http:// is supported (no TLS in this build)",
                    shown(url, 80)
                );
            }
            if !url.starts_with("http://") {
                bail!("--mcp-url {}: not an http:// URL", shown(url, 80));
            }
        }
        let no_servers = self.mcp_servers.is_empty() && self.mcp_urls.is_empty();
        if let Some(choice) = &self.tool_choice {
            if no_servers && choice != "none" && choice != "auto" {
                bail!(
                    "--tool-choice {} needs tools: give --mcp-server or --mcp-url",
                    shown(choice, 64)
                );
            }
        }
        Ok(())
    }

    /// Applies the flags to a session (new or resumed): flags given win over the file.
    pub fn apply(&self, session: &mut Session) -> anyhow::Result<()> {
        if let Some(m) = &self.model {
            session.model = m.clone();
        }
        if session.model.is_empty() {
            bail!("--model is required");
        }
        if let Some(t) = &self.chat_template {
            session.chat_template = Some(t.clone());
        }
        if let Some(path) = &self.engine.chat_template_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--chat-template-file {}", path.display()))?;
            session.chat_template_jinja = Some(text);
        }
        let s = &mut session.sampling;
        let given = Sampling {
            temperature: self.temperature.or(s.temperature),
            top_k: self.top_k.or(s.top_k),
            top_p: self.top_p.or(s.top_p),
            min_p: self.min_p.or(s.min_p),
            repeat_penalty: self.repeat_penalty.or(s.repeat_penalty),
            seed: self.seed.or(s.seed),
        };
        *s = given;
        session.max_tokens = match (self.max_tokens, session.max_tokens) {
            (Some(n), _) => n,
            (None, 0) => DEFAULT_MAX_TOKENS,
            (None, n) => n,
        };
        if !self.stop.is_empty() {
            session.stop = self.stop.clone();
        }
        session.stop_on_repetition = !self.no_repetition_stop;
        if let Some(c) = &self.tool_choice {
            session.tool_choice = ToolChoice::parse(c);
        }
        if let Some(system) = &self.system {
            set_system(session, system);
        }
        Ok(())
    }

    /// The MCP servers the flags name, connected, with the session's tools set from them.
    pub async fn connect_tools(&self, session: &mut Session) -> anyhow::Result<Option<McpTools>> {
        let specs: Vec<ServerSpec> = self
            .mcp_servers
            .iter()
            .map(|c| ServerSpec::Stdio(c.clone()))
            .chain(self.mcp_urls.iter().map(|u| ServerSpec::Http(u.clone())))
            .collect();
        if specs.is_empty() {
            session.tools.clear();
            if matches!(
                session.tool_choice,
                ToolChoice::Required | ToolChoice::Function(_)
            ) {
                session.tool_choice = ToolChoice::Auto;
            }
            return Ok(None);
        }
        let options = McpOptions {
            call_timeout: Duration::from_secs(self.tool_timeout),
            ..McpOptions::default()
        };
        let tools = McpTools::connect(&specs, options).await?;
        session.tools = tools.tool_specs();
        if let ToolChoice::Function(name) = &session.tool_choice {
            if !session.tools.iter().any(|t| &t.name == name) {
                let names: Vec<_> = session.tools.iter().map(|t| t.name.as_str()).collect();
                let (name, names) = (shown(name, 64), names.join(", "));
                tools.close().await;
                bail!("--tool-choice {name}: no tool has that name (the tools are: {names})");
            }
        }
        Ok(Some(tools))
    }

    /// The remote generator, or one started in this process on the same code.
    pub async fn generator(
        &self,
        loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
    ) -> anyhow::Result<GeneratorClient> {
        Ok(match &self.generator_endpoint {
            Some(ep) => GeneratorClient::connect(ep)?,
            None => GeneratorClient::new(
                llama_generator::in_process(&self.engine, loader().await?).await?,
            ),
        })
    }
}

/// The session's system message becomes `text` (the first message, as templates want it).
pub fn set_system(session: &mut Session, text: &str) {
    use llama_agent_client::session::{Message, Role};
    match session.messages.first_mut() {
        Some(m) if m.role == Role::System => m.content = text.to_string(),
        _ => session.messages.insert(
            0,
            Message {
                role: Role::System,
                content: text.to_string(),
                tool_calls: Vec::new(),
                tool_call_id: None,
                name: None,
            },
        ),
    }
}

pub async fn run(
    cmd: AgentCmd,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    let args = &cmd.common;
    args.validate()?;
    let mut session = Session::new("");
    args.apply(&mut session)?;
    session.push_user(cmd.prompt.clone());
    // Tools first: a server that does not start fails before a model is loaded.
    let tools = args.connect_tools(&mut session).await?;
    let generator = args.generator(loader).await?;
    let agent = Agent {
        generator: &generator,
        tools: tools.as_ref(),
        max_steps: args.max_steps,
    };
    let json = cmd.json;
    let mut stdout = std::io::stdout();
    let mut sink = |event: AgentEvent| {
        let line = match event {
            AgentEvent::Text(_) => return,
            AgentEvent::ToolCall(c) => {
                if !json {
                    eprintln!(
                        "[tool call] {} {}",
                        c.name,
                        shown(&c.arguments.to_string(), 400)
                    );
                    return;
                }
                json!({"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments})
            }
            AgentEvent::ToolResult { id, name, outcome } => {
                if !json {
                    let what = if outcome.is_error {
                        "tool error"
                    } else {
                        "tool result"
                    };
                    eprintln!("[{what}] {name}: {}", shown(&outcome.content, 400));
                    return;
                }
                json!({"type": "tool_result", "id": id, "name": name,
                       "is_error": outcome.is_error, "content": outcome.content})
            }
        };
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    };
    let cancel = CancellationToken::new();
    let result = agent.run(&mut session, &cancel, &mut sink).await;
    if let Some(t) = tools {
        t.close().await;
    }
    let out = result?;
    if json {
        let line = json!({
            "type": "final", "text": out.text, "finish_reason": out.finish.name(),
            "steps": out.steps, "prompt_tokens": out.prompt_tokens,
            "cached_prompt_tokens": out.cached_prompt_tokens,
            "completion_tokens": out.completion_tokens,
        });
        writeln!(stdout, "{line}")?;
    } else {
        writeln!(stdout, "{}", out.text)?;
        eprintln!(
            "[{} steps, {} prompt ({} cached) + {} generated tokens, finish {}]",
            out.steps,
            out.prompt_tokens,
            out.cached_prompt_tokens,
            out.completion_tokens,
            out.finish.name()
        );
    }
    if out.finish == Finish::MaxSteps {
        bail!(
            "the agent reached --max-steps {} while the model was still calling tools",
            args.max_steps
        );
    }
    Ok(())
}
