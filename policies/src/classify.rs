//! SQL classification: what each statement of a command's text does, as
//! facts a policy can test ([`crate::StatementFacts`]).
//!
//! The text is parsed by PostgreSQL's own parser (`pg_query`: the server's
//! grammar compiled as a library), with the session's
//! `standard_conforming_strings` ([`Reading`]), so statements split, quote
//! and name exactly as the server will read them. Every statement's tree is
//! then walked in full (see `walk`). Text that does not parse is reported
//! as unparsed, with no statements, and never guessed at: the server would
//! reject it too, and the defaults refuse it.
//!
//! # Choices
//!
//! - **Kind** is the most consequential thing a statement does, in this
//!   order: dcl > ddl > delete > update > merge > insert > copy_in > call >
//!   copy_out > select > utility > session > transaction > other. A SELECT
//!   whose CTE deletes is a `delete`; `SELECT … INTO t` is `ddl` (it creates
//!   `t`); `SET ROLE` and `SELECT set_config('role', …)` are `dcl`.
//! - **EXPLAIN** without `ANALYZE` plans but does not run its statement: it
//!   is a `select`, does not write, and reads every table its statement names.
//!   With `ANALYZE` (any spelling or option syntax, unless plainly false) it
//!   runs it and has its facts.
//! - **Maintenance** (VACUUM, ANALYZE, CLUSTER, REINDEX, REFRESH MATERIALIZED
//!   VIEW, CHECKPOINT) is `utility` and writes; named tables are in
//!   `tables_written`. **LOCK** is `utility`, does not write, and its tables
//!   are read. **NOTIFY** and **LOAD** write; **LISTEN**, **UNLISTEN**,
//!   **DISCARD**, **DEALLOCATE**, **CLOSE** do not.
//! - **COPY** FROM is `copy_in` and writes its table; COPY TO is `copy_out`
//!   and reads it, and writes only when its target is a server file
//!   (`reaches_outside`) or a program (`runs_program`).
//! - **Dynamic code**: `DO`, `CALL` (kind `call`) and functions that run SQL
//!   given as text (`query_to_xml`, `dblink*`, …) are `dynamic` and write:
//!   what they do cannot be known from the text. So is defining code that
//!   runs later (`CREATE FUNCTION`/`PROCEDURE`, `CREATE RULE`, `CREATE
//!   LANGUAGE`) and installing or updating an extension (its script runs).
//!   Foreign servers, foreign tables, user mappings, subscriptions, `LOAD`
//!   and `ALTER SYSTEM` reach outside the database (`reaches_outside`).
//! - **Functions** are checked against the catalogue lists of `functions`:
//!   writing ones (`nextval`, `set_config`, large objects, advisory locks)
//!   make a statement `writes`; ones that reach outside the database or into
//!   other sessions set `reaches_outside` (and `writes`).
//! - **EXECUTE** is `other`, with `executes` naming the prepared statement
//!   for the worker to judge (its parameters' facts are the EXECUTE's own);
//!   **PREPARE** has the facts of the statement it prepares, with `prepares`
//!   set. **FETCH** and **DECLARE** are `select`s.
//! - **Names** are the server's: unquoted identifiers folded to lowercase,
//!   quoted ones as written, Unicode escapes resolved, all cut to 63 bytes;
//!   tables keep the schema as written (`public.accounts` or `accounts`);
//!   functions are the last part of the name, always lowercased. CTE names
//!   in scope are not tables.
//!
//! # Cost
//!
//! Classification is on the hot path, once per distinct text (the worker
//! caches by text). It is one parse by the C parser, one decode of its tree
//! and one walk. The decode and the walk recurse as deep as the tree, and a
//! tree can be as deep as the parser's own stack check allows (some
//! hundreds of levels, each taking kilobytes of stack in Rust): a text
//! longer than a few hundred bytes is therefore classified on one of a few
//! long-lived threads with large stacks, never on the caller's.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex};

use crate::Classification;

mod cache;
mod functions;
mod lineage;
mod secrets;
mod settings;
mod tree;
mod walk;

pub use cache::Classifier;
pub use secrets::{
    Known, REDACTED, SecretArgs, SecretKind, Secrets, find_secrets, find_secrets_with,
    is_connection_secret, is_secret_name, json_holds_secret,
};

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

/// Classifies SQL text as PostgreSQL reads it with `reading`: one
/// [`crate::StatementFacts`] per statement, or `parsed: false` with no
/// statements if the server's parser rejects any part of it. Empty text, or
/// only comments, is parsed and has no statements. Never panics, and never
/// overflows the caller's stack.
pub fn classify(sql: &str, reading: Reading) -> Classification {
    classify_shaped(sql, reading).0
}

/// [`classify`], and whether the facts hold for every text of the same
/// shape (the same tokens but for the values of literals): see
/// [`Classifier`].
fn classify_shaped(sql: &str, reading: Reading) -> (Classification, bool) {
    if sql.len() <= INLINE_TEXT_BYTES {
        return classify_guarded(sql, reading);
    }
    let (reply, answer) = mpsc::sync_channel(1);
    let job = Job {
        sql: sql.to_owned(),
        reading,
        reply,
    };
    let sent = DEEP.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
    if !sent {
        return (UNPARSED, false);
    }
    answer.recv().unwrap_or((UNPARSED, false))
}

/// Texts up to this long are classified on the caller's stack. A level of
/// nesting takes at least one byte of text, and up to ~1.5 KiB of stack in
/// an optimized build (~15 KiB unoptimized) to decode, walk and drop:
/// within 1 MiB of a 2 MiB thread (tokio's workers).
const INLINE_TEXT_BYTES: usize = if cfg!(debug_assertions) { 48 } else { 512 };

/// Stack of the threads that classify longer texts. The parser stops at
/// about 2 MiB of its own stack (its `max_stack_depth`), which bounds the
/// tree's depth; decoding, walking and dropping a tree that deep takes up
/// to ~32 MiB unoptimized. Only the pages a text needs are ever touched.
const DEEP_STACK: usize = 256 << 20;
/// How many such threads.
const DEEP_THREADS: usize = 2;

struct Job {
    sql: String,
    reading: Reading,
    reply: mpsc::SyncSender<(Classification, bool)>,
}

/// The queue of the deep-stack threads; `None` if none could be started
/// (every long text is then unparsed: refused).
static DEEP: LazyLock<Option<mpsc::Sender<Job>>> = LazyLock::new(|| {
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue = std::sync::Arc::new(Mutex::new(queue));
    let mut started = 0;
    for i in 0..DEEP_THREADS {
        let queue = queue.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("gatehouse-classify-{i}"))
            .stack_size(DEEP_STACK)
            .spawn(move || {
                loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { return };
                    let _ = job.reply.send(classify_guarded(&job.sql, job.reading));
                }
            });
        started += usize::from(spawned.is_ok());
    }
    (started > 0).then_some(jobs)
});

const UNPARSED: Classification = Classification {
    statements: Vec::new(),
    parsed: false,
};

fn classify_guarded(sql: &str, reading: Reading) -> (Classification, bool) {
    // Neither the parser nor the walk is known to panic on any input, but a
    // panic here would take down the session that sent the text; unparsed
    // is the safe answer.
    panic::catch_unwind(AssertUnwindSafe(|| classify_text(sql, reading)))
        .unwrap_or((UNPARSED, false))
}

/// The classification, and whether its facts depend on nothing a literal's
/// value can change: every statement is a SELECT, INSERT, UPDATE, DELETE or
/// MERGE (no EXPLAIN, whose options are literals; no SET, COPY, PREPARE…)
/// that calls no `set_config` (whose arguments are).
fn classify_text(sql: &str, reading: Reading) -> (Classification, bool) {
    let mut options = pg_query::ParserOptions::DEFAULT;
    if !reading.standard_conforming_strings {
        options |= pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    }
    let Ok(tree) = pg_query::parse(sql, options) else {
        return (UNPARSED, false);
    };
    let mut statements = Vec::with_capacity(tree.protobuf.stmts.len());
    let mut literal_free = true;
    for raw in &tree.protobuf.stmts {
        let Some(statement) = raw.stmt.as_deref().and_then(|s| s.node.as_ref()) else {
            return (UNPARSED, false);
        };
        let facts = walk::facts(statement);
        literal_free &= matches!(
            statement,
            pg_query::NodeEnum::SelectStmt(_)
                | pg_query::NodeEnum::InsertStmt(_)
                | pg_query::NodeEnum::UpdateStmt(_)
                | pg_query::NodeEnum::DeleteStmt(_)
                | pg_query::NodeEnum::MergeStmt(_)
        ) && !facts.functions.contains("set_config");
        statements.push(facts);
    }
    let c = Classification {
        statements,
        parsed: true,
    };
    (c, literal_free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StatementKind;

    fn read(sql: &str) -> Classification {
        classify(sql, Reading::default())
    }

    #[test]
    fn empty_and_comment_only_text_has_no_statements() {
        for sql in ["", "  \n", "-- nothing", "/* nothing */", ";", " ; ;"] {
            let c = read(sql);
            assert!(c.parsed, "{sql:?}");
            assert!(c.statements.is_empty(), "{sql:?}");
        }
    }

    #[test]
    fn garbage_is_unparsed_not_select() {
        for sql in [
            "SELEC 1",
            "SELECT 1; SELEC 2",
            "SELECT 'unterminated",
            "SELECT \0",
        ] {
            let c = read(sql);
            assert!(!c.parsed, "{sql:?}");
            assert!(c.statements.is_empty());
        }
    }

    #[test]
    fn hidden_delete_in_cte() {
        let c = read("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
        assert!(c.parsed);
        let f = &c.statements[0];
        assert_eq!(f.kind, StatementKind::Delete);
        assert!(f.writes);
        assert!(!f.has_where);
        assert!(f.tables_read.is_empty(), "{:?}", f.tables_read);
    }

    /// With `standard_conforming_strings` off a backslash escapes the
    /// quote, and what follows is still inside the string: one statement,
    /// as the server reads it. With it on, the same text is two.
    #[test]
    fn reads_strings_as_the_session_does() {
        let sql = r"SELECT 'a\'; INSERT INTO t VALUES (1); -- '";
        let on = read(sql);
        assert_eq!(on.statements.len(), 2);
        assert_eq!(on.statements[1].kind, StatementKind::Insert);
        let off = classify(
            sql,
            Reading {
                standard_conforming_strings: false,
            },
        );
        assert!(off.parsed);
        assert_eq!(off.statements.len(), 1);
        assert_eq!(off.statements[0].kind, StatementKind::Select);
        // And the reverse: a text that hides an INSERT only when escapes
        // are off.
        let sql = r"SELECT 'a\\'; INSERT INTO t VALUES (1); -- '";
        let off = classify(
            sql,
            Reading {
                standard_conforming_strings: false,
            },
        );
        assert_eq!(off.statements.len(), 2);
        assert_eq!(off.statements[1].kind, StatementKind::Insert);
    }

    /// Deep trees never overflow the caller's stack (test threads have
    /// 2 MiB, like tokio's workers): long texts go to the deep-stack
    /// threads, and what the parser itself refuses as too deep is unparsed.
    #[test]
    fn deep_trees_do_not_overflow_the_stack() {
        for depth in [50, 300, 700, 5_000, 50_000] {
            for sql in [
                format!("SELECT 1{}", "+1".repeat(depth)),
                format!("SELECT {}1{}", "(SELECT ".repeat(depth), ")".repeat(depth)),
                format!("SELECT {}1{}", "ARRAY[".repeat(depth), "]".repeat(depth)),
                format!("SELECT {} true", "NOT ".repeat(depth)),
                "SELECT 1 UNION ".repeat(depth) + "SELECT 1",
            ] {
                let c = read(&sql);
                assert!(c.parsed || depth >= 300, "{}…", &sql[..40]);
            }
        }
        // Deep enough to be read, through the deep-stack threads.
        let c = read(&format!("SELECT pg_read_file('/x'){}", "+1".repeat(500)));
        assert!(c.parsed);
        assert!(c.statements[0].reaches_outside);
    }
}
