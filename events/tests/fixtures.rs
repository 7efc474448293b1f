//! Every fixture of every schema version still decodes, and what this build
//! encodes decodes back to the same event.

use std::path::Path;

use gatehouse_events::*;
use uuid::Uuid;

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut out = Vec::new();
    for version in std::fs::read_dir(&root).unwrap() {
        let version = version.unwrap().path();
        for file in std::fs::read_dir(&version).unwrap() {
            let file = file.unwrap().path();
            if file.extension().is_some_and(|e| e == "json") {
                out.push((file.display().to_string(), std::fs::read(&file).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_fixture_decodes_and_reencodes_identically() {
    let all = fixtures();
    let mut seen = std::collections::HashSet::new();
    for (name, body) in &all {
        let events = decode(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!events.is_empty(), "{name}");
        // The encoder writes the document the fixture holds, field for field.
        let batch = body.trim_ascii_start().starts_with(b"[");
        let encoded = if batch {
            encode_batch(&events)
        } else {
            events[0].to_cloudevent()
        };
        assert_eq!(document(&encoded), document(body), "{name}");
        for event in events {
            seen.insert(event.event_type());
            // Re-encoding and decoding again is lossless.
            let again = decode(&event.to_cloudevent()).unwrap();
            assert_eq!(again, vec![event], "{name}");
        }
    }
    for ty in EventType::ALL {
        assert!(seen.contains(&ty), "no fixture for {ty}");
    }
}

/// A JSON document with its CloudEvents `time`s as instants (`02.5Z` and
/// `02.500Z` are one time).
fn document(body: &[u8]) -> serde_json::Value {
    fn times(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Array(items) => items.iter_mut().for_each(times),
            serde_json::Value::Object(event) => {
                if let Some(t) = event.get_mut("time").filter(|t| t.is_string()) {
                    let at: chrono::DateTime<chrono::Utc> = t.as_str().unwrap().parse().unwrap();
                    *t = at.timestamp_nanos_opt().unwrap().into();
                }
            }
            _ => {}
        }
    }
    let mut v = serde_json::from_slice(body).unwrap();
    times(&mut v);
    v
}

fn sample(payload: Payload, seq: u64) -> Event {
    let mut e = Event::new("worker-1", payload);
    e.session_id = Some(Uuid::now_v7());
    e.seq = seq;
    e.target = Some("app".into());
    e.identity = Some(Identity {
        issuer: "https://issuer.example".into(),
        subject: "alice".into(),
        username: "alice".into(),
        groups: vec!["dev".into()],
        delegation: vec![Actor {
            subject: "agent-7".into(),
            issuer: None,
        }],
    });
    e
}

#[test]
fn batches_round_trip_in_order() {
    let events: Vec<Event> = (1..=5)
        .map(|i| {
            sample(
                Payload::CommandReceived(CommandReceived {
                    protocol: Protocol::Extended,
                    statement: format!("select ${i}; -- \"quoted\" \u{e9}"),
                    statement_name: Some(String::new()),
                    portal: Some("p".into()),
                    params: vec![
                        Param {
                            format: ParamFormat::Text,
                            value: Some(i.to_string()),
                            encoding: None,
                        },
                        Param {
                            format: ParamFormat::Binary,
                            value: None,
                            encoding: None,
                        },
                    ],
                    executes: vec![ExecutedStatement {
                        name: format!("s{i}"),
                        text: format!("select {i} -- \"prepared\" \u{e9}"),
                        redactions: Vec::new(),
                    }],
                    decision: None,
                    redactions: vec![Redaction {
                        kind: "secret_value".into(),
                        param: Some(1),
                    }],
                    approval: None,
                }),
                i,
            )
        })
        .collect();
    let decoded = decode(&encode_batch(&events)).unwrap();
    assert_eq!(decoded, events);
}

/// `executes` (added within schema version 1) is read where present, empty
/// in events written before it, and left out of the JSON when empty.
#[test]
fn executes_are_optional_within_v1() {
    let fixture = |name: &str| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1");
        decode(&std::fs::read(root.join(name)).unwrap()).unwrap()
    };
    let command = |e: &Event| match &e.payload {
        Payload::CommandReceived(c) => c.clone(),
        other => panic!("not a command: {other:?}"),
    };
    let with = fixture("command_received_executes.json");
    let one = ExecutedStatement {
        name: "one".into(),
        text: "select * from accounts where id = $1".into(),
        redactions: Vec::new(),
    };
    let wipe = ExecutedStatement {
        name: "wipe".into(),
        text: "delete from accounts".into(),
        redactions: Vec::new(),
    };
    assert_eq!(command(&with[0]).executes, [wipe, one.clone()]);
    let extended = command(&with[1]);
    assert_eq!(extended.protocol, Protocol::Extended);
    assert_eq!(extended.executes, [one]);

    let old = fixture("command_received_batch.json");
    assert!(old.iter().all(|e| command(e).executes.is_empty()));
    for e in &old {
        let v: serde_json::Value = serde_json::from_slice(&e.to_cloudevent()).unwrap();
        assert!(v["data"]["payload"].get("executes").is_none(), "{v}");
    }
}

#[test]
fn cloudevent_attributes_are_standard() {
    let e = sample(
        Payload::SessionClosed(SessionClosed {
            reason: CloseReason::ClientTerminated,
            commands: 3,
            bytes_from_client: 10,
            bytes_to_client: 20,
            duration_ms: 5,
        }),
        4,
    );
    let v: serde_json::Value = serde_json::from_slice(&e.to_cloudevent()).unwrap();
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["type"], "dev.gatehouse.session_closed.v1");
    assert_eq!(v["id"], e.id.to_string());
    assert_eq!(v["subject"], e.session_id.unwrap().to_string());
    assert_eq!(v["source"], "/gatehouse/workers/worker-1");
    assert_eq!(v["data"]["payload"]["reason"], "client_terminated");
}

#[test]
fn unknown_types_and_versions_are_refused() {
    let e = sample(
        Payload::SessionClosed(SessionClosed {
            reason: CloseReason::Error,
            commands: 0,
            bytes_from_client: 0,
            bytes_to_client: 0,
            duration_ms: 0,
        }),
        1,
    );
    let mut v: serde_json::Value = serde_json::from_slice(&e.to_cloudevent()).unwrap();
    v["type"] = "dev.gatehouse.session_closed.v99".into();
    assert!(matches!(
        decode(v.to_string().as_bytes()),
        Err(DecodeError::UnsupportedVersion { version: 99, .. })
    ));
    v["type"] = "dev.gatehouse.nothing.v1".into();
    assert!(matches!(
        decode(v.to_string().as_bytes()),
        Err(DecodeError::UnknownType(_))
    ));
}

/// `redactions` (added within schema version 1) says what was withheld,
/// never the value; events written before it decode with none.
#[test]
fn redactions_are_optional_within_v1() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1");
    let read = |name: &str| decode(&std::fs::read(root.join(name)).unwrap()).unwrap();
    let command = |e: &Event| match &e.payload {
        Payload::CommandReceived(c) => c.clone(),
        other => panic!("not a command: {other:?}"),
    };
    let redacted = read("command_received_redacted.json");
    let text = command(&redacted[0]);
    assert_eq!(text.statement, "alter role app password '[redacted]'");
    assert_eq!(
        text.redactions,
        [Redaction {
            kind: "secret_value".into(),
            param: None
        }]
    );
    let param = command(&redacted[1]);
    assert_eq!(param.redactions[0].param, Some(1));
    assert_eq!(param.params[0].value.as_deref(), Some("'[redacted]'"));
    for e in read("command_received_batch.json") {
        assert!(command(&e).redactions.is_empty());
        let v: serde_json::Value = serde_json::from_slice(&e.to_cloudevent()).unwrap();
        assert!(v["data"]["payload"].get("redactions").is_none(), "{v}");
    }
}
