//! The approval flow's part in the engine: `@approvers` and
//! `@approval_timeout` on approval forbids (parsed, refused when wrong,
//! combined across forbids and across the statements of a command), the
//! `approve` action, and the `api:read-approvals` API action.

use std::path::Path;

use gatehouse_policies::{
    ApiAction, ApiAuthority, Bundle, Decision, Effect, Engine, Principal, Reading, SCHEMA,
    StatementFacts, StatementKind, TargetInfo, classify,
};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    let files = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    Bundle::new("test", files, SCHEMA)
}

fn engine(text: &str) -> Engine {
    Engine::new(&bundle(&[("p.cedar", text)])).unwrap_or_else(|e| panic!("{e}"))
}

fn invalid(text: &str) -> String {
    match Engine::new(&bundle(&[("p.cedar", text)])) {
        Ok(_) => panic!("bundle unexpectedly valid:\n{text}"),
        Err(e) => e.to_string(),
    }
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

fn target(name: &str, environment: &str) -> TargetInfo {
    TargetInfo {
        name: name.into(),
        kind: "postgres".into(),
        environment: environment.into(),
        tags: Vec::new(),
    }
}

/// A delete of `tables`, with or without a WHERE clause.
fn delete(tables: &[&str], has_where: bool) -> StatementFacts {
    let mut f = StatementFacts::new(StatementKind::Delete);
    f.writes = true;
    f.has_where = has_where;
    for t in tables {
        f.tables_written.insert(t.to_string());
    }
    f
}

fn statement(e: &Engine, f: &StatementFacts) -> Decision {
    let s = e.session(&person("alice", &["eng"]), &target("db", "dev"), "10.0.0.1");
    e.decide_statement(&s, f, true, false)
}

fn command(e: &Engine, sql: &str) -> Decision {
    let s = e.session(&person("alice", &["eng"]), &target("db", "dev"), "10.0.0.1");
    e.decide_classification(&s, &classify(sql, Reading::default()))
}

/// Effect, approvers, timeout.
fn terms(d: &Decision) -> (Effect, u32, u32) {
    (d.effect, d.approvers, d.approval_timeout_secs)
}

const APPROVALS: &str = r#"
@id("permit-all")
permit (principal, action, resource);

@id("orders-delete")
@approval("required")
@approvers("2")
@approval_timeout("1h")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { context.kind == "delete" && context.tables_written.contains("orders") };

@id("unbounded")
@approval("required")
@approvers("3")
@approval_timeout("90s")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { ["update", "delete"].contains(context.kind) && !context.has_where };

@id("audit-delete")
@approval("required")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { context.tables_written.contains("audit") };

@id("no-ddl")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { context.kind == "ddl" };
"#;

// ---------------------------------------------------------------- one statement

#[test]
fn an_approval_carries_its_forbids_approvers_and_timeout() {
    let e = engine(APPROVALS);
    assert!(e.warnings().is_empty(), "{:?}", e.warnings());

    let d = statement(&e, &delete(&["orders"], true));
    assert_eq!(d.policies, ["orders-delete"]);
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 2, 3600));

    // No annotation: one approver, five minutes.
    let d = statement(&e, &delete(&["audit"], true));
    assert_eq!(d.policies, ["audit-delete"]);
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 1, 300));
}

#[test]
fn several_approval_forbids_take_the_most_approvers_and_the_shortest_timeout() {
    let e = engine(APPROVALS);
    // orders-delete (2, 1h) and unbounded (3, 90 s).
    let d = statement(&e, &delete(&["orders"], false));
    assert_eq!(d.policies, ["orders-delete", "unbounded"]);
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 3, 90));

    // All three: audit-delete says nothing, so it changes nothing.
    let d = statement(&e, &delete(&["orders", "audit"], false));
    assert_eq!(d.policies, ["orders-delete", "unbounded", "audit-delete"]);
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 3, 90));

    // orders-delete (2, 1h) with the silent audit-delete: the timeout is
    // the smallest among those that set one.
    let d = statement(&e, &delete(&["orders", "audit"], true));
    assert_eq!(d.policies, ["orders-delete", "audit-delete"]);
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 2, 3600));
}

#[test]
fn only_an_approval_carries_approvers_and_a_timeout() {
    let e = engine(APPROVALS);
    let d = statement(&e, &StatementFacts::new(StatementKind::Select));
    assert_eq!(terms(&d), (Effect::Allow, 0, 0));

    let mut ddl = StatementFacts::new(StatementKind::Ddl);
    ddl.writes = true;
    ddl.tables_written.insert("orders".into());
    let d = statement(&e, &ddl);
    assert_eq!(terms(&d), (Effect::Deny, 0, 0));

    // A hard forbid among approval forbids: deny, nothing to approve.
    let e2 = engine(&format!(
        "{APPROVALS}\n@id(\"no-orders\") forbid (principal, action == Gatehouse::Action::\"query\", resource) when {{ context.tables_written.contains(\"orders\") }};"
    ));
    let d = statement(&e2, &delete(&["orders"], false));
    assert_eq!(d.policies, ["orders-delete", "unbounded", "no-orders"]);
    assert_eq!(terms(&d), (Effect::Deny, 0, 0));

    // Default deny.
    let none = engine(
        "@approval(\"required\") @approvers(\"4\")\nforbid (principal, action, resource) when { context.hour > 25 };",
    );
    let d = statement(&none, &delete(&["orders"], true));
    assert_eq!(terms(&d), (Effect::Deny, 0, 0));
    assert!(d.policies.is_empty());

    // The empty command runs nothing.
    assert_eq!(terms(&command(&e, ";")), (Effect::Allow, 0, 0));
}

// ---------------------------------------------------------------- commands

#[test]
fn a_command_takes_the_most_approvers_and_the_shortest_timeout_of_its_statements() {
    let e = engine(APPROVALS);
    // (2, 1h) then (3, 90 s), in either order.
    for sql in [
        "DELETE FROM orders WHERE id = 1; DELETE FROM items",
        "DELETE FROM items; DELETE FROM orders WHERE id = 1",
    ] {
        let d = command(&e, sql);
        assert_eq!(terms(&d), (Effect::ApprovalRequired, 3, 90), "{sql}");
        let mut policies = d.policies.clone();
        policies.sort();
        assert_eq!(policies, ["orders-delete", "unbounded"], "{sql}");
    }
    // (2, 1h) and (1, 300 s): a statement whose forbid sets no timeout
    // counts with the default.
    let d = command(
        &e,
        "DELETE FROM orders WHERE id = 1; DELETE FROM audit WHERE id = 2",
    );
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 2, 300));
    // An allowed statement before an approval changes nothing.
    let d = command(&e, "SELECT 1; DELETE FROM orders WHERE id = 1");
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 2, 3600));
    // A denied statement anywhere: deny, nothing to approve.
    for sql in [
        "DELETE FROM items; CREATE TABLE t (a int)",
        "CREATE TABLE t (a int); DELETE FROM items",
    ] {
        let d = command(&e, sql);
        assert_eq!(terms(&d), (Effect::Deny, 0, 0), "{sql}");
        assert_eq!(d.policies, ["no-ddl"], "{sql}");
    }
    // Repeated (the session memo): the same.
    let s = e.session(&person("bob", &[]), &target("db", "dev"), "10.0.0.1");
    let c = classify(
        "DELETE FROM items; DELETE FROM orders WHERE id = 1",
        Reading::default(),
    );
    for _ in 0..3 {
        assert_eq!(
            terms(&e.decide_classification(&s, &c)),
            (Effect::ApprovalRequired, 3, 90)
        );
    }
}

// ---------------------------------------------------------------- mistakes

#[test]
fn bad_approvers_and_timeouts_are_errors() {
    let forbid = |annotations: &str| {
        format!(
            "permit (principal, action, resource);\n@approval(\"required\") {annotations}\nforbid (principal, action, resource);\n"
        )
    };
    for (annotation, expected) in [
        (
            "@approvers(\"0\")",
            "@approvers(\"0\"): the number of approvers is a whole number from 1 to 10",
        ),
        ("@approvers(\"11\")", "@approvers(\"11\")"),
        ("@approvers(\"two\")", "@approvers(\"two\")"),
        ("@approvers(\"-1\")", "@approvers(\"-1\")"),
        ("@approvers", "@approvers(\"\")"),
        (
            "@approval_timeout(\"5x\")",
            "@approval_timeout(\"5x\"): write a whole number followed by s, m or h",
        ),
        ("@approval_timeout(\"25h\")", "@approval_timeout(\"25h\")"),
        ("@approval_timeout(\"0s\")", "@approval_timeout(\"0s\")"),
        ("@approval_timeout(\"5\")", "@approval_timeout(\"5\")"),
        ("@approval_timeout(\"86401s\")", "from 1 second to 24 hours"),
    ] {
        let msg = invalid(&forbid(annotation));
        assert!(msg.contains("p.cedar:2:1: error"), "{annotation}: {msg}");
        assert!(msg.contains(expected), "{annotation}: {msg}");
    }
    // The limits themselves are fine.
    for annotation in [
        "@approvers(\"1\") @approval_timeout(\"1s\")",
        "@approvers(\"10\") @approval_timeout(\"24h\")",
        "@approval_timeout(\"1440m\")",
    ] {
        let e = engine(&forbid(annotation));
        assert!(e.warnings().is_empty(), "{annotation}: {:?}", e.warnings());
    }
}

#[test]
fn approvers_and_timeouts_belong_on_approval_forbids() {
    for annotation in ["@approvers(\"2\")", "@approval_timeout(\"5m\")"] {
        let key = &annotation[1..annotation.find('(').unwrap()];
        let msg = invalid(&format!(
            "{annotation}\npermit (principal, action, resource);\n"
        ));
        assert!(
            msg.contains("p.cedar:1:1")
                && msg.contains(&format!(
                    "@{key} belongs on a forbid with @approval(\"required\"), not on a permit"
                )),
            "{msg}"
        );
        let msg = invalid(&format!(
            "permit (principal, action, resource);\n{annotation}\n@reason(\"no\")\nforbid (principal, action, resource);\n"
        ));
        assert!(
            msg.contains("p.cedar:2:1")
                && msg.contains(&format!(
                    "@{key} applies only to a forbid that also carries @approval(\"required\")"
                )),
            "{msg}"
        );
    }
    // A typo still only warns, and the message lists what is read.
    let e = engine(
        "permit (principal, action, resource);\n@approval(\"required\") @approver(\"2\")\nforbid (principal, action, resource);\n",
    );
    let w = e.warnings()[0].to_string();
    assert!(
        w.contains("unknown annotation @approver (Gatehouse reads @id, @reason, @approval, @approvers, @approval_timeout, @read_only)"),
        "{w}"
    );
}

// ---------------------------------------------------------------- approve

const APPROVERS_PERMIT: &str = r#"
@id("approvers-approve")
permit (
  principal in Gatehouse::Group::"approvers",
  action in [Gatehouse::Action::"approve", Gatehouse::Action::"api:read-approvals"],
  resource
);
"#;

fn approve(e: &Engine, p: &Principal) -> Decision {
    let s = e.session(p, &target("orders", "prod"), "10.0.0.1");
    e.decide_approve(&s)
}

#[test]
fn only_a_permit_naming_approve_grants_it() {
    let ann = person("ann", &["approvers"]);
    let alice = person("alice", &["eng"]);
    let agent_for_ann = Principal::from_claims(
        "ann".into(),
        None,
        vec!["approvers".into()],
        vec!["copilot".into()],
        "agents",
    );

    let e = engine(APPROVERS_PERMIT);
    let d = approve(&e, &ann);
    assert_eq!(terms(&d), (Effect::Allow, 0, 0));
    assert_eq!(d.policies, ["approvers-approve"]);
    assert_eq!(d.reason, None);
    let d = approve(&e, &alice);
    assert_eq!(terms(&d), (Effect::Deny, 0, 0));
    assert!(d.policies.is_empty());
    assert_eq!(
        d.reason.as_deref(),
        Some("no policy permits approving commands on this target")
    );
    // An agent acting for an approver is in no group.
    assert_eq!(approve(&e, &agent_for_ann).effect, Effect::Deny);

    // A permit for any action grants no approval, to anyone.
    let broad = engine("permit (principal, action, resource);");
    for p in [&ann, &alice] {
        let d = approve(&broad, p);
        assert_eq!(terms(&d), (Effect::Deny, 0, 0));
        assert!(d.policies.is_empty());
    }
    // Nor does a permit for other actions.
    let others = engine(
        "permit (principal, action in [Gatehouse::Action::\"query\", Gatehouse::Action::\"connect\"], resource);",
    );
    assert_eq!(approve(&others, &ann).effect, Effect::Deny);

    // A permit can be narrower: by target, by hour.
    let prod_only = engine(
        "permit (principal in Gatehouse::Group::\"approvers\", action == Gatehouse::Action::\"approve\", resource)\n\
         when { resource.environment == \"prod\" && context.hour >= 8 && context.hour < 18 };",
    );
    let at = |t: TargetInfo, hour: u8| {
        let s = prod_only.session(&ann, &t, "10.0.0.1").at_hour(hour);
        prod_only.decide_approve(&s).effect
    };
    assert_eq!(at(target("orders", "prod"), 10), Effect::Allow);
    assert_eq!(at(target("orders", "prod"), 3), Effect::Deny);
    assert_eq!(at(target("scratch", "dev"), 10), Effect::Deny);
}

#[test]
fn forbids_apply_to_approve_and_an_approval_forbid_denies_it() {
    let ann = person("ann", &["approvers"]);
    let e = engine(&format!(
        "{APPROVERS_PERMIT}\n@id(\"no-remote\") @reason(\"approve from the office\")\n\
         forbid (principal, action, resource) unless {{ context.source_ip.isInRange(ip(\"10.0.0.0/8\")) }};"
    ));
    let from = |ip: &str| e.decide_approve(&e.session(&ann, &target("orders", "prod"), ip));
    assert_eq!(from("10.1.2.3").effect, Effect::Allow);
    let d = from("192.0.2.1:5000");
    assert_eq!(terms(&d), (Effect::Deny, 0, 0));
    assert_eq!(d.policies, ["no-remote"]);
    assert_eq!(d.reason.as_deref(), Some("approve from the office"));

    // Granting cannot itself wait for an approval: denied, with the reason.
    let e = engine(&format!(
        "{APPROVERS_PERMIT}\n@id(\"approve-needs-approval\") @approval(\"required\") @approvers(\"3\")\n\
         forbid (principal, action == Gatehouse::Action::\"approve\", resource);"
    ));
    let d = approve(&e, &ann);
    assert_eq!(terms(&d), (Effect::Deny, 0, 0));
    assert_eq!(d.policies, ["approve-needs-approval"]);
    assert_eq!(d.reason.as_deref(), Some("approve-needs-approval"));
}

#[test]
fn the_example_lets_approvers_approve_and_read_approvals() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let examples = Engine::new(&Bundle::from_dir(&dir).unwrap()).unwrap();
    let defaults = Engine::new(&Bundle::defaults()).unwrap();
    let api = ApiAuthority::new("policy-admins", "auditors");
    let ann = person("ann", &["approvers"]);
    let alice = person("alice", &["eng", "dba"]);
    for e in [&examples, &defaults] {
        let d = approve(e, &ann);
        assert_eq!(d.effect, Effect::Allow);
        assert_eq!(d.policies, ["approvers-approve"]);
        assert_eq!(approve(e, &alice).effect, Effect::Deny);

        let d = api.decide(Some(e), &ann, ApiAction::ReadApprovals, "10.0.0.1");
        assert_eq!(d.effect, Effect::Allow);
        assert_eq!(d.policies, ["approvers-approve"]);
        // Nothing else of the API but what everyone may do.
        for action in ApiAction::ALL {
            if ![ApiAction::ReadApprovals, ApiAction::RequestAccess].contains(&action) {
                let d = api.decide(Some(e), &ann, action, "10.0.0.1");
                assert_eq!(d.effect, Effect::Deny, "{action:?}");
            }
        }
        assert_eq!(
            api.decide(Some(e), &alice, ApiAction::ReadApprovals, "10.0.0.1")
                .effect,
            Effect::Deny
        );
        // And the example's approval is the default one.
        let d = statement(e, &delete(&["orders"], false));
        assert_eq!(terms(&d), (Effect::ApprovalRequired, 1, 300));
    }
}

// ---------------------------------------------------------------- API

#[test]
fn read_approvals_is_an_api_action_of_admins_and_auditors() {
    let a = ApiAction::ReadApprovals;
    assert_eq!(a.name(), "api:read-approvals");
    assert_eq!(a.describe(), "read and decide approvals");
    assert!(ApiAction::ALL.contains(&a));
    assert!(SCHEMA.contains("\"api:read-approvals\""));

    let api = ApiAuthority::new("policy-admins", "auditors");
    assert!(
        api.builtin_text()
            .contains("Gatehouse::Action::\"api:read-approvals\"")
    );
    for (p, policy) in [
        (
            person("root", &["policy-admins"]),
            "gatehouse-builtin:admins",
        ),
        (person("aud", &["auditors"]), "gatehouse-builtin:auditors"),
    ] {
        let d = api.decide(None, &p, a, "10.0.0.1");
        assert_eq!(d.effect, Effect::Allow, "{p:?}");
        assert_eq!(d.policies, [policy]);
    }
    let d = api.decide(None, &person("nobody", &["approvers"]), a, "10.0.0.1");
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(
        d.reason.as_deref(),
        Some(
            r#"no policy permits Gatehouse::User::"nobody" to read and decide approvals (api:read-approvals)"#
        )
    );
    // A permit for any action grants it to no one.
    let broad = engine("permit (principal, action, resource);");
    let d = api.decide(
        Some(&broad),
        &person("nobody", &["approvers"]),
        a,
        "10.0.0.1",
    );
    assert_eq!(d.effect, Effect::Deny);
}

// ---------------------------------------------------------------- serde

#[test]
fn decisions_without_the_approval_fields_still_deserialize() {
    let old = r#"{"effect":"approval_required","policies":["p"],"reason":"r","read_only":false,"eval_micros":7}"#;
    let d: Decision = serde_json::from_str(old).unwrap();
    assert_eq!(terms(&d), (Effect::ApprovalRequired, 0, 0));
    let e = engine(APPROVALS);
    let d = statement(&e, &delete(&["orders"], false));
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["approvers"], 3);
    assert_eq!(json["approval_timeout_secs"], 90);
    let back: Decision = serde_json::from_value(json).unwrap();
    assert_eq!(back, d);
}
