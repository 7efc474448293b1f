//! What a target's catalogue says the column rules reach, read once at
//! login: the columns the rules name, and the columns of views computed
//! from them.
//!
//! A result column reports its origin as (relation, column number), and a
//! view's column reports the *view*: `CREATE VIEW v AS SELECT ssn AS s
//! FROM users` answers `SELECT s FROM v` with (v, s), which no rule on
//! `users.ssn` names. So the worker also reads the definitions of the views
//! that depend, directly or through other views, on a relation with a
//! rule column, follows each view column to what it is computed from (the
//! classifier's lineage), and maps it to the rule column it comes from.

use std::collections::{HashMap, HashSet};

use gatehouse_policies::{Output, Outputs, Reading, classify};

/// The columns the rules reach, as (table, column) of the rule column they
/// come from.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    /// By (relation oid, column number).
    columns: HashMap<(u32, i16), (String, String)>,
    /// By (relation, column) name, lowercase: what a computed value names.
    by_name: HashMap<(String, String), (String, String)>,
    /// Relations (oid, and lowercase name) with such a column: one of them.
    relations: HashMap<u32, (String, String)>,
    tables: HashMap<String, (String, String)>,
    /// Functions that come with the server or an extension, lowercase:
    /// what another reads is not in a statement.
    builtins: HashSet<String>,
}

/// Most rounds of views over views followed.
const VIEW_DEPTH: usize = 8;

impl Catalogue {
    pub fn new() -> Self {
        Self::default()
    }

    /// A column a rule names, or the same column of a partition or child
    /// of its table (a row of the rules' catalogue query): `name` is its
    /// own (relation, column), `rule` the ones the rule names.
    pub fn column(&mut self, oid: u32, attnum: i16, name: (&str, &str), rule: (&str, &str)) {
        let source = (rule.0.to_owned(), rule.1.to_owned());
        self.add(oid, attnum, name.0, name.1, source);
    }

    fn add(&mut self, oid: u32, attnum: i16, table: &str, column: &str, source: (String, String)) {
        self.columns.insert((oid, attnum), source.clone());
        self.by_name.insert(
            (table.to_lowercase(), column.to_lowercase()),
            source.clone(),
        );
        self.relations.entry(oid).or_insert_with(|| source.clone());
        self.tables.entry(table.to_lowercase()).or_insert(source);
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The rule column a result column comes from, by its origin.
    pub fn origin(&self, oid: u32, attnum: i16) -> Option<&(String, String)> {
        match attnum {
            // The whole row of a relation (`SELECT u FROM users u`).
            0 => self.relations.get(&oid),
            _ => self.columns.get(&(oid, attnum)),
        }
    }

    /// The rule column a column named in a statement comes from.
    pub fn named(&self, table: &str, column: &str) -> Option<&(String, String)> {
        self.by_name
            .get(&(table.to_lowercase(), column.to_lowercase()))
    }

    /// A rule column of a relation, if it has one.
    pub fn table(&self, table: &str) -> Option<&(String, String)> {
        self.tables.get(&table.to_lowercase())
    }

    /// The query that finds the functions that come with the server or an
    /// extension: rows of (name). Any other was defined in the database.
    pub fn builtins_query() -> &'static str {
        "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p \
         WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace \
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
           WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid \
           AND d.deptype = 'e') \
         LIMIT 100000"
    }

    /// A function that comes with the server or an extension (a row of
    /// [`Catalogue::builtins_query`]).
    pub fn builtin(&mut self, name: &str) {
        self.builtins.insert(name.to_lowercase());
    }

    /// Whether an entry's values may come from anywhere: it calls a
    /// function that runs SQL given as text, or one defined in the
    /// database (any but the server's and extensions', once those are
    /// known: also one defined since the session began).
    pub fn opaque(&self, output: &Output) -> bool {
        output.opaque
            || (!self.builtins.is_empty()
                && output.functions.iter().any(|f| !self.builtins.contains(f)))
    }

    /// The query that finds the views depending, directly or through
    /// other views, on a relation with a rule column: rows of (view oid,
    /// view, column number, column, definition). `None` when there are none
    /// to look for.
    pub fn views_query(&self) -> Option<String> {
        if self.relations.is_empty() {
            return None;
        }
        let mut oids: Vec<String> = self.relations.keys().map(u32::to_string).collect();
        oids.sort();
        Some(format!(
            "WITH RECURSIVE deps(oid) AS ( \
               SELECT unnest('{{{}}}'::pg_catalog.oid[]) \
               UNION \
               SELECT r.ev_class FROM pg_catalog.pg_depend d \
               JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
                 AND d.objid = r.oid \
               JOIN deps ON d.refobjid = deps.oid \
               WHERE d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                 AND r.ev_class <> d.refobjid) \
             SELECT v.oid, v.relname, a.attnum, a.attname, pg_catalog.pg_get_viewdef(v.oid) \
             FROM deps JOIN pg_catalog.pg_class v ON v.oid = deps.oid AND v.relkind IN ('v', 'm') \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = v.oid AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY v.oid, a.attnum LIMIT 100000",
            oids.join(",")
        ))
    }

    /// Adds the columns of views computed from rule columns, given the
    /// rows of [`Catalogue::views_query`]: `(oid, view, column number,
    /// column, definition)`.
    pub fn views(&mut self, rows: &[(u32, String, i16, String, String)]) {
        struct View<'a> {
            oid: u32,
            name: &'a str,
            columns: Vec<(i16, &'a str)>,
            outputs: Outputs,
        }
        let mut views: Vec<View> = Vec::new();
        for (oid, name, attnum, column, definition) in rows {
            match views.last_mut() {
                Some(v) if v.oid == *oid => v.columns.push((*attnum, column)),
                _ => {
                    let c = classify(definition, Reading::default());
                    let outputs = match &c.statements[..] {
                        [one] => one.outputs.clone(),
                        _ => Outputs::Unknown,
                    };
                    views.push(View {
                        oid: *oid,
                        name,
                        columns: vec![(*attnum, column)],
                        outputs,
                    });
                }
            }
        }
        // A view over a view is reached once the one below is known.
        for _ in 0..VIEW_DEPTH {
            let mut grown = false;
            for v in &views {
                let n = v.columns.len();
                for (i, &(attnum, column)) in v.columns.iter().enumerate() {
                    if self.columns.contains_key(&(v.oid, attnum)) {
                        continue;
                    }
                    if let Some(source) = self.source(&v.outputs, i, n) {
                        self.add(v.oid, attnum, v.name, column, source);
                        grown = true;
                    }
                }
            }
            if !grown {
                break;
            }
        }
    }

    /// The rule column that result column `i` of `n` of a statement comes
    /// from, as far as the catalogue knows. Rows of unknown origin may come
    /// from any.
    fn source(&self, outputs: &Outputs, i: usize, n: usize) -> Option<(String, String)> {
        let Outputs::Known(_) = outputs else {
            return self.relations.values().next().cloned();
        };
        outputs.column(i, n).iter().find_map(|o| {
            if self.opaque(o) {
                return self.relations.values().next().cloned();
            }
            o.columns
                .iter()
                .find_map(|(t, c)| self.named(t, c))
                .or_else(|| o.rows.iter().find_map(|t| self.table(t)))
                .cloned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        let mut c = Catalogue::new();
        c.column(1000, 3, ("users", "ssn"), ("users", "ssn"));
        c.column(1000, 4, ("users", "email"), ("users", "email"));
        // A partition of users.
        c.column(1100, 2, ("users_2026", "ssn"), ("users", "ssn"));
        c
    }

    #[test]
    fn view_columns_computed_from_rule_columns_are_followed() {
        let mut c = catalogue();
        assert!(c.views_query().unwrap().contains("'{1000,1100}'"));
        let v = " SELECT u.id,\n    u.ssn AS s,\n    upper(u.email) AS e,\n    1 AS one\n   FROM users u;";
        let w = " SELECT v.s AS again,\n    v.id\n   FROM v;";
        let j = " SELECT row_to_json(u.*) AS j\n   FROM users u;";
        let f = " SELECT secret_of(t.id) AS s, t.id\n   FROM things t;";
        for f in ["upper", "row_to_json"] {
            c.builtin(f);
        }
        let rows = [
            // Listed before the view it reads: followed in a later round.
            (3000, "w".into(), 1, "again".into(), w.into()),
            (3000, "w".into(), 2, "id".into(), w.into()),
            (2000, "v".into(), 1, "id".into(), v.into()),
            (2000, "v".into(), 2, "s".into(), v.into()),
            (2000, "v".into(), 3, "e".into(), v.into()),
            (2000, "v".into(), 4, "one".into(), v.into()),
            (4000, "j".into(), 1, "j".into(), j.into()),
            (5000, "f".into(), 1, "s".into(), f.into()),
            (5000, "f".into(), 2, "id".into(), f.into()),
        ];
        c.views(&rows);
        let ssn = ("users".to_owned(), "ssn".to_owned());
        let email = ("users".to_owned(), "email".to_owned());
        assert_eq!(c.origin(2000, 1), None);
        assert_eq!(c.origin(2000, 2), Some(&ssn));
        assert_eq!(c.origin(2000, 3), Some(&email));
        assert_eq!(c.origin(2000, 4), None);
        assert_eq!(c.origin(3000, 1), Some(&ssn));
        assert_eq!(c.origin(3000, 2), None);
        assert!(c.origin(4000, 1).is_some());
        assert!(
            c.origin(5000, 1).is_some(),
            "a function defined in the database"
        );
        assert_eq!(c.origin(5000, 2), None);
        assert_eq!(c.named("V", "S"), Some(&ssn));
        assert_eq!(c.table("w"), Some(&ssn));
        assert_eq!(c.origin(1000, 0), Some(&ssn), "a whole row of users");
        assert_eq!(c.origin(1100, 2), Some(&ssn), "a partition's column");
        assert_eq!(c.named("users_2026", "ssn"), Some(&ssn));
        assert_eq!(c.origin(2000, 0), Some(&ssn), "a whole row of v");
    }

    #[test]
    fn no_rule_columns_no_views_to_read() {
        assert_eq!(Catalogue::new().views_query(), None);
    }
}
