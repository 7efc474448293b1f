//! CloudEvents 1.0 structured-mode JSON encoding of [`Event`].
//!
//! Envelope fields map to CloudEvents attributes where one exists (`id`,
//! `time`, `type`, `source`, `subject` = session id); the rest of the envelope
//! and the payload travel in `data`:
//!
//! ```json
//! {"specversion":"1.0","id":"…","source":"/gatehouse/workers/w1",
//!  "type":"dev.gatehouse.command_received.v1","time":"…",
//!  "datacontenttype":"application/json","subject":"<session id>",
//!  "data":{"worker_id":"w1","session_id":"…","seq":3,"identity":{…},
//!          "target":"app","payload":{…}}}
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::{Event, EventType, Identity, Payload, SCHEMA_VERSION};

/// Content type of one structured-mode event.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Content type of a JSON array of structured-mode events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported CloudEvents specversion {0:?}")]
    SpecVersion(String),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("unsupported schema version {version} for {ty}")]
    UnsupportedVersion { ty: EventType, version: u32 },
}

/// The decoding side: one event as read off the wire.
#[derive(Deserialize)]
struct CloudEvent {
    specversion: String,
    id: Uuid,
    #[serde(rename = "type")]
    ty: String,
    time: DateTime<Utc>,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_id: Option<Uuid>,
    #[serde(default)]
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<Identity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    payload: Box<RawValue>,
}

/// The encoding side of [`CloudEvent`]: the same document, borrowed from the
/// event and written straight into the output buffer (no intermediate
/// `serde_json::Value`, no copies of the envelope's strings).
#[derive(Serialize)]
struct CloudEventRef<'a> {
    specversion: &'static str,
    id: Uuid,
    source: Source<'a>,
    #[serde(rename = "type")]
    ty: CloudEventType,
    time: DateTime<Utc>,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Uuid>,
    data: DataRef<'a>,
}

#[derive(Serialize)]
struct DataRef<'a> {
    worker_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<Uuid>,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    payload: PayloadRef<'a>,
}

/// `/gatehouse/workers/<worker id>`.
struct Source<'a>(&'a str);

impl Serialize for Source<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("/gatehouse/workers/{}", self.0))
    }
}

/// `dev.gatehouse.<type>.v<schema version>`.
struct CloudEventType(EventType);

impl Serialize for CloudEventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!(
            "dev.gatehouse.{}.v{SCHEMA_VERSION}",
            self.0.token()
        ))
    }
}

/// The payload as the bare object of its variant (the type is in `type`).
struct PayloadRef<'a>(&'a Payload);

impl Serialize for PayloadRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Payload::SessionOpened(p) => p.serialize(s),
            Payload::AuthenticationFailed(p) => p.serialize(s),
            Payload::CommandReceived(p) => p.serialize(s),
            Payload::SessionClosed(p) => p.serialize(s),
            Payload::PolicyBundlePublished(p) => p.serialize(s),
            Payload::IdentityRevoked(p) => p.serialize(s),
            Payload::IdentityReinstated(p) => p.serialize(s),
            Payload::ResponseRecorded(p) => p.serialize(s),
        }
    }
}

impl Event {
    fn to_wire(&self) -> CloudEventRef<'_> {
        CloudEventRef {
            specversion: "1.0",
            id: self.id,
            source: Source(&self.worker_id),
            ty: CloudEventType(self.event_type()),
            time: self.time,
            datacontenttype: "application/json",
            subject: self.session_id,
            data: DataRef {
                worker_id: &self.worker_id,
                session_id: self.session_id,
                seq: self.seq,
                identity: self.identity.as_ref(),
                target: self.target.as_deref(),
                payload: PayloadRef(&self.payload),
            },
        }
    }

    /// Encodes the event as one CloudEvents structured-mode JSON document.
    pub fn to_cloudevent(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.encode_into(&mut out);
        out
    }

    /// Appends the event's CloudEvents structured-mode JSON to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, &self.to_wire()).expect("events serialize to JSON");
    }

    fn from_wire(ce: CloudEvent) -> Result<Self, DecodeError> {
        if ce.specversion != "1.0" {
            return Err(DecodeError::SpecVersion(ce.specversion));
        }
        let (ty, version) = EventType::from_cloudevent_type(&ce.ty)
            .ok_or_else(|| DecodeError::UnknownType(ce.ty.clone()))?;
        // Version 1 is the only schema so far. A later version adds an arm
        // here that upgrades the old shape; fixtures keep every version honest.
        if version != 1 {
            return Err(DecodeError::UnsupportedVersion { ty, version });
        }
        let p = ce.data.payload.get();
        let payload = match ty {
            EventType::SessionOpened => Payload::SessionOpened(serde_json::from_str(p)?),
            EventType::AuthenticationFailed => {
                Payload::AuthenticationFailed(serde_json::from_str(p)?)
            }
            EventType::CommandReceived => Payload::CommandReceived(serde_json::from_str(p)?),
            EventType::SessionClosed => Payload::SessionClosed(serde_json::from_str(p)?),
            EventType::PolicyBundlePublished => {
                Payload::PolicyBundlePublished(serde_json::from_str(p)?)
            }
            EventType::IdentityRevoked => Payload::IdentityRevoked(serde_json::from_str(p)?),
            EventType::IdentityReinstated => Payload::IdentityReinstated(serde_json::from_str(p)?),
            EventType::ResponseRecorded => Payload::ResponseRecorded(serde_json::from_str(p)?),
        };
        Ok(Event {
            id: ce.id,
            time: ce.time,
            worker_id: ce.data.worker_id,
            session_id: ce.data.session_id,
            seq: ce.data.seq,
            identity: ce.data.identity,
            target: ce.data.target,
            payload,
        })
    }
}

/// Encodes several events as a CloudEvents JSON batch (a JSON array).
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let encoded: Vec<Vec<u8>> = events.iter().map(Event::to_cloudevent).collect();
    join_batch(&encoded)
}

/// Joins events already encoded ([`Event::to_cloudevent`]) into a
/// CloudEvents JSON batch.
pub fn join_batch(encoded: &[impl AsRef<[u8]>]) -> Vec<u8> {
    let len = encoded.iter().map(|e| e.as_ref().len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, event) in encoded.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event.as_ref());
    }
    out.push(b']');
    out
}

/// Decodes a message body: one structured-mode event or a batch.
pub fn decode(body: &[u8]) -> Result<Vec<Event>, DecodeError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let wire: Vec<CloudEvent> = serde_json::from_slice(body)?;
        wire.into_iter().map(Event::from_wire).collect()
    } else {
        let wire: CloudEvent = serde_json::from_slice(body)?;
        Ok(vec![Event::from_wire(wire)?])
    }
}
