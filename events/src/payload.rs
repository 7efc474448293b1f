use serde::{Deserialize, Serialize};

use crate::EventType;

/// What happened. One variant per event type; names are past tense.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    SessionOpened(SessionOpened),
    AuthenticationFailed(AuthenticationFailed),
    CommandReceived(CommandReceived),
    SessionClosed(SessionClosed),
}

impl Payload {
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::SessionOpened(_) => EventType::SessionOpened,
            Payload::AuthenticationFailed(_) => EventType::AuthenticationFailed,
            Payload::CommandReceived(_) => EventType::CommandReceived,
            Payload::SessionClosed(_) => EventType::SessionClosed,
        }
    }
}

/// A client authenticated and the worker reached the target on its behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOpened {
    /// Client address as seen by the worker (`ip:port`).
    pub client_addr: String,
    /// Whether the client hop is encrypted.
    pub client_tls: bool,
    /// Whether the worker-to-target hop is encrypted.
    pub target_tls: bool,
    /// `application_name` from the client's startup message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// The token's expiry (seconds since the epoch); the session ends then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<i64>,
}

/// A connection attempt was refused before a session opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthenticationFailed {
    pub client_addr: String,
    pub client_tls: bool,
    /// The `user` the client claimed in its startup message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_user: Option<String>,
    /// The `database` (target) the client asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_target: Option<String>,
    /// A stable machine-readable reason, e.g. `token_expired`, `bad_signature`.
    pub reason: String,
}

/// Which Postgres sub-protocol carried a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// A `Query` message (may hold several statements).
    Simple,
    /// An `Execute` of a bound portal.
    Extended,
}

/// A command arrived and is about to be forwarded to the target. Published and
/// acknowledged before the command reaches the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReceived {
    pub protocol: Protocol,
    /// The statement text as the client sent it.
    pub statement: String,
    /// Prepared-statement name for extended-protocol commands (`""` is the
    /// unnamed statement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_name: Option<String>,
    /// Portal name for extended-protocol commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal: Option<String>,
    /// Bound parameter values, for extended-protocol commands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Param>,
}

/// Format of a bound parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamFormat {
    Text,
    /// Binary values are carried base64-encoded.
    Binary,
}

/// One bound parameter; `value: None` is SQL NULL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    pub format: ParamFormat,
    pub value: Option<String>,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client sent `Terminate`.
    ClientTerminated,
    /// The client connection dropped without `Terminate`.
    ClientDisconnected,
    /// The target closed the connection.
    TargetDisconnected,
    /// The token expired during the session.
    TokenExpired,
    /// The worker shut down.
    WorkerShutdown,
    /// A protocol or I/O error ended the session.
    Error,
}

/// A session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClosed {
    pub reason: CloseReason,
    /// Commands recorded in the session.
    pub commands: u64,
    /// Bytes received from the client.
    pub bytes_from_client: u64,
    /// Bytes sent to the client.
    pub bytes_to_client: u64,
    pub duration_ms: u64,
}
