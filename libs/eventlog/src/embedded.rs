//! The event log on local disk, for a single node: one SQLite file.
//!
//! It keeps the guarantees of the JetStream log that matter on one machine.
//! An event is durable before [`Publisher::record`](crate::Publisher::record)
//! returns: the writer commits with SQLite's write-ahead log in `FULL`
//! synchronous mode, so the commit is fsync'd. Commits are grouped the way
//! the JetStream writer groups messages: while one commit is being written,
//! the events of every session queue up and the next commit takes them all,
//! so one fsync covers many commands under load and a lone event goes out
//! at once. Every event gets the next sequence number, from 1, in the order
//! committed; readers follow the log from any position ([`EmbeddedLog::read`]
//! and [`EmbeddedLog::appended`]), so a subscriber resumes where it stopped.
//! An event recorded twice (the same id) is stored once, as JetStream's
//! duplicate window does for a message id.
//!
//! Each row is one event under the subject it would have on JetStream
//! (`<prefix>.<event type>`), its body the CloudEvents JSON of the
//! contract, so the log can be moved into a JetStream stream as it is.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use gatehouse_events::Subjects;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, watch};

use crate::publisher::{self, PublishError, Request};
use crate::records::{RecordError, StreamSettings};

/// Most events in one commit; more queued wait for the next.
const MAX_EVENTS_PER_COMMIT: usize = 1024;
/// Largest event the embedded log takes, as NATS's default `max_payload`
/// (1 MiB) less room for headers: an event that one log takes, the other
/// takes too, and the log can be moved into JetStream.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024 - publisher::HEADER_ROOM;
/// SQLite allows 32,766 bound parameters per statement; three per event.
const ROWS_PER_INSERT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot open the event log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("event log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its position in the log: 1 for the first event, then one more each.
    pub seq: u64,
    /// The subject it has on JetStream: `<prefix>.<event type>`.
    pub subject: String,
    /// Its CloudEvents JSON.
    pub body: Vec<u8>,
}

/// The embedded event log. Cheap to clone; clones share the file.
#[derive(Clone)]
pub struct EmbeddedLog {
    path: PathBuf,
    /// The one connection that writes.
    writer: SqlitePool,
    /// Connections that read, beside the writer (write-ahead log).
    readers: SqlitePool,
    /// The sequence of the last event committed.
    last: std::sync::Arc<watch::Sender<u64>>,
    /// The sequence of the last record of any stream of records
    /// ([`crate::records`]) published.
    records: std::sync::Arc<watch::Sender<u64>>,
    /// Signals between the processes' parts that share this store
    /// ([`crate::LogBackend::signal`]): subject and payload.
    signals: tokio::sync::broadcast::Sender<(String, bytes::Bytes)>,
    /// Commits made since opening.
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Connection options for a SQLite file of a single node (the event log, the
/// audit store): write-ahead log, every commit fsync'd, a writer waits for
/// another rather than failing. The file is created if missing (not its
/// directory), readable by its owner only: it holds statements and (masked)
/// responses. SQLite gives its -wal and -shm files the database file's mode.
pub fn private_file(path: &Path) -> Result<SqliteConnectOptions, sqlx::Error> {
    #[cfg(unix)]
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(sqlx::Error::Io(e)),
        }
    }
    Ok(SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(30)))
}

impl EmbeddedLog {
    /// Opens the log at `path`, creating the file (not its directory) if it
    /// is missing.
    pub async fn open(path: &Path) -> Result<Self, EmbeddedError> {
        let open_err = |source| EmbeddedError::Open {
            path: path.to_owned(),
            source,
        };
        let options = private_file(path).map_err(open_err)?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(open_err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS events (
                seq      INTEGER PRIMARY KEY AUTOINCREMENT,
                subject  TEXT NOT NULL,
                event_id TEXT NOT NULL UNIQUE,
                body     BLOB NOT NULL
            )",
        )
        .execute(&writer)
        .await
        .map_err(open_err)?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS records (
                stream  TEXT NOT NULL,
                seq     INTEGER NOT NULL,
                subject TEXT NOT NULL,
                headers TEXT NOT NULL,
                payload BLOB NOT NULL,
                msg_id  TEXT,
                PRIMARY KEY (stream, seq)
            )",
            "CREATE INDEX IF NOT EXISTS records_by_subject ON records (stream, subject, seq)",
            // Where each reader of the event log is, as a durable consumer
            // of JetStream keeps it.
            "CREATE TABLE IF NOT EXISTS positions (
                consumer TEXT PRIMARY KEY,
                seq      INTEGER NOT NULL
            )",
            "CREATE UNIQUE INDEX IF NOT EXISTS records_by_id ON records (stream, msg_id)
                WHERE msg_id IS NOT NULL",
        ] {
            sqlx::query(ddl).execute(&writer).await.map_err(open_err)?;
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(open_err)?;
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(&writer)
            .await
            .map_err(open_err)?;
        Ok(Self {
            path: path.to_owned(),
            writer,
            readers,
            last: std::sync::Arc::new(watch::channel(seq_of(last)).0),
            records: std::sync::Arc::new(watch::channel(0).0),
            signals: tokio::sync::broadcast::channel(1024).0,
            commits: Default::default(),
        })
    }

    /// The file the log is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence of the last event committed (0 while the log is empty).
    pub fn last_seq(&self) -> u64 {
        *self.last.borrow()
    }

    /// Commits (each one fsync) made since the log was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Follows the last sequence committed: a reader that has read up to
    /// it waits for a change, then reads again.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.last.subscribe()
    }

    /// Up to `limit` events after sequence `after`, in order.
    pub async fn read(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, EmbeddedError> {
        let rows =
            sqlx::query("SELECT seq, subject, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?")
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.readers)
                .await
                .map_err(|source| self.io(source))?;
        Ok(rows
            .into_iter()
            .map(|row| StoredEvent {
                seq: seq_of(row.get(0)),
                subject: row.get(1),
                body: row.get(2),
            })
            .collect())
    }

    /// Stores messages (subject, id, body) as they are, in one
    /// transaction, committed and fsync'd when this returns. An id already
    /// in the log is skipped. Sessions publish through
    /// [`crate::Publisher::embedded`], which groups their commits.
    pub async fn append(&self, events: &[(String, String, Vec<u8>)]) -> Result<(), EmbeddedError> {
        let insert = |chunk: &[(String, String, Vec<u8>)]| {
            let mut insert: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO events (subject, event_id, body) ");
            insert.push_values(chunk, |mut row, (subject, id, body)| {
                row.push_bind(subject.as_str())
                    .push_bind(id.as_str())
                    .push_bind(body.as_slice());
            });
            insert.push(" ON CONFLICT (event_id) DO NOTHING RETURNING seq");
            insert
        };
        let mut stored: Vec<i64> = Vec::with_capacity(events.len());
        if events.len() <= ROWS_PER_INSERT {
            // One statement is its own transaction: one round trip to
            // SQLite's thread, one commit.
            stored = insert(events)
                .build_query_scalar()
                .fetch_all(&self.writer)
                .await
                .map_err(|e| self.io(e))?;
        } else {
            let mut tx = self.writer.begin().await.map_err(|e| self.io(e))?;
            for chunk in events.chunks(ROWS_PER_INSERT) {
                let seqs: Vec<i64> = insert(chunk)
                    .build_query_scalar()
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.io(e))?;
                stored.extend(seqs);
            }
            tx.commit().await.map_err(|e| self.io(e))?;
        }
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Events already stored (recorded again) return no sequence.
        if let Some(last) = stored.into_iter().max() {
            self.last.send_replace(seq_of(last));
        }
        Ok(())
    }

    /// The position of the reader `consumer`: the last sequence it has
    /// finished with (0: none yet).
    pub async fn position(&self, consumer: &str) -> Result<u64, EmbeddedError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM positions WHERE consumer = ?")
            .bind(consumer)
            .fetch_optional(&self.writer)
            .await
            .map_err(|e| self.io(e))?;
        Ok(seq.map_or(0, seq_of))
    }

    /// Records that `consumer` has finished with every event up to `seq`.
    pub async fn set_position(&self, consumer: &str, seq: u64) -> Result<(), EmbeddedError> {
        sqlx::query(
            "INSERT INTO positions (consumer, seq) VALUES (?, ?)
             ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq",
        )
        .bind(consumer)
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(&self.writer)
        .await
        .map_err(|e| self.io(e))?;
        Ok(())
    }

    pub(crate) fn signals(&self) -> &tokio::sync::broadcast::Sender<(String, bytes::Bytes)> {
        &self.signals
    }

    pub(crate) fn readers(&self) -> &SqlitePool {
        &self.readers
    }

    /// Changes whenever a record is published on any stream of records.
    pub(crate) fn records_appended(&self) -> watch::Receiver<u64> {
        self.records.subscribe()
    }

    /// Stores a record of a stream of records ([`crate::records`]) on the
    /// conditions of [`RecordStream::publish`](crate::records::RecordStream::publish),
    /// keeping the subject's last `per_subject`; committed and fsync'd
    /// when this returns.
    pub(crate) async fn put_record(
        &self,
        settings: &StreamSettings,
        subject: &str,
        headers: &str,
        payload: &[u8],
        id: Option<&str>,
        expected: Option<u64>,
    ) -> Result<u64, RecordError> {
        let failed = |e: sqlx::Error| RecordError::Unavailable(self.io(e).to_string());
        let mut tx = self.writer.begin().await.map_err(failed)?;
        if let Some(id) = id {
            let stored: Option<i64> =
                sqlx::query_scalar("SELECT seq FROM records WHERE stream = ? AND msg_id = ?")
                    .bind(&settings.name)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(failed)?;
            if let Some(seq) = stored {
                return Ok(seq_of(seq));
            }
        }
        let last: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(seq), 0) FROM records WHERE stream = ? AND subject = ?",
        )
        .bind(&settings.name)
        .bind(subject)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
        if let Some(expected) = expected
            && seq_of(last) != expected
        {
            return Err(RecordError::Conflict(format!(
                "wrong last sequence: {last} (expected {expected})"
            )));
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO records (stream, seq, subject, headers, payload, msg_id)
             SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4, ?5 FROM records WHERE stream = ?1
             RETURNING seq",
        )
        .bind(&settings.name)
        .bind(subject)
        .bind(headers)
        .bind(payload)
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
        sqlx::query(
            "DELETE FROM records WHERE stream = ?1 AND subject = ?2 AND seq NOT IN
                (SELECT seq FROM records WHERE stream = ?1 AND subject = ?2
                 ORDER BY seq DESC LIMIT ?3)",
        )
        .bind(&settings.name)
        .bind(subject)
        .bind(settings.per_subject.max(1))
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.records.send_replace(seq_of(seq));
        Ok(seq_of(seq))
    }

    fn io(&self, source: sqlx::Error) -> EmbeddedError {
        EmbeddedError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The writer task of [`Publisher::embedded`](crate::Publisher::embedded):
/// takes every request queued, commits their events together, answers them.
pub(crate) async fn write(log: EmbeddedLog, subjects: Subjects, mut rx: mpsc::Receiver<Request>) {
    let mut queued: Vec<Request> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut events = first.events.len();
        queued.push(first);
        while events < MAX_EVENTS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => {
                    events += r.events.len();
                    queued.push(r);
                }
                Err(_) => break,
            }
        }
        let mut rows = Vec::with_capacity(events);
        let mut taken = Vec::with_capacity(queued.len());
        for r in queued.drain(..) {
            let encoded: Vec<_> = r.events.iter().map(|e| e.to_cloudevent()).collect();
            // A request holding an event no log could carry fails alone.
            if let Some(size) = encoded.iter().map(Vec::len).max()
                && size > MAX_EVENT_BYTES
            {
                let _ = r.done.send(Err(PublishError::TooLarge {
                    size,
                    max: MAX_EVENT_BYTES,
                }));
                continue;
            }
            for (event, body) in r.events.iter().zip(encoded) {
                rows.push((
                    subjects.for_type(event.event_type()),
                    event.id.to_string(),
                    body,
                ));
            }
            taken.push(r.done);
        }
        let outcome = if rows.is_empty() {
            Ok(())
        } else {
            log.append(&rows).await.map_err(|e| {
                tracing::warn!(error = %e, events = rows.len(), "events not recorded");
                PublishError::Refused(e.to_string())
            })
        };
        for done in taken {
            let _ = done.send(outcome.clone());
        }
    }
}
