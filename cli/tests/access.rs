//! Access for a while, end to end: a person asks the control plane for
//! access to a target, an approver grants it, the worker's policies see it
//! in real sessions (`context.grants`), and a revocation takes effect at
//! the next command of a live session.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::Env;

/// The defaults, with connecting needing an `access` grant and DDL a
/// `ddl` grant.
fn bundle() -> gatehouse_policies::Bundle {
    let defaults = gatehouse_policies::Bundle::defaults();
    let mut files = defaults.files.clone();
    files.push((
        "grants.cedar".into(),
        r#"
@id("connect-needs-access")
@reason("connecting needs access granted for a while: gatehouse access request --target app")
forbid (principal, action == Gatehouse::Action::"connect", resource)
unless { context.grants.contains("access") };

@id("ddl-needs-a-grant")
@reason("DDL needs a ddl grant")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { context.kind == "ddl" }
unless { context.grants.contains("ddl") };
"#
        .into(),
    ));
    gatehouse_policies::Bundle::new("access-test", files, defaults.schema.clone())
}

fn sqlstate(e: &tokio_postgres::Error) -> (String, String) {
    let db = e.as_db_error().expect("an error from the server");
    (db.code().code().to_string(), db.message().to_string())
}

/// What `f` gives once it gives something, tried every 100 ms for 15 s:
/// the workers take in grants and revocations as they follow them.
async fn once_some<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..150 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Asks for access as `token`; the status and the body.
async fn ask(env: &Env, token: &str, body: Value) -> (u16, Value) {
    env.api_post(token, "/api/v1/access", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_granted_for_a_while_lets_sessions_in_until_it_is_revoked() {
    let env = Env::start_with(support::Options {
        bundle: bundle(),
        ..Default::default()
    })
    .await;
    let stack = env.stack();
    let alice_pg = stack.token("alice", &["dev"]);
    let alice = stack.api_token("alice", &["dev"]);
    let dave = stack.api_token("dave", &["approvers"]);

    // Without a grant the session is refused, naming the policy's reason.
    let e = env.try_connect("alice", &alice_pg).await.err().unwrap();
    assert_eq!(sqlstate(&e).0, "42501");
    assert!(sqlstate(&e).1.contains("gatehouse access request"), "{e}");

    // Requests are checked: a target no worker fronts, a bad duration, no
    // reason, a scope policies could not name.
    let (status, body) = ask(
        &env,
        &alice,
        json!({"target": "nope", "for": "10m", "reason": "r"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.to_string().contains("known targets: app"),
        "the known targets are named: {body}"
    );
    for bad in [
        json!({"target": "app", "for": "ten minutes", "reason": "r"}),
        json!({"target": "app", "for": "48h", "reason": "r"}),
        json!({"target": "app", "for": "10m", "reason": " "}),
        json!({"target": "app", "for": "10m", "reason": "r", "scope": "DDL!"}),
    ] {
        let (status, body) = ask(&env, &alice, bad.clone()).await;
        assert_eq!(status, 400, "{bad} → {body}");
    }

    let (status, access) = ask(
        &env,
        &alice,
        json!({"target": "app", "for": "10m", "reason": "incident 42"}),
    )
    .await;
    assert_eq!(status, 201, "{access}");
    assert_eq!(access["state"], "pending");
    assert_eq!(access["access"]["scope"], "access");
    assert_eq!(access["access"]["for_secs"], 600);
    assert_eq!(access["target"]["name"], "app");
    let access_id = access["id"].as_str().unwrap().to_string();
    let (_, ddl) = ask(
        &env,
        &alice,
        json!({"target": "app", "for": "10m", "reason": "migration", "scope": "ddl"}),
    )
    .await;
    let ddl_id = ddl["id"].as_str().unwrap().to_string();

    // Approvers see both with the commands waiting (one inbox); the
    // requester cannot grant her own.
    let pending = env.pending_approvals(2).await;
    assert!(pending.iter().all(|a| a["access"]["reason"].is_string()));
    let (status, body) = env
        .api_post(
            &stack.api_token("alice", &["approvers"]),
            &format!("/api/v1/approvals/{access_id}/grant"),
            json!({}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    for id in [&access_id, &ddl_id] {
        let (status, body) = env
            .api_post(&dave, &format!("/api/v1/approvals/{id}/grant"), json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "granted");
    }

    // The worker takes the grants in: alice connects, and may run DDL.
    let session = once_some("the worker sees the access granted", async || {
        env.try_connect("alice", &alice_pg).await.ok()
    })
    .await;
    session
        .batch_execute("CREATE TABLE granted (a int)")
        .await
        .expect("DDL under the ddl grant");
    // Someone else's grant is not bob's.
    let e = env
        .try_connect("bob", &stack.token("bob", &["dev"]))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e).0, "42501");

    // dave revokes the ddl grant: the live session's next DDL is refused,
    // the session goes on.
    let (status, body) = env
        .api_post(
            &dave,
            &format!("/api/v1/access/{ddl_id}/revoke"),
            json!({"reason": "done"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "revoked");
    assert_eq!(body["revocation"]["username"], "dave");
    let refused = once_some("the worker sees the revocation", async || {
        session
            .batch_execute("CREATE TABLE IF NOT EXISTS later (a int)")
            .await
            .err()
    })
    .await;
    let (code, message) = sqlstate(&refused);
    assert_eq!(code, "42501");
    assert!(message.contains("DDL needs a ddl grant"), "{message}");
    let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // alice gives up her access: the live session ends at its next
    // command, and she cannot connect again.
    let (status, body) = env
        .api_post(
            &alice,
            &format!("/api/v1/access/{access_id}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ended = once_some("the session ends", async || {
        session.query_one("SELECT 1", &[]).await.err()
    })
    .await;
    let (code, message) = sqlstate(&ended);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("has ended"), "{message}");
    assert!(env.try_connect("alice", &alice_pg).await.is_err());

    // Her requests, as she lists them; bob has none; a revoked grant
    // cannot be revoked again.
    let mine = env.api_get(&alice, "/api/v1/access").await;
    let states: Vec<&str> = mine["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["revoked", "revoked"]);
    let bobs = env
        .api_get(&stack.api_token("bob", &["dev"]), "/api/v1/access")
        .await;
    assert_eq!(bobs["access"], json!([]));
    let (status, _) = env
        .api_post(
            &alice,
            &format!("/api/v1/access/{access_id}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, 409);

    // The DDL's recorded decision names the grant it ran under.
    let bodies = env.stream_bodies().await;
    let created = bodies
        .iter()
        .find(|b| b.contains("CREATE TABLE granted (a int)"))
        .expect("the DDL is recorded");
    assert!(
        created.contains(&ddl_id) && created.contains(&access_id),
        "the decision names the grants in force: {created}"
    );
    // The audit store has both requests as they ended, for compliance
    // queries that join commands with the access they ran under.
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    for _ in 0..100 {
        rows = env
            .audit_query(
                "SELECT kind, state, scope, reason FROM approvals
                 WHERE requester_subject = $1 AND target = $2 ORDER BY reason",
                &["alice", "app"],
            )
            .await;
        if rows.iter().filter(|r| r.1 == "revoked").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows,
        [
            (
                "access".into(),
                "revoked".into(),
                "access".into(),
                "incident 42".into()
            ),
            (
                "access".into(),
                "revoked".into(),
                "ddl".into(),
                "migration".into()
            ),
        ]
    );
    env.cleanup().await;
}

/// A pending request is withdrawn by its requester; five may wait at a
/// time; an approver cannot
/// revoke what is still pending (they deny it); only the requester reads
/// hers under /access; explanations take grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_are_withdrawn_by_their_requester_and_denied_by_approvers() {
    let env = Env::start().await;
    let stack = env.stack();
    let alice = stack.api_token("alice", &["dev"]);
    let dave = stack.api_token("dave", &["approvers"]);
    let (_, one) = ask(
        &env,
        &alice,
        json!({"target": "app", "for": "1h", "reason": "one"}),
    )
    .await;
    let (_, two) = ask(
        &env,
        &alice,
        json!({"target": "app", "for": "1h", "reason": "two"}),
    )
    .await;
    let (one, two) = (one["id"].as_str().unwrap(), two["id"].as_str().unwrap());
    // Five may wait at a time; a sixth is refused until one is decided.
    for n in 3..=5 {
        let (status, body) = ask(
            &env,
            &alice,
            json!({"target": "app", "for": "1h", "reason": format!("r{n}")}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = ask(
        &env,
        &alice,
        json!({"target": "app", "for": "1h", "reason": "six"}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.to_string().contains("5 requests for access waiting"),
        "{body}"
    );
    let (status, body) = env
        .api_post(&dave, &format!("/api/v1/access/{one}/revoke"), json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("deny it instead"), "{body}");
    let (status, body) = env
        .api_post(&alice, &format!("/api/v1/access/{one}/revoke"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    assert_eq!(body["cancel_reason"], "withdrawn");
    let (status, body) = env
        .api_post(
            &dave,
            &format!("/api/v1/approvals/{two}/deny"),
            json!({"comment": "use the migration pipeline"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let shown = env.api_get(&alice, &format!("/api/v1/access/{two}")).await;
    assert_eq!(shown["state"], "denied");
    assert_eq!(shown["denial"]["comment"], "use the migration pipeline");
    // Another's request is not found under /access (approvers read it as
    // an approval).
    let r = reqwest::Client::new()
        .get(env.api(&format!("/api/v1/access/{two}")))
        .bearer_auth(stack.api_token("bob", &["dev"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // What-if: the built-in prod-no-ddl refuses DDL on production unless a
    // ddl grant is in force.
    let auditor = stack.api_token("aud", &["auditors"]);
    for (grants, effect) in [(json!([]), "deny"), (json!(["ddl"]), "allow")] {
        let (status, body) = env
            .api_post(
                &auditor,
                "/api/v1/decisions/explain",
                json!({
                    "identity": {"subject": "alice"},
                    "target": {"name": "orders", "environment": "prod"},
                    "sql": "ALTER TABLE orders ADD COLUMN note text",
                    "grants": grants,
                }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["effect"], effect, "{grants}: {body}");
    }
    env.cleanup().await;
}
