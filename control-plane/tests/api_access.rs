//! Who the `/api/v1/*` routes admit, against the real NATS
//! (127.0.0.1:4222, JetStream) and PostgreSQL (postgres://postgres@127.0.0.1:5432,
//! trust auth): a revoked subject, token or delegating actor is refused by
//! every route; when revocations cannot be read the API answers 503; a
//! delegated token cannot administer Gatehouse; and bodies are read only
//! after the caller is admitted, their errors naming no internal type.
//! Each test has its own streams, consumer and audit database, removed at
//! the end even on failure.

mod support;

use std::panic::AssertUnwindSafe;

use base64::Engine as _;
use futures::FutureExt;
use serde_json::{Value, json};
use support::{ADMINS, Env, PERMIT_ALL, Running};

const AUDITORS: &str = "auditors";

impl Env {
    /// An administrator and auditor acting for itself.
    fn admin(&self, subject: &str) -> String {
        self.token(subject, &[ADMINS, AUDITORS], &[])
    }
}

/// The `jti` of a token minted by the development issuer.
fn jti(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["jti"].as_str().unwrap().to_string()
}

/// A request body: JSON, or raw bytes sent as `application/json`.
enum Body {
    Json(Value),
    Raw(&'static str),
}

impl Running {
    /// Sends a request (GET without a body, POST with one) and returns
    /// its status and JSON answer.
    async fn call(
        &self,
        env: &Env,
        token: Option<&str>,
        path: &str,
        body: Option<Body>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let mut req = match body {
            None => env.http.get(url),
            Some(Body::Json(v)) => env.http.post(url).json(&v),
            Some(Body::Raw(raw)) => env
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(raw),
        };
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn revoke(&self, env: &Env, by: &str, what: Value) {
        let (status, body) = self
            .call(env, Some(by), "/api/v1/revocations", Some(Body::Json(what)))
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Every `/api/v1` route with `token`: its path and status.
    async fn every_route(&self, env: &Env, token: &str) -> Vec<(&'static str, u16, Value)> {
        let mut out = Vec::new();
        for (path, body) in routes() {
            let (status, answer) = self.call(env, Some(token), path, body).await;
            out.push((path, status, answer));
        }
        out
    }
}

/// Every `/api/v1` route with a request it would carry out for an admin.
fn routes() -> Vec<(&'static str, Option<Body>)> {
    vec![
        (
            "/api/v1/policies",
            Some(Body::Json(json!({
                "version": "permit-all",
                "files": [["all.cedar", PERMIT_ALL]],
            }))),
        ),
        (
            "/api/v1/revocations",
            Some(Body::Json(
                json!({ "subject": "someone-else", "reason": "test" }),
            )),
        ),
        // After the revocation above, for a caller admitted to both.
        (
            "/api/v1/reinstatements",
            Some(Body::Json(
                json!({ "subject": "someone-else", "reason": "test" }),
            )),
        ),
        (
            "/api/v1/decisions/explain",
            Some(Body::Json(json!({
                "identity": { "subject": "alice", "groups": [] },
                "target": { "name": "db" },
                "sql": "SELECT 1",
            }))),
        ),
        ("/api/v1/policies/current", None),
        ("/api/v1/sessions", None),
        ("/api/v1/commands", None),
        ("/api/v1/quarantine", None),
    ]
}

/// Asserts every route refused `token` with `status`, its error containing
/// `says`, and that nothing was pushed or revoked by it.
async fn refused_everywhere(env: &Env, cp: &Running, token: &str, status: u16, says: &str) {
    for (path, got, answer) in cp.every_route(env, token).await {
        assert_eq!(got, status, "{path}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{path}: {answer}");
    }
    let store = env.store().await;
    let bundle = store.current_bundle().await.unwrap();
    assert!(
        bundle.as_ref().is_none_or(|b| b.label != "permit-all"),
        "a refused caller pushed a bundle"
    );
    let someone = gatehouse_policystore::Revoked::Subject("someone-else".into());
    assert!(
        store.revocation_of(&someone).await.unwrap().is_none(),
        "a refused caller revoked an identity"
    );
}

#[tokio::test]
async fn revoked_subjects_tokens_and_actors_are_refused_by_every_route() {
    Env::new("cpacc").await.scope(revoked_scenario).await;
}

async fn revoked_scenario(env: &Env) {
    let cp = env.start().await;
    let keeper = env.admin("admin-keeper");

    // Before any revocation, an admin may use every route (the explain
    // and current-bundle routes need a bundle: push a deny-nothing one).
    let (status, body) = cp
        .call(
            env,
            Some(&keeper),
            "/api/v1/policies",
            Some(Body::Json(json!({
                "version": "first",
                "files": [["none.cedar", "@id(\"x\") forbid (principal, action, resource) when { false };"]],
            }))),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Revoked by subject: every token of it is refused.
    let rogue = env.admin("admin-rogue");
    for path in ["/api/v1/sessions", "/api/v1/policies/current"] {
        let (status, body) = cp.call(env, Some(&rogue), path, None).await;
        assert_eq!(status, 200, "{path} before revocation: {body}");
    }
    cp.revoke(env, &keeper, json!({ "subject": "admin-rogue" }))
        .await;
    refused_everywhere(env, &cp, &rogue, 401, "revoked").await;
    refused_everywhere(env, &cp, &env.admin("admin-rogue"), 401, "revoked").await;

    // Revoked by token id: that token is refused, another of the same
    // subject is not.
    let lost = env.admin("admin-laptop");
    cp.revoke(env, &keeper, json!({ "token_id": jti(&lost) }))
        .await;
    refused_everywhere(env, &cp, &lost, 401, "revoked").await;
    let fresh = env.admin("admin-laptop");
    let (status, body) = cp.call(env, Some(&fresh), "/api/v1/sessions", None).await;
    assert_eq!(status, 200, "a new token of the subject: {body}");

    // A revoked identity anywhere in a delegation chain: refused as
    // revoked (401), not only as delegated (403).
    let via_agent = env.token("alice", &[ADMINS, AUDITORS], &["agent-7"]);
    let via_chain = env.token("bob", &[ADMINS, AUDITORS], &["agent-8", "broker-2"]);
    refused_everywhere(env, &cp, &via_agent, 403, "delegated").await;
    refused_everywhere(env, &cp, &via_chain, 403, "delegated").await;
    cp.revoke(env, &keeper, json!({ "subject": "agent-7" }))
        .await;
    cp.revoke(env, &keeper, json!({ "subject": "broker-2" }))
        .await;
    refused_everywhere(env, &cp, &via_agent, 401, "revoked").await;
    refused_everywhere(env, &cp, &via_chain, 401, "revoked").await;

    // The keeper was never revoked: every route admits it.
    for (path, status, body) in cp.every_route(env, &keeper).await {
        assert!(status == 200 || status == 201, "{path}: {status} {body}");
    }

    // When revocations cannot be read, nobody is admitted: 503, never 200.
    env.js
        .delete_stream(&env.policy().revocation_stream)
        .await
        .unwrap();
    for (path, status, body) in cp.every_route(env, &keeper).await {
        assert_eq!(status, 503, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("revocation"),
            "{path}: {body}"
        );
    }
    cp.stop().await;
}

#[tokio::test]
async fn delegated_tokens_cannot_administer_and_bodies_follow_authorization() {
    Env::new("cpacc")
        .await
        .scope(delegation_and_bodies_scenario)
        .await;
}

async fn delegation_and_bodies_scenario(env: &Env) {
    let cp = env.start().await;

    // An agent acting for a policy admin (and auditor) is refused on every
    // route, pushing a permit-all bundle included: the agent is the
    // principal, in none of the person's groups.
    let agent = env.token("admin-alice", &[ADMINS, AUDITORS], &["agent-x"]);
    refused_everywhere(
        env,
        &cp,
        &agent,
        403,
        "no policy permits Gatehouse::Agent::\"agent-x\"",
    )
    .await;
    let (_, body) = cp.call(env, Some(&agent), "/api/v1/sessions", None).await;
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the token is delegated (act)"),
        "{body}"
    );
    // The same person's own token may.
    let alice = env.admin("admin-alice");
    let (status, body) = cp.call(env, Some(&alice), "/api/v1/sessions", None).await;
    assert_eq!(status, 200, "{body}");

    // Bodies are read only after authorization: garbage from callers
    // without a token, with a bad token, or without the group is refused as
    // such, and the answer names no field.
    let auditor = env.token("auditor-1", &[AUDITORS], &[]);
    for path in [
        "/api/v1/policies",
        "/api/v1/revocations",
        "/api/v1/reinstatements",
        "/api/v1/decisions/explain",
    ] {
        for raw in ["{\"files\": nope", "42", "{}"] {
            for (token, status) in [
                (None, 401),
                (Some("not-a-token"), 401),
                (Some(agent.as_str()), 403),
            ] {
                let (got, body) = cp.call(env, token, path, Some(Body::Raw(raw))).await;
                assert_eq!(got, status, "{path} {raw:?} {token:?}: {body}");
                let error = body["error"].as_str().unwrap();
                for leak in ["files", "subject", "identity", "missing field", "expected"] {
                    assert!(!error.contains(leak), "{path} {raw:?}: {body}");
                }
            }
        }
    }
    for path in [
        "/api/v1/policies",
        "/api/v1/revocations",
        "/api/v1/reinstatements",
    ] {
        let (got, body) = cp
            .call(
                env,
                Some(&auditor),
                path,
                Some(Body::Raw("{\"files\": nope")),
            )
            .await;
        assert_eq!(got, 403, "{path}: {body}");
    }

    // An authorized caller's malformed body is a 400 whose message says
    // what is wrong without naming an internal type.
    let cases: &[(&str, &str, &str)] = &[
        ("/api/v1/policies", "{\"files\": nope", "not valid JSON"),
        ("/api/v1/policies", "42", "expected an object"),
        ("/api/v1/policies", "{\"files\": 3}", "invalid type"),
        ("/api/v1/policies", "{}", "missing field `files`"),
        (
            "/api/v1/policies",
            "{\"files\": [], \"x\": 1}",
            "unknown field `x`",
        ),
        ("/api/v1/revocations", "{\"subject\": 1}", "invalid type"),
        ("/api/v1/revocations", "[", "not valid JSON"),
        (
            "/api/v1/reinstatements",
            "{\"token_id\": []}",
            "invalid type",
        ),
        ("/api/v1/decisions/explain", "{}", "missing field"),
        ("/api/v1/decisions/explain", "\"sql\"", "expected an object"),
    ];
    for (path, raw, says) in cases {
        let (status, body) = cp.call(env, Some(&alice), path, Some(Body::Raw(raw))).await;
        assert_eq!(status, 400, "{path} {raw:?}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{path} {raw:?}: {body}");
        for leak in [
            "Request",
            "struct",
            "Explain",
            "Failed to deserialize",
            "target type",
        ] {
            assert!(!error.contains(leak), "{path} {raw:?}: {body}");
        }
    }
    // Not JSON at all: 415.
    let resp = env
        .http
        .post(format!("{}/api/v1/policies", cp.url))
        .bearer_auth(&alice)
        .body("files=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    // Nothing was pushed or revoked.
    assert!(env.store().await.current_bundle().await.unwrap().is_none());
    cp.stop().await;
}

#[tokio::test]
async fn api_permissions_are_cedar_decisions_on_the_current_bundle() {
    Env::new("cpcedar").await.scope(cedar_scenario).await;
}

/// Lets an agent acting for an admin explain and read the current bundle,
/// and nothing else; forbids revoking for everyone.
const AGENT_EXPLAINS: &str = r#"
@id("agents-for-admins-explain")
permit (
  principal is Gatehouse::Agent,
  action in [Gatehouse::Action::"api:explain", Gatehouse::Action::"api:read-policy"],
  resource
)
when { principal has acting_for && principal.acting_for in Gatehouse::Group::"policy-admins" };

@id("no-revoking")
@reason("revocations are frozen")
forbid (principal, action == Gatehouse::Action::"api:revoke", resource);

@id("base-connect")
permit (principal, action == Gatehouse::Action::"connect", resource);
"#;

async fn cedar_scenario(env: &Env) {
    let cp = env.start().await;
    let alice = env.admin("admin-alice");
    let agent = env.token("admin-alice", &[ADMINS, AUDITORS], &["agent-x"]);
    let explain = json!({
        "identity": { "subject": "bob", "groups": [] },
        "target": { "name": "db" },
        "sql": "SELECT 1",
    });

    // The admin pushes a bundle written for SQL that permits everything:
    // it grants no API action, so the agent still cannot explain.
    let (status, body) = cp
        .call(
            env,
            Some(&alice),
            "/api/v1/policies",
            Some(Body::Json(json!({ "files": [["all.cedar", PERMIT_ALL]] }))),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .call(
            env,
            Some(&agent),
            "/api/v1/decisions/explain",
            Some(Body::Json(explain.clone())),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let nobody = env.token("nobody", &[], &[]);
    let (status, _) = cp
        .call(env, Some(&nobody), "/api/v1/policies/current", None)
        .await;
    assert_eq!(status, 403);

    // A bundle that names the actions grants them, to the agent only.
    let (status, body) = cp
        .call(
            env,
            Some(&alice),
            "/api/v1/policies",
            Some(Body::Json(
                json!({ "files": [["api.cedar", AGENT_EXPLAINS]] }),
            )),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .call(
            env,
            Some(&agent),
            "/api/v1/decisions/explain",
            Some(Body::Json(explain.clone())),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = cp
        .call(env, Some(&agent), "/api/v1/policies/current", None)
        .await;
    assert_eq!(status, 200);
    for (path, body) in [
        ("/api/v1/sessions", None),
        (
            "/api/v1/policies",
            Some(Body::Json(json!({ "files": [["all.cedar", PERMIT_ALL]] }))),
        ),
    ] {
        let (status, answer) = cp.call(env, Some(&agent), path, body).await;
        assert_eq!(status, 403, "{path}: {answer}");
    }
    // An agent acting for someone who is not an admin gets nothing.
    let for_bob = env.token("bob", &[AUDITORS], &["agent-x"]);
    let (status, _) = cp
        .call(
            env,
            Some(&for_bob),
            "/api/v1/decisions/explain",
            Some(Body::Json(explain)),
        )
        .await;
    assert_eq!(status, 403);

    // The bundle's forbid binds the admin too...
    let (status, body) = cp
        .call(
            env,
            Some(&alice),
            "/api/v1/revocations",
            Some(Body::Json(json!({ "subject": "mallory" }))),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "revocations are frozen");
    // ...but cannot keep the admins from replacing the bundle.
    let replacement = format!("{PERMIT_ALL}\n// after the freeze");
    let (status, body) = cp
        .call(
            env,
            Some(&alice),
            "/api/v1/policies",
            Some(Body::Json(json!({ "files": [["all.cedar", replacement]] }))),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .call(
            env,
            Some(&alice),
            "/api/v1/revocations",
            Some(Body::Json(json!({ "subject": "mallory" }))),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    cp.stop().await;
}

#[tokio::test]
async fn a_token_for_database_logins_does_not_open_the_api() {
    Env::new("cpaud").await.scope(audience_scenario).await;
}

async fn audience_scenario(env: &Env) {
    let cp = env.start().await;
    // The same admin, with a token minted for the worker.
    let worker_token = env.issuer.mint(&gatehouse_identity::TokenRequest {
        subject: "admin-alice".into(),
        username: Some("admin-alice".into()),
        groups: vec![ADMINS.into(), AUDITORS.into()],
        audience: "gatehouse".into(),
        ttl: std::time::Duration::from_secs(300),
        actors: vec![],
    });
    refused_everywhere(env, &cp, &worker_token, 401, "not for the Gatehouse API").await;
    let (_, body) = cp
        .call(env, Some(&worker_token), "/api/v1/commands", None)
        .await;
    assert!(
        body["error"].as_str().unwrap().contains("--for api"),
        "{body}"
    );
    // The API token of the same person is accepted.
    let (status, body) = cp
        .call(
            env,
            Some(&env.admin("admin-alice")),
            "/api/v1/commands",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    cp.stop().await;
}

#[tokio::test]
async fn api_callers_go_by_the_user_names_workers_accept() {
    Env::new("cpacc").await.scope(user_names_scenario).await;
}

/// The API admits a caller only under a user name a worker would let it
/// log in with: printable ASCII, and not bound to another subject in the
/// user name registry. (Before, a token naming another subject's user
/// name, or a confusable of it, was admitted, and `principal.name` in an
/// API policy meant whatever the token said.)
async fn user_names_scenario(env: &Env) {
    use gatehouse_policystore::usernames;
    let cp = env.start().await;
    let token = |subject: &str, username: &str| {
        env.issuer.mint(&gatehouse_identity::TokenRequest {
            subject: subject.into(),
            username: Some(username.into()),
            groups: vec![AUDITORS.into()],
            audience: "gatehouse-api".into(),
            ttl: std::time::Duration::from_secs(300),
            actors: Vec::new(),
        })
    };
    let sessions = async |t: &str| cp.call(env, Some(t), "/api/v1/sessions", None).await;

    // No worker has bound a name yet: admitted as it is.
    let (status, body) = sessions(&token("sub-alice", "alice")).await;
    assert_eq!(status, 200, "{body}");

    // A worker binds "alice" to sub-alice at its first login.
    let stream = usernames::stream_for(&env.policy().revocation_stream);
    let prefix = usernames::prefix(&stream);
    env.js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            max_messages_per_subject: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let binding = usernames::Binding {
        user: "alice".into(),
        subject: "sub-alice".into(),
        at: 0,
    };
    env.js
        .publish(
            format!("{prefix}.{}", usernames::key("alice").unwrap()),
            serde_json::to_vec(&binding).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let result = async {
        // Its owner still is admitted; another subject under that name, or
        // a case variant of it, is not.
        let (status, body) = sessions(&token("sub-alice", "alice")).await;
        assert_eq!(status, 200, "{body}");
        for name in ["alice", "ALICE"] {
            let (status, body) = sessions(&token("sub-mallory", name)).await;
            assert_eq!(status, 401, "{name}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("belongs to another identity"),
                "{body}"
            );
        }
        // A confusable (Cyrillic а) or a control character: refused.
        for name in ["\u{430}lice", "ali\u{200b}ce", "alice\n"] {
            let (status, body) = sessions(&token("sub-mallory", name)).await;
            assert_eq!(status, 401, "{name:?}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("printable ASCII"),
                "{body}"
            );
        }
    };
    let outcome = AssertUnwindSafe(result).catch_unwind().await;
    let _ = env.js.delete_stream(&stream).await;
    cp.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
