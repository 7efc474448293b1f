//! Group commit of events to JetStream.
//!
//! Sessions hand their events to one writer task and wait for the
//! acknowledgement. While earlier messages are being acknowledged, new events
//! from all sessions queue up; the writer then publishes everything queued as
//! one message per event type (a single CloudEvent, or a CloudEvents batch)
//! and answers every waiting session when JetStream acknowledges it. Under
//! load this turns many small publishes into few large ones, and acks of many
//! sessions are awaited together; at low load a lone event goes out at once.
//!
//! The writer task does all of it itself: it sends the messages, keeps the
//! acks it awaits (up to `max_in_flight` batches), and answers the sessions
//! from its own loop, with no task hand-off per batch.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use gatehouse_events::{Event, EventType, Subjects};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::EventLogConfig;

/// Most events in one message.
const MAX_EVENTS_PER_MESSAGE: usize = 256;
/// Most encoded bytes in one message of several events; one event larger
/// than this goes alone, up to the server's `max_payload`.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// Room kept in every message for its headers.
pub(crate) const HEADER_ROOM: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("the event log did not acknowledge within {0:?}")]
    Timeout(Duration),
    #[error("the event log refused the event: {0}")]
    Refused(String),
    #[error("not connected to NATS")]
    Disconnected,
    #[error("the event publisher has stopped")]
    Stopped,
    #[error(
        "the event is too large to record: {size} bytes encoded, the event log takes at most {max}"
    )]
    TooLarge { size: usize, max: usize },
}

pub(crate) struct Request {
    pub events: Vec<Event>,
    pub done: oneshot::Sender<Result<(), PublishError>>,
}

/// Records events durably. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Request>,
}

impl Publisher {
    /// Starts the writer task on the current runtime.
    pub fn start(nats: async_nats::Client, config: &EventLogConfig) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let writer = Writer {
            js: jetstream::new(nats.clone()),
            nats,
            subjects: config.subjects(),
            timeout: config.publish_timeout(),
            max_in_flight: config.max_in_flight.max(1),
        };
        tokio::spawn(writer.run(rx));
        Self { tx }
    }

    /// Starts the writer task of an embedded log ([`crate::embedded`]) on
    /// the current runtime. Events go under the subjects they would have on
    /// JetStream.
    pub fn embedded(log: crate::EmbeddedLog, subjects: Subjects) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(crate::embedded::write(log, subjects, rx));
        Self { tx }
    }

    /// Publishes `events` and resolves once JetStream has stored them all.
    /// On error none of them may be assumed stored; the caller must not run
    /// the command they describe.
    pub async fn record(&self, events: Vec<Event>) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request { events, done })
            .await
            .map_err(|_| PublishError::Stopped)?;
        rx.await.map_err(|_| PublishError::Stopped)?
    }
}

struct Writer {
    nats: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    timeout: Duration,
    max_in_flight: usize,
}

/// A batch sent and awaiting its acks; it answers its own waiters when it
/// completes. Polled only by the writer task.
type InFlight = BoxFuture<'static, ()>;

/// One event, encoded.
struct Encoded {
    ty: EventType,
    id: uuid::Uuid,
    json: Vec<u8>,
}

/// Events of one type going out as one message, and who waits for them.
struct Message {
    ty: EventType,
    /// The first event's id: the message's `Nats-Msg-Id`.
    id: uuid::Uuid,
    events: Vec<Vec<u8>>,
    /// Encoded size: the events, the commas between them and the brackets.
    bytes: usize,
    waiters: Vec<usize>,
}

impl Message {
    /// The body: the one event's document, or a CloudEvents JSON batch.
    fn body(&mut self) -> Vec<u8> {
        if self.events.len() == 1 {
            return std::mem::take(&mut self.events[0]);
        }
        gatehouse_events::join_batch(&self.events)
    }
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Request>) {
        let mut queued: Vec<Request> = Vec::new();
        let mut last_batch = 0;
        let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        let mut open = true;
        loop {
            // Wait for a request, then for room in flight; meanwhile answer
            // the batches JetStream acknowledges, and more requests queue up
            // in the channel.
            while queued.is_empty() || in_flight.len() >= self.max_in_flight {
                tokio::select! {
                    biased;
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                    r = rx.recv(), if open && queued.is_empty() => match r {
                        Some(r) => queued.push(r),
                        None => open = false,
                    },
                    // Every sender is gone and every batch answered.
                    else => return,
                }
            }
            // Under load, give sessions that are about to record a moment to
            // join this message: a few yields cost microseconds, while each
            // message saved spares nats-server far more.
            let mut yields = if last_batch > 1 { 3 } else { 0 };
            loop {
                while queued.len() < MAX_EVENTS_PER_MESSAGE {
                    match rx.try_recv() {
                        Ok(r) => queued.push(r),
                        Err(_) => break,
                    }
                }
                if yields == 0 || queued.len() >= last_batch {
                    break;
                }
                yields -= 1;
                tokio::task::yield_now().await;
                // Answer batches acknowledged meanwhile (with more than one
                // in flight), without waiting for any.
                while let Some(Some(())) = in_flight.next().now_or_never() {}
            }
            last_batch = queued.len();
            let batch = std::mem::take(&mut queued);
            if self.nats.connection_state() != async_nats::connection::State::Connected {
                // Fail at once rather than let the client buffer the
                // message: a buffered event would be delivered after
                // reconnecting, for a command that was refused meanwhile.
                for r in batch {
                    let _ = r.done.send(Err(PublishError::Disconnected));
                }
                continue;
            }
            let flight = self.send(batch).await;
            in_flight.push(flight);
        }
    }

    /// Sends the requests' events, grouped into messages, and returns the
    /// future that awaits their acks and answers each request (a request
    /// fails if any message holding its events does). The timeout runs from
    /// here to the last ack.
    async fn send(&self, batch: Vec<Request>) -> InFlight {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        let (events, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.events, r.done)).unzip();
        // Sizes are checked on the encoded events, before anything is sent:
        // a request holding an event that no message could carry fails
        // alone, and none of its events is published.
        let max = self.nats.max_payload().saturating_sub(HEADER_ROOM);
        let mut result: Vec<Result<(), PublishError>> = vec![Ok(()); waiters.len()];
        let encoded: Vec<Vec<Encoded>> = events
            .into_iter()
            .enumerate()
            .map(|(i, events)| {
                let encoded: Vec<Encoded> = events.iter().map(encode).collect();
                match encoded.iter().map(|e| e.json.len()).max() {
                    Some(size) if size > max => {
                        result[i] = Err(PublishError::TooLarge { size, max });
                        Vec::new()
                    }
                    _ => encoded,
                }
            })
            .collect();
        let mut messages = group(encoded, MAX_MESSAGE_BYTES.min(max));

        // Send every message first, then await the acks together.
        let mut acks = Vec::with_capacity(messages.len());
        for m in &mut messages {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id.to_string().as_str());
            headers.insert(
                "Content-Type",
                if m.events.len() == 1 {
                    gatehouse_events::CONTENT_TYPE
                } else {
                    gatehouse_events::BATCH_CONTENT_TYPE
                },
            );
            let subject = self.subjects.for_type(m.ty);
            let publish = self
                .js
                .publish_with_headers(subject, headers, Bytes::from(m.body()));
            acks.push(match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(e)) => Err(PublishError::Refused(e.to_string())),
                Err(_) => Err(PublishError::Timeout(timeout)),
            });
        }

        async move {
            let outcomes = futures::future::join_all(acks.into_iter().map(|ack| async move {
                match tokio::time::timeout_at(deadline, ack?.into_future()).await {
                    Ok(Ok(_ack)) => Ok(()),
                    Ok(Err(e)) => Err(PublishError::Refused(e.to_string())),
                    Err(_) => Err(PublishError::Timeout(timeout)),
                }
            }))
            .await;
            for (m, outcome) in messages.iter().zip(outcomes) {
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, events = m.events.len(), "event publish failed");
                    for &w in &m.waiters {
                        result[w] = Err(e.clone());
                    }
                }
            }
            for (done, r) in waiters.into_iter().zip(result) {
                let _ = done.send(r);
            }
        }
        .boxed()
    }
}

fn encode(event: &Event) -> Encoded {
    Encoded {
        ty: event.event_type(),
        id: event.id,
        json: event.to_cloudevent(),
    }
}

/// Groups the requests' encoded events into messages, one event type per
/// message, each message at most `limit` bytes unless it holds one event.
fn group(batch: Vec<Vec<Encoded>>, limit: usize) -> Vec<Message> {
    let mut messages: Vec<Message> = Vec::new();
    for (i, events) in batch.into_iter().enumerate() {
        for event in events {
            let size = event.json.len() + 1;
            let slot = messages.iter().position(|m| {
                m.ty == event.ty
                    && m.events.len() < MAX_EVENTS_PER_MESSAGE
                    && m.bytes + size <= limit
            });
            let m = match slot {
                Some(s) => &mut messages[s],
                None => {
                    messages.push(Message {
                        ty: event.ty,
                        id: event.id,
                        events: Vec::new(),
                        bytes: 1,
                        waiters: Vec::new(),
                    });
                    messages.last_mut().expect("just pushed")
                }
            };
            m.events.push(event.json);
            m.bytes += size;
            if m.waiters.last() != Some(&i) {
                m.waiters.push(i);
            }
        }
    }
    messages
}
