use std::time::Duration;

use async_nats::jetstream::stream;
use gatehouse_events::Subjects;
use serde::Deserialize;

/// `[events]`: where and how events are recorded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventLogConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
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
        Ok(())
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
