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
pub use verifier::{VerifiedToken, Verifier, VerifierConfig};

/// Why a token was refused. `Display` is for logs; clients see [`AuthError::user_message`].
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm is not allowed, or does not fit its key")]
    UnsupportedAlgorithm,
    #[error("token key id is not in the issuer's JWKS")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token issuer does not match")]
    WrongIssuer,
    #[error("token audience does not match")]
    WrongAudience,
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
            Self::BadSignature => "bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
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
            Self::IssuerUnavailable(_) => {
                "the identity provider cannot be reached to check the token; try again"
            }
            _ => "the token was not accepted",
        }
    }
}
