//! The audit database: connection, creation, migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::ControlPlaneConfig;

/// Why the audit database could not be reached or prepared. Messages name the
/// database, never the URL (which may hold a password).
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
    #[error("cannot migrate audit database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Connects to the audit database, creating it first when
/// `create_database` allows and it is missing, and applies the embedded
/// migrations (under an advisory lock, so replicas may start together).
pub async fn connect_audit_db(config: &ControlPlaneConfig) -> Result<PgPool, DbError> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(super::quote_ident("gh"), "\"gh\"");
        assert_eq!(super::quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
