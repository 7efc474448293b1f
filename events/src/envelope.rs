use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Payload;

/// One recorded fact, with the context every event carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// UUIDv7: unique, and ordered by creation time. Also the JetStream
    /// `Nats-Msg-Id` when the event is published alone.
    pub id: Uuid,
    pub time: DateTime<Utc>,
    /// The worker (or control-plane replica) that produced the event.
    pub worker_id: String,
    /// The session the event belongs to; `None` for events outside a session.
    pub session_id: Option<Uuid>,
    /// Position of the event within its session, starting at 1.
    pub seq: u64,
    /// Who was speaking, once authenticated.
    pub identity: Option<Identity>,
    /// The target name the session addresses.
    pub target: Option<String>,
    pub payload: Payload,
}

impl Event {
    /// A new event with a fresh UUIDv7 and the current time.
    pub fn new(worker_id: impl Into<String>, payload: Payload) -> Self {
        Self {
            id: Uuid::now_v7(),
            time: Utc::now(),
            worker_id: worker_id.into(),
            session_id: None,
            seq: 0,
            identity: None,
            target: None,
            payload,
        }
    }

    pub fn event_type(&self) -> crate::EventType {
        self.payload.event_type()
    }
}

/// An authenticated speaker, as taken from a verified OIDC token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Token issuer (`iss`).
    pub issuer: String,
    /// Token subject (`sub`).
    pub subject: String,
    /// The name the speaker logs in with (the configured claim, by default
    /// `preferred_username`, falling back to `sub`).
    pub username: String,
    /// Groups from the token's groups claim.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The delegation chain from the token's `act` claim (RFC 8693), the
    /// current actor first: "agent X acting for alice" is `subject = alice`,
    /// `delegation = [X]`. Empty when the subject acts for itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegation: Vec<Actor>,
}

/// One link of a delegation chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}
