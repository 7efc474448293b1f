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
use serde_json::Value;
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

#[derive(Serialize, Deserialize)]
struct CloudEvent {
    specversion: String,
    id: Uuid,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    time: DateTime<Utc>,
    datacontenttype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    data: Data,
}

#[derive(Serialize, Deserialize)]
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
    payload: Value,
}

impl Event {
    fn to_wire(&self) -> CloudEvent {
        let payload = match &self.payload {
            Payload::SessionOpened(p) => serde_json::to_value(p),
            Payload::AuthenticationFailed(p) => serde_json::to_value(p),
            Payload::CommandReceived(p) => serde_json::to_value(p),
            Payload::SessionClosed(p) => serde_json::to_value(p),
            Payload::PolicyBundlePublished(p) => serde_json::to_value(p),
            Payload::IdentityRevoked(p) => serde_json::to_value(p),
        }
        .expect("payloads serialize to JSON");
        CloudEvent {
            specversion: "1.0".into(),
            id: self.id,
            source: format!("/gatehouse/workers/{}", self.worker_id),
            ty: self.event_type().cloudevent_type(SCHEMA_VERSION),
            time: self.time,
            datacontenttype: "application/json".into(),
            subject: self.session_id.map(|s| s.to_string()),
            data: Data {
                worker_id: self.worker_id.clone(),
                session_id: self.session_id,
                seq: self.seq,
                identity: self.identity.clone(),
                target: self.target.clone(),
                payload,
            },
        }
    }

    /// Encodes the event as one CloudEvents structured-mode JSON document.
    pub fn to_cloudevent(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_wire()).expect("events serialize to JSON")
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
        let p = ce.data.payload;
        let payload = match ty {
            EventType::SessionOpened => Payload::SessionOpened(serde_json::from_value(p)?),
            EventType::AuthenticationFailed => {
                Payload::AuthenticationFailed(serde_json::from_value(p)?)
            }
            EventType::CommandReceived => Payload::CommandReceived(serde_json::from_value(p)?),
            EventType::SessionClosed => Payload::SessionClosed(serde_json::from_value(p)?),
            EventType::PolicyBundlePublished => {
                Payload::PolicyBundlePublished(serde_json::from_value(p)?)
            }
            EventType::IdentityRevoked => Payload::IdentityRevoked(serde_json::from_value(p)?),
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
    let wire: Vec<CloudEvent> = events.iter().map(Event::to_wire).collect();
    serde_json::to_vec(&wire).expect("events serialize to JSON")
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
