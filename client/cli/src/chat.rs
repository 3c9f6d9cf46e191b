//! `llama-cli chat`: an interactive chat in the terminal. Answers stream as they come, tool
//! calls show as they run, Ctrl-C stops the current answer (not the program), and with
//! `--session FILE` the conversation is saved after every turn and resumed from it.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use llama_agent_client::agent::{Agent, AgentEvent, Finish};
use llama_agent_client::mcp::shown;
use llama_agent_client::session::{Role, Session};
use llama_agent_client::LoaderClient;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentArgs;

#[derive(clap::Args, Debug)]
pub struct ChatCmd {
    #[command(flatten)]
    pub common: AgentArgs,
    /// Resume the conversation from this file (when it exists) and save it after each turn.
    #[arg(long, value_name = "FILE")]
    pub session: Option<PathBuf>,
}

const HELP: &str = "/tools lists the tools, /clear forgets the conversation (keeps the system \
message), /exit (or Ctrl-D) quits; Ctrl-C stops an answer.";

/// The prompt printed before each user line.
const PROMPT: &str = "> ";

pub async fn run(
    cmd: ChatCmd,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    let args = &cmd.common;
    args.validate()?;
    let (mut session, resumed) = match &cmd.session {
        Some(path) => match Session::load(path)? {
            Some(s) => (s, true),
            None => (Session::new(""), false),
        },
        None => (Session::new(""), false),
    };
    args.apply(&mut session)?;
    // Tools first: a server that does not start fails before a model is loaded.
    let tools = args.connect_tools(&mut session).await?;
    let generator = args.generator(loader).await?;

    let mut out = std::io::stdout();
    if resumed {
        let turns = session
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count();
        writeln!(
            out,
            "Resumed {} messages ({turns} turns) from {}.",
            session.messages.len(),
            cmd.session
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )?;
    }
    let names: Vec<_> = session.tools.iter().map(|t| t.name.as_str()).collect();
    writeln!(
        out,
        "Chat with {} ({} tools). {HELP}",
        shown(&session.model, 80),
        names.len()
    )?;

    // Ctrl-C cancels the answer in progress; between answers it only says how to quit.
    let current: Arc<Mutex<Option<CancellationToken>>> = Arc::new(Mutex::new(None));
    let watcher = {
        let current = current.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                let token = current.lock().ok().and_then(|mut c| c.take());
                match token {
                    Some(t) => t.cancel(),
                    None => {
                        print!("\n(/exit or Ctrl-D quits)\n{PROMPT}");
                        let _ = std::io::stdout().flush();
                    }
                }
            }
        })
    };

    // Lines are read on a thread (stdin blocks); one line at a time is handed over, as the
    // chat takes it, so the channel holds at most one.
    let (line_tx, mut lines) = tokio::sync::mpsc::channel::<String>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });

    let agent = Agent {
        generator: &generator,
        tools: tools.as_ref(),
        max_steps: args.max_steps,
    };
    let result = async {
        loop {
            write!(out, "{PROMPT}")?;
            out.flush()?;
            let Some(line) = lines.recv().await else {
                writeln!(out)?;
                return anyhow::Ok(());
            };
            let line = line.trim();
            match line {
                "" => continue,
                "/exit" | "/quit" => return Ok(()),
                "/help" => {
                    writeln!(out, "{HELP}")?;
                    continue;
                }
                "/tools" => {
                    match &tools {
                        Some(t) => {
                            for (name, server) in t.tools_by_server() {
                                writeln!(out, "  {name}  ({server})")?;
                            }
                        }
                        None => writeln!(out, "  no tools: start with --mcp-server or --mcp-url")?,
                    }
                    continue;
                }
                "/clear" => {
                    session.messages.retain(|m| m.role == Role::System);
                    save(&session, &cmd.session)?;
                    writeln!(out, "(conversation cleared)")?;
                    continue;
                }
                _ => {}
            }
            session.push_user(line.to_string());
            let cancel = CancellationToken::new();
            if let Ok(mut c) = current.lock() {
                *c = Some(cancel.clone());
            }
            let mut sink = |event: AgentEvent| {
                let mut out = std::io::stdout();
                let _ = match event {
                    AgentEvent::Text(t) => write!(out, "{t}"),
                    AgentEvent::ToolCall(c) => writeln!(
                        out,
                        "\n[calling {} {}]",
                        c.name,
                        shown(&c.arguments.to_string(), 300)
                    ),
                    AgentEvent::ToolResult { name, outcome, .. } => writeln!(
                        out,
                        "[{} {}: {}]",
                        name,
                        if outcome.is_error {
                            "failed"
                        } else {
                            "returned"
                        },
                        shown(&outcome.content, 300)
                    ),
                };
                let _ = out.flush();
            };
            let answered = agent.run(&mut session, &cancel, &mut sink).await;
            if let Ok(mut c) = current.lock() {
                *c = None;
            }
            match answered {
                Ok(o) => match o.finish {
                    Finish::Cancelled => writeln!(out, "\n[stopped]")?,
                    Finish::MaxSteps => writeln!(
                        out,
                        "\n[the answer reached --max-steps {} while still calling tools]",
                        args.max_steps
                    )?,
                    f => {
                        writeln!(out)?;
                        if f.name() != "STOP" && f.name() != "STOP_SEQUENCE" {
                            writeln!(out, "[finish {}]", f.name())?;
                        }
                    }
                },
                // The turn failed (the generator refused it, or went away): say so, drop
                // the question from the history, and let the user go on.
                Err(e) => {
                    writeln!(out, "\n[error: {e}]")?;
                    if session
                        .messages
                        .last()
                        .is_some_and(|m| m.role == Role::User)
                    {
                        session.messages.pop();
                    }
                }
            }
            save(&session, &cmd.session)?;
        }
    }
    .await;
    watcher.abort();
    if let Some(t) = tools {
        t.close().await;
    }
    result
}

fn save(session: &Session, path: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(p) = path {
        session
            .save(p)
            .with_context(|| "saving the session".to_string())?;
    }
    Ok(())
}
