//! The Gatehouse event contract.
//!
//! Every fact the gateway records is an [`Event`]: a versioned envelope (who,
//! where, when, which session, in which order) around a typed [`Payload`].
//! Events travel on NATS JetStream as CloudEvents 1.0 structured-mode JSON
//! ([`Event::to_cloudevent`]); several events of one type may travel together as
//! a CloudEvents JSON batch ([`encode_batch`]). [`decode`] reads both.
//!
//! Subjects are derived from event types by [`Subjects`]; nobody types a
//! subject by hand. `EVENTS.md` in this folder documents the scheme and every
//! event type.
//!
//! This crate holds the contract only: no tokio, no NATS, no SQL.
#![forbid(unsafe_code)]

pub mod approval;
mod cloudevent;
mod envelope;
mod payload;
mod subject;

pub use cloudevent::{
    BATCH_CONTENT_TYPE, CONTENT_TYPE, DecodeError, decode, encode_batch, join_batch,
};
pub use envelope::{Actor, Event, Identity};
pub use payload::{
    AuthenticationFailed, Cell, CloseReason, CommandReceived, DecisionEffect, DecisionRecord,
    DryRunScope, ExecutedStatement, IdentityReinstated, IdentityRevoked, MaskingCounts, Param,
    ParamFormat, Payload, PolicyBundlePublished, Protocol, Redaction, ResponseRecorded,
    ResponseSummary, SessionClosed, SessionOpened, ValueEncoding,
};
pub use subject::{EventType, Subjects};

/// The schema version written by this build. Older versions stay decodable.
pub const SCHEMA_VERSION: u32 = 1;
