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
//!
//! Statement text is read as the server reads it: in the session's
//! `client_encoding`, with its `standard_conforming_strings`, both as the
//! target last reported them (`ParameterStatus`, which `target → client`
//! follows). A command that may change them is a barrier: nothing the
//! client sent after it is read until the target has answered everything
//! forwarded so far, so the settings are current when the next text is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use bytes::{Buf, BytesMut};
use gatehouse_events::{
    CloseReason, CommandReceived, DecisionRecord, Event, Param, ParamFormat, Payload, Protocol,
};
use gatehouse_pgwire::{self as pg, BackendMessage, FrontendMessage, TransactionStatus};
use gatehouse_policies::{Classification, Classifier, StatementKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc, watch};

use crate::Shared;
use crate::conn::{Conn, send};
use crate::encoding::{self, Parsing};
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

/// What `target → client` has seen, for `client → target` to wait on.
#[derive(Debug, Clone)]
struct Progress {
    /// ReadyForQuery messages from the target so far.
    ready: u64,
    /// The settings in force after them.
    parsing: Parsing,
}

/// What `client → target` forwarded that `target → client` must know,
/// counted in batches: batch `n` is what the target answers with its n-th
/// ReadyForQuery (in the worker's count, which gives every `Query` and
/// `Sync` one).
#[derive(Debug, Default)]
struct Forwarded {
    /// The latest batch holding a `Query` or `Parse`. The target reports a
    /// changed setting at the end of the batch that changed it; text of a
    /// later batch was read by the worker with the old setting.
    last_text: AtomicU64,
    /// The latest batch holding a `Query` or `Parse` after an `Execute`:
    /// that text too may follow the change.
    text_after_execute: AtomicU64,
    /// `(n, k)`: the COPY started by batch `n`'s command had `k` `Sync`
    /// messages forwarded before its `CopyDone`/`CopyFail`. The target
    /// ignores a `Sync` in COPY mode (tokio-postgres sends one), so if the
    /// COPY did start, its ReadyForQuery is that of batch `n + k`.
    copy_syncs: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Forwarded {
    fn mark_text(&self, batch: u64, after_execute: bool) {
        self.last_text.fetch_max(batch, Ordering::Relaxed);
        if after_execute {
            self.text_after_execute.fetch_max(batch, Ordering::Relaxed);
        }
    }

    /// Whether text read before a change reported in `batch` may have been
    /// read by the server after it.
    fn misread(&self, batch: u64) -> bool {
        self.last_text.load(Ordering::Relaxed) > batch
            || self.text_after_execute.load(Ordering::Relaxed) >= batch
    }

    fn copy_ended(&self, batch: u64, syncs: u64) {
        if syncs > 0 {
            self.copy_syncs
                .lock()
                .expect("not poisoned")
                .push((batch, syncs));
        }
    }

    /// `Sync` messages the target ignored during the COPY that batch `n`
    /// started (forgetting older entries).
    fn ignored_syncs(&self, n: u64) -> u64 {
        let mut copies = self.copy_syncs.lock().expect("not poisoned");
        let k = copies.iter().find(|(b, _)| *b == n).map_or(0, |(_, k)| *k);
        copies.retain(|(b, _)| *b > n);
        k
    }
}

pub(crate) async fn run(shared: Arc<Shared>, mut client: Conn, opened: Opened) {
    let Opened {
        ctx,
        backend,
        target,
        client_leftover,
        policy,
        parsing,
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
        let (progress_tx, progress_rx) = watch::channel(Progress { ready: 0, parsing });
        let forwarded = Arc::new(Forwarded::default());
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
            progress_tx,
            forwarded.clone(),
        ));
        let up = ClientToTarget {
            shared: &shared,
            ctx: &ctx,
            inject: inject_tx,
            statements: HashMap::new(),
            portals: HashMap::new(),
            classified: Classifier::default(),
            syncs_forwarded: 0,
            skip_until_sync: false,
            policy,
            drop_until_sync: false,
            progress: progress_rx,
            forwarded,
            copy_from: None,
            parsing_prepared: HashSet::new(),
            settings_touched: false,
            batch_executed: false,
            batch_changes_parsing: false,
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
    classified: Classifier,
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
    /// What the target has answered, and the settings it reported.
    progress: watch::Receiver<Progress>,
    forwarded: Arc<Forwarded>,
    /// The batch of the last command forwarded (which may start a COPY) and
    /// the `Sync` messages forwarded since.
    copy_from: Option<(u64, u64)>,
    /// SQL-level prepared statements (`PREPARE`) whose execution may change
    /// how text is read.
    parsing_prepared: HashSet<String>,
    /// A command that may change how text is read has run in this session:
    /// from then on, ending a transaction may change it back.
    settings_touched: bool,
    /// The open batch (messages since the last `Sync` forwarded) holds an
    /// `Execute`.
    batch_executed: bool,
    /// ... an `Execute` that may have changed how text is read: no more
    /// text is read until the batch's `Sync` has been answered.
    batch_changes_parsing: bool,
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
    /// The chunk ends with a command that may change how the server reads
    /// text: wait for the target to answer everything before reading on.
    barrier: bool,
}

impl Chunk {
    /// Answers a `Query` (or a message that stands for one) in place of the
    /// target: the error, then `ReadyForQuery`, where the target's answer
    /// would have come.
    fn answer(&mut self, error: ClientError) {
        let at = after_ready(self.syncs);
        self.local.push((at, Reply::Error(error)));
        self.local.push((at, Reply::ReadyForQuery));
    }
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
            let unsupported = self.progress.borrow().parsing.encoding.clone().err();
            if let Some(u) = unsupported {
                // The session switched to an encoding the worker cannot
                // read (`SET client_encoding`): nothing more can be
                // classified, so the session ends.
                self.reply(
                    self.syncs_forwarded,
                    vec![Reply::Error(u.client_error(true))],
                )
                .await;
                break CloseReason::Error;
            }
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
            let barrier = chunk.barrier;
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
            let read = if barrier {
                // Read on only once the target has answered everything
                // forwarded, with the settings it reported on the way.
                match self
                    .await_answers(
                        &mut client,
                        &mut target,
                        &mut buf,
                        &target_gone,
                        &mut closing,
                    )
                    .await
                {
                    Ok(()) => continue,
                    Err(Some(reason)) => break reason,
                    Err(None) => None,
                }
            } else {
                tokio::select! {
                    r = client.read_buf(&mut buf) => Some(r),
                    _ = target_gone.notified() => break CloseReason::TargetDisconnected,
                    _ = async { closing.wait_for(|c| *c).await.is_ok() } => None,
                }
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
        // Constant for the whole chunk: a command that may change it ends
        // the chunk (a barrier), and the next one starts after the target
        // has reported the outcome.
        let parsing = self.progress.borrow().parsing.clone();
        let reading = parsing.reading();
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
                        if self.end_batch() {
                            chunk.barrier = true;
                            break;
                        }
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
            // The batch the message belongs to: answered by the target's
            // ReadyForQuery number `batch`.
            let batch = self.syncs_forwarded + chunk.syncs + 1;
            match message {
                FrontendMessage::Query(_) | FrontendMessage::Parse(_)
                    if self.batch_changes_parsing =>
                {
                    // The target reads this text with settings an earlier
                    // `Execute` of the batch may have changed, and reports
                    // them only at the batch's end.
                    chunk.open_segment = true;
                    self.refuse_batch(&mut chunk, ClientError::error(
                        "0A000",
                        "send Sync after changing client_encoding or standard_conforming_strings, \
                         before the next statement",
                    ));
                    continue;
                }
                FrontendMessage::Query(bytes) => {
                    chunk.open_segment = false;
                    let text = match parsing.decode(bytes) {
                        Ok(text) => text,
                        Err(e) => {
                            chunk.answer(e);
                            continue;
                        }
                    };
                    self.forwarded.mark_text(batch, self.batch_executed);
                    let facts = self.classified.classify(&text, reading);
                    let decision = self.policy.decide(&state, &facts);
                    chunk.events.push(self.command(
                        Protocol::Simple,
                        text.into_owned(),
                        None,
                        None,
                        Vec::new(),
                        decision.record,
                    ));
                    if let Some(refusal) = decision.refusal {
                        chunk.answer(refusal);
                        continue;
                    }
                    chunk.syncs += 1;
                    self.batch_executed = false;
                    self.copy_from = Some((batch, 0));
                    if self.may_change_parsing(&facts) {
                        chunk.barrier = true;
                    }
                }
                FrontendMessage::Parse(p) => {
                    chunk.open_segment = true;
                    let text = match parsing.decode(p.query) {
                        Ok(text) => text,
                        Err(e) => {
                            self.refuse_batch(&mut chunk, e);
                            continue;
                        }
                    };
                    self.forwarded.mark_text(batch, self.batch_executed);
                    let prepared = Prepared {
                        text: text.as_ref().into(),
                        facts: self.classified.classify(&text, reading),
                    };
                    self.statements.insert(p.statement.to_owned(), prepared);
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
                        .map(|(i, v)| param(b.param_format(i), *v, &parsing))
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
                        self.refuse_batch(&mut chunk, refusal);
                        continue;
                    }
                    self.batch_executed = true;
                    self.copy_from = Some((batch, 0));
                    if self.may_change_parsing(&facts) {
                        self.batch_changes_parsing = true;
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
                    chunk.barrier = self.end_batch();
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
                    chunk.answer(e);
                    continue;
                }
                FrontendMessage::Describe { .. } | FrontendMessage::Flush => {
                    chunk.open_segment = true
                }
                FrontendMessage::CopyDone | FrontendMessage::CopyFail(_) => self.copy_ended(),
                _ => {}
            }
            chunk.out.extend_from_slice(&frame.raw);
            if chunk.barrier {
                break;
            }
        }
        Ok(chunk)
    }

    /// Refuses the rest of an extended-protocol batch: `error` goes just
    /// before the batch's ReadyForQuery, and messages up to its `Sync` are
    /// dropped, as PostgreSQL does after an error.
    fn refuse_batch(&mut self, chunk: &mut Chunk, error: ClientError) {
        chunk
            .local
            .push((before_ready(chunk.syncs + 1), Reply::Error(error)));
        self.drop_until_sync = true;
    }

    /// A `Sync` is forwarded: the batch ends. True if it must be a barrier.
    fn end_batch(&mut self) -> bool {
        self.batch_executed = false;
        if let Some((_, syncs)) = &mut self.copy_from {
            *syncs += 1;
        }
        std::mem::take(&mut self.batch_changes_parsing)
    }

    /// A `CopyDone` or `CopyFail` is forwarded.
    fn copy_ended(&mut self) {
        if let Some((batch, syncs)) = self.copy_from.take() {
            self.forwarded.copy_ended(batch, syncs);
        }
    }

    /// Waits until the target has answered everything forwarded (a
    /// barrier). Meanwhile only COPY data at the front of `buf` goes on: the
    /// command may have started a `COPY … FROM STDIN`, whose end the target
    /// awaits. `Err(None)` when the worker is shutting down.
    async fn await_answers(
        &mut self,
        client: &mut ReadHalf<Conn>,
        target: &mut WriteHalf<Conn>,
        buf: &mut BytesMut,
        target_gone: &Notify,
        closing: &mut watch::Receiver<bool>,
    ) -> Result<(), Option<CloseReason>> {
        let max = self.shared.config.max_message_bytes;
        let answered = self.syncs_forwarded;
        let mut out = BytesMut::new();
        loop {
            while matches!(buf.first(), Some(b'd' | b'c' | b'f')) {
                match pg::decode_frame(buf, max) {
                    Ok(Some(frame)) => {
                        if frame.tag != b'd' {
                            self.copy_ended();
                        }
                        out.extend_from_slice(&frame.raw);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let e = ClientError::protocol(e);
                        self.reply(self.syncs_forwarded, vec![Reply::Error(e)])
                            .await;
                        return Err(Some(CloseReason::Error));
                    }
                }
            }
            if !out.is_empty() {
                send(target, &out)
                    .await
                    .map_err(|_| Some(CloseReason::TargetDisconnected))?;
                out.clear();
            }
            tokio::select! {
                r = self.progress.wait_for(|p| p.ready >= answered) => {
                    return r.map(|_| ()).map_err(|_| Some(CloseReason::TargetDisconnected));
                }
                r = client.read_buf(buf) => match r {
                    Ok(0) | Err(_) => return Err(Some(CloseReason::ClientDisconnected)),
                    Ok(n) => {
                        self.ctx
                            .bytes_from_client
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                },
                _ = target_gone.notified() => return Err(Some(CloseReason::TargetDisconnected)),
                _ = async { closing.wait_for(|c| *c).await.is_ok() } => return Err(None),
            }
        }
    }

    /// Whether running `c` may change how the server reads later text: it
    /// sets `client_encoding` or `standard_conforming_strings` (or may), runs
    /// code the classifier cannot see, did not parse, or ends a transaction
    /// in a session that changed them (a rollback or the end of `SET LOCAL`
    /// restores the old value). Records what it learns for later commands.
    fn may_change_parsing(&mut self, c: &Classification) -> bool {
        let mut may = !c.parsed;
        for s in &c.statements {
            let direct = s.changes_parsing || s.dynamic;
            if let (true, Some(name)) = (direct, &s.prepares) {
                self.parsing_prepared.insert(name.clone());
            }
            may |= direct
                || (self.settings_touched && s.kind == StatementKind::Transaction)
                || s.executes
                    .as_ref()
                    .is_some_and(|name| self.parsing_prepared.contains(name));
        }
        self.settings_touched |= may;
        may
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
                // Queued before the bytes go out: an error due before the
                // batch's ReadyForQuery must be waiting when that arrives.
                for (at, reply) in chunk.local {
                    self.inject_at(after_ready(base) + at, vec![reply]).await;
                }
                if !chunk.out.is_empty() {
                    send(target, &chunk.out)
                        .await
                        .map_err(|_| CloseReason::TargetDisconnected)?;
                    self.syncs_forwarded += chunk.syncs;
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

/// One bound parameter as recorded: text transcoded from the session's
/// encoding (as sent when it is not valid there: the target will refuse
/// it), binary as base64.
fn param(format: i16, value: Option<&[u8]>, parsing: &Parsing) -> Param {
    match format {
        1 => Param {
            format: ParamFormat::Binary,
            value: value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
        },
        _ => Param {
            format: ParamFormat::Text,
            value: value.map(|v| match parsing.decode(v) {
                Ok(text) => text.into_owned(),
                Err(_) => String::from_utf8_lossy(v).into_owned(),
            }),
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
    progress: watch::Sender<Progress>,
    forwarded: Arc<Forwarded>,
) -> Option<CloseReason> {
    let mut seen: u64 = 0;
    // The batch whose command started a COPY FROM STDIN, until its end.
    let mut copy_in: Option<u64> = None;
    let mut parsing = progress.borrow().parsing.clone();
    let mut pending: VecDeque<Inject> = VecDeque::new();
    let mut out = BytesMut::new();
    buf.reserve(64 * 1024);
    let mut inject_open = true;
    let reason = loop {
        // Replies are queued before the bytes they answer go to the target:
        // take every one queued so far, so none is missed for being in the
        // channel still when its response arrives.
        while let Ok(i) = inject.try_recv() {
            pending.push_back(i);
        }
        // Forward the whole frames we have, splicing in due replies.
        let mut start = 0;
        let mut pos = 0;
        let mut fatal = false;
        let mut broken = None;
        let mut misread = false;
        while pos < buf.len() {
            let len = match pg::pending_frame_len(&buf[pos..], max) {
                Ok(Some(len)) if buf.len() - pos >= len => len,
                Ok(_) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            if buf[pos] == b'S' {
                let Some((name, value)) = encoding::parameter_status(&buf[pos + 5..pos + len])
                else {
                    broken = Some(pg::ProtocolError::Malformed {
                        message: "ParameterStatus",
                        why: "expected a name and a value",
                    });
                    break;
                };
                if parsing.apply(name, value) && forwarded.misread(seen + 1) {
                    // Changed by something the worker could not foresee
                    // (a function calling set_config, say), while text
                    // the worker read with the old setting was already
                    // on its way: stop here.
                    misread = true;
                    break;
                }
            }
            if buf[pos] == b'G' {
                copy_in = Some(seen + 1);
            }
            if buf[pos] == b'Z' {
                // Its number in the worker's count: past any Sync the
                // target ignored during a COPY.
                let this = match copy_in.take() {
                    Some(n) => n + forwarded.ignored_syncs(n),
                    None => seen + 1,
                }
                .max(seen + 1);
                if pending.front().is_some_and(|i| i.at <= before_ready(this)) {
                    out.extend_from_slice(&buf[start..pos]);
                    start = pos;
                    fatal |= drain_due(&mut pending, before_ready(this), status, &mut out);
                }
                if let Ok(BackendMessage::ReadyForQuery(s)) =
                    BackendMessage::parse_body(b'Z', &buf[pos + 5..pos + len])
                {
                    status = s;
                }
                seen = this;
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
        progress.send_if_modified(|p| {
            let changed = p.ready != seen || p.parsing != parsing;
            if changed {
                p.ready = seen;
                p.parsing.clone_from(&parsing);
            }
            changed
        });
        if misread {
            tracing::warn!(
                session = %ctx.session_id,
                "client_encoding or standard_conforming_strings changed while later statements were in flight"
            );
            ClientError::fatal(
                "0A000",
                "client_encoding or standard_conforming_strings changed in a way Gatehouse could \
                 not foresee while later statements were already sent; change them with SET, \
                 alone, and wait for its result",
            )
            .encode(&mut out);
            break Some(CloseReason::Error);
        }
        if let Some(e) = broken {
            tracing::warn!(session = %ctx.session_id, error = %e, "protocol error from target");
            ClientError::fatal("08P01", "the target sent a malformed message").encode(&mut out);
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
    // go out (e.g. a fatal error after the target closed), unless the
    // worker ended the session itself: nothing follows its FATAL.
    if reason != Some(CloseReason::Error) {
        while let Ok(i) = inject.try_recv() {
            pending.push_back(i);
        }
        drain_due(&mut pending, u64::MAX, status, &mut out);
    }
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
