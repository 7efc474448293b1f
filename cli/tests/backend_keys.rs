//! Backend keys through a worker: a client gets its target backend's real
//! process id (the one notifications, `pg_backend_pid()` and
//! `pg_terminate_backend` speak of) with a secret the worker chose, so a
//! cancel request works only through the worker and only with the whole
//! key; and a backend terminated on the target ends the client's session
//! with the target's own `57P01`.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use gatehouse_pgwire as pg;
use raw::Raw;
use support::{Env, Options};
use tokio::io::AsyncWriteExt;
use tokio_postgres::error::SqlState;

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Sends a CancelRequest for `(pid, secret)` to `addr`, in plaintext.
async fn cancel_request(addr: &str, pid: i32, secret: i32) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    pg::cancel_request(&mut out, pid, secret);
    tcp.write_all(&out).await.unwrap();
    // The server closes the connection once it has read the request.
    Raw::from_tcp(tcp)
        .until_closed(Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_their_backends_own_process_id() {
    let env = Env::start_with(Options {
        allow_plaintext: true,
        ..Options::default()
    })
    .await;
    let addr = env.stack().pg_addr;

    let token = env.stack().token("alice", &[]);
    let (mut alice, login) = Raw::login(addr, "alice", &token, &[]).await.unwrap();
    let (alice_pid, _) = login.key.expect("a BackendKeyData");
    let r = alice.query("SELECT pg_backend_pid()").await;
    assert_eq!(r.value(), Some(alice_pid.to_string().as_str()), "{r:?}");
    let seen: i64 = env
        .target()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND datname = current_database()",
            &[&alice_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1, "no backend {alice_pid} on the target");

    // A driver listening; notifications name the notifying backend.
    let mut config: tokio_postgres::Config =
        env.conninfo("carol", "app", "require").parse().unwrap();
    config.password(env.stack().token("carol", &[]));
    let (carol, mut conn) = config.connect(env.tls()).await.unwrap();
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.process_id(), n.payload().to_string()));
            }
        }
    });
    carol.batch_execute("LISTEN gatehouse_keys").await.unwrap();
    let r = alice.query("LISTEN gatehouse_keys").await;
    assert!(r.ok(), "{r:?}");

    let token = env.stack().token("bob", &[]);
    let (mut bob, login) = Raw::login(addr, "bob", &token, &[]).await.unwrap();
    let (bob_pid, _) = login.key.expect("a BackendKeyData");
    assert_ne!(bob_pid, alice_pid);
    let r = bob.query("NOTIFY gatehouse_keys, 'from bob'").await;
    assert!(r.ok(), "{r:?}");
    let r = bob.query("SELECT pg_backend_pid()").await;
    assert_eq!(r.value(), Some(bob_pid.to_string().as_str()));

    // The raw client, idle, gets it as it arrives.
    let (tag, body) = alice
        .next_within(Duration::from_secs(5))
        .await
        .expect("a notification");
    assert_eq!(tag, b'A');
    assert_eq!(i32::from_be_bytes(body[..4].try_into().unwrap()), bob_pid);
    // So does the driver.
    let (pid, payload) = tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((pid, payload.as_str()), (bob_pid, "from bob"));

    // A session's own notification names its own backend.
    let r = alice.query("NOTIFY gatehouse_keys, 'to myself'").await;
    assert_eq!(
        r.notifications,
        [(alice_pid, "gatehouse_keys".into(), "to myself".into())]
    );
    carol
        .batch_execute("NOTIFY gatehouse_keys, 'from carol'")
        .await
        .unwrap();
    let carol_pid = backend_pid(&carol).await;
    let (tag, body) = alice
        .next_within(Duration::from_secs(5))
        .await
        .expect("carol's notification");
    assert_eq!(tag, b'A');
    assert_eq!(i32::from_be_bytes(body[..4].try_into().unwrap()), carol_pid);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_needs_the_whole_key_and_goes_through_the_worker() {
    let env = Env::start_with(Options {
        allow_plaintext: true,
        ..Options::default()
    })
    .await;
    let worker = env.stack().pg_addr.to_string();

    let token = env.stack().token("dave", &[]);
    let (mut dave, login) = Raw::login(env.stack().pg_addr, "dave", &token, &[])
        .await
        .unwrap();
    let (pid, secret) = login.key.unwrap();
    let mut out = BytesMut::new();
    pg::query(&mut out, "SELECT pg_sleep(10)");
    dave.send(&out).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The secret is the worker's, not the target's: the target ignores
    // it. And the worker wants the whole key.
    cancel_request("127.0.0.1:5432", pid, secret).await;
    cancel_request(&worker, pid, secret ^ 1).await;
    assert!(
        dave.next_within(Duration::from_secs(1)).await.is_none(),
        "the query ended early"
    );
    let started = std::time::Instant::now();
    cancel_request(&worker, pid, secret).await;
    let r = tokio::time::timeout(Duration::from_secs(5), dave.reply())
        .await
        .expect("cancelled quickly");
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].code, "57014", "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = dave.query("SELECT 1").await;
    assert_eq!(r.value(), Some("1"));

    // A driver's cancel token, over TLS, with another session sleeping
    // beside it: only the one whose key it carries is cancelled.
    let erin = env.connect("erin").await;
    let fay = env.connect("fay").await;
    let token = erin.cancel_token();
    let erin_sleeps = tokio::spawn(async move { erin.simple_query("SELECT pg_sleep(10)").await });
    let fay_sleeps = tokio::spawn(async move { fay.simple_query("SELECT pg_sleep(2)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    token.cancel_query(env.tls()).await.unwrap();
    let err = erin_sleeps.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    fay_sleeps
        .await
        .unwrap()
        .expect("the other session's query ran to its end");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_terminated_on_the_target_ends_the_session_with_57p01() {
    let env = Env::start().await;
    let connect = async |user: &str| {
        let mut config: tokio_postgres::Config =
            env.conninfo(user, "app", "require").parse().unwrap();
        config.password(env.stack().token(user, &[]));
        let (client, conn) = config.connect(env.tls()).await.unwrap();
        (client, tokio::spawn(conn))
    };

    // Terminated in the middle of a query, by a direct connection.
    let (gus, _conn) = connect("gus").await;
    let pid = backend_pid(&gus).await;
    let sleeps = tokio::spawn(async move { gus.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let terminated: bool = support::admin()
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let err = tokio::time::timeout(Duration::from_secs(5), sleeps)
        .await
        .expect("the session ends at once")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");

    // Terminated while idle, by a dba through the gateway: the driver's
    // connection ends with the target's error.
    let (hal, conn) = connect("hal").await;
    let pid = backend_pid(&hal).await;
    let dba = env
        .try_connect("root", &env.stack().token("root", &["dba"]))
        .await
        .unwrap();
    let terminated: bool = dba
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection ends at once")
        .unwrap();
    let err = ended.expect_err("the connection ends with an error");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    assert!(hal.is_closed());
    env.cleanup().await;
}
