//! MCP (Model Context Protocol) tool servers through the official SDK (rmcp): stdio servers
//! spawned from a command line, and streamable-HTTP servers at a URL. Their tools are offered
//! to the model under one namespace; a call runs with a timeout, and a server that died is
//! started (or reconnected) again once before the call is retried.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceError, ServiceExt};
use tokio::io::AsyncBufReadExt;

use crate::session::ToolSpec;
use crate::AgentError;

/// A tool's answer beyond this many bytes is cut: it goes back into the model's context.
pub const MAX_TOOL_OUTPUT: usize = 64 * 1024;
/// Lines of a stdio server's stderr kept to explain why it failed.
const STDERR_TAIL_LINES: usize = 20;
/// Longest stderr line kept (a server may print anything).
const STDERR_LINE_BYTES: usize = 400;
/// Tool names the generator accepts: letters, digits, `_` and `-`, at most this long.
const MAX_TOOL_NAME: usize = 64;

/// Where a tool server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerSpec {
    /// A command line (`CMD ARGS`, with '...' or "..." quoting) speaking MCP on stdin/stdout.
    Stdio(String),
    /// A streamable-HTTP endpoint (`http://host:port/mcp`).
    Http(String),
}

impl ServerSpec {
    /// How messages name the server (bounded: the spec is user input).
    pub fn label(&self) -> String {
        match self {
            ServerSpec::Stdio(cmd) => format!("`{}`", shown(cmd, 80)),
            ServerSpec::Http(url) => format!("<{}>", shown(url, 80)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct McpOptions {
    /// How long one tool call may take.
    pub call_timeout: Duration,
    /// How long a server may take to start and answer `initialize` and `tools/list`.
    pub connect_timeout: Duration,
}

impl Default for McpOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// What a tool call gave back: its text, and whether it is an error (a tool that failed,
/// timed out, or does not exist; the model reads it all the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolOutcome {
    pub content: String,
    pub is_error: bool,
}

impl ToolOutcome {
    pub fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
        }
    }
}

type Service = Arc<RunningService<RoleClient, ()>>;

struct Connection {
    service: Option<Service>,
    /// Bumped at each restart, so calls that failed together restart the server once.
    generation: u64,
    stderr: Arc<StdMutex<VecDeque<String>>>,
}

struct Server {
    spec: ServerSpec,
    label: String,
    connection: tokio::sync::Mutex<Connection>,
}

struct ToolEntry {
    spec: ToolSpec,
    server: usize,
    /// The server's own name (the exposed name may differ: see `tool_name`).
    remote: String,
}

/// The connected servers and their tools.
pub struct McpTools {
    servers: Vec<Server>,
    tools: Vec<ToolEntry>,
    options: McpOptions,
}

impl McpTools {
    /// Starts or connects every server and lists their tools. Names must be unique across
    /// servers: two servers offering the same name are refused, naming both.
    pub async fn connect(specs: &[ServerSpec], options: McpOptions) -> Result<Self, AgentError> {
        let connected = futures::future::join_all(
            specs
                .iter()
                .map(|spec| connect_and_list(spec, options.connect_timeout)),
        )
        .await;
        let mut servers = Vec::new();
        let mut tools: Vec<ToolEntry> = Vec::new();
        for (i, (spec, result)) in specs.iter().zip(connected).enumerate() {
            let (service, stderr, listed) = result?;
            for tool in listed {
                let name = tool_name(&tool.name);
                if let Some(other) = tools.iter().find(|t| t.spec.name == name) {
                    return Err(AgentError::ToolNameClash {
                        name,
                        first: servers_label(specs, other.server),
                        second: spec.label(),
                    });
                }
                tools.push(ToolEntry {
                    spec: ToolSpec {
                        name,
                        description: tool.description.as_deref().unwrap_or_default().to_string(),
                        parameters: serde_json::Value::Object((*tool.input_schema).clone()),
                    },
                    server: i,
                    remote: tool.name.to_string(),
                });
            }
            servers.push(Server {
                spec: spec.clone(),
                label: spec.label(),
                connection: tokio::sync::Mutex::new(Connection {
                    service: Some(Arc::new(service)),
                    generation: 0,
                    stderr,
                }),
            });
        }
        Ok(Self {
            servers,
            tools,
            options,
        })
    }

    /// The tools, as the session offers them to the model.
    pub fn tool_specs(&self) -> Vec<ToolSpec> {
        self.tools.iter().map(|t| t.spec.clone()).collect()
    }

    /// Each tool's name and the server that serves it.
    pub fn tools_by_server(&self) -> Vec<(String, String)> {
        self.tools
            .iter()
            .map(|t| (t.spec.name.clone(), self.servers[t.server].label.clone()))
            .collect()
    }

    /// Calls tool `name`. Every failure (unknown tool, arguments not an object, timeout, MCP
    /// error, a server that died twice) is an error outcome, for the model to read.
    pub async fn call(&self, name: &str, arguments: &serde_json::Value) -> ToolOutcome {
        let Some(entry) = self.tools.iter().find(|t| t.spec.name == name) else {
            let known: Vec<_> = self.tools.iter().map(|t| t.spec.name.as_str()).collect();
            return ToolOutcome::error(format!(
                "there is no tool named `{}`; the tools are: {}",
                shown(name, MAX_TOOL_NAME),
                known.join(", ")
            ));
        };
        let arguments = match arguments {
            serde_json::Value::Object(map) => map.clone(),
            serde_json::Value::Null => serde_json::Map::new(),
            _ => {
                return ToolOutcome::error(format!(
                    "the arguments of `{name}` must be a JSON object"
                ))
            }
        };
        let server = &self.servers[entry.server];
        let params = CallToolRequestParams::new(entry.remote.clone()).with_arguments(arguments);
        let (service, generation) = match self.current(server).await {
            Ok(s) => s,
            Err(e) => return ToolOutcome::error(e),
        };
        match self.call_once(&service, params.clone()).await {
            Ok(outcome) => outcome,
            Err(Failure::Closed(why)) => {
                // The server died (or dropped the connection): start it again, retry once.
                drop(service);
                let service = match self.restart(server, generation).await {
                    Ok(s) => s,
                    Err(e) => return ToolOutcome::error(format!("tool `{name}`: {why}; {e}")),
                };
                match self.call_once(&service, params).await {
                    Ok(outcome) => outcome,
                    Err(f) => ToolOutcome::error(format!(
                        "tool `{name}` failed again after {} was restarted: {}",
                        server.label,
                        f.message(self.options.call_timeout)
                    )),
                }
            }
            Err(f) => ToolOutcome::error(format!(
                "tool `{name}` failed: {}",
                f.message(self.options.call_timeout)
            )),
        }
    }

    async fn call_once(
        &self,
        service: &Service,
        params: CallToolRequestParams,
    ) -> Result<ToolOutcome, Failure> {
        // Dropping the call on timeout sends the server `notifications/cancelled`.
        match tokio::time::timeout(self.options.call_timeout, service.call_tool(params)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Ok(result)) => Ok(outcome(result)),
            Ok(Err(ServiceError::McpError(e))) => Err(Failure::Mcp(e.message.to_string())),
            Ok(Err(e)) if service.is_closed() || service.is_transport_closed() => {
                Err(Failure::Closed(format!("the server closed ({e})")))
            }
            Ok(Err(e @ (ServiceError::TransportClosed | ServiceError::TransportSend(_)))) => {
                Err(Failure::Closed(format!("the connection broke ({e})")))
            }
            Ok(Err(e)) => Err(Failure::Mcp(e.to_string())),
        }
    }

    /// The server's live connection, started again if an earlier restart failed.
    async fn current(&self, server: &Server) -> Result<(Service, u64), String> {
        let generation = {
            let c = server.connection.lock().await;
            if let Some(s) = &c.service {
                return Ok((s.clone(), c.generation));
            }
            c.generation
        };
        self.restart(server, generation)
            .await
            .map(|s| (s, generation + 1))
    }

    /// Starts the server again unless a concurrent call already did (its generation moved).
    async fn restart(&self, server: &Server, seen: u64) -> Result<Service, String> {
        let mut c = server.connection.lock().await;
        if c.generation != seen {
            if let Some(s) = &c.service {
                return Ok(s.clone());
            }
        }
        c.service = None;
        c.generation = seen + 1;
        tracing::warn!(server = %server.label, "restarting the MCP server");
        match connect(&server.spec, self.options.connect_timeout).await {
            Ok((service, stderr)) => {
                let service = Arc::new(service);
                c.service = Some(service.clone());
                c.stderr = stderr;
                Ok(service)
            }
            Err(e) => Err(format!("restarting it failed: {e}")),
        }
    }

    /// Closes every connection; stdio servers get their stdin closed, then SIGTERM, then
    /// SIGKILL (rmcp's shutdown sequence).
    pub async fn close(self) {
        for server in self.servers {
            let service = server.connection.into_inner().service;
            if let Some(service) = service.and_then(|s| Arc::try_unwrap(s).ok()) {
                let _ = service.cancel().await;
            }
        }
    }

    /// The last lines a stdio server wrote on stderr (for error messages).
    pub async fn stderr_tail(&self, tool: &str) -> Vec<String> {
        let Some(entry) = self.tools.iter().find(|t| t.spec.name == tool) else {
            return Vec::new();
        };
        let c = self.servers[entry.server].connection.lock().await;
        let lines = c.stderr.lock().map(|l| l.iter().cloned().collect());
        lines.unwrap_or_default()
    }
}

enum Failure {
    Timeout,
    Closed(String),
    Mcp(String),
}

impl Failure {
    fn message(&self, timeout: Duration) -> String {
        match self {
            Failure::Timeout => format!("no answer within {} s", timeout.as_secs_f64()),
            Failure::Closed(m) | Failure::Mcp(m) => m.clone(),
        }
    }
}

fn servers_label(specs: &[ServerSpec], i: usize) -> String {
    specs.get(i).map(ServerSpec::label).unwrap_or_default()
}

type Listed = (
    RunningService<RoleClient, ()>,
    Arc<StdMutex<VecDeque<String>>>,
    Vec<rmcp::model::Tool>,
);

async fn connect_and_list(spec: &ServerSpec, timeout: Duration) -> Result<Listed, AgentError> {
    let (service, stderr) = connect(spec, timeout).await?;
    let listed = match tokio::time::timeout(timeout, service.list_all_tools()).await {
        Ok(Ok(tools)) => tools,
        Ok(Err(e)) => {
            return Err(AgentError::McpServer {
                server: spec.label(),
                message: format!("listing its tools failed: {e}"),
            })
        }
        Err(_) => {
            return Err(AgentError::McpServer {
                server: spec.label(),
                message: format!("it did not list its tools within {} s", timeout.as_secs()),
            })
        }
    };
    Ok((service, stderr, listed))
}

/// Starts (stdio) or reaches (HTTP) a server and completes MCP's `initialize`.
async fn connect(
    spec: &ServerSpec,
    timeout: Duration,
) -> Result<
    (
        RunningService<RoleClient, ()>,
        Arc<StdMutex<VecDeque<String>>>,
    ),
    AgentError,
> {
    let stderr = Arc::new(StdMutex::new(VecDeque::new()));
    let server = spec.label();
    let handshake = match spec {
        ServerSpec::Stdio(line) => {
            let words = split_command(line).map_err(|reason| AgentError::McpCommand {
                server: server.clone(),
                reason,
            })?;
            let mut cmd = tokio::process::Command::new(&words[0]);
            cmd.args(&words[1..]).kill_on_drop(true);
            // Its own process group: Ctrl-C in the terminal stops an answer, not the tools.
            #[cfg(unix)]
            cmd.process_group(0);
            let (transport, err) = TokioChildProcess::builder(cmd)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|source| AgentError::McpSpawn {
                    server: server.clone(),
                    source,
                })?;
            if let Some(err) = err {
                tokio::spawn(keep_tail(err, stderr.clone(), server.clone()));
            }
            tokio::time::timeout(timeout, ().serve(transport)).await
        }
        ServerSpec::Http(url) => {
            let transport = StreamableHttpClientTransport::from_uri(url.as_str());
            tokio::time::timeout(timeout, ().serve(transport)).await
        }
    };
    let tail = |stderr: &Arc<StdMutex<VecDeque<String>>>| {
        let lines: Vec<String> = stderr
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends with:\n  {}", lines.join("\n  "))
        }
    };
    match handshake {
        Ok(Ok(service)) => Ok((service, stderr)),
        Ok(Err(e)) => {
            // Let the reader catch the last words of a server that exited.
            tokio::task::yield_now().await;
            Err(AgentError::McpServer {
                server,
                message: format!("MCP initialization failed: {e}{}", tail(&stderr)),
            })
        }
        Err(_) => Err(AgentError::McpServer {
            server,
            message: format!(
                "no MCP initialization within {} s{}",
                timeout.as_secs(),
                tail(&stderr)
            ),
        }),
    }
}

/// Keeps the last lines of a server's stderr (bounded), logged at debug.
async fn keep_tail(
    stderr: tokio::process::ChildStderr,
    tail: Arc<StdMutex<VecDeque<String>>>,
    server: String,
) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(server = %server, "{line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(shown(&line, STDERR_LINE_BYTES));
        }
    }
}

/// A call's content as text: text blocks as they are, other blocks as their JSON, the
/// structured result when there is no content; cut at `MAX_TOOL_OUTPUT`.
fn outcome(r: CallToolResult) -> ToolOutcome {
    let mut parts: Vec<String> = r
        .content
        .iter()
        .map(|block| match block.as_text() {
            Some(t) => t.text.clone(),
            None => serde_json::to_string(block).unwrap_or_default(),
        })
        .collect();
    if parts.is_empty() {
        if let Some(s) = &r.structured_content {
            parts.push(s.to_string());
        }
    }
    let mut content = parts.join("\n");
    if content.len() > MAX_TOOL_OUTPUT {
        let cut = floor_char_boundary(&content, MAX_TOOL_OUTPUT);
        let dropped = content.len() - cut;
        content.truncate(cut);
        content.push_str(&format!("\n[... {dropped} more bytes cut]"));
    }
    ToolOutcome {
        content,
        is_error: r.is_error.unwrap_or(false),
    }
}

/// The name a server's tool gets: characters the generator does not accept become `_`, and
/// it is cut at 64 characters.
pub fn tool_name(remote: &str) -> String {
    remote
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_TOOL_NAME)
        .collect()
}

/// Splits `CMD ARGS` into words as a shell would for plain words, '...' and "..." (with \
/// escapes outside single quotes); no variables, globs or pipes.
pub fn split_command(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("a ' quote is not closed"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => return Err("it ends with a \\"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("a \" quote is not closed"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("it ends with a \\"),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err("the command is empty");
    }
    Ok(words)
}

/// `s` cut to about `max` bytes for a message (user input is never echoed whole).
pub fn shown(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}...", &s[..floor_char_boundary(s, max)])
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_like_a_shell_for_plain_and_quoted_words() {
        assert_eq!(
            split_command("mcp-server-time --local-timezone UTC").unwrap(),
            ["mcp-server-time", "--local-timezone", "UTC"]
        );
        assert_eq!(
            split_command(r#"  srv --db-path '/tmp/a b.db' --x "q\"uote" a\ b "" "#).unwrap(),
            [
                "srv",
                "--db-path",
                "/tmp/a b.db",
                "--x",
                "q\"uote",
                "a b",
                ""
            ]
        );
        assert!(split_command("   ").is_err());
        assert!(split_command("srv 'open").is_err());
        assert!(split_command("srv \"open").is_err());
        assert!(split_command("srv \\").is_err());
    }

    #[test]
    fn tool_names_fit_the_generator() {
        assert_eq!(tool_name("get_current-time2"), "get_current-time2");
        assert_eq!(tool_name("fs.read/file é"), "fs_read_file__");
        assert_eq!(tool_name(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn long_text_is_shown_cut_on_a_char_boundary() {
        assert_eq!(shown("short", 10), "short");
        let s = "é".repeat(50);
        let cut = shown(&s, 11);
        assert!(cut.ends_with("..."));
        assert_eq!(cut.trim_end_matches("...").chars().count(), 5);
    }

    #[test]
    fn results_become_text_and_are_bounded() {
        use rmcp::model::ContentBlock;
        let r = CallToolResult::success(vec![ContentBlock::text("a"), ContentBlock::text("b")]);
        assert_eq!(
            outcome(r),
            ToolOutcome {
                content: "a\nb".into(),
                is_error: false
            }
        );
        let r = CallToolResult::error(vec![ContentBlock::text("x".repeat(MAX_TOOL_OUTPUT + 10))]);
        let o = outcome(r);
        assert!(o.is_error);
        assert!(
            o.content.ends_with("[... 10 more bytes cut]"),
            "{}",
            &o.content[MAX_TOOL_OUTPUT..]
        );
    }
}
