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
        ClientError::Status(s)
    }
}

/// The canonical upper-case name operators know from grpcurl (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
