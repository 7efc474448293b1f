use serde::{Deserialize, Serialize};

use crate::EventType;

/// What happened. One variant per event type; names are past tense.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    SessionOpened(SessionOpened),
    AuthenticationFailed(AuthenticationFailed),
    CommandReceived(CommandReceived),
    SessionClosed(SessionClosed),
    PolicyBundlePublished(PolicyBundlePublished),
    IdentityRevoked(IdentityRevoked),
    IdentityReinstated(IdentityReinstated),
    ResponseRecorded(ResponseRecorded),
}

impl Payload {
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::SessionOpened(_) => EventType::SessionOpened,
            Payload::AuthenticationFailed(_) => EventType::AuthenticationFailed,
            Payload::CommandReceived(_) => EventType::CommandReceived,
            Payload::SessionClosed(_) => EventType::SessionClosed,
            Payload::PolicyBundlePublished(_) => EventType::PolicyBundlePublished,
            Payload::IdentityRevoked(_) => EventType::IdentityRevoked,
            Payload::IdentityReinstated(_) => EventType::IdentityReinstated,
            Payload::ResponseRecorded(_) => EventType::ResponseRecorded,
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
    /// The prepared statements this command runs by name (a SQL `EXECUTE`,
    /// or an extended-protocol `Execute` of a statement that is itself an
    /// `EXECUTE`), each with the text it was prepared from, as the worker
    /// saw the server accept it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executes: Vec<ExecutedStatement>,
    /// The policy decision on the command (absent in events from workers
    /// that did not decide yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionRecord>,
    /// Secrets withheld from `statement` and `params` (each replaced by
    /// `'[redacted]'`), in order: what they were, never their content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redactions: Vec<Redaction>,
    /// The approval the command waited for, and how it ended (the command
    /// ran only if it was granted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::approval::ApprovalLink>,
}

/// A prepared statement run by name, and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutedStatement {
    pub name: String,
    pub text: String,
    /// Secrets withheld from `text`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redactions: Vec<Redaction>,
}

/// A secret the worker did not record: a value in a statement's text (a
/// password in role DDL, the value of a setting named like a secret, a
/// connection string with a password), a bound parameter that takes one,
/// or a whole text it could not read token by token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    /// `secret_value`, `connection_string` or `unreadable_text`.
    pub kind: String,
    /// The parameter (`$n`, from 1) whose bound value was withheld; absent
    /// for a value in the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<u32>,
}

/// The outcome of a policy decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionEffect {
    Allow,
    Deny,
    /// Forbidden unless an approver grants it.
    ApprovalRequired,
}

/// A decision as recorded, with what is needed to re-derive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub effect: DecisionEffect,
    /// `false` in dry-run: the effect was recorded, the command ran anyway.
    pub enforced: bool,
    /// Ids of the policies that determined the effect.
    #[serde(default)]
    pub policies: Vec<String>,
    /// The deciding policy's `@reason`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The statement kinds the classifier found, in order (`select`,
    /// `insert`, …, `other` for text that did not parse).
    #[serde(default)]
    pub kinds: Vec<String>,
    pub bundle_version: String,
    /// SHA-256 of the bundle's content.
    pub bundle_hash: String,
    /// Time spent classifying and deciding, in microseconds.
    pub eval_micros: u64,
    /// When the decision was made under a dry-run (its target's, not
    /// expired, in a session that is not read-only): the dry-run's end,
    /// Unix seconds. Absent otherwise, and in events older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run_until: Option<i64>,
    /// The access granted to the session's identity on the target and in
    /// force when it was decided (`context.grants`): the ids of their
    /// approvals. Absent when none, and in events older than the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<uuid::Uuid>,
}

/// A policy bundle became the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBundlePublished {
    pub version: String,
    pub hash: String,
    /// Policy file names in the bundle.
    pub files: Vec<String>,
    pub dry_run: bool,
    /// Subject of the token that pushed it.
    pub published_by: String,
    /// The pusher's free-form label (`version` is the control plane's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// A rollback: the version whose content this one publishes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// The dry-run this bundle carries, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run_scope: Option<DryRunScope>,
}

/// Where and until when a bundle's denials are recorded, not enforced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunScope {
    /// Every target; otherwise those in `targets`.
    pub all_targets: bool,
    #[serde(default)]
    pub targets: Vec<String>,
    /// Unix seconds.
    pub expires_at: i64,
    /// Subject of the token that set it.
    pub set_by: String,
}

/// An identity or a token was revoked; its sessions are refused at their
/// next command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRevoked {
    /// `subject` (every token of a `sub`) or `token` (one `jti`).
    pub kind: String,
    pub value: String,
    pub revoked_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A revoked identity or token was reinstated: its new logins and its
/// open sessions' next messages are no longer refused for the revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityReinstated {
    /// `subject` (every token of a `sub`) or `token` (one `jti`), as revoked.
    pub kind: String,
    pub value: String,
    pub reinstated_by: String,
    /// Why, as the administrator gave it: required.
    pub reason: String,
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
    /// Set when a text value is carried as the bytes the client sent,
    /// base64-encoded: they are not valid text in the session's encoding,
    /// or hold a NUL byte (which no JSON text in the audit store can hold).
    /// Absent: a text value is the text itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<ValueEncoding>,
}

impl Param {
    /// A text value, carried losslessly: as text when `decoded` (the bytes
    /// read in the session's encoding) is text a JSON document can hold,
    /// else as the bytes sent, base64-encoded and flagged so.
    pub fn text(sent: &[u8], decoded: Option<String>) -> Self {
        use base64::Engine as _;
        match decoded {
            Some(text) if !text.contains('\0') => Param {
                format: ParamFormat::Text,
                value: Some(text),
                encoding: None,
            },
            _ => Param {
                format: ParamFormat::Text,
                value: Some(base64::engine::general_purpose::STANDARD.encode(sent)),
                encoding: Some(ValueEncoding::Base64),
            },
        }
    }
}

/// How a parameter's value is carried when not as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueEncoding {
    /// Standard base64 of the bytes as sent.
    Base64,
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
    /// The identity or token was revoked.
    Revoked,
    /// The session needed access granted for a while, and it ended
    /// (expired or revoked): `connect` no longer allows it.
    AccessEnded,
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

/// What the target answered to one command, as the client got it (masked
/// where the target masks). A response is one or more events of its
/// session, `part` 0, 1, …; the last (`last`) carries the totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseRecorded {
    /// The `seq` of the command's `CommandReceived` in this session.
    pub command_seq: u64,
    pub part: u32,
    pub last: bool,
    /// Rows of this part, in order: each value `null`, a string (text
    /// format) or `{"base64": …}` (binary format). COPY data is one value
    /// per message. Rows are recorded only where the target masks
    /// responses, and only up to the target's `record_max_bytes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<Vec<Option<Cell>>>,
    /// With `last`: everything the response came to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ResponseSummary>,
}

/// One recorded value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cell {
    Text(String),
    Binary { base64: String },
}

/// The totals of a response, in its last event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseSummary {
    /// Rows (`DataRow`s and COPY data messages) the client got.
    pub rows: u64,
    /// Bytes of those messages.
    pub bytes: u64,
    /// SHA-256 (hex) of those messages, as the client got them, in order.
    pub sha256: String,
    /// Rows were left out of the record (its size limit, or rows not
    /// recorded for this target).
    pub truncated: bool,
    /// The command tags of what completed (`SELECT 3`, `INSERT 0 1`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The SQLSTATE of the error that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
    /// Values masked, in all and by column rules, and what each detector
    /// found (detector name → count; only those that found something).
    #[serde(default, skip_serializing_if = "MaskingCounts::is_empty")]
    pub masked: MaskingCounts,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskingCounts {
    pub values: u64,
    pub by_column: u64,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub detectors: std::collections::BTreeMap<String, u64>,
}

impl MaskingCounts {
    pub fn is_empty(&self) -> bool {
        self.values == 0 && self.by_column == 0 && self.detectors.is_empty()
    }
}
