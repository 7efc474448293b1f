//! Approvals: of single commands, and of time-boxed access to a target.
//! The record that the worker holding a command (or every worker, for
//! access), the control plane and every approver share, and its state
//! machine.
//!
//! An approval is one record per change, each holding the whole approval as
//! it stands after the change ([`Approval`]), on its own subject of the
//! approvals stream. Every change is written on condition that the subject
//! still ends with the record it was computed from (optimistic concurrency),
//! so of two writers racing — a grant and a deny, two control-plane
//! replicas — one wins and the other reads the winner and is refused by
//! [`Approval::apply`]. The transitions are pure and take the clock as an
//! argument:
//!
//! ```text
//!   pending ──grant (N distinct approvers)──► granted
//!      │ ──deny (with a comment)───────────► denied
//!      │ ──expire (at expires_at)──────────► expired
//!      └ ──cancel (client, worker)─────────► cancelled
//!
//!   granted (access only, before its end) ──revoke──► revoked
//! ```
//!
//! Exactly one outcome: a decided approval takes no change, except that
//! access granted for a while can be revoked before its time is up.
//!
//! **Access** ([`Requested::Access`]): a person (or agent) asks for access
//! to a target for a while (`for_secs`), with a reason. Once granted, the
//! requester's sessions on that target see the grant's `scope` in the
//! policy context (`context.grants`) until `granted at + for_secs`, or
//! until it is revoked.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{CommandReceived, Identity};

/// The schema version of approval records written by this build.
pub const APPROVAL_SCHEMA_VERSION: u32 = 1;

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Pending,
    Granted,
    Denied,
    Expired,
    Cancelled,
    /// Access that was granted, ended by someone before its time was up.
    Revoked,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Granted => "granted",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Cancelled => "cancelled",
            ApprovalState::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ApprovalState::Pending,
            ApprovalState::Granted,
            ApprovalState::Denied,
            ApprovalState::Expired,
            ApprovalState::Cancelled,
            ApprovalState::Revoked,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Decided: no longer pending.
    pub fn is_terminal(self) -> bool {
        self != ApprovalState::Pending
    }
}

/// The target a command waits to run on, with the attributes policies see
/// (the control plane decides `approve` on it without the worker's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalTarget {
    pub name: String,
    pub kind: String,
    pub environment: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// An approver's grant or denial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub subject: String,
    pub username: String,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// One approval, as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub schema_version: u32,
    pub id: Uuid,
    pub state: ApprovalState,
    pub requested_at: DateTime<Utc>,
    /// Past it a pending approval can only expire.
    pub expires_at: DateTime<Utc>,
    /// Who asked: the session's identity (or the API caller's, for
    /// access), with its delegation chain.
    pub requester: Identity,
    pub target: ApprovalTarget,
    /// What is asked for: a command, or access for a while.
    #[serde(flatten)]
    pub request: Requested,
    /// How many distinct approvers must grant.
    pub approvers_required: u32,
    /// The grants so far, in order.
    #[serde(default)]
    pub grants: Vec<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<Verdict>,
    /// When it left `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Why it was cancelled (`client_cancelled`, `client_disconnected`,
    /// `worker_shutdown`, `withdrawn`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// Who ended granted access early, when, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<Verdict>,
    /// The sequence, in the approvals stream, of the record this one was
    /// computed from (absent on a request): with the control plane's
    /// signature over the record, what keeps an old record published again
    /// from counting (see `policystore::approvals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
}

/// What an approval is asked for. A command approval's record keeps its
/// fields at the top level (`session_id`, `worker_id`, `command`); an
/// access request's has `access`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Requested {
    /// One command, held by a worker in a live session until the approval
    /// ends.
    Command {
        session_id: Uuid,
        /// The worker holding the command.
        worker_id: String,
        /// The command exactly as it will run (text, bound values, the
        /// statements it executes by name; secrets withheld), with the
        /// decision that asked for the approval (its policies and reason).
        command: Box<CommandReceived>,
    },
    /// Access to the target for a while, for the requester's sessions.
    Access { access: AccessRequest },
}

/// Access asked for: what policies will see, for how long, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// The name policies see in `context.grants` while the access is in
    /// force ([`ACCESS_SCOPE`] unless the requester names another).
    pub scope: String,
    /// How long the access lasts once granted, in seconds.
    pub for_secs: u32,
    /// Why the requester asks.
    pub reason: String,
}

/// The scope of access requested without naming one.
pub const ACCESS_SCOPE: &str = "access";
/// The longest access that can be asked for: a day.
pub const MAX_ACCESS_SECS: u32 = 24 * 60 * 60;
/// How long a request for access waits for an approver before it expires.
pub const ACCESS_REQUEST_TIMEOUT_SECS: i64 = 60 * 60;

impl AccessRequest {
    /// Checks what a requester asked for: a scope of lower-case letters,
    /// digits, `-`, `_` and `:` (at most 64), a time between a minute and
    /// [`MAX_ACCESS_SECS`], and a reason.
    pub fn new(scope: Option<&str>, for_secs: u64, reason: &str) -> Result<Self, String> {
        let scope = scope.unwrap_or(ACCESS_SCOPE).trim();
        if scope.is_empty()
            || scope.len() > 64
            || !scope
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_:".contains(&b))
        {
            return Err(format!(
                "scope {scope:?}: use 1 to 64 lower-case letters, digits, '-', '_' or ':'"
            ));
        }
        if !(60..=u64::from(MAX_ACCESS_SECS)).contains(&for_secs) {
            return Err(format!(
                "access can be asked for between 1 minute and 24 hours, not {for_secs} s"
            ));
        }
        let reason = reason.trim();
        if reason.is_empty() {
            return Err("a request for access needs a reason".into());
        }
        if reason.len() > 1000 {
            return Err("the reason is longer than 1000 bytes".into());
        }
        Ok(Self {
            scope: scope.to_string(),
            for_secs: for_secs as u32,
            reason: reason.to_string(),
        })
    }
}

/// Who grants or denies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub subject: String,
    pub username: String,
    /// Every subject of the approver's own delegation chain (an agent
    /// approving on someone's behalf).
    pub actors: Vec<String>,
}

/// A change to an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Grant {
        by: Approver,
        comment: Option<String>,
    },
    Deny {
        by: Approver,
        comment: String,
    },
    Expire,
    Cancel {
        reason: String,
    },
    /// Ends granted access before its time is up.
    Revoke {
        by: Approver,
        reason: Option<String>,
    },
}

impl Change {
    /// The name of the change, as the record's header says it.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Grant { .. } => "granted",
            Change::Deny { .. } => "denied",
            Change::Expire => "expired",
            Change::Cancel { .. } => "cancelled",
            Change::Revoke { .. } => "revoked",
        }
    }
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the approval is already {}", .0.as_str())]
    Ended(ApprovalState),
    #[error("the approval expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("the approval has not expired yet (it expires at {0})")]
    NotExpired(DateTime<Utc>),
    #[error("a requester cannot approve their own request")]
    OwnRequest,
    #[error(
        "the request was made on your behalf (you are in its delegation chain); someone else must approve it"
    )]
    OnTheirBehalf,
    #[error("you have already granted this approval; it needs another approver")]
    AlreadyGranted,
    #[error("a denial needs a comment saying why")]
    CommentRequired,
    #[error("only access can be revoked; a command's approval cannot")]
    NotAccess,
    #[error("the access ended at {0}")]
    AccessEnded(DateTime<Utc>),
}

impl Approval {
    /// Whether `subject` is the requester or an actor of the request's
    /// delegation chain ("agent X acting for alice" is subject alice,
    /// actor X).
    fn involves(&self, subject: &str) -> bool {
        self.requester.subject == subject
            || self
                .requester
                .delegation
                .iter()
                .any(|a| a.subject == subject)
    }

    /// The command waiting for this approval, if it is a command's.
    pub fn command(&self) -> Option<&CommandReceived> {
        match &self.request {
            Requested::Command { command, .. } => Some(command),
            Requested::Access { .. } => None,
        }
    }

    /// The worker holding the command, if it is a command's approval.
    pub fn worker_id(&self) -> Option<&str> {
        match &self.request {
            Requested::Command { worker_id, .. } => Some(worker_id),
            Requested::Access { .. } => None,
        }
    }

    /// The access asked for, if it is a request for access.
    pub fn access(&self) -> Option<&AccessRequest> {
        match &self.request {
            Requested::Access { access } => Some(access),
            Requested::Command { .. } => None,
        }
    }

    /// When granted access ends by itself (revoked or not).
    pub fn access_until(&self) -> Option<DateTime<Utc>> {
        let access = self.access()?;
        let granted = self
            .ended_at
            .filter(|_| matches!(self.state, ApprovalState::Granted | ApprovalState::Revoked))?;
        Some(granted + chrono::Duration::seconds(i64::from(access.for_secs)))
    }

    /// Whether this is access granted and in force at `now`.
    pub fn access_in_force(&self, now: DateTime<Utc>) -> bool {
        self.state == ApprovalState::Granted && self.access_until().is_some_and(|u| now < u)
    }

    /// The approval after `change` at `now`, or why it is refused.
    pub fn apply(&self, change: &Change, now: DateTime<Utc>) -> Result<Approval, Refusal> {
        if let Change::Revoke { by, reason } = change {
            return self.revoke(by, reason, now);
        }
        if self.state.is_terminal() {
            return Err(Refusal::Ended(self.state));
        }
        if matches!(change, Change::Grant { .. } | Change::Deny { .. }) && now >= self.expires_at {
            return Err(Refusal::Expired(self.expires_at));
        }
        let mut next = self.clone();
        match change {
            Change::Grant { by, comment } => {
                self.may_decide(by)?;
                if self.grants.iter().any(|g| g.subject == by.subject) {
                    return Err(Refusal::AlreadyGranted);
                }
                next.grants.push(verdict(by, comment.clone(), now));
                if next.grants.len() as u32 >= self.approvers_required.max(1) {
                    next.state = ApprovalState::Granted;
                    next.ended_at = Some(now);
                }
            }
            Change::Deny { by, comment } => {
                self.may_decide(by)?;
                if comment.trim().is_empty() {
                    return Err(Refusal::CommentRequired);
                }
                next.denial = Some(verdict(by, Some(comment.clone()), now));
                next.state = ApprovalState::Denied;
                next.ended_at = Some(now);
            }
            Change::Expire => {
                if now < self.expires_at {
                    return Err(Refusal::NotExpired(self.expires_at));
                }
                next.state = ApprovalState::Expired;
                next.ended_at = Some(now);
            }
            Change::Cancel { reason } => {
                next.state = ApprovalState::Cancelled;
                next.ended_at = Some(now);
                next.cancel_reason = Some(reason.clone());
            }
            Change::Revoke { .. } => unreachable!("decided above"),
        }
        Ok(next)
    }

    /// Granted access, ended before its time is up. Who may revoke it is
    /// the caller's decision (the requester, or an approver).
    fn revoke(
        &self,
        by: &Approver,
        reason: &Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Approval, Refusal> {
        if self.access().is_none() {
            return Err(Refusal::NotAccess);
        }
        if self.state != ApprovalState::Granted {
            return Err(Refusal::Ended(self.state));
        }
        match self.access_until() {
            Some(until) if now >= until => Err(Refusal::AccessEnded(until)),
            _ => {
                let mut next = self.clone();
                next.state = ApprovalState::Revoked;
                next.revocation = Some(verdict(by, reason.clone(), now));
                Ok(next)
            }
        }
    }

    /// Refuses an approver who asked, or on whose behalf (or through whose
    /// agent) the request was made.
    fn may_decide(&self, by: &Approver) -> Result<(), Refusal> {
        let delegated = !self.requester.delegation.is_empty();
        if self.requester.subject == by.subject && delegated {
            // The person the agent acted for.
            return Err(Refusal::OnTheirBehalf);
        }
        if self.involves(&by.subject) {
            return Err(Refusal::OwnRequest);
        }
        if by.actors.iter().any(|a| self.involves(a)) {
            return Err(Refusal::OnTheirBehalf);
        }
        Ok(())
    }
}

fn verdict(by: &Approver, comment: Option<String>, now: DateTime<Utc>) -> Verdict {
    Verdict {
        subject: by.subject.clone(),
        username: by.username.clone(),
        at: now,
        comment,
    }
}

/// How a command that waited for an approval links to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalLink {
    pub id: Uuid,
    /// How it ended: the command ran only if `granted`.
    pub state: ApprovalState,
    /// The subjects who granted it (or the one who denied it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by: Vec<String>,
}

impl ApprovalLink {
    pub fn of(a: &Approval) -> Self {
        let by = match a.state {
            ApprovalState::Denied => a.denial.iter().map(|d| d.subject.clone()).collect(),
            _ => a.grants.iter().map(|g| g.subject.clone()).collect(),
        };
        Self {
            id: a.id,
            state: a.state,
            by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Actor;

    fn identity(subject: &str, actors: &[&str]) -> Identity {
        Identity {
            issuer: "https://issuer.test".into(),
            subject: subject.into(),
            username: subject.into(),
            groups: vec![],
            delegation: actors
                .iter()
                .map(|a| Actor {
                    subject: (*a).into(),
                    issuer: None,
                })
                .collect(),
        }
    }

    fn access(requester: Identity, now: DateTime<Utc>) -> Approval {
        Approval {
            schema_version: APPROVAL_SCHEMA_VERSION,
            id: Uuid::new_v4(),
            state: ApprovalState::Pending,
            requested_at: now,
            expires_at: now + chrono::Duration::seconds(ACCESS_REQUEST_TIMEOUT_SECS),
            requester,
            target: ApprovalTarget {
                name: "orders".into(),
                kind: "postgres".into(),
                environment: "production".into(),
                tags: vec![],
            },
            request: Requested::Access {
                access: AccessRequest::new(Some("write"), 1800, "incident 42").unwrap(),
            },
            approvers_required: 1,
            grants: vec![],
            denial: None,
            ended_at: None,
            cancel_reason: None,
            revocation: None,
            replaces: None,
        }
    }

    fn approver(subject: &str) -> Approver {
        Approver {
            subject: subject.into(),
            username: subject.into(),
            actors: vec![],
        }
    }

    #[test]
    fn access_is_in_force_from_its_grant_for_its_time_unless_revoked() {
        let t0 = Utc::now();
        let a = access(identity("alice", &[]), t0);
        assert!(!a.access_in_force(t0), "pending grants nothing");
        let at = t0 + chrono::Duration::seconds(10);
        let granted = a
            .apply(
                &Change::Grant {
                    by: approver("bob"),
                    comment: None,
                },
                at,
            )
            .unwrap();
        assert_eq!(granted.state, ApprovalState::Granted);
        assert_eq!(
            granted.access_until(),
            Some(at + chrono::Duration::seconds(1800))
        );
        assert!(granted.access_in_force(at));
        assert!(granted.access_in_force(at + chrono::Duration::seconds(1799)));
        assert!(!granted.access_in_force(at + chrono::Duration::seconds(1800)));

        let revoke = Change::Revoke {
            by: approver("carol"),
            reason: Some("done".into()),
        };
        let later = at + chrono::Duration::seconds(60);
        let revoked = granted.apply(&revoke, later).unwrap();
        assert_eq!(revoked.state, ApprovalState::Revoked);
        assert!(!revoked.access_in_force(later));
        assert_eq!(revoked.revocation.as_ref().unwrap().subject, "carol");
        assert_eq!(
            revoked.apply(&revoke, later),
            Err(Refusal::Ended(ApprovalState::Revoked))
        );
        // Past its time there is nothing left to revoke.
        let past = at + chrono::Duration::seconds(1800);
        assert_eq!(
            granted.apply(&revoke, past),
            Err(Refusal::AccessEnded(past))
        );
        // Pending access is withdrawn by a cancel, not revoked.
        assert_eq!(
            a.apply(&revoke, t0),
            Err(Refusal::Ended(ApprovalState::Pending))
        );
    }

    #[test]
    fn access_requests_are_decided_by_someone_else() {
        let t0 = Utc::now();
        let by_agent = access(identity("alice", &["bot"]), t0);
        for who in ["alice", "bot"] {
            assert!(
                by_agent
                    .apply(
                        &Change::Grant {
                            by: approver(who),
                            comment: None
                        },
                        t0
                    )
                    .is_err(),
                "{who}"
            );
        }
        let expired = by_agent.apply(
            &Change::Grant {
                by: approver("bob"),
                comment: None,
            },
            by_agent.expires_at,
        );
        assert_eq!(expired, Err(Refusal::Expired(by_agent.expires_at)));
    }

    #[test]
    fn requests_for_access_are_checked() {
        assert_eq!(
            AccessRequest::new(None, 600, " why ").unwrap(),
            AccessRequest {
                scope: ACCESS_SCOPE.into(),
                for_secs: 600,
                reason: "why".into()
            }
        );
        for (scope, secs, reason) in [
            (Some("Write"), 600, "r"),
            (Some("a b"), 600, "r"),
            (Some(""), 600, "r"),
            (None, 59, "r"),
            (None, u64::from(MAX_ACCESS_SECS) + 1, "r"),
            (None, 600, "  "),
        ] {
            assert!(
                AccessRequest::new(scope, secs, reason).is_err(),
                "{scope:?} {secs} {reason:?}"
            );
        }
    }

    #[test]
    fn both_kinds_of_record_read_back_as_written() {
        let a = access(identity("alice", &[]), Utc::now());
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["access"]["scope"], "write");
        assert!(json.get("command").is_none() && json.get("worker_id").is_none());
        let back: Approval = serde_json::from_value(json).unwrap();
        assert_eq!(back, a);
    }
}
