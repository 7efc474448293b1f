//! A control plane per test against the machine's NATS (127.0.0.1:4222,
//! JetStream) and PostgreSQL (127.0.0.1:5432, trust), with names no other
//! test uses: its own streams, subjects, consumer and audit database, and
//! an OIDC issuer served in the test.
#![allow(dead_code)]

use std::future::IntoFuture;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::FutureExt;
use gatehouse_control_plane::{ControlPlaneConfig, run};
use gatehouse_eventlog::EventLogConfig;
use gatehouse_identity::{DevIssuer, TokenRequest, Verifier, VerifierConfig};
use gatehouse_policystore::{PolicyConfig, PolicyStore, SigningKey};
use gatehouse_testkit::eventually;
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
pub const ADMINS: &str = "policy-admins";
pub const PERMIT_ALL: &str = "@id(\"all\") permit (principal, action, resource);";

pub struct Env {
    pub js: jetstream::Context,
    pub nats: async_nats::Client,
    pub events: EventLogConfig,
    pub config: ControlPlaneConfig,
    pub database: String,
    pub issuer: DevIssuer,
    pub verifier: Arc<Verifier>,
    pub http: reqwest::Client,
    /// The control plane's bundle signing key.
    pub signing_key: SigningKey,
    _watchdog: gatehouse_testkit::Watchdog,
}

/// A running control plane.
pub struct Running {
    pub url: String,
    /// A token of `admin-1`, a member of [`ADMINS`].
    pub admin: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Env {
    /// Names start with `prefix` (its streams with it upper-cased).
    pub async fn new(prefix: &str) -> Self {
        let watchdog = gatehouse_testkit::Watchdog::for_test();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("gatehouse_control_plane=debug")
            .with_test_writer()
            .try_init();
        let id = Uuid::new_v4().simple().to_string();
        let nats_url = "nats://127.0.0.1:4222";
        let nats = async_nats::connect(nats_url).await.unwrap();
        let events = EventLogConfig {
            nats_url: nats_url.into(),
            stream: format!("{}_{id}", prefix.to_uppercase()),
            subject_prefix: format!("{prefix}.{id}.events"),
            ..Default::default()
        };
        let database = format!("gh_{prefix}_{id}");
        let config = ControlPlaneConfig {
            audit_db_url: format!("{SERVER}/{database}?sslmode=disable"),
            consumer: format!("{prefix}-{id}"),
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer_url = format!("http://{}", listener.local_addr().unwrap());
        let issuer = DevIssuer::generate(&issuer_url);
        tokio::spawn(axum::serve(listener, issuer.router()).into_future());
        let verifier = Verifier::new(VerifierConfig {
            issuer: issuer_url,
            allow_http: true,
            ..Default::default()
        })
        .unwrap();
        Self {
            js: jetstream::new(nats.clone()),
            nats,
            events,
            config,
            database,
            issuer,
            verifier: Arc::new(verifier),
            http: reqwest::Client::new(),
            signing_key: SigningKey::generate().0,
            _watchdog: watchdog,
        }
    }

    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            bundle_stream: format!("{}_POLICIES", self.events.stream),
            revocation_stream: format!("{}_REVOCATIONS", self.events.stream),
            signing_key: Some(self.signing_key.clone()),
            ..Default::default()
        }
    }

    /// Starts a control plane and waits until it is ready.
    pub async fn start(&self) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            self.config.clone(),
            self.policy(),
            gatehouse_eventlog::LogBackend::Nats {
                client: self.nats.clone(),
                config: self.events.clone(),
            },
            listener,
            self.verifier.clone(),
            axum::Router::new(),
            async move {
                let _ = stopped.await;
            },
        ));
        eventually("the control plane to start", || async {
            self.http
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        let admin = self.issuer.mint(&TokenRequest {
            subject: "admin-1".into(),
            username: Some("admin".into()),
            groups: vec![ADMINS.into()],
            audience: "gatehouse-api".into(),
            ttl: Duration::from_secs(300),
            actors: vec![],
        });
        Running {
            url,
            admin,
            stop,
            task,
        }
    }

    /// A token of `subject` with `groups`, acting through `actors` (current
    /// actor first; empty: acting for itself).
    pub fn token(&self, subject: &str, groups: &[&str], actors: &[&str]) -> String {
        self.issuer.mint(&TokenRequest {
            subject: subject.into(),
            username: Some(subject.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audience: "gatehouse-api".into(),
            ttl: Duration::from_secs(300),
            actors: actors.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Runs `body`, then removes the streams and the database, whether it
    /// passed or not.
    pub async fn scope(self, body: impl AsyncFnOnce(&Env)) {
        let result = AssertUnwindSafe(body(&self)).catch_unwind().await;
        let _ = self.js.delete_stream(&self.events.stream).await;
        let policy = self.policy();
        let _ = self.js.delete_stream(&policy.bundle_stream).await;
        let _ = self.js.delete_stream(&policy.revocation_stream).await;
        for registry in ["USERNAMES", "APPROVALS"] {
            let _ = self
                .js
                .delete_stream(format!("{}_{registry}", policy.revocation_stream))
                .await;
        }
        let mut admin = PgConnection::connect(&format!("{SERVER}/postgres"))
            .await
            .unwrap();
        // Two statements in one string would run as one transaction block,
        // where DROP DATABASE is refused: send them apart.
        sqlx::raw_sql("SET statement_timeout = '60s'")
            .execute(&mut admin)
            .await
            .unwrap();
        let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut admin)
            .await
        {
            eprintln!("could not drop test database {}: {e}", self.database);
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    pub async fn store(&self) -> PolicyStore {
        PolicyStore::open(
            &gatehouse_eventlog::RecordStore::JetStream(self.js.clone()),
            &self.policy(),
        )
        .await
        .unwrap()
    }
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}
