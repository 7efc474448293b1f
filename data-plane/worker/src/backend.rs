//! The worker's own login to a target: TCP, TLS (verified by default),
//! startup, and password/MD5/SCRAM authentication with credentials only the
//! worker holds.

use std::sync::Arc;

use bytes::BytesMut;
use gatehouse_pgwire::{self as pg, BackendMessage, Frame, TransactionStatus};
use postgres_protocol::authentication::{md5_hash, sasl};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{ChannelBinding, TargetAuth, TargetConfig, TargetTls};
use crate::conn::{Conn, send};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("target does not offer TLS, which its configuration requires")]
    TlsRefused,
    #[error("TLS handshake with target failed: {0}")]
    Tls(std::io::Error),
    /// The target answered the login with an error (`FATAL`).
    #[error("target refused the login: {} ({})", .fields.message, .fields.code)]
    Refused {
        fields: pg::ErrorFields,
        /// The `ErrorResponse` as the target sent it.
        frame: Frame,
    },
    #[error("target asked for authentication method {0}, which Gatehouse does not support")]
    UnsupportedAuth(i32),
    #[error("target asked for a password, but none is configured")]
    NoPassword,
    #[error("SCRAM authentication failed: {0}")]
    Scram(std::io::Error),
    /// The target asked for something the worker will not do: a method its
    /// configuration does not allow, a password over a connection whose
    /// peer is not verified, or letting the worker in before proving
    /// itself in SCRAM.
    #[error("target not trusted: {0}")]
    Untrusted(String),
    #[error("protocol error from target: {0}")]
    Protocol(#[from] pg::ProtocolError),
    #[error("target connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("target closed the connection during login")]
    Closed,
}

impl BackendError {
    /// The target's own `ErrorResponse`, when it refused the login for
    /// something the client asked for (a setting it does not know, a value
    /// it does not take, too many connections…) and may be shown to the
    /// client as it is. Refusals of the worker's own credentials (class
    /// `28`) or of the configured database (`3D000`) are the target's
    /// configuration, not the client's business: `None`.
    pub fn for_client(&self) -> Option<&Frame> {
        match self {
            BackendError::Refused { fields, frame }
                if !fields.code.starts_with("28") && fields.code != "3D000" =>
            {
                Some(frame)
            }
            _ => None,
        }
    }
}

/// A logged-in connection to a target, ready for queries.
pub struct Backend {
    pub conn: Conn,
    /// Bytes already read past the login's `ReadyForQuery`.
    pub leftover: BytesMut,
    pub parameters: Vec<(String, String)>,
    pub process_id: i32,
    pub secret_key: i32,
    pub status: TransactionStatus,
}

pub struct Login<'a> {
    pub target: &'a TargetConfig,
    pub tls: Option<&'a Arc<rustls::ClientConfig>>,
    /// Startup parameters for the target: the client's settings the worker
    /// allowed (`application_name`, `client_encoding`, `search_path`, …),
    /// and its own.
    pub params: &'a [(String, String)],
    pub max_message: usize,
}

/// Opens a transport to the target: TCP, then TLS unless disabled.
pub async fn open(
    target: &TargetConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Conn, BackendError> {
    let addr = format!("{}:{}", target.host, target.port);
    let mut tcp = TcpStream::connect(&addr)
        .await
        .map_err(|source| BackendError::Connect { addr, source })?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Conn::Plain(tcp));
    };
    let mut req = BytesMut::new();
    pg::ssl_request(&mut req);
    send(&mut tcp, &req).await?;
    if tcp.read_u8().await? != b'S' {
        return Err(BackendError::TlsRefused);
    }
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| BackendError::Tls(std::io::Error::other(e)))?;
    let stream = TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(BackendError::Tls)?;
    Ok(Conn::Tls(Box::new(stream.into())))
}

pub async fn login(login: Login<'_>) -> Result<Backend, BackendError> {
    let target = login.target;
    let mut conn = open(target, login.tls).await?;
    let mut out = BytesMut::new();
    let mut params: Vec<(&str, &str)> =
        vec![("user", &target.user), ("database", &target.database)];
    params.extend(login.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    pg::startup_message(&mut out, params);
    send(&mut conn, &out).await?;

    let mut buf = BytesMut::with_capacity(8192);
    let mut auth = Auth::new(target, binding_data(&conn));
    let mut parameters = Vec::new();
    let mut key = (0, 0);
    loop {
        let frame = read_frame(&mut conn, &mut buf, login.max_message).await?;
        out.clear();
        match BackendMessage::parse(&frame)? {
            BackendMessage::Authentication { code, data } => {
                auth.step(code, data, &mut out)?;
            }
            BackendMessage::ParameterStatus { name, value } => {
                parameters.push((name.to_owned(), value.to_owned()));
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => key = (process_id, secret_key),
            BackendMessage::ErrorResponse(fields) => {
                return Err(BackendError::Refused {
                    fields,
                    frame: frame.clone(),
                });
            }
            BackendMessage::ReadyForQuery(status) => {
                auth.done()?;
                return Ok(Backend {
                    conn,
                    leftover: buf,
                    parameters,
                    process_id: key.0,
                    secret_key: key.1,
                    status,
                });
            }
            // NoticeResponse and anything else during login: ignore.
            _ => {}
        }
        if !out.is_empty() {
            send(&mut conn, &out).await?;
        }
    }
}

/// Runs one statement of the worker's own on a logged-in target (before
/// the client's session starts) and returns its rows' text values.
pub async fn rows(
    backend: &mut Backend,
    sql: &str,
    max_message: usize,
) -> Result<Vec<Vec<Option<String>>>, BackendError> {
    let mut out = BytesMut::new();
    pg::query(&mut out, sql);
    send(&mut backend.conn, &out).await?;
    let mut rows = Vec::new();
    let mut failed = None;
    loop {
        let frame = read_frame(&mut backend.conn, &mut backend.leftover, max_message).await?;
        match frame.tag {
            b'D' => {
                let body = frame.body();
                let n = body
                    .get(..2)
                    .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]));
                let mut at = 2;
                let mut row = Vec::new();
                for _ in 0..n.max(0) {
                    let len = body
                        .get(at..at + 4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or(pg::ProtocolError::Malformed {
                            message: "DataRow",
                            why: "a value runs past the message",
                        })?;
                    at += 4;
                    if len < 0 {
                        row.push(None);
                        continue;
                    }
                    let value =
                        body.get(at..at + len as usize)
                            .ok_or(pg::ProtocolError::Malformed {
                                message: "DataRow",
                                why: "a value runs past the message",
                            })?;
                    row.push(Some(String::from_utf8_lossy(value).into_owned()));
                    at += len as usize;
                }
                rows.push(row);
            }
            b'E' => {
                if let BackendMessage::ErrorResponse(fields) = BackendMessage::parse(&frame)? {
                    failed = Some(BackendError::Refused {
                        fields,
                        frame: frame.clone(),
                    });
                }
            }
            b'Z' => {
                if let BackendMessage::ReadyForQuery(status) = BackendMessage::parse(&frame)? {
                    backend.status = status;
                }
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(rows),
                };
            }
            _ => {}
        }
    }
}

/// The worker's side of the target's authentication exchange: it answers
/// only what the target's configuration allows, sends a password (cleartext
/// or MD5) only to a target whose certificate it verified, and takes the
/// login as done only once the method that began has finished — a SCRAM
/// exchange with the server's proof checked.
struct Auth<'a> {
    target: &'a TargetConfig,
    /// The connection's `tls-server-end-point` channel binding data; `None`
    /// without TLS, or for a certificate it cannot be computed for.
    binding: Option<Vec<u8>>,
    /// SCRAM with channel binding begun.
    bound: bool,
    /// SCRAM begun and not yet proven by the server.
    scram: Option<sasl::ScramSha256>,
    /// The method the target asked for, if any, and whether it finished.
    method: Option<TargetAuth>,
    finished: bool,
}

impl<'a> Auth<'a> {
    fn new(target: &'a TargetConfig, binding: Option<Vec<u8>>) -> Self {
        Auth {
            target,
            binding,
            bound: false,
            scram: None,
            method: None,
            finished: false,
        }
    }

    fn allow(&mut self, method: TargetAuth) -> Result<(), BackendError> {
        if let Some(allowed) = &self.target.auth_methods
            && !allowed.contains(&method)
        {
            return Err(BackendError::Untrusted(format!(
                "it asked for {method:?} authentication, which auth_methods does not allow"
            )));
        }
        if self.target.channel_binding == ChannelBinding::Require
            && method != TargetAuth::ScramSha256
        {
            return Err(BackendError::Untrusted(format!(
                "it asked for {method:?} authentication, but channel_binding = \"require\" \
                 allows only SCRAM with channel binding"
            )));
        }
        if self.method.is_some() && self.method != Some(method) {
            return Err(BackendError::Untrusted(
                "it switched authentication methods mid-exchange".into(),
            ));
        }
        self.method = Some(method);
        Ok(())
    }

    fn password(&self, method: TargetAuth) -> Result<&'a str, BackendError> {
        if self.target.tls != TargetTls::VerifyFull {
            return Err(BackendError::Untrusted(format!(
                "it asked for a {} password over a connection whose certificate is not \
                 verified (tls = {:?}); Gatehouse sends passwords only to a verified \
                 target (tls = \"verify-full\") and uses SCRAM otherwise",
                if method == TargetAuth::Md5 {
                    "MD5"
                } else {
                    "cleartext"
                },
                self.target.tls
            )));
        }
        self.target
            .password
            .as_deref()
            .ok_or(BackendError::NoPassword)
    }

    /// Answers one `Authentication` message into `out`.
    fn step(&mut self, code: i32, data: &[u8], out: &mut BytesMut) -> Result<(), BackendError> {
        match code {
            0 => {
                if self.method.is_none() {
                    self.allow(TargetAuth::None)?;
                } else if self.method == Some(TargetAuth::ScramSha256) && !self.finished {
                    return Err(BackendError::Untrusted(
                        "it accepted the login before proving, in SCRAM, that it knows the \
                         password"
                            .into(),
                    ));
                }
                self.finished = true;
            }
            3 => {
                self.allow(TargetAuth::Password)?;
                pg::password_message(out, self.password(TargetAuth::Password)?);
                self.finished = true;
            }
            5 => {
                self.allow(TargetAuth::Md5)?;
                let salt: [u8; 4] = data.try_into().map_err(|_| pg::ProtocolError::Malformed {
                    message: "AuthenticationMD5Password",
                    why: "salt must be 4 bytes",
                })?;
                let password = self.password(TargetAuth::Md5)?;
                let hash = md5_hash(self.target.user.as_bytes(), password.as_bytes(), salt);
                pg::password_message(out, &hash);
                self.finished = true;
            }
            10 => {
                self.allow(TargetAuth::ScramSha256)?;
                if self.scram.is_some() {
                    return Err(BackendError::Untrusted("it began SCRAM twice".into()));
                }
                let (mechanism, binding) = self.mechanism(data)?;
                let password = self
                    .target
                    .password
                    .as_deref()
                    .ok_or(BackendError::NoPassword)?;
                let s = sasl::ScramSha256::new(password.as_bytes(), binding);
                pg::sasl_initial_response(out, mechanism, s.message());
                self.scram = Some(s);
            }
            11 => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or(BackendError::UnsupportedAuth(11))?;
                s.update(data).map_err(BackendError::Scram)?;
                pg::sasl_response(out, s.message());
            }
            12 => {
                let mut s = self.scram.take().ok_or(BackendError::UnsupportedAuth(12))?;
                // Checks the server's signature: it knows the password.
                s.finish(data).map_err(BackendError::Scram)?;
                self.finished = true;
            }
            code => return Err(BackendError::UnsupportedAuth(code)),
        }
        Ok(())
    }

    /// The SASL mechanism to answer an offer of `mechanisms` (NUL-separated)
    /// with: SCRAM bound to the TLS connection where both sides can, else
    /// plain SCRAM, saying whether the worker could have bound it (`y`: a
    /// server that can bind but whose offer was stripped on the way then
    /// refuses the login) or not (`n`: no TLS, or binding disabled).
    fn mechanism(
        &mut self,
        mechanisms: &[u8],
    ) -> Result<(&'static str, sasl::ChannelBinding), BackendError> {
        let offers = |name: &str| mechanisms.split(|b| *b == 0).any(|m| m == name.as_bytes());
        let mode = self.target.channel_binding;
        if mode != ChannelBinding::Disable
            && offers(sasl::SCRAM_SHA_256_PLUS)
            && let Some(data) = &self.binding
        {
            self.bound = true;
            return Ok((
                sasl::SCRAM_SHA_256_PLUS,
                sasl::ChannelBinding::tls_server_end_point(data.clone()),
            ));
        }
        if mode == ChannelBinding::Require {
            return Err(BackendError::Untrusted(if self.binding.is_none() {
                "channel_binding = \"require\", but the connection has no TLS or a \
                 certificate channel binding cannot be computed for"
                    .into()
            } else {
                "channel_binding = \"require\", but it did not offer SCRAM-SHA-256-PLUS".into()
            }));
        }
        if !offers(sasl::SCRAM_SHA_256) {
            return Err(BackendError::UnsupportedAuth(10));
        }
        let binding = if self.binding.is_some() && mode == ChannelBinding::Prefer {
            sasl::ChannelBinding::unrequested()
        } else {
            sasl::ChannelBinding::unsupported()
        };
        Ok((sasl::SCRAM_SHA_256, binding))
    }

    /// The target says the login is done (`ReadyForQuery`).
    fn done(&self) -> Result<(), BackendError> {
        if !self.finished {
            return Err(BackendError::Untrusted(
                "it ended the login before authenticating the worker".into(),
            ));
        }
        if self.target.channel_binding == ChannelBinding::Require && !self.bound {
            return Err(BackendError::Untrusted(
                "channel_binding = \"require\", but the login was not bound to the TLS \
                 connection"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The `tls-server-end-point` channel binding data of the connection (RFC
/// 5929), if it has TLS.
fn binding_data(conn: &Conn) -> Option<Vec<u8>> {
    let Conn::Tls(tls) = conn else {
        return None;
    };
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    tls_server_end_point(cert)
}

/// The `tls-server-end-point` channel binding data of a certificate (DER),
/// as PostgreSQL computes it: the certificate's hash with the hash function
/// of its signature algorithm, SHA-256 where that is MD5 or SHA-1. `None`
/// for one PostgreSQL does not bind to either (Ed25519, RSA-PSS, SHA-224)
/// or DER that does not read as a certificate.
pub(crate) fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm
    // SEQUENCE { algorithm OBJECT IDENTIFIER, … }, signature BIT STRING }
    let (0x30, body, _) = der(cert)? else {
        return None;
    };
    let (0x30, _, rest) = der(body)? else {
        return None;
    };
    let (0x30, algorithm, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der(algorithm)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let hash = match oid {
        // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption
        [r @ .., 0x04 | 0x05 | 0x0b] if r == RSA => &ring::digest::SHA256,
        [r @ .., 0x0c] if r == RSA => &ring::digest::SHA384,
        [r @ .., 0x0d] if r == RSA => &ring::digest::SHA512,
        // ecdsa-with-SHA1, ecdsa-with-SHA256/384/512
        [e @ .., 0x01] if e == ECDSA => &ring::digest::SHA256,
        [e @ .., 0x03, 0x02] if e == ECDSA => &ring::digest::SHA256,
        [e @ .., 0x03, 0x03] if e == ECDSA => &ring::digest::SHA384,
        [e @ .., 0x03, 0x04] if e == ECDSA => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(hash, cert).as_ref().to_vec())
}

/// One DER element at the start of `input`: its tag, its content and what
/// follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

async fn read_frame(
    conn: &mut Conn,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, BackendError> {
    loop {
        if let Some(frame) = pg::decode_frame(buf, max)? {
            return Ok(frame);
        }
        if conn.read_buf(buf).await? == 0 {
            return Err(BackendError::Closed);
        }
    }
}

/// Sends a cancel request for a backend process to the target.
pub async fn cancel(
    target: &TargetConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    process_id: i32,
    secret_key: i32,
) -> Result<(), BackendError> {
    let mut conn = open(target, tls).await?;
    let mut out = BytesMut::new();
    pg::cancel_request(&mut out, process_id, secret_key);
    send(&mut conn, &out).await?;
    // The server closes the connection once it has read the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["db.example".into()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// The binding hashes with the certificate's own signature hash, as
    /// PostgreSQL does, and gives up where PostgreSQL does.
    #[test]
    fn channel_binding_data_follows_the_signature_hash() {
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&p256).unwrap(),
            ring::digest::digest(&ring::digest::SHA256, &p256).as_ref()
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            tls_server_end_point(&p384).unwrap(),
            ring::digest::digest(&ring::digest::SHA384, &p384).as_ref()
        );
        assert_eq!(tls_server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
        for garbage in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &p256[..40],
        ] {
            assert_eq!(tls_server_end_point(garbage), None);
        }
    }

    fn target(binding: ChannelBinding) -> TargetConfig {
        TargetConfig {
            host: "db".into(),
            port: 5432,
            database: "app".into(),
            user: "gatehouse".into(),
            password_env: None,
            password_file: None,
            tls: TargetTls::Require,
            tls_ca_file: None,
            auth_methods: None,
            channel_binding: binding,
            environment: String::new(),
            tags: Vec::new(),
            password: Some("pw".into()),
            masking: None,
            masker: None,
        }
    }

    /// The first SCRAM message says which mechanism was chosen and how the
    /// client stands on channel binding (`p=…`, `y`, `n`).
    fn first(binding: ChannelBinding, tls: bool, offer: &[u8]) -> Result<String, BackendError> {
        let t = target(binding);
        let data = tls.then(|| vec![7u8; 32]);
        let mut auth = Auth::new(&t, data);
        let mut out = BytesMut::new();
        auth.step(10, offer, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn scram_is_bound_to_tls_when_both_sides_can() {
        let both = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let plain = b"SCRAM-SHA-256\0\0";
        let sent = first(ChannelBinding::Prefer, true, both).unwrap();
        assert!(sent.contains("SCRAM-SHA-256-PLUS\0"), "{sent:?}");
        assert!(sent.contains("p=tls-server-end-point,,n="), "{sent:?}");
        // The offer stripped by someone in the middle: the server learns
        // the worker could have bound, and refuses if it offered.
        let sent = first(ChannelBinding::Prefer, true, plain).unwrap();
        assert!(sent.contains("y,,n="), "{sent:?}");
        let sent = first(ChannelBinding::Prefer, false, both).unwrap();
        assert!(sent.contains("n,,n=") && !sent.contains("PLUS"), "{sent:?}");
        let sent = first(ChannelBinding::Disable, true, both).unwrap();
        assert!(sent.contains("n,,n=") && !sent.contains("PLUS"), "{sent:?}");
        let sent = first(ChannelBinding::Require, true, both).unwrap();
        assert!(sent.contains("p=tls-server-end-point"), "{sent:?}");
        for (tls, offer) in [(true, &plain[..]), (false, &both[..])] {
            let e = first(ChannelBinding::Require, tls, offer).unwrap_err();
            assert!(matches!(e, BackendError::Untrusted(_)), "{e}");
        }
    }

    #[test]
    fn require_refuses_every_other_method() {
        let t = target(ChannelBinding::Require);
        for code in [0, 3, 5] {
            let mut auth = Auth::new(&t, Some(vec![7; 32]));
            let e = auth
                .step(code, &[1, 2, 3, 4], &mut BytesMut::new())
                .unwrap_err();
            assert!(matches!(e, BackendError::Untrusted(_)), "{code}: {e}");
        }
    }
}
