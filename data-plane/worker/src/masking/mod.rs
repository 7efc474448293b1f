//! Masking of what a target sends back, for those Cedar does not let
//! `unmask`: the target's rules ([`MaskingConfig`]), and a session's
//! transform of its response stream ([`ResponseMask`]).
//!
//! Each result's shape (its `RowDescription`) becomes a plan, one step per
//! column, decided once: Cedar's `unmask` for the column, then its column
//! rule or the content detectors. Rows are then masked value by value as
//! they pass, in one copy; a row nothing changes in is copied whole. So is
//! every row of a result with nothing to do (integers, dates, …).
//!
//! - Text format: every value of a column with a rule is masked whole;
//!   detectors run on the others, except types that cannot hold what they
//!   find (`bool`, `int2`, `int4`, `oid`, floats, dates and times,
//!   `uuid`, `interval`). `int8` and `numeric` are read: a card number
//!   fits in them.
//! - Binary format: text-like types (`text`, `varchar`, `bpchar`, `name`,
//!   `json`, `jsonb`, `xml`, `unknown`) are masked as text, in place;
//!   another type with a column rule becomes NULL (no typed placeholder
//!   can be trusted to decode); other binary values are left as they are.
//! - `COPY … TO STDOUT`: the detectors run on every text or CSV line (a
//!   masked span is only letters, digits and `[]:*_`, so it never breaks a
//!   line's structure). Column rules cannot apply, as COPY data names no
//!   columns: where the target has any, a `COPY … TO` is refused (`42501`)
//!   for a principal `unmask` (asked with table and column empty) does not
//!   apply to. Binary COPY is read tuple by tuple, its values masked by
//!   the detectors when they are UTF-8 text.
//! - `ErrorResponse`/`NoticeResponse`: the message, detail, hint and
//!   context go through the detectors, and a detail that quotes values —
//!   `Key (email)=(…) already exists`, `Failing row contains (…)` — has
//!   them masked when a column rule names one of its columns (a failing
//!   row names none: whenever the target has column rules).
//! - `NotificationResponse` payloads go through the detectors.
//! - What is recorded (`ResponseRecorded`) is masked by the rules even
//!   where `unmask` let the client see values clear, and a column named
//!   like a secret is recorded masked whole.
//!
//! Column rules follow the column, not its name in the result: at login
//! the worker reads from the target's catalogue which columns the rules
//! name ([`TargetMasking::catalogue_query`]), which view columns are
//! computed from those (views over views too), and which functions come
//! with the server or an extension (see `catalogue`). A result column is
//! then matched by its origin (table and column number); a value with no
//! origin — computed (`upper(ssn)`, `ssn || ''`, a scalar subquery, a
//! `UNION`, `row_to_json(u)`) — by what its statement's text computes it
//! from (the classifier's `outputs`), and masked whole as the column it
//! comes from unless `unmask` applies to that column. A value computed by a
//! function that runs SQL from text, or by one defined in the database,
//! may come from anywhere; so may a cursor's computed values (`FETCH`):
//! where the target has column rules, they are masked for those `unmask`
//! (asked with table and column empty) does not apply to. So is the value a
//! data exception quotes (`invalid input syntax for type integer:
//! "ally"`, from `SELECT nickname::int`), and what the errors of a command
//! naming a masked column anywhere quote (`relation "ally" does not
//! exist`, from `WHERE nickname::regclass IS NULL`).
//!
//! A rule on a table covers its partitions and inheritance children. The
//! statistics views' sample values (`pg_stats.most_common_vals`,
//! `histogram_bounds`, …), which may be any column's, are masked as of
//! unknown origin.
//!
//! A copy of a masked column in a table or view would not be masked: to
//! those without `unmask` of the column, a statement that stores one
//! (`INSERT … SELECT`, `UPDATE … SET`, `MERGE`, `CREATE TABLE … AS`,
//! `SELECT … INTO`, `CREATE VIEW`, or a function that keeps its argument:
//! `set_config`, `pg_notify`, …) is refused (`42501`), and so is code run
//! from text or defined to run later (`DO`, `query_to_xml`, `CREATE
//! FUNCTION`, `CREATE RULE`, `CREATE TRIGGER`, …), which could make one
//! ([`ResponseMask::store_refusal`]). So is altering or renaming a table
//! with a masked column: what the rules name would no longer be found.
//!
//! Not covered: what a filter tells (`WHERE ssn LIKE '1%'` counts rows);
//! what functions and procedures already defined in the database store
//! (theirs is the database's own code); tables and views another session
//! creates after this one began, which are matched by name only; a value
//! a function raises in an error (`P0001`), which only the detectors see.
//! Values computed from a rule column are masked whole even where little
//! of it shows (`length(ssn)`, `count(ssn)`).

use std::path::PathBuf;

use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use gatehouse_events::Cell;
use gatehouse_masking::{ColumnRule, Detector, Detectors, Masker, Pattern, Rules, Stats, Style};
use gatehouse_policies::{Output, Outputs, StatementFacts};
use serde::Deserialize;

mod catalogue;

/// How masked values are shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StyleName {
    /// `[masked]`, or `[masked:<detector>]` for what a detector found.
    #[default]
    Redact,
    /// Letters and digits as `*` but for the last `keep_last`.
    Partial,
    /// A keyed pseudonym, stable under one key (`pseu_…`).
    Pseudonym,
}

fn default_keep_last() -> usize {
    4
}

/// `[[worker.targets.NAME.masking.columns]]`: a column masked whole.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRuleConfig {
    /// `table.column` or `column`; `*` matches any run of characters;
    /// compared case-insensitively.
    pub pattern: String,
    #[serde(default)]
    pub style: StyleName,
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
}

/// `[worker.targets.NAME.masking]`: how the target's responses are masked
/// for principals no `unmask` permit applies to.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// Content detectors by name (`email`, `phone`, `payment_card`,
    /// `us_ssn`, `iban`, `ip_address`, `jwt`, `api_key`, `high_entropy`,
    /// `password_hash`, `pem_private_key`), or `all` (the default).
    pub detectors: Vec<String>,
    /// The style of what the detectors find.
    pub style: StyleName,
    pub keep_last: usize,
    pub columns: Vec<ColumnRuleConfig>,
    /// Environment variable holding the pseudonym key (at least 32 bytes).
    /// Without one (here or in `key_file`) the worker draws a key at start:
    /// pseudonyms are then stable only within one worker process.
    pub key_env: Option<String>,
    pub key_file: Option<PathBuf>,
    /// Most bytes of masked rows a command's response records carry.
    pub record_max_bytes: usize,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig {
            detectors: vec!["all".into()],
            style: StyleName::Redact,
            keep_last: default_keep_last(),
            columns: Vec::new(),
            key_env: None,
            key_file: None,
            record_max_bytes: 1 << 20,
        }
    }
}

impl std::fmt::Debug for MaskingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskingConfig")
            .field("detectors", &self.detectors)
            .field("style", &self.style)
            .field("columns", &self.columns)
            .field("key_env", &self.key_env)
            .field("key_file", &self.key_file)
            .finish()
    }
}

fn style(name: StyleName, keep_last: usize) -> Style {
    match name {
        StyleName::Redact => Style::Redact,
        StyleName::Partial => Style::Partial { keep_last },
        StyleName::Pseudonym => Style::Pseudonym,
    }
}

impl MaskingConfig {
    /// Checks the config and reads the key. Errors name the field.
    pub fn build(&self, field: &str) -> Result<TargetMasking, String> {
        let mut detectors = Detectors::none();
        for name in &self.detectors {
            if name == "all" {
                detectors = Detectors::all();
            } else {
                let d = Detector::from_name(name).ok_or_else(|| {
                    format!(
                        "{field}.detectors: unknown detector \"{name}\" (known: all, {})",
                        Detector::ALL.map(|d| d.name()).join(", ")
                    )
                })?;
                detectors = detectors.with(d);
            }
        }
        let mut columns = Vec::new();
        let mut patterns = Vec::new();
        for (i, c) in self.columns.iter().enumerate() {
            let p = c.pattern.trim();
            let ok = !p.is_empty()
                && p.split('.').count() <= 2
                && p.split('.').all(|part| !part.is_empty());
            if !ok {
                return Err(format!(
                    "{field}.columns[{i}].pattern: \"{}\" is not `table.column` or `column`",
                    c.pattern
                ));
            }
            patterns.push(match p.split_once('.') {
                Some((t, col)) => (Some(t.to_ascii_lowercase()), col.to_ascii_lowercase()),
                None => (None, p.to_ascii_lowercase()),
            });
            columns.push(ColumnRule {
                pattern: Pattern::new(p),
                style: style(c.style, c.keep_last),
            });
        }
        let key = match (&self.key_env, &self.key_file) {
            (Some(_), Some(_)) => {
                return Err(format!("{field}.key_env / key_file: set one, not both"));
            }
            (Some(var), None) => {
                Some(std::env::var(var).map_err(|_| {
                    format!("{field}.key_env: environment variable {var} is not set")
                })?)
            }
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{field}.key_file: cannot read {}: {e}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let key = match key {
            Some(k) if k.len() < 32 => {
                return Err(format!(
                    "{field}: the masking key must be at least 32 bytes"
                ));
            }
            Some(k) => k.into_bytes(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        if self.record_max_bytes == 0 {
            return Err(format!("{field}.record_max_bytes: must be at least 1"));
        }
        Ok(TargetMasking {
            rules: Rules {
                columns,
                detectors,
                content_style: style(self.style, self.keep_last),
            },
            key,
            patterns,
            record_max_bytes: self.record_max_bytes,
        })
    }
}

/// A target's masking, ready for sessions.
pub struct TargetMasking {
    rules: Rules,
    key: Vec<u8>,
    /// The `(table, column)` patterns of the column rules, lowercase.
    patterns: Vec<(Option<String>, String)>,
    pub record_max_bytes: usize,
}

impl std::fmt::Debug for TargetMasking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetMasking")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl TargetMasking {
    /// The query that finds the columns the column rules name, and the
    /// same columns of their partitions and inheritance children: rows of
    /// (relation oid, column number, relation, column, the table and column
    /// the rule names). And the columns of the statistics views that hold
    /// sample values of any column (`pg_stats.most_common_vals`, …), as of
    /// unknown origin (rule table and column empty). `None` when there are
    /// no column rules.
    pub fn catalogue_query(&self) -> Option<String> {
        if self.patterns.is_empty() {
            return None;
        }
        let like = |glob: &str| {
            let mut s = String::from("'");
            for c in glob.chars() {
                match c {
                    '*' => s.push('%'),
                    '%' | '_' | '!' => {
                        s.push('!');
                        s.push(c);
                    }
                    '\'' => s.push_str("''"),
                    c => s.push(c),
                }
            }
            s.push_str("' ESCAPE '!'");
            s
        };
        let terms: Vec<String> = self
            .patterns
            .iter()
            .map(|(t, c)| match t {
                Some(t) => format!(
                    "(c.relname ILIKE {} AND a.attname ILIKE {})",
                    like(t),
                    like(c)
                ),
                None => format!("a.attname ILIKE {}", like(c)),
            })
            .collect();
        Some(format!(
            "WITH RECURSIVE ruled(oid, attname, rtable, rcolumn) AS ( \
               SELECT c.oid, a.attname, c.relname, a.attname \
               FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
               WHERE a.attnum > 0 AND NOT a.attisdropped \
               AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND ({}) \
               UNION \
               SELECT c.oid, a.attname, '', '' \
               FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
               WHERE c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace \
               AND c.relname IN ({STATISTICS_VIEWS}) AND a.attname IN ({STATISTICS_VALUES}) \
               UNION \
               SELECT i.inhrelid, r.attname, r.rtable, r.rcolumn \
               FROM pg_catalog.pg_inherits i JOIN ruled r ON i.inhparent = r.oid) \
             SELECT r.oid, a.attnum, c.relname, a.attname, r.rtable, r.rcolumn \
             FROM ruled r JOIN pg_catalog.pg_class c ON c.oid = r.oid \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attname = r.attname \
               AND NOT a.attisdropped \
             LIMIT 100000",
            terms.join(" OR ")
        ))
    }
}

/// The statistics views and catalogues of PostgreSQL, and their columns
/// that hold sample values of the columns they describe.
const STATISTICS_VIEWS: &str =
    "'pg_stats', 'pg_stats_ext', 'pg_stats_ext_exprs', 'pg_statistic', 'pg_statistic_ext_data'";
const STATISTICS_VALUES: &str = "'most_common_vals', 'histogram_bounds', 'most_common_elems', \
     'stavalues1', 'stavalues2', 'stavalues3', 'stavalues4', 'stavalues5', 'stxdmcv', 'stxdexpr'";

pub use catalogue::Catalogue;

/// What is done to one column of a result.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Keep,
    /// Text: the detectors run on it.
    Detect,
    /// Masked whole (text, or a text-like binary value).
    Whole(Style),
    /// A binary value of a type that cannot be masked in place: NULL.
    Null,
}

/// How each `CopyData` of a COPY out is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    Text,
    /// Binary: the header is still to come.
    BinaryHeader,
    Binary,
}

/// A data exception's message with the value it quotes masked: every
/// quoted span (`"…"`, `»…«`, `«…»`, `„…“`, `“…”`), or, when it quotes none,
/// all after its first `: `.
fn failed_value(message: &[u8]) -> Vec<u8> {
    const QUOTES: [(&str, &str); 5] =
        [("\"", "\""), ("»", "«"), ("«", "»"), ("„", "“"), ("“", "”")];
    let text = String::from_utf8_lossy(message);
    let mut out = String::with_capacity(text.len());
    let mut rest = &*text;
    let mut quoted = false;
    while let Some((at, open, close)) = QUOTES
        .iter()
        .filter_map(|(o, c)| rest.find(o).map(|i| (i, *o, *c)))
        .min_by_key(|(i, ..)| *i)
    {
        let inner = &rest[at + open.len()..];
        out.push_str(&rest[..at + open.len()]);
        out.push_str("[masked]");
        quoted = true;
        let Some(end) = inner.find(close) else {
            // Never closed: all of the rest.
            rest = "";
            break;
        };
        out.push_str(close);
        rest = &inner[end + close.len()..];
    }
    out.push_str(rest);
    if !quoted && let Some(i) = out.find(": ") {
        out.truncate(i + 2);
        out.push_str("[masked]");
    }
    out.into_bytes()
}

/// Type OIDs whose text form holds nothing a detector looks for.
fn opaque_text(type_oid: u32) -> bool {
    matches!(
        type_oid,
        16 | 21 | 23 | 26 | 700 | 701 | 1082 | 1083 | 1114 | 1184 | 1186 | 1266 | 2950
    )
}

/// Type OIDs whose binary form is their text (jsonb after a version byte).
fn text_like(type_oid: u32) -> Option<usize> {
    match type_oid {
        25 | 1043 | 1042 | 19 | 114 | 142 | 705 | 18 => Some(0),
        3802 => Some(1),
        _ => None,
    }
}

/// One column of the current result: what is done to its values for the
/// client (after `unmask`) and for the record (always masked).
#[derive(Debug, Clone)]
struct Column {
    client: Step,
    log: Step,
    /// Binary format.
    binary: bool,
    /// Bytes before a binary value's text (jsonb's version byte).
    skip: usize,
}

/// One session's masking of its response stream.
pub(crate) struct ResponseMask {
    masker: Masker,
    record_max_bytes: usize,
    catalogue: Catalogue,
    /// The current result's columns, and whether any is masked for the
    /// client.
    plan: Vec<Column>,
    active: bool,
    copy: Option<Copy>,
    /// The current COPY out is shown to the client as it is (`unmask`).
    copy_unmasked: bool,
    /// `unmask` decisions of this session: (table, column) → allowed.
    unmasked: Vec<(String, String, bool)>,
    scratch: Vec<u8>,
    /// What was masked for the client, since it was last taken.
    pub stats: Stats,
}

/// Most `unmask` decisions a session remembers.
const UNMASK_MEMO: usize = 512;

/// A value as masked: unchanged, NULL, or new bytes.
enum Masked {
    Same,
    Null,
    New(Vec<u8>),
}

impl ResponseMask {
    pub fn new(target: &TargetMasking, catalogue: Catalogue) -> Self {
        ResponseMask {
            masker: Masker::new(target.rules.clone(), &target.key),
            record_max_bytes: target.record_max_bytes,
            catalogue,
            plan: Vec::new(),
            active: false,
            copy: None,
            copy_unmasked: false,
            unmasked: Vec::new(),
            scratch: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Most bytes of rows a command's response record carries.
    pub fn record_max_bytes(&self) -> usize {
        self.record_max_bytes
    }

    /// The bundle changed: decisions are taken again.
    pub fn forget_decisions(&mut self) {
        self.unmasked.clear();
    }

    fn may_unmask(
        &mut self,
        table: &str,
        column: &str,
        decide: &mut impl FnMut(&str, &str) -> bool,
    ) -> bool {
        if let Some((_, _, ok)) = self
            .unmasked
            .iter()
            .find(|(t, c, _)| t == table && c == column)
        {
            return *ok;
        }
        let ok = decide(table, column);
        if self.unmasked.len() >= UNMASK_MEMO {
            self.unmasked.clear();
        }
        self.unmasked.push((table.into(), column.into(), ok));
        ok
    }

    /// The rule columns result column `i` of `n` is computed from, as its
    /// statement's text tells; a result of unknown origin, or computed by a
    /// function that reads what the text does not name, may come from any
    /// (`("", "")` asks Cedar about all).
    fn computed_from(&self, outputs: &Outputs, i: usize, n: usize) -> Vec<(String, String)> {
        let rules = &self.masker.rules().columns;
        let Outputs::Known(_) = outputs else {
            return match rules.first() {
                Some(_) => vec![(String::new(), String::new())],
                None => Vec::new(),
            };
        };
        let mut sources = Vec::new();
        for o in outputs.column(i, n) {
            self.ruled_sources(o, &mut sources);
        }
        sources.sort();
        sources.dedup();
        sources
    }

    /// The rule columns an entry's values come from, added to `sources`
    /// (`("", "")`: any).
    fn ruled_sources(&self, o: &Output, sources: &mut Vec<(String, String)>) {
        let rules = &self.masker.rules().columns;
        if self.catalogue.opaque(o) && !rules.is_empty() {
            sources.push((String::new(), String::new()));
        }
        for (t, c) in &o.columns {
            match self.catalogue.named(t, c) {
                Some(source) => sources.push(source.clone()),
                // A table the session's catalogue does not know (made
                // since): by the rules' patterns.
                None if self.masker.column_style(Some(t), c).is_some() => {
                    sources.push((t.clone(), c.clone()));
                }
                None => {}
            }
        }
        for t in &o.rows {
            match self.catalogue.table(t) {
                Some(source) => sources.push(source.clone()),
                None => {
                    if let Some(rule) = rules.iter().find(|r| r.pattern.names_table(t)) {
                        sources.push((t.clone(), rule.pattern.column().to_owned()));
                    }
                }
            }
        }
    }

    /// A result's shape: the plan for its rows. `outputs`: what the
    /// statement's text says its columns are computed from. `decide(table,
    /// column)` is Cedar's `unmask`. False if the description is malformed.
    pub fn row_description(
        &mut self,
        body: &[u8],
        outputs: &Outputs,
        mut decide: impl FnMut(&str, &str) -> bool,
    ) -> bool {
        self.end_result();
        let mut r = Reader(body);
        let Some(n) = r.i16() else { return false };
        let n = n.max(0) as usize;
        for i in 0..n {
            let (Some(name), Some(table_oid), Some(attnum), Some(type_oid)) =
                (r.cstr(), r.u32(), r.i16(), r.u32())
            else {
                return false;
            };
            let (Some(_), Some(_), Some(format)) = (r.i16(), r.i32(), r.i16()) else {
                return false;
            };
            let name = String::from_utf8_lossy(name);
            let known = self.catalogue.origin(table_oid, attnum).cloned();
            // The rule columns its values come from: by its origin, else
            // (a computed value) by what the text computes it from.
            let sources = match &known {
                Some(source) => vec![source.clone()],
                None if table_oid == 0 => self.computed_from(outputs, i, n),
                None => Vec::new(),
            };
            let rule = sources
                .iter()
                .find_map(|(t, c)| match (t.is_empty(), c.is_empty()) {
                    // Of unknown origin: no rule's style says more.
                    (true, true) => Some(Style::Redact),
                    _ => self.masker.column_style(Some(t), c).cloned(),
                })
                .or_else(|| self.masker.column_style(None, &name).cloned());
            let binary = format == 1;
            // A column named like a secret (`password`, `api_key`, …) is
            // never recorded as it is, whatever masking says.
            let secret = gatehouse_policies::is_secret_name(&name)
                || known
                    .as_ref()
                    .is_some_and(|(_, c)| gatehouse_policies::is_secret_name(c));
            let mut log = match (&rule, binary, text_like(type_oid)) {
                (Some(style), false, _) | (Some(style), true, Some(_)) => {
                    Step::Whole(style.clone())
                }
                (Some(_), true, None) => Step::Null,
                (None, _, _) if self.masker.rules().detectors.is_empty() => Step::Keep,
                (None, false, _) if opaque_text(type_oid) => Step::Keep,
                (None, false, _) | (None, true, Some(_)) => Step::Detect,
                (None, true, None) => Step::Keep,
            };
            // Cedar is asked about each column the values come from.
            let asks = match (&rule, &known) {
                (Some(_), _) if !sources.is_empty() => sources,
                (_, Some(source)) => vec![source.clone()],
                _ => vec![(String::new(), name.to_string())],
            };
            let client = if log == Step::Keep
                || asks.iter().all(|(t, c)| self.may_unmask(t, c, &mut decide))
            {
                Step::Keep
            } else {
                log.clone()
            };
            if secret && !matches!(log, Step::Whole(_) | Step::Null) {
                log = match (binary, text_like(type_oid)) {
                    (true, None) => Step::Null,
                    _ => Step::Whole(Style::Redact),
                };
            }
            self.active |= client != Step::Keep;
            self.plan.push(Column {
                client,
                log,
                binary,
                skip: if binary {
                    text_like(type_oid).unwrap_or(0)
                } else {
                    0
                },
            });
        }
        true
    }

    /// The result ended: rows that follow belong to another.
    pub fn end_result(&mut self) {
        self.plan.clear();
        self.active = false;
        self.copy = None;
        self.copy_unmasked = false;
    }

    /// Whether a `DataRow` of the current result needs [`Self::data_row`].
    pub fn masks_rows(&self) -> bool {
        self.active
    }

    fn mask_value(&mut self, step: &Step, skip: usize, v: &[u8], stats: &mut Stats) -> Masked {
        match step {
            Step::Keep => Masked::Same,
            Step::Null => Masked::Null,
            _ if v.len() < skip => Masked::Same,
            Step::Detect | Step::Whole(_) => {
                let rule = match step {
                    Step::Whole(s) => Some(s),
                    _ => None,
                };
                let mut scratch = std::mem::take(&mut self.scratch);
                let masked = if self.masker.mask(&v[skip..], rule, &mut scratch, stats) {
                    let mut whole = Vec::with_capacity(skip + scratch.len());
                    whole.extend_from_slice(&v[..skip]);
                    whole.extend_from_slice(&scratch);
                    Masked::New(whole)
                } else {
                    Masked::Same
                };
                self.scratch = scratch;
                masked
            }
        }
    }

    /// Appends a `DataRow` frame to `out`, masked. False if it does not
    /// match the result's description.
    pub fn data_row(&mut self, frame: &[u8], out: &mut BytesMut) -> bool {
        let start = out.len();
        out.extend_from_slice(frame);
        let Some(values) = Values::of(&frame[5..], self.plan.len()) else {
            return false;
        };
        // Once a value changed, `out` is rewritten from there on.
        let mut rewriting = false;
        let mut stats = std::mem::take(&mut self.stats);
        for (i, (at, value)) in values.enumerate() {
            let Some(value) = value else {
                if rewriting {
                    out.put_i32(-1);
                }
                continue;
            };
            let column = &self.plan[i];
            let (step, skip) = (column.client.clone(), column.skip);
            let masked = self.mask_value(&step, skip, value, &mut stats);
            if !rewriting && !matches!(masked, Masked::Same) {
                out.truncate(start + 5 + at);
                rewriting = true;
            }
            if rewriting {
                match masked {
                    Masked::Same => {
                        out.put_i32(value.len() as i32);
                        out.extend_from_slice(value);
                    }
                    Masked::Null => out.put_i32(-1),
                    Masked::New(v) => {
                        out.put_i32(v.len() as i32);
                        out.extend_from_slice(&v);
                    }
                }
            }
        }
        self.stats = stats;
        if rewriting {
            let len = (out.len() - start - 1) as i32;
            out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        }
        true
    }

    /// A `DataRow` as it is recorded: every value masked by the rules,
    /// whatever `unmask` let the client see. `None` if it does not match
    /// the result's description.
    pub fn recorded_row(&mut self, frame: &[u8]) -> Option<Vec<Option<Cell>>> {
        let values = Values::of(&frame[5..], self.plan.len())?;
        let mut cells = Vec::with_capacity(self.plan.len());
        let mut uncounted = Stats::default();
        for (i, (_, value)) in values.enumerate() {
            let Some(value) = value else {
                cells.push(None);
                continue;
            };
            let column = &self.plan[i];
            let (step, skip, binary) = (column.log.clone(), column.skip, column.binary);
            cells.push(match self.mask_value(&step, skip, value, &mut uncounted) {
                Masked::Same => Some(cell(value, binary)),
                Masked::Null => None,
                Masked::New(v) => Some(cell(&v, binary)),
            });
        }
        Some(cells)
    }

    /// COPY data as it is recorded: masked by the detectors. `sent` is
    /// what the client got of the `original` frame. `None` if binary COPY
    /// data cannot be read.
    pub fn recorded_copy(&mut self, original: &[u8], sent: &[u8]) -> Option<Cell> {
        if self.copy.is_some() && self.copy_unmasked {
            let mut out = BytesMut::new();
            let binary = self.copy != Some(Copy::Text);
            if !self.copy_body(&original[5..], &mut out, &mut Stats::default()) {
                return None;
            }
            return Some(cell(&out, binary));
        }
        Some(cell(&sent[5..], self.copy.is_some_and(|c| c != Copy::Text)))
    }

    /// `CopyOutResponse`: its data is masked by [`Self::copy_data`] unless
    /// `unmask` (asked with no table or column: COPY names none) lets the
    /// client see it as it is; the record is masked either way.
    pub fn copy_out(&mut self, body: &[u8], mut decide: impl FnMut(&str, &str) -> bool) {
        self.end_result();
        if self.masker.rules().detectors.is_empty() {
            return;
        }
        self.copy = Some(if body.first() == Some(&1) {
            Copy::BinaryHeader
        } else {
            Copy::Text
        });
        self.copy_unmasked = self.may_unmask("", "", &mut decide);
    }

    /// Whether a `COPY … TO` must be refused: the target has column rules
    /// (which COPY data, naming no columns, cannot be masked by) and
    /// `unmask` (asked with table and column empty) does not apply.
    pub fn copy_out_refused(&mut self, mut decide: impl FnMut(&str, &str) -> bool) -> bool {
        !self.masker.rules().columns.is_empty() && !self.may_unmask("", "", &mut decide)
    }

    /// Why a statement must be refused to a principal `unmask` does not
    /// apply to, where the target has column rules: it stores values of a
    /// masked column (into a table or a view, where no rule follows them),
    /// or runs code from text or defines code to run later (`DO`,
    /// `query_to_xml`, `CREATE FUNCTION`, `CREATE RULE`, …), which may.
    /// Procedures and functions already defined are the database's own
    /// code: what they return is masked, what they store is theirs.
    pub fn store_refusal(
        &mut self,
        facts: &StatementFacts,
        mut decide: impl FnMut(&str, &str) -> bool,
    ) -> Option<String> {
        if self.masker.rules().columns.is_empty() {
            return None;
        }
        if facts.stores.opaque {
            return (!self.may_unmask("", "", &mut decide)).then(|| {
                "code run from text or defined to run later is refused here: this target masks \
                 columns, and such code could copy their values where masking does not follow \
                 them"
                    .to_owned()
            });
        }
        let mut sources = Vec::new();
        self.ruled_sources(&facts.stores, &mut sources);
        let (t, c) = sources
            .into_iter()
            .find(|(t, c)| !self.may_unmask(t, c, &mut decide))?;
        let column = if t.is_empty() {
            "a masked column".to_owned()
        } else {
            format!("the masked column {t}.{c}")
        };
        Some(format!(
            "this statement would store values of {column} where masking does not follow them; \
             only those allowed to unmask it may copy it"
        ))
    }

    /// Whether the errors and notices of a command quote values masked
    /// for this principal: a statement of it names a column with a rule
    /// (anywhere, a filter too: `WHERE nickname::regclass IS NULL` fails
    /// quoting the value) that `unmask` does not apply to. Their quoted
    /// values are then masked ([`Self::error_or_notice`]).
    pub fn masks_quotes<'a>(
        &mut self,
        statements: impl IntoIterator<Item = &'a StatementFacts>,
        mut decide: impl FnMut(&str, &str) -> bool,
    ) -> bool {
        if self.masker.rules().columns.is_empty() {
            return false;
        }
        let mut sources = Vec::new();
        for s in statements {
            self.ruled_sources(&s.mentions, &mut sources);
            // A cursor's rows are computed by text not at hand.
            if s.outputs == Outputs::Unknown {
                sources.push((String::new(), String::new()));
            }
        }
        sources.sort();
        sources.dedup();
        sources
            .iter()
            .any(|(t, c)| !self.may_unmask(t, c, &mut decide))
    }

    /// Whether `CopyData` needs [`Self::copy_data`].
    pub fn masks_copy(&self) -> bool {
        self.copy.is_some() && !self.copy_unmasked
    }

    /// Appends a `CopyData` frame of a COPY out to `out`, masked. False if
    /// binary COPY data cannot be read.
    pub fn copy_data(&mut self, frame: &[u8], out: &mut BytesMut) -> bool {
        let start = out.len();
        out.put_u8(b'd');
        out.put_i32(0);
        let mut stats = std::mem::take(&mut self.stats);
        let ok = self.copy_body(&frame[5..], out, &mut stats);
        self.stats = stats;
        let len = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        ok
    }

    /// COPY data masked by the detectors, appended to `out`.
    fn copy_body(&mut self, data: &[u8], out: &mut BytesMut, stats: &mut Stats) -> bool {
        match self.copy {
            None => {
                out.extend_from_slice(data);
                true
            }
            Some(Copy::Text) => {
                let mut scratch = std::mem::take(&mut self.scratch);
                if self.masker.mask(data, None, &mut scratch, stats) {
                    out.extend_from_slice(&scratch);
                } else {
                    out.extend_from_slice(data);
                }
                self.scratch = scratch;
                true
            }
            Some(Copy::BinaryHeader | Copy::Binary) => self.binary_copy(data, out, stats),
        }
    }

    /// Binary COPY data: an optional header, then whole tuples (PostgreSQL
    /// sends one per message) or the trailer.
    fn binary_copy(&mut self, mut data: &[u8], out: &mut BytesMut, stats: &mut Stats) -> bool {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        if self.copy == Some(Copy::BinaryHeader) {
            let Some(rest) = data.strip_prefix(SIGNATURE) else {
                return false;
            };
            let mut r = Reader(rest);
            let (Some(_flags), Some(ext)) = (r.i32(), r.i32()) else {
                return false;
            };
            let Some(header_len) = (SIGNATURE.len() + 8).checked_add(ext.max(0) as usize) else {
                return false;
            };
            if data.len() < header_len {
                return false;
            }
            out.extend_from_slice(&data[..header_len]);
            data = &data[header_len..];
            self.copy = Some(Copy::Binary);
        }
        while !data.is_empty() {
            let Some(n) = Reader(data).i16() else {
                return false;
            };
            out.put_i16(n);
            data = &data[2..];
            if n < 0 {
                continue;
            }
            for _ in 0..n {
                let Some(len) = Reader(data).i32() else {
                    return false;
                };
                data = &data[4..];
                if len < 0 {
                    out.put_i32(len);
                    continue;
                }
                let Some(v) = data.get(..len as usize) else {
                    return false;
                };
                data = &data[len as usize..];
                let mut scratch = std::mem::take(&mut self.scratch);
                let changed = std::str::from_utf8(v).is_ok()
                    && self.masker.mask(v, None, &mut scratch, stats);
                let v = if changed { &scratch[..] } else { v };
                out.put_i32(v.len() as i32);
                out.extend_from_slice(v);
                self.scratch = scratch;
            }
        }
        true
    }

    /// Appends a `NotificationResponse` frame to `out`, its payload masked
    /// by the detectors unless `unmask` (asked with no table or column)
    /// lets the client see it as it is.
    pub fn notification(
        &mut self,
        frame: &[u8],
        out: &mut BytesMut,
        mut decide: impl FnMut(&str, &str) -> bool,
    ) {
        let body = &frame[5..];
        let parts = body.get(4..).and_then(|rest| {
            let channel_end = rest.iter().position(|&b| b == 0)?;
            let payload = &rest[channel_end + 1..];
            let payload_end = payload.iter().position(|&b| b == 0)?;
            Some((&body[..4 + channel_end + 1], &payload[..payload_end]))
        });
        let Some((head, payload)) = parts else {
            out.extend_from_slice(frame);
            return;
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let masked = !self.masker.rules().detectors.is_empty()
            && !self.may_unmask("", "", &mut decide)
            && self
                .masker
                .mask(payload, None, &mut scratch, &mut self.stats);
        if masked {
            out.put_u8(b'A');
            out.put_i32((4 + head.len() + scratch.len() + 1) as i32);
            out.extend_from_slice(head);
            out.extend_from_slice(&scratch);
            out.put_u8(0);
        } else {
            out.extend_from_slice(frame);
        }
        self.scratch = scratch;
    }

    /// Appends an `ErrorResponse` or `NoticeResponse` frame to `out`, its
    /// values masked. `decide` is Cedar's `unmask`.
    pub fn error_or_notice(
        &mut self,
        frame: &[u8],
        out: &mut BytesMut,
        quotes: bool,
        mut decide: impl FnMut(&str, &str) -> bool,
    ) {
        let body = &frame[5..];
        let fields: Vec<(u8, &[u8])> = body
            .split(|&b| b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| (f[0], &f[1..]))
            .collect();
        let table = fields
            .iter()
            .find(|(t, _)| *t == b't')
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        // A data exception quotes the value it failed on (`invalid input
        // syntax for type integer: "ally"`), which may be of a rule column
        // (`SELECT nickname::int`), and so may another error of a command
        // naming one (`relation "ally" does not exist`, of
        // `nickname::regclass`): only `unmask` shows it.
        let data_exception = fields
            .iter()
            .any(|(t, v)| *t == b'C' && v.starts_with(b"22"))
            && !self.masker.rules().columns.is_empty()
            && !self.may_unmask("", "", &mut decide);
        let start = out.len();
        out.put_u8(frame[0]);
        out.put_i32(0);
        for (tag, value) in fields {
            out.put_u8(tag);
            let mut text = value.to_vec();
            if tag == b'D' {
                text = self.quoted_values(&text, table.as_deref(), &mut decide);
            }
            if data_exception {
                text = match tag {
                    b'M' => failed_value(&text),
                    b'D' | b'W' | b'H' if !text.is_empty() => b"[masked]".to_vec(),
                    _ => text,
                };
            } else if quotes && matches!(tag, b'M' | b'D' | b'W' | b'H') {
                text = failed_value(&text);
            }
            if matches!(tag, b'M' | b'D' | b'H' | b'W' | b'q' | b'P' | b'p') {
                let mut scratch = std::mem::take(&mut self.scratch);
                if self.masker.mask(&text, None, &mut scratch, &mut self.stats) {
                    std::mem::swap(&mut text, &mut scratch);
                }
                self.scratch = scratch;
            }
            // A field ends at its NUL: none may come from a masked value.
            text.retain(|&b| b != 0);
            out.extend_from_slice(&text);
            out.put_u8(0);
        }
        out.put_u8(0);
        let len = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }

    /// A detail quoting values (`Key (a, b)=(x, y) …`, `Failing row
    /// contains (…)`): its values as `[masked]` when a column rule names
    /// one of its columns (for a failing row, whose columns it does not
    /// name: when there are column rules at all) and `unmask` does not
    /// apply (asked for the table and, for a failing row, column "").
    fn quoted_values(
        &mut self,
        detail: &[u8],
        table: Option<&str>,
        decide: &mut impl FnMut(&str, &str) -> bool,
    ) -> Vec<u8> {
        const FAILING: &str = "Failing row contains (";
        let text = String::from_utf8_lossy(detail);
        let t = table.unwrap_or("");
        let (head, values) = if let Some((cols, values)) = text
            .strip_prefix("Key (")
            .and_then(|rest| rest.split_once(")=("))
        {
            let masked = cols.split(", ").map(|c| c.trim_matches('"')).any(|c| {
                self.masker.column_style(table, c).is_some() && !self.may_unmask(t, c, decide)
            });
            if !masked {
                return detail.to_vec();
            }
            (format!("Key ({cols})=("), values)
        } else if let Some(values) = text.strip_prefix(FAILING) {
            if self.masker.rules().columns.is_empty() || self.may_unmask(t, "", decide) {
                return detail.to_vec();
            }
            (FAILING.to_string(), values)
        } else {
            return detail.to_vec();
        };
        self.stats.values += 1;
        self.stats.by_column += 1;
        let tail = values.rfind(')').map_or("", |i| &values[i..]);
        format!("{head}[masked]{tail}").into_bytes()
    }
}

/// A recorded value: text as it is, binary as base64.
fn cell(data: &[u8], binary: bool) -> Cell {
    if binary {
        Cell::Binary {
            base64: base64::engine::general_purpose::STANDARD.encode(data),
        }
    } else {
        Cell::Text(String::from_utf8_lossy(data).into_owned())
    }
}

/// The values of a `DataRow` body: `(offset of the value's length, the
/// value)`, checked whole first against the column count.
struct Values<'a> {
    body: &'a [u8],
    pos: usize,
    left: usize,
}

impl<'a> Values<'a> {
    fn of(body: &'a [u8], columns: usize) -> Option<Self> {
        let n = Reader(body).i16()?;
        if n < 0 || n as usize != columns {
            return None;
        }
        let mut pos = 2;
        for _ in 0..n {
            let len = Reader(body.get(pos..)?).i32()?;
            pos += 4 + len.max(0) as usize;
        }
        (pos == body.len()).then_some(Values {
            body,
            pos: 2,
            left: columns,
        })
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = (usize, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.pos;
        let len = i32::from_be_bytes(self.body[at..at + 4].try_into().ok()?);
        self.pos += 4;
        if len < 0 {
            return Some((at, None));
        }
        let value = &self.body[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Some((at, Some(value)))
    }
}

/// Big-endian reads from a message body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take().map(i32::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: u32 = 25;
    const INT4: u32 = 23;
    const JSONB: u32 = 3802;

    /// `(name, table oid, column number, type, format)`.
    fn row_description(cols: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(cols.len() as i16);
        for (name, table, attnum, ty, format) in cols {
            b.extend_from_slice(name.as_bytes());
            b.put_u8(0);
            b.put_u32(*table);
            b.put_i16(*attnum);
            b.put_u32(*ty);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(*format);
        }
        b.to_vec()
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'D');
        b.put_i32(0);
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
            }
        }
        let len = (b.len() - 1) as i32;
        b[1..5].copy_from_slice(&len.to_be_bytes());
        b.to_vec()
    }

    fn values(frame: &[u8]) -> Vec<Option<Vec<u8>>> {
        let declared = i32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(declared, frame.len() - 1, "the length is the frame's");
        let mut r = Reader(&frame[5..]);
        let n = r.i16().unwrap();
        (0..n)
            .map(|_| {
                let len = r.i32().unwrap();
                (len >= 0).then(|| {
                    let v = r.0[..len as usize].to_vec();
                    r.0 = &r.0[len as usize..];
                    v
                })
            })
            .collect()
    }

    fn mask(columns: &[(&str, StyleName)]) -> ResponseMask {
        let config = MaskingConfig {
            columns: columns
                .iter()
                .map(|(p, s)| ColumnRuleConfig {
                    pattern: (*p).into(),
                    style: *s,
                    keep_last: 4,
                })
                .collect(),
            ..Default::default()
        };
        let target = config.build("t").unwrap();
        let mut catalogue = Catalogue::new();
        catalogue.column(1000, 3, ("users", "ssn"), ("users", "ssn"));
        ResponseMask::new(&target, catalogue)
    }

    #[test]
    fn text_rows_are_masked_value_by_value_and_clean_rows_copied_whole() {
        let mut m = mask(&[("users.ssn", StyleName::Partial)]);
        let desc = row_description(&[
            ("id", 1000, 1, INT4, 0),
            ("contact", 1000, 2, TEXT, 0),
            // Aliased: the catalogue still says it is users.ssn.
            ("x", 1000, 3, TEXT, 0),
            ("note", 0, 0, TEXT, 0),
        ]);
        assert!(m.row_description(&desc, &Outputs::none(), |_, _| false));
        assert!(m.masks_rows());

        let clean = data_row(&[Some(b"1"), Some(b"hello"), None, Some(b"fine")]);
        let mut out = BytesMut::new();
        assert!(m.data_row(&clean, &mut out));
        assert_eq!(
            &out[..],
            &clean[..],
            "a row nothing changes in is as it was"
        );

        let row = data_row(&[
            Some(b"2"),
            Some(b"write to alice@example.com"),
            Some(b"123-45-6789"),
            None,
        ]);
        out.clear();
        out.extend_from_slice(b"before");
        assert!(m.data_row(&row, &mut out));
        assert_eq!(&out[..6], b"before", "appended after what was there");
        assert_eq!(
            values(&out[6..]),
            vec![
                Some(b"2".to_vec()),
                Some(b"write to [masked:email]".to_vec()),
                Some(b"***-**-6789".to_vec()),
                None,
            ]
        );
        assert_eq!(m.stats.values, 2);
        assert_eq!(m.stats.by_column, 1);
    }

    fn outputs(sql: &str) -> Outputs {
        let c = gatehouse_policies::classify(sql, gatehouse_policies::Reading::default());
        c.statements[0].outputs.clone()
    }

    /// A value computed from a rule column has no origin in its
    /// description: the statement's text says where it comes from.
    #[test]
    fn values_computed_from_rule_columns_are_masked_as_the_column() {
        let mut m = mask(&[("users.ssn", StyleName::Partial)]);
        let o = outputs("SELECT id, upper(ssn) AS u, lower(note), row_to_json(x) FROM users x");
        let desc = row_description(&[
            ("id", 1000, 1, INT4, 0),
            ("u", 0, 0, TEXT, 0),
            ("lower", 0, 0, TEXT, 0),
            ("row_to_json", 0, 0, 114, 0),
        ]);
        let mut asked = Vec::new();
        assert!(m.row_description(&desc, &o, |t, c| {
            asked.push(format!("{t}.{c}"));
            false
        }));
        assert_eq!(asked, ["users.ssn", ".lower"]);
        let row = data_row(&[
            Some(b"1"),
            Some(b"123-45-6789"),
            Some(b"plain"),
            Some(br#"{"id":1,"ssn":"123456789"}"#),
        ]);
        let mut out = BytesMut::new();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(
            values(&out),
            vec![
                Some(b"1".to_vec()),
                Some(b"***-**-6789".to_vec()),
                Some(b"plain".to_vec()),
                // A whole row of users, masked whole.
                Some(br#"{"**":*,"***":"*****6789"}"#.to_vec()),
            ]
        );
        // Those `unmask` lets see users.ssn see what is computed from it.
        let mut m = mask(&[("users.ssn", StyleName::Partial)]);
        assert!(m.row_description(&desc, &o, |t, c| t == "users" && c == "ssn"));
        out.clear();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(values(&out)[1], Some(b"123-45-6789".to_vec()));

        // Binary: a text value in place, another type NULL.
        let mut m = mask(&[("users.ssn", StyleName::Partial)]);
        let o = outputs("SELECT upper(ssn), length(ssn) FROM users");
        let desc = row_description(&[("upper", 0, 0, TEXT, 1), ("length", 0, 0, INT4, 1)]);
        assert!(m.row_description(&desc, &o, |_, _| false));
        let row = data_row(&[Some(b"123-45-6789"), Some(&[0, 0, 0, 11])]);
        out.clear();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(values(&out), vec![Some(b"***-**-6789".to_vec()), None]);
    }

    /// Rows whose origin the text does not tell (a cursor's) have their
    /// computed values masked wherever there are column rules; the whole
    /// row of a table with a rule column is masked.
    #[test]
    fn values_of_unknown_origin_and_whole_rows_are_masked() {
        let mut m = mask(&[("users.ssn", StyleName::Redact)]);
        let desc = row_description(&[
            ("ssn", 1000, 3, TEXT, 0),
            ("upper", 0, 0, TEXT, 0),
            ("users", 1000, 0, 16400, 0),
            ("other", 1001, 0, 16401, 0),
        ]);
        let mut asked = Vec::new();
        assert!(m.row_description(&desc, &Outputs::Unknown, |t, c| {
            asked.push(format!("{t}.{c}"));
            false
        }));
        assert_eq!(asked, ["users.ssn", ".", ".other"]);
        let row = data_row(&[Some(b"1"), Some(b"2"), Some(b"(1,2)"), Some(b"(3)")]);
        let mut out = BytesMut::new();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(
            values(&out),
            vec![
                Some(b"[masked]".to_vec()),
                Some(b"[masked]".to_vec()),
                Some(b"[masked]".to_vec()),
                Some(b"(3)".to_vec()),
            ]
        );
        // Without column rules, nothing is of a rule column.
        let mut m = mask(&[]);
        assert!(m.row_description(&desc, &Outputs::Unknown, |_, _| false));
        out.clear();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(values(&out)[1], Some(b"2".to_vec()));
    }

    #[test]
    fn unmask_is_asked_once_per_column_and_keeps_it_clear() {
        let mut m = mask(&[("users.ssn", StyleName::Redact)]);
        let desc = row_description(&[("x", 1000, 3, TEXT, 0), ("email", 0, 0, TEXT, 0)]);
        let mut asked = Vec::new();
        for _ in 0..3 {
            assert!(m.row_description(&desc, &Outputs::none(), |t, c| {
                asked.push(format!("{t}.{c}"));
                c == "ssn"
            }));
        }
        assert_eq!(asked, ["users.ssn", ".email"], "by real table and column");
        let row = data_row(&[Some(b"123-45-6789"), Some(b"a@example.com")]);
        let mut out = BytesMut::new();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(
            values(&out),
            vec![
                Some(b"123-45-6789".to_vec()),
                Some(b"[masked:email]".to_vec())
            ]
        );
        m.forget_decisions();
        assert!(m.row_description(&desc, &Outputs::none(), |_, _| false));
        out.clear();
        assert!(m.data_row(&row, &mut out));
        assert_eq!(values(&out)[0], Some(b"[masked]".to_vec()));
    }

    #[test]
    fn records_are_masked_whatever_unmask_and_secret_columns_are_never_recorded() {
        let mut m = mask(&[]);
        let desc = row_description(&[
            ("email", 0, 0, TEXT, 0),
            ("password", 0, 0, TEXT, 0),
            ("api_key", 0, 0, INT4, 1),
        ]);
        assert!(
            m.row_description(&desc, &Outputs::none(), |_, _| true),
            "unmask: the client sees all"
        );
        let row = data_row(&[
            Some(b"a@example.com"),
            Some(b"hunter2"),
            Some(&[0, 0, 0, 9]),
        ]);
        let mut out = BytesMut::new();
        assert!(!m.masks_rows());
        assert!(m.data_row(&row, &mut out));
        assert_eq!(&out[..], &row[..]);
        let cells = m.recorded_row(&row).unwrap();
        assert_eq!(
            cells,
            vec![
                Some(Cell::Text("[masked:email]".into())),
                Some(Cell::Text("[masked]".into())),
                None,
            ]
        );
        assert_eq!(
            m.stats.values, 0,
            "what the record masks is not counted as shown"
        );
    }

    #[test]
    fn binary_text_is_masked_in_place_other_types_with_a_rule_become_null() {
        let mut m = mask(&[("age", StyleName::Redact)]);
        let desc = row_description(&[
            ("email", 0, 0, TEXT, 1),
            ("age", 0, 0, INT4, 1),
            ("profile", 0, 0, JSONB, 1),
            ("n", 0, 0, INT4, 1),
        ]);
        assert!(m.row_description(&desc, &Outputs::none(), |_, _| false));
        let row = data_row(&[
            Some(b"a@example.com"),
            Some(&41i32.to_be_bytes()),
            Some(b"\x01{\"c\": \"b@example.org\"}"),
            Some(&7i32.to_be_bytes()),
        ]);
        let mut out = BytesMut::new();
        assert!(m.data_row(&row, &mut out));
        let v = values(&out);
        assert_eq!(v[0], Some(b"[masked:email]".to_vec()));
        assert_eq!(v[1], None);
        let jsonb = v[2].as_deref().unwrap();
        assert_eq!(jsonb[0], 1, "the version byte stays");
        let json: serde_json::Value = serde_json::from_slice(&jsonb[1..]).unwrap();
        assert_eq!(json["c"], "[masked:email]");
        assert_eq!(v[3], Some(7i32.to_be_bytes().to_vec()));
    }

    #[test]
    fn a_result_of_opaque_types_is_not_looked_at_and_a_bad_row_is_refused() {
        let mut m = mask(&[]);
        let desc = row_description(&[("n", 0, 0, INT4, 0), ("b", 0, 0, 16, 0)]);
        assert!(m.row_description(&desc, &Outputs::none(), |_, _| false));
        assert!(
            !m.masks_rows(),
            "nothing to do: rows are forwarded as they are"
        );

        let desc = row_description(&[("t", 0, 0, TEXT, 0)]);
        assert!(m.row_description(&desc, &Outputs::none(), |_, _| false));
        let mut out = BytesMut::new();
        let two = data_row(&[Some(b"a"), Some(b"b")]);
        assert!(!m.data_row(&two, &mut out), "more values than columns");
        let mut short = data_row(&[Some(b"abc")]);
        short.truncate(short.len() - 1);
        assert!(!m.data_row(&short, &mut out), "a value past the end");
        assert!(!m.row_description(&desc[..desc.len() - 3], &Outputs::none(), |_, _| false));
    }

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'E');
        b.put_i32(0);
        for (t, v) in fields {
            b.put_u8(*t);
            b.extend_from_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let len = (b.len() - 1) as i32;
        b[1..5].copy_from_slice(&len.to_be_bytes());
        b.to_vec()
    }

    fn field(frame: &[u8], tag: u8) -> String {
        frame[5..]
            .split(|&b| b == 0)
            .find(|f| f.first() == Some(&tag))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    }

    /// `SELECT nickname::int` fails quoting the nickname.
    #[test]
    fn values_quoted_by_data_exceptions_are_masked() {
        let mut m = mask(&[("users.nick", StyleName::Redact)]);
        let frame = error(&[
            (b'C', "22P02"),
            (b'M', "invalid input syntax for type integer: \"ally\""),
            (b'W', "JSON data, line 1: ally"),
            (b'p', "8"),
        ]);
        let mut out = BytesMut::new();
        m.error_or_notice(&frame, &mut out, false, |_, _| false);
        assert_eq!(
            field(&out, b'M'),
            "invalid input syntax for type integer: \"[masked]\""
        );
        assert_eq!(field(&out, b'W'), "[masked]");
        assert_eq!(field(&out, b'p'), "8");
        out.clear();
        m.forget_decisions();
        m.error_or_notice(&frame, &mut out, false, |_, _| true);
        assert_eq!(&out[..], &frame[..], "unmask: as it was");
        // Another server language, or no quotes at all.
        assert_eq!(
            failed_value("ungültige Eingabesyntax für Typ integer: »ally«".as_bytes()),
            "ungültige Eingabesyntax für Typ integer: »[masked]«".as_bytes()
        );
        assert_eq!(failed_value(b"bad value: ally"), b"bad value: [masked]");
        assert_eq!(
            failed_value(b"unterminated \"ally"),
            b"unterminated \"[masked]"
        );
        // Not a data exception, or no column rules: the detectors only.
        let mut m = mask(&[]);
        out.clear();
        m.error_or_notice(&frame, &mut out, false, |_, _| false);
        assert_eq!(&out[..], &frame[..]);
    }

    /// `SELECT nickname::regclass` fails quoting the nickname, as a
    /// relation that does not exist: a command naming a masked column has
    /// the values its errors quote masked.
    #[test]
    fn errors_of_a_command_naming_a_masked_column_have_their_quotes_masked() {
        let mut m = mask(&[("users.nick", StyleName::Redact)]);
        let c = gatehouse_policies::classify(
            "SELECT 1 FROM users WHERE nick::regclass IS NULL",
            gatehouse_policies::Reading::default(),
        );
        assert!(m.masks_quotes(&c.statements, |_, _| false));
        m.forget_decisions();
        assert!(!m.masks_quotes(&c.statements, |t, c| t == "users" && c == "nick"));
        let other = gatehouse_policies::classify(
            "SELECT 1 FROM users WHERE email::regclass IS NULL",
            gatehouse_policies::Reading::default(),
        );
        m.forget_decisions();
        assert!(!m.masks_quotes(&other.statements, |_, _| false));
        let fetch = gatehouse_policies::classify("FETCH c", gatehouse_policies::Reading::default());
        assert!(
            m.masks_quotes(&fetch.statements, |_, _| false),
            "a cursor's"
        );
        let frame = error(&[
            (b'C', "42P01"),
            (b'M', "relation \"ally\" does not exist"),
            (b'P', "12"),
        ]);
        let mut out = BytesMut::new();
        m.error_or_notice(&frame, &mut out, true, |_, _| false);
        assert_eq!(field(&out, b'M'), "relation \"[masked]\" does not exist");
        out.clear();
        m.error_or_notice(&frame, &mut out, false, |_, _| false);
        assert_eq!(&out[..], &frame[..], "a command naming no masked column");
    }

    #[test]
    fn values_quoted_in_errors_are_masked() {
        let mut m = mask(&[("users.nick", StyleName::Redact)]);
        let frame = error(&[
            (b'S', "ERROR"),
            (b'C', "23505"),
            (
                b'M',
                "duplicate key value violates unique constraint \"users_nick_key\"",
            ),
            (b'D', "Key (nick)=(ally) already exists."),
            (b't', "users"),
        ]);
        let mut out = BytesMut::new();
        m.error_or_notice(&frame, &mut out, false, |_, _| false);
        assert_eq!(field(&out, b'D'), "Key (nick)=([masked]) already exists.");
        assert_eq!(field(&out, b'C'), "23505");
        assert_eq!(
            i32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
            out.len() - 1
        );

        out.clear();
        m.forget_decisions();
        m.error_or_notice(&frame, &mut out, false, |_, _| true);
        assert_eq!(&out[..], &frame[..], "unmasked: as it was");

        let frame = error(&[
            (b'C', "23505"),
            (b'D', "Key (email)=(a@example.com) already exists."),
            (b't', "users"),
        ]);
        out.clear();
        m.error_or_notice(&frame, &mut out, false, |_, _| false);
        assert_eq!(
            field(&out, b'D'),
            "Key (email)=([masked:email]) already exists.",
            "no rule for the column: the detectors"
        );

        let frame = error(&[
            (b'C', "23502"),
            (b'D', "Failing row contains (null, ally, 41)."),
            (b't', "users"),
        ]);
        out.clear();
        m.error_or_notice(&frame, &mut out, false, |_, _| false);
        assert_eq!(field(&out, b'D'), "Failing row contains ([masked]).");
    }

    #[test]
    fn notification_payloads_are_masked() {
        let mut m = mask(&[]);
        let frame = |payload: &str| {
            let mut b = BytesMut::new();
            b.put_u8(b'A');
            b.put_i32(0);
            b.put_i32(4242);
            b.extend_from_slice(b"events\0");
            b.extend_from_slice(payload.as_bytes());
            b.put_u8(0);
            let len = (b.len() - 1) as i32;
            b[1..5].copy_from_slice(&len.to_be_bytes());
            b.to_vec()
        };
        let mut out = BytesMut::new();
        m.notification(&frame("signup a@example.com"), &mut out, |_, _| false);
        assert_eq!(&out[..], &frame("signup [masked:email]")[..]);
        out.clear();
        m.notification(&frame("plain"), &mut out, |_, _| false);
        assert_eq!(&out[..], &frame("plain")[..]);
        let mut m = mask(&[]);
        out.clear();
        m.notification(&frame("signup a@example.com"), &mut out, |_, _| true);
        assert_eq!(&out[..], &frame("signup a@example.com")[..], "unmask");
    }

    #[test]
    fn binary_copy_is_read_tuple_by_tuple() {
        let mut m = mask(&[]);
        m.copy_out(&[1, 0, 1, 0, 1], |_, _| false);
        assert!(m.masks_copy());
        let frame = |data: &[u8]| {
            let mut b = BytesMut::new();
            b.put_u8(b'd');
            b.put_i32(data.len() as i32 + 4);
            b.extend_from_slice(data);
            b.to_vec()
        };
        let mut first = b"PGCOPY\n\xff\r\n\0".to_vec();
        first.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        first.extend_from_slice(&[0, 2, 0, 0, 0, 13]);
        first.extend_from_slice(b"a@example.com");
        first.extend_from_slice(&[255, 255, 255, 255]);
        let mut out = BytesMut::new();
        assert!(m.copy_data(&frame(&first), &mut out));
        let data = &out[5..];
        assert!(data.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert_eq!(&data[19..21], &[0, 2]);
        assert_eq!(&data[21..25], &14i32.to_be_bytes());
        assert_eq!(&data[25..39], b"[masked:email]");
        assert_eq!(&data[39..], &[255, 255, 255, 255]);

        out.clear();
        assert!(m.copy_data(&frame(&[255, 255]), &mut out), "the trailer");
        assert!(!m.copy_data(&frame(&[0, 1, 0, 0, 0, 9, b'x']), &mut out));
        m.copy = Some(Copy::BinaryHeader);
        assert!(!m.copy_data(&frame(b"not a header"), &mut out));
    }

    #[test]
    fn the_catalogue_query_quotes_patterns() {
        let config = MaskingConfig {
            columns: vec![
                ColumnRuleConfig {
                    pattern: "o'brien_*.e%".into(),
                    style: StyleName::Redact,
                    keep_last: 4,
                },
                ColumnRuleConfig {
                    pattern: "bare".into(),
                    style: StyleName::Redact,
                    keep_last: 4,
                },
            ],
            ..Default::default()
        };
        let q = config.build("t").unwrap().catalogue_query().unwrap();
        assert!(
            q.contains(
                "c.relname ILIKE 'o''brien!_%' ESCAPE '!' AND a.attname ILIKE 'e!%' ESCAPE '!'"
            ),
            "{q}"
        );
        // A rule without a table names a column of any: an alias
        // (`SELECT bare AS x`) is still followed to it.
        assert!(q.contains(" OR a.attname ILIKE 'bare' ESCAPE '!'"), "{q}");
        let none = MaskingConfig::default().build("t").unwrap();
        assert_eq!(none.catalogue_query(), None);
        for bad in ["", "a.b.c", ".x", "x."] {
            let c = MaskingConfig {
                columns: vec![ColumnRuleConfig {
                    pattern: bad.into(),
                    style: StyleName::Redact,
                    keep_last: 4,
                }],
                ..Default::default()
            };
            assert!(c.build("t").is_err(), "{bad:?}");
        }
        let c = MaskingConfig {
            detectors: vec!["email".into(), "nope".into()],
            ..Default::default()
        };
        assert!(
            c.build("t")
                .unwrap_err()
                .contains("unknown detector \"nope\"")
        );
    }
}
