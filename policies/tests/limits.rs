//! Bundles Cedar cannot safely take are refused before it parses them:
//! nesting, operator chains, schema declarations and sizes
//! (`Bundle::check_limits`, run first by `Engine::new`).
//!
//! Every shape here overflowed a 2 MiB thread stack in a debug build
//! (aborting the process) at the size used, before the limits. Each test
//! runs on such a thread, so an overflow fails the test run; a bundle at
//! the limits is built, decided with and dropped on one.

use gatehouse_policies::{Bundle, BundleError, Effect, Engine, Principal, SCHEMA, TargetInfo};

const SMALL_STACK: usize = 2 << 20;

/// Runs `f` on a thread with a 2 MiB stack, as tokio's worker threads have.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("no panic")
}

fn bundle(files: Vec<(String, String)>, schema: &str) -> Bundle {
    Bundle::new("test", files, schema)
}

fn policy_bundle(text: String) -> Bundle {
    bundle(vec![("deep/p.cedar".into(), text)], SCHEMA)
}

/// A `when` condition on line 3 of `deep/p.cedar`.
fn when(expr: &str) -> String {
    format!("// a policy\n@id(\"deep\")\npermit (principal, action, resource) when {{ {expr} }};\n")
}

/// The error `Engine::new` gives, built on a small stack.
fn refusal(b: Bundle) -> BundleError {
    on_small_stack(move || match Engine::new(&b) {
        Ok(_) => panic!("bundle unexpectedly accepted"),
        Err(e) => e,
    })
}

/// Refused by the limits (not by Cedar), with `needle` in the message, at
/// `file`:`line`.
fn refused_by_limit(b: Bundle, file: &str, line: usize, needle: &str) {
    let e = refusal(b);
    let problems = e.problems();
    assert_eq!(problems.len(), 1, "{e}");
    let p = &problems[0];
    assert_eq!(p.file, file, "{e}");
    assert_eq!(p.line, line, "{e}");
    assert!(p.message.contains(needle), "{needle:?} not in {e}");
    assert!(e.to_string().contains(&format!("{file}:{line}:")), "{e}");
}

fn nesting_refused(expr: String) {
    refused_by_limit(
        policy_bundle(when(&expr)),
        "deep/p.cedar",
        3,
        "nested more than 32 levels deep",
    );
}

fn operators_refused(expr: String) {
    refused_by_limit(
        policy_bundle(when(&expr)),
        "deep/p.cedar",
        3,
        "more than 1000 operators",
    );
}

#[test]
fn deep_brackets_are_refused() {
    // The attack: about 150 nested parentheses in a 351-byte policy.
    nesting_refused(format!("{}true{}", "(".repeat(150), ")".repeat(150)));
    nesting_refused(format!("{}{} == []", "[".repeat(200), "]".repeat(200)));
    nesting_refused(format!(
        "{}1{} == {{}}",
        "{a: ".repeat(200),
        "}".repeat(200)
    ));
    // Mixed, and long ones.
    nesting_refused(format!("{}true{}", "[{a: (".repeat(40), ")}]".repeat(40)));
    nesting_refused(format!("{}true{}", "(".repeat(20_000), ")".repeat(20_000)));
    // Unbalanced: never closed.
    nesting_refused("(".repeat(5_000));
}

#[test]
fn deep_if_chains_are_refused() {
    nesting_refused(format!("{}true", "if true then true else ".repeat(1000)));
    nesting_refused(format!(
        "{}true{}",
        "if ".repeat(1000),
        " then true else true".repeat(1000)
    ));
    nesting_refused(format!(
        "{}true{}",
        "if true then ".repeat(1000),
        " else true".repeat(1000)
    ));
    // `if`s inside brackets add to the brackets.
    nesting_refused(format!(
        "{}true{}",
        "(if true then ".repeat(17),
        " else true)".repeat(17)
    ));
}

#[test]
fn long_operator_chains_are_refused() {
    operators_refused(format!("{}1 == 1", "1 + ".repeat(30_000)));
    operators_refused(format!("{}1 == 1", "1 * ".repeat(30_000)));
    operators_refused(format!("context{} == 1", ".a".repeat(30_000)));
    operators_refused(format!("context{} == 1", "[\"a\"]".repeat(30_000)));
    operators_refused(format!("ip(\"1.2.3.4\"){}", ".isIpv4()".repeat(10_000)));
    operators_refused(format!("context has a{}", ".a".repeat(30_000)));
    operators_refused(format!("{}true", "true && ".repeat(30_000)));
    operators_refused(format!("{}true", "true || ".repeat(30_000)));
}

#[test]
fn unary_chains_are_refused() {
    // Cedar refuses more than four in a row itself; long ones are refused
    // before it parses them.
    for expr in [
        format!("{}true", "!".repeat(30_000)),
        format!("{}true", "! ".repeat(30_000)),
        format!("{}1 == 1", "- ".repeat(30_000)),
        format!("{}true", "!".repeat(5)),
    ] {
        let e = refusal(policy_bundle(when(&expr)));
        assert!(!e.problems().is_empty(), "{e}");
    }
}

#[test]
fn deep_schemas_are_refused() {
    let schema_refused = |schema: String, needle: &str| {
        let b = bundle(
            vec![(
                "p.cedar".into(),
                "permit (principal, action, resource);".into(),
            )],
            &schema,
        );
        refused_by_limit(b, "schema.cedarschema", 1, needle);
    };
    schema_refused(
        format!("type T = {}Long{};", "{a: ".repeat(150), "}".repeat(150)),
        "nested more than 32 levels deep",
    );
    schema_refused(
        format!("type T = {}Long{};", "Set<".repeat(300), ">".repeat(300)),
        "nested more than 32 levels deep",
    );
    // Chains of declarations, each referring to the next.
    let entities: String = (0..3000)
        .map(|i| format!("entity E{i} in [E{}]; ", i + 1))
        .collect();
    schema_refused(entities, "more than 512 declarations");
    let aliases: String = (0..10_000)
        .map(|i| format!("type T{i} = {{a: T{}}}; ", i + 1))
        .collect();
    schema_refused(aliases, "more than 512 declarations");
}

/// `when { (((…(cond && cond && …)…))) }`: `parens` parentheses inside
/// the braces, `terms` conditions of 3 operators each (`.`, `>=`, `&&`).
fn connect_policy(parens: usize, terms: usize) -> String {
    let cond = vec!["context.hour >= 0"; terms].join(" && ");
    format!(
        "// a policy\n@id(\"deep\")\npermit (principal, action == Gatehouse::Action::\"connect\", resource)\n  when {{ {}{cond}{} }};\n",
        "(".repeat(parens),
        ")".repeat(parens)
    )
}

#[test]
fn a_bundle_at_the_limits_is_built_decided_and_dropped_on_a_small_stack() {
    // 1 (braces) + 31 = 32 levels; 1 (`==` in the scope) + 333 * 3 - 1 =
    // 999 operators, and a sibling `if` chain at the same depth.
    let at_limit = connect_policy(31, 333);
    let ifs = format!(
        "permit (principal, action == Gatehouse::Action::\"connect\", resource)\n  when {{ {}context.hour >= 0{} }};\n",
        "(if true then ".repeat(15),
        " else false)".repeat(15)
    );
    let b = bundle(
        vec![("a.cedar".into(), at_limit), ("b.cedar".into(), ifs)],
        SCHEMA,
    );
    b.check_limits().expect("within the limits");
    let effect = on_small_stack(move || {
        let engine = Engine::new(&b).unwrap_or_else(|e| panic!("{e}"));
        let who = Principal {
            subject: "alice".into(),
            username: "alice".into(),
            groups: vec![],
            delegation: vec![],
            is_agent: false,
        };
        let target = TargetInfo {
            name: "db".into(),
            kind: "postgres".into(),
            environment: "dev".into(),
            tags: vec![],
        };
        let d = engine.decide_connect(&who, &target, "10.0.0.1");
        drop(engine);
        d.effect
    });
    assert_eq!(effect, Effect::Allow);

    // One more of either is refused.
    refused_by_limit(
        policy_bundle(connect_policy(32, 333)),
        "deep/p.cedar",
        4,
        "nested more than 32 levels deep",
    );
    refused_by_limit(
        policy_bundle(connect_policy(31, 334)),
        "deep/p.cedar",
        4,
        "more than 1000 operators",
    );
}

#[test]
fn mixed_nesting_at_the_limit_does_not_overflow_a_small_stack() {
    // 1 (`when` braces) + 7 * 4 + 3 = 32 levels of every kind.
    let expr = format!(
        "{}(({{a: context.hour >= 0}}.a)){}",
        "[{a: (if true then ".repeat(7),
        " else false)}]".repeat(7)
    );
    let b = policy_bundle(when(&expr));
    b.check_limits().unwrap_or_else(|e| panic!("{e}"));
    // Cedar may find type errors; what matters is that it returns.
    let built = on_small_stack(move || Engine::new(&b).map(drop));
    if let Err(e) = built {
        assert!(!e.to_string().contains("levels deep"), "{e}");
    }
}

#[test]
fn operators_are_counted_per_policy() {
    // Many policies of 999 operators each, in one file.
    let text = connect_policy(1, 333).repeat(5);
    let b = policy_bundle(text);
    b.check_limits().expect("each policy is within the limit");
}

#[test]
fn brackets_in_strings_and_comments_do_not_count() {
    let text = format!(
        "// {}\n@id(\"x{}\")\n@reason(\"a \\\" {}\")\npermit (principal, action, resource)\n  when {{ context.hour == 1 || \"{}\" == \"\\\\\" }};\n",
        "((((".repeat(100),
        "[[[[".repeat(100),
        "{{{{ if if if ".repeat(100),
        "&& || . ".repeat(2000)
    );
    let b = policy_bundle(text);
    b.check_limits().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_real_world_policy_with_moderate_nesting_passes() {
    let text = r#"
// Writes to production outside business hours, by anyone but a DBA,
// unless nothing is written (a comment with ( [ { if in it).
@id("prod-writes-business-hours")
@reason("writes to prod outside 08:00-18:00 UTC need a DBA")
forbid (
  principal,
  action == Gatehouse::Action::"query",
  resource
)
when {
  resource.environment == "prod" &&
  context.writes &&
  (context.hour < 8 || context.hour >= 18) &&
  !(principal in Gatehouse::Group::"dba") &&
  (if principal is Gatehouse::Agent
     then (principal has acting_for &&
           !(principal.acting_for in Gatehouse::Group::"dba"))
     else ["update", "delete", "insert", "merge"].contains(context.kind)) &&
  ({ kinds: ["ddl", "dcl"], tags: resource.tags }.tags.contains("pci") ||
   !({ kinds: ["ddl", "dcl"] }.kinds.contains(context.kind)))
}
unless { context.tables_written.isEmpty() && context.functions.isEmpty() };

@id("everyone-connects")
permit (principal, action == Gatehouse::Action::"connect", resource)
when { context.source_ip.isInRange(ip("10.0.0.0/8")) || context.hour >= 0 };
"#;
    let b = policy_bundle(text.to_string());
    let engine = on_small_stack(move || Engine::new(&b).map(|e| e.policy_ids().len()));
    assert_eq!(engine.unwrap_or_else(|e| panic!("{e}")), 2);
    // The shipped defaults pass too.
    Engine::new(&Bundle::defaults()).expect("defaults");
}

#[test]
fn oversized_bundles_are_refused() {
    let filler = |bytes: usize| {
        let mut s = "permit (principal, action, resource);\n".to_string();
        while s.len() < bytes {
            s.push_str("// filler filler filler filler filler filler filler\n");
        }
        s
    };
    // One file over 512 KiB.
    let b = bundle(
        vec![
            ("big.cedar".into(), filler(600 << 10)),
            ("small.cedar".into(), filler(10)),
        ],
        SCHEMA,
    );
    refused_by_limit(b, "big.cedar", 1, "at most 524288");
    // Files within the limit, the bundle over 1 MiB.
    let b = bundle(
        (0..3)
            .map(|i| (format!("f{i}.cedar"), filler(400 << 10)))
            .collect(),
        SCHEMA,
    );
    refused_by_limit(b, "(bundle)", 1, "at most 1048576");
    // A schema over 512 KiB.
    let schema = format!("{SCHEMA}\n{}", filler(600 << 10));
    let b = bundle(vec![("p.cedar".into(), filler(10))], &schema);
    refused_by_limit(b, "schema.cedarschema", 1, "at most 524288");
    // Too many files.
    let b = bundle(
        (0..1025)
            .map(|i| (format!("f{i}.cedar"), filler(10)))
            .collect(),
        SCHEMA,
    );
    refused_by_limit(b, "(bundle)", 1, "at most 1024");
    // Just under: accepted.
    let b = bundle(
        (0..2)
            .map(|i| (format!("f{i}.cedar"), filler(500 << 10)))
            .collect(),
        SCHEMA,
    );
    b.check_limits().unwrap_or_else(|e| panic!("{e}"));
}
