//! Decisions in the worker: the current policy bundle, revocations and the
//! access granted (kept fresh by watching the policy store and the
//! approvals stream), and each session's view of them — its principal, its
//! target, its prepared statements.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use gatehouse_events::approval::Approval;
use gatehouse_events::{DecisionEffect, DecisionRecord, Identity};
use gatehouse_policies::{
    Classification, Decision, Effect, Engine, Principal, Session, StatementFacts, StatementKind,
    TargetInfo,
};
use gatehouse_policystore::approvals::Approvals;
use gatehouse_policystore::{PolicyConfig, PolicyStore, Revoked};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::ClientError;

/// What every session decides with at a given moment.
#[derive(Default)]
pub(crate) struct PolicyState {
    /// `None` until a bundle has been published: every command is refused.
    pub engine: Option<Arc<Engine>>,
    pub revoked: HashSet<Revoked>,
    pub access: Arc<AccessGrants>,
}

impl PolicyState {
    fn with(&self, f: impl FnOnce(&mut PolicyState)) -> Arc<PolicyState> {
        let mut next = PolicyState {
            engine: self.engine.clone(),
            revoked: self.revoked.clone(),
            access: self.access.clone(),
        };
        f(&mut next);
        Arc::new(next)
    }
}

pub(crate) type Policies = watch::Receiver<Arc<PolicyState>>;

/// Access granted to identities on targets, not yet over: who asked (the
/// subject and delegation chain it is granted to, exactly), where, the
/// scope policies see, until when.
#[derive(Debug, Default, Clone)]
pub(crate) struct AccessGrants {
    by_subject: HashMap<String, Vec<AccessGrant>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AccessGrant {
    id: Uuid,
    actors: Vec<String>,
    target: String,
    scope: String,
    until: DateTime<Utc>,
}

/// The access a session decides with: the approvals' ids, in order, and
/// the scopes they grant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct InForce {
    pub ids: Vec<Uuid>,
    pub scopes: BTreeSet<String>,
}

impl AccessGrants {
    /// Takes in the latest record of a request for access: granted access
    /// not yet over is kept if the record `counts` (the control plane wrote
    /// it), anything else (revoked, expired, pending, denied, a record of
    /// someone else's) dropped, with whatever of that subject's is over by
    /// `now`.
    pub fn apply(&mut self, a: &Approval, counts: bool, now: DateTime<Utc>) {
        let subject = &a.requester.subject;
        let list = self.by_subject.entry(subject.clone()).or_default();
        list.retain(|g| g.id != a.id && g.until > now);
        if let (Some(access), Some(until)) = (a.access(), a.access_until())
            && counts
            && a.access_in_force(now)
        {
            list.push(AccessGrant {
                id: a.id,
                actors: a
                    .requester
                    .delegation
                    .iter()
                    .map(|d| d.subject.clone())
                    .collect(),
                target: a.target.name.clone(),
                scope: access.scope.clone(),
                until,
            });
        }
        if list.is_empty() {
            self.by_subject.remove(subject);
        }
    }

    /// The grants in force at `now` for exactly this identity (subject and
    /// delegation chain) on `target`.
    fn applying<'a>(
        &'a self,
        p: &'a Principal,
        target: &'a str,
        now: DateTime<Utc>,
    ) -> impl Iterator<Item = &'a AccessGrant> {
        self.by_subject
            .get(&p.subject)
            .into_iter()
            .flatten()
            .filter(move |g| g.target == target && g.actors == p.delegation && now < g.until)
    }

    /// The access in force at `now` for exactly this identity on `target`.
    pub fn in_force(&self, p: &Principal, target: &str, now: DateTime<Utc>) -> InForce {
        let mut out = InForce::default();
        for g in self.applying(p, target, now) {
            out.ids.push(g.id);
            out.scopes.insert(g.scope.clone());
        }
        out.ids.sort();
        out
    }

    /// Whether the access in force at `now` for this identity on `target`
    /// is still `ids` (sorted): asked before each message of a session, so
    /// it allocates nothing.
    pub fn still(&self, p: &Principal, target: &str, now: DateTime<Utc>, ids: &[Uuid]) -> bool {
        let mut n = 0;
        for g in self.applying(p, target, now) {
            if ids.binary_search(&g.id).is_err() {
                return false;
            }
            n += 1;
        }
        n == ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_subject.is_empty()
    }
}

/// Loads the current bundle, revocations and access granted, and keeps
/// them fresh. Only bundles signed by a key of `policy.bundle_public_keys`
/// are applied, so a store that trusts no key is refused here.
pub(crate) async fn start(store: PolicyStore, approvals: Approvals) -> Result<Policies, String> {
    if !store.verifies() {
        return Err(
            "policy.bundle_public_keys is empty: a worker applies only policy bundles \
             signed by the control plane, so it needs the public key of the control plane's \
             policy.signing_key_file"
                .into(),
        );
    }
    // The newest bundle that verifies and validates: one that does not is
    // logged and passed over, so a bad bundle cannot keep workers from
    // starting.
    let engine = match store.current_engine().await.map_err(|e| e.to_string())? {
        Some(engine) => Some(Arc::new(engine)),
        None => {
            tracing::warn!("no valid policy bundle published yet: every command will be refused");
            None
        }
    };
    let revoked = store.revoked().await.map_err(|e| e.to_string())?;
    let in_force = engine.as_ref().map_or(0, |e| e.bundle_version());
    let (tx, rx) = watch::channel(Arc::new(PolicyState {
        engine,
        revoked,
        access: Arc::default(),
    }));
    let tx = Arc::new(tx);

    // Newer signed, valid bundles only; the rest is logged by the store.
    let engines = store
        .watch_engines(in_force)
        .await
        .map_err(|e| e.to_string())?;
    let t = tx.clone();
    tokio::spawn(async move {
        futures::pin_mut!(engines);
        while let Some(engine) = engines.next().await {
            let engine = Some(Arc::new(engine));
            t.send_modify(|s| *s = s.with(|s| s.engine = engine.clone()));
        }
    });
    tokio::spawn(follow_access(approvals, tx.clone()));
    let revocations = store.watch_revocations().await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        futures::pin_mut!(revocations);
        while let Some(r) = revocations.next().await {
            match r {
                // A reinstatement takes the identity out of the set: its
                // new logins and its sessions' next messages are let through.
                Ok((identity, in_force)) => {
                    tx.send_if_modified(|s| {
                        let mut revoked = s.revoked.clone();
                        let changed = if in_force {
                            revoked.insert(identity)
                        } else {
                            revoked.remove(&identity)
                        };
                        if changed {
                            *s = s.with(|s| s.revoked = revoked);
                        }
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot read a revocation"),
            }
        }
    });
    Ok(rx)
}

/// Keeps the access granted in the policy state: every request for access
/// as it stands, then each change; followed again from the start if the
/// stream fails (the state is rebuilt, not patched, then).
async fn follow_access(approvals: Approvals, tx: Arc<watch::Sender<Arc<PolicyState>>>) {
    loop {
        match approvals.follow_access().await {
            Ok(mut changes) => {
                let mut grants = AccessGrants::default();
                while let Some(next) = changes.next().await {
                    match next {
                        Ok(r) => {
                            grants.apply(&r.approval, r.verified, Utc::now());
                            let access = Arc::new(grants.clone());
                            tx.send_modify(|s| *s = s.with(|s| s.access = access));
                        }
                        Err(e) => tracing::warn!(error = %e, "an access record was skipped"),
                    }
                }
                tracing::warn!("the access records ended; following them again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the access records; trying again")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// One session's side of decisions.
pub(crate) struct SessionPolicy {
    pub principal: Principal,
    pub target: TargetInfo,
    pub source_ip: String,
    /// What revokes the session: its subject, every actor of its
    /// delegation chain, its token.
    revoked_by: Vec<Revoked>,
    /// The `connect` decision made the session read-only.
    pub read_only: bool,
    /// The access in force the session's decisions were made with.
    access: InForce,
    /// Cedar entities of this session, built for `engine_of`.
    entities: Option<(Arc<Engine>, Session)>,
}

/// The outcome of deciding one command.
pub(crate) struct CommandDecision {
    pub record: Option<DecisionRecord>,
    /// What to tell the client instead of running the command, if anything.
    pub refusal: Option<ClientError>,
    /// The effect is a denial (not an approval to wait for).
    pub denied: bool,
    /// The command runs only once approved: what the approval needs.
    pub approval: Option<ApprovalNeed>,
}

/// What the policies that asked for an approval say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ApprovalNeed {
    /// Distinct approvers who must grant.
    pub approvers: u32,
    /// How long it may wait.
    pub timeout_secs: u32,
}

impl SessionPolicy {
    pub fn new(
        config: &PolicyConfig,
        identity: &Identity,
        token_id: Option<String>,
        target: TargetInfo,
        source_ip: String,
    ) -> Self {
        let principal = Principal::from_claims(
            identity.subject.clone(),
            Some(identity.username.clone()),
            identity.groups.clone(),
            identity
                .delegation
                .iter()
                .map(|a| a.subject.clone())
                .collect(),
            &config.agent_group,
        );
        Self {
            principal,
            target,
            source_ip,
            revoked_by: std::iter::once(&identity.subject)
                .chain(identity.delegation.iter().map(|a| &a.subject))
                .map(|s| Revoked::Subject(s.clone()))
                .chain(token_id.map(Revoked::Token))
                .collect(),
            read_only: false,
            access: InForce::default(),
            entities: None,
        }
    }

    /// The session's entities for `engine`, rebuilt when the bundle changed.
    fn entities(&mut self, engine: &Arc<Engine>) -> &Session {
        let fresh = matches!(&self.entities, Some((e, _)) if Arc::ptr_eq(e, engine));
        if !fresh {
            let s = engine
                .session(&self.principal, &self.target, &self.source_ip)
                .with_grants(self.access.scopes.clone());
            self.entities = Some((engine.clone(), s));
        }
        &self.entities.as_ref().expect("just set").1
    }

    /// Cedar's `unmask` for a column, with the bundle of the session's last
    /// decision (none yet: masked).
    pub fn may_unmask(&self, table: &str, column: &str) -> bool {
        self.entities.as_ref().is_some_and(|(engine, session)| {
            engine.decide_unmask(session, table, column).effect == Effect::Allow
        })
    }

    /// The bundle of the session's last decision, to tell when it changes.
    pub fn engine_id(&self) -> usize {
        self.entities
            .as_ref()
            .map_or(0, |(e, _)| Arc::as_ptr(e) as usize)
    }

    /// Whether the identity or its token has been revoked.
    pub fn revoked(&self, state: &PolicyState) -> bool {
        !state.revoked.is_empty() && self.revoked_by.iter().any(|r| state.revoked.contains(r))
    }

    /// Takes in the access granted to the session's identity on its target
    /// and in force at `now` (Unix seconds); whether it changed since the
    /// session's last decision.
    fn refresh_access(&mut self, state: &PolicyState, now: i64) -> bool {
        if state.access.is_empty() && self.access.ids.is_empty() {
            return false;
        }
        let now = DateTime::from_timestamp(now, 0).unwrap_or_default();
        let (p, target) = (&self.principal, self.target.name.as_str());
        if state.access.still(p, target, now, &self.access.ids) {
            return false;
        }
        self.access = state.access.in_force(p, target, now);
        self.entities = None;
        true
    }

    /// Checks the session against the access in force at `now`: when it
    /// changed since the session's last decision, `connect` is decided
    /// again with it, and a session that needed access now over (expired,
    /// revoked) is refused, as at login. The session's read-only mode
    /// stays as it was decided at login.
    pub fn access_changed(&mut self, state: &PolicyState, now: i64) -> Result<(), ClientError> {
        if !self.refresh_access(state, now) {
            return Ok(());
        }
        let read_only = self.read_only;
        let decided = self.decide_connect(state, now);
        self.read_only = read_only;
        decided.map(|_| ()).map_err(|e| {
            ClientError::fatal(
                "42501",
                format!(
                    "{}; the access granted to this session has ended or changed",
                    e.message
                ),
            )
        })
    }

    /// The `connect` decision, with the access in force at `now` (Unix
    /// seconds).
    pub fn decide_connect(
        &mut self,
        state: &PolicyState,
        now: i64,
    ) -> Result<Decision, ClientError> {
        self.refresh_access(state, now);
        let Some(engine) = &state.engine else {
            return Err(ClientError::fatal("42501", NO_BUNDLE));
        };
        let engine = engine.clone();
        let d = engine.decide_connect_in(self.entities(&engine));
        match d.effect {
            Effect::Allow => {
                // Whatever dry-run is in force: a read-only session stays
                // read-only on the target, and is enforced in full.
                self.read_only = d.read_only;
                Ok(d)
            }
            _ => Err(ClientError::fatal(
                "42501",
                format!(
                    "access to target \"{}\" denied: {}",
                    self.target.name,
                    d.reason
                        .clone()
                        .unwrap_or_else(|| "no policy permits it".into())
                ),
            )),
        }
    }

    /// Decides a command that executes no prepared statement by name (or
    /// judges such an `EXECUTE` as text it cannot read).
    pub fn decide(&mut self, state: &PolicyState, c: &Classification) -> CommandDecision {
        self.decide_with(state, c, |_| None)
    }

    /// Decides a command from its classification, with `prepared` saying
    /// what each name its `EXECUTE`s run was prepared as: every statement
    /// decided, the most severe effect stands.
    pub fn decide_with<'p>(
        &mut self,
        state: &PolicyState,
        c: &Classification,
        prepared: impl Fn(&str) -> Option<&'p StatementFacts>,
    ) -> CommandDecision {
        let Some(engine) = state.engine.clone() else {
            return CommandDecision {
                record: None,
                refusal: Some(ClientError::error("42501", NO_BUNDLE)),
                denied: true,
                approval: None,
            };
        };
        let started = Instant::now();
        self.entities(&engine);
        let session = &self.entities.as_ref().expect("fresh").1;
        let d = engine.decide_command(session, c, &prepared);
        let need = ApprovalNeed {
            approvers: d.approvers.max(1),
            timeout_secs: d.approval_timeout_secs.max(1),
        };
        let (mut effect, policies, mut reason) = (d.effect, d.policies, d.reason);
        // A read-only session is never made writable, whatever the policies
        // say and even in dry-run.
        let read_only_violation = self.read_only
            && c.statements.iter().any(|s| {
                s.disables_read_only
                    || s.executes
                        .as_deref()
                        .and_then(&prepared)
                        .is_some_and(|p| p.disables_read_only)
            });
        if read_only_violation {
            effect = Effect::Deny;
            reason = Some("this session is read-only and cannot be made writable".into());
        }
        // A dry-run on this target that has not expired (by this worker's
        // clock) records denials without enforcing them, except in a
        // read-only session (an agent's): dry-run never relaxes one.
        let dry_run_until = engine
            .dry_run()
            .filter(|d| !self.read_only && d.applies(&self.target.name, unix_now()))
            .map(|d| d.expires_at);
        let enforced = dry_run_until.is_none() || read_only_violation;
        let refusal = match (&effect, enforced) {
            (Effect::Allow | Effect::ApprovalRequired, _) | (_, false) => None,
            (Effect::Deny, true) => Some(ClientError::error(
                "42501",
                format!(
                    "permission denied by policy: {}",
                    reason
                        .clone()
                        .unwrap_or_else(|| "no policy permits this command".into())
                ),
            )),
        };
        CommandDecision {
            denied: effect == Effect::Deny,
            approval: (effect == Effect::ApprovalRequired && enforced).then_some(need),
            record: Some(DecisionRecord {
                grants: self.access.ids.clone(),
                ..Self::record(
                    &engine,
                    effect,
                    enforced,
                    policies,
                    reason,
                    c,
                    started,
                    dry_run_until,
                )
            }),
            refusal,
        }
    }

    /// The record of a command refused before any policy was asked (it
    /// executes a prepared statement the server does not have).
    pub fn refused_record(
        &self,
        state: &PolicyState,
        c: &Classification,
        reason: &str,
    ) -> DecisionRecord {
        let started = Instant::now();
        match &state.engine {
            Some(engine) => Self::record(
                engine,
                Effect::Deny,
                true,
                Vec::new(),
                Some(reason.to_owned()),
                c,
                started,
                None,
            ),
            None => DecisionRecord {
                effect: DecisionEffect::Deny,
                enforced: true,
                policies: Vec::new(),
                reason: Some(reason.to_owned()),
                kinds: kinds(c),
                bundle_version: String::new(),
                bundle_hash: String::new(),
                eval_micros: 0,
                dry_run_until: None,
                grants: Vec::new(),
            },
        }
    }

    #[allow(clippy::too_many_arguments)] // one per field of the record
    fn record(
        engine: &Engine,
        effect: Effect,
        enforced: bool,
        policies: Vec<String>,
        reason: Option<String>,
        c: &Classification,
        started: Instant,
        dry_run_until: Option<i64>,
    ) -> DecisionRecord {
        DecisionRecord {
            effect: match effect {
                Effect::Allow => DecisionEffect::Allow,
                Effect::Deny => DecisionEffect::Deny,
                Effect::ApprovalRequired => DecisionEffect::ApprovalRequired,
            },
            enforced,
            policies,
            reason,
            kinds: kinds(c),
            bundle_version: engine.bundle_version().to_string(),
            bundle_hash: engine.bundle_hash().to_string(),
            eval_micros: started.elapsed().as_micros() as u64,
            dry_run_until,
            grants: Vec::new(),
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn kinds(c: &Classification) -> Vec<String> {
    if c.parsed {
        c.statements
            .iter()
            .map(|s| s.kind.as_str().to_string())
            .collect()
    } else {
        vec![StatementKind::Other.as_str().to_string()]
    }
}

const NO_BUNDLE: &str = "no policy bundle has been published, so nothing is allowed yet; push one with `gatehouse policy push`";
