//! The audit store: the projections of the event log that the API reads.
//!
//! A port with two implementations, chosen by `control_plane.audit_db_url`:
//! PostgreSQL (`postgres://…`; production, where control-plane replicas
//! share it) and one SQLite file (`sqlite:PATH`; a single node, what
//! `gatehouse dev` uses without `--audit-db`). Both hold the same tables
//! (schemas in `migrations/` and `migrations-sqlite/`) written by the same
//! statements where their SQL agrees; the projector and the API do not
//! know which one they run on.

mod postgres;
mod sqlite;

use chrono::{DateTime, Utc};
use gatehouse_events::{Event, Payload};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::{
    Database, Encode, Executor, FromRow, IntoArguments, PgPool, QueryBuilder, SqlitePool, Type,
};
use uuid::Uuid;

use crate::ControlPlaneConfig;

/// Why the audit store could not be reached or prepared. Messages name the
/// database or file, never the URL (which may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("control_plane.audit_db_url is not a PostgreSQL URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("{0}")]
    Tls(String),
    #[error("cannot create audit database {database:?}: {source}")]
    Create {
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to audit database {database:?}: {source}")]
    Connect {
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot open the audit store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate audit database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Where the audit tables are. Cheap to clone: both hold a pool.
#[derive(Clone, Debug)]
pub enum AuditStore {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Connects to the audit store that `audit_db_url` names and applies its
/// migrations: a PostgreSQL database (created first when `create_database`
/// allows and it is missing), or a SQLite file (created, owner-only, when
/// missing).
pub async fn connect_audit_db(config: &ControlPlaneConfig) -> Result<AuditStore, DbError> {
    match config.sqlite_path() {
        Some(path) => sqlite::open(path).await.map(AuditStore::Sqlite),
        None => postgres::connect(config).await.map(AuditStore::Postgres),
    }
}

impl AuditStore {
    /// `postgres` or `sqlite`, for readiness and banners.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    /// Whether the store answers a query.
    pub(crate) async fn ping(&self) -> bool {
        match self {
            Self::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            Self::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
        }
    }

    /// Writes `events` and their projections, and `quarantine` rows, in
    /// one transaction; says for each quarantine row whether it is new.
    /// Every write is idempotent, so a redelivered batch changes nothing.
    pub(crate) async fn store(
        &self,
        events: &[&Event],
        quarantine: &[Quarantine<'_>],
    ) -> Result<Vec<bool>, sqlx::Error> {
        match self {
            Self::Postgres(pool) => postgres::store(pool, events, quarantine).await,
            Self::Sqlite(pool) => sqlite::store(pool, events, quarantine).await,
        }
    }

    /// Whether the store refused `e` for what was written (retrying cannot
    /// help), rather than for being unavailable.
    pub(crate) fn is_data_error(&self, e: &dyn sqlx::error::DatabaseError) -> bool {
        match self {
            Self::Postgres(_) => postgres::is_data_error(e.code().as_deref()),
            Self::Sqlite(_) => sqlite::is_data_error(e.code().as_deref()),
        }
    }

    /// The rows of a read in SQL that means the same on both stores
    /// (`$1`… bound to `params`, as text): for tools and tests that look
    /// at the tables themselves.
    pub async fn query<T>(&self, sql: &str, params: &[&str]) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow>,
    {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Self::Postgres(pool) => {
                let mut q = sqlx::query_as(sql);
                for p in params {
                    q = q.bind(p.to_string());
                }
                q.fetch_all(pool).await
            }
            Self::Sqlite(pool) => {
                let mut q = sqlx::query_as(sql);
                for p in params {
                    q = q.bind(p.to_string());
                }
                q.fetch_all(pool).await
            }
        }
    }

    /// Writes `a`, the approval as its record `sequence` of the approvals
    /// stream has it, unless the row holds that record or a later one.
    pub(crate) async fn store_approval(
        &self,
        a: &gatehouse_events::approval::Approval,
        sequence: u64,
    ) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(pool) => {
                store_approval::<sqlx::Postgres>(&mut *pool.acquire().await?, a, sequence).await
            }
            Self::Sqlite(pool) => {
                store_approval::<sqlx::Sqlite>(&mut *pool.acquire().await?, a, sequence).await
            }
        }
    }

    /// Closes the store's connections.
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }

    /// Runs `select` (ending in a `WHERE` clause) with `filter`'s
    /// conditions, order and limit appended.
    pub(crate) async fn fetch<T>(
        &self,
        select: &str,
        filter: &impl Filter,
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow>,
    {
        match self {
            Self::Postgres(pool) => {
                let mut sql = QueryBuilder::new(select);
                filter.push(&mut sql);
                sql.build_query_as().fetch_all(pool).await
            }
            Self::Sqlite(pool) => {
                let mut sql = QueryBuilder::new(select);
                filter.push(&mut sql);
                sql.build_query_as().fetch_all(pool).await
            }
        }
    }
}

/// What differs between the stores' SQL: how a time and a list of strings
/// are written (`timestamptz` and `text[]` in PostgreSQL, TEXT in SQLite).
pub(crate) trait Dialect: Database {
    type Time: for<'a> Encode<'a, Self> + Type<Self> + Send;
    type List: for<'a> Encode<'a, Self> + Type<Self> + Send;
    fn time(t: DateTime<Utc>) -> Self::Time;
    fn list(items: &[String]) -> Self::List;
    /// Appends a time parameter.
    fn push_time(sql: &mut QueryBuilder<Self>, t: DateTime<Utc>) {
        sql.push_bind(Self::time(t));
    }
}

/// A value that can be bound as a parameter of `DB`'s queries.
pub(crate) trait Bind<DB: Database>: for<'a> Encode<'a, DB> + Type<DB> {}
impl<DB: Database, T: for<'a> Encode<'a, DB> + Type<DB>> Bind<DB> for T {}

/// The tail of a list query: conditions, order and limit.
pub(crate) trait Filter {
    fn push<DB: Dialect>(&self, sql: &mut QueryBuilder<DB>)
    where
        String: Bind<DB>,
        i64: Bind<DB>,
        Uuid: Bind<DB>;
}

/// A quarantine row to write: an event or message the projector could not
/// project, kept raw.
pub(crate) struct Quarantine<'a> {
    pub stream_seq: u64,
    pub subject: &'a str,
    /// The event's position in its message; `None` for a whole message that
    /// did not decode.
    pub index: Option<usize>,
    pub event: Option<&'a Event>,
    /// The decode error, or the database's SQLSTATE and message; never the
    /// content.
    pub reason: String,
    pub raw: &'a [u8],
}

/// Writes a quarantine row; true if it is new (a redelivered message or
/// event is already there). The same SQL on both stores.
async fn store_quarantine<DB>(
    db: &mut DB::Connection,
    q: &Quarantine<'_>,
) -> Result<bool, sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    String: Bind<DB>,
    Option<String>: Bind<DB>,
    i64: Bind<DB>,
    Option<i32>: Bind<DB>,
    Option<Uuid>: Bind<DB>,
    Vec<u8>: Bind<DB>,
{
    let inserted = sqlx::query::<DB>(
        "INSERT INTO quarantine (stream_seq, subject, event_index, event_id,
            event_type, session_id, reason, raw)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(int(q.stream_seq))
    .bind(q.subject.to_owned())
    .bind(q.index.map(|i| i32::try_from(i).unwrap_or(i32::MAX)))
    .bind(q.event.map(|e| e.id))
    .bind(q.event.map(|e| e.event_type().token().to_owned()))
    .bind(q.event.and_then(|e| e.session_id))
    // PostgreSQL's text cannot hold NUL; a reason never needs one.
    .bind(q.reason.replace('\0', ""))
    .bind(q.raw.to_vec())
    .fetch_optional(&mut *db)
    .await?;
    Ok(inserted.is_some())
}

/// The `commands` row of a CommandReceived event.
struct CommandRow<'a> {
    id: Uuid,
    session: Option<Uuid>,
    seq: i64,
    time: DateTime<Utc>,
    subject: Option<&'a str>,
    username: Option<&'a str>,
    delegation: Option<String>,
    target: Option<&'a str>,
    protocol: String,
    statement: &'a str,
    name: Option<&'a str>,
    portal: Option<&'a str>,
    params: String,
    executes: Option<String>,
    effect: Option<String>,
    enforced: Option<bool>,
    decision: Option<String>,
}

impl<'a> CommandRow<'a> {
    fn of(e: &'a Event) -> Option<Self> {
        let Payload::CommandReceived(p) = &e.payload else {
            return None;
        };
        let who = e.identity.as_ref();
        Some(Self {
            id: e.id,
            session: e.session_id,
            seq: int(e.seq),
            time: e.time,
            subject: who.map(|i| i.subject.as_str()),
            username: who.map(|i| i.username.as_str()),
            delegation: who.map(|i| json(&i.delegation)),
            target: e.target.as_deref(),
            protocol: snake_case(&p.protocol),
            statement: &p.statement,
            name: p.statement_name.as_deref(),
            portal: p.portal.as_deref(),
            params: json(&p.params),
            executes: (!p.executes.is_empty()).then(|| json(&p.executes)),
            effect: p.decision.as_ref().map(|d| snake_case(&d.effect)),
            enforced: p.decision.as_ref().map(|d| d.enforced),
            decision: p.decision.as_ref().map(json),
        })
    }
}

/// Session, authentication, policy and revocation rows, which are rare:
/// one statement each, the same SQL on both stores. Each statement is
/// idempotent on its own, so redelivered events and SessionOpened /
/// SessionClosed in either order give the same rows.
async fn store_event<DB>(db: &mut DB::Connection, e: &Event) -> Result<(), sqlx::Error>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    String: Bind<DB>,
    Option<String>: Bind<DB>,
    bool: Bind<DB>,
    Option<bool>: Bind<DB>,
    i64: Bind<DB>,
    Uuid: Bind<DB>,
    Option<Json<Vec<gatehouse_events::Actor>>>: Bind<DB>,
{
    let who = e.identity.as_ref();
    let delegation = who.map(|i| Json(i.delegation.clone()));
    let groups = DB::list(who.map_or(&[], |i| &i.groups));
    // A session row's first eight columns: the event's envelope.
    let session = |sql: &'static str, session_id: Uuid| {
        sqlx::query::<DB>(sql)
            .bind(session_id)
            .bind(e.worker_id.clone())
            .bind(who.map(|i| i.subject.clone()))
            .bind(who.map(|i| i.username.clone()))
            .bind(who.map(|i| i.issuer.clone()))
            .bind(groups)
            .bind(delegation)
            .bind(e.target.clone())
    };
    let query = match (&e.payload, e.session_id) {
        (Payload::SessionOpened(p), Some(session_id)) => session(
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
            session_id,
        )
        .bind(p.client_addr.clone())
        .bind(p.client_tls)
        .bind(p.target_tls)
        .bind(p.application_name.clone())
        .bind(DB::time(e.time)),
        // If SessionOpened has not been projected yet, the row starts from
        // the envelope of this event and is completed later.
        (Payload::SessionClosed(p), Some(session_id)) => session(
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
            session_id,
        )
        .bind(DB::time(e.time))
        .bind(snake_case(&p.reason))
        .bind(int(p.commands))
        .bind(int(p.bytes_from_client))
        .bind(int(p.bytes_to_client)),
        (Payload::SessionOpened(_) | Payload::SessionClosed(_), None) => {
            tracing::warn!(
                event_id = %e.id,
                "session event without a session id; kept in events only"
            );
            return Ok(());
        }
        // Stored in bulk with the raw events.
        (Payload::CommandReceived(_), _) => return Ok(()),
        // Kept in `events`, linked to its command by session and seq.
        (Payload::ResponseRecorded(_), _) => return Ok(()),
        (Payload::PolicyBundlePublished(p), _) => sqlx::query::<DB>(
            "INSERT INTO policy_bundles (event_id, time, version, hash, files, dry_run,
                published_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(e.id)
        .bind(DB::time(e.time))
        .bind(p.version.clone())
        .bind(p.hash.clone())
        .bind(DB::list(&p.files))
        .bind(p.dry_run)
        .bind(p.published_by.clone()),
        (Payload::IdentityRevoked(p), _) => sqlx::query::<DB>(
            "INSERT INTO revocations (event_id, time, kind, value, revoked_by, reason)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(e.id)
        .bind(DB::time(e.time))
        .bind(p.kind.clone())
        .bind(p.value.clone())
        .bind(p.revoked_by.clone())
        .bind(p.reason.clone()),
        (Payload::IdentityReinstated(p), _) => sqlx::query::<DB>(
            "INSERT INTO reinstatements (event_id, time, kind, value, reinstated_by, reason)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(e.id)
        .bind(DB::time(e.time))
        .bind(p.kind.clone())
        .bind(p.value.clone())
        .bind(p.reinstated_by.clone())
        .bind(p.reason.clone()),
        (Payload::AuthenticationFailed(p), _) => sqlx::query::<DB>(
            "INSERT INTO authentication_failures (event_id, time, client_addr, client_tls,
                claimed_user, requested_target, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(e.id)
        .bind(DB::time(e.time))
        .bind(p.client_addr.clone())
        .bind(p.client_tls)
        .bind(p.claimed_user.clone())
        .bind(p.requested_target.clone())
        .bind(p.reason.clone()),
    };
    query.execute(&mut *db).await?;
    Ok(())
}

/// The `approvals` row of an approval record; the same SQL on both stores.
async fn store_approval<DB>(
    db: &mut DB::Connection,
    a: &gatehouse_events::approval::Approval,
    sequence: u64,
) -> Result<(), sqlx::Error>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    String: Bind<DB>,
    Option<String>: Bind<DB>,
    i64: Bind<DB>,
    i32: Bind<DB>,
    Uuid: Bind<DB>,
    Option<<DB as Dialect>::Time>: Bind<DB>,
    Json<Vec<gatehouse_events::Actor>>: Bind<DB>,
    Json<serde_json::Value>: Bind<DB>,
{
    let (kind, statement, scope, reason) = match (a.command(), a.access()) {
        (Some(c), _) => ("command", Some(c.statement.clone()), None, None),
        (None, Some(x)) => (
            "access",
            None,
            Some(x.scope.clone()),
            Some(x.reason.clone()),
        ),
        (None, None) => ("unknown", None, None, None),
    };
    let granted_by: Vec<String> = a.grants.iter().map(|g| g.username.clone()).collect();
    let record = serde_json::to_value(a).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query::<DB>(
        "INSERT INTO approvals (approval_id, kind, state, requested_at, expires_at, ended_at,
            access_until, requester_subject, requester_username, delegation, target,
            statement, scope, reason, approvers_required, granted_by, record, sequence)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
         ON CONFLICT (approval_id) DO UPDATE SET
            state = EXCLUDED.state,
            ended_at = EXCLUDED.ended_at,
            access_until = EXCLUDED.access_until,
            granted_by = EXCLUDED.granted_by,
            record = EXCLUDED.record,
            sequence = EXCLUDED.sequence
         WHERE approvals.sequence < EXCLUDED.sequence",
    )
    .bind(a.id)
    .bind(kind.to_string())
    .bind(a.state.as_str().to_string())
    .bind(Some(DB::time(a.requested_at)))
    .bind(Some(DB::time(a.expires_at)))
    .bind(a.ended_at.map(DB::time))
    .bind(a.access_until().map(DB::time))
    .bind(a.requester.subject.clone())
    .bind(a.requester.username.clone())
    .bind(Json(a.requester.delegation.clone()))
    .bind(a.target.name.clone())
    .bind(statement)
    .bind(scope)
    .bind(reason)
    .bind(i32::try_from(a.approvers_required).unwrap_or(i32::MAX))
    .bind(DB::list(&granted_by))
    .bind(Json(record))
    .bind(int(sequence))
    .execute(&mut *db)
    .await?;
    Ok(())
}

fn json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("serializes to JSON")
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
