//! A policy bundle: the Cedar files and schema the control plane publishes
//! and every worker decides with.
//!
//! A bundle is plain data (it travels as JSON in NATS KV). Its `hash` is the
//! SHA-256 of its canonical content, so a worker can tell which policies it
//! decided with and refuse a bundle whose content was altered on the way
//! ([`crate::Engine::new`] checks it).

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
];

/// Policies, schema and metadata, as published by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Human-facing version. [`Bundle::from_dir`] sets `local-<hash prefix>`;
    /// `gatehouse policy push` sets its own. Not part of the hash.
    pub version: String,
    /// SHA-256 (lowercase hex) of the canonical content: schema, files
    /// (sorted by name) and `dry_run`. See [`Bundle::content_hash`].
    pub hash: String,
    /// `(file name, Cedar text)`, sorted by name. Names are paths relative to
    /// the bundle directory with `/` separators (`agents/policy.cedar`).
    pub files: Vec<(String, String)>,
    /// The Cedar schema text (`.cedarschema` syntax).
    pub schema: String,
    /// Record would-be denials without enforcing them.
    pub dry_run: bool,
}

impl Bundle {
    /// A bundle of `files` (sorted here) and `schema`, with its hash computed.
    pub fn new(
        version: impl Into<String>,
        mut files: Vec<(String, String)>,
        schema: impl Into<String>,
        dry_run: bool,
    ) -> Bundle {
        files.sort();
        let mut bundle = Bundle {
            version: version.into(),
            hash: String::new(),
            files,
            schema: schema.into(),
            dry_run,
        };
        bundle.hash = bundle.content_hash();
        bundle
    }

    /// Reads every `*.cedar` file under `dir` (recursively; hidden entries
    /// skipped) and the schema: `dir/schema.cedarschema` if present, else
    /// [`SCHEMA`]. The version is `local-` and the first 12 hex digits of
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
        let mut bundle = Bundle::new(String::new(), files, schema, false);
        bundle.version = format!("local-{}", &bundle.hash[..12]);
        Ok(bundle)
    }

    /// The default set `gatehouse dev` loads (`policies/defaults/`, compiled
    /// in) with the built-in schema. Version `defaults-<hash prefix>`.
    pub fn defaults() -> Bundle {
        let files = DEFAULTS
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect();
        let mut bundle = Bundle::new(String::new(), files, SCHEMA, false);
        bundle.version = format!("defaults-{}", &bundle.hash[..12]);
        bundle
    }

    /// The same bundle with `dry_run` set, hash recomputed.
    pub fn with_dry_run(mut self, dry_run: bool) -> Bundle {
        self.dry_run = dry_run;
        self.hash = self.content_hash();
        self
    }

    /// SHA-256 over a length-prefixed encoding: the tag
    /// `gatehouse-bundle/1`, the schema, each file's name and text in name
    /// order, and the dry-run flag. Independent of `version` and of the
    /// order of `files`.
    pub fn content_hash(&self) -> String {
        let mut files: Vec<&(String, String)> = self.files.iter().collect();
        files.sort();
        let mut h = Sha256::new();
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(b"gatehouse-bundle/1");
        put(self.schema.as_bytes());
        put(&(files.len() as u64).to_le_bytes());
        for (name, text) in files {
            put(name.as_bytes());
            put(text.as_bytes());
        }
        put(&[u8::from(self.dry_run)]);
        let digest = h.finalize();
        let mut hex = String::with_capacity(64);
        for b in digest {
            use fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }
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
    fn hash_ignores_order_and_version_but_not_dry_run() {
        let a = Bundle::new(
            "1",
            vec![
                ("b.cedar".into(), "x".into()),
                ("a.cedar".into(), "y".into()),
            ],
            "s",
            false,
        );
        let b = Bundle::new(
            "2",
            vec![
                ("a.cedar".into(), "y".into()),
                ("b.cedar".into(), "x".into()),
            ],
            "s",
            false,
        );
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.files, b.files);
        assert_ne!(a.hash, a.clone().with_dry_run(true).hash);
        // Moving bytes between name and text changes the hash.
        let c = Bundle::new("1", vec![("a.cedary".into(), "".into())], "s", false);
        let d = Bundle::new("1", vec![("a.cedar".into(), "y".into())], "s", false);
        assert_ne!(c.hash, d.hash);
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
