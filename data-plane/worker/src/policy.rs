//! Decisions in the worker: the current policy bundle and revocations
//! (kept fresh by watching the policy store), and each session's view of
//! them — its principal, its target, its prepared statements.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use gatehouse_events::{DecisionEffect, DecisionRecord, Identity};
use gatehouse_policies::{
    Classification, Decision, Effect, Engine, Principal, Session, StatementFacts, StatementKind,
    TargetInfo,
};
use gatehouse_policystore::{PolicyConfig, PolicyStore, Revoked};
use tokio::sync::watch;

use crate::error::ClientError;

/// What every session decides with at a given moment.
pub(crate) struct PolicyState {
    /// `None` until a bundle has been published: every command is refused.
    pub engine: Option<Arc<Engine>>,
    pub revoked: HashSet<Revoked>,
}

pub(crate) type Policies = watch::Receiver<Arc<PolicyState>>;

/// Loads the current bundle and revocations and keeps them fresh. Only
/// bundles signed by a key of `policy.bundle_public_keys` are applied, so
/// a store that trusts no key is refused here.
pub(crate) async fn start(store: PolicyStore) -> Result<Policies, String> {
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
    let (tx, rx) = watch::channel(Arc::new(PolicyState { engine, revoked }));
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
            t.send_modify(|s| {
                *s = Arc::new(PolicyState {
                    engine: engine.clone(),
                    revoked: s.revoked.clone(),
                })
            });
        }
    });
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
                            *s = Arc::new(PolicyState {
                                engine: s.engine.clone(),
                                revoked,
                            });
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
            entities: None,
        }
    }

    /// The session's entities for `engine`, rebuilt when the bundle changed.
    fn entities(&mut self, engine: &Arc<Engine>) -> &Session {
        let fresh = matches!(&self.entities, Some((e, _)) if Arc::ptr_eq(e, engine));
        if !fresh {
            let s = engine.session(&self.principal, &self.target, &self.source_ip);
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

    /// The `connect` decision, at session start.
    pub fn decide_connect(&mut self, state: &PolicyState) -> Result<Decision, ClientError> {
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
            record: Some(Self::record(
                &engine,
                effect,
                enforced,
                policies,
                reason,
                c,
                started,
                dry_run_until,
            )),
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
        }
    }
}

fn unix_now() -> i64 {
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
