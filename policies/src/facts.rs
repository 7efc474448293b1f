use std::collections::BTreeSet;
use std::sync::Arc;

/// What a statement does, coarsely, as policies see it (`context.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    /// CREATE/ALTER/DROP/TRUNCATE/COMMENT/… of schema objects.
    Ddl,
    /// GRANT/REVOKE, roles, ALTER SYSTEM, SET ROLE / SESSION AUTHORIZATION.
    Dcl,
    /// BEGIN/START/COMMIT/ROLLBACK/SAVEPOINT/…
    Transaction,
    /// COPY … FROM (STDIN, a file or a PROGRAM).
    CopyIn,
    /// COPY … TO (STDOUT, a file or a PROGRAM).
    CopyOut,
    /// SET/RESET/SHOW of ordinary settings.
    Session,
    /// VACUUM, ANALYZE, LOCK, CLUSTER, REINDEX, CHECKPOINT, LISTEN/NOTIFY, DISCARD, …
    Utility,
    /// CALL and DO.
    Call,
    /// Anything else, including text that did not parse.
    Other,
}

impl StatementKind {
    /// The name policies compare against, e.g. `"copy_in"`.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Update => "update",
            StatementKind::Delete => "delete",
            StatementKind::Merge => "merge",
            StatementKind::Ddl => "ddl",
            StatementKind::Dcl => "dcl",
            StatementKind::Transaction => "transaction",
            StatementKind::CopyIn => "copy_in",
            StatementKind::CopyOut => "copy_out",
            StatementKind::Session => "session",
            StatementKind::Utility => "utility",
            StatementKind::Call => "call",
            StatementKind::Other => "other",
        }
    }

    pub const ALL: [StatementKind; 14] = [
        StatementKind::Select,
        StatementKind::Insert,
        StatementKind::Update,
        StatementKind::Delete,
        StatementKind::Merge,
        StatementKind::Ddl,
        StatementKind::Dcl,
        StatementKind::Transaction,
        StatementKind::CopyIn,
        StatementKind::CopyOut,
        StatementKind::Session,
        StatementKind::Utility,
        StatementKind::Call,
        StatementKind::Other,
    ];
}

/// The facts about one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementFacts {
    /// The most consequential thing the statement does: a SELECT whose CTE
    /// deletes is a `Delete`; `SELECT … INTO t` is `Ddl` (it creates `t`).
    /// For `PREPARE name AS stmt`, the kind of `stmt`.
    pub kind: StatementKind,
    /// Tables (and views) read, lowercased, schema-qualified as written
    /// (`public.accounts` or `accounts`).
    pub tables_read: BTreeSet<String>,
    /// Tables written (inserted, updated, deleted, merged, truncated,
    /// created, altered, dropped, copied into).
    pub tables_written: BTreeSet<String>,
    /// Functions called anywhere in the statement, lowercased, without
    /// schema (`nextval`, `pg_read_file`, `dblink_exec`).
    pub functions: BTreeSet<String>,
    /// For UPDATE and DELETE (also inside CTEs): whether every one has a
    /// WHERE clause. `true` for other statements.
    pub has_where: bool,
    /// Whether the statement changes data or state anywhere: DML (also in
    /// CTEs), DDL, DCL, COPY FROM, SELECT INTO, or a call of a function
    /// known to write or to reach outside the database (`nextval`,
    /// `set_config`, `lo_import`, `dblink_exec`, `pg_terminate_backend`…),
    /// CALL and DO (whose bodies cannot be inspected).
    pub writes: bool,
    /// `COPY … TO/FROM PROGRAM`: runs a shell command on the server.
    pub runs_program: bool,
    /// `COPY … FROM STDIN`: the server then takes what the client sends
    /// next as the COPY's rows until its input ends; a message that is not
    /// COPY data fails the COPY and is swallowed, and what followed it in
    /// a simple `Query` does not run.
    pub copies_from_client: bool,
    /// Runs code whose effects cannot be known from the text: `DO` blocks,
    /// `CALL` (a procedure's body), and functions that run SQL given as
    /// text or read tables named in text (`query_to_xml`, `table_to_xml`,
    /// `ts_stat`, `dblink*`, …). Such a statement also `writes`.
    pub dynamic: bool,
    /// Calls a function that reaches outside the database or into other
    /// sessions, or administers the server: server files
    /// (`pg_read_file`, `pg_ls_dir`, `lo_import`/`lo_export`), signals to
    /// other backends, configuration reloads, WAL and backup control,
    /// replication slots and logical decoding, statistics resets, …
    /// Such a statement also `writes`.
    pub reaches_outside: bool,
    /// For `PREPARE name AS …`: the name; the other facts describe the
    /// prepared statement.
    pub prepares: Option<String>,
    /// For `EXECUTE name`: the name; the worker judges it by the facts it
    /// recorded for that prepared statement.
    pub executes: Option<String>,
    /// Which prepared statements the statement drops once it succeeds:
    /// `DEALLOCATE name`, or all of them (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub deallocates: Option<Deallocates>,
    /// Whether the statement turns read-only mode off, or may: `SET
    /// [LOCAL|SESSION] default_transaction_read_only`/`transaction_read_only`
    /// to anything but a true value (also `TO DEFAULT` and `RESET`), `SET
    /// [SESSION CHARACTERISTICS AS] TRANSACTION READ WRITE`, `BEGIN`/`START
    /// TRANSACTION … READ WRITE`, `RESET ALL`, `DISCARD ALL`, `ALTER SYSTEM`
    /// or `ALTER ROLE … SET` of those settings, and `set_config` of them
    /// (also when the setting's name is not a literal). A worker that runs a
    /// read-only grant in a read-only backend session refuses these.
    pub disables_read_only: bool,
    /// Whether the statement may change how the server reads the text of
    /// later statements: `SET`/`RESET` of `client_encoding` (also `SET
    /// NAMES`) or `standard_conforming_strings`, `RESET ALL`, `DISCARD ALL`,
    /// and `set_config` of them (also when the setting's name is not a
    /// literal). The worker reads later text only once the server has
    /// confirmed the settings in force (its `ParameterStatus`).
    pub changes_parsing: bool,
    /// Where the values of the rows it returns come from, as far as its
    /// text tells: what masking follows to values computed from a column.
    pub outputs: Outputs,
    /// Where the values it stores come from: the rows an INSERT inserts,
    /// the values an UPDATE or MERGE sets, what `CREATE TABLE … AS`,
    /// `SELECT … INTO` and `CREATE [MATERIALIZED] VIEW` keep (also in
    /// data-modifying CTEs). A copy of a masked column would not be masked.
    pub stores: Output,
    /// Every column, whole row and function the statement names, anywhere
    /// (filters too): what an error it raises may quote a value of.
    pub mentions: Output,
}

impl StatementFacts {
    /// Facts for a statement of `kind` with nothing else known.
    pub fn new(kind: StatementKind) -> Self {
        Self {
            kind,
            tables_read: BTreeSet::new(),
            tables_written: BTreeSet::new(),
            functions: BTreeSet::new(),
            has_where: true,
            writes: false,
            runs_program: false,
            copies_from_client: false,
            dynamic: false,
            reaches_outside: false,
            prepares: None,
            executes: None,
            deallocates: None,
            disables_read_only: false,
            changes_parsing: false,
            outputs: Outputs::none(),
            stores: Output::default(),
            mentions: Output::default(),
        }
    }
}

impl StatementFacts {
    /// What `EXECUTE name(params…)` does when `self` was prepared under
    /// `name`: these facts, and whatever the `EXECUTE`'s own parameter
    /// expressions do (`execute`'s facts).
    pub fn executed_with(&self, execute: &StatementFacts) -> StatementFacts {
        let mut facts = self.clone();
        facts.prepares = None;
        facts
            .tables_read
            .extend(execute.tables_read.iter().cloned());
        facts.functions.extend(execute.functions.iter().cloned());
        facts.writes |= execute.writes;
        facts.dynamic |= execute.dynamic;
        facts.reaches_outside |= execute.reaches_outside;
        facts.disables_read_only |= execute.disables_read_only;
        facts.changes_parsing |= execute.changes_parsing;
        facts
    }
}

/// Where the values of a statement's result columns come from (see
/// `classify::lineage`): one [`Output`] per entry of its select list or
/// `RETURNING`, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outputs {
    /// As far as the text tells. Empty for a statement that returns no rows
    /// of its own (or only what no table holds: `SHOW`, `EXPLAIN`).
    Known(Arc<[Output]>),
    /// Rows the text does not tell the origin of: `FETCH` from a cursor,
    /// a procedure's output arguments, `EXECUTE` of a statement the worker
    /// could not read.
    Unknown,
}

impl Outputs {
    pub fn none() -> Self {
        Outputs::Known(Arc::from([]))
    }

    /// The entries result column `i` of `n` may come from: its own entry
    /// when the entries line up with the columns (a `*` spans as many
    /// columns as the others leave), else every entry.
    pub fn column(&self, i: usize, n: usize) -> &[Output] {
        let Outputs::Known(all) = self else {
            return &[];
        };
        let stars: Vec<usize> = (0..all.len()).filter(|&j| all[j].star).collect();
        let entry = match stars[..] {
            [] if all.len() == n => Some(i),
            [s] if n + 1 >= all.len() => {
                let span = n + 1 - all.len();
                if i < s {
                    Some(i)
                } else if i < s + span {
                    Some(s)
                } else {
                    Some(i + 1 - span)
                }
            }
            _ => None,
        };
        match entry {
            Some(j) => &all[j..=j],
            None => all,
        }
    }
}

/// Where the values of one result column (or of each column a `*` spans)
/// come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// A `*`: as many columns as the relations it names have.
    pub star: bool,
    /// The columns its values are computed from, as `(table, column)`:
    /// the table's name without schema. A column written without its table
    /// is listed once per table it may belong to.
    pub columns: Vec<(String, String)>,
    /// Tables whose whole rows it is computed from (`row_to_json(u)`,
    /// `u.*`, `*`).
    pub rows: Vec<String>,
    /// The functions it calls (lowercase, without schema): one defined in
    /// the database may read what the text does not name.
    pub functions: Vec<String>,
    /// It calls a function that runs SQL given as text (`query_to_xml`,
    /// `dblink`, …): what it reads cannot be known from the text.
    pub opaque: bool,
}

/// Prepared statements a statement drops.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Deallocates {
    One(String),
    All,
}

/// The facts about a command's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// One entry per statement, in order. Empty when the text did not parse
    /// (or held no statement).
    pub statements: Vec<StatementFacts>,
    /// Whether the text parsed as PostgreSQL. Unparsed text is decided by
    /// policy (`context.parsed == false`), never assumed harmless.
    pub parsed: bool,
}

impl Classification {
    pub fn multi_statement(&self) -> bool {
        self.statements.len() > 1
    }
}
