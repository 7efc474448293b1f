use std::fmt;

/// Every event type, with its stable names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    SessionOpened,
    AuthenticationFailed,
    CommandReceived,
    SessionClosed,
    PolicyBundlePublished,
    IdentityRevoked,
    IdentityReinstated,
    ResponseRecorded,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::SessionOpened,
        EventType::AuthenticationFailed,
        EventType::CommandReceived,
        EventType::SessionClosed,
        EventType::PolicyBundlePublished,
        EventType::IdentityRevoked,
        EventType::IdentityReinstated,
        EventType::ResponseRecorded,
    ];

    /// The PascalCase name used in documentation and code.
    pub fn name(self) -> &'static str {
        match self {
            EventType::SessionOpened => "SessionOpened",
            EventType::AuthenticationFailed => "AuthenticationFailed",
            EventType::CommandReceived => "CommandReceived",
            EventType::SessionClosed => "SessionClosed",
            EventType::PolicyBundlePublished => "PolicyBundlePublished",
            EventType::IdentityRevoked => "IdentityRevoked",
            EventType::IdentityReinstated => "IdentityReinstated",
            EventType::ResponseRecorded => "ResponseRecorded",
        }
    }

    /// The subject token: the name in snake_case.
    pub fn token(self) -> &'static str {
        match self {
            EventType::SessionOpened => "session_opened",
            EventType::AuthenticationFailed => "authentication_failed",
            EventType::CommandReceived => "command_received",
            EventType::SessionClosed => "session_closed",
            EventType::PolicyBundlePublished => "policy_bundle_published",
            EventType::IdentityRevoked => "identity_revoked",
            EventType::IdentityReinstated => "identity_reinstated",
            EventType::ResponseRecorded => "response_recorded",
        }
    }

    /// The CloudEvents `type` attribute for a schema version:
    /// `dev.gatehouse.<token>.v<version>`.
    pub fn cloudevent_type(self, version: u32) -> String {
        format!("dev.gatehouse.{}.v{version}", self.token())
    }

    /// Inverse of [`EventType::cloudevent_type`].
    pub fn from_cloudevent_type(s: &str) -> Option<(EventType, u32)> {
        let rest = s.strip_prefix("dev.gatehouse.")?;
        let (token, version) = rest.rsplit_once(".v")?;
        let version = version.parse().ok()?;
        let ty = EventType::ALL.into_iter().find(|t| t.token() == token)?;
        Some((ty, version))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The NATS subject scheme: `<prefix>.<event token>`, e.g.
/// `gatehouse.events.command_received`. The stream captures `<prefix>.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub const DEFAULT_PREFIX: &'static str = "gatehouse.events";

    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn for_type(&self, ty: EventType) -> String {
        format!("{}.{}", self.prefix, ty.token())
    }

    /// The wildcard that captures every event subject (for the stream).
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudevent_type_round_trips() {
        for ty in EventType::ALL {
            let s = ty.cloudevent_type(7);
            assert_eq!(EventType::from_cloudevent_type(&s), Some((ty, 7)));
        }
        assert_eq!(
            EventType::from_cloudevent_type("dev.gatehouse.nope.v1"),
            None
        );
        assert_eq!(
            EventType::from_cloudevent_type("com.other.session_opened.v1"),
            None
        );
    }

    #[test]
    fn subjects_follow_the_scheme() {
        let s = Subjects::new("t1.events");
        assert_eq!(
            s.for_type(EventType::CommandReceived),
            "t1.events.command_received"
        );
        assert_eq!(s.all(), "t1.events.>");
        assert_eq!(
            Subjects::default().for_type(EventType::SessionClosed),
            "gatehouse.events.session_closed"
        );
    }
}
