//! The projector: event log ──► audit tables (the [`AuditStore`]).
//!
//! On JetStream, a durable pull consumer streams the event log: one
//! long-lived pull subscription that the server keeps fed, not a request
//! per batch. On the embedded log, the projector reads rows after its
//! position, kept in the log's file under the consumer's name, and waits
//! for the next commit when it has read everything. What
//! arrives within [`GATHER`] of a batch's first message (up to [`BATCH`]
//! messages) is written in one transaction,
//! idempotently on its event id, and acknowledged only after COMMIT, so a
//! crash between the two costs a redelivery, never a lost record. The
//! consumer acknowledges cumulatively (`AckPolicy::All`): one ack, for the
//! last message of a batch, settles the batch; on the embedded log the
//! position moves past the batch after COMMIT, to the same effect.
//!
//! Nothing is dropped. A message that does not decode is stored raw in
//! `quarantine` with the decode error. When the database refuses a batch
//! (a data error: SQLSTATE class 22, 23 or 54 in PostgreSQL; a constraint,
//! size or type refused in SQLite), its messages are stored one
//! by one, and within a refused message its events one by one: an event
//! the database refuses goes raw (its own JSON) into `quarantine` with the
//! SQLSTATE and message, the other events of the message, often other
//! sessions' (the worker groups them), are projected. A message is
//! acknowledged only once each of its events is projected or quarantined;
//! only a quarantine row the database refuses too is lost (logged as an
//! error, the message terminated). Quarantines are logged by stream
//! sequence and event id, never with their content, and counted in
//! [`ProjectorStats`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Stream as MessageStream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use gatehouse_eventlog::{EmbeddedLog, EventLogConfig, LogBackend, StreamError, ensure_stream};
use gatehouse_events::{DecodeError, Event, decode};
use serde_json::value::RawValue;

use crate::audit::{AuditStore, Quarantine};

/// Messages fetched (and committed together) at most per batch.
const BATCH: usize = 256;
/// How long a batch gathers messages after its first arrived. Every
/// commit costs a transaction, a WAL flush and an ack whatever it holds; a
/// commit per message as it arrives cost more CPU than the commands it
/// recorded (pgbench -S, 1 client: 223 µs in PostgreSQL and 201 µs in
/// nats-server per command). The audit tables lag the log by this much.
const GATHER: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot create or find JetStream consumer {consumer:?}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot fetch from JetStream consumer: {0}")]
    Fetch(#[source] async_nats::Error),
}

/// What the projector has done since the process started, shared with the
/// API.
#[derive(Debug, Default)]
pub struct ProjectorStats {
    quarantined: AtomicU64,
}

impl ProjectorStats {
    /// Rows this process has written to `quarantine`: undecodable messages
    /// and refused events. One already there (a redelivery) is not counted
    /// again.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }
}

/// Reads the event log from its position and writes the audit tables.
pub struct Projector {
    store: AuditStore,
    source: Source,
    consumer_name: String,
    stats: Arc<ProjectorStats>,
}

/// Where the projector reads the event log.
#[allow(clippy::large_enum_variant)] // one per projector
enum Source {
    /// A durable consumer of the JetStream stream.
    JetStream {
        js: jetstream::Context,
        events: EventLogConfig,
        consumer: Option<PullConsumer>,
        messages: Option<MessageStream>,
        /// The consumer acknowledges cumulatively; consumers created
        /// before this was the default acknowledge message by message.
        ack_all: bool,
    },
    /// The embedded log, from the position kept under the consumer's name
    /// (`None`: to be read from the log).
    Embedded {
        log: EmbeddedLog,
        position: Option<u64>,
        appended: tokio::sync::watch::Receiver<u64>,
    },
}

/// A message of the event log as the projector reads it.
struct Delivered {
    /// Its sequence in the log.
    seq: u64,
    subject: String,
    payload: Bytes,
    /// JetStream's message, to acknowledge; none from the embedded log.
    message: Option<Message>,
}

impl Projector {
    /// Ensures the stream and the durable consumer exist, so that a wrong
    /// setting fails at start rather than in the loop.
    pub async fn new(
        store: AuditStore,
        log: &LogBackend,
        consumer: impl Into<String>,
    ) -> Result<Self, ProjectorError> {
        let consumer_name = consumer.into();
        let source = match log {
            LogBackend::Nats { client, config } => {
                let js = jetstream::new(client.clone());
                let consumer = Some(connect(&js, config, &consumer_name).await?);
                Source::JetStream {
                    js,
                    events: config.clone(),
                    consumer,
                    messages: None,
                    ack_all: false,
                }
            }
            LogBackend::Embedded { log, .. } => Source::Embedded {
                appended: log.appended(),
                log: log.clone(),
                position: None,
            },
        };
        Ok(Self {
            store,
            source,
            consumer_name,
            stats: Arc::default(),
        })
    }

    /// The projector's counters, for the API.
    pub fn stats(&self) -> Arc<ProjectorStats> {
        self.stats.clone()
    }

    /// Projects until `shutdown` completes. Errors from NATS or the database
    /// are logged and retried with back-off; this only returns on shutdown.
    /// A batch being committed is finished first.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = BACKOFF_MIN;
        loop {
            let fetched = tokio::select! {
                () = &mut shutdown => return,
                fetched = self.fetch() => fetched,
            };
            match fetched {
                Ok(messages) => {
                    backoff = BACKOFF_MIN;
                    if !self.project(messages, &mut shutdown).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot read the event stream");
                    // Find or re-create the consumer on the next round, in
                    // case it was deleted; read the position again.
                    match &mut self.source {
                        Source::JetStream {
                            consumer, messages, ..
                        } => {
                            *consumer = None;
                            *messages = None;
                        }
                        Source::Embedded { position, .. } => *position = None,
                    }
                    if !sleep(backoff, &mut shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Waits for the next message, then takes those that arrive within
    /// [`GATHER`] of it, up to [`BATCH`].
    async fn fetch(&mut self) -> Result<Vec<Delivered>, ProjectorError> {
        match &mut self.source {
            Source::JetStream {
                js,
                events,
                consumer,
                messages,
                ack_all,
            } => {
                let fetched =
                    fetch_jetstream(js, events, &self.consumer_name, consumer, messages, ack_all)
                        .await?;
                Ok(fetched
                    .into_iter()
                    .map(|m| Delivered {
                        seq: stream_seq(&m),
                        subject: m.subject.to_string(),
                        payload: m.payload.clone(),
                        message: Some(m),
                    })
                    .collect())
            }
            Source::Embedded {
                log,
                position,
                appended,
            } => {
                let fetch_err =
                    |e: gatehouse_eventlog::EmbeddedError| ProjectorError::Fetch(e.into());
                let after = match *position {
                    Some(p) => p,
                    None => {
                        let p = log.position(&self.consumer_name).await.map_err(fetch_err)?;
                        *position = Some(p);
                        p
                    }
                };
                let mut rows = loop {
                    appended.borrow_and_update();
                    let rows = log.read(after, BATCH).await.map_err(fetch_err)?;
                    if !rows.is_empty() {
                        break rows;
                    }
                    if appended.changed().await.is_err() {
                        return Err(ProjectorError::Fetch("the embedded log closed".into()));
                    }
                };
                if rows.len() < BATCH {
                    // What commits within the window joins this batch.
                    tokio::time::sleep(GATHER).await;
                    let last = rows.last().map_or(after, |r| r.seq);
                    rows.extend(
                        log.read(last, BATCH - rows.len())
                            .await
                            .map_err(fetch_err)?,
                    );
                }
                Ok(rows
                    .into_iter()
                    .map(|r| Delivered {
                        seq: r.seq,
                        subject: r.subject,
                        payload: r.body.into(),
                        message: None,
                    })
                    .collect())
            }
        }
    }

    /// Decodes and stores one batch, then acknowledges it. Returns false if
    /// shutdown came while waiting to retry.
    async fn project(
        &mut self,
        messages: Vec<Delivered>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let decoded: Vec<(Delivered, Result<Vec<Event>, DecodeError>)> = messages
            .into_iter()
            .map(|message| {
                let events = decode(&message.payload);
                (message, events)
            })
            .collect();
        let events: Vec<&Event> = decoded
            .iter()
            .filter_map(|(_, events)| events.as_ref().ok())
            .flatten()
            .collect();
        let undecodable: Vec<Quarantine> = decoded
            .iter()
            .filter_map(|(message, events)| {
                let e = events.as_ref().err()?;
                Some(Quarantine::message(message, describe(e)))
            })
            .collect();
        match self.store_retrying(&events, &undecodable, shutdown).await {
            Stored::Yes(inserted) => self.quarantined(&undecodable, &inserted),
            Stored::Shutdown => return false,
            // The database refuses something in the batch: store message by
            // message to isolate it.
            Stored::Rejected(_) => {
                for (message, events) in &decoded {
                    let settled = match events {
                        Ok(events) => self.store_message(message, events, shutdown).await,
                        Err(e) => {
                            let q = Quarantine::message(message, describe(e));
                            self.quarantine(&q, shutdown).await
                        }
                    };
                    match settled {
                        Settled::Stored => settle(message, AckKind::Ack).await,
                        Settled::Lost => settle(message, AckKind::Term).await,
                        Settled::Shutdown => return false,
                    }
                }
                self.advance(&decoded).await;
                return true;
            }
        }
        let ack_all = matches!(self.source, Source::JetStream { ack_all: true, .. });
        if ack_all {
            if let Some((last, _)) = decoded.last() {
                settle(last, AckKind::Ack).await;
            }
        } else {
            for (message, _) in &decoded {
                settle(message, AckKind::Ack).await;
            }
        }
        self.advance(&decoded).await;
        true
    }

    /// On the embedded log, moves the position past a batch that is
    /// settled (JetStream's acknowledgements do that there). A position
    /// not saved means the batch is read again, which the projection
    /// absorbs.
    async fn advance(&mut self, batch: &[(Delivered, Result<Vec<Event>, DecodeError>)]) {
        let Source::Embedded { log, position, .. } = &mut self.source else {
            return;
        };
        let Some((last, _)) = batch.last() else {
            return;
        };
        *position = Some(last.seq);
        if let Err(e) = log.set_position(&self.consumer_name, last.seq).await {
            tracing::warn!(error = %e, seq = last.seq, "cannot save the projector's position");
        }
    }

    /// Stores the events of one message in one transaction; if the database
    /// refuses it, event by event, quarantining those it refuses.
    async fn store_message(
        &self,
        message: &Delivered,
        events: &[Event],
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Settled {
        let all: Vec<&Event> = events.iter().collect();
        let refused = match self.store_retrying(&all, &[], shutdown).await {
            Stored::Yes(_) => return Settled::Stored,
            Stored::Shutdown => return Settled::Shutdown,
            Stored::Rejected(e) => e,
        };
        tracing::warn!(
            stream_seq = message.seq,
            sqlstate = refused.code().as_deref().unwrap_or(""),
            events = events.len(),
            "audit database refuses an event message; storing its events one by one"
        );
        // Each event's own JSON as it arrived, so that what is quarantined
        // is exactly what was published.
        let raw = split_events(&message.payload);
        let mut settled = Settled::Stored;
        for (index, event) in events.iter().enumerate() {
            let e = match self.store_retrying(&[event], &[], shutdown).await {
                Stored::Yes(_) => continue,
                Stored::Shutdown => return Settled::Shutdown,
                Stored::Rejected(e) => e,
            };
            let q = Quarantine {
                stream_seq: message.seq,
                subject: &message.subject,
                index: Some(index),
                event: Some(event),
                reason: db_reason(&*e),
                raw: raw
                    .as_ref()
                    .and_then(|parts| parts.get(index).copied())
                    .unwrap_or(&message.payload),
            };
            match self.quarantine(&q, shutdown).await {
                Settled::Stored => {}
                Settled::Lost => settled = Settled::Lost,
                Settled::Shutdown => return Settled::Shutdown,
            }
        }
        settled
    }

    /// Writes one quarantine row, retrying while the database is unavailable.
    async fn quarantine(
        &self,
        q: &Quarantine<'_>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Settled {
        match self
            .store_retrying(&[], std::slice::from_ref(q), shutdown)
            .await
        {
            Stored::Yes(inserted) => {
                self.quarantined(std::slice::from_ref(q), &inserted);
                Settled::Stored
            }
            Stored::Shutdown => Settled::Shutdown,
            Stored::Rejected(e) => {
                tracing::error!(
                    stream_seq = q.stream_seq,
                    subject = %q.subject,
                    event_id = q.event.map(|e| tracing::field::display(e.id)),
                    reason = %q.reason,
                    sqlstate = e.code().as_deref().unwrap_or(""),
                    error = %e.message(),
                    "audit database refuses the quarantine row too; the event is LOST \
                     from the audit tables (the event log still holds it)"
                );
                Settled::Lost
            }
        }
    }

    /// Counts and logs the quarantine rows just committed.
    fn quarantined(&self, rows: &[Quarantine], inserted: &[bool]) {
        for (q, &new) in rows.iter().zip(inserted) {
            let event_id = q.event.map(|e| tracing::field::display(e.id));
            if new {
                self.stats.quarantined.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    stream_seq = q.stream_seq,
                    subject = %q.subject,
                    event_id = event_id,
                    reason = %q.reason,
                    "event quarantined: not projected, kept raw in the quarantine table"
                );
            } else {
                tracing::debug!(
                    stream_seq = q.stream_seq,
                    event_id = event_id,
                    "event already quarantined"
                );
            }
        }
    }

    /// Stores `events` and `quarantine` rows in one transaction, retrying
    /// with back-off while the database is unavailable.
    async fn store_retrying(
        &self,
        events: &[&Event],
        quarantine: &[Quarantine<'_>],
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Stored {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.store.store(events, quarantine).await {
                Ok(inserted) => return Stored::Yes(inserted),
                Err(sqlx::Error::Database(e)) if self.store.is_data_error(&*e) => {
                    return Stored::Rejected(e);
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        retry_in = ?backoff,
                        "cannot write to the audit database"
                    );
                    if !sleep(backoff, shutdown).await {
                        return Stored::Shutdown;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

impl<'a> Quarantine<'a> {
    /// A whole message that did not decode.
    fn message(message: &'a Delivered, reason: String) -> Self {
        Self {
            stream_seq: message.seq,
            subject: &message.subject,
            index: None,
            event: None,
            reason,
            raw: &message.payload,
        }
    }
}

/// How a message ended up.
enum Settled {
    /// Every event projected or quarantined.
    Stored,
    /// Some event could not even be quarantined.
    Lost,
    Shutdown,
}

enum Stored {
    /// Committed; for each quarantine row, whether it is new.
    Yes(Vec<bool>),
    Rejected(Box<dyn sqlx::error::DatabaseError>),
    Shutdown,
}

/// The SQLSTATE and message of a refusal (without the detail, which may
/// quote values).
fn db_reason(e: &dyn sqlx::error::DatabaseError) -> String {
    let code = e.code();
    format!("{}: {}", code.as_deref().unwrap_or("?????"), e.message())
}

/// The raw JSON of each event of a message body, in the order [`decode`]
/// reads them: the elements of a batch, or the whole body. `None` if the
/// body is not JSON.
fn split_events(body: &[u8]) -> Option<Vec<&[u8]>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let parts: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
        Some(parts.into_iter().map(|p| p.get().as_bytes()).collect())
    } else {
        Some(vec![body])
    }
}

/// Sleeps for `d`; false if shutdown came first.
async fn sleep(d: Duration, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        () = shutdown => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// Finds or creates the durable consumer (and the stream).
async fn connect(
    js: &jetstream::Context,
    events: &EventLogConfig,
    name: &str,
) -> Result<PullConsumer, ProjectorError> {
    let stream = ensure_stream(js, events).await?;
    let config = pull::Config {
        durable_name: Some(name.to_string()),
        description: Some("Gatehouse audit projector".into()),
        ack_policy: AckPolicy::All,
        deliver_policy: DeliverPolicy::All,
        filter_subject: events.subjects().all(),
        ..Default::default()
    };
    stream
        .get_or_create_consumer(name, config)
        .await
        .map_err(|source| ProjectorError::Consumer {
            consumer: name.to_string(),
            source,
        })
}

/// The JetStream side of [`Projector::fetch`]: subscribes (again) when
/// needed, waits for a message, then takes what arrives within [`GATHER`].
async fn fetch_jetstream(
    js: &jetstream::Context,
    events: &EventLogConfig,
    name: &str,
    consumer: &mut Option<PullConsumer>,
    messages: &mut Option<MessageStream>,
    ack_all: &mut bool,
) -> Result<Vec<Message>, ProjectorError> {
    if messages.is_none() {
        let c = match consumer.take() {
            Some(c) => c,
            None => connect(js, events, name).await?,
        };
        *ack_all = c.cached_info().config.ack_policy == AckPolicy::All;
        let stream = c
            .messages()
            .await
            .map_err(|e| ProjectorError::Fetch(e.into()))?;
        *consumer = Some(c);
        *messages = Some(stream);
    }
    let stream = messages.as_mut().expect("just set");
    let mut fetched = Vec::new();
    let first = stream.next().await;
    let window = tokio::time::Instant::now() + GATHER;
    let mut next = Some(first);
    while let Some(item) = next.take() {
        match item {
            Some(Ok(message)) => fetched.push(message),
            // Keep what arrived and subscribe again next round; the rest
            // is redelivered.
            Some(Err(e)) if !fetched.is_empty() => {
                tracing::warn!(error = %e, "event stream interrupted");
                *messages = None;
                break;
            }
            None if !fetched.is_empty() => {
                *messages = None;
                break;
            }
            Some(Err(e)) => return Err(ProjectorError::Fetch(e.into())),
            None => return Err(ProjectorError::Fetch("the event stream ended".into())),
        }
        if fetched.len() < BATCH {
            next = match stream.next().now_or_never() {
                Some(item) => Some(item),
                // Nothing more has arrived: wait for more until the window
                // closes, then commit what there is.
                None => tokio::time::timeout_at(window, stream.next()).await.ok(),
            };
        }
    }
    Ok(fetched)
}

async fn settle(delivered: &Delivered, kind: AckKind) {
    let Some(message) = &delivered.message else {
        return;
    };
    // A lost ack means a redelivery, which the projection absorbs.
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(
            stream_seq = delivered.seq,
            error = %e,
            "cannot acknowledge event message"
        );
    }
}

fn stream_seq(message: &Message) -> u64 {
    message.info().map_or(0, |i| i.stream_sequence)
}

/// A decode error without the message content: serde's messages may quote
/// the offending value, which could be a secret.
fn describe(e: &DecodeError) -> String {
    match e {
        DecodeError::Json(j) => format!(
            "invalid event JSON ({:?} error at line {} column {})",
            j.classify(),
            j.line(),
            j.column()
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_into_each_events_own_json() {
        let body = br#" [ {"a":"x\u0000y"} ,{"b":[1,2]}]"#;
        let parts = split_events(body).unwrap();
        assert_eq!(parts, [&br#"{"a":"x\u0000y"}"#[..], br#"{"b":[1,2]}"#]);
        assert_eq!(split_events(br#"{"a":1}"#).unwrap(), [br#"{"a":1}"#]);
        assert_eq!(split_events(b"[1,"), None);
    }

    #[test]
    fn decode_errors_do_not_quote_content() {
        let body = br#"{"specversion":"1.0","id":"hunter2-secret"}"#;
        let e = decode(body).unwrap_err();
        let text = describe(&e);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.starts_with("invalid event JSON"), "{text}");
    }
}
