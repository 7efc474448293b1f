use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::stream;
use gatehouse_events::Subjects;
use serde::Deserialize;

/// `[events]`: where and how events are recorded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventLogConfig {
    /// NATS server URL(s), comma-separated. `tls://` URLs require TLS.
    /// Every NATS connection of the process (events, policy bundles and
    /// revocations, cancel forwarding) uses the settings of this section.
    pub nats_url: String,
    /// User name for NATS user/password authentication; the password comes
    /// from `nats_password_env` or `nats_password_file`.
    pub nats_user: Option<String>,
    /// Environment variable holding the NATS password.
    pub nats_password_env: Option<String>,
    /// File holding the NATS password (trailing newline ignored).
    pub nats_password_file: Option<PathBuf>,
    /// File holding an NKey seed (`SU…`) to authenticate with.
    pub nats_nkey_file: Option<PathBuf>,
    /// A NATS credentials file (user JWT and NKey seed, `.creds`).
    pub nats_creds_file: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS (also implied by `tls://` URLs
    /// and by any `nats_tls_*` file).
    pub nats_tls_required: bool,
    /// CA bundle (PEM) that NATS server certificates are checked against;
    /// the system roots when absent. Server names are always verified.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that verify clients.
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `nats_tls_cert_file`.
    pub nats_tls_key_file: Option<PathBuf>,
    /// JetStream stream that holds every event.
    pub stream: String,
    /// Subject prefix; events go to `<prefix>.<event type>`.
    pub subject_prefix: String,
    /// Stream replicas (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// Window in which JetStream drops a re-published `Nats-Msg-Id`.
    pub duplicate_window_secs: u64,
    /// How long events are kept; 0 keeps them forever.
    pub max_age_secs: u64,
    /// How long a command waits for its event's acknowledgement before the
    /// client gets an error and the command is not run.
    pub publish_timeout_ms: u64,
    /// Messages awaiting acknowledgement at once. Events that arrive while
    /// this many are in flight share the next message (group commit): lower
    /// means larger batches and less work per event for NATS, higher means
    /// less waiting at low load.
    pub max_in_flight: usize,
}

impl Default for EventLogConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password_env: None,
            nats_password_file: None,
            nats_nkey_file: None,
            nats_creds_file: None,
            nats_tls_required: false,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            stream: "GATEHOUSE_EVENTS".into(),
            subject_prefix: Subjects::DEFAULT_PREFIX.into(),
            replicas: 1,
            duplicate_window_secs: 120,
            max_age_secs: 0,
            publish_timeout_ms: 5000,
            max_in_flight: 1,
        }
    }
}

impl EventLogConfig {
    pub fn subjects(&self) -> Subjects {
        Subjects::new(self.subject_prefix.clone())
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// Checks the values; the error names the field and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.stream.is_empty() || self.stream.contains(['.', '*', '>', ' ']) {
            return Err(format!(
                "events.stream: {:?} is not a valid stream name (no dots, spaces or wildcards)",
                self.stream
            ));
        }
        if self.subject_prefix.is_empty()
            || self.subject_prefix.contains(['*', '>', ' '])
            || self.subject_prefix.split('.').any(str::is_empty)
        {
            return Err(format!(
                "events.subject_prefix: {:?} is not a valid subject prefix",
                self.subject_prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err("events.replicas: must be between 1 and 5".into());
        }
        if !(1..=1024).contains(&self.max_in_flight) {
            return Err("events.max_in_flight: must be between 1 and 1024".into());
        }
        if self.publish_timeout_ms == 0 {
            return Err("events.publish_timeout_ms: must be greater than 0".into());
        }
        let methods = [
            ("nats_user", self.nats_user.is_some()),
            ("nats_nkey_file", self.nats_nkey_file.is_some()),
            ("nats_creds_file", self.nats_creds_file.is_some()),
        ];
        if methods.iter().filter(|(_, set)| *set).count() > 1 {
            return Err(
                "events.nats_user / nats_nkey_file / nats_creds_file: choose one way to \
                 authenticate to NATS"
                    .into(),
            );
        }
        let password = self.nats_password_env.is_some() || self.nats_password_file.is_some();
        if self.nats_password_env.is_some() && self.nats_password_file.is_some() {
            return Err("events.nats_password_env / nats_password_file: set one, not both".into());
        }
        if self.nats_user.is_some() != password {
            return Err(if password {
                "events.nats_user: required with nats_password_env / nats_password_file".into()
            } else {
                "events.nats_password_env: nats_user needs a password \
                 (nats_password_env or nats_password_file)"
                    .into()
            });
        }
        if self.nats_tls_cert_file.is_some() != self.nats_tls_key_file.is_some() {
            return Err(
                "events.nats_tls_cert_file / nats_tls_key_file: set both or neither".into(),
            );
        }
        Ok(())
    }

    /// Whether NATS connections must use TLS.
    pub fn nats_tls(&self) -> bool {
        self.nats_tls_required
            || self.nats_tls_ca_file.is_some()
            || self.nats_tls_cert_file.is_some()
            || (!self.nats_url.is_empty()
                && self
                    .nats_url
                    .split(',')
                    .all(|u| u.trim().starts_with("tls://")))
    }

    /// Whether NATS connections authenticate (user/password, NKey or
    /// credentials file).
    pub fn nats_authenticated(&self) -> bool {
        self.nats_user.is_some() || self.nats_nkey_file.is_some() || self.nats_creds_file.is_some()
    }

    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![self.subjects().all()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.replicas,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            max_age: Duration::from_secs(self.max_age_secs),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_credentials_and_tls_are_checked_and_recognised() {
        let base = EventLogConfig::default();
        base.validate().unwrap();
        assert!(!base.nats_tls() && !base.nats_authenticated());
        let with = |f: fn(&mut EventLogConfig)| {
            let mut c = EventLogConfig::default();
            f(&mut c);
            c
        };
        let e = with(|c| c.nats_user = Some("w".into()))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("events.nats_password_env:"), "{e}");
        let e = with(|c| c.nats_password_env = Some("P".into()))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("events.nats_user:"), "{e}");
        let e = with(|c| {
            c.nats_creds_file = Some("a.creds".into());
            c.nats_nkey_file = Some("a.nk".into());
        })
        .validate()
        .unwrap_err();
        assert!(e.contains("choose one"), "{e}");
        let e = with(|c| c.nats_tls_cert_file = Some("c.pem".into()))
            .validate()
            .unwrap_err();
        assert!(e.starts_with("events.nats_tls_cert_file"), "{e}");
        let c = with(|c| {
            c.nats_user = Some("w".into());
            c.nats_password_file = Some("p".into());
        });
        c.validate().unwrap();
        assert!(c.nats_authenticated());
        assert!(with(|c| c.nats_url = "tls://a:4222, tls://b:4222".into()).nats_tls());
        assert!(!with(|c| c.nats_url = "tls://a:4222,nats://b:4222".into()).nats_tls());
        assert!(with(|c| c.nats_tls_ca_file = Some("ca.pem".into())).nats_tls());
    }
}
