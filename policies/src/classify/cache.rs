//! A session's classifications, so that a text is parsed once.
//!
//! Applications repeat their statements: the same text (a prepared
//! statement, a polling query), or the same statement with other literals
//! (`SELECT … WHERE id = 41`, then `… = 42`, as pgbench and many ORMs send
//! them). The first kind is found by its text. The second by its **shape**:
//! the text's tokens as PostgreSQL's scanner reads them, each one's text
//! kept exactly but for literals (strings, numbers, bit strings), which
//! stand as their kind alone. Two texts of one shape parse to the same tree
//! but for the values of constants, so a classification whose facts depend
//! on no literal's value holds for both. Which ones do not depend on one is
//! decided when the text is parsed (see `classify_text`): SELECT, INSERT,
//! UPDATE, DELETE and MERGE statements that call no `set_config`. Texts with
//! Unicode-escaped names or strings (`U&"…" UESCAPE '!'`, where a literal
//! changes a name) have no shape.
//!
//! Scanning costs about a tenth of parsing (pgbench's statement: ~1 µs
//! against ~9 µs).

use std::collections::HashMap;
use std::sync::Arc;

use pg_query::protobuf::Token;

use super::{Reading, classify, classify_shaped};
use crate::Classification;

/// A session's cache of classifications (see the module's documentation).
#[derive(Default)]
pub struct Classifier {
    reading: Reading,
    by_text: HashMap<Box<str>, Arc<Classification>>,
    by_shape: HashMap<Box<str>, Arc<Classification>>,
}

impl Classifier {
    /// Entries kept in each map; when one is full, it starts over.
    const CAPACITY: usize = 256;
    /// Longer texts are classified every time rather than kept.
    const MAX_TEXT: usize = 4096;

    /// The classification of `text` read with `reading`, from the cache
    /// when this session has read the same text, or one of the same shape.
    pub fn classify(&mut self, text: &str, reading: Reading) -> Arc<Classification> {
        if reading != self.reading {
            self.by_text.clear();
            self.by_shape.clear();
            self.reading = reading;
        }
        if let Some(c) = self.by_text.get(text) {
            return c.clone();
        }
        if text.len() > Self::MAX_TEXT {
            return Arc::new(classify(text, reading));
        }
        let shape = shape(text, reading);
        if let Some(c) = shape.as_deref().and_then(|s| self.by_shape.get(s)) {
            return c.clone();
        }
        let (c, literal_free) = classify_shaped(text, reading);
        let c = Arc::new(c);
        if let (Some(shape), true) = (shape, literal_free) {
            keep(&mut self.by_shape, shape, &c);
        }
        keep(&mut self.by_text, text.into(), &c);
        c
    }
}

fn keep(map: &mut HashMap<Box<str>, Arc<Classification>>, key: Box<str>, c: &Arc<Classification>) {
    if map.len() >= Classifier::CAPACITY {
        map.clear();
    }
    map.insert(key, c.clone());
}

/// The text's shape: every token as written, separated by NUL (which no
/// statement text holds), literals by their kind alone, comments left out.
/// `None` when the scanner does not read the text as the parser would
/// (`standard_conforming_strings` off: the scanner reads with it on), when
/// it fails, or when the text has Unicode escapes.
fn shape(text: &str, reading: Reading) -> Option<Box<str>> {
    if !reading.standard_conforming_strings {
        return None;
    }
    // Not `scan_tokens`: it makes a slice from a null pointer for a text of
    // no tokens (whitespace only).
    let tokens = pg_query::scan(text).ok()?.tokens;
    let mut out = String::with_capacity(text.len() + tokens.len());
    for t in &tokens {
        let literal = match Token::try_from(t.token) {
            Ok(Token::Sconst | Token::Iconst | Token::Fconst | Token::Bconst | Token::Xconst) => {
                true
            }
            Ok(Token::SqlComment | Token::CComment) => continue,
            Ok(Token::Uident | Token::Usconst | Token::Uescape) => return None,
            Ok(_) => false,
            Err(_) => return None,
        };
        if literal {
            out.push('\u{1}');
            out.push_str(&t.token.to_string());
        } else {
            out.push_str(text.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?);
        }
        out.push('\0');
    }
    Some(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StatementKind;

    fn shape_of(text: &str) -> Option<Box<str>> {
        shape(text, Reading::default())
    }

    #[test]
    fn literals_do_not_change_a_shape_and_everything_else_does() {
        let a = shape_of("SELECT abalance FROM pgbench_accounts WHERE aid = 41;");
        assert!(a.is_some());
        assert_eq!(
            a,
            shape_of("SELECT abalance  FROM pgbench_accounts WHERE aid = 97 ;")
        );
        assert_eq!(shape_of("SELECT 'a'"), shape_of("SELECT $$b$$"));
        assert_eq!(shape_of("SELECT 1 -- one"), shape_of("SELECT 2 /* two */"));
        for other in [
            "SELECT abalance FROM pgbench_tellers WHERE aid = 41;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = '41';",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 4.1;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            "SELECT abalance FROM \"pgbench_accounts\" WHERE aid = 41;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 41; DELETE FROM t",
        ] {
            assert_ne!(a, shape_of(other), "{other}");
        }
        // A literal that changes a name: no shape.
        assert_eq!(shape_of(r#"SELECT U&"a!0065" UESCAPE '!'"#), None);
        assert_eq!(shape_of("SELECT U&'x'"), None);
        // Escapes read differently with standard_conforming_strings off.
        let off = Reading {
            standard_conforming_strings: false,
        };
        assert_eq!(shape("SELECT 1", off), None);
    }

    /// Every text of the classification corpus, with its literals changed
    /// (numbers, and strings to values that matter somewhere: `off`, `on`,
    /// a file name, SQL): whenever the cache answers from a shape, its
    /// answer is what parsing the changed text gives.
    #[test]
    fn a_shape_never_answers_differently_from_the_parser() {
        let corpus = include_str!("../../tests/corpus/classify.txt");
        let mut texts = Vec::new();
        let mut current: Option<String> = None;
        for line in corpus.lines() {
            if line.starts_with("## ") {
                current = Some(String::new());
            } else if line.starts_with("=>") {
                if let Some(text) = current.take() {
                    texts.push(text);
                }
            } else if let Some(text) = current.as_mut() {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(line);
            }
        }
        assert!(texts.len() > 300, "{} texts", texts.len());
        let values = [
            "'off'",
            "'on'",
            "'/etc/hostname'",
            "'DELETE FROM t'",
            "''",
            "0",
            "1",
        ];
        let mut hits = 0;
        for text in &texts {
            let Ok(tokens) = pg_query::scan(text).map(|s| s.tokens) else {
                continue;
            };
            for value in values {
                let mut changed = String::new();
                let mut at = 0;
                for t in &tokens {
                    let literal = matches!(
                        Token::try_from(t.token),
                        Ok(Token::Sconst | Token::Iconst | Token::Fconst)
                    );
                    if literal {
                        changed.push_str(&text[at..t.start as usize]);
                        changed.push_str(value);
                        at = t.end as usize;
                    }
                }
                changed.push_str(&text[at..]);
                let mut cache = Classifier::default();
                cache.classify(text, Reading::default());
                let cached = cache.classify(&changed, Reading::default());
                let parsed = classify(&changed, Reading::default());
                if shape_of(&changed).is_some() && shape_of(&changed) == shape_of(text) {
                    hits += 1;
                }
                assert_eq!(*cached, parsed, "{text:?} then {changed:?}");
            }
        }
        assert!(hits > 500, "only {hits} texts of a shape seen before");
    }

    #[test]
    fn a_shape_stands_only_for_facts_no_literal_changes() {
        let mut cache = Classifier::default();
        let read = Reading::default();
        // Same shape, other literals: the same facts, from the cache.
        let first = cache.classify("SELECT * FROM t WHERE id = 1", read);
        let second = cache.classify("SELECT * FROM t WHERE id = 2", read);
        assert!(Arc::ptr_eq(&first, &second));

        // EXPLAIN's options are literals: a plan-only EXPLAIN must not
        // stand for one that runs its DELETE.
        let planned = cache.classify("EXPLAIN (ANALYZE 'off') DELETE FROM t", read);
        assert_eq!(planned.statements[0].kind, StatementKind::Select);
        let runs = cache.classify("EXPLAIN (ANALYZE 'on') DELETE FROM t", read);
        assert_eq!(runs.statements[0].kind, StatementKind::Delete);

        // Settings are literals.
        let on = cache.classify("SET default_transaction_read_only = 'on'", read);
        assert!(!on.statements[0].disables_read_only);
        let off = cache.classify("SET default_transaction_read_only = 'off'", read);
        assert!(off.statements[0].disables_read_only);
        let harmless = cache.classify("SELECT set_config('application_name', 'x', false)", read);
        assert!(!harmless.statements[0].disables_read_only);
        let unsafe_ = cache.classify(
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            read,
        );
        assert!(unsafe_.statements[0].disables_read_only);

        // COPY's file name is a literal.
        let out = cache.classify("COPY t TO STDOUT", read);
        assert!(!out.statements[0].reaches_outside);
        let file = cache.classify("COPY t TO '/tmp/x'", read);
        assert!(file.statements[0].reaches_outside);

        // Nothing but whitespace or comments: no statement, cached or not.
        for empty in ["", "   ", "\n\t", "-- ping", "/* */", ";"] {
            assert!(
                cache.classify(empty, read).statements.is_empty(),
                "{empty:?}"
            );
        }

        // Text that does not parse is never a shape's.
        let bad = cache.classify("SELECT 1 FROM t WHERE x = 'a' 'b'", read);
        assert!(!bad.parsed);
    }
}
