//! A policy bundle: the Cedar files and schema the control plane publishes
//! and every worker decides with.
//!
//! A bundle is plain data (it travels as JSON in NATS KV). Its `hash` is the
//! SHA-256 of its canonical content, so a worker can tell which policies it
//! decided with and refuse a bundle whose content was altered on the way
//! ([`crate::Engine::new`] checks it).
//!
//! # Limits checked before Cedar reads anything
//!
//! Cedar's parser turns its syntax tree into policies by recursion, and
//! much of what it does with a policy afterwards (printing it, comparing
//! types, dropping it) recurses over the tree too. A policy of about 40
//! nested parentheses, brackets or records is enough to overflow a 2 MiB
//! thread stack in a debug build, which aborts the whole process: no
//! `Result`, no unwinding. [`Bundle::check_limits`], which
//! [`crate::Engine::new`] runs first, refuses such a bundle by looking at
//! its bytes only:
//!
//! - sizes: the whole bundle ([`MAX_BUNDLE_BYTES`]), each file and the
//!   schema ([`MAX_FILE_BYTES`]), the number of files ([`MAX_FILES`]);
//! - nesting ([`MAX_NESTING`]): a lexical scan of each policy file (Cedar
//!   strings `"…"` with backslash escapes and `//` comments skipped) counts
//!   open `(`, `[` and `{`, and every `if` since the innermost open one
//!   (within one pair of brackets, each `if` is nested in the one before:
//!   Cedar only allows `if` where a whole expression stands). The schema is
//!   scanned the same way, with `<`…`>` (`Set<…>`) counting too;
//! - operator chains ([`MAX_OPERATORS`]): `a && b && …`, `1 + 1 + …`,
//!   `x.a.a.…` are flat in Cedar's syntax tree but each operator is one
//!   more level of the expression tree, so a policy (up to its `;`) may
//!   have at most that many operators (`&&`, `||`, comparisons, `+`, `-`,
//!   `*`, `!`, `.`, `[`, `in`, `has`, `like`, `is`). Unary chains need nothing
//!   more: Cedar itself refuses more than four `!` or `-` in a row;
//! - schema declarations ([`MAX_SCHEMA_DECLARATIONS`], counted by their
//!   `;`): a chain of entity types each `in` the next, or of type aliases,
//!   overflows the stack (and takes seconds) at a few thousand.
//!
//! The limits leave a debug build's 2 MiB thread room to spare (the tests
//! in `policies/tests/limits.rs` build and decide with a bundle at every
//! limit on such a thread). As a second line, [`crate::Engine::new`]
//! parses and validates on a thread of its own with a 64 MiB stack, so a
//! shape the scan does not foresee still cannot abort the process there;
//! deciding and dropping an engine happen on the caller's thread, where
//! the limits above are what keeps the tree shallow (Cedar's evaluator
//! also checks its remaining stack and fails the policy rather than
//! overflowing).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The schema in `policies/schema.cedarschema`, used by a bundle directory
/// that has no `schema.cedarschema` of its own.
pub const SCHEMA: &str = include_str!("../schema.cedarschema");

/// The name a bundle directory's own schema file must have.
pub const SCHEMA_FILE: &str = "schema.cedarschema";

/// The default set `gatehouse dev` loads: the files of `policies/defaults/`,
/// compiled in so the binary needs no source tree.
const DEFAULTS: &[(&str, &str)] = &[
    ("base.cedar", include_str!("../defaults/base.cedar")),
    (
        "agents-read-only.cedar",
        include_str!("../defaults/agents-read-only.cedar"),
    ),
    (
        "prod-no-ddl.cedar",
        include_str!("../defaults/prod-no-ddl.cedar"),
    ),
    (
        "unbounded-writes-need-approval.cedar",
        include_str!("../defaults/unbounded-writes-need-approval.cedar"),
    ),
    (
        "dangerous-functions-dba-only.cedar",
        include_str!("../defaults/dangerous-functions-dba-only.cedar"),
    ),
    (
        "pii-readers.cedar",
        include_str!("../defaults/pii-readers.cedar"),
    ),
];

/// Largest bundle: file names, policy texts and the schema together.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Largest single policy file, and largest schema.
pub const MAX_FILE_BYTES: usize = 512 << 10;
/// Most policy files in a bundle.
pub const MAX_FILES: usize = 1024;
/// Deepest nesting of `(`, `[`, `{` and `if` in a policy (and of `(`, `[`,
/// `{`, `<` in the schema). Real policies stay under 10.
pub const MAX_NESTING: usize = 32;
/// Most operators in one policy (see the module documentation).
pub const MAX_OPERATORS: usize = 1000;
/// Most declarations (`entity`, `action`, `type`, each ended by `;`) in
/// the schema.
pub const MAX_SCHEMA_DECLARATIONS: usize = 512;

/// Longest dry-run the control plane sets: a dry-run always ends by itself.
pub const MAX_DRY_RUN_SECS: i64 = 24 * 3600;

/// Policies, schema and metadata, as published by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Assigned by the control plane when it publishes the bundle, one more
    /// than the highest before it, so a worker can refuse a bundle that
    /// would take it back (going back is a rollback: the old content under
    /// a new version). 0 for a bundle not published ([`Bundle::from_dir`],
    /// [`Bundle::defaults`]). Not part of the hash.
    pub version: u64,
    /// A free-form name given by whoever pushed it (`local-<hash prefix>`
    /// from [`Bundle::from_dir`]); metadata only, never compared.
    #[serde(default)]
    pub label: String,
    /// SHA-256 (lowercase hex) of the canonical content: schema and files
    /// (sorted by name). See [`Bundle::content_hash`].
    pub hash: String,
    /// `(file name, Cedar text)`, sorted by name. Names are paths relative to
    /// the bundle directory with `/` separators (`agents/policy.cedar`).
    pub files: Vec<(String, String)>,
    /// The Cedar schema text (`.cedarschema` syntax).
    pub schema: String,
    /// Where denials are recorded but not enforced, until when. Set on its
    /// own (`POST /api/v1/policies/dry-run`), never by a push; not part of
    /// the hash (the policies are the same with or without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
    /// The version whose content this one published again (a rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// The version this one withdraws: published by the control plane when
    /// that version's event could not be recorded (it stays in the
    /// history, superseded, never having been in force on record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdraws: Option<u64>,
}

/// A dry-run: on these targets, until `expires_at`, denials are recorded
/// and the commands run. It never applies to a read-only session (an
/// agent's): those are enforced in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRun {
    /// Every target. Otherwise only those in `targets`.
    #[serde(default)]
    pub all_targets: bool,
    /// Target names (`worker.targets.<name>`); empty with `all_targets`.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Unix seconds; from then on everything is enforced again, whatever
    /// else happens (each worker compares it with its own clock).
    pub expires_at: i64,
    /// Subject of the token that set it.
    pub set_by: String,
}

impl DryRun {
    /// Whether a decision on `target` at `now` (Unix seconds) is only
    /// recorded.
    pub fn applies(&self, target: &str, now: i64) -> bool {
        now < self.expires_at && (self.all_targets || self.targets.iter().any(|t| t == target))
    }

    /// Refuses a scope that names nothing, or both everything and some
    /// targets, and an expiry not in `(now, now + MAX_DRY_RUN_SECS]`.
    pub fn check(&self, now: i64) -> Result<(), String> {
        match (self.all_targets, self.targets.is_empty()) {
            (false, true) => {
                return Err("name the targets of the dry-run, or set all_targets".into());
            }
            (true, false) => return Err("give either targets or all_targets, not both".into()),
            _ => {}
        }
        if let Some(t) = self.targets.iter().find(|t| t.is_empty()) {
            return Err(format!("{t:?} is not a target name"));
        }
        if self.expires_at <= now {
            return Err("a dry-run must end in the future".into());
        }
        if self.expires_at > now + MAX_DRY_RUN_SECS {
            return Err(format!(
                "a dry-run lasts at most {} hours",
                MAX_DRY_RUN_SECS / 3600
            ));
        }
        Ok(())
    }
}

impl Bundle {
    /// A bundle of `files` (sorted here) and `schema`, with its hash
    /// computed; version 0 (unpublished), no dry-run.
    pub fn new(
        label: impl Into<String>,
        mut files: Vec<(String, String)>,
        schema: impl Into<String>,
    ) -> Bundle {
        files.sort();
        let mut bundle = Bundle {
            version: 0,
            label: label.into(),
            hash: String::new(),
            files,
            schema: schema.into(),
            dry_run: None,
            rollback_of: None,
            withdraws: None,
        };
        bundle.hash = bundle.content_hash();
        bundle
    }

    /// Reads every `*.cedar` file under `dir` (recursively; hidden entries
    /// skipped) and the schema: `dir/schema.cedarschema` if present, else
    /// [`SCHEMA`]. The label is `local-` and the first 12 hex digits of
    /// the hash. Only reads: parse and validation errors come from
    /// [`crate::Engine::new`].
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let dir = dir.as_ref();
        let mut files = Vec::new();
        let mut schema = None;
        collect(dir, dir, &mut files, &mut schema)?;
        if files.is_empty() {
            return Err(BundleError::NoPolicies {
                dir: dir.to_path_buf(),
            });
        }
        let schema = schema.unwrap_or_else(|| SCHEMA.to_string());
        let mut bundle = Bundle::new(String::new(), files, schema);
        bundle.label = format!("local-{}", &bundle.hash[..12]);
        Ok(bundle)
    }

    /// The default set `gatehouse dev` loads (`policies/defaults/`, compiled
    /// in) with the built-in schema. Label `defaults-<hash prefix>`.
    pub fn defaults() -> Bundle {
        let files = DEFAULTS
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect();
        let mut bundle = Bundle::new(String::new(), files, SCHEMA);
        bundle.label = format!("defaults-{}", &bundle.hash[..12]);
        bundle
    }

    /// The same bundle with `dry_run` set (the hash does not change).
    pub fn with_dry_run(mut self, dry_run: Option<DryRun>) -> Bundle {
        self.dry_run = dry_run;
        self
    }

    /// Refuses a bundle over the size limits, or with a policy or schema
    /// nested deeper or chained longer than Cedar can safely take (see the
    /// module documentation), before Cedar parses anything. Each problem
    /// names its file, line and the limit. Reads the bytes once; no
    /// recursion.
    pub fn check_limits(&self) -> Result<(), BundleError> {
        let mut problems = Vec::new();
        let too_big = |file: &str, what: String| Problem {
            severity: Severity::Error,
            file: file.to_string(),
            line: 1,
            column: 1,
            message: what,
            help: None,
            policy: None,
        };
        let total = self.schema.len()
            + self
                .files
                .iter()
                .map(|(name, text)| name.len() + text.len())
                .sum::<usize>();
        if total > MAX_BUNDLE_BYTES {
            let mut p = too_big(
                "(bundle)",
                format!(
                    "the bundle is {total} bytes (names, policies and schema); at most {MAX_BUNDLE_BYTES} are accepted"
                ),
            );
            p.help = Some("split it, or remove policies that are no longer used".into());
            problems.push(p);
        }
        if self.files.len() > MAX_FILES {
            problems.push(too_big(
                "(bundle)",
                format!(
                    "the bundle has {} policy files; at most {MAX_FILES} are accepted",
                    self.files.len()
                ),
            ));
        }
        if self.schema.len() > MAX_FILE_BYTES {
            problems.push(too_big(
                SCHEMA_FILE,
                format!(
                    "the schema is {} bytes; at most {MAX_FILE_BYTES} are accepted",
                    self.schema.len()
                ),
            ));
        }
        for (name, text) in &self.files {
            if text.len() > MAX_FILE_BYTES {
                problems.push(too_big(
                    name,
                    format!(
                        "the file is {} bytes; at most {MAX_FILE_BYTES} are accepted",
                        text.len()
                    ),
                ));
            }
        }
        // Scanning is linear, but an oversized bundle is refused as it is.
        if problems.is_empty() {
            problems.extend(scan(SCHEMA_FILE, &self.schema, Syntax::Schema));
            for (name, text) in &self.files {
                problems.extend(scan(name, text, Syntax::Policy));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BundleError::Invalid(problems))
        }
    }

    /// SHA-256 over a length-prefixed encoding: the tag
    /// `gatehouse-bundle/2`, the schema, and each file's name and text in
    /// name order. Independent of `version`, `label`, `dry_run` and of the
    /// order of `files`: two bundles of the same policies have one hash.
    pub fn content_hash(&self) -> String {
        let mut files: Vec<&(String, String)> = self.files.iter().collect();
        files.sort();
        let mut h = Sha256::new();
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(b"gatehouse-bundle/2");
        put(self.schema.as_bytes());
        put(&(files.len() as u64).to_le_bytes());
        for (name, text) in files {
            put(name.as_bytes());
            put(text.as_bytes());
        }
        let digest = h.finalize();
        let mut hex = String::with_capacity(64);
        for b in digest {
            use fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }
}

/// What [`scan`] reads: a policy file or the schema.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Policy,
    Schema,
}

/// The lexical pre-scan of [`Bundle::check_limits`]: at most one problem
/// per limit and file (the first place it is passed). Never recurses.
fn scan(file: &str, text: &str, syntax: Syntax) -> Vec<Problem> {
    let bytes = text.as_bytes();
    let mut problems = Vec::new();
    let refusal = |offset: usize, message: String, help: &str| {
        let mut p = Problem::at(Severity::Error, file, text, offset, message);
        p.help = Some(help.to_string());
        p
    };
    let too_deep = |offset: usize| {
        refusal(
            offset,
            format!(
                "nested more than {MAX_NESTING} levels deep (parentheses, brackets, braces{}); Gatehouse accepts at most {MAX_NESTING}",
                match syntax {
                    Syntax::Schema => ", Set<…>",
                    Syntax::Policy => " and `if`",
                }
            ),
            "flatten the expression, or name the inner part (a schema type, a separate policy)",
        )
    };
    // Open brackets, each with the `if`s seen directly inside it; `ifs` are
    // those outside any bracket. `depth` is the sum of both.
    let mut open: Vec<(u8, usize)> = Vec::new();
    let mut ifs = 0usize;
    let mut depth = 0usize;
    let mut operators = 0usize;
    let mut declarations = 0usize;
    let mut too_many_operators = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        let mut deeper = false;
        match b {
            b'"' => {
                // A string: up to the next unescaped quote.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if next == Some(b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                // `x["a"]["b"]…` chains like `x.a.b…`.
                if b == b'[' {
                    operators += 1;
                }
                open.push((b, 0));
                deeper = true;
            }
            b'<' if syntax == Syntax::Schema => {
                open.push((b, 0));
                deeper = true;
            }
            b')' | b']' | b'}' => {
                if let Some((_, inner)) = open.pop() {
                    depth -= 1 + inner;
                }
            }
            b'>' if syntax == Syntax::Schema => {
                if let Some((_, inner)) = open.pop() {
                    depth -= 1 + inner;
                }
            }
            b';' => {
                declarations += 1;
                if syntax == Syntax::Schema && declarations > MAX_SCHEMA_DECLARATIONS {
                    problems.push(refusal(
                        i,
                        format!(
                            "the schema has more than {MAX_SCHEMA_DECLARATIONS} declarations; Gatehouse accepts at most {MAX_SCHEMA_DECLARATIONS}"
                        ),
                        "declare several entity types in one declaration (`entity A, B;`)",
                    ));
                    break;
                }
                if open.is_empty() {
                    // The end of a policy.
                    depth -= ifs;
                    ifs = 0;
                    operators = 0;
                }
            }
            b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                let start = i;
                while bytes
                    .get(i + 1)
                    .is_some_and(|c| *c == b'_' || c.is_ascii_alphanumeric())
                {
                    i += 1;
                }
                if syntax == Syntax::Policy {
                    match &bytes[start..=i] {
                        b"if" => {
                            match open.last_mut() {
                                Some((_, inner)) => *inner += 1,
                                None => ifs += 1,
                            }
                            deeper = true;
                        }
                        b"in" | b"has" | b"like" | b"is" => operators += 1,
                        _ => {}
                    }
                }
            }
            b':' if next == Some(b':') => i += 1,
            b'&' | b'|' | b'=' | b'!' | b'<' | b'>' | b'+' | b'-' | b'*' | b'/' | b'%' | b'.' => {
                operators += 1;
                // Two-character operators count once.
                if matches!(
                    (b, next),
                    (b'&', Some(b'&'))
                        | (b'|', Some(b'|'))
                        | (b'=' | b'!' | b'<' | b'>', Some(b'='))
                ) {
                    i += 1;
                }
            }
            _ => {}
        }
        if deeper {
            depth += 1;
            if depth > MAX_NESTING {
                problems.push(too_deep(i));
                break;
            }
        }
        if syntax == Syntax::Policy && operators > MAX_OPERATORS && !too_many_operators {
            too_many_operators = true;
            problems.push(refusal(
                i,
                format!(
                    "a policy with more than {MAX_OPERATORS} operators (&&, ||, comparisons, arithmetic, `.`, `[`, in, has, like, is); Gatehouse accepts at most {MAX_OPERATORS} in one policy"
                ),
                "split the policy into several, or test membership in a set (`[\"a\", \"b\"].contains(x)`)",
            ));
        }
        i += 1;
    }
    problems
}

fn collect(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, String)>,
    schema: &mut Option<String>,
) -> Result<(), BundleError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let file_type = entry.file_type().map_err(io(&path))?;
        if file_type.is_dir() {
            collect(root, &path, files, schema)?;
        } else if name.ends_with(".cedar") {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            files.push((relative(root, &path), text));
        } else if name.ends_with(".cedarschema") {
            if dir != root || name != SCHEMA_FILE {
                return Err(BundleError::StraySchema { path });
            }
            *schema = Some(std::fs::read_to_string(&path).map_err(io(&path))?);
        }
    }
    Ok(())
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// How bad a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

/// One thing wrong (or suspicious) in a bundle, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub severity: Severity,
    /// Bundle file name (`agents/policy.cedar`, `schema.cedarschema`).
    pub file: String,
    /// 1-based line and column (in characters).
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub help: Option<String>,
    /// The policy concerned, when there is one.
    pub policy: Option<String>,
}

impl Problem {
    pub(crate) fn at(
        severity: Severity,
        file: &str,
        text: &str,
        offset: usize,
        message: String,
    ) -> Problem {
        let (line, column) = line_column(text, offset);
        Problem {
            severity,
            file: file.to_string(),
            line,
            column,
            message,
            help: None,
            policy: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {severity}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Why a bundle could not be read or compiled.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no .cedar files found", dir.display())]
    NoPolicies { dir: PathBuf },
    #[error(
        "{}: a bundle's schema must be `{SCHEMA_FILE}` at the top of the bundle directory",
        path.display()
    )]
    StraySchema { path: PathBuf },
    #[error("bundle hash {declared} does not match its content (sha256 {computed})")]
    HashMismatch { declared: String, computed: String },
    /// Parse, annotation or validation errors, each with file:line:column.
    #[error("{}", render(.0))]
    Invalid(Vec<Problem>),
}

impl BundleError {
    /// The located problems, for a caller that prints or serializes them.
    pub fn problems(&self) -> &[Problem] {
        match self {
            BundleError::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

fn render(problems: &[Problem]) -> String {
    let errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    let mut out = format!(
        "invalid policy bundle: {errors} error{}",
        if errors == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push('\n');
        out.push_str(&p.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ignores_order_version_and_dry_run() {
        let a = Bundle::new(
            "1",
            vec![
                ("b.cedar".into(), "x".into()),
                ("a.cedar".into(), "y".into()),
            ],
            "s",
        );
        let b = Bundle::new(
            "2",
            vec![
                ("a.cedar".into(), "y".into()),
                ("b.cedar".into(), "x".into()),
            ],
            "s",
        );
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.files, b.files);
        let dry = DryRun {
            all_targets: true,
            targets: vec![],
            expires_at: 10,
            set_by: "admin".into(),
        };
        assert_eq!(a.hash, a.clone().with_dry_run(Some(dry)).hash);
        // Moving bytes between name and text changes the hash.
        let c = Bundle::new("1", vec![("a.cedary".into(), "".into())], "s");
        let d = Bundle::new("1", vec![("a.cedar".into(), "y".into())], "s");
        assert_ne!(c.hash, d.hash);
    }

    #[test]
    fn dry_run_is_scoped_bounded_and_expires() {
        let now = 1_000_000;
        let d = DryRun {
            all_targets: false,
            targets: vec!["app".into()],
            expires_at: now + 60,
            set_by: "admin".into(),
        };
        d.check(now).unwrap();
        assert!(d.applies("app", now));
        assert!(!d.applies("billing", now));
        assert!(!d.applies("app", now + 60), "expired");
        let all = DryRun {
            all_targets: true,
            targets: vec![],
            ..d.clone()
        };
        assert!(all.applies("billing", now + 59));
        let nothing = DryRun {
            targets: vec![],
            ..d.clone()
        };
        assert!(nothing.check(now).is_err());
        let both = DryRun {
            all_targets: true,
            ..d.clone()
        };
        assert!(both.check(now).is_err());
        let forever = DryRun {
            expires_at: now + MAX_DRY_RUN_SECS + 1,
            ..d.clone()
        };
        assert!(forever.check(now).unwrap_err().contains("24 hours"));
        let past = DryRun {
            expires_at: now,
            ..d
        };
        assert!(past.check(now).is_err());
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "ab\ncé\nx";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 6), (2, 3));
        assert_eq!(line_column(text, 7), (3, 1));
        assert_eq!(line_column(text, 100), (3, 2));
    }
}
