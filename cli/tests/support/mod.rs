//! A whole Gatehouse (the `gatehouse dev` stack) per test, against the real
//! NATS and PostgreSQL of the machine, with names no other test uses: its
//! own stream, subjects, consumer, audit database and target database.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gatehouse::dev::{self, DevOptions, DevStack};
use gatehouse_eventlog::EventLogConfig;
use serde_json::Value;

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
pub const NATS: &str = "nats://127.0.0.1:4222";

pub struct Env {
    pub stack: Option<DevStack>,
    pub policy: gatehouse_policystore::PolicyConfig,
    pub suffix: String,
    pub target_db: String,
    pub audit_db: String,
    pub events: EventLogConfig,
    pub data_dir: PathBuf,
    pub http: reqwest::Client,
    _watchdog: gatehouse_testkit::Watchdog,
}

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn admin() -> tokio_postgres::Client {
    direct_db("postgres").await
}

/// A plain connection straight to the machine's PostgreSQL.
pub async fn direct_db(db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&format!("{PG}/{db}"), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    tokio::spawn(conn);
    client
}

/// Rows of `sql` on an audit store, PostgreSQL or SQLite: the SQL must
/// mean the same on both (`$1`… bound to `params` in order).
pub async fn audit_query<T>(
    store: &gatehouse_control_plane::AuditStore,
    sql: &str,
    params: &[&str],
) -> Vec<T>
where
    T: Send
        + Unpin
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
{
    store
        .query(sql, params)
        .await
        .expect("the audit query runs")
}

/// `SELECT count(*) …` on an audit store.
pub async fn audit_count(
    store: &gatehouse_control_plane::AuditStore,
    sql: &str,
    params: &[&str],
) -> i64 {
    let rows: Vec<(i64,)> = audit_query(store, sql, params).await;
    rows[0].0
}

/// The default bundle with `annotations` (e.g. `@approval_timeout("1s")`)
/// added to its approval forbid.
pub fn defaults_with_approval(annotations: &str) -> gatehouse_policies::Bundle {
    let defaults = gatehouse_policies::Bundle::defaults();
    let files = defaults
        .files
        .iter()
        .map(|(name, text)| {
            let text = if name.contains("need-approval") {
                text.replace(
                    "@approval(\"required\")",
                    &format!("@approval(\"required\")\n{annotations}"),
                )
            } else {
                text.clone()
            };
            (name.clone(), text)
        })
        .collect();
    gatehouse_policies::Bundle::new("approval-test", files, defaults.schema.clone())
}

pub struct Options {
    pub nats_url: String,
    /// The embedded event log and audit store (a SQLite file each in the
    /// data directory) instead of NATS and PostgreSQL (`nats_url` unused).
    /// The default comes from `GATEHOUSE_TEST_EVENT_LOG=embedded`, so that
    /// the same tests run on either.
    pub embedded: bool,
    pub allow_plaintext: bool,
    pub publish_timeout_ms: u64,
    /// The bundle published at start (the built-in defaults unless set).
    pub bundle: gatehouse_policies::Bundle,
    /// The target's masking (`gatehouse dev`'s default: every detector).
    pub masking: Option<gatehouse_worker::masking::MaskingConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nats_url: NATS.into(),
            embedded: std::env::var("GATEHOUSE_TEST_EVENT_LOG").is_ok_and(|v| v == "embedded"),
            allow_plaintext: false,
            publish_timeout_ms: 5000,
            bundle: gatehouse_policies::Bundle::defaults(),
            masking: Some(Default::default()),
        }
    }
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Env {
        init();
        let watchdog = gatehouse_testkit::Watchdog::for_test();
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let target_db = format!("gh_target_{suffix}");
        let audit_db = format!("gh_audit_{suffix}");
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {target_db}"))
            .await
            .unwrap();
        let data_dir = std::env::temp_dir().join(format!("gatehouse-test-{suffix}"));
        let events = EventLogConfig {
            nats_url: opts.nats_url.clone(),
            stream: format!("GHT_{suffix}"),
            subject_prefix: format!("ght.{suffix}.events"),
            publish_timeout_ms: opts.publish_timeout_ms,
            ..Default::default()
        };
        let (_, mut target) =
            dev::parse_target(&format!("app={PG}/{target_db}?sslmode=require")).unwrap();
        target.masking = opts.masking;
        let policy = gatehouse_policystore::PolicyConfig {
            bundle_stream: format!("GHT_{suffix}_POLICIES"),
            revocation_stream: format!("GHT_{suffix}_REVOCATIONS"),
            ..Default::default()
        };
        let stack = dev::start(DevOptions {
            data_dir: data_dir.clone(),
            nats_url: (!opts.embedded).then_some(opts.nats_url),
            audit_db: (!opts.embedded).then(|| format!("{PG}/{audit_db}?sslmode=disable")),
            targets: vec![("app".into(), target)],
            pg_listen: "127.0.0.1:0".into(),
            http_listen: "127.0.0.1:0".into(),
            events: events.clone(),
            consumer: format!("ght-{suffix}"),
            cancel_subject: format!("ght.{suffix}.cancel"),
            allow_plaintext: opts.allow_plaintext,
            policy: policy.clone(),
            bundle: opts.bundle,
        })
        .await
        .expect("dev stack starts");
        // The worker is up once it has announced its target (what a request
        // for access looks up).
        let approvals = gatehouse_policystore::approvals::Approvals::open(
            &stack.log.records(),
            &policy.revocation_stream,
        )
        .await
        .expect("the approvals stream opens");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while approvals.target("app").await.ok().flatten().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker did not announce its target"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Env {
            stack: Some(stack),
            policy,
            suffix,
            target_db,
            audit_db,
            events,
            data_dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            _watchdog: watchdog,
        }
    }

    /// Rows of `sql` on the stack's audit store ([`audit_query`]).
    pub async fn audit_query<T>(&self, sql: &str, params: &[&str]) -> Vec<T>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        audit_query(&self.stack().audit, sql, params).await
    }

    /// `SELECT count(*) …` on the stack's audit store.
    pub async fn audit_count(&self, sql: &str, params: &[&str]) -> i64 {
        audit_count(&self.stack().audit, sql, params).await
    }

    /// Every message body of the test's event stream, as published.
    pub async fn stream_bodies(&self) -> Vec<String> {
        use futures::StreamExt;
        if let gatehouse_eventlog::LogBackend::Embedded { log, .. } = &self.stack().log {
            let events = log.read(0, usize::MAX).await.unwrap();
            return events
                .into_iter()
                .map(|e| String::from_utf8_lossy(&e.body).into_owned())
                .collect();
        }
        let nats = async_nats::connect(&self.events.nats_url).await.unwrap();
        let js = async_nats::jetstream::new(nats);
        let stream = js.get_stream(&self.events.stream).await.unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut bodies = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(1), messages.next()).await;
            match next {
                Ok(Some(Ok(m))) => bodies.push(String::from_utf8_lossy(&m.payload).into_owned()),
                _ => return bodies,
            }
        }
    }

    pub fn stack(&self) -> &DevStack {
        self.stack.as_ref().expect("running")
    }

    pub fn token(&self, sub: &str) -> String {
        self.stack().token(sub, &[])
    }

    /// A `key=value` libpq connection string to the worker.
    pub fn conninfo(&self, user: &str, db: &str, sslmode: &str) -> String {
        let addr = self.stack().pg_addr;
        format!(
            "host={} port={} user={user} dbname={db} sslmode={sslmode}",
            addr.ip(),
            addr.port()
        )
    }

    /// TLS settings that trust the dev stack's self-signed certificate.
    pub fn tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(self.data_dir.join("tls-cert.pem")).unwrap();
        for cert in rustls_pemfile_certs(&pem) {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    }

    /// A tokio-postgres session through the worker over verified TLS.
    pub async fn connect(&self, user: &str) -> tokio_postgres::Client {
        self.try_connect(user, &self.token(user))
            .await
            .expect("connects through the worker")
    }

    pub async fn try_connect(
        &self,
        user: &str,
        token: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config: tokio_postgres::Config =
            self.conninfo(user, "app", "require").parse().unwrap();
        config.password(token);
        let (client, conn) = config.connect(self.tls()).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A plain connection to the target database, bypassing the gateway.
    pub async fn target(&self) -> tokio_postgres::Client {
        direct_db(&self.target_db).await
    }

    /// The ids in table `t` of the target database, read directly.
    pub async fn target_ids(&self) -> Vec<i32> {
        self.target()
            .await
            .query("SELECT id FROM t ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.stack().http_addr)
    }

    /// Every projected command of `identity`, oldest first, once `expect`
    /// of them have arrived (or after a timeout, with what there is).
    pub async fn audit_commands(&self, identity: &str, expect: usize) -> Vec<Value> {
        let token = self.stack().api_token("test-auditor", &["auditors"]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut url = format!("{}?user={identity}&limit=500", self.api("/api/v1/commands"));
                if let Some(c) = &cursor {
                    url.push_str(&format!("&cursor={c}"));
                }
                let page: Value = self
                    .http
                    .get(url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .error_for_status()
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                items.extend(page["items"].as_array().unwrap().iter().cloned());
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            if items.len() >= expect || tokio::time::Instant::now() > deadline {
                items.reverse();
                return items;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pending approvals an approver sees, once there are `n`.
    pub async fn pending_approvals(&self, n: usize) -> Vec<Value> {
        let token = self.stack().api_token("watcher", &["approvers"]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let body = self
                .api_get(&token, "/api/v1/approvals?state=pending")
                .await;
            let list = body["approvals"].as_array().unwrap().clone();
            if list.len() >= n {
                return list;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} pending approvals expected, found {list:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POSTs an approver's decision (`grant` or `deny`) on approval `id`:
    /// the status and the body.
    pub async fn decide_approval(
        &self,
        approver: &str,
        id: &str,
        verb: &str,
        body: Value,
    ) -> (u16, Value) {
        let token = self.stack().api_token(approver, &["approvers"]);
        self.api_post(&token, &format!("/api/v1/approvals/{id}/{verb}"), body)
            .await
    }

    /// GET `path` of the API with `token`: the JSON of a 2xx answer.
    pub async fn api_get(&self, token: &str, path: &str) -> Value {
        self.http
            .get(self.api(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs `body` to `path` of the API with `token`: the status and the
    /// body.
    pub async fn api_post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.api(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Statement texts of `identity`'s projected commands, oldest first.
    pub async fn audit_statements(&self, identity: &str, expect: usize) -> Vec<String> {
        self.audit_commands(identity, expect)
            .await
            .iter()
            .map(|c| c["statement"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn cleanup(mut self) {
        if let Some(stack) = self.stack.take() {
            stack.stop().await.expect("clean stop");
        }
        if let Ok(nats) = async_nats::connect(&self.events.nats_url).await {
            let js = async_nats::jetstream::new(nats);
            let _ = js.delete_stream(&self.events.stream).await;
            let _ = js.delete_stream(&self.policy.bundle_stream).await;
            let _ = js.delete_stream(&self.policy.revocation_stream).await;
            for registry in ["USERNAMES", "APPROVALS"] {
                let _ = js
                    .delete_stream(format!("{}_{registry}", self.policy.revocation_stream))
                    .await;
            }
        }
        let admin = admin().await;
        // DROP DATABASE waits until every backend of the server has taken
        // note, and one stuck elsewhere (say, in a COPY whose client went
        // quiet) would hold it forever: leave the database rather than hang.
        let _ = admin.batch_execute("SET statement_timeout = '60s'").await;
        for db in [&self.target_db, &self.audit_db] {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

pub fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The SQLSTATE and message of an ErrorResponse (or what else it was).
pub fn refusal(err: &tokio_postgres::Error) -> (String, String) {
    match err.as_db_error() {
        Some(e) => (e.code().code().to_string(), e.message().to_string()),
        None => (format!("not an ErrorResponse: {err}"), String::new()),
    }
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
