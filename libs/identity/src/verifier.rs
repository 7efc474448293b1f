//! Verifies OIDC tokens against the issuer's JWKS, found by discovery and cached.
//!
//! **Freshness of the keys.** A fetched JWKS is used for the `max-age` of its
//! `Cache-Control` header (less `Age`), bounded below by
//! `jwks_refresh_min_interval_secs` and above by `jwks_max_age_secs` (15 min by
//! default; the bound when the header is absent; it wins if the two conflict).
//! There is no background task: the first verify after that
//! fetches it again before checking the token, so a key the issuer removed stops
//! verifying within `jwks_max_age_secs` even if no token with an unknown `kid`
//! arrives. A token whose `kid` is not in a fresh set still causes a refetch, at
//! most once per `jwks_refresh_min_interval_secs`.
//!
//! **When a refresh fails** the last good set is kept (and the fetch retried at
//! most once per `jwks_refresh_min_interval_secs`) until `jwks_stale_limit_secs`
//! after it was fetched (1 h by default); past that the set is dropped and every
//! token is refused as `issuer_unavailable`: the verifier fails closed.
//!
//! **What is loaded.** A `kid` that appears more than once in one JWKS is
//! ambiguous: tokens naming it are refused (`ambiguous_key`) and one warning is
//! logged per refresh. RSA keys under 2048 bits, EC keys on curves other than
//! P-256 and P-384 and OKP keys other than Ed25519 are not loaded (logged;
//! tokens naming them are refused as `key_refused`).
//!
//! **Claims.** Besides signature, `iss`, `aud`, `exp`, `nbf` and `sub`: an
//! `iat` later than now (beyond the leeway) is refused, and so is a token valid
//! for longer than `max_token_lifetime_secs` (`exp - iat`, or `exp - now` when
//! `iat` is absent). A header with `crit` is refused: no extension is understood.

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
    /// Audiences of tokens for database logins (the worker): a token's `aud`
    /// must contain one of these, and none of `api_audiences`.
    pub worker_audiences: Vec<String>,
    /// Audiences of tokens for the control plane's HTTP API: a token's `aud`
    /// must contain one of these, and none of `worker_audiences`. The two
    /// lists must not share an audience, so a database password cannot
    /// administer Gatehouse and an API token cannot log in to a database.
    pub api_audiences: Vec<String>,
    /// Replaced by `worker_audiences` and `api_audiences`; a config that
    /// still sets it is refused, naming the fields to use.
    pub audiences: Option<Vec<String>>,
    /// Claim holding the login name; falls back to `sub` when absent.
    pub username_claim: String,
    /// Claim holding the groups (array of strings; absent means none).
    pub groups_claim: String,
    /// Signature algorithms accepted. Symmetric ones (HS*) and `none` are refused.
    pub algorithms: Vec<String>,
    /// Clock skew allowed for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Least time between JWKS refetches caused by an unknown `kid`, or retries
    /// of a failed refresh, in seconds; also the least time a JWKS is used.
    pub jwks_refresh_min_interval_secs: u64,
    /// Longest a fetched JWKS is used before it is fetched again, in seconds; a
    /// shorter `Cache-Control: max-age` from the issuer wins. A key removed from
    /// the issuer stops verifying within this time.
    pub jwks_max_age_secs: u64,
    /// When refreshes fail, the last good JWKS is used until this long after it
    /// was fetched, in seconds; after that tokens are refused (issuer unavailable).
    pub jwks_stale_limit_secs: u64,
    /// Longest validity accepted: `exp - iat` (or `exp - now` without `iat`), in seconds.
    pub max_token_lifetime_secs: u64,
    /// Allow an `http://` issuer (development and tests only).
    pub allow_http: bool,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            worker_audiences: vec!["gatehouse".into()],
            api_audiences: vec!["gatehouse-api".into()],
            audiences: None,
            username_claim: "preferred_username".into(),
            groups_claim: "groups".into(),
            algorithms: ["RS256", "ES256", "PS256", "EdDSA"]
                .map(String::from)
                .to_vec(),
            leeway_secs: 30,
            jwks_refresh_min_interval_secs: 30,
            jwks_max_age_secs: 900,
            jwks_stale_limit_secs: 3600,
            max_token_lifetime_secs: 86_400,
            allow_http: false,
        }
    }
}

impl VerifierConfig {
    /// Checks the config; the error names the field and says why.
    pub fn validate(&self) -> Result<(), String> {
        self.parsed_algorithms().map(|_| ())?;
        check_url("oidc.issuer", &self.issuer, self.allow_http)?;
        if self.audiences.is_some() {
            return Err(
                "oidc.audiences: replaced by oidc.worker_audiences (tokens for database \
                 logins) and oidc.api_audiences (tokens for the HTTP API), which must not \
                 share an audience; e.g. worker_audiences = [\"gatehouse\"], \
                 api_audiences = [\"gatehouse-api\"]"
                    .into(),
            );
        }
        for (field, list) in [
            ("worker_audiences", &self.worker_audiences),
            ("api_audiences", &self.api_audiences),
        ] {
            if list.is_empty() || list.iter().any(String::is_empty) {
                return Err(format!(
                    "oidc.{field}: must list at least one non-empty audience"
                ));
            }
        }
        if let Some(both) = self
            .worker_audiences
            .iter()
            .find(|a| self.api_audiences.contains(a))
        {
            return Err(format!(
                "oidc.api_audiences: {both:?} is also in oidc.worker_audiences; a token for \
                 database logins must not open the API, nor the reverse"
            ));
        }
        if self.username_claim.is_empty() || self.groups_claim.is_empty() {
            return Err("oidc.username_claim / oidc.groups_claim: must not be empty".into());
        }
        if self.jwks_max_age_secs == 0 {
            return Err("oidc.jwks_max_age_secs: must be at least 1".into());
        }
        if self.max_token_lifetime_secs == 0 {
            return Err("oidc.max_token_lifetime_secs: must be at least 1".into());
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

/// Where a token is used: each plane takes only tokens whose audience is
/// its own (`oidc.worker_audiences`, `oidc.api_audiences`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Database logins at a worker (the token is the password).
    Worker,
    /// The control plane's HTTP API (the token is a bearer token).
    Api,
}

impl Plane {
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Worker => "worker",
            Plane::Api => "api",
        }
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
    keys: RwLock<Option<KeySet>>,
    /// Held while fetching, so concurrent misses share one fetch.
    refresh: tokio::sync::Mutex<RefreshState>,
}

/// The last good JWKS and when it must be fetched again.
struct KeySet {
    keys: HashMap<String, KeyEntry>,
    /// Next fetch: the end of its age, or a retry after a failed refresh.
    refresh_at: Instant,
    /// Hard limit: past it the set is not used even if refreshing fails.
    usable_until: Instant,
}

#[derive(Clone)]
enum KeyEntry {
    Usable(Box<(Jwk, DecodingKey)>),
    /// The kid appears more than once in the JWKS.
    Ambiguous,
    /// A key too weak, or on a curve not allowed; not loaded.
    Refused,
}

enum Lookup {
    Found(KeyEntry),
    /// The set is fresh but does not have the kid.
    Missing,
    /// No set, or it is due for a refresh.
    Stale,
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
    /// Any value refuses the token: no extension is understood.
    crit: Option<Value>,
}

/// A fetched JWKS and how long the issuer says it may be cached.
struct Fetched {
    keys: HashMap<String, KeyEntry>,
    max_age: Option<Duration>,
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

    /// Verifies `token` for use on `plane`: every check, and an audience of
    /// that plane's and of no other. A token of the other plane is refused
    /// as [`AuthError::WrongPlane`].
    pub async fn verify(&self, token: &str, plane: Plane) -> Result<VerifiedToken, AuthError> {
        let header = parse_header(token)?;
        if header.crit.is_some() {
            return Err(AuthError::CriticalExtension);
        }
        let alg = Algorithm::from_str(&header.alg)
            .ok()
            .filter(|a| self.algorithms.contains(a))
            .ok_or(AuthError::UnsupportedAlgorithm)?;
        let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
        let (jwk, key) = self.key(kid).await?;
        if !key_fits(&jwk, alg) {
            return Err(AuthError::UnsupportedAlgorithm);
        }

        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.config.issuer]);
        let all: Vec<&String> = self
            .config
            .worker_audiences
            .iter()
            .chain(&self.config.api_audiences)
            .collect();
        validation.set_audience(&all);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_secs;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| map_jwt_error(e.into_kind()))?
            .claims;
        self.check_times(&claims)?;
        self.check_plane(&claims, plane)?;
        self.identity(&claims)
    }

    /// The token's `aud` names `plane`'s audiences only (the signature
    /// check already found one of either plane's).
    fn check_plane(&self, claims: &Map<String, Value>, plane: Plane) -> Result<(), AuthError> {
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => return Err(AuthError::MissingClaim("aud")),
        };
        let (own, other) = match plane {
            Plane::Worker => (&self.config.worker_audiences, &self.config.api_audiences),
            Plane::Api => (&self.config.api_audiences, &self.config.worker_audiences),
        };
        if audiences.iter().any(|a| other.iter().any(|o| o == a)) {
            return Err(AuthError::WrongPlane(plane));
        }
        if !audiences.iter().any(|a| own.iter().any(|o| o == a)) {
            return Err(AuthError::WrongAudience);
        }
        Ok(())
    }

    /// `iat` not in the future, and a lifetime within the configured maximum.
    fn check_times(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        let now = chrono::Utc::now().timestamp();
        let leeway = i64::try_from(self.config.leeway_secs).unwrap_or(i64::MAX);
        let max_lifetime = i64::try_from(self.config.max_token_lifetime_secs).unwrap_or(i64::MAX);
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or(AuthError::MissingClaim("exp"))?;
        let lifetime = match claims.get("iat") {
            None => exp.saturating_sub(now).saturating_sub(leeway),
            Some(iat) => {
                let iat = iat.as_i64().ok_or(AuthError::MissingClaim("iat"))?;
                if iat > now.saturating_add(leeway) {
                    return Err(AuthError::IssuedInFuture);
                }
                exp.saturating_sub(iat)
            }
        };
        if lifetime > max_lifetime {
            return Err(AuthError::LifetimeTooLong);
        }
        Ok(())
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

    /// The key for `kid` from a fresh JWKS, fetching the JWKS when it is due
    /// (its age is over) or when it lacks the kid (rate-limited).
    async fn key(&self, kid: &str) -> Result<(Jwk, DecodingKey), AuthError> {
        if let Lookup::Found(entry) = self.lookup(kid, Instant::now()) {
            return usable(entry);
        }
        let mut state = self.refresh.lock().await;
        let now = Instant::now();
        let min_interval = secs(self.config.jwks_refresh_min_interval_secs);
        let recently = state
            .last_attempt
            .is_some_and(|t| now.duration_since(t) < min_interval);
        // Another verify may have refreshed while this one waited for the lock.
        match self.lookup(kid, now) {
            Lookup::Found(entry) => return usable(entry),
            Lookup::Missing if recently => return Err(AuthError::UnknownKey),
            Lookup::Stale if recently && self.read_keys().is_none() => {
                let detail = state.last_error.clone();
                return Err(AuthError::IssuerUnavailable(
                    detail.unwrap_or_else(|| "no JWKS fetched yet".into()),
                ));
            }
            Lookup::Missing | Lookup::Stale => {}
        }
        state.last_attempt = Some(now);
        let fetched = self.fetch_jwks().await;
        let now = Instant::now();
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        match fetched {
            Ok(fetched) => {
                state.last_error = None;
                let ceiling = secs(self.config.jwks_max_age_secs);
                let age = fetched
                    .max_age
                    .unwrap_or(ceiling)
                    .max(min_interval)
                    .min(ceiling);
                let stale_limit = secs(self.config.jwks_stale_limit_secs).max(age);
                tracing::debug!(
                    issuer = %self.config.issuer,
                    keys = fetched.keys.len(),
                    age_secs = age.as_secs(),
                    "JWKS refreshed"
                );
                let found = fetched.keys.get(kid).cloned();
                *keys = Some(KeySet {
                    keys: fetched.keys,
                    refresh_at: now + age,
                    usable_until: now + stale_limit,
                });
                found.map_or(Err(AuthError::UnknownKey), usable)
            }
            Err(e) => {
                state.last_error = Some(e.clone());
                match keys.as_mut() {
                    Some(set) if now < set.usable_until => {
                        tracing::warn!(
                            issuer = %self.config.issuer,
                            error = %e,
                            usable_for_secs = (set.usable_until - now).as_secs(),
                            "JWKS refresh failed; the last good key set is still used"
                        );
                        let retry = min_interval.min(secs(self.config.jwks_max_age_secs));
                        set.refresh_at = now + retry;
                        match set.keys.get(kid) {
                            Some(entry) => usable(entry.clone()),
                            None => Err(AuthError::IssuerUnavailable(e)),
                        }
                    }
                    _ => {
                        tracing::warn!(
                            issuer = %self.config.issuer,
                            error = %e,
                            "JWKS refresh failed and no usable key set remains; tokens are refused"
                        );
                        *keys = None;
                        Err(AuthError::IssuerUnavailable(e))
                    }
                }
            }
        }
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, Option<KeySet>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, kid: &str, now: Instant) -> Lookup {
        match self.read_keys().as_ref() {
            Some(set) if now < set.refresh_at && now < set.usable_until => set
                .keys
                .get(kid)
                .cloned()
                .map_or(Lookup::Missing, Lookup::Found),
            _ => Lookup::Stale,
        }
    }

    async fn fetch_jwks(&self) -> Result<Fetched, String> {
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
        let discovery: Discovery = self.get_json(&url).await?.0;
        if discovery.issuer != *issuer {
            return Err(format!(
                "discovery at {url} names issuer {:?}",
                discovery.issuer
            ));
        }
        check_url("jwks_uri", &discovery.jwks_uri, self.config.allow_http)?;
        let (jwks, max_age): (Map<String, Value>, _) = self.get_json(&discovery.jwks_uri).await?;
        let raw = jwks
            .get("keys")
            .and_then(Value::as_array)
            .map_or(&[][..], |k| k);
        Ok(Fetched {
            keys: self.load_keys(raw),
            max_age,
        })
    }

    /// Loads the JWKS's keys by kid. Keys this crate cannot use (no kid, other
    /// key types) are skipped, not fatal; weak ones are marked refused; a kid
    /// that appears more than once is marked ambiguous, whatever its keys.
    fn load_keys(&self, raw: &[Value]) -> HashMap<String, KeyEntry> {
        let mut keys = HashMap::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for raw in raw {
            let Some(kid) = raw.get("kid").and_then(Value::as_str) else {
                continue;
            };
            *seen.entry(kid).or_default() += 1;
            match load_key(raw) {
                Ok(pair) => {
                    keys.insert(kid.to_string(), KeyEntry::Usable(Box::new(pair)));
                }
                Err(Some(why)) => {
                    tracing::warn!(issuer = %self.config.issuer, kid, why, "JWKS key not loaded");
                    keys.insert(kid.to_string(), KeyEntry::Refused);
                }
                Err(None) => {}
            }
        }
        let mut duplicates: Vec<&str> = seen
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(kid, _)| kid)
            .collect();
        if !duplicates.is_empty() {
            duplicates.sort_unstable();
            tracing::warn!(
                issuer = %self.config.issuer,
                kids = ?duplicates,
                "JWKS names these key ids more than once; tokens naming them are refused"
            );
            for kid in duplicates {
                keys.insert(kid.to_string(), KeyEntry::Ambiguous);
            }
        }
        keys
    }

    /// GETs `url` as JSON, with the `Cache-Control` max-age of the response.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<(T, Option<Duration>), String> {
        let get = async {
            let response = self.http.get(url).send().await?.error_for_status()?;
            let max_age = cache_max_age(response.headers());
            Ok::<_, reqwest::Error>((response.json().await?, max_age))
        };
        get.await.map_err(|e| format!("GET {url}: {e}"))
    }
}

/// Seconds as a duration, capped at ten years so that adding it to an
/// `Instant` cannot overflow.
fn secs(n: u64) -> Duration {
    Duration::from_secs(n.min(10 * 365 * 86_400))
}

fn usable(entry: KeyEntry) -> Result<(Jwk, DecodingKey), AuthError> {
    match entry {
        KeyEntry::Usable(pair) => Ok(*pair),
        KeyEntry::Ambiguous => Err(AuthError::AmbiguousKey),
        KeyEntry::Refused => Err(AuthError::RefusedKey),
    }
}

/// One JWK as a key; `Err(Some(why))` for a key refused as too weak or on a
/// curve not allowed, `Err(None)` for one this crate cannot read.
fn load_key(raw: &Value) -> Result<(Jwk, DecodingKey), Option<String>> {
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|_| None)?;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let bits = rsa_modulus_bits(&p.n).ok_or(None)?;
            if bits < MIN_RSA_BITS {
                return Err(Some(format!(
                    "RSA key of {bits} bits (at least {MIN_RSA_BITS} are required)"
                )));
            }
        }
        AlgorithmParameters::EllipticCurve(p)
            if !matches!(p.curve, EllipticCurve::P256 | EllipticCurve::P384) =>
        {
            return Err(Some(format!(
                "EC key on curve {:?} (P-256 and P-384 are allowed)",
                p.curve
            )));
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve != EllipticCurve::Ed25519 => {
            return Err(Some(format!(
                "OKP key on curve {:?} (Ed25519 is allowed)",
                p.curve
            )));
        }
        // Keys on allowed curves; shared-secret keys load too, and are refused
        // by `key_fits` for every algorithm.
        _ => {}
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| None)?;
    Ok((jwk, key))
}

const MIN_RSA_BITS: usize = 2048;

/// The bit length of a base64url big-endian RSA modulus.
fn rsa_modulus_bits(n: &str) -> Option<usize> {
    let bytes = URL_SAFE_NO_PAD.decode(n.trim_end_matches('=')).ok()?;
    let first = bytes.iter().position(|b| *b != 0)?;
    let leading = bytes[first].leading_zeros() as usize;
    Some((bytes.len() - first) * 8 - leading)
}

/// How long a response may be cached: `Cache-Control` max-age less `Age`;
/// zero for `no-store`/`no-cache`; `None` when it says neither.
fn cache_max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    let mut max_age = None;
    for directive in value.split(',').map(|d| d.trim().to_ascii_lowercase()) {
        if directive == "no-store" || directive == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(n) = directive.strip_prefix("max-age=") {
            max_age = n.trim_matches('"').parse::<u64>().ok();
        }
    }
    let age = headers
        .get(reqwest::header::AGE)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    max_age.map(|m| Duration::from_secs(m.saturating_sub(age)))
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
            let known = ["exp", "nbf", "iat", "iss", "aud", "sub"]
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
