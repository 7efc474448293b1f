//! One client connection, from its first byte to its last: the startup
//! state machine (TLS, authentication, target login) and the context that
//! stamps every event of the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use gatehouse_events::{
    AuthenticationFailed, CloseReason, Event, Identity, Payload, SessionClosed, SessionOpened,
};
use gatehouse_pgwire::{self as pg, FrontendMessage, StartupPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::backend::{self, Login};
use crate::conn::{Conn, send};
use crate::encoding::Parsing;
use crate::error::ClientError;
use crate::{Shared, relay};

/// Startup parameters passed on to the target. Anything else (notably
/// `options` and arbitrary settings such as `role`) could change the
/// session's privileges without a recorded command, so it is dropped.
const PASSED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "search_path",
    "statement_timeout",
];

/// Largest startup packet accepted before authentication.
const MAX_STARTUP: usize = 16 * 1024;

/// What is known about an open session; stamps its events.
pub(crate) struct SessionCtx {
    pub worker_id: String,
    pub session_id: Uuid,
    pub identity: Identity,
    pub target: String,
    pub expires_at: i64,
    pub leeway_secs: i64,
    seq: AtomicU64,
    pub commands: AtomicU64,
    pub bytes_from_client: AtomicU64,
    pub bytes_to_client: AtomicU64,
    started: Instant,
}

impl SessionCtx {
    pub fn event(&self, payload: Payload) -> Event {
        let mut e = Event::new(self.worker_id.clone(), payload);
        e.session_id = Some(self.session_id);
        e.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        e.identity = Some(self.identity.clone());
        e.target = Some(self.target.clone());
        e
    }
}

/// Why a connection ended before a session opened.
struct Refusal {
    error: ClientError,
    /// Reason code for the `AuthenticationFailed` event; `None` when the
    /// connection ended without an attempt worth recording (and without a
    /// word to the client).
    reason: Option<&'static str>,
}

impl Refusal {
    fn new(error: ClientError, reason: &'static str) -> Self {
        Self {
            error,
            reason: Some(reason),
        }
    }

    fn silent() -> Self {
        Self {
            error: ClientError::protocol("connection closed"),
            reason: None,
        }
    }
}

struct Attempt {
    peer: SocketAddr,
    tls: bool,
    user: Option<String>,
    database: Option<String>,
}

pub(crate) async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut attempt = Attempt {
        peer,
        tls: false,
        user: None,
        database: None,
    };
    let Some((mut conn, buf, startup)) = negotiate(&shared, tcp, &mut attempt).await else {
        return;
    };
    let result = match startup {
        Startup::Params(params) => {
            authenticate(&shared, &mut conn, buf, params, &mut attempt).await
        }
        Startup::Done => return,
        Startup::Refused(r) => Err(r),
    };
    let refusal = match result {
        Ok(opened) => return relay::run(shared, conn, opened).await,
        Err(refusal) => refusal,
    };
    if let Some(reason) = refusal.reason {
        let mut e = Event::new(
            shared.worker_id.clone(),
            Payload::AuthenticationFailed(AuthenticationFailed {
                client_addr: attempt.peer.to_string(),
                client_tls: attempt.tls,
                claimed_user: attempt.user.clone(),
                requested_target: attempt.database.clone(),
                reason: reason.into(),
            }),
        );
        e.session_id = Some(Uuid::now_v7());
        e.seq = 1;
        e.target = attempt.database.clone();
        if let Err(err) = shared.publisher.record(vec![e]).await {
            tracing::warn!(error = %err, "could not record a refused connection");
        }
        tracing::info!(peer = %attempt.peer, reason, "connection refused");
        let mut out = BytesMut::new();
        refusal.error.encode(&mut out);
        let _ = send(&mut conn, &out).await;
    }
    let _ = conn.shutdown().await;
}

enum Startup {
    Params(Vec<(String, String)>),
    /// The connection served its purpose (a cancel request).
    Done,
    Refused(Refusal),
}

/// A session that authenticated and reached its target.
pub(crate) struct Opened {
    pub ctx: Arc<SessionCtx>,
    pub backend: backend::Backend,
    pub target: Arc<crate::Target>,
    /// Client bytes read past the password message.
    pub client_leftover: BytesMut,
    pub policy: crate::policy::SessionPolicy,
    /// How the target reads the session's text, as it reported at login.
    pub parsing: Parsing,
}

async fn read_more(conn: &mut Conn, buf: &mut BytesMut) -> Result<(), Refusal> {
    match conn.read_buf(buf).await {
        Ok(0) | Err(_) => Err(Refusal::silent()),
        Ok(_) => Ok(()),
    }
}

/// The startup packets before authentication: TLS and GSS negotiation,
/// cancel requests, and finally the StartupMessage. `None` when the
/// connection is gone.
async fn negotiate(
    shared: &Shared,
    tcp: TcpStream,
    attempt: &mut Attempt,
) -> Option<(Conn, BytesMut, Startup)> {
    let mut conn = Conn::Plain(tcp);
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(len) = buf.first_chunk::<4>().map(|b| i32::from_be_bytes(*b))
            && !(8..=MAX_STARTUP as i32).contains(&len)
        {
            // Not a startup packet at all: a message of an open session
            // (`Terminate`), another protocol, a port scanner. PostgreSQL
            // closes such a connection without a word (the client speaks
            // no protocol it could answer in) and so does the worker,
            // recording nothing: nobody attempted to log in.
            tracing::debug!(peer = %attempt.peer, len, "not a startup packet; closing");
            return Some((conn, buf, Startup::Refused(Refusal::silent())));
        }
        let packet = match pg::decode_startup(&mut buf, MAX_STARTUP) {
            Ok(Some(p)) => p,
            Ok(None) => {
                read_more(&mut conn, &mut buf).await.ok()?;
                continue;
            }
            Err(e) => {
                let r = Refusal::new(ClientError::protocol(e), "protocol_violation");
                return Some((conn, buf, Startup::Refused(r)));
            }
        };
        match packet {
            StartupPacket::SslRequest if !conn.is_tls() => {
                let Some(acceptor) = &shared.tls else {
                    send(&mut conn, b"N").await.ok()?;
                    continue;
                };
                if !buf.is_empty() {
                    // Bytes sent before the handshake would be trusted as if
                    // they came over TLS (CVE-2021-23222): refuse.
                    let r = Refusal::new(
                        ClientError::protocol("data received before the TLS handshake"),
                        "protocol_violation",
                    );
                    return Some((conn, buf, Startup::Refused(r)));
                }
                send(&mut conn, b"S").await.ok()?;
                let Conn::Plain(tcp) = conn else {
                    unreachable!("only a plain connection asks for TLS")
                };
                let tls = acceptor.accept(tcp).await.ok()?;
                conn = Conn::Tls(Box::new(tls.into()));
                attempt.tls = true;
            }
            StartupPacket::GssEncRequest if !conn.is_tls() => {
                send(&mut conn, b"N").await.ok()?;
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let r = Refusal::new(
                    ClientError::protocol("encryption requested twice"),
                    "protocol_violation",
                );
                return Some((conn, buf, Startup::Refused(r)));
            }
            StartupPacket::CancelRequest {
                process_id,
                secret_key,
            } => {
                if !shared.cancels.cancel_local(process_id, secret_key).await {
                    let payload = crate::cancel::encode(process_id, secret_key);
                    let _ = shared
                        .nats
                        .publish(shared.config.cancel_subject.clone(), payload.into())
                        .await;
                }
                return Some((conn, buf, Startup::Done));
            }
            StartupPacket::Startup { params } => return Some((conn, buf, Startup::Params(params))),
        }
    }
}

/// Authenticates the client by token and logs in to its target.
async fn authenticate(
    shared: &Shared,
    conn: &mut Conn,
    mut buf: BytesMut,
    params: Vec<(String, String)>,
    attempt: &mut Attempt,
) -> Result<Opened, Refusal> {
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    attempt.user = get("user");
    attempt.database = get("database").or_else(|| attempt.user.clone());
    if !attempt.tls && !shared.config.allow_plaintext {
        return Err(Refusal::new(ClientError::tls_required(), "tls_required"));
    }
    let Some(user) = attempt.user.clone() else {
        return Err(Refusal::new(
            ClientError::fatal("28000", "no user name in the startup message"),
            "no_user",
        ));
    };
    if get("replication").is_some_and(|r| r != "false" && r != "0") {
        return Err(Refusal::new(
            ClientError::fatal(
                "0A000",
                "replication connections are not supported through Gatehouse",
            ),
            "replication_refused",
        ));
    }
    let database = attempt.database.clone().unwrap_or_default();

    // Ask for the token as a cleartext password (only ever inside TLS,
    // unless plaintext was explicitly allowed).
    let mut out = BytesMut::new();
    pg::authentication_cleartext_password(&mut out);
    send(conn, &out).await.map_err(|_| Refusal::silent())?;
    let frame = loop {
        match pg::decode_frame(&mut buf, MAX_STARTUP) {
            Ok(Some(f)) => break f,
            Ok(None) => read_more(conn, &mut buf).await?,
            Err(e) => return Err(Refusal::new(ClientError::protocol(e), "protocol_violation")),
        }
    };
    let token = match FrontendMessage::parse(&frame) {
        Ok(FrontendMessage::Password(body)) => pg::password_text(body)
            .map_err(|e| Refusal::new(ClientError::protocol(e), "protocol_violation"))?,
        _ => {
            return Err(Refusal::new(
                ClientError::protocol("expected a password message"),
                "protocol_violation",
            ));
        }
    };
    let verified = shared.verifier.verify(token).await.map_err(|e| {
        if let gatehouse_identity::AuthError::IssuerUnavailable(detail) = &e {
            tracing::warn!(%detail, "identity provider unavailable");
        }
        Refusal::new(ClientError::fatal("28P01", e.user_message()), e.reason())
    })?;
    if verified.identity.username != user {
        return Err(Refusal::new(
            ClientError::fatal(
                "28000",
                format!("user name \"{user}\" does not match the identity in the token"),
            ),
            "user_mismatch",
        ));
    }
    let Some(target) = shared.targets.get(&database).cloned() else {
        return Err(Refusal::new(
            ClientError::fatal("3D000", format!("no target named \"{database}\"")),
            "unknown_target",
        ));
    };

    let mut policy = crate::policy::SessionPolicy::new(
        &shared.policy_config,
        &verified.identity,
        verified.token_id.clone(),
        target.info(),
        attempt.peer.ip().to_string(),
    );
    {
        let state = shared.policies.borrow().clone();
        if policy.revoked(&state) {
            return Err(Refusal::new(
                ClientError::fatal("28000", "access for this identity has been revoked"),
                "revoked",
            ));
        }
        policy
            .decide_connect(&state)
            .map_err(|e| Refusal::new(e, "connect_denied"))?;
    }

    let mut passed: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| PASSED_PARAMS.contains(&k.to_ascii_lowercase().as_str()))
        .cloned()
        .collect();
    if policy.read_only {
        // Defence in depth: the target itself refuses writes too.
        passed.push(("default_transaction_read_only".into(), "on".into()));
    }
    let mut backend = backend::login(Login {
        target: &target.config,
        tls: target.tls.as_ref(),
        params: &passed,
        max_message: shared.config.max_message_bytes,
    })
    .await
    .map_err(|e| {
        tracing::warn!(target = %target.name, error = %e, "cannot log in to target");
        Refusal::new(
            ClientError::fatal(
                "08001",
                format!("cannot connect to target \"{}\"", target.name),
            ),
            "target_unavailable",
        )
    })?;
    // The target says which encoding the session's text is in (the
    // client's `client_encoding`, or the database's): one the worker cannot
    // read exactly, it cannot classify.
    let parsing = Parsing::from_parameters(
        backend
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    if let Err(unsupported) = &parsing.encoding {
        let mut bye = BytesMut::new();
        pg::terminate(&mut bye);
        let _ = send(&mut backend.conn, &bye).await;
        return Err(Refusal::new(
            unsupported.client_error(true),
            "unsupported_encoding",
        ));
    }

    let ctx = Arc::new(SessionCtx {
        worker_id: shared.worker_id.clone(),
        session_id: Uuid::now_v7(),
        identity: verified.identity,
        target: target.name.clone(),
        expires_at: verified.expires_at,
        leeway_secs: shared.verifier.leeway_secs() as i64,
        seq: AtomicU64::new(0),
        commands: AtomicU64::new(0),
        bytes_from_client: AtomicU64::new(0),
        bytes_to_client: AtomicU64::new(0),
        started: Instant::now(),
    });
    let opened = ctx.event(Payload::SessionOpened(SessionOpened {
        client_addr: attempt.peer.to_string(),
        client_tls: attempt.tls,
        target_tls: backend.conn.is_tls(),
        application_name: get("application_name"),
        token_expires_at: Some(ctx.expires_at),
    }));
    if let Err(e) = shared.publisher.record(vec![opened]).await {
        tracing::warn!(error = %e, "cannot record session start");
        return Err(Refusal::new(
            ClientError::fatal(
                crate::error::EVENT_LOG_UNAVAILABLE,
                "Gatehouse could not record the session in the audit log; try again shortly",
            ),
            "event_log_unavailable",
        ));
    }
    let encoding = parsing.encoding.as_ref().map_or("?", |e| e.name());
    tracing::info!(session = %ctx.session_id, user = %ctx.identity.username, target = %ctx.target, encoding, "session opened");
    Ok(Opened {
        ctx,
        backend,
        target,
        client_leftover: buf,
        policy,
        parsing,
    })
}

/// Records the end of a session. Retries for a while: a session's last
/// event must not be lost because NATS blinked.
pub(crate) async fn close(shared: &Shared, ctx: &SessionCtx, reason: CloseReason) {
    let event = ctx.event(Payload::SessionClosed(SessionClosed {
        reason,
        commands: ctx.commands.load(Ordering::Relaxed),
        bytes_from_client: ctx.bytes_from_client.load(Ordering::Relaxed),
        bytes_to_client: ctx.bytes_to_client.load(Ordering::Relaxed),
        duration_ms: ctx.started.elapsed().as_millis() as u64,
    }));
    let mut delay = std::time::Duration::from_millis(200);
    for attempt in 1..=8 {
        match shared.publisher.record(vec![event.clone()]).await {
            Ok(()) => break,
            Err(e) if attempt == 8 => {
                tracing::error!(session = %ctx.session_id, error = %e, "could not record session end");
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(10));
            }
        }
    }
    tracing::info!(session = %ctx.session_id, ?reason, "session closed");
}

#[cfg(test)]
impl SessionCtx {
    /// A session context for unit tests of the session machine.
    pub fn for_tests(identity: Identity) -> Self {
        SessionCtx {
            worker_id: "test-worker".into(),
            session_id: Uuid::now_v7(),
            identity,
            target: "test".into(),
            expires_at: i64::MAX / 2,
            leeway_secs: 0,
            seq: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}
