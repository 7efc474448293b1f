//! Statements are read as PostgreSQL reads them, through a worker with a
//! real client and the built-in defaults: texts that another parser read
//! differently, dynamic code, and text the server's parser rejects are
//! refused with `42501` and the policy's reason, and the target is checked
//! directly: nothing written, no file read, no program run.

mod support;

use serde_json::{Value, json};
use support::{Env, refusal};

async fn setup(env: &Env) {
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_server_would_run_is_what_is_decided() {
    let env = Env::start().await;
    setup(&env).await;
    let proof = std::env::temp_dir().join(format!("gatehouse-program-ran-{}", env.suffix));
    let _ = std::fs::remove_file(&proof);

    let bot_token = env.stack().token("bot", &["agents"]);
    let bot = env.try_connect("bot", &bot_token).await.expect("agent");
    let alice_token = env.stack().token("alice", &["engineering"]);
    let alice = env.try_connect("alice", &alice_token).await.expect("alice");

    alice
        .batch_execute("PREPARE q(text) AS SELECT $1")
        .await
        .unwrap();

    // (who, text, a substring of the policy's reason)
    let cases: Vec<(&tokio_postgres::Client, String, &str)> =
        vec![
        // A dollar-quote tag with a non-ASCII character: a SELECT and a SET
        // to PostgreSQL.
        (
            &bot,
            "SELECT $€$, '$€$; SET default_transaction_read_only = off; -- '".into(),
            "read-only",
        ),
        // A Unicode-escaped identifier hiding a function's name.
        (
            &bot,
            r#"SELECT U&"pg_read_fil\0065"('/etc/hostname')"#.into(),
            "read-only",
        ),
        (
            &alice,
            r#"SELECT U&"pg_read_fil\0065"('/etc/hostname')"#.into(),
            "only group dba",
        ),
        // Attribute notation: `(x).f` calls `f(x)`.
        (
            &alice,
            "SELECT ('/etc/hostname'::text).pg_read_file".into(),
            "only group dba",
        ),
        // EXPLAIN ANALYSE runs its statement, decided as such.
        (
            &alice,
            "EXPLAIN (ANALYSE) SELECT pg_read_file('/etc/hostname')".into(),
            "only group dba",
        ),
        (&bot, "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1".into(), "read-only"),
        // Code whose effects cannot be known from its text.
        (
            &alice,
            format!(
                "DO $$ BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {}'''; END $$",
                proof.display()
            ),
            "only group dba",
        ),
        (&alice, "DO $$ BEGIN DELETE FROM t; END $$".into(), "only group dba"),
        (
            &alice,
            "SELECT query_to_xml('select pg_read_file(''/etc/hostname'') as f', true, false, '')"
                .into(),
            "only group dba",
        ),
        (
            &alice,
            "SELECT * FROM ROWS FROM (pg_read_file('/etc/hostname'))".into(),
            "only group dba",
        ),
        // EXECUTE runs what was prepared, with its parameters' effects; a
        // name never prepared through the gateway cannot be known.
        (
            &alice,
            "EXECUTE q(pg_read_file('/etc/hostname'))".into(),
            "only group dba",
        ),
        // What the server's parser rejects is refused for everyone.
        (&alice, "SELEC 1; DELETE FROM t".into(), "could not be read"),
    ];
    for (client, sql, reason) in &cases {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let (code, message) = refusal(&err);
        assert_eq!(code, "42501", "{sql}: {err}");
        assert!(message.contains(reason), "{sql}: {message}");
        // The session stays usable after each refusal.
        client.simple_query("SELECT 1").await.unwrap();
    }
    // A name the server never confirmed is refused as PostgreSQL refuses
    // it, and never run.
    let err = alice
        .batch_execute("EXECUTE never_prepared")
        .await
        .expect_err("an unknown prepared statement");
    assert_eq!(refusal(&err).0, "26000", "{err}");
    // The extended protocol is judged the same way.
    let err = alice
        .query("SELECT pg_read_file($1)", &[&"/etc/hostname"])
        .await
        .expect_err("a file read as a prepared statement");
    assert_eq!(refusal(&err).0, "42501");

    // Texts of one shape (the same tokens but for literals) share facts
    // only where no literal's value can change them: EXPLAIN's options are
    // literals.
    bot.batch_execute("EXPLAIN (ANALYZE 'off') DELETE FROM t")
        .await
        .unwrap();
    let err = bot
        .batch_execute("EXPLAIN (ANALYZE 'on') DELETE FROM t")
        .await
        .expect_err("EXPLAIN ANALYZE of a DELETE, after a plan-only one");
    assert_eq!(refusal(&err).0, "42501");

    // Nothing happened on the target: no row deleted, no program run, and
    // the agent's session is still read-only.
    assert_eq!(env.target_ids().await, [1, 2]);
    assert!(!proof.exists(), "the program ran: {}", proof.display());
    let mode: String = bot
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "on");

    // Drivers set the client encoding after connecting: allowed, for
    // agents too (the worker follows the server's settings).
    bot.batch_execute("SET client_encoding TO 'UTF8'")
        .await
        .unwrap();
    alice
        .batch_execute("SET NAMES 'UTF8'; SET standard_conforming_strings = on")
        .await
        .unwrap();

    // An agent may plan its queries: EXPLAIN without ANALYZE reads nothing.
    let plan = bot
        .simple_query("EXPLAIN SELECT * FROM t WHERE id = 1")
        .await
        .unwrap();
    assert!(!plan.is_empty());
    bot.query("EXPLAIN (VERBOSE) SELECT * FROM t WHERE id = $1", &[&1i32])
        .await
        .unwrap();

    // Every refusal is in the audit trail with the policy that decided it.
    let audit = env.audit_commands("alice", 22).await;
    let denied: Vec<&Value> = audit
        .iter()
        .filter(|c| c["decision"]["effect"] != "allow")
        .collect();
    assert_eq!(denied.len(), 11, "{audit:#?}");
    env.cleanup().await;
}

/// Statements another parser could not read are read, and decided by what
/// they are: on a production target they are DDL, refused by `prod-no-ddl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explain_api_reads_what_other_parsers_could_not() {
    let env = Env::start().await;
    let auditor = env.stack().api_token("auditor", &["auditors"]);
    let http = reqwest::Client::new();
    let person = json!({ "subject": "bob", "groups": ["dev"] });
    for (sql, effect, policy) in [
        (
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()",
            "deny",
            "prod-no-ddl",
        ),
        ("CREATE PUBLICATION p FOR ALL TABLES", "deny", "prod-no-ddl"),
        (
            "CREATE STATISTICS s (dependencies) ON a, b FROM t",
            "deny",
            "prod-no-ddl",
        ),
        ("ALTER SEQUENCE s RESTART WITH 1", "deny", "prod-no-ddl"),
        (
            "SELECT * FROM ROWS FROM (pg_read_file('/etc/hostname'))",
            "deny",
            "dangerous-functions-dba-only",
        ),
        ("SELEC 1", "deny", "unparsed-denied"),
        ("SELECT * FROM t", "allow", "base-query"),
    ] {
        let body = json!({
            "identity": person,
            "target": { "name": "app", "environment": "prod" },
            "sql": sql,
        });
        let r = http
            .post(env.api("/api/v1/decisions/explain"))
            .bearer_auth(&auditor)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["effect"], effect, "{sql}: {v}");
        assert!(
            v["statements"][0]["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == policy)),
            "{sql}: {v}"
        );
    }
    env.cleanup().await;
}
