//! Policy bundles and revocations on JetStream.
//!
//! The control plane is the only writer: it validates a bundle and
//! publishes it to the bundle stream (the last message is the current
//! bundle, earlier ones are its history), and records revocations in the
//! revocation stream (one subject per revoked identity or token, whose last
//! message is the last word: a [`Revocation`], or its reinstatement).
//! Revocation records are signed like bundles, and a reinstatement counts
//! only if signed and replacing the record just before it on its subject
//! ([`PolicyStore::is_revoked`]); the stream refuses deletions.
//! Workers read both at start and follow them, so a push, a revocation or
//! a reinstatement reaches open sessions at their next command.
//!
//! Plain streams rather than the KV abstraction: they work the same on
//! every nats-server from 2.9 on.
//!
//! Writes that must stay in step with the event log (the control plane
//! records `PolicyBundlePublished`, `IdentityRevoked` and
//! `IdentityReinstated` only after the
//! write took effect) use [`PolicyStore::replace_bundle`] and
//! [`PolicyStore::replace_revocation`]: each carries the event's id as its
//! `Nats-Msg-Id` and the subject's sequence it expects to replace, so a
//! concurrent write is refused rather than undone later, and an ack lost
//! on the way is resolved by looking for that id. [`PolicyStore::restore_bundle`]
//! and [`PolicyStore::restore_revocation`] undo such a write when its event
//! could not be recorded. [`PolicyStore::max_body`] is the largest body the
//! server takes, so sizes can be checked before anything is written.
//!
//! # Trusting a bundle
//!
//! Whoever can publish on the bundle subject could otherwise replace the
//! policies, so every bundle is signed by the control plane (Ed25519, over
//! the exact bytes published, in the [`SIGNATURE_HEADER`] header; see
//! [`signing`]) and readers apply only bundles that one of their trusted
//! keys (`policy.bundle_public_keys`) verifies. Each bundle carries a
//! version the control plane assigned, one more than the highest before
//! it; the bundle in force is the verified one with the highest version
//! ([`History::current`]), so a signed bundle published again later (a
//! replay) cannot take readers back. Going back is a rollback: the old
//! content published under a new version.
//!
//! A bundle that is not valid never stops a reader: [`PolicyStore::current_engine`]
//! starts from the highest version that verifies and validates (logging
//! each refused message with its stream sequence), and a follower of
//! [`PolicyStore::watch_bundles`] keeps the engine it has when a message
//! is unsigned or wrongly signed ([`StoreError::Rejected`]), or
//! [`gatehouse_policies::Engine::new`] refuses it (which it does without
//! parsing a bundle too large or too deeply nested for Cedar).
//!
//! Depends on the `policies` bundle format and NATS only.
#![forbid(unsafe_code)]

pub mod approvals;
pub mod signing;
pub mod usernames;

use std::collections::HashSet;
use std::path::PathBuf;

use bytes::Bytes;
use futures::StreamExt;
use gatehouse_eventlog::{Record, RecordError, RecordStore, RecordStream, StreamSettings};
use gatehouse_policies::{Bundle, BundleError, Engine, Problem, Severity};
use serde::{Deserialize, Serialize};

pub use signing::{KeyError, PublicKey, SIGNATURE_HEADER, SignatureError, SigningKey, TrustedKeys};

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
    /// Control plane: the Ed25519 private key (PKCS#8, PEM or DER; e.g.
    /// `openssl genpkey -algorithm ed25519`) bundles are signed with.
    /// Without one the control plane publishes nothing.
    pub signing_key_file: Option<PathBuf>,
    /// The public keys of the control plane's signing keys (base64 of the
    /// 32 key bytes, or of the `SubjectPublicKeyInfo`): a bundle is applied
    /// only if one of them verifies its signature. Workers refuse to start
    /// without one. Two keys while rotating.
    pub bundle_public_keys: Vec<String>,
    /// A signing key handed over in memory (`gatehouse dev`, tests) rather
    /// than read from `signing_key_file`; its public key is trusted too.
    #[serde(skip)]
    pub signing_key: Option<SigningKey>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            bundle_stream: "GATEHOUSE_POLICIES".into(),
            revocation_stream: "GATEHOUSE_REVOCATIONS".into(),
            agent_group: "agents".into(),
            admin_group: "policy-admins".into(),
            signing_key_file: None,
            bundle_public_keys: Vec::new(),
            signing_key: None,
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
        self.trusted_keys()?;
        Ok(())
    }

    /// The keys of `bundle_public_keys`, and the public key of the signing
    /// key if one is given in memory. Errors name the field.
    pub fn trusted_keys(&self) -> Result<TrustedKeys, String> {
        let mut trusted = TrustedKeys::default();
        for (i, key) in self.bundle_public_keys.iter().enumerate() {
            let key = key
                .parse::<PublicKey>()
                .map_err(|e| format!("policy.bundle_public_keys[{i}]: {e}"))?;
            trusted.add(key);
        }
        if let Some(k) = &self.signing_key {
            trusted.add(k.public_key());
        }
        Ok(trusted)
    }

    /// The signing key: the one in memory, else `signing_key_file`'s.
    pub fn signer(&self) -> Result<Option<SigningKey>, String> {
        if let Some(k) = &self.signing_key {
            return Ok(Some(k.clone()));
        }
        self.signing_key_file
            .as_deref()
            .map(SigningKey::from_file)
            .transpose()
            .map_err(|e| format!("policy.signing_key_file: {e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open stream {stream:?}: {detail}")]
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
    /// `policy.bundle_public_keys` or `policy.signing_key_file` is unusable.
    #[error("{0}")]
    Config(String),
    #[error(
        "this control plane has no policy signing key (policy.signing_key_file), so it cannot publish bundles"
    )]
    NoSigningKey,
    /// A message on the bundle subject that is not applied: unsigned,
    /// signed by a key not trusted, altered, or not a bundle.
    #[error("the policy bundle at stream sequence {sequence} is rejected: {reason}")]
    Rejected { sequence: u64, reason: String },
}

/// Records kept per identity on the revocation stream.
const REVOCATION_HISTORY: i64 = 16;

/// Room kept in every message for its headers, as the event publisher does.
pub const HEADER_ROOM: usize = 1024;

impl From<RecordError> for StoreError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Conflict(detail) => StoreError::Conflict(detail),
            RecordError::Unavailable(detail) => StoreError::Kv(detail),
        }
    }
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
        format!("{prefix}.{}", hex::encode(value))
    }
}

impl Revoked {
    /// The identity a revocation subject's key names (see [`Revoked::key`]).
    fn from_key(key: &str) -> Option<Revoked> {
        let (prefix, hex) = key.split_once('.')?;
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let value = String::from_utf8(bytes).ok()?;
        match prefix {
            "sub" => Some(Revoked::Subject(value)),
            "jti" => Some(Revoked::Token(value)),
            _ => None,
        }
    }
}

/// A revocation as stored, or its reinstatement: the last message on an
/// identity's subject says whether it is revoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub revoked: Revoked,
    /// Who revoked, or reinstated (the admin's subject).
    pub by: String,
    pub reason: Option<String>,
    /// Unix seconds.
    pub at: i64,
    /// The identity was reinstated: no longer revoked. (Absent in
    /// revocations, and in every record of stores older than
    /// reinstatement; a reader that does not know the field takes a
    /// reinstatement for a revocation, which errs toward refusing.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reinstated: bool,
    /// For a reinstatement: the stream sequence of the record it replaced,
    /// under the signature, so that it cannot be published again later to
    /// undo a newer revocation (set by [`PolicyStore::replace_revocation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
}

/// What a subject currently holds, and its stream sequence.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub value: T,
    pub sequence: u64,
}

/// The bundle stream as a reader sees it: every message whose signature
/// verifies, and the subject's last sequence (what the next write must
/// expect to replace).
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The subject's last sequence, verified or not (0: nothing published).
    pub last_sequence: u64,
    /// The verified bundles, oldest first.
    pub bundles: Vec<Stored<Bundle>>,
}

impl History {
    /// The bundle in force: the verified one with the highest version (of
    /// two with the same, the later).
    pub fn current(&self) -> Option<&Stored<Bundle>> {
        self.bundles
            .iter()
            .max_by_key(|b| (b.value.version, b.sequence))
    }

    /// The version the next published bundle gets.
    pub fn next_version(&self) -> u64 {
        self.current().map_or(1, |c| c.value.version + 1)
    }

    /// The bundle published as `version`, if the history still holds it.
    pub fn version(&self, version: u64) -> Option<&Stored<Bundle>> {
        self.bundles
            .iter()
            .rev()
            .find(|b| b.value.version == version)
    }

    /// The highest version before the current one with this content, of
    /// those not withdrawn.
    pub fn earlier_with_hash(&self, hash: &str) -> Option<&Stored<Bundle>> {
        let current = self.current()?;
        let withdrawn = |v: u64| self.bundles.iter().any(|b| b.value.withdraws == Some(v));
        self.bundles
            .iter()
            .filter(|b| b.value.hash == hash && b.value.version < current.value.version)
            .filter(|b| !withdrawn(b.value.version))
            .max_by_key(|b| b.value.version)
    }
}

/// The subject's last sequence and the bundle in force then.
type InForce = (u64, Option<Stored<Bundle>>);

#[derive(Clone)]
pub struct PolicyStore {
    /// The largest payload the store takes.
    max_payload: usize,
    bundles: RecordStream,
    revocations: RecordStream,
    /// Keys a bundle's signature must verify with.
    trusted: TrustedKeys,
    /// The control plane's key; `None` in workers.
    signer: Option<SigningKey>,
    /// The bundle in force as of the subject's last sequence, so that
    /// [`Self::current`] reads the history again only when it changed.
    in_force: std::sync::Arc<std::sync::Mutex<Option<InForce>>>,
    /// The subject bundles are published on.
    bundle_subject: String,
    /// The prefix of revocation subjects (`<prefix>.<key>`).
    revocation_prefix: String,
}

async fn open_stream(
    store: &RecordStore,
    name: &str,
    subjects: String,
    per_subject: i64,
    deny_delete: bool,
) -> Result<RecordStream, StoreError> {
    store
        .open(StreamSettings {
            name: name.to_string(),
            description: None,
            subjects,
            per_subject,
            deny_delete,
        })
        .await
        .map_err(|e| StoreError::Open {
            stream: name.to_string(),
            detail: e.to_string(),
        })
}

impl PolicyStore {
    /// Opens (creating if missing) both streams, with the keys of `config`:
    /// the public keys bundles must be signed with and, for the control
    /// plane, the signing key (whose public key is then trusted too).
    pub async fn open(store: &RecordStore, config: &PolicyConfig) -> Result<Self, StoreError> {
        let bundle_subject = format!("gatehouse.{}.bundle", config.bundle_stream);
        let revocation_prefix = format!("gatehouse.{}.revoked", config.revocation_stream);
        let mut trusted = config.trusted_keys().map_err(StoreError::Config)?;
        let signer = config.signer().map_err(StoreError::Config)?;
        if let Some(k) = &signer {
            trusted.add(k.public_key());
        }
        Ok(Self {
            trusted,
            signer,
            in_force: Default::default(),
            max_payload: store.max_payload(),
            // Never deleted either: deleting the newest bundle would make
            // workers that start later go back a version, unrecorded.
            bundles: open_stream(
                store,
                &config.bundle_stream,
                bundle_subject.clone(),
                64,
                true,
            )
            .await?,
            // Records are never deleted (a deletion could undo a revocation
            // unsigned), and each identity keeps its last few, so that a
            // reinstatement can be checked against the record it replaced.
            revocations: open_stream(
                store,
                &config.revocation_stream,
                format!("{revocation_prefix}.>"),
                REVOCATION_HISTORY,
                true,
            )
            .await?,
            bundle_subject,
            revocation_prefix,
        })
    }

    /// Whether any key is trusted: without one, every bundle is rejected.
    pub fn verifies(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Whether this store can publish bundles (it has a signing key).
    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// Checks a bundle message's signature, then reads it.
    fn open_bundle(
        &self,
        sequence: u64,
        signature: Option<&str>,
        payload: &[u8],
    ) -> Result<Bundle, StoreError> {
        let rejected = |reason: String| StoreError::Rejected { sequence, reason };
        self.trusted
            .verify(payload, signature)
            .map_err(|e| rejected(e.to_string()))?;
        serde_json::from_slice(payload).map_err(|e| rejected(format!("it is not a bundle: {e}")))
    }

    /// Every bundle of the history whose signature verifies (each message
    /// that does not is logged as an error with its sequence), and the
    /// subject's last sequence. The stream keeps at most 64 messages.
    pub async fn history(&self) -> Result<History, StoreError> {
        let Some(last) = self.bundles.last(&self.bundle_subject).await? else {
            return Ok(History::default());
        };
        let last_sequence = last.sequence;
        let (first, _) = self.bundles.state().await?;
        let mut bundles = Vec::new();
        for sequence in first..=last_sequence {
            let m = match self.bundles.get(sequence).await? {
                Some(m) if m.subject == self.bundle_subject => m,
                _ => continue,
            };
            match self.open_bundle(sequence, m.header(SIGNATURE_HEADER), &m.payload) {
                Ok(value) => bundles.push(Stored { value, sequence }),
                Err(e) => tracing::error!(error = %e, sequence, "policy bundle ignored"),
            }
        }
        Ok(History {
            last_sequence,
            bundles,
        })
    }

    /// The bundle subject's last sequence (0: nothing published), signed
    /// or not: it changes with every message.
    pub async fn last_sequence(&self) -> Result<u64, StoreError> {
        let last = self.bundles.last(&self.bundle_subject).await?;
        Ok(last.map_or(0, |m| m.sequence))
    }

    /// The bundle in force ([`History::current`]), if any.
    pub async fn current_bundle(&self) -> Result<Option<Bundle>, StoreError> {
        Ok(self.current().await?.map(|s| s.value))
    }

    /// The bundle in force with its stream sequence. One request when
    /// the subject has not changed since the last call; otherwise the
    /// history is read again ([`Self::history`]).
    pub async fn current(&self) -> Result<Option<Stored<Bundle>>, StoreError> {
        let last = self.last_sequence().await?;
        if let Some((seen, current)) = self.in_force.lock().expect("poisoned").as_ref()
            && *seen == last
        {
            return Ok(current.clone());
        }
        let history = self.history().await?;
        let current = history.current().cloned();
        *self.in_force.lock().expect("poisoned") = Some((history.last_sequence, current.clone()));
        Ok(current)
    }

    /// The engine to start deciding with: that of the bundle in force, or,
    /// when it is not valid ([`Engine::new`]), of the highest earlier
    /// version that is. Only signed bundles count ([`Self::history`]); each
    /// refused one is logged as an error naming its version and sequence.
    /// `None` when no bundle was published or none is valid: every command
    /// is then refused, as with no bundle. So a process started while a
    /// bad bundle is current keeps the last good one instead of exiting
    /// (and, restarted, exiting again); a valid bundle published later
    /// replaces it as usual.
    pub async fn current_engine(&self) -> Result<Option<Engine>, StoreError> {
        let history = self.history().await?;
        let mut candidates = history.bundles;
        candidates.sort_by_key(|b| std::cmp::Reverse((b.value.version, b.sequence)));
        let highest = candidates.first().map(|b| b.value.version);
        for Stored { value, sequence } in candidates {
            let version = value.version;
            let built = tokio::task::spawn_blocking(move || Engine::new(&value))
                .await
                .map_err(|e| BundleError::Invalid(vec![panicked(&e.to_string())]));
            match built.and_then(|r| r) {
                Ok(engine) => {
                    if Some(version) != highest {
                        tracing::warn!(
                            version,
                            sequence,
                            "deciding with an earlier policy bundle until a valid one is published"
                        );
                    }
                    return Ok(Some(engine));
                }
                Err(e) => tracing::error!(
                    version,
                    sequence,
                    error = %e,
                    "policy bundle is not valid; trying the one published before it"
                ),
            }
        }
        if history.last_sequence != 0 {
            tracing::error!(
                "no valid signed policy bundle in the history: every command will be refused"
            );
        }
        Ok(None)
    }

    /// The largest body a bundle or revocation message may have: the
    /// server's `max_payload` less [`HEADER_ROOM`].
    pub fn max_body(&self) -> usize {
        self.max_payload.saturating_sub(HEADER_ROOM)
    }

    /// Encoded size of `bundle` as [`Self::replace_bundle`] would store it.
    pub fn bundle_size(bundle: &Bundle) -> Result<usize, StoreError> {
        Ok(serde_json::to_vec(bundle)?.len())
    }

    /// Encoded size of `revocation` as stored.
    pub fn revocation_size(revocation: &Revocation) -> Result<usize, StoreError> {
        Ok(serde_json::to_vec(revocation)?.len())
    }

    /// Makes `bundle` the current one, signed, provided the subject's last
    /// message is still the one at `expected` (0: none), with `id` as its
    /// `Nats-Msg-Id`; returns its stream sequence. The caller gives it its
    /// version ([`History::next_version`]). A body over [`Self::max_body`]
    /// is refused before anything is sent; another push in between is a
    /// [`StoreError::Conflict`].
    pub async fn replace_bundle(
        &self,
        bundle: &Bundle,
        id: &str,
        expected: u64,
    ) -> Result<u64, StoreError> {
        let (body, signature) = self.signed(bundle)?;
        self.put(
            &self.bundles,
            &self.bundle_subject,
            body,
            Some(id),
            expected,
            Some(signature),
        )
        .await
    }

    /// `bundle` as published, and its signature.
    fn signed(&self, bundle: &Bundle) -> Result<(Vec<u8>, String), StoreError> {
        let signer = self.signer.as_ref().ok_or(StoreError::NoSigningKey)?;
        let body = serde_json::to_vec(bundle)?;
        let signature = signer.sign(&body);
        Ok((body, signature))
    }

    /// Undoes [`Self::replace_bundle`] of `ours`, stored at `sequence`: the
    /// content of the bundle that was current before it (`previous`, with
    /// its dry-run) is published again under the next version (readers
    /// never go back a version), so workers, which follow the subject, go
    /// back to it; with no previous bundle, a bundle without policies
    /// labelled `withdrawn-<version>` replaces it (it refuses everything,
    /// as no bundle does). It names `ours` as the version it withdraws;
    /// `ours` stays in the history, superseded (the stream refuses
    /// deletions). Nothing happens if another bundle has replaced `ours`
    /// meanwhile: `ours` is no longer in force.
    pub async fn restore_bundle(
        &self,
        previous: Option<&Bundle>,
        ours: &Bundle,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let mut restored = match previous {
            Some(b) => Bundle {
                rollback_of: Some(b.version),
                withdraws: None,
                ..b.clone()
            },
            None => Bundle::new(
                format!("withdrawn-{}", ours.version),
                Vec::new(),
                ours.schema.clone(),
            ),
        };
        restored.version = ours.version + 1;
        restored.withdraws = Some(ours.version);
        let (body, signature) = self.signed(&restored)?;
        match self
            .put(
                &self.bundles,
                &self.bundle_subject,
                body,
                None,
                sequence,
                Some(signature),
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Publishes `bundle`, signed, under the next version whatever the
    /// subject holds (`gatehouse dev` at start); returns it as published.
    pub async fn publish_bundle(&self, bundle: &Bundle) -> Result<Stored<Bundle>, StoreError> {
        let history = self.history().await?;
        let bundle = Bundle {
            version: history.next_version(),
            ..bundle.clone()
        };
        let (body, signature) = self.signed(&bundle)?;
        let sequence = self
            .bundles
            .publish(
                &self.bundle_subject,
                &[(SIGNATURE_HEADER, &signature)],
                body.into(),
                None,
                None,
            )
            .await?;
        Ok(Stored {
            value: bundle,
            sequence,
        })
    }

    /// The current message of the bundle subject (if any) and every later
    /// one, each signature checked: a message that is not signed by a
    /// trusted key is a [`StoreError::Rejected`] naming its sequence. That
    /// a verified bundle is newer than the one in force (its version) is
    /// for the follower to check.
    pub async fn watch_bundles(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Stored<Bundle>, StoreError>> + use<>, StoreError>
    {
        let records = self.bundles.follow(&self.bundle_subject).await?;
        let store = self.clone();
        Ok(records.map(move |m| {
            let m = m?;
            let value = store.open_bundle(m.sequence, m.header(SIGNATURE_HEADER), &m.payload)?;
            Ok(Stored {
                value,
                sequence: m.sequence,
            })
        }))
    }

    /// What a worker decides with as bundles are published: after the
    /// version `current` (0: none), each engine to switch to, in order. A
    /// message is passed over, with an error log naming its stream
    /// sequence, when it is not signed by a trusted key, when its version
    /// is not above the one in force (an older bundle published again; the
    /// current one delivered again is passed over silently), or when it
    /// does not validate. The engine in force then stays.
    pub async fn watch_engines(
        &self,
        current: u64,
    ) -> Result<impl futures::Stream<Item = Engine> + use<>, StoreError> {
        let messages = Box::pin(self.watch_bundles().await?);
        Ok(futures::stream::unfold(
            (messages, current),
            |(mut messages, mut current)| async move {
                loop {
                    let bundle = match messages.next().await? {
                        Ok(b) => b,
                        Err(e @ StoreError::Rejected { .. }) => {
                            tracing::error!(error = %e, in_force = current, "policy bundle rejected; keeping the one in force");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read a policy bundle update");
                            continue;
                        }
                    };
                    let Stored {
                        value: bundle,
                        sequence,
                    } = bundle;
                    if bundle.version <= current {
                        if bundle.version != current {
                            tracing::error!(
                                version = bundle.version,
                                in_force = current,
                                sequence,
                                "an older policy bundle was published again; ignored (going back is a rollback, published under a new version)"
                            );
                        }
                        continue;
                    }
                    let version = bundle.version;
                    let built = tokio::task::spawn_blocking(move || Engine::new(&bundle))
                        .await
                        .map_err(|e| BundleError::Invalid(vec![panicked(&e.to_string())]));
                    match built.and_then(|r| r) {
                        Ok(engine) => {
                            tracing::info!(version, sequence, hash = %engine.bundle_hash(), "policy bundle loaded");
                            current = version;
                            return Some((engine, (messages, current)));
                        }
                        Err(e) => tracing::error!(
                            version,
                            sequence,
                            error = %e,
                            "published policy bundle is not valid; keeping the one in force"
                        ),
                    }
                }
            },
        ))
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
        let last = self
            .revocations
            .last(&self.revocation_subject(revoked))
            .await?;
        Ok(last.map(|m| Stored {
            value: m.payload,
            sequence: m.sequence,
        }))
    }

    /// Stores `revocation`, provided its subject still holds the message at
    /// `expected` (0: none), with `id` as its `Nats-Msg-Id`; returns its
    /// sequence. As [`Self::replace_bundle`].
    ///
    /// Every record is signed with the control plane's key (readers count
    /// an identity as reinstated only on a signed reinstatement); a
    /// reinstatement names `expected`, the record it replaces, under the
    /// signature.
    pub async fn replace_revocation(
        &self,
        revocation: &Revocation,
        id: &str,
        expected: u64,
    ) -> Result<u64, StoreError> {
        self.put_revocation(revocation, Some(id), expected).await
    }

    async fn put_revocation(
        &self,
        revocation: &Revocation,
        id: Option<&str>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        let signer = self.signer.as_ref().ok_or(StoreError::NoSigningKey)?;
        let record = Revocation {
            replaces: revocation.reinstated.then_some(expected),
            ..revocation.clone()
        };
        let body = serde_json::to_vec(&record)?;
        let signature = signer.sign(&body);
        let subject = self.revocation_subject(&record.revoked);
        self.put(
            &self.revocations,
            &subject,
            body,
            id,
            expected,
            Some(signature),
        )
        .await
    }

    /// Undoes [`Self::replace_revocation`] of the record at `sequence`: a
    /// new signed record puts the identity back as it was before
    /// (`previous`, as stored): revoked again if that was a revocation (or
    /// could not be read), else reinstated, replacing `sequence`. Nothing
    /// is ever deleted from the stream, and workers follow the new record.
    /// A later record of the same identity wins (then nothing is stored).
    pub async fn restore_revocation(
        &self,
        revoked: &Revoked,
        previous: Option<Bytes>,
        sequence: u64,
    ) -> Result<(), StoreError> {
        let before = previous.map(|raw| serde_json::from_slice::<Revocation>(&raw));
        let record = match before {
            Some(Ok(r)) if !r.reinstated => r,
            Some(Err(_)) => Revocation {
                revoked: revoked.clone(),
                by: "gatehouse".into(),
                reason: Some("restored: the record before could not be read".into()),
                at: unix_now(),
                reinstated: false,
                replaces: None,
            },
            _ => Revocation {
                revoked: revoked.clone(),
                by: "gatehouse".into(),
                reason: Some("withdrawn: its event could not be recorded".into()),
                at: unix_now(),
                reinstated: true,
                replaces: None,
            },
        };
        match self.put_revocation(&record, None, sequence).await {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Publishes `body` (with `signature` in [`SIGNATURE_HEADER`]) on
    /// `subject` of `stream` if the subject's last sequence is `expected`,
    /// and returns the new message's sequence. When the ack is lost
    /// (timeout, connection), a message with `id` found last on the subject
    /// counts as stored.
    async fn put(
        &self,
        stream: &RecordStream,
        subject: &str,
        body: Vec<u8>,
        id: Option<&str>,
        expected: u64,
        signature: Option<String>,
    ) -> Result<u64, StoreError> {
        let max = self.max_body();
        if body.len() > max {
            return Err(StoreError::TooLarge {
                size: body.len(),
                max,
            });
        }
        let headers = signature_headers(signature.as_deref());
        Ok(stream
            .publish(subject, &headers, Bytes::from(body), id, Some(expected))
            .await?)
    }

    /// Whether `revoked` is revoked now, by its last record.
    pub async fn is_revoked(&self, revoked: &Revoked) -> Result<bool, StoreError> {
        let subject = self.revocation_subject(revoked);
        Ok(match self.revocations.last(&subject).await? {
            Some(m) => {
                self.record_in_force(&subject, m.sequence, m.header(SIGNATURE_HEADER), &m.payload)
                    .await
            }
            None => false,
        })
    }

    /// Whether an identity's last record, as stored on `subject` at
    /// `sequence`, keeps it revoked. Only a reinstatement does not: signed
    /// with a trusted key, naming the identity of its subject, and replacing
    /// the record just before it on the subject (so a reinstatement
    /// published again later, after a newer revocation, does not count).
    /// Anything else — a revocation, an unsigned or altered record, one
    /// that cannot be read or checked — keeps it revoked: a record on an
    /// identity's subject was written to revoke it, or to undo that.
    async fn record_in_force(
        &self,
        subject: &str,
        sequence: u64,
        signature: Option<&str>,
        body: &[u8],
    ) -> bool {
        if self.trusted.verify(body, signature).is_err() {
            tracing::warn!(
                subject,
                sequence,
                "revocation record not signed by a trusted key: the identity stays revoked"
            );
            return true;
        }
        let Ok(record) = serde_json::from_slice::<Revocation>(body) else {
            return true;
        };
        let (true, Some(replaced)) = (record.reinstated, record.replaces) else {
            return true;
        };
        if self.revocation_subject(&record.revoked) != subject {
            return true;
        }
        let first_from = |from: u64| self.revocations.first_from(subject, from);
        match (first_from(replaced).await, first_from(replaced + 1).await) {
            (Ok(Some(before)), Ok(Some(this))) => {
                before.sequence != replaced || this.sequence != sequence
            }
            _ => true,
        }
    }

    /// Each identity's state as it changes: its last record when the
    /// watch starts, then each new one, as the identity and whether it is
    /// revoked ([`Self::record_in_force`]).
    pub async fn watch_revocations(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<(Revoked, bool), StoreError>> + use<>, StoreError>
    {
        let messages = self
            .revocations
            .follow(&format!("{}.>", self.revocation_prefix))
            .await?;
        let store = self.clone();
        Ok(messages.filter_map(move |m| {
            let store = store.clone();
            async move {
                match m {
                    Ok(m) => store.state_of(&m).await.map(Ok),
                    Err(e) => Some(Err(e.into())),
                }
            }
        }))
    }

    /// The identity a followed record is about, and whether it is revoked;
    /// `None` for a message on a subject that names no identity.
    async fn state_of(&self, m: &Record) -> Option<(Revoked, bool)> {
        let key = m
            .subject
            .strip_prefix(self.revocation_prefix.as_str())?
            .strip_prefix('.')?;
        let revoked = Revoked::from_key(key)?;
        let in_force = self
            .record_in_force(
                &m.subject,
                m.sequence,
                m.header(SIGNATURE_HEADER),
                &m.payload,
            )
            .await;
        Some((revoked, in_force))
    }

    /// Every identity revoked now.
    pub async fn revoked(&self) -> Result<HashSet<Revoked>, StoreError> {
        let mut out = HashSet::new();
        let last = self
            .revocations
            .last_per_subject(&format!("{}.>", self.revocation_prefix))
            .await?;
        // The last record of each identity.
        for m in &last {
            if let Some((revoked, true)) = self.state_of(m).await {
                out.insert(revoked);
            }
        }
        Ok(out)
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

/// The headers of a record signed with `signature`, if any.
fn signature_headers(signature: Option<&str>) -> Vec<(&'static str, &str)> {
    signature
        .map(|s| (SIGNATURE_HEADER, s))
        .into_iter()
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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

    /// Where one test keeps its records: a nats-server of its own, or an
    /// embedded file of its own (removed when dropped). Every test runs on
    /// each ([`both`]).
    struct Backend {
        records: RecordStore,
        /// The JetStream context, for what only JetStream has (an API
        /// that could delete messages).
        js: Option<async_nats::jetstream::Context>,
        _nats: Option<Nats>,
        dir: Option<std::path::PathBuf>,
    }

    impl Drop for Backend {
        fn drop(&mut self) {
            if let Some(dir) = &self.dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    async fn jetstream() -> Backend {
        let server = nats().await;
        let client = async_nats::connect(&server.url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        Backend {
            records: RecordStore::JetStream(js.clone()),
            js: Some(js),
            _nats: Some(server),
            dir: None,
        }
    }

    async fn embedded() -> Backend {
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-policystore-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let log = gatehouse_eventlog::EmbeddedLog::open(&dir.join("gatehouse.db"))
            .await
            .unwrap();
        Backend {
            records: RecordStore::Embedded(log),
            js: None,
            _nats: None,
            dir: Some(dir),
        }
    }

    /// Runs the test `$name(backend)` on JetStream and on the embedded
    /// store, as `$name::jetstream` and `$name::embedded`.
    macro_rules! both {
        ($name:ident) => {
            mod $name {
                #[tokio::test]
                async fn jetstream() {
                    super::$name(super::jetstream().await).await
                }

                #[tokio::test]
                async fn embedded() {
                    super::$name(super::embedded().await).await
                }
            }
        };
    }

    fn config(name: &str) -> PolicyConfig {
        PolicyConfig {
            bundle_stream: format!("{name}_BUNDLES"),
            revocation_stream: format!("{name}_REVOCATIONS"),
            ..PolicyConfig::default()
        }
    }

    /// The attack: about 150 nested parentheses in one policy.
    fn too_deep() -> Bundle {
        let text = format!(
            "permit (principal, action, resource) when {{ {}true{} }};",
            "(".repeat(150),
            ")".repeat(150)
        );
        Bundle::new(
            "deep",
            vec![("deep.cedar".into(), text)],
            gatehouse_policies::SCHEMA,
        )
    }

    fn versioned(mut bundle: Bundle, version: u64) -> Bundle {
        bundle.version = version;
        bundle
    }

    /// The control plane's store: signs with a key of its own.
    async fn control_plane(records: &RecordStore, name: &str) -> (PolicyStore, SigningKey) {
        let (key, _) = SigningKey::generate();
        let config = PolicyConfig {
            signing_key: Some(key.clone()),
            ..config(name)
        };
        (PolicyStore::open(records, &config).await.unwrap(), key)
    }

    /// A worker's store: trusts `key`, cannot sign.
    async fn worker(records: &RecordStore, name: &str, key: &SigningKey) -> PolicyStore {
        let config = PolicyConfig {
            bundle_public_keys: vec![key.public_key().to_string()],
            ..config(name)
        };
        let store = PolicyStore::open(records, &config).await.unwrap();
        assert!(store.verifies() && !store.signs());
        store
    }

    /// Publishes `body` on the bundle subject as someone without the key
    /// could, with `signature` as its signature header if given.
    async fn forge(store: &PolicyStore, body: &[u8], signature: Option<String>) -> u64 {
        let headers = signature_headers(signature.as_deref());
        store
            .bundles
            .publish(
                &store.bundle_subject,
                &headers,
                Bytes::copy_from_slice(body),
                None,
                None,
            )
            .await
            .unwrap()
    }

    fn permit_all(version: u64) -> Bundle {
        versioned(
            Bundle::new(
                "defaults",
                vec![(
                    "all.cedar".into(),
                    "permit (principal, action, resource);".into(),
                )],
                gatehouse_policies::SCHEMA,
            ),
            version,
        )
    }

    both!(a_bad_current_bundle_leaves_the_last_good_one_in_force);
    async fn a_bad_current_bundle_leaves_the_last_good_one_in_force(b: Backend) {
        let records = &b.records;

        let (store, _) = control_plane(records, "GOOD").await;
        assert!(store.current_engine().await.unwrap().is_none());
        let good = versioned(Bundle::defaults(), 1);
        let seq = store.replace_bundle(&good, "event-1", 0).await.unwrap();
        let seq = store
            .replace_bundle(&versioned(too_deep(), 2), "event-2", seq)
            .await
            .unwrap();
        // Not even JSON, and unsigned.
        forge(&store, b"{", None).await;
        let engine = store.current_engine().await.unwrap().expect("v1 in force");
        assert_eq!(engine.bundle_version(), 1);
        let history = store.history().await.unwrap();
        assert_eq!(history.last_sequence, seq + 1);
        assert_eq!(history.current().unwrap().value.version, 2);
        assert_eq!(history.next_version(), 3);

        // With nothing valid in the history, no engine: everything refused.
        let (store, _) = control_plane(records, "BAD").await;
        store
            .replace_bundle(&versioned(too_deep(), 1), "event-3", 0)
            .await
            .unwrap();
        assert!(store.current_engine().await.unwrap().is_none());
    }

    both!(bundles_not_signed_by_the_control_plane_are_rejected_and_the_previous_stays);
    async fn bundles_not_signed_by_the_control_plane_are_rejected_and_the_previous_stays(
        b: Backend,
    ) {
        let records = &b.records;
        let (cp, key) = control_plane(records, "SIGNED").await;
        let seq = cp
            .replace_bundle(&versioned(Bundle::defaults(), 1), "event-1", 0)
            .await
            .unwrap();

        let follower = worker(records, "SIGNED", &key).await;
        let engine = follower.current_engine().await.unwrap().unwrap();
        assert_eq!(engine.bundle_version(), 1);
        let mut raw = Box::pin(follower.watch_bundles().await.unwrap());
        let first = raw.next().await.unwrap().unwrap();
        assert_eq!((first.value.version, first.sequence), (1, seq));
        let engines = follower.watch_engines(1).await.unwrap();
        futures::pin_mut!(engines);

        // Unsigned; signed by another key; signed by the right key but
        // altered; a signature that is not one.
        let body = serde_json::to_vec(&permit_all(50)).unwrap();
        let (other, _) = SigningKey::generate();
        let genuine = serde_json::to_vec(&versioned(Bundle::defaults(), 51)).unwrap();
        let tampered = serde_json::to_vec(&permit_all(51)).unwrap();
        let forged = [
            forge(&cp, &body, None).await,
            forge(&cp, &body, Some(other.sign(&body))).await,
            forge(&cp, &tampered, Some(key.sign(&genuine))).await,
            forge(&cp, &body, Some("ed25519:AAAA".into())).await,
        ];
        for sequence in forged {
            match raw.next().await.unwrap() {
                Err(StoreError::Rejected { sequence: s, .. }) => assert_eq!(s, sequence),
                other => panic!("{sequence}: {other:?}"),
            }
        }
        // The control plane's own bundles, before and after, are all that
        // count: the history, a fresh start and a follower agree.
        let history = follower.history().await.unwrap();
        assert_eq!(history.bundles.len(), 1);
        assert_eq!(history.last_sequence, forged[3]);
        assert_eq!(
            follower
                .current_engine()
                .await
                .unwrap()
                .unwrap()
                .bundle_version(),
            1
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), engines.next())
                .await
                .is_err(),
            "the follower switched to a forged bundle"
        );

        // A replay of the control plane's own version 1 (signature and
        // all) is not newer than what is in force: ignored.
        let replay = cp.bundles.get(seq).await.unwrap().unwrap();
        forge(
            &cp,
            &replay.payload,
            replay.header(SIGNATURE_HEADER).map(str::to_string),
        )
        .await;
        // The next genuine version is taken (the last sequence is the
        // replay's, which the control plane expects to replace).
        let last = follower.history().await.unwrap();
        assert_eq!(last.current().unwrap().value.version, 1);
        let published = cp
            .replace_bundle(
                &versioned(Bundle::defaults(), last.next_version()),
                "event-2",
                last.last_sequence,
            )
            .await
            .unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), engines.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.bundle_version(), 2, "published at {published}");

        // A worker that trusts no key applies nothing, and a control plane
        // without a key publishes nothing.
        let blind = PolicyStore::open(records, &config("SIGNED")).await.unwrap();
        assert!(!blind.verifies());
        assert!(blind.current_engine().await.unwrap().is_none());
        assert!(matches!(
            blind.replace_bundle(&permit_all(9), "event-3", 0).await,
            Err(StoreError::NoSigningKey)
        ));
    }

    fn record(revoked: &Revoked, reinstated: bool) -> Revocation {
        Revocation {
            revoked: revoked.clone(),
            by: "admin".into(),
            reason: Some(if reinstated { "found" } else { "lost" }.into()),
            at: 1,
            reinstated,
            replaces: None,
        }
    }

    both!(a_reinstatement_replaces_the_revocation_for_readers_and_followers);
    async fn a_reinstatement_replaces_the_revocation_for_readers_and_followers(b: Backend) {
        let records = &b.records;
        let (cp, key) = control_plane(records, "REINSTATE").await;
        let follower = worker(records, "REINSTATE", &key).await;
        let alice = Revoked::Subject("alice".into());
        let laptop = Revoked::Token("jti-1".into());

        let revoked = cp
            .replace_revocation(&record(&alice, false), "event-1", 0)
            .await
            .unwrap();
        cp.replace_revocation(&record(&laptop, false), "event-2", 0)
            .await
            .unwrap();
        let mut records = Box::pin(follower.watch_revocations().await.unwrap());
        for _ in 0..2 {
            assert!(next(&mut records).await.1);
        }
        assert_eq!(
            follower.revoked().await.unwrap(),
            HashSet::from([alice.clone(), laptop.clone()])
        );

        // Reinstated: the stored record says so, readers leave the identity
        // out, and a follower gets the reinstatement.
        let reinstated = cp
            .replace_revocation(&record(&alice, true), "event-3", revoked)
            .await
            .unwrap();
        let stored = cp.revocation_of(&alice).await.unwrap().unwrap();
        assert_eq!(stored.sequence, reinstated);
        assert!(!cp.is_revoked(&alice).await.unwrap());
        assert_eq!(next(&mut records).await, (alice.clone(), false));
        assert_eq!(
            follower.revoked().await.unwrap(),
            HashSet::from([laptop.clone()])
        );
        cp.replace_revocation(
            &record(&laptop, true),
            "event-4",
            cp.revocation_of(&laptop).await.unwrap().unwrap().sequence,
        )
        .await
        .unwrap();
        assert!(!next(&mut records).await.1);
        assert!(follower.revoked().await.unwrap().is_empty());
        // A fresh follower starts from the last word on each identity.
        let mut fresh = Box::pin(follower.watch_revocations().await.unwrap());
        for _ in 0..2 {
            assert!(!next(&mut fresh).await.1);
        }

        // Undoing the reinstatement (its event could not be recorded)
        // stores the revocation again, and followers take it back.
        cp.restore_revocation(&alice, Some(stored_revocation(&alice)), reinstated)
            .await
            .unwrap();
        assert_eq!(next(&mut records).await, (alice.clone(), true));
        assert_eq!(follower.revoked().await.unwrap(), HashSet::from([alice]));
        let body = serde_json::to_vec(&record(&laptop, false)).unwrap();
        assert!(!String::from_utf8(body).unwrap().contains("reinstated"));
    }

    both!(a_revocation_cannot_be_undone_without_the_key);
    /// Whoever can publish on the revocation stream, but holds no signing
    /// key, cannot undo a revocation: not with a reinstatement of their own
    /// (unsigned, or signed by another key), not by publishing an old
    /// signed reinstatement again, not by deleting the revocation. Each
    /// leaves the identity revoked for readers, followers and the API.
    async fn a_revocation_cannot_be_undone_without_the_key(b: Backend) {
        let records = &b.records;
        let (cp, key) = control_plane(records, "FORGE").await;
        let follower = worker(records, "FORGE", &key).await;
        let mallory = Revoked::Subject("mallory".into());
        let subject = cp.revocation_subject(&mallory);
        let first = cp
            .replace_revocation(&record(&mallory, false), "e-1", 0)
            .await
            .unwrap();
        let old_reinstatement = cp
            .replace_revocation(&record(&mallory, true), "e-2", first)
            .await
            .unwrap();
        let old = cp
            .revocations
            .get(old_reinstatement)
            .await
            .unwrap()
            .unwrap();
        let revoked_again = cp
            .replace_revocation(&record(&mallory, false), "e-3", old_reinstatement)
            .await
            .unwrap();
        assert!(cp.is_revoked(&mallory).await.unwrap());
        let mut records = Box::pin(follower.watch_revocations().await.unwrap());
        assert_eq!(next(&mut records).await, (mallory.clone(), true));

        let (other, _) = SigningKey::generate();
        let forged = serde_json::to_vec(&Revocation {
            replaces: Some(revoked_again),
            ..record(&mallory, true)
        })
        .unwrap();
        let publish = async |body: Vec<u8>, signature: Option<String>| {
            let headers = signature_headers(signature.as_deref());
            cp.revocations
                .publish(&subject, &headers, body.into(), None, None)
                .await
                .unwrap();
        };
        // Unsigned; signed by another key; the old signed reinstatement
        // published again, byte for byte.
        publish(forged.clone(), None).await;
        publish(forged.clone(), Some(other.sign(&forged))).await;
        let old_signature = old.header(SIGNATURE_HEADER).unwrap().to_string();
        publish(old.payload.to_vec(), Some(old_signature)).await;
        for _ in 0..3 {
            assert_eq!(next(&mut records).await, (mallory.clone(), true));
        }
        assert!(cp.is_revoked(&mallory).await.unwrap());
        assert_eq!(
            follower.revoked().await.unwrap(),
            HashSet::from([mallory.clone()])
        );
        // Nothing can be deleted from the stream (the embedded store has
        // no API that deletes).
        if let Some(js) = &b.js {
            let stream = js.get_stream("FORGE_REVOCATIONS").await.unwrap();
            assert!(stream.delete_message(revoked_again).await.is_err());
        }
        assert!(cp.is_revoked(&mallory).await.unwrap());
        // The control plane's own reinstatement still works.
        let last = cp.revocation_of(&mallory).await.unwrap().unwrap().sequence;
        cp.replace_revocation(&record(&mallory, true), "e-4", last)
            .await
            .unwrap();
        assert!(!cp.is_revoked(&mallory).await.unwrap());
        assert!(follower.revoked().await.unwrap().is_empty());
    }

    /// The next identity and state a follower reads.
    async fn next(
        records: &mut (impl futures::Stream<Item = Result<(Revoked, bool), StoreError>> + Unpin),
    ) -> (Revoked, bool) {
        tokio::time::timeout(std::time::Duration::from_secs(10), records.next())
            .await
            .expect("the follower to see the record")
            .unwrap()
            .unwrap()
    }

    fn stored_revocation(revoked: &Revoked) -> Bytes {
        serde_json::to_vec(&record(revoked, false)).unwrap().into()
    }

    both!(a_withdrawn_bundle_is_replaced_by_the_previous_content_under_a_new_version);
    async fn a_withdrawn_bundle_is_replaced_by_the_previous_content_under_a_new_version(
        b: Backend,
    ) {
        let records = &b.records;
        let (cp, _) = control_plane(records, "UNDO").await;
        let v1 = versioned(Bundle::defaults(), 1);
        let seq = cp.replace_bundle(&v1, "event-1", 0).await.unwrap();
        let v2 = permit_all(2);
        let seq2 = cp.replace_bundle(&v2, "event-2", seq).await.unwrap();
        cp.restore_bundle(Some(&v1), &v2, seq2).await.unwrap();
        let history = cp.history().await.unwrap();
        let current = &history.current().unwrap().value;
        assert_eq!((current.version, current.rollback_of), (3, Some(1)));
        assert_eq!(current.hash, v1.hash);
        assert_eq!(current.withdraws, Some(2));
        assert!(
            history.version(2).is_some(),
            "kept in the history, superseded"
        );
        // Its content can be pushed again (it was never in force on
        // record), unlike version 1's.
        assert!(history.earlier_with_hash(&v2.hash).is_none());
        // The history cannot be cut short: no bundle can be deleted.
        if let Some(js) = &b.js {
            let stream = js.get_stream("UNDO_BUNDLES").await.unwrap();
            assert!(stream.delete_message(seq2).await.is_err());
        }
        assert_eq!(
            cp.history().await.unwrap().current().unwrap().value.version,
            3
        );
    }
}
