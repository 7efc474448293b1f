//! The user name registry's layout, shared by the workers (which bind a
//! name to the first subject that logs in with it) and the control plane
//! (whose API admits a caller only under a name that is not another
//! subject's).
//!
//! The registry is a JetStream stream, `<policy.revocation_stream>_USERNAMES`,
//! with one subject per name (`gatehouse.<stream>.<key>`, the key being
//! the SHA-256 of the name in ASCII lowercase) holding one message: the
//! binding, `{"user", "subject", "at"}`.

use async_nats::jetstream::{self, stream};
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

/// The subject `key` is bound to in the registry `stream`, read now
/// (`None`: unbound, or no worker has opened the registry yet).
pub async fn owner(
    js: &jetstream::Context,
    stream: &str,
    key: &str,
) -> Result<Option<String>, String> {
    let registry = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) => {
            return match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(e.to_string()),
            };
        }
    };
    match registry
        .get_last_raw_message_by_subject(&format!("{}.{key}", prefix(stream)))
        .await
    {
        Ok(m) => serde_json::from_slice::<Binding>(&m.payload)
            .map(|b| Some(b.subject))
            .map_err(|e| format!("unreadable binding: {e}")),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
