//! The one authorization path of `/api/v1/*`.
//!
//! Every route of the API sits behind [`require`], which names the Cedar
//! action the route performs ([`ApiAction`]): a middleware that, before
//! the handler runs and before any body is read,
//!
//! 1. verifies the bearer token as an API token (401 if missing or not
//!    accepted, a token meant for database logins included; 503 if the
//!    identity provider cannot be reached);
//! 2. checks the token's subject, its token id (`jti`) and every subject of
//!    its delegation chain (`act`) against the revocations in the policy
//!    store, read at that moment: a revoked one (whose last record is a
//!    revocation, not a reinstatement) is 401, and if the store
//!    cannot be read the answer is 503: the API never admits a caller it
//!    cannot check;
//!    The token's user name must be printable ASCII and not another
//!    subject's in the user name registry (401; 503 if it cannot be read),
//!    as at a worker's login;
//! 3. decides the action with Cedar ([`ApiAuthority`]): the principal is
//!    built from the token as the worker builds it (a delegated token is
//!    the agent acting, in none of the groups of the person it acts for),
//!    the policies are the built-in ones for the admin and auditor groups
//!    with the current bundle's (read at that moment, 503 if it cannot
//!    be); a denial is 403 with the policy's reason.
//!
//! The verified caller is handed to the handler as [`Caller`]; a handler
//! that asks for it on a route without this middleware fails closed (500).
//! Request bodies are read by handlers only, through [`JsonBody`], whose
//! 400 names what is wrong with the JSON but no internal type.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use futures::future::try_join_all;
use gatehouse_identity::{AuthError, Plane, VerifiedToken};
pub(crate) use gatehouse_policies::ApiAction;
use gatehouse_policies::{ApiAuthority, Effect, Engine, Principal};
use gatehouse_policystore::Revoked;
use serde::de::DeserializeOwned;

use crate::api::{ApiError, ApiState};

/// The API's decisions: the built-in policies and the engine of the
/// current bundle, kept while its hash stays current. One per router,
/// reached by the middleware as a request extension (see [`layer`]).
pub(crate) struct Authority {
    policies: ApiAuthority,
    engine: Mutex<Option<Arc<Engine>>>,
}

impl Authority {
    fn new(s: &ApiState) -> Self {
        Self {
            policies: ApiAuthority::new(&s.policy.config.admin_group, &s.auditor_group),
            engine: Mutex::new(None),
        }
    }

    /// The current bundle's engine, read from the policy store now (`None`:
    /// no bundle). A store that cannot be read is 503. A current bundle
    /// that does not validate (it cannot have come through the API) leaves
    /// the built-in policies to decide replacing it, and refuses the rest.
    pub(crate) async fn engine(
        &self,
        s: &ApiState,
        action: ApiAction,
    ) -> Result<Option<Arc<Engine>>, ApiError> {
        let bundle = s.policy.store.current_bundle().await.map_err(|e| {
            tracing::warn!(error = %e, "cannot read the current bundle; refusing the API request");
            ApiError::Unavailable("policy store")
        })?;
        let Some(bundle) = bundle else {
            return Ok(None);
        };
        if let Some(e) = self.engine.lock().expect("poisoned").as_ref()
            && e.bundle_hash() == bundle.hash
        {
            return Ok(Some(e.clone()));
        }
        match Engine::new(&bundle) {
            Ok(engine) => {
                let engine = Arc::new(engine);
                *self.engine.lock().expect("poisoned") = Some(engine.clone());
                Ok(Some(engine))
            }
            Err(e) if matches!(action, ApiAction::PushPolicy | ApiAction::RollbackPolicy) => {
                tracing::error!(hash = %bundle.hash, error = %e, "the current bundle does not validate; the built-in API policies decide alone");
                Ok(None)
            }
            Err(e) => {
                tracing::error!(hash = %bundle.hash, error = %e, "the current bundle does not validate; refusing the API request");
                Err(ApiError::Unavailable("a valid policy bundle"))
            }
        }
    }
}

/// Makes the router's [`Authority`] available to [`require`]'s middleware;
/// applied once, around every route.
pub(crate) fn layer(router: Router<ApiState>, state: &ApiState) -> Router<ApiState> {
    router.layer(axum::Extension(Arc::new(Authority::new(state))))
}

/// A caller admitted by [`require`].
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub token: VerifiedToken,
    /// The address the request came from (`0.0.0.0` when unknown).
    pub source_ip: String,
}

impl Caller {
    pub fn subject(&self) -> &str {
        &self.token.identity.subject
    }
}

/// The Cedar principal of a verified identity, built as the worker builds
/// a session's: a delegated token is the agent acting, in no group of the
/// person it acts for.
pub(crate) fn principal(identity: &gatehouse_identity::Identity, agent_group: &str) -> Principal {
    Principal::from_claims(
        identity.subject.clone(),
        Some(identity.username.clone()),
        identity.groups.clone(),
        identity
            .delegation
            .iter()
            .map(|a| a.subject.clone())
            .collect(),
        agent_group,
    )
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!(path = %parts.uri.path(), "a route that needs a caller is not behind the authorization middleware");
            ApiError::Internal
        })
    }
}

#[derive(Clone)]
struct Gate {
    state: ApiState,
    action: ApiAction,
}

/// Puts every route of `routes` behind the authorization middleware, as
/// `action`. Every `/api/v1` route is added through this.
pub(crate) fn require(
    routes: Router<ApiState>,
    state: &ApiState,
    action: ApiAction,
) -> Router<ApiState> {
    let gate = Gate {
        state: state.clone(),
        action,
    };
    routes.route_layer(middleware::from_fn_with_state(gate, authorize))
}

async fn authorize(
    State(gate): State<Gate>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(authority) = req.extensions().get::<Arc<Authority>>().cloned() else {
        tracing::error!(path = %req.uri().path(), "the API's authority is not layered around this route");
        return Err(ApiError::Internal);
    };
    let source_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "0.0.0.0".to_string(), |c| c.0.ip().to_string());
    let caller = admit(
        &gate.state,
        &authority,
        req.headers(),
        gate.action,
        &source_ip,
    )
    .await?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Steps 1–3 of the module documentation. The token itself is never logged.
async fn admit(
    s: &ApiState,
    authority: &Authority,
    headers: &axum::http::HeaderMap,
    action: ApiAction,
    source_ip: &str,
) -> Result<Caller, ApiError> {
    let token = bearer(headers).ok_or(ApiError::Unauthorized("missing bearer token"))?;
    let verified = s.verifier.verify(token, Plane::Api).await.map_err(|e| {
        tracing::info!(reason = e.reason(), "API token rejected");
        match e {
            AuthError::IssuerUnavailable(_) => ApiError::Unavailable("identity provider"),
            AuthError::Expired => ApiError::Unauthorized("the token has expired"),
            AuthError::WrongPlane(_) => ApiError::Unauthorized(e.user_message()),
            _ => ApiError::Unauthorized("the token was not accepted"),
        }
    })?;
    let identity = &verified.identity;

    if let Some(revoked) = revoked(s, &verified).await? {
        tracing::info!(subject = %identity.subject, revoked = ?revoked, "API refused: revoked");
        return Err(ApiError::Unauthorized(
            "the token or its identity has been revoked",
        ));
    }

    user_name(s, identity).await?;

    let principal = principal(identity, &s.policy.config.agent_group);
    let engine = authority.engine(s, action).await?;
    let decision = authority
        .policies
        .decide(engine.as_deref(), &principal, action, source_ip);
    if decision.effect != Effect::Allow {
        tracing::info!(
            subject = %identity.subject,
            actors = identity.delegation.len(),
            action = action.name(),
            policies = ?decision.policies,
            "API refused by policy"
        );
        let mut message = decision
            .reason
            .unwrap_or_else(|| format!("not permitted to {}", action.describe()));
        if !identity.delegation.is_empty() {
            message.push_str(
                "; the token is delegated (act): an agent acting for someone does not \
                 inherit their rights to administer Gatehouse unless a policy grants them",
            );
        }
        return Err(ApiError::Forbidden(message));
    }
    Ok(Caller {
        token: verified,
        source_ip: source_ip.to_string(),
    })
}

/// The caller's user name is one the workers would let it log in under,
/// so that `principal.name` means on the API what it means in a session:
/// printable ASCII (401 otherwise), and not bound to another subject in the
/// user name registry, read now (401 if it is, 503 if the registry cannot
/// be read). A name no worker has bound yet is admitted as it is; the API
/// does not bind names.
async fn user_name(s: &ApiState, identity: &gatehouse_identity::Identity) -> Result<(), ApiError> {
    use gatehouse_policystore::usernames;
    let Some(key) = usernames::key(&identity.username) else {
        tracing::info!(subject = %identity.subject, "API refused: user name outside printable ASCII");
        return Err(ApiError::Unauthorized(
            "the token's user name contains characters outside printable ASCII; Gatehouse \
             accepts user names of printable ASCII only",
        ));
    };
    let records = s.log.records();
    let stream = usernames::stream_for(&s.policy.config.revocation_stream);
    match usernames::owner(&records, &stream, &key).await {
        Ok(Some(owner)) if owner != identity.subject => {
            tracing::info!(subject = %identity.subject, "API refused: user name belongs to another subject");
            Err(ApiError::Unauthorized(
                "the token's user name belongs to another identity (each user name belongs to \
                 the first subject that logged in with it)",
            ))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the user name registry; refusing the API request");
            Err(ApiError::Unavailable("user name registry"))
        }
    }
}

/// What a verified token is checked against: its subject, its `jti`, and
/// every subject of its delegation chain.
fn revocable(token: &VerifiedToken) -> Vec<Revoked> {
    let mut out = vec![Revoked::Subject(token.identity.subject.clone())];
    out.extend(token.token_id.iter().map(|t| Revoked::Token(t.clone())));
    out.extend(
        token
            .identity
            .delegation
            .iter()
            .map(|a| Revoked::Subject(a.subject.clone())),
    );
    out
}

/// The first of the token's identities that is revoked, read from the
/// policy store now; an error (503) when the store cannot answer.
async fn revoked(s: &ApiState, token: &VerifiedToken) -> Result<Option<Revoked>, ApiError> {
    let names = revocable(token);
    let store = &s.policy.store;
    let found = try_join_all(names.iter().map(|r| store.is_revoked(r)))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot read revocations; refusing the API request");
            ApiError::Unavailable("revocation list")
        })?;
    // An identity's last record is its revocation or its reinstatement; one
    // that cannot be read or checked counts as a revocation.
    Ok(names
        .into_iter()
        .zip(found)
        .find_map(|(name, revoked)| revoked.then_some(name)))
}

pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A JSON request body. Read only by handlers, so after [`require`] has
/// admitted the caller. Its errors are 400 (415 without a JSON content
/// type, 413 past the body limit) with a message about the JSON, never the
/// name of a type of this crate.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| {
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge
            } else {
                ApiError::BadRequest("the request body could not be read".into())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(json_problem(&e)))
    }
}

/// A client-facing description of a JSON body error: syntax errors as they
/// are, data errors with serde's "struct Name"/"enum Name" expectations
/// replaced by what the client should send.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Eof => {
            format!("the body is not valid JSON (line {line}, column {column})")
        }
        Category::Io => "the request body could not be read".into(),
        Category::Data => {
            let text = e.to_string();
            let text = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(msg, _)| msg);
            format!(
                "the body does not match the request: {} (line {line}, column {column})",
                scrub_type_names(text)
            )
        }
    }
}

/// Replaces `struct Name` and `enum Name` (how serde describes what it
/// expected) by a description that names no Rust type.
fn scrub_type_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = ["struct ", "enum "]
            .iter()
            .filter_map(|kw| rest.find(kw).map(|i| (i, *kw)))
            .min();
        let Some((i, kw)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i]);
        let after = &rest[i + kw.len()..];
        let name_end = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        out.push_str(if kw == "struct " {
            "an object"
        } else {
            "one of the documented values"
        });
        rest = &after[name_end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};
    use serde::Deserialize;

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct SecretInternalRequest {
        files: Vec<(String, String)>,
        kind: SecretKind,
    }

    #[derive(Debug, Deserialize)]
    enum SecretKind {
        A,
    }

    fn problem(body: &str) -> String {
        json_problem(&serde_json::from_str::<SecretInternalRequest>(body).unwrap_err())
    }

    #[test]
    fn json_problems_name_no_internal_type() {
        for body in [
            "{not json",
            "",
            "42",
            "[]",
            r#"{"files": 3, "kind": "A"}"#,
            r#"{"files": [], "kind": "B"}"#,
            r#"{"files": [], "kind": 1}"#,
            r#"{"files": []}"#,
            r#"{"files": [], "kind": "A", "extra": 1}"#,
        ] {
            let p = problem(body);
            assert!(!p.contains("Secret"), "{body:?}: {p}");
            assert!(!p.contains("struct"), "{body:?}: {p}");
            assert!(p.contains("line"), "{body:?}: {p}");
        }
        assert!(problem("{not json").contains("not valid JSON"));
        assert!(problem("42").contains("expected an object"));
        assert!(problem(r#"{"files": []}"#).contains("missing field `kind`"));
        assert!(problem(r#"{"files": [], "kind": "A", "x": 1}"#).contains("unknown field `x`"));
    }
}
