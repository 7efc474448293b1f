//! The worker binds its SCRAM login to the TLS connection
//! (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`) when the target offers
//! it, so the password exchange cannot be relayed by someone who ends the
//! TLS connection in the middle. A fake PostgreSQL server over TLS plays
//! the target's side of SCRAM in full — it checks the worker's proof and
//! the channel binding against its own certificate, and proves itself —
//! and a server that offers only plain SCRAM is refused where the target
//! says `channel_binding = "require"`.

#[path = "support/raw.rs"]
mod raw;
mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use gatehouse_worker::{ChannelBinding, TargetConfig, TargetTls};
use raw::Raw;
use ring::{digest, hmac, pbkdf2};
use support::Env;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PASSWORD: &str = "the-target-secret";
const SALT: &[u8] = b"sixteen byte salt";
const ITERATIONS: u32 = 4096;

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

/// The next message, or `None` if the peer closed.
async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let tag = s.read_u8().await.ok()?;
    let len = s.read_i32().await.ok()? as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).await.ok()?;
    Some((tag, body))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// What the fake target saw of the worker's SCRAM exchange.
#[derive(Debug)]
struct Seen {
    mechanism: String,
    /// The GS2 header of the client's first message (`p=…`, `y`, `n`).
    gs2: String,
    /// The channel binding matched the server's own certificate.
    binding_matches: bool,
    /// The client's proof was right.
    proof_ok: bool,
}

/// Serves one login over TLS, offering `mechanisms`, playing SCRAM's
/// server side in full.
async fn fake_target(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cert_der: Vec<u8>,
    mechanisms: &'static [u8],
) -> Option<Seen> {
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut ssl_request = [0u8; 8];
    tcp.read_exact(&mut ssl_request).await.unwrap();
    tcp.write_all(b"S").await.unwrap();
    let mut s = tokio_rustls::TlsAcceptor::from(tls)
        .accept(tcp)
        .await
        .unwrap();
    let len = s.read_i32().await.unwrap() as usize;
    let mut startup = vec![0u8; len - 4];
    s.read_exact(&mut startup).await.unwrap();
    s.write_all(&auth(10, mechanisms)).await.unwrap();
    s.flush().await.unwrap();
    let (tag, body) = tokio::time::timeout(Duration::from_secs(5), read_message(&mut s))
        .await
        .ok()??;
    if tag != b'p' {
        return None;
    }
    let nul = body.iter().position(|b| *b == 0).unwrap();
    let mechanism = String::from_utf8(body[..nul].to_vec()).unwrap();
    let client_first = String::from_utf8(body[nul + 5..].to_vec()).unwrap();
    // gs2-header "p=tls-server-end-point,," / "y,," / "n,,", then the bare message.
    let (gs2, bare) = {
        let mut commas = client_first.match_indices(',').map(|(i, _)| i);
        let _ = commas.next();
        let second = commas.next().unwrap();
        (&client_first[..=second], &client_first[second + 1..])
    };
    let client_nonce = bare.split(',').find_map(|a| a.strip_prefix("r=")).unwrap();
    let nonce = format!("{client_nonce}server-nonce");
    let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(SALT));
    s.write_all(&auth(11, server_first.as_bytes()))
        .await
        .unwrap();
    s.flush().await.unwrap();
    let (_, body) = read_message(&mut s).await?;
    let client_final = String::from_utf8(body).unwrap();
    let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
    let channel = without_proof
        .split(',')
        .find_map(|a| a.strip_prefix("c="))
        .unwrap();
    let mut expected = gs2.as_bytes().to_vec();
    if gs2.starts_with("p=") {
        expected.extend_from_slice(digest::digest(&digest::SHA256, &cert_der).as_ref());
    }
    let binding_matches = B64.decode(channel).unwrap() == expected;

    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ITERATIONS).unwrap(),
        SALT,
        PASSWORD.as_bytes(),
        &mut salted,
    );
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, &client_key);
    let signature = hmac(stored_key.as_ref(), auth_message.as_bytes());
    let proof = B64.decode(proof).unwrap();
    let recovered: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
    let proof_ok = digest::digest(&digest::SHA256, &recovered).as_ref() == stored_key.as_ref();
    let server_key = hmac(&salted, b"Server Key");
    let verifier = B64.encode(hmac(&server_key, auth_message.as_bytes()));
    let mut out = auth(12, format!("v={verifier}").as_bytes());
    out.extend(auth(0, b""));
    out.extend(message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
    out.extend(message(b'Z', b"I"));
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
    // Hold the connection until the worker is done with it.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    Some(Seen {
        mechanism,
        gs2: gs2.to_owned(),
        binding_matches,
        proof_ok,
    })
}

/// Logs in through a worker whose target is a fake server over verified
/// TLS; the client's error code if refused, and what the fake saw.
async fn attempt(
    env: &Env,
    mechanisms: &'static [u8],
    binding: ChannelBinding,
) -> (Option<String>, Option<Seen>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = env
        .data_dir
        .join(format!("cb-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(fake_target(
        listener,
        Arc::new(tls),
        cert.der().to_vec(),
        mechanisms,
    ));
    let worker = env
        .stack()
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
                    tls: TargetTls::VerifyFull,
                    tls_ca_file: Some(ca),
                    auth_methods: None,
                    channel_binding: binding,
                    environment: String::new(),
                    tags: Vec::new(),
                    password: Some(PASSWORD.into()),
                    masking: None,
                    masker: None,
                },
            );
        })
        .await
        .unwrap();
    let result = Raw::open(worker.addr)
        .await
        .login_on("alice", &env.token("alice"), &[("database", "fake")])
        .await;
    let code = match result {
        Ok(_) => None,
        Err(reply) => Some(reply.errors[0].code.clone()),
    };
    let seen = fake.await.unwrap();
    worker.stop().await.unwrap();
    (code, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_is_bound_to_the_tls_connection() {
    let env = Env::start().await;
    let both: &[u8] = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
    let plain: &[u8] = b"SCRAM-SHA-256\0\0";

    let (code, seen) = attempt(&env, both, ChannelBinding::Prefer).await;
    let seen = seen.expect("the worker answered SCRAM");
    assert_eq!(code, None, "{seen:?}");
    assert_eq!(seen.mechanism, "SCRAM-SHA-256-PLUS");
    assert_eq!(seen.gs2, "p=tls-server-end-point,,");
    assert!(seen.binding_matches && seen.proof_ok, "{seen:?}");

    // Without an offer of PLUS, plain SCRAM, saying it could have bound.
    let (code, seen) = attempt(&env, plain, ChannelBinding::Prefer).await;
    let seen = seen.expect("the worker answered SCRAM");
    assert_eq!(code, None, "{seen:?}");
    assert_eq!(seen.mechanism, "SCRAM-SHA-256");
    assert_eq!(seen.gs2, "y,,");
    assert!(seen.binding_matches && seen.proof_ok, "{seen:?}");

    // Required, and not offered: refused before any SCRAM message.
    let (code, seen) = attempt(&env, plain, ChannelBinding::Require).await;
    assert_eq!(code.as_deref(), Some("08001"));
    assert!(seen.is_none(), "{seen:?}");
    let (code, _) = attempt(&env, both, ChannelBinding::Require).await;
    assert_eq!(code, None);
    env.cleanup().await;
}
