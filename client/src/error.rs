pub use llama_agent_proto::code_name;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {0}")]
    InvalidEndpoint(String),
    #[error("{} ({})", .0.message(), code_name(.0.code()))]
    Status(tonic::Status),
    #[error("the server closed the stream without a final message")]
    Incomplete,
}

impl ClientError {
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::Status(s) => s.code(),
            ClientError::InvalidEndpoint(_) => tonic::Code::InvalidArgument,
            ClientError::Incomplete => tonic::Code::Unavailable,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        // tonic reports its own client-side deadline as CANCELLED "Timeout expired"; callers
        // (and gRPC everywhere else) call that DEADLINE_EXCEEDED.
        if s.code() == tonic::Code::Cancelled
            && s.message() == tonic::TimeoutExpired(()).to_string()
        {
            return ClientError::Status(tonic::Status::deadline_exceeded(
                "the deadline passed before the server answered",
            ));
        }
        ClientError::Status(s)
    }
}

/// Why a session, a tool server or the agent loop failed (a tool that fails is not an error:
/// the model reads its message).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("session file {path}: {source}")]
    SessionIo {
        path: String,
        source: std::io::Error,
    },
    #[error("session file {path} is not a session: {source}")]
    SessionParse {
        path: String,
        source: serde_json::Error,
    },
    #[error(
        "session file {path} has format {found}; this version reads format {}",
        crate::session::SESSION_FORMAT
    )]
    SessionFormat { path: String, found: u32 },
    #[error("MCP server {server}: {reason}")]
    McpCommand {
        server: String,
        reason: &'static str,
    },
    #[error("MCP server {server} could not be started: {source}")]
    McpSpawn {
        server: String,
        source: std::io::Error,
    },
    #[error("MCP server {server}: {message}")]
    McpServer { server: String, message: String },
    #[error(
        "tool `{name}` is offered by two MCP servers, {first} and {second}; connect one of them"
    )]
    ToolNameClash {
        name: String,
        first: String,
        second: String,
    },
    #[error("generation failed: {0}")]
    Generate(#[from] ClientError),
}
