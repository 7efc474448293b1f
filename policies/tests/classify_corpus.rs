//! The classification corpus: SQL texts with the facts expected of each of
//! their statements, in `tests/corpus/classify.txt` (its header describes
//! the format). Every case is checked and every mismatch reported.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use gatehouse_policies::{
    Classification, Deallocates, Reading, StatementFacts, StatementKind, classify,
};

const CORPUS: &str = include_str!("corpus/classify.txt");

/// At least this many statements (an unparsed text counts as one).
const MIN_STATEMENTS: usize = 150;

#[derive(Debug)]
struct Case {
    line: usize,
    title: String,
    sql: String,
    expected: Expected,
}

#[derive(Debug)]
enum Expected {
    Unparsed,
    Statements(Vec<StatementFacts>),
}

fn kind_named(name: &str) -> Option<StatementKind> {
    StatementKind::ALL.into_iter().find(|k| k.as_str() == name)
}

fn set(list: &str) -> BTreeSet<String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One `=> kind key=value flag …` line.
fn parse_expectation(text: &str) -> Result<StatementFacts, String> {
    let mut words = text.split_whitespace();
    let kind = words.next().ok_or("no kind")?;
    let kind = kind_named(kind).ok_or_else(|| format!("unknown kind {kind:?}"))?;
    let mut facts = StatementFacts::new(kind);
    for word in words {
        match word.split_once('=') {
            Some(("read", v)) => facts.tables_read = set(v),
            Some(("written", v)) => facts.tables_written = set(v),
            Some(("functions", v)) => facts.functions = set(v),
            Some(("prepares", v)) => facts.prepares = Some(v.to_owned()),
            Some(("executes", v)) => facts.executes = Some(v.to_owned()),
            Some(("deallocates", "*")) => facts.deallocates = Some(Deallocates::All),
            Some(("deallocates", v)) => facts.deallocates = Some(Deallocates::One(v.to_owned())),
            Some((key, _)) => return Err(format!("unknown key {key:?}")),
            None => match word {
                "writes" => facts.writes = true,
                "nowhere" => facts.has_where = false,
                "program" => facts.runs_program = true,
                "stdin" => facts.copies_from_client = true,
                "dynamic" => facts.dynamic = true,
                "outside" => facts.reaches_outside = true,
                "rw" => facts.disables_read_only = true,
                "parsing" => facts.changes_parsing = true,
                _ => return Err(format!("unknown flag {word:?}")),
            },
        }
    }
    Ok(facts)
}

fn parse_corpus(text: &str) -> Result<Vec<Case>, String> {
    let mut cases = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        if line.trim().is_empty() || (line.starts_with('#') && !line.starts_with("## ")) {
            continue;
        }
        let title = line
            .strip_prefix("## ")
            .ok_or_else(|| format!("line {}: expected a \"## title\" line", i + 1))?
            .trim()
            .to_owned();
        let mut sql_lines = Vec::new();
        while let Some((_, l)) = lines.next_if(|(_, l)| !l.starts_with("=>")) {
            sql_lines.push(l);
        }
        let mut statements = Vec::new();
        let mut unparsed = false;
        let mut nothing = false;
        while let Some((j, l)) = lines.next_if(|(_, l)| l.starts_with("=>")) {
            let body = l.trim_start_matches("=>").trim();
            match body {
                "unparsed" => unparsed = true,
                "nothing" => nothing = true,
                _ => statements
                    .push(parse_expectation(body).map_err(|e| format!("line {}: {e}", j + 1))?),
            }
        }
        let expected = match (unparsed, nothing, statements.is_empty()) {
            (true, false, true) => Expected::Unparsed,
            (false, true, true) => Expected::Statements(Vec::new()),
            (false, false, false) => Expected::Statements(statements),
            _ => return Err(format!("line {}: {title}: bad expectations", i + 1)),
        };
        cases.push(Case {
            line: i + 1,
            title,
            sql: sql_lines.join("\n"),
            expected,
        });
    }
    Ok(cases)
}

fn describe(f: &StatementFacts) -> String {
    let mut s = f.kind.as_str().to_owned();
    let list = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
    if !f.tables_read.is_empty() {
        let _ = write!(s, " read={}", list(&f.tables_read));
    }
    if !f.tables_written.is_empty() {
        let _ = write!(s, " written={}", list(&f.tables_written));
    }
    if !f.functions.is_empty() {
        let _ = write!(s, " functions={}", list(&f.functions));
    }
    if let Some(p) = &f.prepares {
        let _ = write!(s, " prepares={p}");
    }
    if let Some(e) = &f.executes {
        let _ = write!(s, " executes={e}");
    }
    match &f.deallocates {
        Some(Deallocates::One(name)) => {
            let _ = write!(s, " deallocates={name}");
        }
        Some(Deallocates::All) => s.push_str(" deallocates=*"),
        None => {}
    }
    for (on, flag) in [
        (f.writes, "writes"),
        (!f.has_where, "nowhere"),
        (f.runs_program, "program"),
        (f.copies_from_client, "stdin"),
        (f.dynamic, "dynamic"),
        (f.reaches_outside, "outside"),
        (f.disables_read_only, "rw"),
        (f.changes_parsing, "parsing"),
    ] {
        if on {
            s.push(' ');
            s.push_str(flag);
        }
    }
    s
}

fn describe_all(c: &Classification) -> String {
    if !c.parsed {
        return "unparsed".to_owned();
    }
    if c.statements.is_empty() {
        return "nothing".to_owned();
    }
    c.statements
        .iter()
        .map(describe)
        .collect::<Vec<_>>()
        .join("\n     ")
}

fn mismatch(case: &Case, got: &Classification) -> Option<String> {
    let ok = match &case.expected {
        Expected::Unparsed => !got.parsed && got.statements.is_empty(),
        // Outputs and stores (what masking follows) are tested with the
        // lineage.
        Expected::Statements(want) => {
            got.parsed
                && got.statements.len() == want.len()
                && got.statements.iter().zip(want).all(|(g, w)| {
                    StatementFacts {
                        outputs: w.outputs.clone(),
                        stores: w.stores.clone(),
                        mentions: w.mentions.clone(),
                        ..g.clone()
                    } == *w
                })
        }
    };
    if ok {
        return None;
    }
    let want = match &case.expected {
        Expected::Unparsed => "unparsed".to_owned(),
        Expected::Statements(want) if want.is_empty() => "nothing".to_owned(),
        Expected::Statements(want) => want
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join("\n     "),
    };
    Some(format!(
        "line {} ({}):\n  sql: {}\n  want {}\n  got  {}",
        case.line,
        case.title,
        case.sql.replace('\n', "\n       "),
        want,
        describe_all(got)
    ))
}

#[test]
fn corpus_classifies_as_expected() {
    let cases = parse_corpus(CORPUS).unwrap_or_else(|e| panic!("corpus: {e}"));
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| mismatch(case, &classify(&case.sql, Reading::default())))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases mismatch:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn corpus_is_large_and_covers_every_kind() {
    let cases = parse_corpus(CORPUS).unwrap_or_else(|e| panic!("corpus: {e}"));
    let statements: usize = cases
        .iter()
        .map(|c| match &c.expected {
            Expected::Unparsed => 1,
            Expected::Statements(s) => s.len(),
        })
        .sum();
    assert!(
        statements >= MIN_STATEMENTS,
        "corpus has {statements} statements, want at least {MIN_STATEMENTS}"
    );
    let kinds: BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| match &c.expected {
            Expected::Statements(s) => Some(s),
            Expected::Unparsed => None,
        })
        .flatten()
        .map(|f| f.kind.as_str())
        .collect();
    for kind in StatementKind::ALL {
        assert!(
            kinds.contains(kind.as_str()),
            "no case of kind {}",
            kind.as_str()
        );
    }
}

#[test]
fn titles_are_unique() {
    let cases = parse_corpus(CORPUS).unwrap_or_else(|e| panic!("corpus: {e}"));
    let mut seen = BTreeSet::new();
    for case in &cases {
        assert!(seen.insert(&case.title), "duplicate title {:?}", case.title);
    }
}
