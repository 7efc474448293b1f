//! `gatehouse approvals list|show|grant|deny`: the approver's tools, over
//! the control plane's API (as `gatehouse policy push` is). Requests for
//! access (`gatehouse access`) are approvals too, listed and decided here.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use gatehouse_events::approval::{Approval, ApprovalState, Requested, Verdict};
use gatehouse_events::{CommandReceived, ParamFormat, ValueEncoding};
use serde::Deserialize;
use uuid::Uuid;

use crate::policy::{api_token, call_raw};

/// How much of a statement a line of `list` shows.
const STATEMENT_WIDTH: usize = 60;

#[derive(clap::Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// List approvals in one state (by default, those waiting).
    List {
        #[arg(long, value_enum, default_value_t = State::Pending)]
        state: State,
        /// Print the control plane's JSON as it came.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Print one approval in full: the command as it will run, the decision
    /// that asked for the approval, and who decided what.
    Show {
        id: Uuid,
        /// Print the control plane's JSON as it came.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Grant an approval; the command runs once enough approvers granted.
    Grant {
        id: Uuid,
        /// Kept with the grant.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Deny an approval: the command does not run.
    Deny {
        id: Uuid,
        /// Why (required), kept with the denial and shown to the requester.
        #[arg(long)]
        comment: String,
        #[command(flatten)]
        api: Api,
    },
}

/// The state `list` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Granted,
    Denied,
    Expired,
    Cancelled,
    Revoked,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Granted => "granted",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
            State::Revoked => "revoked",
        }
    }
}

/// Where the control plane is and the token to call it with.
#[derive(clap::Args, Debug)]
pub struct Api {
    /// The control plane's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) api: String,
    /// A file holding a token whose groups may approve (e.g. `approvers`).
    /// Without it, the token is read from the environment variable
    /// GATEHOUSE_TOKEN. (Never from the command line, where `ps` shows it.)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl Api {
    fn token(&self) -> anyhow::Result<String> {
        self.token_of("may read and decide approvals, e.g. `approvers`")
    }

    /// The token, or an error saying where to put one whose groups `may`.
    pub(crate) fn token_of(&self, may: &str) -> anyhow::Result<String> {
        api_token(
            self.token_file.as_deref(),
            std::env::var("GATEHOUSE_TOKEN").ok(),
            may,
        )
    }
}

#[derive(Deserialize)]
struct List {
    approvals: Vec<Approval>,
}

pub async fn run(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    match cmd {
        ApprovalsCommand::List { state, json, api } => {
            let token = api.token()?;
            let path = format!("/api/v1/approvals?state={}", state.as_str());
            let (_, text) = call_raw(&api.api, &token, "GET", &path, None).await?;
            if json {
                println!("{}", text.trim_end());
                return Ok(());
            }
            let list: List = parse(&text)?;
            if list.approvals.is_empty() {
                println!("no {} approvals", state.as_str());
            } else {
                print!("{}", table(&list.approvals));
            }
            Ok(())
        }
        ApprovalsCommand::Show { id, json, api } => {
            let token = api.token()?;
            let path = format!("/api/v1/approvals/{id}");
            let (_, text) = call_raw(&api.api, &token, "GET", &path, None).await?;
            if json {
                println!("{}", text.trim_end());
                return Ok(());
            }
            let approval: Approval = parse(&text)?;
            print!("{}", details(&approval));
            Ok(())
        }
        ApprovalsCommand::Grant { id, comment, api } => {
            let token = api.token()?;
            let body = match comment {
                Some(c) => serde_json::json!({ "comment": c }),
                None => serde_json::json!({}),
            };
            let path = format!("/api/v1/approvals/{id}/grant");
            let (_, text) = call_raw(&api.api, &token, "POST", &path, Some(body)).await?;
            let approval: Approval = parse(&text)?;
            println!("approval {id}: {}", state_line(&approval));
            Ok(())
        }
        ApprovalsCommand::Deny { id, comment, api } => {
            let token = api.token()?;
            let body = serde_json::json!({ "comment": comment });
            let path = format!("/api/v1/approvals/{id}/deny");
            let (_, text) = call_raw(&api.api, &token, "POST", &path, Some(body)).await?;
            let approval: Approval = parse(&text)?;
            println!("approval {id}: {}", state_line(&approval));
            Ok(())
        }
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    serde_json::from_str(text).context("the control plane's reply is not an approval as expected")
}

/// A time as RFC 3339, to the second, in UTC (a macro: the crate does not
/// name chrono's types).
macro_rules! time {
    ($t:expr) => {
        $t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    };
}

/// `granted`, `pending: 1 of 2 approvals`, or for access `granted: in
/// force until …`.
pub(crate) fn state_line(a: &Approval) -> String {
    match a.state {
        ApprovalState::Pending => format!(
            "pending: {} of {} approvals",
            a.grants.len(),
            a.approvers_required.max(1)
        ),
        ApprovalState::Granted => match a.access_until() {
            Some(until) if until > chrono::Utc::now() => {
                format!("granted: in force until {}", time!(until))
            }
            Some(until) => format!("granted: ended at {}", time!(until)),
            None => "granted".to_owned(),
        },
        s => s.as_str().to_owned(),
    }
}

/// The requester, with every actor of the delegation chain.
fn requester(a: &Approval) -> String {
    let mut s = a.requester.username.clone();
    for actor in &a.requester.delegation {
        let _ = write!(s, " via {}", actor.subject);
    }
    s
}

/// A statement on one line (newlines and the indentation after them shown
/// as one space), cut to `width` characters.
fn one_line(statement: &str, width: usize) -> String {
    let flat = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= width {
        return flat;
    }
    let mut cut: String = flat.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

/// What an approval asks for, on one line: the statement, or `ddl access
/// for 30 min: reason`.
fn asked(a: &Approval) -> String {
    match (a.command(), a.access()) {
        (Some(c), _) => one_line(&c.statement, STATEMENT_WIDTH),
        (None, Some(x)) => one_line(
            &format!(
                "{} access for {}: {}",
                x.scope,
                minutes(x.for_secs),
                x.reason
            ),
            STATEMENT_WIDTH,
        ),
        (None, None) => String::new(),
    }
}

/// `30 min`, `90 s`, `2 h`.
fn minutes(secs: u32) -> String {
    match secs {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// One line per approval, in aligned columns under a header.
pub(crate) fn table(approvals: &[Approval]) -> String {
    let header = [
        "ID",
        "STATE",
        "REQUESTED",
        "EXPIRES",
        "REQUESTER",
        "TARGET",
        "GRANTS",
        "REQUEST",
    ];
    let rows: Vec<[String; 8]> = approvals
        .iter()
        .map(|a| {
            [
                a.id.to_string(),
                a.state.as_str().to_owned(),
                time!(a.requested_at),
                time!(a.expires_at),
                requester(a),
                a.target.name.clone(),
                format!("{}/{}", a.grants.len(), a.approvers_required.max(1)),
                asked(a),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let pad = w - cell.chars().count();
                let _ = write!(l, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// `dave (subject …) at … : "comment"`.
fn verdict(v: &Verdict) -> String {
    let mut s = format!("{} at {}", v.username, time!(v.at));
    if v.subject != v.username {
        let _ = write!(s, " (subject {})", v.subject);
    }
    if let Some(c) = &v.comment {
        let _ = write!(s, ": {c}");
    }
    s
}

/// Every line of `text`, indented.
fn indented(out: &mut String, text: &str) {
    for l in text.lines() {
        let _ = writeln!(out, "    {l}");
    }
}

/// Every field of an approval, one to a line (multi-line texts indented
/// below their label).
pub(crate) fn details(a: &Approval) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(o, "approval:     {}", a.id);
    let _ = writeln!(o, "state:        {}", state_line(a));
    let _ = writeln!(o, "requested at: {}", time!(a.requested_at));
    let _ = writeln!(o, "expires at:   {}", time!(a.expires_at));
    if let Some(t) = &a.ended_at {
        let _ = writeln!(o, "ended at:     {}", time!(t));
    }
    let r = &a.requester;
    let _ = writeln!(o, "requester:    {}", requester(a));
    let _ = writeln!(o, "  subject:    {}", r.subject);
    let _ = writeln!(o, "  issuer:     {}", r.issuer);
    let _ = writeln!(o, "  groups:     {}", list_or_none(&r.groups));
    for actor in &r.delegation {
        let _ = write!(o, "  via actor:  {}", actor.subject);
        if let Some(iss) = &actor.issuer {
            let _ = write!(o, " (issuer {iss})");
        }
        o.push('\n');
    }
    if let Requested::Command {
        session_id,
        worker_id,
        ..
    } = &a.request
    {
        let _ = writeln!(o, "session:      {session_id}");
        let _ = writeln!(o, "worker:       {worker_id}");
    }
    match (a.command(), a.access()) {
        (Some(c), _) => command_details(o, c),
        (None, Some(x)) => {
            let _ = writeln!(o, "access:       {} for {}", x.scope, minutes(x.for_secs));
            let _ = writeln!(o, "reason:       {}", x.reason);
            if let Some(until) = a.access_until() {
                let _ = writeln!(o, "until:        {}", time!(until));
            }
        }
        (None, None) => {}
    }
    let _ = writeln!(
        o,
        "grants:       {} of {} required",
        a.grants.len(),
        a.approvers_required.max(1)
    );
    for g in &a.grants {
        let _ = writeln!(o, "    {}", verdict(g));
    }
    if let Some(d) = &a.denial {
        let _ = writeln!(o, "denied by:    {}", verdict(d));
    }
    if let Some(reason) = &a.cancel_reason {
        let _ = writeln!(o, "cancelled:    {reason}");
    }
    if let Some(r) = &a.revocation {
        let _ = writeln!(o, "revoked by:   {}", verdict(r));
    }
    out
}

/// The command an approval holds: how it came, its text and values, what
/// it executes, and the decision that asked for the approval.
fn command_details(o: &mut String, c: &CommandReceived) {
    let protocol = serde_json::to_value(c.protocol).unwrap_or_default();
    let _ = writeln!(o, "protocol:     {}", protocol.as_str().unwrap_or("?"));
    match c.statement_name.as_deref() {
        Some("") => {
            let _ = writeln!(o, "prepared as:  (the unnamed statement)");
        }
        Some(name) => {
            let _ = writeln!(o, "prepared as:  {name:?}");
        }
        None => {}
    }
    if let Some(portal) = &c.portal {
        let _ = writeln!(o, "portal:       {portal:?}");
    }
    let _ = writeln!(o, "statement:");
    indented(o, &c.statement);
    if !c.params.is_empty() {
        let _ = writeln!(o, "params:");
        for (i, p) in c.params.iter().enumerate() {
            let value = match (&p.value, p.format, p.encoding) {
                (None, _, _) => "NULL".to_owned(),
                (Some(v), ParamFormat::Binary, _) => format!("{v} (binary, base64)"),
                (Some(v), _, Some(ValueEncoding::Base64)) => format!("{v} (bytes, base64)"),
                (Some(v), _, None) => v.clone(),
            };
            let _ = writeln!(o, "    ${}: {value}", i + 1);
        }
    }
    for e in &c.executes {
        let _ = writeln!(o, "executes {}:", e.name);
        indented(o, &e.text);
    }
    if !c.redactions.is_empty() {
        let kinds: Vec<String> = c
            .redactions
            .iter()
            .map(|r| match r.param {
                Some(n) => format!("{} (${n})", r.kind),
                None => r.kind.clone(),
            })
            .collect();
        let _ = writeln!(o, "withheld:     {}", kinds.join(", "));
    }
    if let Some(d) = &c.decision {
        let effect = serde_json::to_value(d.effect).unwrap_or_default();
        let _ = writeln!(
            o,
            "decision:     {} by {} (bundle {})",
            effect.as_str().unwrap_or("?"),
            list_or_none(&d.policies),
            d.bundle_version
        );
        if let Some(reason) = &d.reason {
            let _ = writeln!(o, "reason:       {reason}");
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval() -> Approval {
        serde_json::from_value(serde_json::json!({
            "schema_version": 1,
            "id": "6f1c2d7e-0000-4000-8000-000000000001",
            "state": "pending",
            "requested_at": "2025-03-01T10:00:00.123456Z",
            "expires_at": "2025-03-01T10:15:00Z",
            "requester": {
                "issuer": "https://idp", "subject": "u-1", "username": "alice",
                "groups": ["dev"], "delegation": [{"subject": "agent-x"}]
            },
            "session_id": "6f1c2d7e-0000-4000-8000-000000000002",
            "worker_id": "w1",
            "target": {"name": "app", "kind": "postgres", "environment": "prod", "tags": []},
            "command": {
                "protocol": "extended",
                "statement": "UPDATE accounts\n   SET balance = balance + $1\n WHERE owner IS NOT NULL AND region = $2",
                "statement_name": "",
                "params": [
                    {"format": "text", "value": "10"},
                    {"format": "text", "value": null}
                ],
                "executes": [{"name": "p1", "text": "DELETE FROM t"}],
                "decision": {
                    "effect": "approval_required", "enforced": true,
                    "policies": ["unbounded-write-needs-approval"],
                    "reason": "needs one approver", "kinds": ["update"],
                    "bundle_version": "3", "bundle_hash": "h", "eval_micros": 1
                }
            },
            "approvers_required": 2,
            "grants": [{"subject": "u-2", "username": "dave", "at": "2025-03-01T10:01:00Z", "comment": "ok"}]
        }))
        .unwrap()
    }

    #[test]
    fn a_list_line_has_every_column_and_a_cut_statement() {
        let out = table(&[approval()]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].starts_with("ID "), "{out}");
        let line = lines[1];
        for expected in [
            "6f1c2d7e-0000-4000-8000-000000000001",
            "pending",
            "2025-03-01T10:00:00Z",
            "2025-03-01T10:15:00Z",
            "alice via agent-x",
            "app",
            "1/2",
            "UPDATE accounts SET balance = balance + $1 WHERE owner IS N…",
        ] {
            assert!(line.contains(expected), "{expected:?} in {line:?}");
        }
        assert_eq!(
            one_line(&approval().command().unwrap().statement, 60)
                .chars()
                .count(),
            60
        );
        assert_eq!(one_line(" SELECT\n 1 ", 60), "SELECT 1");
        // Columns line up.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&line[col..col + 7], "pending");
    }

    #[test]
    fn access_reads_as_what_it_asks_for_and_until_when() {
        let mut json = serde_json::to_value(approval()).unwrap();
        let o = json.as_object_mut().unwrap();
        for k in ["session_id", "worker_id", "command"] {
            o.remove(k);
        }
        o.insert(
            "access".into(),
            serde_json::json!({"scope": "ddl", "for_secs": 1800, "reason": "migration 42"}),
        );
        o.insert("state".into(), "granted".into());
        o.insert("ended_at".into(), "2025-03-01T10:02:00Z".into());
        let a: Approval = serde_json::from_value(json).unwrap();
        let line = table(std::slice::from_ref(&a));
        assert!(
            line.contains("ddl access for 30 min: migration 42"),
            "{line}"
        );
        let out = details(&a);
        for expected in [
            "access:       ddl for 30 min\n",
            "reason:       migration 42\n",
            "until:        2025-03-01T10:32:00Z\n",
            "state:        granted: ended at 2025-03-01T10:32:00Z\n",
        ] {
            assert!(out.contains(expected), "{expected:?} in\n{out}");
        }
        assert!(!out.contains("session:"), "{out}");
    }

    #[test]
    fn show_prints_the_whole_command_and_its_decision() {
        let out = details(&approval());
        for expected in [
            "state:        pending: 1 of 2 approvals",
            "requester:    alice via agent-x",
            "    UPDATE accounts\n       SET balance = balance + $1\n     WHERE owner IS NOT NULL AND region = $2\n",
            "    $1: 10\n    $2: NULL\n",
            "executes p1:\n    DELETE FROM t\n",
            "decision:     approval_required by unbounded-write-needs-approval (bundle 3)",
            "prepared as:  (the unnamed statement)",
            "reason:       needs one approver",
            "grants:       1 of 2 required\n    dave at 2025-03-01T10:01:00Z (subject u-2): ok\n",
        ] {
            assert!(out.contains(expected), "{expected:?} in:\n{out}");
        }
        assert_eq!(state_line(&approval()), "pending: 1 of 2 approvals");
    }
}
