//! Pushes, revocations and reinstatements against the real NATS
//! (127.0.0.1:4222, JetStream) and PostgreSQL
//! (postgres://postgres@127.0.0.1:5432, trust auth): an event saying a
//! bundle was published, or an identity revoked or reinstated, exists only
//! if the store took it, and what the store took stays only if its event
//! was recorded.
//!
//! Failures are provoked per stream: a bundle or reason larger than the
//! server's `max_payload`, or a stream's own `max_message_size` set below
//! the message (the policy store's stream refuses the effect, or the event
//! stream refuses the record). Each test has its own streams, consumer and
//! audit database, removed at the end even on failure.

mod support;

use async_nats::jetstream;
use futures::StreamExt;
use gatehouse_events::EventType;
use gatehouse_policystore::Revoked;
use gatehouse_testkit::eventually;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::{ADMINS, Env, PERMIT_ALL, Running};

impl Env {
    async fn db(&self) -> PgPool {
        PgPool::connect(&self.config.audit_db_url).await.unwrap()
    }

    /// Events of type `ty` on the event stream (each push or revocation
    /// here is recorded alone, one event per message).
    async fn events_of(&self, ty: EventType) -> usize {
        let subject = self.events.subjects().for_type(ty);
        let stream = self.js.get_stream(&self.events.stream).await.unwrap();
        let mut subjects = stream.info_with_subjects(&subject).await.unwrap();
        let mut n = 0;
        while let Some(s) = subjects.next().await {
            n += s.unwrap().1;
        }
        n
    }

    /// The version of every bundle in the bundle stream, oldest first.
    async fn bundle_history(&self) -> Vec<u64> {
        let mut stream = self
            .js
            .get_stream(&self.policy().bundle_stream)
            .await
            .unwrap();
        let total = stream.info().await.unwrap().state.messages;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while (out.len() as u64) < total {
            let m = messages.next().await.unwrap().unwrap();
            let bundle: Value = serde_json::from_slice(&m.payload).unwrap();
            out.push(bundle["version"].as_u64().unwrap());
        }
        out
    }

    /// Sets a stream's largest message, in bytes (-1: unlimited).
    async fn limit_stream(&self, name: &str, max_message_size: i32) {
        let mut stream = self.js.get_stream(name).await.unwrap();
        let mut config = stream.info().await.unwrap().config.clone();
        config.max_message_size = max_message_size;
        self.js.update_stream(&config).await.unwrap();
    }

    /// Waits until the projector has nothing pending or unacknowledged.
    async fn wait_projected(&self) {
        eventually("the projector to catch up", || async {
            let stream = self.js.get_stream(&self.events.stream).await.unwrap();
            let info = stream.consumer_info(&self.config.consumer).await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await;
    }
}

impl Running {
    async fn post(&self, env: &Env, path: &str, body: &Value) -> (u16, Value) {
        self.post_as(env, &self.admin, path, body).await
    }

    async fn post_as(&self, env: &Env, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let resp = env
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get_as(&self, env: &Env, token: &str, path: &str) -> (u16, Value) {
        let resp = env
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn push(&self, env: &Env, label: &str, files: Value) -> (u16, Value) {
        self.post(
            env,
            "/api/v1/policies",
            &json!({ "label": label, "files": files }),
        )
        .await
    }

    async fn delete(&self, env: &Env, path: &str) -> (u16, Value) {
        let resp = env
            .http
            .delete(format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn readyz(&self, env: &Env) -> Value {
        let resp = env
            .http
            .get(format!("{}/readyz", self.url))
            .send()
            .await
            .unwrap();
        resp.json().await.unwrap()
    }

    async fn current(&self, env: &Env) -> Value {
        let resp = env
            .http
            .get(format!("{}/api/v1/policies/current", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        resp.json().await.unwrap()
    }
}

async fn bundle_rows(db: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT version, hash FROM policy_bundles ORDER BY time, event_id")
        .fetch_all(db)
        .await
        .unwrap()
}

async fn revocation_rows(db: &PgPool) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT kind, value, reason FROM revocations ORDER BY time, event_id")
        .fetch_all(db)
        .await
        .unwrap()
}

/// A valid bundle of `bytes` and more: one policy and a long comment.
fn padded_files(bytes: usize) -> Value {
    let comment = format!("// {}\n", "x".repeat(bytes));
    json!([["all.cedar", format!("{comment}{PERMIT_ALL}")]])
}

#[tokio::test]
async fn an_oversized_bundle_is_refused_and_nothing_is_recorded() {
    Env::new("cppol").await.scope(oversized_bundle).await;
}

async fn oversized_bundle(env: &Env) {
    let cp = env.start().await;
    let db = env.db().await;

    // A normal push is published and recorded exactly once.
    let (status, first) = cp.push(env, "v1", json!([["all.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(cp.current(env).await["hash"], first["hash"]);

    // 1.5 MB: within the API's body limit, beyond NATS's max_payload.
    let max_payload = env.nats.max_payload();
    assert!(max_payload < 1_500_000, "max_payload is {max_payload}");
    let (status, body) = cp.push(env, "huge", padded_files(1_500_000)).await;
    assert_eq!(status, 413, "{body}");
    let size = body["size"].as_u64().unwrap() as usize;
    let max = body["max"].as_u64().unwrap() as usize;
    assert!(size > 1_500_000 && max < max_payload, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(&size.to_string()) && error.contains(&max.to_string()),
        "{error}"
    );
    // The current bundle is unchanged; the store's history holds v1 only.
    let current = cp.current(env).await;
    assert_eq!(current["version"], 1, "{current}");
    assert_eq!(current["label"], "v1", "{current}");
    assert_eq!(current["hash"], first["hash"]);

    // A later push is projected after anything the refused one could have
    // recorded: then exactly v1 and v2 are there.
    let (status, second) = cp.push(env, "v2", json!([["b.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{second}");
    eventually("both bundles to be projected", || async {
        bundle_rows(&db).await.len() >= 2
    })
    .await;
    env.wait_projected().await;
    let rows = bundle_rows(&db).await;
    assert_eq!(
        rows,
        vec![
            ("1".into(), first["hash"].as_str().unwrap().into()),
            ("2".into(), second["hash"].as_str().unwrap().into()),
        ]
    );
    assert_eq!(env.events_of(EventType::PolicyBundlePublished).await, 2);
    cp.stop().await;
}

#[tokio::test]
async fn a_bundle_the_store_refuses_is_not_recorded() {
    Env::new("cppol").await.scope(store_refuses_bundle).await;
}

async fn store_refuses_bundle(env: &Env) {
    let cp = env.start().await;
    let db = env.db().await;
    let (status, first) = cp.push(env, "v1", json!([["all.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{first}");

    // The bundle stream takes nothing over 4 kB; the event log takes it all.
    env.limit_stream(&env.policy().bundle_stream, 4096).await;
    let (status, body) = cp.push(env, "big", padded_files(8192)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(cp.current(env).await["version"], 1);

    env.limit_stream(&env.policy().bundle_stream, -1).await;
    let (status, second) = cp.push(env, "v2", json!([["b.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{second}");
    eventually("both bundles to be projected", || async {
        bundle_rows(&db).await.len() >= 2
    })
    .await;
    env.wait_projected().await;
    let versions: Vec<String> = bundle_rows(&db).await.into_iter().map(|r| r.0).collect();
    assert_eq!(versions, ["1", "2"]);
    assert_eq!(env.events_of(EventType::PolicyBundlePublished).await, 2);
    cp.stop().await;
}

#[tokio::test]
async fn a_bundle_whose_event_cannot_be_recorded_is_withdrawn() {
    Env::new("cppol").await.scope(record_fails_bundle).await;
}

async fn record_fails_bundle(env: &Env) {
    let cp = env.start().await;
    let db = env.db().await;
    let store = env.store().await;

    // With no bundle before, the withdrawal is a bundle without policies,
    // which refuses everything as no bundle does.
    env.limit_stream(&env.events.stream, 128).await;
    let (status, body) = cp.push(env, "v0", json!([["all.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 503, "{body}");
    // Version 1 was published and withdrawn: version 2 replaces it.
    let current = cp.current(env).await;
    assert_eq!(current["version"], 2, "{current}");
    assert_eq!(current["label"], "withdrawn-1", "{current}");
    assert_eq!(current["files"], json!([]), "{current}");
    let explained = cp
        .post(
            env,
            "/api/v1/decisions/explain",
            &json!({
                "identity": { "subject": "u1" },
                "target": { "name": "app" },
                "sql": "SELECT 1",
            }),
        )
        .await;
    assert_eq!(explained.0, 200, "{}", explained.1);
    assert_eq!(explained.1["effect"], "deny", "{}", explained.1);

    env.limit_stream(&env.events.stream, -1).await;
    let (status, first) = cp.push(env, "v1", json!([["all.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{first}");

    // With a bundle before, that one is current again; the refused one
    // stays in the store's history, named as withdrawn.
    env.limit_stream(&env.events.stream, 128).await;
    let (status, body) = cp.push(env, "v2", json!([["b.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 503, "{body}");
    // Versions never go back: v1's content (version 3) is published again
    // as version 5, after the withdrawn version 4.
    assert_eq!(first["version"], 3, "{first}");
    let current = cp.current(env).await;
    assert_eq!(current["version"], 5, "{current}");
    assert_eq!(current["rollback_of"], 3, "{current}");
    assert_eq!(current["hash"], first["hash"]);
    assert_eq!(
        store.current().await.unwrap().unwrap().value.hash,
        first["hash"].as_str().unwrap()
    );
    // The history keeps everything (the stream refuses deletions): the
    // withdrawn versions 1 and 4 are superseded by the bundles that name
    // them as withdrawn, 2 and 5.
    assert_eq!(env.bundle_history().await, [1, 2, 3, 4, 5]);
    let history = store.history().await.unwrap();
    let withdraws: Vec<Option<u64>> = history.bundles.iter().map(|b| b.value.withdraws).collect();
    assert_eq!(withdraws, [None, Some(1), None, None, Some(4)]);

    env.limit_stream(&env.events.stream, -1).await;
    let (status, third) = cp.push(env, "v3", json!([["c.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{third}");
    eventually("the bundles to be projected", || async {
        bundle_rows(&db).await.len() >= 2
    })
    .await;
    env.wait_projected().await;
    let versions: Vec<String> = bundle_rows(&db).await.into_iter().map(|r| r.0).collect();
    assert_eq!(versions, ["3", "6"]);
    assert_eq!(env.events_of(EventType::PolicyBundlePublished).await, 2);
    cp.stop().await;
}

#[tokio::test]
async fn versions_only_go_forward_rollbacks_are_explicit_and_dry_runs_end() {
    Env::new("cppol").await.scope(versions_and_dry_run).await;
}

/// The last `PolicyBundlePublished` recorded.
async fn last_published(env: &Env) -> Value {
    let subject = env
        .events
        .subjects()
        .for_type(EventType::PolicyBundlePublished);
    let stream = env.js.get_stream(&env.events.stream).await.unwrap();
    let m = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    serde_json::from_slice::<Value>(&m.payload).unwrap()["data"]["payload"].clone()
}

async fn versions_and_dry_run(env: &Env) {
    let cp = env.start().await;
    let a = json!([["all.cedar", PERMIT_ALL]]);
    let b = json!([["b.cedar", PERMIT_ALL]]);
    // The client's "version" is only a label; the control plane numbers.
    let (status, first) = cp
        .post(
            env,
            "/api/v1/policies",
            &json!({ "version": "defaults-abc", "files": a }),
        )
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        (first["version"].clone(), first["label"].clone()),
        (json!(1), json!("defaults-abc"))
    );
    let (status, second) = cp.push(env, "b", b.clone()).await;
    assert_eq!(
        (status, second["version"].clone()),
        (201, json!(2)),
        "{second}"
    );

    // An earlier version's content pushed again is refused, and says how
    // to go back; the current content again changes nothing.
    let (status, body) = cp.push(env, "a-again", a.clone()).await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("version 1") && error.contains("rollback"),
        "{error}"
    );
    let (status, body) = cp.push(env, "b-again", b.clone()).await;
    assert_eq!(
        (status, body["unchanged"].clone()),
        (200, json!(true)),
        "{body}"
    );
    assert_eq!(cp.current(env).await["version"], 2);

    // A rollback publishes version 1's content as version 3, recorded so.
    let (status, back) = cp
        .post(env, "/api/v1/policies/rollback", &json!({ "version": 1 }))
        .await;
    assert_eq!(status, 201, "{back}");
    assert_eq!(back["version"], 3, "{back}");
    assert_eq!(back["rollback_of"], 1, "{back}");
    assert_eq!(back["hash"], first["hash"]);
    let event = last_published(env).await;
    assert_eq!(event["version"], "3", "{event}");
    assert_eq!(event["rollback_of"], 1, "{event}");
    assert_eq!(event["published_by"], "admin-1", "{event}");
    // Nothing to roll back to: the content in force, a version never seen.
    let (status, body) = cp
        .post(env, "/api/v1/policies/rollback", &json!({ "version": 1 }))
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = cp
        .post(env, "/api/v1/policies/rollback", &json!({ "version": 99 }))
        .await;
    assert_eq!(status, 404, "{body}");

    // A bundle published on the stream without the key (a permit-all
    // under a high version) is not in force and takes no version number.
    let forged = json!({
        "version": 100, "label": "forged", "hash": first["hash"], "files": a,
        "schema": gatehouse_policies::SCHEMA,
    });
    env.js
        .publish(
            format!("gatehouse.{}.bundle", env.policy().bundle_stream),
            serde_json::to_vec(&forged).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(cp.current(env).await["version"], 3);

    // Dry-run: its own request, named targets or all, at most a day.
    for bad in [
        json!({ "targets": [], "expires_in_secs": 60 }),
        json!({ "all_targets": true, "expires_in_secs": 90_000 }),
        json!({ "targets": ["app"], "expires_in_secs": 0 }),
    ] {
        let (status, body) = cp.post(env, "/api/v1/policies/dry-run", &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = cp
        .post(
            env,
            "/api/v1/policies",
            &json!({ "files": b, "dry_run": true }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("/api/v1/policies/dry-run"),
        "{body}"
    );
    let (status, dry) = cp
        .post(
            env,
            "/api/v1/policies/dry-run",
            &json!({ "targets": ["app"], "expires_in_secs": 3 }),
        )
        .await;
    assert_eq!(status, 201, "{dry}");
    assert_eq!(dry["version"], 4, "after the forged message too: {dry}");
    assert_eq!(dry["hash"], first["hash"], "the same policies");
    assert_eq!(dry["dry_run"]["targets"], json!(["app"]), "{dry}");
    let event = last_published(env).await;
    assert_eq!(event["dry_run"], true, "{event}");
    assert_eq!(event["dry_run_scope"]["targets"], json!(["app"]), "{event}");
    let ready = cp.readyz(env).await;
    assert_eq!(ready["policy"]["version"], 4, "{ready}");
    assert_eq!(ready["policy"]["dry_run"]["active"], true, "{ready}");
    // A push keeps a dry-run that has not ended.
    let (status, pushed) = cp.push(env, "c", json!([["c.cedar", PERMIT_ALL]])).await;
    assert_eq!(status, 201, "{pushed}");
    assert_eq!(pushed["dry_run"]["targets"], json!(["app"]), "{pushed}");
    // It ends by itself.
    eventually("the dry-run to end", || async {
        cp.readyz(env).await["policy"]["dry_run"]["active"] == false
    })
    .await;
    let (status, ended) = cp.delete(env, "/api/v1/policies/dry-run").await;
    assert_eq!(status, 201, "{ended}");
    assert_eq!(ended["dry_run"], Value::Null, "{ended}");
    assert_eq!(cp.readyz(env).await["policy"]["dry_run"], Value::Null);
    cp.stop().await;
}

#[tokio::test]
async fn revocations_are_recorded_only_when_in_force() {
    Env::new("cppol").await.scope(revocations).await;
}

async fn revocations(env: &Env) {
    let cp = env.start().await;
    let db = env.db().await;
    let store = env.store().await;
    let alice = Revoked::Subject("alice".into());
    let bob = Revoked::Subject("bob".into());
    let carol = Revoked::Token("carol-jti".into());

    // A normal revocation: in force and recorded once.
    let (status, body) = cp
        .post(
            env,
            "/api/v1/revocations",
            &json!({ "subject": "alice", "reason": "first" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(store.revoked().await.unwrap().contains(&alice));

    // An oversized reason: refused before anything is written.
    let (status, body) = cp
        .post(
            env,
            "/api/v1/revocations",
            &json!({ "subject": "bob", "reason": "x".repeat(1_500_000) }),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(body["size"].as_u64().unwrap() > 1_500_000, "{body}");
    assert!(!store.revoked().await.unwrap().contains(&bob));

    // The revocation stream refuses: nothing recorded.
    env.limit_stream(&env.policy().revocation_stream, 64).await;
    let (status, body) = cp
        .post(
            env,
            "/api/v1/revocations",
            &json!({ "token_id": "carol-jti" }),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    env.limit_stream(&env.policy().revocation_stream, -1).await;
    assert!(!store.revoked().await.unwrap().contains(&carol));

    // The event log refuses: the revocation is withdrawn; one that was in
    // force before (alice's) is kept as it was.
    env.limit_stream(&env.events.stream, 128).await;
    let (status, body) = cp
        .post(env, "/api/v1/revocations", &json!({ "subject": "bob" }))
        .await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = cp
        .post(
            env,
            "/api/v1/revocations",
            &json!({ "subject": "alice", "reason": "second" }),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    env.limit_stream(&env.events.stream, -1).await;
    let revoked = store.revoked().await.unwrap();
    assert!(!revoked.contains(&bob), "{revoked:?}");
    assert!(revoked.contains(&alice), "{revoked:?}");
    let stored = store.revocation_of(&alice).await.unwrap().unwrap();
    let stored: Value = serde_json::from_slice(&stored.value).unwrap();
    assert_eq!(stored["reason"], "first", "{stored}");

    // Afterwards, one more: projected after anything refused would be.
    let (status, body) = cp
        .post(env, "/api/v1/revocations", &json!({ "subject": "dave" }))
        .await;
    assert_eq!(status, 201, "{body}");
    eventually("the revocations to be projected", || async {
        revocation_rows(&db).await.len() >= 2
    })
    .await;
    env.wait_projected().await;
    assert_eq!(
        revocation_rows(&db).await,
        vec![
            ("subject".into(), "alice".into(), Some("first".into())),
            ("subject".into(), "dave".into(), None),
        ]
    );
    assert_eq!(env.events_of(EventType::IdentityRevoked).await, 2);
    let revoked = store.revoked().await.unwrap();
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    cp.stop().await;
}

async fn reinstatement_rows(db: &PgPool) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT kind, value, reinstated_by, reason FROM reinstatements ORDER BY time, event_id",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_reinstatement_is_recorded_with_its_reason_and_readmits_the_identity() {
    Env::new("cprein").await.scope(reinstatements).await;
}

async fn reinstatements(env: &Env) {
    let cp = env.start().await;
    let db = env.db().await;
    let store = env.store().await;
    let admin_2 = env.token("admin-2", &[ADMINS], &[]);
    let mallory = env.token("mallory", &[ADMINS, "auditors"], &[]);
    let eve = Revoked::Subject("eve".into());

    // Revoked: mallory's API calls are refused.
    let (status, body) = cp
        .post(
            env,
            "/api/v1/revocations",
            &json!({ "subject": "mallory", "reason": "laptop stolen" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp.get_as(env, &mallory, "/api/v1/sessions").await;
    assert_eq!(status, 401, "{body}");

    // A revoked admin cannot reinstate themselves: the revocation check
    // comes first.
    let (status, body) = cp
        .post_as(
            env,
            &mallory,
            "/api/v1/reinstatements",
            &json!({ "subject": "mallory", "reason": "it was me all along" }),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );

    // A reason is required; only admins may reinstate; nothing changes.
    for request in [
        json!({ "subject": "mallory" }),
        json!({ "subject": "mallory", "reason": " " }),
    ] {
        let (status, body) = cp
            .post_as(env, &admin_2, "/api/v1/reinstatements", &request)
            .await;
        assert_eq!(status, 400, "{request}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("reason is required"),
            "{body}"
        );
    }
    let auditor = env.token("auditor-1", &["auditors"], &[]);
    let (status, body) = cp
        .post_as(
            env,
            &auditor,
            "/api/v1/reinstatements",
            &json!({ "subject": "mallory", "reason": "please" }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = cp.get_as(env, &mallory, "/api/v1/sessions").await;
    assert_eq!(status, 401);

    // Reinstated by another admin: in force at once, recorded with the
    // reason, and mallory's next call is admitted.
    let (status, body) = cp
        .post_as(
            env,
            &admin_2,
            "/api/v1/reinstatements",
            &json!({ "subject": "mallory", "reason": "laptop found, keys rotated" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["reinstated"],
        json!({ "kind": "subject", "value": "mallory" })
    );
    assert!(store.revoked().await.unwrap().is_empty());
    let (status, body) = cp.get_as(env, &mallory, "/api/v1/sessions").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = cp.get_as(env, &mallory, "/api/v1/policies/current").await;
    assert_ne!(status, 401, "{body}");

    // Not revoked (never, or no longer): 404, nothing recorded.
    for request in [
        json!({ "subject": "nobody", "reason": "why not" }),
        json!({ "subject": "mallory", "reason": "again" }),
        json!({ "token_id": "some-jti", "reason": "why not" }),
    ] {
        let (status, body) = cp
            .post_as(env, &admin_2, "/api/v1/reinstatements", &request)
            .await;
        assert_eq!(status, 404, "{request}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("is not revoked"),
            "{body}"
        );
    }

    // Revoked again after a reinstatement: refused again.
    let (status, body) = cp
        .post(env, "/api/v1/revocations", &json!({ "subject": "mallory" }))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = cp.get_as(env, &mallory, "/api/v1/sessions").await;
    assert_eq!(status, 401);

    // An oversized reason: refused before anything is written.
    let (status, body) = cp
        .post(env, "/api/v1/revocations", &json!({ "subject": "eve" }))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .post_as(
            env,
            &admin_2,
            "/api/v1/reinstatements",
            &json!({ "subject": "eve", "reason": "x".repeat(1_500_000) }),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(store.revoked().await.unwrap().contains(&eve));

    // The event log refuses: the reinstatement is withdrawn, eve's
    // revocation is in force again, and nothing is recorded.
    env.limit_stream(&env.events.stream, 128).await;
    let (status, body) = cp
        .post_as(
            env,
            &admin_2,
            "/api/v1/reinstatements",
            &json!({ "subject": "eve", "reason": "back from leave" }),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    env.limit_stream(&env.events.stream, -1).await;
    assert!(store.revoked().await.unwrap().contains(&eve));
    assert!(store.is_revoked(&eve).await.unwrap());
    let eve_token = env.token("eve", &["auditors"], &[]);
    let (status, _) = cp.get_as(env, &eve_token, "/api/v1/sessions").await;
    assert_eq!(status, 401);

    env.wait_projected().await;
    assert_eq!(env.events_of(EventType::IdentityReinstated).await, 1);
    eventually("the reinstatement to be projected", || async {
        !reinstatement_rows(&db).await.is_empty()
    })
    .await;
    assert_eq!(
        reinstatement_rows(&db).await,
        vec![(
            "subject".into(),
            "mallory".into(),
            "admin-2".into(),
            "laptop found, keys rotated".into()
        )]
    );
    cp.stop().await;
}
