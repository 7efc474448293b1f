//! Token attacks through the worker with a real client (tokio-postgres over
//! verified TLS): every one is refused with a FATAL ErrorResponse whose
//! SQLSTATE is in class 28 and whose message is meant for a person, and every
//! one is recorded as an `AuthenticationFailed` event (checked in the
//! projected `authentication_failures` table of the audit database, which the
//! audit API does not expose).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_identity::DevIssuer;
use serde_json::{Value, json};
use support::Env;

/// Unix seconds now.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims `DevIssuer::mint` would put in a valid token for `sub`.
fn valid_claims(env: &Env, sub: &str) -> Value {
    json!({
        "iss": env.stack().issuer.issuer(),
        "sub": sub,
        "aud": "gatehouse",
        "iat": now(),
        "exp": now() + 3600,
        "jti": uuid::Uuid::new_v4().to_string(),
        "preferred_username": sub,
        "groups": [],
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWT from a header and claims, with `signature` appended as is.
fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

struct Refused {
    code: String,
    severity: String,
    message: String,
}

/// Connects with `token` as `user` over TLS and expects a refusal.
async fn refused(env: &Env, user: &str, token: &str) -> Refused {
    let err = match env.try_connect(user, token).await {
        Ok(_) => panic!("{user}: the worker accepted a bad token"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{user}: expected an ErrorResponse, got {err:?}"));
    Refused {
        code: db.code().code().to_string(),
        severity: db.severity().to_string(),
        message: db.message().to_string(),
    }
}

/// The message is a sentence for a person, and names nothing an attacker
/// could use: no key id, no issuer URL, no token, no library error text.
fn assert_readable(r: &Refused, secrets: &[&str]) {
    let m = &r.message;
    assert_eq!(r.severity, "FATAL", "{m}");
    assert!((10..200).contains(&m.len()), "{m:?}");
    assert!(m.contains(' '), "not a sentence: {m:?}");
    assert!(
        m.chars().all(|c| !c.is_control()),
        "control characters: {m:?}"
    );
    for word in [
        "kid",
        "jwks",
        "http://",
        "https://",
        "InvalidSignature",
        "{",
    ] {
        assert!(
            !m.to_lowercase().contains(&word.to_lowercase()),
            "{m:?} mentions {word}"
        );
    }
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(!m.contains(secret), "{m:?} leaks {secret:?}");
    }
}

struct Failure {
    reason: String,
    client_tls: bool,
    requested_target: Option<String>,
}

/// The projected `authentication_failures` rows of `user`, once there is at
/// least one (or after ~10 s, with none).
async fn failures(env: &Env, user: &str) -> Vec<Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<(String, bool, Option<String>)> = env
            .audit_query(
                "SELECT reason, client_tls, requested_target FROM authentication_failures
                 WHERE claimed_user = $1 ORDER BY time",
                &[user],
            )
            .await;
        if !rows.is_empty() || tokio::time::Instant::now() > deadline {
            return rows
                .into_iter()
                .map(|(reason, client_tls, requested_target)| Failure {
                    reason,
                    client_tls,
                    requested_target,
                })
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Exactly one failure of `user` was recorded, with `reason`, over TLS.
async fn assert_recorded(env: &Env, user: &str, reason: &str, tls: bool) {
    let found = failures(env, user).await;
    let reasons: Vec<&str> = found.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(reasons, [reason], "authentication failures of {user}");
    assert_eq!(found[0].client_tls, tls);
    assert_eq!(found[0].requested_target.as_deref(), Some("app"));
}

/// No session was opened for `user`.
async fn assert_no_session(env: &Env, user: &str) {
    let n = env
        .audit_count(
            "SELECT count(*) FROM sessions WHERE identity_username = $1",
            &[user],
        )
        .await;
    assert_eq!(n, 0, "a session was opened for {user}");
}

/// One refused token: SQLSTATE 28P01, a readable message, one recorded
/// failure with `reason`.
async fn check_token_refused(env: &Env, user: &str, token: &str, reason: &str) -> Refused {
    let kid = env.stack().issuer.kid();
    let r = refused(env, user, token).await;
    assert_eq!(r.code, "28P01", "{user}: {}", r.message);
    assert_readable(&r, &[&kid, token, env.stack().issuer.issuer()]);
    assert_recorded(env, user, reason, true).await;
    assert_no_session(env, user).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused() {
    let env = Env::start().await;
    let mut claims = valid_claims(&env, "exp-user");
    // Well past the 30 s leeway.
    claims["iat"] = json!(now() - 3600);
    claims["exp"] = json!(now() - 120);
    let token = env.stack().issuer.sign_claims(&claims);
    let r = check_token_refused(&env, "exp-user", &token, "token_expired").await;
    assert!(r.message.contains("expired"), "{}", r.message);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_not_yet_valid_is_refused() {
    let env = Env::start().await;
    let mut claims = valid_claims(&env, "nbf-user");
    claims["nbf"] = json!(now() + 600);
    let token = env.stack().issuer.sign_claims(&claims);
    let r = check_token_refused(&env, "nbf-user", &token, "token_not_yet_valid").await;
    assert!(r.message.contains("not valid yet"), "{}", r.message);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_issuer_and_wrong_audience_are_refused() {
    let env = Env::start().await;
    let mut claims = valid_claims(&env, "iss-user");
    claims["iss"] = json!("https://idp.attacker.example");
    let token = env.stack().issuer.sign_claims(&claims);
    let r = check_token_refused(&env, "iss-user", &token, "wrong_issuer").await;
    assert!(!r.message.contains("attacker"), "{}", r.message);

    let mut claims = valid_claims(&env, "aud-user");
    claims["aud"] = json!("some-other-service");
    let token = env.stack().issuer.sign_claims(&claims);
    let r = check_token_refused(&env, "aud-user", &token, "wrong_audience").await;
    assert!(!r.message.contains("some-other-service"), "{}", r.message);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_is_refused() {
    let env = Env::start().await;
    let claims = valid_claims(&env, "none-user");
    // With the issuer's real kid, so only the algorithm is wrong; empty
    // signature, as `alg: none` tokens have.
    let header = json!({ "alg": "none", "typ": "JWT", "kid": env.stack().issuer.kid() });
    let token = format!("{}.", unsigned(&header, &claims));
    check_token_refused(&env, "none-user", &token, "unsupported_algorithm").await;

    // Spelled differently, and without a kid.
    let claims = valid_claims(&env, "none-user-2");
    let token = format!("{}.", unsigned(&json!({ "alg": "None" }), &claims));
    check_token_refused(&env, "none-user-2", &token, "unsupported_algorithm").await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_signed_with_the_public_key_is_refused() {
    let env = Env::start().await;
    let issuer = &env.stack().issuer;
    let claims = valid_claims(&env, "hmac-user");
    // The classic key-confusion attack: the public key, which anyone can
    // fetch, used as the HMAC secret, under the real key's kid.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(issuer.kid());
    let secret = issuer.public_key_pem();
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    check_token_refused(&env, "hmac-user", &token, "unsupported_algorithm").await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_an_unknown_key_is_refused() {
    let env = Env::start().await;
    // Same issuer URL, same claims, but a key the issuer never published.
    let rogue = DevIssuer::generate(env.stack().issuer.issuer());
    assert_ne!(rogue.kid(), env.stack().issuer.kid());
    let token = rogue.sign_claims(&valid_claims(&env, "rogue-user"));
    let r = check_token_refused(&env, "rogue-user", &token, "unknown_key").await;
    assert!(!r.message.contains(&rogue.kid()), "{}", r.message);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_signature_or_claims_are_refused() {
    let env = Env::start().await;
    let token = env.token("tamper-user");
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
    assert_eq!(sig.len(), 64, "ES256 signature");
    sig[20] ^= 0x01;
    let tampered = format!("{signed}.{}", b64(&sig));
    check_token_refused(&env, "tamper-user", &tampered, "bad_signature").await;

    // The original signature over changed claims: a valid token of
    // tamper-user turned into one of tamper-admin.
    let mut parts = token.split('.');
    let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["sub"] = json!("tamper-admin");
    claims["preferred_username"] = json!("tamper-admin");
    let forged = format!(
        "{header}.{}.{signature}",
        b64(claims.to_string().as_bytes())
    );
    check_token_refused(&env, "tamper-admin", &forged, "bad_signature").await;

    // The untouched token still works.
    let db = env.connect("tamper-user").await;
    db.simple_query("SELECT 1").await.unwrap();
    drop(db);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_user_must_match_the_token_identity() {
    let env = Env::start().await;
    let token = env.token("mallory");
    let r = refused(&env, "alice", &token).await;
    assert_eq!(r.code, "28000", "{}", r.message);
    assert_readable(&r, &[&env.stack().issuer.kid(), &token]);
    assert!(r.message.contains("alice"), "{}", r.message);
    assert_recorded(&env, "alice", "user_mismatch", true).await;
    assert_no_session(&env, "alice").await;
    assert_no_session(&env, "mallory").await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_connection_is_refused_before_the_token_is_sent() {
    let env = Env::start().await;
    let token = env.token("plain-user");
    let mut config: tokio_postgres::Config = env
        .conninfo("plain-user", "app", "disable")
        .parse()
        .unwrap();
    config.password(token.as_str());
    let err = match config.connect(tokio_postgres::NoTls).await {
        Ok(_) => panic!("the worker accepted a plaintext connection"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
    let r = Refused {
        code: db.code().code().to_string(),
        severity: db.severity().to_string(),
        message: db.message().to_string(),
    };
    assert_eq!(r.code, "28000", "{}", r.message);
    assert!(r.message.contains("TLS"), "{}", r.message);
    assert_readable(&r, &[&token]);
    assert_recorded(&env, "plain-user", "tls_required", false).await;
    assert_no_session(&env, "plain-user").await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_rotated_key_are_accepted_after_a_jwks_refetch() {
    let env = Env::start().await;
    let issuer = &env.stack().issuer;
    let before = issuer.kid();
    let old_token = env.token("rot-user");
    let db = env.try_connect("rot-user", &old_token).await.unwrap();
    db.simple_query("SELECT 1").await.unwrap();
    drop(db);

    // The worker refetches the JWKS for an unknown kid at most once per
    // `jwks_refresh_min_interval_secs` (1 s in dev); the first connection
    // above fetched it, so let that interval pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    issuer.rotate();
    let after = issuer.kid();
    assert_ne!(before, after);
    let new_token = env.token("rot-user");
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(new_token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], json!(after));

    let db = env
        .try_connect("rot-user", &new_token)
        .await
        .expect("a token of the new key connects");
    db.simple_query("SELECT 1").await.unwrap();
    drop(db);
    // A token signed before the rotation stays valid until it expires: the
    // JWKS still serves the retired key.
    let db = env
        .try_connect("rot-user", &old_token)
        .await
        .expect("a token of the retired key still connects");
    db.simple_query("SELECT 1").await.unwrap();
    drop(db);

    // Three sessions opened; once they are projected, so is anything
    // recorded before them, and no attempt was refused.
    let count = async |table: &str, column: &str| -> i64 {
        env.audit_count(
            &format!("SELECT count(*) FROM {table} WHERE {column} = 'rot-user'"),
            &[],
        )
        .await
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count("sessions", "identity_username").await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions not projected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count("authentication_failures", "claimed_user").await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_the_api_is_not_a_database_password() {
    let env = Env::start().await;
    let token = env.stack().api_token("api-user", &["policy-admins"]);
    let r = refused(&env, "api-user", &token).await;
    assert_eq!(r.code, "28000", "{}", r.message);
    assert!(
        r.message
            .contains("for the Gatehouse API, not for database logins"),
        "{}",
        r.message
    );
    assert!(r.message.contains("--for worker"), "{}", r.message);
    assert_recorded(&env, "api-user", "token_for_other_plane", true).await;
    assert_no_session(&env, "api-user").await;
    // The same person's worker token logs in.
    env.connect("api-user").await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_name_belongs_to_one_subject() {
    let env = Env::start().await;
    let as_user = |sub: &str, user: &str| {
        let mut claims = valid_claims(&env, sub);
        claims["preferred_username"] = json!(user);
        env.stack().issuer.sign_claims(&claims)
    };
    // The first subject to log in as "dana" owns the name...
    env.try_connect("dana", &as_user("sub-dana", "dana"))
        .await
        .unwrap();
    // ...another subject presenting the same name (or a case variant) is
    // refused, and recorded.
    for user in ["dana", "DANA"] {
        let r = refused(&env, user, &as_user("sub-impostor", user)).await;
        assert_eq!(r.code, "28000", "{}", r.message);
        assert!(
            r.message
                .contains(&format!("user name \"{user}\" belongs to another identity")),
            "{}",
            r.message
        );
        assert_recorded(&env, user, "username_taken", true).await;
    }
    // The owner logs in again, also under another case of the name.
    env.try_connect("dana", &as_user("sub-dana", "dana"))
        .await
        .unwrap();
    env.try_connect("Dana", &as_user("sub-dana", "Dana"))
        .await
        .unwrap();

    // A name that only looks like another: Cyrillic "а" in "аdmin".
    env.try_connect("admin", &as_user("sub-admin", "admin"))
        .await
        .unwrap();
    let lookalike = "\u{430}dmin";
    let r = refused(&env, lookalike, &as_user("sub-mallory", lookalike)).await;
    assert_eq!(r.code, "28000", "{}", r.message);
    assert!(r.message.contains("printable ASCII"), "{}", r.message);
    assert_recorded(&env, lookalike, "username_refused", true).await;
    assert_no_session(&env, lookalike).await;
    env.cleanup().await;
}
