//! The one typed configuration of the `gatehouse` binary: a TOML file whose
//! sections belong to the crates that use them, with environment overrides.
//!
//! An override names a field by its path with `__` between parts:
//! `GATEHOUSE__EVENTS__NATS_URL=nats://nats:4222` sets `events.nats_url`.
//! Values are read as TOML when they parse (numbers, booleans, arrays) and
//! as strings otherwise.
//!
//! **Production mode.** `gatehouse worker` and `gatehouse control-plane`
//! refuse settings that give up TLS or authentication somewhere
//! ([`Insecure`]) unless the top-level `insecure` list names each one; every
//! switch used is logged at WARN at every start. `gatehouse dev` turns on
//! what it needs and says so at start.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use gatehouse_control_plane::ControlPlaneConfig;
use gatehouse_eventlog::EventLogConfig;
use gatehouse_identity::VerifierConfig;
use gatehouse_policystore::PolicyConfig;
use gatehouse_worker::WorkerConfig;
use serde::Deserialize;

pub const ENV_PREFIX: &str = "GATEHOUSE__";

/// Longest `oidc.leeway_secs` production mode takes without the
/// `long-leeway` switch.
pub const MAX_SAFE_LEEWAY_SECS: u64 = 300;

/// Longest `oidc.max_token_lifetime_secs` production mode takes without the
/// `long-token-lifetime` switch (the default: a day).
pub const MAX_SAFE_TOKEN_LIFETIME_SECS: u64 = 86_400;

/// Longest `oidc.jwks_max_age_secs` production mode takes without the
/// `long-key-cache` switch: a key removed from the issuer stops verifying
/// within this time.
pub const MAX_SAFE_JWKS_AGE_SECS: u64 = 3_600;

/// Longest `oidc.jwks_stale_limit_secs` production mode takes without the
/// `long-key-cache` switch: while the issuer cannot be reached, its last
/// keys (a removed one included) verify for this long.
pub const MAX_SAFE_JWKS_STALE_SECS: u64 = 86_400;

/// An unsafe setting, allowed only when the top-level `insecure` list names
/// it (`insecure = ["nats-plaintext", …]`). Each gives up a protection on
/// one hop; none is needed for a production deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Insecure {
    /// `worker.allow_plaintext = true`: clients may connect without TLS,
    /// sending their tokens in the clear.
    PlaintextClients,
    /// An `http://` `oidc.issuer`, or `oidc.allow_http` (which also lets
    /// an https issuer name an `http://` `jwks_uri`): discovery and keys
    /// fetched without TLS can be replaced by anyone on the path, who can
    /// then mint tokens. (Implies `oidc.allow_http`.)
    HttpIssuer,
    /// `oidc.leeway_secs` over five minutes: expired tokens stay good that
    /// much longer.
    LongLeeway,
    /// `oidc.max_token_lifetime_secs` over a day: tokens valid for longer
    /// (up to a thousand years) are accepted.
    LongTokenLifetime,
    /// `oidc.jwks_max_age_secs` over an hour, or `oidc.jwks_stale_limit_secs`
    /// over a day: a key the issuer removed (a leaked one) keeps verifying
    /// tokens that long, the second while the issuer is kept out of reach.
    LongKeyCache,
    /// `worker.sessions_outlive_tokens` without
    /// `worker.max_session_lifetime_secs`: a session may go on forever
    /// after its token expires.
    SessionsOutliveTokens,
    /// A target with `tls = "disable"`: the worker's credentials and every
    /// statement cross the network in the clear.
    TargetTlsOff,
    /// A target with `tls = "require"`: encrypted, but the target's
    /// certificate is not checked, so a man in the middle gets the worker's
    /// login (SCRAM aside) and every statement.
    TargetTlsUnverified,
    /// The API without `api.tls_cert_file`: bearer tokens and audit data in
    /// the clear.
    ApiPlaintext,
    /// NATS without TLS (`events.nats_tls_required`, a `tls://` URL or an
    /// `events.nats_tls_*` file): events, bundles and credentials in the
    /// clear.
    NatsPlaintext,
    /// NATS without credentials (`events.nats_user`, `nats_nkey_file` or
    /// `nats_creds_file`): anyone who reaches the server may publish bundles
    /// and events.
    NatsAnonymous,
    /// The audit database with `sslmode` other than `verify-full`
    /// (`disable`, `require`, `verify-ca`).
    AuditDbUnverified,
}

impl Insecure {
    /// The switch as written in `insecure`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PlaintextClients => "plaintext-clients",
            Self::HttpIssuer => "http-issuer",
            Self::LongLeeway => "long-leeway",
            Self::LongTokenLifetime => "long-token-lifetime",
            Self::LongKeyCache => "long-key-cache",
            Self::SessionsOutliveTokens => "sessions-outlive-tokens",
            Self::TargetTlsOff => "target-tls-off",
            Self::TargetTlsUnverified => "target-tls-unverified",
            Self::ApiPlaintext => "api-plaintext",
            Self::NatsPlaintext => "nats-plaintext",
            Self::NatsAnonymous => "nats-anonymous",
            Self::AuditDbUnverified => "audit-db-unverified",
        }
    }
}

/// One unsafe setting found in a config: which switch allows it, the field,
/// and what it gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeSetting {
    pub switch: Insecure,
    pub field: String,
    pub why: String,
}

impl std::fmt::Display for UnsafeSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

/// Which process a config is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    ControlPlane,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unsafe settings allowed on purpose ([`Insecure`]); each one used is
    /// logged at WARN at every start.
    pub insecure: Vec<Insecure>,
    pub log: LogConfig,
    /// How tokens are checked (clients of workers, callers of the API).
    pub oidc: VerifierConfig,
    /// Where events are recorded.
    pub events: EventLogConfig,
    pub worker: WorkerConfig,
    /// Where policy bundles and revocations live; agent and admin groups.
    pub policy: PolicyConfig,
    pub control_plane: ControlPlaneConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `gatehouse_worker=debug,info`.
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// `[api]`: the control plane's HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: String,
    /// TLS certificate chain (PEM): the API is served over HTTPS. Without
    /// it, plain HTTP, which production mode refuses unless `insecure`
    /// names `api-plaintext`.
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => Err("api.tls_key_file: required with tls_cert_file".into()),
            (None, Some(_)) => Err("api.tls_cert_file: required with tls_key_file".into()),
            _ => Ok(()),
        }
    }
}

impl Config {
    /// Reads, overrides from the environment, and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, std::env::vars())
            .with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str, env: impl Iterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let mut value: toml::Table = toml::from_str(text)?;
        for (key, raw) in env {
            let Some(path) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if parts.iter().any(String::is_empty) {
                bail!("environment variable {key}: empty path segment");
            }
            let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
            set_path(&mut value, &parts, parsed)
                .with_context(|| format!("environment variable {key}"))?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner()))?;
        Ok(config)
    }

    /// Checks values that need more than their type (the error names the
    /// field), refuses unsafe settings `insecure` does not name, and
    /// resolves secrets referenced from the config.
    pub fn check_worker(&mut self) -> anyhow::Result<()> {
        self.check_insecure(Role::Worker)?;
        self.events.validate().map_err(anyhow::Error::msg)?;
        self.worker
            .prepare(&self.oidc)
            .map_err(anyhow::Error::msg)?;
        Ok(())
    }

    pub fn check_control_plane(&mut self) -> anyhow::Result<()> {
        self.check_insecure(Role::ControlPlane)?;
        self.events.validate().map_err(anyhow::Error::msg)?;
        self.oidc.validate().map_err(anyhow::Error::msg)?;
        self.policy.validate().map_err(anyhow::Error::msg)?;
        self.control_plane.validate().map_err(anyhow::Error::msg)?;
        self.api.validate().map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// Production mode: every unsafe setting must be named in `insecure`.
    fn check_insecure(&mut self, role: Role) -> anyhow::Result<()> {
        let refused: Vec<String> = self
            .unsafe_settings(role)
            .into_iter()
            .filter(|u| !self.insecure.contains(&u.switch))
            .map(|u| {
                format!(
                    "{u} (production mode refuses this; to allow it anyway, add \"{}\" to the \
                     top-level `insecure` list)",
                    u.switch.name()
                )
            })
            .collect();
        if !refused.is_empty() {
            bail!("{}", refused.join("\n"));
        }
        if self.insecure.contains(&Insecure::HttpIssuer) {
            self.oidc.allow_http = true;
        }
        Ok(())
    }

    /// The unsafe settings in this config for `role`, whether or not
    /// `insecure` allows them.
    pub fn unsafe_settings(&self, role: Role) -> Vec<UnsafeSetting> {
        let mut found = Vec::new();
        let mut add = |switch, field: String, why: &str| {
            found.push(UnsafeSetting {
                switch,
                field,
                why: why.to_string(),
            })
        };
        if self.oidc.issuer.starts_with("http://") {
            add(
                Insecure::HttpIssuer,
                "oidc.issuer".into(),
                "an http:// issuer: its signing keys are fetched without TLS",
            );
        } else if self.oidc.allow_http {
            // An https issuer whose discovery document names an http://
            // jwks_uri: the keys come without TLS all the same.
            add(
                Insecure::HttpIssuer,
                "oidc.allow_http".into(),
                "the issuer's signing keys may be fetched from an http:// jwks_uri, without TLS",
            );
        }
        if self.oidc.leeway_secs > MAX_SAFE_LEEWAY_SECS {
            add(
                Insecure::LongLeeway,
                "oidc.leeway_secs".into(),
                "more than 300 seconds: expired tokens stay good that much longer",
            );
        }
        if self.oidc.max_token_lifetime_secs > MAX_SAFE_TOKEN_LIFETIME_SECS {
            add(
                Insecure::LongTokenLifetime,
                "oidc.max_token_lifetime_secs".into(),
                "more than a day (86400 seconds): tokens that stay good longer are accepted",
            );
        }
        if self.oidc.jwks_max_age_secs > MAX_SAFE_JWKS_AGE_SECS {
            add(
                Insecure::LongKeyCache,
                "oidc.jwks_max_age_secs".into(),
                "more than an hour (3600 seconds): a key removed from the issuer keeps \
                 verifying tokens that long",
            );
        }
        if self.oidc.jwks_stale_limit_secs > MAX_SAFE_JWKS_STALE_SECS {
            add(
                Insecure::LongKeyCache,
                "oidc.jwks_stale_limit_secs".into(),
                "more than a day (86400 seconds): while the issuer cannot be reached, its \
                 last keys (a removed one included) keep verifying tokens that long",
            );
        }
        if !self.events.nats_tls() {
            add(
                Insecure::NatsPlaintext,
                "events.nats_url".into(),
                "NATS without TLS (set events.nats_tls_required, a tls:// URL or \
                 events.nats_tls_ca_file)",
            );
        }
        if !self.events.nats_authenticated() {
            add(
                Insecure::NatsAnonymous,
                "events.nats_user".into(),
                "NATS without credentials (set events.nats_user with a password, \
                 events.nats_nkey_file or events.nats_creds_file)",
            );
        }
        match role {
            Role::Worker => {
                let w = &self.worker;
                if w.allow_plaintext {
                    add(
                        Insecure::PlaintextClients,
                        "worker.allow_plaintext".into(),
                        "clients may connect without TLS and send their tokens in the clear",
                    );
                }
                if w.sessions_outlive_tokens && w.max_session_lifetime_secs.is_none() {
                    add(
                        Insecure::SessionsOutliveTokens,
                        "worker.sessions_outlive_tokens".into(),
                        "sessions may go on forever after their tokens expire \
                         (set worker.max_session_lifetime_secs)",
                    );
                }
                for (name, t) in &w.targets {
                    match t.tls {
                        gatehouse_worker::TargetTls::VerifyFull => {}
                        gatehouse_worker::TargetTls::Require => add(
                            Insecure::TargetTlsUnverified,
                            format!("worker.targets.{name}.tls"),
                            "\"require\" does not verify the target's certificate",
                        ),
                        gatehouse_worker::TargetTls::Disable => add(
                            Insecure::TargetTlsOff,
                            format!("worker.targets.{name}.tls"),
                            "\"disable\" sends the worker's login and every statement in the clear",
                        ),
                    }
                }
            }
            Role::ControlPlane => {
                if self.api.tls_cert_file.is_none() {
                    add(
                        Insecure::ApiPlaintext,
                        "api.tls_cert_file".into(),
                        "the API would serve plain HTTP: bearer tokens and audit data in the clear",
                    );
                }
                match self.control_plane.audit_db_tls() {
                    Ok(gatehouse_control_plane::AuditDbTls::VerifyFull) | Err(_) => {}
                    Ok(mode) => add(
                        Insecure::AuditDbUnverified,
                        "control_plane.audit_db_url".into(),
                        &format!(
                            "sslmode={}: the audit database's certificate and name are not \
                             both verified",
                            mode.as_str()
                        ),
                    ),
                }
            }
        }
        found
    }

    /// Logs, at WARN, each switch of `insecure` and what it lets through;
    /// called at every start.
    pub fn log_insecure(&self, role: Role) {
        let found = self.unsafe_settings(role);
        for switch in &self.insecure {
            let uses: Vec<String> = found
                .iter()
                .filter(|u| u.switch == *switch)
                .map(ToString::to_string)
                .collect();
            if uses.is_empty() {
                tracing::warn!(
                    switch = switch.name(),
                    "INSECURE switch set, though nothing in this configuration needs it"
                );
            } else {
                for u in uses {
                    tracing::warn!(switch = switch.name(), "INSECURE setting allowed: {u}");
                }
            }
        }
    }
}

fn set_path(table: &mut toml::Table, parts: &[String], value: toml::Value) -> anyhow::Result<()> {
    let (last, parents) = parts.split_last().expect("non-empty");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        t = entry
            .as_table_mut()
            .with_context(|| format!("{p} is not a table"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/examples/gatehouse.toml");

    #[test]
    fn the_shipped_example_parses() {
        let c = Config::parse(EXAMPLE, std::iter::empty()).unwrap();
        assert!(c.worker.targets.contains_key("app"));
        let masking = c.worker.targets["app"].masking.as_ref().expect("masking");
        assert_eq!(masking.columns.len(), 2);
        assert_eq!(c.events.stream, "GATEHOUSE_EVENTS");
        assert_eq!(c.policy.bundle_public_keys.len(), 1);
        c.policy
            .trusted_keys()
            .expect("the example's bundle key parses");
    }

    #[test]
    fn env_overrides_win_and_are_typed() {
        let env = [
            (
                "GATEHOUSE__EVENTS__NATS_URL".to_string(),
                "nats://other:4222".to_string(),
            ),
            ("GATEHOUSE__EVENTS__REPLICAS".to_string(), "3".to_string()),
            (
                "GATEHOUSE__WORKER__TARGETS__APP__PORT".to_string(),
                "6543".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::parse(EXAMPLE, env.into_iter()).unwrap();
        assert_eq!(c.events.nats_url, "nats://other:4222");
        assert_eq!(c.events.replicas, 3);
        assert_eq!(c.worker.targets["app"].port, 6543);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("[worker]\nlisten = 5\n", std::iter::empty()).unwrap_err();
        assert!(e.to_string().starts_with("worker.listen:"), "{e}");
        let e = Config::parse("[events]\nnats = \"x\"\n", std::iter::empty()).unwrap_err();
        assert!(e.to_string().contains("events"), "{e}");
        assert!(e.to_string().contains("unknown field `nats`"), "{e}");
        let e = Config::parse(
            "[worker.targets.app]\nhost = \"h\"\ndatabase = \"d\"\nuser = \"u\"\ntls = \"maybe\"\n",
            std::iter::empty(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("worker.targets.app.tls:"), "{e}");
    }

    #[test]
    fn checks_name_the_field() {
        let mut c = Config::parse(
            "insecure = [\"nats-plaintext\", \"nats-anonymous\"]\n[worker]\nallow_plaintext = false\n",
            std::iter::empty(),
        )
        .unwrap();
        c.oidc.issuer = "https://issuer.example".into();
        let e = c.check_worker().unwrap_err();
        assert!(e.to_string().starts_with("worker.tls_cert_file:"), "{e}");
        let mut c = Config::parse(
            "insecure = [\"nats-plaintext\", \"nats-anonymous\"]\n[events]\nstream = \"a.b\"\n",
            std::iter::empty(),
        )
        .unwrap();
        assert!(
            c.check_worker()
                .unwrap_err()
                .to_string()
                .starts_with("events.stream:")
        );
    }

    #[test]
    fn the_shipped_example_is_a_production_config() {
        let c = Config::parse(EXAMPLE, std::iter::empty()).unwrap();
        assert!(c.insecure.is_empty());
        for role in [Role::Worker, Role::ControlPlane] {
            assert_eq!(c.unsafe_settings(role), [], "{role:?}");
        }
        let mut c = c;
        c.check_insecure(Role::Worker).unwrap();
        c.check_insecure(Role::ControlPlane).unwrap();
    }

    /// The worker of issue 9: plaintext clients, an http issuer, a day of
    /// leeway and sessions outliving their tokens, all refused at once.
    #[test]
    fn production_mode_refuses_each_unsafe_setting_naming_field_and_switch() {
        let unsafe_worker = EXAMPLE
            .replace(
                "issuer = \"https://login.example.com/realms/prod\"",
                "issuer = \"http://login.example.com\"",
            )
            .replace("leeway_secs = 30 ", "leeway_secs = 86400 ")
            .replace("allow_plaintext = false", "allow_plaintext = true")
            .replace(
                "sessions_outlive_tokens = false",
                "sessions_outlive_tokens = true",
            )
            .replace("tls = \"verify-full\"  ", "tls = \"disable\"  ");
        let mut c = Config::parse(&unsafe_worker, std::iter::empty()).unwrap();
        let e = c.check_worker().unwrap_err().to_string();
        for (field, switch) in [
            ("oidc.issuer", "http-issuer"),
            ("oidc.leeway_secs", "long-leeway"),
            ("worker.allow_plaintext", "plaintext-clients"),
            ("worker.sessions_outlive_tokens", "sessions-outlive-tokens"),
            ("worker.targets.app.tls", "target-tls-off"),
        ] {
            assert!(
                e.lines()
                    .any(|l| l.starts_with(&format!("{field}:"))
                        && l.contains(&format!("\"{switch}\""))),
                "{field} / {switch} not in:\n{e}"
            );
        }
        assert_eq!(e.lines().count(), 5, "{e}");

        // Each switch lets its own setting through, and only that.
        let all = "insecure = [\"http-issuer\", \"long-leeway\", \"plaintext-clients\", \
                   \"sessions-outlive-tokens\"]\n";
        let with = |switches: &str| unsafe_worker.replacen("insecure = []\n", switches, 1);
        let mut c = Config::parse(&with(all), std::iter::empty()).unwrap();
        let e = c.check_insecure(Role::Worker).unwrap_err().to_string();
        assert!(e.starts_with("worker.targets.app.tls:"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let mut c = Config::parse(
            &with(&all.replace("]\n", ", \"target-tls-off\"]\n")),
            std::iter::empty(),
        )
        .unwrap();
        c.check_insecure(Role::Worker).unwrap();
        assert!(
            c.oidc.allow_http,
            "the http-issuer switch implies oidc.allow_http"
        );

        // A cap makes sessions outliving tokens acceptable.
        let capped = EXAMPLE.replace(
            "sessions_outlive_tokens = false",
            "sessions_outlive_tokens = true\nmax_session_lifetime_secs = 3600",
        );
        let c = Config::parse(&capped, std::iter::empty()).unwrap();
        assert_eq!(c.unsafe_settings(Role::Worker), []);
    }

    /// `oidc.allow_http` with an https issuer lets the issuer's discovery
    /// document send the verifier to an `http://` jwks_uri: keys without
    /// TLS, on both planes, with or without an environment override.
    #[test]
    fn allowing_http_for_the_issuer_is_the_http_issuer_switch() {
        let direct = EXAMPLE.replace("allow_http = false", "allow_http = true");
        assert_ne!(direct, EXAMPLE, "the example sets oidc.allow_http");
        let by_env = || {
            [(
                "GATEHOUSE__OIDC__ALLOW_HTTP".to_string(),
                "true".to_string(),
            )]
            .into_iter()
        };
        for (text, env) in [(direct.as_str(), false), (EXAMPLE, true)] {
            for role in [Role::Worker, Role::ControlPlane] {
                let mut c = if env {
                    Config::parse(text, by_env()).unwrap()
                } else {
                    Config::parse(text, std::iter::empty()).unwrap()
                };
                assert!(c.oidc.allow_http);
                let e = c.check_insecure(role).unwrap_err().to_string();
                assert!(
                    e.starts_with("oidc.allow_http:") && e.contains("\"http-issuer\""),
                    "{role:?}: {e}"
                );
                assert_eq!(e.lines().count(), 1, "{e}");
            }
        }
        let mut c = Config::parse(
            &direct.replacen("insecure = []\n", "insecure = [\"http-issuer\"]\n", 1),
            std::iter::empty(),
        )
        .unwrap();
        c.check_insecure(Role::Worker).unwrap();
    }

    /// The verifier's bounds on token and key lifetimes, stretched in the
    /// file or from the environment: refused on both planes unless named.
    #[test]
    fn stretched_token_and_key_lifetimes_need_their_switches() {
        for (field, value, switch) in [
            (
                "MAX_TOKEN_LIFETIME_SECS",
                "31536000000",
                "long-token-lifetime",
            ),
            ("JWKS_MAX_AGE_SECS", "86400", "long-key-cache"),
            ("JWKS_STALE_LIMIT_SECS", "31536000", "long-key-cache"),
        ] {
            let env = || [(format!("GATEHOUSE__OIDC__{field}"), value.to_string())].into_iter();
            for role in [Role::Worker, Role::ControlPlane] {
                let mut c = Config::parse(EXAMPLE, env()).unwrap();
                let e = c.check_insecure(role).unwrap_err().to_string();
                let field = format!("oidc.{}:", field.to_ascii_lowercase());
                assert!(
                    e.starts_with(&field) && e.contains(&format!("\"{switch}\"")),
                    "{role:?}: {e}"
                );
                assert_eq!(e.lines().count(), 1, "{e}");
                let allowed = EXAMPLE.replacen(
                    "insecure = []\n",
                    &format!("insecure = [\"{switch}\"]\n"),
                    1,
                );
                let mut c = Config::parse(&allowed, env()).unwrap();
                c.check_insecure(role).unwrap();
            }
        }
        // The defaults are within the bounds.
        let c = Config::parse("", std::iter::empty()).unwrap();
        assert!(
            c.unsafe_settings(Role::Worker)
                .iter()
                .all(|u| !u.field.starts_with("oidc.")),
            "{:?}",
            c.unsafe_settings(Role::Worker)
        );
    }

    #[test]
    fn production_mode_covers_the_control_planes_hops() {
        let plain = EXAMPLE
            .replace("tls_cert_file = \"/etc/gatehouse/tls/api.crt\"", "")
            .replace("tls_key_file = \"/etc/gatehouse/tls/api.key\"", "")
            .replace(
                "audit-db.internal.example.com:5432/gatehouse\"",
                "audit-db.internal.example.com:5432/gatehouse?sslmode=require\"",
            )
            .replace("nats_url = \"tls://", "nats_url = \"nats://")
            .replace("nats_tls_required = true", "")
            .replace("nats_tls_ca_file = ", "# ")
            .replace("nats_user = \"worker\"", "")
            .replace("nats_password_file = ", "# ");
        let mut c = Config::parse(&plain, std::iter::empty()).unwrap();
        let e = c.check_control_plane().unwrap_err().to_string();
        for (field, switch) in [
            ("api.tls_cert_file", "api-plaintext"),
            ("control_plane.audit_db_url", "audit-db-unverified"),
            ("events.nats_url", "nats-plaintext"),
            ("events.nats_user", "nats-anonymous"),
        ] {
            assert!(
                e.lines()
                    .any(|l| l.starts_with(&format!("{field}:"))
                        && l.contains(&format!("\"{switch}\""))),
                "{field} / {switch} not in:\n{e}"
            );
        }
        assert_eq!(e.lines().count(), 4, "{e}");
        assert!(
            !e.contains("worker."),
            "worker settings are not the control plane's: {e}"
        );
    }

    #[test]
    fn unknown_switches_are_refused() {
        let e = Config::parse("insecure = [\"everything\"]\n", std::iter::empty()).unwrap_err();
        assert!(e.to_string().starts_with("insecure[0]:"), "{e}");
    }
}
