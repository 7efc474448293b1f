//! Where the values of a statement's result columns come from: the columns
//! and whole rows each entry of its select list (or `RETURNING`) is
//! computed from, so that masking follows a masked column into
//! `upper(ssn)`, `ssn || ''`, `row_to_json(u)`, a scalar subquery, a
//! `UNION` or a CTE.
//!
//! The answer may name more sources than a value really has, never fewer:
//!
//! - A column written without its table may belong to any relation in
//!   scope, also in the queries around it: each is listed.
//! - An expression's sources are every column it mentions, also inside its
//!   subqueries, where a column that only filters (`(SELECT name FROM u
//!   WHERE ssn = …)`) is listed too.
//! - Subqueries, CTEs and functions in `FROM` are followed by name: `q.x`
//!   has the sources of `q`'s entry `x`; an entry whose name cannot be
//!   told matches every name, and a name that matches no entry matches
//!   them all.
//! - Set operations and `VALUES` join their branches column by column; a
//!   recursive CTE is followed until its sources stop growing.
//!
//! What a function reads by itself is not in the text: an entry names the
//! functions it calls, for the worker to tell those defined in the
//! database, and is `opaque` when one runs SQL given as text.

use pg_query::NodeEnum;
use pg_query::protobuf as pb;

use super::functions::{self, Call};
use super::tree::{self, Visitor};
use crate::{Output, Outputs};

/// The outputs of a top-level statement.
pub(super) fn outputs(statement: &NodeEnum) -> Outputs {
    match statement {
        NodeEnum::SelectStmt(_)
        | NodeEnum::InsertStmt(_)
        | NodeEnum::UpdateStmt(_)
        | NodeEnum::DeleteStmt(_)
        | NodeEnum::MergeStmt(_) => Outputs::Known(
            query(statement, None)
                .into_iter()
                .map(|o| o.output)
                .collect(),
        ),
        // A cursor's rows, a procedure's output arguments.
        NodeEnum::FetchStmt(_) | NodeEnum::CallStmt(_) => Outputs::Unknown,
        _ => Outputs::none(),
    }
}

/// Where the values a top-level statement stores come from. A statement
/// that calls a function storing its arguments elsewhere (`set_config`,
/// `pg_notify`, large objects, sequences, advisory locks, …) may store any
/// column it names; one that runs code from text (`DO`, `query_to_xml`) or
/// defines code that runs later (functions, rules, triggers, extensions)
/// may store anything (`opaque`).
/// `mentions`: what the statement names ([`mentions`]).
pub(super) fn stores(statement: &NodeEnum, mentions: &Output) -> Output {
    let mut out = Output::default();
    stored(statement, None, &mut out);
    out.opaque |= mentions.opaque;
    if mentions
        .functions
        .iter()
        .any(|f| matches!(functions::call(f), Some(Call::Writes | Call::Outside)))
    {
        merge(&mut out, mentions);
    }
    dedup(&mut out);
    out
}

/// Every column, whole row and function a statement names, anywhere: a
/// column written without its table as one of every relation the statement
/// names.
pub(super) fn mentions(statement: &NodeEnum) -> Output {
    expression(statement, &Scope::default())
}

fn stored(node: &NodeEnum, parent: Option<&Scope>, out: &mut Output) {
    let all = |outs: Vec<Out>, out: &mut Output| {
        for o in outs {
            merge(out, &o.output);
        }
    };
    match node {
        NodeEnum::InsertStmt(s) => {
            let scope = with_stored(s.with_clause.as_ref(), parent, out);
            // Its query does not see the target.
            if let Some(q) = s.select_stmt.as_deref().and_then(|q| q.node.as_ref()) {
                all(query(q, Some(&scope)), out);
            }
            if let Some(c) = &s.on_conflict_clause {
                let scope = modifying(node, scope);
                merge(out, &expression(&c.target_list, &scope));
            }
        }
        NodeEnum::UpdateStmt(s) => {
            let scope = modifying(node, with_stored(s.with_clause.as_ref(), parent, out));
            merge(out, &expression(&s.target_list, &scope));
        }
        NodeEnum::MergeStmt(s) => {
            let scope = modifying(node, with_stored(s.with_clause.as_ref(), parent, out));
            merge(out, &expression(&s.merge_when_clauses, &scope));
        }
        NodeEnum::DeleteStmt(s) => {
            with_stored(s.with_clause.as_ref(), parent, out);
        }
        NodeEnum::SelectStmt(s) => {
            with_stored(s.with_clause.as_ref(), parent, out);
            if s.into_clause.is_some() {
                all(select(s, parent), out);
            }
        }
        NodeEnum::CreateTableAsStmt(c) => match c.query.as_deref().and_then(|q| q.node.as_ref()) {
            // `CREATE TABLE t AS EXECUTE p`: what `p` returns.
            Some(NodeEnum::ExecuteStmt(_)) => out.opaque = true,
            Some(q) => all(query(q, parent), out),
            None => {}
        },
        // Code that runs now or later, with what it reads: what it stores
        // cannot be known.
        NodeEnum::DoStmt(_)
        | NodeEnum::CreateFunctionStmt(_)
        | NodeEnum::RuleStmt(_)
        | NodeEnum::CreateTrigStmt(_)
        | NodeEnum::CreateEventTrigStmt(_)
        | NodeEnum::CreatePlangStmt(_)
        | NodeEnum::CreateExtensionStmt(_)
        | NodeEnum::AlterExtensionStmt(_)
        | NodeEnum::AlterExtensionContentsStmt(_) => out.opaque = true,
        // Renaming a table or its columns, detaching a partition or child:
        // what the rules name would no longer be found. As if the table's
        // rows were stored.
        NodeEnum::AlterTableStmt(a) => {
            if let Some(r) = &a.relation {
                out.rows.push(r.relname.clone());
            }
        }
        NodeEnum::RenameStmt(r) => {
            if let Some(r) = &r.relation {
                out.rows.push(r.relname.clone());
            }
        }
        NodeEnum::ViewStmt(v) => {
            if let Some(q) = v.query.as_deref().and_then(|q| q.node.as_ref()) {
                all(query(q, parent), out);
            }
        }
        _ => {}
    }
}

/// [`with`], and what its data-modifying CTEs store.
fn with_stored<'p>(
    clause: Option<&pb::WithClause>,
    parent: Option<&'p Scope<'p>>,
    out: &mut Output,
) -> Scope<'p> {
    let scope = with(clause, parent);
    for cte in clause.map(|c| &c.ctes[..]).unwrap_or_default() {
        if let Some(NodeEnum::CommonTableExpr(cte)) = cte.node.as_ref()
            && let Some(q) = cte.ctequery.as_deref().and_then(|q| q.node.as_ref())
        {
            stored(q, Some(&scope), out);
        }
    }
    scope
}

/// One entry of a query's result.
#[derive(Debug, Clone, Default)]
struct Out {
    /// Its column's name, when it can be told (else it matches any name).
    name: Option<String>,
    output: Output,
    /// For a `*`: the tables it spans, whose columns it names.
    tables: Vec<String>,
}

/// What a name in `FROM` stands for.
#[derive(Debug)]
enum Item {
    Table {
        table: String,
        alias: String,
    },
    /// A subquery, CTE, function or other row source: its entries.
    Derived {
        alias: String,
        outs: Vec<Out>,
    },
}

impl Item {
    fn alias(&self) -> &str {
        match self {
            Item::Table { alias, .. } | Item::Derived { alias, .. } => alias,
        }
    }
}

/// The names one query level sees: its `FROM` items and CTEs, then those
/// of the queries around it.
#[derive(Default)]
struct Scope<'p> {
    items: Vec<Item>,
    ctes: Vec<(String, Vec<Out>)>,
    parent: Option<&'p Scope<'p>>,
}

impl<'p> Scope<'p> {
    fn new(parent: Option<&'p Scope<'p>>) -> Self {
        Scope {
            items: Vec::new(),
            ctes: Vec::new(),
            parent,
        }
    }

    fn chain(&self) -> impl Iterator<Item = &Scope<'_>> {
        std::iter::successors(Some(self), |s| s.parent)
    }

    fn cte(&self, name: &str) -> Option<&[Out]> {
        self.chain().find_map(|s| {
            s.ctes
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, outs)| &outs[..])
        })
    }

    /// The item a `FROM` relation stands for: a CTE in scope, or a table.
    fn relation(&self, rv: &pb::RangeVar) -> Item {
        let alias = rv
            .alias
            .as_ref()
            .map_or(&rv.relname, |a| &a.aliasname)
            .clone();
        let cols = rv.alias.as_ref().map(|a| names(&a.colnames));
        match self.cte(&rv.relname) {
            Some(outs) if rv.schemaname.is_empty() => Item::Derived {
                alias,
                outs: renamed(outs.to_vec(), cols.as_deref()),
            },
            _ => Item::Table {
                table: rv.relname.clone(),
                alias,
            },
        }
    }
}

fn query(node: &NodeEnum, parent: Option<&Scope>) -> Vec<Out> {
    let (with_clause, returning) = match node {
        NodeEnum::SelectStmt(s) => return select(s, parent),
        NodeEnum::InsertStmt(s) => (&s.with_clause, &s.returning_clause),
        NodeEnum::UpdateStmt(s) => (&s.with_clause, &s.returning_clause),
        NodeEnum::DeleteStmt(s) => (&s.with_clause, &s.returning_clause),
        NodeEnum::MergeStmt(s) => (&s.with_clause, &s.returning_clause),
        _ => return Vec::new(),
    };
    let scope = modifying(node, with(with_clause.as_ref(), parent));
    returning
        .as_ref()
        .map_or_else(Vec::new, |c| targets(&c.exprs, &scope))
}

/// What the expressions of a data-modifying statement see besides its
/// `WITH` (in `scope`): the table it changes, under its names, and its
/// `FROM`, `USING` or source.
fn modifying<'p>(node: &NodeEnum, mut scope: Scope<'p>) -> Scope<'p> {
    let (relation, extra, sources): (_, &[&str], &[pb::Node]) = match node {
        NodeEnum::InsertStmt(s) => (&s.relation, &["excluded"], &[]),
        NodeEnum::UpdateStmt(s) => (&s.relation, &[], &s.from_clause),
        NodeEnum::DeleteStmt(s) => (&s.relation, &[], &s.using_clause),
        NodeEnum::MergeStmt(s) => (
            &s.relation,
            &[],
            s.source_relation
                .as_deref()
                .map(std::slice::from_ref)
                .unwrap_or_default(),
        ),
        _ => return scope,
    };
    target(relation.as_ref(), &mut scope, extra);
    for item in sources {
        from(item, &mut scope);
    }
    scope
}

/// The table a data-modifying statement changes, under its own name or
/// alias, and under `extra` ones (`excluded`, and `RETURNING`'s `old` and
/// `new`).
fn target(relation: Option<&pb::RangeVar>, scope: &mut Scope, extra: &[&str]) {
    let Some(rv) = relation else { return };
    let alias = rv.alias.as_ref().map_or(&rv.relname, |a| &a.aliasname);
    for alias in [alias.as_str(), "old", "new"].iter().chain(extra) {
        scope.items.push(Item::Table {
            table: rv.relname.clone(),
            alias: (*alias).to_owned(),
        });
    }
}

/// A query level with the CTEs of its `WITH`, each seeing the ones before
/// it (and itself, when `RECURSIVE`).
fn with<'p>(clause: Option<&pb::WithClause>, parent: Option<&'p Scope<'p>>) -> Scope<'p> {
    let mut scope = Scope::new(parent);
    let Some(clause) = clause else { return scope };
    for node in &clause.ctes {
        let Some(NodeEnum::CommonTableExpr(cte)) = node.node.as_ref() else {
            continue;
        };
        let Some(q) = cte.ctequery.as_deref().and_then(|q| q.node.as_ref()) else {
            continue;
        };
        let cols = names(&cte.aliascolnames);
        let outs = if clause.recursive {
            recursive(&cte.ctename, q, &cols, &mut scope)
        } else {
            renamed(query(q, Some(&scope)), Some(&cols))
        };
        scope.ctes.push((cte.ctename.clone(), outs));
    }
    scope
}

/// A CTE that may read itself: its sources, followed until they stop
/// growing (after a few rounds, every entry has every entry's sources).
fn recursive(name: &str, q: &NodeEnum, cols: &[Option<String>], scope: &mut Scope) -> Vec<Out> {
    let mut outs: Vec<Out> = Vec::new();
    for round in 0..8 {
        scope.ctes.push((name.to_owned(), outs.clone()));
        let next = renamed(query(q, Some(scope)), Some(cols));
        scope.ctes.pop();
        let mut grown = next.len() != outs.len();
        outs.resize_with(next.len().max(outs.len()), Out::default);
        for (o, n) in outs.iter_mut().zip(next) {
            o.name = o.name.take().or(n.name);
            grown |= merge(&mut o.output, &n.output);
        }
        if !grown {
            return outs;
        }
        if round == 6 {
            let all = outs.iter().fold(Output::default(), |mut all, o| {
                merge(&mut all, &o.output);
                all
            });
            for o in &mut outs {
                o.output = all.clone();
            }
        }
    }
    outs
}

fn select(s: &pb::SelectStmt, parent: Option<&Scope>) -> Vec<Out> {
    let mut scope = with(s.with_clause.as_ref(), parent);
    if s.larg.is_some() || s.rarg.is_some() {
        // A set operation: column by column, the names of the first.
        let mut outs = Vec::new();
        for arm in [&s.larg, &s.rarg].into_iter().flatten() {
            let arm = select(arm, Some(&scope));
            if outs.is_empty() {
                outs = arm;
                continue;
            }
            outs.resize_with(outs.len().max(arm.len()), Out::default);
            for (o, a) in outs.iter_mut().zip(arm) {
                merge(&mut o.output, &a.output);
                o.tables.extend(a.tables);
            }
        }
        return outs;
    }
    if !s.values_lists.is_empty() {
        let mut outs: Vec<Out> = Vec::new();
        for row in &s.values_lists {
            let Some(NodeEnum::List(row)) = row.node.as_ref() else {
                continue;
            };
            for (i, value) in row.items.iter().enumerate() {
                if outs.len() <= i {
                    outs.push(Out {
                        name: Some(format!("column{}", i + 1)),
                        ..Out::default()
                    });
                }
                merge(&mut outs[i].output, &expression(value, &scope));
            }
        }
        return outs;
    }
    for item in &s.from_clause {
        from(item, &mut scope);
    }
    targets(&s.target_list, &scope)
}

/// An item of `FROM` (or `USING`), added to `scope`.
fn from(node: &pb::Node, scope: &mut Scope) {
    let Some(node) = node.node.as_ref() else {
        return;
    };
    let item = match node {
        NodeEnum::RangeVar(rv) => scope.relation(rv),
        NodeEnum::JoinExpr(j) => {
            for side in [&j.larg, &j.rarg].into_iter().flatten() {
                from(side, scope);
            }
            return;
        }
        NodeEnum::RangeTableSample(t) => {
            if let Some(relation) = &t.relation {
                from(relation, scope);
            }
            return;
        }
        NodeEnum::RangeSubselect(r) => {
            let outs = r
                .subquery
                .as_deref()
                .and_then(|q| q.node.as_ref())
                .map(|q| query(q, Some(scope)))
                .unwrap_or_default();
            let cols = r.alias.as_ref().map(|a| names(&a.colnames));
            Item::Derived {
                alias: r
                    .alias
                    .as_ref()
                    .map(|a| a.aliasname.clone())
                    .unwrap_or_default(),
                outs: renamed(outs, cols.as_deref()),
            }
        }
        NodeEnum::RangeFunction(f) => Item::Derived {
            alias: f
                .alias
                .as_ref()
                .map(|a| a.aliasname.clone())
                .unwrap_or_default(),
            outs: vec![Out {
                output: expression(node, scope),
                ..Out::default()
            }],
        },
        // XMLTABLE, JSON_TABLE, …: every column from everything it names.
        other => Item::Derived {
            alias: String::new(),
            outs: vec![Out {
                output: expression(other, scope),
                ..Out::default()
            }],
        },
    };
    scope.items.push(item);
}

/// The entries of a select list or `RETURNING`.
fn targets(list: &[pb::Node], scope: &Scope) -> Vec<Out> {
    let mut outs = Vec::with_capacity(list.len());
    for node in list {
        let Some(NodeEnum::ResTarget(target)) = node.node.as_ref() else {
            continue;
        };
        let Some(value) = target.val.as_deref().and_then(|v| v.node.as_ref()) else {
            continue;
        };
        if let NodeEnum::ColumnRef(c) = value {
            let fields = fields(c);
            if let Some((Field::Star, qualifier)) = fields.split_last() {
                outs.push(star(qualifier.last(), scope));
                continue;
            }
        }
        outs.push(Out {
            name: if target.name.is_empty() {
                figured(value)
            } else {
                Some(target.name.clone())
            },
            output: expression(value, scope),
            tables: Vec::new(),
        });
    }
    outs
}

/// A `*` (or `q.*`) of a select list.
fn star(qualifier: Option<&Field>, scope: &Scope) -> Out {
    let mut out = Out::default();
    out.output.star = true;
    let named = |item: &&Item| match qualifier {
        Some(Field::Name(q)) => item.alias() == q,
        _ => true,
    };
    let mut items: Vec<&Item> = scope.items.iter().filter(named).collect();
    if items.is_empty() {
        items = scope.chain().flat_map(|s| &s.items).filter(named).collect();
    }
    if items.is_empty() {
        items = scope.items.iter().collect();
    }
    for item in items {
        match item {
            Item::Table { table, .. } => {
                out.output.rows.push(table.clone());
                out.tables.push(table.clone());
            }
            Item::Derived { outs, .. } => {
                for o in outs {
                    merge(&mut out.output, &o.output);
                    out.tables.extend(o.tables.iter().cloned());
                }
            }
        }
    }
    out.output.star = true;
    out
}

/// The sources of an expression: every column it mentions, resolved in
/// `scope` and among the relations its own subqueries name.
fn expression(node: &impl serde::Serialize, scope: &Scope) -> Output {
    let mut found = Found::default();
    tree::visit(node, &mut found);
    let inner: Vec<Item> = found
        .relations
        .iter()
        .map(|rv| scope.relation(rv))
        .collect();
    let mut out = Output::default();
    for fields in &found.refs {
        resolve(fields, scope, &inner, &mut out);
    }
    out.opaque |= found
        .functions
        .iter()
        .any(|f| functions::call(f) == Some(Call::Dynamic));
    out.functions.extend(found.functions);
    dedup(&mut out);
    out
}

/// Adds the sources of one column reference to `out`.
fn resolve(fields: &[Field], scope: &Scope, inner: &[Item], out: &mut Output) {
    let items = || inner.iter().chain(scope.chain().flat_map(|s| &s.items));
    match fields {
        [] => {}
        [.., Field::Star] => {
            let qualifier = fields.len().checked_sub(2).map(|i| &fields[i]);
            let o = star(qualifier, scope);
            merge(out, &o.output);
            for item in inner {
                if let (Item::Table { table, alias }, Some(Field::Name(q))) = (item, qualifier)
                    && alias == q
                {
                    out.rows.push(table.clone());
                }
            }
        }
        [Field::Name(column)] => {
            for item in items() {
                by_name(item, column, out);
                if item.alias() == column {
                    whole(item, out);
                }
            }
        }
        [.., Field::Name(q), Field::Name(column)] => {
            let mut found = false;
            for item in items().filter(|i| i.alias() == q) {
                found = true;
                by_name(item, column, out);
            }
            if !found {
                // A table named in full, a field of a composite column, or
                // an alias this walk does not know: all of them.
                out.columns.push((q.clone(), column.clone()));
                for item in items() {
                    by_name(item, q, out);
                    by_name(item, column, out);
                }
            }
        }
        [.., Field::Star, Field::Name(_)] => {}
    }
}

/// The sources of the column `column` of an item.
fn by_name(item: &Item, column: &str, out: &mut Output) {
    match item {
        Item::Table { table, .. } => out.columns.push((table.clone(), column.to_owned())),
        Item::Derived { outs, .. } => {
            let named: Vec<&Out> = outs
                .iter()
                .filter(|o| o.name.as_deref().is_none_or(|n| n == column))
                .collect();
            let chosen = if named.is_empty() {
                outs.iter().collect()
            } else {
                named
            };
            for o in chosen {
                if o.output.star {
                    for t in &o.tables {
                        out.columns.push((t.clone(), column.to_owned()));
                    }
                    let mut rest = o.output.clone();
                    rest.rows.retain(|r| !o.tables.contains(r));
                    merge(out, &rest);
                } else {
                    merge(out, &o.output);
                }
            }
        }
    }
}

/// The sources of an item's whole row (`row_to_json(q)`).
fn whole(item: &Item, out: &mut Output) {
    match item {
        Item::Table { table, .. } => out.rows.push(table.clone()),
        Item::Derived { outs, .. } => {
            for o in outs {
                merge(out, &o.output);
            }
        }
    }
}

/// Adds `from`'s sources to `into`; whether any was new.
fn merge(into: &mut Output, from: &Output) -> bool {
    let before = (
        into.columns.len(),
        into.rows.len(),
        into.functions.len(),
        into.opaque,
    );
    for f in &from.functions {
        if !into.functions.contains(f) {
            into.functions.push(f.clone());
        }
    }
    into.opaque |= from.opaque;
    for c in &from.columns {
        if !into.columns.contains(c) {
            into.columns.push(c.clone());
        }
    }
    for r in &from.rows {
        if !into.rows.contains(r) {
            into.rows.push(r.clone());
        }
    }
    before
        != (
            into.columns.len(),
            into.rows.len(),
            into.functions.len(),
            into.opaque,
        )
}

fn dedup(out: &mut Output) {
    out.columns.sort();
    out.columns.dedup();
    out.rows.sort();
    out.rows.dedup();
    out.functions.retain(|f| !f.is_empty());
    out.functions.sort();
    out.functions.dedup();
}

/// Column names given in an alias (`q(a, b)`) or a CTE's header.
fn names(list: &[pb::Node]) -> Vec<Option<String>> {
    list.iter()
        .map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

/// Entries renamed by an alias's column names, in order.
fn renamed(mut outs: Vec<Out>, cols: Option<&[Option<String>]>) -> Vec<Out> {
    let Some(cols) = cols.filter(|c| !c.is_empty()) else {
        return outs;
    };
    if outs.iter().any(|o| o.output.star) {
        // A `*` spans columns this walk cannot count: any name matches.
        for o in &mut outs {
            o.name = None;
        }
        return outs;
    }
    for (o, name) in outs.iter_mut().zip(cols) {
        o.name = name.clone();
    }
    outs
}

/// The name PostgreSQL gives an unnamed entry, where it is plain (the
/// column's, the function's); `None` (any name) otherwise.
fn figured(value: &NodeEnum) -> Option<String> {
    match value {
        NodeEnum::ColumnRef(c) => match fields(c).pop() {
            Some(Field::Name(n)) => Some(n),
            _ => None,
        },
        NodeEnum::FuncCall(f) => match f.funcname.last()?.node.as_ref()? {
            NodeEnum::String(s) => Some(s.sval.clone()),
            _ => None,
        },
        NodeEnum::TypeCast(t) => figured(t.arg.as_deref()?.node.as_ref()?),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name(String),
    Star,
}

fn fields(c: &pb::ColumnRef) -> Vec<Field> {
    c.fields
        .iter()
        .filter_map(|f| match f.node.as_ref()? {
            NodeEnum::String(s) => Some(Field::Name(s.sval.clone())),
            NodeEnum::AStar(_) => Some(Field::Star),
            _ => None,
        })
        .collect()
}

/// The column references and relations anywhere in a subtree.
#[derive(Default)]
struct Found {
    /// (struct, field) of the structs being visited.
    stack: Vec<(&'static str, &'static str)>,
    refs: Vec<Vec<Field>>,
    relations: Vec<pb::RangeVar>,
    /// Functions called, lowercase.
    functions: Vec<String>,
}

impl Found {
    fn at(&self, back: usize) -> Option<(&'static str, &'static str)> {
        self.stack
            .len()
            .checked_sub(back + 1)
            .map(|i| self.stack[i])
    }
}

impl Visitor for Found {
    fn begin_struct(&mut self, name: &'static str) {
        match name {
            "ColumnRef" => self.refs.push(Vec::new()),
            "RangeVar" => self.relations.push(pb::RangeVar::default()),
            "FuncCall" => self.functions.push(String::new()),
            "AStar" if self.at(1) == Some(("ColumnRef", "fields")) => {
                if let Some(r) = self.refs.last_mut() {
                    r.push(Field::Star);
                }
            }
            _ => {}
        }
        self.stack.push((name, ""));
    }

    fn field(&mut self, key: &'static str) {
        if let Some(top) = self.stack.last_mut() {
            top.1 = key;
        }
    }

    fn end_struct(&mut self) {
        self.stack.pop();
    }

    fn string(&mut self, value: &str) {
        match (self.at(0), self.at(1), self.at(2)) {
            (Some(("String", "sval")), _, Some(("ColumnRef", "fields"))) => {
                if let Some(r) = self.refs.last_mut() {
                    r.push(Field::Name(value.to_owned()));
                }
            }
            // A function's name: its last part stands.
            (Some(("String", "sval")), _, Some(("FuncCall", "funcname"))) => {
                if let Some(f) = self.functions.last_mut() {
                    *f = value.to_lowercase();
                }
            }
            // `(x).name`: a field, or PostgreSQL's attribute notation for
            // `name(x)`.
            (Some(("String", "sval")), _, Some(("AIndirection", "indirection"))) => {
                self.functions.push(value.to_lowercase());
            }
            (Some(("RangeVar", field)), _, _) => {
                if let Some(rv) = self.relations.last_mut() {
                    match field {
                        "relname" => rv.relname = value.to_owned(),
                        "schemaname" => rv.schemaname = value.to_owned(),
                        _ => {}
                    }
                }
            }
            (Some(("Alias", "aliasname")), Some(("RangeVar", "alias")), _) => {
                if let Some(rv) = self.relations.last_mut() {
                    rv.alias = Some(pb::Alias {
                        aliasname: value.to_owned(),
                        colnames: Vec::new(),
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::classify::{Reading, classify};
    use crate::{Output, Outputs};

    fn outputs(sql: &str) -> Outputs {
        let c = classify(sql, Reading::default());
        assert!(c.parsed, "{sql}");
        c.statements[0].outputs.clone()
    }

    fn entries(sql: &str) -> Vec<Output> {
        match outputs(sql) {
            Outputs::Known(all) => all.to_vec(),
            Outputs::Unknown => panic!("{sql}: unknown"),
        }
    }

    fn cols(o: &Output) -> Vec<String> {
        o.columns.iter().map(|(t, c)| format!("{t}.{c}")).collect()
    }

    #[test]
    fn computed_values_name_their_columns() {
        let e = entries("SELECT id, upper(ssn), ssn || '' AS s, 1 FROM users");
        assert_eq!(e.len(), 4);
        assert_eq!(cols(&e[0]), ["users.id"]);
        assert_eq!(cols(&e[1]), ["users.ssn"]);
        assert_eq!(cols(&e[2]), ["users.ssn"]);
        assert!(cols(&e[3]).is_empty());
        let e = entries("SELECT upper(u.ssn), o.total FROM users u JOIN orders o ON o.uid = u.id");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        assert_eq!(cols(&e[1]), ["orders.total"]);
        // Unqualified, with two tables in scope: either.
        let e = entries("SELECT coalesce(nickname, '') FROM users, orders");
        assert_eq!(cols(&e[0]), ["orders.nickname", "users.nickname"]);
        let e = entries("SELECT format('%s', public.users.ssn) FROM public.users");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
    }

    #[test]
    fn follows_subqueries_ctes_unions_and_values() {
        let e = entries("SELECT upper(x), q.id FROM (SELECT ssn AS x, id FROM users) q");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        assert_eq!(cols(&e[1]), ["users.id"]);
        let e = entries("SELECT lower(c.s) FROM (SELECT 1) z, (SELECT ssn FROM users) c(s)");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        let e = entries("WITH c AS (SELECT ssn, id FROM users) SELECT lower(c.ssn), id + 1 FROM c");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        assert_eq!(cols(&e[1]), ["users.id"]);
        let e = entries("SELECT (SELECT max(ssn) FROM users), 2");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        assert!(cols(&e[1]).is_empty());
        let e = entries("SELECT name, 1 FROM a UNION ALL SELECT ssn, id FROM users");
        assert_eq!(cols(&e[0]), ["a.name", "users.ssn"]);
        let e = entries("SELECT * FROM (VALUES (1, 'x')) v(a, b)");
        assert!(e[0].star);
        let e = entries("VALUES ('a'), ((SELECT ssn FROM users LIMIT 1))");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        // A subquery's `*` is followed by name to its tables' columns.
        let e = entries("SELECT upper(q.ssn) FROM (SELECT * FROM users) q");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        assert!(e[0].rows.is_empty());
        // Functions in FROM have the sources of their arguments.
        let e = entries("SELECT upper(v) FROM users u, jsonb_each_text(u.profile) AS j(k, v)");
        assert!(cols(&e[0]).contains(&"users.profile".to_owned()), "{e:?}");
    }

    #[test]
    fn entries_name_the_functions_they_call() {
        let e = entries(
            "SELECT get_ssn(id), upper(lower(name)), (u).nick, \
             query_to_xml('SELECT ssn FROM users', true, true, '') FROM users u",
        );
        assert_eq!(e[0].functions, ["get_ssn"]);
        assert!(!e[0].opaque);
        assert_eq!(e[1].functions, ["lower", "upper"]);
        assert_eq!(e[2].functions, ["nick"]);
        assert!(e[3].opaque, "runs SQL given as text");
        let e = entries("SELECT x FROM (SELECT public.get_ssn(id) AS x FROM users) q");
        assert_eq!(e[0].functions, ["get_ssn"], "followed through a subquery");
    }

    #[test]
    fn what_a_statement_stores_names_where_it_comes_from() {
        let stores = |sql: &str| {
            let c = classify(sql, Reading::default());
            assert!(c.parsed, "{sql}");
            let s = &c.statements[0].stores;
            let mut v = cols(s);
            v.extend(s.rows.iter().map(|r| format!("{r}.*")));
            if s.opaque {
                v.push("?".into());
            }
            v
        };
        for (sql, want) in [
            (
                "INSERT INTO t SELECT upper(ssn) FROM users",
                &["users.ssn"][..],
            ),
            (
                "INSERT INTO t (a) VALUES ((SELECT ssn FROM users LIMIT 1))",
                &["users.ssn"],
            ),
            ("INSERT INTO t VALUES (1, 'x')", &[]),
            (
                "UPDATE t SET a = u.ssn FROM users u WHERE u.id = t.id",
                &["users.ssn"],
            ),
            ("UPDATE t SET a = 1 WHERE b = 2", &[]),
            (
                "CREATE TABLE t AS SELECT ssn AS x FROM users",
                &["users.ssn"],
            ),
            ("CREATE TEMP TABLE t AS EXECUTE p", &["?"]),
            ("SELECT ssn INTO TEMP t FROM users", &["users.ssn"]),
            (
                "CREATE VIEW v AS SELECT lower(ssn) FROM users",
                &["users.ssn"],
            ),
            (
                "CREATE MATERIALIZED VIEW v AS SELECT u FROM users u",
                &["users.*"],
            ),
            (
                "WITH a AS (SELECT ssn FROM users), b AS (INSERT INTO t SELECT ssn FROM a) SELECT 1",
                &["users.ssn"],
            ),
            (
                "MERGE INTO t USING users u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.ssn",
                &["users.ssn"],
            ),
            (
                "PREPARE p AS INSERT INTO t SELECT ssn FROM users",
                &["users.ssn"],
            ),
            ("SELECT ssn FROM users", &[]),
            (
                "SELECT pg_notify('c', nickname) FROM users",
                &["users.nickname"],
            ),
            (
                "WITH c AS (SELECT nickname AS n FROM users) SELECT 1 FROM c WHERE set_config('x', n, false) = ''",
                &["users.nickname"],
            ),
            ("SELECT nextval('s')", &[]),
            ("DO $$ BEGIN NULL; END $$", &["?"]),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                &["?"],
            ),
            ("CREATE RULE r AS ON UPDATE TO t DO ALSO NOTIFY c", &["?"]),
            ("SELECT query_to_xml('SELECT 1', true, true, '')", &["?"]),
            ("CALL p(1)", &[]),
            ("ALTER TABLE users RENAME COLUMN ssn TO x", &["users.*"]),
            ("ALTER TABLE public.users RENAME TO people", &["users.*"]),
            (
                "ALTER TABLE users DETACH PARTITION users_2026",
                &["users.*"],
            ),
            ("EXPLAIN INSERT INTO t SELECT ssn FROM users", &[]),
        ] {
            let got = stores(sql);
            let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            assert!(
                want.iter().all(|w| got.contains(w)) && (want.is_empty() == got.is_empty()),
                "{sql}: {got:?}"
            );
        }
    }

    #[test]
    fn recursive_ctes_are_followed_until_they_stop_growing() {
        let e = entries(
            "WITH RECURSIVE r(a, b) AS (SELECT id, 'x' FROM users \
             UNION ALL SELECT r.b, r.a || s.ssn FROM r, secrets s) SELECT a FROM r",
        );
        let c = cols(&e[0]);
        assert!(c.contains(&"secrets.ssn".to_owned()), "{c:?}");
        assert!(c.contains(&"users.id".to_owned()), "{c:?}");
    }

    #[test]
    fn whole_rows_and_stars() {
        for sql in [
            "SELECT row_to_json(u) FROM users u",
            "SELECT to_jsonb(u.*) FROM users u",
            "SELECT json_agg(users) FROM users",
        ] {
            let e = entries(sql);
            assert_eq!(e[0].rows, ["users"], "{sql}");
        }
        let all = outputs("SELECT *, upper(ssn) FROM users");
        let e = entries("SELECT *, upper(ssn) FROM users");
        assert!(e[0].star);
        // Five columns: four from `*`, then the computed one.
        assert_eq!(all.column(3, 5), &e[0..1]);
        assert_eq!(cols(&all.column(4, 5)[0]), ["users.ssn"]);
        // Two stars: every entry may be any column.
        let two = outputs("SELECT a.*, upper(b.ssn), b.* FROM a, users b");
        assert_eq!(two.column(1, 9).len(), 3);
    }

    #[test]
    fn returning_prepare_fetch_and_explain() {
        let e = entries("UPDATE users SET x = 1 RETURNING upper(ssn), id");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        let e = entries("DELETE FROM users u USING t WHERE t.id = u.id RETURNING u.ssn || t.x");
        assert_eq!(cols(&e[0]), ["t.x", "users.ssn"]);
        let e = entries("INSERT INTO users VALUES (1) RETURNING lower(email)");
        assert_eq!(cols(&e[0]), ["users.email"]);
        let e = entries("PREPARE p AS SELECT upper(ssn) FROM users");
        assert_eq!(cols(&e[0]), ["users.ssn"]);
        assert_eq!(outputs("FETCH ALL FROM c"), Outputs::Unknown);
        assert_eq!(outputs("CALL p()"), Outputs::Unknown);
        assert_eq!(
            outputs("EXPLAIN ANALYZE SELECT ssn FROM users"),
            Outputs::none()
        );
        assert_eq!(outputs("SHOW search_path"), Outputs::none());
    }
}
