//! The projector: event log ──► audit tables.
//!
//! A durable pull consumer streams the event log: one long-lived pull
//! subscription that the server keeps fed, not a request per batch. What has
//! arrived (up to [`BATCH`] messages) is written in one transaction,
//! idempotently on its event id, and acknowledged only after COMMIT, so a
//! crash between the two costs a redelivery, never a lost record. The
//! consumer acknowledges cumulatively (`AckPolicy::All`): one ack, for the
//! last message of a batch, settles the batch. A message that does not decode is
//! terminated (logged by stream sequence, without its content) so it cannot
//! block the stream; the event log keeps it for later inspection.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Stream as MessageStream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message};
use futures::{FutureExt, StreamExt};
use gatehouse_eventlog::{EventLogConfig, StreamError, ensure_stream};
use gatehouse_events::{DecodeError, Event, Payload, decode};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

/// Messages fetched (and committed together) at most per batch.
const BATCH: usize = 256;
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

/// Reads the event stream with a durable consumer and writes the audit tables.
pub struct Projector {
    pool: PgPool,
    js: jetstream::Context,
    events: EventLogConfig,
    consumer_name: String,
    consumer: Option<PullConsumer>,
    messages: Option<MessageStream>,
    /// The consumer acknowledges cumulatively; consumers created before
    /// this was the default acknowledge message by message.
    ack_all: bool,
}

impl Projector {
    /// Ensures the stream and the durable consumer exist, so that a wrong
    /// setting fails at start rather than in the loop.
    pub async fn new(
        pool: PgPool,
        js: jetstream::Context,
        events: EventLogConfig,
        consumer: impl Into<String>,
    ) -> Result<Self, ProjectorError> {
        let mut projector = Self {
            pool,
            js,
            events,
            consumer_name: consumer.into(),
            consumer: None,
            messages: None,
            ack_all: false,
        };
        projector.consumer = Some(projector.connect().await?);
        Ok(projector)
    }

    async fn connect(&self) -> Result<PullConsumer, ProjectorError> {
        let stream = ensure_stream(&self.js, &self.events).await?;
        let config = pull::Config {
            durable_name: Some(self.consumer_name.clone()),
            description: Some("Gatehouse audit projector".into()),
            ack_policy: AckPolicy::All,
            deliver_policy: DeliverPolicy::All,
            filter_subject: self.events.subjects().all(),
            ..Default::default()
        };
        stream
            .get_or_create_consumer(&self.consumer_name, config)
            .await
            .map_err(|source| ProjectorError::Consumer {
                consumer: self.consumer_name.clone(),
                source,
            })
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
                    // case it was deleted.
                    self.consumer = None;
                    self.messages = None;
                    if !sleep(backoff, &mut shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Waits for the next message, then takes those that have arrived
    /// besides, up to [`BATCH`].
    async fn fetch(&mut self) -> Result<Vec<Message>, ProjectorError> {
        if self.messages.is_none() {
            let consumer = match self.consumer.take() {
                Some(consumer) => consumer,
                None => self.connect().await?,
            };
            self.ack_all = consumer.cached_info().config.ack_policy == AckPolicy::All;
            let messages = consumer
                .messages()
                .await
                .map_err(|e| ProjectorError::Fetch(e.into()))?;
            self.consumer = Some(consumer);
            self.messages = Some(messages);
        }
        let stream = self.messages.as_mut().expect("just set");
        let mut messages = Vec::new();
        let first = stream.next().await;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Some(Ok(message)) => messages.push(message),
                // Keep what arrived and subscribe again next round; the
                // rest is redelivered.
                Some(Err(e)) if !messages.is_empty() => {
                    tracing::warn!(error = %e, "event stream interrupted");
                    self.messages = None;
                    break;
                }
                None if !messages.is_empty() => {
                    self.messages = None;
                    break;
                }
                Some(Err(e)) => return Err(ProjectorError::Fetch(e.into())),
                None => return Err(ProjectorError::Fetch("the event stream ended".into())),
            }
            if messages.len() < BATCH {
                next = stream.next().now_or_never();
            }
        }
        Ok(messages)
    }

    /// Decodes and stores one batch, then acknowledges it. Returns false if
    /// shutdown came while waiting to retry.
    async fn project(
        &self,
        messages: Vec<Message>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let mut decoded = Vec::with_capacity(messages.len());
        for message in messages {
            match decode(&message.payload) {
                Ok(events) => decoded.push((message, events)),
                Err(e) => {
                    tracing::warn!(
                        stream_seq = stream_seq(&message),
                        subject = %message.subject,
                        error = %describe(&e),
                        "cannot decode event message; terminating it"
                    );
                    settle(&message, AckKind::Term).await;
                }
            }
        }
        match self.store_retrying(&decoded, shutdown).await {
            Stored::Yes => {}
            Stored::Shutdown => return false,
            // Some event in the batch is refused by the database itself:
            // store message by message to isolate it.
            Stored::Rejected(_) => {
                for one in decoded.chunks(1) {
                    match self.store_retrying(one, shutdown).await {
                        Stored::Yes => settle(&one[0].0, AckKind::Ack).await,
                        Stored::Shutdown => return false,
                        Stored::Rejected(e) => {
                            tracing::error!(
                                stream_seq = stream_seq(&one[0].0),
                                sqlstate = e.code().as_deref().unwrap_or(""),
                                "audit database refuses an event message; terminating it"
                            );
                            settle(&one[0].0, AckKind::Term).await;
                        }
                    }
                }
                return true;
            }
        }
        if self.ack_all {
            if let Some((last, _)) = decoded.last() {
                settle(last, AckKind::Ack).await;
            }
        } else {
            for (message, _) in &decoded {
                settle(message, AckKind::Ack).await;
            }
        }
        true
    }

    /// Stores the events of `batch` in one transaction, retrying with
    /// back-off while the database is unavailable.
    async fn store_retrying(
        &self,
        batch: &[(Message, Vec<Event>)],
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Stored {
        let events: Vec<&Event> = batch.iter().flat_map(|(_, events)| events).collect();
        let mut backoff = BACKOFF_MIN;
        loop {
            match store(&self.pool, &events).await {
                Ok(()) => return Stored::Yes,
                Err(sqlx::Error::Database(e)) if is_data_error(e.code().as_deref()) => {
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

enum Stored {
    Yes,
    Rejected(Box<dyn sqlx::error::DatabaseError>),
    Shutdown,
}

/// SQLSTATE classes that retrying cannot fix: data exceptions (22), integrity
/// violations (23), program limits (54).
fn is_data_error(code: Option<&str>) -> bool {
    code.is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class)))
}

/// Sleeps for `d`; false if shutdown came first.
async fn sleep(d: Duration, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        () = shutdown => false,
        () = tokio::time::sleep(d) => true,
    }
}

async fn settle(message: &Message, kind: AckKind) {
    // A lost ack means a redelivery, which the projection absorbs.
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(
            stream_seq = stream_seq(message),
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

/// Writes `events` and their projections in one transaction. The raw events
/// and the commands (nearly all of the volume) go in one statement each;
/// session and authentication rows, which are rare, one by one.
async fn store(pool: &PgPool, events: &[&Event]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    store_raw(&mut tx, events).await?;
    store_commands(&mut tx, events).await?;
    for event in events {
        store_event(&mut tx, event).await?;
    }
    tx.commit().await
}

async fn store_raw(db: &mut PgConnection, events: &[&Event]) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    let mut sessions = Vec::with_capacity(events.len());
    let mut seqs = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    for e in events {
        ids.push(e.id);
        types.push(e.event_type().token());
        times.push(e.time);
        sessions.push(e.session_id);
        seqs.push(int(e.seq));
        bodies.push(String::from_utf8(e.to_cloudevent()).expect("serde_json writes UTF-8"));
    }
    sqlx::query(
        "INSERT INTO events (event_id, type, time, session_id, seq, body)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::uuid[],
                              $5::bigint[], $6::text[]::jsonb[])
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(ids)
    .bind(types)
    .bind(times)
    .bind(sessions)
    .bind(seqs)
    .bind(bodies)
    .execute(&mut *db)
    .await?;
    Ok(())
}

async fn store_commands(db: &mut PgConnection, events: &[&Event]) -> Result<(), sqlx::Error> {
    #[derive(Default)]
    struct Columns<'a> {
        ids: Vec<uuid::Uuid>,
        sessions: Vec<Option<uuid::Uuid>>,
        seqs: Vec<i64>,
        times: Vec<chrono::DateTime<chrono::Utc>>,
        subjects: Vec<Option<&'a str>>,
        usernames: Vec<Option<&'a str>>,
        delegations: Vec<Option<String>>,
        targets: Vec<Option<&'a str>>,
        protocols: Vec<String>,
        statements: Vec<&'a str>,
        names: Vec<Option<&'a str>>,
        portals: Vec<Option<&'a str>>,
        params: Vec<String>,
        executes: Vec<Option<String>>,
        effects: Vec<Option<String>>,
        enforced: Vec<Option<bool>>,
        decisions: Vec<Option<String>>,
    }
    let mut c = Columns::default();
    for e in events {
        let Payload::CommandReceived(p) = &e.payload else {
            continue;
        };
        let who = e.identity.as_ref();
        c.ids.push(e.id);
        c.sessions.push(e.session_id);
        c.seqs.push(int(e.seq));
        c.times.push(e.time);
        c.subjects.push(who.map(|i| i.subject.as_str()));
        c.usernames.push(who.map(|i| i.username.as_str()));
        c.delegations.push(who.map(|i| json(&i.delegation)));
        c.targets.push(e.target.as_deref());
        c.protocols.push(snake_case(&p.protocol));
        c.statements.push(&p.statement);
        c.names.push(p.statement_name.as_deref());
        c.portals.push(p.portal.as_deref());
        c.params.push(json(&p.params));
        c.executes
            .push((!p.executes.is_empty()).then(|| json(&p.executes)));
        c.effects
            .push(p.decision.as_ref().map(|d| snake_case(&d.effect)));
        c.enforced.push(p.decision.as_ref().map(|d| d.enforced));
        c.decisions.push(p.decision.as_ref().map(json));
    }
    if c.ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO commands (event_id, session_id, seq, time, identity_subject,
            identity_username, delegation, target, protocol, statement, statement_name,
            portal, params, executes, effect, enforced, decision)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[],
            $5::text[], $6::text[], $7::text[]::jsonb[], $8::text[], $9::text[], $10::text[],
            $11::text[], $12::text[], $13::text[]::jsonb[], $14::text[]::jsonb[], $15::text[],
            $16::bool[], $17::text[]::jsonb[])
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(c.ids)
    .bind(c.sessions)
    .bind(c.seqs)
    .bind(c.times)
    .bind(c.subjects)
    .bind(c.usernames)
    .bind(c.delegations)
    .bind(c.targets)
    .bind(c.protocols)
    .bind(c.statements)
    .bind(c.names)
    .bind(c.portals)
    .bind(c.params)
    .bind(c.executes)
    .bind(c.effects)
    .bind(c.enforced)
    .bind(c.decisions)
    .execute(&mut *db)
    .await?;
    Ok(())
}

fn json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("serializes to JSON")
}

/// Session and authentication rows. Each statement is idempotent on its own,
/// so redelivered events and SessionOpened / SessionClosed in either order
/// give the same rows.
async fn store_event(db: &mut PgConnection, e: &Event) -> Result<(), sqlx::Error> {
    let who = e.identity.as_ref();
    let delegation = who.map(|i| Json(&i.delegation));
    let groups: &[String] = who.map_or(&[], |i| &i.groups);
    match (&e.payload, e.session_id) {
        (Payload::SessionOpened(p), Some(session_id)) => {
            sqlx::query(
                "INSERT INTO sessions (session_id, worker_id, identity_subject, identity_username,
                    identity_issuer, groups, delegation, target, client_addr, client_tls,
                    target_tls, application_name, opened_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (session_id) DO UPDATE SET
                    worker_id = EXCLUDED.worker_id,
                    identity_subject = EXCLUDED.identity_subject,
                    identity_username = EXCLUDED.identity_username,
                    identity_issuer = EXCLUDED.identity_issuer,
                    groups = EXCLUDED.groups,
                    delegation = EXCLUDED.delegation,
                    target = EXCLUDED.target,
                    client_addr = EXCLUDED.client_addr,
                    client_tls = EXCLUDED.client_tls,
                    target_tls = EXCLUDED.target_tls,
                    application_name = EXCLUDED.application_name,
                    opened_at = EXCLUDED.opened_at",
            )
            .bind(session_id)
            .bind(&e.worker_id)
            .bind(who.map(|i| &i.subject))
            .bind(who.map(|i| &i.username))
            .bind(who.map(|i| &i.issuer))
            .bind(groups)
            .bind(delegation)
            .bind(&e.target)
            .bind(&p.client_addr)
            .bind(p.client_tls)
            .bind(p.target_tls)
            .bind(&p.application_name)
            .bind(e.time)
            .execute(&mut *db)
            .await?;
        }
        (Payload::SessionClosed(p), Some(session_id)) => {
            // If SessionOpened has not been projected yet, the row starts
            // from the envelope of this event and is completed later.
            sqlx::query(
                "INSERT INTO sessions (session_id, worker_id, identity_subject, identity_username,
                    identity_issuer, groups, delegation, target, closed_at, close_reason,
                    commands, bytes_from_client, bytes_to_client)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (session_id) DO UPDATE SET
                    closed_at = EXCLUDED.closed_at,
                    close_reason = EXCLUDED.close_reason,
                    commands = EXCLUDED.commands,
                    bytes_from_client = EXCLUDED.bytes_from_client,
                    bytes_to_client = EXCLUDED.bytes_to_client",
            )
            .bind(session_id)
            .bind(&e.worker_id)
            .bind(who.map(|i| &i.subject))
            .bind(who.map(|i| &i.username))
            .bind(who.map(|i| &i.issuer))
            .bind(groups)
            .bind(delegation)
            .bind(&e.target)
            .bind(e.time)
            .bind(snake_case(&p.reason))
            .bind(int(p.commands))
            .bind(int(p.bytes_from_client))
            .bind(int(p.bytes_to_client))
            .execute(&mut *db)
            .await?;
        }
        (Payload::SessionOpened(_) | Payload::SessionClosed(_), None) => {
            tracing::warn!(
                event_id = %e.id,
                "session event without a session id; kept in events only"
            );
        }
        // Stored in bulk by `store_commands`.
        (Payload::CommandReceived(_), _) => {}
        (Payload::PolicyBundlePublished(p), _) => {
            sqlx::query(
                "INSERT INTO policy_bundles (event_id, time, version, hash, files, dry_run,
                    published_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(e.id)
            .bind(e.time)
            .bind(&p.version)
            .bind(&p.hash)
            .bind(&p.files)
            .bind(p.dry_run)
            .bind(&p.published_by)
            .execute(&mut *db)
            .await?;
        }
        (Payload::IdentityRevoked(p), _) => {
            sqlx::query(
                "INSERT INTO revocations (event_id, time, kind, value, revoked_by, reason)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(e.id)
            .bind(e.time)
            .bind(&p.kind)
            .bind(&p.value)
            .bind(&p.revoked_by)
            .bind(&p.reason)
            .execute(&mut *db)
            .await?;
        }
        (Payload::AuthenticationFailed(p), _) => {
            sqlx::query(
                "INSERT INTO authentication_failures (event_id, time, client_addr, client_tls,
                    claimed_user, requested_target, reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(e.id)
            .bind(e.time)
            .bind(&p.client_addr)
            .bind(p.client_tls)
            .bind(&p.claimed_user)
            .bind(&p.requested_target)
            .bind(&p.reason)
            .execute(&mut *db)
            .await?;
        }
    }
    Ok(())
}

/// Counters are u64 in events and bigint in SQL; nothing real reaches 2^63.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The serde name of a unit enum variant (`client_terminated`, `simple`).
fn snake_case(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_errors_are_final() {
        assert!(is_data_error(Some("22P05"))); // untranslatable character
        assert!(is_data_error(Some("23505")));
        assert!(!is_data_error(Some("57P01"))); // admin shutdown
        assert!(!is_data_error(Some("08006")));
        assert!(!is_data_error(None));
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
