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

use crate::config::{TargetAuth, TargetConfig, TargetTls};
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
    let mut auth = Auth::new(target);
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

/// The worker's side of the target's authentication exchange: it answers
/// only what the target's configuration allows, sends a password (cleartext
/// or MD5) only to a target whose certificate it verified, and takes the
/// login as done only once the method that began has finished — a SCRAM
/// exchange with the server's proof checked.
struct Auth<'a> {
    target: &'a TargetConfig,
    /// SCRAM begun and not yet proven by the server.
    scram: Option<sasl::ScramSha256>,
    /// The method the target asked for, if any, and whether it finished.
    method: Option<TargetAuth>,
    finished: bool,
}

impl<'a> Auth<'a> {
    fn new(target: &'a TargetConfig) -> Self {
        Auth {
            target,
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
                let offers_scram = data
                    .split(|b| *b == 0)
                    .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(BackendError::UnsupportedAuth(10));
                }
                let password = self
                    .target
                    .password
                    .as_deref()
                    .ok_or(BackendError::NoPassword)?;
                let s = sasl::ScramSha256::new(
                    password.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                pg::sasl_initial_response(out, sasl::SCRAM_SHA_256, s.message());
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

    /// The target says the login is done (`ReadyForQuery`).
    fn done(&self) -> Result<(), BackendError> {
        if self.finished {
            Ok(())
        } else {
            Err(BackendError::Untrusted(
                "it ended the login before authenticating the worker".into(),
            ))
        }
    }
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
