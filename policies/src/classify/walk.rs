//! The facts of one statement of PostgreSQL's parse tree.
//!
//! Two passes. The statement pass ([`Walker::statement`]) reads the
//! top-level statement by its type: its kind, what it does to the tables it
//! names itself, its settings. The tree pass visits **every** node of the
//! statement, whatever its type, through the tree's `Serialize`
//! implementation (`pg_query`'s protobuf types derive it), so no function
//! call, table or nested statement can hide in a part of the grammar this
//! file does not name: function calls (in CTEs, subqueries, `ROWS FROM`,
//! defaults, `RETURNING`, lateral joins, casts written as calls, `EXECUTE`
//! parameters…), relations and data-modifying statements are found wherever
//! they are.
//!
//! Where a relation is read or written follows from where it sits: the
//! target of an INSERT/UPDATE/DELETE/MERGE (anywhere, also in a CTE) or of
//! `SELECT … INTO` is written; the relations a utility statement names
//! itself (`relation`, `relations`, `objects`, … at its top) have the role
//! the statement pass gave them; every other one is read, unless it names
//! a CTE in scope.

use pg_query::NodeEnum;
use pg_query::protobuf::{self as pb, DiscardMode, ObjectType};

use super::functions::{self, Call};
use super::lineage;
use super::settings::{self, Effect, Setting};
use super::tree::{self, Visitor};
use crate::{Deallocates, StatementFacts, StatementKind};

/// The facts of one top-level statement.
///
/// `EXPLAIN` without `ANALYZE` only plans its statement: it is a `select`
/// (it reads, runs nothing, writes nothing), and every table its statement names is read (planning
/// reads their definitions and statistics). `EXPLAIN ANALYZE` runs its
/// statement and has that statement's facts. `PREPARE name AS stmt` has the
/// facts of `stmt` with `prepares` set.
pub(super) fn facts(statement: &NodeEnum) -> StatementFacts {
    match statement {
        NodeEnum::ExplainStmt(explain) => {
            let inner = explain
                .query
                .as_deref()
                .and_then(|q| q.node.as_ref())
                .map(facts)
                .unwrap_or_else(|| StatementFacts::new(StatementKind::Other));
            if explain_runs(&explain.options) {
                // Its rows are the plan, not the statement's.
                StatementFacts {
                    outputs: crate::Outputs::none(),
                    ..inner
                }
            } else {
                planned_only(inner)
            }
        }
        NodeEnum::PrepareStmt(prepare) => {
            let mut inner = prepare
                .query
                .as_deref()
                .and_then(|q| q.node.as_ref())
                .map(facts)
                .unwrap_or_else(|| StatementFacts::new(StatementKind::Other));
            inner.prepares = Some(prepare.name.clone());
            inner
        }
        _ => {
            let mut walker = Walker::new();
            walker.statement(statement);
            tree::visit(statement, &mut walker);
            let mentions = lineage::mentions(statement);
            StatementFacts {
                outputs: lineage::outputs(statement),
                stores: lineage::stores(statement, &mentions),
                mentions,
                ..walker.finish(statement)
            }
        }
    }
}

/// Whether an `EXPLAIN` runs its statement: an `ANALYZE` option (however
/// spelt: `ANALYZE`, `ANALYSE`, `(ANALYZE)`, `(ANALYSE on)`) that is not
/// plainly false (`(ANALYZE false)`, `(ANALYZE 0)`, `(ANALYZE off)`).
fn explain_runs(options: &[pb::Node]) -> bool {
    options.iter().any(|o| match o.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if d.defname == "analyze" => {
            d.arg.as_deref().map_or(Some(true), |arg| {
                settings::literal(arg).and_then(|v| settings::pg_bool(&v))
            }) != Some(false)
        }
        _ => false,
    })
}

/// The facts of a statement that is planned but not run.
fn planned_only(inner: StatementFacts) -> StatementFacts {
    let mut facts = StatementFacts::new(StatementKind::Select);
    facts.tables_read = inner.tables_read;
    facts.tables_read.extend(inner.tables_written);
    facts.functions = inner.functions;
    facts
}

/// Importance of a kind when a statement does several things: the kind of
/// a statement is that of the most consequential thing it does.
fn rank(kind: StatementKind) -> u8 {
    match kind {
        StatementKind::Other => 0,
        StatementKind::Transaction => 1,
        StatementKind::Session => 2,
        StatementKind::Utility => 3,
        StatementKind::Select => 4,
        StatementKind::CopyOut => 5,
        StatementKind::Call => 6,
        StatementKind::CopyIn => 7,
        StatementKind::Insert => 8,
        StatementKind::Merge => 9,
        StatementKind::Update => 10,
        StatementKind::Delete => 11,
        StatementKind::Ddl => 12,
        StatementKind::Dcl => 13,
    }
}

/// What the relations a utility statement names itself are to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Read,
    Written,
}

/// Fields of a top-level statement that hold the relations it acts on.
const OWN_RELATION_FIELDS: &[&str] = &[
    "relation",
    "inh_relations",
    "relations",
    "objects",
    "rels",
    "table",
    "view",
    "sequence",
    "base_stmt",
];

/// Structs that may stand between a statement and its own relations
/// (`VACUUM`'s `rels` are `VacuumRelation`s; `CREATE FOREIGN TABLE` wraps a
/// `CreateStmt`).
const RELATION_WRAPPERS: &[&str] = &["Node", "VacuumRelation", "CreateStmt"];

/// Where, inside one query, a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In the query's `i`-th CTE.
    Cte(usize),
    /// Anywhere else in the query.
    Body,
}

/// A query (SELECT, INSERT, UPDATE, DELETE, MERGE) and its CTE names.
#[derive(Debug, Default)]
struct Query {
    ctes: Vec<String>,
    recursive: bool,
}

/// A relation read, to be told apart from a CTE reference once every CTE
/// name of the statement is known.
struct Read {
    name: String,
    /// Written without schema: it may name a CTE.
    bare: bool,
    /// The queries it is in, outermost first, and where in each.
    scope: Vec<(usize, Place)>,
}

/// One struct being visited, and which of its fields.
struct Frame {
    name: &'static str,
    field: &'static str,
    /// A RangeVar's name parts, or a FuncCall's name (its last part).
    parts: [String; 3],
}

struct Walker {
    facts: StatementFacts,
    /// The role of the top-level statement's own relations, if it has any.
    own: Option<Role>,
    stack: Vec<Frame>,
    queries: Vec<Query>,
    /// The queries the visit is in, outermost first.
    scope: Vec<(usize, Place)>,
    reads: Vec<Read>,
    /// `set_config` calls seen by the tree pass, and their effect when
    /// every one of them could be read (see [`Walker::finish`]).
    set_configs: usize,
}

impl Walker {
    fn new() -> Self {
        Self {
            facts: StatementFacts::new(StatementKind::Other),
            own: None,
            stack: Vec::new(),
            queries: Vec::new(),
            scope: Vec::new(),
            reads: Vec::new(),
            set_configs: 0,
        }
    }

    fn raise(&mut self, kind: StatementKind) {
        if rank(kind) > rank(self.facts.kind) {
            self.facts.kind = kind;
        }
    }

    /// A kind that always writes.
    fn raise_writing(&mut self, kind: StatementKind) {
        self.raise(kind);
        self.facts.writes = true;
    }

    /// A statement that creates, alters or drops the objects it names.
    fn schema_change(&mut self) {
        self.raise_writing(StatementKind::Ddl);
        self.own = Some(Role::Written);
    }

    fn apply(&mut self, effect: Effect) {
        self.facts.disables_read_only |= effect.disables_read_only;
        self.facts.changes_parsing |= effect.changes_parsing;
        if effect.identity {
            self.raise_writing(StatementKind::Dcl);
        }
    }

    /// The statement pass: the top-level statement by its type.
    fn statement(&mut self, statement: &NodeEnum) {
        use StatementKind as K;
        match statement {
            // Reads (DML is found by the tree pass, wherever it is). A
            // cursor's query runs as it is fetched.
            NodeEnum::SelectStmt(_) | NodeEnum::DeclareCursorStmt(_) => self.raise(K::Select),
            NodeEnum::FetchStmt(fetch) if !fetch.ismove => self.raise(K::Select),
            NodeEnum::FetchStmt(_) => self.raise(K::Utility),
            NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_) => {}

            // COPY. Writing a server file is a write even when copying out.
            NodeEnum::CopyStmt(copy) => {
                if copy.is_from {
                    self.raise_writing(K::CopyIn);
                    self.own = Some(Role::Written);
                } else {
                    self.raise(K::CopyOut);
                    self.own = Some(Role::Read);
                }
                // Both also write (see `finish`).
                if copy.is_program {
                    self.facts.runs_program = true;
                } else if !copy.filename.is_empty() {
                    self.facts.reaches_outside = true;
                } else if copy.is_from {
                    self.facts.copies_from_client = true;
                }
            }

            // Code whose effects the text does not show.
            NodeEnum::CallStmt(_) | NodeEnum::DoStmt(_) => {
                self.raise_writing(K::Call);
                self.facts.dynamic = true;
            }
            // Defining code that runs later (functions, procedures, rules,
            // languages), or installing an extension (its script runs now).
            NodeEnum::CreateFunctionStmt(_)
            | NodeEnum::RuleStmt(_)
            | NodeEnum::CreatePlangStmt(_)
            | NodeEnum::CreateExtensionStmt(_)
            | NodeEnum::AlterExtensionStmt(_)
            | NodeEnum::AlterExtensionContentsStmt(_) => {
                self.schema_change();
                self.facts.dynamic = true;
            }
            // Other servers, files through foreign-data wrappers,
            // replication from elsewhere, libraries loaded into the server.
            NodeEnum::CreateFdwStmt(_)
            | NodeEnum::AlterFdwStmt(_)
            | NodeEnum::CreateForeignServerStmt(_)
            | NodeEnum::AlterForeignServerStmt(_)
            | NodeEnum::CreateForeignTableStmt(_)
            | NodeEnum::ImportForeignSchemaStmt(_)
            | NodeEnum::CreateSubscriptionStmt(_)
            | NodeEnum::AlterSubscriptionStmt(_) => {
                self.schema_change();
                self.facts.reaches_outside = true;
            }

            // The worker judges EXECUTE by what was prepared under the name.
            NodeEnum::ExecuteStmt(execute) => {
                self.raise(K::Other);
                self.facts.executes = Some(execute.name.clone());
            }
            NodeEnum::DeallocateStmt(deallocate) => {
                self.raise(K::Utility);
                self.facts.deallocates = Some(if deallocate.isall {
                    Deallocates::All
                } else {
                    Deallocates::One(deallocate.name.clone())
                });
            }
            NodeEnum::ClosePortalStmt(_) => self.raise(K::Utility),

            // Settings.
            NodeEnum::VariableSetStmt(set) => {
                if matches!(Setting::named(&set.name), Setting::Identity) {
                    self.raise_writing(K::Dcl);
                } else {
                    self.raise(K::Session);
                }
                self.apply(settings::variable_set(set));
            }
            NodeEnum::VariableShowStmt(_) | NodeEnum::ConstraintsSetStmt(_) => {
                self.raise(K::Session)
            }
            NodeEnum::DiscardStmt(discard) => {
                self.raise(K::Utility);
                if discard.target == DiscardMode::DiscardAll as i32 {
                    self.facts.deallocates = Some(Deallocates::All);
                    self.apply(settings::reset_all());
                }
            }
            NodeEnum::TransactionStmt(transaction) => {
                self.raise(K::Transaction);
                self.facts.disables_read_only |= transaction
                    .options
                    .iter()
                    .any(settings::turns_read_only_off);
            }

            // Privileges, roles, and settings of the server, a role or a
            // database (they apply to later sessions). The server's
            // configuration file can name programs (archive_command) and
            // libraries.
            NodeEnum::AlterSystemStmt(pb::AlterSystemStmt { setstmt }) => {
                self.raise_writing(K::Dcl);
                self.facts.reaches_outside = true;
                if let Some(set) = setstmt {
                    self.apply(settings::variable_set(set));
                }
            }
            NodeEnum::AlterRoleSetStmt(pb::AlterRoleSetStmt { setstmt, .. })
            | NodeEnum::AlterDatabaseSetStmt(pb::AlterDatabaseSetStmt { setstmt, .. }) => {
                self.raise_writing(K::Dcl);
                if let Some(set) = setstmt {
                    self.apply(settings::variable_set(set));
                }
            }
            NodeEnum::GrantStmt(_) => {
                self.raise_writing(K::Dcl);
                self.own = Some(Role::Written);
            }
            NodeEnum::GrantRoleStmt(_)
            | NodeEnum::CreateRoleStmt(_)
            | NodeEnum::AlterRoleStmt(_)
            | NodeEnum::DropRoleStmt(_)
            | NodeEnum::AlterDefaultPrivilegesStmt(_)
            | NodeEnum::ReassignOwnedStmt(_)
            | NodeEnum::DropOwnedStmt(_)
            | NodeEnum::SecLabelStmt(_)
            | NodeEnum::DropUserMappingStmt(_) => self.raise_writing(K::Dcl),
            NodeEnum::CreateUserMappingStmt(_) | NodeEnum::AlterUserMappingStmt(_) => {
                self.raise_writing(K::Dcl);
                self.facts.reaches_outside = true;
            }

            // Utility and maintenance. LOCK changes no data; its tables are
            // read. Maintenance rewrites storage or statistics and counts as
            // writing its tables.
            NodeEnum::LockStmt(_) => {
                self.raise(K::Utility);
                self.own = Some(Role::Read);
            }
            NodeEnum::VacuumStmt(_)
            | NodeEnum::ClusterStmt(_)
            | NodeEnum::ReindexStmt(_)
            | NodeEnum::RefreshMatViewStmt(_) => {
                self.raise_writing(K::Utility);
                self.own = Some(Role::Written);
            }
            NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => self.raise(K::Utility),
            // NOTIFY reaches other sessions, like pg_notify(); CHECKPOINT
            // writes every dirty buffer; LOAD loads a shared library into
            // the server process.
            NodeEnum::NotifyStmt(_) | NodeEnum::CheckPointStmt(_) => self.raise_writing(K::Utility),
            NodeEnum::LoadStmt(_) => {
                self.raise_writing(K::Utility);
                self.facts.reaches_outside = true;
            }

            // DROP and COMMENT name their objects as lists of words.
            NodeEnum::DropStmt(drop) => {
                self.raise_writing(K::Ddl);
                if is_relation(drop.remove_type) {
                    for object in &drop.objects {
                        if let Some(name) = qualified_name(object) {
                            self.facts.tables_written.insert(name);
                        }
                    }
                }
            }
            NodeEnum::CommentStmt(comment) => {
                self.raise_writing(K::Ddl);
                if is_relation(comment.objtype)
                    && let Some(name) = comment.object.as_deref().and_then(qualified_name)
                {
                    self.facts.tables_written.insert(name);
                }
            }

            // Everything else creates, alters or drops schema objects.
            _ => self.schema_change(),
        }
    }

    fn finish(mut self, statement: &NodeEnum) -> StatementFacts {
        for read in std::mem::take(&mut self.reads) {
            if !(read.bare && self.is_cte(&read)) {
                self.facts.tables_read.insert(read.name);
            }
        }
        if self.set_configs > 0 {
            let mut found = Vec::new();
            for (node, ..) in statement.nodes() {
                if let pg_query::NodeRef::FuncCall(call) = node
                    && function_name(&call.funcname).as_deref() == Some("set_config")
                {
                    found.push(settings::set_config(&call.args));
                }
            }
            // pg_query's own iteration does not reach every part of the
            // grammar; a call it missed could set anything.
            if found.len() != self.set_configs {
                found.push(settings::set_config(&[]));
            }
            for effect in found {
                self.apply(effect);
            }
        }
        if self.facts.runs_program || self.facts.reaches_outside || self.facts.dynamic {
            self.facts.writes = true;
        }
        self.facts
    }

    /// Whether a bare name refers to a CTE in scope where it is: the
    /// innermost query, going outwards, that has a CTE of that name visible
    /// there (a CTE sees the ones before it, all of them with `RECURSIVE`;
    /// the rest of the query sees all).
    fn is_cte(&self, read: &Read) -> bool {
        read.scope.iter().rev().any(|&(q, place)| {
            let query = &self.queries[q];
            let visible = match place {
                Place::Body => query.ctes.len(),
                Place::Cte(_) if query.recursive => query.ctes.len(),
                Place::Cte(i) => i,
            };
            query.ctes[..visible.min(query.ctes.len())].contains(&read.name)
        })
    }

    fn top(&self) -> Option<&Frame> {
        self.stack.last()
    }

    fn function(&mut self, name: String) {
        let name = name.to_lowercase();
        match functions::call(&name) {
            Some(Call::Dynamic) => self.facts.dynamic = true,
            Some(Call::Outside) => self.facts.reaches_outside = true,
            Some(Call::Writes) => self.facts.writes = true,
            Some(Call::Harmless) | None => {}
        }
        if name == "set_config" {
            self.set_configs += 1;
        }
        self.facts.functions.insert(name);
    }

    /// A relation, when its RangeVar has been visited: `[catalog, schema,
    /// name]`.
    fn relation(&mut self, parts: [String; 3]) {
        let bare = parts[0].is_empty() && parts[1].is_empty();
        let name = parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(".");
        let role = match self.top() {
            Some(Frame {
                name: "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt",
                field: "relation",
                ..
            })
            | Some(Frame {
                name: "IntoClause",
                field: "rel",
                ..
            }) => Some(Role::Written),
            _ if self.is_own_relation() => self.own,
            _ => None,
        };
        match role {
            Some(Role::Written) => {
                self.facts.tables_written.insert(name);
            }
            Some(Role::Read) => {
                self.facts.tables_read.insert(name);
            }
            None => self.reads.push(Read {
                name,
                bare,
                scope: self.scope.clone(),
            }),
        }
    }

    /// Whether the RangeVar just visited is one the top-level statement
    /// names itself (see [`OWN_RELATION_FIELDS`]).
    fn is_own_relation(&self) -> bool {
        let Some((statement, between)) = self.stack.split_first() else {
            return false;
        };
        OWN_RELATION_FIELDS.contains(&statement.field)
            && between.iter().all(|f| RELATION_WRAPPERS.contains(&f.name))
    }
}

/// The tree pass.
impl Visitor for Walker {
    fn begin_struct(&mut self, name: &'static str) {
        use StatementKind as K;
        match name {
            "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                self.queries.push(Query::default());
                self.scope.push((self.queries.len() - 1, Place::Body));
                match name {
                    "InsertStmt" => self.raise_writing(K::Insert),
                    "UpdateStmt" => self.raise_writing(K::Update),
                    "DeleteStmt" => self.raise_writing(K::Delete),
                    "MergeStmt" => self.raise_writing(K::Merge),
                    _ => {}
                }
            }
            "CommonTableExpr" => {
                if let Some(&(q, _)) = self.scope.last() {
                    let i = self.queries[q].ctes.len();
                    self.queries[q].ctes.push(String::new());
                    self.scope.last_mut().expect("checked").1 = Place::Cte(i);
                }
            }
            // `SELECT … INTO t` creates `t`.
            "IntoClause" => self.raise_writing(K::Ddl),
            _ => {}
        }
        self.stack.push(Frame {
            name,
            field: "",
            parts: Default::default(),
        });
    }

    fn end_struct(&mut self) {
        let Some(frame) = self.stack.pop() else {
            return;
        };
        match frame.name {
            "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                self.scope.pop();
            }
            "CommonTableExpr" => {
                if let Some(last) = self.scope.last_mut() {
                    last.1 = Place::Body;
                }
            }
            "RangeVar" => self.relation(frame.parts),
            "FuncCall" => {
                let [name, ..] = frame.parts;
                self.function(name);
            }
            _ => {}
        }
    }

    fn field(&mut self, key: &'static str) {
        if let Some(top) = self.stack.last_mut() {
            top.field = key;
        }
    }

    fn string(&mut self, value: &str) {
        let n = self.stack.len();
        let Some(top) = self.stack.last() else {
            return;
        };
        match (top.name, top.field) {
            ("RangeVar", field) => {
                let slot = match field {
                    "catalogname" => 0,
                    "schemaname" => 1,
                    "relname" => 2,
                    _ => return,
                };
                self.stack[n - 1].parts[slot] = value.to_owned();
            }
            ("String", "sval") if n >= 3 => {
                let owner = &self.stack[n - 3];
                match (owner.name, owner.field) {
                    // A function's name is a list of String nodes; the last
                    // stands.
                    ("FuncCall", "funcname") => self.stack[n - 3].parts[0] = value.to_owned(),
                    // `(expr).name` selects a field of a composite value, or
                    // calls `name(expr)`: PostgreSQL's attribute notation
                    // (`('/etc/hostname'::text).pg_read_file` reads the
                    // file). Taken as a call.
                    ("AIndirection", "indirection") => self.function(value.to_owned()),
                    _ => {}
                }
            }
            // `CREATE TABLE … AS EXECUTE p` runs what `p` runs too.
            ("ExecuteStmt", "name") => self.facts.executes = Some(value.to_owned()),
            ("CommonTableExpr", "ctename") => {
                if let Some(&(q, _)) = self.scope.last()
                    && let Some(name) = self.queries[q].ctes.last_mut()
                {
                    *name = value.to_owned();
                }
            }
            _ => {}
        }
    }

    fn boolean(&mut self, value: bool) {
        if value
            && matches!(
                self.top(),
                Some(Frame {
                    name: "WithClause",
                    field: "recursive",
                    ..
                })
            )
            && let Some(&(q, _)) = self.scope.last()
        {
            self.queries[q].recursive = true;
        }
    }

    fn none(&mut self) {
        // An UPDATE or DELETE without WHERE (`WHERE CURRENT OF` is one).
        if let Some(Frame {
            name: "UpdateStmt" | "DeleteStmt",
            field: "where_clause",
            ..
        }) = self.top()
        {
            self.facts.has_where = false;
        }
    }
}

/// Whether an object type is a relation (table, view, index, sequence…).
fn is_relation(object_type: i32) -> bool {
    [
        ObjectType::ObjectTable,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectIndex,
        ObjectType::ObjectSequence,
        ObjectType::ObjectForeignTable,
    ]
    .iter()
    .any(|t| *t as i32 == object_type)
}

/// `a.b.c` from a DROP's or COMMENT's list of words.
fn qualified_name(object: &pb::Node) -> Option<String> {
    let Some(NodeEnum::List(list)) = object.node.as_ref() else {
        return None;
    };
    let parts = list
        .items
        .iter()
        .map(|item| match item.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(parts.join("."))
}

/// A function's name as policies see it: the last part, lowercased.
fn function_name(funcname: &[pb::Node]) -> Option<String> {
    match funcname.last()?.node.as_ref()? {
        NodeEnum::String(s) => Some(s.sval.to_lowercase()),
        _ => None,
    }
}
