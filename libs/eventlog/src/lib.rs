//! The event log: Gatehouse's NATS JetStream stream, how it is created, and
//! the publisher that records events before commands run.
//!
//! Workers publish through [`Publisher`]; the control plane reads the same
//! stream with a durable consumer. Both call [`ensure_stream`] at start, so
//! whichever starts first creates the stream with the documented settings.
//!
//! Depends on the `events` contract and NATS only: no SQL, no Postgres wire.
#![forbid(unsafe_code)]

mod config;
mod publisher;

pub use config::EventLogConfig;
pub use publisher::{PublishError, Publisher};

use async_nats::jetstream::{self, stream};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot create or update JetStream stream {stream:?}: {source}")]
    Create {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Creates the event stream if it is missing, with the settings in `config`
/// (file storage, limits retention, duplicate window for `Nats-Msg-Id`).
/// An existing stream is left as it is: operators may have tuned it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &EventLogConfig,
) -> Result<stream::Stream, StreamError> {
    js.get_or_create_stream(config.stream_config())
        .await
        .map_err(|e| StreamError::Create {
            stream: config.stream.clone(),
            source: Box::new(e),
        })
}
