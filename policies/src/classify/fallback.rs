//! PostgreSQL statements sqlparser does not parse, recognized from tokens.
//!
//! Used only when parsing the whole text failed. The text is split into
//! statements on the `;` tokens of sqlparser's own tokenizer (so semicolons
//! in strings, quoted names, dollar quotes and comments do not split), and
//! each statement is parsed on its own. One that fails is rewritten, if it
//! has syntax sqlparser lacks but an equivalent it has (see [`rewritten`]),
//! and parsed again. One that still fails is recognized here only when its
//! leading words settle what it does and the rest has the expected shape:
//! `DO`, `CHECKPOINT`, `ALTER SYSTEM`, `VACUUM`/`ANALYZE` with options,
//! `CLUSTER`, `REINDEX`, `MOVE`, `TABLE name`, `COPY` with options sqlparser
//! does not know, `SET CONSTRAINTS`, two-phase commit, `REASSIGN OWNED`,
//! `DROP OWNED`, `SECURITY LABEL`, `IMPORT FOREIGN SCHEMA`. If any statement
//! is left unrecognized, the whole text is unparsed.
//!
//! A statement whose own text holds a top-level `;` (`CREATE RULE … (a;
//! b)`, `BEGIN ATOMIC a; b; END`) cannot be split this way, but its first
//! piece never parses or is recognized on its own, so such a text comes out
//! unparsed rather than misread.

use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use super::names;
use super::settings::{self, Setting};
use super::walk;
use crate::{StatementFacts, StatementKind};

/// The facts of each statement of `sql`, or `None` if one is not
/// understood (or the text does not even tokenize).
pub(super) fn classify(sql: &str) -> Option<Vec<StatementFacts>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let mut out = Vec::new();
    for chunk in tokens.split(|t| matches!(t.token, Token::SemiColon)) {
        let significant: Vec<&Token> = chunk
            .iter()
            .map(|t| &t.token)
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        if significant.is_empty() {
            continue;
        }
        let parsed = parse(chunk.to_vec()).or_else(|| rewritten(chunk).and_then(parse));
        match parsed {
            Some(statements) => out.extend(statements.iter().map(walk::facts)),
            None => out.push(recognize(&significant)?),
        }
    }
    Some(out)
}

fn parse(tokens: Vec<TokenWithSpan>) -> Option<Vec<Statement>> {
    Parser::new(&PostgreSqlDialect {})
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .ok()
}

/// The statement with PostgreSQL syntax sqlparser lacks rewritten to
/// syntax it has and that has the same facts, or `None` if there is none:
///
/// - `WHERE CURRENT OF cursor` becomes `WHERE TRUE` (the statement has a
///   WHERE, touching the one row the cursor is on);
/// - `FOR NO KEY UPDATE` and `FOR KEY SHARE` become `FOR UPDATE` and
///   `FOR SHARE` (row locks of another strength);
/// - `DROP INDEX CONCURRENTLY` becomes `DROP INDEX`;
/// - `CREATE USER` and `CREATE GROUP` become `CREATE ROLE` (which they are,
///   with or without LOGIN).
fn rewritten(chunk: &[TokenWithSpan]) -> Option<Vec<TokenWithSpan>> {
    let sig: Vec<usize> = (0..chunk.len())
        .filter(|&i| !matches!(chunk[i].token, Token::Whitespace(_)))
        .collect();
    let at = |k: usize, keyword: &str| {
        sig.get(k)
            .is_some_and(|&i| is_keyword(&chunk[i].token, keyword))
    };
    let mut drop = Vec::new();
    let mut make_true = None;
    let mut rename = None;
    for k in 0..sig.len() {
        if at(k, "WHERE")
            && at(k + 1, "CURRENT")
            && at(k + 2, "OF")
            && sig
                .get(k + 3)
                .is_some_and(|&i| matches!(chunk[i].token, Token::Word(_)))
        {
            make_true = Some(sig[k + 1]);
            drop.extend([sig[k + 2], sig[k + 3]]);
        } else if at(k, "FOR") && at(k + 1, "NO") && at(k + 2, "KEY") && at(k + 3, "UPDATE") {
            drop.extend([sig[k + 1], sig[k + 2]]);
        } else if at(k, "FOR") && at(k + 1, "KEY") && at(k + 2, "SHARE") {
            drop.push(sig[k + 1]);
        } else if at(k, "DROP") && at(k + 1, "INDEX") && at(k + 2, "CONCURRENTLY") {
            drop.push(sig[k + 2]);
        } else if k == 0 && at(0, "CREATE") && (at(1, "USER") || at(1, "GROUP")) {
            rename = Some((sig[1], "ROLE"));
        }
    }
    if drop.is_empty() && make_true.is_none() && rename.is_none() {
        return None;
    }
    let mut out = Vec::with_capacity(chunk.len());
    for (i, token) in chunk.iter().enumerate() {
        if Some(i) == make_true {
            out.push(TokenWithSpan::new(Token::make_keyword("TRUE"), token.span));
        } else if let Some((_, keyword)) = rename.filter(|(at, _)| *at == i) {
            out.push(TokenWithSpan::new(Token::make_keyword(keyword), token.span));
        } else if !drop.contains(&i) {
            out.push(token.clone());
        }
    }
    Some(out)
}

fn is_keyword(token: &Token, keyword: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(keyword))
}

fn recognize(tokens: &[&Token]) -> Option<StatementFacts> {
    use StatementKind as K;
    let mut c = Cursor { tokens, pos: 0 };
    let facts = |kind: StatementKind, writes: bool| {
        let mut f = StatementFacts::new(kind);
        f.writes = writes;
        f
    };
    if c.keyword("DO") {
        // DO [LANGUAGE lang] code [LANGUAGE lang]; the body is not inspected.
        let language = |c: &mut Cursor| !c.keyword("LANGUAGE") || c.word().is_some() || c.string();
        let ok = language(&mut c) && c.string() && language(&mut c) && c.done();
        return ok.then(|| facts(K::Call, true));
    }
    if c.keyword("COPY") {
        return copy(&mut c);
    }
    if c.keyword("SET") {
        // SET CONSTRAINTS {ALL | name [, …]} {DEFERRED | IMMEDIATE}
        if !c.keyword("CONSTRAINTS") {
            return None;
        }
        loop {
            c.name()?;
            if !c.symbol(&Token::Comma) {
                break;
            }
        }
        let ok = (c.keyword("DEFERRED") || c.keyword("IMMEDIATE")) && c.done();
        return ok.then(|| facts(K::Session, false));
    }
    if c.keyword("CHECKPOINT") {
        return c.done().then(|| facts(K::Utility, true));
    }
    if c.keyword("MOVE") {
        // MOVE [direction [count]] [FROM | IN] cursor
        while let Some(token) = c.next() {
            if !matches!(
                token,
                Token::Word(_) | Token::Number(..) | Token::Minus | Token::Plus
            ) {
                return None;
            }
        }
        return Some(facts(K::Utility, false));
    }
    if c.keyword("TABLE") {
        c.keyword("ONLY");
        let name = c.name()?;
        c.symbol(&Token::Mul);
        let mut f = facts(K::Select, false);
        f.tables_read.insert(name);
        return c.done().then_some(f);
    }
    if c.keyword("VACUUM") || c.keyword("ANALYZE") || c.keyword("ANALYSE") {
        let mut f = facts(K::Utility, true);
        if !c.parens() {
            while ["FULL", "FREEZE", "VERBOSE", "ANALYZE", "ANALYSE"]
                .iter()
                .any(|kw| c.keyword(kw))
            {}
        }
        if !c.done() {
            loop {
                f.tables_written.insert(c.name()?);
                c.parens();
                if !c.symbol(&Token::Comma) {
                    break;
                }
            }
        }
        return c.done().then_some(f);
    }
    if c.keyword("CLUSTER") {
        let mut f = facts(K::Utility, true);
        if !c.parens() {
            c.keyword("VERBOSE");
        }
        if !c.done() {
            let first = c.name()?;
            if c.keyword("ON") {
                // The old form, CLUSTER index ON table.
                f.tables_written.insert(c.name()?);
            } else {
                f.tables_written.insert(first);
                if c.keyword("USING") {
                    c.name()?;
                }
            }
        }
        return c.done().then_some(f);
    }
    if c.keyword("REINDEX") {
        let mut f = facts(K::Utility, true);
        c.parens();
        let names_table = c.keyword("TABLE") || c.keyword("INDEX");
        if !names_table
            && !["SCHEMA", "DATABASE", "SYSTEM"]
                .iter()
                .any(|kw| c.keyword(kw))
        {
            return None;
        }
        c.keyword("CONCURRENTLY");
        if !c.done() {
            let name = c.name()?;
            if names_table {
                f.tables_written.insert(name);
            }
        }
        return c.done().then_some(f);
    }
    if c.keyword("PREPARE") {
        let ok = c.keyword("TRANSACTION") && c.string() && c.done();
        return ok.then(|| facts(K::Transaction, false));
    }
    if c.keyword("COMMIT") || c.keyword("ROLLBACK") {
        let ok = c.keyword("PREPARED") && c.string() && c.done();
        return ok.then(|| facts(K::Transaction, false));
    }
    if c.keyword("ALTER") {
        if !c.keyword("SYSTEM") {
            return None;
        }
        return alter_system(&mut c).map(|effect| {
            let mut f = facts(K::Dcl, true);
            f.disables_read_only = effect.disables_read_only;
            f.changes_parsing = effect.changes_parsing;
            f
        });
    }
    if c.keyword("REASSIGN") {
        return c.keyword("OWNED").then(|| facts(K::Dcl, true));
    }
    if c.keyword("DROP") {
        return c.keyword("OWNED").then(|| facts(K::Dcl, true));
    }
    if c.keyword("SECURITY") {
        return c.keyword("LABEL").then(|| facts(K::Dcl, true));
    }
    if c.keyword("IMPORT") {
        let ok = c.keyword("FOREIGN") && c.keyword("SCHEMA");
        return ok.then(|| facts(K::Ddl, true));
    }
    None
}

/// `COPY` with options sqlparser does not know (`WITH (FREEZE on)`, as
/// pgbench sends): `COPY [BINARY] {table [(columns)] | (query)} {FROM | TO}
/// {STDIN | STDOUT | 'file' | PROGRAM 'command'} options`, where the options
/// may hold only words, literals and punctuation. A `WHERE` (whose condition
/// could call anything) is not accepted.
fn copy(c: &mut Cursor) -> Option<StatementFacts> {
    c.keyword("BINARY");
    let (mut facts, table) = if c.peek() == Some(&Token::LParen) {
        let inner = c.group()?;
        let tokens = inner
            .iter()
            .map(|t| TokenWithSpan::wrap((*t).clone()))
            .collect();
        let statements = parse(tokens)?;
        let [statement] = statements.as_slice() else {
            return None;
        };
        (walk::facts(statement), None)
    } else {
        let table = c.name()?;
        c.parens();
        (StatementFacts::new(StatementKind::Other), Some(table))
    };
    let to = if c.keyword("TO") {
        true
    } else if c.keyword("FROM") {
        false
    } else {
        return None;
    };
    if c.keyword("PROGRAM") {
        if !c.string() {
            return None;
        }
        facts.runs_program = true;
        facts.writes = true;
    } else if c.string() {
        // A server file: reading one is COPY FROM's write anyway; writing
        // one is a write.
        facts.writes = true;
    } else if !(c.keyword("STDIN") || c.keyword("STDOUT")) {
        return None;
    }
    while let Some(token) = c.next() {
        let option_like = match token {
            Token::Word(_) => !is_keyword(token, "WHERE"),
            Token::SingleQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::Number(..)
            | Token::LParen
            | Token::RParen
            | Token::Comma
            | Token::Mul => true,
            _ => false,
        };
        if !option_like {
            return None;
        }
    }
    if to {
        walk::raise(&mut facts, StatementKind::CopyOut);
        facts.tables_read.extend(table);
    } else {
        // COPY (query) FROM is not PostgreSQL.
        facts.tables_written.insert(table?);
        walk::raise(&mut facts, StatementKind::CopyIn);
        facts.writes = true;
    }
    Some(facts)
}

/// `ALTER SYSTEM SET name {TO|=} value[, …]`, `ALTER SYSTEM RESET name`,
/// `ALTER SYSTEM RESET ALL`: the server's configuration file, in effect
/// from the next reload.
fn alter_system(c: &mut Cursor) -> Option<settings::Effect> {
    if c.keyword("RESET") {
        if c.keyword("ALL") {
            return c.done().then(settings::reset_all);
        }
        let name = c.word()?;
        return c
            .done()
            .then(|| settings::assign(Setting::named(&name), None));
    }
    if !c.keyword("SET") {
        return None;
    }
    let name = c.word()?;
    if !(c.keyword("TO") || c.symbol(&Token::Eq)) {
        return None;
    }
    let value = c.value();
    let single = c.done();
    let value = if single { value } else { None };
    Some(settings::assign(Setting::named(&name), value.as_deref()))
}

/// A position in the significant (non-whitespace) tokens of a statement.
struct Cursor<'t> {
    tokens: &'t [&'t Token],
    pos: usize,
}

impl<'t> Cursor<'t> {
    fn peek(&self) -> Option<&'t Token> {
        self.tokens.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<&'t Token> {
        let token = self.peek()?;
        self.pos += 1;
        Some(token)
    }

    /// The tokens inside a balanced parenthesized group, skipped.
    fn group(&mut self) -> Option<&'t [&'t Token]> {
        let start = self.pos;
        self.parens().then(|| &self.tokens[start + 1..self.pos - 1])
    }

    fn done(&self) -> bool {
        self.pos >= self.tokens.len()
    }

    fn keyword(&mut self, keyword: &str) -> bool {
        let hit = self.peek().is_some_and(|t| is_keyword(t, keyword));
        self.pos += usize::from(hit);
        hit
    }

    fn symbol(&mut self, symbol: &Token) -> bool {
        let hit = self.peek() == Some(symbol);
        self.pos += usize::from(hit);
        hit
    }

    /// Any word, quoted or not, as written.
    fn word(&mut self) -> Option<String> {
        match self.peek()? {
            Token::Word(w) => {
                self.pos += 1;
                Some(w.value.clone())
            }
            _ => None,
        }
    }

    fn string(&mut self) -> bool {
        let hit = matches!(
            self.peek(),
            Some(
                Token::SingleQuotedString(_)
                    | Token::EscapedStringLiteral(_)
                    | Token::DollarQuotedString(_)
                    | Token::UnicodeStringLiteral(_)
                    | Token::NationalStringLiteral(_)
            )
        );
        self.pos += usize::from(hit);
        hit
    }

    /// A literal or bare word value, as `SET` takes it.
    fn value(&mut self) -> Option<String> {
        let value = match self.peek()? {
            Token::Word(w)
                if !w.value.eq_ignore_ascii_case("default") || w.quote_style.is_some() =>
            {
                w.value.clone()
            }
            Token::SingleQuotedString(s)
            | Token::EscapedStringLiteral(s)
            | Token::UnicodeStringLiteral(s)
            | Token::NationalStringLiteral(s) => s.clone(),
            Token::DollarQuotedString(s) => s.value.clone(),
            Token::Number(n, _) => n.clone(),
            _ => return None,
        };
        self.pos += 1;
        Some(value)
    }

    /// A possibly qualified name, resolved like an identifier.
    fn name(&mut self) -> Option<String> {
        let mut out = String::new();
        loop {
            match self.peek()? {
                Token::Word(w) => {
                    names::push_word(&mut out, &w.value, w.quote_style.is_some());
                    self.pos += 1;
                }
                _ => return None,
            }
            if !self.symbol(&Token::Period) {
                return Some(out);
            }
            out.push('.');
        }
    }

    /// A balanced parenthesized group, skipped. An unbalanced one is left
    /// in place (for what follows to fail on).
    fn parens(&mut self) -> bool {
        if self.peek() != Some(&Token::LParen) {
            return false;
        }
        let start = self.pos;
        let mut depth = 0usize;
        while let Some(token) = self.peek() {
            self.pos += 1;
            match token {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        return true;
                    }
                }
                _ => {}
            }
        }
        self.pos = start;
        false
    }
}
