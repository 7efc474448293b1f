//! What a client sends at startup, through a worker: a first packet that
//! is no startup at all is closed without a word, as PostgreSQL closes it.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::time::Duration;

use raw::Raw;
use support::Env;

/// The reasons of the projected `authentication_failures` of `user`, once
/// there are `expect` (or after ~10 s, with what there is).
async fn failures(env: &Env, user: &str, expect: usize) -> Vec<String> {
    let audit = support::direct_db(&env.audit_db).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reasons: Vec<String> = audit
            .query(
                "SELECT reason FROM authentication_failures WHERE claimed_user = $1 ORDER BY time",
                &[&user],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if reasons.len() >= expect || tokio::time::Instant::now() > deadline {
            return reasons;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_packet_that_is_no_startup_is_closed_without_a_word() {
    // TLS required: a plaintext startup is refused, and recorded.
    let env = Env::start().await;
    let addr = env.stack().pg_addr;

    let terminate: &[u8] = b"X\0\0\0\x04";
    let http: &[u8] = b"GET / HTTP/1.1\r\nHost: gatehouse\r\n\r\n";
    let too_long: &[u8] = &[0, 1, 0, 0, 0, 3, 0, 0];
    let too_short: &[u8] = &[0, 0, 0, 4];
    for packet in [terminate, http, too_long, too_short] {
        let mut raw = Raw::open(addr).await;
        raw.send(packet).await;
        // The client keeps its side open: the worker closes at once.
        let answer = raw.until_closed(Duration::from_secs(5)).await;
        assert!(answer.is_empty(), "{packet:?} was answered: {answer:?}");
    }
    // Nothing at all, or a partial length.
    drop(Raw::open(addr).await);
    let mut raw = Raw::open(addr).await;
    raw.send(&[0, 0]).await;
    drop(raw);

    // A real attempt after them is still refused with a word, and recorded;
    // it is the only failure recorded.
    let err = Raw::login(addr, "probe", "not-a-token", &[])
        .await
        .err()
        .expect("plaintext refused");
    assert_eq!(err.errors[0].code, "28000");
    assert_eq!(failures(&env, "probe", 1).await, ["tls_required"]);
    let audit = support::direct_db(&env.audit_db).await;
    let all: i64 = audit
        .query_one("SELECT count(*) FROM authentication_failures", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(all, 1, "a packet that was no startup was recorded");
    // The worker is unharmed.
    let client = env.connect("alice").await;
    client.simple_query("SELECT 1").await.unwrap();
    env.cleanup().await;
}
