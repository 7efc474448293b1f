//! The facts of one parsed statement, from one walk over its whole tree:
//! nested queries, CTEs (data-modifying ones included), subqueries,
//! function arguments, set-returning functions in FROM.

use std::ops::ControlFlow;

use sqlparser::ast::{
    AlterRoleOperation, CommentObject, CopySource, CopyTarget, CreateTableLikeKind, DiscardObject,
    Expr, FromTable, FunctionArg, FunctionArguments, GrantObjects, ObjectName, ObjectNamePart,
    ObjectType, Query, Reset, ResetConfig, Select, Set, SetConfigValue, SetExpr, Statement,
    TableFactor, TableObject, TransactionAccessMode, TransactionMode, UtilityOption, Visit,
    Visitor,
};

use super::functions::has_side_effect;
use super::names;
use super::settings::{self, Effect, Setting};
use crate::{StatementFacts, StatementKind};

/// The facts of `statement`.
///
/// `EXPLAIN` without `ANALYZE` only plans its statement: it is `utility`,
/// does not write, and every table its statement names is read (planning
/// reads their definitions and statistics). `EXPLAIN ANALYZE` runs its
/// statement and has that statement's facts. `PREPARE name AS stmt` has the
/// facts of `stmt` with `prepares` set.
pub(super) fn facts(statement: &Statement) -> StatementFacts {
    match statement {
        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } => {
            let inner = facts(statement);
            if explain_runs(*analyze, options.as_deref()) {
                inner
            } else {
                planned_only(inner)
            }
        }
        Statement::Prepare {
            name, statement, ..
        } => {
            let mut inner = facts(statement);
            inner.prepares = Some(names::ident(name));
            inner
        }
        _ => {
            let mut walker = Walker::new();
            // The walker never breaks.
            let _ = statement.visit(&mut walker);
            walker.finish()
        }
    }
}

/// Whether an `EXPLAIN` runs its statement: `EXPLAIN ANALYZE …`, or an
/// `ANALYZE` option that is not plainly false (`(ANALYZE)`, `(ANALYZE on)`;
/// not `(ANALYZE false)`, `(ANALYZE 0)`, `(ANALYZE 'off')`).
fn explain_runs(analyze: bool, options: Option<&[UtilityOption]>) -> bool {
    analyze
        || options.unwrap_or_default().iter().any(|o| {
            o.name.value.eq_ignore_ascii_case("analyze")
                && o.arg
                    .as_ref()
                    .and_then(settings::literal)
                    .and_then(|v| settings::pg_bool(&v))
                    != Some(false)
        })
}

/// The facts of a statement that is planned but not run.
fn planned_only(inner: StatementFacts) -> StatementFacts {
    let mut facts = StatementFacts::new(StatementKind::Utility);
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

/// Makes `kind` the kind of `facts` if it is more consequential.
pub(super) fn raise(facts: &mut StatementFacts, kind: StatementKind) {
    if rank(kind) > rank(facts.kind) {
        facts.kind = kind;
    }
}

/// CTE names that shadow tables inside one query.
struct CteScope {
    /// The query that has the `WITH`.
    owner: *const Query,
    /// Its CTE names, resolved like identifiers.
    names: Vec<String>,
    /// Each CTE's query, to tell when one has been walked.
    queries: Vec<*const Query>,
    /// How many of `names` are in scope: a CTE sees the ones before it
    /// (all of them with `RECURSIVE`); the main query sees all.
    visible: usize,
}

/// Gathers facts while sqlparser's visitor walks a statement.
///
/// Table names are read unless claimed: names a statement writes (the
/// target of an INSERT, UPDATE, DELETE, MERGE, COPY FROM, DDL) and names of
/// set-returning functions in FROM are claimed, by address, before the
/// visitor reaches them, and single-part names of CTEs in scope are not
/// tables at all.
struct Walker {
    facts: StatementFacts,
    claimed: Vec<*const ObjectName>,
    /// Expressions shaped like calls that are not (`PARTITION BY RANGE (id)`).
    not_calls: Vec<*const Expr>,
    scopes: Vec<CteScope>,
}

impl Walker {
    fn new() -> Self {
        Self {
            facts: StatementFacts::new(StatementKind::Other),
            claimed: Vec::new(),
            not_calls: Vec::new(),
            scopes: Vec::new(),
        }
    }

    fn finish(mut self) -> StatementFacts {
        if self.facts.runs_program || self.facts.functions.iter().any(|f| has_side_effect(f)) {
            self.facts.writes = true;
        }
        self.facts
    }

    fn raise(&mut self, kind: StatementKind) {
        raise(&mut self.facts, kind);
    }

    /// A kind that always writes.
    fn raise_writing(&mut self, kind: StatementKind) {
        self.raise(kind);
        self.facts.writes = true;
    }

    fn written(&mut self, name: &ObjectName) {
        self.claimed.push(name);
        self.facts.tables_written.insert(names::object(name));
    }

    fn written_factor(&mut self, factor: &TableFactor) {
        if let TableFactor::Table { name, .. } = factor {
            self.written(name);
        }
    }

    /// A table read through a name the visitor does not report as a
    /// relation (COPY's table, LIKE, INHERITS, DESCRIBE).
    fn read(&mut self, name: &ObjectName) {
        self.claimed.push(name);
        self.facts.tables_read.insert(names::object(name));
    }

    fn apply(&mut self, effect: Effect) {
        self.facts.disables_read_only |= effect.disables_read_only;
        self.facts.changes_parsing |= effect.changes_parsing;
        if effect.identity {
            self.raise_writing(StatementKind::Dcl);
        }
    }

    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let name = names::function(name);
        if name == "set_config" {
            let effect = settings::set_config(args);
            self.apply(effect);
        }
        self.facts.functions.insert(name);
    }

    fn is_cte(&self, name: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| s.names[..s.visible].iter().any(|n| n == name))
    }

    /// `TABLE name`, PostgreSQL's shorthand for `SELECT * FROM name`, which
    /// sqlparser keeps as two strings rather than a relation.
    fn table_shorthands(&mut self, body: &SetExpr) {
        let mut pending = vec![body];
        while let Some(expr) = pending.pop() {
            match expr {
                SetExpr::Table(table) => {
                    let Some(table_name) = &table.table_name else {
                        continue;
                    };
                    let mut name = String::new();
                    if let Some(schema) = &table.schema_name {
                        names::push_word(&mut name, &schema.value, schema.quote_style.is_some());
                        name.push('.');
                    }
                    names::push_word(
                        &mut name,
                        &table_name.value,
                        table_name.quote_style.is_some(),
                    );
                    if table.schema_name.is_some() || !self.is_cte(&name) {
                        self.facts.tables_read.insert(name);
                    }
                }
                SetExpr::SetOperation { left, right, .. } => {
                    pending.push(left);
                    pending.push(right);
                }
                _ => {}
            }
        }
    }

    fn set(&mut self, set: &Set) {
        match set {
            Set::SingleAssignment {
                variable, values, ..
            } => self.assign(variable, values),
            Set::ParenthesizedAssignments { variables, values } => {
                for variable in variables {
                    self.assign(variable, values);
                }
            }
            Set::MultipleAssignments { assignments } => {
                for a in assignments {
                    self.assign(&a.name, std::slice::from_ref(&a.value));
                }
            }
            Set::SetRole { .. } | Set::SetSessionAuthorization(_) => {
                self.raise_writing(StatementKind::Dcl)
            }
            Set::SetTransaction { modes, .. } => {
                self.raise(StatementKind::Session);
                self.facts.disables_read_only |= read_write(modes);
            }
            Set::SetNames { charset_name, .. } => {
                self.raise(StatementKind::Session);
                let effect = settings::assign(Setting::ClientEncoding, Some(&charset_name.value));
                self.apply(effect);
            }
            Set::SetNamesDefault {} => {
                self.raise(StatementKind::Session);
                self.apply(settings::assign(Setting::ClientEncoding, None));
            }
            Set::SetTimeZone { .. } | Set::SetSessionParam(_) => self.raise(StatementKind::Session),
        }
    }

    /// `SET variable = values`: a session setting, unless the variable is
    /// the role or session authorization (`SET role = x` is `SET ROLE x`).
    fn assign(&mut self, variable: &ObjectName, values: &[Expr]) {
        let value = match values {
            [value] => settings::literal(value),
            _ => None,
        };
        self.raise(StatementKind::Session);
        self.apply(settings::assign(setting_of(variable), value.as_deref()));
    }

    fn reset(&mut self, reset: &Reset) {
        match reset {
            Reset::ALL => {
                self.raise(StatementKind::Session);
                self.apply(settings::reset_all());
            }
            Reset::SessionAuthorization => self.raise_writing(StatementKind::Dcl),
            Reset::ConfigurationParameter(name) => {
                self.raise(StatementKind::Session);
                self.apply(settings::assign(setting_of(name), None));
            }
        }
    }

    fn grant_objects(&mut self, objects: Option<&GrantObjects>) {
        if let Some(GrantObjects::Tables(tables) | GrantObjects::Views(tables)) = objects {
            for table in tables {
                self.written(table);
            }
        }
    }

    fn statement(&mut self, statement: &Statement) {
        use StatementKind as K;
        match statement {
            // Reads. A cursor's query runs as it is fetched.
            Statement::Query(_) | Statement::Declare { .. } | Statement::Fetch { .. } => {
                self.raise(K::Select)
            }

            // Data changes.
            Statement::Insert(insert) => {
                self.raise_writing(K::Insert);
                if let TableObject::TableName(name) = &insert.table {
                    self.written(name);
                }
            }
            Statement::Update(update) => {
                self.raise_writing(K::Update);
                self.written_factor(&update.table.relation);
                if update.selection.is_none() {
                    self.facts.has_where = false;
                }
            }
            Statement::Delete(delete) => {
                self.raise_writing(K::Delete);
                if delete.tables.is_empty() {
                    let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) =
                        &delete.from;
                    for table in from {
                        self.written_factor(&table.relation);
                    }
                } else {
                    for name in &delete.tables {
                        self.written(name);
                    }
                }
                if delete.selection.is_none() {
                    self.facts.has_where = false;
                }
            }
            Statement::Merge(merge) => {
                self.raise_writing(K::Merge);
                self.written_factor(&merge.table);
            }

            // COPY. Writing a server file is a write even when copying out.
            Statement::Copy {
                source, to, target, ..
            } => {
                if *to {
                    self.raise(K::CopyOut);
                    if let CopySource::Table { table_name, .. } = source {
                        self.read(table_name);
                    }
                } else {
                    self.raise_writing(K::CopyIn);
                    if let CopySource::Table { table_name, .. } = source {
                        self.written(table_name);
                    }
                }
                match target {
                    CopyTarget::Program { .. } => {
                        self.facts.runs_program = true;
                        self.facts.writes = true;
                    }
                    CopyTarget::File { .. } => self.facts.writes = true,
                    CopyTarget::Stdin | CopyTarget::Stdout => {}
                }
            }

            Statement::Call(function) => {
                self.raise_writing(K::Call);
                self.function(&function.name, function_args(&function.args));
            }

            // Schema changes that name tables.
            Statement::CreateTable(create) => {
                self.raise_writing(K::Ddl);
                self.written(&create.name);
                if let Some(parent) = &create.partition_of {
                    self.written(parent);
                }
                match &create.like {
                    Some(
                        CreateTableLikeKind::Parenthesized(like) | CreateTableLikeKind::Plain(like),
                    ) => self.read(&like.name),
                    None => {}
                }
                for parent in create.inherits.iter().flatten().chain(&create.clone) {
                    self.read(parent);
                }
                if let Some(strategy) = &create.partition_by {
                    self.not_calls.push(&**strategy);
                }
            }
            Statement::CreateView(view) => {
                self.raise_writing(K::Ddl);
                self.written(&view.name);
            }
            Statement::CreateIndex(index) => {
                self.raise_writing(K::Ddl);
                self.written(&index.table_name);
            }
            Statement::AlterTable(alter) => {
                self.raise_writing(K::Ddl);
                self.written(&alter.name);
            }
            Statement::AlterIndex { name, .. } => {
                self.raise_writing(K::Ddl);
                self.written(name);
            }
            Statement::AlterView(alter) => {
                self.raise_writing(K::Ddl);
                self.written(&alter.name);
            }
            Statement::Drop {
                object_type, names, ..
            } => match object_type {
                ObjectType::Role | ObjectType::User | ObjectType::Group => {
                    self.raise_writing(K::Dcl)
                }
                ObjectType::Table
                | ObjectType::View
                | ObjectType::MaterializedView
                | ObjectType::Index
                | ObjectType::Sequence
                | ObjectType::ForeignTable => {
                    self.raise_writing(K::Ddl);
                    for name in names {
                        self.written(name);
                    }
                }
                _ => self.raise_writing(K::Ddl),
            },
            Statement::Truncate(truncate) => {
                self.raise_writing(K::Ddl);
                for target in &truncate.table_names {
                    self.written(&target.name);
                }
            }
            Statement::Comment {
                object_type,
                object_name,
                ..
            } => {
                self.raise_writing(K::Ddl);
                if matches!(
                    object_type,
                    CommentObject::Table
                        | CommentObject::View
                        | CommentObject::MaterializedView
                        | CommentObject::ForeignTable
                ) {
                    self.written(object_name);
                }
            }
            Statement::CreatePolicy(policy) => {
                self.raise_writing(K::Ddl);
                self.written(&policy.table_name);
            }
            Statement::AlterPolicy(policy) => {
                self.raise_writing(K::Ddl);
                self.written(&policy.table_name);
            }
            Statement::DropPolicy(policy) => {
                self.raise_writing(K::Ddl);
                self.written(&policy.table_name);
            }
            Statement::CreateTrigger(trigger) => {
                self.raise_writing(K::Ddl);
                self.written(&trigger.table_name);
            }
            Statement::DropTrigger(trigger) => {
                self.raise_writing(K::Ddl);
                if let Some(table) = &trigger.table_name {
                    self.written(table);
                }
            }
            Statement::AlterTrigger(trigger) => {
                self.raise_writing(K::Ddl);
                self.written(&trigger.table_name);
            }
            Statement::CreateRule(rule) => {
                self.raise_writing(K::Ddl);
                self.written(&rule.table_name);
            }
            Statement::DropRule(rule) => {
                self.raise_writing(K::Ddl);
                self.written(&rule.table_name);
            }
            Statement::CreateForeignTable(table) => {
                self.raise_writing(K::Ddl);
                self.written(&table.name);
            }
            Statement::RenameTable(renames) => {
                self.raise_writing(K::Ddl);
                for rename in renames {
                    self.written(&rename.old_name);
                    self.written(&rename.new_name);
                }
            }

            // Other schema changes.
            Statement::CreateSchema { .. }
            | Statement::AlterSchema(_)
            | Statement::CreateDatabase { .. }
            | Statement::CreateFunction(_)
            | Statement::AlterFunction(_)
            | Statement::DropFunction(_)
            | Statement::CreateProcedure { .. }
            | Statement::DropProcedure { .. }
            | Statement::CreateSequence { .. }
            | Statement::CreateDomain(_)
            | Statement::DropDomain(_)
            | Statement::CreateType { .. }
            | Statement::AlterType(_)
            | Statement::CreateExtension(_)
            | Statement::DropExtension(_)
            | Statement::CreateCollation(_)
            | Statement::AlterCollation(_)
            | Statement::CreateServer(_)
            | Statement::CreateForeignDataWrapper(_)
            | Statement::CreateUserMapping(_)
            | Statement::CreateOperator(_)
            | Statement::CreateOperatorFamily(_)
            | Statement::CreateOperatorClass(_)
            | Statement::AlterOperator(_)
            | Statement::AlterOperatorFamily(_)
            | Statement::AlterOperatorClass(_)
            | Statement::DropOperator(_)
            | Statement::DropOperatorFamily(_)
            | Statement::DropOperatorClass(_)
            | Statement::CreateTextSearch(_)
            | Statement::AlterTextSearch(_)
            | Statement::CreateAggregate(_)
            | Statement::CreateVirtualTable { .. }
            | Statement::CreateSecret { .. }
            | Statement::DropSecret { .. }
            | Statement::CreateConnector(_)
            | Statement::AlterConnector { .. }
            | Statement::DropConnector { .. }
            | Statement::CreateMacro { .. }
            | Statement::CreateStage { .. }
            | Statement::CreateFileFormat { .. }
            | Statement::CreateWarehouse(_) => self.raise_writing(K::Ddl),

            // Privileges and roles.
            Statement::Grant(grant) => {
                self.raise_writing(K::Dcl);
                self.grant_objects(grant.objects.as_ref());
            }
            Statement::Revoke(revoke) => {
                self.raise_writing(K::Dcl);
                self.grant_objects(revoke.objects.as_ref());
            }
            Statement::AlterRole { operation, .. } => {
                self.raise_writing(K::Dcl);
                match operation {
                    AlterRoleOperation::Set {
                        config_name,
                        config_value,
                        ..
                    } => {
                        let value = match config_value {
                            SetConfigValue::Value(v) => settings::literal(v),
                            SetConfigValue::Default | SetConfigValue::FromCurrent => None,
                        };
                        self.apply(settings::assign(setting_of(config_name), value.as_deref()));
                    }
                    AlterRoleOperation::Reset { config_name, .. } => match config_name {
                        ResetConfig::ALL => self.apply(settings::reset_all()),
                        ResetConfig::ConfigName(name) => {
                            self.apply(settings::assign(setting_of(name), None))
                        }
                    },
                    _ => {}
                }
            }
            Statement::GrantRole(_)
            | Statement::RevokeRole(_)
            | Statement::Deny(_)
            | Statement::CreateRole(_)
            | Statement::CreateUser(_)
            | Statement::AlterUser(_)
            | Statement::AlterDefaultPrivileges(_) => self.raise_writing(K::Dcl),

            // Session settings.
            Statement::Set(set) => self.set(set),
            Statement::Reset(reset) => self.reset(&reset.reset),
            Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowCreate { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowCatalogs { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowProcessList { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowCharset(_)
            | Statement::ShowObjects(_)
            | Statement::ShowTables { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowCollation { .. } => self.raise(K::Session),

            // Transaction control.
            Statement::StartTransaction { modes, .. } => {
                self.raise(K::Transaction);
                self.facts.disables_read_only |= read_write(modes);
            }
            Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => self.raise(K::Transaction),

            // Utility and maintenance. LOCK changes no data; its tables are
            // reported as read by the visitor. Maintenance rewrites storage
            // or statistics and counts as writing its tables.
            Statement::Lock(_) => self.raise(K::Utility),
            Statement::Analyze(analyze) => {
                self.raise_writing(K::Utility);
                if let Some(name) = &analyze.table_name {
                    self.written(name);
                }
            }
            Statement::Vacuum(vacuum) => {
                self.raise_writing(K::Utility);
                if let Some(name) = &vacuum.table_name {
                    self.written(name);
                }
            }
            Statement::RefreshMaterializedView(refresh) => {
                self.raise_writing(K::Utility);
                self.written(&refresh.name);
            }
            Statement::Discard { object_type } => {
                self.raise(K::Utility);
                if matches!(object_type, DiscardObject::ALL) {
                    self.apply(settings::reset_all());
                }
            }
            Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. }
            | Statement::Deallocate { .. }
            | Statement::Close { .. } => self.raise(K::Utility),
            // NOTIFY reaches other sessions, like pg_notify(); LOAD loads a
            // shared library into the server process.
            Statement::NOTIFY { .. } | Statement::Load { .. } => self.raise_writing(K::Utility),
            Statement::ExplainTable { table_name, .. } => {
                self.raise(K::Utility);
                self.read(table_name);
            }

            // The worker judges EXECUTE by what was prepared under the name.
            Statement::Execute { name, .. } => {
                self.raise(K::Other);
                self.facts.executes = name.as_ref().map(names::object);
            }

            // Only at the top, where `facts` handles them; here, their inner
            // statement is walked like any nested one.
            Statement::Explain { .. } | Statement::Prepare { .. } => self.raise(K::Utility),

            // Statements of other dialects that PostgreSQL's can still
            // produce: unknown, so taken to write.
            _ => self.raise_writing(K::Other),
        }
    }
}

impl Visitor for Walker {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        self.statement(statement);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            let names = with
                .cte_tables
                .iter()
                .map(|cte| names::ident(&cte.alias.name))
                .collect::<Vec<_>>();
            self.scopes.push(CteScope {
                owner: query,
                visible: if with.recursive { names.len() } else { 0 },
                names,
                queries: with
                    .cte_tables
                    .iter()
                    .map(|cte| &*cte.query as *const Query)
                    .collect(),
            });
        }
        self.table_shorthands(&query.body);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let query: *const Query = query;
        if self.scopes.last().is_some_and(|s| s.owner == query) {
            self.scopes.pop();
        }
        // A CTE's name comes into scope once its own query is done.
        let scope = self.scopes.last_mut();
        if let Some((scope, i)) = scope.and_then(|s| {
            let i = s.queries.iter().position(|q| *q == query)?;
            Some((s, i))
        }) {
            scope.visible = scope.visible.max(i + 1);
        }
        ControlFlow::Continue(())
    }

    /// `SELECT … INTO t` creates `t`.
    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            self.raise_writing(StatementKind::Ddl);
            for target in &into.targets {
                if let Some(name) = expr_name(target) {
                    self.facts.tables_written.insert(name);
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// A set-returning function in FROM (`FROM dblink(…)`) is a call, not
    /// a table.
    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                self.claimed.push(name);
                self.function(name, &args.args);
            }
            TableFactor::Function { name, args, .. } => self.function(name, args),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let address: *const ObjectName = relation;
        if self.claimed.contains(&address) {
            return ControlFlow::Continue(());
        }
        let name = names::object(relation);
        if relation.0.len() == 1 && self.is_cte(&name) {
            return ControlFlow::Continue(());
        }
        self.facts.tables_read.insert(name);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            let address: *const Expr = expr;
            if !self.not_calls.contains(&address) {
                self.function(&function.name, function_args(&function.args));
            }
        }
        ControlFlow::Continue(())
    }
}

fn function_args(args: &FunctionArguments) -> &[FunctionArg] {
    match args {
        FunctionArguments::List(list) => &list.args,
        FunctionArguments::None | FunctionArguments::Subquery(_) => &[],
    }
}

/// The setting a `SET`/`RESET` names; qualified names are custom settings.
fn setting_of(name: &ObjectName) -> Setting {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(id)] => Setting::named(&id.value),
        _ => Setting::Other,
    }
}

fn read_write(modes: &[TransactionMode]) -> bool {
    modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
        )
    })
}

/// The table named by a `SELECT … INTO` target.
fn expr_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(id) => Some(names::ident(id)),
        Expr::CompoundIdentifier(ids) => {
            let mut out = String::new();
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                names::push_word(&mut out, &id.value, id.quote_style.is_some());
            }
            Some(out)
        }
        _ => None,
    }
}
