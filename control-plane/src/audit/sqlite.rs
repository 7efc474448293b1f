//! The audit store in one SQLite file: a single node's projections
//! (`migrations-sqlite/`). The projector is its only writer; the API reads
//! beside it (write-ahead log). Every commit is fsync'd: the projector
//! moves its position in the event log after the commit, so a commit lost
//! to a power cut would leave a hole the log would not fill again.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gatehouse_events::Event;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};

use super::{CommandRow, DbError, Dialect, Quarantine, int, store_event, store_quarantine};

impl Dialect for Sqlite {
    type Time = String;
    type List = String;
    /// RFC 3339 UTC with six fraction digits: one width, so that text
    /// order is time order, and PostgreSQL's precision.
    fn time(t: DateTime<Utc>) -> Self::Time {
        t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    }
    fn list(items: &[String]) -> Self::List {
        super::json(&items)
    }
}

pub(super) async fn open(path: &Path) -> Result<SqlitePool, DbError> {
    let open_err = |source| DbError::Open {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_err(sqlx::Error::Io(e)))?;
    }
    let options = gatehouse_eventlog::private_file(path).map_err(open_err)?;
    // Two processes (or pools) opening a new file at once race: one's
    // switch to the write-ahead log, or its migration, finds the other's
    // lock or tables ("database is locked", "table already exists") and
    // fails inside its transaction, rolled back. SQLite has no advisory lock
    // to wait on: try again; the second time finds the work done.
    let mut attempt = 1;
    loop {
        let opened = async {
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
                .await
                .map_err(open_err)?;
            sqlx::migrate!("./migrations-sqlite").run(&pool).await?;
            Ok::<_, DbError>(pool)
        };
        match opened.await {
            Ok(pool) => return Ok(pool),
            Err(e) if attempt < 5 => {
                tracing::debug!(error = %e, attempt, "cannot open the audit store yet; trying again");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Rows per multi-row INSERT: 17 columns × 500 stays far below SQLite's
/// 32,766 parameters.
const ROWS_PER_INSERT: usize = 500;

pub(super) async fn store(
    pool: &SqlitePool,
    events: &[&Event],
    quarantine: &[Quarantine<'_>],
) -> Result<Vec<bool>, sqlx::Error> {
    // IMMEDIATE: take the write lock at the start, so that a reader's
    // snapshot never has to be upgraded (which SQLite refuses with BUSY).
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    // Raw events and commands, nearly all of the volume, in multi-row
    // statements: each statement is a round trip to SQLite's thread.
    for chunk in events.chunks(ROWS_PER_INSERT) {
        store_raw(&mut tx, chunk).await?;
        let commands: Vec<CommandRow> = chunk.iter().filter_map(|e| CommandRow::of(e)).collect();
        if !commands.is_empty() {
            store_commands(&mut tx, commands).await?;
        }
    }
    for e in events {
        store_event::<Sqlite>(&mut tx, e).await?;
    }
    let mut inserted = Vec::with_capacity(quarantine.len());
    for q in quarantine {
        inserted.push(store_quarantine::<Sqlite>(&mut tx, q).await?);
    }
    tx.commit().await?;
    Ok(inserted)
}

async fn store_raw(db: &mut SqliteConnection, events: &[&Event]) -> Result<(), sqlx::Error> {
    let mut sql: QueryBuilder<Sqlite> =
        QueryBuilder::new("INSERT INTO events (event_id, type, time, session_id, seq, body) ");
    sql.push_values(events, |mut row, e| {
        row.push_bind(e.id)
            .push_bind(e.event_type().token())
            .push_bind(Sqlite::time(e.time))
            .push_bind(e.session_id)
            .push_bind(int(e.seq))
            .push_bind(String::from_utf8(e.to_cloudevent()).expect("serde_json writes UTF-8"));
    });
    sql.push(" ON CONFLICT (event_id) DO NOTHING");
    sql.build().execute(db).await?;
    Ok(())
}

async fn store_commands(
    db: &mut SqliteConnection,
    commands: Vec<CommandRow<'_>>,
) -> Result<(), sqlx::Error> {
    let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(
        "INSERT INTO commands (event_id, session_id, seq, time, identity_subject,
            identity_username, delegation, target, protocol, statement, statement_name,
            portal, params, executes, effect, enforced, decision) ",
    );
    sql.push_values(commands, |mut row, c| {
        row.push_bind(c.id)
            .push_bind(c.session)
            .push_bind(c.seq)
            .push_bind(Sqlite::time(c.time))
            .push_bind(c.subject)
            .push_bind(c.username)
            .push_bind(c.delegation)
            .push_bind(c.target)
            .push_bind(c.protocol)
            .push_bind(c.statement)
            .push_bind(c.name)
            .push_bind(c.portal)
            .push_bind(c.params)
            .push_bind(c.executes)
            .push_bind(c.effect)
            .push_bind(c.enforced)
            .push_bind(c.decision);
    });
    sql.push(" ON CONFLICT (event_id) DO NOTHING");
    sql.build().execute(db).await?;
    Ok(())
}

/// SQLite's result codes (the extended code, as sqlx reports it) that
/// retrying cannot fix: a constraint refused the row (19), a value too big
/// (18), a type mismatch (20).
pub(super) fn is_data_error(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 18..=20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_sort_as_text() {
        let at = |micros| DateTime::from_timestamp_micros(micros).unwrap();
        let a = Sqlite::time(at(1_795_660_800_000_000));
        let b = Sqlite::time(at(1_795_660_800_000_001));
        let c = Sqlite::time(at(1_795_660_801_000_000));
        assert_eq!(a, "2026-11-26T02:40:00.000000Z");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a.len(), c.len());
    }

    #[test]
    fn only_constraint_and_size_errors_are_final() {
        assert!(is_data_error(Some("2067"))); // SQLITE_CONSTRAINT_UNIQUE
        assert!(is_data_error(Some("275"))); // SQLITE_CONSTRAINT_CHECK
        assert!(is_data_error(Some("18"))); // SQLITE_TOOBIG
        assert!(!is_data_error(Some("5"))); // SQLITE_BUSY
        assert!(!is_data_error(Some("10"))); // SQLITE_IOERR
        assert!(!is_data_error(None));
    }
}
