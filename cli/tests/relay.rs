//! Real clients through a worker to a real PostgreSQL, with every command
//! recorded exactly once in the audit API.

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_protocol_with_binary_results_are_relayed_and_recorded() {
    let env = Env::start().await;
    let db = env.connect("alice").await;

    // Simple protocol, several statements in one string.
    db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric); INSERT INTO items VALUES (1, 'one', 1.5)")
        .await
        .unwrap();
    let rows = db.simple_query("SELECT name FROM items").await.unwrap();
    let names: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["one"]);

    // Extended protocol: named prepared statement executed several times,
    // binary parameters and results.
    let insert = db
        .prepare("INSERT INTO items VALUES ($1, $2, $3::text::numeric)")
        .await
        .unwrap();
    for i in 2..=4 {
        db.execute(&insert, &[&i, &format!("item {i}"), &format!("{i}.25")])
            .await
            .unwrap();
    }
    let row = db
        .query_one(
            "SELECT id, name, now() > '2000-01-01'::timestamptz AS recent FROM items WHERE id = $1",
            &[&3i32],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>("id"), 3);
    assert_eq!(row.get::<_, &str>("name"), "item 3");
    assert!(row.get::<_, bool>("recent"));

    // Pipelined: several executes in flight at once.
    let select = db
        .prepare("SELECT count(*) FROM items WHERE id <= $1")
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        db.query_one(&select, &[&1i32]),
        db.query_one(&select, &[&2i32]),
        db.query_one(&select, &[&4i32]),
    );
    assert_eq!(
        (
            a.unwrap().get::<_, i64>(0),
            b.unwrap().get::<_, i64>(0),
            c.unwrap().get::<_, i64>(0)
        ),
        (1, 2, 4)
    );

    // The target really holds what went through.
    let direct = env.target().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);

    // 1 batch + 1 select + 3 inserts + 1 query_one + 3 pipelined = 9.
    let audit = env.audit_commands("alice", 9).await;
    let statements: Vec<&str> = audit
        .iter()
        .map(|c| c["statement"].as_str().unwrap())
        .collect();
    assert_eq!(audit.len(), 9, "{statements:#?}");
    assert!(statements[0].starts_with("CREATE TABLE items"));
    assert_eq!(statements[1], "SELECT name FROM items");
    assert_eq!(
        statements
            .iter()
            .filter(|s| s.starts_with("INSERT INTO items VALUES ($1"))
            .count(),
        3
    );
    let inserts: Vec<_> = audit
        .iter()
        .filter(|c| {
            c["protocol"] == "extended" && c["statement"].as_str().unwrap().starts_with("INSERT")
        })
        .collect();
    // Bound parameter values are recorded (tokio-postgres sends them binary).
    assert_eq!(inserts[0]["params"].as_array().unwrap().len(), 3);
    for c in &audit {
        assert_eq!(c["target"], "app");
        assert_eq!(c["identity_username"], "alice");
    }
    // Exactly once: no event id twice.
    let mut ids: Vec<&str> = audit
        .iter()
        .map(|c| c["event_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 9);

    drop(db);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_round_trip_in_both_directions() {
    let env = Env::start().await;
    let db = env.connect("bob").await;
    db.batch_execute("CREATE TABLE c (a int, b text)")
        .await
        .unwrap();

    let sink = db.copy_in("COPY c FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 5000);

    let stream = db.copy_out("COPY c TO STDOUT").await.unwrap();
    futures::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);

    let statements = env.audit_statements("bob", 3).await;
    assert_eq!(
        statements,
        [
            "CREATE TABLE c (a int, b text)",
            "COPY c FROM STDIN",
            "COPY c TO STDOUT"
        ]
    );
    drop(db);
    env.cleanup().await;
}

/// Runs `SELECT pg_sleep(10)` as `user`, lets `cancel` send a cancel request
/// with the session's key, and checks the query ends cancelled, quickly.
async fn sleep_then_cancel(
    env: &Env,
    user: &str,
    cancel: impl AsyncFnOnce(tokio_postgres::CancelToken),
) {
    let db = env.connect(user).await;
    let token = db.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move { db.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel(token).await;
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_a_running_query() {
    let env = Env::start().await;
    sleep_then_cancel(&env, "carol", async |token| {
        token.cancel_query(env.tls()).await.unwrap();
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaching_another_worker_is_forwarded() {
    let env = Env::start().await;
    // A second worker of the same fleet; the cancel request goes there, as
    // a load balancer might send it. The handle keeps it running.
    let other = env
        .stack()
        .spawn_worker("127.0.0.1:0", |_| {})
        .await
        .unwrap();
    sleep_then_cancel(&env, "erin", async |token| {
        let tcp = tokio::net::TcpStream::connect(other.addr).await.unwrap();
        let mut make = env.tls();
        let tls = tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
            &mut make,
            "127.0.0.1",
        )
        .unwrap();
        token.cancel_query_raw(tcp, tls).await.unwrap();
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_notices_reach_the_client() {
    let env = Env::start().await;
    let mut config: tokio_postgres::Config =
        env.conninfo("frank", "app", "require").parse().unwrap();
    // A member of `dba`: the notice comes from a DO block, which the
    // defaults allow only to that group.
    config.password(env.stack().token("frank", &["dba"]));
    let (listener, mut conn) = config.connect(env.tls()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    listener
        .batch_execute("LISTEN gatehouse_test")
        .await
        .unwrap();
    listener
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from the target'; END $$")
        .await
        .unwrap();
    let other = env.connect("frank").await;
    other
        .batch_execute("NOTIFY gatehouse_test, 'payload-1'")
        .await
        .unwrap();

    let mut notice = None;
    let mut notification = None;
    while notice.is_none() || notification.is_none() {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            tokio_postgres::AsyncMessage::Notice(n) => notice = Some(n.message().to_string()),
            tokio_postgres::AsyncMessage::Notification(n) => {
                notification = Some((n.channel().to_string(), n.payload().to_string()))
            }
            _ => {}
        }
    }
    assert_eq!(notice.unwrap(), "hello from the target");
    assert_eq!(
        notification.unwrap(),
        ("gatehouse_test".to_string(), "payload-1".to_string())
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_certificates_are_verified_by_default() {
    // The machine's PostgreSQL has a self-signed certificate: with the
    // default verify-full the worker must refuse to talk to it.
    let env = Env::start().await;
    // Trust only an unrelated CA (the dev stack's own certificate).
    let spec = format!(
        "strict={}/{}?sslmode=verify-full&sslrootcert={}",
        support::PG,
        env.target_db,
        env.data_dir.join("tls-cert.pem").display()
    );
    let (name, target) = gatehouse::dev::parse_target(&spec).unwrap();
    let strict = env
        .stack()
        .spawn_worker("127.0.0.1:0", |c| {
            c.targets.insert(name, target);
        })
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = format!(
        "host={} port={} user=gina dbname=strict sslmode=require",
        strict.addr.ip(),
        strict.addr.port()
    )
    .parse()
    .unwrap();
    config.password(env.token("gina"));
    let Err(err) = config.connect(env.tls()).await else {
        panic!("connected to a target whose certificate is not trusted");
    };
    let db_err = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "08001", "{db_err}");
    assert_eq!(db_err.message(), "cannot connect to target \"strict\"");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_ends_open_sessions_and_records_why() {
    let env = Env::start().await;
    let worker = env
        .stack()
        .spawn_worker("127.0.0.1:0", |c| c.drain_timeout_secs = 1)
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = format!(
        "host={} port={} user=hank dbname=app sslmode=require",
        worker.addr.ip(),
        worker.addr.port()
    )
    .parse()
    .unwrap();
    config.password(env.token("hank"));
    let (db, conn) = config.connect(env.tls()).await.unwrap();
    let conn = tokio::spawn(conn);
    db.simple_query("SELECT 1").await.unwrap();

    worker.stop().await.unwrap();
    // The connection got a FATAL admin_shutdown and closed.
    let err = conn.await.unwrap().unwrap_err();
    let db_err = err
        .as_db_error()
        .expect("an ErrorResponse before the close");
    assert_eq!(db_err.code().code(), "57P01", "{db_err}");
    assert!(db.simple_query("SELECT 1").await.is_err());

    // The session's end is recorded with its reason.
    let token = env.stack().api_token("auditor", &["auditors"]);
    let url = env.api("/api/v1/sessions?user=hank");
    let http = reqwest::Client::new();
    gatehouse_testkit::eventually("the session's end to be projected", async || {
        let page: serde_json::Value = http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page["items"][0]["close_reason"] == "worker_shutdown"
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let env = Env::start().await;
    // Expired 25 s ago: still inside the 30 s leeway at login.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let issuer = &env.stack().issuer;
    let token = issuer.sign_claims(&serde_json::json!({
        "iss": issuer.issuer(),
        "sub": "ivy",
        "aud": "gatehouse",
        "iat": now - 100,
        "exp": now - 25,
        "preferred_username": "ivy",
    }));
    let db = env
        .try_connect("ivy", &token)
        .await
        .expect("inside the leeway");
    db.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let err = db.simple_query("SELECT 1").await.unwrap_err();
    let db_err = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "28000");
    assert!(db_err.message().contains("expired"), "{}", db_err.message());
    env.cleanup().await;
}

/// A statement larger than the worker reads ahead of the session machine
/// (256 KiB) arrives whole and runs: 700 kB of text in the simple protocol,
/// and as a statement and a bound parameter in the extended one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_larger_than_the_read_ahead_run() {
    let env = Env::start().await;
    let db = env.connect("alice").await;
    db.batch_execute("CREATE TABLE blobs (v text)")
        .await
        .unwrap();
    let text = "x".repeat(700_000);
    tokio::time::timeout(Duration::from_secs(30), async {
        db.batch_execute(&format!("INSERT INTO blobs VALUES ('{text}')"))
            .await
            .unwrap();
        db.execute(&format!("INSERT INTO blobs VALUES ('{text}')"), &[])
            .await
            .unwrap();
        db.execute("INSERT INTO blobs VALUES ($1)", &[&text])
            .await
            .unwrap();
    })
    .await
    .expect("large statements do not stall");
    let rows = env
        .target()
        .await
        .query("SELECT length(v) FROM blobs", &[])
        .await
        .unwrap();
    let lengths: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(lengths, [700_000; 3]);
    env.cleanup().await;
}
