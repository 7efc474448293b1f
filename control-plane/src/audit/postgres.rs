//! The audit store on PostgreSQL: connection, creation, migrations
//! (`migrations/`), and the bulk writes of the projector.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gatehouse_events::Event;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres};

use super::{CommandRow, DbError, Dialect, Quarantine, int, store_event, store_quarantine};
use crate::ControlPlaneConfig;

impl Dialect for Postgres {
    type Time = DateTime<Utc>;
    type List = Vec<String>;
    fn time(t: DateTime<Utc>) -> Self::Time {
        t
    }
    fn list(items: &[String]) -> Self::List {
        items.to_vec()
    }
}

/// Connects to the audit database, creating it first when
/// `create_database` allows and it is missing, and applies the embedded
/// migrations (under an advisory lock, so replicas may start together).
pub(super) async fn connect(config: &ControlPlaneConfig) -> Result<PgPool, DbError> {
    let tls = config.audit_db_tls().map_err(DbError::Tls)?;
    // Set explicitly: sqlx's own default (and `PGSSLMODE`) is `prefer`.
    let options = PgConnectOptions::from_str(&config.audit_db_url)
        .map_err(DbError::Url)?
        .ssl_mode(tls.ssl_mode());
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    if config.create_database {
        create_if_missing(&options, &database)
            .await
            .map_err(|source| DbError::Create {
                database: database.clone(),
                source,
            })?;
    }
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect { database, source })?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

async fn create_if_missing(options: &PgConnectOptions, database: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        let create = format!("CREATE DATABASE {}", quote_ident(database));
        match sqlx::raw_sql(AssertSqlSafe(create))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database, "created audit database"),
            // Another replica created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
    }
    admin.close().await
}

/// Quotes a PostgreSQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Writes `events` and their projections, and `quarantine` rows, in one
/// transaction; says for each quarantine row whether it is new. The raw
/// events and the commands (nearly all of the volume) go in one statement
/// each; session and authentication rows, which are rare, one by one.
pub(super) async fn store(
    pool: &PgPool,
    events: &[&Event],
    quarantine: &[Quarantine<'_>],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !events.is_empty() {
        store_raw(&mut tx, events).await?;
        store_commands(&mut tx, events).await?;
    }
    for event in events {
        store_event::<Postgres>(&mut tx, event).await?;
    }
    let mut inserted = Vec::with_capacity(quarantine.len());
    for q in quarantine {
        inserted.push(store_quarantine::<Postgres>(&mut tx, q).await?);
    }
    tx.commit().await?;
    Ok(inserted)
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
    for row in events.iter().filter_map(|e| CommandRow::of(e)) {
        c.ids.push(row.id);
        c.sessions.push(row.session);
        c.seqs.push(row.seq);
        c.times.push(row.time);
        c.subjects.push(row.subject);
        c.usernames.push(row.username);
        c.delegations.push(row.delegation);
        c.targets.push(row.target);
        c.protocols.push(row.protocol);
        c.statements.push(row.statement);
        c.names.push(row.name);
        c.portals.push(row.portal);
        c.params.push(row.params);
        c.executes.push(row.executes);
        c.effects.push(row.effect);
        c.enforced.push(row.enforced);
        c.decisions.push(row.decision);
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

/// SQLSTATE classes that retrying cannot fix: data exceptions (22), integrity
/// violations (23), program limits (54).
pub(super) fn is_data_error(code: Option<&str>) -> bool {
    code.is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_data_errors_are_final() {
        use super::is_data_error;
        assert!(is_data_error(Some("22P05"))); // untranslatable character
        assert!(is_data_error(Some("23505")));
        assert!(!is_data_error(Some("57P01"))); // admin shutdown
        assert!(!is_data_error(Some("08006")));
        assert!(!is_data_error(None));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(super::quote_ident("gh"), "\"gh\"");
        assert_eq!(super::quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
