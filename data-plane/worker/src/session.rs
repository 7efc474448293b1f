//! One client connection, from its first byte to its last: the startup
//! state machine (TLS, authentication, target login) and the context that
//! stamps every event of the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gatehouse_events::{
    AuthenticationFailed, CloseReason, Event, Identity, Payload, SessionClosed, SessionOpened,
};
use gatehouse_identity::{AuthError, Plane};
use gatehouse_pgwire::{self as pg, FrontendMessage, StartupPacket};
use gatehouse_policies::{Reading, classify};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::admission::{Counters, LoginGate, Permit, truncate};
use crate::backend::{self, Login};
use crate::conn::{Conn, send};
use crate::encoding::Parsing;
use crate::error::ClientError;
use crate::masking::{Catalogue, ResponseMask, TargetMasking};
use crate::policy::{PolicyState, SessionPolicy};
use crate::usernames::NameError;
use crate::{Shared, relay};

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
    /// The worker's counters (limits hit).
    pub counters: Arc<Counters>,
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
    /// The target's own `ErrorResponse`, sent to the client instead of
    /// `error`.
    from_target: Option<Bytes>,
    /// Reason code for the `AuthenticationFailed` event; `None` when the
    /// connection ended without an attempt worth recording (and without a
    /// word to the client).
    reason: Option<&'static str>,
    /// Whether to record it; `None`: as its reason says (a login failure
    /// is recorded while its address's failure budget lasts).
    record: Option<bool>,
}

impl Refusal {
    fn new(error: ClientError, reason: &'static str) -> Self {
        Self {
            error,
            from_target: None,
            reason: Some(reason),
            record: None,
        }
    }

    fn silent() -> Self {
        Self {
            error: ClientError::protocol("connection closed"),
            from_target: None,
            reason: None,
            record: None,
        }
    }
}

struct Attempt {
    peer: SocketAddr,
    tls: bool,
    user: Option<String>,
    database: Option<String>,
}

pub(crate) async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, _permit: Permit) {
    let _ = tcp.set_nodelay(true);
    let mut attempt = Attempt {
        peer,
        tls: false,
        user: None,
        database: None,
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(shared.config.startup_timeout_secs);
    let negotiated = tokio::time::timeout_at(deadline, negotiate(&shared, tcp, &mut attempt));
    let Some((mut conn, buf, startup)) = negotiated.await.unwrap_or_else(|_| {
        // Not even a startup message in time: nobody attempted to log in.
        shared
            .admission
            .counters
            .startup_timeouts
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "no startup message before the deadline; closing");
        None
    }) else {
        return;
    };
    let result = match startup {
        Startup::Params(params) => {
            authenticate(&shared, &mut conn, buf, params, &mut attempt, deadline).await
        }
        Startup::Done => return,
        Startup::Refused(r) => Err(r),
    };
    let refusal = match result {
        Ok(opened) => {
            shared
                .admission
                .counters
                .sessions_opened
                .fetch_add(1, Ordering::Relaxed);
            relay::run(shared.clone(), conn, opened).await;
            return;
        }
        Err(refusal) => refusal,
    };
    if let Some(reason) = refusal.reason {
        let record = match refusal.record {
            Some(record) => record,
            None if is_login_failure(reason) => shared
                .admission
                .login_failed(peer.ip(), std::time::Instant::now()),
            None => true,
        };
        if record {
            record_refusal(&shared, &attempt, reason).await;
        }
        tracing::info!(peer = %attempt.peer, reason, recorded = record, "connection refused");
        let mut out = BytesMut::new();
        match &refusal.from_target {
            Some(frame) => out.extend_from_slice(frame),
            None => refusal.error.encode(&mut out),
        }
        let _ = send(&mut conn, &out).await;
    }
    let _ = conn.shutdown().await;
}

/// Longest claimed user name or target name recorded for a refused login:
/// PostgreSQL's own limit on names (`NAMEDATALEN` - 1). The rest is the
/// attacker's text and is not kept.
const MAX_RECORDED_NAME: usize = 63;

async fn record_refusal(shared: &Shared, attempt: &Attempt, reason: &str) {
    let name = |n: &Option<String>| n.as_deref().map(|n| truncate(n, MAX_RECORDED_NAME));
    let mut e = Event::new(
        shared.worker_id.clone(),
        Payload::AuthenticationFailed(AuthenticationFailed {
            client_addr: attempt.peer.to_string(),
            client_tls: attempt.tls,
            claimed_user: name(&attempt.user),
            requested_target: name(&attempt.database),
            reason: reason.into(),
        }),
    );
    e.session_id = Some(Uuid::now_v7());
    e.seq = 1;
    e.target = name(&attempt.database);
    if let Err(err) = shared.publisher.record(vec![e]).await {
        tracing::warn!(error = %err, "could not record a refused connection");
    }
}

/// Whether a refusal is the client's failure to log in, counted against its
/// address, rather than the target's or the worker's own trouble.
fn is_login_failure(reason: &str) -> bool {
    !matches!(
        reason,
        "target_unavailable" | "target_refused" | "event_log_unavailable"
    )
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
    pub policy: SessionPolicy,
    /// How the target reads the session's text, as it reported at login.
    pub parsing: Parsing,
    /// Masking of the target's responses, when it masks.
    pub mask: Option<ResponseMask>,
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
                    crate::cancel::forward(shared, process_id, secret_key).await;
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
    deadline: tokio::time::Instant,
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
    if let LoginGate::Closed {
        retry_after,
        record,
    } = shared
        .admission
        .login_gate(attempt.peer.ip(), std::time::Instant::now())
    {
        return Err(Refusal {
            record: Some(record),
            ..Refusal::new(
                ClientError::fatal(
                    "53300",
                    format!(
                        "too many failed logins from {}; try again in {} s",
                        attempt.peer.ip(),
                        retry_after.as_secs().max(1)
                    ),
                ),
                "rate_limited",
            )
        });
    }
    let settings = startup_settings(&params).map_err(|e| Refusal::new(e, "options_refused"))?;

    // Ask for the token as a cleartext password (only ever inside TLS,
    // unless plaintext was explicitly allowed).
    let mut out = BytesMut::new();
    pg::authentication_cleartext_password(&mut out);
    send(conn, &out).await.map_err(|_| Refusal::silent())?;
    let frame = loop {
        match pg::decode_frame(&mut buf, MAX_STARTUP) {
            Ok(Some(f)) => break f,
            Ok(None) => match tokio::time::timeout_at(deadline, read_more(conn, &mut buf)).await {
                Ok(read) => read?,
                Err(_) => {
                    shared
                        .admission
                        .counters
                        .startup_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::new(
                        ClientError::fatal(
                            "08006",
                            format!(
                                "no password within {} s of connecting (startup_timeout_secs)",
                                shared.config.startup_timeout_secs
                            ),
                        ),
                        "startup_timeout",
                    ));
                }
            },
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
    let verified = shared
        .verifier
        .verify(token, Plane::Worker)
        .await
        .map_err(|e| {
            let code = match &e {
                AuthError::IssuerUnavailable(detail) => {
                    tracing::warn!(%detail, "identity provider unavailable");
                    "28P01"
                }
                // A good token, for the API: not a password.
                AuthError::WrongPlane(_) => "28000",
                _ => "28P01",
            };
            Refusal::new(ClientError::fatal(code, e.user_message()), e.reason())
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
    // One user name per subject, in a safe set of characters (usernames.rs).
    if let Err(e) = shared
        .usernames
        .claim(&verified.identity.username, &verified.identity.subject)
        .await
    {
        let client = match &e {
            NameError::Unavailable(detail) => {
                tracing::warn!(%detail, "cannot check the user name's owner; login refused");
                ClientError::fatal(
                    crate::error::EVENT_LOG_UNAVAILABLE,
                    "Gatehouse could not check who owns this user name; try again shortly",
                )
            }
            NameError::Taken(_) => ClientError::fatal(
                "28000",
                format!(
                    "{e}: each user name belongs to the first subject that logged in with it \
                     (names differing only in case are one name)"
                ),
            ),
            NameError::Unsafe => ClientError::fatal("28000", e.to_string()),
        };
        return Err(Refusal::new(client, e.reason()));
    }
    let Some(target) = shared.targets.get(&database).cloned() else {
        return Err(Refusal::new(
            ClientError::fatal("3D000", format!("no target named \"{database}\"")),
            "unknown_target",
        ));
    };

    let mut policy = SessionPolicy::new(
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
            .decide_connect(&state, crate::policy::unix_now())
            .map_err(|e| Refusal::new(e, "connect_denied"))?;
        decide_settings(&mut policy, &state, &settings)
            .map_err(|e| Refusal::new(e, "setting_denied"))?;
    }

    let mut passed = settings;
    if policy.read_only {
        // Defence in depth: the target itself refuses writes too. Last, so
        // that it wins over anything the client asked for.
        passed.push(("default_transaction_read_only".into(), "on".into()));
    }
    let mut backend = backend::login(Login {
        target: &target.config,
        tls: target.tls.as_ref(),
        params: &passed,
        max_message: pg::DEFAULT_MAX_FRAME,
    })
    .await
    .map_err(|e| match e.for_client() {
        // The target refused a setting (or is full, or starting up): the
        // client reads why in the target's own words.
        Some(frame) => {
            tracing::info!(target = %target.name, error = %e, "target refused the login");
            Refusal {
                from_target: Some(frame.raw.clone()),
                ..Refusal::new(
                    ClientError::fatal("08004", "the target refused the connection"),
                    "target_refused",
                )
            }
        }
        None => {
            tracing::warn!(target = %target.name, error = %e, "cannot log in to target");
            Refusal::new(
                ClientError::fatal(
                    "08001",
                    format!("cannot connect to target \"{}\"", target.name),
                ),
                "target_unavailable",
            )
        }
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

    let mask = match &target.config.masker {
        Some(masking) => Some(
            response_mask(masking, &mut backend)
                .await
                .map_err(|e| {
                    tracing::warn!(target = %target.name, error = %e, "cannot read the target's catalogue for masking");
                    Refusal::new(
                        ClientError::fatal(
                            "08001",
                            format!(
                                "cannot connect to target \"{}\": its masking rules could not be \
                                 read against its catalogue",
                                target.name
                            ),
                        ),
                        "target_unavailable",
                    )
                })?,
        ),
        None => None,
    };

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
        counters: shared.admission.counters.clone(),
    });
    let opened = ctx.event(Payload::SessionOpened(SessionOpened {
        client_addr: attempt.peer.to_string(),
        client_tls: attempt.tls,
        target_tls: backend.conn.is_tls(),
        application_name: passed
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case("application_name"))
            .map(|(_, v)| v.clone()),
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
        mask,
    })
}

/// The session's response masking: the columns the target's rules name,
/// the functions defined in it, and the view columns computed from either,
/// read from its catalogue.
async fn response_mask(
    masking: &TargetMasking,
    backend: &mut backend::Backend,
) -> Result<ResponseMask, backend::BackendError> {
    let mut catalogue = Catalogue::new();
    if let Some(sql) = masking.catalogue_query() {
        for row in backend::rows(backend, &sql, pg::DEFAULT_MAX_FRAME).await? {
            if let [
                Some(oid),
                Some(attnum),
                Some(table),
                Some(column),
                Some(rule_table),
                Some(rule_column),
            ] = &row[..]
                && let (Ok(oid), Ok(attnum)) = (oid.parse(), attnum.parse())
            {
                catalogue.column(oid, attnum, (table, column), (rule_table, rule_column));
            }
        }
        let sql = Catalogue::builtins_query();
        for row in backend::rows(backend, sql, pg::DEFAULT_MAX_FRAME).await? {
            if let [Some(name)] = &row[..] {
                catalogue.builtin(name);
            }
        }
    }
    if let Some(sql) = catalogue.views_query() {
        let mut views = Vec::new();
        for row in backend::rows(backend, &sql, pg::DEFAULT_MAX_FRAME).await? {
            if let [
                Some(oid),
                Some(view),
                Some(attnum),
                Some(column),
                Some(definition),
            ] = &row[..]
                && let (Ok(oid), Ok(attnum)) = (oid.parse(), attnum.parse())
            {
                views.push((
                    oid,
                    view.clone(),
                    attnum,
                    column.clone(),
                    definition.clone(),
                ));
            }
        }
        catalogue.views(&views);
    }
    Ok(ResponseMask::new(masking, catalogue))
}

/// Startup parameters PostgreSQL reads itself rather than as settings
/// (their names compared as it compares them, case and all).
fn is_setting(name: &str) -> bool {
    !matches!(name, "user" | "database" | "replication" | "options")
        // Protocol extensions (`_pq_.…`) between the client and the
        // worker, which offers none: not settings, and not the target's.
        && !name.starts_with("_pq_.")
}

/// The settings a client asked for at startup, in the order PostgreSQL
/// applies them (a later one wins): those in `options` first, then every
/// other parameter that is not `user`, `database` or `replication`.
fn startup_settings(params: &[(String, String)]) -> Result<Vec<(String, String)>, ClientError> {
    let mut settings = Vec::new();
    for (name, value) in params {
        if name == "options" {
            settings.extend(options_settings(value)?);
        }
    }
    settings.extend(params.iter().filter(|(name, _)| is_setting(name)).cloned());
    Ok(settings)
}

/// Splits `options` into arguments as PostgreSQL does (`pg_split_opts`):
/// at runs of whitespace, a backslash taking the next character as it is.
fn split_options(options: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| is_c_space(*c)).is_some() {}
        if chars.peek().is_none() {
            return args;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next_if(|c| !is_c_space(*c)) {
            if c == '\\' {
                // An escaped character, whitespace included; a backslash
                // at the very end stands for nothing.
                if let Some(next) = chars.next() {
                    arg.push(next);
                }
            } else {
                arg.push(c);
            }
        }
        args.push(arg);
    }
}

/// C's `isspace` in the C locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// The settings in `options`, read as PostgreSQL reads the switches of a
/// server process (`process_postgres_switches`): `-c name=value`,
/// `-cname=value` and `--name=value`, dashes in a name read as
/// underscores. Every other switch sets something a `SET` cannot say, or
/// nothing a client needs: it is refused, named.
fn options_settings(options: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut settings = Vec::new();
    let mut args = split_options(options).into_iter();
    while let Some(arg) = args.next() {
        let (switch, assignment) = if arg == "--" {
            // The end of the switches; PostgreSQL takes no arguments after.
            match args.next() {
                None => break,
                Some(extra) => return Err(invalid_option(&extra)),
            }
        } else if let Some(rest) = arg.strip_prefix("--") {
            ("--", rest.to_owned())
        } else if arg == "-c" {
            match args.next() {
                Some(next) => ("-c", next),
                None => {
                    return Err(ClientError::fatal(
                        "42601",
                        "the startup option -c needs a name=value argument",
                    ));
                }
            }
        } else if let Some(rest) = arg.strip_prefix("-c") {
            ("-c", rest.to_owned())
        } else if let Some(rest) = arg.strip_prefix('-')
            && let Some(letter) = rest.chars().next()
        {
            return Err(ClientError::fatal(
                "0A000",
                format!(
                    "the startup option \"-{letter}\" is not supported through Gatehouse; \
                     use -c name=value"
                ),
            ));
        } else {
            return Err(invalid_option(&arg));
        };
        let Some((name, value)) = assignment.split_once('=') else {
            let spaced = if switch == "-c" { " " } else { "" };
            return Err(ClientError::fatal(
                "42601",
                format!("{switch}{spaced}{assignment} requires a value"),
            ));
        };
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

fn invalid_option(arg: &str) -> ClientError {
    ClientError::fatal(
        "42601",
        format!(
            "invalid startup option \"{arg}\": options holds only -c name=value and \
             --name=value"
        ),
    )
}

/// The `SET` a startup setting amounts to: the name as a quoted
/// identifier, the value as a string literal (as the server takes a
/// startup parameter's value: text, never an expression).
fn set_statement(name: &str, value: &str) -> String {
    format!(
        "SET \"{}\" = '{}'",
        name.replace('"', "\"\""),
        value.replace('\'', "''")
    )
}

/// Decides each setting as the `SET` it amounts to. `client_encoding` is
/// not decided: the worker follows whatever encoding the target reports,
/// and refuses those it cannot read.
fn decide_settings(
    policy: &mut SessionPolicy,
    state: &PolicyState,
    settings: &[(String, String)],
) -> Result<(), ClientError> {
    for (name, value) in settings {
        if name.eq_ignore_ascii_case("client_encoding") {
            continue;
        }
        // Built with standard_conforming_strings on, and read so.
        let facts = classify(&set_statement(name, value), Reading::default());
        if let Some(refusal) = policy.decide(state, &facts).refusal {
            return Err(ClientError::fatal(
                refusal.sqlstate,
                format!("the setting \"{name}\" is refused: {}", refusal.message),
            ));
        }
    }
    Ok(())
}

/// Records the end of a session, after `responses` (the response events
/// not recorded yet). Retries for a while: a session's last events must
/// not be lost because NATS blinked.
pub(crate) async fn close(
    shared: &Shared,
    ctx: &SessionCtx,
    reason: CloseReason,
    mut responses: Vec<gatehouse_events::Event>,
) {
    let event = ctx.event(Payload::SessionClosed(SessionClosed {
        reason,
        commands: ctx.commands.load(Ordering::Relaxed),
        bytes_from_client: ctx.bytes_from_client.load(Ordering::Relaxed),
        bytes_to_client: ctx.bytes_to_client.load(Ordering::Relaxed),
        duration_ms: ctx.started.elapsed().as_millis() as u64,
    }));
    responses.push(event);
    let mut delay = std::time::Duration::from_millis(200);
    for attempt in 1..=8 {
        match shared.publisher.record(responses.clone()).await {
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

impl SessionCtx {
    /// A session context for unit tests and the fuzz target of the session
    /// machine.
    #[doc(hidden)]
    #[allow(dead_code)]
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
            counters: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_are_split_as_postgres_splits_them() {
        assert_eq!(
            split_options("  -c a=b\t-cx=y\\ z  --e-f=g\\\\h\\"),
            ["-c", "a=b", "-cx=y z", "--e-f=g\\h"]
        );
        assert!(split_options(" \n ").is_empty());
    }

    #[test]
    fn options_hold_settings_in_three_spellings() {
        assert_eq!(
            options_settings("-c search_path=a,b -cwork_mem=64kB --statement-timeout=5s -c x=")
                .unwrap(),
            owned(&[
                ("search_path", "a,b"),
                ("work_mem", "64kB"),
                ("statement_timeout", "5s"),
                ("x", ""),
            ])
        );
        assert_eq!(
            options_settings("-c application_name=two\\ words=yes --").unwrap(),
            owned(&[("application_name", "two words=yes")])
        );
    }

    #[test]
    fn other_switches_and_arguments_are_refused_by_name() {
        for (options, code, named) in [
            ("-d 5", "0A000", "\"-d\""),
            ("-c a=b -B 100", "0A000", "\"-B\""),
            ("-Ec a=b", "0A000", "\"-E\""),
            ("foo", "42601", "\"foo\""),
            ("-", "42601", "\"-\""),
            ("-- -c a=b", "42601", "\"-c\""),
            ("-c", "42601", "-c"),
            ("-c search_path", "42601", "-c search_path requires a value"),
            ("--work_mem", "42601", "--work_mem requires a value"),
        ] {
            let e = options_settings(options).unwrap_err();
            assert!(e.fatal, "{options}");
            assert_eq!(e.sqlstate, code, "{options}: {}", e.message);
            assert!(e.message.contains(named), "{options}: {}", e.message);
        }
    }

    #[test]
    fn settings_come_from_options_first_then_the_other_parameters() {
        let params = owned(&[
            ("user", "alice"),
            ("database", "app"),
            ("search_path", "late"),
            ("options", "-c search_path=early"),
            ("replication", "false"),
            ("_pq_.something", "1"),
            ("client_encoding", "UTF8"),
        ]);
        assert_eq!(
            startup_settings(&params).unwrap(),
            owned(&[
                ("search_path", "early"),
                ("search_path", "late"),
                ("client_encoding", "UTF8"),
            ])
        );
    }

    #[test]
    fn a_setting_is_read_as_its_set_statement() {
        let read = |name: &str, value: &str| {
            let text = set_statement(name, value);
            let c = classify(&text, Reading::default());
            assert!(c.parsed, "{text}");
            assert_eq!(c.statements.len(), 1, "{text}");
            c.statements[0].clone()
        };
        assert_eq!(
            set_statement("a\"b", "it's \\ here"),
            r#"SET "a""b" = 'it''s \ here'"#
        );
        assert!(read("default_transaction_read_only", "off").disables_read_only);
        assert!(read("Default_Transaction_Read_Only", "0").disables_read_only);
        assert!(!read("default_transaction_read_only", "on").disables_read_only);
        // A quote in the value ends nothing.
        let s = read(
            "search_path",
            "x'; SET default_transaction_read_only = off; --",
        );
        assert!(!s.disables_read_only);
        assert_eq!(s.kind, gatehouse_policies::StatementKind::Session);
        assert_eq!(read("role", "postgres").kind.as_str(), "dcl");
    }
}
