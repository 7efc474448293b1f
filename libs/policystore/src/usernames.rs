//! The user name registry's layout, shared by the workers (which bind a
//! name to the first subject that logs in with it) and the control plane
//! (whose API admits a caller only under a name that is not another
//! subject's).
//!
//! The registry is a stream of records ([`gatehouse_eventlog::records`]),
//! `<policy.revocation_stream>_USERNAMES`,
//! with one subject per name (`gatehouse.<stream>.<key>`, the key being
//! the SHA-256 of the name in ASCII lowercase) holding one message: the
//! binding, `{"user", "subject", "at"}`.

use gatehouse_eventlog::{RecordStore, StreamSettings};
use serde::{Deserialize, Serialize};

/// A binding as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct Binding {
    /// The name as first used.
    pub user: String,
    pub subject: String,
    /// Unix seconds.
    pub at: i64,
}

/// The registry's stream for a revocation stream.
pub fn stream_for(revocation_stream: &str) -> String {
    format!("{revocation_stream}_USERNAMES")
}

/// The subject prefix of the registry's stream `stream`.
pub fn prefix(stream: &str) -> String {
    format!("gatehouse.{stream}")
}

/// The registry key of `name`: SHA-256 (hex) of the name, ASCII-lowercased,
/// so that any name is a valid key of one length; `None` for a name that
/// is not printable ASCII (`!` to `~`), which Gatehouse does not accept.
pub fn key(name: &str) -> Option<String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let folded = name.to_ascii_lowercase();
    let digest = ring::digest::digest(&ring::digest::SHA256, folded.as_bytes());
    Some(hex::encode(digest))
}

/// How the registry's stream `stream` is kept: one binding per name.
pub fn settings(stream: &str) -> StreamSettings {
    StreamSettings {
        name: stream.to_string(),
        description: Some("Gatehouse: the subject each user name belongs to".into()),
        subjects: format!("{}.>", prefix(stream)),
        per_subject: 1,
        deny_delete: false,
    }
}

/// The subject `key` is bound to in the registry `stream`, read now
/// (`None`: unbound, or no worker has opened the registry yet).
pub async fn owner(
    records: &RecordStore,
    stream: &str,
    key: &str,
) -> Result<Option<String>, String> {
    let Some(registry) = records
        .existing(settings(stream))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let last = registry
        .last(&format!("{}.{key}", prefix(stream)))
        .await
        .map_err(|e| e.to_string())?;
    last.map(|m| {
        serde_json::from_slice::<Binding>(&m.payload)
            .map(|b| b.subject)
            .map_err(|e| format!("unreadable binding: {e}"))
    })
    .transpose()
}
