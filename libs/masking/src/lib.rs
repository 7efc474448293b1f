//! Masking of response values, in memory and in one pass.
//!
//! A [`Masker`] holds a target's [`Rules`]: column rules (a column, by
//! `table.column` or a name pattern, is masked whole whatever it holds)
//! and content detectors ([`Detector`]: e-mail addresses, payment cards,
//! keys, … found inside any text value). Each rule has a [`Style`]:
//! redact, keep the last N characters, or a keyed pseudonym (HMAC-SHA256
//! under the masker's key, so a value masks to the same pseudonym in every
//! query and joins or `GROUP BY` still work). JSON values are masked field
//! by field: a key that matches a column pattern has its value masked
//! whole, and the detectors run on every string.
//!
//! No I/O; [`Masker::mask`] says whether a value changed and writes the
//! masked value only then. A value left as it is allocates nothing, except
//! a JSON document when column patterns are configured (it is parsed to
//! look at its keys).

pub mod detect;
mod json;

pub use detect::{Detector, Detectors, Hit, find};

use ring::hmac;

/// How a masked value is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Style {
    /// Replaced by `[masked]` (a whole value) or `[masked:<detector>]`.
    Redact,
    /// Letters and digits replaced by `*` but for the last `keep_last`;
    /// separators kept (`**** **** **** 1111`).
    Partial { keep_last: usize },
    /// `pseu_` and 16 hex digits of HMAC-SHA256(key, value): the same value
    /// gives the same pseudonym, under one key.
    Pseudonym,
}

/// A column pattern: `table.column` or `column`, compared ASCII
/// case-insensitively, `*` matching any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: &str) -> Self {
        Pattern(p.to_ascii_lowercase())
    }

    /// Whether the pattern has a table part that `table` matches.
    pub fn names_table(&self, table: &str) -> bool {
        self.0.split_once('.').is_some_and(|(t, _)| glob(t, table))
    }

    /// The column part.
    pub fn column(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(_, c)| c)
    }

    /// Whether the pattern names this column. A pattern with a table part
    /// matches only when the table is known.
    pub fn matches(&self, table: Option<&str>, column: &str) -> bool {
        match self.0.split_once('.') {
            Some((t, c)) => table.is_some_and(|table| glob(t, table) && glob(c, column)),
            None => glob(&self.0, column),
        }
    }
}

/// `*`-glob, ASCII case-insensitive (`pattern` is lower case).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni].to_ascii_lowercase() {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRule {
    pub pattern: Pattern,
    pub style: Style,
}

/// What a target masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub columns: Vec<ColumnRule>,
    pub detectors: Detectors,
    /// The style of what the detectors find.
    pub content_style: Style,
}

impl Default for Rules {
    /// Every detector, redacted; no column rules.
    fn default() -> Self {
        Rules {
            columns: Vec::new(),
            detectors: Detectors::all(),
            content_style: Style::Redact,
        }
    }
}

/// Counts of what was masked, per detector and by column rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Values changed.
    pub values: u64,
    /// Values masked whole by a column rule (or a JSON key matching one).
    pub by_column: u64,
    by_detector: [u64; Detector::ALL.len()],
}

impl Stats {
    pub fn detector(&self, d: Detector) -> u64 {
        self.by_detector[d as usize]
    }

    /// Non-zero counts, by detector name.
    pub fn detectors(&self) -> impl Iterator<Item = (Detector, u64)> + '_ {
        Detector::ALL
            .into_iter()
            .map(|d| (d, self.by_detector[d as usize]))
            .filter(|&(_, n)| n > 0)
    }

    pub fn add(&mut self, other: &Stats) {
        self.values += other.values;
        self.by_column += other.by_column;
        for (a, b) in self.by_detector.iter_mut().zip(other.by_detector) {
            *a += b;
        }
    }
}

/// Masks values by a target's rules.
pub struct Masker {
    rules: Rules,
    key: hmac::Key,
    /// Scratch space for the detectors' hits.
    hits: Vec<Hit>,
}

impl Masker {
    /// `key` keys the pseudonyms; keep it secret and stable, or pseudonyms
    /// change (and can be guessed for small value spaces without it).
    pub fn new(rules: Rules, key: &[u8]) -> Self {
        Masker {
            rules,
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            hits: Vec::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The rule that masks this column whole, if any: the first that
    /// matches.
    pub fn column_style(&self, table: Option<&str>, column: &str) -> Option<&Style> {
        self.rules
            .columns
            .iter()
            .find(|r| r.pattern.matches(table, column))
            .map(|r| &r.style)
    }

    /// Masks one text value (UTF-8). `column` is the style of the column
    /// rule that applies, if any: then the whole value is masked. Returns
    /// true, with the masked value in `out` (cleared first), if anything
    /// changed; false, leaving `out` empty, if the value stays as it is.
    pub fn mask(
        &mut self,
        value: &[u8],
        column: Option<&Style>,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> bool {
        out.clear();
        if let Some(style) = column {
            self.styled(value, style, None, out);
            stats.values += 1;
            stats.by_column += 1;
            return true;
        }
        if json::looks_like_json(value) && !self.rules.columns.is_empty() {
            if let Some(changed) = json::mask(self, value, out, stats) {
                if changed {
                    stats.values += 1;
                }
                return changed;
            }
            out.clear();
        }
        if self.mask_content(value, out, stats) {
            stats.values += 1;
            true
        } else {
            false
        }
    }

    /// The detectors' hits in `value` replaced; false (and `out` untouched)
    /// if there are none.
    fn mask_content(&mut self, value: &[u8], out: &mut Vec<u8>, stats: &mut Stats) -> bool {
        let mut hits = std::mem::take(&mut self.hits);
        find(value, self.rules.detectors, &mut hits);
        let changed = !hits.is_empty();
        if changed {
            let style = self.rules.content_style.clone();
            let mut at = 0;
            for h in &hits {
                out.extend_from_slice(&value[at..h.start]);
                self.styled(&value[h.start..h.end], &style, Some(h.detector), out);
                stats.by_detector[h.detector as usize] += 1;
                at = h.end;
            }
            out.extend_from_slice(&value[at..]);
        }
        self.hits = hits;
        changed
    }

    /// `value` in `style`, appended to `out`. Only ASCII letters, digits,
    /// `*`, `[`, `]`, `:` and `_` are written in place of a value, so a
    /// masked span never breaks the JSON or CSV it sits in.
    fn styled(&self, value: &[u8], style: &Style, detector: Option<Detector>, out: &mut Vec<u8>) {
        match style {
            Style::Redact => {
                out.extend_from_slice(b"[masked");
                if let Some(d) = detector {
                    out.push(b':');
                    out.extend_from_slice(d.name().as_bytes());
                }
                out.push(b']');
            }
            Style::Partial { keep_last } => {
                let text = String::from_utf8_lossy(value);
                let total = text.chars().filter(|c| c.is_alphanumeric()).count();
                let hide = total.saturating_sub(*keep_last);
                let mut seen = 0;
                for c in text.chars() {
                    if c.is_alphanumeric() {
                        seen += 1;
                        if seen <= hide {
                            out.push(b'*');
                            continue;
                        }
                    } else if seen < hide && !c.is_ascii() {
                        // A separator that is not ASCII could carry
                        // meaning; hidden too.
                        out.push(b'*');
                        continue;
                    }
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            Style::Pseudonym => {
                let tag = hmac::sign(&self.key, value);
                out.extend_from_slice(b"pseu_");
                let mut digits = [0u8; 16];
                hex::encode_to_slice(&tag.as_ref()[..8], &mut digits)
                    .expect("16 digits for 8 bytes");
                out.extend_from_slice(&digits);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(columns: &[(&str, Style)], content_style: Style) -> Masker {
        Masker::new(
            Rules {
                columns: columns
                    .iter()
                    .map(|(p, s)| ColumnRule {
                        pattern: Pattern::new(p),
                        style: s.clone(),
                    })
                    .collect(),
                detectors: Detectors::all(),
                content_style,
            },
            b"test key",
        )
    }

    fn masked(m: &mut Masker, value: &str, column: Option<&Style>) -> Option<String> {
        let mut out = Vec::new();
        let mut stats = Stats::default();
        m.mask(value.as_bytes(), column, &mut out, &mut stats)
            .then(|| String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_value_without_hits_is_left_as_it_is() {
        let mut m = masker(&[], Style::Redact);
        assert_eq!(masked(&mut m, "just some text, 42 items", None), None);
    }

    #[test]
    fn content_is_masked_in_place() {
        let mut m = masker(&[], Style::Redact);
        assert_eq!(
            masked(&mut m, "mail ann@example.org now", None).as_deref(),
            Some("mail [masked:email] now")
        );
    }

    #[test]
    fn a_column_rule_masks_a_value_no_detector_matches() {
        let mut m = masker(&[("users.nickname", Style::Redact)], Style::Redact);
        let style = m.column_style(Some("users"), "nickname").cloned();
        assert!(style.is_some());
        assert_eq!(
            masked(&mut m, "bob", style.as_ref()).as_deref(),
            Some("[masked]")
        );
        assert!(m.column_style(Some("orders"), "nickname").is_none());
        assert!(m.column_style(None, "nickname").is_none());
    }

    #[test]
    fn patterns_glob_and_ignore_case() {
        let p = Pattern::new("*SSN*");
        assert!(p.matches(None, "customer_ssn"));
        assert!(p.matches(Some("t"), "SSN"));
        assert!(!p.matches(None, "ssh_key"));
        let q = Pattern::new("users.e*");
        assert!(q.matches(Some("Users"), "email"));
        assert!(!q.matches(Some("users"), "name"));
        assert!(Pattern::new("*").matches(None, ""));
    }

    #[test]
    fn partial_keeps_the_last_characters_and_separators() {
        let mut m = masker(&[], Style::Partial { keep_last: 4 });
        assert_eq!(
            masked(&mut m, "card 4111 1111 1111 1111.", None).as_deref(),
            Some("card **** **** **** 1111.")
        );
        let style = Style::Partial { keep_last: 2 };
        assert_eq!(masked(&mut m, "Zoë", Some(&style)).as_deref(), Some("*oë"));
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_distinct() {
        let mut m = masker(&[], Style::Pseudonym);
        let a = masked(&mut m, "ann@example.org", None).unwrap();
        let again = masked(&mut m, "ann@example.org", None).unwrap();
        let b = masked(&mut m, "bob@example.org", None).unwrap();
        assert_eq!(a, again);
        assert_ne!(a, b);
        assert!(a.starts_with("pseu_") && a.len() == 21, "{a}");
        let mut other_key = Masker::new(m.rules().clone(), b"another key");
        assert_ne!(masked(&mut other_key, "ann@example.org", None).unwrap(), a);
    }

    #[test]
    fn json_fields_are_masked_field_by_field() {
        let mut m = masker(&[("*password*", Style::Redact)], Style::Redact);
        let out = masked(
            &mut m,
            r#"{"user":{"email":"ann@example.org","password":"hunter2"},"n":[1,"10.1.2.3"]}"#,
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["user"]["email"], "[masked:email]");
        assert_eq!(v["user"]["password"], "[masked]");
        assert_eq!(v["n"][0], 1);
        assert_eq!(v["n"][1], "[masked:ip_address]");
    }

    #[test]
    fn an_email_inside_json_is_masked_without_column_rules() {
        let mut m = masker(&[], Style::Redact);
        let out = masked(&mut m, r#"{"contact": "ann@example.org"}"#, None).unwrap();
        assert_eq!(out, r#"{"contact": "[masked:email]"}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
    }

    #[test]
    fn stats_count_what_was_masked() {
        let mut m = masker(&[], Style::Redact);
        let mut out = Vec::new();
        let mut stats = Stats::default();
        m.mask(
            b"a@example.org b@example.org 123-45-6789",
            None,
            &mut out,
            &mut stats,
        );
        m.mask(b"nothing here", None, &mut out, &mut stats);
        assert_eq!(stats.values, 1);
        assert_eq!(stats.detector(Detector::Email), 2);
        assert_eq!(stats.detector(Detector::UsSsn), 1);
        assert_eq!(
            stats.detectors().collect::<Vec<_>>(),
            vec![(Detector::Email, 2), (Detector::UsSsn, 1)]
        );
    }
}
