//! Decisions in the worker: the current policy bundle and revocations
//! (kept fresh by watching the policy store), and each session's view of
//! them — its principal, its target, its prepared statements.

use std::collections::{HashMap, HashSet};
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

/// Loads the current bundle and revocations and keeps them fresh.
pub(crate) async fn start(store: PolicyStore) -> Result<Policies, String> {
    let engine = match store.current_bundle().await.map_err(|e| e.to_string())? {
        Some(bundle) => Some(Arc::new(Engine::new(&bundle).map_err(|e| {
            format!(
                "the published policy bundle {} is not valid: {e}",
                bundle.version
            )
        })?)),
        None => {
            tracing::warn!("no policy bundle published yet: every command will be refused");
            None
        }
    };
    let revoked = store.revoked().await.map_err(|e| e.to_string())?;
    let (tx, rx) = watch::channel(Arc::new(PolicyState { engine, revoked }));
    let tx = Arc::new(tx);

    let bundles = store.watch_bundles().await.map_err(|e| e.to_string())?;
    let t = tx.clone();
    tokio::spawn(async move {
        futures::pin_mut!(bundles);
        while let Some(bundle) = bundles.next().await {
            let bundle = match bundle {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a policy bundle update");
                    continue;
                }
            };
            let same = t
                .borrow()
                .engine
                .as_ref()
                .is_some_and(|e| e.bundle_hash() == bundle.hash);
            if same {
                continue;
            }
            match Engine::new(&bundle) {
                Ok(engine) => {
                    tracing::info!(version = %bundle.version, hash = %bundle.hash, "policy bundle loaded");
                    let engine = Some(Arc::new(engine));
                    t.send_modify(|s| {
                        *s = Arc::new(PolicyState {
                            engine: engine.clone(),
                            revoked: s.revoked.clone(),
                        })
                    });
                }
                Err(e) => tracing::error!(
                    version = %bundle.version,
                    error = %e,
                    "published policy bundle is not valid; keeping the previous one"
                ),
            }
        }
    });
    let revocations = store.watch_revocations().await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        futures::pin_mut!(revocations);
        while let Some(r) = revocations.next().await {
            match r {
                Ok(r) => tx.send_modify(|s| {
                    let mut revoked = s.revoked.clone();
                    revoked.insert(r);
                    *s = Arc::new(PolicyState {
                        engine: s.engine.clone(),
                        revoked,
                    })
                }),
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
    subject: String,
    token_id: Option<String>,
    /// The `connect` decision made the session read-only.
    pub read_only: bool,
    /// Record denials without enforcing them (dry-run target or bundle).
    dry_run_target: bool,
    /// SQL-level prepared statements (`PREPARE name AS …`) by name.
    prepared: HashMap<String, StatementFacts>,
    /// Cedar entities of this session, built for `engine_of`.
    entities: Option<(Arc<Engine>, Session)>,
}

/// The outcome of deciding one command.
pub(crate) struct CommandDecision {
    pub record: Option<DecisionRecord>,
    /// What to tell the client instead of running the command, if anything.
    pub refusal: Option<ClientError>,
}

impl SessionPolicy {
    pub fn new(
        config: &PolicyConfig,
        identity: &Identity,
        token_id: Option<String>,
        target: TargetInfo,
        source_ip: String,
    ) -> Self {
        let principal = Principal {
            subject: identity.subject.clone(),
            username: identity.username.clone(),
            groups: identity.groups.clone(),
            delegation: identity
                .delegation
                .iter()
                .map(|a| a.subject.clone())
                .collect(),
            is_agent: !identity.delegation.is_empty()
                || identity.groups.iter().any(|g| g == &config.agent_group),
        };
        Self {
            dry_run_target: config.dry_run_targets.iter().any(|t| t == &target.name),
            principal,
            target,
            source_ip,
            subject: identity.subject.clone(),
            token_id,
            read_only: false,
            prepared: HashMap::new(),
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

    /// Whether the identity or its token has been revoked.
    pub fn revoked(&self, state: &PolicyState) -> bool {
        state
            .revoked
            .contains(&Revoked::Subject(self.subject.clone()))
            || self
                .token_id
                .as_ref()
                .is_some_and(|t| state.revoked.contains(&Revoked::Token(t.clone())))
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
                // In dry-run nothing is enforced, the read-only session
                // included: denials are only recorded.
                self.read_only = d.read_only && !self.dry_run_target && !engine.dry_run();
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

    /// Decides a command from its classification: allowed only if every
    /// statement is.
    pub fn decide(&mut self, state: &PolicyState, c: &Classification) -> CommandDecision {
        let Some(engine) = state.engine.clone() else {
            return CommandDecision {
                record: None,
                refusal: Some(ClientError::error("42501", NO_BUNDLE)),
            };
        };
        let started = Instant::now();
        self.entities(&engine);
        let session = &self.entities.as_ref().expect("fresh").1;
        let prepared = &self.prepared;
        let d = engine.decide_command(session, c, |name| prepared.get(name));
        let (mut effect, policies, mut reason) = (d.effect, d.policies, d.reason);
        // A read-only session is never made writable, whatever the policies
        // say and even in dry-run.
        let read_only_violation = self.read_only
            && c.statements.iter().any(|s| {
                s.disables_read_only
                    || s.executes
                        .as_ref()
                        .and_then(|name| prepared.get(name))
                        .is_some_and(|p| p.disables_read_only)
            });
        if read_only_violation {
            effect = Effect::Deny;
            reason = Some("this session is read-only and cannot be made writable".into());
        }
        let dry_run = self.dry_run_target || engine.dry_run();
        let enforced = !dry_run || read_only_violation;
        let refusal = match (&effect, enforced) {
            (Effect::Allow, _) | (_, false) => None,
            (Effect::Deny, true) => Some(ClientError::error(
                "42501",
                format!(
                    "permission denied by policy: {}",
                    reason
                        .clone()
                        .unwrap_or_else(|| "no policy permits this command".into())
                ),
            )),
            (Effect::ApprovalRequired, true) => Some(ClientError::error(
                "42501",
                format!(
                    "this command requires approval ({}), and approvals are not available yet",
                    reason.clone().unwrap_or_else(|| "policy".into())
                ),
            )),
        };
        if refusal.is_none() {
            for s in &c.statements {
                if let Some(name) = &s.prepares {
                    self.prepared.insert(name.clone(), s.clone());
                }
            }
        }
        CommandDecision {
            record: Some(DecisionRecord {
                effect: match effect {
                    Effect::Allow => DecisionEffect::Allow,
                    Effect::Deny => DecisionEffect::Deny,
                    Effect::ApprovalRequired => DecisionEffect::ApprovalRequired,
                },
                enforced,
                policies,
                reason,
                kinds: if c.parsed {
                    c.statements
                        .iter()
                        .map(|s| s.kind.as_str().to_string())
                        .collect()
                } else {
                    vec![StatementKind::Other.as_str().to_string()]
                },
                bundle_version: engine.bundle_version().to_string(),
                bundle_hash: engine.bundle_hash().to_string(),
                eval_micros: started.elapsed().as_micros() as u64,
            }),
            refusal,
        }
    }
}

const NO_BUNDLE: &str = "no policy bundle has been published, so nothing is allowed yet; push one with `gatehouse policy push`";
