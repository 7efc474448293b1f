//! One user name per subject, across every worker.
//!
//! A session's user name is what people read in the audit trail and what
//! the target's logs show. Two subjects must not log in under one name,
//! and names that only look alike must not stand for different people.
//!
//! - **A safe set of characters.** A user name is printable ASCII (`!` to
//!   `~`, no spaces or control characters): `аdmin` with a Cyrillic `а` is
//!   refused rather than shown next to `admin`.
//! - **Case does not make a new name.** Names are compared ASCII
//!   case-insensitively: `Admin` and `admin` are one name.
//! - **The first subject keeps it.** The binding name → subject is a record
//!   on a stream of records (`<policy.revocation_stream>_USERNAMES`, one
//!   subject per name, one record per subject; JetStream or the embedded
//!   store) written create-only (the publish expects the subject to be
//!   empty): the first subject to log in
//!   under a name owns it, and a later login by another subject under that
//!   name (or a case variant) is refused. The check is made at login only,
//!   never per command, and a worker keeps the bindings it has seen (they
//!   never change; freeing a name means purging its subject, after which
//!   workers that cached it need a restart).

use std::collections::HashMap;
use std::sync::Mutex;

use gatehouse_eventlog::{RecordError, RecordStore, RecordStream};
use gatehouse_policystore::usernames::Binding;

/// Why a user name was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NameError {
    #[error(
        "user name contains characters outside printable ASCII; Gatehouse accepts user \
         names of printable ASCII only, so that names that look alike cannot stand for \
         different people"
    )]
    Unsafe,
    #[error("user name \"{0}\" belongs to another identity")]
    Taken(String),
    #[error("the user name registry is unavailable: {0}")]
    Unavailable(String),
}

impl NameError {
    /// The `AuthenticationFailed` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            NameError::Unsafe => "username_refused",
            NameError::Taken(_) => "username_taken",
            NameError::Unavailable(_) => "username_registry_unavailable",
        }
    }
}

/// The stream of bindings and the ones this worker has seen.
pub(crate) struct UserNames {
    stream: RecordStream,
    /// Subjects are `<prefix>.<key>`.
    prefix: String,
    /// Registry key → owning subject.
    seen: Mutex<HashMap<String, String>>,
}

/// The stream's name for a revocation stream.
pub(crate) fn stream_for(revocation_stream: &str) -> String {
    gatehouse_policystore::usernames::stream_for(revocation_stream)
}

/// The registry key of `name`, or why it is refused: SHA-256 (hex) of the
/// name, ASCII-lowercased, so that any name is a valid key of one length
/// (`gatehouse_policystore::usernames`, which the control plane reads too).
pub(crate) fn key(name: &str) -> Result<String, NameError> {
    gatehouse_policystore::usernames::key(name).ok_or(NameError::Unsafe)
}

impl UserNames {
    /// Opens the stream, creating it if no worker has yet.
    pub async fn open(records: &RecordStore, name: &str) -> Result<Self, String> {
        let prefix = gatehouse_policystore::usernames::prefix(name);
        let stream = records
            .open(gatehouse_policystore::usernames::settings(name))
            .await
            .map_err(|e| format!("cannot open stream {name:?}: {e}"))?;
        Ok(Self {
            stream,
            prefix,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Binds `name` to `subject` if it is free; refuses it if another
    /// subject holds it.
    pub async fn claim(&self, name: &str, subject: &str) -> Result<(), NameError> {
        let key = key(name)?;
        if let Some(owner) = self.seen.lock().expect("poisoned").get(&key) {
            return owner_is(owner, name, subject);
        }
        let owner = match self.stored(&key).await? {
            Some(owner) => owner,
            None => self.create(&key, name, subject).await?,
        };
        self.seen
            .lock()
            .expect("poisoned")
            .insert(key, owner.clone());
        owner_is(&owner, name, subject)
    }

    /// The subject bound to `key`, if any.
    async fn stored(&self, key: &str) -> Result<Option<String>, NameError> {
        let last = self
            .stream
            .last(&format!("{}.{key}", self.prefix))
            .await
            .map_err(|e| NameError::Unavailable(e.to_string()))?;
        last.map(|m| {
            serde_json::from_slice::<Binding>(&m.payload)
                .map(|b| b.subject)
                .map_err(|e| NameError::Unavailable(format!("unreadable binding: {e}")))
        })
        .transpose()
    }

    /// Binds `key` to `subject` unless it is bound already; returns the
    /// owner either way.
    async fn create(&self, key: &str, name: &str, subject: &str) -> Result<String, NameError> {
        let binding = Binding {
            user: name.to_string(),
            subject: subject.to_string(),
            at: chrono::Utc::now().timestamp(),
        };
        let body = serde_json::to_vec(&binding).expect("a binding serializes");
        let created = self
            .stream
            .publish(
                &format!("{}.{key}", self.prefix),
                &[],
                body.into(),
                None,
                Some(0),
            )
            .await;
        match created {
            Ok(_) => {
                tracing::info!(user = %name, subject, "user name bound to its first subject");
                Ok(subject.to_string())
            }
            // Another login bound it first (here or at another worker).
            Err(RecordError::Conflict(_)) => self
                .stored(key)
                .await?
                .ok_or_else(|| NameError::Unavailable("binding vanished".into())),
            Err(e) => Err(NameError::Unavailable(e.to_string())),
        }
    }
}

fn owner_is(owner: &str, name: &str, subject: &str) -> Result<(), NameError> {
    if owner == subject {
        Ok(())
    } else {
        Err(NameError::Taken(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_printable_ascii_are_refused_and_case_folds() {
        assert_eq!(key("admin").unwrap(), key("ADMIN").unwrap());
        assert_eq!(key("Alice.B@example.com").unwrap().len(), 64);
        assert_ne!(key("admin").unwrap(), key("admin2").unwrap());
        for bad in [
            "\u{430}dmin",
            "ad min",
            "admin\u{200b}",
            "",
            "tab\t",
            "é",
            "ａdmin",
        ] {
            assert!(matches!(key(bad), Err(NameError::Unsafe)), "{bad:?}");
        }
        for good in ["auth0|1234", "svc_etl-2", "a+b@x.io", "~!#$%^&*()"] {
            key(good).unwrap();
        }
    }
}
