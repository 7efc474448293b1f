//! Policy test corpora: requests with expected decisions, in TOML files
//! next to the policies (`tests.toml` or `*.tests.toml`, anywhere under the
//! bundle directory). `gatehouse policy test DIR` runs them; the format is
//! documented in `policies/README.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{Decision, Effect, Engine, Principal, TargetInfo};
use crate::bundle::{Bundle, BundleError, line_column};
use crate::{StatementFacts, StatementKind};

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Corpus file, relative to the directory searched.
    pub file: String,
    pub line: usize,
    pub name: String,
    /// `None` when the case passed; else what differed.
    pub failure: Option<String>,
    pub decision: Decision,
}

/// The outcome of every case of every corpus found.
#[derive(Debug, Clone)]
pub struct TestReport {
    pub bundle_version: String,
    pub bundle_hash: String,
    pub results: Vec<CaseResult>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    pub fn is_success(&self) -> bool {
        self.failed() == 0 && !self.results.is_empty()
    }

    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.results.iter().filter(|r| r.failure.is_some())
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in self.failures() {
            writeln!(
                f,
                "FAIL {}:{}: {}: {}",
                r.file,
                r.line,
                r.name,
                r.failure.as_deref().unwrap_or("")
            )?;
        }
        write!(
            f,
            "bundle {} ({}): {} passed, {} failed",
            self.bundle_version,
            &self.bundle_hash[..self.bundle_hash.len().min(12)],
            self.passed(),
            self.failed()
        )
    }
}

/// Why a corpus could not be run (as opposed to a case that failed).
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Corpus {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: no test corpus (tests.toml or *.tests.toml) found", dir.display())]
    NoCorpus { dir: PathBuf },
}

/// Loads the bundle in `dir` ([`Bundle::from_dir`]) and runs every corpus
/// found under `dir` against it.
pub fn run_tests(dir: impl AsRef<Path>) -> Result<TestReport, TestError> {
    let dir = dir.as_ref();
    let bundle = Bundle::from_dir(dir)?;
    run_tests_against(&bundle, dir)
}

/// Runs every corpus found under `corpus_dir` against `bundle`.
pub fn run_tests_against(
    bundle: &Bundle,
    corpus_dir: impl AsRef<Path>,
) -> Result<TestReport, TestError> {
    let corpus_dir = corpus_dir.as_ref();
    let engine = Engine::new(bundle)?;
    let mut files = Vec::new();
    find_corpora(corpus_dir, &mut files)?;
    if files.is_empty() {
        return Err(TestError::NoCorpus {
            dir: corpus_dir.to_path_buf(),
        });
    }
    let mut results = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| TestError::Io {
            path: path.clone(),
            source,
        })?;
        let name = path
            .strip_prefix(corpus_dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        results.extend(run_corpus(&engine, &name, &text)?);
    }
    Ok(TestReport {
        bundle_version: engine.bundle_version().to_string(),
        bundle_hash: engine.bundle_hash().to_string(),
        results,
    })
}

fn find_corpora(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), TestError> {
    let io = |source| TestError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            find_corpora(&path, out)?;
        } else if name == "tests.toml" || name.ends_with(".tests.toml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Runs the cases of one corpus file (`file` names it in messages).
pub fn run_corpus(engine: &Engine, file: &str, text: &str) -> Result<Vec<CaseResult>, TestError> {
    let corpus_error = |offset: usize, message: String| {
        let (line, column) = line_column(text, offset);
        TestError::Corpus {
            file: file.to_string(),
            line,
            column,
            message,
        }
    };
    let corpus: CorpusFile = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        corpus_error(offset, e.message().to_string())
    })?;
    let mut results = Vec::new();
    for spanned in &corpus.case {
        let offset = spanned.span().start;
        let case = spanned.get_ref();
        let err = |m: String| corpus_error(offset, format!("case `{}`: {m}", case.name));
        let principal = match &case.principal {
            PrincipalRef::Named(n) => corpus
                .principals
                .get(n)
                .ok_or_else(|| err(format!("no principal `{n}` in [principals]")))?
                .to_principal(),
            PrincipalRef::Inline(p) => p.to_principal(),
        };
        let target = match &case.target {
            TargetRef::Named(n) => corpus
                .targets
                .get(n)
                .ok_or_else(|| err(format!("no target `{n}` in [targets]")))?
                .to_target(n),
            TargetRef::Inline(t) => t.to_target(""),
        };
        let source_ip = case.source_ip.as_deref().unwrap_or("127.0.0.1");
        let mut session = engine.session(&principal, &target, source_ip);
        if let Some(hour) = case.hour {
            if hour > 23 {
                return Err(err(format!("hour {hour} is not 0..23")));
            }
            session = session.at_hour(hour);
        }
        if !case.grants.is_empty() {
            session = session.with_grants(case.grants.iter().cloned().collect());
        }
        let decision = match (case.action.as_str(), &case.facts, &case.sql) {
            ("connect", None, None) => engine.decide_connect_in(&session),
            ("connect", _, _) => return Err(err("connect takes no facts or sql".into())),
            ("approve", None, None) => engine.decide_approve(&session),
            ("approve", _, _) => return Err(err("approve takes no facts or sql".into())),
            ("query", Some(f), None) => {
                let facts = f.to_facts().map_err(&err)?;
                engine.decide_statement(&session, &facts, f.parsed, f.multi_statement)
            }
            ("query", None, Some(sql)) => engine
                .decide_classification(&session, &crate::classify(sql, crate::Reading::default())),
            ("query", _, _) => {
                return Err(err("a query case needs `facts` or `sql`, not both".into()));
            }
            ("unmask", None, None) => engine.decide_unmask(
                &session,
                case.table.as_deref().unwrap_or(""),
                case.column.as_deref().unwrap_or(""),
            ),
            ("unmask", _, _) => {
                return Err(err(
                    "unmask takes `table` and `column`, no facts or sql".into()
                ));
            }
            (other, _, _) => {
                return Err(err(format!(
                    "action `{other}`: corpora test `connect`, `query`, `approve` and `unmask`"
                )));
            }
        };
        let (line, _) = line_column(text, offset);
        results.push(CaseResult {
            file: file.to_string(),
            line,
            name: case.name.clone(),
            failure: case.check(&decision),
            decision,
        });
    }
    Ok(results)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CorpusFile {
    #[serde(default)]
    principals: BTreeMap<String, PrincipalSpec>,
    #[serde(default)]
    targets: BTreeMap<String, TargetSpec>,
    #[serde(default)]
    case: Vec<Spanned<Case>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalSpec {
    subject: String,
    username: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    delegation: Vec<String>,
    #[serde(default)]
    is_agent: bool,
}

impl PrincipalSpec {
    fn to_principal(&self) -> Principal {
        Principal {
            subject: self.subject.clone(),
            username: self
                .username
                .clone()
                .unwrap_or_else(|| self.subject.clone()),
            groups: self.groups.clone(),
            delegation: self.delegation.clone(),
            is_agent: self.is_agent,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    name: Option<String>,
    #[serde(default = "postgres")]
    kind: String,
    environment: String,
    #[serde(default)]
    tags: Vec<String>,
}

fn postgres() -> String {
    "postgres".into()
}

impl TargetSpec {
    fn to_target(&self, key: &str) -> TargetInfo {
        TargetInfo {
            name: self.name.clone().unwrap_or_else(|| key.to_string()),
            kind: self.kind.clone(),
            environment: self.environment.clone(),
            tags: self.tags.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PrincipalRef {
    Named(String),
    Inline(PrincipalSpec),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TargetRef {
    Named(String),
    Inline(TargetSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: PrincipalRef,
    target: TargetRef,
    #[serde(default = "query")]
    action: String,
    facts: Option<Facts>,
    sql: Option<String>,
    /// For `unmask`: the column's table (empty when unknown) and name.
    table: Option<String>,
    column: Option<String>,
    source_ip: Option<String>,
    hour: Option<u8>,
    /// The scopes of access granted and in force (`context.grants`).
    #[serde(default)]
    grants: Vec<String>,
    expect: Effect,
    /// Exactly these determining policies (any order).
    policies: Option<Vec<String>>,
    read_only: Option<bool>,
    /// A substring of the reason.
    reason: Option<String>,
    /// For `approval_required`: the approvers and the timeout (seconds).
    approvers: Option<u32>,
    approval_timeout_secs: Option<u32>,
}

fn query() -> String {
    "query".into()
}

impl Case {
    fn check(&self, d: &Decision) -> Option<String> {
        let mut wrong = Vec::new();
        if d.effect != self.expect {
            wrong.push(format!(
                "expected {}, got {}",
                self.expect.as_str(),
                d.effect.as_str()
            ));
        }
        if let Some(expected) = &self.policies {
            let mut want = expected.clone();
            want.sort();
            let mut got = d.policies.clone();
            got.sort();
            if want != got {
                wrong.push(format!("expected policies {want:?}"));
            }
        }
        if let Some(ro) = self.read_only
            && ro != d.read_only
        {
            wrong.push(format!("expected read_only = {ro}"));
        }
        if let Some(n) = self.approvers
            && n != d.approvers
        {
            wrong.push(format!("expected approvers = {n}, got {}", d.approvers));
        }
        if let Some(t) = self.approval_timeout_secs
            && t != d.approval_timeout_secs
        {
            wrong.push(format!(
                "expected approval_timeout_secs = {t}, got {}",
                d.approval_timeout_secs
            ));
        }
        if let Some(r) = &self.reason
            && !d.reason.as_deref().unwrap_or("").contains(r.as_str())
        {
            wrong.push(format!("expected a reason containing {r:?}"));
        }
        if wrong.is_empty() {
            return None;
        }
        Some(format!(
            "{} (got policies {:?}, reason {:?}, read_only {})",
            wrong.join("; "),
            d.policies,
            d.reason.as_deref().unwrap_or(""),
            d.read_only
        ))
    }
}

/// Statement facts as a corpus writes them. `writes` defaults to true for
/// the kinds that always write (insert, update, delete, merge, ddl, dcl,
/// copy_in, call) and when `dynamic` or `reaches_outside`, else false; `has_where` and `parsed` default to true.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Facts {
    kind: String,
    #[serde(default)]
    tables_read: Vec<String>,
    #[serde(default)]
    tables_written: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
    #[serde(default = "yes")]
    has_where: bool,
    writes: Option<bool>,
    #[serde(default)]
    runs_program: bool,
    #[serde(default)]
    dynamic: bool,
    #[serde(default)]
    reaches_outside: bool,
    #[serde(default)]
    disables_read_only: bool,
    #[serde(default)]
    changes_parsing: bool,
    #[serde(default = "yes")]
    parsed: bool,
    #[serde(default)]
    multi_statement: bool,
}

fn yes() -> bool {
    true
}

impl Facts {
    fn to_facts(&self) -> Result<StatementFacts, String> {
        let kind = StatementKind::ALL
            .into_iter()
            .find(|k| k.as_str() == self.kind)
            .ok_or_else(|| {
                let names: Vec<&str> = StatementKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("kind `{}` is not one of {}", self.kind, names.join(", "))
            })?;
        use StatementKind as K;
        let always_writes = matches!(
            kind,
            K::Insert | K::Update | K::Delete | K::Merge | K::Ddl | K::Dcl | K::CopyIn | K::Call
        );
        let mut facts = StatementFacts::new(kind);
        facts.tables_read = self.tables_read.iter().cloned().collect();
        facts.tables_written = self.tables_written.iter().cloned().collect();
        facts.functions = self.functions.iter().cloned().collect();
        facts.has_where = self.has_where;
        facts.writes = self
            .writes
            .unwrap_or(always_writes || self.dynamic || self.reaches_outside);
        facts.runs_program = self.runs_program;
        facts.dynamic = self.dynamic;
        facts.reaches_outside = self.reaches_outside;
        facts.disables_read_only = self.disables_read_only;
        facts.changes_parsing = self.changes_parsing;
        Ok(facts)
    }
}
