//! The broker's error: a reply code (the AMQP 0-9-1 taxonomy, which STOMP
//! also reports in its ERROR frames as RabbitMQ does) and its scope.

use sluice_codecs::amqp::reply_code as code;

/// An error that closes a channel or a whole connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    /// AMQP reply code (403, 404, 406, 503, ...).
    pub code: u16,
    /// Human-readable text, prefixed with the code's name as RabbitMQ does
    /// ("NOT_FOUND - no queue 'q' in vhost '/'").
    pub text: String,
    /// True for hard errors that close the connection.
    pub connection: bool,
}

impl BrokerError {
    /// A soft error: closes only the channel.
    pub fn channel(code: u16, detail: impl AsRef<str>) -> Self {
        BrokerError { code, text: format!("{} - {}", name(code), detail.as_ref()), connection: false }
    }
    /// A hard error: closes the connection.
    pub fn connection(code: u16, detail: impl AsRef<str>) -> Self {
        BrokerError { code, text: format!("{} - {}", name(code), detail.as_ref()), connection: true }
    }
    pub fn access_refused(detail: impl AsRef<str>) -> Self {
        Self::channel(code::ACCESS_REFUSED, detail)
    }
    pub fn not_found(detail: impl AsRef<str>) -> Self {
        Self::channel(code::NOT_FOUND, detail)
    }
    pub fn precondition(detail: impl AsRef<str>) -> Self {
        Self::channel(code::PRECONDITION_FAILED, detail)
    }
    pub fn internal(detail: impl AsRef<str>) -> Self {
        Self::connection(code::INTERNAL_ERROR, detail)
    }
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

impl std::error::Error for BrokerError {}

impl From<sluice_cluster::Error> for BrokerError {
    fn from(e: sluice_cluster::Error) -> Self {
        use sluice_cluster::Error as E;
        match e {
            E::QueueDeleted => BrokerError::not_found("queue was deleted"),
            E::ExclusiveConsumer => BrokerError::access_refused("queue in exclusive use"),
            E::ShuttingDown => BrokerError::connection(code::CONNECTION_FORCED, "broker shutting down"),
            // The broker cannot keep what the client asked it to keep.
            E::Storage(e) => BrokerError::connection(code::RESOURCE_ERROR, format!("storage failed: {e}")),
            E::StorageFailed(e) => BrokerError::connection(code::RESOURCE_ERROR, format!("storage failed: {e}")),
            other => BrokerError::internal(other.to_string()),
        }
    }
}

/// The spec's name of a reply code.
pub fn name(c: u16) -> &'static str {
    match c {
        200 => "OK",
        311 => "CONTENT_TOO_LARGE",
        312 => "NO_ROUTE",
        313 => "NO_CONSUMERS",
        320 => "CONNECTION_FORCED",
        402 => "INVALID_PATH",
        403 => "ACCESS_REFUSED",
        404 => "NOT_FOUND",
        405 => "RESOURCE_LOCKED",
        406 => "PRECONDITION_FAILED",
        501 => "FRAME_ERROR",
        502 => "SYNTAX_ERROR",
        503 => "COMMAND_INVALID",
        504 => "CHANNEL_ERROR",
        505 => "UNEXPECTED_FRAME",
        506 => "RESOURCE_ERROR",
        530 => "NOT_ALLOWED",
        540 => "NOT_IMPLEMENTED",
        541 => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}
