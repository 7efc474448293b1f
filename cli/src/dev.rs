//! `gatehouse dev` and `gatehouse token`: a whole Gatehouse in one process
//! for trying it out, with a development OIDC issuer and self-signed TLS
//! kept in a data directory.
//!
//! This is the development mode: it turns on what production mode refuses
//! (an `http://` issuer, a plain-HTTP API, NATS without TLS or credentials,
//! an audit database and targets whose certificates are not verified, when
//! asked) and logs each such setting at WARN at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use gatehouse_control_plane::{AuditStore, ControlPlaneConfig};
use gatehouse_eventlog::{EmbeddedLog, EventLogConfig, LogBackend};
use gatehouse_identity::{DevIssuer, TokenRequest, Verifier, VerifierConfig};
use gatehouse_policies::{Bundle, Engine};
use gatehouse_policystore::{PolicyConfig, PolicyStore};
use gatehouse_worker::masking::{ColumnRuleConfig, MaskingConfig, StyleName};
use gatehouse_worker::{CancelKey, ChannelBinding, TargetConfig, TargetTls, WorkerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, LogConfig, Role};
use crate::run::{connect_nats, init_logging, shutdown_signal};

/// The audience of development tokens for database logins (the worker's
/// default `oidc.worker_audiences`).
pub const DEV_AUDIENCE: &str = "gatehouse";
/// The audience of development tokens for the HTTP API (the default
/// `oidc.api_audiences`).
pub const DEV_API_AUDIENCE: &str = "gatehouse-api";
const DEFAULT_TARGET: &str = "postgres=postgres://postgres@127.0.0.1:5432/postgres";

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where the development issuer key, TLS certificate and key are kept.
    #[arg(long, default_value = ".gatehouse")]
    pub data_dir: PathBuf,
    /// NATS server with JetStream for the event log, policies and
    /// revocations (e.g. nats://127.0.0.1:4222). Without it, the embedded
    /// log: one SQLite file, `<data-dir>/gatehouse.db`.
    #[arg(long)]
    pub nats: Option<String>,
    /// Audit database, PostgreSQL (created if missing), e.g.
    /// postgres://postgres@127.0.0.1:5432/gatehouse?sslmode=require.
    /// Without `sslmode` in the URL, verify-full; `require` is warned about
    /// at start. Without this option, the audit tables are one SQLite file,
    /// `<data-dir>/audit.db`.
    #[arg(long)]
    pub audit_db: Option<String>,
    /// A target as NAME=postgres://user:pass@host:port/db[?sslmode=verify-full|require|disable][&sslrootcert=CA.pem]
    /// (repeatable). Without sslmode, verify-full: trust the target's CA
    /// (sslrootcert, or the system roots) or say sslmode=require, which is
    /// warned about at start. prefer and allow are refused.
    /// Default: postgres=postgres://postgres@127.0.0.1:5432/postgres
    #[arg(long = "target", value_name = "NAME=URL")]
    pub targets: Vec<String>,
    /// A Gatehouse config file whose targets (`[worker.targets.NAME]`) to
    /// serve, beside those of --target (which wins on a name both give).
    /// Its other sections are not used: the development stack keeps its
    /// own issuer, TLS and stores.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15432")]
    pub pg_listen: String,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: String,
    /// A directory of Cedar policies to load instead of the built-in
    /// defaults (e.g. `policies/examples/agents-read-only`).
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Do not mask responses. By default every target's responses are
    /// masked with every content detector (e-mail, card, key, …) for
    /// those no `unmask` permit applies to (group `pii-readers` in the
    /// built-in policies).
    #[arg(long)]
    pub no_masking: bool,
    /// A column masked whole: `table.column` or `column` (`*` matches
    /// any run of characters), with `=redact` (the default), `=partial`
    /// (keep the last 4 characters) or `=pseudonym` (repeatable).
    #[arg(long = "mask-column", value_name = "PATTERN[=STYLE]")]
    pub mask_columns: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The data directory of `gatehouse dev`.
    #[arg(long, default_value = ".gatehouse")]
    pub data_dir: PathBuf,
    /// Subject (`sub`); also the user name unless --username is given.
    #[arg(long)]
    pub sub: String,
    #[arg(long)]
    pub username: Option<String>,
    /// Group membership (repeatable).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Lifetime, e.g. 90s, 15m, 1h, 2d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// What the token is for: `worker` (a database password) or `api` (the
    /// control plane's HTTP API). Each refuses the other's tokens.
    #[arg(long = "for", value_enum, default_value = "worker")]
    pub plane: TokenPlane,
    /// The audience (`aud`). Default: `gatehouse` for the worker,
    /// `gatehouse-api` for the API.
    #[arg(long)]
    pub aud: Option<String>,
    /// An actor in the delegation chain, current actor first (repeatable):
    /// `--sub alice --actor agent-7` is agent-7 acting for alice.
    #[arg(long = "actor")]
    pub actors: Vec<String>,
}

/// Where a token from `gatehouse token` is used.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenPlane {
    Worker,
    Api,
}

/// Everything `gatehouse dev` runs, with overridable names so that tests
/// can run many stacks side by side.
pub struct DevOptions {
    pub data_dir: PathBuf,
    /// The event log on NATS JetStream at this URL; `None`: the embedded
    /// log in `data_dir`.
    pub nats_url: Option<String>,
    /// The audit database's URL; `None`: the SQLite file `audit.db` in
    /// `data_dir`.
    pub audit_db: Option<String>,
    pub targets: Vec<(String, TargetConfig)>,
    pub pg_listen: String,
    pub http_listen: String,
    pub events: EventLogConfig,
    pub consumer: String,
    pub cancel_subject: String,
    pub allow_plaintext: bool,
    pub policy: PolicyConfig,
    /// Published at start; the built-in defaults unless `--policies`.
    pub bundle: Bundle,
}

impl DevOptions {
    pub fn from_args(args: &DevArgs) -> anyhow::Result<Self> {
        let mut from_file = match &args.config {
            Some(path) => Config::load(path)?.worker.targets,
            None => Default::default(),
        };
        let specs = if args.targets.is_empty() && from_file.is_empty() {
            vec![DEFAULT_TARGET.to_string()]
        } else {
            args.targets.clone()
        };
        for spec in &specs {
            let (name, target) = parse_target(spec)?;
            from_file.insert(name, target);
        }
        let mut targets: Vec<(String, TargetConfig)> = from_file.into_iter().collect();
        let columns = args
            .mask_columns
            .iter()
            .map(|spec| parse_mask_column(spec))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Every target masked with every detector (a file's too), unless
        // --no-masking.
        for (_, t) in &mut targets {
            if args.no_masking {
                t.masking = None;
            } else {
                let m = t.masking.get_or_insert_with(Default::default);
                m.columns.extend(columns.iter().cloned());
            }
        }
        Ok(Self {
            data_dir: args.data_dir.clone(),
            nats_url: args.nats.clone(),
            audit_db: args.audit_db.clone(),
            targets,
            pg_listen: args.pg_listen.clone(),
            http_listen: args.http_listen.clone(),
            events: EventLogConfig {
                nats_url: args.nats.clone().unwrap_or_default(),
                ..Default::default()
            },
            consumer: ControlPlaneConfig::default().consumer,
            cancel_subject: WorkerConfig::default().cancel_subject,
            allow_plaintext: false,
            policy: PolicyConfig::default(),
            bundle: match &args.policies {
                Some(dir) => {
                    let b = Bundle::from_dir(dir)
                        .map_err(|e| anyhow::anyhow!("--policies {}: {e}", dir.display()))?;
                    Engine::new(&b)
                        .map_err(|e| anyhow::anyhow!("--policies {}: {e}", dir.display()))?;
                    b
                }
                None => Bundle::defaults(),
            },
        })
    }
}

/// A worker started by [`DevStack::spawn_worker`]; dropping the handle
/// stops the worker.
pub struct ExtraWorker {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), gatehouse_worker::WorkerError>>,
}

impl ExtraWorker {
    /// Shuts the worker down (draining its sessions) and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(())
    }
}

/// A running dev stack.
pub struct DevStack {
    pub pg_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub issuer: Arc<DevIssuer>,
    pub targets: Vec<String>,
    /// Version of the bundle published at start.
    pub bundle_version: u64,
    worker_config: WorkerConfig,
    policy_config: PolicyConfig,
    /// The event log and streams of records the stack runs on.
    pub log: LogBackend,
    /// The audit tables.
    pub audit: AuditStore,
    verifier: Arc<Verifier>,
    stop: watch::Sender<bool>,
    worker: JoinHandle<anyhow::Result<()>>,
    control_plane: JoinHandle<anyhow::Result<()>>,
}

impl DevStack {
    /// A token for `sub` with the given groups, valid for an hour.
    pub fn token(&self, sub: &str, groups: &[&str]) -> String {
        self.issuer.mint(&TokenRequest {
            subject: sub.into(),
            username: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audience: DEV_AUDIENCE.into(),
            ttl: Duration::from_secs(3600),
            actors: Vec::new(),
        })
    }

    /// A token for the HTTP API for `sub` with the given groups, valid for
    /// an hour.
    pub fn api_token(&self, sub: &str, groups: &[&str]) -> String {
        self.issuer.mint(&TokenRequest {
            subject: sub.into(),
            username: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audience: DEV_API_AUDIENCE.into(),
            ttl: Duration::from_secs(3600),
            actors: Vec::new(),
        })
    }

    /// Starts one more worker on `listen` with the stack's configuration as
    /// changed by `configure`, as a fleet behind a load balancer would have;
    /// it stops with the stack.
    pub async fn spawn_worker(
        &self,
        listen: &str,
        configure: impl FnOnce(&mut WorkerConfig),
    ) -> anyhow::Result<ExtraWorker> {
        let mut config = self.worker_config.clone();
        configure(&mut config);
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, own) = watch::channel(false);
        let stack = self.stop.subscribe();
        let task = tokio::spawn(gatehouse_worker::run(
            config,
            self.policy_config.clone(),
            self.log.clone(),
            self.verifier.clone(),
            listener,
            async move {
                tokio::select! {
                    _ = stopped(own) => {}
                    _ = stopped(stack) => {}
                }
            },
        ));
        Ok(ExtraWorker { addr, stop, task })
    }

    /// Stops both parts and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.worker.await??;
        self.control_plane.await??;
        Ok(())
    }

    /// Resolves when either part stops by itself (an error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            r = &mut self.worker => r?.context("worker stopped"),
            r = &mut self.control_plane => r?.context("control plane stopped"),
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Starts a worker and the control plane in this process.
pub async fn start(mut opts: DevOptions) -> anyhow::Result<DevStack> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("--data-dir: cannot create {}", opts.data_dir.display()))?;
    let (cert, key) = ensure_tls(&opts.data_dir)?;

    let http = TcpListener::bind(&opts.http_listen)
        .await
        .with_context(|| format!("--http-listen: cannot listen on {}", opts.http_listen))?;
    let http_addr = http.local_addr()?;
    let issuer_url = format!("http://{http_addr}/dev-issuer");
    let issuer = Arc::new(
        DevIssuer::load_or_create(&opts.data_dir, &issuer_url)
            .context("cannot create the development issuer key")?,
    );
    std::fs::write(opts.data_dir.join("issuer-url"), &issuer_url)?;
    let verifier = Arc::new(
        Verifier::new(VerifierConfig {
            issuer: issuer_url.clone(),
            allow_http: true,
            jwks_refresh_min_interval_secs: 1,
            ..Default::default()
        })
        .map_err(anyhow::Error::msg)?,
    );

    // Bundles are signed: the control plane gets a key made for this run
    // (unless the caller gave one), its workers only the public key.
    if opts.policy.signing_key.is_none() {
        let (key, _) = gatehouse_policystore::SigningKey::generate();
        opts.policy.signing_key = Some(key);
    }
    let mut worker_policy = PolicyConfig {
        signing_key: None,
        ..opts.policy.clone()
    };
    if let Some(key) = &opts.policy.signing_key {
        let public = key.public_key().to_string();
        // For workers started beside this stack (`policy.bundle_public_keys`).
        std::fs::write(opts.data_dir.join("bundle-public-key"), &public)?;
        worker_policy.bundle_public_keys.push(public);
    }
    let log = match &opts.nats_url {
        Some(url) => {
            // The URL chosen is the one connected to, recorded and shown.
            let config = EventLogConfig {
                nats_url: url.clone(),
                ..opts.events.clone()
            };
            LogBackend::Nats {
                client: connect_nats(&config).await?,
                config,
            }
        }
        None => LogBackend::Embedded {
            log: EmbeddedLog::open(&opts.data_dir.join("gatehouse.db"))
                .await
                .context("cannot open the embedded event log")?,
            config: opts.events.clone(),
        },
    };
    let bundle_version = publish_bundle(&log, &opts).await?;
    let control = ControlPlaneConfig {
        audit_db_url: opts
            .audit_db
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", opts.data_dir.join("audit.db").display())),
        consumer: opts.consumer.clone(),
        ..Default::default()
    };
    // Fail early, with a clear message, when the audit database is unreachable.
    let audit = gatehouse_control_plane::connect_audit_db(&control)
        .await
        .context("--audit-db: cannot prepare the audit database")?;

    let mut worker = WorkerConfig {
        listen: opts.pg_listen.clone(),
        tls_cert_file: Some(cert),
        tls_key_file: Some(key),
        allow_plaintext: opts.allow_plaintext,
        cancel_subject: opts.cancel_subject.clone(),
        // Ctrl-C on a dev stack should not wait long for open sessions.
        drain_timeout_secs: 2,
        // Shared by the stack's workers (`spawn_worker` clones this), so
        // they forward cancel requests to each other.
        cancel_key: Some(CancelKey(
            [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
                .iter()
                .flat_map(|u| *u.as_bytes())
                .collect(),
        )),
        ..Default::default()
    };
    worker.targets = opts.targets.iter().cloned().collect();
    let oidc = VerifierConfig {
        issuer: issuer_url.clone(),
        allow_http: true,
        ..Default::default()
    };
    worker.prepare(&oidc).map_err(anyhow::Error::msg)?;
    warn_development_mode(
        Config {
            oidc,
            events: opts.events.clone(),
            worker: worker.clone(),
            control_plane: control.clone(),
            ..Default::default()
        },
        log.nats().is_some(),
    );
    let pg = TcpListener::bind(&opts.pg_listen)
        .await
        .with_context(|| format!("--pg-listen: cannot listen on {}", opts.pg_listen))?;
    let pg_addr = pg.local_addr()?;

    let (stop, rx) = watch::channel(false);
    let worker_config = worker.clone();
    let worker_task = tokio::spawn({
        let (policy, log, verifier, rx) = (
            worker_policy.clone(),
            log.clone(),
            verifier.clone(),
            rx.clone(),
        );
        async move {
            gatehouse_worker::run(worker, policy, log, verifier, pg, stopped(rx)).await?;
            Ok(())
        }
    });
    let control_task = tokio::spawn(gatehouse_control_plane::run(
        control,
        opts.policy.clone(),
        log.clone(),
        http,
        verifier.clone(),
        axum::Router::new().nest("/dev-issuer", issuer.router()),
        stopped(rx),
    ));
    Ok(DevStack {
        pg_addr,
        http_addr,
        issuer,
        targets: opts.targets.iter().map(|(n, _)| n.clone()).collect(),
        worker_config,
        policy_config: worker_policy,
        bundle_version,
        log,
        audit,
        verifier,
        stop,
        worker: worker_task,
        control_plane: control_task,
    })
}

/// Logs, at WARN, each setting production mode would refuse.
/// On the embedded log, the `events.*` NATS settings are not used and not
/// warned about.
fn warn_development_mode(config: Config, nats: bool) {
    let mut seen = std::collections::BTreeSet::new();
    for role in [Role::Worker, Role::ControlPlane] {
        for u in config.unsafe_settings(role) {
            if !nats && u.field.starts_with("events.") {
                continue;
            }
            if seen.insert(u.field.clone()) {
                tracing::warn!(
                    switch = u.switch.name(),
                    "development mode allows what production mode refuses: {u}"
                );
            }
        }
    }
}

/// Makes the dev stack's bundle the current one (signed, under the next
/// version), then records who did it; returns its version.
async fn publish_bundle(log: &LogBackend, opts: &DevOptions) -> anyhow::Result<u64> {
    let publisher = log.publisher().await?;
    let store = PolicyStore::open(&log.records(), &opts.policy).await?;
    let bundle = store.publish_bundle(&opts.bundle).await?.value;
    let event = gatehouse_events::Event::new(
        "gatehouse-dev",
        gatehouse_events::Payload::PolicyBundlePublished(gatehouse_events::PolicyBundlePublished {
            version: bundle.version.to_string(),
            hash: bundle.hash.clone(),
            files: bundle.files.iter().map(|(n, _)| n.clone()).collect(),
            dry_run: bundle.dry_run.is_some(),
            published_by: "gatehouse dev".into(),
            label: Some(bundle.label.clone()).filter(|l| !l.is_empty()),
            rollback_of: None,
            dry_run_scope: bundle
                .dry_run
                .as_ref()
                .map(|d| gatehouse_events::DryRunScope {
                    all_targets: d.all_targets,
                    targets: d.targets.clone(),
                    expires_at: d.expires_at,
                    set_by: d.set_by.clone(),
                }),
        }),
    );
    publisher
        .record(vec![event])
        .await
        .context("cannot record the policy bundle publication")?;
    Ok(bundle.version)
}

/// `gatehouse dev`
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    init_logging(&LogConfig::default());
    let opts = DevOptions::from_args(&args)?;
    let mut stack = start(opts).await?;
    let first = stack.targets.first().cloned().unwrap_or_default();
    let bin = std::env::args()
        .next()
        .unwrap_or_else(|| "gatehouse".into());
    println!(
        "\nGatehouse is running (development mode).\n\
         \n  Postgres front end   {pg} (TLS, self-signed certificate in {dir})\
         \n  Event log            {log}{log_hint}\
         \n  Audit tables         {audit}\
         \n  Audit API            http://{http}/api/v1/commands\
         \n  Development issuer   http://{http}/dev-issuer\
         \n  Targets              {targets}\
         \n  Policies             {policies} (version {version})\
         \n  Masking              {masking}\
         \n\nConnect with psql:\n\
         \n  PGPASSWORD=$({bin} token --data-dir {dir} --sub dev) psql \"host={host} port={port} user=dev dbname={first} sslmode=require\"\
         \n\nRead the audit trail:\n\
         \n  curl -H \"Authorization: Bearer $({bin} token --data-dir {dir} --for api --sub auditor --group auditors)\" http://{http}/api/v1/commands\
         \n\nCtrl-C stops it.\n",
        pg = stack.pg_addr,
        log = stack.log.describe(),
        log_hint = if stack.log.nats().is_none() {
            " (--nats nats://… puts it on NATS JetStream)"
        } else {
            ""
        },
        audit = match stack.audit.kind() {
            "sqlite" => format!(
                "embedded: {} (--audit-db postgres://… puts them in PostgreSQL)",
                args.data_dir.join("audit.db").display()
            ),
            _ => "PostgreSQL (--audit-db)".to_string(),
        },
        http = stack.http_addr,
        dir = args.data_dir.display(),
        targets = stack.targets.join(", "),
        policies = match &args.policies {
            Some(dir) => dir.display().to_string(),
            None => "built-in defaults (policies/defaults: everyone may connect and query; \
                     agents read-only; no DDL on targets tagged prod; UPDATE/DELETE without \
                     WHERE needs approval; dangerous functions for dba only; group pii-readers \
                     sees values unmasked)"
                .to_string(),
        },
        masking = if args.no_masking {
            "off (--no-masking)".to_string()
        } else {
            format!(
                "every detector (e-mail, card, keys, …){} on every target, for those \
                 no `unmask` permit applies to (--no-masking turns it off)",
                if args.mask_columns.is_empty() {
                    String::new()
                } else {
                    format!(", and columns {}", args.mask_columns.join(", "))
                }
            )
        },
        version = stack.bundle_version,
        host = stack.pg_addr.ip(),
        port = stack.pg_addr.port(),
    );
    tokio::select! {
        r = stack.wait() => r,
        _ = shutdown_signal() => stack.stop().await,
    }
}

/// `gatehouse token`
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let url_file = args.data_dir.join("issuer-url");
    let issuer_url = std::fs::read_to_string(&url_file).with_context(|| {
        format!(
            "no development issuer in {}: start `gatehouse dev --data-dir {}` first",
            args.data_dir.display(),
            args.data_dir.display()
        )
    })?;
    let issuer = DevIssuer::load_or_create(&args.data_dir, issuer_url.trim())?;
    let ttl =
        gatehouse_identity::parse_ttl(&args.ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    println!(
        "{}",
        issuer.mint(&TokenRequest {
            subject: args.sub,
            username: args.username,
            groups: args.groups,
            audience: args.aud.unwrap_or_else(|| {
                match args.plane {
                    TokenPlane::Worker => DEV_AUDIENCE,
                    TokenPlane::Api => DEV_API_AUDIENCE,
                }
                .into()
            }),
            ttl,
            actors: args.actors,
        })
    );
    Ok(())
}

/// A self-signed certificate for `localhost`/`127.0.0.1`, made once.
fn ensure_tls(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("tls-cert.pem");
    let key = dir.join("tls-key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .context("cannot generate a TLS certificate")?;
    std::fs::write(&cert, generated.cert.pem())?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
    Ok((cert, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// Parses `NAME=postgres://user[:password]@host[:port]/database[?sslmode=…]`.
/// `--mask-column PATTERN[=STYLE]`.
fn parse_mask_column(spec: &str) -> anyhow::Result<ColumnRuleConfig> {
    let (pattern, style) = spec.split_once('=').unwrap_or((spec, "redact"));
    let style = match style {
        "redact" => StyleName::Redact,
        "partial" => StyleName::Partial,
        "pseudonym" => StyleName::Pseudonym,
        other => anyhow::bail!(
            "--mask-column {spec}: unknown style \"{other}\" (redact, partial or pseudonym)"
        ),
    };
    Ok(ColumnRuleConfig {
        pattern: pattern.to_string(),
        style,
        keep_last: 4,
    })
}

pub fn parse_target(spec: &str) -> anyhow::Result<(String, TargetConfig)> {
    let (name, url) = spec
        .split_once('=')
        .with_context(|| format!("--target {spec:?}: expected NAME=postgres://…"))?;
    let fail = |why: &str| anyhow::anyhow!("--target {name}: {why}");
    if name.is_empty() {
        bail!("--target: the name before '=' is empty");
    }
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| fail("the URL must start with postgres://"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, database) = rest
        .split_once('/')
        .ok_or_else(|| fail("the URL names no database"))?;
    let (userinfo, hostport) = authority
        .rsplit_once('@')
        .ok_or_else(|| fail("the URL names no user"))?;
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
        None => (percent_decode(userinfo), None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse().map_err(|_| fail("the port is not a number"))?,
        ),
        None => (hostport.to_string(), 5432),
    };
    let mut tls = TargetTls::VerifyFull;
    let mut ca = None;
    let mut channel_binding = ChannelBinding::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", "disable")) => tls = TargetTls::Disable,
            Some(("sslmode", "require")) => tls = TargetTls::Require,
            Some(("sslmode", mode @ ("prefer" | "allow"))) => {
                return Err(fail(&format!(
                    "sslmode={mode} would fall back to an unencrypted connection; \
                     use verify-full (the default), require or disable"
                )));
            }
            Some(("sslmode", "verify-full" | "verify-ca")) => tls = TargetTls::VerifyFull,
            Some(("sslrootcert", path)) => ca = Some(PathBuf::from(percent_decode(path))),
            Some(("channel_binding", "prefer")) => channel_binding = ChannelBinding::Prefer,
            Some(("channel_binding", "require")) => channel_binding = ChannelBinding::Require,
            Some(("channel_binding", "disable")) => channel_binding = ChannelBinding::Disable,
            _ => return Err(fail(&format!("unsupported URL parameter {pair:?}"))),
        }
    }
    Ok((
        name.to_string(),
        TargetConfig {
            host,
            port,
            database: percent_decode(database),
            user,
            password_env: None,
            password_file: None,
            tls,
            tls_ca_file: ca,
            auth_methods: None,
            channel_binding,
            environment: String::new(),
            tags: Vec::new(),
            masking: Some(MaskingConfig::default()),
            password,
            masker: None,
        },
    ))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_a_config_file_and_the_command_line() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            dev: DevArgs,
        }
        let dir = std::env::temp_dir().join(format!("gatehouse-devcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gatehouse.toml");
        std::fs::write(
            &file,
            "[worker.targets.billing]\nhost = \"db.internal\"\nport = 6432\n\
             database = \"billing\"\nuser = \"svc\"\n",
        )
        .unwrap();
        let parse = |args: &[&str]| {
            let cli =
                <Cli as clap::Parser>::try_parse_from(["dev"].iter().chain(args).copied()).unwrap();
            DevOptions::from_args(&cli.dev).unwrap()
        };
        let config = file.to_str().unwrap();
        let opts = parse(&["--config", config]);
        let names: Vec<&str> = opts.targets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["billing"], "the file's target, not the default");
        let billing = &opts.targets[0].1;
        assert_eq!((billing.host.as_str(), billing.port), ("db.internal", 6432));
        assert!(billing.masking.is_some(), "masked like every dev target");

        let opts = parse(&["--config", config, "--target", "app=postgres://u@h/app"]);
        let names: Vec<&str> = opts.targets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["app", "billing"]);
        let opts = parse(&["--config", config, "--no-masking"]);
        assert!(opts.targets[0].1.masking.is_none());
        std::fs::write(&file, "[worker.targets.x]\nnope = 1\n").unwrap();
        let cli = <Cli as clap::Parser>::try_parse_from(["dev", "--config", config]).unwrap();
        let Err(e) = DevOptions::from_args(&cli.dev) else {
            panic!("an unknown key in a target is refused");
        };
        let e = format!("{e:#}");
        assert!(e.contains("gatehouse.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn target_urls_parse() {
        let (name, t) =
            parse_target("app=postgres://svc:p%40ss@db.example:6432/app_db?sslmode=require")
                .unwrap();
        assert_eq!(name, "app");
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("db.example", 6432, "app_db")
        );
        assert_eq!(
            (t.user.as_str(), t.password.as_deref()),
            ("svc", Some("p@ss"))
        );
        assert_eq!(t.tls, TargetTls::Require);
        let (_, t) = parse_target("x=postgresql://u@h/d").unwrap();
        assert_eq!(
            (t.port, t.tls, t.password),
            (5432, TargetTls::VerifyFull, None)
        );
    }

    #[test]
    fn bad_target_urls_say_why() {
        for (spec, why) in [
            ("noequals", "expected NAME="),
            ("a=mysql://u@h/d", "postgres://"),
            ("a=postgres://u@h", "no database"),
            ("a=postgres://h/d", "no user"),
            ("a=postgres://u@h:x/d", "port"),
            ("a=postgres://u@h/d?sslmode=bogus", "unsupported"),
        ] {
            let e = parse_target(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }
}
