//! The HTTP API: health, readiness and audit search.
//!
//! `/api/v1/*` needs `Authorization: Bearer <OIDC token>` (an API token) of
//! a caller who is not revoked and whom Cedar permits the route's action
//! (`api:read-audit`, `api:read-quarantine`: by default the auditor
//! group); every route is admitted by [`crate::auth`]. Lists are newest first and paged by an opaque
//! cursor (keyset pagination on `(time, id)`), so a page is as cheap at the end
//! of the log as at its start and stable while new events arrive.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use gatehouse_events::ExecutedStatement;
use gatehouse_identity::Verifier;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::QueryBuilder;
use uuid::Uuid;

use crate::audit::{AuditStore, Bind, Dialect, Filter};
use crate::auth::{self, ApiAction, Caller};

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The audit tables.
    pub audit: AuditStore,
    /// The event log and its streams of records.
    pub log: gatehouse_eventlog::LogBackend,
    pub verifier: Arc<Verifier>,
    /// Group a token must carry to read the audit API.
    pub auditor_group: String,
    /// Largest page size.
    pub max_page: u32,
    /// Policy pushes, revocations and what-if explanations.
    pub policy: crate::policy_api::PolicyApi,
    /// The projector's counters.
    pub projector: Arc<crate::ProjectorStats>,
    /// Approvals of commands waiting in sessions.
    pub approvals: gatehouse_policystore::approvals::Approvals,
}

/// The control plane's routes, state applied.
pub fn router(state: ApiState) -> Router {
    let audit = Router::new()
        .route("/api/v1/sessions", get(list_sessions))
        .route("/api/v1/commands", get(list_commands));
    let quarantine = Router::new().route("/api/v1/quarantine", get(list_quarantine));
    let routes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(auth::require(audit, &state, ApiAction::ReadAudit))
        .merge(auth::require(quarantine, &state, ApiAction::ReadQuarantine))
        .merge(crate::policy_api::routes(&state))
        .merge(crate::approval_api::routes(&state))
        .merge(crate::access_api::routes(&state));
    auth::layer(routes, &state).with_state(state)
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let nats_ok = s.log.connected();
    let db_ok = tokio::time::timeout(Duration::from_secs(2), s.audit.ping())
        .await
        .unwrap_or(false);
    let status = if nats_ok && db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        // Where events go; with NATS, its connection state under "nats".
        "event_log": if s.log.nats().is_some() { "nats" } else { "embedded" },
        "nats": s.log.nats().map(|n| format!("{:?}", n.connection_state()).to_lowercase()),
        "audit_db": if db_ok { "ok" } else { "unavailable" },
        // Where the audit tables are: postgres or sqlite.
        "audit_store": s.audit.kind(),
        // The policy version in force and its dry-run, if any.
        "policy": s.policy.readiness().await,
    });
    (status, Json(body)).into_response()
}

/// The raw query string of a list; each value is parsed in [`ListQuery::parse`]
/// so an error can name its parameter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    subject: Option<String>,
    user: Option<String>,
    target: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

struct ListQuery {
    /// The token subject (`sub`).
    subject: Option<String>,
    /// The user name (the startup user, the token's user name claim).
    user: Option<String>,
    target: Option<String>,
    /// Inclusive.
    since: Option<DateTime<Utc>>,
    /// Exclusive.
    until: Option<DateTime<Utc>>,
    limit: u32,
    /// Position of the last item of the previous page.
    after: Option<(DateTime<Utc>, Uuid)>,
}

const DEFAULT_LIMIT: u32 = 100;

impl ListQuery {
    fn parse(params: ListParams, max_page: u32) -> Result<Self, ApiError> {
        let time = |name: &'static str, v: Option<String>| {
            v.map(|v| {
                DateTime::parse_from_rfc3339(&v)
                    .map(|t| t.to_utc())
                    .map_err(|_| ApiError::param(name, "not an RFC 3339 time"))
            })
            .transpose()
        };
        let limit = parse_limit(params.limit, max_page)?;
        Ok(Self {
            subject: params.subject,
            user: params.user,
            target: params.target,
            since: time("since", params.since)?,
            until: time("until", params.until)?,
            limit,
            after: params.cursor.as_deref().map(decode_cursor).transpose()?,
        })
    }
}

/// A list query and the column that breaks ties of `time`.
struct Keyset<'a>(&'a ListQuery, &'static str);

impl Filter for Keyset<'_> {
    /// Appends the filters, the keyset condition, the order and the limit
    /// (one more row than the page, to know whether another page follows).
    fn push<DB: Dialect>(&self, sql: &mut QueryBuilder<DB>)
    where
        String: Bind<DB>,
        i64: Bind<DB>,
        Uuid: Bind<DB>,
    {
        let Keyset(q, id) = self;
        if let Some(subject) = &q.subject {
            sql.push(" AND identity_subject = ")
                .push_bind(subject.clone());
        }
        if let Some(user) = &q.user {
            sql.push(" AND identity_username = ")
                .push_bind(user.clone());
        }
        if let Some(target) = &q.target {
            sql.push(" AND target = ").push_bind(target.clone());
        }
        if let Some(since) = q.since {
            sql.push(" AND time >= ");
            DB::push_time(sql, since);
        }
        if let Some(until) = q.until {
            sql.push(" AND time < ");
            DB::push_time(sql, until);
        }
        if let Some((time, after)) = q.after {
            sql.push(format_args!(" AND (time, {id}) < ("));
            DB::push_time(sql, time);
            sql.push(", ").push_bind(after).push(")");
        }
        sql.push(format_args!(" ORDER BY time DESC, {id} DESC LIMIT "))
            .push_bind(i64::from(q.limit) + 1);
    }
}

/// Quarantine rows before an id, newest first.
struct Before {
    id: Option<i64>,
    limit: u32,
}

impl Filter for Before {
    fn push<DB: Dialect>(&self, sql: &mut QueryBuilder<DB>)
    where
        String: Bind<DB>,
        i64: Bind<DB>,
        Uuid: Bind<DB>,
    {
        if let Some(id) = self.id {
            sql.push(" AND id < ").push_bind(id);
        }
        sql.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(self.limit) + 1);
    }
}

fn parse_limit(limit: Option<String>, max_page: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT.min(max_page)),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=max_page).contains(&n) => Ok(n),
            _ => {
                let why = format!("must be an integer from 1 to {max_page}");
                Err(ApiError::param("limit", &why))
            }
        },
    }
}

/// One page of a list.
#[derive(Serialize)]
struct Page<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<T> Page<T> {
    fn new(mut items: Vec<T>, limit: u32, key: impl Fn(&T) -> (DateTime<Utc>, Uuid)) -> Self {
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next_cursor = more
            .then(|| items.last().map(|last| encode_cursor(key(last))))
            .flatten();
        Self { items, next_cursor }
    }
}

/// `base64url("<unix micros>.<uuid>")`: opaque to clients, exact for
/// PostgreSQL's microsecond timestamps.
fn encode_cursor((time, id): (DateTime<Utc>, Uuid)) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", time.timestamp_micros(), id.simple()))
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || ApiError::param("cursor", "not a cursor returned by this API");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = std::str::from_utf8(&raw).map_err(|_| bad())?;
    let (micros, id) = raw.split_once('.').ok_or_else(bad)?;
    let time = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((time, Uuid::parse_str(id).map_err(|_| bad())?))
}

#[derive(Serialize, sqlx::FromRow)]
struct SessionItem {
    session_id: Uuid,
    /// `opened_at`, or `closed_at` until the SessionOpened event is projected.
    time: DateTime<Utc>,
    worker_id: String,
    identity_subject: Option<String>,
    identity_username: Option<String>,
    identity_issuer: Option<String>,
    #[sqlx(json)]
    groups: Vec<String>,
    delegation: Option<Value>,
    target: Option<String>,
    client_addr: Option<String>,
    client_tls: Option<bool>,
    target_tls: Option<bool>,
    application_name: Option<String>,
    opened_at: Option<DateTime<Utc>>,
    closed_at: Option<DateTime<Utc>>,
    close_reason: Option<String>,
    commands: Option<i64>,
    bytes_from_client: Option<i64>,
    bytes_to_client: Option<i64>,
}

async fn list_sessions(
    State(s): State<ApiState>,
    _: Caller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<SessionItem>>, ApiError> {
    let q = ListQuery::parse(params?.0, s.max_page)?;
    // groups as JSON: a text[] in PostgreSQL, JSON text in SQLite.
    let sessions = if matches!(s.audit, AuditStore::Postgres(_)) {
        "to_jsonb(groups)"
    } else {
        "groups"
    };
    let sessions = format!(
        "SELECT session_id, time, worker_id, identity_subject, identity_username,
            identity_issuer, {sessions} AS groups, delegation, target, client_addr, client_tls, target_tls,
            application_name, opened_at, closed_at, close_reason, commands,
            bytes_from_client, bytes_to_client
         FROM sessions WHERE true"
    );
    let rows = s.audit.fetch(&sessions, &Keyset(&q, "session_id")).await?;
    Ok(Json(Page::new(rows, q.limit, |r: &SessionItem| {
        (r.time, r.session_id)
    })))
}

#[derive(Serialize, sqlx::FromRow)]
struct CommandItem {
    event_id: Uuid,
    session_id: Option<Uuid>,
    seq: i64,
    time: DateTime<Utc>,
    identity_subject: Option<String>,
    identity_username: Option<String>,
    delegation: Option<Value>,
    target: Option<String>,
    protocol: String,
    statement: String,
    statement_name: Option<String>,
    portal: Option<String>,
    params: Value,
    /// The prepared statements the command runs by name, each `{name,
    /// text}` with the text it was prepared from; empty when it runs none.
    #[sqlx(json)]
    executes: Vec<ExecutedStatement>,
    /// The policy decision (`effect`, `enforced`, `policies`, `reason`,
    /// bundle version and hash), when the worker decided.
    decision: Option<Value>,
}

async fn list_commands(
    State(s): State<ApiState>,
    _: Caller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<CommandItem>>, ApiError> {
    let q = ListQuery::parse(params?.0, s.max_page)?;
    let commands = "SELECT event_id, session_id, seq, time, identity_subject, identity_username,
            delegation, target, protocol, statement, statement_name, portal, params,
            coalesce(executes, '[]') AS executes, decision
         FROM commands WHERE true";
    let rows = s.audit.fetch(commands, &Keyset(&q, "event_id")).await?;
    Ok(Json(Page::new(rows, q.limit, |r: &CommandItem| {
        (r.time, r.event_id)
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineParams {
    limit: Option<String>,
    cursor: Option<String>,
}

/// A message or event the projector could not project.
#[derive(Serialize, sqlx::FromRow)]
struct QuarantineItem {
    id: i64,
    received_at: DateTime<Utc>,
    stream_seq: i64,
    subject: String,
    /// Position of the event in its message; null for a whole message that
    /// did not decode.
    event_index: Option<i32>,
    event_id: Option<Uuid>,
    event_type: Option<String>,
    session_id: Option<Uuid>,
    /// The decode error, or the audit database's SQLSTATE and message.
    reason: String,
    /// The bytes as published (the message, or the event's own JSON),
    /// standard base64.
    #[serde(serialize_with = "base64_standard")]
    raw: Vec<u8>,
}

fn base64_standard<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(bytes))
}

#[derive(Serialize)]
struct QuarantinePage {
    items: Vec<QuarantineItem>,
    next_cursor: Option<String>,
    /// Rows this control plane's projector has quarantined since it
    /// started (not the size of the table).
    total: u64,
}

/// Newest first, paged by id: the cursor is the last id of the page.
async fn list_quarantine(
    State(s): State<ApiState>,
    _: Caller,
    params: Result<Query<QuarantineParams>, QueryRejection>,
) -> Result<Json<QuarantinePage>, ApiError> {
    let params = params?.0;
    let limit = parse_limit(params.limit, s.max_page)?;
    let before = params.cursor.as_deref().map(decode_id_cursor).transpose()?;
    let select = "SELECT id, received_at, stream_seq, subject, event_index, event_id, event_type,
            session_id, reason, raw
         FROM quarantine WHERE true";
    let before = Before { id: before, limit };
    let mut rows: Vec<QuarantineItem> = s.audit.fetch(select, &before).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|last| encode_id_cursor(last.id)))
        .flatten();
    Ok(Json(QuarantinePage {
        items: rows,
        next_cursor,
        total: s.projector.quarantined(),
    }))
}

/// `base64url("q.<id>")`: opaque like the other cursors.
fn encode_id_cursor(id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("q.{id}"))
}

fn decode_id_cursor(cursor: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::param("cursor", "not a cursor returned by this API");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = std::str::from_utf8(&raw).map_err(|_| bad())?;
    raw.strip_prefix("q.")
        .and_then(|id| id.parse().ok())
        .ok_or_else(bad)
}

/// What an API client sees on failure: `{"error": "..."}` with a status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource is not in a state that allows the request (an approval
    /// already decided).
    #[error("{0}")]
    Conflict(String),
    /// A request the server understood but whose content is invalid, with
    /// details (e.g. policy problems with file:line).
    #[error("{message}")]
    Invalid {
        message: String,
        details: Vec<String>,
    },
    /// The caller has too much under way already (429).
    #[error("{0}")]
    TooMany(String),
    #[error("{0} unavailable; try again")]
    Unavailable(&'static str),
    #[error("the body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("the request body is too large")]
    BodyTooLarge,
    #[error("internal error")]
    Internal,
    #[error("audit database unavailable; try again")]
    Db(#[from] sqlx::Error),
}

impl ApiError {
    fn param(name: &str, why: &str) -> Self {
        Self::BadRequest(format!("{name}: {why}"))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::BadRequest(e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Db(e) => {
                tracing::error!(error = %e, "audit query failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let body = match &self {
            Self::Invalid { message, details } => json!({ "error": message, "details": details }),
            _ => json!({ "error": self.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let t = DateTime::from_timestamp_micros(1_795_660_800_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor((t, id))).unwrap(), (t, id));
        assert!(decode_cursor("nope!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("12.not-a-uuid")).is_err());
        assert_eq!(decode_id_cursor(&encode_id_cursor(42)).unwrap(), 42);
        assert!(decode_id_cursor(&encode_cursor((t, id))).is_err());
        assert!(decode_id_cursor("nope!").is_err());
    }

    #[test]
    fn list_parameters_are_checked_by_name() {
        let params = |limit: &str, since: &str| ListParams {
            subject: None,
            user: None,
            target: None,
            since: Some(since.into()),
            until: None,
            limit: Some(limit.into()),
            cursor: None,
        };
        let err = |p| ListQuery::parse(p, 500).err().unwrap().to_string();
        assert!(err(params("0", "2026-01-01T00:00:00Z")).starts_with("limit:"));
        assert!(err(params("501", "2026-01-01T00:00:00Z")).starts_with("limit:"));
        assert!(err(params("5", "yesterday")).starts_with("since:"));
        let q = ListQuery::parse(params("5", "2026-01-01T00:00:00+02:00"), 500).unwrap();
        assert_eq!(q.limit, 5);
        assert_eq!(q.since.unwrap().to_rfc3339(), "2025-12-31T22:00:00+00:00");
    }
}
