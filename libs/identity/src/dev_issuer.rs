//! A development OIDC issuer: discovery, a JWKS and ES256 token minting.
//! For `gatehouse dev`, `gatehouse token` and tests; never a production IdP.

use std::io::{self, Write as _};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};

const KEY_FILE: &str = "dev-issuer-key.pem";

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub subject: String,
    pub username: Option<String>,
    pub groups: Vec<String>,
    pub audience: String,
    pub ttl: Duration,
    /// Delegation chain, current actor first; becomes the nested RFC 8693 `act` claim.
    pub actors: Vec<String>,
}

/// A development issuer. Clones share keys, so `rotate` shows in every router.
#[derive(Clone)]
pub struct DevIssuer {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    keys: RwLock<Keys>,
}

struct Keys {
    current: SigningKey,
    /// Public keys rotated out, still served so their tokens keep verifying.
    retired: Vec<Jwk>,
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
    public_pem: String,
}

impl SigningKey {
    fn new(pair: &KeyPair) -> Self {
        let encoding = EncodingKey::from_ec_der(pair.serialized_der());
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)
            .expect("a P-256 key converts to a JWK");
        let thumbprint = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .expect("EC keys have a thumbprint");
        let kid = thumbprint[..16].to_string();
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Self {
            kid,
            encoding,
            jwk,
            public_pem: pair.public_key_pem(),
        }
    }

    fn generate() -> Self {
        Self::new(&KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key generation"))
    }
}

impl DevIssuer {
    fn with_key(issuer_url: &str, current: SigningKey) -> Self {
        let keys = RwLock::new(Keys {
            current,
            retired: Vec::new(),
        });
        Self {
            inner: Arc::new(Inner {
                issuer: issuer_url.into(),
                keys,
            }),
        }
    }

    /// An issuer with a fresh in-memory ES256 (P-256) key.
    pub fn generate(issuer_url: &str) -> Self {
        Self::with_key(issuer_url, SigningKey::generate())
    }

    /// An issuer whose key lives in `data_dir/dev-issuer-key.pem` (created with
    /// mode 0600 on first use), so its `kid` and tokens survive restarts.
    /// `rotate` does not rewrite the file.
    pub fn load_or_create(data_dir: &Path, issuer_url: &str) -> io::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        let invalid = |e: String| io::Error::other(format!("{}: {e}", path.display()));
        let pair = match std::fs::read_to_string(&path) {
            Ok(pem) => {
                let pair = KeyPair::from_pem(&pem).map_err(|e| invalid(e.to_string()))?;
                if pair.algorithm() != &PKCS_ECDSA_P256_SHA256 {
                    return Err(invalid("not a P-256 (ES256) key".into()));
                }
                pair
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| invalid(e.to_string()))?;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                options
                    .open(&path)?
                    .write_all(pair.serialize_pem().as_bytes())?;
                pair
            }
            Err(e) => return Err(e),
        };
        Ok(Self::with_key(issuer_url, SigningKey::new(&pair)))
    }

    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The `kid` of the current signing key.
    pub fn kid(&self) -> String {
        self.keys().current.kid.clone()
    }

    /// Serves `/.well-known/openid-configuration` and `/jwks.json`; nest it at the issuer URL's path.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks.json", get(jwks))
            .with_state(self.inner.clone())
    }

    /// Mints a signed token for `req`.
    pub fn mint(&self, req: &TokenRequest) -> String {
        let now = chrono::Utc::now().timestamp();
        let ttl = i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let mut claims = json!({
            "iss": self.inner.issuer,
            "sub": req.subject,
            "aud": req.audience,
            "iat": now,
            "exp": now.saturating_add(ttl),
            "jti": uuid::Uuid::new_v4().to_string(),
            "groups": req.groups,
        });
        if let Some(username) = &req.username {
            claims["preferred_username"] = json!(username);
        }
        let act = req.actors.iter().rev().fold(None, |inner, actor| {
            let mut act = json!({ "sub": actor });
            if let Some(inner) = inner {
                act["act"] = inner;
            }
            Some(act)
        });
        if let Some(act) = act {
            claims["act"] = act;
        }
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims with the current key (tests build attack tokens with it).
    pub fn sign_claims(&self, claims: &Value) -> String {
        let keys = self.keys();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(keys.current.kid.clone());
        jsonwebtoken::encode(&header, claims, &keys.current.encoding).expect("ES256 signing")
    }

    /// Switches to a new signing key; the JWKS keeps serving the old public key too.
    pub fn rotate(&self) {
        let next = SigningKey::generate();
        let mut keys = self.inner.keys.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut keys.current, next);
        keys.retired.push(old.jwk);
        tracing::info!(issuer = %self.inner.issuer, kid = %keys.current.kid, "dev issuer key rotated");
    }

    /// Stops serving the public keys rotated out: their tokens stop verifying
    /// once verifiers refresh the JWKS.
    pub fn drop_retired(&self) {
        let mut keys = self.inner.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.retired.clear();
    }

    /// The current public key as a JWK (with its `kid`), as the JWKS serves it.
    pub fn public_jwk(&self) -> Value {
        serde_json::to_value(&self.keys().current.jwk).expect("a JWK serializes")
    }

    /// SPKI PEM of the current public key.
    pub fn public_key_pem(&self) -> String {
        self.keys().current.public_pem.clone()
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.inner.keys.read().unwrap_or_else(|e| e.into_inner())
    }
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let issuer = inner.issuer.trim_end_matches('/');
    Json(json!({
        "issuer": inner.issuer,
        "jwks_uri": format!("{issuer}/jwks.json"),
        // Required by OIDC discovery; this issuer mints tokens only via `gatehouse token`.
        "authorization_endpoint": format!("{issuer}/authorize"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti", "preferred_username", "groups", "act"],
    }))
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let keys = inner.keys.read().unwrap_or_else(|e| e.into_inner());
    let all: Vec<&Jwk> = std::iter::once(&keys.current.jwk)
        .chain(&keys.retired)
        .collect();
    Json(json!({ "keys": all }))
}

/// Parses a token lifetime: a positive number with a unit, as in "90s", "15m", "1h", "2d".
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let err =
        || format!("invalid duration {s:?}: use a number and a unit, like 90s, 15m, 1h or 2d");
    let unit = match s.chars().last().ok_or_else(err)? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(err()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| err())?;
    match n.checked_mul(unit) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(err()),
    }
}
