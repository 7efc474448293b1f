//! Policy bundles and revocations on JetStream.
//!
//! The control plane is the only writer: it validates a bundle and
//! publishes it to the bundle stream (the last message is the current
//! bundle, earlier ones are its history), and records revocations in the
//! revocation stream (one subject per revoked identity or token). Workers
//! read both at start and follow them, so a push or a revocation reaches
//! open sessions at their next command.
//!
//! Plain streams rather than the KV abstraction: they work the same on
//! every nats-server from 2.9 on.
//!
//! Writes that must stay in step with the event log (the control plane
//! records `PolicyBundlePublished` and `IdentityRevoked` only after the
//! write took effect) use [`PolicyStore::replace_bundle`] and
//! [`PolicyStore::replace_revocation`]: each carries the event's id as its
//! `Nats-Msg-Id` and the subject's sequence it expects to replace, so a
//! concurrent write is refused rather than undone later, and an ack lost
//! on the way is resolved by looking for that id. [`PolicyStore::restore_bundle`]
//! and [`PolicyStore::restore_revocation`] undo such a write when its event
//! could not be recorded. [`PolicyStore::max_body`] is the largest body the
//! server takes, so sizes can be checked before anything is written.
//!
//! A bundle that is not valid never stops a reader: [`PolicyStore::current_engine`]
//! starts from the newest valid bundle of the history (logging each bad
//! one with its version), and a follower of [`PolicyStore::watch_bundles`]
//! keeps the engine it has when [`gatehouse_policies::Engine::new`]
//! refuses a new one (which it does without parsing a bundle too large or
//! too deeply nested for Cedar).
//!
//! Depends on the `policies` bundle format and NATS only.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use gatehouse_policies::{Bundle, BundleError, Engine, Problem, Severity};
use serde::{Deserialize, Serialize};

/// `[policy]`: where bundles and revocations live, and how identities map
/// to principals.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// JetStream stream holding policy bundles; its last one is current.
    pub bundle_stream: String,
    /// JetStream stream holding revoked identities and tokens.
    pub revocation_stream: String,
    /// Token group whose members are agents (Cedar principal type `Agent`);
    /// a token with an `act` claim is an agent regardless.
    pub agent_group: String,
    /// Token group allowed to push bundles and revoke identities.
    pub admin_group: String,
    /// Targets where denials are recorded but not enforced.
    pub dry_run_targets: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            bundle_stream: "GATEHOUSE_POLICIES".into(),
            revocation_stream: "GATEHOUSE_REVOCATIONS".into(),
            agent_group: "agents".into(),
            admin_group: "policy-admins".into(),
            dry_run_targets: Vec::new(),
        }
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (field, name) in [
            ("bundle_stream", &self.bundle_stream),
            ("revocation_stream", &self.revocation_stream),
        ] {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(format!(
                    "policy.{field}: {name:?} is not a valid stream name (letters, digits, _ and -)"
                ));
            }
        }
        if self.bundle_stream == self.revocation_stream {
            return Err("policy.revocation_stream: must differ from policy.bundle_stream".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open JetStream stream {stream:?}: {detail}")]
    Open { stream: String, detail: String },
    #[error("cannot read or write the policy store: {0}")]
    Kv(String),
    #[error("the stored bundle is not valid JSON: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("{size} bytes encoded, NATS takes at most {max} (max_payload less room for headers)")]
    TooLarge { size: usize, max: usize },
    /// Another write reached the subject between reading it and writing.
    #[error("the policy store changed meanwhile: {0}")]
    Conflict(String),
}

/// Room kept in every message for its headers, as the event publisher does.
pub const HEADER_ROOM: usize = 1024;

fn kv_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Kv(e.to_string())
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Revoked {
    /// Every token of this subject (`sub`).
    Subject(String),
    /// One token, by its `jti`.
    Token(String),
}

impl Revoked {
    /// The KV key: a prefix and the value, hex-encoded so any
    /// subject is a valid key.
    fn key(&self) -> String {
        let (prefix, value) = match self {
            Revoked::Subject(s) => ("sub", s),
            Revoked::Token(t) => ("jti", t),
        };
        format!("{prefix}.{}", hex(value.as_bytes()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A revocation as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub revoked: Revoked,
    /// Who revoked (the admin's subject).
    pub by: String,
    pub reason: Option<String>,
    /// Unix seconds.
    pub at: i64,
}

/// What a subject currently holds, and its stream sequence.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub value: T,
    pub sequence: u64,
}

#[derive(Clone)]
pub struct PolicyStore {
    js: jetstream::Context,
    bundles: stream::Stream,
    revocations: stream::Stream,
    /// The subject bundles are published on.
    bundle_subject: String,
    /// The prefix of revocation subjects (`<prefix>.<key>`).
    revocation_prefix: String,
}

async fn open_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: String,
    per_subject: i64,
) -> Result<stream::Stream, StoreError> {
    js.get_or_create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![subjects],
        storage: stream::StorageType::File,
        max_messages_per_subject: per_subject,
        ..Default::default()
    })
    .await
    .map_err(|e| StoreError::Open {
        stream: name.to_string(),
        detail: e.to_string(),
    })
}

impl PolicyStore {
    /// Opens (creating if missing) both streams.
    pub async fn open(js: &jetstream::Context, config: &PolicyConfig) -> Result<Self, StoreError> {
        let bundle_subject = format!("gatehouse.{}.bundle", config.bundle_stream);
        let revocation_prefix = format!("gatehouse.{}.revoked", config.revocation_stream);
        Ok(Self {
            js: js.clone(),
            bundles: open_stream(js, &config.bundle_stream, bundle_subject.clone(), 64).await?,
            revocations: open_stream(
                js,
                &config.revocation_stream,
                format!("{revocation_prefix}.>"),
                1,
            )
            .await?,
            bundle_subject,
            revocation_prefix,
        })
    }

    pub async fn current_bundle(&self) -> Result<Option<Bundle>, StoreError> {
        match self
            .bundles
            .get_last_raw_message_by_subject(&self.bundle_subject)
            .await
        {
            Ok(m) => Ok(Some(serde_json::from_slice(&m.payload)?)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(kv_error(e)),
        }
    }

    /// The engine to start deciding with: the current bundle's, or, when
    /// the current bundle is not valid ([`Engine::new`]), the newest earlier
    /// bundle of the history that is. Each refused bundle is logged as an
    /// error naming its version. `None` when no bundle was published or
    /// none in the history is valid: every command is then refused, as
    /// with no bundle. So a process started while a bad bundle is current
    /// keeps the last good one instead of exiting (and, restarted, exiting
    /// again); a valid bundle published later replaces it as usual.
    pub async fn current_engine(&self) -> Result<Option<Engine>, StoreError> {
        let last = match self
            .bundles
            .get_last_raw_message_by_subject(&self.bundle_subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            Err(e) => return Err(kv_error(e)),
        };
        let first = {
            let mut stream = self.bundles.clone();
            stream.info().await.map_err(kv_error)?.state.first_sequence
        };
        let (mut payload, mut sequence) = (last.payload, last.sequence);
        loop {
            match serde_json::from_slice::<Bundle>(&payload) {
                Ok(bundle) => {
                    let version = bundle.version.clone();
                    let built = tokio::task::spawn_blocking(move || Engine::new(&bundle))
                        .await
                        .map_err(|e| BundleError::Invalid(vec![panicked(&e.to_string())]));
                    match built.and_then(|r| r) {
                        Ok(engine) => {
                            if sequence != last.sequence {
                                tracing::warn!(
                                    version = %version,
                                    sequence,
                                    "deciding with an earlier policy bundle until a valid one is published"
                                );
                            }
                            return Ok(Some(engine));
                        }
                        Err(e) => tracing::error!(
                            version = %version,
                            sequence,
                            error = %e,
                            "policy bundle is not valid; trying the one published before it"
                        ),
                    }
                }
                Err(e) => tracing::error!(
                    sequence,
                    error = %e,
                    "a stored policy bundle is not valid JSON; trying the one published before it"
                ),
            }
            // The message before it: the stream holds only the bundle
            // subject, at most 64 messages, some maybe deleted.
            let mut previous = None;
            while previous.is_none() && sequence > first {
                sequence -= 1;
                match self.bundles.get_raw_message(sequence).await {
                    Ok(m) if m.subject.as_str() == self.bundle_subject => {
                        previous = Some(m.payload)
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                    Err(e) => return Err(kv_error(e)),
                }
            }
            match previous {
                Some(p) => payload = p,
                None => {
                    tracing::error!(
                        "no valid policy bundle in the history: every command will be refused"
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// The largest body a bundle or revocation message may have: the
    /// server's `max_payload` less [`HEADER_ROOM`].
    pub fn max_body(&self) -> usize {
        self.js.client().max_payload().saturating_sub(HEADER_ROOM)
    }

    /// Encoded size of `bundle` as [`Self::replace_bundle`] would store it.
    pub fn bundle_size(bundle: &Bundle) -> Result<usize, StoreError> {
        Ok(serde_json::to_vec(bundle)?.len())
    }

    /// Encoded size of `revocation` as stored.
    pub fn revocation_size(revocation: &Revocation) -> Result<usize, StoreError> {
        Ok(serde_json::to_vec(revocation)?.len())
    }

    /// The current bundle with its stream sequence.
    pub async fn current(&self) -> Result<Option<Stored<Bundle>>, StoreError> {
        match self
            .bundles
            .get_last_raw_message_by_subject(&self.bundle_subject)
            .await
        {
            Ok(m) => Ok(Some(Stored {
                value: serde_json::from_slice(&m.payload)?,
                sequence: m.sequence,
            })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(kv_error(e)),
        }
    }

    /// Makes `bundle` the current one, provided the current one is still
    /// the one at `expected` (0: none), with `id` as its `Nats-Msg-Id`;
    /// returns its stream sequence. A body over [`Self::max_body`] is
    /// refused before anything is sent; another push in between is a
    /// [`StoreError::Conflict`].
    pub async fn replace_bundle(
        &self,
        bundle: &Bundle,
        id: &str,
        expected: u64,
    ) -> Result<u64, StoreError> {
        let body = serde_json::to_vec(bundle)?;
        self.put(
            &self.bundles,
            &self.bundle_subject,
            body,
            Some(id),
            expected,
        )
        .await
    }

    /// Undoes [`Self::replace_bundle`] of `ours`, stored at `sequence`: the bundle
    /// that was current before it (`previous`) is published again, so
    /// workers, which follow the subject, go back to it; with no previous
    /// bundle, a bundle without policies named `withdrawn-<version>`
    /// replaces it (it refuses everything, as no bundle does). Then `ours`
    /// is deleted from the history. Nothing happens if another bundle has
    /// replaced `ours` meanwhile: `ours` is no longer in force.
    pub async fn restore_bundle(
        &self,
        previous: Option<&Bundle>,
        ours: &Bundle,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let body = match previous {
            Some(b) => serde_json::to_vec(b)?,
            None => serde_json::to_vec(&Bundle::new(
                format!("withdrawn-{}", ours.version),
                Vec::new(),
                ours.schema.clone(),
                false,
            ))?,
        };
        match self
            .put(&self.bundles, &self.bundle_subject, body, None, sequence)
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Err(e) = self.bundles.delete_message(sequence).await {
            tracing::warn!(error = %e, sequence, "cannot delete a withdrawn bundle from the history");
        }
        Ok(())
    }

    /// Makes `bundle` the current one; returns its stream sequence.
    pub async fn publish_bundle(&self, bundle: &Bundle) -> Result<u64, StoreError> {
        let body = serde_json::to_vec(bundle)?;
        let ack = self
            .js
            .publish(self.bundle_subject.clone(), body.into())
            .await
            .map_err(kv_error)?
            .await
            .map_err(kv_error)?;
        Ok(ack.sequence)
    }

    /// The current bundle (if any) and every later one.
    pub async fn watch_bundles(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Bundle, StoreError>> + use<>, StoreError> {
        let messages = follow(&self.bundles, self.bundle_subject.clone()).await?;
        Ok(messages.map(|m| m.and_then(|payload| Ok(serde_json::from_slice(&payload)?))))
    }

    fn revocation_subject(&self, revoked: &Revoked) -> String {
        format!("{}.{}", self.revocation_prefix, revoked.key())
    }

    /// The revocation stored for `revoked`, if any, as stored (raw) and
    /// its sequence.
    pub async fn revocation_of(
        &self,
        revoked: &Revoked,
    ) -> Result<Option<Stored<Bytes>>, StoreError> {
        match self
            .revocations
            .get_last_raw_message_by_subject(&self.revocation_subject(revoked))
            .await
        {
            Ok(m) => Ok(Some(Stored {
                value: m.payload,
                sequence: m.sequence,
            })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(kv_error(e)),
        }
    }

    /// Stores `revocation`, provided its subject still holds the message at
    /// `expected` (0: none), with `id` as its `Nats-Msg-Id`; returns its
    /// sequence. As [`Self::replace_bundle`].
    pub async fn replace_revocation(
        &self,
        revocation: &Revocation,
        id: &str,
        expected: u64,
    ) -> Result<u64, StoreError> {
        let body = serde_json::to_vec(revocation)?;
        let subject = self.revocation_subject(&revocation.revoked);
        self.put(&self.revocations, &subject, body, Some(id), expected)
            .await
    }

    /// Undoes [`Self::replace_revocation`] of the revocation at `sequence`:
    /// the one it replaced (`previous`, as stored) is stored again, or,
    /// with none, `sequence` is deleted, so the store, workers that start
    /// and [`Self::revoked`] no longer hold it. Workers that already saw it
    /// keep refusing the identity until they restart: revocations are only
    /// ever added to a running worker's set.
    pub async fn restore_revocation(
        &self,
        revoked: &Revoked,
        previous: Option<Bytes>,
        sequence: u64,
    ) -> Result<(), StoreError> {
        match previous {
            Some(body) => {
                let subject = self.revocation_subject(revoked);
                match self
                    .put(&self.revocations, &subject, body.to_vec(), None, sequence)
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            None => match self.revocations.delete_message(sequence).await {
                Ok(_) => Ok(()),
                // Already replaced by a later revocation of the same identity.
                Err(e) if e.to_string().contains("no message found") => Ok(()),
                Err(e) => Err(kv_error(e)),
            },
        }
    }

    /// Publishes `body` on `subject` of `stream` if the subject's last
    /// sequence is `expected`, and returns the new message's sequence. When
    /// the ack is lost (timeout, connection), a message with `id` found
    /// last on the subject counts as stored.
    async fn put(
        &self,
        stream: &stream::Stream,
        subject: &str,
        body: Vec<u8>,
        id: Option<&str>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        let max = self.max_body();
        if body.len() > max {
            return Err(StoreError::TooLarge {
                size: body.len(),
                max,
            });
        }
        let mut message = PublishMessage::build()
            .payload(Bytes::from(body))
            .expected_last_subject_sequence(expected);
        if let Some(id) = id {
            message = message.message_id(id);
        }
        let ack = match self.js.send_publish(subject.to_string(), message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(StoreError::Conflict(e.to_string()))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                ) && id.is_some() =>
            {
                match stream.get_last_raw_message_by_subject(subject).await {
                    Ok(m) if m.headers.get("Nats-Msg-Id").map(|v| v.as_str()) == id => {
                        Ok(m.sequence)
                    }
                    _ => Err(kv_error(e)),
                }
            }
            Err(e) => Err(kv_error(e)),
        }
    }

    pub async fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let body = serde_json::to_vec(revocation)?;
        let subject = self.revocation_subject(&revocation.revoked);
        self.js
            .publish(subject, body.into())
            .await
            .map_err(kv_error)?
            .await
            .map_err(kv_error)?;
        Ok(())
    }

    /// Every revocation in force.
    pub async fn revoked(&self) -> Result<HashSet<Revoked>, StoreError> {
        let mut info = self.revocations.clone();
        let total = info.info().await.map_err(kv_error)?.state.messages;
        let mut out = HashSet::new();
        if total == 0 {
            return Ok(out);
        }
        let messages = follow(&self.revocations, format!("{}.>", self.revocation_prefix)).await?;
        futures::pin_mut!(messages);
        // One message per subject is kept, so the stream holds exactly the
        // revocations in force.
        while (out.len() as u64) < total {
            match messages.next().await {
                Some(m) => {
                    let r: Revocation = serde_json::from_slice(&m?)?;
                    out.insert(r.revoked);
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Every revocation, those in force first, then new ones as they come.
    pub async fn watch_revocations(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Revoked, StoreError>> + use<>, StoreError> {
        let messages = follow(&self.revocations, format!("{}.>", self.revocation_prefix)).await?;
        Ok(messages.map(|m| {
            m.and_then(|payload| Ok(serde_json::from_slice::<Revocation>(&payload)?.revoked))
        }))
    }
}

/// The problem reported when building an engine panicked.
fn panicked(detail: &str) -> Problem {
    Problem {
        severity: Severity::Error,
        file: "(bundle)".into(),
        line: 1,
        column: 1,
        message: format!("building the engine failed: {detail}"),
        help: None,
        policy: None,
    }
}

/// The last message of each subject matching `filter`, then every new one,
/// through an ordered consumer (recreated by the client if it falls behind
/// or the connection drops).
async fn follow(
    stream: &stream::Stream,
    filter: String,
) -> Result<impl futures::Stream<Item = Result<bytes::Bytes, StoreError>> + use<>, StoreError> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(kv_error)?;
    let messages = consumer.messages().await.map_err(kv_error)?;
    Ok(messages.map(|m| m.map(|m| m.payload.clone()).map_err(kv_error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nats-server of the test's own, with JetStream, killed when dropped.
    struct Nats {
        _child: tokio::process::Child,
        dir: std::path::PathBuf,
        url: String,
    }

    impl Drop for Nats {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn nats() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-policystore-{}-{port}",
            std::process::id()
        ));
        let child = tokio::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server must be installed");
        let url = format!("nats://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Nats {
            _child: child,
            dir,
            url,
        }
    }

    fn config(name: &str) -> PolicyConfig {
        PolicyConfig {
            bundle_stream: format!("{name}_BUNDLES"),
            revocation_stream: format!("{name}_REVOCATIONS"),
            ..PolicyConfig::default()
        }
    }

    /// The attack: about 150 nested parentheses in one policy.
    fn too_deep(version: &str) -> Bundle {
        let text = format!(
            "permit (principal, action, resource) when {{ {}true{} }};",
            "(".repeat(150),
            ")".repeat(150)
        );
        Bundle::new(
            version,
            vec![("deep.cedar".into(), text)],
            gatehouse_policies::SCHEMA,
            false,
        )
    }

    #[tokio::test]
    async fn a_bad_current_bundle_leaves_the_last_good_one_in_force() {
        let server = nats().await;
        let client = async_nats::connect(&server.url).await.unwrap();
        let js = jetstream::new(client);

        let store = PolicyStore::open(&js, &config("GOOD")).await.unwrap();
        assert!(store.current_engine().await.unwrap().is_none());
        let mut good = Bundle::defaults();
        good.version = "v1".into();
        let seq = store.replace_bundle(&good, "event-1", 0).await.unwrap();
        store
            .replace_bundle(&too_deep("v2"), "event-2", seq)
            .await
            .unwrap();
        // Not even JSON.
        js.publish(store.bundle_subject.clone(), Bytes::from_static(b"{"))
            .await
            .unwrap()
            .await
            .unwrap();
        let engine = store.current_engine().await.unwrap().expect("v1 in force");
        assert_eq!(engine.bundle_version(), "v1");

        // With nothing valid in the history, no engine: everything refused.
        let store = PolicyStore::open(&js, &config("BAD")).await.unwrap();
        store
            .replace_bundle(&too_deep("v1"), "event-3", 0)
            .await
            .unwrap();
        assert!(store.current_engine().await.unwrap().is_none());
    }
}
