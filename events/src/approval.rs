//! Approvals of single commands: the record that the worker holding a
//! command, the control plane and every approver share, and its state
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
//! ```
//!
//! Exactly one terminal state; a terminal approval takes no change.

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
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Granted => "granted",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ApprovalState::Pending,
            ApprovalState::Granted,
            ApprovalState::Denied,
            ApprovalState::Expired,
            ApprovalState::Cancelled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

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
    /// Who asked: the session's identity, with its delegation chain.
    pub requester: Identity,
    pub session_id: Uuid,
    /// The worker holding the command.
    pub worker_id: String,
    pub target: ApprovalTarget,
    /// The command exactly as it will run (text, bound values, the
    /// statements it executes by name; secrets withheld), with the
    /// decision that asked for the approval (its policies and reason).
    pub command: CommandReceived,
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
    /// `worker_shutdown`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
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
}

impl Change {
    /// The name of the change, as the record's header says it.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Grant { .. } => "granted",
            Change::Deny { .. } => "denied",
            Change::Expire => "expired",
            Change::Cancel { .. } => "cancelled",
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

    /// The approval after `change` at `now`, or why it is refused.
    pub fn apply(&self, change: &Change, now: DateTime<Utc>) -> Result<Approval, Refusal> {
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
        }
        Ok(next)
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
