//! Streams of records behave the same on both stores: JetStream (the
//! machine's NATS on 127.0.0.1:4222, a stream of the test's own) and the
//! embedded SQLite file. Every test runs on each.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use gatehouse_eventlog::{EmbeddedLog, RecordError, RecordStore, RecordStream, StreamSettings};

/// A store of each kind, removed (stream deleted, file removed) when
/// dropped.
struct Stores {
    dir: std::path::PathBuf,
    js: async_nats::jetstream::Context,
    names: Vec<String>,
    stores: Vec<(&'static str, RecordStore)>,
}

impl Stores {
    async fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-records-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let log = EmbeddedLog::open(&dir.join("gatehouse.db")).await.unwrap();
        let nats = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
        let js = async_nats::jetstream::new(nats);
        Self {
            dir,
            names: Vec::new(),
            stores: vec![
                ("jetstream", RecordStore::JetStream(js.clone())),
                ("embedded", RecordStore::Embedded(log)),
            ],
            js,
        }
    }

    /// A stream on each store: subjects `<prefix>.>`.
    async fn open(&mut self, per_subject: i64) -> Vec<(&'static str, RecordStream, String)> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("RECTEST_{suffix}");
        let prefix = format!("rectest.{suffix}");
        self.names.push(name.clone());
        let mut out = Vec::new();
        for (kind, store) in &self.stores {
            let stream = store
                .open(StreamSettings {
                    name: name.clone(),
                    description: None,
                    subjects: format!("{prefix}.>"),
                    per_subject,
                    deny_delete: false,
                })
                .await
                .unwrap();
            out.push((*kind, stream, prefix.clone()));
        }
        out
    }

    async fn cleanup(self) {
        for name in &self.names {
            let _ = self.js.delete_stream(name).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn body(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test]
async fn publication_on_condition_of_the_subjects_last_sequence() {
    let mut stores = Stores::new().await;
    for (kind, stream, prefix) in stores.open(16).await {
        let a = format!("{prefix}.a");
        let b = format!("{prefix}.b");
        let first = stream
            .publish(&a, &[("Sig", "s1")], body("1"), None, Some(0))
            .await
            .unwrap();
        // Another writer that also read "nothing there" loses.
        let lost = stream.publish(&a, &[], body("x"), None, Some(0)).await;
        assert!(
            matches!(lost, Err(RecordError::Conflict(_))),
            "{kind}: {lost:?}"
        );
        let other = stream
            .publish(&b, &[], body("b"), None, Some(0))
            .await
            .unwrap();
        assert!(other > first, "{kind}");
        // Expecting the subject's last, not the stream's.
        let second = stream
            .publish(&a, &[], body("2"), None, Some(first))
            .await
            .unwrap();
        let stale = stream.publish(&a, &[], body("y"), None, Some(first)).await;
        assert!(
            matches!(stale, Err(RecordError::Conflict(_))),
            "{kind}: {stale:?}"
        );

        let last = stream.last(&a).await.unwrap().unwrap();
        assert_eq!(
            (last.sequence, &last.payload[..]),
            (second, &b"2"[..]),
            "{kind}"
        );
        let got = stream.get(first).await.unwrap().unwrap();
        assert_eq!(got.header("Sig"), Some("s1"), "{kind}");
        assert_eq!(got.subject, a, "{kind}");
        assert_eq!(
            stream
                .first_from(&a, first + 1)
                .await
                .unwrap()
                .unwrap()
                .sequence,
            second,
            "{kind}"
        );
        assert!(
            stream
                .last(&format!("{prefix}.none"))
                .await
                .unwrap()
                .is_none(),
            "{kind}"
        );
        assert!(stream.get(second + 100).await.unwrap().is_none(), "{kind}");
        assert_eq!(stream.state().await.unwrap(), (first, 3), "{kind}");
    }
    stores.cleanup().await;
}

#[tokio::test]
async fn a_subject_keeps_its_last_records_and_an_id_is_stored_once() {
    let mut stores = Stores::new().await;
    for (kind, stream, prefix) in stores.open(2).await {
        let a = format!("{prefix}.a");
        let mut last = 0;
        let mut seqs = Vec::new();
        for i in 0..3 {
            last = stream
                .publish(&a, &[], body(&i.to_string()), None, Some(last))
                .await
                .unwrap();
            seqs.push(last);
        }
        assert!(stream.get(seqs[0]).await.unwrap().is_none(), "{kind}");
        assert!(stream.get(seqs[1]).await.unwrap().is_some(), "{kind}");
        assert_eq!(stream.state().await.unwrap(), (seqs[1], 2), "{kind}");

        let b = format!("{prefix}.b");
        let once = stream
            .publish(&b, &[], body("b"), Some("id-1"), Some(0))
            .await
            .unwrap();
        let again = stream
            .publish(&b, &[], body("b"), Some("id-1"), Some(0))
            .await
            .unwrap();
        assert_eq!(once, again, "{kind}");
        let stored = stream.last(&b).await.unwrap().unwrap();
        assert_eq!(stored.header("Nats-Msg-Id"), Some("id-1"), "{kind}");
    }
    stores.cleanup().await;
}

#[tokio::test]
async fn followers_get_each_subjects_last_record_then_every_new_one() {
    let mut stores = Stores::new().await;
    for (kind, stream, prefix) in stores.open(16).await {
        let (a, b) = (format!("{prefix}.a"), format!("{prefix}.b"));
        let a1 = stream
            .publish(&a, &[], body("a1"), None, Some(0))
            .await
            .unwrap();
        let b1 = stream
            .publish(&b, &[], body("b1"), None, Some(0))
            .await
            .unwrap();
        let a2 = stream
            .publish(&a, &[], body("a2"), None, Some(a1))
            .await
            .unwrap();

        let filter = format!("{prefix}.>");
        let snapshot = stream.last_per_subject(&filter).await.unwrap();
        let seen: Vec<_> = snapshot
            .iter()
            .map(|r| (r.sequence, r.payload.clone()))
            .collect();
        assert_eq!(seen, [(b1, body("b1")), (a2, body("a2"))], "{kind}");

        let mut follow = stream.follow(&filter).await.unwrap();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), follow.next())
                .await
                .expect("a record in time")
                .unwrap()
                .unwrap()
        };
        assert_eq!(next().await.sequence, b1, "{kind}");
        assert_eq!(next().await.sequence, a2, "{kind}");
        let b2 = stream
            .publish(&b, &[], body("b2"), None, Some(b1))
            .await
            .unwrap();
        let r = next().await;
        assert_eq!((r.sequence, r.subject.as_str()), (b2, b.as_str()), "{kind}");

        // One subject only.
        let mut only_a = stream.follow(&a).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), only_a.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.sequence, a2, "{kind}");
    }
    stores.cleanup().await;
}

#[tokio::test]
async fn a_follower_from_a_position_gets_only_what_is_published_after_it() {
    let mut stores = Stores::new().await;
    for (kind, stream, prefix) in stores.open(16).await {
        let (a, b) = (format!("{prefix}.x.a"), format!("{prefix}.x.b"));
        stream
            .publish(&a, &[], body("old"), None, None)
            .await
            .unwrap();
        let position = stream.last_sequence().await.unwrap();
        assert!(position > 0, "{kind}");
        let mut follow = stream
            .follow_after(&format!("{prefix}.x.>"), position)
            .await
            .unwrap();
        let b1 = stream
            .publish(&b, &[], body("b1"), None, None)
            .await
            .unwrap();
        // Outside the filter: not given.
        stream
            .publish(&format!("{prefix}.y"), &[], body("y"), None, None)
            .await
            .unwrap();
        let a2 = stream
            .publish(&a, &[], body("a2"), None, None)
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = tokio::time::timeout(Duration::from_secs(5), follow.next())
                .await
                .expect("a record in time")
                .unwrap()
                .unwrap();
            seen.push((r.sequence, r.payload));
        }
        assert_eq!(seen, [(b1, body("b1")), (a2, body("a2"))], "{kind}");
        assert_eq!(stream.last_sequence().await.unwrap(), a2, "{kind}");
    }
    stores.cleanup().await;
}

#[tokio::test]
async fn an_empty_stream_has_no_records() {
    let mut stores = Stores::new().await;
    for (kind, stream, prefix) in stores.open(16).await {
        let filter = format!("{prefix}.>");
        assert!(
            stream.last_per_subject(&filter).await.unwrap().is_empty(),
            "{kind}"
        );
        assert_eq!(stream.state().await.unwrap().1, 0, "{kind}");
    }
    stores.cleanup().await;
}

/// A stream holding records of other subjects only has none for a filter:
/// said at once, not after waiting for records that will not come.
#[tokio::test]
async fn a_filter_no_record_matches_has_no_records() {
    let mut stores = Stores::new().await;
    for (kind, stream, prefix) in stores.open(16).await {
        stream
            .publish(&format!("{prefix}.lease.a"), &[], "x".into(), None, None)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let none = stream
            .last_per_subject(&format!("{prefix}.approval.>"))
            .await
            .unwrap();
        assert!(none.is_empty(), "{kind}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{kind}"
        );
        let one = stream
            .last_per_subject(&format!("{prefix}.lease.>"))
            .await
            .unwrap();
        assert_eq!(one.len(), 1, "{kind}");
    }
    stores.cleanup().await;
}
