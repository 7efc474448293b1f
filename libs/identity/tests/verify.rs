//! Verifier against a live DevIssuer: the good path, each attack, rotation and rate limiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{Next, from_fn};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_identity::{
    Actor, AuthError, DevIssuer, Plane, TokenRequest, Verifier, VerifierConfig, parse_ttl,
};
use serde_json::{Value, json};

struct Fixture {
    issuer: DevIssuer,
    verifier: Verifier,
    jwks_fetches: Arc<AtomicUsize>,
}

/// Serves a DevIssuer nested at `/dev-issuer` on a free port, counting JWKS fetches.
async fn fixture(refresh_interval_secs: u64) -> Fixture {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = DevIssuer::generate(&format!(
        "http://{}/dev-issuer",
        listener.local_addr().unwrap()
    ));
    let jwks_fetches = Arc::new(AtomicUsize::new(0));
    let counter = jwks_fetches.clone();
    let app = Router::new()
        .nest("/dev-issuer", issuer.router())
        .layer(from_fn(move |req: Request, next: Next| {
            if req.uri().path().ends_with("/jwks.json") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            next.run(req)
        }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let verifier = Verifier::new(config(issuer.issuer(), refresh_interval_secs)).unwrap();
    Fixture {
        issuer,
        verifier,
        jwks_fetches,
    }
}

fn config(issuer: &str, refresh_interval_secs: u64) -> VerifierConfig {
    VerifierConfig {
        issuer: issuer.into(),
        allow_http: true,
        jwks_refresh_min_interval_secs: refresh_interval_secs,
        ..VerifierConfig::default()
    }
}

fn request() -> TokenRequest {
    TokenRequest {
        subject: "u-123".into(),
        username: Some("alice".into()),
        groups: vec!["dba".into(), "oncall".into()],
        audience: "gatehouse".into(),
        ttl: Duration::from_secs(600),
        actors: vec!["agent-x".into(), "orchestrator".into()],
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(issuer: &DevIssuer) -> Value {
    json!({ "iss": issuer.issuer(), "sub": "u-123", "aud": "gatehouse", "exp": now() + 600 })
}

/// Verifies `token`, asserts it is refused with an error matching the pattern, returns the error.
macro_rules! refused {
    ($f:expr, $token:expr, $expected:pat) => {{ refused!($f, $token, Plane::Worker, $expected) }};
    ($f:expr, $token:expr, $plane:expr, $expected:pat) => {{
        let e = $f
            .verifier
            .verify(&$token, $plane)
            .await
            .expect_err("must be refused");
        assert!(matches!(e, $expected), "{e:?}");
        e
    }};
}

#[tokio::test]
async fn good_token_gives_identity() {
    let f = fixture(0).await;
    let token = f
        .verifier
        .verify(&f.issuer.mint(&request()), Plane::Worker)
        .await
        .unwrap();
    let id = &token.identity;
    assert_eq!(
        [&id.issuer, &id.subject, &id.username],
        [f.issuer.issuer(), "u-123", "alice"]
    );
    assert_eq!(id.groups, ["dba", "oncall"]);
    let actor = |s: &str| Actor {
        subject: s.into(),
        issuer: None,
    };
    assert_eq!(id.delegation, [actor("agent-x"), actor("orchestrator")]);
    assert!((token.expires_at - now() - 600).abs() <= 5);
    assert!(token.token_id.is_some());

    // No username claim: fall back to `sub`; audience may be an array.
    let mut c = claims(&f.issuer);
    c["aud"] = json!(["other", "gatehouse"]);
    let id = f
        .verifier
        .verify(&f.issuer.sign_claims(&c), Plane::Worker)
        .await
        .unwrap()
        .identity;
    assert_eq!(id.username, "u-123");
    assert!(id.groups.is_empty() && id.delegation.is_empty());
    // The JWKS is cached between verifies.
    assert_eq!(f.jwks_fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn attacks_are_refused() {
    let f = fixture(0).await;
    let iss = &f.issuer;
    let with = |key: &str, value: Value| {
        let mut c = claims(iss);
        c[key] = value;
        iss.sign_claims(&c)
    };

    let e = refused!(f, with("exp", json!(now() - 3600)), AuthError::Expired);
    assert_eq!(
        e.user_message(),
        "the token has expired; get a new one and reconnect"
    );
    refused!(f, with("nbf", json!(now() + 3600)), AuthError::NotYetValid);
    refused!(
        f,
        with("iss", json!("https://evil.example")),
        AuthError::WrongIssuer
    );
    let other_aud = TokenRequest {
        audience: "other".into(),
        ..request()
    };
    let e = refused!(f, iss.mint(&other_aud), AuthError::WrongAudience);
    assert_eq!(e.user_message(), "the token was not accepted");
    let mut no_sub = claims(iss);
    no_sub.as_object_mut().unwrap().remove("sub");
    let e = refused!(f, iss.sign_claims(&no_sub), AuthError::MissingClaim("sub"));
    assert_eq!(e.reason(), "missing_claim");

    // alg none with an empty signature.
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!("{}.{}.", part(json!({"alg": "none"})), part(claims(iss)));
    refused!(f, none, AuthError::UnsupportedAlgorithm);

    // HS256 keyed with the issuer's public key.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(iss.kid());
    let secret = jsonwebtoken::EncodingKey::from_secret(iss.public_key_pem().as_bytes());
    let hs = jsonwebtoken::encode(&header, &claims(iss), &secret).unwrap();
    refused!(f, hs, AuthError::UnsupportedAlgorithm);

    // A header algorithm that does not fit the key's type (RS256 against an EC key).
    let rs = format!(
        "{}.{}.AAAA",
        part(json!({"alg": "RS256", "kid": iss.kid()})),
        part(claims(iss))
    );
    refused!(f, rs, AuthError::UnsupportedAlgorithm);

    // Tampered payload: change one character in the middle of it.
    let mut parts: Vec<String> = iss.mint(&request()).split('.').map(String::from).collect();
    let mid = parts[1].len() / 2;
    let flipped = if &parts[1][mid..=mid] == "A" {
        "B"
    } else {
        "A"
    };
    parts[1].replace_range(mid..=mid, flipped);
    refused!(f, parts.join("."), AuthError::BadSignature);

    let e = refused!(f, "not-a-jwt", AuthError::Malformed);
    assert_eq!(
        e.user_message(),
        "the password must be an OIDC token (a JWT)"
    );
}

#[tokio::test]
async fn unknown_kid_is_refused() {
    let f = fixture(0).await;
    let impostor = DevIssuer::generate(f.issuer.issuer());
    refused!(f, impostor.mint(&request()), AuthError::UnknownKey);
}

#[test]
fn shareable_across_tasks() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let issuer = DevIssuer::generate("https://idp.example");
    let verifier = Verifier::new(config(issuer.issuer(), 0)).unwrap();
    send_sync(&issuer);
    send_sync(&verifier);
    send(&verifier.verify("token", Plane::Worker)); // usable from tokio::spawn and axum handlers
}

#[tokio::test]
async fn rotation_refetches_and_keeps_old_keys() {
    let f = fixture(0).await;
    let old = f.issuer.mint(&request());
    f.verifier.verify(&old, Plane::Worker).await.unwrap();
    let old_kid = f.issuer.kid();
    f.issuer.rotate();
    assert_ne!(f.issuer.kid(), old_kid);
    let new = f.issuer.mint(&request());
    f.verifier.verify(&new, Plane::Worker).await.unwrap();
    f.verifier.verify(&old, Plane::Worker).await.unwrap();
    assert_eq!(f.jwks_fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unknown_kid_refetch_is_rate_limited() {
    let f = fixture(3600).await;
    let impostor = DevIssuer::generate(f.issuer.issuer());
    let (a, b) = (impostor.mint(&request()), impostor.mint(&request()));
    let (ra, rb) = tokio::join!(
        f.verifier.verify(&a, Plane::Worker),
        f.verifier.verify(&b, Plane::Worker)
    );
    assert!(matches!(ra, Err(AuthError::UnknownKey)) && matches!(rb, Err(AuthError::UnknownKey)));
    refused!(f, a, AuthError::UnknownKey);
    assert_eq!(f.jwks_fetches.load(Ordering::SeqCst), 1);
    // Known keys still verify without another fetch.
    f.verifier
        .verify(&f.issuer.mint(&request()), Plane::Worker)
        .await
        .unwrap();
    assert_eq!(f.jwks_fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unreachable_issuer_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dev-issuer", listener.local_addr().unwrap());
    drop(listener);
    let verifier = Verifier::new(config(&url, 0)).unwrap();
    let e = verifier
        .verify(&DevIssuer::generate(&url).mint(&request()), Plane::Worker)
        .await
        .unwrap_err();
    assert!(matches!(e, AuthError::IssuerUnavailable(_)), "{e:?}");
    assert_eq!(e.reason(), "issuer_unavailable");
}

#[test]
fn config_validation_names_the_field() {
    let base = config("https://idp.example", 30);
    assert!(base.validate().is_ok());
    let error = |c: VerifierConfig| c.validate().unwrap_err();
    let algorithms = |a: &[&str]| VerifierConfig {
        algorithms: a.iter().map(|s| s.to_string()).collect(),
        ..base.clone()
    };
    assert!(
        error(algorithms(&["RS256", "HS256"])).starts_with("oidc.algorithms: HS256 is not allowed")
    );
    assert!(error(algorithms(&["none"])).starts_with("oidc.algorithms: none"));
    let http = VerifierConfig {
        issuer: "http://idp.example".into(),
        ..base
    };
    assert!(
        error(VerifierConfig {
            allow_http: false,
            ..http
        })
        .starts_with("oidc.issuer")
    );
    let parsed: VerifierConfig = serde_json::from_value(json!({"issuer": "https://x"})).unwrap();
    assert_eq!(
        (
            parsed.worker_audiences,
            parsed.api_audiences,
            parsed.leeway_secs
        ),
        (vec!["gatehouse".into()], vec!["gatehouse-api".into()], 30)
    );
    // The single list of audiences is gone: both planes took its tokens.
    let legacy: VerifierConfig =
        serde_json::from_value(json!({"issuer": "https://x", "audiences": ["gatehouse"]})).unwrap();
    assert!(error(legacy).starts_with("oidc.audiences: replaced by oidc.worker_audiences"),);
    let shared = VerifierConfig {
        api_audiences: vec!["gatehouse".into(), "ops".into()],
        ..config("https://idp.example", 30)
    };
    assert!(error(shared).starts_with("oidc.api_audiences: \"gatehouse\" is also in"));
    assert_eq!(
        (
            parsed.jwks_max_age_secs,
            parsed.jwks_stale_limit_secs,
            parsed.max_token_lifetime_secs
        ),
        (900, 3600, 86_400)
    );
    assert!(serde_json::from_value::<VerifierConfig>(json!({"isuer": "x"})).is_err());
    let zero_age = VerifierConfig {
        jwks_max_age_secs: 0,
        ..config("https://idp.example", 30)
    };
    assert!(error(zero_age).starts_with("oidc.jwks_max_age_secs"));
    let zero_lifetime = VerifierConfig {
        max_token_lifetime_secs: 0,
        ..config("https://idp.example", 30)
    };
    assert!(error(zero_lifetime).starts_with("oidc.max_token_lifetime_secs"));
}

#[test]
fn dev_issuer_key_persists() {
    let dir = std::env::temp_dir().join(format!("gatehouse-identity-{}", uuid::Uuid::new_v4()));
    let a = DevIssuer::load_or_create(&dir, "http://127.0.0.1:1/dev-issuer").unwrap();
    let b = DevIssuer::load_or_create(&dir, "http://127.0.0.1:1/dev-issuer").unwrap();
    assert_eq!(a.kid(), b.kid());
    assert_eq!(a.public_key_pem(), b.public_key_pem());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("dev-issuer-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ttl_parsing() {
    assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
    assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
    for bad in [
        "",
        "10",
        "0s",
        "-1h",
        "1w",
        "h",
        "1.5h",
        "99999999999999999d",
    ] {
        assert!(parse_ttl(bad).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn each_plane_takes_only_its_own_audience() {
    let f = fixture(30).await;
    let with_aud = |aud: Value| {
        let mut c = claims(&f.issuer);
        c["aud"] = aud;
        f.issuer.sign_claims(&c)
    };
    let worker = with_aud(json!("gatehouse"));
    let api = with_aud(json!("gatehouse-api"));
    f.verifier.verify(&worker, Plane::Worker).await.unwrap();
    f.verifier.verify(&api, Plane::Api).await.unwrap();

    // The other plane's token: refused, saying which token to get.
    let e = refused!(
        f,
        worker.clone(),
        Plane::Api,
        AuthError::WrongPlane(Plane::Api)
    );
    assert_eq!(e.reason(), "token_for_other_plane");
    assert!(
        e.user_message().contains("--for api"),
        "{}",
        e.user_message()
    );
    let e = refused!(
        f,
        api.clone(),
        Plane::Worker,
        AuthError::WrongPlane(Plane::Worker)
    );
    assert!(e.user_message().contains("not for database logins"));

    // A token for both planes opens neither.
    let both = with_aud(json!(["gatehouse", "gatehouse-api"]));
    for plane in [Plane::Worker, Plane::Api] {
        refused!(f, both.clone(), plane, AuthError::WrongPlane(_));
    }
    // An audience of neither plane is the wrong audience, as before.
    refused!(
        f,
        with_aud(json!("elsewhere")),
        Plane::Api,
        AuthError::WrongAudience
    );
    // One of a plane's audiences among others of no plane is accepted.
    let mixed = with_aud(json!(["elsewhere", "gatehouse-api"]));
    f.verifier.verify(&mixed, Plane::Api).await.unwrap();
}
