//! The one typed configuration of the `gatehouse` binary: a TOML file whose
//! sections belong to the crates that use them, with environment overrides.
//!
//! An override names a field by its path with `__` between parts:
//! `GATEHOUSE__EVENTS__NATS_URL=nats://nats:4222` sets `events.nats_url`.
//! Values are read as TOML when they parse (numbers, booleans, arrays) and
//! as strings otherwise.

use std::path::Path;

use anyhow::{Context, bail};
use gatehouse_control_plane::ControlPlaneConfig;
use gatehouse_eventlog::EventLogConfig;
use gatehouse_identity::VerifierConfig;
use gatehouse_policystore::PolicyConfig;
use gatehouse_worker::WorkerConfig;
use serde::Deserialize;

pub const ENV_PREFIX: &str = "GATEHOUSE__";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
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
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
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
    /// field), and resolves secrets referenced from the config.
    pub fn check_worker(&mut self) -> anyhow::Result<()> {
        self.events.validate().map_err(anyhow::Error::msg)?;
        self.worker
            .prepare(&self.oidc)
            .map_err(anyhow::Error::msg)?;
        Ok(())
    }

    pub fn check_control_plane(&self) -> anyhow::Result<()> {
        self.events.validate().map_err(anyhow::Error::msg)?;
        self.oidc.validate().map_err(anyhow::Error::msg)?;
        self.policy.validate().map_err(anyhow::Error::msg)?;
        self.control_plane.validate().map_err(anyhow::Error::msg)?;
        Ok(())
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
        assert_eq!(c.events.stream, "GATEHOUSE_EVENTS");
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
        let mut c =
            Config::parse("[worker]\nallow_plaintext = false\n", std::iter::empty()).unwrap();
        c.oidc.issuer = "https://issuer.example".into();
        let e = c.check_worker().unwrap_err();
        assert!(e.to_string().starts_with("worker.tls_cert_file:"), "{e}");
        let mut c = Config::parse("[events]\nstream = \"a.b\"\n", std::iter::empty()).unwrap();
        assert!(
            c.check_worker()
                .unwrap_err()
                .to_string()
                .starts_with("events.stream:")
        );
    }
}
        assert_eq!(c.policy.bundle_public_keys.len(), 1);
        c.policy.trusted_keys().expect("the example's bundle key parses");
