//! An open session's two directions.
//!
//! `client → target`: frames are read, every statement execution (`Query`,
//! `Execute`) becomes a `CommandReceived` event, and the bytes of a read are
//! forwarded only once all its events are acknowledged. When recording
//! fails, nothing of that read is forwarded and the client gets an error in
//! place of each response it awaits.
//!
//! `target → client`: frames are forwarded as they arrive, whole reads at a
//! time. Replies the worker makes itself are queued here with the number of
//! `ReadyForQuery` messages that must pass first, so they reach the client in
//! the order the client expects them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::{Buf, BytesMut};
use gatehouse_events::{
    CloseReason, CommandReceived, DecisionRecord, Event, Param, ParamFormat, Payload, Protocol,
};
use gatehouse_pgwire::{self as pg, BackendMessage, FrontendMessage, TransactionStatus};
use gatehouse_policies::{Classification, Reading, classify};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};

use crate::Shared;
use crate::conn::{Conn, send};
use crate::error::ClientError;
use crate::policy::SessionPolicy;
use crate::session::{self, Opened, SessionCtx};

/// A reply the worker makes in place of the target.
#[derive(Debug)]
enum Reply {
    Error(ClientError),
    ReadyForQuery,
}

/// Replies to splice into the target's response stream at a position
/// counted in `ReadyForQuery` messages: `2n` is right after the n-th,
/// `2n - 1` right before it (after everything else the target sent for that
/// batch). Positions only grow, so pending replies stay in order.
#[derive(Debug)]
struct Inject {
    at: u64,
    replies: Vec<Reply>,
}

/// Position right after `n` ReadyForQuery messages.
fn after_ready(n: u64) -> u64 {
    2 * n
}

/// Position right before the n-th ReadyForQuery message.
fn before_ready(n: u64) -> u64 {
    2 * n - 1
}

pub(crate) async fn run(shared: Arc<Shared>, mut client: Conn, opened: Opened) {
    let Opened {
        ctx,
        backend,
        target,
        client_leftover,
        policy,
    } = opened;
    let (pid, secret) =
        shared
            .cancels
            .register(target.clone(), backend.process_id, backend.secret_key);

    let mut hello = BytesMut::new();
    pg::authentication_ok(&mut hello);
    for (k, v) in &backend.parameters {
        pg::parameter_status(&mut hello, k, v);
    }
    pg::backend_key_data(&mut hello, pid, secret);
    pg::ready_for_query(&mut hello, backend.status);
    let reason = if send(&mut client, &hello).await.is_err() {
        CloseReason::ClientDisconnected
    } else {
        let (client_rd, client_wr) = tokio::io::split(client);
        let (backend_rd, backend_wr) = tokio::io::split(backend.conn);
        let (inject_tx, inject_rx) = mpsc::channel(64);
        let target_gone = Arc::new(Notify::new());
        // In a JoinSet so that the target-to-client half ends with the
        // session even if the session task itself ends abnormally: a client
        // must see its connection close, never wait on a half-dead one.
        let mut down = tokio::task::JoinSet::new();
        down.spawn(target_to_client(
            ctx.clone(),
            shared.config.max_message_bytes,
            backend_rd,
            client_wr,
            inject_rx,
            backend.leftover,
            backend.status,
            target_gone.clone(),
        ));
        let up = ClientToTarget {
            shared: &shared,
            ctx: &ctx,
            inject: inject_tx,
            statements: HashMap::new(),
            portals: HashMap::new(),
            classified: Classified::default(),
            syncs_forwarded: 0,
            skip_until_sync: false,
            policy,
            drop_until_sync: false,
        };
        let reason = up
            .run(client_rd, backend_wr, client_leftover, target_gone)
            .await;
        let down_reason = down.join_next().await.and_then(|r| r.ok()).flatten();
        match (reason, down_reason) {
            (CloseReason::ClientDisconnected, Some(r)) => r,
            (r, _) => r,
        }
    };
    shared.cancels.remove(pid);
    session::close(&shared, &ctx, reason).await;
}

/// A prepared statement: its text and what the classifier found in it.
#[derive(Clone)]
struct Prepared {
    text: Arc<str>,
    facts: Arc<Classification>,
}

/// Classifications of the texts a session sent recently. Applications
/// repeat their statements, so most texts are parsed once per session; a
/// text with new literals each time costs one hash and one copy more than
/// parsing alone.
#[derive(Default)]
struct Classified {
    by_text: HashMap<Box<str>, Arc<Classification>>,
}

impl Classified {
    /// Texts kept; when full, the cache starts over.
    const CAPACITY: usize = 256;
    /// Longer texts are classified every time rather than kept.
    const MAX_TEXT: usize = 4096;

    fn get(&mut self, text: &str) -> Arc<Classification> {
        if let Some(c) = self.by_text.get(text) {
            return c.clone();
        }
        let c = Arc::new(classify(text, Reading::default()));
        if text.len() <= Self::MAX_TEXT {
            if self.by_text.len() >= Self::CAPACITY {
                self.by_text.clear();
            }
            self.by_text.insert(text.into(), c.clone());
        }
        c
    }
}

/// A bound portal: what an `Execute` of it runs.
struct Portal {
    statement_name: String,
    statement: Prepared,
    params: Vec<Param>,
}

struct ClientToTarget<'a> {
    shared: &'a Shared,
    ctx: &'a SessionCtx,
    inject: mpsc::Sender<Inject>,
    /// Prepared statements by name (`""` is the unnamed one).
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    classified: Classified,
    /// This session's side of policy decisions.
    policy: SessionPolicy,
    /// After a denied `Execute`, messages up to the next `Sync` are
    /// dropped; the `Sync` itself goes on, so the target ends the batch.
    drop_until_sync: bool,
    /// `Query`/`Sync`/`FunctionCall` messages forwarded so far: each yields
    /// exactly one `ReadyForQuery`.
    syncs_forwarded: u64,
    /// After a failed extended-protocol command, messages up to the next
    /// `Sync` are discarded, as PostgreSQL itself does after an error.
    skip_until_sync: bool,
}

/// What one read from the client amounts to.
#[derive(Default)]
struct Chunk {
    out: BytesMut,
    events: Vec<Event>,
    /// Messages in `out` that each yield one `ReadyForQuery`.
    syncs: u64,
    /// The chunk ends inside an extended-protocol batch (no `Sync` yet).
    open_segment: bool,
    /// Replies for messages refused locally, at positions relative to the
    /// chunk's start (see [`Inject`]): `after_ready(k)` follows the k-th
    /// `ReadyForQuery` that `out` yields, `before_ready(k)` precedes it.
    local: Vec<(u64, Reply)>,
    terminate: bool,
    /// The identity was revoked: the session ends.
    revoked: bool,
}

impl ClientToTarget<'_> {
    async fn run(
        mut self,
        mut client: ReadHalf<Conn>,
        mut target: WriteHalf<Conn>,
        mut buf: BytesMut,
        target_gone: Arc<Notify>,
    ) -> CloseReason {
        let max = self.shared.config.max_message_bytes;
        buf.reserve(16 * 1024);
        let mut closing = self.shared.closing.clone();
        let reason = loop {
            let chunk = match self.take_chunk(&mut buf, max) {
                Ok(c) => c,
                Err(e) => {
                    let e = ClientError::protocol(e);
                    self.reply(self.syncs_forwarded, vec![Reply::Error(e)])
                        .await;
                    break CloseReason::Error;
                }
            };
            let terminate = chunk.terminate;
            let revoked = chunk.revoked;
            if !chunk.events.is_empty()
                && !self.shared.config.sessions_outlive_tokens
                && self.ctx.token_expired()
            {
                let e = ClientError::fatal(
                    "28000",
                    "the token has expired; reconnect with a fresh token",
                );
                self.reply(self.syncs_forwarded, vec![Reply::Error(e)])
                    .await;
                break CloseReason::TokenExpired;
            }
            if let Err(reason) = self.forward(chunk, &mut target).await {
                break reason;
            }
            if revoked {
                let e = ClientError::fatal("28000", "access for this identity has been revoked");
                self.reply(self.syncs_forwarded, vec![Reply::Error(e)])
                    .await;
                break CloseReason::Revoked;
            }
            if terminate {
                break CloseReason::ClientTerminated;
            }
            let read = tokio::select! {
                r = client.read_buf(&mut buf) => Some(r),
                _ = target_gone.notified() => break CloseReason::TargetDisconnected,
                _ = async { closing.wait_for(|c| *c).await.is_ok() } => None,
            };
            let Some(read) = read else {
                let e = ClientError::fatal(
                    "57P01",
                    "the Gatehouse worker is shutting down; reconnect to continue",
                );
                self.reply(self.syncs_forwarded, vec![Reply::Error(e)])
                    .await;
                break CloseReason::WorkerShutdown;
            };
            match read {
                Ok(0) | Err(_) => break CloseReason::ClientDisconnected,
                Ok(n) => {
                    self.ctx
                        .bytes_from_client
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        };
        let mut bye = BytesMut::new();
        pg::terminate(&mut bye);
        let _ = send(&mut target, &bye).await;
        let _ = target.shutdown().await;
        reason
    }
}

impl ClientToTarget<'_> {
    /// Takes every whole message at the front of `buf` and works out what to
    /// forward, which events to record first, and what to answer locally.
    fn take_chunk(&mut self, buf: &mut BytesMut, max: usize) -> Result<Chunk, pg::ProtocolError> {
        let mut chunk = Chunk::default();
        let state = self.shared.policies.borrow().clone();
        while let Some(frame) = pg::decode_frame(buf, max)? {
            if self.skip_until_sync || self.drop_until_sync {
                match frame.tag {
                    b'S' if self.skip_until_sync => {
                        self.skip_until_sync = false;
                        chunk
                            .local
                            .push((after_ready(chunk.syncs), Reply::ReadyForQuery));
                    }
                    b'S' => {
                        self.drop_until_sync = false;
                        chunk.syncs += 1;
                        chunk.open_segment = false;
                        chunk.out.extend_from_slice(&frame.raw);
                    }
                    b'X' => {
                        chunk.terminate = true;
                        break;
                    }
                    _ => {}
                }
                continue;
            }
            let message = FrontendMessage::parse(&frame)?;
            if matches!(
                message,
                FrontendMessage::Query(_) | FrontendMessage::Execute { .. }
            ) && self.policy.revoked(&state)
            {
                chunk.revoked = true;
                break;
            }
            match message {
                FrontendMessage::Query(text) => {
                    let facts = self.classified.get(text);
                    let decision = self.policy.decide(&state, &facts);
                    chunk.events.push(self.command(
                        Protocol::Simple,
                        text.into(),
                        None,
                        None,
                        Vec::new(),
                        decision.record,
                    ));
                    chunk.open_segment = false;
                    if let Some(refusal) = decision.refusal {
                        chunk
                            .local
                            .push((after_ready(chunk.syncs), Reply::Error(refusal)));
                        chunk
                            .local
                            .push((after_ready(chunk.syncs), Reply::ReadyForQuery));
                        continue;
                    }
                    chunk.syncs += 1;
                }
                FrontendMessage::Parse(p) => {
                    let prepared = Prepared {
                        text: p.query.into(),
                        facts: self.classified.get(p.query),
                    };
                    self.statements.insert(p.statement.to_owned(), prepared);
                    chunk.open_segment = true;
                }
                FrontendMessage::Bind(b) => {
                    let statement =
                        self.statements
                            .get(b.statement)
                            .cloned()
                            .unwrap_or_else(|| {
                                // Unknown to the worker (the target will say so):
                                // judged as text that did not parse.
                                Prepared {
                                    text: "".into(),
                                    facts: Arc::new(Classification {
                                        statements: Vec::new(),
                                        parsed: false,
                                    }),
                                }
                            });
                    let params = b
                        .params
                        .iter()
                        .enumerate()
                        .map(|(i, v)| param(b.param_format(i), *v))
                        .collect();
                    self.portals.insert(
                        b.portal.to_owned(),
                        Portal {
                            statement_name: b.statement.to_owned(),
                            statement,
                            params,
                        },
                    );
                    chunk.open_segment = true;
                }
                FrontendMessage::Execute { portal, .. } => {
                    let unknown = Classification {
                        statements: Vec::new(),
                        parsed: false,
                    };
                    let (facts, text, name, params) = match self.portals.get(portal) {
                        Some(p) => (
                            p.statement.facts.clone(),
                            p.statement.text.to_string(),
                            Some(p.statement_name.clone()),
                            p.params.clone(),
                        ),
                        None => (Arc::new(unknown), String::new(), None, Vec::new()),
                    };
                    let decision = self.policy.decide(&state, &facts);
                    chunk.events.push(self.command(
                        Protocol::Extended,
                        text,
                        name,
                        Some(portal.to_owned()),
                        params,
                        decision.record,
                    ));
                    chunk.open_segment = true;
                    if let Some(refusal) = decision.refusal {
                        // The batch's earlier responses still come from the
                        // target; the error goes just before its
                        // ReadyForQuery, and the rest of the batch is
                        // dropped as PostgreSQL does after an error.
                        chunk
                            .local
                            .push((before_ready(chunk.syncs + 1), Reply::Error(refusal)));
                        self.drop_until_sync = true;
                        continue;
                    }
                }
                FrontendMessage::Close { kind, name } => {
                    if kind == b'S' {
                        self.statements.remove(name);
                    } else {
                        self.portals.remove(name);
                    }
                    chunk.open_segment = true;
                }
                FrontendMessage::Sync => {
                    chunk.syncs += 1;
                    chunk.open_segment = false;
                }
                FrontendMessage::Terminate => {
                    chunk.terminate = true;
                    break;
                }
                FrontendMessage::Other(b'F') => {
                    // The function-call sub-protocol runs a function by OID,
                    // outside any statement: it cannot be recorded as a
                    // command, so it is refused.
                    let e = ClientError::error(
                        "0A000",
                        "the function-call protocol is not supported through Gatehouse; use SELECT",
                    );
                    chunk
                        .local
                        .push((after_ready(chunk.syncs), Reply::Error(e)));
                    chunk
                        .local
                        .push((after_ready(chunk.syncs), Reply::ReadyForQuery));
                    continue;
                }
                FrontendMessage::Describe { .. } | FrontendMessage::Flush => {
                    chunk.open_segment = true
                }
                _ => {}
            }
            chunk.out.extend_from_slice(&frame.raw);
        }
        Ok(chunk)
    }

    fn command(
        &self,
        protocol: Protocol,
        statement: String,
        statement_name: Option<String>,
        portal: Option<String>,
        params: Vec<Param>,
        decision: Option<DecisionRecord>,
    ) -> Event {
        self.ctx.event(Payload::CommandReceived(CommandReceived {
            protocol,
            statement,
            statement_name,
            portal,
            params,
            decision,
        }))
    }

    /// Records the chunk's events, then forwards it; on a recording failure
    /// answers every awaited response with an error instead.
    async fn forward(
        &mut self,
        chunk: Chunk,
        target: &mut WriteHalf<Conn>,
    ) -> Result<(), CloseReason> {
        let n_events = chunk.events.len() as u64;
        let recorded = if chunk.events.is_empty() {
            Ok(())
        } else {
            self.shared.publisher.record(chunk.events).await
        };
        let base = self.syncs_forwarded;
        match recorded {
            Ok(()) => {
                self.ctx.commands.fetch_add(n_events, Ordering::Relaxed);
                if !chunk.out.is_empty() {
                    send(target, &chunk.out)
                        .await
                        .map_err(|_| CloseReason::TargetDisconnected)?;
                    self.syncs_forwarded += chunk.syncs;
                }
                for (at, reply) in chunk.local {
                    self.inject_at(after_ready(base) + at, vec![reply]).await;
                }
            }
            Err(e) => {
                tracing::warn!(session = %self.ctx.session_id, error = %e, "command not run: event not recorded");
                // Nothing of this read reaches the target. Every response
                // the client awaits becomes an error: one per Query/Sync,
                // and for an unfinished batch an error now and a
                // ReadyForQuery at its Sync.
                let mut replies = Vec::new();
                for _ in 0..chunk.syncs
                    + chunk
                        .local
                        .iter()
                        .filter(|(_, r)| matches!(r, Reply::ReadyForQuery))
                        .count() as u64
                {
                    replies.push(Reply::Error(ClientError::event_log_unavailable()));
                    replies.push(Reply::ReadyForQuery);
                }
                if chunk.open_segment {
                    replies.push(Reply::Error(ClientError::event_log_unavailable()));
                    self.skip_until_sync = true;
                }
                self.reply(base, replies).await;
            }
        }
        Ok(())
    }

    /// Replies once `after` ReadyForQuery messages have reached the client.
    async fn reply(&self, after: u64, replies: Vec<Reply>) {
        self.inject_at(after_ready(after), replies).await;
    }

    async fn inject_at(&self, at: u64, replies: Vec<Reply>) {
        let _ = self.inject.send(Inject { at, replies }).await;
    }
}

/// One bound parameter as recorded: text as it is, binary as base64.
fn param(format: i16, value: Option<&[u8]>) -> Param {
    match format {
        1 => Param {
            format: ParamFormat::Binary,
            value: value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
        },
        _ => Param {
            format: ParamFormat::Text,
            value: value.map(|v| String::from_utf8_lossy(v).into_owned()),
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn target_to_client(
    ctx: Arc<SessionCtx>,
    max: usize,
    mut target: ReadHalf<Conn>,
    mut client: WriteHalf<Conn>,
    mut inject: mpsc::Receiver<Inject>,
    mut buf: BytesMut,
    mut status: TransactionStatus,
    target_gone: Arc<Notify>,
) -> Option<CloseReason> {
    let mut seen: u64 = 0;
    let mut pending: VecDeque<Inject> = VecDeque::new();
    let mut out = BytesMut::new();
    buf.reserve(64 * 1024);
    let mut inject_open = true;
    let reason = loop {
        // Forward the whole frames we have, splicing in due replies.
        let mut start = 0;
        let mut pos = 0;
        let mut fatal = false;
        let mut broken = None;
        while pos < buf.len() {
            let len = match pg::pending_frame_len(&buf[pos..], max) {
                Ok(Some(len)) if buf.len() - pos >= len => len,
                Ok(_) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            if buf[pos] == b'Z' {
                if pending
                    .front()
                    .is_some_and(|i| i.at <= before_ready(seen + 1))
                {
                    out.extend_from_slice(&buf[start..pos]);
                    start = pos;
                    fatal |= drain_due(&mut pending, before_ready(seen + 1), status, &mut out);
                }
                if let Ok(BackendMessage::ReadyForQuery(s)) =
                    BackendMessage::parse_body(b'Z', &buf[pos + 5..pos + len])
                {
                    status = s;
                }
                seen += 1;
                if pending.front().is_some_and(|i| i.at <= after_ready(seen)) {
                    out.extend_from_slice(&buf[start..pos + len]);
                    start = pos + len;
                    fatal |= drain_due(&mut pending, after_ready(seen), status, &mut out);
                }
            }
            pos += len;
        }
        out.extend_from_slice(&buf[start..pos]);
        buf.advance(pos);
        if let Ok(Some(len)) = pg::pending_frame_len(&buf, max) {
            // Make room for a large frame in one go.
            buf.reserve(len.saturating_sub(buf.len()));
        }
        if let Some(e) = broken {
            tracing::warn!(session = %ctx.session_id, error = %e, "protocol error from target");
            ClientError::fatal("08P01", "the target sent a malformed message").encode(&mut out);
            let _ = send(&mut client, &out).await;
            break Some(CloseReason::Error);
        }
        fatal |= drain_due(&mut pending, after_ready(seen), status, &mut out);
        if !out.is_empty() {
            if send(&mut client, &out).await.is_err() {
                break Some(CloseReason::ClientDisconnected);
            }
            ctx.bytes_to_client
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
        }
        if fatal {
            break None;
        }
        tokio::select! {
            r = target.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break Some(CloseReason::TargetDisconnected),
                Ok(_) => {}
            },
            i = inject.recv(), if inject_open => match i {
                Some(i) => pending.push_back(i),
                None => inject_open = false,
            },
        }
    };
    // Replies that can no longer be ordered after target responses still
    // go out (e.g. a fatal error after the target closed).
    while let Ok(i) = inject.try_recv() {
        pending.push_back(i);
    }
    drain_due(&mut pending, u64::MAX, status, &mut out);
    if !out.is_empty() {
        let _ = send(&mut client, &out).await;
    }
    let _ = client.shutdown().await;
    target_gone.notify_one();
    reason
}

/// Encodes every pending reply due at or before position `at`; true if one
/// was fatal.
fn drain_due(
    pending: &mut VecDeque<Inject>,
    at: u64,
    status: TransactionStatus,
    out: &mut BytesMut,
) -> bool {
    let mut fatal = false;
    while pending.front().is_some_and(|i| i.at <= at) {
        let inject = pending.pop_front().expect("checked");
        for reply in inject.replies {
            match reply {
                Reply::Error(e) => {
                    fatal |= e.fatal;
                    e.encode(out);
                }
                Reply::ReadyForQuery => pg::ready_for_query(out, status),
            }
        }
    }
    fatal
}
