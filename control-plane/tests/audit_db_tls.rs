//! The audit database connection is `verify-full` unless its URL says
//! otherwise, against the machine's PostgreSQL (127.0.0.1:5432, TLS with a
//! self-signed certificate no client trusts, trust auth).

use gatehouse_control_plane::{ControlPlaneConfig, connect_audit_db};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

#[tokio::test]
async fn without_sslmode_the_audit_db_certificate_must_verify() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let database = format!("gh_cp_tls_{}", uuid::Uuid::new_v4().simple());
    let config = |query: &str| ControlPlaneConfig {
        audit_db_url: format!("{SERVER}/{database}{query}"),
        ..Default::default()
    };

    // The server's certificate is self-signed and not for 127.0.0.1.
    let e = connect_audit_db(&config("")).await.unwrap_err().to_string();
    assert!(
        e.contains("cannot create audit database") || e.contains("cannot connect"),
        "{e}"
    );
    // prefer would fall back to plaintext: refused before connecting.
    let e = connect_audit_db(&config("?sslmode=prefer"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("sslmode=prefer"), "{e}");

    // Said explicitly, an unverified connection is made (and is TLS).
    let gatehouse_control_plane::AuditStore::Postgres(pool) =
        connect_audit_db(&config("?sslmode=require")).await.unwrap()
    else {
        panic!("a postgres:// URL connects to PostgreSQL");
    };
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "sslmode=require connected without TLS");
    pool.close().await;

    let admin = sqlx::PgPool::connect(&format!("{SERVER}/postgres?sslmode=disable"))
        .await
        .unwrap();
    let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(&admin)
        .await
        .unwrap();
}
