//! Decisions on every command, made in-process by the worker.
//!
//! [`classify`] turns SQL text into [`Classification`]: what each statement
//! does (its [`StatementKind`]), which tables it reads and writes, which
//! functions it calls, whether an UPDATE/DELETE has a WHERE clause. The
//! Cedar engine ([`Engine`]) decides each statement from those facts, the
//! speaker's identity and the target, with the policies of a bundle.
//!
//! Pure: no I/O, no NATS, no Postgres wire. The worker feeds it, the control
//! plane validates and explains with it.
#![forbid(unsafe_code)]

mod bundle;
mod classify;
mod engine;
mod facts;

pub use bundle::{
    Bundle, BundleError, DryRun, MAX_DRY_RUN_SECS, Problem, SCHEMA, SCHEMA_FILE, Severity,
};
pub use classify::{
    Classifier, Known, REDACTED, Reading, SecretArgs, SecretKind, Secrets, classify, find_secrets,
    find_secrets_with, is_connection_secret, is_secret_name, json_holds_secret,
};
pub use engine::corpus::{
    CaseResult, TestError, TestReport, run_corpus, run_tests, run_tests_against,
};
pub use engine::{
    ApiAction, ApiAuthority, Decision, Effect, Engine, Principal, Session, TargetInfo,
    parse_duration,
};
pub use facts::{Classification, Deallocates, Output, Outputs, StatementFacts, StatementKind};
