//! Fail-closed recording: with the event log down, commands do not reach the
//! target and the client gets a clear error; once it is back, the same
//! session carries on.

mod support;

use gatehouse_testkit::{PrivateNats, eventually};
use support::{Env, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_do_not_run_while_the_event_log_is_down() {
    let mut nats = PrivateNats::start().await;
    let env = Env::start_with(Options {
        nats_url: nats.url(),
        // This test is about NATS going away.
        embedded: false,
        publish_timeout_ms: 1500,
        ..Default::default()
    })
    .await;
    let db = env.connect("dana").await;
    db.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    db.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();

    nats.down().await;
    let http = reqwest::Client::new();
    let ready = env.api("/readyz");
    let readiness_is = async |status: u16| {
        http.get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == status)
    };
    let ids = async || -> Vec<i32> {
        let rows = env
            .target()
            .await
            .query("SELECT id FROM t ORDER BY id", &[])
            .await;
        rows.unwrap().iter().map(|r| r.get(0)).collect()
    };
    eventually("the gateway to notice NATS is gone", async || {
        readiness_is(503).await
    })
    .await;

    // Simple protocol.
    let err = db
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap_err();
    let db_err = err
        .as_db_error()
        .expect("an ErrorResponse, not a broken connection");
    assert_eq!(db_err.code().code(), "58000", "{db_err}");
    assert!(db_err.message().contains("not run"), "{}", db_err.message());
    // Extended protocol, with a parameter.
    let err = db
        .execute("INSERT INTO t VALUES ($1)", &[&3i32])
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "58000", "{err}");

    assert_eq!(ids().await, [1], "nothing ran while the event log was down");

    nats.up().await;
    // Once the gateway's NATS client is connected again (readiness tells),
    // the same session's next command runs.
    eventually("the gateway to reconnect to NATS", async || {
        readiness_is(200).await
    })
    .await;
    db.execute("INSERT INTO t VALUES (4)", &[]).await.unwrap();
    assert_eq!(ids().await, [1, 4]);

    // The audit trail holds what ran, and not what was refused.
    let statements = env.audit_statements("dana", 3).await;
    assert_eq!(
        statements,
        [
            "CREATE TABLE t (id int)",
            "INSERT INTO t VALUES (1)",
            "INSERT INTO t VALUES (4)"
        ]
    );
    drop(db);
    env.cleanup().await;
}

/// A command whose record is larger than the event log takes (NATS's
/// `max_payload`, 1 MiB by default; JSON escaping grows a control character
/// six-fold) is refused on its own with 54000, runs nothing, and the
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_too_large_to_record_is_refused_alone() {
    let env = Env::start().await;
    let db = env.connect("dana").await;
    db.batch_execute("CREATE TABLE big (v text)").await.unwrap();

    // 200 kB of text, some 1.2 MB once escaped in the event's JSON.
    let text = "\u{1}".repeat(200_000);
    let err = db
        .batch_execute(&format!("INSERT INTO big VALUES ('{text}')"))
        .await
        .unwrap_err();
    let db_err = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "54000", "{db_err}");
    assert!(db_err.message().contains("not run"), "{}", db_err.message());
    // The same through the extended protocol.
    let err = db
        .execute(&format!("INSERT INTO big VALUES ('{text}')"), &[])
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "54000", "{err}");

    // Nothing ran, and the session carries on.
    db.execute("INSERT INTO big VALUES ('small')", &[])
        .await
        .unwrap();
    let rows = env
        .target()
        .await
        .query("SELECT v FROM big", &[])
        .await
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, ["small"]);
    env.cleanup().await;
}
