//! Decisions on every command, through a worker with real clients: agents
//! are read-only whatever the disguise, a push changes an open session's
//! decisions, a revocation ends an open session and a reinstatement lets
//! the identity back in without a restart, dry-run records without
//! enforcing (on its targets, until it ends, never in an agent's
//! read-only session), and the control plane explains what a bundle
//! would decide.

mod support;

use gatehouse_testkit::eventually;
use serde_json::{Value, json};
use support::{Env, refusal};

/// Connects as a member of the `agents` group.
async fn agent(env: &Env, name: &str) -> tokio_postgres::Client {
    let token = env.stack().token(name, &["agents"]);
    env.try_connect(name, &token)
        .await
        .expect("agents may connect")
}

fn code(err: &tokio_postgres::Error) -> String {
    refusal(err).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_read_only_in_every_disguise() {
    let env = Env::start().await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    let bot = agent(&env, "bot").await;

    // Defence in depth: the target session itself is read-only.
    let mode: String = bot
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "on");

    // Reading works, in both protocols.
    assert_eq!(bot.simple_query("SELECT id FROM t").await.unwrap().len(), 4);
    let n: i64 = bot
        .query_one("SELECT count(*) FROM t WHERE id > $1", &[&0i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    let simple = [
        "INSERT INTO t VALUES (3)",
        "UPDATE t SET id = 10 WHERE id = 1",
        "DELETE FROM t WHERE id = 2",
        "CREATE TABLE u (id int)",
        "DROP TABLE t",
        "SELECT 1; DELETE FROM t WHERE id = 1",
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
        "SELECT * INTO t_copy FROM t",
        "DO $$ BEGIN DELETE FROM t; END $$",
        "select 1 /* ; */ ; delete from t where id = 2 -- ;",
        "SELECT nextval('s')",
        "SET default_transaction_read_only = off",
        "PREPARE p AS DELETE FROM t WHERE id = $1",
        "COPY t FROM STDIN",
        "this is not sql; DELETE FROM t",
    ];
    for sql in simple {
        let err = bot.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&err), "42501", "{sql}: {err}");
        let message = err.as_db_error().unwrap().message();
        assert!(message.contains("read-only"), "{sql}: {message}");
        // The session stays usable after each refusal.
        bot.simple_query("SELECT 1").await.unwrap();
    }
    // Extended protocol: prepared and executed, with parameters.
    for sql in [
        "INSERT INTO t VALUES ($1)",
        "DELETE FROM t WHERE id = $1",
        "UPDATE t SET id = $1 WHERE id = 1",
    ] {
        let err = bot.execute(sql, &[&7i32]).await.expect_err(sql);
        assert_eq!(code(&err), "42501", "{sql}: {err}");
        bot.query_one("SELECT 1", &[]).await.unwrap();
    }
    // A statement prepared by name in SQL and executed later is judged by
    // what it runs.
    bot.batch_execute("PREPARE q AS SELECT id FROM t")
        .await
        .unwrap();
    bot.batch_execute("EXECUTE q").await.unwrap();

    // Nothing reached the target.
    assert_eq!(env.target_ids().await, [1, 2]);
    let tables: i64 = env
        .target()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);

    // Every refused command is in the audit trail with its decision.
    // 3 reads, 15 refused + 15 probes, 3 refused + 3 probes, PREPARE and EXECUTE.
    let audit = env.audit_commands("bot", 41).await;
    assert_eq!(audit.len(), 41);
    let denied: Vec<&Value> = audit
        .iter()
        .filter(|c| c["decision"]["effect"] == "deny")
        .collect();
    assert_eq!(denied.len(), simple.len() + 3, "{audit:#?}");
    for c in &denied {
        assert_eq!(c["decision"]["enforced"], true);
        assert!(
            c["decision"]["policies"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "agents-read-only")
        );
        assert!(c["decision"]["bundle_hash"].as_str().unwrap().len() >= 12);
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_changes_decisions_for_an_open_session() {
    let env = Env::start().await;
    let db = env.connect("carol").await;
    db.batch_execute("CREATE TABLE a (id int)").await.unwrap();

    // An admin pushes a bundle that forbids DDL for everyone.
    let admin = env.stack().api_token("root", &["policy-admins"]);
    let files = json!([
        [
            "base.cedar",
            "@id(\"all\") permit (principal, action, resource);"
        ],
        [
            "no-ddl.cedar",
            "@id(\"no-ddl\") @reason(\"schema changes are frozen\") forbid (principal, action == Gatehouse::Action::\"query\", resource) when { context.kind == \"ddl\" };"
        ]
    ]);
    let http = reqwest::Client::new();
    let pushed = http
        .post(env.api("/api/v1/policies"))
        .bearer_auth(&admin)
        .json(&json!({ "version": "freeze-1", "files": files }))
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 201, "{:?}", pushed.text().await);

    // The same session, without reconnecting, is now refused.
    eventually(
        "the open session to apply the new bundle",
        async || match db
            .batch_execute("CREATE TEMP TABLE probe (id int); DROP TABLE probe")
            .await
        {
            Ok(()) => false,
            Err(e) => code(&e) == "42501",
        },
    )
    .await;
    let err = db
        .batch_execute("CREATE TABLE c (id int)")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("schema changes are frozen")
    );
    db.batch_execute("INSERT INTO a VALUES (1)").await.unwrap();

    // A bundle that does not validate is refused with file:line detail.
    let bad = http
        .post(env.api("/api/v1/policies"))
        .bearer_auth(&admin)
        .json(&json!({ "files": [["broken.cedar", "permit (principal, action, resource) when { context.nope };"]] }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let body: Value = bad.json().await.unwrap();
    assert!(
        body["details"][0]
            .as_str()
            .unwrap()
            .starts_with("broken.cedar:1:"),
        "{body}"
    );
    // Without the admin group, no push.
    let denied = http
        .post(env.api("/api/v1/policies"))
        .bearer_auth(env.stack().api_token("carol", &[]))
        .json(&json!({ "files": files }))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);

    // The decision events name the bundle that decided.
    eventually("the refused command to be projected", async || {
        let audit = env.audit_commands("carol", 0).await;
        audit
            .iter()
            .any(|c| c["statement"] == "CREATE TABLE c (id int)")
    })
    .await;
    let audit = env.audit_commands("carol", 0).await;
    let last = audit
        .iter()
        .rev()
        .find(|c| c["statement"] == "CREATE TABLE c (id int)")
        .unwrap();
    // `gatehouse dev` published version 1; the push is version 2.
    assert_eq!(last["decision"]["bundle_version"], "2");
    assert_eq!(last["decision"]["policies"][0], "no-ddl");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_is_cut_off_at_its_next_command() {
    let env = Env::start().await;
    let db = env.connect("dave").await;
    db.simple_query("SELECT 1").await.unwrap();

    let admin = env.stack().api_token("root", &["policy-admins"]);
    let revoked = reqwest::Client::new()
        .post(env.api("/api/v1/revocations"))
        .bearer_auth(&admin)
        .json(&json!({ "subject": "dave", "reason": "laptop stolen" }))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 201);

    eventually("the revocation to reach the worker", async || {
        db.simple_query("SELECT 1").await.is_err()
    })
    .await;
    eventually("the session to end", async || db.is_closed()).await;
    // And a new session of the same identity is refused at login.
    let err = env
        .try_connect("dave", &env.token("dave"))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&err), "28000");
    // Others are unaffected.
    env.connect("erin")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinstated_identity_logs_in_again_without_restarting_the_worker() {
    let env = Env::start().await;
    // Two sessions of the same subject: one sends a command while revoked
    // (and is ended), the other stays idle throughout.
    let cut = env.connect("frank").await;
    let idle = env.connect("frank").await;
    idle.simple_query("SELECT 1").await.unwrap();

    let admin = env.stack().api_token("root", &["policy-admins"]);
    let post = async |path: &str, body: Value| {
        let resp = reqwest::Client::new()
            .post(env.api(path))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    };
    let (status, body) = post(
        "/api/v1/revocations",
        json!({ "subject": "frank", "reason": "badge lost" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually("the revocation to reach the worker", async || {
        cut.simple_query("SELECT 1").await.is_err()
    })
    .await;
    let Err(err) = env.try_connect("frank", &env.token("frank")).await else {
        panic!("a revoked subject is refused at login");
    };
    assert_eq!(code(&err), "28000");

    let (status, body) = post(
        "/api/v1/reinstatements",
        json!({ "subject": "frank", "reason": "badge found" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The same worker, never restarted, lets frank in again.
    eventually("the reinstatement to reach the worker", async || match env
        .try_connect("frank", &env.token("frank"))
        .await
    {
        Ok(back) => back.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    })
    .await;
    // A session that sent nothing while frank was revoked goes on.
    idle.simple_query("SELECT 2").await.unwrap();
    assert!(cut.is_closed(), "the session cut off stays closed");

    // Revoked again: refused again, by the same worker.
    let (status, body) = post("/api/v1/revocations", json!({ "subject": "frank" })).await;
    assert_eq!(status, 201, "{body}");
    eventually("the second revocation to reach the worker", async || {
        idle.simple_query("SELECT 3").await.is_err()
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_records_would_be_denials_until_it_ends_and_never_relaxes_an_agent() {
    // Approvals nobody decides expire at once: an enforced DELETE without
    // WHERE fails after a second rather than waiting for an approver.
    let env = Env::start_with(support::Options {
        bundle: support::defaults_with_approval("@approval_timeout(\"1s\")"),
        ..Default::default()
    })
    .await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let admin = env.stack().api_token("root", &["policy-admins"]);
    let set = reqwest::Client::new()
        .post(env.api("/api/v1/policies/dry-run"))
        .bearer_auth(&admin)
        .json(&json!({ "targets": ["app"], "expires_in_secs": 6 }))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 201, "{:?}", set.text().await);

    // A person's DELETE without WHERE needs an approval by the defaults:
    // in dry-run it runs, recorded as not enforced, with the dry-run's end.
    let alice = env.connect("alice").await;
    eventually("the worker to apply the dry-run", || async {
        alice.batch_execute("DELETE FROM t").await.is_ok()
    })
    .await;
    // The attempts before the worker applied the dry-run were refused and
    // are recorded too: wait for the one that ran.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let delete = loop {
        let audit = env.audit_commands("alice", 1).await;
        let ran = audit
            .iter()
            .find(|c| c["statement"] == "DELETE FROM t" && c["decision"]["enforced"] == false);
        if let Some(c) = ran {
            break c.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no unenforced DELETE projected: {audit:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        delete["decision"]["effect"], "approval_required",
        "{delete}"
    );
    assert_eq!(delete["decision"]["enforced"], false, "{delete}");
    assert!(delete["decision"]["dry_run_until"].is_i64(), "{delete}");

    // An agent's session stays read-only and enforced: no write, no DDL.
    let bot = agent(&env, "bot").await;
    for sql in ["INSERT INTO t VALUES (5)", "DROP TABLE t"] {
        let err = bot.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&err), "42501", "{sql}: {err:?}");
    }
    env.target()
        .await
        .batch_execute("SELECT * FROM t")
        .await
        .expect("the table is still there");
    let audit = env.audit_commands("bot", 2).await;
    for c in audit.iter().filter(|c| c["decision"]["effect"] == "deny") {
        assert_eq!(c["decision"]["enforced"], true, "{c}");
        assert!(c["decision"].get("dry_run_until").is_none(), "{c}");
    }

    // Once it has ended, by the worker's clock, everything is enforced:
    // the DELETE waits for an approval, which expires.
    eventually("the dry-run to end", || async {
        alice
            .batch_execute("DELETE FROM t")
            .await
            .is_err_and(|e| code(&e) == "57014")
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_what_would_be_decided_and_why() {
    let env = Env::start().await;
    let auditor = env.stack().api_token("auditor", &["auditors"]);
    let explain = |identity: Value, sql: &str| {
        let body = json!({ "identity": identity, "target": { "name": "app", "tags": ["prod"] }, "sql": sql });
        let req = reqwest::Client::new()
            .post(env.api("/api/v1/decisions/explain"))
            .bearer_auth(&auditor)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let agent = json!({ "subject": "alice", "groups": ["dev"], "actors": ["agent-7"] });
    let v = explain(agent.clone(), "SELECT * FROM t").await;
    assert_eq!(v["effect"], "allow", "{v}");
    // A command of nothing but a comment runs nothing: allowed, as the
    // worker lets it through (drivers send one to check a connection).
    let v = explain(agent.clone(), "-- ping").await;
    assert_eq!(v["effect"], "allow", "{v}");
    assert_eq!(v["statements"], json!([]), "{v}");
    let v = explain(
        agent,
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    )
    .await;
    assert_eq!(v["effect"], "deny", "{v}");
    assert_eq!(v["principal"], "Gatehouse::Agent::\"agent-7\"");
    assert_eq!(v["statements"][0]["kind"], "delete");
    assert!(
        v["statements"][0]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "agents-read-only")
    );
    let person = json!({ "subject": "bob", "groups": ["dev"] });
    let v = explain(person.clone(), "DELETE FROM t").await;
    assert_eq!(v["effect"], "approval_required", "{v}");
    let v = explain(person, "CREATE TABLE x (id int)").await;
    assert_eq!(v["effect"], "deny", "prod targets take no DDL: {v}");
    env.cleanup().await;
}
