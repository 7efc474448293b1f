//! The Cedar engine: the shipped examples' corpora, error locations,
//! annotation semantics, delegation, and the bundle format.

use std::path::{Path, PathBuf};

use gatehouse_policies::{
    Bundle, BundleError, Classification, Decision, Effect, Engine, Principal, SCHEMA, Severity,
    StatementFacts, StatementKind, TargetInfo, TestError, run_corpus, run_tests, run_tests_against,
};

fn crate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn bundle(files: &[(&str, &str)]) -> Bundle {
    let files = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    Bundle::new("test", files, SCHEMA)
}

fn engine(files: &[(&str, &str)]) -> Engine {
    Engine::new(&bundle(files)).unwrap_or_else(|e| panic!("{e}"))
}

fn invalid(files: &[(&str, &str)]) -> String {
    match Engine::new(&bundle(files)) {
        Ok(_) => panic!("bundle unexpectedly valid"),
        Err(e) => e.to_string(),
    }
}

fn person(subject: &str, groups: &[&str]) -> Principal {
    Principal {
        subject: subject.into(),
        username: format!("{subject}@example.com"),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        delegation: Vec::new(),
        is_agent: false,
    }
}

fn target(name: &str, environment: &str, tags: &[&str]) -> TargetInfo {
    TargetInfo {
        name: name.into(),
        kind: "postgres".into(),
        environment: environment.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn facts(kind: StatementKind) -> StatementFacts {
    StatementFacts::new(kind)
}

fn query(e: &Engine, p: &Principal, f: &StatementFacts) -> Decision {
    e.decide_query(p, &target("db", "dev", &[]), f, true, false, "10.0.0.1")
}

const PERMIT_ALL: &str = r#"
@id("permit-all")
permit (principal, action, resource);
"#;

// ---------------------------------------------------------------- examples

#[test]
fn example_corpora_pass() {
    let report = run_tests(crate_dir().join("examples")).unwrap_or_else(|e| panic!("{e}"));
    println!("{report}");
    assert!(report.is_success(), "{report}");
    assert!(report.passed() >= 60, "only {} cases", report.passed());
}

#[test]
fn defaults_are_the_examples_and_pass_their_corpora() {
    let examples = crate_dir().join("examples");
    let defaults = crate_dir().join("defaults");
    for (name, text) in Bundle::defaults().files {
        let stem = name.trim_end_matches(".cedar");
        let example = std::fs::read_to_string(examples.join(stem).join("policy.cedar"))
            .unwrap_or_else(|e| panic!("defaults/{name} has no examples/{stem}/policy.cedar: {e}"));
        assert_eq!(
            text, example,
            "defaults/{name} drifted from examples/{stem}"
        );
    }
    let on_disk = Bundle::from_dir(&defaults).unwrap();
    assert_eq!(
        on_disk.files,
        Bundle::defaults().files,
        "defaults/ and Bundle::defaults()"
    );
    let report = run_tests_against(&Bundle::defaults(), &examples).unwrap();
    assert!(report.is_success(), "{report}");
}

#[test]
fn examples_bundle_shape() {
    let b = Bundle::from_dir(crate_dir().join("examples")).unwrap();
    assert_eq!(b.schema, SCHEMA);
    assert!(b.label.starts_with("local-"));
    assert_eq!(b.version, 0, "versions are given by the control plane");
    assert_eq!(b.hash.len(), 64);
    assert!(
        b.files
            .iter()
            .any(|(n, _)| n == "agents-read-only/policy.cedar")
    );
    let e = Engine::new(&b).unwrap();
    assert!(e.warnings().is_empty(), "{:?}", e.warnings());
    assert_eq!(
        e.policy_ids(),
        [
            "agents-read-only",
            "agents-connect-read-only",
            "base-connect",
            "base-query",
            "unparsed-denied",
            "dangerous-functions-dba-only",
            "pii-readers-unmask",
            "prod-no-ddl",
            "unbounded-write-needs-approval",
            "approvers-approve",
        ]
    );
    assert_eq!(e.bundle_hash(), b.hash);
    assert_eq!(e.bundle_version(), b.version);
}

#[test]
fn schema_file_is_valid_and_names_every_kind() {
    // Every StatementKind the classifier produces is a value policies can
    // compare against: the README lists them; check the schema comment does.
    for k in StatementKind::ALL {
        assert!(
            SCHEMA.contains(k.as_str()),
            "schema doc lacks {}",
            k.as_str()
        );
    }
    Engine::new(&bundle(&[("a.cedar", PERMIT_ALL)])).unwrap();
}

// ---------------------------------------------------------------- errors

#[test]
fn parse_errors_carry_file_line_column() {
    let msg = invalid(&[
        ("ok.cedar", PERMIT_ALL),
        (
            "team/bad.cedar",
            "// comment\npermit (principal, action, resource);\nforbid (principal, action resource);\n",
        ),
    ]);
    assert!(msg.contains("team/bad.cedar:3:"), "{msg}");
    assert!(msg.contains("error:"), "{msg}");
}

#[test]
fn validation_errors_carry_file_line_column_and_policy() {
    let text = "@id(\"fine\")\npermit (principal, action, resource);\n\n@id(\"typo\")\nforbid (principal, action == Gatehouse::Action::\"query\", resource)\nwhen { context.has_wher };\n";
    let err = Engine::new(&bundle(&[("p.cedar", text)])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("p.cedar:6:"), "{msg}");
    let p = &err.problems()[0];
    assert_eq!(p.policy.as_deref(), Some("typo"));
    assert_eq!(p.severity, Severity::Error);
    assert_eq!(p.line, 6);
}

#[test]
fn unknown_entity_type_is_a_validation_error() {
    let msg = invalid(&[(
        "x.cedar",
        "permit (principal in Gatehouse::Team::\"a\", action, resource);",
    )]);
    assert!(msg.contains("x.cedar:1:"), "{msg}");
    assert!(msg.contains("Team"), "{msg}");
}

#[test]
fn schema_errors_carry_line() {
    let b = Bundle::new(
        "t",
        vec![("a.cedar".into(), PERMIT_ALL.into())],
        "namespace Gatehouse {\n  entity User;\n  action connect appliesTo { principal: [Nobody], resource: [User] };\n}\n",
    );
    let msg = Engine::new(&b).unwrap_err().to_string();
    assert!(msg.contains("schema.cedarschema:"), "{msg}");
}

#[test]
fn annotation_mistakes_are_errors() {
    let msg = invalid(&[(
        "a.cedar",
        "@approval(\"required\")\npermit (principal, action, resource);\n",
    )]);
    assert!(
        msg.contains("a.cedar:1:1") && msg.contains("belongs on a forbid"),
        "{msg}"
    );

    let msg = invalid(&[(
        "a.cedar",
        "permit (principal, action, resource);\n@approval(\"maybe\")\nforbid (principal, action, resource);\n",
    )]);
    assert!(
        msg.contains("a.cedar:2:1") && msg.contains("\"required\""),
        "{msg}"
    );

    let msg = invalid(&[(
        "a.cedar",
        "@read_only\nforbid (principal, action, resource);\n",
    )]);
    assert!(msg.contains("belongs on a permit"), "{msg}");

    let msg = invalid(&[(
        "a.cedar",
        "@read_only(\"false\")\npermit (principal, action, resource);\n",
    )]);
    assert!(msg.contains("@read_only(\"false\")"), "{msg}");

    let msg = invalid(&[
        (
            "a.cedar",
            "@id(\"same\")\npermit (principal, action, resource);\n",
        ),
        (
            "b.cedar",
            "\n\n@id(\"same\")\nforbid (principal, action, resource);\n",
        ),
    ]);
    assert!(
        msg.contains("b.cedar:3:1") && msg.contains("already used at a.cedar:1:1"),
        "{msg}"
    );

    let msg = invalid(&[(
        "a.cedar",
        "permit (principal == ?principal, action, resource);",
    )]);
    assert!(msg.contains("templates"), "{msg}");
}

#[test]
fn unknown_annotations_warn() {
    let e = engine(&[(
        "a.cedar",
        "@reasons(\"typo\")\npermit (principal, action, resource);\n",
    )]);
    let w = &e.warnings()[0];
    assert_eq!(w.severity, Severity::Warning);
    assert!(
        w.to_string()
            .starts_with("a.cedar:1:1: warning: unknown annotation @reasons"),
        "{w}"
    );
}

#[test]
fn tampered_bundle_is_refused() {
    let mut b = bundle(&[("a.cedar", PERMIT_ALL)]);
    b.files[0]
        .1
        .push_str("\nforbid (principal, action, resource);");
    assert!(matches!(
        Engine::new(&b),
        Err(BundleError::HashMismatch { .. })
    ));
}

// ---------------------------------------------------------------- decisions

#[test]
fn default_ids_are_file_and_index() {
    let e = engine(&[(
        "dir/p.cedar",
        "permit (principal, action == Gatehouse::Action::\"connect\", resource);\npermit (principal, action == Gatehouse::Action::\"query\", resource);\n",
    )]);
    assert_eq!(e.policy_ids(), ["dir/p.cedar:0", "dir/p.cedar:1"]);
    let d = query(&e, &person("a", &[]), &facts(StatementKind::Select));
    assert_eq!(d.policies, ["dir/p.cedar:1"]);
}

#[test]
fn default_deny_is_deny_with_no_policies() {
    let e = engine(&[(
        "a.cedar",
        "permit (principal, action == Gatehouse::Action::\"connect\", resource);",
    )]);
    let d = query(&e, &person("a", &[]), &facts(StatementKind::Select));
    assert_eq!(d.effect, Effect::Deny);
    assert!(d.policies.is_empty());
    assert_eq!(
        d.reason.as_deref(),
        Some("no policy permits this statement")
    );
}

const APPROVAL_SET: &str = r#"
@id("permit-all")
permit (principal, action, resource);

@id("big-delete")
@approval("required")
@reason("deleting every row needs an approval")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { context.kind == "delete" && !context.has_where };

@id("big-delete-2")
@approval("required")
forbid (principal, action == Gatehouse::Action::"query", resource)
when { context.kind == "delete" && context.tables_written.contains("audit") };

@id("no-audit-writes-for-interns")
@reason("interns may not touch the audit log")
forbid (principal in Gatehouse::Group::"interns", action == Gatehouse::Action::"query", resource)
when { context.tables_written.contains("audit") };
"#;

#[test]
fn approval_required_only_when_every_determining_forbid_is_an_approval() {
    let e = engine(&[("a.cedar", APPROVAL_SET)]);
    let mut f = facts(StatementKind::Delete);
    f.has_where = false;
    f.tables_written.insert("orders".into());

    let d = query(&e, &person("alice", &[]), &f);
    assert_eq!(d.effect, Effect::ApprovalRequired);
    assert_eq!(d.policies, ["big-delete"]);
    assert_eq!(
        d.reason.as_deref(),
        Some("deleting every row needs an approval")
    );

    // Two approval forbids: still approval; reasons fall back to the id.
    f.tables_written.insert("audit".into());
    let d = query(&e, &person("alice", &[]), &f);
    assert_eq!(d.effect, Effect::ApprovalRequired);
    assert_eq!(d.policies, ["big-delete", "big-delete-2"]);
    assert_eq!(
        d.reason.as_deref(),
        Some("deleting every row needs an approval; big-delete-2")
    );

    // One hard forbid among them: deny, and the message is the hard one's.
    let d = query(&e, &person("ivan", &["interns"]), &f);
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(
        d.policies,
        ["big-delete", "big-delete-2", "no-audit-writes-for-interns"]
    );
    assert_eq!(
        d.reason.as_deref(),
        Some("interns may not touch the audit log")
    );

    // With a WHERE clause nothing forbids it.
    f.has_where = true;
    f.tables_written.remove("audit");
    let d = query(&e, &person("ivan", &["interns"]), &f);
    assert_eq!(d.effect, Effect::Allow);
    assert_eq!(d.policies, ["permit-all"]);
    assert_eq!(d.reason, None);
}

#[test]
fn reason_defaults_to_policy_id() {
    let e = engine(&[
        ("a.cedar", PERMIT_ALL),
        (
            "f.cedar",
            "forbid (principal, action == Gatehouse::Action::\"query\", resource) when { context.kind == \"ddl\" };",
        ),
    ]);
    let d = query(&e, &person("a", &[]), &facts(StatementKind::Ddl));
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.reason.as_deref(), Some("f.cedar:0"));
}

#[test]
fn read_only_comes_from_a_determining_permit() {
    let e = engine(&[(
        "a.cedar",
        r#"
@id("everyone")
permit (principal, action == Gatehouse::Action::"connect", resource)
when { !resource.tags.contains("reporting") };

@id("reporting-read-only")
@read_only
permit (principal, action == Gatehouse::Action::"connect", resource)
when { resource.tags.contains("reporting") };

@id("analysts-read-only")
@read_only("true")
permit (principal in Gatehouse::Group::"analysts", action == Gatehouse::Action::"connect", resource);
"#,
    )]);
    let alice = person("alice", &["eng"]);
    let d = e.decide_connect(&alice, &target("oltp", "prod", &[]), "10.0.0.1");
    assert_eq!((d.effect, d.read_only), (Effect::Allow, false));
    assert_eq!(d.policies, ["everyone"]);

    let d = e.decide_connect(
        &alice,
        &target("warehouse", "prod", &["reporting"]),
        "10.0.0.1",
    );
    assert_eq!((d.effect, d.read_only), (Effect::Allow, true));
    assert_eq!(d.policies, ["reporting-read-only"]);

    // Any determining permit with @read_only makes the session read-only,
    // even alongside a plain one.
    let ann = person("ann", &["analysts"]);
    let d = e.decide_connect(&ann, &target("oltp", "prod", &[]), "10.0.0.1");
    assert_eq!((d.effect, d.read_only), (Effect::Allow, true));
    assert_eq!(d.policies, ["everyone", "analysts-read-only"]);

    // Denials are never read-only.
    let e = engine(&[(
        "a.cedar",
        "@read_only\npermit (principal in Gatehouse::Group::\"x\", action, resource);",
    )]);
    let d = e.decide_connect(&alice, &target("oltp", "prod", &[]), "10.0.0.1");
    assert_eq!((d.effect, d.read_only), (Effect::Deny, false));
}

const DELEGATION: &str = r#"
@id("people-connect")
permit (principal is Gatehouse::User, action == Gatehouse::Action::"connect", resource);

@id("oncall-agents")
@reason("only agents acting for someone on call")
permit (principal is Gatehouse::Agent, action, resource)
when { principal has acting_for && principal.acting_for in Gatehouse::Group::"oncall" };
"#;

#[test]
fn delegation_agent_acting_for_oncall_member() {
    let e = engine(&[("d.cedar", DELEGATION)]);
    let t = target("db", "prod", &["prod"]);
    let select = facts(StatementKind::Select);

    let mut for_oncall = person("alice", &["oncall", "eng"]);
    for_oncall.delegation = vec!["copilot".into(), "ide".into()];
    let s = e.session(&for_oncall, &t, "10.0.0.1:40000");
    assert_eq!(s.principal_uid(), r#"Gatehouse::Agent::"copilot""#);
    assert_eq!(s.source_ip(), "10.0.0.1");
    let d = e.decide_statement(&s, &select, true, false);
    assert_eq!(d.effect, Effect::Allow, "{d:?}");
    assert_eq!(d.policies, ["oncall-agents"]);
    assert_eq!(e.decide_connect_in(&s).effect, Effect::Allow);

    // The same agent acting for someone not on call.
    let mut for_bob = person("bob", &["eng"]);
    for_bob.delegation = vec!["copilot".into()];
    let d = e.decide_query(&for_bob, &t, &select, true, false, "10.0.0.1");
    assert_eq!(d.effect, Effect::Deny);

    // An agent's own token in group oncall acts for nobody.
    let mut own = person("copilot", &["oncall"]);
    own.is_agent = true;
    let d = e.decide_query(&own, &t, &select, true, false, "10.0.0.1");
    assert_eq!(d.effect, Effect::Deny);

    // Alice herself is a User: connect yes, query no (not an agent).
    let alice = person("alice", &["oncall"]);
    assert_eq!(
        e.decide_connect(&alice, &t, "10.0.0.1").effect,
        Effect::Allow
    );
    assert_eq!(
        e.decide_query(&alice, &t, &select, true, false, "10.0.0.1")
            .effect,
        Effect::Deny
    );
}

#[test]
fn source_ip_and_hour_are_in_the_context() {
    let e = engine(&[(
        "a.cedar",
        r#"
@id("office-hours-from-the-vpn")
permit (principal, action, resource)
when { context.source_ip.isInRange(ip("10.0.0.0/8")) && context.hour >= 8 && context.hour < 18 };
"#,
    )]);
    let p = person("a", &[]);
    let t = target("db", "dev", &[]);
    let at = |ip: &str, hour: u8| {
        let s = e.session(&p, &t, ip).at_hour(hour);
        (
            e.decide_connect_in(&s).effect,
            e.decide_statement(&s, &facts(StatementKind::Select), true, false)
                .effect,
        )
    };
    assert_eq!(at("10.1.2.3", 9), (Effect::Allow, Effect::Allow));
    assert_eq!(at("10.1.2.3:5555", 17), (Effect::Allow, Effect::Allow));
    assert_eq!(at("10.1.2.3", 18), (Effect::Deny, Effect::Deny));
    assert_eq!(at("192.168.1.1", 9), (Effect::Deny, Effect::Deny));
    assert_eq!(at("not an address", 9), (Effect::Deny, Effect::Deny));
    assert_eq!(at("::1", 9), (Effect::Deny, Effect::Deny));
}

#[test]
fn a_forbid_that_fails_to_evaluate_denies() {
    let e = engine(&[
        ("a.cedar", PERMIT_ALL),
        (
            "overflow.cedar",
            "@id(\"overflows\")\nforbid (principal, action, resource) when { context.hour + 9223372036854775807 < 0 };",
        ),
    ]);
    let p = person("a", &[]);
    let t = target("db", "dev", &[]);
    // Hour 0: no overflow, the forbid is simply false.
    let s = e.session(&p, &t, "10.0.0.1").at_hour(0);
    assert_eq!(e.decide_connect_in(&s).effect, Effect::Allow);
    // Hour 1: evaluation overflows; Cedar would skip the forbid and allow.
    let s = s.at_hour(1);
    let d = e.decide_connect_in(&s);
    assert_eq!(d.effect, Effect::Deny, "{d:?}");
    assert_eq!(d.policies, ["overflows"]);
    assert!(d.reason.unwrap().contains("could not be evaluated"));
}

#[test]
fn a_command_stands_only_if_every_statement_does() {
    let e = Engine::new(&Bundle::defaults()).unwrap();
    let t = target("db", "dev", &[]);
    let mut agent = person("bot", &[]);
    agent.is_agent = true;
    let s = e.session(&agent, &t, "10.0.0.1");

    let select = facts(StatementKind::Select);
    let mut delete_all = facts(StatementKind::Delete);
    delete_all.has_where = false;
    delete_all.writes = true;
    let c = |statements: Vec<StatementFacts>| Classification {
        statements,
        parsed: true,
    };

    let d = e.decide_classification(&s, &c(vec![select.clone(), select.clone()]));
    assert_eq!(d.effect, Effect::Allow);
    let d = e.decide_classification(&s, &c(vec![select.clone(), delete_all.clone()]));
    assert_eq!(d.effect, Effect::Deny);
    assert!(d.policies.contains(&"agents-read-only".to_string()));

    // A person: the unbounded delete needs approval, a later DDL on prod is denied.
    let alice = person("alice", &[]);
    let prod = target("db", "prod", &["prod"]);
    let s = e.session(&alice, &prod, "10.0.0.1");
    let d = e.decide_classification(&s, &c(vec![select.clone(), delete_all.clone()]));
    assert_eq!(d.effect, Effect::ApprovalRequired);
    let ddl = facts(StatementKind::Ddl);
    let d = e.decide_classification(&s, &c(vec![delete_all.clone(), ddl, select.clone()]));
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.policies, ["prod-no-ddl"]);

    // Multi-statement strings are seen as such by policies.
    let only_single = engine(&[(
        "a.cedar",
        "permit (principal, action, resource) when { context has multi_statement && !context.multi_statement };\npermit (principal, action == Gatehouse::Action::\"connect\", resource);",
    )]);
    let s = only_single.session(&alice, &t, "10.0.0.1");
    assert_eq!(
        only_single
            .decide_classification(&s, &c(vec![select.clone()]))
            .effect,
        Effect::Allow
    );
    assert_eq!(
        only_single
            .decide_classification(&s, &c(vec![select.clone(), select.clone()]))
            .effect,
        Effect::Deny
    );

    // Unparsed text is one `other` statement with parsed = false.
    let s = e.session(&agent, &t, "10.0.0.1");
    let unparsed = Classification {
        statements: vec![],
        parsed: false,
    };
    let d = e.decide_classification(&s, &unparsed);
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.policies, ["agents-read-only", "unparsed-denied"]);

    // An empty command runs nothing: allowed, even for an agent, with no
    // policy consulted.
    let d = e.decide_classification(&s, &c(vec![]));
    assert_eq!(d.effect, Effect::Allow);
    assert!(d.policies.is_empty());
}

#[test]
fn execute_is_decided_by_what_was_prepared() {
    let e = Engine::new(&Bundle::defaults()).unwrap();
    let t = target("db", "dev", &[]);
    let alice = person("alice", &[]);
    let s = e.session(&alice, &t, "10.0.0.1");
    let read =
        |sql: &str| gatehouse_policies::classify(sql, gatehouse_policies::Reading::default());

    // Prepared in the session: the prepared statement's facts, plus the
    // EXECUTE's own parameters'.
    let prepared = read("PREPARE p(text) AS SELECT $1").statements[0].clone();
    let lookup = |name: &str| (name == "p").then_some(&prepared);
    assert_eq!(
        e.decide_command(&s, &read("EXECUTE p('x')"), lookup).effect,
        Effect::Allow
    );
    let d = e.decide_command(
        &s,
        &read("EXECUTE p(pg_read_file('/etc/hostname'))"),
        lookup,
    );
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.policies, ["dangerous-functions-dba-only"]);

    // Prepared earlier in the same command.
    let d = e.decide_command(&s, &read("PREPARE q AS DELETE FROM t; EXECUTE q"), lookup);
    assert_eq!(d.effect, Effect::ApprovalRequired);

    // Never prepared: it cannot be known, so it is unparsed text.
    let d = e.decide_command(&s, &read("EXECUTE nobody_knows"), lookup);
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.policies, ["unparsed-denied"]);
    // And without a session's statements at all (explain, corpora).
    assert_eq!(
        e.decide_classification(&s, &read("EXECUTE p('x')")).effect,
        Effect::Deny
    );
}

#[test]
fn sessions_survive_a_reload() {
    let p = person("alice", &["eng"]);
    let t = target("db", "dev", &[]);
    let select = facts(StatementKind::Select);
    let old = engine(&[("a.cedar", PERMIT_ALL)]);
    let s = old.session(&p, &t, "10.0.0.1");
    assert_eq!(
        old.decide_statement(&s, &select, true, false).effect,
        Effect::Allow
    );

    // Same schema, new policies: the session is reused as is.
    let new = engine(&[(
        "a.cedar",
        "permit (principal, action, resource) unless { principal in Gatehouse::Group::\"eng\" };",
    )]);
    assert_eq!(
        new.decide_statement(&s, &select, true, false).effect,
        Effect::Deny
    );

    // A different schema: the session's entities are rebuilt for the call.
    let schema = SCHEMA.replace(
        "namespace Gatehouse {",
        "namespace Gatehouse {\n  entity Extra;",
    );
    let b = Bundle::new(
        "v2",
        vec![(
            "a.cedar".into(),
            "@id(\"eng\")\npermit (principal in Gatehouse::Group::\"eng\", action, resource);"
                .into(),
        )],
        schema,
    );
    let newer = Engine::new(&b).unwrap();
    let d = newer.decide_statement(&s, &select, true, false);
    assert_eq!(d.effect, Effect::Allow);
    assert_eq!(d.policies, ["eng"]);
}

#[test]
fn repeated_statements_reuse_the_decision() {
    let e = Engine::new(&Bundle::defaults()).unwrap();
    let mut agent = person("bot", &["agents"]);
    agent.is_agent = true;
    let s = e
        .session(&agent, &target("db", "prod", &["prod"]), "10.0.0.1")
        .at_hour(10);
    let mut insert = facts(StatementKind::Insert);
    insert.writes = true;
    let select = facts(StatementKind::Select);
    for _ in 0..3 {
        assert_eq!(
            e.decide_statement(&s, &select, true, false).effect,
            Effect::Allow
        );
        let d = e.decide_statement(&s, &insert, true, false);
        assert_eq!(
            d,
            Decision {
                eval_micros: d.eval_micros,
                ..e.evaluate_statement(&s, &insert, true, false)
            }
        );
        assert_eq!(d.effect, Effect::Deny);
        // Only the facts differ: never confused.
        assert_eq!(
            e.decide_statement(&s, &select, false, false).effect,
            Effect::Deny
        );
        assert_eq!(
            e.decide_statement(&s, &select, true, true).effect,
            Effect::Allow
        );
    }
    // More distinct statements than the memo holds: still right.
    for i in 0..300 {
        let mut f = facts(if i % 2 == 0 {
            StatementKind::Select
        } else {
            StatementKind::Update
        });
        f.writes = i % 2 == 1;
        f.tables_read.insert(format!("t{i}"));
        let want = if i % 2 == 0 {
            Effect::Allow
        } else {
            Effect::Deny
        };
        assert_eq!(e.decide_statement(&s, &f, true, false).effect, want, "{i}");
        assert_eq!(
            e.decide_statement(&s, &f, true, false).effect,
            want,
            "{i} again"
        );
    }
    // A clone starts with an empty memo and decides the same.
    let s2 = s.clone();
    assert_eq!(
        e.decide_statement(&s2, &insert, true, false).effect,
        Effect::Deny
    );
}

#[test]
fn engine_is_shareable() {
    let e = std::sync::Arc::new(Engine::new(&Bundle::defaults()).unwrap());
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let e = e.clone();
            std::thread::spawn(move || {
                let s = e.session(
                    &person(&format!("u{i}"), &[]),
                    &target("db", "dev", &[]),
                    "",
                );
                e.decide_statement(&s, &facts(StatementKind::Select), true, false)
                    .effect
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Effect::Allow);
    }
}

// ---------------------------------------------------------------- bundles

#[test]
fn bundle_round_trips_as_json() {
    let dry = gatehouse_policies::DryRun {
        all_targets: false,
        targets: vec!["app".into()],
        expires_at: 1_900_000_000,
        set_by: "admin".into(),
    };
    let b = Bundle::from_dir(crate_dir().join("examples"))
        .unwrap()
        .with_dry_run(Some(dry.clone()));
    let json = serde_json::to_string(&b).unwrap();
    let back: Bundle = serde_json::from_str(&json).unwrap();
    assert_eq!(back, b);
    let e = Engine::new(&back).unwrap();
    assert_eq!(e.dry_run(), Some(&dry));
}

#[test]
fn bundle_dir_rules() {
    let dir = std::env::temp_dir().join(format!("gatehouse-bundle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("team/.hidden")).unwrap();
    assert!(matches!(
        Bundle::from_dir(&dir),
        Err(BundleError::NoPolicies { .. })
    ));

    std::fs::write(dir.join("team/p.cedar"), PERMIT_ALL).unwrap();
    std::fs::write(dir.join("team/.hidden/x.cedar"), "not cedar").unwrap();
    std::fs::write(dir.join("notes.md"), "ignored").unwrap();
    let b = Bundle::from_dir(&dir).unwrap();
    assert_eq!(b.files.len(), 1);
    assert_eq!(b.files[0].0, "team/p.cedar");
    assert_eq!(b.schema, SCHEMA);

    // Its own schema at the top replaces the built-in one.
    let own = SCHEMA.replace("entity Group;", "entity Group;\n  entity Team;");
    std::fs::write(dir.join("schema.cedarschema"), &own).unwrap();
    assert_eq!(Bundle::from_dir(&dir).unwrap().schema, own);

    // A schema anywhere else is a mistake.
    std::fs::write(dir.join("team/schema.cedarschema"), &own).unwrap();
    assert!(matches!(
        Bundle::from_dir(&dir),
        Err(BundleError::StraySchema { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corpus_errors_are_located() {
    let e = Engine::new(&Bundle::defaults()).unwrap();
    let text = "[principals.a]\nsubject = \"a\"\n\n[[case]]\nname = \"x\"\nprincipal = \"b\"\ntarget = { environment = \"dev\" }\nfacts = { kind = \"select\" }\nexpect = \"allow\"\n";
    match run_corpus(&e, "t.toml", text) {
        Err(TestError::Corpus {
            file,
            line,
            message,
            ..
        }) => {
            assert_eq!(file, "t.toml");
            assert_eq!(line, 4, "{message}");
            assert!(message.contains("no principal `b`"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let text = "[[case]]\nname = \"x\"\nprincipal = \"a\"\ntarget = \"t\"\nfacts = { kind = \"selcet\" }\nexpect = \"allow\"\n";
    let text =
        format!("[principals.a]\nsubject = \"a\"\n[targets.t]\nenvironment = \"dev\"\n{text}");
    let err = run_corpus(&e, "t.toml", &text).unwrap_err().to_string();
    assert!(
        err.contains("t.toml:5:") && err.contains("`selcet`"),
        "{err}"
    );

    let err = run_corpus(&e, "t.toml", "[[case]]\nnam = 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("t.toml:"), "{err}");
}

#[test]
fn failing_cases_are_reported() {
    let e = Engine::new(&Bundle::defaults()).unwrap();
    let text = "[[case]]\nname = \"wrong on purpose\"\nprincipal = { subject = \"a\", is_agent = true }\ntarget = { name = \"t\", environment = \"dev\" }\nfacts = { kind = \"insert\" }\nexpect = \"allow\"\n";
    let results = run_corpus(&e, "t.toml", text).unwrap();
    let failure = results[0].failure.as_deref().unwrap();
    assert!(failure.starts_with("expected allow, got deny"), "{failure}");
    assert!(failure.contains("agents-read-only"), "{failure}");
}
