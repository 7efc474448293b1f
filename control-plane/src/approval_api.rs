//! Approvals through the API: listing and reading them, granting and
//! denying, and a stream of their changes for the web console. Requests
//! for access (`access_api`) are approvals too, listed and decided here
//! with those of commands: one inbox for approvers.
//!
//! Every route sits behind `api:read-approvals` (the admin and auditor
//! groups, and whom the bundle permits, e.g. the example's `approvers`).
//! Granting or denying is decided again, per approval, as Cedar's
//! `approve` on the approval's target (only a permit naming `approve`
//! grants it), and then by the approval's own rules: the requester, the
//! person an agent acted for and that person's agents never decide their
//! own request; N distinct approvers; a denial needs a comment. The change
//! is written on condition that the approval did not change meanwhile, so
//! of two control planes racing a grant and a deny one wins and the other
//! answers 409 naming the outcome.
//!
//! The approvals stream is the only state: a restarted control plane reads
//! pending approvals from it. A pending approval seen past its expiry is
//! expired on reading, and one whose worker's lease lapsed (the worker
//! died, so the command can never run) is cancelled as `worker_lost`: each
//! is shown as it ended.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use futures::StreamExt;
use gatehouse_events::approval::{Approval, ApprovalState, Approver, Change, Refusal};
use gatehouse_policies::{Effect, TargetInfo};
use gatehouse_policystore::approvals::{ApprovalError, Lease};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::api::{ApiError, ApiState};
use crate::auth::{self, ApiAction, Authority, Caller, JsonBody};

/// How long past its expiry a pending approval is left to its worker
/// before the control plane expires it.
const GRACE_SECS: i64 = 5;

pub(crate) fn routes(state: &ApiState) -> Router<ApiState> {
    let routes = Router::new()
        .route("/api/v1/approvals", get(list))
        .route("/api/v1/approvals/stream", get(stream))
        .route("/api/v1/approvals/{id}", get(show))
        .route("/api/v1/approvals/{id}/grant", post(grant))
        .route("/api/v1/approvals/{id}/deny", post(deny));
    auth::require(routes, state, ApiAction::ReadApprovals)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// `pending`, `granted`, `denied`, `expired` or `cancelled`.
    state: Option<String>,
}

async fn list(
    State(s): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let wanted = wanted_state(q.state.as_deref())?;
    let all = s.approvals.all().await.map_err(unavailable)?;
    let mut out = Vec::new();
    let mut gone = Holders::default();
    for a in all {
        let a = settle(&s, a, &mut gone).await;
        if wanted.is_none_or(|w| w == a.state) {
            out.push(a);
        }
    }
    Ok(Json(json!({ "approvals": out })))
}

/// The `state` a listing asks for, if any.
pub(crate) fn wanted_state(state: Option<&str>) -> Result<Option<ApprovalState>, ApiError> {
    state
        .map(|v| {
            ApprovalState::parse(v).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "state: {v:?} is not one of pending, granted, denied, expired, cancelled, revoked"
                ))
            })
        })
        .transpose()
}

async fn show(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Approval>, ApiError> {
    let a = current(&s, &id).await?;
    Ok(Json(settle(&s, a, &mut Holders::default()).await))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verdict {
    comment: Option<String>,
}

async fn grant(
    State(s): State<ApiState>,
    Extension(authority): Extension<Arc<Authority>>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Verdict>,
) -> Result<Json<Approval>, ApiError> {
    let comment = body.comment.filter(|c| !c.trim().is_empty());
    let by = approver(&caller);
    decide(&s, &authority, &caller, id, Change::Grant { by, comment }).await
}

async fn deny(
    State(s): State<ApiState>,
    Extension(authority): Extension<Arc<Authority>>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Verdict>,
) -> Result<Json<Approval>, ApiError> {
    let by = approver(&caller);
    let comment = body.comment.unwrap_or_default();
    decide(&s, &authority, &caller, id, Change::Deny { by, comment }).await
}

/// A grant or denial: `approve` on the approval's target, then the
/// approval's rules, written on condition.
async fn decide(
    s: &ApiState,
    authority: &Authority,
    caller: &Caller,
    id: String,
    change: Change,
) -> Result<Json<Approval>, ApiError> {
    let current = current(s, &id).await?;
    let id = current.id;
    let identity = &caller.token.identity;
    may_approve(s, authority, caller, &current).await?;
    match s.approvals.change(id, &change, Utc::now()).await {
        Ok(a) => {
            tracing::info!(approval = %id, subject = %identity.subject, change = change.name(), state = a.state.as_str(), "approval changed");
            Ok(Json(a))
        }
        Err(ApprovalError::Refused(r)) => Err(refused(r)),
        Err(ApprovalError::NotFound(id)) => Err(not_found(id)),
        Err(e) => Err(unavailable(e)),
    }
}

/// Whether the caller may decide approvals on `a`'s target: Cedar's
/// `approve` on it, with the current bundle (403 with the policies' reason
/// otherwise).
pub(crate) async fn may_approve(
    s: &ApiState,
    authority: &Authority,
    caller: &Caller,
    a: &Approval,
) -> Result<(), ApiError> {
    let engine = authority
        .engine(s, ApiAction::ReadApprovals)
        .await?
        .ok_or_else(|| {
            ApiError::Forbidden("no policy bundle is published: no one may approve".into())
        })?;
    let identity = &caller.token.identity;
    let target = TargetInfo {
        name: a.target.name.clone(),
        kind: a.target.kind.clone(),
        environment: a.target.environment.clone(),
        tags: a.target.tags.clone(),
    };
    let session = engine.session(
        &auth::principal(identity, &s.policy.config.agent_group),
        &target,
        &caller.source_ip,
    );
    let decision = engine.decide_approve(&session);
    if decision.effect == Effect::Allow {
        return Ok(());
    }
    tracing::info!(approval = %a.id, subject = %identity.subject, policies = ?decision.policies, "approval decision refused by policy");
    Err(ApiError::Forbidden(format!(
        "not permitted to approve requests on target {:?}: {}",
        target.name,
        decision
            .reason
            .unwrap_or_else(|| "no policy permits it".into())
    )))
}

/// Every approval's current record, then each change as it happens:
/// server-sent events named after the change (`requested`, `granted`,
/// …), each with the whole approval as data.
async fn stream(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let changes = s.approvals.follow_all().await.map_err(unavailable)?;
    let events = changes.filter_map(|r| async move {
        match r {
            Ok(c) => {
                let name = if c.change.is_empty() {
                    "changed".to_string()
                } else {
                    c.change
                };
                let event = SseEvent::default()
                    .event(name)
                    .id(c.sequence.to_string())
                    .json_data(&c.approval)
                    .ok()?;
                Some(Ok::<_, Infallible>(event))
            }
            Err(e) => {
                tracing::warn!(error = %e, "approval stream: a record was skipped");
                None
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

pub(crate) fn approver(caller: &Caller) -> Approver {
    let identity = &caller.token.identity;
    Approver {
        subject: identity.subject.clone(),
        username: identity.username.clone(),
        actors: identity
            .delegation
            .iter()
            .map(|a| a.subject.clone())
            .collect(),
    }
}

/// Each worker's lease, read once per listing rather than once per
/// approval.
pub(crate) type Holders = std::collections::HashMap<String, Option<Lease>>;

/// A pending approval past its expiry and grace is expired now, and a
/// command's whose worker is gone is cancelled (`worker_lost`); the
/// approval as it then stands.
pub(crate) async fn settle(s: &ApiState, a: Approval, holders: &mut Holders) -> Approval {
    let now = Utc::now();
    if a.state != ApprovalState::Pending {
        return a;
    }
    let change = if now >= a.expires_at + chrono::Duration::seconds(GRACE_SECS) {
        Change::Expire
    } else {
        // Access waits in no worker: only its expiry ends it.
        let Some(worker_id) = a.worker_id() else {
            return a;
        };
        let lease = match holders.get(worker_id) {
            Some(lease) => Ok(lease.clone()),
            None => s.approvals.lease(worker_id).await,
        };
        if let Ok(lease) = &lease {
            holders.insert(worker_id.to_string(), lease.clone());
        }
        match lease.map(|l| l.is_some_and(|l| l.holds(&a, now))) {
            Ok(false) => Change::Cancel {
                reason: "worker_lost".into(),
            },
            Ok(true) => return a,
            Err(e) => {
                tracing::warn!(approval = %a.id, error = %e, "cannot read the lease of the approval's worker");
                return a;
            }
        }
    };
    match s.approvals.change(a.id, &change, now).await {
        Ok(expired) => expired,
        Err(ApprovalError::Refused(_)) => match s.approvals.get(a.id).await {
            Ok(Some((current, _))) => current,
            _ => a,
        },
        Err(e) => {
            tracing::warn!(approval = %a.id, error = %e, change = change.name(), "cannot end an approval no one holds");
            a
        }
    }
}

/// The approval `id` (as the path gives it) as it stands: 400 for a
/// malformed id, 404 for none.
pub(crate) async fn current(s: &ApiState, id: &str) -> Result<Approval, ApiError> {
    let id = parse_id(id)?;
    let (a, _) = s
        .approvals
        .get(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| not_found(id))?;
    Ok(a)
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not an approval id")))
}

pub(crate) fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no approval {id}"))
}

pub(crate) fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::OwnRequest | Refusal::OnTheirBehalf => ApiError::Forbidden(r.to_string()),
        Refusal::CommentRequired | Refusal::NotAccess => ApiError::BadRequest(r.to_string()),
        Refusal::Ended(_)
        | Refusal::Expired(_)
        | Refusal::AlreadyGranted
        | Refusal::NotExpired(_)
        | Refusal::AccessEnded(_) => ApiError::Conflict(r.to_string()),
    }
}

pub(crate) fn unavailable(e: ApprovalError) -> ApiError {
    tracing::warn!(error = %e, "approvals stream unavailable");
    ApiError::Unavailable("approvals stream")
}
