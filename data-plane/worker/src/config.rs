use std::collections::BTreeMap;
use std::path::PathBuf;

use gatehouse_identity::VerifierConfig;
use serde::Deserialize;

/// `[worker]`: the data-plane worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address the Postgres front end listens on.
    pub listen: String,
    /// Name of this worker in events; defaults to `<hostname>-<random>`.
    pub id: Option<String>,
    /// TLS certificate chain (PEM) presented to clients.
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) for `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Accept clients without TLS. Tokens then cross the network in the
    /// clear: only for loopback experiments.
    pub allow_plaintext: bool,
    /// NATS subject on which workers forward cancel requests for sessions
    /// they do not hold themselves.
    pub cancel_subject: String,
    /// Largest protocol message accepted from a client, in bytes. A larger
    /// one ends the session (`54000`) on its header, before its body is
    /// read. (A target's messages may be as large as PostgreSQL's own
    /// limit, 1 GiB.)
    pub max_message_bytes: usize,
    /// Longest statement text a client may send (a `Query`, or a `Parse`'s
    /// text): longer ones are refused with `54000` before they are parsed.
    /// Its record must also fit the event log's `max_payload` (1 MiB by
    /// default).
    pub max_statement_bytes: usize,
    /// On shutdown, how long open sessions may go on before they are ended
    /// (with `57P01` and a `SessionClosed` event saying `worker_shutdown`).
    pub drain_timeout_secs: u64,
    /// Let a session go on after its token expires. Off by default: the
    /// first command after expiry ends the session (`FATAL 28000`). When
    /// on, `max_session_lifetime_secs` bounds how long it may go on.
    pub sessions_outlive_tokens: bool,
    /// With `sessions_outlive_tokens`, a session that outlives its token
    /// ends (`FATAL 28000`) at its first command once this long has passed
    /// since it opened. Production mode requires it with
    /// `sessions_outlive_tokens` (or the `sessions-outlive-tokens` switch).
    pub max_session_lifetime_secs: Option<u64>,
    /// Environment variable holding the key (at least 32 bytes) that
    /// authenticates cancel requests forwarded between workers; every
    /// worker needs the same one. Without a key (here or in
    /// `cancel_key_file`), a worker neither forwards cancel requests for
    /// sessions it does not hold nor acts on forwarded ones.
    pub cancel_key_env: Option<String>,
    /// File holding that key (trailing newline ignored).
    pub cancel_key_file: Option<PathBuf>,
    /// The resolved cancel key; filled at start.
    #[serde(skip)]
    pub cancel_key: Option<CancelKey>,
    /// Bytes of prepared statements and portals one session may hold (their
    /// texts and bound parameters, as the worker keeps them to decide and
    /// record what runs). A `Parse`, `Bind` or `PREPARE` past it is refused
    /// with `54000`.
    pub max_session_prepared_bytes: usize,
    /// How long a client has, from connecting, to finish the TLS
    /// handshake, send its startup message and its token. A connection
    /// still in its handshake then is closed.
    pub startup_timeout_secs: u64,
    /// Client connections open at once, in their handshake or in a
    /// session. Past it, new connections are refused with `53300`.
    pub max_connections: usize,
    /// Client connections open at once from one source address.
    pub max_connections_per_address: usize,
    /// Failed logins one source address may cost per minute (a bucket that
    /// refills continuously). Past it, the address's login attempts are
    /// refused before their token is checked, and not recorded one by one.
    pub auth_failures_per_minute: u32,
    /// Address of the worker's Prometheus endpoint (`GET /metrics`); off
    /// when unset.
    pub metrics_listen: Option<String>,
    /// Targets by name; a client names one as its `database`.
    pub targets: BTreeMap<String, TargetConfig>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:15432".into(),
            id: None,
            tls_cert_file: None,
            tls_key_file: None,
            allow_plaintext: false,
            cancel_subject: "gatehouse.cancel".into(),
            max_message_bytes: 64 << 20,
            max_statement_bytes: 1 << 20,
            drain_timeout_secs: 30,
            sessions_outlive_tokens: false,
            max_session_lifetime_secs: None,
            cancel_key_env: None,
            cancel_key_file: None,
            cancel_key: None,
            max_session_prepared_bytes: 64 << 20,
            startup_timeout_secs: 10,
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            auth_failures_per_minute: 30,
            metrics_listen: None,
            targets: BTreeMap::new(),
        }
    }
}

/// The shared key that authenticates forwarded cancel requests. Never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct CancelKey(pub Vec<u8>);

impl std::fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CancelKey(<redacted>)")
    }
}

/// How the worker secures its connection to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TargetTls {
    /// TLS with certificate chain and host name verified (libpq's
    /// `verify-full`).
    #[default]
    VerifyFull,
    /// TLS without verifying the certificate: encrypted, but open to a
    /// man in the middle.
    Require,
    /// No TLS.
    Disable,
}

/// How a target may ask the worker to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetAuth {
    /// No authentication (`trust`): the target lets the worker in at once.
    None,
    /// A cleartext password.
    Password,
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// Channel binding of the worker's SCRAM login to a target: proof, inside
/// the password exchange, that the TLS connection ends at the server that
/// knows the password (no man in the middle can relay it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelBinding {
    /// Used whenever the target offers it over TLS; over TLS without it,
    /// the worker tells the server it could have (so a server that does
    /// offer it, behind someone who removed the offer, refuses the login).
    #[default]
    Prefer,
    /// The login must be SCRAM with channel binding; anything else
    /// (another method, no TLS, no offer) is refused.
    Require,
    /// Never used.
    Disable,
}

/// `[worker.targets.NAME]`: one PostgreSQL target.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Database on the target server.
    pub database: String,
    /// Role the worker logs in as. Clients never learn its credentials.
    pub user: String,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: TargetTls,
    /// CA bundle (PEM) for `verify-full`; the system roots when absent.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The authentication methods the target may ask for (like libpq's
    /// `require_auth`); any other is refused. Unset: any of them, except
    /// that a password (cleartext or MD5) is sent only to a target whose
    /// certificate is verified.
    #[serde(default)]
    pub auth_methods: Option<Vec<TargetAuth>>,
    /// Whether a SCRAM login is bound to the TLS connection
    /// (`SCRAM-SHA-256-PLUS`, like libpq's `channel_binding`).
    #[serde(default)]
    pub channel_binding: ChannelBinding,
    /// Environment policies see (`resource.environment`), e.g. `prod`.
    #[serde(default)]
    pub environment: String,
    /// Tags policies see (`resource.tags`), e.g. `["prod", "pii"]`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// How responses are masked for those no `unmask` permit applies to;
    /// not masked when absent (`gatehouse dev` masks with every detector).
    #[serde(default)]
    pub masking: Option<crate::masking::MaskingConfig>,
    /// Resolved password; filled at start from `password_env`/`password_file`.
    #[serde(skip)]
    pub password: Option<String>,
    /// `masking`, checked and with its key; filled at start.
    #[serde(skip)]
    pub masker: Option<std::sync::Arc<crate::masking::TargetMasking>>,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("tls", &self.tls)
            .field("masking", &self.masking)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn default_pg_port() -> u16 {
    5432
}

impl TargetConfig {
    /// Reads the password from its env var or file. Errors name the field.
    pub fn resolve_password(&mut self, field: &str) -> Result<(), String> {
        if self.password.is_some() {
            return Ok(());
        }
        if let Some(var) = &self.password_env {
            let value = std::env::var(var).map_err(|_| {
                format!("{field}.password_env: environment variable {var} is not set")
            })?;
            self.password = Some(value);
        } else if let Some(path) = &self.password_file {
            let value = std::fs::read_to_string(path).map_err(|e| {
                format!("{field}.password_file: cannot read {}: {e}", path.display())
            })?;
            self.password = Some(value.trim_end_matches(['\r', '\n']).to_owned());
        }
        Ok(())
    }
}

impl WorkerConfig {
    /// Checks values and resolves target passwords. Errors name the field.
    pub fn prepare(&mut self, oidc: &VerifierConfig) -> Result<(), String> {
        oidc.validate()?;
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), Some(_)) => {}
            (None, None) if self.allow_plaintext => {}
            (None, None) => {
                return Err(
                    "worker.tls_cert_file: clients must use TLS, so a certificate \
                     and key are required (or set worker.allow_plaintext = true for \
                     loopback experiments)"
                        .into(),
                );
            }
            (Some(_), None) => {
                return Err("worker.tls_key_file: required with tls_cert_file".into());
            }
            (None, Some(_)) => {
                return Err("worker.tls_cert_file: required with tls_key_file".into());
            }
        }
        if self.cancel_subject.is_empty() || self.cancel_subject.contains(['*', '>', ' ']) {
            return Err("worker.cancel_subject: not a valid NATS subject".into());
        }
        if self.max_message_bytes < 1024 {
            return Err("worker.max_message_bytes: must be at least 1024".into());
        }
        for (field, value) in [
            ("startup_timeout_secs", self.startup_timeout_secs as usize),
            ("max_statement_bytes", self.max_statement_bytes),
            (
                "max_session_prepared_bytes",
                self.max_session_prepared_bytes,
            ),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_address",
                self.max_connections_per_address,
            ),
            (
                "auth_failures_per_minute",
                self.auth_failures_per_minute as usize,
            ),
        ] {
            if value == 0 {
                return Err(format!("worker.{field}: must be at least 1"));
            }
        }
        if self.max_session_lifetime_secs == Some(0) {
            return Err("worker.max_session_lifetime_secs: must be at least 1".into());
        }
        if self.cancel_key.is_none() {
            let key = match (&self.cancel_key_env, &self.cancel_key_file) {
                (Some(_), Some(_)) => {
                    return Err("worker.cancel_key_env / cancel_key_file: set one, not both".into());
                }
                (Some(var), None) => Some(std::env::var(var).map_err(|_| {
                    format!("worker.cancel_key_env: environment variable {var} is not set")
                })?),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| {
                            format!(
                                "worker.cancel_key_file: cannot read {}: {e}",
                                path.display()
                            )
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                (None, None) => None,
            };
            if let Some(key) = key {
                if key.len() < 32 {
                    return Err(format!(
                        "worker.{}: the cancel key must be at least 32 bytes",
                        if self.cancel_key_env.is_some() {
                            "cancel_key_env"
                        } else {
                            "cancel_key_file"
                        }
                    ));
                }
                self.cancel_key = Some(CancelKey(key.into_bytes()));
            }
        }
        for (name, target) in &mut self.targets {
            let field = format!("worker.targets.{name}");
            if target.host.is_empty() {
                return Err(format!("{field}.host: must not be empty"));
            }
            target.resolve_password(&field)?;
            if let (Some(m), None) = (&target.masking, &target.masker) {
                target.masker = Some(std::sync::Arc::new(m.build(&format!("{field}.masking"))?));
            }
        }
        Ok(())
    }

    /// When a session opened at `now` (unix seconds) must end, given the
    /// end of its token's validity (leeway included): then, unless
    /// `sessions_outlive_tokens`, in which case the later of then and
    /// `max_session_lifetime_secs` after opening (never, without a cap).
    pub fn session_deadline(&self, token_end: i64, now: i64) -> Option<i64> {
        match (self.sessions_outlive_tokens, self.max_session_lifetime_secs) {
            (false, _) => Some(token_end),
            (true, Some(cap)) => Some(token_end.max(now.saturating_add(cap as i64))),
            (true, None) => None,
        }
    }

    pub fn worker_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{:08x}", rand::random::<u32>())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_with_their_token_or_at_the_cap() {
        let mut c = WorkerConfig::default();
        assert_eq!(c.session_deadline(1_000, 500), Some(1_000));
        c.max_session_lifetime_secs = Some(3_600);
        assert_eq!(
            c.session_deadline(1_000, 500),
            Some(1_000),
            "the cap alone extends nothing"
        );
        c.sessions_outlive_tokens = true;
        assert_eq!(c.session_deadline(1_000, 500), Some(4_100));
        assert_eq!(
            c.session_deadline(9_000, 500),
            Some(9_000),
            "never before the token ends"
        );
        c.max_session_lifetime_secs = None;
        assert_eq!(c.session_deadline(1_000, 500), None);
    }

    #[test]
    fn the_cancel_key_is_read_and_must_be_long() {
        let dir =
            std::env::temp_dir().join(format!("gh-cancel-key-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        let oidc = VerifierConfig {
            issuer: "https://issuer.example".into(),
            ..Default::default()
        };
        let prepared = |contents: &str| {
            std::fs::write(&file, contents).unwrap();
            let mut c = WorkerConfig {
                allow_plaintext: true,
                cancel_key_file: Some(file.clone()),
                ..Default::default()
            };
            c.prepare(&oidc).map(|()| c.cancel_key)
        };
        let key = prepared(&format!("{}\n", "k".repeat(32))).unwrap().unwrap();
        assert_eq!(key.0, vec![b'k'; 32]);
        assert!(
            !format!("{key:?}").contains('k'),
            "the key is never printed"
        );
        let e = prepared("short\n").unwrap_err();
        assert!(e.starts_with("worker.cancel_key_file:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
