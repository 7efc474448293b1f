//! Verifies OIDC tokens against the issuer's JWKS, found by discovery and cached.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Actor, AuthError, Identity};

/// How tokens are checked. Lives under `oidc` in the gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifierConfig {
    /// Expected `iss`; discovery is fetched from `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// The token's `aud` must contain at least one of these.
    pub audiences: Vec<String>,
    /// Claim holding the login name; falls back to `sub` when absent.
    pub username_claim: String,
    /// Claim holding the groups (array of strings; absent means none).
    pub groups_claim: String,
    /// Signature algorithms accepted. Symmetric ones (HS*) and `none` are refused.
    pub algorithms: Vec<String>,
    /// Clock skew allowed for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Least time between JWKS refetches caused by an unknown `kid`, in seconds.
    pub jwks_refresh_min_interval_secs: u64,
    /// Allow an `http://` issuer (development and tests only).
    pub allow_http: bool,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: vec!["gatehouse".into()],
            username_claim: "preferred_username".into(),
            groups_claim: "groups".into(),
            algorithms: ["RS256", "ES256", "PS256", "EdDSA"]
                .map(String::from)
                .to_vec(),
            leeway_secs: 30,
            jwks_refresh_min_interval_secs: 30,
            allow_http: false,
        }
    }
}

impl VerifierConfig {
    /// Checks the config; the error names the field and says why.
    pub fn validate(&self) -> Result<(), String> {
        self.parsed_algorithms().map(|_| ())?;
        check_url("oidc.issuer", &self.issuer, self.allow_http)?;
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err("oidc.audiences: must list at least one non-empty audience".into());
        }
        if self.username_claim.is_empty() || self.groups_claim.is_empty() {
            return Err("oidc.username_claim / oidc.groups_claim: must not be empty".into());
        }
        Ok(())
    }

    fn parsed_algorithms(&self) -> Result<Vec<Algorithm>, String> {
        if self.algorithms.is_empty() {
            return Err("oidc.algorithms: must list at least one algorithm".into());
        }
        self.algorithms
            .iter()
            .map(|name| match Algorithm::from_str(name) {
                Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => Err(format!(
                    "oidc.algorithms: {name} is not allowed (shared-secret algorithms cannot be \
                     checked against a public JWKS)"
                )),
                Ok(alg) => Ok(alg),
                Err(_) => Err(format!(
                    "oidc.algorithms: {name} is not a supported algorithm"
                )),
            })
            .collect()
    }
}

fn check_url(field: &str, url: &str, allow_http: bool) -> Result<(), String> {
    if url.starts_with("https://") || (allow_http && url.starts_with("http://")) {
        Ok(())
    } else if url.starts_with("http://") {
        Err(format!(
            "{field}: {url} must use https (http is allowed only with allow_http)"
        ))
    } else {
        Err(format!("{field}: {url:?} must be an https:// URL"))
    }
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub identity: Identity,
    /// `exp`, in unix seconds.
    pub expires_at: i64,
    /// `jti`, when present.
    pub token_id: Option<String>,
}

/// Checks tokens from one issuer. Share it behind an `Arc`.
pub struct Verifier {
    config: VerifierConfig,
    algorithms: Vec<Algorithm>,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, (Jwk, DecodingKey)>>,
    /// Held while fetching, so concurrent misses share one fetch.
    refresh: tokio::sync::Mutex<RefreshState>,
}

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
}

impl Verifier {
    /// Checks the config and builds the HTTP client; does no network I/O.
    pub fn new(config: VerifierConfig) -> Result<Self, String> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("oidc: cannot build HTTP client: {e}"))?;
        Ok(Self {
            algorithms: config.parsed_algorithms()?,
            config,
            http,
            keys: RwLock::default(),
            refresh: tokio::sync::Mutex::default(),
        })
    }

    /// Clock skew allowed around `exp`/`nbf`; sessions enforce expiry with
    /// the same allowance.
    pub fn leeway_secs(&self) -> u64 {
        self.config.leeway_secs
    }

    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, AuthError> {
        let header = parse_header(token)?;
        let alg = Algorithm::from_str(&header.alg)
            .ok()
            .filter(|a| self.algorithms.contains(a))
            .ok_or(AuthError::UnsupportedAlgorithm)?;
        let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
        let (jwk, key) = match self.cached_key(kid) {
            Some(found) => found,
            None => self.refetch_key(kid).await?,
        };
        if !key_fits(&jwk, alg) {
            return Err(AuthError::UnsupportedAlgorithm);
        }

        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&self.config.audiences);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_secs;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| map_jwt_error(e.into_kind()))?
            .claims;
        self.identity(&claims)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<VerifiedToken, AuthError> {
        let string = |v: &Value| v.as_str().map(String::from);
        let claim = |name| claims.get(name).and_then(string);
        let subject = claim("sub").ok_or(AuthError::MissingClaim("sub"))?;
        let expires_at = claims.get("exp").and_then(Value::as_i64);
        let groups = match claims.get(&self.config.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(string)
                .collect::<Option<_>>()
                .ok_or(AuthError::MissingClaim("groups"))?,
            Some(_) => return Err(AuthError::MissingClaim("groups")),
        };
        let mut delegation = Vec::new();
        let mut act = claims.get("act");
        while let Some(a) = act {
            let subject = a.get("sub").and_then(string);
            let issuer = a.get("iss").and_then(string);
            delegation.push(Actor {
                subject: subject.ok_or(AuthError::MissingClaim("act"))?,
                issuer,
            });
            act = a.get("act");
        }
        Ok(VerifiedToken {
            identity: Identity {
                username: claim(&self.config.username_claim).unwrap_or_else(|| subject.clone()),
                issuer: self.config.issuer.clone(), // `iss` was checked equal to it
                subject,
                groups,
                delegation,
            },
            expires_at: expires_at.ok_or(AuthError::MissingClaim("exp"))?,
            token_id: claim("jti"),
        })
    }

    fn cached_key(&self, kid: &str) -> Option<(Jwk, DecodingKey)> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// The kid is not cached: refetch the JWKS unless that happened too recently.
    async fn refetch_key(&self, kid: &str) -> Result<(Jwk, DecodingKey), AuthError> {
        let mut state = self.refresh.lock().await;
        // Another verify may have refreshed while this one waited for the lock.
        if let Some(found) = self.cached_key(kid) {
            return Ok(found);
        }
        let min_interval = Duration::from_secs(self.config.jwks_refresh_min_interval_secs);
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < min_interval)
        {
            return Err(match &state.last_error {
                Some(e) => AuthError::IssuerUnavailable(e.clone()),
                None => AuthError::UnknownKey,
            });
        }
        state.last_attempt = Some(Instant::now());
        match self.fetch_jwks().await {
            Ok(keys) => {
                tracing::debug!(issuer = %self.config.issuer, keys = keys.len(), "JWKS refreshed");
                state.last_error = None;
                let found = keys.get(kid).cloned();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
                found.ok_or(AuthError::UnknownKey)
            }
            Err(e) => {
                tracing::warn!(issuer = %self.config.issuer, error = %e, "JWKS refresh failed");
                state.last_error = Some(e.clone());
                Err(AuthError::IssuerUnavailable(e))
            }
        }
    }

    async fn fetch_jwks(&self) -> Result<HashMap<String, (Jwk, DecodingKey)>, String> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let issuer = &self.config.issuer;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self.get_json(&url).await?;
        if discovery.issuer != *issuer {
            return Err(format!(
                "discovery at {url} names issuer {:?}",
                discovery.issuer
            ));
        }
        check_url("jwks_uri", &discovery.jwks_uri, self.config.allow_http)?;
        let jwks: Map<String, Value> = self.get_json(&discovery.jwks_uri).await?;
        let raw = jwks
            .get("keys")
            .and_then(Value::as_array)
            .map_or(&[][..], |k| k);
        // Keys this crate cannot use (no kid, other key types) are skipped, not fatal.
        let usable = raw.iter().filter_map(|raw| {
            let jwk: Jwk = serde_json::from_value(raw.clone()).ok()?;
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((jwk.common.key_id.clone()?, (jwk, key)))
        });
        Ok(usable.collect())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let get = async {
            self.http
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        };
        get.await.map_err(|e| format!("GET {url}: {e}"))
    }
}

/// Reads the header ourselves, so `alg: none` is named as such rather than a parse error.
fn parse_header(token: &str) -> Result<RawHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)
}

/// The JWK must be a signing key of the type the header's algorithm needs, and
/// name that algorithm if it names one (this stops HS256-with-the-public-key).
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    let named_ok = jwk
        .common
        .key_algorithm
        .is_none_or(|k| Algorithm::try_from(k).ok() == Some(alg));
    let use_ok = matches!(
        jwk.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    );
    let type_ok = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
        | (AlgorithmParameters::RSA(_), Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512) => {
            true
        }
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    };
    named_ok && use_ok && type_ok
}

fn map_jwt_error(kind: ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
            let known = ["exp", "nbf", "iss", "aud", "sub"]
                .into_iter()
                .find(|k| *k == c);
            AuthError::MissingClaim(known.unwrap_or("claims"))
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::UnsupportedAlgorithm
        }
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            AuthError::UnknownKey
        }
        _ => AuthError::Malformed,
    }
}
