//! `gatehouse dev` on its embedded log and audit store (no NATS, no audit
//! database), as a process: killed with SIGKILL in the middle of a load,
//! every command the target ran has its event in the log, once restarted,
//! the audit tables match the log, and
//! `gatehouse export-log` moves the log into JetStream.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_control_plane::ControlPlaneConfig;
use gatehouse_eventlog::EmbeddedLog;
use gatehouse_events::{Payload, decode};
use support::{PG, admin};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A `gatehouse dev` process and the addresses it printed.
struct Dev {
    child: tokio::process::Child,
    pg_port: u16,
}

impl Dev {
    async fn start(data_dir: &Path, target_db: &str) -> Dev {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--target",
                &format!("app={PG}/{target_db}?sslmode=require"),
                "--pg-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--no-masking",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the gatehouse binary runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut pg_port = None;
        let (mut embedded, mut audit_embedded) = (false, false);
        let read = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("Postgres front end") {
                    let addr = rest.split_whitespace().next().unwrap();
                    pg_port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
                }
                if line.starts_with("Event log") && line.contains("embedded") {
                    embedded = true;
                }
                if line.starts_with("Audit tables") && line.contains("audit.db") {
                    audit_embedded = true;
                }
                if line.starts_with("Ctrl-C") {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("gatehouse dev starts within a minute");
        assert!(
            embedded,
            "gatehouse dev without --nats says it runs on the embedded log"
        );
        assert!(
            audit_embedded,
            "gatehouse dev without --audit-db says its audit tables are embedded"
        );
        // Keep reading so that the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Dev {
            child,
            pg_port: pg_port.expect("the Postgres address is printed"),
        }
    }

    async fn connect(&self, data_dir: &Path, user: &str) -> tokio_postgres::Client {
        let token = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("token")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--sub", user])
            .output()
            .unwrap();
        assert!(token.status.success());
        let token = String::from_utf8(token.stdout).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(data_dir.join("tls-cert.pem")).unwrap();
        for cert in support::rustls_pemfile_certs(&pem) {
            roots.add(cert).unwrap();
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .port(self.pg_port)
            .user(user)
            .dbname("app")
            .password(token.trim())
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, conn) = config.connect(tls).await.expect("connects through dev");
        tokio::spawn(conn);
        client
    }
}

/// The ids in the `INSERT INTO t VALUES (id)` commands the log holds, and
/// the ids of its CommandReceived events.
async fn logged(path: &Path) -> (HashSet<i32>, HashSet<uuid::Uuid>) {
    let log = EmbeddedLog::open(path).await.unwrap();
    let mut inserted = HashSet::new();
    let mut commands = HashSet::new();
    for stored in log.read(0, usize::MAX).await.unwrap() {
        for event in decode(&stored.body).unwrap() {
            if let Payload::CommandReceived(c) = &event.payload {
                commands.insert(event.id);
                if let Some(id) = c
                    .statement
                    .strip_prefix("INSERT INTO t VALUES (")
                    .and_then(|rest| rest.strip_suffix(')'))
                {
                    inserted.insert(id.parse().unwrap());
                }
            }
        }
    }
    (inserted, commands)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_load_nothing_ran_unrecorded_and_projections_match_after_restart() {
    support::init();
    let _watchdog = gatehouse_testkit::Watchdog::for_test();
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let target_db = format!("gh_target_{suffix}");
    admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {target_db}"))
        .await
        .unwrap();
    let data_dir: PathBuf = std::env::temp_dir().join(format!("gatehouse-embedded-{suffix}"));
    let log_path = data_dir.join("gatehouse.db");

    let mut dev = Dev::start(&data_dir, &target_db).await;
    let setup = dev.connect(&data_dir, "loader").await;
    setup
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();

    // Eight sessions insert as fast as they can until the process dies.
    let mut sessions = Vec::new();
    for s in 0..8 {
        let db = Arc::new(dev.connect(&data_dir, "loader").await);
        sessions.push(tokio::spawn(async move {
            for i in 0.. {
                let id = s * 1_000_000 + i;
                if db
                    .batch_execute(&format!("INSERT INTO t VALUES ({id})"))
                    .await
                    .is_err()
                {
                    return i;
                }
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    dev.child.start_kill().unwrap(); // SIGKILL
    dev.child.wait().await.unwrap();
    let mut ran = 0;
    for s in sessions {
        ran += s.await.unwrap();
    }
    assert!(ran > 50, "only {ran} inserts ran before the kill");

    // Every row the target holds was recorded before it ran.
    let direct = support::direct_db(&target_db).await;
    let rows: HashSet<i32> = direct
        .query("SELECT id FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (recorded, commands) = logged(&log_path).await;
    let unrecorded: Vec<_> = rows.difference(&recorded).collect();
    assert!(
        unrecorded.is_empty(),
        "{} rows in the target without their event: {unrecorded:?}",
        unrecorded.len()
    );
    assert!(rows.len() >= 50, "{} rows", rows.len());

    // Restarted on the same data directory, the projector catches up from
    // its position: the audit tables hold exactly the log's commands.
    let mut dev = Dev::start(&data_dir, &target_db).await;
    let audit = gatehouse_control_plane::connect_audit_db(&ControlPlaneConfig {
        audit_db_url: format!("sqlite:{}", data_dir.join("audit.db").display()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut projected = HashSet::new();
    for _ in 0..300 {
        projected =
            support::audit_query::<(uuid::Uuid,)>(&audit, "SELECT event_id FROM commands", &[])
                .await
                .into_iter()
                .map(|(id,)| id)
                .collect();
        if projected.len() >= commands.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(projected, commands, "the audit tables match the log");

    dev.child.start_kill().unwrap();
    dev.child.wait().await.unwrap();

    // The log moves into JetStream with `gatehouse export-log`: every
    // event, once, even when run twice.
    let stream = format!("GHT_{suffix}_EXPORT");
    let config = data_dir.join("export.toml");
    std::fs::write(
        &config,
        format!("[events]\nstream = \"{stream}\"\nsubject_prefix = \"ght.{suffix}.export\"\n"),
    )
    .unwrap();
    let all = EmbeddedLog::open(&log_path)
        .await
        .unwrap()
        .read(0, usize::MAX)
        .await
        .unwrap()
        .len();
    for expected in [all, 0] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("export-log")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config)
            .args(["--to", support::NATS])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.starts_with(&format!("exported {expected} events")),
            "{said}"
        );
    }
    let js = async_nats::jetstream::new(async_nats::connect(support::NATS).await.unwrap());
    let mut exported = js.get_stream(&stream).await.unwrap();
    assert_eq!(exported.info().await.unwrap().state.messages, all as u64);
    js.delete_stream(&stream).await.unwrap();

    let _ = admin()
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {target_db} WITH (FORCE)"))
        .await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
