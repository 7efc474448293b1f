//! Masking throughput on realistic rows, in bytes of input per second.
//!
//! `cargo bench -p gatehouse-masking --bench mask`
//!
//! - `no_hits`: the text columns of rows of an orders table (names,
//!   addresses, comments, amounts, timestamps, ids) with every detector on
//!   and nothing to mask: the cost of looking.
//! - `all_hits`: rows whose every text value holds something to mask
//!   (e-mail, phone, card, SSN, IBAN, IP, JWT, key), redacted.
//! - `json_with_rules`: JSON documents walked field by field because
//!   column patterns are configured.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatehouse_masking::{ColumnRule, Detectors, Masker, Pattern, Rules, Stats, Style};

fn rows(n: usize, f: impl Fn(usize) -> Vec<String>) -> Vec<Vec<String>> {
    (0..n).map(f).collect()
}

fn no_hit_row(i: usize) -> Vec<String> {
    vec![
        format!("Order {i} for customer account {}", i * 7 % 1000),
        format!(
            "{} Market Street, Suite {}, San Francisco CA",
            100 + i % 900,
            i % 50
        ),
        "Please leave the parcel at the front desk, thanks! Fragile items inside.".into(),
        format!("{}.{:02}", i % 5000, i % 100),
        format!(
            "2026-11-{:02} 12:{:02}:{:02}+00",
            1 + i % 28,
            i % 60,
            (i * 7) % 60
        ),
        format!("3f2504e0-4f89-11d3-9a0c-{:012x}", i),
        "shipped".into(),
    ]
}

fn all_hit_row(i: usize) -> Vec<String> {
    vec![
        format!("customer{i}@example.com"),
        format!("+1 (415) 555-{:04}", i % 10000),
        "4111 1111 1111 1111".into(),
        "123-45-6789".into(),
        "DE89370400440532013000".into(),
        format!("10.{}.{}.{}", i % 256, (i / 256) % 256, 1 + i % 250),
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLWhlcmU".into(),
        "AKIAIOSFODNN7EXAMPLE".into(),
    ]
}

fn json_row(i: usize) -> Vec<String> {
    vec![format!(
        r#"{{"id":{i},"profile":{{"name":"Customer {i}","email":"c{i}@example.com","password":"s3cret{i}"}},"tags":["vip","eu"],"last_ip":"192.168.1.{}"}}"#,
        i % 250
    )]
}

fn bench(c: &mut Criterion, name: &str, rules: Rules, data: Vec<Vec<String>>) {
    let bytes: usize = data.iter().flatten().map(String::len).sum();
    let mut masker = Masker::new(rules, b"benchmark key");
    let mut group = c.benchmark_group("mask");
    group.throughput(Throughput::Bytes(bytes as u64));
    let mut out = Vec::with_capacity(4096);
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut stats = Stats::default();
            for row in &data {
                for value in row {
                    black_box(masker.mask(value.as_bytes(), None, &mut out, &mut stats));
                }
            }
            stats
        })
    });
    group.finish();
}

fn masking(c: &mut Criterion) {
    bench(c, "no_hits", Rules::default(), rows(1000, no_hit_row));
    bench(c, "all_hits", Rules::default(), rows(1000, all_hit_row));
    let with_rules = Rules {
        columns: vec![ColumnRule {
            pattern: Pattern::new("*password*"),
            style: Style::Redact,
        }],
        detectors: Detectors::all(),
        content_style: Style::Pseudonym,
    };
    bench(c, "json_with_rules", with_rules, rows(1000, json_row));
}

criterion_group!(benches, masking);
criterion_main!(benches);
