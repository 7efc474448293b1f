//! Targets must prove themselves: a fake PostgreSQL server, reached
//! without a verified certificate, tries the tricks a man in the middle
//! would — asking for the password in cleartext or as MD5, letting the
//! worker in halfway through SCRAM before proving it knows the password,
//! skipping authentication where the configuration pins a method. The
//! worker refuses each, sends no password, and the client is told the
//! target cannot be reached.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use gatehouse_worker::{TargetAuth, TargetConfig, TargetTls};
use raw::Raw;
use support::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
enum Trick {
    Cleartext,
    Md5,
    /// Offers SCRAM, then says AuthenticationOk after the client's first
    /// message, without the server's proof.
    SkipScramProof,
    /// AuthenticationOk at once (trust).
    Trust,
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn auth(code: i32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message(b'R', &body)
}

fn logged_in() -> Vec<u8> {
    let mut out = auth(0, b"");
    out.extend(message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
    out.extend(message(b'Z', b"I"));
    out
}

/// Serves one login with `trick`; what the worker sent after the startup
/// message.
async fn fake_target(listener: TcpListener, trick: Trick) -> Vec<u8> {
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut len = [0u8; 4];
    tcp.read_exact(&mut len).await.unwrap();
    let mut startup = vec![0u8; i32::from_be_bytes(len) as usize - 4];
    tcp.read_exact(&mut startup).await.unwrap();
    let first = match trick {
        Trick::Cleartext => auth(3, b""),
        Trick::Md5 => auth(5, b"salt"),
        Trick::SkipScramProof => auth(10, b"SCRAM-SHA-256\0\0"),
        Trick::Trust => logged_in(),
    };
    tcp.write_all(&first).await.unwrap();
    let mut got = Vec::new();
    if let Trick::SkipScramProof = trick {
        read_some(&mut tcp, &mut got).await;
        tcp.write_all(&logged_in()).await.unwrap();
    }
    read_some(&mut tcp, &mut got).await;
    got
}

/// Reads what arrives within a second, or until the worker closes.
async fn read_some(tcp: &mut TcpStream, got: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        if matches!(got.first(), Some(b'p')) {
            break;
        }
    }
}

/// A worker whose target `fake` is `addr`, reached without TLS.
async fn worker_for(
    env: &Env,
    addr: SocketAddr,
    methods: Option<Vec<TargetAuth>>,
) -> gatehouse::dev::ExtraWorker {
    env.stack()
        .spawn_worker("127.0.0.1:0", |c| {
            c.allow_plaintext = true;
            c.targets.insert(
                "fake".into(),
                TargetConfig {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    database: "postgres".into(),
                    user: "gatehouse".into(),
                    password_env: None,
                    password_file: None,
                    tls: TargetTls::Disable,
                    tls_ca_file: None,
                    auth_methods: methods,
                    channel_binding: Default::default(),
                    environment: String::new(),
                    tags: Vec::new(),
                    password: Some("the-target-secret".into()),
                    masking: None,
                    masker: None,
                },
            );
        })
        .await
        .unwrap()
}

/// Logs in to the fake target through a worker; the client's error code,
/// if refused, and what the worker sent the fake target.
async fn attempt(
    env: &Env,
    trick: Trick,
    methods: Option<Vec<TargetAuth>>,
) -> (Option<String>, Vec<u8>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(fake_target(listener, trick));
    let worker = worker_for(env, addr, methods).await;
    let result = Raw::open(worker.addr)
        .await
        .login_on("alice", &env.token("alice"), &[("database", "fake")])
        .await;
    let code = match result {
        Ok(_) => None,
        Err(reply) => Some(reply.errors[0].code.clone()),
    };
    let sent = fake.await.unwrap();
    worker.stop().await.unwrap();
    (code, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverified_target_gets_no_password_and_must_finish_scram() {
    let env = Env::start().await;
    for trick in [Trick::Cleartext, Trick::Md5] {
        let (code, sent) = attempt(&env, trick, None).await;
        assert_eq!(code.as_deref(), Some("08001"), "{trick:?}");
        assert!(
            !sent.windows(17).any(|w| w == b"the-target-secret") && sent.first() != Some(&b'p'),
            "{trick:?}: the worker answered with {sent:?}"
        );
    }
    let (code, sent) = attempt(&env, Trick::SkipScramProof, None).await;
    assert_eq!(code.as_deref(), Some("08001"), "a SCRAM without proof");
    assert_eq!(sent.first(), Some(&b'p'), "SCRAM's first message was sent");
    // Trust is accepted unless the methods are pinned.
    let (code, _) = attempt(&env, Trick::Trust, None).await;
    assert_eq!(code, None, "a trust target logs in");
    let (code, _) = attempt(&env, Trick::Trust, Some(vec![TargetAuth::ScramSha256])).await;
    assert_eq!(
        code.as_deref(),
        Some("08001"),
        "trust where SCRAM is pinned"
    );
    env.cleanup().await;
}
