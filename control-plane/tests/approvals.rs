//! Approvals through two control planes against one NATS (127.0.0.1:4222):
//! racing decisions end in one outcome, a restarted control plane finds
//! what is pending, and webhooks get each change, signed.

mod support;

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use gatehouse_control_plane::{WebhookConfig, WebhookFormat};
use gatehouse_eventlog::RecordStore;
use gatehouse_events::approval::{Approval, ApprovalState, ApprovalTarget, Requested};
use gatehouse_events::{CommandReceived, Identity, Protocol};
use gatehouse_policystore::approvals::{Approvals, Lease};
use gatehouse_testkit::eventually;
use serde_json::{Value, json};
use support::{Env, Running};
use uuid::Uuid;

const APPROVERS: &str = "@id(\"approvers\") permit (principal in Gatehouse::Group::\"approvers\", \
    action in [Gatehouse::Action::\"approve\", Gatehouse::Action::\"api:read-approvals\"], resource);";

async fn push_approvers(env: &Env, cp: &Running) {
    let r = env
        .http
        .post(format!("{}/api/v1/policies", cp.url))
        .bearer_auth(&cp.admin)
        .json(&json!({ "version": "approvers", "files": [["approvers.cedar", APPROVERS]] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

/// The approvals stream, as worker `worker-1` (whose lease is fresh) sees
/// it.
async fn approvals(env: &Env) -> Approvals {
    let store = Approvals::open(
        &RecordStore::JetStream(env.js.clone()),
        &env.policy().revocation_stream,
    )
    .await
    .unwrap();
    store
        .renew(&lease("worker-1", chrono::Duration::minutes(1)))
        .await
        .unwrap();
    store
}

/// A lease of `worker` started `ago`, renewed now.
fn lease(worker: &str, ago: chrono::Duration) -> Lease {
    Lease {
        worker_id: worker.into(),
        started_at: Utc::now() - ago,
        renewed_at: Utc::now(),
    }
}

/// What a worker records when a command needs approval.
fn request(requester: &str) -> Approval {
    held_by(requester, "worker-1")
}

/// … held by `worker_id`.
fn held_by(requester: &str, worker_id: &str) -> Approval {
    let now = Utc::now();
    Approval {
        schema_version: 1,
        id: Uuid::now_v7(),
        state: ApprovalState::Pending,
        requested_at: now,
        expires_at: now + chrono::Duration::minutes(5),
        requester: Identity {
            issuer: "https://issuer.test".into(),
            subject: requester.into(),
            username: requester.into(),
            groups: vec![],
            delegation: vec![],
        },
        target: ApprovalTarget {
            name: "prod".into(),
            kind: "postgres".into(),
            environment: "prod".into(),
            tags: vec![],
        },
        request: Requested::Command {
            session_id: Uuid::now_v7(),
            worker_id: worker_id.into(),
            command: Box::new(CommandReceived {
                protocol: Protocol::Simple,
                statement: "DELETE FROM accounts".into(),
                statement_name: None,
                portal: None,
                params: vec![],
                executes: vec![],
                decision: None,
                redactions: vec![],
                approval: None,
            }),
        },
        approvers_required: 1,
        grants: vec![],
        denial: None,
        ended_at: None,
        cancel_reason: None,
        revocation: None,
        replaces: None,
    }
}

async fn post(env: &Env, cp: &Running, token: &str, path: &str, body: Value) -> (u16, Value) {
    let r = env
        .http
        .post(format!("{}{path}", cp.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(env: &Env, cp: &Running, token: &str, path: &str) -> Value {
    env.http
        .get(format!("{}{path}", cp.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_racing_a_grant_and_a_deny_produce_one_outcome() {
    Env::new("cpappr")
        .await
        .scope(async |env| {
            let one = env.start().await;
            let two = env.start().await;
            push_approvers(env, &one).await;
            let store = approvals(env).await;
            let bob = env.token("bob", &["approvers"], &[]);
            let carol = env.token("carol", &["approvers"], &[]);
            for _ in 0..5 {
                let a = request("alice");
                store.request(&a).await.unwrap();
                let id = a.id;
                let (grant, deny) = (
                    format!("/api/v1/approvals/{id}/grant"),
                    format!("/api/v1/approvals/{id}/deny"),
                );
                let (granted, denied) = tokio::join!(
                    post(env, &one, &bob, &grant, json!({})),
                    post(env, &two, &carol, &deny, json!({"comment": "no"})),
                );
                let outcome = store.get(id).await.unwrap().unwrap().0;
                match (granted.0, denied.0) {
                    (200, 409) => assert_eq!(outcome.state, ApprovalState::Granted),
                    (409, 200) => assert_eq!(outcome.state, ApprovalState::Denied),
                    other => panic!("not one winner: {other:?} {granted:?} {denied:?}"),
                }
                // Both control planes show the winner.
                for cp in [&one, &two] {
                    let shown = get(env, cp, &bob, &format!("/api/v1/approvals/{id}")).await;
                    assert_eq!(shown["state"], outcome.state.as_str());
                }
            }
            one.stop().await;
            two.stop().await;
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_finds_pending_approvals_and_webhooks_get_each_change_signed() {
    let mut env = Env::new("cpwebhook").await;
    // A receiver that refuses its first delivery (so it is retried) and
    // keeps what it gets.
    let got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
    let calls = Arc::new(Mutex::new(0u32));
    let (g, c) = (got.clone(), calls.clone());
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (g, c) = (g.clone(), c.clone());
            async move {
                let first = {
                    let mut n = c.lock().unwrap();
                    *n += 1;
                    *n == 1
                };
                if first {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                g.lock().unwrap().push((headers, body));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, receiver).into_future());
    let secret = "a-webhook-secret-of-some-length";
    let var = format!("GATEHOUSE_TEST_HOOK_{}", Uuid::new_v4().simple());
    // SAFETY: set once, before anything reads it, by this test only.
    unsafe { std::env::set_var(&var, secret) };
    env.config.approval_webhooks = vec![WebhookConfig {
        url: hook_url,
        secret_env: Some(var),
        secret_file: None,
        format: WebhookFormat::Json,
    }];
    env.config.approval_link = Some("https://console.test/approvals/{id}".into());

    env.scope(async |env| {
        let cp = env.start().await;
        push_approvers(env, &cp).await;
        let store = approvals(env).await;
        let a = request("alice");
        store.request(&a).await.unwrap();
        let id = a.id;
        let bob = env.token("bob", &["approvers"], &[]);
        let listed = get(env, &cp, &bob, "/api/v1/approvals?state=pending").await;
        assert_eq!(listed["approvals"][0]["id"], id.to_string());

        // Killed while it is pending; a new one finds it and grants it.
        cp.stop().await;
        let cp = env.start().await;
        let listed = get(env, &cp, &bob, "/api/v1/approvals?state=pending").await;
        assert_eq!(listed["approvals"].as_array().unwrap().len(), 1);
        assert_eq!(listed["approvals"][0]["id"], id.to_string());
        let (status, body) = post(
            env,
            &cp,
            &bob,
            &format!("/api/v1/approvals/{id}/grant"),
            json!({}),
        )
        .await;
        assert_eq!(status, 200, "{body}");

        // The grant reached the webhook (retried after its first refusal),
        // signed with the secret.
        eventually("the webhook to get the grant", async || {
            got.lock().unwrap().iter().any(|(h, _)| {
                h.get("x-gatehouse-event")
                    .is_some_and(|v| v == "approval.granted")
            })
        })
        .await;
        let got = got.lock().unwrap().clone();
        let (headers, body) = got
            .iter()
            .find(|(h, _)| h["x-gatehouse-event"] == "approval.granted")
            .unwrap();
        let timestamp = headers["x-gatehouse-timestamp"].to_str().unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = timestamp.as_bytes().to_vec();
        signed.push(b'.');
        signed.extend_from_slice(body);
        let expected = format!(
            "sha256={}",
            hex::encode(ring::hmac::sign(&key, &signed).as_ref())
        );
        assert_eq!(headers["x-gatehouse-signature"], expected.as_str());
        let (unix, now) = (timestamp.parse::<i64>().unwrap(), Utc::now().timestamp());
        assert!((now - unix).abs() < 60);
        let body: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["type"], "approval.granted");
        assert_eq!(body["approval"]["id"], id.to_string());
        assert_eq!(body["approval"]["grants"][0]["subject"], "bob");
        assert_eq!(body["link"], format!("https://console.test/approvals/{id}"));
        assert!(
            headers["x-gatehouse-delivery"]
                .to_str()
                .unwrap()
                .starts_with(&id.to_string())
        );
        // Nothing from before the restart was sent again; the first
        // refusal was retried.
        assert!(*calls.lock().unwrap() >= 2);
        cp.stop().await;
    })
    .await;
}

/// A command waits in one worker's memory: when that worker is gone (its
/// lease lapsed, or it restarted under the same id), the approval can
/// never lead anywhere and is shown cancelled, `worker_lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_whose_worker_is_gone_are_cancelled() {
    Env::new("cplease")
        .await
        .scope(async |env| {
            let cp = env.start().await;
            push_approvers(env, &cp).await;
            let store = approvals(env).await;
            let held = request("alice");
            let orphaned = held_by("alice", "worker-gone");
            let restarted = held_by("alice", "worker-restarted");
            for a in [&held, &orphaned, &restarted] {
                store.request(a).await.unwrap();
            }
            // worker-restarted's lease is from a run that started after
            // the request.
            store
                .renew(&lease("worker-restarted", chrono::Duration::zero()))
                .await
                .unwrap();
            let bob = env.token("bob", &["approvers"], &[]);
            let all = get(env, &cp, &bob, "/api/v1/approvals").await;
            let state = |id: Uuid| {
                let a = all["approvals"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["id"] == id.to_string())
                    .unwrap()
                    .clone();
                (a["state"].clone(), a["cancel_reason"].clone())
            };
            assert_eq!(state(held.id), (json!("pending"), Value::Null));
            for gone in [orphaned.id, restarted.id] {
                assert_eq!(state(gone), (json!("cancelled"), json!("worker_lost")));
            }
            // And so it stays: it can no longer be granted.
            let (status, _) = post(
                env,
                &cp,
                &bob,
                &format!("/api/v1/approvals/{}/grant", orphaned.id),
                json!({}),
            )
            .await;
            assert_eq!(status, 409);
            cp.stop().await;
        })
        .await;
}

/// The stream of changes for the web console: each approval's current
/// record, then every change as it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_sends_current_approvals_then_each_change() {
    Env::new("cpsse")
        .await
        .scope(async |env| {
            let cp = env.start().await;
            push_approvers(env, &cp).await;
            let store = approvals(env).await;
            let first = request("alice");
            store.request(&first).await.unwrap();
            let bob = env.token("bob", &["approvers"], &[]);
            let mut stream = env
                .http
                .get(format!("{}/api/v1/approvals/stream", cp.url))
                .bearer_auth(&bob)
                .send()
                .await
                .unwrap();
            assert_eq!(stream.status(), 200);
            assert_eq!(stream.headers()["content-type"], "text/event-stream");
            let second = request("erin");
            store.request(&second).await.unwrap();
            let (status, _) = post(
                env,
                &cp,
                &bob,
                &format!("/api/v1/approvals/{}/grant", first.id),
                json!({}),
            )
            .await;
            assert_eq!(status, 200);
            // Three events: first (requested), second (requested), first
            // (granted), as `event:` and `data:` lines.
            let mut text = String::new();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
            while text.matches("\n\n").count() < 3 {
                let chunk = tokio::time::timeout_at(deadline, stream.chunk())
                    .await
                    .expect("three events within the deadline")
                    .unwrap()
                    .expect("the stream stays open");
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
            let events: Vec<(String, Value)> = text
                .split("\n\n")
                .filter(|e| e.contains("data:"))
                .map(|e| {
                    let name = e
                        .lines()
                        .find_map(|l| l.strip_prefix("event:"))
                        .unwrap()
                        .trim()
                        .to_string();
                    let data = e
                        .lines()
                        .find_map(|l| l.strip_prefix("data:"))
                        .unwrap()
                        .trim();
                    (name, serde_json::from_str(data).unwrap())
                })
                .collect();
            let seen: Vec<(&str, &str, &str)> = events
                .iter()
                .map(|(name, a)| {
                    (
                        name.as_str(),
                        a["id"].as_str().unwrap(),
                        a["state"].as_str().unwrap(),
                    )
                })
                .collect();
            let (one, two) = (first.id.to_string(), second.id.to_string());
            assert_eq!(
                seen,
                [
                    ("requested", one.as_str(), "pending"),
                    ("requested", two.as_str(), "pending"),
                    ("granted", one.as_str(), "granted"),
                ]
            );
            drop(stream);
            cp.stop().await;
        })
        .await;
}
