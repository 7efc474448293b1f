//! Decisions on the control plane's API: who may push, roll back, revoke,
//! reinstate, explain, read the audit trail and read and decide approvals.
//!
//! Every API request is a Cedar request `(principal, Action::"api:…",
//! ControlPlane::"api", context)`. The principal and its entities come
//! from [`Principal`] exactly as the worker builds them for a session
//! (`principal_entities`), so a delegated token is the agent acting, in no
//! group of the person it acts for: their administrative rights do not
//! carry over unless a policy grants them to the agent.
//!
//! Two policy sets take part:
//!
//! - **Built-in** ([`ApiAuthority::new`]): the admin group may push, roll
//!   back, set dry-runs, revoke, reinstate, explain, read the current
//!   bundle and read approvals; the auditor group may read the audit
//!   trail, the quarantine and approvals, read the current bundle and
//!   explain; everyone may request access to a target for a while (the
//!   request is then an approver's to decide). A bundle cannot remove
//!   them, but its forbids apply (e.g. agents may not request access).
//! - **The current bundle's**: its permits that name an `api:*` action in
//!   their scope (a permit for any action grants no API action, so a
//!   bundle written for SQL cannot hand out administration by accident),
//!   and its forbids that may apply to an API action.
//!
//! Cedar decides over both: a forbid wins, and a forbid that fails to
//! evaluate denies. One exception keeps a bad bundle from locking the
//! administrators out: pushing and rolling back a bundle, when the
//! built-in policies alone permit it, are allowed whatever the bundle
//! forbids. With no bundle, the built-in policies decide alone.

use super::*;

/// An action of the control plane's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiAction {
    PushPolicy,
    RollbackPolicy,
    SetDryRun,
    Revoke,
    Reinstate,
    Explain,
    ReadPolicy,
    ReadAudit,
    ReadQuarantine,
    /// Reading pending approvals and taking part in deciding them (each
    /// grant or denial is also an `approve` decision on the command's
    /// target: [`Engine::decide_approve`]).
    ReadApprovals,
    /// Asking for access to a target for a while, and reading and ending
    /// one's own requests. Built-in for everyone: a bundle may forbid it.
    RequestAccess,
}

impl ApiAction {
    pub const ALL: [ApiAction; 11] = [
        ApiAction::PushPolicy,
        ApiAction::RollbackPolicy,
        ApiAction::SetDryRun,
        ApiAction::Revoke,
        ApiAction::Reinstate,
        ApiAction::Explain,
        ApiAction::ReadPolicy,
        ApiAction::ReadAudit,
        ApiAction::ReadQuarantine,
        ApiAction::ReadApprovals,
        ApiAction::RequestAccess,
    ];

    /// The Cedar action id, e.g. `api:push-policy`.
    pub fn name(self) -> &'static str {
        match self {
            ApiAction::PushPolicy => "api:push-policy",
            ApiAction::RollbackPolicy => "api:rollback-policy",
            ApiAction::SetDryRun => "api:set-dry-run",
            ApiAction::Revoke => "api:revoke",
            ApiAction::Reinstate => "api:reinstate",
            ApiAction::Explain => "api:explain",
            ApiAction::ReadPolicy => "api:read-policy",
            ApiAction::ReadAudit => "api:read-audit",
            ApiAction::ReadQuarantine => "api:read-quarantine",
            ApiAction::ReadApprovals => "api:read-approvals",
            ApiAction::RequestAccess => "api:request-access",
        }
    }

    /// What it does, for messages: "push policy bundles".
    pub fn describe(self) -> &'static str {
        match self {
            ApiAction::PushPolicy => "push policy bundles",
            ApiAction::RollbackPolicy => "roll back the policy bundle",
            ApiAction::SetDryRun => "set a dry-run",
            ApiAction::Revoke => "revoke identities",
            ApiAction::Reinstate => "reinstate revoked identities",
            ApiAction::Explain => "explain decisions",
            ApiAction::ReadPolicy => "read the current policy bundle",
            ApiAction::ReadAudit => "read the audit trail",
            ApiAction::ReadQuarantine => "read the quarantine",
            ApiAction::ReadApprovals => "read and decide approvals",
            ApiAction::RequestAccess => "request access to targets",
        }
    }

    /// Replacing the bundle: what the admin group can always do, so that no
    /// bundle can lock it out of fixing the bundle.
    fn recovers(self) -> bool {
        matches!(self, ApiAction::PushPolicy | ApiAction::RollbackPolicy)
    }

    fn uid(self) -> EntityUid {
        action_uid(self.name())
    }
}

fn action_uid(name: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str("Gatehouse::Action").expect("valid entity type name"),
        EntityId::new(name),
    )
}

fn is_api_action(uid: &EntityUid) -> bool {
    ApiAction::ALL.iter().any(|a| &a.uid() == uid)
}

/// The SQL-side actions of the built-in schema.
fn is_session_action(uid: &EntityUid) -> bool {
    ["connect", "query", "approve", "unmask"]
        .iter()
        .any(|a| &action_uid(a) == uid)
}

/// The bundle policies that take part in API decisions: permits that name
/// an API action, forbids that may apply to one (any action, an API
/// action, or an action the built-in schema does not know, such as a
/// group a bundle's own schema declares).
pub(super) fn bundle_policies(all: &PolicySet) -> PolicySet {
    let mut set = PolicySet::new();
    for p in all.policies() {
        let forbid = p.effect() == cedar_policy::Effect::Forbid;
        let applies = match p.action_constraint() {
            ActionConstraint::Any => forbid,
            ActionConstraint::Eq(a) => is_api_action(&a) || (forbid && !is_session_action(&a)),
            ActionConstraint::In(list) => {
                list.iter().any(is_api_action)
                    || (forbid && list.iter().any(|a| !is_session_action(a)))
            }
        };
        if applies {
            set.add(p.clone()).expect("ids are unique in the bundle");
        }
    }
    set
}

/// The built-in policies with a bundle's, or why they cannot be joined.
type Joined = Arc<Result<PolicySet, String>>;

/// Id prefix of the built-in API policies.
pub const BUILTIN_PREFIX: &str = "gatehouse-builtin:";

/// Decides API requests: the built-in policies for the configured groups,
/// with the current bundle's API policies. Build one per control plane.
pub struct ApiAuthority {
    builtin: PolicySet,
    meta: HashMap<PolicyId, PolicyMeta>,
    text: String,
    schema: Schema,
    resource: EntityUid,
    authorizer: Authorizer,
    /// The built-in set joined with the last engine's API policies, by
    /// engine id.
    joined: Mutex<Option<(u64, Joined)>>,
}

impl std::fmt::Debug for ApiAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuthority")
            .field("builtin", &self.text)
            .finish()
    }
}

impl ApiAuthority {
    /// The built-in policies: `admin_group` administers, `auditor_group`
    /// reads (see the module documentation).
    pub fn new(admin_group: &str, auditor_group: &str) -> ApiAuthority {
        let group = |name: &str| {
            EntityUid::from_type_name_and_id(NAMES.group.clone(), EntityId::new(name)).to_string()
        };
        let actions = |list: &[ApiAction]| {
            list.iter()
                .map(|a| a.uid().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        use ApiAction::*;
        let text = format!(
            "@id(\"{BUILTIN_PREFIX}admins\")\n\
             permit (principal in {admins}, action in [{admin_actions}], resource);\n\
             @id(\"{BUILTIN_PREFIX}auditors\")\n\
             permit (principal in {auditors}, action in [{auditor_actions}], resource);\n\
             @id(\"{BUILTIN_PREFIX}everyone-requests-access\")\n\
             permit (principal, action == {request_access}, resource);\n",
            request_access = RequestAccess.uid(),
            admins = group(admin_group),
            auditors = group(auditor_group),
            admin_actions = actions(&[
                PushPolicy,
                RollbackPolicy,
                SetDryRun,
                Revoke,
                Reinstate,
                Explain,
                ReadPolicy,
                ReadApprovals
            ]),
            auditor_actions = actions(&[
                ReadAudit,
                ReadQuarantine,
                ReadPolicy,
                Explain,
                ReadApprovals
            ]),
        );
        let parsed = PolicySet::from_str(&text).expect("the built-in API policies parse");
        let mut builtin = PolicySet::new();
        let mut meta = HashMap::new();
        for (ordinal, p) in parsed.policies().enumerate() {
            let id = p.annotation("id").expect("built-ins have ids").to_string();
            let pid = PolicyId::new(&id);
            builtin
                .add(p.new_id(pid.clone()))
                .expect("built-in ids are unique");
            meta.insert(
                pid,
                PolicyMeta {
                    ordinal: usize::MAX / 2 + ordinal,
                    id,
                    forbid: false,
                    reason: None,
                    approval: false,
                    approvers: None,
                    approval_timeout_secs: None,
                    read_only: false,
                },
            );
        }
        let (schema, _) =
            Schema::from_cedarschema_str(crate::SCHEMA).expect("the built-in schema parses");
        ApiAuthority {
            builtin,
            meta,
            text,
            schema,
            resource: EntityUid::from_type_name_and_id(
                EntityTypeName::from_str("Gatehouse::ControlPlane").expect("valid type name"),
                EntityId::new("api"),
            ),
            authorizer: Authorizer::new(),
            joined: Mutex::new(None),
        }
    }

    /// The built-in policies, as Cedar text.
    pub fn builtin_text(&self) -> &str {
        &self.text
    }

    /// May `p` do `action`? `engine` is the current bundle's (`None`: no
    /// bundle, the built-in policies decide alone). A request that cannot
    /// be built, and a forbid that cannot be evaluated, deny.
    pub fn decide(
        &self,
        engine: Option<&Engine>,
        p: &Principal,
        action: ApiAction,
        source_ip: &str,
    ) -> Decision {
        let start = Instant::now();
        let fail = |reason: String| Decision {
            effect: Effect::Deny,
            policies: Vec::new(),
            reason: Some(reason),
            read_only: false,
            eval_micros: start.elapsed().as_micros() as u64,
            approvers: 0,
            approval_timeout_secs: 0,
        };
        let (principal, mut entities) = principal_entities(p);
        entities.push(Ok(Entity::new_no_attrs(
            self.resource.clone(),
            HashSet::new(),
        )));
        let entities = match entities
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .and_then(|es| {
                Entities::from_entities(es, Some(&self.schema)).map_err(|e| e.to_string())
            }) {
            Ok(e) => e,
            Err(e) => return fail(format!("internal error building the principal: {e}")),
        };
        let hour = {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            ((secs / 3600) % 24) as i64
        };
        let context = Context::from_pairs([
            (
                "source_ip".to_string(),
                RestrictedExpression::new_ip(normalize_ip(source_ip)),
            ),
            ("hour".to_string(), RestrictedExpression::new_long(hour)),
            (
                "delegated".to_string(),
                RestrictedExpression::new_bool(!p.delegation.is_empty()),
            ),
            (
                "actors".to_string(),
                RestrictedExpression::new_set(
                    p.delegation
                        .iter()
                        .map(|a| RestrictedExpression::new_string(a.clone())),
                ),
            ),
        ]);
        let context = match context {
            Ok(c) => c,
            Err(e) => return fail(format!("internal error building the request: {e}")),
        };
        let request = match Request::new(
            principal,
            action.uid(),
            self.resource.clone(),
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return fail(format!("internal error building the request: {e}")),
        };

        let builtin = self.evaluate(&request, &self.builtin, &entities, None, action);
        let Some(engine) = engine else {
            return timed(builtin, start);
        };
        if action.recovers() && builtin.effect == Effect::Allow {
            return timed(builtin, start);
        }
        let joined = self.joined(engine);
        match joined.as_ref() {
            Ok(set) => timed(
                self.evaluate(&request, set, &entities, Some(engine), action),
                start,
            ),
            Err(e) => fail(e.clone()),
        }
    }

    /// The built-in policies with `engine`'s API policies, built once per
    /// engine.
    fn joined(&self, engine: &Engine) -> Joined {
        let mut cached = self.joined.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, set)) = cached.as_ref()
            && *id == engine.id
        {
            return set.clone();
        }
        let mut set = self.builtin.clone();
        let mut outcome = Ok(());
        for p in engine.api_policies.policies() {
            if set.add(p.clone()).is_err() {
                outcome = Err(format!(
                    "the current bundle's policy `{}` has the id of a built-in API policy; \
                     denied to be safe",
                    p.id()
                ));
                break;
            }
        }
        let set = Arc::new(outcome.map(|()| set));
        *cached = Some((engine.id, set.clone()));
        set
    }

    fn evaluate(
        &self,
        request: &Request,
        policies: &PolicySet,
        entities: &Entities,
        engine: Option<&Engine>,
        action: ApiAction,
    ) -> Decision {
        let meta = |id: &PolicyId| {
            self.meta
                .get(id)
                .or_else(|| engine.and_then(|e| e.meta.get(id)))
        };
        let response = self.authorizer.is_authorized(request, policies, entities);
        let mut errored: Vec<&PolicyMeta> = response
            .diagnostics()
            .errors()
            .filter_map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => meta(e.policy_id()),
            })
            .filter(|m| m.forbid)
            .collect();
        errored.sort_by_key(|m| m.ordinal);
        let mut determining: Vec<&PolicyMeta> =
            response.diagnostics().reason().filter_map(meta).collect();
        determining.sort_by_key(|m| m.ordinal);
        let deny = |policies: Vec<String>, reason: String| Decision {
            effect: Effect::Deny,
            policies,
            reason: Some(reason),
            read_only: false,
            eval_micros: 0,
            approvers: 0,
            approval_timeout_secs: 0,
        };
        match response.decision() {
            CedarDecision::Allow if errored.is_empty() => Decision {
                effect: Effect::Allow,
                policies: ids(&determining),
                reason: None,
                read_only: false,
                eval_micros: 0,
                approvers: 0,
                approval_timeout_secs: 0,
            },
            CedarDecision::Allow => deny(ids(&errored), failed(&errored)),
            CedarDecision::Deny if determining.is_empty() && errored.is_empty() => deny(
                Vec::new(),
                format!(
                    "no policy permits {} to {} ({})",
                    request
                        .principal()
                        .map_or_else(|| "this principal".to_string(), |p| p.to_string()),
                    action.describe(),
                    action.name()
                ),
            ),
            CedarDecision::Deny => {
                let mut all = determining;
                all.extend(errored.iter().copied());
                all.sort_by_key(|m| m.ordinal);
                all.dedup_by_key(|m| m.ordinal);
                let reason = if errored.is_empty() {
                    reasons(&all)
                } else {
                    failed(&errored)
                };
                deny(ids(&all), reason)
            }
        }
    }
}

fn timed(mut d: Decision, start: Instant) -> Decision {
    d.eval_micros = start.elapsed().as_micros() as u64;
    d
}
