//! SQL classification: what each statement of a command's text does, as
//! facts a policy can test ([`crate::StatementFacts`]).
//!
//! The text is parsed with sqlparser's PostgreSQL dialect and every
//! statement walked in full (nested queries, CTEs, subqueries, function
//! arguments), so writes hidden in a CTE, a `SELECT … INTO` or a function
//! call are found. Text that does not parse is reported as unparsed, with no
//! statements, and never guessed at; a few PostgreSQL statements sqlparser
//! lacks are recognized from their tokens instead (see `fallback`).
//!
//! # Choices
//!
//! - **Kind** is the most consequential thing a statement does, in this
//!   order: dcl > ddl > delete > update > merge > insert > copy_in > call >
//!   copy_out > select > utility > session > transaction > other. A SELECT
//!   whose CTE deletes is a `delete`; `SELECT … INTO t` is `ddl` (it creates
//!   `t`); `SELECT set_config('role', …)` is `dcl`.
//! - **EXPLAIN** without `ANALYZE` plans but does not run its statement: it
//!   is `utility`, does not write, and reads every table its statement names.
//!   `EXPLAIN ANALYZE` (or an `ANALYZE` option not plainly false) runs it and
//!   has its facts.
//! - **Maintenance** (VACUUM, ANALYZE, CLUSTER, REINDEX, REFRESH MATERIALIZED
//!   VIEW, CHECKPOINT) is `utility` and writes: it rewrites storage or
//!   statistics (CLUSTER and VACUUM FULL under an exclusive lock), and named
//!   tables are in `tables_written`. Without a table it works on all of them
//!   and `tables_written` is empty.
//! - **LOCK** is `utility`, does not write, and its tables are read.
//!   **NOTIFY** writes (it reaches other sessions, like `pg_notify`);
//!   **LISTEN**, **UNLISTEN**, **DISCARD**, **DEALLOCATE**, **CLOSE**, **MOVE**
//!   do not. **LOAD** writes (it loads a library into the server).
//! - **COPY** FROM is `copy_in` and writes its table; COPY TO is `copy_out`
//!   and reads it, and writes only when its target is a server file or a
//!   program. `COPY (DELETE … RETURNING *) TO STDOUT` is a `delete`.
//! - **CALL** and **DO** are `call` and write: their bodies are not
//!   inspected. **EXECUTE** is `other`, with `executes` naming the prepared
//!   statement for the worker to judge; **PREPARE** has the facts of the
//!   statement it prepares, with `prepares` set. **FETCH** and **DECLARE** are
//!   `select`s (a cursor's query runs as it is fetched).
//! - **Names** are resolved as PostgreSQL does: unquoted identifiers fold to
//!   lowercase, quoted ones keep their case, all are cut to 63 bytes; tables
//!   keep the schema as written (`public.accounts` or `accounts`); functions
//!   are the last part of the name, always lowercased. CTE names in scope
//!   are not tables.
//! - **Text** is read as the server reads it with
//!   `standard_conforming_strings = on` (a backslash in `'…'` is a plain
//!   character; in `E'…'` it escapes) and a UTF8 client encoding. Statements
//!   that change either are marked `changes_parsing`, for the worker to
//!   refuse.
//! - A statement of another SQL dialect that the PostgreSQL parser still
//!   accepts is `other` and taken to write.
//!
//! # Cost
//!
//! Classification is on the hot path, once per distinct text (the worker
//! caches by text). It is one tokenize-and-parse plus one walk of the tree:
//! no regular expressions, nothing compiled per call, no second parse except
//! when the whole text fails to parse (then each statement is parsed on its
//! own, see `fallback`). Allocations are the parser's own plus the names that
//! end up in the facts. Parsing dominates: for pgbench's `SELECT abalance
//! FROM pgbench_accounts WHERE aid = …` the whole call takes about 5 µs
//! (release build, this 2-core machine, p50), the walk well under 1 µs of
//! it. Texts over 8 KiB are classified on a short-lived thread with a large
//! stack (see [`classify`]), which adds some tens of µs to their (already
//! long) parse.

use std::panic::{self, AssertUnwindSafe};

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::Classification;

/// How the server reads a session's text at the moment: the settings that
/// change where a string literal ends. The text itself is UTF-8, already
/// transcoded from the session's `client_encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reading {
    /// `standard_conforming_strings`: when off, a backslash in `'…'`
    /// escapes the next character.
    pub standard_conforming_strings: bool,
}

impl Default for Reading {
    /// The server's defaults: `standard_conforming_strings = on`.
    fn default() -> Self {
        Reading {
            standard_conforming_strings: true,
        }
    }
}

mod fallback;
mod functions;
mod names;
mod settings;
mod walk;

/// Classifies SQL text (PostgreSQL dialect): one [`crate::StatementFacts`]
/// per statement, or `parsed: false` with no statements if any part of the
/// text is not understood. Empty text, or only comments, is parsed and has
/// no statements. Never panics, and never overflows the caller's stack.
pub fn classify(sql: &str, reading: Reading) -> Classification {
    let _ = reading;
    if sql.len() <= INLINE_TEXT_BYTES {
        return classify_guarded(sql);
    }
    // sqlparser parses and walks deep trees on a growing stack, but drops
    // them by plain recursion (also the partial tree of a text that fails to
    // parse): `SELECT 1+1+…` with 24 000 terms, as many UNIONs or `[1]`
    // subscripts, overflow a 2 MiB stack, which aborts the process. A chain
    // needs at least two bytes of text per level, and a level at most
    // ~130 bytes of stack (measured, debug build), so a long text gets a
    // thread whose stack is proportionate.
    let stack = sql
        .len()
        .saturating_mul(STACK_PER_TEXT_BYTE)
        .max(MIN_THREAD_STACK);
    if stack > MAX_THREAD_STACK {
        return UNPARSED;
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("gatehouse-classify".to_owned())
            .stack_size(stack)
            .spawn_scoped(scope, || classify_guarded(sql))
            .ok()
            .and_then(|thread| thread.join().ok())
    })
    .unwrap_or(UNPARSED)
}

/// Texts up to this long are classified on the caller's stack: their
/// deepest possible tree drops in well under 1 MiB.
const INLINE_TEXT_BYTES: usize = 8 * 1024;
/// Stack for a longer text's thread, per byte of text (a level of nesting
/// takes two or more bytes and at most ~130 bytes of stack).
const STACK_PER_TEXT_BYTE: usize = 128;
const MIN_THREAD_STACK: usize = 16 << 20;
/// Texts that would need more (over 8 MiB) are not classified: unparsed.
const MAX_THREAD_STACK: usize = 1 << 30;

const UNPARSED: Classification = Classification {
    statements: Vec::new(),
    parsed: false,
};

fn classify_guarded(sql: &str) -> Classification {
    // sqlparser is not known to panic on any input, but a panic here would
    // take down the session that sent the text; unparsed is the safe answer.
    panic::catch_unwind(AssertUnwindSafe(|| classify_text(sql))).unwrap_or(UNPARSED)
}

fn classify_text(sql: &str) -> Classification {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => Classification {
            statements: statements.iter().map(walk::facts).collect(),
            parsed: true,
        },
        Err(_) => match fallback::classify(sql) {
            Some(statements) => Classification {
                statements,
                parsed: true,
            },
            None => UNPARSED,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StatementKind;

    #[test]
    fn empty_and_comment_only_text_has_no_statements() {
        for sql in ["", "  \n", "-- nothing", "/* nothing */", ";", " ; ;"] {
            let c = classify(sql, Reading::default());
            assert!(c.parsed, "{sql:?}");
            assert!(c.statements.is_empty(), "{sql:?}");
        }
    }

    #[test]
    fn garbage_is_unparsed_not_select() {
        let c = classify("SELEC 1", Reading::default());
        assert!(!c.parsed);
        assert!(c.statements.is_empty());
    }

    #[test]
    fn hidden_delete_in_cte() {
        let c = classify(
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            Reading::default(),
        );
        assert!(c.parsed);
        let f = &c.statements[0];
        assert_eq!(f.kind, StatementKind::Delete);
        assert!(f.writes);
        assert!(!f.has_where);
        assert!(f.tables_read.is_empty(), "{:?}", f.tables_read);
    }

    #[test]
    fn deep_trees_do_not_overflow_the_stack() {
        // Test threads have 2 MiB stacks, like tokio's workers.
        let deep_parens = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(!classify(&deep_parens, Reading::default()).parsed);
        for sql in [
            format!("SELECT 1{}", "+1".repeat(50_000)),
            format!("SELECT x{}", "[1]".repeat(50_000)),
            format!("SELECT 1::int{}", "[]".repeat(50_000)),
            "SELECT 1 UNION ".repeat(30_000) + "SELECT 1",
        ] {
            assert!(classify(&sql, Reading::default()).parsed, "{}…", &sql[..40]);
        }
        // A deep tree dropped inside sqlparser when the text fails to parse.
        let failing = format!("SELECT 1{}; SELEC 2", "+1".repeat(50_000));
        assert!(!classify(&failing, Reading::default()).parsed);
        // Through the fallback too.
        let copy = format!(
            "COPY (SELECT 1{}) TO STDOUT WITH (FREEZE on)",
            "+1".repeat(50_000)
        );
        assert_eq!(
            classify(&copy, Reading::default()).statements[0].kind,
            StatementKind::CopyOut
        );
    }
}
