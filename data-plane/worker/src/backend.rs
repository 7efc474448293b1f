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

use crate::config::TargetConfig;
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
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut parameters = Vec::new();
    let mut key = (0, 0);
    loop {
        let frame = read_frame(&mut conn, &mut buf, login.max_message).await?;
        out.clear();
        match BackendMessage::parse(&frame)? {
            BackendMessage::Authentication { code: 0, .. } => {}
            BackendMessage::Authentication { code: 3, .. } => {
                pg::password_message(&mut out, password(target)?);
            }
            BackendMessage::Authentication { code: 5, data } => {
                let salt: [u8; 4] = data.try_into().map_err(|_| pg::ProtocolError::Malformed {
                    message: "AuthenticationMD5Password",
                    why: "salt must be 4 bytes",
                })?;
                let hash = md5_hash(target.user.as_bytes(), password(target)?.as_bytes(), salt);
                pg::password_message(&mut out, &hash);
            }
            BackendMessage::Authentication { code: 10, data } => {
                let offers_scram = data
                    .split(|b| *b == 0)
                    .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(BackendError::UnsupportedAuth(10));
                }
                let s = sasl::ScramSha256::new(
                    password(target)?.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                pg::sasl_initial_response(&mut out, sasl::SCRAM_SHA_256, s.message());
                scram = Some(s);
            }
            BackendMessage::Authentication { code: 11, data } => {
                let s = scram.as_mut().ok_or(BackendError::UnsupportedAuth(11))?;
                s.update(data).map_err(BackendError::Scram)?;
                pg::sasl_response(&mut out, s.message());
            }
            BackendMessage::Authentication { code: 12, data } => {
                let mut s = scram.take().ok_or(BackendError::UnsupportedAuth(12))?;
                s.finish(data).map_err(BackendError::Scram)?;
            }
            BackendMessage::Authentication { code, .. } => {
                return Err(BackendError::UnsupportedAuth(code));
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

fn password(target: &TargetConfig) -> Result<&str, BackendError> {
    target.password.as_deref().ok_or(BackendError::NoPassword)
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
