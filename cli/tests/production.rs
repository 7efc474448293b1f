//! Production mode's hops, against real servers: a private nats-server run
//! from `deploy/examples/nats-server.conf` (TLS, one least-privilege user
//! per role) with a control plane and a worker each connected as its own
//! user, the API over HTTPS, and forwarded cancel requests that must carry
//! the workers' shared key.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use gatehouse_eventlog::EventLogConfig;
use gatehouse_pgwire as pg;
use raw::Raw;
use support::{Env, Options, PG};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EXAMPLE: &str = include_str!("../../deploy/examples/nats-server.conf");

/// A CA and a certificate it signed for 127.0.0.1 and localhost, as PEM
/// files in `dir`: (ca, cert, key).
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

const WORKER_PASSWORD: &str = "worker-secret-7f3a";
const CONTROL_PLANE_PASSWORD: &str = "control-plane-secret-91bc";

/// `[events]` for `user`, trusting the test CA.
fn events(
    nats: &gatehouse_testkit::PrivateNats,
    ca: &Path,
    user: &str,
    password: &str,
) -> EventLogConfig {
    let password_file = nats
        .dir()
        .join(format!("{user}-{}.password", uuid::Uuid::new_v4().simple()));
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    EventLogConfig {
        nats_url: format!("tls://127.0.0.1:{}", nats.port),
        nats_user: Some(user.into()),
        nats_password_file: Some(password_file),
        nats_tls_ca_file: Some(ca.to_path_buf()),
        publish_timeout_ms: 2000,
        ..Default::default()
    }
}

/// Publishes `payload` on `subject` through JetStream and waits for the
/// stream's acknowledgement.
async fn stored(client: &async_nats::Client, subject: &str) -> bool {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    match js.publish(subject.to_string(), "{}".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_nats_config_needs_tls_and_credentials_and_keeps_the_roles_apart() {
    support::init();
    let _watchdog = gatehouse_testkit::Watchdog::for_test();
    let pki_dir = std::env::temp_dir().join(format!("gh-pki-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&pki_dir).unwrap();
    let (ca, cert, key) = pki(&pki_dir);
    let nats = gatehouse_testkit::PrivateNats::start_with_config(|port, dir| {
        let conf = EXAMPLE
            .replace("0.0.0.0:4222", &format!("127.0.0.1:{port}"))
            .replace("/etc/nats/tls/server.crt", &cert.display().to_string())
            .replace("/etc/nats/tls/server.key", &key.display().to_string())
            .replace("/var/lib/nats/jetstream", &dir.display().to_string())
            .replace(
                "$GATEHOUSE_NATS_WORKER_PASSWORD",
                &format!("\"{WORKER_PASSWORD}\""),
            )
            .replace(
                "$GATEHOUSE_NATS_CONTROL_PLANE_PASSWORD",
                &format!("\"{CONTROL_PLANE_PASSWORD}\""),
            );
        assert_ne!(conf, EXAMPLE);
        format!("{conf}\nlog_file: \"{}/nats.log\"\n", dir.display())
    })
    .await;

    // Refused: no credentials; a wrong password; not trusting the CA.
    let worker_events = events(&nats, &ca, "worker", WORKER_PASSWORD);
    let anonymous = EventLogConfig {
        nats_user: None,
        nats_password_file: None,
        ..worker_events.clone()
    };
    let wrong = events(&nats, &ca, "worker", "guess");
    let untrusted = EventLogConfig {
        nats_tls_ca_file: None,
        ..worker_events.clone()
    };
    for (what, config) in [
        ("anonymous", &anonymous),
        ("wrong password", &wrong),
        ("untrusted CA", &untrusted),
    ] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            gatehouse_eventlog::connect(config, "test"),
        )
        .await
        .expect("connecting ends");
        assert!(r.is_err(), "{what}: connected");
    }
    // Refused: plaintext to a server that requires TLS.
    let plain = async_nats::ConnectOptions::new()
        .user_and_password("worker".into(), WORKER_PASSWORD.into())
        .connect(format!("127.0.0.1:{}", nats.port))
        .await;
    assert!(plain.is_err(), "plaintext connected");

    // The control plane as its own user: it creates the streams, serves
    // HTTPS.
    let cp_events = events(&nats, &ca, "control-plane", CONTROL_PLANE_PASSWORD);
    let cp_nats = gatehouse_eventlog::connect(&cp_events, "test-control-plane")
        .await
        .expect("the control plane connects with its credentials");
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let audit_db = format!("gh_prod_{suffix}");
    let verifier = Arc::new(
        gatehouse_identity::Verifier::new(gatehouse_identity::VerifierConfig {
            issuer: "https://issuer.invalid".into(),
            ..Default::default()
        })
        .unwrap(),
    );
    // Bundles are signed by the control plane; the worker trusts its key.
    let policy = gatehouse_policystore::PolicyConfig {
        signing_key: Some(gatehouse_policystore::SigningKey::generate().0),
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = tcp.local_addr().unwrap();
    let listener = gatehouse_control_plane::ApiListener::tls(tcp, &cert, &key).unwrap();
    let control_plane = tokio::spawn(gatehouse_control_plane::run(
        gatehouse_control_plane::ControlPlaneConfig {
            audit_db_url: format!("{PG}/{audit_db}?sslmode=disable"),
            ..Default::default()
        },
        policy.clone(),
        gatehouse_eventlog::LogBackend::Nats {
            client: cp_nats.clone(),
            config: cp_events.clone(),
        },
        listener,
        verifier.clone(),
        axum::Router::new(),
        wait(stopped.clone()),
    ));
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    gatehouse_testkit::eventually(
        "the control plane to be ready over HTTPS",
        async || match https
            .get(format!("https://127.0.0.1:{}/readyz", api_addr.port()))
            .send()
            .await
        {
            Ok(r) => r.status() == 200,
            Err(_) => false,
        },
    )
    .await;
    let plain_http = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", api_addr.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain_http.is_err(), "the API answered plain HTTP");

    // A worker as its own user: starts (looks the streams up, follows
    // bundles and revocations, listens for cancel requests).
    let worker_nats = gatehouse_eventlog::connect(&worker_events, "test-worker")
        .await
        .expect("the worker connects with its credentials");
    let pg_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pg_addr = pg_listener.local_addr().unwrap();
    let mut worker_config = gatehouse_worker::WorkerConfig {
        allow_plaintext: true,
        ..Default::default()
    };
    // A target it announces (never connected to here).
    let (name, mut target) =
        gatehouse::dev::parse_target("app=postgres://postgres@127.0.0.1:1/app?sslmode=disable")
            .unwrap();
    target.environment = "prod".into();
    worker_config.targets.insert(name, target);
    worker_config
        .prepare(&gatehouse_identity::VerifierConfig {
            issuer: "https://issuer.invalid".into(),
            ..Default::default()
        })
        .unwrap();
    let worker = tokio::spawn(gatehouse_worker::run(
        worker_config,
        policy.clone(),
        gatehouse_eventlog::LogBackend::Nats {
            client: worker_nats.clone(),
            config: worker_events.clone(),
        },
        verifier,
        pg_listener,
        wait(stopped),
    ));
    let nats_log = || std::fs::read_to_string(nats.dir().join("nats.log")).unwrap_or_default();
    let mut answered = false;
    for _ in 0..150 {
        if worker.is_finished() {
            break;
        }
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(pg_addr).await {
            let mut out = BytesMut::new();
            pg::ssl_request(&mut out);
            let mut answer = [0u8; 1];
            if tcp.write_all(&out).await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_millis(500), tcp.read_exact(&mut answer))
                        .await,
                    Ok(Ok(_))
                )
                && answer == *b"N"
            {
                answered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !answered {
        let outcome = if worker.is_finished() {
            format!("{:?}", worker.await)
        } else {
            "still starting".into()
        };
        panic!(
            "the worker did not start ({outcome}); nats-server log:\n{}",
            nats_log()
        );
    }

    // What each role may store, and may not.
    assert!(stored(&worker_nats, "gatehouse.events.command_received").await);
    assert!(
        !stored(&worker_nats, "gatehouse.GATEHOUSE_POLICIES.bundle").await,
        "a worker published a bundle"
    );
    assert!(
        !stored(
            &worker_nats,
            "gatehouse.GATEHOUSE_REVOCATIONS.revoked.alice"
        )
        .await
    );
    assert!(!stored(&worker_nats, "gatehouse.events.policy_bundle_published").await);
    assert!(stored(&cp_nats, "gatehouse.events.policy_bundle_published").await);
    assert!(stored(&cp_nats, "gatehouse.GATEHOUSE_REVOCATIONS.revoked.alice").await);
    // (Unsigned: the worker passes over it and keeps what it has.)
    assert!(stored(&cp_nats, "gatehouse.GATEHOUSE_POLICIES.bundle").await);
    assert!(
        !stored(&cp_nats, "gatehouse.events.command_received").await,
        "the control plane recorded a command"
    );
    assert!(
        !stored(
            &cp_nats,
            "gatehouse.GATEHOUSE_REVOCATIONS_APPROVALS.lease.someone"
        )
        .await,
        "the control plane renewed a worker's lease"
    );
    // An approval as the roles handle it: the worker requests and follows
    // it, the control plane grants it, the worker sees the grant.
    let as_role = |client: &async_nats::Client| {
        gatehouse_eventlog::RecordStore::JetStream(async_nats::jetstream::new(client.clone()))
    };
    let worker_approvals = gatehouse_policystore::approvals::Approvals::open(
        &as_role(&worker_nats),
        "GATEHOUSE_REVOCATIONS",
    )
    .await
    .expect("the worker opens the approvals stream")
    .signed(None, policy.trusted_keys().unwrap());
    let cp_approvals = gatehouse_policystore::approvals::Approvals::open(
        &as_role(&cp_nats),
        "GATEHOUSE_REVOCATIONS",
    )
    .await
    .unwrap()
    .signed(policy.signer().unwrap(), policy.trusted_keys().unwrap());
    let now = chrono::Utc::now();
    let approval: gatehouse_events::approval::Approval =
        serde_json::from_value(serde_json::json!({
            "schema_version": 1, "id": uuid::Uuid::now_v7(), "state": "pending",
            "requested_at": now, "expires_at": now + chrono::Duration::minutes(5),
            "requester": {"issuer": "i", "subject": "alice", "username": "alice"},
            "session_id": uuid::Uuid::now_v7(), "worker_id": "test-worker",
            "target": {"name": "app", "kind": "postgres", "environment": "prod"},
            "command": {"protocol": "simple", "statement": "DELETE FROM t"},
            "approvers_required": 1,
        }))
        .unwrap();
    worker_approvals
        .request(&approval)
        .await
        .expect("the worker requests it");
    let mut follow = worker_approvals.follow(&approval).await.unwrap();
    let granted = cp_approvals
        .change(
            approval.id,
            &gatehouse_events::approval::Change::Grant {
                by: gatehouse_events::approval::Approver {
                    subject: "bob".into(),
                    username: "bob".into(),
                    actors: vec![],
                },
                comment: None,
            },
            chrono::Utc::now(),
        )
        .await
        .expect("the control plane grants it");
    let mut seen = None;
    while let Some(next) = tokio::time::timeout(Duration::from_secs(10), follow.next())
        .await
        .expect("the worker follows it")
    {
        let next = next.unwrap();
        if next.state.is_terminal() {
            seen = Some(next);
            break;
        }
    }
    assert_eq!(seen.as_ref(), Some(&granted));
    // Access for a while as the roles handle it: the control plane finds
    // the target the worker announced, records the request and the grant;
    // the worker follows them; the worker cannot forge one.
    let known = cp_approvals
        .target("app")
        .await
        .unwrap()
        .expect("the worker announced its target");
    assert_eq!(known.target.environment, "prod");
    let mut access = approval.clone();
    access.id = uuid::Uuid::now_v7();
    access.target = known.target;
    access.request = gatehouse_events::approval::Requested::Access {
        access: gatehouse_events::approval::AccessRequest::new(None, 600, "incident").unwrap(),
    };
    cp_approvals.request(&access).await.unwrap();
    let granted = cp_approvals
        .change(
            access.id,
            &gatehouse_events::approval::Change::Grant {
                by: gatehouse_events::approval::Approver {
                    subject: "bob".into(),
                    username: "bob".into(),
                    actors: vec![],
                },
                comment: None,
            },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    let mut follow = worker_approvals.follow_access().await.unwrap();
    let mut seen = None;
    while let Some(next) = tokio::time::timeout(Duration::from_secs(10), follow.next())
        .await
        .expect("the worker follows access")
    {
        let next = next.unwrap();
        if next.approval.id == access.id && next.approval.state.is_terminal() {
            assert!(next.verified, "the control plane's grant counts");
            seen = Some(next.approval);
            break;
        }
    }
    assert_eq!(seen.as_ref(), Some(&granted));
    assert!(
        !stored(
            &worker_nats,
            "gatehouse.GATEHOUSE_REVOCATIONS_APPROVALS.approval.access.forged"
        )
        .await,
        "a worker recorded access"
    );
    // The server refused exactly those six; nothing the control plane or
    // the worker needed for their own work (the worker's lease included).
    let log = nats_log();
    let refused: Vec<(String, String)> = log.lines().filter_map(violation).collect();
    for (user, subject) in [
        ("worker", "gatehouse.GATEHOUSE_POLICIES.bundle"),
        ("worker", "gatehouse.GATEHOUSE_REVOCATIONS.revoked.alice"),
        ("worker", "gatehouse.events.policy_bundle_published"),
        ("control-plane", "gatehouse.events.command_received"),
        (
            "control-plane",
            "gatehouse.GATEHOUSE_REVOCATIONS_APPROVALS.lease.someone",
        ),
        (
            "worker",
            "gatehouse.GATEHOUSE_REVOCATIONS_APPROVALS.approval.access.forged",
        ),
    ] {
        assert!(
            refused.iter().any(|(u, s)| u == user && s == subject),
            "{user} {subject}:\n{log}"
        );
    }
    assert_eq!(refused.len(), 6, "{log}");

    let _ = stop.send(true);
    worker.await.unwrap().unwrap();
    control_plane.await.unwrap().unwrap();
    support::admin()
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {audit_db} WITH (FORCE)"))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&pki_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_cancel_request_without_the_workers_key_is_ignored() {
    let env = Env::start_with(Options {
        allow_plaintext: true,
        ..Options::default()
    })
    .await;
    // A second worker of the stack shares its cancel key.
    let other = env
        .stack()
        .spawn_worker("127.0.0.1:0", |_| {})
        .await
        .unwrap();
    let token = env.stack().token("dave", &[]);
    let (mut dave, login) = Raw::login(env.stack().pg_addr, "dave", &token, &[])
        .await
        .unwrap();
    let (pid, secret) = login.key.unwrap();
    let mut out = BytesMut::new();
    pg::query(&mut out, "SELECT pg_sleep(10)");
    dave.send(&out).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Whoever can publish on the cancel subject, without the key: the
    // unauthenticated form, and the authenticated one with a made-up tag.
    let nats = async_nats::connect(&env.events.nats_url).await.unwrap();
    let subject = format!("ght.{}.cancel", env.suffix);
    let mut forged = pid.to_be_bytes().to_vec();
    forged.extend_from_slice(&secret.to_be_bytes());
    nats.publish(subject.clone(), forged.clone().into())
        .await
        .unwrap();
    forged.extend_from_slice(&chrono_now_ms().to_be_bytes());
    forged.extend_from_slice(&[0x5a; 32]);
    nats.publish(subject, forged.into()).await.unwrap();
    nats.flush().await.unwrap();
    assert!(
        dave.next_within(Duration::from_secs(2)).await.is_none(),
        "a forged cancel request cancelled the query"
    );

    // Through the other worker, which forwards it with the key: cancelled.
    let mut out = BytesMut::new();
    pg::cancel_request(&mut out, pid, secret);
    let mut tcp = tokio::net::TcpStream::connect(other.addr).await.unwrap();
    tcp.write_all(&out).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), dave.reply())
        .await
        .expect("cancelled quickly");
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].code, "57014", "{r:?}");
    drop(dave);
    other.stop().await.unwrap();
    env.cleanup().await;
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The user and subject of a nats-server log line reporting a refused
/// publish. Versions spell the user differently: `User "worker", Subject
/// "…"` (2.9, Debian's) or `"$G/user:worker" - Publish Violation - Subject
/// "…"` (2.15).
fn violation(line: &str) -> Option<(String, String)> {
    if !line.contains("Violation") {
        return None;
    }
    let quoted_after = |marker: &str| {
        let rest = &line[line.find(marker)? + marker.len()..];
        Some(rest[..rest.find('"')?].to_string())
    };
    let user = quoted_after("User \"").or_else(|| quoted_after("/user:"))?;
    let subject = quoted_after("Subject \"")?;
    Some((user, subject))
}
