//! The control plane as policy authority: pushing bundles, revoking and
//! reinstating identities, and explaining what a bundle would decide.
//!
//! # Records and effects stay in step
//!
//! A push writes two things to NATS: the bundle on the bundle stream (the
//! effect: workers follow it) and `PolicyBundlePublished` on the event log
//! (the record: the audit trail). A revocation likewise writes the
//! revocation and `IdentityRevoked`, and a reinstatement the record that
//! replaces the revocation and `IdentityReinstated`. JetStream cannot
//! write both at once, so the order is chosen to keep this invariant:
//!
//! **An event says a bundle was published, or an identity revoked or
//! reinstated, only if it was; and what was published, revoked or
//! reinstated stays in force only if its event was recorded.**
//!
//! 1. Sizes first. The bundle (or revocation) as stored, and its event as
//!    recorded, must each fit the server's `max_payload` less room for
//!    headers; otherwise the request is refused with 413 naming both sizes,
//!    and nothing is written.
//! 2. The effect. The bundle is published with the event's id as its
//!    `Nats-Msg-Id`, on condition that the subject still holds what was
//!    read as current (a concurrent push gets 409, never a silent undo of
//!    another's push). If the store refuses, nothing is recorded (503); an
//!    ack lost on the way is settled by looking for the id.
//! 3. The record. Only once the store acknowledged the write is the event
//!    recorded (retried once; the event log drops a duplicate of the same
//!    id and the projector is idempotent on it).
//! 4. Undo. If the event cannot be recorded, the write is undone before
//!    the client gets its 503: the previous bundle is published again
//!    (workers follow the subject back to it), or, if there was none, a
//!    bundle without policies that refuses everything as no bundle does,
//!    naming the version it withdraws (which stays in the history,
//!    superseded, and may be pushed again); a revocation by a signed record
//!    of the state before it, a reinstatement by a signed revocation, which
//!    workers follow back. Both streams refuse deletions, so that no one
//!    without the key can undo a revocation, or take workers that start
//!    later back a version, through NATS.
//!
//! # Versions, rollbacks and dry-run
//!
//! Every bundle is signed with the control plane's key
//! (`policy.signing_key_file`) and gets the next version number (one more
//! than the highest signed bundle in the stream; the client's `label` is
//! kept as metadata only). Content that an earlier version had is refused
//! (409) unless it is rolled back explicitly (`POST
//! /api/v1/policies/rollback`), which publishes it under a new version and
//! records `rollback_of`. Dry-run is no field of a push: it is set on its
//! own (`POST /api/v1/policies/dry-run`: named targets or `all_targets`,
//! ending within 24 hours) and ended (`DELETE`), each a new version of the
//! same content; a push or rollback keeps a dry-run that has not ended.
//!
//! What remains: between steps 2 and 4 workers may briefly decide with the
//! new bundle (their `CommandReceived` decisions name its hash), and
//! between a reinstatement and its undo they may admit the identity; if NATS goes
//! away after step 2, the undo may fail too, which is logged as an error
//! naming the bundle or identity; and an event the log stored but whose
//! ack was lost both times is followed by an undo, leaving a record of a
//! write that was withdrawn.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use gatehouse_eventlog::{PublishError, Publisher};
use gatehouse_events::{
    DryRunScope, Event, IdentityReinstated, IdentityRevoked, Payload, PolicyBundlePublished,
};
use gatehouse_policies::{
    Bundle, DryRun, Engine, MAX_DRY_RUN_SECS, Principal, Reading, StatementFacts, StatementKind,
    TargetInfo, classify,
};
use gatehouse_policystore::{
    History, PolicyConfig, PolicyStore, Revocation, Revoked, StoreError, Stored,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, ApiState};
use crate::auth::{self, ApiAction, Caller, JsonBody};

/// What the policy endpoints share.
#[derive(Clone)]
pub struct PolicyApi {
    pub store: PolicyStore,
    pub publisher: Publisher,
    pub config: PolicyConfig,
    /// The `worker_id` of events this control plane records.
    pub source: String,
    /// The engine of the current bundle, kept for explanations.
    cache: Arc<Mutex<Option<Arc<Engine>>>>,
}

impl PolicyApi {
    pub fn new(
        store: PolicyStore,
        publisher: Publisher,
        config: PolicyConfig,
        source: String,
    ) -> Self {
        Self {
            store,
            publisher,
            config,
            source,
            cache: Arc::default(),
        }
    }

    /// What `/readyz` says about policies: the version in force and its
    /// dry-run (`null` when none; `active` false once it has ended).
    pub(crate) async fn readiness(&self) -> Value {
        let bundle = match self.store.current().await {
            Ok(current) => current.map(|c| c.value),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the policy store for /readyz");
                return json!({ "store": "unavailable" });
            }
        };
        json!({
            "store": "ok",
            "signing_key": self.store.signs(),
            "version": bundle.as_ref().map(|b| b.version),
            "dry_run": bundle.as_ref().and_then(|b| b.dry_run.as_ref()).map(dry_run_json),
        })
    }
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A dry-run as the API shows it.
fn dry_run_json(d: &DryRun) -> Value {
    json!({
        "all_targets": d.all_targets,
        "targets": d.targets,
        "expires_at": chrono::DateTime::from_timestamp(d.expires_at, 0).map(|t| t.to_rfc3339()),
        "active": d.expires_at > unix_now(),
        "set_by": d.set_by,
    })
}

/// The policy routes, each behind the API's authorization middleware as
/// the Cedar action it performs.
pub(crate) fn routes(state: &ApiState) -> Router<ApiState> {
    let route = |path: &str, method: MethodRouter<ApiState>, action| {
        auth::require(Router::new().route(path, method), state, action)
    };
    Router::new()
        .merge(route("/api/v1/policies", post(push), ApiAction::PushPolicy))
        .merge(route(
            "/api/v1/policies/rollback",
            post(rollback),
            ApiAction::RollbackPolicy,
        ))
        .merge(route(
            "/api/v1/policies/dry-run",
            post(set_dry_run).delete(end_dry_run),
            ApiAction::SetDryRun,
        ))
        .merge(route(
            "/api/v1/revocations",
            post(revoke),
            ApiAction::Revoke,
        ))
        .merge(route(
            "/api/v1/reinstatements",
            post(reinstate),
            ApiAction::Reinstate,
        ))
        .merge(route(
            "/api/v1/policies/current",
            get(current),
            ApiAction::ReadPolicy,
        ))
        .merge(route(
            "/api/v1/decisions/explain",
            post(explain),
            ApiAction::Explain,
        ))
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "policy store or event log unavailable");
    ApiError::Unavailable("policy store or event log")
}

/// An error of the push, revoke and reinstate endpoints: the API's own, or one of
/// the outcomes only they have.
enum PolicyError {
    Api(ApiError),
    /// 413: `what`, encoded, is `size` bytes; NATS takes `max`.
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    /// 409: another push or revocation of the same thing came first.
    Conflict(&'static str),
    /// 409: refused as it stands (an old bundle pushed again), with why.
    Refused(String),
    /// 404: the named version is not in the bundle history, or the named
    /// identity is not revoked.
    NotFound(String),
    /// 503: this control plane cannot sign bundles.
    NoSigningKey,
}

impl From<ApiError> for PolicyError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl IntoResponse for PolicyError {
    fn into_response(self) -> Response {
        match self {
            Self::Api(e) => e.into_response(),
            Self::TooLarge { what, size, max } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({
                    "error": format!(
                        "{what} is too large: {size} bytes encoded, NATS takes at most {max} \
                         (max_payload less room for headers); nothing was recorded or published"
                    ),
                    "size": size,
                    "max": max,
                })),
            )
                .into_response(),
            Self::Conflict(what) => (
                StatusCode::CONFLICT,
                Json(json!({
                    "error": format!("{what} changed while this request was written; nothing was recorded, try again")
                })),
            )
                .into_response(),
            Self::Refused(why) => {
                (StatusCode::CONFLICT, Json(json!({ "error": why }))).into_response()
            }
            Self::NotFound(why) => {
                (StatusCode::NOT_FOUND, Json(json!({ "error": why }))).into_response()
            }
            Self::NoSigningKey => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": "this control plane has no policy signing key (policy.signing_key_file), so it publishes no bundles"
                })),
            )
                .into_response(),
        }
    }
}

/// Maps a policy store error about `what`.
fn store_error(what: &'static str) -> impl Fn(StoreError) -> PolicyError {
    move |e| match e {
        StoreError::TooLarge { size, max } => PolicyError::TooLarge { what, size, max },
        StoreError::Conflict(_) => PolicyError::Conflict(what),
        StoreError::NoSigningKey => PolicyError::NoSigningKey,
        e => unavailable(e).into(),
    }
}

/// Refuses `event` if the event log could not carry it (as the publisher
/// would, but before anything is written).
fn check_event(event: &Event, max: usize, what: &'static str) -> Result<(), PolicyError> {
    let size = event.to_cloudevent().len();
    if size > max {
        return Err(PolicyError::TooLarge { what, size, max });
    }
    Ok(())
}

/// Records `event`, retrying once: a retry of an event stored whose ack was
/// lost is dropped as a duplicate of its id.
async fn record(api: &PolicyApi, event: &Event, what: &'static str) -> Result<(), PolicyError> {
    let mut retried = false;
    loop {
        match api.publisher.record(vec![event.clone()]).await {
            Ok(()) => return Ok(()),
            Err(PublishError::TooLarge { size, max }) => {
                return Err(PolicyError::TooLarge { what, size, max });
            }
            Err(e) if !retried => {
                tracing::warn!(error = %e, event = %event.id, "cannot record a policy event; retrying");
                retried = true;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(unavailable(e).into()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    /// A name of the pusher's own, kept with the bundle; the version is
    /// the control plane's. (`version` is taken as the label.)
    #[serde(alias = "version")]
    label: Option<String>,
    /// `[file name, Cedar text]` pairs.
    files: Vec<(String, String)>,
    /// Defaults to the built-in schema.
    schema: Option<String>,
    /// Refused when true: dry-run is set on its own.
    dry_run: Option<bool>,
}

/// The dry-run of the bundle in force, if it has not ended: kept by a
/// push or rollback.
fn ongoing_dry_run(current: Option<&Stored<Bundle>>) -> Option<DryRun> {
    current
        .and_then(|c| c.value.dry_run.clone())
        .filter(|d| d.expires_at > unix_now())
}

/// `POST /api/v1/policies`: validate, version, sign and publish a bundle.
async fn push(
    State(s): State<ApiState>,
    who: Caller,
    JsonBody(req): JsonBody<PushRequest>,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    let api = &s.policy;
    if req.dry_run == Some(true) {
        return Err(ApiError::BadRequest(
            "dry-run is not part of a push: set it with POST /api/v1/policies/dry-run (targets and an expiry)".into(),
        )
        .into());
    }
    let schema = req
        .schema
        .unwrap_or_else(|| gatehouse_policies::SCHEMA.to_string());
    let mut bundle = Bundle::new(req.label.unwrap_or_default(), req.files, schema);
    let history = history(api).await?;
    let current = history.current();
    if let Some(c) = current.filter(|c| c.value.hash == bundle.hash) {
        return Ok((
            StatusCode::OK,
            Json(json!({
                "version": c.value.version,
                "hash": c.value.hash,
                "unchanged": true,
            })),
        ));
    }
    if let Some(old) = history.earlier_with_hash(&bundle.hash) {
        return Err(PolicyError::Refused(format!(
            "this is the content of version {}, an earlier bundle; to go back to it, roll back \
             (POST /api/v1/policies/rollback {{\"version\": {}}}), which is recorded as such",
            old.value.version, old.value.version
        )));
    }
    bundle.dry_run = ongoing_dry_run(current);
    publish(api, &who, bundle, &history).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// The version whose content to publish again.
    version: u64,
    /// Defaults to that version's label.
    label: Option<String>,
}

/// `POST /api/v1/policies/rollback`: publishes an earlier version's content
/// under a new version, recorded with `rollback_of`.
async fn rollback(
    State(s): State<ApiState>,
    who: Caller,
    JsonBody(req): JsonBody<RollbackRequest>,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    let api = &s.policy;
    let history = history(api).await?;
    let Some(target) = history.version(req.version) else {
        return Err(PolicyError::NotFound(format!(
            "version {} is not in the bundle history (it keeps the last 64 bundles)",
            req.version
        )));
    };
    let current = history.current().expect("the history holds a bundle");
    if target.value.hash == current.value.hash {
        return Err(PolicyError::Refused(format!(
            "version {}'s content is the one in force (version {}); nothing to roll back",
            req.version, current.value.version
        )));
    }
    let bundle = Bundle {
        label: req.label.unwrap_or_else(|| target.value.label.clone()),
        rollback_of: Some(req.version),
        withdraws: None,
        dry_run: ongoing_dry_run(Some(current)),
        ..target.value.clone()
    };
    publish(api, &who, bundle, &history).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunRequest {
    /// Targets whose denials are only recorded.
    #[serde(default)]
    targets: Vec<String>,
    /// Every target instead.
    #[serde(default)]
    all_targets: bool,
    /// How long, at most a day; then everything is enforced again.
    expires_in_secs: i64,
}

/// `POST /api/v1/policies/dry-run`: the bundle in force, under a new
/// version, with a dry-run on some targets (or all) that ends by itself.
async fn set_dry_run(
    State(s): State<ApiState>,
    who: Caller,
    JsonBody(req): JsonBody<DryRunRequest>,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    let api = &s.policy;
    let now = unix_now();
    let dry_run = DryRun {
        all_targets: req.all_targets,
        targets: req.targets,
        expires_at: now.saturating_add(req.expires_in_secs),
        set_by: who.subject().to_string(),
    };
    dry_run.check(now).map_err(|why| {
        ApiError::BadRequest(format!("{why} (expires_in_secs: 1 to {MAX_DRY_RUN_SECS})"))
    })?;
    let history = history(api).await?;
    let Some(current) = history.current() else {
        return Err(ApiError::BadRequest("no policy bundle has been published".into()).into());
    };
    let bundle = Bundle {
        dry_run: Some(dry_run),
        rollback_of: None,
        withdraws: None,
        ..current.value.clone()
    };
    publish(api, &who, bundle, &history).await
}

/// `DELETE /api/v1/policies/dry-run`: ends the dry-run now (a new version
/// of the same content without it).
async fn end_dry_run(
    State(s): State<ApiState>,
    who: Caller,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    let api = &s.policy;
    let history = history(api).await?;
    let Some(current) = history.current() else {
        return Err(ApiError::BadRequest("no policy bundle has been published".into()).into());
    };
    if current.value.dry_run.is_none() {
        return Ok((
            StatusCode::OK,
            Json(json!({ "version": current.value.version, "unchanged": true })),
        ));
    }
    let bundle = Bundle {
        dry_run: None,
        rollback_of: None,
        withdraws: None,
        ..current.value.clone()
    };
    publish(api, &who, bundle, &history).await
}

/// The bundle history, for a write: refused at once without a signing key.
async fn history(api: &PolicyApi) -> Result<History, PolicyError> {
    if !api.store.signs() {
        return Err(PolicyError::NoSigningKey);
    }
    api.store.history().await.map_err(|e| unavailable(e).into())
}

/// Publishes `bundle` under the next version of `history`, signed, and
/// records it (the steps of the module documentation).
async fn publish(
    api: &PolicyApi,
    who: &Caller,
    mut bundle: Bundle,
    history: &History,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    bundle.version = history.next_version();
    let event = Event::new(
        api.source.clone(),
        Payload::PolicyBundlePublished(PolicyBundlePublished {
            version: bundle.version.to_string(),
            hash: bundle.hash.clone(),
            files: bundle.files.iter().map(|(n, _)| n.clone()).collect(),
            dry_run: bundle.dry_run.is_some(),
            published_by: who.subject().to_string(),
            label: Some(bundle.label.clone()).filter(|l| !l.is_empty()),
            rollback_of: bundle.rollback_of,
            dry_run_scope: bundle.dry_run.as_ref().map(|d| DryRunScope {
                all_targets: d.all_targets,
                targets: d.targets.clone(),
                expires_at: d.expires_at,
                set_by: d.set_by.clone(),
            }),
        }),
    );

    // 1. Sizes, before anything is written.
    let max = api.store.max_body();
    let size = PolicyStore::bundle_size(&bundle).map_err(unavailable)?;
    if size > max {
        return Err(PolicyError::TooLarge {
            what: "the policy bundle",
            size,
            max,
        });
    }
    check_event(&event, max, "the bundle's PolicyBundlePublished event")?;
    // Then validated: a bundle too large to publish is 413 whatever else
    // is wrong with it.
    let engine = Engine::new(&bundle).map_err(|e| ApiError::Invalid {
        message: "the bundle is not valid".into(),
        details: e.problems().iter().map(|p| p.to_string()).collect(),
    })?;

    // 2. The effect, provided the subject still holds what was read.
    let previous = history.current().map(|c| &c.value);
    let sequence = api
        .store
        .replace_bundle(&bundle, &event.id.to_string(), history.last_sequence)
        .await
        .map_err(store_error("the current policy bundle"))?;

    // 3. The record; 4. or the undo.
    if let Err(e) = record(api, &event, "the bundle's PolicyBundlePublished event").await {
        match api.store.restore_bundle(previous, &bundle, sequence).await {
            Ok(()) => {
                tracing::warn!(version = bundle.version, hash = %bundle.hash, "policy bundle withdrawn: its event could not be recorded")
            }
            Err(undo) => {
                tracing::error!(error = %undo, version = bundle.version, hash = %bundle.hash, "policy bundle in force without its PolicyBundlePublished event: recording failed and so did withdrawing it")
            }
        }
        return Err(e);
    }
    *api.cache.lock().expect("poisoned") = Some(Arc::new(engine));
    tracing::info!(
        version = bundle.version,
        hash = %bundle.hash,
        rollback_of = ?bundle.rollback_of,
        dry_run = bundle.dry_run.is_some(),
        by = %who.subject(),
        "policy bundle published"
    );
    Ok((StatusCode::CREATED, Json(bundle_json(&bundle))))
}

/// A bundle's metadata as the API shows it.
fn bundle_json(b: &Bundle) -> Value {
    json!({
        "version": b.version,
        "label": b.label,
        "hash": b.hash,
        "rollback_of": b.rollback_of,
        "dry_run": b.dry_run.as_ref().map(dry_run_json),
        "files": b.files.iter().map(|(n, _)| n).collect::<Vec<_>>(),
    })
}

/// `GET /api/v1/policies/current`: the signed bundle with the highest
/// version.
async fn current(State(s): State<ApiState>, _: Caller) -> Result<Json<Value>, ApiError> {
    let bundle = s.policy.store.current_bundle().await.map_err(unavailable)?;
    let Some(b) = bundle else {
        return Err(ApiError::BadRequest(
            "no policy bundle has been published".into(),
        ));
    };
    Ok(Json(bundle_json(&b)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityRequest {
    /// Every token of this subject (`sub`).
    subject: Option<String>,
    /// One token, by its `jti`.
    token_id: Option<String>,
    /// Why: optional for a revocation, required for a reinstatement.
    reason: Option<String>,
}

impl IdentityRequest {
    /// The identity named, with its kind and value as events say them.
    fn identity(&mut self) -> Result<(Revoked, &'static str, String), PolicyError> {
        let revoked = match (self.subject.take(), self.token_id.take()) {
            (Some(sub), None) if !sub.is_empty() => Revoked::Subject(sub),
            (None, Some(jti)) if !jti.is_empty() => Revoked::Token(jti),
            _ => {
                return Err(
                    ApiError::BadRequest("give exactly one of subject or token_id".into()).into(),
                );
            }
        };
        let (kind, value) = match &revoked {
            Revoked::Subject(v) => ("subject", v.clone()),
            Revoked::Token(v) => ("token", v.clone()),
        };
        Ok((revoked, kind, value))
    }
}

/// How a change of an identity's record is named in answers and logs.
struct Change {
    /// The record as stored.
    record: &'static str,
    /// Its event.
    event: &'static str,
}

const REVOCATION: Change = Change {
    record: "the revocation",
    event: "the revocation's IdentityRevoked event",
};

const REINSTATEMENT: Change = Change {
    record: "the reinstatement",
    event: "the reinstatement's IdentityReinstated event",
};

/// Stores `stored`, an identity's new last record, in place of `previous`
/// (what was read as its last record), and records `event`, keeping the
/// two in step (module docs, steps 1 to 4).
async fn change_identity(
    api: &PolicyApi,
    stored: &Revocation,
    event: &Event,
    previous: Option<Stored<axum::body::Bytes>>,
    change: &Change,
    (kind, value): (&'static str, &str),
) -> Result<(), PolicyError> {
    // 1. Sizes, before anything is written.
    let max = api.store.max_body();
    let size = PolicyStore::revocation_size(stored).map_err(unavailable)?;
    if size > max {
        return Err(PolicyError::TooLarge {
            what: change.record,
            size,
            max,
        });
    }
    check_event(event, max, change.event)?;

    // 2. The effect, provided the identity's record is still the one read.
    let sequence = api
        .store
        .replace_revocation(
            stored,
            &event.id.to_string(),
            previous.as_ref().map_or(0, |p| p.sequence),
        )
        .await
        .map_err(store_error("the identity's revocation"))?;

    // 3. The record; 4. or the undo.
    if let Err(e) = record(api, event, change.event).await {
        match api
            .store
            .restore_revocation(&stored.revoked, previous.map(|p| p.value), sequence)
            .await
        {
            Ok(()) => {
                tracing::warn!(
                    kind,
                    change = change.record,
                    "withdrawn: its event could not be recorded"
                )
            }
            Err(undo) => {
                tracing::error!(error = %undo, kind, value = %value, change = change.record, "in force without its event: recording failed and so did withdrawing it")
            }
        }
        return Err(e);
    }
    Ok(())
}

/// `POST /api/v1/revocations`
async fn revoke(
    State(s): State<ApiState>,
    who: Caller,
    JsonBody(mut req): JsonBody<IdentityRequest>,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    let api = &s.policy;
    let (revoked, kind, value) = req.identity()?;
    let event = Event::new(
        api.source.clone(),
        Payload::IdentityRevoked(IdentityRevoked {
            kind: kind.into(),
            value: value.clone(),
            revoked_by: who.subject().to_string(),
            reason: req.reason.clone(),
        }),
    );
    let revocation = Revocation {
        revoked,
        by: who.subject().to_string(),
        reason: req.reason,
        at: chrono::Utc::now().timestamp(),
        reinstated: false,
        replaces: None,
    };
    let previous = api
        .store
        .revocation_of(&revocation.revoked)
        .await
        .map_err(unavailable)?;
    change_identity(
        api,
        &revocation,
        &event,
        previous,
        &REVOCATION,
        (kind, &value),
    )
    .await?;
    tracing::info!(kind, by = %who.subject(), "identity revoked");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "revoked": { "kind": kind, "value": value } })),
    ))
}

/// `POST /api/v1/reinstatements`: a revoked identity or token is no longer
/// refused. The reason is required (it is recorded); an identity that is
/// not revoked is 404.
async fn reinstate(
    State(s): State<ApiState>,
    who: Caller,
    JsonBody(mut req): JsonBody<IdentityRequest>,
) -> Result<(StatusCode, Json<Value>), PolicyError> {
    let api = &s.policy;
    let (revoked, kind, value) = req.identity()?;
    let Some(reason) = req.reason.filter(|r| !r.trim().is_empty()) else {
        return Err(ApiError::BadRequest(
            "a reason is required: say why the identity is reinstated (it is recorded)".into(),
        )
        .into());
    };
    let previous = api
        .store
        .revocation_of(&revoked)
        .await
        .map_err(unavailable)?;
    // No record at all is not revoked either.
    if !api.store.is_revoked(&revoked).await.map_err(unavailable)? {
        return Err(PolicyError::NotFound(format!(
            "{kind} {value:?} is not revoked; nothing to reinstate"
        )));
    }
    let event = Event::new(
        api.source.clone(),
        Payload::IdentityReinstated(IdentityReinstated {
            kind: kind.into(),
            value: value.clone(),
            reinstated_by: who.subject().to_string(),
            reason: reason.clone(),
        }),
    );
    let reinstatement = Revocation {
        revoked,
        by: who.subject().to_string(),
        reason: Some(reason),
        at: chrono::Utc::now().timestamp(),
        reinstated: true,
        replaces: None,
    };
    change_identity(
        api,
        &reinstatement,
        &event,
        previous,
        &REINSTATEMENT,
        (kind, &value),
    )
    .await?;
    tracing::info!(kind, by = %who.subject(), "identity reinstated");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "reinstated": { "kind": kind, "value": value } })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    identity: ExplainIdentity,
    target: ExplainTarget,
    sql: String,
    /// Client address policies see; default 127.0.0.1.
    source_ip: Option<String>,
    /// The scopes of access granted for a while to decide with
    /// (`context.grants`); default none.
    #[serde(default)]
    grants: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainIdentity {
    subject: String,
    username: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// Delegation chain, current actor first.
    #[serde(default)]
    actors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainTarget {
    name: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// `POST /api/v1/decisions/explain`: what the current bundle would decide
/// for an identity running some SQL on a target, and by which policies.
async fn explain(
    State(s): State<ApiState>,
    _: Caller,
    JsonBody(req): JsonBody<ExplainRequest>,
) -> Result<Json<Value>, ApiError> {
    let engine = current_engine(&s.policy).await?;
    let principal = Principal::from_claims(
        req.identity.subject,
        req.identity.username,
        req.identity.groups,
        req.identity.actors,
        &s.policy.config.agent_group,
    );
    let target = TargetInfo {
        name: req.target.name,
        kind: "postgres".into(),
        environment: req.target.environment,
        tags: req.target.tags,
    };
    let session = engine
        .session(
            &principal,
            &target,
            req.source_ip.as_deref().unwrap_or("127.0.0.1"),
        )
        .with_grants(req.grants.into_iter().collect());
    let c = classify(&req.sql, Reading::default());
    // The command's effect is what a worker would decide in a session that
    // has prepared nothing; each statement's own decision follows.
    // Unparsed text is explained as one `other` statement; an empty command
    // has no statements and is allowed.
    let overall = engine.decide_classification(&session, &c).effect;
    let unparsed = [StatementFacts::new(StatementKind::Other)];
    let statements: &[StatementFacts] = if c.parsed { &c.statements } else { &unparsed };
    let mut out = Vec::new();
    for facts in statements {
        let d = engine.decide_statement(&session, facts, c.parsed, c.statements.len() > 1);
        out.push(json!({
            "kind": facts.kind.as_str(),
            "tables_read": facts.tables_read,
            "tables_written": facts.tables_written,
            "functions": facts.functions,
            "has_where": facts.has_where,
            "writes": facts.writes,
            "runs_program": facts.runs_program,
            "dynamic": facts.dynamic,
            "reaches_outside": facts.reaches_outside,
            "disables_read_only": facts.disables_read_only,
            "changes_parsing": facts.changes_parsing,
            "effect": d.effect.as_str(),
            "policies": d.policies,
            "reason": d.reason,
        }));
    }
    Ok(Json(json!({
        "effect": overall.as_str(),
        "parsed": c.parsed,
        "principal": session.principal_uid(),
        "statements": out,
        "bundle_version": engine.bundle_version(),
        "bundle_hash": engine.bundle_hash(),
    })))
}

async fn current_engine(api: &PolicyApi) -> Result<Arc<Engine>, ApiError> {
    let bundle = api.store.current_bundle().await.map_err(unavailable)?;
    let Some(bundle) = bundle else {
        return Err(ApiError::BadRequest(
            "no policy bundle has been published".into(),
        ));
    };
    if let Some(e) = api.cache.lock().expect("poisoned").as_ref()
        && e.bundle_hash() == bundle.hash
        && e.bundle_version() == bundle.version
    {
        return Ok(e.clone());
    }
    let engine = Arc::new(Engine::new(&bundle).map_err(|e| ApiError::Invalid {
        message: "the current bundle is not valid".into(),
        details: e.problems().iter().map(|p| p.to_string()).collect(),
    })?);
    *api.cache.lock().expect("poisoned") = Some(engine.clone());
    Ok(engine)
}
