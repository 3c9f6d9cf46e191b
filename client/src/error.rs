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
