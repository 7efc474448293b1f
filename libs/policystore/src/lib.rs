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
//! Depends on the `policies` bundle format and NATS only.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use gatehouse_policies::Bundle;
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
}

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

    pub async fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let body = serde_json::to_vec(revocation)?;
        let subject = format!("{}.{}", self.revocation_prefix, revocation.revoked.key());
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
