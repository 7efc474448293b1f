//! The JWKS over time and what it may hold: scheduled refresh (Cache-Control
//! within bounds), a failing issuer, duplicate kids, weak keys; and the header
//! and lifetime checks. Each test serves its own issuer whose JWKS it changes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use gatehouse_identity::{AuthError, DevIssuer, Plane, TokenRequest, Verifier, VerifierConfig};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Throwaway keys made for these tests (`openssl genrsa -traditional`).
const RSA_1024: &str = include_str!("keys/rsa1024.pem");
const RSA_2048: &str = include_str!("keys/rsa2048.pem");

#[derive(Default)]
struct Served {
    keys: Vec<Value>,
    cache_control: Option<String>,
    /// Answer the JWKS with 503.
    fail: bool,
}

struct TestIssuer {
    url: String,
    served: Arc<Mutex<Served>>,
    fetches: Arc<AtomicUsize>,
}

impl TestIssuer {
    /// Serves discovery and a JWKS of `keys` at `/dev-issuer` on a free port.
    async fn start(keys: Vec<Value>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/dev-issuer", listener.local_addr().unwrap());
        let served = Arc::new(Mutex::new(Served {
            keys,
            ..Served::default()
        }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let discovery = json!({ "issuer": url, "jwks_uri": format!("{url}/jwks.json") });
        let (state, counter) = (served.clone(), fetches.clone());
        let app = Router::new()
            .route(
                "/dev-issuer/.well-known/openid-configuration",
                get(move || async move { Json(discovery) }),
            )
            .route(
                "/dev-issuer/jwks.json",
                get(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let served = state.lock().unwrap();
                    let response = if served.fail {
                        StatusCode::SERVICE_UNAVAILABLE.into_response()
                    } else {
                        let mut headers = HeaderMap::new();
                        if let Some(cc) = &served.cache_control {
                            headers.insert(CACHE_CONTROL, cc.parse().unwrap());
                        }
                        (headers, Json(json!({ "keys": served.keys }))).into_response()
                    };
                    async move { response }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            served,
            fetches,
        }
    }

    fn set(&self, change: impl FnOnce(&mut Served)) {
        change(&mut self.served.lock().unwrap());
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn verifier(&self, tune: impl FnOnce(&mut VerifierConfig)) -> Verifier {
        let mut config = VerifierConfig {
            issuer: self.url.clone(),
            allow_http: true,
            jwks_refresh_min_interval_secs: 0,
            ..VerifierConfig::default()
        };
        tune(&mut config);
        Verifier::new(config).unwrap()
    }

    fn claims(&self) -> Value {
        let now = now();
        json!({ "iss": self.url, "sub": "u-1", "aud": "gatehouse", "iat": now, "exp": now + 600 })
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn request() -> TokenRequest {
    TokenRequest {
        subject: "u-1".into(),
        username: None,
        groups: Vec::new(),
        audience: "gatehouse".into(),
        ttl: Duration::from_secs(600),
        actors: Vec::new(),
    }
}

/// An RSA signing key from a PEM and its public JWK under `kid`.
fn rsa_key(pem: &str, kid: &str) -> (EncodingKey, Value) {
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.into());
    (key, serde_json::to_value(jwk).unwrap())
}

fn sign_rs256(key: &EncodingKey, kid: &str, claims: &Value, crit: Option<Vec<String>>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    header.crit = crit;
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// The refusal's message for a person names no key id, URL or token.
fn assert_discreet(e: &AuthError, secrets: &[&str]) {
    let message = e.user_message();
    assert!(!message.contains("http"), "{message}");
    for secret in secrets {
        assert!(!message.contains(secret), "{message} names {secret}");
    }
}

async fn sleep_secs(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

#[tokio::test]
async fn removed_key_stops_verifying_within_max_age() {
    // A DevIssuer served as is: no Cache-Control, so the bound is jwks_max_age_secs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dev-issuer", listener.local_addr().unwrap());
    let issuer = DevIssuer::generate(&url);
    let app = Router::new().nest("/dev-issuer", issuer.router());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let verifier = Verifier::new(VerifierConfig {
        issuer: url,
        allow_http: true,
        // Unknown kids may not cause a refetch during this test: only the schedule can.
        jwks_refresh_min_interval_secs: 3600,
        jwks_max_age_secs: 1,
        ..VerifierConfig::default()
    })
    .unwrap();

    let old = issuer.mint(&request());
    issuer.rotate();
    let new = issuer.mint(&request());
    verifier.verify(&old, Plane::Worker).await.unwrap();
    verifier.verify(&new, Plane::Worker).await.unwrap();

    // The issuer stops publishing the old key; no token with an unknown kid arrives.
    issuer.drop_retired();
    verifier.verify(&old, Plane::Worker).await.unwrap(); // still within the JWKS's age
    sleep_secs(1.2).await;
    let e = verifier.verify(&old, Plane::Worker).await.unwrap_err();
    assert!(matches!(e, AuthError::UnknownKey), "{e:?}");
    verifier.verify(&new, Plane::Worker).await.unwrap();
}

#[tokio::test]
async fn cache_control_max_age_is_honoured_within_bounds() {
    let served = TestIssuer::start(Vec::new()).await;
    let issuer = DevIssuer::generate(&served.url);
    served.set(|s| {
        s.keys = vec![issuer.public_jwk()];
        s.cache_control = Some("public, max-age=1".into());
    });
    let token = issuer.mint(&request());

    // max-age=1 is shorter than the 15 min default bound: it wins.
    let verifier = served.verifier(|_| {});
    verifier.verify(&token, Plane::Worker).await.unwrap();
    verifier.verify(&token, Plane::Worker).await.unwrap();
    assert_eq!(served.fetches(), 1);
    served.set(|s| s.keys.clear());
    sleep_secs(1.2).await;
    let e = verifier.verify(&token, Plane::Worker).await.unwrap_err();
    assert!(matches!(e, AuthError::UnknownKey), "{e:?}");
    assert_eq!(served.fetches(), 2);

    // A max-age longer than jwks_max_age_secs is cut to it.
    served.set(|s| {
        s.keys = vec![issuer.public_jwk()];
        s.cache_control = Some("max-age=3600".into());
    });
    let verifier = served.verifier(|c| c.jwks_max_age_secs = 1);
    verifier.verify(&token, Plane::Worker).await.unwrap();
    served.set(|s| s.keys.clear());
    verifier.verify(&token, Plane::Worker).await.unwrap(); // cached
    sleep_secs(1.2).await;
    assert!(matches!(
        verifier.verify(&token, Plane::Worker).await,
        Err(AuthError::UnknownKey)
    ));

    // no-store does not make every verify fetch: the floor is the refetch interval.
    served.set(|s| {
        s.keys = vec![issuer.public_jwk()];
        s.cache_control = Some("no-store".into());
    });
    let verifier = served.verifier(|c| c.jwks_refresh_min_interval_secs = 30);
    let before = served.fetches();
    for _ in 0..3 {
        verifier.verify(&token, Plane::Worker).await.unwrap();
    }
    assert_eq!(served.fetches(), before + 1);
}

#[tokio::test]
async fn failed_refresh_keeps_last_good_set_until_the_stale_limit() {
    let served = TestIssuer::start(Vec::new()).await;
    let issuer = DevIssuer::generate(&served.url);
    served.set(|s| s.keys = vec![issuer.public_jwk()]);
    let token = issuer.mint(&request());
    let verifier = served.verifier(|c| {
        c.jwks_max_age_secs = 1;
        c.jwks_stale_limit_secs = 3;
    });
    verifier.verify(&token, Plane::Worker).await.unwrap();
    served.set(|s| s.fail = true);
    sleep_secs(1.2).await;
    // Due for a refresh, which fails: the last good set is still used.
    verifier.verify(&token, Plane::Worker).await.unwrap();
    assert_eq!(served.fetches(), 2);
    sleep_secs(2.0).await;
    // Past the stale limit: fail closed.
    let e = verifier.verify(&token, Plane::Worker).await.unwrap_err();
    assert!(matches!(e, AuthError::IssuerUnavailable(_)), "{e:?}");
    assert_eq!(e.reason(), "issuer_unavailable");
    served.set(|s| s.fail = false);
    verifier.verify(&token, Plane::Worker).await.unwrap();
}

#[tokio::test]
async fn duplicate_kids_are_ambiguous() {
    let served = TestIssuer::start(Vec::new()).await;
    let issuer = DevIssuer::generate(&served.url);
    let impostor = DevIssuer::generate(&served.url);
    let bystander = DevIssuer::generate(&served.url);
    let mut clash = impostor.public_jwk();
    clash["kid"] = json!(issuer.kid());
    served.set(|s| s.keys = vec![issuer.public_jwk(), clash, bystander.public_jwk()]);
    let verifier = served.verifier(|_| {});

    let e = verifier
        .verify(&issuer.mint(&request()), Plane::Worker)
        .await
        .unwrap_err();
    assert!(matches!(e, AuthError::AmbiguousKey), "{e:?}");
    assert_eq!(e.reason(), "ambiguous_key");
    assert_discreet(&e, &[&issuer.kid()]);
    // Whichever duplicate signed it.
    let forged = {
        let mut c = served.claims();
        c["sub"] = json!("admin");
        // The impostor's own kid is not published; give its token the clashing kid.
        let token = impostor.sign_claims(&c);
        let (_, rest) = token.split_once('.').unwrap();
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": issuer.kid() });
        use base64::Engine as _;
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string());
        format!("{header}.{rest}")
    };
    assert!(matches!(
        verifier.verify(&forged, Plane::Worker).await,
        Err(AuthError::AmbiguousKey)
    ));
    // Other keys of the same JWKS still verify.
    verifier
        .verify(&bystander.mint(&request()), Plane::Worker)
        .await
        .unwrap();
}

#[tokio::test]
async fn weak_keys_are_not_loaded() {
    let (weak, weak_jwk) = rsa_key(RSA_1024, "rsa-1024");
    let (strong, strong_jwk) = rsa_key(RSA_2048, "rsa-2048");
    // An EC key on P-521, which is not allowed (the point is not checked before the curve).
    let p521 = json!({
        "kty": "EC", "crv": "P-521", "kid": "ec-p521", "use": "sig",
        "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
        "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2",
    });
    let served = TestIssuer::start(vec![weak_jwk, strong_jwk, p521]).await;
    let verifier = served.verifier(|_| {});
    let claims = served.claims();

    verifier
        .verify(
            &sign_rs256(&strong, "rsa-2048", &claims, None),
            Plane::Worker,
        )
        .await
        .unwrap();
    let e = verifier
        .verify(&sign_rs256(&weak, "rsa-1024", &claims, None), Plane::Worker)
        .await
        .unwrap_err();
    assert!(matches!(e, AuthError::RefusedKey), "{e:?}");
    assert_eq!(e.reason(), "key_refused");
    assert_discreet(&e, &["rsa-1024"]);

    let part = |v: Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let on_p521 = format!(
        "{}.{}.AAAA",
        part(json!({"alg": "ES256", "kid": "ec-p521"})),
        part(claims)
    );
    let e = verifier.verify(&on_p521, Plane::Worker).await.unwrap_err();
    assert!(matches!(e, AuthError::RefusedKey), "{e:?}");
}

#[tokio::test]
async fn crit_header_is_refused() {
    let (key, jwk) = rsa_key(RSA_2048, "rsa-2048");
    let served = TestIssuer::start(vec![jwk]).await;
    let verifier = served.verifier(|_| {});
    let claims = served.claims();
    verifier
        .verify(&sign_rs256(&key, "rsa-2048", &claims, None), Plane::Worker)
        .await
        .unwrap();
    for crit in [
        vec!["exp".to_string()],
        vec!["urn:example:ext".into()],
        vec![],
    ] {
        let token = sign_rs256(&key, "rsa-2048", &claims, Some(crit));
        let e = verifier.verify(&token, Plane::Worker).await.unwrap_err();
        assert!(matches!(e, AuthError::CriticalExtension), "{e:?}");
        assert_eq!(e.reason(), "unsupported_critical_header");
        assert_discreet(&e, &["rsa-2048", &token]);
    }
}

#[tokio::test]
async fn issued_in_future_and_overlong_tokens_are_refused() {
    let served = TestIssuer::start(Vec::new()).await;
    let issuer = DevIssuer::generate(&served.url);
    served.set(|s| s.keys = vec![issuer.public_jwk()]);
    let verifier = served.verifier(|_| {});
    let now = now();
    let with = |changes: Value| {
        let mut c = served.claims();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        issuer.sign_claims(&c)
    };
    let refused = |token: String| {
        let verifier = &verifier;
        async move { verifier.verify(&token, Plane::Worker).await.unwrap_err() }
    };

    // iat in the future, beyond the 30 s leeway; within it is accepted.
    let e = refused(with(json!({"iat": now + 3600, "exp": now + 7200}))).await;
    assert!(matches!(e, AuthError::IssuedInFuture), "{e:?}");
    assert_eq!(e.reason(), "token_issued_in_future");
    assert_discreet(&e, &[&issuer.kid()]);
    verifier
        .verify(&with(json!({"iat": now + 10})), Plane::Worker)
        .await
        .unwrap();

    // exp a thousand years ahead, with and without iat.
    let millennium = now + 1000 * 365 * 86_400;
    for token in [
        with(json!({"exp": millennium})),
        with(json!({"exp": millennium, "iat": null})),
    ] {
        let e = refused(token).await;
        assert!(matches!(e, AuthError::LifetimeTooLong), "{e:?}");
        assert_eq!(e.reason(), "token_lifetime_too_long");
    }
    // Just over the 24 h default; just under it is fine.
    // iat is pinned to `now`: claims() reads the clock again, and a second
    // boundary between the two reads would shorten the lifetime to 86 400 s.
    let e = refused(with(json!({"iat": now, "exp": now + 86_401}))).await;
    assert!(matches!(e, AuthError::LifetimeTooLong), "{e:?}");
    verifier
        .verify(
            &with(json!({"iat": now, "exp": now + 86_399})),
            Plane::Worker,
        )
        .await
        .unwrap();
    // An old iat makes a long lifetime even when exp is near.
    let e = refused(with(json!({"iat": now - 2 * 86_400, "exp": now + 60}))).await;
    assert!(matches!(e, AuthError::LifetimeTooLong), "{e:?}");
    // A malformed iat.
    let e = refused(with(json!({"iat": "yesterday"}))).await;
    assert!(matches!(e, AuthError::MissingClaim("iat")), "{e:?}");

    // The maximum comes from the config.
    let short = served.verifier(|c| c.max_token_lifetime_secs = 300);
    let e = short
        .verify(&issuer.mint(&request()), Plane::Worker) // 600 s
        .await
        .unwrap_err();
    assert!(matches!(e, AuthError::LifetimeTooLong), "{e:?}");
}
