//! What a client sees when something goes wrong: a SQLSTATE and a message
//! chosen for a person, with internal detail (hosts, keys, tokens) left out.

use bytes::BytesMut;

/// SQLSTATE sent when a command's event cannot be recorded: the command was
/// not run, and the session stays usable. Class 58 ("system error") tells
/// drivers the failure is outside the database and the connection is fine.
pub const EVENT_LOG_UNAVAILABLE: &str = "58000";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// `FATAL` ends the session; `ERROR` ends only the command.
    pub fatal: bool,
    pub sqlstate: &'static str,
    pub message: String,
}

impl ClientError {
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self {
            fatal: true,
            sqlstate,
            message: message.into(),
        }
    }

    pub fn error(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self {
            fatal: false,
            sqlstate,
            message: message.into(),
        }
    }

    pub fn tls_required() -> Self {
        Self::fatal(
            "28000",
            "Gatehouse requires TLS: connect with sslmode=require or stronger",
        )
    }

    pub fn event_log_unavailable() -> Self {
        Self::error(
            EVENT_LOG_UNAVAILABLE,
            "Gatehouse could not record this command in the audit log, so it was not run; \
             try again shortly",
        )
    }

    pub fn event_too_large(size: usize, max: usize) -> Self {
        Self::error(
            "54000",
            format!(
                "Gatehouse cannot record this command in the audit log, so it was not run: \
                 its record would take {size} bytes, more than the {max} the event log accepts"
            ),
        )
    }

    pub fn protocol(detail: impl std::fmt::Display) -> Self {
        Self::fatal("08P01", format!("protocol violation: {detail}"))
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let severity = if self.fatal { "FATAL" } else { "ERROR" };
        gatehouse_pgwire::error_response(buf, severity, self.sqlstate, &self.message);
    }
}
