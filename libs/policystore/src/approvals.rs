//! Approvals on a stream of records: the worker holding a command requests
//! one and follows it; approvers grant or deny through the control plane;
//! whoever sees it past its expiry ends it.
//!
//! The stream is `<policy.revocation_stream>_APPROVALS`, one subject per
//! approval (`gatehouse.<stream>.approval.<id>` for a command's,
//! `gatehouse.<stream>.approval.access.<id>` for access, so that
//! `approval.>` is every approval and `approval.access.>` only access),
//! each record the whole
//! [`Approval`] after one change, with the change's name in the header
//! [`CHANGE_HEADER`]. A change is published on condition that the subject
//! still ends with the record it was computed from, so that racing writers
//! (a grant and a deny, two control-plane replicas, an expiry and a grant)
//! produce one outcome: the loser reads the winner and is refused by
//! [`Approval::apply`]. The log is the only state: a restarted control
//! plane reads pending approvals from it.
//!
//! **Leases.** A command waits in one worker's memory; if that worker dies
//! the command can never run, and its approval must not look pending. Each
//! worker renews a lease every [`LEASE_INTERVAL`]
//! (`gatehouse.<stream>.lease.<sha256 of the worker id>`: its id, when it
//! started, when renewed). A pending approval whose worker's lease is
//! older than [`LEASE_TIMEOUT`], missing, or started after the request (the
//! worker restarted under the same id) is held by no one:
//! ([`Lease::holds`] says no), and the control plane cancels it
//! (`worker_lost`).
//!
//! **Signatures.** Access granted for a while changes decisions on every
//! worker, as a policy bundle does, so it is honoured only as the control
//! plane wrote it: every record the control plane writes is signed with
//! its policy signing key ([`SIGNATURE_HEADER`], as bundles are) and names
//! the sequence of the record it was computed from (`replaces`). A worker
//! takes an access record as in force only if a trusted key signed it and
//! it is the record right after the one it replaces on its subject
//! ([`AccessRecord::verified`]): a record of one's own, a record moved to
//! another approval's subject, or an old grant published again after its
//! revocation grants nothing (and, being the latest, ends what was in
//! force: fail closed).
//!
//! **Targets.** Access is asked for by target name, and approvers decide
//! on the target's attributes, which only the workers' configurations
//! hold: each worker announces the targets it fronts at start
//! (`gatehouse.<stream>.target.<sha256 of the name>`, [`KnownTarget`]).

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use gatehouse_eventlog::{Record, RecordError, RecordStore, RecordStream, StreamSettings};
use gatehouse_events::approval::{Approval, ApprovalTarget, Change, Refusal};

use crate::signing::{SIGNATURE_HEADER, SigningKey, TrustedKeys};
use uuid::Uuid;

/// The header naming the change a record holds (`requested`, `granted`,
/// `denied`, `expired`, `cancelled`).
pub const CHANGE_HEADER: &str = "Gatehouse-Approval-Change";
/// Records kept per approval: the request, each grant, the end.
const HISTORY: i64 = 32;
/// Tries of a change that keeps losing races before it gives up.
const TRIES: usize = 8;
/// How often a worker renews its lease.
pub const LEASE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// A lease not renewed for this long is a worker gone.
pub const LEASE_TIMEOUT: chrono::Duration = chrono::Duration::seconds(30);

/// A worker's lease: it holds the commands waiting in its sessions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub worker_id: String,
    /// When this run of the worker started.
    pub started_at: DateTime<Utc>,
    /// When the lease was last renewed.
    pub renewed_at: DateTime<Utc>,
}

impl Lease {
    /// Whether the worker still holds the pending approval `a` at `now`:
    /// the lease is fresh and from the run that requested it.
    pub fn holds(&self, a: &Approval, now: DateTime<Utc>) -> bool {
        self.renewed_at + LEASE_TIMEOUT >= now && self.started_at <= a.requested_at
    }
}

/// A target as a worker announced it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnownTarget {
    pub target: ApprovalTarget,
    /// The worker that announced it last, and when.
    pub worker_id: String,
    pub announced_at: DateTime<Utc>,
}

/// The approvals stream for a revocation stream.
pub fn stream_for(revocation_stream: &str) -> String {
    format!("{revocation_stream}_APPROVALS")
}

/// Why an approval could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no approval {0}")]
    NotFound(Uuid),
    #[error("approval {0} exists already")]
    Taken(Uuid),
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("the approval kept changing while it was being changed; try again")]
    Busy,
    #[error("the approvals stream is unavailable: {0}")]
    Unavailable(String),
    #[error("an approval record is unreadable: {0}")]
    Unreadable(String),
}

impl From<RecordError> for ApprovalError {
    fn from(e: RecordError) -> Self {
        ApprovalError::Unavailable(e.to_string())
    }
}

/// The approvals stream.
#[derive(Clone)]
pub struct Approvals {
    stream: RecordStream,
    prefix: String,
    /// The control plane's: signs every record it writes.
    signer: Option<SigningKey>,
    /// Whose signatures make access records count.
    trusted: TrustedKeys,
}

/// An access record as followed, and whether it counts: signed by a
/// trusted key and next after the record it replaces on its subject.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub approval: Approval,
    pub verified: bool,
}

impl Approvals {
    /// Opens the approvals stream of `revocation_stream`, creating it if
    /// it is missing.
    pub async fn open(
        records: &RecordStore,
        revocation_stream: &str,
    ) -> Result<Self, ApprovalError> {
        let name = stream_for(revocation_stream);
        let prefix = format!("gatehouse.{name}");
        let stream = records
            .open(StreamSettings {
                name,
                description: Some("Gatehouse: approvals of single commands".into()),
                subjects: format!("{prefix}.>"),
                per_subject: HISTORY,
                deny_delete: true,
            })
            .await?;
        Ok(Self {
            stream,
            prefix,
            signer: None,
            trusted: TrustedKeys::default(),
        })
    }

    /// Signs what this side writes with `signer` (the control plane's
    /// policy signing key), and counts access records signed by `trusted`
    /// (and by `signer`).
    pub fn signed(mut self, signer: Option<SigningKey>, mut trusted: TrustedKeys) -> Self {
        if let Some(k) = &signer {
            trusted.add(k.public_key());
        }
        self.signer = signer;
        self.trusted = trusted;
        self
    }

    /// Whether this side signs what it writes (so access it records can be
    /// in force).
    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// Publishes `approval` on its subject after a change named `change`,
    /// signed if this side signs, on condition of the subject's last
    /// sequence.
    async fn put(
        &self,
        approval: &Approval,
        change: &str,
        expected: u64,
    ) -> Result<u64, RecordError> {
        let payload = serde_json::to_vec(approval)
            .map_err(|e| RecordError::Unavailable(format!("cannot encode an approval: {e}")))?;
        let signature = self.signer.as_ref().map(|k| k.sign(&payload));
        let mut headers = vec![(CHANGE_HEADER, change)];
        if let Some(s) = &signature {
            headers.push((SIGNATURE_HEADER, s.as_str()));
        }
        self.stream
            .publish(
                &self.subject(approval),
                &headers,
                payload.into(),
                None,
                Some(expected),
            )
            .await
    }

    fn subject(&self, a: &Approval) -> String {
        match a.access() {
            Some(_) => self.access_subject(a.id),
            None => self.command_subject(a.id),
        }
    }

    fn command_subject(&self, id: Uuid) -> String {
        format!("{}.approval.{}", self.prefix, id.simple())
    }

    fn access_subject(&self, id: Uuid) -> String {
        format!("{}.approval.access.{}", self.prefix, id.simple())
    }

    fn hashed_subject(&self, kind: &str, key: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        format!("{}.{kind}.{}", self.prefix, hex::encode(digest))
    }

    fn lease_subject(&self, worker_id: &str) -> String {
        self.hashed_subject("lease", worker_id)
    }

    /// Announces a target a worker fronts, with the attributes policies
    /// see, so that access to it can be asked for and decided.
    pub async fn announce(&self, known: &KnownTarget) -> Result<(), ApprovalError> {
        let payload =
            serde_json::to_vec(known).map_err(|e| ApprovalError::Unreadable(e.to_string()))?;
        self.stream
            .publish(
                &self.hashed_subject("target", &known.target.name),
                &[],
                payload.into(),
                None,
                None,
            )
            .await?;
        Ok(())
    }

    /// The target `name` as last announced, if a worker ever did.
    pub async fn target(&self, name: &str) -> Result<Option<KnownTarget>, ApprovalError> {
        match self
            .stream
            .last(&self.hashed_subject("target", name))
            .await?
        {
            Some(r) => serde_json::from_slice(&r.payload)
                .map(Some)
                .map_err(|e| ApprovalError::Unreadable(format!("target {}: {e}", r.sequence))),
            None => Ok(None),
        }
    }

    /// Every target workers have announced, by name.
    pub async fn targets(&self) -> Result<Vec<KnownTarget>, ApprovalError> {
        let records = self
            .stream
            .last_per_subject(&format!("{}.target.>", self.prefix))
            .await?;
        let mut all = records
            .iter()
            .map(|r| {
                serde_json::from_slice::<KnownTarget>(&r.payload)
                    .map_err(|e| ApprovalError::Unreadable(format!("target {}: {e}", r.sequence)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        all.sort_by(|a, b| a.target.name.cmp(&b.target.name));
        Ok(all)
    }

    /// Renews a worker's lease.
    pub async fn renew(&self, lease: &Lease) -> Result<(), ApprovalError> {
        let payload =
            serde_json::to_vec(lease).map_err(|e| ApprovalError::Unreadable(e.to_string()))?;
        self.stream
            .publish(
                &self.lease_subject(&lease.worker_id),
                &[],
                payload.into(),
                None,
                None,
            )
            .await?;
        Ok(())
    }

    /// The last lease of `worker_id`, if it ever had one.
    pub async fn lease(&self, worker_id: &str) -> Result<Option<Lease>, ApprovalError> {
        match self.stream.last(&self.lease_subject(worker_id)).await? {
            Some(r) => serde_json::from_slice(&r.payload)
                .map(Some)
                .map_err(|e| ApprovalError::Unreadable(format!("lease {}: {e}", r.sequence))),
            None => Ok(None),
        }
    }

    /// Records a new approval (its subject must be empty). Published again
    /// after a lost acknowledgement, it is found stored and taken as done;
    /// another approval under the same id is refused.
    pub async fn request(&self, approval: &Approval) -> Result<(), ApprovalError> {
        let published = self.put(approval, "requested", 0).await;
        match published {
            Ok(_) => Ok(()),
            Err(RecordError::Conflict(_)) => match self.get(approval.id).await? {
                Some((stored, _)) if stored == *approval => Ok(()),
                _ => Err(ApprovalError::Taken(approval.id)),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The approval as it stands, with the sequence of its last record. A
    /// request for access whose last record does not count (see
    /// [`AccessRecord::verified`]) is none.
    pub async fn get(&self, id: Uuid) -> Result<Option<(Approval, u64)>, ApprovalError> {
        if let Some(r) = self.stream.last(&self.command_subject(id)).await? {
            return Ok(Some((read(&r)?, r.sequence)));
        }
        if let Some(r) = self.stream.last(&self.access_subject(id)).await? {
            let a = read(&r)?;
            if self.verified(&r, &a).await {
                return Ok(Some((a, r.sequence)));
            }
        }
        Ok(None)
    }

    /// Applies `change` to the approval as it stands at `now`, and records
    /// the result on condition that nothing changed it meanwhile; a race
    /// lost is read again and decided again (so a grant that loses to a
    /// denial is refused as `Ended(Denied)`).
    pub async fn change(
        &self,
        id: Uuid,
        change: &Change,
        now: DateTime<Utc>,
    ) -> Result<Approval, ApprovalError> {
        for _ in 0..TRIES {
            let (current, sequence) = self.get(id).await?.ok_or(ApprovalError::NotFound(id))?;
            let mut next = current.apply(change, now)?;
            next.replaces = Some(sequence);
            match self.put(&next, change.name(), sequence).await {
                Ok(_) => return Ok(next),
                Err(RecordError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApprovalError::Busy)
    }

    /// Every approval as it stands now, oldest request first (requests for
    /// access whose last record does not count left out).
    pub async fn all(&self) -> Result<Vec<Approval>, ApprovalError> {
        let records = self
            .stream
            .last_per_subject(&format!("{}.approval.>", self.prefix))
            .await?;
        let mut all = Vec::with_capacity(records.len());
        for r in &records {
            let a = read(r)?;
            if a.access().is_none() || self.verified(r, &a).await {
                all.push(a);
            }
        }
        all.sort_by_key(|a| (a.requested_at, a.id));
        Ok(all)
    }

    /// The approval `a` as it stands, then every change to it.
    pub async fn follow(
        &self,
        a: &Approval,
    ) -> Result<BoxStream<'static, Result<Approval, ApprovalError>>, ApprovalError> {
        let records = self.stream.follow(&self.subject(a)).await?;
        Ok(records
            .map(|r| r.map_err(ApprovalError::from).and_then(|r| read(&r)))
            .boxed())
    }

    /// Every request for access as it stands, then every change to any,
    /// each with whether it counts: what a worker follows to know the
    /// access in force.
    pub async fn follow_access(
        &self,
    ) -> Result<BoxStream<'static, Result<AccessRecord, ApprovalError>>, ApprovalError> {
        let records = self
            .stream
            .follow(&format!("{}.approval.access.>", self.prefix))
            .await?;
        let this = self.clone();
        Ok(records
            .then(move |r| {
                let this = this.clone();
                async move {
                    let r = r?;
                    let approval = read(&r)?;
                    let verified = this.verified(&r, &approval).await;
                    if !verified {
                        tracing::warn!(
                            subject = %r.subject,
                            sequence = r.sequence,
                            "an access record not written by the control plane grants nothing"
                        );
                    }
                    Ok(AccessRecord { approval, verified })
                }
            })
            .boxed())
    }

    /// Whether record `r` (holding `a`) counts: a request for access or a
    /// change to one, signed by a trusted key, on its own approval's
    /// subject, and — for a change — the record right after the one it
    /// replaces there (so an old record published again does not count).
    async fn verified(&self, r: &Record, a: &Approval) -> bool {
        if a.access().is_none()
            || r.subject != self.subject(a)
            || self
                .trusted
                .verify(&r.payload, r.header(SIGNATURE_HEADER))
                .is_err()
        {
            return false;
        }
        let Some(replaced) = a.replaces else {
            // A request: it grants nothing by itself.
            return true;
        };
        let first_from = |from: u64| self.stream.first_from(&r.subject, from);
        match (first_from(replaced).await, first_from(replaced + 1).await) {
            (Ok(Some(before)), Ok(Some(this))) => {
                before.sequence == replaced && this.sequence == r.sequence
            }
            _ => false,
        }
    }

    /// The sequence of the last change recorded (0 when none): where a
    /// follower that wants only what happens from now on starts.
    pub async fn position(&self) -> Result<u64, ApprovalError> {
        Ok(self.stream.last_sequence().await?)
    }

    /// Every change to any approval recorded after sequence `after` (see
    /// [`Approvals::position`]), as it is recorded: what a worker follows
    /// once for all its sessions' approvals.
    pub async fn follow_after(
        &self,
        after: u64,
    ) -> Result<BoxStream<'static, Result<Changed, ApprovalError>>, ApprovalError> {
        let records = self
            .stream
            .follow_after(&format!("{}.approval.>", self.prefix), after)
            .await?;
        Ok(records.map(|r| changed(r?)).boxed())
    }

    /// Every approval's last record, then every change to any.
    pub async fn follow_all(
        &self,
    ) -> Result<BoxStream<'static, Result<Changed, ApprovalError>>, ApprovalError> {
        let records = self
            .stream
            .follow(&format!("{}.approval.>", self.prefix))
            .await?;
        let this = self.clone();
        // Requests for access that do not count are left out, as by `all`.
        Ok(records
            .filter_map(move |r| {
                let this = this.clone();
                async move {
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => return Some(Err(e.into())),
                    };
                    let c = match changed(r.clone()) {
                        Ok(c) => c,
                        Err(e) => return Some(Err(e)),
                    };
                    if c.approval.access().is_some() && !this.verified(&r, &c.approval).await {
                        return None;
                    }
                    Some(Ok(c))
                }
            })
            .boxed())
    }
}

fn changed(r: Record) -> Result<Changed, ApprovalError> {
    Ok(Changed {
        change: r.header(CHANGE_HEADER).unwrap_or_default().to_string(),
        sequence: r.sequence,
        approval: read(&r)?,
    })
}

/// One change to an approval, as followed.
#[derive(Debug, Clone)]
pub struct Changed {
    pub approval: Approval,
    /// `requested`, `granted`, `denied`, `expired` or `cancelled`.
    pub change: String,
    /// The record's sequence in the approvals stream.
    pub sequence: u64,
}

fn read(r: &Record) -> Result<Approval, ApprovalError> {
    serde_json::from_slice(&r.payload)
        .map_err(|e| ApprovalError::Unreadable(format!("record {}: {e}", r.sequence)))
}
