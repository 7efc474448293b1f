//! The session machine fed byte fixtures: what reaches the target, what
//! reaches the client, what is recorded.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use gatehouse_events::approval::{Approval, ApprovalState};
use gatehouse_events::{DecisionEffect, Event, Identity, Payload};
use gatehouse_pgwire::TransactionStatus;
use gatehouse_policies::{Bundle, Engine, TargetInfo};
use gatehouse_policystore::{PolicyConfig, Revoked};

use super::{Machine, RecordError};
use crate::encoding::Parsing;
use crate::policy::{PolicyState, SessionPolicy};
use crate::session::SessionCtx;

// ---- frontend messages ----

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub(super) fn query(text: &str) -> Vec<u8> {
    query_bytes(text.as_bytes())
}

pub(super) fn query_bytes(text: &[u8]) -> Vec<u8> {
    let mut b = text.to_vec();
    b.push(0);
    msg(b'Q', &b)
}

pub(super) fn parse(name: &str, text: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, text);
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

pub(super) fn bind(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'B', &b)
}

pub(super) fn execute(portal: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    msg(b'E', &b)
}

pub(super) fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    msg(b'C', &b)
}

pub(super) fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    msg(b'D', &b)
}

pub(super) fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

pub(super) fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

pub(super) fn copy_data(data: &[u8]) -> Vec<u8> {
    msg(b'd', data)
}

pub(super) fn copy_done() -> Vec<u8> {
    msg(b'c', &[])
}

// ---- backend messages ----

pub(super) fn parse_complete() -> Vec<u8> {
    msg(b'1', &[])
}

pub(super) fn bind_complete() -> Vec<u8> {
    msg(b'2', &[])
}

pub(super) fn close_complete() -> Vec<u8> {
    msg(b'3', &[])
}

pub(super) fn no_data() -> Vec<u8> {
    msg(b'n', &[])
}

pub(super) fn parameter_description() -> Vec<u8> {
    msg(b't', &0i16.to_be_bytes())
}

pub(super) fn command_complete(tag: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, tag);
    msg(b'C', &b)
}

pub(super) fn data_row(value: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value.as_bytes());
    msg(b'D', &b)
}

/// A `RowDescription` of text columns of no table.
pub(super) fn row_description(names: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(names.len() as i16).to_be_bytes());
    for n in names {
        cstr(&mut b, n);
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    msg(b'T', &b)
}

pub(super) fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

pub(super) fn error(code: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (field, value) in [(b'S', "ERROR"), (b'C', code), (b'M', message)] {
        b.push(field);
        cstr(&mut b, value);
    }
    b.push(0);
    msg(b'E', &b)
}

pub(super) fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, value);
    msg(b'S', &b)
}

pub(super) fn copy_in_response() -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'G', &b)
}

pub(super) fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// A decoded message, for assertions: its tag, and for errors the SQLSTATE,
/// for queries and parses the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    Msg(char),
    Error(String),
    Text(char, String),
}

/// Frames as a client (`from_client`) or the target sent them.
pub(super) fn frames(bytes: &[u8], from_client: bool) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= bytes.len() {
        let tag = bytes[pos];
        let len = i32::from_be_bytes(bytes[pos + 1..pos + 5].try_into().unwrap()) as usize;
        let body = &bytes[pos + 5..pos + 1 + len];
        out.push(match tag {
            b'E' if !from_client => {
                let code = body
                    .split(|b| *b == 0)
                    .find(|f| f.first() == Some(&b'C'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                    .unwrap_or_default();
                Seen::Error(code)
            }
            b'Q' => Seen::Text('Q', cstr_at(body, 0)),
            b'P' => {
                let name = cstr_at(body, 0);
                Seen::Text('P', cstr_at(body, name.len() + 1))
            }
            _ => Seen::Msg(tag as char),
        });
        pos += 1 + len;
    }
    assert_eq!(pos, bytes.len(), "whole frames only");
    out
}

fn cstr_at(body: &[u8], at: usize) -> String {
    let end = body[at..].iter().position(|b| *b == 0).unwrap() + at;
    String::from_utf8_lossy(&body[at..end]).into_owned()
}

fn m(c: char) -> Seen {
    Seen::Msg(c)
}

fn err(code: &str) -> Seen {
    Seen::Error(code.into())
}

fn text(tag: char, t: &str) -> Seen {
    Seen::Text(tag, t.into())
}

// ---- the harness ----

/// A recorded command: its text, the prepared statements it executes
/// (name, text), its decision.
pub(super) type Recorded = (String, Vec<(String, String)>, DecisionEffect);

pub(super) struct Harness {
    pub machine: Machine,
    pub state: PolicyState,
    /// The session's clock, Unix seconds.
    pub now: i64,
    pub client: BytesMut,
    /// Every event recorded so far.
    pub recorded: Vec<Event>,
}

pub(super) fn identity(name: &str, groups: &[&str]) -> Identity {
    Identity {
        issuer: "https://issuer.test".into(),
        subject: format!("sub-{name}"),
        username: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        delegation: Vec::new(),
    }
}

impl Harness {
    pub fn new(identity: Identity) -> Self {
        Self::with_mask(identity, None)
    }

    /// A session whose target masks responses with every detector.
    pub fn masked() -> Self {
        Self::masked_with(&[])
    }

    /// … and masks whole the columns these patterns name.
    pub fn masked_with(patterns: &[&str]) -> Self {
        Self::masked_as(identity("alice", &[]), patterns)
    }

    /// … for `identity`.
    pub fn masked_as(identity: Identity, patterns: &[&str]) -> Self {
        let masking = crate::masking::MaskingConfig {
            columns: patterns
                .iter()
                .map(|p| crate::masking::ColumnRuleConfig {
                    pattern: (*p).into(),
                    style: crate::masking::StyleName::Redact,
                    keep_last: 4,
                })
                .collect(),
            ..Default::default()
        }
        .build("test")
        .unwrap();
        Self::with_mask(
            identity,
            Some(crate::masking::ResponseMask::new(
                &masking,
                Default::default(),
            )),
        )
    }

    fn with_mask(identity: Identity, mask: Option<crate::masking::ResponseMask>) -> Self {
        let engine = Engine::new(&Bundle::defaults()).expect("defaults are valid");
        let state = PolicyState {
            engine: Some(Arc::new(engine)),
            ..Default::default()
        };
        Self::build(identity, mask, state, 0)
    }

    /// A session decided by `state` at `now` (Unix seconds), which the
    /// session's clock stays at until the test moves it (`Harness::now`).
    fn build(
        identity: Identity,
        mask: Option<crate::masking::ResponseMask>,
        state: PolicyState,
        now: i64,
    ) -> Self {
        let target = TargetInfo {
            name: "test".into(),
            kind: "postgres".into(),
            environment: "dev".into(),
            tags: Vec::new(),
        };
        let mut policy = SessionPolicy::new(
            &PolicyConfig::default(),
            &identity,
            None,
            target,
            "127.0.0.1".into(),
        );
        policy.decide_connect(&state, now).expect("connect allowed");
        let ctx = Arc::new(SessionCtx::for_tests(identity));
        let machine = Machine::new(
            ctx,
            policy,
            Parsing::default(),
            TransactionStatus::Idle,
            super::Limits {
                max_message: 1 << 20,
                max_statement: 1 << 20,
                max_held: 1 << 30,
            },
            None,
            mask,
        );
        Harness {
            machine,
            state,
            now,
            client: BytesMut::new(),
            recorded: Vec::new(),
        }
    }

    pub fn user() -> Self {
        Self::new(identity("alice", &[]))
    }

    pub fn agent() -> Self {
        Self::new(identity("bot", &["agents"]))
    }

    /// The client sends `bytes`; events are acknowledged at once.
    pub fn send(&mut self, bytes: &[u8]) {
        self.client.extend_from_slice(bytes);
        self.pump(true);
    }

    /// The client sends `bytes`; the first recording fails.
    pub fn send_unrecorded(&mut self, bytes: &[u8]) {
        self.client.extend_from_slice(bytes);
        self.machine
            .client_input(&mut self.client, &self.state, self.now);
        if self.machine.take_events().is_some() {
            self.machine
                .recorded(Err(RecordError::Unavailable("nats is down".into())));
        }
        self.pump(true);
    }

    /// Feeds buffered client input until the machine takes no more (as
    /// the pump does: again while a frame it put aside can go on).
    pub fn pump(&mut self, ack: bool) {
        loop {
            let before = (self.client.len(), self.machine.to_target.len());
            self.machine
                .client_input(&mut self.client, &self.state, self.now);
            match self.machine.take_events() {
                Some(events) if ack => {
                    self.recorded.extend(events);
                    self.machine.recorded(Ok(()));
                }
                Some(_) => return,
                None if self.machine.stash.is_some()
                    && before != (self.client.len(), self.machine.to_target.len()) => {}
                None => return,
            }
        }
    }

    /// The parked command's approval, recorded: the client is told.
    pub fn request_approval(&mut self) -> Approval {
        let approval = self.machine.take_approval().expect("a command waits");
        assert!(self.machine.take_approval().is_none(), "requested once");
        assert!(!self.machine.accepts_client(), "nothing more is read");
        self.machine.approval_requested(Ok(()));
        approval
    }

    /// The approval ends in `state`; what follows is read on.
    pub fn decide(&mut self, approval: &Approval, state: ApprovalState) {
        let mut decided = approval.clone();
        decided.state = state;
        if state == ApprovalState::Denied {
            decided.denial = Some(gatehouse_events::approval::Verdict {
                subject: "u-bob".into(),
                username: "bob".into(),
                at: chrono::Utc::now(),
                comment: Some("not on a Friday".into()),
            });
        }
        self.machine.approval_decided(&decided, &self.state, 0);
        self.pump(true);
    }

    /// The target answers `bytes`; then client input that waited is read.
    pub fn reply(&mut self, bytes: &[u8]) {
        let mut buf = BytesMut::from(bytes);
        self.machine.target_input(&mut buf);
        assert!(buf.is_empty(), "whole frames consumed");
        self.pump(true);
    }

    pub fn sent(&mut self) -> Vec<Seen> {
        frames(&self.machine.to_target.split(), true)
    }

    pub fn answered(&mut self) -> Vec<Seen> {
        frames(&self.machine.to_client.split(), false)
    }

    /// The approvals recorded commands link, and how they ended.
    pub fn approval_links(&self) -> Vec<(uuid::Uuid, ApprovalState)> {
        self.recorded
            .iter()
            .filter_map(|e| match &e.payload {
                Payload::CommandReceived(c) => c.approval.as_ref().map(|a| (a.id, a.state)),
                _ => None,
            })
            .collect()
    }

    /// The statement texts, executed texts and effects of recorded
    /// commands.
    pub fn commands(&self) -> Vec<Recorded> {
        self.recorded
            .iter()
            .filter_map(|e| match &e.payload {
                Payload::CommandReceived(c) => Some((
                    c.statement.clone(),
                    c.executes
                        .iter()
                        .map(|x| (x.name.clone(), x.text.clone()))
                        .collect(),
                    c.decision.as_ref().map(|d| d.effect).expect("decided"),
                )),
                _ => None,
            })
            .collect()
    }
}

use DecisionEffect::{Allow, ApprovalRequired, Deny};

#[test]
fn simple_query_is_recorded_then_forwarded_and_answered() {
    let mut h = Harness::user();
    h.client.extend_from_slice(&query("SELECT 1"));
    h.machine.client_input(&mut h.client, &h.state, 0);
    assert!(h.machine.to_target.is_empty(), "nothing before the ack");
    let events = h.machine.take_events().expect("an event to record");
    assert_eq!(events.len(), 1);
    assert!(!h.machine.accepts_client(), "waits for the ack");
    h.machine.recorded(Ok(()));
    assert_eq!(h.sent(), vec![text('Q', "SELECT 1")]);
    h.reply(&cat(&[
        data_row("1"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(h.answered(), vec![m('D'), m('C'), m('Z')]);
}

#[test]
fn several_statements_in_one_query() {
    let mut h = Harness::user();
    h.send(&query("SELECT 1; SELECT 2"));
    assert_eq!(h.sent(), vec![text('Q', "SELECT 1; SELECT 2")]);
    h.reply(&cat(&[
        command_complete("SELECT 1"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(h.answered(), vec![m('C'), m('C'), m('Z')]);
    assert!(h.machine.pending.is_empty());
}

#[test]
fn extended_pipeline_with_several_syncs() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("", "SELECT $1"),
        bind("", "", &["a"]),
        execute(""),
        sync(),
        parse("", "SELECT 2"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]));
    let sent = h.sent();
    assert_eq!(sent.len(), 8, "the whole pipeline goes on: {sent:?}");
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        data_row("a"),
        command_complete("SELECT 1"),
        ready(b'I'),
        parse_complete(),
        bind_complete(),
        data_row("2"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(h.answered().len(), 10);
    assert_eq!(
        h.commands(),
        vec![
            ("SELECT $1".into(), vec![], Allow),
            ("SELECT 2".into(), vec![], Allow)
        ]
    );
    assert!(h.machine.statements.settled() && h.machine.portals.settled());
}

#[test]
fn an_error_mid_pipeline_skips_to_sync_and_binds_nothing() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("s1", "SELECT 1"),
        bind("p1", "s1", &[]),
        execute("p1"),
        sync(),
    ]));
    h.sent();
    // The server refuses the Parse: the rest of the batch is skipped.
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("42601"), m('Z')]);
    assert_eq!(h.machine.confirmed(), (0, 0));
    // So s1 is unknown: a Bind of it is refused, never forwarded.
    h.send(&cat(&[bind("", "s1", &[]), execute(""), sync()]));
    assert_eq!(
        h.sent(),
        vec![text('P', super::REFUSED_TEXT), m('S')],
        "the Bind is replaced by a Parse that fails"
    );
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("26000"), m('Z')]);
}

/// The server refuses a second `Parse` of a name in use (42P05): the name
/// keeps its first text, and that is what a later `Execute` is decided and
/// recorded with.
#[test]
fn a_refused_reparse_keeps_the_first_text() {
    let mut h = Harness::user();
    h.send(&cat(&[parse("s1", "SET statement_timeout = 0"), sync()]));
    h.reply(&cat(&[parse_complete(), ready(b'I')]));
    h.send(&cat(&[parse("s1", "SELECT 1"), sync()]));
    h.reply(&cat(&[
        error("42P05", "prepared statement \"s1\" already exists"),
        ready(b'I'),
    ]));
    h.sent();
    h.answered();
    h.send(&cat(&[bind("", "s1", &[]), execute(""), sync()]));
    assert_eq!(h.sent(), vec![m('B'), m('E'), m('S')]);
    let commands = h.commands();
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].0, "SET statement_timeout = 0");
}

/// An agent's session is read-only: a `Parse` of text that would make it
/// writable is refused at once, so no name is ever bound to it.
#[test]
fn an_agent_cannot_prepare_a_writable_session() {
    let mut h = Harness::agent();
    h.send(&cat(&[
        parse("s1", "SET default_transaction_read_only = off"),
        sync(),
    ]));
    assert_eq!(h.sent(), vec![text('P', super::REFUSED_TEXT), m('S')]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("42501"), m('Z')]);
    assert_eq!(h.machine.confirmed(), (0, 0));
    assert_eq!(h.commands()[0].2, Deny);
}

/// A statement prepared at the protocol level and run by SQL `EXECUTE` is
/// decided and recorded as what it runs.
#[test]
fn sql_execute_of_a_protocol_statement_is_decided_by_its_text() {
    let mut h = Harness::user();
    h.send(&cat(&[parse("px", "DELETE FROM t"), sync()]));
    assert_eq!(
        h.sent(),
        vec![text('P', "DELETE FROM t"), m('S')],
        "preparing is not running: approval is asked when it runs"
    );
    h.reply(&cat(&[parse_complete(), ready(b'I')]));
    h.answered();
    h.send(&query("EXECUTE px"));
    assert!(h.sent().is_empty(), "it waits for an approval");
    // What is approved is what runs: the statement px holds.
    let approval = h.request_approval();
    assert_eq!(approval.command().unwrap().statement, "EXECUTE px");
    assert_eq!(
        approval.command().unwrap().executes[0].text,
        "DELETE FROM t"
    );
    h.decide(&approval, ApprovalState::Denied);
    assert_eq!(h.sent().last(), Some(&text('Q', super::REFUSED_TEXT)));
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![m('N'), err("42501"), m('Z')]);
    assert_eq!(
        h.commands(),
        vec![(
            "EXECUTE px".into(),
            vec![("px".into(), "DELETE FROM t".into())],
            ApprovalRequired
        )]
    );
    assert_eq!(
        h.approval_links(),
        vec![(approval.id, ApprovalState::Denied)]
    );
}

/// A command that needs approval waits alone: what the client sent before
/// it runs, what it sent after waits with it, and once granted it runs
/// (recorded first, linked to its approval) and the rest follows in order.
#[test]
fn a_command_waits_for_its_approval_and_runs_once_granted() {
    let mut h = Harness::user();
    h.send(&cat(&[
        query("SELECT 1"),
        query("DELETE FROM t"),
        query("SELECT 2"),
    ]));
    assert_eq!(h.sent(), vec![text('Q', "SELECT 1")]);
    let approval = h.request_approval();
    assert_eq!(approval.command().unwrap().statement, "DELETE FROM t");
    assert_eq!(approval.approvers_required, 1);
    assert_eq!(
        (approval.expires_at - approval.requested_at).num_seconds(),
        300,
        "the default timeout"
    );
    assert_eq!(approval.requester.username, "alice");
    h.reply(&cat(&[command_complete("SELECT 1"), ready(b'I')]));
    assert_eq!(h.answered(), vec![m('N'), m('C'), m('Z')]);
    assert!(h.sent().is_empty(), "nothing runs while it waits");
    // Another approval's outcome changes nothing.
    let mut other = approval.clone();
    other.id = uuid::Uuid::now_v7();
    other.state = ApprovalState::Granted;
    h.machine.approval_decided(&other, &h.state, 0);
    assert!(!h.machine.accepts_client());
    h.decide(&approval, ApprovalState::Granted);
    assert_eq!(
        h.sent(),
        vec![text('Q', "DELETE FROM t"), text('Q', "SELECT 2")],
        "it runs, then the rest, in order"
    );
    assert_eq!(
        h.approval_links(),
        vec![(approval.id, ApprovalState::Granted)]
    );
}

/// An approval that expires or is withdrawn refuses the command with
/// 57014, as a cancelled statement; the session goes on.
#[test]
fn an_expired_approval_refuses_the_command_and_the_session_goes_on() {
    for state in [ApprovalState::Expired, ApprovalState::Cancelled] {
        let mut h = Harness::user();
        h.send(&query("UPDATE t SET a = 1"));
        let approval = h.request_approval();
        h.decide(&approval, state);
        assert_eq!(h.sent(), vec![text('Q', super::REFUSED_TEXT)]);
        h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
        assert_eq!(h.answered(), vec![m('N'), err("57014"), m('Z')]);
        h.send(&query("SELECT 1"));
        assert_eq!(h.sent(), vec![text('Q', "SELECT 1")]);
    }
}

/// A revocation while the command waits: a grant runs nothing, and
/// however the approval ends (the pump withdraws it at once) the session
/// ends.
#[test]
fn a_revocation_while_waiting_runs_nothing_and_ends_the_session() {
    for state in [ApprovalState::Granted, ApprovalState::Cancelled] {
        let mut h = Harness::user();
        h.send(&query("DELETE FROM t"));
        let approval = h.request_approval();
        assert!(!h.machine.revoked(&h.state));
        h.state.revoked.insert(Revoked::Subject("sub-alice".into()));
        assert!(h.machine.revoked(&h.state), "the pump sees it");
        h.decide(&approval, state);
        assert_eq!(h.sent(), vec![text('Q', super::REFUSED_TEXT)]);
        h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
        assert_eq!(
            h.answered(),
            vec![m('N'), err("28000"), m('Z'), err("28000")],
            "the command's refusal, then the session's end"
        );
        assert!(h.machine.ended().is_some());
    }
}

/// A bundle published while the command waited may refuse it outright:
/// the grant does not run it, the client is told to send it again.
#[test]
fn a_grant_under_policies_changed_meanwhile_runs_nothing() {
    let mut h = Harness::user();
    h.send(&query("DELETE FROM t"));
    let approval = h.request_approval();
    let forbid_all = Bundle::new(
        "stricter",
        vec![(
            "none.cedar".into(),
            "@id(\"none\") forbid (principal, action, resource);".into(),
        )],
        gatehouse_policies::SCHEMA,
    );
    h.state.engine = Some(Arc::new(Engine::new(&forbid_all).unwrap()));
    h.decide(&approval, ApprovalState::Granted);
    assert_eq!(h.sent(), vec![text('Q', super::REFUSED_TEXT)]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![m('N'), err("42501"), m('Z')]);
    assert!(h.machine.ended().is_none(), "the session goes on");
}

/// The approval cannot be recorded: the command is refused, never run.
#[test]
fn an_approval_that_cannot_be_recorded_refuses_the_command() {
    let mut h = Harness::user();
    h.send(&query("DELETE FROM t"));
    h.machine.take_approval().expect("it waits");
    h.machine
        .approval_requested(Err(RecordError::Unavailable("nats is down".into())));
    h.pump(true);
    assert_eq!(h.sent(), vec![text('Q', super::REFUSED_TEXT)]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("58000"), m('Z')]);
}

#[test]
fn a_parse_of_denied_text_is_refused_when_it_arrives() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("p", "SELECT pg_read_file('/etc/passwd')"),
        bind("", "p", &[]),
        execute(""),
        sync(),
    ]));
    assert_eq!(h.sent(), vec![text('P', super::REFUSED_TEXT), m('S')]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("42501"), m('Z')]);
    assert_eq!(h.commands().len(), 1, "the refusal is recorded");
    assert_eq!(h.commands()[0].2, Deny);
}

#[test]
fn sql_prepare_is_bound_on_completion_and_dropped_by_deallocate() {
    let mut h = Harness::user();
    h.send(&query("PREPARE p AS SELECT 1"));
    h.reply(&cat(&[command_complete("PREPARE"), ready(b'I')]));
    h.send(&query("EXECUTE p"));
    assert_eq!(h.sent().last(), Some(&text('Q', "EXECUTE p")));
    h.reply(&cat(&[
        data_row("1"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    h.send(&query("DEALLOCATE p"));
    h.reply(&cat(&[command_complete("DEALLOCATE"), ready(b'I')]));
    h.sent();
    h.send(&query("EXECUTE p"));
    assert_eq!(h.sent().last(), Some(&text('Q', super::REFUSED_TEXT)));
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered().last(), Some(&m('Z')));
    let commands = h.commands();
    assert_eq!(
        commands[1],
        (
            "EXECUTE p".into(),
            vec![("p".into(), "PREPARE p AS SELECT 1".into())],
            Allow
        )
    );
    assert_eq!(commands[3].2, Deny, "unknown name refused and recorded");
}

#[test]
fn a_failed_prepare_binds_nothing() {
    let mut h = Harness::user();
    h.send(&query("PREPARE p AS SELECT 1"));
    h.reply(&cat(&[
        error("42P05", "prepared statement \"p\" already exists"),
        ready(b'I'),
    ]));
    assert_eq!(h.machine.confirmed(), (0, 0));
}

#[test]
fn a_name_still_being_settled_is_waited_for() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("s1", "SELECT 1"),
        sync(),
        bind("", "s1", &[]),
        execute(""),
        sync(),
    ]));
    assert_eq!(
        h.sent(),
        vec![text('P', "SELECT 1"), m('S')],
        "the Bind waits for the Parse's answer"
    );
    h.reply(&cat(&[parse_complete(), ready(b'I')]));
    assert_eq!(h.sent(), vec![m('B'), m('E'), m('S')]);
}

#[test]
fn flush_after_a_denied_execute_is_answered() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("", "DELETE FROM t"),
        bind("", "", &[]),
        execute(""),
        flush(),
    ]));
    assert_eq!(
        h.sent(),
        vec![text('P', "DELETE FROM t"), m('B')],
        "what came before the Execute goes on; the Execute waits"
    );
    let approval = h.request_approval();
    assert_eq!(approval.command().unwrap().statement, "DELETE FROM t");
    assert_eq!(
        h.answered(),
        vec![m('N')],
        "the client is told where it waits"
    );
    h.decide(&approval, ApprovalState::Denied);
    assert_eq!(
        h.sent(),
        vec![text('P', super::REFUSED_TEXT), m('H'), m('H')],
        "the refusal, and the client's Flush"
    );
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        error("42601", "syntax error"),
    ]));
    assert_eq!(h.answered(), vec![m('1'), m('2'), err("42501")]);
    h.send(&sync());
    assert_eq!(h.sent(), vec![m('S')]);
    h.reply(&ready(b'I'));
    assert_eq!(h.answered(), vec![m('Z')]);
}

#[test]
fn portals_end_with_their_transaction() {
    let mut h = Harness::user();
    h.send(&cat(&[parse("s", "SELECT 1"), bind("c", "s", &[]), sync()]));
    h.reply(&cat(&[parse_complete(), bind_complete(), ready(b'I')]));
    assert_eq!(h.machine.confirmed(), (1, 0), "idle: the portal is gone");
    h.sent();
    h.send(&cat(&[execute("c"), sync()]));
    assert_eq!(h.sent(), vec![text('P', super::REFUSED_TEXT), m('S')]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered().first(), Some(&m('1')));
}

#[test]
fn copy_in_by_simple_query() {
    let mut h = Harness::user();
    h.send(&query("COPY t FROM STDIN"));
    h.reply(&copy_in_response());
    h.send(&cat(&[copy_data(b"1\n"), copy_data(b"2\n"), copy_done()]));
    assert_eq!(
        h.sent(),
        vec![text('Q', "COPY t FROM STDIN"), m('d'), m('d'), m('c')]
    );
    h.reply(&cat(&[command_complete("COPY 2"), ready(b'I')]));
    assert_eq!(h.answered(), vec![m('G'), m('C'), m('Z')]);
    assert!(h.machine.pending.is_empty());
}

/// A driver sends `Sync` right after the COPY's `Execute`; the server
/// ignores it in COPY mode, and answers the one after `CopyDone`.
#[test]
fn copy_in_by_extended_query_with_an_early_sync() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("", "COPY t FROM STDIN"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]));
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        copy_in_response(),
    ]));
    h.send(&cat(&[copy_data(b"1\n"), copy_done(), sync()]));
    h.reply(&cat(&[command_complete("COPY 1"), ready(b'I')]));
    assert_eq!(h.answered(), vec![m('1'), m('2'), m('G'), m('C'), m('Z')]);
    assert!(h.machine.pending.is_empty(), "{:?}", h.machine.pending);
}

#[test]
fn describe_is_followed() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("s", "SELECT 1"),
        describe_statement("s"),
        close_statement("s"),
        sync(),
    ]));
    h.reply(&cat(&[
        parse_complete(),
        parameter_description(),
        no_data(),
        close_complete(),
        ready(b'I'),
    ]));
    assert_eq!(h.machine.confirmed(), (0, 0));
    assert!(h.machine.pending.is_empty());
}

#[test]
fn a_failed_record_runs_nothing_and_answers_each_command() {
    let mut h = Harness::user();
    h.send_unrecorded(&cat(&[
        query("INSERT INTO t VALUES (1)"),
        parse("", "SELECT 1"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]));
    assert_eq!(
        h.sent(),
        vec![
            text('Q', super::REFUSED_TEXT),
            text('P', super::REFUSED_TEXT),
            m('S')
        ]
    );
    h.reply(&cat(&[
        error("42601", "syntax error"),
        ready(b'I'),
        error("42601", "syntax error"),
        ready(b'I'),
    ]));
    assert_eq!(
        h.answered(),
        vec![err("58000"), m('Z'), err("58000"), m('Z')]
    );
    assert!(h.machine.statements.settled() && h.machine.portals.settled());
}

#[test]
fn revocation_ends_the_session() {
    let mut h = Harness::user();
    h.state.revoked.insert(Revoked::Subject("sub-alice".into()));
    h.send(&query("SELECT 1"));
    assert!(h.sent().is_empty());
    assert_eq!(h.answered(), vec![err("28000")]);
    assert!(h.machine.ended().is_some());
}

#[test]
fn an_unforeseen_encoding_change_with_text_in_flight_ends_the_session() {
    let mut h = Harness::new(identity("dba", &["dba"]));
    h.send(&cat(&[query("SELECT f()"), query("SELECT 'x'")]));
    h.reply(&cat(&[
        command_complete("SELECT 1"),
        parameter_status("client_encoding", "LATIN1"),
    ]));
    assert_eq!(h.answered(), vec![m('C'), err("0A000")]);
    assert!(h.machine.ended().is_some());
}

#[test]
fn a_settings_change_is_a_barrier() {
    let mut h = Harness::user();
    h.send(&cat(&[
        query("SET client_encoding = 'LATIN1'"),
        query_bytes(b"SELECT '\xe9'"),
    ]));
    assert_eq!(h.sent().len(), 1, "the second text waits");
    h.reply(&cat(&[
        command_complete("SET"),
        parameter_status("client_encoding", "LATIN1"),
        ready(b'I'),
    ]));
    assert_eq!(h.sent().len(), 1);
    assert_eq!(h.commands()[1].0, "SELECT 'é'");
}

#[test]
fn an_answer_that_matches_nothing_ends_the_session() {
    let mut h = Harness::user();
    h.reply(&parse_complete());
    assert_eq!(h.answered(), vec![err("08P01")]);
    assert!(h.machine.ended().is_some());
}

#[test]
fn the_function_call_protocol_is_refused() {
    let mut h = Harness::user();
    let mut body = BytesMut::new();
    body.put_i32(1234);
    body.put_i16(0);
    body.put_i16(0);
    body.put_i16(0);
    h.send(&msg(b'F', &body));
    assert_eq!(h.sent().last(), Some(&text('Q', super::REFUSED_TEXT)));
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("0A000"), m('Z')]);
}

/// A `Query` inside an extended batch, after an `Execute` that changed the
/// settings: refused as a `Query` is (its own ReadyForQuery), and the
/// batch's `Sync` still answered.
#[test]
fn a_query_after_a_settings_change_in_the_same_batch_is_refused_as_a_query() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("", "SET client_encoding = 'LATIN1'"),
        bind("", "", &[]),
        execute(""),
        query("SELECT 1"),
        sync(),
    ]));
    assert_eq!(
        h.sent(),
        vec![
            text('P', "SET client_encoding = 'LATIN1'"),
            m('B'),
            m('E'),
            text('Q', super::REFUSED_TEXT),
            m('S')
        ]
    );
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        command_complete("SET"),
        error("42601", "syntax error"),
        ready(b'I'),
        ready(b'I'),
    ]));
    assert_eq!(
        h.answered(),
        vec![m('1'), m('2'), m('C'), err("0A000"), m('Z'), m('Z')]
    );
}

/// Text whose reading depends on the settings waits behind a command that
/// calls functions (one may change them, and the server says so only at
/// its end); text that reads the same either way does not.
#[test]
fn text_that_settings_could_change_waits_behind_function_calls() {
    let mut h = Harness::user();
    h.send(&cat(&[query("SELECT f()"), query("SELECT 'a'")]));
    assert_eq!(h.sent().len(), 2, "ASCII without backslashes goes on");
    h.reply(&cat(&[command_complete("SELECT 1"), ready(b'I')]));
    h.reply(&cat(&[command_complete("SELECT 1"), ready(b'I')]));
    h.send(&cat(&[query("SELECT f()"), query_bytes(b"SELECT 'a\\b'")]));
    assert_eq!(h.sent(), vec![text('Q', "SELECT f()")]);
    h.reply(&cat(&[
        command_complete("SELECT 1"),
        parameter_status("standard_conforming_strings", "off"),
        ready(b'I'),
    ]));
    assert_eq!(h.sent(), vec![text('Q', "SELECT 'a\\b'")]);
    // In one extended batch it cannot wait: the server reports settings
    // only at the batch's end.
    h.reply(&cat(&[command_complete("SELECT 1"), ready(b'I')]));
    h.answered();
    h.send(&cat(&[
        parse("", "SELECT f()"),
        bind("", "", &[]),
        execute(""),
        parse("", "SELECT 'é'"),
        sync(),
    ]));
    let sent = h.sent();
    assert_eq!(sent[3], text('P', super::REFUSED_TEXT), "{sent:?}");
}

/// Statements sent behind a COPY from the client before its data would be
/// taken by the server as part of the COPY: a `Query` that copies from the
/// client is a barrier, and what follows it ends the session unsent once
/// the server is in COPY mode.
#[test]
fn statements_sent_into_a_copy_end_the_session() {
    let mut h = Harness::user();
    h.send(&cat(&[
        query("COPY t FROM STDIN"),
        query("PREPARE s1 AS SELECT 1"),
    ]));
    assert_eq!(h.sent(), vec![text('Q', "COPY t FROM STDIN")]);
    h.reply(&copy_in_response());
    h.send(&[]);
    assert_eq!(h.answered(), vec![m('G'), err("08P01")]);
    assert_eq!(h.sent(), vec![], "PREPARE never sent");
    assert!(h.machine.ended().is_some());
}

#[test]
fn copy_out_streams_through() {
    let mut h = Harness::user();
    h.send(&query("COPY t TO STDOUT"));
    let copy_out = msg(b'H', &[0, 0, 0]);
    h.reply(&cat(&[
        copy_out,
        copy_data(b"1\n"),
        copy_data(b"2\n"),
        copy_done(),
        command_complete("COPY 2"),
        ready(b'I'),
    ]));
    assert_eq!(
        h.answered(),
        vec![m('H'), m('d'), m('d'), m('c'), m('C'), m('Z')]
    );
    assert!(h.machine.pending.is_empty());
}

/// A cancel request reaches the target on its own connection; what the
/// session sees is the statement's error, in its place, and the session
/// goes on in step.
#[test]
fn a_cancelled_statement_fails_in_its_place() {
    let mut h = Harness::user();
    h.send(&cat(&[
        parse("", "SELECT pg_sleep(10)"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]));
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        error("57014", "canceling statement due to user request"),
        ready(b'I'),
    ]));
    assert_eq!(h.answered(), vec![m('1'), m('2'), err("57014"), m('Z')]);
    assert!(h.machine.pending.is_empty());
    assert!(h.machine.statements.settled() && h.machine.portals.settled());
    h.send(&query("SELECT 1"));
    assert_eq!(h.sent().last(), Some(&text('Q', "SELECT 1")));
}

#[test]
fn prepared_statements_and_portals_are_held_within_a_limit() {
    let mut h = Harness::user();
    h.machine.limits.max_held = 4096;
    let big = "x".repeat(1000);
    h.send(&query("BEGIN"));
    h.reply(&cat(&[command_complete("BEGIN"), ready(b'T')]));
    h.send(&cat(&[parse("s1", "SELECT $1::text"), sync()]));
    h.reply(&cat(&[parse_complete(), ready(b'T')]));
    h.sent();
    h.answered();
    // Named portals live until the transaction ends, each holding its
    // parameter: the fourth would pass the limit.
    h.send(&cat(&[
        bind("p1", "s1", &[&big]),
        bind("p2", "s1", &[&big]),
        bind("p3", "s1", &[&big]),
        bind("p4", "s1", &[&big]),
        sync(),
    ]));
    let sent = h.sent();
    assert_eq!(&sent[..3], &[m('B'), m('B'), m('B')], "{sent:?}");
    assert_eq!(sent[3], text('P', super::REFUSED_TEXT), "{sent:?}");
    h.reply(&cat(&[
        bind_complete(),
        bind_complete(),
        bind_complete(),
        error("42601", "syntax error"),
        ready(b'E'),
    ]));
    let answered = h.answered();
    assert!(answered.contains(&err("54000")), "{answered:?}");
    assert_eq!(h.machine.confirmed(), (1, 3));
    // The transaction's end frees the portals: binding works again.
    h.send(&query("ROLLBACK"));
    h.reply(&cat(&[command_complete("ROLLBACK"), ready(b'I')]));
    h.sent();
    h.send(&cat(&[bind("p4", "s1", &[&big]), sync()]));
    assert_eq!(h.sent(), vec![m('B'), m('S')]);
    // A SQL PREPARE past the limit is refused too, and not recorded.
    let recorded = h.commands().len();
    h.send(&query(&format!(
        "PREPARE big AS SELECT '{}'",
        "y".repeat(4000)
    )));
    assert_eq!(h.sent(), vec![text('Q', super::REFUSED_TEXT)]);
    assert_eq!(h.commands().len(), recorded);
    assert_eq!(counted(&h.machine.ctx.counters.prepared_bytes_exceeded), 2);
}

fn counted(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn statements_longer_than_the_worker_reads_are_refused_unparsed() {
    let mut h = Harness::user();
    h.machine.limits.max_statement = 100;
    let long = format!("SELECT '{}'", "x".repeat(200));
    h.send(&query(&long));
    assert_eq!(h.sent().last(), Some(&text('Q', super::REFUSED_TEXT)));
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("54000"), m('Z')]);
    h.send(&cat(&[parse("s1", &long), sync()]));
    assert_eq!(h.sent(), vec![text('P', super::REFUSED_TEXT), m('S')]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("54000"), m('Z')]);
    assert!(h.commands().is_empty(), "nothing ran, nothing recorded");
    assert_eq!(counted(&h.machine.ctx.counters.statement_too_long), 2);
    h.send(&query("SELECT 1"));
    assert_eq!(h.sent(), vec![text('Q', "SELECT 1")]);
}

#[test]
fn a_message_larger_than_accepted_ends_the_session_on_its_header() {
    let mut h = Harness::user();
    h.machine.limits.max_message = 1024;
    // A Query header claiming 10 MB, without its body.
    let mut header = vec![b'Q'];
    header.extend_from_slice(&(10_000_000i32).to_be_bytes());
    h.send(&header);
    assert!(h.sent().is_empty());
    assert_eq!(h.answered(), vec![err("54000")]);
    assert!(h.machine.ended().is_some());
    assert!(
        h.client.capacity() < 1 << 20,
        "the body was never allocated"
    );
}

#[test]
fn parameters_about_the_workers_own_login_are_shown_as_the_clients() {
    let mut h = Harness::user();
    h.send(&query("SELECT 1"));
    h.reply(&cat(&[
        parameter_status("session_authorization", "gatehouse_svc"),
        parameter_status("is_superuser", "on"),
        parameter_status("TimeZone", "UTC"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    let mut shown = BytesMut::from(&h.machine.to_client.split()[..]);
    let mut seen = Vec::new();
    while let Ok(Some(f)) = gatehouse_pgwire::decode_frame(&mut shown, 1 << 20) {
        if f.tag == b'S' {
            seen.push((cstr_at(&f.raw[5..], 0), {
                let body = &f.raw[5..];
                let at = body.iter().position(|b| *b == 0).unwrap() + 1;
                cstr_at(body, at)
            }));
        }
    }
    assert_eq!(
        seen,
        [
            ("session_authorization".to_string(), "alice".to_string()),
            ("is_superuser".into(), "off".into()),
            ("TimeZone".into(), "UTC".into()),
        ]
    );
}

#[test]
fn revoking_anyone_in_the_chain_ends_the_session_at_any_message() {
    // An agent acting for alice: revoking the agent ends it at a Parse.
    let mut bot = identity("alice", &[]);
    bot.delegation = vec![gatehouse_events::Actor {
        subject: "agent-7".into(),
        issuer: None,
    }];
    let mut h = Harness::new(bot);
    h.state.revoked.insert(Revoked::Subject("agent-7".into()));
    h.send(&cat(&[parse("s1", "SELECT 1"), sync()]));
    assert!(h.sent().is_empty());
    assert_eq!(h.answered(), vec![err("28000")]);
    assert!(h.machine.ended().is_some());

    // In a COPY, the next COPY data ends it.
    let mut h = Harness::user();
    h.send(&query("COPY t FROM STDIN"));
    h.reply(&copy_in_response());
    h.sent();
    h.state.revoked.insert(Revoked::Subject("sub-alice".into()));
    h.send(&copy_data(b"1\n"));
    assert!(h.sent().is_empty(), "no COPY data after the revocation");
    let answered = h.answered();
    assert!(answered.contains(&err("28000")), "{answered:?}");
    assert!(h.machine.ended().is_some());
}

/// The values of the `DataRow`s in client output.
fn row_values(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= bytes.len() {
        let len = i32::from_be_bytes(bytes[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if bytes[pos] == b'D' {
            let body = &bytes[pos + 5..pos + 1 + len];
            let n = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
            out.push(String::from_utf8_lossy(&body[6..6 + n]).into_owned());
        }
        pos += 1 + len;
    }
    out
}

fn responses(events: &[Event]) -> Vec<&gatehouse_events::ResponseRecorded> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::ResponseRecorded(r) => Some(r),
            _ => None,
        })
        .collect()
}

#[test]
fn an_execute_is_described_first_and_its_rows_masked() {
    let mut h = Harness::masked();
    h.send(&cat(&[
        parse("", "SELECT email FROM users"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]));
    assert_eq!(
        h.sent(),
        vec![
            text('P', "SELECT email FROM users"),
            m('B'),
            m('D'),
            m('E'),
            m('S')
        ],
        "the portal is described just before it runs"
    );
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        row_description(&["email"]),
        data_row("write to a@example.com"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    let out = h.machine.to_client.split();
    assert_eq!(
        frames(&out, false),
        vec![m('1'), m('2'), m('D'), m('C'), m('Z')],
        "the worker's own description is not forwarded"
    );
    assert_eq!(row_values(&out), ["write to [masked:email]"]);
    assert!(h.machine.pending.is_empty());
}

#[test]
fn responses_are_recorded_with_the_next_command_or_alone_and_never_dropped() {
    let mut h = Harness::masked();
    h.send(&query("SELECT email FROM users"));
    let first = h.recorded[0].seq;
    h.reply(&cat(&[
        row_description(&["email"]),
        data_row("a@example.com"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(row_values(&h.machine.to_client.split()), ["[masked:email]"]);
    assert!(responses(&h.recorded).is_empty());
    assert!(h.machine.responses_waiting() && !h.machine.responses_due());

    // A quiet session's are recorded alone; that fails: they are kept.
    let alone = h.machine.flush_responses().expect("a response to record");
    assert!(
        h.machine.flush_responses().is_none(),
        "one recording at a time"
    );
    let [r] = responses(&alone)[..] else {
        panic!("one response")
    };
    assert_eq!(r.command_seq, first);
    assert!(r.last);
    assert_eq!(
        r.rows,
        vec![vec![Some(gatehouse_events::Cell::Text(
            "[masked:email]".into()
        ))]]
    );
    let summary = r.summary.as_ref().unwrap();
    assert_eq!(summary.tags, ["SELECT 1"]);
    assert_eq!(summary.masked.detectors.get("email"), Some(&1));
    h.machine
        .responses_recorded(Err(RecordError::Unavailable("nats is down".into())));
    assert!(!h.machine.responses_waiting(), "not alone again");

    // The next command carries them; its recording fails too: both kept.
    h.send_unrecorded(&query("SELECT 2"));
    assert_eq!(h.sent().last(), Some(&text('Q', super::REFUSED_TEXT)));
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("58000"), m('Z')]);

    // The one after that carries them, before its own event.
    h.send(&query("SELECT 3"));
    let kinds: Vec<_> = h.recorded.iter().map(|e| e.event_type()).collect();
    assert_eq!(
        kinds[1..],
        [
            gatehouse_events::EventType::ResponseRecorded,
            gatehouse_events::EventType::CommandReceived
        ]
    );
    assert_eq!(responses(&h.recorded)[0].command_seq, first);

    // Recorded once: they may go alone again.
    h.reply(&cat(&[command_complete("SELECT 1"), ready(b'I')]));
    assert!(h.machine.responses_waiting());
    h.send(&query("SELECT 4"));
    assert_eq!(
        responses(&h.recorded).len(),
        2,
        "the third's went with the fourth"
    );
    assert!(h.machine.remaining_responses().is_empty());
}

#[test]
fn rows_of_a_command_that_reads_settings_are_not_recorded() {
    let mut h = Harness::masked();
    h.send(&query("SELECT current_setting('app.token')"));
    h.reply(&cat(&[
        row_description(&["current_setting"]),
        data_row("s3cr3t-value"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    let events = h.machine.flush_responses().unwrap();
    let [r] = responses(&events)[..] else {
        panic!("one response")
    };
    assert!(r.rows.is_empty());
    let s = r.summary.as_ref().unwrap();
    assert_eq!((s.rows, s.truncated), (1, true));
}

/// Values computed from a rule column are masked, statement by statement
/// of a `Query`, in an `Execute`, and in a SQL `EXECUTE` of a statement
/// prepared before.
#[test]
fn computed_values_follow_the_statement_they_come_from() {
    let mut h = Harness::masked_with(&["users.nickname"]);
    h.send(&query(
        "SELECT upper(title) FROM books; SELECT upper(nickname) FROM users",
    ));
    h.reply(&cat(&[
        row_description(&["upper"]),
        data_row("WAR AND PEACE"),
        command_complete("SELECT 1"),
        row_description(&["upper"]),
        data_row("BUNNY"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(
        row_values(&h.machine.to_client.split()),
        ["WAR AND PEACE", "[masked]"]
    );

    h.send(&cat(&[
        parse("", "SELECT nickname || '!' FROM users"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ]));
    h.reply(&cat(&[
        parse_complete(),
        bind_complete(),
        row_description(&["?column?"]),
        data_row("bunny!"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(row_values(&h.machine.to_client.split()), ["[masked]"]);

    h.send(&query("PREPARE p AS SELECT lower(nickname) FROM users"));
    h.reply(&cat(&[command_complete("PREPARE"), ready(b'I')]));
    h.machine.to_client.clear();
    h.send(&query("EXECUTE p"));
    h.reply(&cat(&[
        row_description(&["lower"]),
        data_row("bunny"),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]));
    assert_eq!(row_values(&h.machine.to_client.split()), ["[masked]"]);
}

/// A copy of a masked column would not be masked: storing one, or running
/// code from text that could, is refused to those without `unmask`; what
/// stores nothing masked goes on.
#[test]
fn storing_values_of_a_masked_column_is_refused() {
    // A dba, whom the policies let run code from text.
    let mut h = Harness::masked_as(identity("dora", &["dba"]), &["users.nickname"]);
    for sql in [
        "CREATE TEMP TABLE t AS SELECT upper(nickname) AS n FROM users",
        "SELECT pg_notify('c', nickname) FROM users",
        "ALTER TABLE users RENAME COLUMN nickname TO nick",
        "INSERT INTO notes (body) SELECT nickname FROM users",
        "UPDATE notes SET body = u.nickname FROM users u WHERE u.id = notes.id",
        "CREATE VIEW v AS SELECT nickname AS n FROM users",
        "DO $$ BEGIN INSERT INTO notes SELECT nickname FROM users; END $$",
    ] {
        h.send(&query(sql));
        assert_eq!(
            h.sent().last(),
            Some(&text('Q', super::REFUSED_TEXT)),
            "{sql}"
        );
        h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
        let out = h.machine.to_client.split();
        assert_eq!(frames(&out, false), vec![err("42501"), m('Z')], "{sql}");
        let said = String::from_utf8_lossy(&out);
        assert!(
            said.contains("masked column users.nickname") || said.contains("masks columns"),
            "{sql}: {said}"
        );
    }
    h.send(&query("INSERT INTO notes (body) SELECT title FROM books"));
    assert_eq!(
        h.sent().last(),
        Some(&text(
            'Q',
            "INSERT INTO notes (body) SELECT title FROM books"
        ))
    );
}

// ---- access granted for a while ----

/// Alice's request for `scope` access to the test target, granted at
/// `granted_at` (Unix seconds) for ten minutes.
fn granted_access(scope: &str, granted_at: i64) -> Approval {
    use gatehouse_events::approval::{AccessRequest, ApprovalTarget, Approver, Change, Requested};
    let at = chrono::DateTime::from_timestamp(granted_at, 0).unwrap();
    let pending = Approval {
        schema_version: 1,
        id: uuid::Uuid::new_v4(),
        state: ApprovalState::Pending,
        requested_at: at,
        expires_at: at + chrono::Duration::hours(1),
        requester: identity("alice", &[]),
        target: ApprovalTarget {
            name: "test".into(),
            kind: "postgres".into(),
            environment: "dev".into(),
            tags: Vec::new(),
        },
        request: Requested::Access {
            access: AccessRequest::new(Some(scope), 600, "migration").unwrap(),
        },
        approvers_required: 1,
        grants: Vec::new(),
        denial: None,
        ended_at: None,
        cancel_reason: None,
        revocation: None,
        replaces: None,
    };
    let by = Approver {
        subject: "sub-bob".into(),
        username: "bob".into(),
        actors: Vec::new(),
    };
    pending
        .apply(&Change::Grant { by, comment: None }, at)
        .unwrap()
}

/// Connecting needs `access`, DDL needs `ddl`: both scopes reach the
/// policies while in force; the decision names the grants; when one ends
/// the next command is decided without it; when the one the session
/// needed to exist ends, the session ends at its next message.
#[test]
fn access_granted_for_a_while_is_decided_with_until_it_ends() {
    let bundle = Bundle::new(
        "grants",
        vec![(
            "grants.cedar".into(),
            r#"@id("all") permit (principal, action, resource);
               @id("connect-needs-access")
               forbid (principal, action == Gatehouse::Action::"connect", resource)
               unless { context.grants.contains("access") };
               @id("ddl-needs-grant")
               forbid (principal, action == Gatehouse::Action::"query", resource)
               when { context.kind == "ddl" } unless { context.grants.contains("ddl") };"#
                .into(),
        )],
        gatehouse_policies::SCHEMA,
    );
    let access = granted_access("access", 1_000);
    let ddl = granted_access("ddl", 900);
    let mut grants = crate::policy::AccessGrants::default();
    let at = chrono::DateTime::from_timestamp(1_250, 0).unwrap();
    grants.apply(&access, true, at);
    grants.apply(&ddl, true, at);
    // Another identity's, another target's, and one the control plane did
    // not write, grant nothing here.
    let mut other = granted_access("ddl", 1_200);
    other.requester = identity("mallory", &[]);
    grants.apply(&other, true, at);
    let mut elsewhere = granted_access("ddl", 1_200);
    elsewhere.target.name = "other".into();
    grants.apply(&elsewhere, true, at);
    grants.apply(&granted_access("write", 1_200), false, at);
    let state = PolicyState {
        engine: Some(Arc::new(Engine::new(&bundle).unwrap())),
        access: Arc::new(grants.clone()),
        ..Default::default()
    };
    let mut h = Harness::build(identity("alice", &[]), None, state, 1_250);

    h.send(&query("CREATE TABLE t (a int)"));
    assert_eq!(
        h.sent(),
        vec![text('Q', "CREATE TABLE t (a int)")],
        "DDL runs under the ddl grant"
    );
    let Payload::CommandReceived(c) = &h.recorded.last().unwrap().payload else {
        panic!("a command is recorded");
    };
    let mut both = vec![access.id, ddl.id];
    both.sort();
    assert_eq!(c.decision.as_ref().unwrap().grants, both);
    h.reply(&cat(&[command_complete("CREATE TABLE"), ready(b'I')]));
    h.answered();

    // The ddl grant's ten minutes are over; the access grant's are not.
    h.now = 900 + 600;
    h.send(&query("CREATE TABLE u (a int)"));
    assert_eq!(h.sent(), vec![text('Q', super::REFUSED_TEXT)]);
    h.reply(&cat(&[error("42601", "syntax error"), ready(b'I')]));
    assert_eq!(h.answered(), vec![err("42501"), m('Z')]);
    assert_eq!(h.commands().last().unwrap().2, Deny);
    assert!(h.machine.ended().is_none(), "the session goes on");

    // The access grant is revoked: the session ends at its next message.
    let revoked = access
        .apply(
            &gatehouse_events::approval::Change::Revoke {
                by: gatehouse_events::approval::Approver {
                    subject: "sub-bob".into(),
                    username: "bob".into(),
                    actors: Vec::new(),
                },
                reason: None,
            },
            chrono::DateTime::from_timestamp(h.now, 0).unwrap(),
        )
        .unwrap();
    grants.apply(
        &revoked,
        true,
        chrono::DateTime::from_timestamp(h.now, 0).unwrap(),
    );
    h.state.access = Arc::new(grants);
    h.send(&query("SELECT 1"));
    assert!(h.sent().is_empty(), "nothing reaches the target");
    assert_eq!(h.answered(), vec![err("42501")]);
    assert_eq!(
        h.machine.ended(),
        Some(gatehouse_events::CloseReason::AccessEnded)
    );
}
