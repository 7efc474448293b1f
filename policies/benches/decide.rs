//! Cost of a decision on the hot path, with the shipped examples bundle.
//!
//! `cargo bench -p gatehouse-policies --bench decide`
//!
//! - `evaluate_statement`: one SELECT in an open session (entities built
//!   once per session), policies evaluated: a statement seen for the first
//!   time in the session.
//! - `decide_statement`: the same statement again (the session's memo).
//! - `decide_query`: building the session's entities, then evaluating.
//! - `session`: building a session's entities (once per connection).
//! - `scan/{pgbench,join}`: PostgreSQL's scanner alone (what finds a text's
//!   shape, see `Classifier`); `classifier/pgbench_new_literals`: a
//!   session's cache given pgbench's statement with a new literal each time.
//! - `parse/{pgbench,join}`: PostgreSQL's parser and the decode of its tree;
//!   `classify/{pgbench,join}`: that plus the walk, for
//!   pgbench's `-S` statement and a two-table join.
//! - `classify_and_decide/{pgbench,join}`: SQL text to decision, the
//!   decision from the session's memo (a statement the session decided
//!   before, with new literals); `classify_and_evaluate/…`: the same with
//!   the policies evaluated (a statement seen for the first time). The
//!   worker caches classifications by text, so a repeated text costs only
//!   `decide_statement`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_policies::{
    Bundle, Classifier, Engine, Principal, Reading, StatementFacts, StatementKind, TargetInfo,
    classify,
};

/// What `pgbench -S` sends, with a literal of its own each time.
const PGBENCH: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 63917;";

const JOIN: &str = "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id \
                   WHERE o.created_at > now() - interval '1 day' ORDER BY o.total DESC LIMIT 50";

fn setup() -> (Engine, Principal, TargetInfo, StatementFacts) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let engine = Engine::new(&Bundle::from_dir(dir).expect("examples bundle")).expect("valid");
    // An agent: the agents-read-only forbid has to be evaluated in full.
    let principal = Principal {
        subject: "agent-reporter".into(),
        username: "reporter".into(),
        groups: vec!["agents".into(), "analytics".into()],
        delegation: Vec::new(),
        is_agent: true,
    };
    let target = TargetInfo {
        name: "orders-prod".into(),
        kind: "postgres".into(),
        environment: "prod".into(),
        tags: vec!["prod".into(), "pii".into()],
    };
    let mut facts = StatementFacts::new(StatementKind::Select);
    facts.tables_read = ["orders".into(), "customers".into()].into();
    facts.functions = ["now".into()].into();
    (engine, principal, target, facts)
}

fn bench(c: &mut Criterion) {
    let (engine, principal, target, facts) = setup();
    let session = engine.session(&principal, &target, "10.0.0.7:52114");
    let d = engine.decide_statement(&session, &facts, true, false);
    assert_eq!(d.effect, gatehouse_policies::Effect::Allow, "{d:?}");

    c.bench_function("evaluate_statement", |b| {
        b.iter(|| engine.evaluate_statement(black_box(&session), black_box(&facts), true, false))
    });
    c.bench_function("decide_statement", |b| {
        b.iter(|| engine.decide_statement(black_box(&session), black_box(&facts), true, false))
    });
    c.bench_function("decide_query", |b| {
        b.iter(|| {
            engine.decide_query(
                black_box(&principal),
                black_box(&target),
                black_box(&facts),
                true,
                false,
                "10.0.0.7:52114",
            )
        })
    });
    c.bench_function("session", |b| {
        b.iter(|| engine.session(black_box(&principal), black_box(&target), "10.0.0.7"))
    });
    for (name, sql) in [("pgbench", PGBENCH), ("join", JOIN)] {
        c.bench_function(&format!("scan/{name}"), |b| {
            b.iter(|| pg_query::scan(black_box(sql)).map(|t| t.tokens.len()))
        });
        // PostgreSQL's parser and the decode of its tree, without the walk.
        c.bench_function(&format!("parse/{name}"), |b| {
            b.iter(|| pg_query::parse(black_box(sql), 0).map(|t| t.protobuf.stmts.len()))
        });
        c.bench_function(&format!("classify/{name}"), |b| {
            b.iter(|| classify(black_box(sql), Reading::default()))
        });
        c.bench_function(&format!("classify_and_decide/{name}"), |b| {
            b.iter(|| {
                let classification = classify(black_box(sql), Reading::default());
                engine.decide_classification(&session, &classification)
            })
        });
        c.bench_function(&format!("classify_and_evaluate/{name}"), |b| {
            b.iter(|| {
                let classification = classify(black_box(sql), Reading::default());
                for facts in &classification.statements {
                    black_box(engine.evaluate_statement(&session, facts, true, false));
                }
            })
        });
    }
}

/// A session's cache ([`Classifier`]) given pgbench's statement with a new
/// literal each time: found by its shape, not parsed again.
fn cached(c: &mut Criterion) {
    let mut cache = Classifier::default();
    let mut aid = 0u64;
    c.bench_function("classifier/pgbench_new_literals", |b| {
        b.iter(|| {
            aid += 1;
            let text = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
            cache.classify(black_box(&text), Reading::default())
        })
    });
}

criterion_group!(benches, bench, cached);
criterion_main!(benches);
