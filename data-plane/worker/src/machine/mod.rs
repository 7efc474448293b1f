//! The session machine: what an open session does with every frame, without
//! any I/O.
//!
//! It is fed what the client sent ([`Machine::client_input`]), what the
//! target sent ([`Machine::target_input`]) and the outcome of recording
//! ([`Machine::recorded`]); it says what to write to the target
//! ([`Machine::to_target`]), what to write to the client
//! ([`Machine::to_client`]), which events to record before anything of a read
//! goes on ([`Machine::take_events`]), and when the session ends. The async
//! pump in `relay.rs` only moves bytes.
//!
//! **What the server will run.** Every message forwarded to the target that
//! the target answers is an entry in [`Machine::pending`], in order; each
//! response frame is matched to the entry at the front. So the machine knows
//! when the server accepted a `Parse`, a `Bind`, a `Close`, a `PREPARE` or a
//! `DEALLOCATE`, and binds or drops names only then ([`names`]); an error
//! makes the server skip to `Sync`, and the entries up to it are dropped
//! unapplied. A `Bind`, `Execute` or `EXECUTE` is decided with the text its
//! name is bound to when the server runs it; a name whose binding is still on
//! its way is waited for; one the machine does not know is refused.
//!
//! **Refusing.** A refused message is replaced by one the server fails on at
//! once (a statement that does not parse), and the server's error by the
//! refusal: the server then does what it does after any error — skips the
//! rest of the batch to `Sync`, rolls back an implicit transaction, marks an
//! explicit one failed — so the client sees exactly PostgreSQL's behaviour,
//! including after a `Flush`.
//!
//! **Settings barrier.** Text is read with the session's `client_encoding`
//! and `standard_conforming_strings` as the target last reported them. A
//! command that may change them is a barrier: nothing more from the client is
//! read (COPY data aside) until the target has answered everything forwarded.
//! So is a `Query` that copies from the client: the server takes what
//! follows as COPY input, and swallows a message that is not.
//!
//! **Approvals.** A command that needs one is parked (`parked`): the read
//! ends with it, nothing more is read from the client, and the pump records
//! the approval ([`Machine::take_approval`], [`Machine::approval_requested`])
//! and reports how it ended ([`Machine::approval_decided`]), which makes the
//! read an ordinary held one: run once its event is recorded, or refused.
//! A response transform (masking) is a step in [`Machine::target_input`]
//! between matching a frame and appending it to `to_client`.

pub mod fuzz;
mod names;
mod response;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use bytes::{Buf, BufMut, BytesMut};
use gatehouse_events::approval::{
    APPROVAL_SCHEMA_VERSION, Approval, ApprovalLink, ApprovalState, ApprovalTarget, Requested,
};
use gatehouse_events::{
    CloseReason, CommandReceived, DecisionRecord, Event, ExecutedStatement, Param, ParamFormat,
    Payload, Protocol, Redaction,
};
use gatehouse_pgwire::{self as pg, BackendMessage, Frame, FrontendMessage, TransactionStatus};
use gatehouse_policies::{
    Classification, Classifier, Deallocates, Known, Outputs, REDACTED, SecretArgs, SecretKind,
    StatementFacts, StatementKind, find_secrets_with, is_connection_secret, is_secret_name,
    json_holds_secret,
};

use crate::encoding::{self, Parsing};
use crate::error::ClientError;
use crate::masking::ResponseMask;
use crate::policy::{ApprovalNeed, CommandDecision, PolicyState, SessionPolicy};
use crate::session::SessionCtx;
use response::ResponseLog;

pub(crate) use names::{Change, Lookup, Names, Weighed};

/// The statement a refused message is replaced with: it never parses, so the
/// server fails on it without running anything.
const REFUSED_TEXT: &str = "refused by Gatehouse";
/// The name the replacement `Parse` uses: a failed `Parse` binds nothing, and
/// a named one leaves the unnamed statement alone.
const REFUSED_NAME: &str = "gatehouse.refused";

/// A prepared statement: its text and what the classifier found in it.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub text: Arc<str>,
    pub facts: Arc<Classification>,
}

impl Prepared {
    /// The one statement it holds (a `Parse` or `PREPARE` holds one).
    fn statement(&self) -> Option<&StatementFacts> {
        match self.facts.statements.as_slice() {
            [one] if self.facts.parsed => Some(one),
            _ => None,
        }
    }
}

impl Weighed for Prepared {
    fn weight(&self) -> usize {
        // The text, and about as much again for its facts and the entry.
        2 * self.text.len() + 256
    }
}

impl Weighed for Portal {
    fn weight(&self) -> usize {
        let params: usize = self
            .params
            .iter()
            .map(|p| p.value.as_ref().map_or(0, String::len) + 48)
            .sum();
        self.statement_name.len() + params + 128
    }
}

/// A bound portal: what an `Execute` of it runs.
#[derive(Debug)]
pub(crate) struct Portal {
    statement_name: String,
    statement: Arc<Prepared>,
    params: Vec<Param>,
}

/// Something forwarded that the target will answer, or a reply of the
/// worker's own due once everything before it is answered.
#[derive(Debug)]
enum Pending {
    /// Answered by `ParseComplete`.
    Parse(Change<Prepared>),
    /// Answered by `BindComplete`.
    Bind(Change<Portal>),
    /// Answered by `CloseComplete`.
    CloseStatement(Change<Prepared>),
    ClosePortal(Change<Portal>),
    /// Answered by `RowDescription` or `NoData` (after a
    /// `ParameterDescription` for a statement).
    Describe,
    /// The worker's own `Describe` of the portal an `Execute` runs, sent
    /// just before it when responses are masked: its answer (the rows'
    /// columns and formats) is the masking plan, not forwarded.
    Shape,
    /// Answered by `CommandComplete`, `EmptyQueryResponse` or
    /// `PortalSuspended` (after rows or a COPY). `changes`: what running it
    /// changes, once it completes.
    Execute {
        /// The `seq` of its `CommandReceived`.
        command: u64,
        /// Its response's rows are not recorded (see [`withholds_rows`]).
        withhold: bool,
        changes: Vec<Change<Prepared>>,
        /// Calls functions, which may change settings in ways the worker
        /// cannot foresee (see [`Machine::unforeseeable`]).
        calls: bool,
        /// What its rows are computed from, for masking.
        outputs: Outputs,
        /// Its errors and notices may quote masked values
        /// ([`ResponseMask::masks_quotes`]).
        quotes: bool,
    },
    /// Answered by `ReadyForQuery`. The n-th `CommandComplete` in between
    /// completes the n-th statement: `changes[n]`.
    Query {
        command: u64,
        withhold: bool,
        changes: VecDeque<Vec<Change<Prepared>>>,
        calls: bool,
        /// What each statement's rows are computed from (when masking).
        outputs: VecDeque<Outputs>,
        quotes: bool,
    },
    /// Answered by `ReadyForQuery`. `text_after_execute`: text of this batch
    /// came after an `Execute`, so it may have been read by the server with
    /// settings that `Execute` changed.
    Sync {
        text_after_execute: bool,
        /// Its batch already had an error (a refusal, or one from the
        /// target): the server skipped to it.
        errored: bool,
    },
    /// The client's `CopyDone` or `CopyFail`: answered by nothing, marks
    /// where a COPY's input ends.
    CopyEnd,
    /// A refused message, replaced by one the target fails on; its error is
    /// replaced by this one. `simple`: a `Query` (answered by an error and
    /// `ReadyForQuery`), else a `Parse` (an error, then the skip to `Sync`).
    Refused {
        error: ClientError,
        simple: bool,
        answered: bool,
    },
    /// A fatal error of the worker's own: the session ends after it.
    Fatal(ClientError, CloseReason),
}

impl Pending {
    /// Whether it carries text the worker read with the settings of its
    /// time.
    fn has_text(&self) -> bool {
        matches!(self, Pending::Parse(_) | Pending::Query { .. })
    }
}

/// What one read from the client amounts to, before it goes on.
#[derive(Debug, Default)]
struct Chunk {
    bytes: BytesMut,
    entries: Vec<Pending>,
    events: Vec<Event>,
    /// Events handed over for recording.
    recording: u64,
    /// Once its events are recorded, refuse it with this instead of
    /// running it (an approval that was not granted).
    refusal: Option<ClientError>,
}

impl Chunk {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.entries.is_empty() && self.events.is_empty()
    }
}

/// A command waiting for its approval: the read it is (alone), held, and
/// the approval asked for it.
#[derive(Debug)]
struct Parked {
    chunk: Chunk,
    approval: Approval,
    /// Handed to the pump to record.
    requested: bool,
}

/// The client's open extended-protocol batch (messages since its last
/// `Sync`).
#[derive(Debug, Default)]
struct Batch {
    /// Refused: the client's messages up to its `Sync` are dropped (its
    /// `Flush` still goes on, so it sees the error).
    dropping: bool,
    executed: bool,
    /// An `Execute` that may change how text is read: later text of the
    /// batch is refused, and its `Sync` is a barrier.
    changes_parsing: bool,
    /// An `Execute` that calls functions: later text of the batch must read
    /// the same whatever the settings.
    calls: bool,
    text_after_execute: bool,
}

/// How a `Query` or prepared statement's `EXECUTE`s resolve.
enum Resolution {
    /// Each name executed, with what it runs.
    Ready(Vec<(String, Arc<Prepared>)>),
    /// A name the server has not confirmed, or one that runs another:
    /// refused with this error.
    Refused(ClientError),
    /// Wait for the target's answers, then read the message again.
    Unsettled,
}

/// Why a read's events were not recorded; none of the read runs.
#[derive(Debug, Clone)]
pub(crate) enum RecordError {
    /// The event log did not take them: down, refusing, or too slow.
    Unavailable(String),
    /// An event is larger than the event log takes: retrying cannot help.
    TooLarge { size: usize, max: usize },
}

/// The value a client is shown for a parameter the target reports about
/// the worker's own login rather than the client's session (which role the
/// worker logs in as, and whether it is a superuser): the client's own user
/// name, and `off`. `None` for every other parameter, shown as it is.
pub(crate) fn shown_to_client<'a>(name: &[u8], user: &'a str) -> Option<(&'static str, &'a str)> {
    match name {
        b"session_authorization" => Some(("session_authorization", user)),
        b"is_superuser" => Some(("is_superuser", "off")),
        _ => None,
    }
}

fn count(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// What one session may take: the worker's limits, from its config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest message from the client.
    pub max_message: usize,
    /// Longest statement text read (classified, decided, recorded).
    pub max_statement: usize,
    /// Most bytes of prepared statements and portals held.
    pub max_held: usize,
}

impl Limits {
    pub fn of(config: &crate::WorkerConfig) -> Self {
        Limits {
            max_message: config.max_message_bytes,
            max_statement: config.max_statement_bytes,
            max_held: config.max_session_prepared_bytes,
        }
    }
}

pub(crate) struct Machine {
    ctx: Arc<SessionCtx>,
    limits: Limits,
    policy: SessionPolicy,
    classifier: Classifier,
    /// How the target reads the session's text, as it last reported.
    parsing: Parsing,
    status: TransactionStatus,
    statements: Names<Prepared>,
    portals: Names<Portal>,
    /// Forwarded and not yet answered, in order.
    pending: VecDeque<Pending>,
    /// A read whose events are being recorded: nothing of it goes on before
    /// they are.
    held: Option<Chunk>,
    /// A command waiting for its approval: nothing more from the client is
    /// read until it is decided.
    parked: Option<Parked>,
    /// The command just read needs an approval: the read ends with it and
    /// is parked.
    parking: Option<ApprovalNeed>,
    batch: Batch,
    /// The target is in COPY-in mode and the client has not ended it: it
    /// ignores `Sync` meanwhile.
    client_copy: bool,
    /// Read nothing more from the client (COPY data aside) until the target
    /// has answered everything forwarded.
    barrier: bool,
    /// The target failed an extended-protocol message and skips what
    /// follows up to a `Sync` the client has not sent yet: so does the
    /// machine.
    server_skipping: bool,
    /// A frame read but not yet acted on (it waits on a barrier).
    stash: Option<Frame>,
    /// A command that may change how text is read has run: ending a
    /// transaction may change it back.
    settings_touched: bool,
    /// When the session's token expires (unless sessions outlive tokens).
    token_deadline: Option<i64>,
    /// The session is ending; with the reason.
    closing: Option<CloseReason>,
    ended: Option<CloseReason>,
    /// Masking of the target's responses, when it masks.
    mask: Option<ResponseMask>,
    /// The bundle `mask`'s `unmask` decisions were taken with.
    mask_engine: usize,
    /// What commands' responses are recorded as.
    responses: ResponseLog,
    /// Response parts to record: with the next read's events, or on their
    /// own ([`Machine::flush_responses`]) when a part's worth waits or the
    /// session is quiet.
    response_events: Vec<Event>,
    response_bytes: usize,
    /// Response events being recorded on their own, kept until their
    /// outcome: put back if it fails.
    flushing: Option<Vec<Event>>,
    /// Response events going with the held read's events.
    with_read: Vec<Event>,
    /// Recording response events on their own failed: they wait for the
    /// next read (whose command fails too while the log is unavailable).
    flush_failed: bool,
    /// Bytes for the client, ready to write.
    pub to_client: BytesMut,
    /// Bytes for the target, ready to write.
    pub to_target: BytesMut,
}

impl Machine {
    pub fn new(
        ctx: Arc<SessionCtx>,
        policy: SessionPolicy,
        parsing: Parsing,
        status: TransactionStatus,
        limits: Limits,
        token_deadline: Option<i64>,
        mask: Option<ResponseMask>,
    ) -> Self {
        Self {
            ctx,
            limits,
            policy,
            classifier: Classifier::default(),
            parsing,
            status,
            statements: Names::default(),
            portals: Names::default(),
            pending: VecDeque::new(),
            held: None,
            parked: None,
            parking: None,
            batch: Batch::default(),
            client_copy: false,
            barrier: false,
            server_skipping: false,
            stash: None,
            settings_touched: false,
            token_deadline,
            closing: None,
            ended: None,
            responses: ResponseLog::new(
                mask.as_ref()
                    .map_or(0, |m: &ResponseMask| m.record_max_bytes()),
            ),
            response_events: Vec::new(),
            response_bytes: 0,
            flushing: None,
            with_read: Vec::new(),
            flush_failed: false,
            mask,
            mask_engine: 0,
            to_client: BytesMut::new(),
            to_target: BytesMut::new(),
        }
    }

    /// Why the session ended, once it has: write out `to_client`, then
    /// close both connections.
    pub fn ended(&self) -> Option<CloseReason> {
        self.ended
    }

    /// Whether the machine takes client input now: not while a read's
    /// events are being recorded, nor once the session is ending.
    pub fn accepts_client(&self) -> bool {
        self.held.is_none()
            && self.parked.is_none()
            && self.closing.is_none()
            && self.ended.is_none()
    }

    /// Whether [`Machine::client_input`] has anything to act on: client
    /// bytes, a frame that waited, or a settings change to end on.
    pub fn has_client_work(&self, buf: &[u8]) -> bool {
        self.accepts_client()
            && (!buf.is_empty() || self.stash.is_some() || self.parsing.encoding.is_err())
    }

    /// Events to record before the read they describe goes on; the pump
    /// calls [`Machine::recorded`] with the outcome. The response events
    /// waiting go with them, first (they answer earlier commands): one
    /// recording, and the read runs only once they are recorded too.
    pub fn take_events(&mut self) -> Option<Vec<Event>> {
        let held = self.held.as_mut()?;
        held.recording += held.events.len() as u64;
        if held.events.is_empty() {
            return None;
        }
        let commands = std::mem::take(&mut held.events);
        if self.response_events.is_empty() {
            return Some(commands);
        }
        self.with_read = std::mem::take(&mut self.response_events);
        self.response_bytes = 0;
        let mut events = self.with_read.clone();
        events.extend(commands);
        Some(events)
    }

    /// Whether response events wait that may be recorded on their own
    /// (none is being recorded, and that has not failed).
    pub fn responses_waiting(&self) -> bool {
        self.flushing.is_none() && !self.flush_failed && !self.response_events.is_empty()
    }

    /// Whether a part's worth of response events waits: to be recorded on
    /// its own now, not with the next read.
    pub fn responses_due(&self) -> bool {
        self.responses_waiting() && self.response_bytes >= response::PART_BYTES
    }

    /// Response events to record on their own, beside the commands: the
    /// pump takes them when [`Machine::responses_due`], or once the
    /// session has been quiet for a moment (none while some are being
    /// recorded, or after that failed: they then go with the next read),
    /// and calls [`Machine::responses_recorded`] with the outcome.
    pub fn flush_responses(&mut self) -> Option<Vec<Event>> {
        if self.flushing.is_some() || self.flush_failed || self.response_events.is_empty() {
            if self.flush_failed && !self.accepts_target() && self.ended.is_none() {
                // Recording them failed, and more wait than a session
                // holds: the session cannot go on without losing them.
                self.fail(responses_unrecorded(), CloseReason::Error);
            }
            return None;
        }
        let events = std::mem::take(&mut self.response_events);
        self.response_bytes = 0;
        self.flushing = Some(events.clone());
        Some(events)
    }

    /// The outcome of recording response events on their own.
    pub fn responses_recorded(&mut self, result: Result<(), RecordError>) {
        let Some(events) = self.flushing.take() else {
            return;
        };
        if let Err(e) = result {
            tracing::warn!(session = %self.ctx.session_id, error = ?e, "responses not recorded; they go with the next command");
            self.flush_failed = true;
            self.requeue(events);
            if !self.accepts_target() {
                self.fail(responses_unrecorded(), CloseReason::Error);
            }
        }
    }

    /// Response events whose recording failed: first in line again.
    fn requeue(&mut self, events: Vec<Event>) {
        self.response_bytes += events.iter().map(event_size).sum::<usize>();
        let later = std::mem::replace(&mut self.response_events, events);
        self.response_events.extend(later);
    }

    /// Whether the machine takes target input now: not while more response
    /// events wait to be recorded than a session may hold.
    pub fn accepts_target(&self) -> bool {
        self.response_bytes < MAX_RESPONSE_BACKLOG
    }

    /// The session is over: every response event not yet recorded (the
    /// one in progress, cut short, among them).
    pub fn remaining_responses(&mut self) -> Vec<Event> {
        self.finish_response();
        let mut events = self.flushing.take().unwrap_or_default();
        events.append(&mut self.with_read);
        events.append(&mut self.response_events);
        events
    }

    /// The worker is shutting down: the session ends once what was
    /// forwarded is answered.
    pub fn shutdown(&mut self) {
        self.close(
            ClientError::fatal(
                "57P01",
                "the Gatehouse worker is shutting down; reconnect to continue",
            ),
            CloseReason::WorkerShutdown,
        );
    }

    /// Ends the session with `error`, after everything forwarded is
    /// answered.
    fn close(&mut self, error: ClientError, reason: CloseReason) {
        if self.closing.is_some() || self.ended.is_some() {
            return;
        }
        self.closing = Some(reason);
        self.push_live(Pending::Fatal(error, reason));
    }

    /// Ends the session now, with `error` as the client's last message.
    fn fail(&mut self, error: ClientError, reason: CloseReason) {
        if self.ended.is_none() {
            error.encode(&mut self.to_client);
            self.ended = Some(reason);
        }
    }

    /// Appends `entry` behind everything forwarded (and anything held).
    fn push_live(&mut self, entry: Pending) {
        match &mut self.held {
            Some(held) => held.entries.push(entry),
            None => {
                self.pending.push_back(entry);
                self.answer_front();
            }
        }
    }

    // ---------------------------------------------------------------
    // Client to target.
    // ---------------------------------------------------------------

    /// Acts on the whole frames at the front of `buf`, up to a barrier.
    /// `now` is the clock (Unix seconds) for the token's expiry.
    pub fn client_input(&mut self, buf: &mut BytesMut, state: &PolicyState, now: i64) {
        if !self.accepts_client() {
            return;
        }
        if let Err(unsupported) = &self.parsing.encoding {
            // The session switched to an encoding the worker cannot read
            // (`SET client_encoding`): nothing more can be classified.
            let error = unsupported.client_error(true);
            self.close(error, CloseReason::Error);
            return;
        }
        if self.barrier && self.pending.is_empty() {
            self.barrier = false;
        }
        let mut chunk = Chunk::default();
        loop {
            let frame = match self.stash.take() {
                Some(f) => f,
                None => {
                    if self.barrier
                        && !self.client_copy
                        && !matches!(buf.first(), Some(b'd' | b'c' | b'f'))
                    {
                        break;
                    }
                    match pg::decode_frame(buf, self.limits.max_message) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(pg::ProtocolError::TooLarge { len, max }) => {
                            // Refused on its header: the body is neither
                            // read nor allocated.
                            count(&self.ctx.counters.message_too_large);
                            self.finish_chunk(chunk);
                            self.close(
                                ClientError::fatal(
                                    "54000",
                                    format!(
                                        "a message of {len} bytes is larger than the {max} \
                                         Gatehouse accepts (worker.max_message_bytes)"
                                    ),
                                ),
                                CloseReason::Error,
                            );
                            return;
                        }
                        Err(e) => {
                            self.finish_chunk(chunk);
                            self.close(ClientError::protocol(e), CloseReason::Error);
                            return;
                        }
                    }
                }
            };
            // In COPY mode every frame is acted on: COPY data goes on,
            // anything else ends the session.
            if self.barrier && !self.client_copy && !matches!(frame.tag, b'd' | b'c' | b'f') {
                self.stash = Some(frame);
                break;
            }
            match self.client_frame(frame, &mut chunk, state, now) {
                Ok(Step::Next) => {}
                Ok(Step::Wait(frame)) => {
                    // It depends on answers still to come (a name being
                    // settled, settings that may change): it is read again
                    // once the target has answered more.
                    self.stash = Some(frame);
                    break;
                }
                Ok(Step::Stop) => break,
                Err(e) => {
                    self.finish_chunk(chunk);
                    self.close(ClientError::protocol(e), CloseReason::Error);
                    return;
                }
            }
            // A barrier stops the next frame unless it is COPY data (at
            // the top of the loop).
            if self.closing.is_some() || self.ended.is_some() {
                break;
            }
        }
        self.finish_chunk(chunk);
    }

    /// Sends a chunk on, holds it until its events are recorded, or parks
    /// it until its approval is decided.
    fn finish_chunk(&mut self, chunk: Chunk) {
        if let Some(need) = self.parking.take() {
            self.park(chunk, need);
        } else if chunk.events.is_empty() {
            self.to_target.extend_from_slice(&chunk.bytes);
            self.pending.extend(chunk.entries);
            self.answer_front();
        } else {
            self.held = Some(chunk);
        }
    }

    /// The outcome of recording the held read's events.
    pub fn recorded(&mut self, result: Result<(), RecordError>) {
        let with_read = std::mem::take(&mut self.with_read);
        if result.is_ok() {
            self.flush_failed = false;
        } else if !with_read.is_empty() {
            // Never dropped: they go again with the next read.
            self.requeue(with_read);
        }
        let Some(held) = self.held.take() else {
            return;
        };
        match result {
            Ok(()) if held.refusal.is_some() => {
                let refusal = held.refusal.expect("checked");
                self.unrecorded(held.entries, refusal);
            }
            Ok(()) => {
                self.ctx
                    .commands
                    .fetch_add(held.recording, Ordering::Relaxed);
                self.to_target.extend_from_slice(&held.bytes);
                let mut entries = held.entries.into_iter();
                if self.server_skipping {
                    // The server ignores the read's messages up to its
                    // Sync: they get no answer.
                    for entry in entries.by_ref() {
                        match entry {
                            Pending::Sync { .. } => {
                                self.server_skipping = false;
                                self.pending.push_back(entry);
                                break;
                            }
                            Pending::Fatal(..) => self.pending.push_back(entry),
                            other => self.settle_entry(other),
                        }
                    }
                }
                self.pending.extend(entries);
            }
            Err(e) => {
                let error = match e {
                    RecordError::Unavailable(e) => {
                        tracing::warn!(session = %self.ctx.session_id, error = %e, "command not run: event not recorded");
                        ClientError::event_log_unavailable()
                    }
                    RecordError::TooLarge { size, max } => {
                        tracing::info!(session = %self.ctx.session_id, size, max, "command not run: its event is too large to record");
                        ClientError::event_too_large(size, max)
                    }
                };
                self.unrecorded(held.entries, error);
            }
        }
        self.answer_front();
    }

    /// A read could not be recorded: none of it runs. Every answer the
    /// client awaits becomes the error, through messages the target fails
    /// on, so transactions end as after any error.
    fn unrecorded(&mut self, entries: Vec<Pending>, error: ClientError) {
        let mut out = BytesMut::new();
        let mut live = Vec::new();
        // An error is already due in the current extended batch.
        let mut batch_failed = self.server_skipping;
        let mut open = false;
        for entry in entries {
            if self.server_skipping && !matches!(entry, Pending::Sync { .. } | Pending::Fatal(..)) {
                // Ignored by the server, which already failed the batch.
                self.settle_entry(entry);
                continue;
            }
            match entry {
                Pending::Query { changes, .. } => {
                    // Its ReadyForQuery still comes, for the replacement.
                    self.settle_prepared(changes.into_iter().flatten(), false);
                    live.push(refuse_simple_bytes(&mut out, error.clone()));
                }
                Pending::Refused { simple: true, .. } => {
                    live.push(refuse_simple_bytes(&mut out, error.clone()))
                }
                Pending::Sync { errored, .. } => {
                    if !batch_failed && !errored {
                        live.push(refuse_extended_bytes(&mut out, error.clone()));
                    }
                    pg_sync(&mut out);
                    live.push(Pending::Sync {
                        text_after_execute: false,
                        errored: true,
                    });
                    self.server_skipping = false;
                    batch_failed = false;
                    open = false;
                }
                Pending::Fatal(..) => live.push(entry),
                Pending::CopyEnd => {
                    // The client ended a COPY the target is in: end it.
                    copy_fail(&mut out, "the event log is unavailable");
                    live.push(Pending::CopyEnd);
                }
                other => {
                    open = true;
                    self.settle_entry(other);
                    if !batch_failed {
                        live.push(refuse_extended_bytes(&mut out, error.clone()));
                        batch_failed = true;
                    }
                }
            }
        }
        if open {
            // The rest of the client's batch is dropped, as after an error.
            out.extend_from_slice(&flush_bytes());
            self.batch.dropping = true;
            self.statements.end_batch();
            self.portals.end_batch();
        }
        self.to_target.extend_from_slice(&out);
        self.pending.extend(live);
    }

    /// Acts on one client frame.
    fn client_frame(
        &mut self,
        frame: Frame,
        chunk: &mut Chunk,
        state: &PolicyState,
        now: i64,
    ) -> Result<Step, pg::ProtocolError> {
        let message = FrontendMessage::parse(&frame)?;
        if self.batch.dropping || self.server_skipping {
            match message {
                FrontendMessage::Sync => self.sync(&frame, chunk),
                FrontendMessage::Flush => chunk.bytes.extend_from_slice(&frame.raw),
                FrontendMessage::Terminate => {
                    self.terminate(&frame, chunk);
                    return Ok(Step::Stop);
                }
                _ => {}
            }
            return Ok(Step::Next);
        }
        // Revocation and expiry take effect at the next message of any
        // kind but the client's goodbye: a Parse, a Bind, COPY data.
        if !matches!(message, FrontendMessage::Terminate) {
            let end = if self.policy.revoked(state) {
                Some((
                    ClientError::fatal("28000", "access for this identity has been revoked"),
                    CloseReason::Revoked,
                ))
            } else if let Err(e) = self.policy.access_changed(state, now) {
                Some((e, CloseReason::AccessEnded))
            } else if self.token_deadline.is_some_and(|d| now > d) {
                Some((
                    ClientError::fatal(
                        "28000",
                        "the token has expired; reconnect with a fresh token",
                    ),
                    CloseReason::TokenExpired,
                ))
            } else {
                None
            };
            if let Some((error, reason)) = end {
                if self.client_copy {
                    // The target waits for the rest of the COPY, which is
                    // not coming: the session ends now.
                    self.fail(error, reason);
                } else {
                    // After the answers to what was forwarded before.
                    self.finish_and_close(chunk, error, reason);
                }
                return Ok(Step::Stop);
            }
        }
        if self.client_copy
            && !matches!(
                message,
                FrontendMessage::CopyData(_)
                    | FrontendMessage::CopyDone
                    | FrontendMessage::CopyFail(_)
                    | FrontendMessage::Flush
                    | FrontendMessage::Sync
                    | FrontendMessage::Terminate
            )
        {
            // The server would take it as part of the COPY, which waits for
            // input that is not coming: the session ends now, unsent, and
            // the COPY with it.
            self.fail(copy_in_progress(), CloseReason::Error);
            return Ok(Step::Stop);
        }
        match message {
            FrontendMessage::Query(_) if self.batch.changes_parsing => {
                // The target reads this text with settings an earlier
                // `Execute` of the batch may have changed, and reports them
                // only at the batch's end.
                self.refuse_simple(chunk, settings_in_flux());
            }
            FrontendMessage::Parse(_) if self.batch.changes_parsing => {
                self.refuse_extended(chunk, settings_in_flux());
            }
            FrontendMessage::Query(text)
            | FrontendMessage::Parse(pg::Parse { query: text, .. })
                if !settings_proof(text) && self.batch.calls =>
            {
                // Read after an `Execute` of the batch that calls functions,
                // which may change the settings (the server says so only at
                // the batch's end): only text that reads the same whatever
                // they are can be read now.
                if frame.tag == b'Q' {
                    self.refuse_simple(chunk, settings_in_flux());
                } else {
                    self.refuse_extended(chunk, settings_in_flux());
                }
            }
            FrontendMessage::Query(text)
            | FrontendMessage::Parse(pg::Parse { query: text, .. })
                if !settings_proof(text) && self.unforeseeable(chunk) =>
            {
                // Earlier commands that call functions are still running:
                // read this text once they are answered, with the settings
                // they leave.
                return Ok(Step::Wait(frame.clone()));
            }
            FrontendMessage::Query(bytes) => return Ok(self.query(&frame, bytes, chunk, state)),
            FrontendMessage::Parse(p) => self.parse(&frame, p, chunk, state),
            FrontendMessage::Bind(b) => return Ok(self.bind(&frame, b, chunk)),
            FrontendMessage::Execute { portal, .. } => {
                return Ok(self.execute(&frame, portal, chunk, state));
            }
            FrontendMessage::Close { kind, name } => {
                let entry = if kind == b'S' {
                    let change = Change::Drop(name.to_owned());
                    self.statements.stage(&change, true);
                    Pending::CloseStatement(change)
                } else {
                    let change = Change::Drop(name.to_owned());
                    self.portals.stage(&change, true);
                    Pending::ClosePortal(change)
                };
                chunk.bytes.extend_from_slice(&frame.raw);
                chunk.entries.push(entry);
            }
            FrontendMessage::Describe { .. } => {
                chunk.bytes.extend_from_slice(&frame.raw);
                chunk.entries.push(Pending::Describe);
            }
            FrontendMessage::Sync => self.sync(&frame, chunk),
            FrontendMessage::Flush | FrontendMessage::CopyData(_) => {
                chunk.bytes.extend_from_slice(&frame.raw)
            }
            FrontendMessage::CopyDone | FrontendMessage::CopyFail(_) => {
                self.client_copy = false;
                chunk.bytes.extend_from_slice(&frame.raw);
                chunk.entries.push(Pending::CopyEnd);
            }
            FrontendMessage::Terminate => {
                self.terminate(&frame, chunk);
                return Ok(Step::Stop);
            }
            FrontendMessage::Other(b'F') => {
                // The function-call sub-protocol runs a function by OID,
                // outside any statement: it cannot be decided, so it is
                // refused.
                self.refuse_simple(
                    chunk,
                    ClientError::error(
                        "0A000",
                        "the function-call protocol is not supported through Gatehouse; use SELECT",
                    ),
                );
            }
            FrontendMessage::Password(_) | FrontendMessage::Other(_) => {
                // Not a message of an open session: the target says so.
                chunk.bytes.extend_from_slice(&frame.raw);
            }
        }
        Ok(Step::Next)
    }

    /// The client is done: what it sent before goes on, and so does its
    /// `Terminate`; the target closes once it has run it all.
    fn terminate(&mut self, frame: &Frame, chunk: &mut Chunk) {
        chunk.bytes.extend_from_slice(&frame.raw);
        self.closing = Some(CloseReason::ClientTerminated);
    }

    /// Whether the client ended the session (its answers no longer
    /// matter).
    pub fn client_terminated(&self) -> bool {
        self.closing == Some(CloseReason::ClientTerminated)
    }

    /// Ends the chunk so far normally, then the session.
    fn finish_and_close(&mut self, chunk: &mut Chunk, error: ClientError, reason: CloseReason) {
        self.closing = Some(reason);
        chunk.entries.push(Pending::Fatal(error, reason));
    }

    /// The client's batch ends (also one that was refused): the `Sync`
    /// goes on, so the target ends it too.
    fn sync(&mut self, frame: &Frame, chunk: &mut Chunk) {
        let skipping = std::mem::take(&mut self.server_skipping);
        let errored = self.batch.dropping || skipping;
        chunk.bytes.extend_from_slice(&frame.raw);
        self.statements.end_batch();
        self.portals.end_batch();
        let batch = std::mem::take(&mut self.batch);
        // A `Sync` ends the batch's implicit transaction, and a rollback
        // there undoes what a function changed in it: once the session's
        // settings have changed at all, it is a barrier like any other end
        // of a transaction.
        if batch.changes_parsing || self.settings_touched {
            self.barrier = true;
        }
        if self.client_copy {
            // Ignored by a target in COPY-in mode: no answer comes.
            return;
        }
        self.portals
            .stage(&Change::DropAll { always: false }, false);
        chunk.entries.push(Pending::Sync {
            text_after_execute: batch.text_after_execute,
            errored,
        });
    }

    fn query(
        &mut self,
        frame: &Frame,
        bytes: &[u8],
        chunk: &mut Chunk,
        state: &PolicyState,
    ) -> Step {
        let text = match self.parsing.decode(bytes) {
            Ok(text) => text,
            Err(e) => {
                // Not recorded: nothing was decided or run.
                self.end_client_batch();
                self.refuse_simple(chunk, e);
                return Step::Next;
            }
        };
        if let Some(error) = self.too_long(&text) {
            self.end_client_batch();
            self.refuse_simple(chunk, error);
            return Step::Next;
        }
        let facts = self.classifier.classify(&text, self.parsing.reading());
        // Names resolve as the open batch left them (the server runs the
        // Query only if the batch had no error), then the Query ends it.
        let resolution = self.resolve(&facts, &text);
        if !matches!(resolution, Resolution::Unsettled) {
            self.end_client_batch();
        }
        let resolved = match resolution {
            Resolution::Ready(r) => r,
            Resolution::Unsettled => return Step::Wait(frame.clone()),
            Resolution::Refused(error) => {
                chunk.events.push(self.command(
                    Protocol::Simple,
                    text.into_owned(),
                    None,
                    None,
                    Vec::new(),
                    Vec::new(),
                    Some(self.policy.refused_record(state, &facts, &error.message)),
                ));
                self.refuse_simple(chunk, error);
                return Step::Next;
            }
        };
        let decision = self
            .policy
            .decide_with(state, &facts, |name| lookup(&resolved, name));
        let executes = executed(&resolved);
        let effective = effective_facts(&facts, &resolved);
        let (record, refusal, approval) =
            self.with_mask_refusal(state, &facts, decision, &effective);
        if approval.is_some() && !chunk.is_empty() {
            // What the client sent before it goes on first: the command
            // waits for its approval alone, read again then.
            return Step::Wait(frame.clone());
        }
        let changes: VecDeque<Vec<Change<Prepared>>> = match refusal {
            Some(_) => VecDeque::new(),
            None => effective
                .iter()
                .zip(facts.statements.iter())
                .map(|(e, s)| changes_of(s, e, &text, &resolved))
                .chain((!facts.parsed).then(|| vec![Change::DropAll { always: true }]))
                .collect(),
        };
        if let Some(error) = self.over_held(changes.iter().flatten()) {
            // Not recorded: nothing was run.
            self.refuse_simple(chunk, error);
            return Step::Next;
        }
        chunk.events.push(self.command(
            Protocol::Simple,
            text.into_owned(),
            None,
            None,
            Vec::new(),
            executes,
            record,
        ));
        if let Some(refusal) = refusal {
            self.refuse_simple(chunk, refusal);
            return Step::Next;
        }
        let calls = calls_functions(&facts, &effective);
        for c in changes.iter().flatten() {
            self.statements.stage(c, false);
        }
        self.portals
            .stage(&Change::DropAll { always: false }, false);
        let command = chunk.events.last().map_or(0, |e| e.seq);
        let withhold = withholds_rows(chunk.events.last(), facts.parsed, &effective);
        let outputs = match &self.mask {
            Some(_) => effective.iter().map(|e| e.outputs.clone()).collect(),
            None => VecDeque::new(),
        };
        let quotes = self.masks_quotes(&effective);
        chunk.bytes.extend_from_slice(&frame.raw);
        chunk.entries.push(Pending::Query {
            command,
            withhold,
            changes,
            calls,
            outputs,
            quotes,
        });
        // A COPY from the client takes whatever follows as its input, and
        // what the server then runs of the rest is not what was sent: read
        // on only once the server has answered (COPY mode is then known).
        if self.may_change_parsing(&facts, &effective)
            || effective.iter().any(|s| s.copies_from_client)
        {
            self.barrier = true;
        }
        self.park_after(approval)
    }

    /// Ends the read with the command just read if it needs an approval.
    fn park_after(&mut self, approval: Option<ApprovalNeed>) -> Step {
        match approval {
            Some(need) => {
                self.parking = Some(need);
                Step::Stop
            }
            None => Step::Next,
        }
    }

    fn parse(&mut self, frame: &Frame, p: pg::Parse<'_>, chunk: &mut Chunk, state: &PolicyState) {
        let text = match self.parsing.decode(p.query) {
            Ok(text) => text,
            Err(e) => {
                self.refuse_extended(chunk, e);
                return;
            }
        };
        if self.batch.executed {
            self.batch.text_after_execute = true;
        }
        if let Some(error) = self.too_long(&text) {
            self.refuse_extended(chunk, error);
            return;
        }
        let facts = self.classifier.classify(&text, self.parsing.reading());
        // Decided now as well as when run: text no policy allows is
        // refused at once. (A statement that executes another by name is
        // decided when run, with what that name is then bound to.)
        if facts.statements.iter().all(|s| s.executes.is_none()) {
            let decision = self.policy.decide(state, &facts);
            if let Some(refusal) = decision.refusal.filter(|_| decision.denied) {
                chunk.events.push(self.command(
                    Protocol::Extended,
                    text.into_owned(),
                    Some(p.statement.to_owned()),
                    None,
                    Vec::new(),
                    Vec::new(),
                    decision.record,
                ));
                self.refuse_extended(chunk, refusal);
                return;
            }
        }
        let change = Change::Set(
            p.statement.to_owned(),
            Arc::new(Prepared {
                text: text.as_ref().into(),
                facts,
            }),
        );
        if let Some(error) = self.over_held([&change]) {
            self.refuse_extended(chunk, error);
            return;
        }
        self.statements.stage(&change, true);
        chunk.bytes.extend_from_slice(&frame.raw);
        chunk.entries.push(Pending::Parse(change));
    }

    fn bind(&mut self, frame: &Frame, b: pg::Bind<'_>, chunk: &mut Chunk) -> Step {
        let statement = match self.statements.lookup(b.statement) {
            Lookup::Known(s) => s,
            Lookup::Unsettled => return Step::Wait(frame.clone()),
            Lookup::Unknown => {
                self.refuse_extended(chunk, unknown_statement(b.statement));
                return Step::Next;
            }
        };
        let params = b
            .params
            .iter()
            .enumerate()
            .map(|(i, v)| param(b.param_format(i), *v, &self.parsing))
            .collect();
        let change = Change::Set(
            b.portal.to_owned(),
            Arc::new(Portal {
                statement_name: b.statement.to_owned(),
                statement,
                params,
            }),
        );
        if let Some(error) = self.over_held([&change]) {
            self.refuse_extended(chunk, error);
            return Step::Next;
        }
        self.portals.stage(&change, true);
        chunk.bytes.extend_from_slice(&frame.raw);
        chunk.entries.push(Pending::Bind(change));
        Step::Next
    }

    fn execute(
        &mut self,
        frame: &Frame,
        portal_name: &str,
        chunk: &mut Chunk,
        state: &PolicyState,
    ) -> Step {
        let portal = match self.portals.lookup(portal_name) {
            Lookup::Known(p) => p,
            Lookup::Unsettled => return Step::Wait(frame.clone()),
            Lookup::Unknown => {
                let error = if portal_name.is_empty() {
                    ClientError::error("34000", "unnamed portal does not exist")
                } else {
                    ClientError::error("34000", format!("portal \"{portal_name}\" does not exist"))
                };
                self.refuse_extended(chunk, error);
                return Step::Next;
            }
        };
        let statement = portal.statement.clone();
        let facts = &statement.facts;
        let resolved = match self.resolve(facts, &statement.text) {
            Resolution::Ready(r) => r,
            Resolution::Unsettled => return Step::Wait(frame.clone()),
            Resolution::Refused(error) => {
                chunk.events.push(self.command(
                    Protocol::Extended,
                    statement.text.to_string(),
                    Some(portal.statement_name.clone()),
                    Some(portal_name.to_owned()),
                    portal.params.clone(),
                    Vec::new(),
                    Some(self.policy.refused_record(state, facts, &error.message)),
                ));
                self.refuse_extended(chunk, error);
                return Step::Next;
            }
        };
        let decision = self
            .policy
            .decide_with(state, facts, |name| lookup(&resolved, name));
        let effective = effective_facts(facts, &resolved);
        let (record, refusal, approval) =
            self.with_mask_refusal(state, facts, decision, &effective);
        if approval.is_some() && !chunk.is_empty() {
            // What the client sent before it goes on first.
            return Step::Wait(frame.clone());
        }
        chunk.events.push(self.command(
            Protocol::Extended,
            statement.text.to_string(),
            Some(portal.statement_name.clone()),
            Some(portal_name.to_owned()),
            portal.params.clone(),
            executed(&resolved),
            record,
        ));
        if let Some(refusal) = refusal {
            self.refuse_extended(chunk, refusal);
            return Step::Next;
        }
        let calls = calls_functions(facts, &effective);
        self.batch.calls |= calls;
        let mut changes: Vec<Change<Prepared>> = effective
            .iter()
            .zip(facts.statements.iter())
            .flat_map(|(e, s)| changes_of(s, e, &statement.text, &resolved))
            .collect();
        if !facts.parsed {
            changes.push(Change::DropAll { always: true });
        }
        for c in &changes {
            self.statements.stage(c, true);
        }
        if self.mask.is_some() {
            // The rows' shape, for masking: the portal's name as sent.
            let name = frame.raw[5..].split(|&b| b == 0).next().unwrap_or_default();
            pg::describe(&mut chunk.bytes, b'P', name);
            chunk.entries.push(Pending::Shape);
        }
        let command = chunk.events.last().map_or(0, |e| e.seq);
        let withhold = withholds_rows(chunk.events.last(), facts.parsed, &effective);
        let outputs = match &self.mask {
            Some(_) => effective
                .first()
                .map_or_else(Outputs::none, |e| e.outputs.clone()),
            None => Outputs::none(),
        };
        let quotes = self.masks_quotes(&effective);
        chunk.bytes.extend_from_slice(&frame.raw);
        chunk.entries.push(Pending::Execute {
            command,
            withhold,
            changes,
            calls,
            outputs,
            quotes,
        });
        self.batch.executed = true;
        if self.may_change_parsing(facts, &effective) {
            self.batch.changes_parsing = true;
        }
        self.park_after(approval)
    }

    /// A `Query` ends the client's open batch.
    fn end_client_batch(&mut self) {
        self.statements.end_batch();
        self.portals.end_batch();
        self.batch = Batch::default();
    }

    /// Refuses an extended-protocol message: the target gets a `Parse` it
    /// fails on, the client the refusal, and the rest of the batch is
    /// dropped.
    fn refuse_extended(&mut self, chunk: &mut Chunk, error: ClientError) {
        chunk
            .entries
            .push(refuse_extended_bytes(&mut chunk.bytes, error));
        self.batch.dropping = true;
        self.statements.end_batch();
        self.portals.end_batch();
    }

    /// Refuses a `Query` (or a function call): the target gets a `Query`
    /// it fails on, the client the refusal and the target's
    /// `ReadyForQuery`.
    fn refuse_simple(&mut self, chunk: &mut Chunk, error: ClientError) {
        self.portals
            .stage(&Change::DropAll { always: false }, false);
        chunk
            .entries
            .push(refuse_simple_bytes(&mut chunk.bytes, error));
    }

    /// The refusal of a statement longer than the worker reads. Not
    /// recorded: nothing was run.
    fn too_long(&self, text: &str) -> Option<ClientError> {
        (text.len() > self.limits.max_statement).then(|| {
            count(&self.ctx.counters.statement_too_long);
            ClientError::error(
                "54000",
                format!(
                    "the statement is {} bytes long; Gatehouse reads statements of at most {} \
                     bytes (worker.max_statement_bytes)",
                    text.len(),
                    self.limits.max_statement
                ),
            )
        })
    }

    /// The refusal of bindings that would take the session's prepared
    /// statements and portals past `max_held` bytes.
    fn over_held<'c, T: Weighed + 'c>(
        &self,
        bindings: impl IntoIterator<Item = &'c Change<T>>,
    ) -> Option<ClientError> {
        let adding: usize = bindings.into_iter().map(Change::weight).sum();
        let held = self.statements.held() + self.portals.held();
        (adding > 0 && held + adding > self.limits.max_held).then(|| {
            count(&self.ctx.counters.prepared_bytes_exceeded);
            ClientError::error(
                "54000",
                format!(
                    "this session would hold {} bytes of prepared statements and portals, \
                     more than the {} Gatehouse keeps per session \
                     (worker.max_session_prepared_bytes); close some first \
                     (DEALLOCATE, Close)",
                    held + adding,
                    self.limits.max_held
                ),
            )
        })
    }

    /// What the `EXECUTE`s of `c` run: a name prepared earlier in the same
    /// text, else what the server has bound to it.
    fn resolve(&self, c: &Classification, text: &str) -> Resolution {
        let mut found: Vec<(String, Arc<Prepared>)> = Vec::new();
        for (i, s) in c.statements.iter().enumerate() {
            let Some(name) = &s.executes else {
                continue;
            };
            let earlier = c.statements[..i].iter().rev().find_map(|e| {
                if e.prepares.as_deref() == Some(name.as_str()) {
                    return Some(Some(e));
                }
                match &e.deallocates {
                    Some(Deallocates::All) => Some(None),
                    Some(Deallocates::One(n)) if n == name => Some(None),
                    _ => None,
                }
            });
            match earlier {
                Some(Some(e)) => found.push((name.clone(), Arc::new(prepared_body(e, text)))),
                Some(None) => return Resolution::Refused(unknown_statement(name)),
                None => match self.statements.lookup(name) {
                    Lookup::Known(p) if p.statement().is_some_and(|s| s.executes.is_some()) => {
                        // A statement that is itself an EXECUTE (a Parse
                        // of one) runs what yet another name holds.
                        return Resolution::Refused(ClientError::error(
                            "0A000",
                            format!(
                                "prepared statement \"{name}\" itself executes a prepared \
                                 statement, which Gatehouse does not run"
                            ),
                        ));
                    }
                    Lookup::Known(p) => found.push((name.clone(), p)),
                    Lookup::Unknown => return Resolution::Refused(unknown_statement(name)),
                    Lookup::Unsettled => return Resolution::Unsettled,
                },
            }
        }
        Resolution::Ready(found)
    }

    /// Whether the settings text is read with may change before the
    /// server reads text sent now, in ways the worker cannot foresee:
    /// - a command that calls functions is forwarded (or about to be) and
    ///   not yet answered: a function may change them (`set_config` inside
    ///   a function the worker cannot see), and the server reports it only
    ///   at the end of the command's batch;
    /// - once the session's settings have changed at all, a `Query` is
    ///   forwarded and not yet answered: if it fails, its transaction's
    ///   changes are undone at once (an explicit block's too, failed but
    ///   not yet ended), and the server reads on. (Within an
    ///   extended-protocol batch an error skips the rest of it, and a
    ///   `Sync` is a barrier then.)
    fn unforeseeable(&self, chunk: &Chunk) -> bool {
        let touched = self.settings_touched;
        let may_change = |e: &Pending| match e {
            Pending::Query { calls, .. } => *calls || touched,
            Pending::Execute { calls, .. } => *calls,
            Pending::Refused { simple, .. } => *simple && touched,
            _ => false,
        };
        self.pending.iter().any(may_change) || chunk.entries.iter().any(may_change)
    }

    /// Whether running a command may change how the server reads later
    /// text: it sets `client_encoding` or `standard_conforming_strings` (or
    /// may), runs code the classifier cannot see, did not parse, or ends a
    /// transaction in a session that changed them (a rollback or the end of
    /// `SET LOCAL` restores the old value).
    fn may_change_parsing(
        &mut self,
        c: &Classification,
        effective: &[Cow<'_, StatementFacts>],
    ) -> bool {
        let may = !c.parsed
            || effective.iter().any(|s| {
                s.changes_parsing
                    || s.dynamic
                    || (self.settings_touched && s.kind == StatementKind::Transaction)
            });
        self.settings_touched |= may;
        may
    }

    #[allow(clippy::too_many_arguments)]
    fn command(
        &self,
        protocol: Protocol,
        statement: String,
        statement_name: Option<String>,
        portal: Option<String>,
        params: Vec<Param>,
        executes: Vec<ExecutedStatement>,
        decision: Option<DecisionRecord>,
    ) -> Event {
        // Secrets never reach the log: not the text's, not the bound
        // values', not those of the statements it executes.
        let reading = self.parsing.reading();
        // An `EXECUTE p('…')` passes values to what `p` prepared: those
        // bound where `p` takes a secret are secrets here.
        let executing: Vec<SecretArgs> = executes
            .iter()
            .filter_map(|e| SecretArgs::of(&e.name, &e.text, reading))
            .collect();
        let (statement, params, redactions) = redacted(statement, params, reading, &executing);
        let executes = executes
            .into_iter()
            .map(|e| {
                let (text, _, redactions) = redacted(e.text, Vec::new(), reading, &[]);
                ExecutedStatement {
                    text,
                    redactions,
                    ..e
                }
            })
            .collect();
        self.ctx.event(Payload::CommandReceived(CommandReceived {
            protocol,
            statement,
            statement_name,
            portal,
            params,
            executes,
            decision,
            redactions,
            approval: None,
        }))
    }

    // ---------------------------------------------------------------
    // Approvals.
    // ---------------------------------------------------------------

    /// Parks the read that ends with a command needing an approval (the
    /// command is all it holds): its bytes and event wait, and the
    /// approval is built from the event, so that what is approved is
    /// what was recorded and what runs.
    fn park(&mut self, chunk: Chunk, need: ApprovalNeed) {
        let command = match chunk.events.last().map(|e| (&e.payload, e.time)) {
            Some((Payload::CommandReceived(c), time)) => (c.clone(), time),
            _ => {
                // Nothing to approve: the read goes on as any other.
                self.held = Some(chunk);
                return;
            }
        };
        let (command, requested_at) = command;
        let target = &self.policy.target;
        let approval = Approval {
            schema_version: APPROVAL_SCHEMA_VERSION,
            id: uuid::Uuid::now_v7(),
            state: ApprovalState::Pending,
            requested_at,
            expires_at: requested_at + chrono::Duration::seconds(i64::from(need.timeout_secs)),
            requester: self.ctx.identity.clone(),
            target: ApprovalTarget {
                name: target.name.clone(),
                kind: target.kind.clone(),
                environment: target.environment.clone(),
                tags: target.tags.clone(),
            },
            request: Requested::Command {
                session_id: self.ctx.session_id,
                worker_id: self.ctx.worker_id.clone(),
                command: Box::new(command),
            },
            approvers_required: need.approvers,
            grants: Vec::new(),
            denial: None,
            ended_at: None,
            cancel_reason: None,
            revocation: None,
            replaces: None,
        };
        self.parked = Some(Parked {
            chunk,
            approval,
            requested: false,
        });
    }

    /// The approval to record for the parked command, once; the pump
    /// calls [`Machine::approval_requested`] with the outcome.
    pub fn take_approval(&mut self) -> Option<Approval> {
        let parked = self.parked.as_mut().filter(|p| !p.requested)?;
        parked.requested = true;
        Some(parked.approval.clone())
    }

    /// Whether the session's identity or token is revoked in `state`: a
    /// command waiting for its approval is then withdrawn at once.
    pub fn revoked(&self, state: &PolicyState) -> bool {
        self.policy.revoked(state)
    }

    /// The approval the parked command waits for, while it waits.
    pub fn awaited_approval(&self) -> Option<&Approval> {
        self.parked.as_ref().map(|p| &p.approval)
    }

    /// The outcome of recording the approval: the client is told where it
    /// waits, or the command is refused (it never runs unrecorded).
    pub fn approval_requested(&mut self, result: Result<(), RecordError>) {
        let Some(parked) = &self.parked else {
            return;
        };
        match result {
            Ok(()) => {
                let a = &parked.approval;
                let reason = a
                    .command()
                    .and_then(|c| c.decision.as_ref())
                    .and_then(|d| d.reason.clone())
                    .unwrap_or_else(|| "a policy asks for it".into());
                let approvers = match a.approvers_required {
                    1 => "an approver".to_string(),
                    n => format!("{n} approvers"),
                };
                pg::notice_response(
                    &mut self.to_client,
                    "01000",
                    &format!(
                        "this command waits for approval ({reason}): approval {id} is pending \
                         until {approvers} {grant} it (gatehouse approvals grant {id}, or POST \
                         /api/v1/approvals/{id}/grant); it expires at {expires}. Cancel the \
                         query to withdraw it.",
                        grant = if a.approvers_required == 1 {
                            "grants"
                        } else {
                            "grant"
                        },
                        id = a.id,
                        expires = a.expires_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    ),
                );
            }
            Err(e) => {
                tracing::warn!(session = %self.ctx.session_id, error = ?e, "approval not recorded; the command is refused");
                let mut chunk = self.parked.take().expect("checked").chunk;
                chunk.refusal = Some(ClientError::event_log_unavailable());
                self.held = Some(chunk);
            }
        }
    }

    /// The approval of the parked command has ended: it runs if granted
    /// (and the session's identity is still in good standing), and is
    /// refused otherwise; either way its event, which links the approval,
    /// is recorded first.
    pub fn approval_decided(&mut self, approval: &Approval, state: &PolicyState, now: i64) {
        let Some(parked) = self
            .parked
            .take_if(|p| p.approval.id == approval.id && approval.state.is_terminal())
        else {
            return;
        };
        let mut chunk = parked.chunk;
        if let Some(Payload::CommandReceived(c)) = chunk.events.last_mut().map(|e| &mut e.payload) {
            c.approval = Some(ApprovalLink::of(approval));
        }
        let id = approval.id;
        let mut end = None;
        // Granted under the bundle it was decided with: a bundle published
        // meanwhile may now refuse it outright, so it is decided anew.
        let decided_with = parked
            .approval
            .command()
            .and_then(|c| c.decision.as_ref())
            .map(|d| d.bundle_hash.as_str());
        let bundle_changed = state.engine.as_ref().map(|e| e.bundle_hash()) != decided_with;
        chunk.refusal = match approval.state {
            // Revoked while it waited, however the approval ended.
            _ if self.policy.revoked(state) => {
                end = Some((
                    ClientError::fatal("28000", "access for this identity has been revoked"),
                    CloseReason::Revoked,
                ));
                Some(ClientError::error(
                    "28000",
                    format!(
                        "access for this identity was revoked while approval {id} was pending; \
                         the command did not run"
                    ),
                ))
            }
            ApprovalState::Granted if self.token_deadline.is_some_and(|d| now > d) => {
                end = Some((
                    ClientError::fatal(
                        "28000",
                        "the token has expired; reconnect with a fresh token",
                    ),
                    CloseReason::TokenExpired,
                ));
                Some(ClientError::error(
                    "28000",
                    format!(
                        "approval {id} was granted, but the session's token expired meanwhile; the command did not run"
                    ),
                ))
            }
            ApprovalState::Granted if bundle_changed => Some(ClientError::error(
                "42501",
                format!(
                    "approval {id} was granted, but the policies changed while the command \
                     waited; it did not run: send it again to have it decided anew"
                ),
            )),
            ApprovalState::Granted => None,
            ApprovalState::Denied => {
                let (by, comment) = approval.denial.as_ref().map_or(("an approver", ""), |d| {
                    (d.username.as_str(), d.comment.as_deref().unwrap_or(""))
                });
                Some(ClientError::error(
                    "42501",
                    format!("approval {id} was denied by {by}: {comment}"),
                ))
            }
            ApprovalState::Expired => Some(ClientError::error(
                "57014",
                format!(
                    "approval {id} expired at {} without a decision; the command did not run",
                    approval.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
                ),
            )),
            // A command's approval is never revoked; taken as withdrawn.
            ApprovalState::Cancelled | ApprovalState::Revoked | ApprovalState::Pending => {
                Some(ClientError::error(
                    "57014",
                    format!("canceling statement due to user request: approval {id} was withdrawn"),
                ))
            }
        };
        self.held = Some(chunk);
        if let Some((error, reason)) = end {
            self.close(error, reason);
        }
    }

    // ---------------------------------------------------------------
    // Target to client.
    // ---------------------------------------------------------------

    /// Acts on the whole frames at the front of `buf`: forwards them to the
    /// client (with the worker's own replies where they are due) and
    /// follows what they confirm.
    pub fn target_input(&mut self, buf: &mut BytesMut) {
        let mut pos = 0;
        while self.ended.is_none() {
            let len = match pg::pending_frame_len(&buf[pos..], pg::DEFAULT_MAX_FRAME) {
                Ok(Some(len)) if buf.len() - pos >= len => len,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(session = %self.ctx.session_id, error = %e, "protocol error from target");
                    self.fail(
                        ClientError::fatal("08P01", "the target sent a malformed message"),
                        CloseReason::Error,
                    );
                    break;
                }
            };
            let frame = &buf[pos..pos + len];
            pos += len;
            let command = self.front_command();
            let quotes = self.front_quotes();
            if self.target_frame(frame[0], &frame[5..]) && self.ended.is_none() {
                let from = self.to_client.len();
                self.forward(frame, quotes);
                if let Some((command, withhold)) = command {
                    self.record_answer(command, withhold, frame, from);
                }
            }
            if command.is_some() && self.front_command() != command {
                self.finish_response();
            }
            self.answer_front();
        }
        buf.advance(pos);
        if let Ok(Some(len)) = pg::pending_frame_len(buf, pg::DEFAULT_MAX_FRAME) {
            // Make room for a large frame, but not for more than has
            // arrived plus `RESERVE_AHEAD`: a header claims nothing.
            buf.reserve(len.saturating_sub(buf.len()).min(pg::RESERVE_AHEAD));
        }
    }

    /// Follows one target frame; false if it is not to be forwarded.
    fn target_frame(&mut self, tag: u8, body: &[u8]) -> bool {
        match tag {
            b'S' => return self.parameter_status(body),
            b'N' | b'A' => {}
            b'1' => match self.pending.pop_front() {
                Some(Pending::Parse(change)) => self.statements.settle(change, true),
                other => return self.desync(tag, other),
            },
            b'2' => match self.pending.pop_front() {
                Some(Pending::Bind(change)) => self.portals.settle(change, true),
                other => return self.desync(tag, other),
            },
            b'3' => match self.pending.pop_front() {
                Some(Pending::CloseStatement(change)) => self.statements.settle(change, true),
                Some(Pending::ClosePortal(change)) => self.portals.settle(change, true),
                other => return self.desync(tag, other),
            },
            b't' if !matches!(self.pending.front(), Some(Pending::Describe)) => {
                let front = self.pending.pop_front();
                return self.desync(tag, front);
            }
            b't' => {}
            b'n' => match self.pending.pop_front() {
                Some(Pending::Describe) => {}
                Some(Pending::Shape) => {
                    if let Some(mask) = &mut self.mask {
                        mask.end_result();
                    }
                    return false;
                }
                other => return self.desync(tag, other),
            },
            b'T' => match self.pending.front() {
                Some(Pending::Describe) => {
                    self.pending.pop_front();
                }
                Some(Pending::Shape) => {
                    self.pending.pop_front();
                    self.plan(body);
                    return false;
                }
                Some(Pending::Execute { .. } | Pending::Query { .. }) => {}
                _ => {
                    let front = self.pending.pop_front();
                    return self.desync(tag, front);
                }
            },
            b'D' | b'd' | b'c' | b'H' if !self.running() => {
                let front = self.pending.pop_front();
                return self.desync(tag, front);
            }
            b'D' | b'd' | b'c' | b'H' => {}
            b'G' | b'W' if !self.running() => {
                let front = self.pending.pop_front();
                return self.desync(tag, front);
            }
            b'G' | b'W' => self.copy_in_started(),
            b'C' => match self.pending.front_mut() {
                Some(Pending::Execute { .. }) => {
                    if let Some(Pending::Execute { changes, .. }) = self.pending.pop_front() {
                        self.settle_prepared(changes, true);
                    }
                }
                Some(Pending::Query {
                    changes, outputs, ..
                }) => {
                    let done = changes.pop_front().unwrap_or_default();
                    outputs.pop_front();
                    self.settle_prepared(done, true);
                }
                _ => {
                    let front = self.pending.pop_front();
                    return self.desync(tag, front);
                }
            },
            b'I' => match self.pending.front_mut() {
                Some(Pending::Execute { .. }) => {
                    if let Some(Pending::Execute { changes, .. }) = self.pending.pop_front() {
                        self.settle_prepared(changes, true);
                    }
                }
                Some(Pending::Query { changes, .. }) => {
                    // An empty query has no statement of its own.
                    if changes.front().is_some_and(|c| c.is_empty()) {
                        changes.pop_front();
                    }
                }
                _ => {
                    let front = self.pending.pop_front();
                    return self.desync(tag, front);
                }
            },
            b's' => match self.pending.pop_front() {
                Some(Pending::Execute { changes, .. }) => self.settle_prepared(changes, false),
                other => return self.desync(tag, other),
            },
            b'E' => return self.error_response(body),
            b'Z' => return self.ready_for_query(body),
            _ => {}
        }
        true
    }

    /// Appends a target frame to the client's output, masked where the
    /// target masks responses. `quotes`: an error or notice of it may quote
    /// masked values.
    fn forward(&mut self, frame: &[u8], quotes: bool) {
        let Some(mask) = &mut self.mask else {
            self.to_client.extend_from_slice(frame);
            return;
        };
        let ok = match frame[0] {
            b'D' if mask.masks_rows() => mask.data_row(frame, &mut self.to_client),
            b'd' if mask.masks_copy() => mask.copy_data(frame, &mut self.to_client),
            b'T' => {
                self.plan(&frame[5..]);
                self.to_client.extend_from_slice(frame);
                true
            }
            b'H' => {
                let policy = &self.policy;
                mask.copy_out(&frame[5..], |t, c| policy.may_unmask(t, c));
                self.to_client.extend_from_slice(frame);
                true
            }
            b'A' => {
                let policy = &self.policy;
                mask.notification(frame, &mut self.to_client, |t, c| policy.may_unmask(t, c));
                true
            }
            b'E' | b'N' => {
                if frame[0] == b'E' {
                    mask.end_result();
                }
                let policy = &self.policy;
                mask.error_or_notice(frame, &mut self.to_client, quotes, |t, c| {
                    policy.may_unmask(t, c)
                });
                true
            }
            tag => {
                if matches!(tag, b'C' | b'I' | b's' | b'Z' | b'c') {
                    mask.end_result();
                }
                self.to_client.extend_from_slice(frame);
                true
            }
        };
        if !ok {
            tracing::warn!(session = %self.ctx.session_id, message = %(frame[0] as char), "a target row does not match its description");
            self.fail(
                ClientError::fatal("08P01", "the target sent a malformed message"),
                CloseReason::Error,
            );
        }
    }

    /// A command's decision, or, where the policy lets it run, its
    /// refusal by masking ([`Machine::mask_refusal`]), recorded as such.
    fn with_mask_refusal(
        &mut self,
        state: &PolicyState,
        facts: &Classification,
        decision: CommandDecision,
        effective: &[Cow<'_, StatementFacts>],
    ) -> (
        Option<DecisionRecord>,
        Option<ClientError>,
        Option<ApprovalNeed>,
    ) {
        if decision.refusal.is_some() {
            return (decision.record, decision.refusal, None);
        }
        match self.mask_refusal(effective) {
            Some(error) => (
                Some(self.policy.refused_record(state, facts, &error.message)),
                Some(error),
                None,
            ),
            None => (decision.record, None, decision.approval),
        }
    }

    /// A statement masking cannot follow, refused to a principal `unmask`
    /// does not apply to where the target has column rules: `COPY … TO`
    /// (its data names no columns), and one that stores values of a masked
    /// column or runs code given as text (see
    /// [`ResponseMask::store_refusal`]).
    fn mask_refusal(&mut self, effective: &[Cow<'_, StatementFacts>]) -> Option<ClientError> {
        let mask = self.mask.as_mut()?;
        let policy = &self.policy;
        if effective.iter().any(|s| s.kind == StatementKind::CopyOut)
            && mask.copy_out_refused(|t, c| policy.may_unmask(t, c))
        {
            return Some(ClientError::error(
                "42501",
                "COPY … TO is refused here: this target masks columns by name, which COPY \
                 data does not carry; use SELECT, or ask for the unmask permission",
            ));
        }
        effective.iter().find_map(|s| {
            mask.store_refusal(s, |t, c| policy.may_unmask(t, c))
                .map(|why| ClientError::error("42501", why))
        })
    }

    /// Whether the errors of a command quote values masked for this
    /// principal (see [`ResponseMask::masks_quotes`]).
    fn masks_quotes(&mut self, effective: &[Cow<'_, StatementFacts>]) -> bool {
        let Some(mask) = self.mask.as_mut() else {
            return false;
        };
        let policy = &self.policy;
        mask.masks_quotes(effective.iter().map(|s| &**s), |t, c| {
            policy.may_unmask(t, c)
        })
    }

    /// Whether the errors of the command whose answers the target is
    /// sending quote masked values.
    fn front_quotes(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Execute { quotes: true, .. } | Pending::Query { quotes: true, .. })
        )
    }

    /// The command whose answers the target is sending.
    fn front_command(&self) -> Option<(u64, bool)> {
        match self.pending.front() {
            Some(
                Pending::Execute {
                    command, withhold, ..
                }
                | Pending::Query {
                    command, withhold, ..
                },
            ) => Some((*command, *withhold)),
            _ => None,
        }
    }

    /// Follows a forwarded answer of `command` into its response record;
    /// what the client got is `to_client` from `from` on.
    fn record_answer(&mut self, command: u64, withhold: bool, frame: &[u8], from: usize) {
        let sent = &self.to_client[from..];
        let wanted = !withhold && self.responses.wants_row(command);
        match frame[0] {
            b'D' => {
                let cells = match &mut self.mask {
                    Some(mask) if wanted => mask.recorded_row(frame),
                    _ => None,
                };
                self.responses.row(command, sent, cells);
            }
            b'd' => {
                let cell = match &mut self.mask {
                    Some(mask) if wanted => mask.recorded_copy(frame, sent).map(|c| vec![Some(c)]),
                    _ => None,
                };
                self.responses.row(command, sent, cell);
            }
            b'C' => self.responses.tag(command, &frame[5..]),
            b'E' => {
                let code = match BackendMessage::parse_body(b'E', &frame[5..]) {
                    Ok(BackendMessage::ErrorResponse(f)) => f.code.to_string(),
                    _ => String::new(),
                };
                self.responses.error(command, code);
            }
            _ => {}
        }
    }

    /// The response in progress is complete: its parts become events.
    fn finish_response(&mut self) {
        let stats = self
            .mask
            .as_mut()
            .map(|m| std::mem::take(&mut m.stats))
            .unwrap_or_default();
        self.responses.finish(stats);
        for part in std::mem::take(&mut self.responses.ready) {
            let event = self.ctx.event(Payload::ResponseRecorded(part));
            self.response_bytes += event_size(&event);
            self.response_events.push(event);
        }
    }

    /// A result's shape: the masking plan for its rows.
    fn plan(&mut self, body: &[u8]) {
        let Some(mask) = &mut self.mask else { return };
        let engine = self.policy.engine_id();
        if engine != self.mask_engine {
            mask.forget_decisions();
            self.mask_engine = engine;
        }
        // The statement the rows are of: the `Execute` the worker's own
        // `Describe` was for, or the `Query`'s next one.
        let unknown = Outputs::Unknown;
        let outputs = match self.pending.front() {
            Some(Pending::Execute { outputs, .. }) => outputs,
            Some(Pending::Query { outputs, .. }) => outputs.front().unwrap_or(&unknown),
            _ => &unknown,
        };
        let policy = &self.policy;
        if !mask.row_description(body, outputs, |t, c| policy.may_unmask(t, c)) {
            tracing::warn!(session = %self.ctx.session_id, "malformed RowDescription from the target");
            self.fail(
                ClientError::fatal("08P01", "the target sent a malformed message"),
                CloseReason::Error,
            );
        }
    }

    /// Whether the target is answering a statement that runs (rows and
    /// COPY data belong to one).
    fn running(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Execute { .. } | Pending::Query { .. })
        )
    }

    fn parameter_status(&mut self, body: &[u8]) -> bool {
        let Some((name, value)) = encoding::parameter_status(body) else {
            self.fail(
                ClientError::fatal("08P01", "the target sent a malformed message"),
                CloseReason::Error,
            );
            return false;
        };
        let changed = self.parsing.apply(name, value);
        // However it changed (a function calling set_config, say), the end
        // of a transaction may undo it: from now on transaction control is
        // a barrier, as after a SET the worker saw.
        self.settings_touched |= changed;
        if changed && self.misread() {
            // Changed by something the worker could not foresee (a function
            // calling set_config, say), while text the worker read with the
            // old setting was already on its way: stop here.
            tracing::warn!(
                session = %self.ctx.session_id,
                "client_encoding or standard_conforming_strings changed while later statements were in flight"
            );
            self.fail(
                ClientError::fatal(
                    "0A000",
                    "client_encoding or standard_conforming_strings changed in a way Gatehouse \
                     could not foresee while later statements were already sent; change them \
                     with SET, alone, and wait for its result",
                ),
                CloseReason::Error,
            );
            return false;
        }
        if let Some((name, shown)) = shown_to_client(name, &self.ctx.identity.username) {
            pg::parameter_status(&mut self.to_client, name, shown);
            return false;
        }
        true
    }

    /// Whether text read before a setting changed now may be read by the
    /// server after the change: text behind the batch that changed it, or
    /// text of that batch after an `Execute`.
    fn misread(&self) -> bool {
        let mut entries = self.pending.iter();
        let front_late = match entries.next() {
            Some(Pending::Sync {
                text_after_execute, ..
            }) => *text_after_execute,
            _ => false,
        };
        front_late
            || entries.any(Pending::has_text)
            || self
                .held
                .as_ref()
                .is_some_and(|h| h.entries.iter().any(Pending::has_text))
    }

    /// The target entered COPY-in mode: it ignores `Sync` until the COPY's
    /// input ends, so `Sync` messages forwarded before the client's
    /// `CopyDone`/`CopyFail` get no answer.
    ///
    /// Anything else sent before the COPY's input ends is a client's
    /// mistake the server answers by taking it as part of the COPY (it fails
    /// the COPY and swallows the message): what the machine expects would
    /// no longer be what the server does, so the session ends.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        let mut ended = false;
        let mut misplaced = false;
        while i < self.pending.len() {
            match &self.pending[i] {
                Pending::CopyEnd => {
                    ended = true;
                    break;
                }
                Pending::Sync { .. } => {
                    self.pending.remove(i);
                    self.portals
                        .settle(Change::DropAll { always: false }, false);
                }
                Pending::Fatal(..) => i += 1,
                _ => {
                    misplaced = true;
                    i += 1;
                }
            }
        }
        misplaced |= !ended
            && self
                .held
                .as_ref()
                .is_some_and(|h| h.entries.iter().any(|e| !matches!(e, Pending::CopyEnd)));
        if misplaced {
            self.fail(copy_in_progress(), CloseReason::Error);
        }
        self.client_copy = !ended;
    }

    fn error_response(&mut self, body: &[u8]) -> bool {
        let fatal = match BackendMessage::parse_body(b'E', body) {
            Ok(BackendMessage::ErrorResponse(f)) => f.severity == "FATAL" || f.severity == "PANIC",
            _ => false,
        };
        self.client_copy = false;
        match self.pending.front_mut() {
            Some(Pending::Refused {
                error,
                simple,
                answered,
            }) if !fatal => {
                error.encode(&mut self.to_client);
                *answered = true;
                if !*simple {
                    self.pending.pop_front();
                    self.skip_to_sync();
                }
                false
            }
            Some(Pending::Query { changes, .. }) => {
                // The rest of the query does not run.
                let rest: Vec<_> = changes.drain(..).flatten().collect();
                self.settle_prepared(rest, false);
                true
            }
            Some(Pending::Sync { .. } | Pending::Refused { .. } | Pending::Fatal(..)) | None => {
                true
            }
            Some(_) => {
                let failed = self.pending.pop_front().expect("front exists");
                self.settle_entry(failed);
                self.skip_to_sync();
                true
            }
        }
    }

    /// After an error in an extended batch the server discards messages up
    /// to `Sync`: so are their entries.
    fn skip_to_sync(&mut self) {
        while let Some(front) = self.pending.front() {
            if matches!(front, Pending::Sync { .. } | Pending::Fatal(..)) {
                return;
            }
            let skipped = self.pending.pop_front().expect("front exists");
            self.settle_entry(skipped);
        }
        // The client has not sent the batch's Sync yet: the server skips
        // its messages until then (also those being recorded).
        self.server_skipping = true;
    }

    fn ready_for_query(&mut self, body: &[u8]) -> bool {
        if let Ok(BackendMessage::ReadyForQuery(s)) = BackendMessage::parse_body(b'Z', body) {
            self.status = s;
        }
        let front = self.pending.pop_front();
        match front {
            Some(Pending::Sync { .. }) => {}
            Some(Pending::Query { changes, .. }) => {
                self.settle_prepared(changes.into_iter().flatten(), false);
            }
            Some(Pending::Refused {
                error,
                simple: true,
                answered,
            }) => {
                if !answered {
                    error.encode(&mut self.to_client);
                }
            }
            other => return self.desync(b'Z', other),
        }
        // The transaction ended (or never began): portals are gone.
        let idle = self.status == TransactionStatus::Idle;
        self.portals.settle(Change::DropAll { always: false }, idle);
        true
    }

    /// Settles what a forwarded message would have changed, when it did not
    /// run.
    fn settle_entry(&mut self, entry: Pending) {
        match entry {
            Pending::Parse(c) | Pending::CloseStatement(c) => self.statements.settle(c, false),
            Pending::Bind(c) | Pending::ClosePortal(c) => self.portals.settle(c, false),
            Pending::Execute { changes, .. } => self.settle_prepared(changes, false),
            Pending::Query { changes, .. } => {
                self.settle_prepared(changes.into_iter().flatten(), false);
                self.portals
                    .settle(Change::DropAll { always: false }, false);
            }
            Pending::Sync { .. } | Pending::Refused { simple: true, .. } => self
                .portals
                .settle(Change::DropAll { always: false }, false),
            Pending::Describe
            | Pending::Shape
            | Pending::CopyEnd
            | Pending::Refused { .. }
            | Pending::Fatal(..) => {}
        }
    }

    fn settle_prepared(&mut self, changes: impl IntoIterator<Item = Change<Prepared>>, ok: bool) {
        for c in changes {
            self.statements.settle(c, ok);
        }
    }

    /// A response the machine cannot match to what it forwarded: its idea
    /// of the server's state can no longer be trusted, so the session ends.
    fn desync(&mut self, tag: u8, front: Option<Pending>) -> bool {
        tracing::warn!(
            session = %self.ctx.session_id,
            message = %(tag as char),
            awaiting = ?front,
            "the target's answer does not match what was sent"
        );
        self.fail(
            ClientError::fatal(
                "08P01",
                "Gatehouse could not follow the target's answers; the session is closed",
            ),
            CloseReason::Error,
        );
        false
    }

    /// Emits what is due at the front: the worker's own replies, and the
    /// markers that wait for no answer.
    fn answer_front(&mut self) {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::CopyEnd => {
                    self.pending.pop_front();
                }
                Pending::Fatal(..) => {
                    if let Some(Pending::Fatal(error, reason)) = self.pending.pop_front() {
                        self.fail(error, reason);
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    /// The target closed its connection: whatever it sent last has been
    /// forwarded.
    pub fn target_closed(&mut self) {
        if self.ended.is_none() {
            self.ended = Some(match self.closing {
                Some(CloseReason::ClientTerminated) => CloseReason::ClientTerminated,
                _ => CloseReason::TargetDisconnected,
            });
        }
    }

    /// Named statements and portals the server confirmed.
    #[cfg(test)]
    fn confirmed(&self) -> (usize, usize) {
        (self.statements.confirmed(), self.portals.confirmed())
    }
}

/// What acting on a client frame leads to.
enum Step {
    Next,
    /// Hold this frame until the target has answered everything forwarded.
    Wait(Frame),
    /// Stop reading the client.
    Stop,
}

fn responses_unrecorded() -> ClientError {
    ClientError::fatal(
        "58000",
        "the responses of this session cannot be recorded: the event log is unavailable; \
         the session is closed",
    )
}

/// Whether a command's response rows are left out of its record: its own
/// record withheld a secret (the server may echo it back: `SELECT
/// set_config('app.token', $1, false)`), it reads settings (`SHOW`,
/// `current_setting`, `pg_settings`: a setting may hold a secret), or
/// what it runs cannot be known (dynamic code, text that did not parse).
fn withholds_rows(
    event: Option<&Event>,
    parsed: bool,
    effective: &[Cow<'_, StatementFacts>],
) -> bool {
    let redacted = match event.map(|e| &e.payload) {
        Some(Payload::CommandReceived(c)) => {
            !c.redactions.is_empty() || c.executes.iter().any(|e| !e.redactions.is_empty())
        }
        _ => true,
    };
    redacted
        || !parsed
        || effective.iter().any(|s| {
            s.kind == StatementKind::Session
                || s.dynamic
                || s.functions.iter().any(|f| {
                    matches!(
                        f.as_str(),
                        "current_setting" | "set_config" | "pg_show_all_settings"
                    )
                })
                || s.tables_read.iter().any(|t| {
                    let t = t.rsplit('.').next().unwrap_or(t);
                    matches!(t, "pg_settings" | "pg_file_settings" | "pg_db_role_setting")
                })
        })
}

/// Most bytes of response events a session holds before it stops reading
/// from the target until they are recorded.
const MAX_RESPONSE_BACKLOG: usize = 4 << 20;

/// About how large an event is, for the response backlog.
fn event_size(e: &Event) -> usize {
    match &e.payload {
        Payload::ResponseRecorded(r) => response::size_of_part(r),
        _ => 512,
    }
}

/// Whether `text` reads the same whatever the session's `client_encoding`
/// (every encoding the server offers clients keeps ASCII as it is) and
/// `standard_conforming_strings` (which only changes what a backslash
/// means).
fn settings_proof(text: &[u8]) -> bool {
    text.is_ascii() && !text.contains(&b'\\')
}

/// Whether a command calls functions (any of which may be one that changes
/// settings).
fn calls_functions(c: &Classification, effective: &[Cow<'_, StatementFacts>]) -> bool {
    !c.parsed || effective.iter().any(|s| !s.functions.is_empty())
}

fn settings_in_flux() -> ClientError {
    ClientError::error(
        "0A000",
        "send Sync after a statement that may change client_encoding or \
         standard_conforming_strings (a SET of them, or a call of a function that may), \
         before the next statement with non-ASCII text or backslashes",
    )
}

fn copy_in_progress() -> ClientError {
    ClientError::fatal(
        "08P01",
        "a message other than COPY data was sent while a COPY was in progress",
    )
}

fn unknown_statement(name: &str) -> ClientError {
    if name.is_empty() {
        ClientError::error("26000", "unnamed prepared statement does not exist")
    } else {
        ClientError::error(
            "26000",
            format!("prepared statement \"{name}\" does not exist"),
        )
    }
}

fn lookup<'a>(resolved: &'a [(String, Arc<Prepared>)], name: &str) -> Option<&'a StatementFacts> {
    resolved
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, p)| p.statement())
}

/// A command's text and bound values as they are recorded: each secret
/// [`find_secrets_with`] finds in the text replaced by [`REDACTED`] (with
/// the arguments `executing` makes secrets, of an `EXECUTE`, and the values
/// given under a bound secret-looking name), and so
/// is the value of each parameter in a secret's place and each text value
/// that is a connection string with a password or a JSON document with a
/// secret-looking key.
fn redacted(
    text: String,
    mut params: Vec<Param>,
    reading: gatehouse_policies::Reading,
    executing: &[SecretArgs],
) -> (String, Vec<Param>, Vec<Redaction>) {
    // Each bound value as text, decoded once for both looks below.
    let sent: Vec<Option<Cow<'_, str>>> = params.iter().map(sent_text).collect();
    // A bound value may be the name a secret is given under
    // (`set_config($1, $2, …)` with `$1` = `app.api_token`).
    let secret_names: Vec<u32> = sent
        .iter()
        .enumerate()
        .filter(|(_, v)| v.as_deref().is_some_and(names_a_secret))
        .map(|(i, _)| u32::try_from(i + 1).unwrap_or(u32::MAX))
        .collect();
    let known = Known {
        executing,
        secret_names: &secret_names,
    };
    let secrets = find_secrets_with(&text, reading, known);
    let mut redactions: Vec<Redaction> = secrets
        .kinds()
        .map(|(kind, param)| Redaction {
            kind: kind.as_str().to_owned(),
            param,
        })
        .collect();
    let text = if secrets.is_empty() {
        text
    } else {
        secrets.redact(&text)
    };
    let mut withheld = secrets.params.iter().map(|(n, _)| *n).collect::<Vec<_>>();
    for (i, v) in sent.iter().enumerate() {
        let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if withheld.contains(&n) {
            continue;
        }
        let kind = v.as_deref().and_then(|v| {
            if is_connection_secret(v) {
                Some(SecretKind::ConnectionString)
            } else {
                json_holds_secret(v).then_some(SecretKind::Value)
            }
        });
        if let Some(kind) = kind {
            withheld.push(n);
            redactions.push(Redaction {
                kind: kind.as_str().to_owned(),
                param: Some(n),
            });
        }
    }
    for n in withheld {
        let index = (n as usize).checked_sub(1);
        if let Some(p) = index
            .and_then(|i| params.get_mut(i))
            .filter(|p| p.value.is_some())
        {
            *p = Param {
                format: ParamFormat::Text,
                value: Some(REDACTED.to_owned()),
                encoding: None,
            };
        }
    }
    (text, params, redactions)
}

/// Whether a bound value is a name a secret goes by: a setting, option or
/// key name ([`is_secret_name`]), one word of at most 128 bytes.
fn names_a_secret(value: &str) -> bool {
    value.len() <= 128
        && !value.is_empty()
        && !value.bytes().any(|b| b.is_ascii_whitespace())
        && is_secret_name(value)
}

/// A bound value as text, to look for a connection secret in: text values
/// as they are, and values carried as base64 (binary ones, whose text-like
/// types are their UTF-8 bytes, and text not valid in the session's
/// encoding) decoded, up to a length no connection string reaches.
fn sent_text(p: &Param) -> Option<Cow<'_, str>> {
    const LONGEST: usize = 16 * 1024;
    let value = p.value.as_deref()?;
    if p.format == ParamFormat::Text && p.encoding.is_none() {
        return Some(Cow::Borrowed(value));
    }
    if value.len() > LONGEST {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    Some(Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()))
}

fn executed(resolved: &[(String, Arc<Prepared>)]) -> Vec<ExecutedStatement> {
    resolved
        .iter()
        .map(|(name, p)| ExecutedStatement {
            name: name.clone(),
            text: p.text.to_string(),
            redactions: Vec::new(),
        })
        .collect()
}

/// Each statement's facts as it runs: an `EXECUTE` has those of what it
/// executes.
fn effective_facts<'a>(
    c: &'a Classification,
    resolved: &[(String, Arc<Prepared>)],
) -> Vec<Cow<'a, StatementFacts>> {
    c.statements
        .iter()
        .map(|s| match &s.executes {
            Some(name) => Cow::Owned(match lookup(resolved, name) {
                Some(p) => p.executed_with(s),
                None => {
                    // Prepared from text the worker could not read as one
                    // statement: anything may happen.
                    let mut unknown = StatementFacts::new(StatementKind::Other);
                    unknown.dynamic = true;
                    unknown.outputs = Outputs::Unknown;
                    unknown
                }
            }),
            None => Cow::Borrowed(s),
        })
        .collect()
}

/// What running statement `s` (with facts `effective` when it runs) changes
/// in the session's prepared statements. `text` is the command's text.
/// An `EXECUTE` changes what the statement it runs changes: a `Parse` of
/// `PREPARE …`, `DEALLOCATE …` or `DISCARD ALL`, run by a SQL `EXECUTE`,
/// prepares or drops names on the server like the statement itself.
fn changes_of(
    s: &StatementFacts,
    effective: &StatementFacts,
    text: &str,
    resolved: &[(String, Arc<Prepared>)],
) -> Vec<Change<Prepared>> {
    let executed = s.executes.as_ref().and_then(|name| {
        let (_, p) = resolved.iter().find(|(n, _)| n == name)?;
        Some((p.statement()?, &*p.text))
    });
    let (runs, text) = match (&s.executes, executed) {
        (Some(_), Some(executed)) => executed,
        // What it runs is unknown: `effective` says it is dynamic.
        (Some(_), None) => (effective, text),
        (None, _) => (s, text),
    };
    let mut changes = Vec::new();
    if let Some(name) = &runs.prepares {
        changes.push(Change::Set(
            name.clone(),
            Arc::new(prepared_body(runs, text)),
        ));
    }
    match &runs.deallocates {
        Some(Deallocates::One(name)) => changes.push(Change::Drop(name.clone())),
        Some(Deallocates::All) => changes.push(Change::DropAll { always: false }),
        None => {}
    }
    if effective.dynamic {
        // Code the worker cannot see may prepare or drop anything.
        changes.push(Change::DropAll { always: true });
    }
    changes
}

/// The statement a SQL `PREPARE` (with facts `prepare`, from `text`) binds
/// to its name: what an `EXECUTE` of it runs is the prepared query, which
/// itself prepares nothing (unlike a `Parse` of the `PREPARE`, which runs
/// the `PREPARE`).
fn prepared_body(prepare: &StatementFacts, text: &str) -> Prepared {
    let mut body = prepare.clone();
    body.prepares = None;
    Prepared {
        text: text.into(),
        facts: Arc::new(Classification {
            statements: vec![body],
            parsed: true,
        }),
    }
}

/// One bound parameter as recorded, losslessly: text transcoded from the
/// session's encoding, or, when it is not valid there (the target will
/// refuse it) or holds a NUL, the bytes sent in base64, flagged so; binary
/// as base64.
fn param(format: i16, value: Option<&[u8]>, parsing: &Parsing) -> Param {
    match (format, value) {
        (1, value) => Param {
            format: ParamFormat::Binary,
            value: value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
            encoding: None,
        },
        (_, None) => Param {
            format: ParamFormat::Text,
            value: None,
            encoding: None,
        },
        (_, Some(v)) => Param::text(v, parsing.decode(v).ok().map(Cow::into_owned)),
    }
}

fn refuse_extended_bytes(out: &mut BytesMut, error: ClientError) -> Pending {
    // Parse(REFUSED_NAME, REFUSED_TEXT, no parameter types)
    let body_len = REFUSED_NAME.len() + 1 + REFUSED_TEXT.len() + 1 + 2;
    out.put_u8(b'P');
    out.put_i32((body_len + 4) as i32);
    out.put_slice(REFUSED_NAME.as_bytes());
    out.put_u8(0);
    out.put_slice(REFUSED_TEXT.as_bytes());
    out.put_u8(0);
    out.put_i16(0);
    Pending::Refused {
        error,
        simple: false,
        answered: false,
    }
}

fn refuse_simple_bytes(out: &mut BytesMut, error: ClientError) -> Pending {
    pg::query(out, REFUSED_TEXT);
    Pending::Refused {
        error,
        simple: true,
        answered: false,
    }
}

fn pg_sync(out: &mut BytesMut) {
    out.put_u8(b'S');
    out.put_i32(4);
}

fn flush_bytes() -> [u8; 5] {
    [b'H', 0, 0, 0, 4]
}

fn copy_fail(out: &mut BytesMut, reason: &str) {
    out.put_u8(b'f');
    out.put_i32((reason.len() + 1 + 4) as i32);
    out.put_slice(reason.as_bytes());
    out.put_u8(0);
}
