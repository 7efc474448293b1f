//! Prepared statements and portals through the gateway, sent as raw
//! protocol messages: a name means what the server bound to it, whatever
//! the client sent since, and what runs is what is decided and recorded.
//! Each case checks the target directly and the recorded text.

#[path = "support/raw.rs"]
mod raw;
mod support;

use bytes::{BufMut, BytesMut};
use gatehouse_pgwire as pg;
use raw::Raw;
use support::{Env, Options};

fn plaintext() -> Options {
    Options {
        allow_plaintext: true,
        ..Default::default()
    }
}

async fn login(env: &Env, user: &str, groups: &[&str]) -> Raw {
    let token = env.stack().token(user, groups);
    let (raw, _) = Raw::login(env.stack().pg_addr, user, &token, &[])
        .await
        .unwrap_or_else(|r| panic!("{r:?}"));
    raw
}

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.extend_from_slice(&pg::Frame::new(tag, body).raw);
}

fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    let mut b = BytesMut::new();
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    frame(out, b'P', &b);
}

fn bind(out: &mut BytesMut, portal: &str, statement: &str) {
    let mut b = BytesMut::new();
    b.put_slice(portal.as_bytes());
    b.put_u8(0);
    b.put_slice(statement.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    b.put_i16(0);
    b.put_i16(0);
    frame(out, b'B', &b);
}

fn execute(out: &mut BytesMut, portal: &str) {
    let mut b = BytesMut::new();
    b.put_slice(portal.as_bytes());
    b.put_u8(0);
    b.put_i32(0);
    frame(out, b'E', &b);
}

fn close_statement(out: &mut BytesMut, name: &str) {
    let mut b = BytesMut::new();
    b.put_u8(b'S');
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    frame(out, b'C', &b);
}

fn sync(out: &mut BytesMut) {
    frame(out, b'S', b"");
}

fn flush(out: &mut BytesMut) {
    frame(out, b'H', b"");
}

async fn ids(env: &Env) -> Vec<i32> {
    env.target_ids().await
}

async fn setup(env: &Env) {
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
}

/// An agent's read-only session: a name first bound to text that would make
/// the session writable, then re-parsed (which the server refuses, 42P05),
/// then bound and run. The first Parse is refused when it arrives, so the
/// name is never bound, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_rebound_behind_the_gateway_cannot_make_a_session_writable() {
    let env = Env::start_with(plaintext()).await;
    setup(&env).await;
    let mut bot = login(&env, "bot", &["agents"]).await;
    let mut out = BytesMut::new();
    parse(&mut out, "s1", "SET default_transaction_read_only = off");
    sync(&mut out);
    parse(&mut out, "s1", "SELECT 1");
    sync(&mut out);
    bind(&mut out, "", "s1");
    execute(&mut out, "");
    sync(&mut out);
    bot.send(&out).await;
    let first = bot.reply().await;
    assert_eq!(first.errors[0].code, "42501", "{first:?}");
    let second = bot.reply().await;
    assert!(
        second.ok(),
        "the name was free, so this Parse binds it: {second:?}"
    );
    let third = bot.reply().await;
    assert!(third.ok(), "{third:?}");
    assert_eq!(third.value(), Some("1"), "s1 is SELECT 1");
    let write = bot.query("INSERT INTO t VALUES (3)").await;
    assert!(!write.ok(), "{write:?}");
    assert_eq!(ids(&env).await, [1, 2], "nothing written");
    let audit = env.audit_commands("bot", 3).await;
    assert_eq!(
        audit[0]["statement"],
        "SET default_transaction_read_only = off"
    );
    assert_eq!(audit[0]["decision"]["effect"], "deny");
    assert_eq!(audit[1]["statement"], "SELECT 1", "recorded as what ran");
    env.cleanup().await;
}

/// A statement prepared at the protocol level, then a SQL `PREPARE` of the
/// same name (the server refuses it), then SQL `EXECUTE`: what runs is the
/// first, and it is decided and recorded as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_runs_and_records_what_the_server_has_under_the_name() {
    let env = Env::start_with(plaintext()).await;
    setup(&env).await;
    let mut alice = login(&env, "alice", &[]).await;
    let mut out = BytesMut::new();
    parse(&mut out, "px", "DELETE FROM t");
    sync(&mut out);
    alice.send(&out).await;
    assert!(alice.reply().await.ok(), "preparing runs nothing");
    let collide = alice.query("PREPARE px AS SELECT 1").await;
    assert_eq!(collide.errors[0].code, "42P05", "{collide:?}");
    // A DELETE without WHERE needs an approval: the approver sees what
    // px holds, and denies it.
    let (run, ()) = tokio::join!(alice.query("EXECUTE px"), async {
        let pending = env.pending_approvals(1).await;
        assert_eq!(
            pending[0]["command"]["executes"][0]["text"],
            "DELETE FROM t"
        );
        let id = pending[0]["id"].as_str().unwrap();
        let (status, body) = env
            .decide_approval("dave", id, "deny", serde_json::json!({"comment": "no"}))
            .await;
        assert_eq!(status, 200, "{body}");
    });
    assert_eq!(run.errors.len(), 1, "{run:?}");
    assert_eq!(run.errors[0].code, "42501", "{run:?}");
    assert!(run.errors[0].message.contains("denied by dave"), "{run:?}");
    assert_eq!(ids(&env).await, [1, 2], "nothing deleted");
    let audit = env.audit_commands("alice", 2).await;
    let execute = audit
        .iter()
        .find(|c| c["statement"] == "EXECUTE px")
        .expect("EXECUTE recorded");
    assert_eq!(execute["executes"][0]["name"], "px");
    assert_eq!(execute["executes"][0]["text"], "DELETE FROM t");
    assert_eq!(execute["decision"]["effect"], "approval_required");
    env.cleanup().await;
}

/// A SQL `EXECUTE` changes the names as the statement it runs does: `p`
/// bound to `DEALLOCATE ALL` and run drops every name; `s1` bound to
/// `PREPARE p AS DELETE FROM t WHERE id = 1` and run binds `p` anew. An
/// `EXECUTE p` then runs the `DELETE`, and is decided and recorded as it
/// (it was recorded as `DEALLOCATE ALL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_follow_what_a_sql_execute_runs() {
    let env = Env::start_with(plaintext()).await;
    setup(&env).await;
    let mut alice = login(&env, "alice", &[]).await;
    let mut out = BytesMut::new();
    parse(&mut out, "p", "DEALLOCATE ALL");
    sync(&mut out);
    alice.send(&out).await;
    assert!(alice.reply().await.ok());
    let discard = alice.query("EXECUTE p").await;
    assert!(discard.ok(), "{discard:?}");
    let gone = alice.query("EXECUTE p").await;
    assert_eq!(
        gone.errors[0].code, "26000",
        "DEALLOCATE ALL dropped p: {gone:?}"
    );
    let mut out = BytesMut::new();
    parse(&mut out, "s1", "PREPARE p AS DELETE FROM t WHERE id = 1");
    sync(&mut out);
    alice.send(&out).await;
    assert!(alice.reply().await.ok());
    let prepare = alice.query("EXECUTE s1").await;
    assert!(prepare.ok(), "{prepare:?}");
    let run = alice.query("EXECUTE p").await;
    assert!(run.ok(), "{run:?}");
    assert_eq!(ids(&env).await, [2], "the DELETE ran");
    let audit = env.audit_commands("alice", 4).await;
    let last = audit
        .iter()
        .rfind(|c| c["statement"] == "EXECUTE p")
        .expect("EXECUTE p recorded");
    assert_eq!(
        last["executes"][0]["text"],
        "PREPARE p AS DELETE FROM t WHERE id = 1"
    );
    env.cleanup().await;
}

/// `Close` then `Parse` of a name, with the Parse failing on the server:
/// the name is then unbound, and a Bind of it is refused without reaching
/// the server; a Parse of text no policy allows is refused when it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_reused_names_run_nothing_unknown() {
    let env = Env::start_with(plaintext()).await;
    setup(&env).await;
    let mut alice = login(&env, "alice", &[]).await;
    let mut out = BytesMut::new();
    parse(&mut out, "s", "SELECT 1");
    sync(&mut out);
    close_statement(&mut out, "s");
    parse(&mut out, "s", "SELEC pg_ls_dir('/')");
    sync(&mut out);
    bind(&mut out, "", "s");
    execute(&mut out, "");
    sync(&mut out);
    parse(&mut out, "s2", "SELECT pg_ls_dir('/')");
    bind(&mut out, "", "s2");
    execute(&mut out, "");
    sync(&mut out);
    alice.send(&out).await;
    assert!(alice.reply().await.ok());
    let reparse = alice.reply().await;
    assert!(!reparse.ok(), "{reparse:?}");
    let bound = alice.reply().await;
    assert_eq!(bound.errors.len(), 1, "{bound:?}");
    assert_eq!(bound.errors[0].code, "26000", "{bound:?}");
    let listing = alice.reply().await;
    assert_eq!(listing.errors[0].code, "42501", "{listing:?}");
    assert!(listing.rows.is_empty());
    // The session is still in step.
    assert_eq!(alice.query("SELECT 42").await.value(), Some("42"));
    env.cleanup().await;
}

/// A denied `Execute` followed by `Flush`, not `Sync`: the error comes at
/// once; the earlier write of the batch is rolled back with it, as after
/// any error in an implicit transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_after_a_denied_execute_gets_the_error_and_the_batch_rolls_back() {
    let env = Env::start_with(plaintext()).await;
    setup(&env).await;
    let mut alice = login(&env, "alice", &[]).await;
    let mut out = BytesMut::new();
    parse(&mut out, "", "INSERT INTO t VALUES (3)");
    bind(&mut out, "", "");
    execute(&mut out, "");
    parse(&mut out, "", "DELETE FROM t");
    bind(&mut out, "", "");
    execute(&mut out, "");
    flush(&mut out);
    alice.send(&out).await;
    // The DELETE waits for an approval, denied here.
    let pending = env.pending_approvals(1).await;
    let id = pending[0]["id"].as_str().unwrap();
    let (status, body) = env
        .decide_approval("dave", id, "deny", serde_json::json!({"comment": "no"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut seen = Vec::new();
    loop {
        let (tag, body) = alice
            .next_within(std::time::Duration::from_secs(10))
            .await
            .expect("the error arrives without a Sync");
        seen.push(tag);
        if tag == b'E' {
            assert_eq!(raw::error_fields(&body).code, "42501");
            break;
        }
    }
    assert_eq!(
        seen, b"N12C12E",
        "the notice of the approval, ParseComplete, BindComplete, … then the error"
    );
    let mut out = BytesMut::new();
    sync(&mut out);
    alice.send(&out).await;
    assert!(alice.reply().await.errors.is_empty());
    assert_eq!(ids(&env).await, [1, 2], "the INSERT was rolled back");
    env.cleanup().await;
}
