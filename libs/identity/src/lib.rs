//! Who is speaking: OIDC token (JWT) verification for Postgres clients (token as
//! password) and HTTP API callers (bearer token), plus a small development OIDC
//! issuer for `gatehouse dev`, `gatehouse token` and tests.
//!
//! Depends on `gatehouse-events` only for the `Identity` type. It must not depend
//! on the data plane, the control plane, NATS or SQL. Crypto is ring/RustCrypto
//! only (never aws-lc).
#![forbid(unsafe_code)]

mod dev_issuer;
mod verifier;

pub use dev_issuer::{DevIssuer, TokenRequest, parse_ttl};
pub use gatehouse_events::{Actor, Identity};
pub use verifier::{Plane, VerifiedToken, Verifier, VerifierConfig};

/// Why a token was refused. `Display` is for logs; clients see [`AuthError::user_message`].
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm is not allowed, or does not fit its key")]
    UnsupportedAlgorithm,
    #[error("token key id is not in the issuer's JWKS")]
    UnknownKey,
    /// The issuer's JWKS lists the token's key id more than once.
    #[error("token key id appears more than once in the issuer's JWKS")]
    AmbiguousKey,
    /// The token's key was not loaded: an RSA key under 2048 bits, or a curve not allowed.
    #[error("token key is too weak or on a curve that is not allowed")]
    RefusedKey,
    /// The header has `crit`: it requires extensions, and none is understood.
    #[error("token header names critical extensions (crit), which are not supported")]
    CriticalExtension,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    /// `exp - iat` (or `exp - now` without `iat`) is over `max_token_lifetime_secs`.
    #[error("token lifetime is longer than allowed")]
    LifetimeTooLong,
    #[error("token issuer does not match")]
    WrongIssuer,
    #[error("token audience does not match")]
    WrongAudience,
    /// The token's audience is the other plane's (an API token at a worker,
    /// a database login token at the API); `Plane` is where it was used.
    #[error("token is for the other plane (its audience is not the {}'s)", .0.as_str())]
    WrongPlane(verifier::Plane),
    /// A required claim is absent, or a claim has the wrong shape.
    #[error("token claim `{0}` is missing or malformed")]
    MissingClaim(&'static str),
    #[error("identity provider unavailable: {0}")]
    IssuerUnavailable(String),
}

impl AuthError {
    /// Stable snake_case code for audit events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::UnknownKey => "unknown_key",
            Self::AmbiguousKey => "ambiguous_key",
            Self::RefusedKey => "key_refused",
            Self::CriticalExtension => "unsupported_critical_header",
            Self::BadSignature => "bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::IssuedInFuture => "token_issued_in_future",
            Self::LifetimeTooLong => "token_lifetime_too_long",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::WrongPlane(_) => "token_for_other_plane",
            Self::MissingClaim(_) => "missing_claim",
            Self::IssuerUnavailable(_) => "issuer_unavailable",
        }
    }

    /// What the client sees: readable, and with nothing that helps an attacker.
    pub fn user_message(&self) -> &'static str {
        match self {
            Self::Expired => "the token has expired; get a new one and reconnect",
            Self::NotYetValid => "the token is not valid yet",
            Self::Malformed => "the password must be an OIDC token (a JWT)",
            Self::IssuedInFuture => {
                "the token's issue time is in the future; check the clocks and get a new token"
            }
            Self::LifetimeTooLong => {
                "the token is valid for longer than allowed; get one with a shorter lifetime"
            }
            Self::CriticalExtension => {
                "the token requires header extensions (crit) that are not supported"
            }
            Self::AmbiguousKey => {
                "the identity provider publishes the token's signing key ambiguously; \
                 tell an administrator"
            }
            Self::RefusedKey => {
                "the token's signing key is too weak or of a kind that is not accepted"
            }
            Self::IssuerUnavailable(_) => {
                "the identity provider cannot be reached to check the token; try again"
            }
            Self::WrongPlane(verifier::Plane::Worker) => {
                "this token is for the Gatehouse API, not for database logins; get a token \
                 whose audience is one of oidc.worker_audiences (gatehouse token --for worker)"
            }
            Self::WrongPlane(verifier::Plane::Api) => {
                "this token is for database logins, not for the Gatehouse API; get a token \
                 whose audience is one of oidc.api_audiences (gatehouse token --for api)"
            }
            _ => "the token was not accepted",
        }
    }
}
