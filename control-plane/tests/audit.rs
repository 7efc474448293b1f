//! End to end against the real NATS (127.0.0.1:4222, JetStream) and the real
//! PostgreSQL (postgres://postgres@127.0.0.1:5432, trust auth): events go into
//! JetStream, the control plane projects them and serves them over HTTP.
//! The scenarios that are not about NATS or PostgreSQL themselves run a
//! second time on a single node's stores: the embedded log and the SQLite
//! audit store.
//!
//! Each test has its own stream, subject prefix, consumer and audit database
//! (created by the code under test), or its own directory, removed at the
//! end even on failure.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, TimeDelta, Utc};
use futures::FutureExt;
use gatehouse_control_plane::{AuditStore, ControlPlaneConfig, connect_audit_db, run};
use gatehouse_eventlog::{EmbeddedLog, EventLogConfig};
use gatehouse_events::{AuthenticationFailed, ExecutedStatement, Param, ParamFormat};
use gatehouse_events::{
    CloseReason, CommandReceived, Event, EventType, Identity, Payload, Protocol, SessionClosed,
    SessionOpened, encode_batch,
};
use gatehouse_identity::{DevIssuer, TokenRequest, Verifier, VerifierConfig};
use gatehouse_testkit::{PrivateNats, eventually};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

struct Env {
    js: jetstream::Context,
    nats: async_nats::Client,
    /// The embedded log the events go to, instead of JetStream; then the
    /// audit store is a SQLite file in `dir`.
    embedded: Option<EmbeddedLog>,
    dir: std::path::PathBuf,
    events: EventLogConfig,
    config: ControlPlaneConfig,
    database: String,
    issuer: DevIssuer,
    verifier: Arc<Verifier>,
    _watchdog: gatehouse_testkit::Watchdog,
}

/// A control plane started by [`Env::start`].
struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

impl Env {
    async fn new() -> Self {
        Self::on("nats://127.0.0.1:4222").await
    }

    async fn on(nats_url: &str) -> Self {
        let watchdog = gatehouse_testkit::Watchdog::for_test();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("gatehouse_control_plane=debug")
            .with_test_writer()
            .try_init();
        let id = Uuid::new_v4().simple().to_string();
        let nats = async_nats::connect(nats_url).await.unwrap();
        let events = EventLogConfig {
            nats_url: nats_url.into(),
            stream: format!("CPTEST_{id}"),
            subject_prefix: format!("cptest.{id}.events"),
            ..Default::default()
        };
        let database = format!("gh_cp_{id}");
        let config = ControlPlaneConfig {
            audit_db_url: format!("{SERVER}/{database}?sslmode=disable"),
            consumer: format!("cptest-{id}"),
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
            embedded: None,
            dir: std::env::temp_dir().join(format!("gatehouse-cptest-{id}")),
            events,
            config,
            database,
            issuer,
            verifier: Arc::new(verifier),
            _watchdog: watchdog,
        }
    }

    /// On a single node's stores: the embedded log and a SQLite audit
    /// store, in a directory of the test's own.
    async fn embedded() -> Self {
        let mut env = Self::new().await;
        std::fs::create_dir_all(&env.dir).unwrap();
        let log = EmbeddedLog::open(&env.dir.join("gatehouse.db"))
            .await
            .unwrap();
        env.embedded = Some(log);
        env.config.audit_db_url = format!("sqlite:{}", env.dir.join("audit.db").display());
        env
    }

    fn log(&self) -> gatehouse_eventlog::LogBackend {
        match &self.embedded {
            Some(log) => gatehouse_eventlog::LogBackend::Embedded {
                log: log.clone(),
                config: self.events.clone(),
            },
            None => gatehouse_eventlog::LogBackend::Nats {
                client: self.nats.clone(),
                config: self.events.clone(),
            },
        }
    }

    /// Policy streams of this test only.
    fn policy(&self) -> gatehouse_policystore::PolicyConfig {
        gatehouse_policystore::PolicyConfig {
            bundle_stream: format!("{}_POLICIES", self.events.stream),
            revocation_stream: format!("{}_REVOCATIONS", self.events.stream),
            ..Default::default()
        }
    }

    async fn start(&self) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            self.config.clone(),
            self.policy(),
            self.log(),
            listener,
            self.verifier.clone(),
            axum::Router::new(),
            async move {
                let _ = stopped.await;
            },
        ));
        if self.embedded.is_none() {
            // The stream exists once the projector is up.
            eventually("the projector to start", || async {
                self.js.get_stream(&self.events.stream).await.is_ok()
            })
            .await;
        }
        Running { url, stop, task }
    }

    async fn publish(&self, ty: EventType, body: Vec<u8>) {
        let subject = self.events.subjects().for_type(ty);
        if let Some(log) = &self.embedded {
            // Every message is new, as on JetStream without a message id.
            let id = Uuid::now_v7().to_string();
            log.append(&[(subject, id, body)]).await.unwrap();
            return;
        }
        self.js
            .publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes one event as one message.
    async fn send(&self, event: &Event) {
        self.publish(event.event_type(), event.to_cloudevent())
            .await;
    }

    /// Publishes several events as one batch message.
    async fn send_batch(&self, events: &[Event]) {
        self.publish(events[0].event_type(), encode_batch(events))
            .await;
    }

    async fn db(&self) -> AuditStore {
        connect_audit_db(&self.config).await.unwrap()
    }

    fn is_postgres(&self) -> bool {
        self.embedded.is_none()
    }

    /// Waits until the consumer has nothing pending or unacknowledged and the
    /// events table holds `events` rows.
    async fn wait_projected(&self, db: &AuditStore, events: i64) {
        eventually("the projector to catch up", || async {
            if let Some(log) = &self.embedded {
                let position = log.position(&self.config.consumer).await.unwrap();
                return position == log.last_seq() && count(db, "events").await == events;
            }
            let stream = self.js.get_stream(&self.events.stream).await.unwrap();
            // The projector creates its consumer once it has started.
            let Ok(info) = stream.consumer_info(&self.config.consumer).await else {
                return false;
            };
            info.num_pending == 0
                && info.num_ack_pending == 0
                && count(db, "events").await == events
        })
        .await;
    }

    fn token(&self, subject: &str, username: &str, groups: &[&str]) -> String {
        self.issuer.mint(&TokenRequest {
            subject: subject.into(),
            username: Some(username.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audience: "gatehouse-api".into(),
            ttl: Duration::from_secs(300),
            actors: vec![],
        })
    }

    /// Runs `body`, then removes the stream and the database whatever happened.
    async fn scope(self, body: impl AsyncFnOnce(&Env)) {
        let result = AssertUnwindSafe(body(&self)).catch_unwind().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.embedded.is_some() {
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
            return;
        }
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
        // DROP DATABASE waits for every backend of the server; one stuck
        // elsewhere must not hang the test: leave the database instead.
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
}

async fn count(db: &AuditStore, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    match db.query::<(i64,)>(&sql, &[]).await {
        Ok(rows) => rows[0].0,
        Err(_) => -1,
    }
}

fn at(secs_after_base: f64) -> DateTime<Utc> {
    let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap();
    base.to_utc() + TimeDelta::milliseconds((secs_after_base * 1000.0) as i64)
}

fn who(subject: &str, username: &str) -> Identity {
    Identity {
        issuer: "https://issuer.example".into(),
        subject: subject.into(),
        username: username.into(),
        groups: vec!["dev".into()],
        delegation: vec![],
    }
}

fn event(session: Uuid, seq: u64, time: f64, who: &Identity, target: &str, p: Payload) -> Event {
    Event {
        session_id: Some(session),
        seq,
        time: at(time),
        identity: Some(who.clone()),
        target: Some(target.into()),
        ..Event::new("w-test", p)
    }
}

fn opened() -> Payload {
    Payload::SessionOpened(SessionOpened {
        client_addr: "127.0.0.1:50000".into(),
        client_tls: true,
        target_tls: true,
        application_name: Some("psql".into()),
        token_expires_at: None,
    })
}

fn closed(commands: u64) -> Payload {
    Payload::SessionClosed(SessionClosed {
        reason: CloseReason::ClientTerminated,
        commands,
        bytes_from_client: 100,
        bytes_to_client: 200,
        duration_ms: 6000,
    })
}

fn command(statement: &str) -> Payload {
    Payload::CommandReceived(CommandReceived {
        protocol: Protocol::Simple,
        statement: statement.into(),
        statement_name: None,
        portal: None,
        params: vec![],
        executes: vec![],
        decision: None,
        redactions: vec![],
        approval: None,
    })
}

struct Api<'a> {
    http: reqwest::Client,
    url: &'a str,
    token: Option<String>,
}

impl Api<'_> {
    async fn get(&self, path: &str) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// The `statement` of each item of a 200 list response.
    async fn statements(&self, path: &str) -> Vec<String> {
        let (status, _, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["statement"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_events_once_and_serves_audit_api() {
    Env::new().await.scope(audit_scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_events_once_and_serves_audit_api_on_a_single_node() {
    Env::embedded().await.scope(audit_scenario).await;
}

async fn audit_scenario(env: &Env) {
    let cp = env.start().await;
    let alice = who("u-alice", "alice");
    let bob = who("u-bob", "bob");
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let c1 = event(a, 2, 1.0, &alice, "app", command("select 1"));
    let batch = [
        event(a, 3, 2.0, &alice, "app", command("select 2")),
        event(a, 4, 3.0, &alice, "app", command("select 3")),
        event(a, 5, 4.0, &alice, "app", command("select 4")),
    ];
    let mut c5 = event(
        a,
        6,
        5.0,
        &alice,
        "app",
        command("insert into t values ($1)"),
    );
    if let Payload::CommandReceived(p) = &mut c5.payload {
        p.protocol = Protocol::Extended;
        p.statement_name = Some("s1".into());
        p.portal = Some(String::new());
        p.params = vec![Param {
            format: ParamFormat::Text,
            value: Some("42".into()),
            encoding: None,
        }];
    }
    let refused = AuthenticationFailed {
        client_addr: "127.0.0.1:50001".into(),
        client_tls: true,
        claimed_user: Some("mallory".into()),
        requested_target: Some("app".into()),
        reason: "token_expired".into(),
    };
    // PostgreSQL cannot store a NUL character: this event is refused by
    // the database and must not hold back the others.
    let nul = event(a, 9, 5.5, &alice, "app", command("select '\0'"));

    let a_opened = event(a, 1, 0.0, &alice, "app", opened());
    let a_closed = event(a, 7, 6.0, &alice, "app", closed(5));
    let b_opened = event(b, 1, 2.0, &bob, "billing", opened());
    let b1 = event(b, 2, 2.5, &bob, "billing", command("select b"));
    let b_closed = event(b, 3, 6.0, &bob, "billing", closed(1));
    let failed = Event::new("w-test", Payload::AuthenticationFailed(refused));

    env.send(&a_opened).await;
    env.send(&c1).await;
    env.send_batch(&batch).await;
    let garbage = b"{ not an event".to_vec();
    env.publish(EventType::CommandReceived, garbage).await;
    if env.is_postgres() {
        env.send(&nul).await;
    }
    // bob's session is closed before it is opened.
    env.send(&b_closed).await;
    env.send(&b1).await;
    env.send(&b_opened).await;
    env.send(&c5).await;
    env.send(&failed).await;
    env.send(&a_closed).await;
    // Duplicate deliveries of events already published.
    env.send(&c1).await;
    env.send_batch(&batch[1..]).await;

    let db = env.db().await;
    env.wait_projected(&db, 11).await;
    assert_eq!(count(&db, "commands").await, 6);
    // The garbage message and the NUL event (which only PostgreSQL
    // refuses): kept, not dropped.
    let quarantined: Vec<(Option<Uuid>, Vec<u8>)> = db
        .query(
            "SELECT event_id, raw FROM quarantine ORDER BY stream_seq",
            &[],
        )
        .await
        .unwrap();
    let mut expected = vec![(None, b"{ not an event".to_vec())];
    if env.is_postgres() {
        expected.push((Some(nul.id), nul.to_cloudevent()));
    }
    assert_eq!(quarantined, expected);
    assert_eq!(count(&db, "sessions").await, 2);
    assert_eq!(count(&db, "authentication_failures").await, 1);
    type Row = (Uuid, Time, Time, Text, Text);
    type Time = Option<DateTime<Utc>>;
    type Text = Option<String>;
    let bob_row: Vec<Row> = db
        .query(
            "SELECT session_id, opened_at, closed_at, close_reason, client_addr FROM sessions
             WHERE identity_username = 'bob'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        bob_row,
        [(
            b,
            Some(at(2.0)),
            Some(at(6.0)),
            Some("client_terminated".into()),
            Some("127.0.0.1:50000".into())
        )]
    );

    let auditor = env.token("u-carol", "carol", &["auditors"]);
    let api = Api {
        http: reqwest::Client::new(),
        url: &cp.url,
        token: Some(auditor),
    };

    // Health and readiness need no token.
    let anon = Api {
        http: api.http.clone(),
        url: &cp.url,
        token: None,
    };
    assert_eq!(
        anon.http
            .get(format!("{}/healthz", cp.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, _, body) = anon.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    if env.is_postgres() {
        assert_eq!(body["nats"], "connected");
        assert_eq!(body["audit_store"], "postgres");
    } else {
        assert_eq!(body["event_log"], "embedded");
        assert_eq!(body["audit_store"], "sqlite");
    }

    // Authentication and authorization.
    let (status, headers, body) = anon.get("/api/v1/commands").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert!(body["error"].is_string());
    let forged = Api {
        token: Some("e30.e30.sig".into()),
        http: api.http.clone(),
        url: &cp.url,
    };
    assert_eq!(forged.get("/api/v1/commands").await.0, 401);
    let developer = Api {
        token: Some(env.token("u-dave", "dave", &["dev"])),
        http: api.http.clone(),
        url: &cp.url,
    };
    let (status, _, body) = developer.get("/api/v1/sessions").await;
    assert_eq!(status, 403, "{body}");

    // Newest first, every command once.
    let all = api.statements("/api/v1/commands").await;
    assert_eq!(
        all,
        [
            "insert into t values ($1)",
            "select 4",
            "select 3",
            "select b",
            "select 2",
            "select 1"
        ]
    );
    let (_, _, body) = api.get("/api/v1/commands?limit=1").await;
    let item = &body["items"][0];
    assert_eq!(item["protocol"], "extended");
    assert_eq!(item["params"][0]["value"], "42");
    assert_eq!(item["identity_username"], "alice");
    assert_eq!(item["time"], "2026-01-01T00:00:05Z");

    // Cursor pagination walks the same list in pages.
    let mut pages = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/commands?limit=2&cursor={c}"),
            None => "/api/v1/commands?limit=2".into(),
        };
        let (status, _, body) = api.get(&path).await;
        assert_eq!(status, 200, "{body}");
        let page: Vec<String> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["statement"].as_str().unwrap().into())
            .collect();
        pages.push(page);
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.into()),
            None => break,
        }
    }
    assert_eq!(pages.len(), 3);
    assert_eq!(pages.concat(), all);

    // Filters: subjects and user names apart, never one for the other.
    assert_eq!(api.statements("/api/v1/commands?user=alice").await.len(), 5);
    assert_eq!(
        api.statements("/api/v1/commands?subject=u-alice")
            .await
            .len(),
        5
    );
    assert_eq!(
        api.statements("/api/v1/commands?subject=u-bob").await,
        ["select b"]
    );
    assert_eq!(
        api.statements("/api/v1/commands?user=bob").await,
        ["select b"]
    );
    assert!(
        api.statements("/api/v1/commands?subject=alice")
            .await
            .is_empty()
    );
    assert!(
        api.statements("/api/v1/commands?user=u-bob")
            .await
            .is_empty()
    );
    assert!(
        api.statements("/api/v1/commands?subject=u-alice&user=bob")
            .await
            .is_empty()
    );
    assert_eq!(
        api.get("/api/v1/sessions?identity=alice").await.0,
        400,
        "identity= mixed subjects and user names; it is gone"
    );
    assert_eq!(
        api.statements("/api/v1/commands?target=billing").await,
        ["select b"]
    );
    assert_eq!(
        api.statements("/api/v1/commands?since=2026-01-01T00:00:03Z")
            .await,
        ["insert into t values ($1)", "select 4", "select 3"]
    );
    assert_eq!(
        api.statements(
            "/api/v1/commands?since=2026-01-01T00:00:02Z&until=2026-01-01T00:00:04Z&user=alice"
        )
        .await,
        ["select 3", "select 2"]
    );

    // Bad parameters name themselves.
    for (query, param) in [
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("cursor=xyz", "cursor"),
    ] {
        let (status, _, body) = api.get(&format!("/api/v1/commands?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().starts_with(param),
            "{query}: {body}"
        );
    }
    assert_eq!(api.get("/api/v1/commands?sort=asc").await.0, 400);

    // Sessions: bob's opened later than alice's.
    let (status, _, body) = api.get("/api/v1/sessions").await;
    assert_eq!(status, 200, "{body}");
    let users: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["identity_username"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["bob", "alice"]);
    assert_eq!(body["items"][1]["commands"], 5);
    assert_eq!(body["items"][1]["application_name"], "psql");
    let (_, _, body) = api.get("/api/v1/sessions?target=app&limit=1").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    assert!(body["next_cursor"].is_null());

    db.close().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_the_durable_consumer_after_restart() {
    Env::new().await.scope(restart_scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_its_position_after_restart_on_a_single_node() {
    Env::embedded().await.scope(restart_scenario).await;
}

async fn restart_scenario(env: &Env) {
    let alice = who("u-alice", "alice");
    let s = Uuid::now_v7();
    let cmd = |seq: u64| {
        let statement = format!("select {seq}");
        event(s, seq, seq as f64, &alice, "app", command(&statement))
    };

    let cp = env.start().await;
    let db = env.db().await;
    env.send_batch(&[cmd(1), cmd(2)]).await;
    env.wait_projected(&db, 2).await;
    cp.stop().await;

    // Published while no control plane runs: picked up on restart.
    env.send_batch(&[cmd(3), cmd(4)]).await;
    let cp = env.start().await;
    env.wait_projected(&db, 4).await;
    let seqs: Vec<(i64,)> = db
        .query("SELECT seq FROM commands ORDER BY seq", &[])
        .await
        .unwrap();
    assert_eq!(seqs, [(1,), (2,), (3,), (4,)]);
    db.close().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_and_serves_the_texts_of_executed_statements() {
    Env::new().await.scope(executes_scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_and_serves_the_texts_of_executed_statements_on_a_single_node() {
    Env::embedded().await.scope(executes_scenario).await;
}

async fn executes_scenario(env: &Env) {
    let cp = env.start().await;
    let alice = who("u-alice", "alice");
    let s = Uuid::now_v7();
    let executed = |name: &str, text: &str| ExecutedStatement {
        name: name.into(),
        text: text.into(),
        redactions: vec![],
    };
    // A SQL EXECUTE of two prepared statements in one Query.
    let mut simple = event(
        s,
        2,
        1.0,
        &alice,
        "app",
        command("execute wipe; execute one(7)"),
    );
    if let Payload::CommandReceived(p) = &mut simple.payload {
        p.executes = vec![
            executed("wipe", "delete from accounts"),
            executed("one", "select * from accounts where id = $1"),
        ];
    }
    // An extended-protocol Execute of a statement that is itself an EXECUTE.
    let mut extended = event(s, 3, 2.0, &alice, "app", command("execute one($1)"));
    if let Payload::CommandReceived(p) = &mut extended.payload {
        p.protocol = Protocol::Extended;
        p.statement_name = Some(String::new());
        p.portal = Some(String::new());
        p.params = vec![Param {
            format: ParamFormat::Text,
            value: Some("7".into()),
            encoding: None,
        }];
        p.executes = vec![executed("one", "select * from accounts where id = $1")];
    }
    // One without: stored as NULL, served as [].
    let plain = event(s, 4, 3.0, &alice, "app", command("select 1"));
    env.send_batch(&[simple, extended.clone(), plain]).await;
    // Redelivered: still one row.
    env.send(&extended).await;

    let db = env.db().await;
    env.wait_projected(&db, 3).await;
    let stored: Vec<(i64, Option<Value>)> = db
        .query("SELECT seq, executes FROM commands ORDER BY seq", &[])
        .await
        .unwrap();
    let wipe = serde_json::json!({"name": "wipe", "text": "delete from accounts"});
    let one = serde_json::json!({"name": "one", "text": "select * from accounts where id = $1"});
    assert_eq!(
        stored,
        [
            (2, Some(Value::from(vec![wipe.clone(), one.clone()]))),
            (3, Some(Value::from(vec![one.clone()]))),
            (4, None),
        ]
    );

    let api = Api {
        http: reqwest::Client::new(),
        url: &cp.url,
        token: Some(env.token("u-carol", "carol", &["auditors"])),
    };
    let (status, _, body) = api.get("/api/v1/commands").await;
    assert_eq!(status, 200, "{body}");
    let items = body["items"].as_array().unwrap();
    let served: Vec<(&str, &Value)> = items
        .iter()
        .map(|i| (i["statement"].as_str().unwrap(), &i["executes"]))
        .collect();
    assert_eq!(
        served,
        [
            ("select 1", &Value::from(Vec::<Value>::new())),
            ("execute one($1)", &Value::from(vec![one.clone()])),
            (
                "execute wipe; execute one(7)",
                &Value::from(vec![wipe, one])
            ),
        ]
    );
    assert_eq!(items[1]["protocol"], "extended");
    assert_eq!(items[1]["params"][0]["value"], "7");

    db.close().await;
    cp.stop().await;
}

#[tokio::test]
async fn missing_database_is_an_error_when_creation_is_off() {
    let config = ControlPlaneConfig {
        audit_db_url: format!(
            "{SERVER}/gh_cp_missing_{}?sslmode=disable",
            Uuid::new_v4().simple()
        ),
        create_database: false,
        ..Default::default()
    };
    let err = connect_audit_db(&config).await.unwrap_err().to_string();
    assert!(err.starts_with("cannot connect to audit database"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_nats_restart() {
    let mut nats = PrivateNats::start().await;
    let env = Env::on(&nats.url()).await;
    env.scope(async |env| {
        let alice = who("u-alice", "alice");
        let s = Uuid::now_v7();
        let cmd = |seq: u64| {
            let statement = format!("select {seq}");
            event(s, seq, seq as f64, &alice, "app", command(&statement))
        };
        let cp = env.start().await;
        let api = Api {
            http: reqwest::Client::new(),
            url: &cp.url,
            token: None,
        };
        let db = env.db().await;
        env.send_batch(&[cmd(1), cmd(2)]).await;
        env.wait_projected(&db, 2).await;

        nats.down().await;
        eventually("readiness to fail", || async {
            let (status, _, body) = api.get("/readyz").await;
            status == 503 && body["nats"] != "connected" && body["audit_db"] == "ok"
        })
        .await;
        nats.up().await;
        eventually("readiness to return", || async {
            api.get("/readyz").await.0 == 200
        })
        .await;

        env.send_batch(&[cmd(3), cmd(4)]).await;
        env.wait_projected(&db, 4).await;
        assert_eq!(count(&db, "commands").await, 4);
        db.close().await;
        cp.stop().await;
    })
    .await;
}

/// A quarantine row, as stored.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct QuarantineRow {
    stream_seq: i64,
    subject: String,
    event_index: Option<i32>,
    event_id: Option<Uuid>,
    event_type: Option<String>,
    session_id: Option<Uuid>,
    reason: String,
    raw: Vec<u8>,
}

async fn quarantine_rows(db: &AuditStore) -> Vec<QuarantineRow> {
    db.query(
        "SELECT stream_seq, subject, event_index, event_id, event_type, session_id, reason, raw
         FROM quarantine ORDER BY id",
        &[],
    )
    .await
    .unwrap()
}

impl Env {
    /// Deletes the durable consumer, so that the next start reads the whole
    /// stream again: every message is delivered a second time.
    async fn forget_consumer(&self) {
        if let Some(log) = &self.embedded {
            log.set_position(&self.config.consumer, 0).await.unwrap();
            return;
        }
        let stream = self.js.get_stream(&self.events.stream).await.unwrap();
        stream.delete_consumer(&self.config.consumer).await.unwrap();
    }

    /// [`Env::start`], then waits until the durable consumer exists.
    async fn start_consumer(&self) -> Running {
        let cp = self.start().await;
        if self.embedded.is_some() {
            return cp;
        }
        eventually("the consumer to exist", || async {
            let stream = self.js.get_stream(&self.events.stream).await.unwrap();
            stream.consumer_info(&self.config.consumer).await.is_ok()
        })
        .await;
        cp
    }
}

fn decode_base64(v: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantines_a_refused_event_and_projects_the_rest_of_its_message() {
    Env::new().await.scope(refused_event_scenario).await;
}

async fn refused_event_scenario(env: &Env) {
    let cp = env.start_consumer().await;
    let (alice, bob, carol) = (
        who("u-alice", "alice"),
        who("u-bob", "bob"),
        who("u-carol", "carol"),
    );
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let first = event(a, 2, 1.0, &alice, "app", command("select 1"));
    // jsonb cannot hold \u0000: the database refuses this event (22P05).
    let mut refused = event(b, 2, 2.0, &bob, "app", command("select $1"));
    if let Payload::CommandReceived(p) = &mut refused.payload {
        p.protocol = Protocol::Extended;
        p.params = vec![Param {
            format: ParamFormat::Text,
            value: Some("before\0after".into()),
            encoding: None,
        }];
    }
    let third = event(c, 2, 3.0, &carol, "app", command("select 3"));
    // One message, as the worker's group commit sends three sessions' events.
    env.send_batch(&[first.clone(), refused.clone(), third.clone()])
        .await;

    let db = env.db().await;
    env.wait_projected(&db, 2).await;
    let commands: Vec<(Uuid, Option<Uuid>, String)> = db
        .query(
            "SELECT event_id, session_id, statement FROM commands ORDER BY time",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        commands,
        [
            (first.id, Some(a), "select 1".to_owned()),
            (third.id, Some(c), "select 3".to_owned()),
        ]
    );
    let rows = quarantine_rows(&db).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let reason = rows[0].reason.clone();
    assert!(reason.starts_with("22P05: "), "{reason}");
    assert_eq!(
        rows[0],
        QuarantineRow {
            stream_seq: 1,
            subject: env.events.subjects().for_type(EventType::CommandReceived),
            event_index: Some(1),
            event_id: Some(refused.id),
            event_type: Some("command_received".into()),
            session_id: Some(b),
            reason: reason.clone(),
            // Exactly the event's own JSON from the batch.
            raw: refused.to_cloudevent(),
        }
    );

    // Served to auditors only.
    let api = Api {
        http: reqwest::Client::new(),
        url: &cp.url,
        token: Some(env.token("u-carol", "carol", &["auditors"])),
    };
    let developer = Api {
        http: api.http.clone(),
        url: &cp.url,
        token: Some(env.token("u-dave", "dave", &["dev"])),
    };
    let anon = Api {
        http: api.http.clone(),
        url: &cp.url,
        token: None,
    };
    assert_eq!(anon.get("/api/v1/quarantine").await.0, 401);
    assert_eq!(developer.get("/api/v1/quarantine").await.0, 403);
    let (status, _, body) = api.get("/api/v1/quarantine").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 1, "{body}");
    assert!(body["next_cursor"].is_null(), "{body}");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{body}");
    let item = &items[0];
    assert_eq!(item["event_id"], refused.id.to_string());
    assert_eq!(item["session_id"], b.to_string());
    assert_eq!(item["event_type"], "command_received");
    assert_eq!(item["event_index"], 1);
    assert_eq!(item["stream_seq"], 1);
    assert_eq!(item["reason"], reason.as_str());
    assert_eq!(decode_base64(&item["raw"]), refused.to_cloudevent());
    assert_eq!(api.get("/api/v1/quarantine?limit=0").await.0, 400);
    assert_eq!(api.get("/api/v1/quarantine?cursor=xyz").await.0, 400);
    assert_eq!(api.get("/api/v1/quarantine?identity=bob").await.0, 400);

    // The same event published again in another message: not twice.
    env.send_batch(std::slice::from_ref(&refused)).await;
    env.wait_projected(&db, 2).await;
    assert_eq!(count(&db, "quarantine").await, 1);
    cp.stop().await;

    // Every message delivered again to a new projector: nothing twice.
    env.forget_consumer().await;
    let cp = env.start_consumer().await;
    env.wait_projected(&db, 2).await;
    assert_eq!(quarantine_rows(&db).await, rows);
    assert_eq!(count(&db, "commands").await, 2);
    let api = Api {
        http: reqwest::Client::new(),
        url: &cp.url,
        token: Some(env.token("u-carol", "carol", &["auditors"])),
    };
    let (status, _, body) = api.get("/api/v1/quarantine").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 0, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 1, "{body}");

    db.close().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantines_an_undecodable_message_raw() {
    Env::new().await.scope(undecodable_scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantines_an_undecodable_message_raw_on_a_single_node() {
    Env::embedded().await.scope(undecodable_scenario).await;
}

async fn undecodable_scenario(env: &Env) {
    let cp = env.start_consumer().await;
    let alice = who("u-alice", "alice");
    let s = Uuid::now_v7();
    let garbage = br#"{"not":"an event"}"#.to_vec();
    env.publish(EventType::CommandReceived, garbage.clone())
        .await;
    let after = event(s, 1, 1.0, &alice, "app", command("select 1"));
    env.send(&after).await;
    // A second one, to page through.
    env.publish(EventType::SessionClosed, b"\xff\xfe".to_vec())
        .await;

    let db = env.db().await;
    env.wait_projected(&db, 1).await;
    assert_eq!(count(&db, "commands").await, 1);
    let rows = quarantine_rows(&db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert!(row.reason.starts_with("invalid event JSON"), "{row:?}");
    }
    let expected = |stream_seq, ty, raw: &[u8], reason: &str| QuarantineRow {
        stream_seq,
        subject: env.events.subjects().for_type(ty),
        event_index: None,
        event_id: None,
        event_type: None,
        session_id: None,
        reason: reason.to_owned(),
        raw: raw.to_vec(),
    };
    assert_eq!(
        rows,
        [
            expected(1, EventType::CommandReceived, &garbage, &rows[0].reason),
            expected(3, EventType::SessionClosed, b"\xff\xfe", &rows[1].reason),
        ]
    );
    // The decode error, never the content.
    assert!(!rows[0].reason.contains("an event"), "{}", rows[0].reason);

    let api = Api {
        http: reqwest::Client::new(),
        url: &cp.url,
        token: Some(env.token("u-carol", "carol", &["auditors"])),
    };
    // Newest first, one per page.
    let (status, _, body) = api.get("/api/v1/quarantine?limit=1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 2, "{body}");
    assert_eq!(decode_base64(&body["items"][0]["raw"]), b"\xff\xfe");
    assert!(body["items"][0]["event_id"].is_null(), "{body}");
    let cursor = body["next_cursor"].as_str().unwrap();
    let (status, _, body) = api
        .get(&format!("/api/v1/quarantine?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(decode_base64(&body["items"][0]["raw"]), garbage);
    assert_eq!(body["items"][0]["stream_seq"], 1);
    assert!(body["next_cursor"].is_null(), "{body}");
    cp.stop().await;

    // Delivered again: nothing twice.
    env.forget_consumer().await;
    let cp = env.start_consumer().await;
    env.wait_projected(&db, 1).await;
    assert_eq!(quarantine_rows(&db).await, rows);
    db.close().await;
    cp.stop().await;
}
