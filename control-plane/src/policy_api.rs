//! The control plane as policy authority: pushing bundles, revoking
//! identities, and explaining what a bundle would decide.
//!
//! Pushes and revocations are recorded as events first (fail closed: what
//! cannot be recorded does not take effect), then written to the policy
//! store that workers watch.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use gatehouse_eventlog::Publisher;
use gatehouse_events::{Event, IdentityRevoked, Payload, PolicyBundlePublished};
use gatehouse_policies::{
    Bundle, Engine, Principal, Reading, StatementFacts, StatementKind, TargetInfo, classify,
};
use gatehouse_policystore::{PolicyConfig, PolicyStore, Revocation, Revoked};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, ApiState, authorize};

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
}

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/policies", post(push))
        .route("/api/v1/policies/current", get(current))
        .route("/api/v1/revocations", post(revoke))
        .route("/api/v1/decisions/explain", post(explain))
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "policy store or event log unavailable");
    ApiError::Unavailable("policy store or event log")
}

async fn record(api: &PolicyApi, payload: Payload) -> Result<(), ApiError> {
    let event = Event::new(api.source.clone(), payload);
    api.publisher.record(vec![event]).await.map_err(unavailable)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    /// Defaults to the UTC time and the hash prefix.
    version: Option<String>,
    /// `[file name, Cedar text]` pairs.
    files: Vec<(String, String)>,
    /// Defaults to the built-in schema.
    schema: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/v1/policies`: validate, version and publish a bundle.
async fn push(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Json(req): Json<PushRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = authorize(&s, &headers, &[&s.policy.config.admin_group]).await?;
    let api = &s.policy;
    let schema = req
        .schema
        .unwrap_or_else(|| gatehouse_policies::SCHEMA.to_string());
    let mut bundle = Bundle::new(String::new(), req.files, schema, req.dry_run);
    bundle.version = req.version.unwrap_or_else(|| {
        format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            &bundle.hash[..12]
        )
    });
    let engine = Engine::new(&bundle).map_err(|e| ApiError::Invalid {
        message: "the bundle is not valid".into(),
        details: e.problems().iter().map(|p| p.to_string()).collect(),
    })?;
    record(
        api,
        Payload::PolicyBundlePublished(PolicyBundlePublished {
            version: bundle.version.clone(),
            hash: bundle.hash.clone(),
            files: bundle.files.iter().map(|(n, _)| n.clone()).collect(),
            dry_run: bundle.dry_run,
            published_by: who.identity.subject.clone(),
        }),
    )
    .await?;
    api.store
        .publish_bundle(&bundle)
        .await
        .map_err(unavailable)?;
    *api.cache.lock().expect("poisoned") = Some(Arc::new(engine));
    tracing::info!(version = %bundle.version, hash = %bundle.hash, by = %who.identity.subject, "policy bundle published");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "version": bundle.version, "hash": bundle.hash, "dry_run": bundle.dry_run })),
    ))
}

/// `GET /api/v1/policies/current`
async fn current(State(s): State<ApiState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &headers,
        &[&s.auditor_group, &s.policy.config.admin_group],
    )
    .await?;
    let bundle = s.policy.store.current_bundle().await.map_err(unavailable)?;
    let Some(b) = bundle else {
        return Err(ApiError::BadRequest(
            "no policy bundle has been published".into(),
        ));
    };
    Ok(Json(json!({
        "version": b.version,
        "hash": b.hash,
        "dry_run": b.dry_run,
        "files": b.files.iter().map(|(n, _)| n).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    /// Revoke every token of this subject (`sub`).
    subject: Option<String>,
    /// Revoke one token by its `jti`.
    token_id: Option<String>,
    reason: Option<String>,
}

/// `POST /api/v1/revocations`
async fn revoke(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Json(req): Json<RevokeRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = authorize(&s, &headers, &[&s.policy.config.admin_group]).await?;
    let revoked = match (req.subject, req.token_id) {
        (Some(sub), None) if !sub.is_empty() => Revoked::Subject(sub),
        (None, Some(jti)) if !jti.is_empty() => Revoked::Token(jti),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of subject or token_id".into(),
            ));
        }
    };
    let (kind, value) = match &revoked {
        Revoked::Subject(v) => ("subject", v.clone()),
        Revoked::Token(v) => ("token", v.clone()),
    };
    record(
        &s.policy,
        Payload::IdentityRevoked(IdentityRevoked {
            kind: kind.into(),
            value: value.clone(),
            revoked_by: who.identity.subject.clone(),
            reason: req.reason.clone(),
        }),
    )
    .await?;
    s.policy
        .store
        .revoke(&Revocation {
            revoked,
            by: who.identity.subject.clone(),
            reason: req.reason,
            at: chrono::Utc::now().timestamp(),
        })
        .await
        .map_err(unavailable)?;
    tracing::info!(kind, by = %who.identity.subject, "identity revoked");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "revoked": { "kind": kind, "value": value } })),
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
    headers: HeaderMap,
    Json(req): Json<ExplainRequest>,
) -> Result<Json<Value>, ApiError> {
    authorize(
        &s,
        &headers,
        &[&s.auditor_group, &s.policy.config.admin_group],
    )
    .await?;
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
    let session = engine.session(
        &principal,
        &target,
        req.source_ip.as_deref().unwrap_or("127.0.0.1"),
    );
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
