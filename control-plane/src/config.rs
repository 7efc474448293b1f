use std::str::FromStr;

use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

/// `[control_plane]`: the projector and the audit API. The HTTP listener and
/// the NATS / stream settings (`[events]`) are given by the caller.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// Where the audit tables are: a PostgreSQL URL (`postgres://…`), or
    /// `sqlite:PATH` for one SQLite file on a single node (created if
    /// missing; one control plane only). For PostgreSQL, without `sslmode`
    /// the connection is `verify-full` (TLS, certificate chain and host name
    /// checked; `sslrootcert=PATH` names the CA, otherwise the system
    /// roots); `prefer` and `allow`, which fall back to plaintext, are
    /// refused.
    pub audit_db_url: String,
    /// Create the audit database if it is missing, by connecting to the
    /// `postgres` database of the same server.
    pub create_database: bool,
    /// Name of the durable JetStream consumer that feeds the projector. All
    /// replicas share it, so each event is projected by one of them.
    pub consumer: String,
    /// Group (from the token's groups claim) allowed to read the audit API.
    pub auditor_group: String,
    /// Largest page the audit API returns (`limit` is capped at it).
    pub max_page: u32,
    /// Webhooks told of every approval change (`[[control_plane.approval_webhooks]]`).
    pub approval_webhooks: Vec<crate::notify::WebhookConfig>,
    /// Where people open an approval, `{id}` standing for its id (e.g.
    /// `https://console.example.com/approvals/{id}`): the link in
    /// notifications.
    pub approval_link: Option<String>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            audit_db_url: "postgres://postgres@127.0.0.1:5432/gatehouse".into(),
            create_database: true,
            consumer: "gatehouse-projector".into(),
            auditor_group: "auditors".into(),
            max_page: 500,
            approval_webhooks: Vec::new(),
            approval_link: None,
        }
    }
}

/// How the connection to the audit database is secured: its URL's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditDbTls {
    /// TLS, certificate chain and host name verified (the default).
    VerifyFull,
    /// TLS, certificate chain verified but not the host name.
    VerifyCa,
    /// TLS without verifying the certificate.
    Require,
    /// No TLS.
    Disable,
}

impl AuditDbTls {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyFull => "verify-full",
            Self::VerifyCa => "verify-ca",
            Self::Require => "require",
            Self::Disable => "disable",
        }
    }

    pub(crate) fn ssl_mode(self) -> sqlx::postgres::PgSslMode {
        use sqlx::postgres::PgSslMode;
        match self {
            Self::VerifyFull => PgSslMode::VerifyFull,
            Self::VerifyCa => PgSslMode::VerifyCa,
            Self::Require => PgSslMode::Require,
            Self::Disable => PgSslMode::Disable,
        }
    }
}

impl ControlPlaneConfig {
    /// The SQLite file of `audit_db_url = "sqlite:PATH"` (`sqlite://PATH`
    /// too); `None` for PostgreSQL.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        let path = self.audit_db_url.strip_prefix("sqlite:")?;
        Some(std::path::Path::new(
            path.strip_prefix("//").unwrap_or(path),
        ))
    }

    /// The audit database's TLS mode: `sslmode` of the URL, `verify-full`
    /// when it has none. `prefer` and `allow` are refused: they would fall
    /// back to plaintext without a word.
    pub fn audit_db_tls(&self) -> Result<AuditDbTls, String> {
        let query = self
            .audit_db_url
            .split_once('?')
            .map_or("", |(_, q)| q.split('#').next().unwrap_or(""));
        let mut mode = AuditDbTls::VerifyFull;
        for pair in query.split('&') {
            let Some(value) = pair.strip_prefix("sslmode=") else {
                continue;
            };
            mode = match value {
                "verify-full" => AuditDbTls::VerifyFull,
                "verify-ca" => AuditDbTls::VerifyCa,
                "require" => AuditDbTls::Require,
                "disable" => AuditDbTls::Disable,
                "prefer" | "allow" => {
                    return Err(format!(
                        "control_plane.audit_db_url: sslmode={value} would fall back to an \
                         unencrypted connection; use verify-full (the default, when sslmode \
                         is absent), or say require or disable explicitly"
                    ));
                }
                _ => {
                    return Err(
                        "control_plane.audit_db_url: sslmode must be verify-full, verify-ca, \
                         require or disable"
                            .into(),
                    );
                }
            };
        }
        Ok(mode)
    }

    /// Checks the values; the error names the field and why.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(path) = self.sqlite_path() {
            if path.as_os_str().is_empty() {
                return Err("control_plane.audit_db_url: sqlite: needs a file path".into());
            }
        } else if !["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.audit_db_url.starts_with(scheme))
        {
            // The URL may hold a password: report why it is wrong, never the URL.
            return Err("control_plane.audit_db_url: must start with postgres://, \
                 postgresql:// or sqlite:"
                .into());
        } else {
            PgConnectOptions::from_str(&self.audit_db_url)
                .map_err(|e| format!("control_plane.audit_db_url: not a PostgreSQL URL ({e})"))?;
            self.audit_db_tls()?;
        }
        if self.consumer.is_empty()
            || self
                .consumer
                .contains(|c: char| matches!(c, '.' | '*' | '>') || c.is_whitespace())
        {
            return Err(format!(
                "control_plane.consumer: {:?} is not a valid consumer name (no dots, spaces or wildcards)",
                self.consumer
            ));
        }
        if self.auditor_group.is_empty() {
            return Err("control_plane.auditor_group: must not be empty".into());
        }
        if !(1..=10_000).contains(&self.max_page) {
            return Err("control_plane.max_page: must be between 1 and 10000".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ControlPlaneConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let bad = |f: fn(&mut ControlPlaneConfig)| {
            let mut c = ControlPlaneConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        let e = bad(|c| c.audit_db_url = "mysql://secret@db/x".into());
        assert!(e.starts_with("control_plane.audit_db_url:"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(bad(|c| c.consumer = "a.b".into()).starts_with("control_plane.consumer:"));
        assert!(bad(|c| c.auditor_group.clear()).starts_with("control_plane.auditor_group:"));
        assert!(bad(|c| c.max_page = 0).starts_with("control_plane.max_page:"));
        assert!(
            bad(|c| c.audit_db_url = "sqlite:".into()).starts_with("control_plane.audit_db_url:")
        );
    }

    #[test]
    fn sqlite_urls_name_a_file() {
        let with = |url: &str| ControlPlaneConfig {
            audit_db_url: url.into(),
            ..Default::default()
        };
        for (url, path) in [
            (
                "sqlite:/var/lib/gatehouse/audit.db",
                "/var/lib/gatehouse/audit.db",
            ),
            ("sqlite:///abs/audit.db", "/abs/audit.db"),
            ("sqlite:rel/audit.db", "rel/audit.db"),
        ] {
            assert_eq!(with(url).sqlite_path(), Some(std::path::Path::new(path)));
            with(url).validate().unwrap();
        }
        assert_eq!(with("postgres://db/audit").sqlite_path(), None);
    }

    #[test]
    fn the_audit_db_is_verified_unless_the_url_says_otherwise() {
        let with = |url: &str| ControlPlaneConfig {
            audit_db_url: url.into(),
            ..Default::default()
        };
        let db = "postgres://u:secret@db.example/audit";
        assert_eq!(with(db).audit_db_tls(), Ok(AuditDbTls::VerifyFull));
        for (query, mode) in [
            ("sslmode=require", AuditDbTls::Require),
            ("sslmode=disable", AuditDbTls::Disable),
            (
                "sslrootcert=/ca.pem&sslmode=verify-full",
                AuditDbTls::VerifyFull,
            ),
            ("sslmode=verify-ca", AuditDbTls::VerifyCa),
        ] {
            assert_eq!(with(&format!("{db}?{query}")).audit_db_tls(), Ok(mode));
        }
        for fallback in ["prefer", "allow"] {
            let e = with(&format!("{db}?sslmode={fallback}"))
                .validate()
                .unwrap_err();
            assert!(e.starts_with("control_plane.audit_db_url:"), "{e}");
            assert!(e.contains("fall back"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<ControlPlaneConfig>(r#"{"consumr":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("consumr"), "{e}");
        let c: ControlPlaneConfig = serde_json::from_str(r#"{"max_page":10}"#).unwrap();
        assert_eq!(
            (c.max_page, c.consumer.as_str()),
            (10, "gatehouse-projector")
        );
    }
}
