//! Moving an embedded log into JetStream: a single node that grows into a
//! fleet keeps its history.
//!
//! Events are copied in their order, one message per event under the
//! subject of its type in the target stream, with the event id as
//! `Nats-Msg-Id`. The export's position is kept in the embedded log under
//! a name of the target (URL and stream), moved after each batch is
//! acknowledged, so an export that stops (or runs again later, after more
//! events) goes on where it stopped; a batch sent again after a lost
//! acknowledgement is dropped by JetStream's duplicate window.
//!
//! Only events are moved. Policy bundles, revocations and user names are
//! current state, not history: a development stack signs its bundles with
//! a key of its own run, which no production worker trusts.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use gatehouse_events::{CONTENT_TYPE, decode};

use crate::{EmbeddedLog, EventLogConfig, ensure_stream};

/// Events sent before their acknowledgements are awaited together.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Log(#[from] crate::EmbeddedError),
    #[error(transparent)]
    Stream(#[from] crate::StreamError),
    #[error("event {seq} of the embedded log is not a readable event: {detail}")]
    Unreadable { seq: u64, detail: String },
    #[error("JetStream did not store event {seq}: {detail}")]
    Publish { seq: u64, detail: String },
}

/// What an export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Events copied by this run.
    pub events: u64,
    /// The embedded log's sequence the target has everything up to.
    pub through: u64,
}

/// The name the position of an export to `config`'s stream is kept under.
pub fn position_name(config: &EventLogConfig) -> String {
    format!("export:{}/{}", config.nats_url, config.stream)
}

/// Copies the events of `log` that an earlier export to the same stream
/// did not, into the stream of `config` (created if missing).
pub async fn export(
    log: &EmbeddedLog,
    nats: &async_nats::Client,
    config: &EventLogConfig,
) -> Result<Exported, ExportError> {
    let js = jetstream::new(nats.clone());
    ensure_stream(&js, config).await?;
    let subjects = config.subjects();
    let name = position_name(config);
    let mut through = log.position(&name).await?;
    let mut events = 0;
    loop {
        let batch = log.read(through, BATCH).await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok(Exported { events, through });
        };
        let mut acks = Vec::with_capacity(batch.len());
        for stored in batch {
            let seq = stored.seq;
            let decoded = decode(&stored.body).map_err(|e| ExportError::Unreadable {
                seq,
                detail: e.to_string(),
            })?;
            let [event] = decoded.as_slice() else {
                return Err(ExportError::Unreadable {
                    seq,
                    detail: format!("{} events in one row", decoded.len()),
                });
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
            headers.insert("Content-Type", CONTENT_TYPE);
            let ack = js
                .publish_with_headers(
                    subjects.for_type(event.event_type()),
                    headers,
                    Bytes::from(stored.body),
                )
                .await
                .map_err(|e| ExportError::Publish {
                    seq,
                    detail: e.to_string(),
                })?;
            acks.push((seq, ack));
        }
        for (seq, ack) in acks {
            ack.await.map_err(|e| ExportError::Publish {
                seq,
                detail: e.to_string(),
            })?;
            events += 1;
        }
        log.set_position(&name, last).await?;
        through = last;
    }
}
