//! Streams of records under subjects, where the last record of a subject is
//! its current value: what policy bundles, revocations and the user-name
//! registry are kept in. One port, two implementations: a JetStream stream
//! (production), or rows of the embedded store's SQLite file (a single
//! node). The code that keeps records in them does not know which.
//!
//! What both keep: sequences that only grow, a subject's last `per_subject`
//! records, publication on condition of a subject's last sequence
//! (optimistic concurrency: of two writers racing, one wins and the other
//! gets [`RecordError::Conflict`]), a publication repeated under the same
//! message id stored once, and followers that get each subject's last
//! record and then every new one.

use std::sync::Arc;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use sqlx::Row;

use crate::EmbeddedLog;

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub sequence: u64,
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Record {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the subject changed since it was read: {0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

/// How a stream of records is kept.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub name: String,
    /// What it is for, shown to operators (JetStream).
    pub description: Option<String>,
    /// The subjects it holds: one subject, or a prefix followed by `.>`.
    pub subjects: String,
    /// Records kept per subject; older ones are dropped.
    pub per_subject: i64,
    /// Nothing can be deleted or purged through the server's API (on
    /// JetStream); the embedded store has no such API.
    pub deny_delete: bool,
}

/// Where streams of records are kept.
#[derive(Clone)]
pub enum RecordStore {
    JetStream(jetstream::Context),
    Embedded(EmbeddedLog),
}

/// One stream of records.
#[derive(Clone)]
pub struct RecordStream {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    JetStream {
        js: jetstream::Context,
        /// Boxed: its cached info is large.
        stream: Box<stream::Stream>,
    },
    Embedded {
        log: EmbeddedLog,
        settings: Arc<StreamSettings>,
    },
}

fn unavailable(e: impl std::fmt::Display) -> RecordError {
    RecordError::Unavailable(e.to_string())
}

impl RecordStore {
    /// Opens a stream, creating it with `settings` if it is missing. A
    /// JetStream stream made with lower limits is brought up to them when
    /// the user may update streams (otherwise it goes on as it is).
    pub async fn open(&self, settings: StreamSettings) -> Result<RecordStream, RecordError> {
        match self {
            RecordStore::JetStream(js) => {
                let stream = open_jetstream(js, &settings).await?;
                Ok(RecordStream {
                    inner: Inner::JetStream {
                        js: js.clone(),
                        stream: Box::new(stream),
                    },
                })
            }
            RecordStore::Embedded(log) => {
                if subject_filter(&settings.subjects).is_none() {
                    return Err(RecordError::Unavailable(format!(
                        "stream {}: subjects must be one subject or a prefix and `.>`, not {:?}",
                        settings.name, settings.subjects
                    )));
                }
                Ok(RecordStream {
                    inner: Inner::Embedded {
                        log: log.clone(),
                        settings: Arc::new(settings),
                    },
                })
            }
        }
    }

    /// The stream with `settings` if it exists; on JetStream, `None`
    /// rather than creating it (a process that only reads may not be
    /// allowed to create streams). The embedded store always has it.
    pub async fn existing(
        &self,
        settings: StreamSettings,
    ) -> Result<Option<RecordStream>, RecordError> {
        match self {
            RecordStore::JetStream(js) => match js.get_stream(&settings.name).await {
                Ok(stream) => Ok(Some(RecordStream {
                    inner: Inner::JetStream {
                        js: js.clone(),
                        stream: Box::new(stream),
                    },
                })),
                Err(e) => match e.kind() {
                    jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        Ok(None)
                    }
                    _ => Err(unavailable(e)),
                },
            },
            RecordStore::Embedded(_) => self.open(settings).await.map(Some),
        }
    }

    /// The largest payload a record may have.
    pub fn max_payload(&self) -> usize {
        match self {
            RecordStore::JetStream(js) => js.client().max_payload(),
            RecordStore::Embedded(_) => {
                crate::embedded::MAX_EVENT_BYTES + crate::publisher::HEADER_ROOM
            }
        }
    }
}

async fn open_jetstream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, RecordError> {
    let config = stream::Config {
        name: settings.name.clone(),
        subjects: vec![settings.subjects.clone()],
        description: settings.description.clone(),
        storage: stream::StorageType::File,
        max_messages_per_subject: settings.per_subject,
        deny_delete: settings.deny_delete,
        deny_purge: settings.deny_delete,
        ..Default::default()
    };
    let open_error = |e: &dyn std::fmt::Display| {
        RecordError::Unavailable(format!("cannot open stream {}: {e}", settings.name))
    };
    let mut stream = crate::get_or_create_stream(js, config.clone())
        .await
        .map_err(|e| open_error(&e))?;
    let info = stream.info().await.map_err(|e| open_error(&e))?;
    let current = &info.config;
    if current.max_messages_per_subject < settings.per_subject
        || (settings.deny_delete && !(current.deny_delete && current.deny_purge))
    {
        let wanted = stream::Config {
            max_messages_per_subject: settings.per_subject.max(current.max_messages_per_subject),
            deny_delete: settings.deny_delete || current.deny_delete,
            deny_purge: settings.deny_delete || current.deny_purge,
            ..current.clone()
        };
        if let Err(e) = js.update_stream(wanted).await {
            tracing::warn!(stream = settings.name, error = %e, "cannot bring the stream's settings up to date");
        }
    }
    Ok(stream)
}

fn from_nats(m: StreamMessage) -> Record {
    Record {
        sequence: m.sequence,
        subject: m.subject.to_string(),
        headers: headers_of(&m.headers),
        payload: m.payload,
    }
}

fn headers_of(h: &async_nats::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
        .collect()
}

/// Turns JetStream's "no message" into `None`.
fn found(r: Result<StreamMessage, stream::RawMessageError>) -> Result<Option<Record>, RecordError> {
    match r {
        Ok(m) => Ok(Some(from_nats(m))),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// What an embedded stream's subjects select: `(subject, is_prefix)`.
fn subject_filter(subjects: &str) -> Option<(&str, bool)> {
    if subjects.contains('*') {
        return None;
    }
    match subjects.strip_suffix(".>") {
        Some(prefix) if !prefix.contains('>') => Some((prefix, true)),
        Some(_) => None,
        None if !subjects.contains('>') => Some((subjects, false)),
        None => None,
    }
}

impl RecordStream {
    /// The last record of `subject`.
    pub async fn last(&self, subject: &str) -> Result<Option<Record>, RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => {
                found(stream.get_last_raw_message_by_subject(subject).await)
            }
            Inner::Embedded { log, settings } => {
                let row = sqlx::query(
                    "SELECT seq, subject, headers, payload FROM records
                     WHERE stream = ? AND subject = ? ORDER BY seq DESC LIMIT 1",
                )
                .bind(&settings.name)
                .bind(subject)
                .fetch_optional(log.readers())
                .await
                .map_err(unavailable)?;
                row.map(record_of).transpose()
            }
        }
    }

    /// The record at `sequence`, if the stream still holds it.
    pub async fn get(&self, sequence: u64) -> Result<Option<Record>, RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => found(stream.get_raw_message(sequence).await),
            Inner::Embedded { log, settings } => {
                let row = sqlx::query(
                    "SELECT seq, subject, headers, payload FROM records WHERE stream = ? AND seq = ?",
                )
                .bind(&settings.name)
                .bind(int(sequence))
                .fetch_optional(log.readers())
                .await
                .map_err(unavailable)?;
                row.map(record_of).transpose()
            }
        }
    }

    /// The first record of `subject` at or after `sequence`.
    pub async fn first_from(
        &self,
        subject: &str,
        sequence: u64,
    ) -> Result<Option<Record>, RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => found(
                stream
                    .get_first_raw_message_by_subject(subject, sequence)
                    .await,
            ),
            Inner::Embedded { log, settings } => {
                let row = sqlx::query(
                    "SELECT seq, subject, headers, payload FROM records
                     WHERE stream = ? AND subject = ? AND seq >= ? ORDER BY seq LIMIT 1",
                )
                .bind(&settings.name)
                .bind(subject)
                .bind(int(sequence))
                .fetch_optional(log.readers())
                .await
                .map_err(unavailable)?;
                row.map(record_of).transpose()
            }
        }
    }

    /// The sequence of the first record the stream holds (0 when empty),
    /// and how many it holds.
    pub async fn state(&self) -> Result<(u64, u64), RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => {
                let mut stream = stream.as_ref().clone();
                let info = stream.info().await.map_err(unavailable)?;
                Ok((info.state.first_sequence, info.state.messages))
            }
            Inner::Embedded { log, settings } => {
                let row = sqlx::query(
                    "SELECT COALESCE(MIN(seq), 0), COUNT(*) FROM records WHERE stream = ?",
                )
                .bind(&settings.name)
                .fetch_one(log.readers())
                .await
                .map_err(unavailable)?;
                Ok((seq_of(row.get(0)), seq_of(row.get(1))))
            }
        }
    }

    /// The sequence of the last record published (0 when none).
    pub async fn last_sequence(&self) -> Result<u64, RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => {
                let mut stream = stream.as_ref().clone();
                let info = stream.info().await.map_err(unavailable)?;
                Ok(info.state.last_sequence)
            }
            Inner::Embedded { log, settings } => {
                let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM records WHERE stream = ?")
                    .bind(&settings.name)
                    .fetch_one(log.readers())
                    .await
                    .map_err(unavailable)?;
                Ok(seq_of(row.get(0)))
            }
        }
    }

    /// Publishes a record on `subject`, with `expected`, only if the
    /// subject's last sequence is that (0: it has none), and returns its
    /// sequence. With `id`,
    /// a record published again under the same id is stored once (its
    /// sequence returned), and on JetStream a lost acknowledgement is
    /// resolved by finding the id last on the subject.
    pub async fn publish(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
        id: Option<&str>,
        expected: Option<u64>,
    ) -> Result<u64, RecordError> {
        match &self.inner {
            Inner::JetStream { js, stream } => {
                let mut message = PublishMessage::build().payload(payload);
                if let Some(expected) = expected {
                    message = message.expected_last_subject_sequence(expected);
                }
                if let Some(id) = id {
                    message = message.message_id(id);
                }
                for (k, v) in headers {
                    message = message.header(*k, *v);
                }
                let ack = match js.send_publish(subject.to_string(), message).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                match ack {
                    Ok(ack) => Ok(ack.sequence),
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        Err(RecordError::Conflict(e.to_string()))
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                        ) && id.is_some() =>
                    {
                        match found(stream.get_last_raw_message_by_subject(subject).await) {
                            Ok(Some(m)) if m.header("Nats-Msg-Id") == id => Ok(m.sequence),
                            _ => Err(unavailable(e)),
                        }
                    }
                    Err(e) => Err(unavailable(e)),
                }
            }
            Inner::Embedded { log, settings } => {
                if !matches_filter(&settings.subjects, subject) {
                    return Err(RecordError::Unavailable(format!(
                        "stream {} does not hold subject {subject}",
                        settings.name
                    )));
                }
                let mut all: Vec<(&str, &str)> = headers.to_vec();
                if let Some(id) = id {
                    all.push(("Nats-Msg-Id", id));
                }
                let headers = serde_json::to_string(&all).map_err(unavailable)?;
                log.put_record(settings, subject, &headers, &payload, id, expected)
                    .await
            }
        }
    }

    /// The last record of each subject the filter selects (one subject,
    /// or a prefix and `.>`), in sequence order, then every new one as it
    /// is published.
    pub async fn follow(
        &self,
        filter: &str,
    ) -> Result<BoxStream<'static, Result<Record, RecordError>>, RecordError> {
        self.follow_from(filter, None).await
    }

    /// Every record the filter selects published after sequence `after`,
    /// as it is published: one follower for many subjects, without their
    /// history.
    pub async fn follow_after(
        &self,
        filter: &str,
        after: u64,
    ) -> Result<BoxStream<'static, Result<Record, RecordError>>, RecordError> {
        self.follow_from(filter, Some(after)).await
    }

    /// [`RecordStream::follow`] (`after` = `None`) or
    /// [`RecordStream::follow_after`].
    async fn follow_from(
        &self,
        filter: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Result<Record, RecordError>>, RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => {
                let deliver = match after {
                    None => consumer::DeliverPolicy::LastPerSubject,
                    Some(after) => consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    },
                };
                Ok(ordered(stream, filter, deliver)
                    .await?
                    .map(|r| r.map(|(record, _pending)| record))
                    .boxed())
            }
            Inner::Embedded { log, settings } => {
                let (filter, prefix) = embedded_filter(filter)?;
                let state = Follow {
                    log: log.clone(),
                    stream: settings.name.clone(),
                    filter: filter.to_string(),
                    prefix,
                    after,
                    ready: std::collections::VecDeque::new(),
                    appended: log.records_appended(),
                };
                Ok(futures::stream::unfold(state, |mut f| async move {
                    let next = f.next().await;
                    Some((next, f))
                })
                .boxed())
            }
        }
    }

    /// The last record of each subject the filter selects, now.
    pub async fn last_per_subject(&self, filter: &str) -> Result<Vec<Record>, RecordError> {
        match &self.inner {
            Inner::JetStream { stream, .. } => {
                // A consumer that selects nothing delivers nothing: ask the
                // stream first whether any subject matches (a stream may
                // hold records of other subjects only).
                let mut subjects = stream
                    .info_with_subjects(filter)
                    .await
                    .map_err(unavailable)?;
                if futures::TryStreamExt::try_next(&mut subjects)
                    .await
                    .map_err(unavailable)?
                    .is_none()
                {
                    return Ok(Vec::new());
                }
                let mut messages = Box::pin(
                    ordered(stream, filter, consumer::DeliverPolicy::LastPerSubject).await?,
                );
                let mut out = Vec::new();
                // Until none is pending. A selection that delivers nothing
                // for long is an error, never a short answer.
                loop {
                    let next =
                        tokio::time::timeout(std::time::Duration::from_secs(10), messages.next())
                            .await
                            .map_err(|_| {
                                RecordError::Unavailable(format!(
                                    "timed out reading the records of {filter}"
                                ))
                            })?;
                    let Some(next) = next else { break };
                    let (record, pending) = next?;
                    out.push(record);
                    if pending == 0 {
                        break;
                    }
                }
                Ok(out)
            }
            Inner::Embedded { log, settings } => {
                let (filter, prefix) = embedded_filter(filter)?;
                snapshot(log, &settings.name, filter, prefix).await
            }
        }
    }
}

/// The records `filter` selects from `deliver` on, then every new one,
/// through an ordered consumer (recreated by the client if it falls behind
/// or the connection drops), each with the count still pending after it.
async fn ordered(
    stream: &stream::Stream,
    filter: &str,
    deliver: consumer::DeliverPolicy,
) -> Result<impl futures::Stream<Item = Result<(Record, u64), RecordError>> + use<>, RecordError> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    let messages = consumer.messages().await.map_err(unavailable)?;
    Ok(messages.map(|m| {
        let m = m.map_err(unavailable)?;
        let info = m.info().map_err(unavailable)?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let record = Record {
            sequence,
            subject: m.subject.to_string(),
            headers: m.headers.as_ref().map(headers_of).unwrap_or_default(),
            payload: m.payload.clone(),
        };
        Ok((record, pending))
    }))
}

/// [`subject_filter`], or why the embedded store cannot follow `filter`.
fn embedded_filter(filter: &str) -> Result<(&str, bool), RecordError> {
    subject_filter(filter)
        .ok_or_else(|| RecordError::Unavailable(format!("unsupported subject filter {filter:?}")))
}

/// An embedded follower: its position and what it read but has not given.
struct Follow {
    log: EmbeddedLog,
    stream: String,
    filter: String,
    prefix: bool,
    /// The last sequence given; `None` before the snapshot.
    after: Option<u64>,
    ready: std::collections::VecDeque<Record>,
    appended: tokio::sync::watch::Receiver<u64>,
}

impl Follow {
    async fn next(&mut self) -> Result<Record, RecordError> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                self.after = Some(r.sequence);
                return Ok(r);
            }
            // Mark what is seen before reading, so a record published
            // meanwhile wakes the wait below.
            self.appended.borrow_and_update();
            let rows = match self.after {
                None => snapshot(&self.log, &self.stream, &self.filter, self.prefix).await?,
                Some(after) => {
                    let rows = sqlx::query(
                        "SELECT seq, subject, headers, payload FROM records
                         WHERE stream = ?1 AND seq > ?4
                           AND (CASE WHEN ?3 THEN substr(subject, 1, length(?2)) = ?2
                                     ELSE subject = ?2 END)
                         ORDER BY seq LIMIT 256",
                    )
                    .bind(&self.stream)
                    .bind(like(&self.filter, self.prefix))
                    .bind(self.prefix)
                    .bind(int(after))
                    .fetch_all(self.log.readers())
                    .await
                    .map_err(unavailable)?;
                    rows.into_iter().map(record_of).collect::<Result<_, _>>()?
                }
            };
            self.ready.extend(rows);
            if self.after.is_none() && self.ready.is_empty() {
                self.after = Some(0);
            }
            if self.ready.is_empty() {
                self.appended
                    .changed()
                    .await
                    .map_err(|_| RecordError::Unavailable("the embedded store closed".into()))?;
            }
        }
    }
}

/// What an embedded filter's subjects start with (`prefix`) or are.
fn like(filter: &str, prefix: bool) -> String {
    if prefix {
        format!("{filter}.")
    } else {
        filter.to_string()
    }
}

/// The last record of each subject an embedded filter selects.
async fn snapshot(
    log: &EmbeddedLog,
    stream: &str,
    filter: &str,
    prefix: bool,
) -> Result<Vec<Record>, RecordError> {
    let rows = sqlx::query(
        "SELECT r.seq, r.subject, r.headers, r.payload FROM records r
         WHERE r.stream = ?1
           AND (CASE WHEN ?3 THEN substr(r.subject, 1, length(?2)) = ?2
                     ELSE r.subject = ?2 END)
           AND r.seq = (SELECT MAX(seq) FROM records
                        WHERE stream = ?1 AND subject = r.subject)
         ORDER BY r.seq",
    )
    .bind(stream)
    .bind(like(filter, prefix))
    .bind(prefix)
    .fetch_all(log.readers())
    .await
    .map_err(unavailable)?;
    rows.into_iter().map(record_of).collect()
}

fn matches_filter(subjects: &str, subject: &str) -> bool {
    match subject_filter(subjects) {
        Some((prefix, true)) => subject
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.len() > 1 && rest.starts_with('.')),
        Some((exact, false)) => subject == exact,
        None => false,
    }
}

fn record_of(row: sqlx::sqlite::SqliteRow) -> Result<Record, RecordError> {
    let headers: String = row.get(2);
    let headers: Vec<(String, String)> = serde_json::from_str(&headers).map_err(unavailable)?;
    let payload: Vec<u8> = row.get(3);
    Ok(Record {
        sequence: seq_of(row.get(0)),
        subject: row.get(1),
        headers,
        payload: payload.into(),
    })
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
