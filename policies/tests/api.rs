//! API decisions (`ApiAuthority`): the built-in policies reproduce the
//! admin and auditor groups' access; a delegated token's agent inherits
//! none of the person's rights unless a bundle grants them to the agent; a
//! permit for any action grants no API action; a bundle's forbids apply,
//! except to the admins' pushing and rolling back a bundle.

use gatehouse_policies::{ApiAction, ApiAuthority, Bundle, Effect, Engine, Principal};

const ADMINS: &str = "policy-admins";
const AUDITORS: &str = "auditors";

fn authority() -> ApiAuthority {
    ApiAuthority::new(ADMINS, AUDITORS)
}

fn engine(files: &[(&str, &str)]) -> Engine {
    let dir = std::env::temp_dir().join(format!("gh-api-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let bundle = Bundle::from_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_dir_all(&dir).unwrap();
    Engine::new(&bundle).unwrap_or_else(|e| panic!("{e}"))
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn person(subject: &str, groups: &[&str]) -> Principal {
    Principal::from_claims(
        subject.into(),
        None,
        groups.iter().map(|g| g.to_string()).collect(),
        Vec::new(),
        "agents",
    )
}

fn delegated(subject: &str, groups: &[&str], actors: &[&str]) -> Principal {
    Principal::from_claims(
        subject.into(),
        None,
        groups.iter().map(|g| g.to_string()).collect(),
        actors.iter().map(|a| a.to_string()).collect(),
        "agents",
    )
}

/// The actions `p` may take, besides requesting access (everyone's: see
/// `everyone_may_request_access_unless_a_bundle_forbids_it`).
fn allowed(a: &ApiAuthority, e: Option<&Engine>, p: &Principal) -> Vec<ApiAction> {
    ApiAction::ALL
        .into_iter()
        .filter(|action| *action != RequestAccess)
        .filter(|action| a.decide(e, p, *action, "10.0.0.1").effect == Effect::Allow)
        .collect()
}

use ApiAction::*;

const ADMIN_ACTIONS: [ApiAction; 8] = [
    PushPolicy,
    RollbackPolicy,
    SetDryRun,
    Revoke,
    Reinstate,
    Explain,
    ReadPolicy,
    ReadApprovals,
];

#[test]
fn built_in_policies_give_the_groups_their_access() {
    let a = authority();
    let defaults = Engine::new(&Bundle::defaults()).unwrap();
    for e in [None, Some(&defaults)] {
        assert_eq!(allowed(&a, e, &person("root", &[ADMINS])), ADMIN_ACTIONS);
        assert_eq!(
            allowed(&a, e, &person("aud", &[AUDITORS])),
            [
                Explain,
                ReadPolicy,
                ReadAudit,
                ReadQuarantine,
                ReadApprovals
            ]
        );
        assert_eq!(
            allowed(&a, e, &person("both", &[ADMINS, AUDITORS])),
            ApiAction::ALL[..ApiAction::ALL.len() - 1]
        );
        assert!(allowed(&a, e, &person("nobody", &["dba", "agents"])).is_empty());
        // An agent's own token in the admin group is an admin.
        assert_eq!(
            allowed(&a, e, &person("deploy-bot", &[ADMINS, "agents"])),
            ADMIN_ACTIONS
        );
    }
    let d = a.decide(None, &person("nobody", &[]), Revoke, "10.0.0.1");
    assert_eq!(
        d.reason.as_deref(),
        Some(r#"no policy permits Gatehouse::User::"nobody" to revoke identities (api:revoke)"#)
    );
    let d = a.decide(None, &person("root", &[ADMINS]), PushPolicy, "10.0.0.1");
    assert_eq!(d.policies, ["gatehouse-builtin:admins"]);
}

#[test]
fn an_agent_acting_for_an_admin_inherits_nothing() {
    let a = authority();
    let agent = delegated("alice", &[ADMINS, AUDITORS], &["copilot", "ide"]);
    assert!(allowed(&a, None, &agent).is_empty());
    // A bundle that permits anything, written for SQL, grants no API action.
    let permit_all = engine(&[("all.cedar", "permit (principal, action, resource);")]);
    assert!(allowed(&a, Some(&permit_all), &agent).is_empty());
    assert!(allowed(&a, Some(&permit_all), &person("nobody", &[])).is_empty());
    let d = a.decide(Some(&permit_all), &agent, PushPolicy, "10.0.0.1");
    assert_eq!(
        d.reason.as_deref(),
        Some(
            r#"no policy permits Gatehouse::Agent::"copilot" to push policy bundles (api:push-policy)"#
        )
    );
}

const AGENTS_EXPLAIN: &str = r#"
@id("agents-for-admins-explain")
permit (
  principal is Gatehouse::Agent,
  action in [Gatehouse::Action::"api:explain", Gatehouse::Action::"api:read-policy"],
  resource
)
when {
  context.delegated && !context.actors.contains("untrusted-agent") &&
  principal has acting_for && principal.acting_for in Gatehouse::Group::"policy-admins"
};
"#;

#[test]
fn a_bundle_can_grant_an_agent_named_actions() {
    let a = authority();
    let e = engine(&[("explain.cedar", AGENTS_EXPLAIN)]);
    let agent = delegated("alice", &[ADMINS], &["copilot"]);
    assert_eq!(allowed(&a, Some(&e), &agent), [Explain, ReadPolicy]);
    let d = a.decide(Some(&e), &agent, Explain, "10.0.0.1");
    assert_eq!(d.policies, ["agents-for-admins-explain"]);
    // The chain is in the context: an untrusted agent anywhere in it.
    let via = delegated("alice", &[ADMINS], &["copilot", "untrusted-agent"]);
    assert!(allowed(&a, Some(&e), &via).is_empty());
    // Acting for someone outside the admin group.
    let for_bob = delegated("bob", &["eng"], &["copilot"]);
    assert!(allowed(&a, Some(&e), &for_bob).is_empty());
}

const NO_REVOKING: &str = r#"
@id("no-api-writes")
@reason("the API is read-only during the audit")
forbid (
  principal,
  action in [
    Gatehouse::Action::"api:revoke",
    Gatehouse::Action::"api:push-policy",
    Gatehouse::Action::"api:rollback-policy"
  ],
  resource
);
@id("nothing-at-all")
forbid (principal, action == Gatehouse::Action::"api:read-quarantine", resource);
"#;

#[test]
fn bundle_forbids_apply_but_cannot_lock_admins_out_of_replacing_the_bundle() {
    let a = authority();
    let e = engine(&[("forbid.cedar", NO_REVOKING)]);
    let root = person("root", &[ADMINS, AUDITORS]);
    let d = a.decide(Some(&e), &root, Revoke, "10.0.0.1");
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(
        d.reason.as_deref(),
        Some("the API is read-only during the audit")
    );
    assert_eq!(d.policies, ["no-api-writes"]);
    assert_eq!(
        a.decide(Some(&e), &root, ReadQuarantine, "10.0.0.1").effect,
        Effect::Deny
    );
    // Replacing the bundle stays possible for the admin group...
    for action in [PushPolicy, RollbackPolicy] {
        let d = a.decide(Some(&e), &root, action, "10.0.0.1");
        assert_eq!(d.effect, Effect::Allow, "{action:?}");
        assert_eq!(d.policies, ["gatehouse-builtin:admins"]);
    }
    // ...and only for it.
    let granted = engine(&[
        ("forbid.cedar", NO_REVOKING),
        (
            "ops.cedar",
            r#"@id("ops-push") permit (principal in Gatehouse::Group::"ops",
                 action == Gatehouse::Action::"api:push-policy", resource);"#,
        ),
    ]);
    let ops = person("olga", &["ops"]);
    assert_eq!(
        a.decide(Some(&granted), &ops, PushPolicy, "10.0.0.1")
            .effect,
        Effect::Deny
    );
    assert_eq!(
        a.decide(Some(&engine(&[("ops.cedar", r#"@id("ops-push") permit (principal in Gatehouse::Group::"ops", action == Gatehouse::Action::"api:push-policy", resource);"#)])), &ops, PushPolicy, "10.0.0.1")
            .effect,
        Effect::Allow
    );
}

#[test]
fn the_groups_are_configurable_and_quoted() {
    let a = ApiAuthority::new("ops\" || true || \"", "audit team");
    assert!(
        a.builtin_text()
            .contains(r#"Gatehouse::Group::"ops\" || true || \"""#)
    );
    assert!(allowed(&a, None, &person("x", &["ops"])).is_empty());
    assert_eq!(
        allowed(&a, None, &person("x", &["ops\" || true || \""])),
        ADMIN_ACTIONS
    );
    assert!(allowed(&a, None, &person("y", &["audit team"])).contains(&ReadAudit));
}

#[test]
fn everyone_may_request_access_unless_a_bundle_forbids_it() {
    let a = authority();
    let agent = delegated("alice", &[], &["copilot"]);
    for p in [person("nobody", &[]), agent.clone()] {
        let d = a.decide(None, &p, RequestAccess, "10.0.0.1");
        assert_eq!(d.effect, Effect::Allow, "{p:?}");
        assert_eq!(d.policies, ["gatehouse-builtin:everyone-requests-access"]);
    }
    let e = engine(&[(
        "agents.cedar",
        r#"@id("agents-ask-no-access") @reason("agents may not ask for access")
           forbid (principal is Gatehouse::Agent, action == Gatehouse::Action::"api:request-access", resource);"#,
    )]);
    let d = a.decide(Some(&e), &agent, RequestAccess, "10.0.0.1");
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.reason.as_deref(), Some("agents may not ask for access"));
    let d = a.decide(Some(&e), &person("nobody", &[]), RequestAccess, "10.0.0.1");
    assert_eq!(d.effect, Effect::Allow);
}
