//! The worker's admission limits, tried as an attacker would: idle
//! connections that never finish their handshake, one address holding many
//! connections, and a flood of failed logins with huge user names. Each is
//! bounded, answered with a clear error, counted on `/metrics`, and a user
//! from another address is served meanwhile. Attackers connect from other
//! loopback addresses (127.0.0.2, 127.0.0.3) than the user (127.0.0.1).

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use raw::{Raw, error_fields};
use support::Env;
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `addr` from the loopback address `ip`.
async fn from(ip: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the sample `name` (with its labels) on `/metrics`.
async fn metric(env: &Env, port: u16, name: &str) -> u64 {
    let text = env
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[tokio::test]
async fn idle_handshakes_and_one_greedy_address_cannot_lock_out_a_user() {
    let env = Env::start().await;
    let metrics = free_port();
    let worker = env
        .stack()
        .spawn_worker("127.0.0.1:0", |c| {
            c.allow_plaintext = true;
            c.startup_timeout_secs = 2;
            c.max_connections_per_address = 20;
            c.metrics_listen = Some(format!("127.0.0.1:{metrics}"));
        })
        .await
        .unwrap();

    // Twenty connections that never start TLS nor send a startup message,
    // and one that sends half of one.
    let mut idle = Vec::new();
    for _ in 0..19 {
        idle.push(Raw::from_tcp(from("127.0.0.2", worker.addr).await));
    }
    let mut half = Raw::from_tcp(from("127.0.0.2", worker.addr).await);
    half.send(&[0, 0, 0, 40, 0, 3]).await;
    idle.push(half);

    // The address is at its limit: the next connection is refused at once,
    // in words.
    let mut over = Raw::from_tcp(from("127.0.0.2", worker.addr).await);
    let (tag, body) = over
        .next_within(Duration::from_secs(5))
        .await
        .expect("an answer at once");
    assert_eq!(tag, b'E');
    let e = error_fields(&body);
    assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "53300"));
    assert!(
        e.message.contains("127.0.0.2") && e.message.contains("max_connections_per_address"),
        "{}",
        e.message
    );

    // Meanwhile a user from another address logs in and works, and goes on
    // working past the handshake deadline.
    let (mut session, _) = Raw::open(worker.addr)
        .await
        .login_on("alice", &env.token("alice"), &[])
        .await
        .expect("alice logs in");
    assert_eq!(session.query("SELECT 41 + 1").await.value(), Some("42"));

    // The deadline closes every idle handshake, without a word to those
    // that never spoke.
    let started = tokio::time::Instant::now();
    for mut c in idle {
        let said = c.until_closed(Duration::from_secs(6)).await;
        assert!(said.is_empty(), "an idle connection was told {said:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(
        session.query("SELECT 'still here'").await.value(),
        Some("still here")
    );

    // With its connections closed, the address may connect again.
    let (mut again, _) = Raw::from_tcp(from("127.0.0.2", worker.addr).await)
        .login_on("alice", &env.token("alice"), &[])
        .await
        .expect("the address's places were given back");
    assert_eq!(again.query("SELECT 1").await.value(), Some("1"));

    assert_eq!(
        metric(
            &env,
            metrics,
            "gatehouse_worker_connections_refused_total{limit=\"max_connections_per_address\"}"
        )
        .await,
        1
    );
    assert_eq!(
        metric(
            &env,
            metrics,
            "gatehouse_worker_connections_refused_total{limit=\"startup_timeout_secs\"}"
        )
        .await,
        20
    );
    assert_eq!(
        metric(&env, metrics, "gatehouse_worker_connections_open").await,
        2
    );
    drop((session, again, over));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_flood_of_failed_logins_is_cut_short_and_recorded_within_bounds() {
    let env = Env::start().await;
    let metrics = free_port();
    let worker = env
        .stack()
        .spawn_worker("127.0.0.1:0", |c| {
            c.allow_plaintext = true;
            c.auth_failures_per_minute = 3;
            c.metrics_listen = Some(format!("127.0.0.1:{metrics}"));
        })
        .await
        .unwrap();
    // A 15 kB user name: the startup packet allows it, the record does not.
    let claimed = format!("mallory-{}", "x".repeat(15_000));
    let mut codes = Vec::new();
    for _ in 0..8 {
        let refused = Raw::from_tcp(from("127.0.0.3", worker.addr).await)
            .login_on(&claimed, "not-a-token", &[])
            .await
            .err()
            .expect("a bad token is refused");
        let e = &refused.errors[0];
        codes.push(e.code.clone());
        if e.code == "53300" {
            assert!(
                e.message.contains("too many failed logins") && e.message.contains("try again in"),
                "{}",
                e.message
            );
        }
    }
    assert_eq!(codes[..3], ["28P01", "28P01", "28P01"], "{codes:?}");
    assert!(codes[3..].iter().all(|c| c == "53300"), "{codes:?}");

    // While the gate is closed, even a good token from that address waits;
    // from another address it is served.
    let refused = Raw::from_tcp(from("127.0.0.3", worker.addr).await)
        .login_on("alice", &env.token("alice"), &[])
        .await
        .err()
        .expect("the address is rate-limited");
    assert_eq!(refused.errors[0].code, "53300");
    let (mut session, _) = Raw::open(worker.addr)
        .await
        .login_on("alice", &env.token("alice"), &[])
        .await
        .expect("another address is not");
    assert_eq!(session.query("SELECT 1").await.value(), Some("1"));

    // Recorded: the three failures and the refusal that closed the gate,
    // names cut to PostgreSQL's 63 bytes; not the rest of the flood.
    let count = "SELECT count(*) FROM authentication_failures WHERE client_addr LIKE '127.0.0.3:%'";
    gatehouse_testkit::eventually("the refusals are projected", async || {
        env.audit_count(count, &[]).await >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows: Vec<(String, String)> = env
        .audit_query(
            "SELECT reason, claimed_user FROM authentication_failures
             WHERE client_addr LIKE '127.0.0.3:%' ORDER BY time",
            &[],
        )
        .await;
    let reasons: Vec<&str> = rows.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons[3], "rate_limited", "{reasons:?}");
    for (_, user) in &rows {
        assert_eq!(user, &claimed[..63], "recorded names are cut");
    }

    assert_eq!(
        metric(&env, metrics, "gatehouse_worker_auth_failures_total").await,
        3
    );
    assert_eq!(
        metric(
            &env,
            metrics,
            "gatehouse_worker_connections_refused_total{limit=\"auth_failures_per_minute\"}"
        )
        .await,
        6
    );
    drop(session);
    worker.stop().await.unwrap();
    env.cleanup().await;
}
