//! The Cedar decision engine: one immutable [`Engine`] per bundle, shared by
//! every session of a worker (`Arc<Engine>`), swapped whole on reload.
//!
//! Hot path: the worker builds a [`Session`] once per connection
//! ([`Engine::session`]: the principal, target and group entities) and
//! then calls [`Engine::decide_command`] per command (or
//! [`Engine::decide_statement`] per statement); only the request context
//! is built per call. Annotation semantics are in
//! `policies/README.md`.

mod api;
mod compile;
pub mod corpus;

pub use api::{ApiAction, ApiAuthority};
pub use compile::parse_duration;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, BundleError, DryRun, Problem};
use crate::{Classification, StatementFacts, StatementKind};
use compile::{DEFAULT_APPROVAL_TIMEOUT_SECS, DEFAULT_APPROVERS, PolicyMeta};

/// Who is speaking, from the verified token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Token subject; the entity id of the User (or of the Agent, when the
    /// token is an agent's own).
    pub subject: String,
    /// Display name (the entity's `name`).
    pub username: String,
    /// Groups claim; each becomes a parent `Group`.
    pub groups: Vec<String>,
    /// Delegation chain from the `act` claim, current actor first. When
    /// non-empty the principal is `Agent(delegation[0])` with
    /// `acting_for = User(subject)`.
    pub delegation: Vec<String>,
    /// The subject itself is a program.
    pub is_agent: bool,
}

impl Principal {
    /// The principal a verified token's claims make: an agent when it acts
    /// for someone (`delegation`, from the `act` claim) or is in
    /// `agent_group`. The one place claims become a principal, for the
    /// worker and the control plane alike.
    pub fn from_claims(
        subject: String,
        username: Option<String>,
        groups: Vec<String>,
        delegation: Vec<String>,
        agent_group: &str,
    ) -> Principal {
        Principal {
            is_agent: !delegation.is_empty() || groups.iter().any(|g| g == agent_group),
            username: username.unwrap_or_else(|| subject.clone()),
            subject,
            groups,
            delegation,
        }
    }
}

/// The database a session is on, from the worker's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    /// `"postgres"`.
    pub kind: String,
    pub environment: String,
    pub tags: Vec<String>,
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    /// Denied only by `@approval("required")` forbids: an approver may grant it.
    ApprovalRequired,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::ApprovalRequired => "approval_required",
        }
    }

    /// Of two decisions on the statements of one command, the one that
    /// stands: deny over approval over allow.
    pub fn severity(self) -> u8 {
        match self {
            Effect::Allow => 0,
            Effect::ApprovalRequired => 1,
            Effect::Deny => 2,
        }
    }
}

/// A decision, with what the audit event and the denied client need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub effect: Effect,
    /// Ids of the determining policies, in bundle order: the permits that
    /// allowed, or the forbids that denied. Empty for a default deny.
    pub policies: Vec<String>,
    /// For a denial or approval: what the client is told (the `@reason`s of
    /// the determining forbids, else their ids). `None` when allowed.
    pub reason: Option<String>,
    /// A determining permit carries `@read_only` (meaningful on connect:
    /// the worker runs the target session read-only).
    pub read_only: bool,
    /// Time spent in the engine for this decision.
    pub eval_micros: u64,
    /// When `effect` is [`Effect::ApprovalRequired`]: how many distinct
    /// approvers must grant the command, the largest `@approvers` of the
    /// determining forbids (1 when none says). 0 for any other effect.
    #[serde(default)]
    pub approvers: u32,
    /// When `effect` is [`Effect::ApprovalRequired`]: how long, in seconds,
    /// the approval may wait before it expires, the smallest
    /// `@approval_timeout` of the determining forbids (300 when none says).
    /// 0 for any other effect.
    #[serde(default)]
    pub approval_timeout_secs: u32,
}

impl Decision {
    /// Folds `other`, a decision on another statement of the same command
    /// with the same effect, into this one: for an approval, the most
    /// approvers and the shortest timeout of the two.
    fn merge_approval(&mut self, other: &Decision) {
        if self.effect == Effect::ApprovalRequired && other.effect == Effect::ApprovalRequired {
            self.approvers = self.approvers.max(other.approvers);
            self.approval_timeout_secs =
                self.approval_timeout_secs.min(other.approval_timeout_secs);
        }
    }
}

/// The entities of one session, built once by [`Engine::session`], and a
/// memo of its recent statement decisions.
///
/// Sessions depend on the schema, not on the policies: a session built by
/// one engine stays fast with a reloaded engine whose schema is the same;
/// with a different schema it still decides correctly, rebuilding its
/// entities on every call, until the caller builds a new one.
pub struct Session {
    principal: EntityUid,
    target: EntityUid,
    /// `Err` if the entities could not be built (a decision then denies).
    entities: Result<Entities, String>,
    source_ip: String,
    /// `ip("…")`, built once: `RestrictedExpression::new_ip` parses the
    /// extension name with the Cedar parser on every call (~3 µs).
    source_ip_expr: RestrictedExpression,
    hour: Option<i64>,
    /// The scopes of the access granted to the principal on the target and
    /// in force (`context.grants`), and their Cedar set, built once.
    grants: BTreeSet<String>,
    grants_expr: RestrictedExpression,
    schema_hash: Arc<str>,
    inputs: Arc<(Principal, TargetInfo)>,
    memo: Mutex<Memo>,
}

impl Clone for Session {
    fn clone(&self) -> Session {
        Session {
            principal: self.principal.clone(),
            target: self.target.clone(),
            entities: self.entities.clone(),
            source_ip: self.source_ip.clone(),
            source_ip_expr: self.source_ip_expr.clone(),
            hour: self.hour,
            grants: self.grants.clone(),
            grants_expr: self.grants_expr.clone(),
            schema_hash: self.schema_hash.clone(),
            inputs: self.inputs.clone(),
            memo: Mutex::new(Memo::default()),
        }
    }
}

/// Decisions already made in a session. A decision is a pure function of
/// the session's entities, the policies (one engine) and the request
/// context (the statement's facts, `parsed`, `multi_statement`, the hour;
/// the source address is the session's), so a repeated statement reuses
/// it. Emptied when the engine changes or when full.
#[derive(Default)]
struct Memo {
    engine: u64,
    entries: HashMap<u64, Vec<(MemoKey, Decision)>>,
    len: usize,
}

const MEMO_CAPACITY: usize = 128;

#[derive(PartialEq, Eq)]
struct MemoKey {
    facts: StatementFacts,
    parsed: bool,
    multi_statement: bool,
    hour: i64,
}

impl MemoKey {
    fn matches(&self, facts: &StatementFacts, parsed: bool, multi: bool, hour: i64) -> bool {
        self.parsed == parsed
            && self.multi_statement == multi
            && self.hour == hour
            && &self.facts == facts
    }
}

/// A Cedar set of strings.
fn strings_expr(set: &BTreeSet<String>) -> RestrictedExpression {
    RestrictedExpression::new_set(
        set.iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

/// Hashes the fields policies see; `MemoKey::matches` compares all of
/// `StatementFacts`, so equal keys always hash alike.
fn memo_hash(facts: &StatementFacts, parsed: bool, multi: bool, hour: i64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        facts.kind,
        &facts.tables_read,
        &facts.tables_written,
        &facts.functions,
    )
        .hash(&mut h);
    (facts.has_where, facts.writes, facts.runs_program).hash(&mut h);
    (facts.dynamic, facts.reaches_outside).hash(&mut h);
    (facts.disables_read_only, facts.changes_parsing).hash(&mut h);
    (parsed, multi, hour).hash(&mut h);
    h.finish()
}

impl Session {
    /// Decide as if the UTC hour were `hour` (0..23) instead of reading the
    /// clock: for tests and what-if explanations.
    pub fn at_hour(mut self, hour: u8) -> Session {
        self.hour = Some(i64::from(hour));
        self
    }

    /// Decide with `grants` as the scopes of the access granted to the
    /// principal on the target and in force now (`context.grants` of
    /// `connect`, `query` and `unmask`). A session's decisions depend on
    /// them, so its memo starts afresh.
    pub fn with_grants(mut self, grants: BTreeSet<String>) -> Session {
        self.grants_expr = strings_expr(&grants);
        self.grants = grants;
        self.memo = Mutex::new(Memo::default());
        self
    }

    /// The scopes of access in force this session decides with.
    pub fn grants(&self) -> &BTreeSet<String> {
        &self.grants
    }

    /// The principal entity decided for, e.g. `Gatehouse::Agent::"bot"`.
    pub fn principal_uid(&self) -> String {
        self.principal.to_string()
    }

    /// The client address as policies see it.
    pub fn source_ip(&self) -> &str {
        &self.source_ip
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("principal", &self.principal.to_string())
            .field("target", &self.target.to_string())
            .field("source_ip", &self.source_ip)
            .field("hour", &self.hour)
            .field("grants", &self.grants)
            .field("entities_ok", &self.entities.is_ok())
            .finish()
    }
}

struct Names {
    user: EntityTypeName,
    agent: EntityTypeName,
    group: EntityTypeName,
    target: EntityTypeName,
    connect: EntityUid,
    query: EntityUid,
    approve: EntityUid,
    unmask: EntityUid,
}

static NAMES: LazyLock<Names> = LazyLock::new(|| {
    let ty = |s: &str| EntityTypeName::from_str(s).expect("valid entity type name");
    let action =
        |s: &str| EntityUid::from_type_name_and_id(ty("Gatehouse::Action"), EntityId::new(s));
    Names {
        user: ty("Gatehouse::User"),
        agent: ty("Gatehouse::Agent"),
        group: ty("Gatehouse::Group"),
        target: ty("Gatehouse::Target"),
        connect: action("connect"),
        query: action("query"),
        approve: action("approve"),
        unmask: action("unmask"),
    }
});

/// Decides requests with the policies of one bundle. Immutable, `Send +
/// Sync`; share it in an `Arc` and replace it whole on reload.
pub struct Engine {
    /// Unique per engine built in this process (keys session memos).
    id: u64,
    /// The policies that can apply to `connect` and to `query` (their
    /// action scope allows it): Cedar evaluates every policy it is given.
    connect_policies: PolicySet,
    query_policies: PolicySet,
    /// For `approve` and `unmask`: only permits that name the action (a
    /// permit for any action grants neither), and every forbid that may
    /// apply.
    approve_policies: PolicySet,
    unmask_policies: PolicySet,
    /// The policies that may take part in API decisions ([`ApiAuthority`]).
    api_policies: PolicySet,
    schema: Schema,
    schema_hash: Arc<str>,
    authorizer: Authorizer,
    meta: HashMap<PolicyId, PolicyMeta>,
    warnings: Vec<Problem>,
    version: u64,
    label: String,
    hash: String,
    dry_run: Option<DryRun>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.version)
            .field("hash", &self.hash)
            .field("policies", &self.meta.len())
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

impl Engine {
    /// Checks the bundle's hash, parses its schema and policies, reads their
    /// annotations and validates them against the schema (strict mode).
    /// Every problem found is reported, located at file:line:column.
    ///
    /// First the bundle's sizes, nesting and operator chains are checked
    /// without parsing ([`Bundle::check_limits`]); then Cedar parses and
    /// validates it on a thread with a [`COMPILE_STACK`] stack, so that a
    /// shape those checks do not foresee fails here (an error if Cedar
    /// panics) rather than aborting the process.
    pub fn new(bundle: &Bundle) -> Result<Engine, BundleError> {
        bundle.check_limits()?;
        let compiled = compile_on_large_stack(bundle)?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Engine {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connect_policies: for_action(&compiled.policies, &NAMES.connect),
            query_policies: for_action(&compiled.policies, &NAMES.query),
            approve_policies: naming_action(&compiled.policies, &NAMES.approve),
            unmask_policies: naming_action(&compiled.policies, &NAMES.unmask),
            api_policies: api::bundle_policies(&compiled.policies),
            schema: compiled.schema,
            schema_hash: hex_sha256(&bundle.schema).into(),
            authorizer: Authorizer::new(),
            meta: compiled.meta,
            warnings: compiled.warnings,
            version: bundle.version,
            label: bundle.label.clone(),
            hash: bundle.hash.clone(),
            dry_run: bundle.dry_run.clone(),
        })
    }

    /// The version the control plane gave the bundle (0: unpublished).
    pub fn bundle_version(&self) -> u64 {
        self.version
    }

    /// The bundle's free-form label.
    pub fn bundle_label(&self) -> &str {
        &self.label
    }

    pub fn bundle_hash(&self) -> &str {
        &self.hash
    }

    /// The bundle's dry-run, if it has one (expired or not: see
    /// [`DryRun::applies`]).
    pub fn dry_run(&self) -> Option<&DryRun> {
        self.dry_run.as_ref()
    }

    /// Validator and annotation warnings (the bundle is usable).
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// Ids of the bundle's policies, in bundle order.
    pub fn policy_ids(&self) -> Vec<&str> {
        let mut metas: Vec<&PolicyMeta> = self.meta.values().collect();
        metas.sort_by_key(|m| m.ordinal);
        metas.into_iter().map(|m| m.id.as_str()).collect()
    }

    /// Builds the entities of a session: the principal (User or Agent, see
    /// [`Principal`]), its groups, the user an agent acts for, and the
    /// target. `source_ip` may carry a port (`10.0.0.1:5432`); an address
    /// that does not parse is seen by policies as `0.0.0.0`.
    pub fn session(&self, p: &Principal, t: &TargetInfo, source_ip: &str) -> Session {
        let (principal, target, entities) = build_entities(p, t, &self.schema);
        let source_ip = normalize_ip(source_ip);
        Session {
            principal,
            target,
            entities,
            source_ip_expr: RestrictedExpression::new_ip(&source_ip),
            source_ip,
            hour: None,
            grants: BTreeSet::new(),
            grants_expr: strings_expr(&BTreeSet::new()),
            schema_hash: self.schema_hash.clone(),
            inputs: Arc::new((p.clone(), t.clone())),
            memo: Mutex::new(Memo::default()),
        }
    }

    /// `connect`, decided at session start.
    pub fn decide_connect(&self, p: &Principal, t: &TargetInfo, source_ip: &str) -> Decision {
        self.decide_connect_in(&self.session(p, t, source_ip))
    }

    /// `connect` for a session already built.
    pub fn decide_connect_in(&self, session: &Session) -> Decision {
        let start = Instant::now();
        let context = Context::from_pairs([
            ("source_ip".to_string(), session.source_ip_expr.clone()),
            (
                "hour".to_string(),
                RestrictedExpression::new_long(hour(session)),
            ),
            ("grants".to_string(), session.grants_expr.clone()),
        ]);
        self.decide(
            session,
            &NAMES.connect,
            &self.connect_policies,
            context,
            start,
            "connecting to this target",
        )
    }

    /// `approve`: whether the session's principal may grant or deny a
    /// pending approval of a command on the session's target. The context
    /// is that of `connect` (`source_ip`, `hour`); build the session for
    /// the approver (`Engine::session(&approver, &target, approver_ip)`).
    ///
    /// Only a permit that names `approve` in its scope grants it (a
    /// `permit (principal, action, resource)` does not); any forbid that
    /// applies denies. The effect is `Allow` or `Deny`, never
    /// `ApprovalRequired` (an approval forbid that applies to `approve`
    /// denies: granting cannot itself wait for an approval), with
    /// `approvers` and `approval_timeout_secs` 0.
    ///
    /// Whatever the policies say, the requester of a command, and the
    /// person an agent requesting it acts for, must not approve it: the
    /// caller (the control plane) checks that, not this decision.
    pub fn decide_approve(&self, session: &Session) -> Decision {
        let start = Instant::now();
        let context = Context::from_pairs([
            ("source_ip".to_string(), session.source_ip_expr.clone()),
            (
                "hour".to_string(),
                RestrictedExpression::new_long(hour(session)),
            ),
        ]);
        let mut d = self.decide(
            session,
            &NAMES.approve,
            &self.approve_policies,
            context,
            start,
            "approving commands on this target",
        );
        if d.effect == Effect::ApprovalRequired {
            d.effect = Effect::Deny;
            d.approvers = 0;
            d.approval_timeout_secs = 0;
        }
        d
    }

    /// `unmask`: whether the session's principal sees a column's values as
    /// they are, rather than masked. `table` is the table the column comes
    /// from when the worker knows it (else empty), `column` its name. Only
    /// a permit that names `unmask` grants it.
    pub fn decide_unmask(&self, session: &Session, table: &str, column: &str) -> Decision {
        let start = Instant::now();
        let context = Context::from_pairs([
            (
                "table".to_string(),
                RestrictedExpression::new_string(table.to_string()),
            ),
            (
                "column".to_string(),
                RestrictedExpression::new_string(column.to_string()),
            ),
            ("source_ip".to_string(), session.source_ip_expr.clone()),
            (
                "hour".to_string(),
                RestrictedExpression::new_long(hour(session)),
            ),
            ("grants".to_string(), session.grants_expr.clone()),
        ]);
        self.decide(
            session,
            &NAMES.unmask,
            &self.unmask_policies,
            context,
            start,
            "seeing this column unmasked",
        )
    }

    /// `query` for one statement, building the session on the fly. On the
    /// hot path prefer [`Engine::session`] once plus
    /// [`Engine::decide_statement`].
    pub fn decide_query(
        &self,
        p: &Principal,
        t: &TargetInfo,
        facts: &StatementFacts,
        parsed: bool,
        multi_statement: bool,
        source_ip: &str,
    ) -> Decision {
        let session = self.session(p, t, source_ip);
        self.decide_statement(&session, facts, parsed, multi_statement)
    }

    /// `query` for one statement of a session. For text that did not parse,
    /// pass `StatementFacts::new(StatementKind::Other)` and `parsed = false`.
    ///
    /// A statement the session already ran (same facts, same hour, same
    /// engine) reuses that decision (its `eval_micros` is then the lookup
    /// time, usually 0); see [`Engine::evaluate_statement`].
    pub fn decide_statement(
        &self,
        session: &Session,
        facts: &StatementFacts,
        parsed: bool,
        multi_statement: bool,
    ) -> Decision {
        let start = Instant::now();
        let hour = hour(session);
        let key = memo_hash(facts, parsed, multi_statement, hour);
        {
            let mut memo = session.memo.lock().unwrap_or_else(|e| e.into_inner());
            if memo.engine != self.id {
                memo.engine = self.id;
                memo.entries.clear();
                memo.len = 0;
            }
            let hit = memo.entries.get(&key).and_then(|bucket| {
                bucket
                    .iter()
                    .find(|(k, _)| k.matches(facts, parsed, multi_statement, hour))
            });
            if let Some((_, d)) = hit {
                let mut d = d.clone();
                d.eval_micros = start.elapsed().as_micros() as u64;
                return d;
            }
        }
        let d = self.evaluate(session, facts, parsed, multi_statement, hour, start);
        let mut memo = session.memo.lock().unwrap_or_else(|e| e.into_inner());
        if memo.engine == self.id {
            if memo.len >= MEMO_CAPACITY {
                memo.entries.clear();
                memo.len = 0;
            }
            let entry = MemoKey {
                facts: facts.clone(),
                parsed,
                multi_statement,
                hour,
            };
            memo.entries
                .entry(key)
                .or_default()
                .push((entry, d.clone()));
            memo.len += 1;
        }
        d
    }

    /// Like [`Engine::decide_statement`], always evaluating the policies
    /// (no memo): for what-if explanations and benchmarks.
    pub fn evaluate_statement(
        &self,
        session: &Session,
        facts: &StatementFacts,
        parsed: bool,
        multi_statement: bool,
    ) -> Decision {
        let start = Instant::now();
        self.evaluate(
            session,
            facts,
            parsed,
            multi_statement,
            hour(session),
            start,
        )
    }

    fn evaluate(
        &self,
        session: &Session,
        facts: &StatementFacts,
        parsed: bool,
        multi_statement: bool,
        hour: i64,
        start: Instant,
    ) -> Decision {
        let strings = strings_expr;
        let context = Context::from_pairs([
            (
                "kind".to_string(),
                RestrictedExpression::new_string(facts.kind.as_str().to_string()),
            ),
            ("tables_read".to_string(), strings(&facts.tables_read)),
            ("tables_written".to_string(), strings(&facts.tables_written)),
            ("functions".to_string(), strings(&facts.functions)),
            (
                "has_where".to_string(),
                RestrictedExpression::new_bool(facts.has_where),
            ),
            (
                "writes".to_string(),
                RestrictedExpression::new_bool(facts.writes),
            ),
            (
                "runs_program".to_string(),
                RestrictedExpression::new_bool(facts.runs_program),
            ),
            (
                "dynamic".to_string(),
                RestrictedExpression::new_bool(facts.dynamic),
            ),
            (
                "reaches_outside".to_string(),
                RestrictedExpression::new_bool(facts.reaches_outside),
            ),
            (
                "disables_read_only".to_string(),
                RestrictedExpression::new_bool(facts.disables_read_only),
            ),
            (
                "changes_parsing".to_string(),
                RestrictedExpression::new_bool(facts.changes_parsing),
            ),
            (
                "multi_statement".to_string(),
                RestrictedExpression::new_bool(multi_statement),
            ),
            ("parsed".to_string(), RestrictedExpression::new_bool(parsed)),
            ("source_ip".to_string(), session.source_ip_expr.clone()),
            ("hour".to_string(), RestrictedExpression::new_long(hour)),
            ("grants".to_string(), session.grants_expr.clone()),
        ]);
        self.decide(
            session,
            &NAMES.query,
            &self.query_policies,
            context,
            start,
            "this statement",
        )
    }

    /// `query` for a whole command, as the worker decides it: each
    /// statement is decided (with `multi_statement` set when there are
    /// several) and the command stands only if every statement is allowed.
    /// The most severe effect stands (deny over approval over allow); its
    /// reason is that of the first statement with that effect, and its
    /// policies those of every statement with that effect. An approval
    /// takes the most `approvers` and the shortest `approval_timeout_secs`
    /// of the statements' approval decisions (a statement whose forbids set
    /// no timeout counts with the default, 300 s).
    ///
    /// - `EXECUTE name` is decided by what was prepared under that name,
    ///   earlier in the command or else as `prepared(name)` says, with the facts of its own parameter
    ///   expressions added (`EXECUTE p(pg_read_file(…))`). A name `prepared`
    ///   does not know cannot be known: it is decided as unparsed text.
    /// - Text that did not parse is decided as one `other` statement with
    ///   `parsed = false`.
    /// - An empty command (nothing but comments or semicolons; drivers send
    ///   one to check a connection) runs nothing and is allowed without
    ///   evaluating policies.
    pub fn decide_command<'p>(
        &self,
        session: &Session,
        c: &Classification,
        prepared: impl Fn(&str) -> Option<&'p StatementFacts>,
    ) -> Decision {
        if c.parsed && c.statements.is_empty() {
            return Decision {
                effect: Effect::Allow,
                policies: Vec::new(),
                reason: None,
                read_only: false,
                eval_micros: 0,
                approvers: 0,
                approval_timeout_secs: 0,
            };
        }
        let unparsed = StatementFacts::new(StatementKind::Other);
        let statements = if c.parsed {
            c.statements.as_slice()
        } else {
            std::slice::from_ref(&unparsed)
        };
        let multi = c.multi_statement();
        let mut out: Option<Decision> = None;
        let mut micros = 0;
        for (i, statement) in statements.iter().enumerate() {
            // A name prepared earlier in this command, else in the session.
            let earlier = |name: &str| {
                statements[..i]
                    .iter()
                    .rev()
                    .find(|s| s.prepares.as_deref() == Some(name))
            };
            let executed;
            let (facts, parsed) = match &statement.executes {
                Some(name) => match earlier(name).or_else(|| prepared(name)) {
                    Some(p) => {
                        executed = p.executed_with(statement);
                        (&executed, c.parsed)
                    }
                    None => (&unparsed, false),
                },
                None => (statement, c.parsed),
            };
            let d = self.decide_statement(session, facts, parsed, multi);
            micros += d.eval_micros;
            match &mut out {
                Some(w) if d.effect.severity() < w.effect.severity() => {}
                Some(w) if d.effect == w.effect => {
                    w.merge_approval(&d);
                    for p in d.policies {
                        if !w.policies.contains(&p) {
                            w.policies.push(p);
                        }
                    }
                }
                _ => out = Some(d),
            }
        }
        let mut d = out.expect("at least one statement");
        d.eval_micros = micros;
        d
    }

    /// [`Engine::decide_command`] in a session that has prepared nothing
    /// (an `EXECUTE` of a name the command does not prepare itself is
    /// decided as unparsed text): what-if explanations and policy corpora.
    pub fn decide_classification(&self, session: &Session, c: &Classification) -> Decision {
        self.decide_command(session, c, |_| None)
    }

    fn decide(
        &self,
        session: &Session,
        action: &EntityUid,
        policies: &PolicySet,
        context: Result<Context, cedar_policy::ContextCreationError>,
        start: Instant,
        what: &str,
    ) -> Decision {
        let fail = |reason: String| Decision {
            effect: Effect::Deny,
            policies: Vec::new(),
            reason: Some(reason),
            read_only: false,
            eval_micros: start.elapsed().as_micros() as u64,
            approvers: 0,
            approval_timeout_secs: 0,
        };
        let context = match context {
            Ok(c) => c,
            Err(e) => return fail(format!("internal error building the request: {e}")),
        };
        // A session built against another schema is rebuilt for this call.
        let rebuilt;
        let entities = if session.schema_hash == self.schema_hash {
            &session.entities
        } else {
            let (p, t) = &*session.inputs;
            rebuilt = build_entities(p, t, &self.schema).2;
            &rebuilt
        };
        let entities = match entities {
            Ok(e) => e,
            Err(e) => return fail(format!("internal error building the session: {e}")),
        };
        let request = match Request::new(
            session.principal.clone(),
            action.clone(),
            session.target.clone(),
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return fail(format!("internal error building the request: {e}")),
        };
        let response = self.authorizer.is_authorized(&request, policies, entities);

        // A forbid that failed to evaluate is skipped by Cedar; here it
        // denies (fail closed). A permit that failed simply does not permit.
        let mut errored: Vec<&PolicyMeta> = response
            .diagnostics()
            .errors()
            .filter_map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                    self.meta.get(e.policy_id())
                }
            })
            .filter(|m| m.forbid)
            .collect();
        errored.sort_by_key(|m| m.ordinal);
        let mut determining: Vec<&PolicyMeta> = response
            .diagnostics()
            .reason()
            .filter_map(|id| self.meta.get(id))
            .collect();
        determining.sort_by_key(|m| m.ordinal);

        let mut decision = match response.decision() {
            CedarDecision::Allow if errored.is_empty() => Decision {
                effect: Effect::Allow,
                read_only: determining.iter().any(|m| m.read_only),
                policies: ids(&determining),
                reason: None,
                eval_micros: 0,
                approvers: 0,
                approval_timeout_secs: 0,
            },
            CedarDecision::Allow => Decision {
                effect: Effect::Deny,
                policies: ids(&errored),
                reason: Some(failed(&errored)),
                read_only: false,
                eval_micros: 0,
                approvers: 0,
                approval_timeout_secs: 0,
            },
            CedarDecision::Deny if determining.is_empty() && errored.is_empty() => Decision {
                effect: Effect::Deny,
                policies: Vec::new(),
                reason: Some(format!("no policy permits {what}")),
                read_only: false,
                eval_micros: 0,
                approvers: 0,
                approval_timeout_secs: 0,
            },
            CedarDecision::Deny => {
                let hard: Vec<&PolicyMeta> = determining
                    .iter()
                    .copied()
                    .filter(|m| !m.approval)
                    .collect();
                let approval = hard.is_empty() && errored.is_empty();
                let (approvers, approval_timeout_secs) = if approval {
                    approval_terms(&determining)
                } else {
                    (0, 0)
                };
                let (effect, reason) = if approval {
                    (Effect::ApprovalRequired, reasons(&determining))
                } else if hard.is_empty() {
                    (Effect::Deny, failed(&errored))
                } else {
                    (Effect::Deny, reasons(&hard))
                };
                let mut all = determining;
                all.extend(errored);
                all.sort_by_key(|m| m.ordinal);
                all.dedup_by_key(|m| m.ordinal);
                Decision {
                    effect,
                    policies: ids(&all),
                    reason: Some(reason),
                    read_only: false,
                    eval_micros: 0,
                    approvers,
                    approval_timeout_secs,
                }
            }
        };
        decision.eval_micros = start.elapsed().as_micros() as u64;
        decision
    }
}

/// The policies whose action scope may admit `action`. `action in [...]`
/// is kept whatever it names (a bundle schema may declare action groups).
/// The stack of the thread Cedar parses and validates a bundle on.
pub const COMPILE_STACK: usize = 64 << 20;

/// [`compile::compile`] on a thread of its own with a [`COMPILE_STACK`]
/// stack (only reserved; pages are touched as used). If no thread can be
/// started, compiles here: [`Bundle::check_limits`] has already bounded the
/// depth.
fn compile_on_large_stack(bundle: &Bundle) -> Result<compile::Compiled, BundleError> {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("cedar-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn_scoped(scope, || compile::compile(bundle));
        match spawned {
            Ok(handle) => handle.join().unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(BundleError::Invalid(vec![Problem {
                    severity: crate::Severity::Error,
                    file: "(bundle)".into(),
                    line: 1,
                    column: 1,
                    message: format!("Cedar failed on this bundle: {what}"),
                    help: None,
                    policy: None,
                }]))
            }),
            Err(_) => compile::compile(bundle),
        }
    })
}

fn for_action(all: &PolicySet, action: &EntityUid) -> PolicySet {
    let mut set = PolicySet::new();
    for p in all.policies() {
        let applies = match p.action_constraint() {
            ActionConstraint::Eq(a) => &a == action,
            ActionConstraint::Any | ActionConstraint::In(_) => true,
        };
        if applies {
            set.add(p.clone()).expect("ids are unique in the bundle");
        }
    }
    set
}

/// Like [`for_action`], but a permit takes part only if it names `action`:
/// for actions no broad permit should grant.
fn naming_action(all: &PolicySet, action: &EntityUid) -> PolicySet {
    let mut set = PolicySet::new();
    for p in all.policies() {
        let forbid = p.effect() == cedar_policy::Effect::Forbid;
        let applies = match p.action_constraint() {
            ActionConstraint::Eq(a) => &a == action,
            ActionConstraint::In(list) => list.contains(action) || forbid,
            ActionConstraint::Any => forbid,
        };
        if applies {
            set.add(p.clone()).expect("ids are unique in the bundle");
        }
    }
    set
}

/// What an approval required by `forbids` (all `@approval` forbids) takes:
/// the most approvers any asks for (1 if none says), and the shortest
/// timeout any sets (300 s if none says).
fn approval_terms(forbids: &[&PolicyMeta]) -> (u32, u32) {
    let approvers = forbids
        .iter()
        .filter_map(|m| m.approvers)
        .max()
        .unwrap_or(DEFAULT_APPROVERS);
    let timeout = forbids
        .iter()
        .filter_map(|m| m.approval_timeout_secs)
        .min()
        .unwrap_or(DEFAULT_APPROVAL_TIMEOUT_SECS);
    (approvers, timeout)
}

fn ids(metas: &[&PolicyMeta]) -> Vec<String> {
    metas.iter().map(|m| m.id.clone()).collect()
}

/// The client-facing message: each policy's `@reason`, else its id.
fn reasons(metas: &[&PolicyMeta]) -> String {
    let mut seen = HashSet::new();
    metas
        .iter()
        .map(|m| m.reason.as_deref().unwrap_or(&m.id))
        .filter(|r| seen.insert(*r))
        .collect::<Vec<_>>()
        .join("; ")
}

fn failed(metas: &[&PolicyMeta]) -> String {
    let names: Vec<String> = metas.iter().map(|m| format!("`{}`", m.id)).collect();
    format!(
        "policy {} could not be evaluated; denied to be safe",
        names.join(", ")
    )
}

fn hour(session: &Session) -> i64 {
    session.hour.unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ((secs / 3600) % 24) as i64
    })
}

fn normalize_ip(s: &str) -> String {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return ip.to_string();
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return sa.ip().to_string();
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map_or_else(|_| "0.0.0.0".to_string(), |ip| ip.to_string())
}

fn hex_sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

type Built = (EntityUid, EntityUid, Result<Entities, String>);

/// The principal's entity and those it refers to: its groups and, for a
/// delegation, the user it acts for. The one place a [`Principal`] becomes
/// entities, for sessions and API requests alike.
///
/// The agent of a delegation is in no group: a token's groups are its
/// subject's, the person's, and what a person may do does not pass to a
/// program acting for them unless a policy grants it to the agent (e.g.
/// `principal.acting_for in Gatehouse::Group::"oncall"`).
fn principal_entities(p: &Principal) -> (EntityUid, Vec<Result<Entity, String>>) {
    let n = &*NAMES;
    let uid = |ty: &EntityTypeName, id: &str| {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    };
    let groups: BTreeSet<&str> = p.groups.iter().map(String::as_str).collect();
    let parents: HashSet<EntityUid> = groups.iter().map(|g| uid(&n.group, g)).collect();
    let name = |s: &str| RestrictedExpression::new_string(s.to_string());
    let username = if p.username.is_empty() {
        &p.subject
    } else {
        &p.username
    };

    let mut entities: Vec<Result<Entity, String>> = groups
        .iter()
        .map(|g| Ok(Entity::new_no_attrs(uid(&n.group, g), HashSet::new())))
        .collect();
    let principal = if let Some(actor) = p.delegation.first() {
        let user = uid(&n.user, &p.subject);
        entities.push(
            Entity::new(
                user.clone(),
                HashMap::from([("name".to_string(), name(username))]),
                parents,
            )
            .map_err(|e| e.to_string()),
        );
        let agent = uid(&n.agent, actor);
        entities.push(
            Entity::new(
                agent.clone(),
                HashMap::from([
                    ("name".to_string(), name(actor)),
                    (
                        "acting_for".to_string(),
                        RestrictedExpression::new_entity_uid(user),
                    ),
                ]),
                HashSet::new(),
            )
            .map_err(|e| e.to_string()),
        );
        agent
    } else {
        let ty = if p.is_agent { &n.agent } else { &n.user };
        let me = uid(ty, &p.subject);
        entities.push(
            Entity::new(
                me.clone(),
                HashMap::from([("name".to_string(), name(username))]),
                parents,
            )
            .map_err(|e| e.to_string()),
        );
        me
    };
    (principal, entities)
}

fn build_entities(p: &Principal, t: &TargetInfo, schema: &Schema) -> Built {
    let n = &*NAMES;
    let uid = |ty: &EntityTypeName, id: &str| {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    };
    let name = |s: &str| RestrictedExpression::new_string(s.to_string());
    let (principal, mut entities) = principal_entities(p);
    let target = uid(&n.target, &t.name);
    entities.push(
        Entity::new(
            target.clone(),
            HashMap::from([
                ("name".to_string(), name(&t.name)),
                ("kind".to_string(), name(&t.kind)),
                ("environment".to_string(), name(&t.environment)),
                (
                    "tags".to_string(),
                    RestrictedExpression::new_set(t.tags.iter().map(|s| name(s))),
                ),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string()),
    );
    let built = entities
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .and_then(|es| Entities::from_entities(es, Some(schema)).map_err(|e| e.to_string()));
    (principal, target, built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _assert_send_sync() {
        fn is<T: Send + Sync>() {}
        is::<Engine>();
        is::<Session>();
    }

    #[test]
    fn addresses_normalize() {
        assert_eq!(normalize_ip("10.1.2.3"), "10.1.2.3");
        assert_eq!(normalize_ip("10.1.2.3:5432"), "10.1.2.3");
        assert_eq!(normalize_ip("[::1]:5432"), "::1");
        assert_eq!(normalize_ip("[::1]"), "::1");
        assert_eq!(normalize_ip("/tmp/.s.PGSQL.5432"), "0.0.0.0");
        assert_eq!(normalize_ip(""), "0.0.0.0");
    }

    #[test]
    fn only_a_permit_naming_unmask_unmasks() {
        let bundle = |text: &str| {
            Engine::new(&Bundle::new(
                String::new(),
                vec![("p.cedar".into(), text.into())],
                crate::bundle::SCHEMA,
            ))
            .unwrap()
        };
        let alice = Principal::from_claims(
            "alice".into(),
            None,
            vec!["pii-readers".into()],
            Vec::new(),
            "agents",
        );
        let target = TargetInfo {
            name: "t".into(),
            kind: "postgres".into(),
            environment: String::new(),
            tags: Vec::new(),
        };
        let effect = |engine: &Engine, table: &str| {
            let s = engine.session(&alice, &target, "127.0.0.1");
            engine.decide_unmask(&s, table, "email").effect
        };
        let broad = bundle("permit (principal, action, resource);");
        assert_eq!(effect(&broad, "users"), Effect::Deny);
        let listed = bundle(
            "permit (principal, action in [Gatehouse::Action::\"query\", \
             Gatehouse::Action::\"unmask\"], resource) \
             when { context has table && context.table == \"users\" };",
        );
        assert_eq!(effect(&listed, "users"), Effect::Allow);
        assert_eq!(effect(&listed, "orders"), Effect::Deny);
        let forbidden = bundle(
            "permit (principal, action == Gatehouse::Action::\"unmask\", resource);\n\
             forbid (principal, action, resource == Gatehouse::Target::\"t\");",
        );
        assert_eq!(
            effect(&forbidden, "users"),
            Effect::Deny,
            "any forbid applies"
        );
    }
}
