//! Approval of single commands, end to end: a real session's command waits
//! in the worker while an approver decides through the control plane's
//! API; granted, it runs in the same session; denied, expired or
//! withdrawn, it never runs.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::Env;

async fn start(bundle: gatehouse_policies::Bundle) -> Env {
    let env = Env::start_with(support::Options {
        bundle,
        ..Default::default()
    })
    .await;
    env.target()
        .await
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2), (3)")
        .await
        .unwrap();
    env
}

/// A session for `user` in `groups`.
async fn session(env: &Env, user: &str, groups: &[&str]) -> tokio_postgres::Client {
    env.try_connect(user, &env.stack().token(user, groups))
        .await
        .expect("connects")
}

/// An API token for `user` in `groups`.
fn api_token(env: &Env, user: &str, groups: &[&str]) -> String {
    env.stack().api_token(user, groups)
}

async fn pending(env: &Env, n: usize) -> Vec<Value> {
    env.pending_approvals(n).await
}

/// POSTs a decision with `token`; the status and the body.
async fn decide(env: &Env, token: &str, id: &str, verb: &str, body: Value) -> (u16, Value) {
    env.api_post(token, &format!("/api/v1/approvals/{id}/{verb}"), body)
        .await
}

fn sqlstate(e: &tokio_postgres::Error) -> (String, String) {
    let db = e.as_db_error().expect("an error from the server");
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_waits_for_its_approval_and_runs_in_the_same_session_once_granted() {
    let env = start(gatehouse_policies::Bundle::defaults()).await;
    // alice is an approver herself: she still cannot approve her own.
    let alice = session(&env, "alice", &["approvers"]).await;
    let waiting = tokio::spawn(async move {
        let deleted = alice.execute("DELETE FROM t", &[]).await;
        (alice, deleted)
    });
    let list = pending(&env, 1).await;
    let a = &list[0];
    let id = a["id"].as_str().unwrap().to_string();
    assert_eq!(a["command"]["statement"], "DELETE FROM t");
    assert_eq!(a["requester"]["username"], "alice");
    assert_eq!(a["target"]["name"], "app");
    assert_eq!(a["approvers_required"], 1);
    assert_eq!(
        a["command"]["decision"]["policies"],
        json!(["unbounded-write-needs-approval"])
    );
    assert_eq!(env.target_ids().await, [1, 2, 3], "nothing ran yet");

    // The requester cannot grant it; one without `approve` cannot either.
    let (status, body) = decide(
        &env,
        &api_token(&env, "alice", &["approvers"]),
        &id,
        "grant",
        json!({}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = decide(
        &env,
        &api_token(&env, "mallory", &["auditors"]),
        &id,
        "grant",
        json!({}),
    )
    .await;
    assert_eq!(status, 403, "api:read-approvals but no approve");

    let dave = api_token(&env, "dave", &["approvers"]);
    let (status, body) = decide(&env, &dave, &id, "grant", json!({"comment": "ok"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "granted");
    let (alice, deleted) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the DELETE completes once granted")
        .unwrap();
    assert_eq!(deleted.unwrap(), 3);
    assert!(env.target_ids().await.is_empty());
    // The session goes on.
    let one: i32 = alice.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // Decided: a second decision conflicts.
    let (status, body) = decide(
        &env,
        &api_token(&env, "erin", &["approvers"]),
        &id,
        "deny",
        json!({"comment": "too late"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // The recorded command links its approval.
    let bodies = env.stream_bodies().await;
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("DELETE FROM t") && b.contains(&id) && b.contains("granted")),
        "the command's event links the approval"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_command_fails_with_the_approvers_name_and_comment_and_runs_nothing() {
    let env = start(gatehouse_policies::Bundle::defaults()).await;
    let bob = session(&env, "bob", &[]).await;
    let waiting = tokio::spawn(async move { bob.simple_query("UPDATE t SET id = 0").await });
    let list = pending(&env, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let carol = api_token(&env, "carol", &["approvers"]);
    let (status, body) = decide(&env, &carol, &id, "deny", json!({})).await;
    assert_eq!(status, 400, "a denial needs a comment: {body}");
    let (status, body) = decide(
        &env,
        &carol,
        &id,
        "deny",
        json!({"comment": "use a WHERE clause"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let err = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .unwrap()
        .unwrap()
        .expect_err("denied");
    let (code, message) = sqlstate(&err);
    assert_eq!(code, "42501");
    assert!(
        message.contains("carol") && message.contains("use a WHERE clause"),
        "{message}"
    );
    assert_eq!(env.target_ids().await, [1, 2, 3]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_nobody_decides_expires_and_the_command_never_runs() {
    let env = start(support::defaults_with_approval("@approval_timeout(\"2s\")")).await;
    let bob = session(&env, "bob", &[]).await;
    let started = std::time::Instant::now();
    let err = bob
        .execute("DELETE FROM t", &[])
        .await
        .expect_err("expired");
    let (code, message) = sqlstate(&err);
    assert_eq!(code, "57014", "{message}");
    assert!(message.contains("expired"), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(env.target_ids().await, [1, 2, 3]);
    // Shown as expired, and it can no longer be granted.
    let token = api_token(&env, "dave", &["approvers"]);
    let body = env.api_get(&token, "/api/v1/approvals?state=expired").await;
    let id = body["approvals"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = decide(&env, &token, &id, "grant", json!({})).await;
    assert_eq!(status, 409);
    // The session goes on.
    assert_eq!(
        bob.execute("DELETE FROM t WHERE id = 1", &[])
            .await
            .unwrap(),
        1
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_two_distinct_approvers_none_of_them_the_requester() {
    let env = start(support::defaults_with_approval("@approvers(\"2\")")).await;
    let frank = session(&env, "frank", &["approvers"]).await;
    let waiting = tokio::spawn(async move { frank.execute("DELETE FROM t", &[]).await });
    let list = pending(&env, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["approvers_required"], 2);
    // frank, an approver, may not approve his own.
    let (status, body) = decide(
        &env,
        &api_token(&env, "frank", &["approvers"]),
        &id,
        "grant",
        json!({}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let gina = api_token(&env, "gina", &["approvers"]);
    let (status, body) = decide(&env, &gina, &id, "grant", json!({})).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("pending")));
    let (status, _) = decide(&env, &gina, &id, "grant", json!({})).await;
    assert_eq!(status, 409, "the same approver twice");
    assert_eq!(env.target_ids().await, [1, 2, 3]);
    let hank = api_token(&env, "hank", &["approvers"]);
    let (status, body) = decide(&env, &hank, &id, "grant", json!({})).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("granted")));
    let deleted = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(deleted, 3);
    env.cleanup().await;
}

/// Several statements pipelined: the one before the waiting command runs,
/// the one after waits with it, and nothing runs out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_waits_behind_its_command_and_runs_in_order() {
    let env = start(gatehouse_policies::Bundle::defaults()).await;
    let client = std::sync::Arc::new(session(&env, "ivan", &[]).await);
    let c = client.clone();
    let pipeline = tokio::spawn(async move {
        let before = c.execute("INSERT INTO t VALUES (10)", &[]);
        let delete = c.execute("DELETE FROM t", &[]);
        let after = c.execute("INSERT INTO t VALUES (11)", &[]);
        let (b, d, a) = futures::join!(before, delete, after);
        (b.unwrap(), d.unwrap(), a.unwrap())
    });
    let list = pending(&env, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    gatehouse_testkit::eventually("the INSERT before it ran", async || {
        env.target_ids().await == [1, 2, 3, 10]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.target_ids().await,
        [1, 2, 3, 10],
        "nothing after it ran"
    );
    let (status, body) = decide(
        &env,
        &api_token(&env, "judy", &["approvers"]),
        &id,
        "grant",
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (b, d, a) = tokio::time::timeout(Duration::from_secs(20), pipeline)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((b, d, a), (1, 4, 1));
    assert_eq!(env.target_ids().await, [11]);
    env.cleanup().await;
}

/// A cancel request withdraws a waiting command; so does leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_or_leaving_withdraws_the_approval() {
    let env = start(gatehouse_policies::Bundle::defaults()).await;
    let kim = session(&env, "kim", &[]).await;
    let cancel = kim.cancel_token();
    let waiting = tokio::spawn(async move { kim.execute("DELETE FROM t", &[]).await });
    let list = pending(&env, 1).await;
    let first = list[0]["id"].as_str().unwrap().to_string();
    cancel.cancel_query(env.tls()).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .unwrap()
        .unwrap()
        .expect_err("withdrawn");
    assert_eq!(sqlstate(&err).0, "57014");

    // A client that goes away: its connection is dropped mid-wait.
    let mut config: tokio_postgres::Config = env.conninfo("leo", "app", "require").parse().unwrap();
    config.password(env.token("leo"));
    let (leo, connection) = config.connect(env.tls()).await.unwrap();
    let connection = tokio::spawn(connection);
    let waiting = tokio::spawn(async move { leo.execute("UPDATE t SET id = 5", &[]).await });
    let list = pending(&env, 1).await;
    let second = list[0]["id"].as_str().unwrap().to_string();
    connection.abort();
    let _ = connection.await;
    assert!(waiting.await.unwrap().is_err());

    let token = api_token(&env, "dave", &["approvers"]);
    for (id, reason) in [
        (&first, "client_cancelled"),
        (&second, "client_disconnected"),
    ] {
        gatehouse_testkit::eventually("the approval is cancelled", async || {
            let a = env
                .api_get(&token, &format!("/api/v1/approvals/{id}"))
                .await;
            a["state"] == "cancelled" && a["cancel_reason"] == reason
        })
        .await;
    }
    assert_eq!(env.target_ids().await, [1, 2, 3]);
    env.cleanup().await;
}

/// psql prints the notice naming the approval while its DELETE waits, and
/// completes it once granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_prints_where_the_approval_waits_and_completes_once_granted() {
    let env = start(gatehouse_policies::Bundle::defaults()).await;
    let conninfo = env.conninfo("mia", "app", "require");
    let psql = tokio::process::Command::new("psql")
        .args([
            conninfo.as_str(),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "DELETE FROM t",
        ])
        .env("PGPASSWORD", env.token("mia"))
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .env("PSQLRC", "/dev/null")
        .kill_on_drop(true)
        .output();
    let psql = tokio::spawn(psql);
    let list = pending(&env, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let (status, body) = decide(
        &env,
        &api_token(&env, "nora", &["approvers"]),
        &id,
        "grant",
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let out = tokio::time::timeout(Duration::from_secs(20), psql)
        .await
        .unwrap()
        .unwrap()
        .expect("psql runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("NOTICE:") && stderr.contains(&id) && stderr.contains("grant"),
        "psql shows the approval: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "approval {id} is pending until an approver grants it (gatehouse approvals grant {id}, or POST /api/v1/approvals/{id}/grant)"
        )),
        "the notice reads as one sentence: {stderr}"
    );
    assert_eq!(stdout.trim(), "DELETE 3");
    assert!(env.target_ids().await.is_empty());
    env.cleanup().await;
}

/// Revoking the requester withdraws its waiting command at once and ends
/// the session; nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_requester_withdraws_the_waiting_command_at_once() {
    let env = start(gatehouse_policies::Bundle::defaults()).await;
    let olga = session(&env, "olga", &[]).await;
    let waiting = tokio::spawn(async move { olga.execute("DELETE FROM t", &[]).await });
    let list = pending(&env, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let admin = api_token(&env, "root", &["policy-admins"]);
    let (status, body) = env
        .api_post(
            &admin,
            "/api/v1/revocations",
            json!({"subject": "olga", "reason": "left the team"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let err = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("withdrawn long before its expiry")
        .unwrap()
        .expect_err("revoked");
    assert_eq!(sqlstate(&err).0, "28000");
    let token = api_token(&env, "dave", &["approvers"]);
    let a = env
        .api_get(&token, &format!("/api/v1/approvals/{id}"))
        .await;
    assert_eq!(
        (a["state"].as_str(), a["cancel_reason"].as_str()),
        (Some("cancelled"), Some("revoked"))
    );
    assert_eq!(env.target_ids().await, [1, 2, 3]);
    env.cleanup().await;
}
