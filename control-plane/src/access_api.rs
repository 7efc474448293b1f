//! Access for a while (session-level just-in-time access) through the API:
//! asking for it, reading one's own requests, ending them.
//!
//! A request for access is an approval ([`Requested::Access`]): approvers
//! see it with the commands waiting for theirs (`GET /api/v1/approvals`)
//! and grant or deny it there, under the same rules (Cedar's `approve` on
//! the target; never the requester or those acting with them). Once
//! granted, the requester's sessions on the target — the same subject and
//! delegation chain — see its scope in `context.grants` until the time
//! asked for is up or someone revokes it; workers take the change in at
//! the next command of each live session.
//!
//! Every route sits behind `api:request-access`, which the built-in
//! policies give everyone (a bundle may forbid it).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use gatehouse_events::Identity;
use gatehouse_events::approval::{
    ACCESS_REQUEST_TIMEOUT_SECS, APPROVAL_SCHEMA_VERSION, AccessRequest, Approval, ApprovalState,
    Change, Requested,
};
use gatehouse_policystore::approvals::ApprovalError;
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, ApiState};
use crate::approval_api::{self, Holders};
use crate::auth::{self, ApiAction, Authority, Caller, JsonBody};

/// Requests for access one identity may have waiting at a time: enough
/// for real work, not enough to flood approvers or the stream.
const MAX_PENDING: usize = 5;

pub(crate) fn routes(state: &ApiState) -> Router<ApiState> {
    let routes = Router::new()
        .route("/api/v1/access", post(request).get(list))
        .route("/api/v1/access/{id}", get(show))
        .route("/api/v1/access/{id}/revoke", post(revoke));
    auth::require(routes, state, ApiAction::RequestAccess)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    /// The target's name, as the workers that front it announce it.
    target: String,
    /// How long, once granted: `"30m"`, `"2h"`, `"90s"`.
    #[serde(rename = "for")]
    duration: String,
    reason: String,
    /// What policies will see in `context.grants` (default `access`).
    scope: Option<String>,
}

async fn request(
    State(s): State<ApiState>,
    caller: Caller,
    JsonBody(ask): JsonBody<Ask>,
) -> Result<(StatusCode, Json<Approval>), ApiError> {
    if !s.approvals.signs() {
        return Err(ApiError::Forbidden(
            "this control plane has no policy signing key (policy.signing_key_file): access \
             it recorded would count on no worker"
                .into(),
        ));
    }
    let secs = gatehouse_policies::parse_duration(ask.duration.trim()).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "for: {:?} is not a duration; write a whole number followed by s, m or h (e.g. \"30m\")",
            ask.duration
        ))
    })?;
    let access = AccessRequest::new(ask.scope.as_deref(), secs, &ask.reason)
        .map_err(ApiError::BadRequest)?;
    let known = s
        .approvals
        .target(&ask.target)
        .await
        .map_err(approval_api::unavailable)?;
    let Some(known) = known else {
        let names: Vec<String> = s
            .approvals
            .targets()
            .await
            .map_err(approval_api::unavailable)?
            .into_iter()
            .map(|k| k.target.name)
            .collect();
        return Err(ApiError::NotFound(format!(
            "no worker fronts a target named {:?}; known targets: {}",
            ask.target,
            if names.is_empty() {
                "none yet".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    let now = Utc::now();
    let waiting = s
        .approvals
        .all()
        .await
        .map_err(approval_api::unavailable)?
        .iter()
        .filter(|a| {
            a.access().is_some()
                && a.state == ApprovalState::Pending
                && a.expires_at > now
                && same_identity(&a.requester, &caller.token.identity)
        })
        .count();
    if waiting >= MAX_PENDING {
        return Err(ApiError::TooMany(format!(
            "you have {waiting} requests for access waiting for an approver; withdraw one \
             (gatehouse access revoke ID) or wait for a decision"
        )));
    }
    let approval = Approval {
        schema_version: APPROVAL_SCHEMA_VERSION,
        id: uuid::Uuid::now_v7(),
        state: ApprovalState::Pending,
        requested_at: now,
        expires_at: now + chrono::Duration::seconds(ACCESS_REQUEST_TIMEOUT_SECS),
        requester: caller.token.identity.clone(),
        target: known.target,
        request: Requested::Access { access },
        approvers_required: 1,
        grants: Vec::new(),
        denial: None,
        ended_at: None,
        cancel_reason: None,
        revocation: None,
        replaces: None,
    };
    s.approvals
        .request(&approval)
        .await
        .map_err(approval_api::unavailable)?;
    tracing::info!(approval = %approval.id, subject = %caller.subject(), target = %approval.target.name, "access requested");
    Ok((StatusCode::CREATED, Json(approval)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
}

/// The caller's own requests for access, oldest first.
async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let wanted = approval_api::wanted_state(q.state.as_deref())?;
    let all = s.approvals.all().await.map_err(approval_api::unavailable)?;
    let mut out = Vec::new();
    let mut holders = Holders::default();
    for a in all {
        if a.access().is_none() || !same_identity(&a.requester, &caller.token.identity) {
            continue;
        }
        let a = approval_api::settle(&s, a, &mut holders).await;
        if wanted.is_none_or(|w| w == a.state) {
            out.push(a);
        }
    }
    Ok(Json(json!({ "access": out })))
}

async fn show(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Approval>, ApiError> {
    let a = own(&s, &caller, &id).await?;
    Ok(Json(
        approval_api::settle(&s, a, &mut Holders::default()).await,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revocation {
    reason: Option<String>,
}

/// Ends access: the requester withdraws a pending request or gives up
/// access granted; anyone Cedar's `approve` permits on the target revokes
/// access granted (a pending request is theirs to deny instead).
async fn revoke(
    State(s): State<ApiState>,
    Extension(authority): Extension<Arc<Authority>>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Revocation>,
) -> Result<Json<Approval>, ApiError> {
    let a = approval_api::current(&s, &id).await?;
    if a.access().is_none() {
        return Err(approval_api::not_found(a.id));
    }
    let reason = body.reason.filter(|r| !r.trim().is_empty());
    let by = approval_api::approver(&caller);
    let change = if same_identity(&a.requester, &caller.token.identity) {
        match a.state {
            ApprovalState::Pending => Change::Cancel {
                reason: "withdrawn".into(),
            },
            _ => Change::Revoke { by, reason },
        }
    } else {
        approval_api::may_approve(&s, &authority, &caller, &a).await?;
        if a.state == ApprovalState::Pending {
            return Err(ApiError::Conflict(format!(
                "access request {} is still pending: deny it instead (gatehouse approvals deny {} --comment …)",
                a.id, a.id
            )));
        }
        Change::Revoke { by, reason }
    };
    match s.approvals.change(a.id, &change, Utc::now()).await {
        Ok(a) => {
            tracing::info!(approval = %a.id, subject = %caller.subject(), change = change.name(), "access ended");
            Ok(Json(a))
        }
        Err(ApprovalError::Refused(r)) => Err(approval_api::refused(r)),
        Err(ApprovalError::NotFound(id)) => Err(approval_api::not_found(id)),
        Err(e) => Err(approval_api::unavailable(e)),
    }
}

/// The caller's own request for access `id`; 404 for anyone else's (an
/// approver reads it as an approval).
async fn own(s: &ApiState, caller: &Caller, id: &str) -> Result<Approval, ApiError> {
    let a = approval_api::current(s, id).await?;
    if a.access().is_none() || !same_identity(&a.requester, &caller.token.identity) {
        return Err(approval_api::not_found(a.id));
    }
    Ok(a)
}

/// Access is granted to one identity exactly: the same subject, acting
/// through the same agents.
fn same_identity(a: &Identity, b: &Identity) -> bool {
    a.subject == b.subject
        && a.delegation.len() == b.delegation.len()
        && a.delegation
            .iter()
            .zip(&b.delegation)
            .all(|(x, y)| x.subject == y.subject)
}
