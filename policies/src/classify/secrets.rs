//! Secrets in statement text, found so that they are never recorded.
//!
//! Commands are recorded with their text, and some texts carry secrets:
//! `CREATE ROLE … PASSWORD '…'`, `OPTIONS (password '…')` of a user
//! mapping, `SET app.api_token = '…'`, `set_config('app.secret', $1, …)`,
//! a connection string with `password=` in `dblink_connect` or
//! `CREATE SUBSCRIPTION … CONNECTION`. [`find_secrets`] finds the values
//! in them and [`Secrets::redact`] replaces each with [`REDACTED`]; a
//! parameter that takes one (`$1` above) is named, so that its bound value
//! is withheld too.
//!
//! The text is read token by token with PostgreSQL's own scanner, so a
//! quote, comment or dollar-quoted string ends where the server ends it. A
//! value is a secret when it is:
//!
//! - given for a name that looks secret ([`is_secret_name`]: `password`,
//!   `secret`, `token`, `api_key`, …), as `name 'value'` (role and option
//!   syntax), `name = value` or `name TO value` (settings, also compared
//!   or assigned columns of that name), `name := value` (PL/pgSQL, also
//!   `name type := value`), `name => value` (a named argument), or
//!   `'name', value` (`set_config`, `json_build_object`); a value that is
//!   a function call (`crypt('…', gen_salt('bf'))`) or in parentheses is
//!   withheld whole, a column reference (`excluded.password`) is none;
//! - inserted into a column named like one (`INSERT INTO t (name,
//!   password) VALUES (…, '…')`);
//! - a JSON document with a key named like one, at any depth
//!   ([`json_holds_secret`]: `'{"api_key": "…"}'::jsonb`), withheld whole;
//! - a string that is itself a connection string with a password
//!   ([`is_connection_secret`]: `password=…`, `PGPASSWORD=…`,
//!   `scheme://user:password@host`);
//! - any of these inside a string literal read as SQL in its turn (a `DO`
//!   or function body, a string such a body executes): within a
//!   dollar-quoted body the secret itself is withheld, a quoted string
//!   holding one is withheld whole;
//! - a password or key given to a pgcrypto function (`crypt('…', …)`,
//!   `pgp_sym_encrypt(data, '…')`, `hmac(data, '…', …)`, …);
//! - an argument of `EXECUTE name(…)` that the prepared statement takes in
//!   a secret's place, and the value given to a parameter bound to a
//!   secret's name (`set_config($1, $2, …)`): [`find_secrets_with`] and
//!   what is [`Known`] of the text.
//!
//! Text the scanner cannot read as the server will (an unterminated
//! literal; `standard_conforming_strings` off, where a backslash in `'…'`
//! escapes and the scanner would end a string elsewhere) is withheld whole
//! when it may hold a secret at all. Text that names nothing secret-looking
//! is not scanned: [`find_secrets`] costs one pass over the bytes then.

use std::borrow::Cow;
use std::ops::Range;

use pg_query::protobuf::{KeywordKind, ScanToken, Token};

use super::Reading;

/// What stands in the recorded text for a value withheld.
pub const REDACTED: &str = "'[redacted]'";

/// What a withheld value was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretKind {
    /// The value of a name that looks secret (a password, key, token…).
    Value,
    /// A connection string or URL that holds a password.
    ConnectionString,
    /// The whole text: it may hold a secret and could not be read token by
    /// token as the server reads it.
    UnreadableText,
}

impl SecretKind {
    /// The name recorded in events.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::Value => "secret_value",
            SecretKind::ConnectionString => "connection_string",
            SecretKind::UnreadableText => "unreadable_text",
        }
    }
}

/// The secrets of one text: where they are, and which parameters take one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Byte ranges of the text, in order and apart, each of whole tokens
    /// (of the text, or of a body inside one of its literals).
    pub spans: Vec<(Range<usize>, SecretKind)>,
    /// Parameters (`$n`, numbered from 1) in a secret's place: their bound
    /// values are secrets.
    pub params: Vec<(u32, SecretKind)>,
    /// The text is withheld whole.
    pub whole: bool,
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty() && self.params.is_empty() && !self.whole
    }

    /// `text` with every secret replaced by [`REDACTED`] (the whole text,
    /// if it is withheld whole).
    pub fn redact(&self, text: &str) -> String {
        if self.whole {
            return "[statement withheld: it may hold a secret]".to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (span, _) in &self.spans {
            out.push_str(&text[at..span.start]);
            out.push_str(REDACTED);
            at = span.end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// What was withheld, in order: each span, then each parameter.
    pub fn kinds(&self) -> impl Iterator<Item = (SecretKind, Option<u32>)> + '_ {
        let whole = self.whole.then_some((SecretKind::UnreadableText, None));
        whole
            .into_iter()
            .chain(self.spans.iter().map(|(_, k)| (*k, None)))
            .chain(self.params.iter().map(|(n, k)| (*k, Some(*n))))
    }
}

/// Parts of words that make a name look secret. A name is compared in
/// lowercase, as a whole (`token`) or by its last dotted part
/// (`app.api_token`).
const SECRET_WORDS: [&str; 10] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "credential",
    "conninfo",
    "api_key",
    "apikey",
    "private_key",
];

/// Whether a name (a setting, option, column or JSON key) looks like it
/// holds a secret: it contains one of the secret words, or it is `key` or
/// ends in `_key`/`.key` (`app.encryption_key`).
pub fn is_secret_name(name: &str) -> bool {
    let name = name.trim_matches('"');
    let lower = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| lower.contains(w))
        || lower == "key"
        || lower.ends_with("_key")
        || lower.ends_with(".key")
}

/// Whether a string holds a password the way connection strings do:
/// `password=…` (libpq, also `PGPASSWORD=…` in a shell command) or
/// `scheme://user:password@host`.
pub fn is_connection_secret(value: &str) -> bool {
    let bytes = value.as_bytes();
    let key_value = find_ascii_ci(bytes, b"password").any(|end| {
        bytes[end..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'=')
    });
    key_value || url_with_password(value)
}

/// `scheme://user:password@…`: a `:` in the part between `://` and the
/// first `@`, before any `/`.
fn url_with_password(value: &str) -> bool {
    value.match_indices("://").any(|(i, _)| {
        let rest = &value[i + 3..];
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
    })
}

/// The end offsets of each case-insensitive occurrence of `needle`.
fn find_ascii_ci<'a>(hay: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    hay.windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| w.eq_ignore_ascii_case(needle))
        .map(move |(i, _)| i + needle.len())
}

/// Whether the text holds a word without which it holds no secret this
/// module finds (every secret name contains one, and so does every
/// connection secret, and every function of [`SECRET_ARGUMENTS`]): `pass`,
/// `pwd`, `secret`, `token`, `credential`, `conninfo`, `key`, `://`,
/// `crypt` or `hmac`, in any case. One pass over the bytes: this
/// runs for every command recorded.
fn may_hold_secrets(text: &str) -> bool {
    let bytes = text.as_bytes();
    let at = |i: usize, word: &[u8]| {
        bytes
            .get(i..i + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    (0..bytes.len()).any(|i| match bytes[i] | 0x20 {
        b'p' => at(i, b"pass") || at(i, b"pwd"),
        b's' => at(i, b"secret"),
        b't' => at(i, b"token"),
        b'c' => at(i, b"credential") || at(i, b"conninfo") || at(i, b"crypt"),
        b'h' => at(i, b"hmac"),
        b'k' => at(i, b"key"),
        // ':' | 0x20 is ':' itself.
        b':' => at(i, b"://"),
        _ => false,
    })
}

/// How deep string literals are read as SQL in their turn (a `DO` body, a
/// string `EXECUTE`d in it, …).
const MAX_LITERAL_DEPTH: usize = 4;

/// A prepared statement that an `EXECUTE` in a text may run, and which of
/// its arguments are secrets: those bound to its parameters in a secret's
/// place (`PREPARE p(text) AS SELECT set_config('app.secret', $1, false)`
/// makes the argument of `EXECUTE p('…')` one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretArgs {
    /// The statement's name as the server knows it (`p`, `"P"` is `P`).
    pub name: String,
    /// Positions, from 1, of the arguments that are secrets.
    pub params: Vec<u32>,
    /// Every argument is: the statement's text is withheld whole.
    pub all: bool,
}

impl SecretArgs {
    /// What executing `text`, prepared as `name`, makes secret among the
    /// arguments of an `EXECUTE`; `None` when nothing.
    pub fn of(name: &str, text: &str, reading: Reading) -> Option<SecretArgs> {
        let s = find_secrets(text, reading);
        (s.whole || !s.params.is_empty()).then(|| SecretArgs {
            name: name.to_owned(),
            params: s.params.iter().map(|(n, _)| *n).collect(),
            all: s.whole,
        })
    }

    fn takes(&self, position: u32) -> bool {
        self.all || self.params.contains(&position)
    }
}

/// What is known of a text beyond its tokens: the prepared statements its
/// `EXECUTE`s run, and which of its parameters are bound to a name that
/// looks secret (`set_config($1, $2, false)` with `$1` bound to
/// `app.api_token`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Known<'a> {
    /// The prepared statements the text runs, as the server has them.
    pub executing: &'a [SecretArgs],
    /// Parameters (`$n`, from 1) whose bound value is a secret-looking
    /// name ([`is_secret_name`]).
    pub secret_names: &'a [u32],
}

impl Known<'_> {
    fn is_empty(&self) -> bool {
        self.executing.is_empty() && self.secret_names.is_empty()
    }
}

/// The secrets in `text`, read as the server reads it with `reading`.
pub fn find_secrets(text: &str, reading: Reading) -> Secrets {
    find_secrets_with(text, reading, Known::default())
}

/// [`find_secrets`], with what is [`Known`] of the text: the arguments of
/// each `EXECUTE name(…)` that `known.executing` says are secrets, and the
/// values given to a parameter that `known.secret_names` names as a
/// secret's name.
pub fn find_secrets_with(text: &str, reading: Reading, known: Known<'_>) -> Secrets {
    scan(text, reading, known, 0).unwrap_or_else(withheld)
}

/// The secrets of `text`; `None` when it may hold one and cannot be read
/// token by token as the server reads it.
fn scan(text: &str, reading: Reading, known: Known<'_>, depth: usize) -> Option<Secrets> {
    if known.is_empty() && !may_hold_secrets(text) {
        return Some(Secrets::default());
    }
    // With standard_conforming_strings off, a backslash escapes inside
    // '…' and the scanner (which reads with it on) could end a string
    // elsewhere than the server.
    if !reading.standard_conforming_strings && text.contains('\\') {
        return None;
    }
    let tokens = pg_query::scan_tokens(text).ok()?;
    let tokens: Vec<&ScanToken> = tokens
        .iter()
        .filter(|t| !matches!(t.token(), Token::SqlComment | Token::CComment))
        .collect();
    let mut secrets = Secrets::default();
    let mut taken = vec![false; tokens.len()];
    // Secrets that are not one whole token: a literal's inside, an argument.
    let mut ranges: Vec<(Range<usize>, SecretKind)> = Vec::new();
    let source = |t: &ScanToken| text.get(t.start as usize..t.end as usize).unwrap_or("");
    for (i, t) in tokens.iter().enumerate() {
        if is_string(t) && is_connection_secret(source(t)) {
            taken[i] = true;
            continue;
        }
        let names_secret = match t.token() {
            Token::Sconst => is_secret_name(unquote(source(t))),
            Token::Param => {
                param_number(source(t)).is_some_and(|n| known.secret_names.contains(&n))
            }
            Token::Ident => is_secret_name(source(t)),
            _ if t.keyword_kind() != KeywordKind::NoKeyword => is_secret_name(source(t)),
            _ => false,
        };
        if !names_secret {
            continue;
        }
        let next = |k: usize| tokens.get(k).copied();
        let value = match (t.token(), next(i + 1)) {
            // 'name', value
            (Token::Sconst | Token::Param, Some(comma)) if comma.token() == Token::Ascii44 => {
                Some(i + 2)
            }
            (Token::Sconst | Token::Param, _) => None,
            // name = value, name TO value, name := value (PL/pgSQL),
            // name => value (a named argument)
            (_, Some(op))
                if matches!(
                    op.token(),
                    Token::Ascii61 | Token::To | Token::ColonEquals | Token::EqualsGreater
                ) =>
            {
                Some(i + 2)
            }
            // name 'value'
            (_, Some(v)) if is_string(v) => Some(i + 1),
            // A PL/pgSQL declaration: name [CONSTANT] type := value
            _ => (i + 2..tokens.len().min(i + 5))
                .find(|&k| tokens[k].token() == Token::ColonEquals)
                .filter(|&k| tokens[i + 1..k].iter().all(|w| is_word(w)))
                .map(|k| k + 1),
        };
        let Some(v) = value else { continue };
        if let Some(extent) = value_extent(&tokens, v) {
            withhold_argument(
                &tokens,
                text,
                extent,
                &mut taken,
                &mut ranges,
                &mut secrets.params,
            );
        }
    }
    // A literal is often SQL in its turn: the body of a `DO` block or a
    // function (`CREATE ROLE … PASSWORD '…'` inside), a string a body
    // executes. Its secrets are withheld too: within a dollar-quoted body,
    // where the text is as written; a quoted string with one, whole.
    if depth < MAX_LITERAL_DEPTH {
        for (i, t) in tokens.iter().enumerate() {
            if taken[i] || !is_string(t) {
                continue;
            }
            let literal = source(t);
            let Some((inner, offset)) = literal_content(literal) else {
                continue;
            };
            if !may_hold_secrets(&inner) {
                continue;
            }
            // A JSON document (`'{"api_key": "…"}'::jsonb`).
            if json_holds_secret(&inner) {
                taken[i] = true;
                continue;
            }
            // Text that is not SQL the scanner reads holds no statement.
            let Some(found) = scan(&inner, reading, Known::default(), depth + 1) else {
                continue;
            };
            if found.spans.is_empty() {
                continue;
            }
            match offset {
                Some(offset) => ranges.extend(found.spans.into_iter().map(|(r, kind)| {
                    let start = t.start as usize + offset;
                    (start + r.start..start + r.end, kind)
                })),
                None => taken[i] = true,
            }
        }
    }
    insert_values(&tokens, text, &mut taken, &mut ranges, &mut secrets.params);
    secret_arguments(&tokens, text, &mut taken, &mut ranges, &mut secrets.params);
    if !known.executing.is_empty() {
        execute_args(
            &tokens,
            text,
            known.executing,
            &mut taken,
            &mut ranges,
            &mut secrets.params,
        );
    }
    for (i, t) in tokens.iter().enumerate() {
        if !taken[i] {
            continue;
        }
        let kind = if is_string(t) && is_connection_secret(source(t)) {
            SecretKind::ConnectionString
        } else {
            SecretKind::Value
        };
        ranges.push((t.start as usize..t.end as usize, kind));
    }
    // In order and apart: a range within another is part of it.
    ranges.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
    for (r, kind) in ranges {
        match secrets.spans.last_mut() {
            Some((last, _)) if r.start < last.end => last.end = last.end.max(r.end),
            _ => secrets.spans.push((r, kind)),
        }
    }
    secrets.params.sort_unstable_by_key(|(n, _)| *n);
    secrets.params.dedup_by_key(|(n, _)| *n);
    Some(secrets)
}

/// Whether `value` is a JSON document with a key named like a secret
/// ([`is_secret_name`]) whose value is not `null`, at any depth.
pub fn json_holds_secret(value: &str) -> bool {
    fn holds(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(map) => map
                .iter()
                .any(|(k, v)| (is_secret_name(k) && !v.is_null()) || holds(v)),
            serde_json::Value::Array(items) => items.iter().any(holds),
            _ => false,
        }
    }
    let trimmed = value.trim_start();
    (trimmed.starts_with('{') || trimmed.starts_with('['))
        && may_hold_secrets(value)
        && serde_json::from_str::<serde_json::Value>(value).is_ok_and(|v| holds(&v))
}

/// A token's text.
fn token_source<'t>(text: &'t str, t: &ScanToken) -> &'t str {
    text.get(t.start as usize..t.end as usize).unwrap_or("")
}

/// `$n` as `n`.
fn param_number(source: &str) -> Option<u32> {
    source.strip_prefix('$').and_then(|n| n.parse().ok())
}

/// A string literal's content, read as SQL in its turn, and where it starts
/// in the literal when it is the literal's text as written (dollar quoting);
/// `None` for the offset when quotes had to be undone.
fn literal_content(literal: &str) -> Option<(Cow<'_, str>, Option<usize>)> {
    if let Some(after) = literal.strip_prefix('$') {
        let tag_end = after.find('$')? + 2;
        let body = literal.get(tag_end..literal.len().checked_sub(tag_end)?)?;
        return Some((Cow::Borrowed(body), Some(tag_end)));
    }
    let quoted = literal
        .trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == '&')
        .strip_prefix('\'')?
        .strip_suffix('\'')?;
    Some((Cow::Owned(quoted.replace("''", "'")), None))
}

/// The tokens of the value that starts at `tokens[v]`: a literal, a
/// parameter or a bare word (`SET x TO word`), a function call with its
/// arguments (`crypt('…', gen_salt('bf'))`), or a parenthesized expression;
/// `None` for a column reference (`excluded.api_key`) or no value.
fn value_extent(tokens: &[&ScanToken], v: usize) -> Option<Range<usize>> {
    let first = tokens.get(v)?;
    if first.token() == Token::Ascii40 {
        let (_, close) = arguments(tokens, v)?;
        return Some(v..close + 1);
    }
    if !is_word(first) {
        return (first.token() == Token::Param || is_value(first)).then_some(v..v + 1);
    }
    let mut last = v;
    while tokens
        .get(last + 1)
        .is_some_and(|t| t.token() == Token::Ascii46)
        && tokens.get(last + 2).is_some_and(|t| is_word(t))
    {
        last += 2;
    }
    if tokens
        .get(last + 1)
        .is_some_and(|t| t.token() == Token::Ascii40)
    {
        let (_, close) = arguments(tokens, last + 1)?;
        return Some(v..close + 1);
    }
    (last == v && is_value(first)).then_some(v..v + 1)
}

/// A name: an identifier or a keyword that is not reserved.
fn is_word(t: &ScanToken) -> bool {
    t.token() == Token::Ident
        || (t.keyword_kind() != KeywordKind::NoKeyword
            && t.keyword_kind() != KeywordKind::ReservedKeyword)
}

/// Each argument of the parenthesized list opening at `tokens[open]`, as a
/// range of token indexes, and the index of its `)`; `None` if the list is
/// not closed.
fn arguments(tokens: &[&ScanToken], open: usize) -> Option<(Vec<Range<usize>>, usize)> {
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = open + 1;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        match t.token() {
            Token::Ascii40 | Token::Ascii91 => depth += 1,
            Token::Ascii41 | Token::Ascii93 => {
                depth -= 1;
                if depth == 0 {
                    if i > start {
                        args.push(start..i);
                    }
                    return Some((args, i));
                }
            }
            Token::Ascii44 if depth == 1 => {
                args.push(start..i);
                start = i + 1;
            }
            _ => {}
        }
    }
    None
}

/// Withholds the argument `arg` (token indexes): one value token, a
/// parameter (its bound value), or an expression as a whole, with the
/// parameters in it.
fn withhold_argument(
    tokens: &[&ScanToken],
    text: &str,
    arg: Range<usize>,
    taken: &mut [bool],
    ranges: &mut Vec<(Range<usize>, SecretKind)>,
    params: &mut Vec<(u32, SecretKind)>,
) {
    let Some(first) = tokens.get(arg.start).filter(|_| !arg.is_empty()) else {
        return;
    };
    for t in &tokens[arg.clone()] {
        if t.token() == Token::Param
            && let Some(n) = param_number(token_source(text, t))
        {
            params.push((n, SecretKind::Value));
        }
    }
    if arg.len() == 1 {
        if is_value(first) {
            taken[arg.start] = true;
        }
        return;
    }
    let last = tokens[arg.end - 1];
    let expression_has_values = tokens[arg.clone()].iter().any(|t| is_value(t));
    if expression_has_values {
        ranges.push((first.start as usize..last.end as usize, SecretKind::Value));
    }
}

/// `INSERT INTO t (…, password, …) VALUES (…, '…', …), …`: the values of
/// columns named like secrets.
fn insert_values(
    tokens: &[&ScanToken],
    text: &str,
    taken: &mut [bool],
    ranges: &mut Vec<(Range<usize>, SecretKind)>,
    params: &mut Vec<(u32, SecretKind)>,
) {
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i].token() != Token::Insert {
            i += 1;
            continue;
        }
        i += 1;
        // The column list: the first `(` of the statement, unless its
        // rows or query come first.
        let open = tokens[i..].iter().position(|t| {
            matches!(
                t.token(),
                Token::Ascii40 | Token::Values | Token::Select | Token::Default | Token::Ascii59
            )
        });
        let Some(open) = open.map(|o| i + o) else {
            return;
        };
        if tokens[open].token() != Token::Ascii40 {
            i = open;
            continue;
        }
        let Some((columns, close)) = arguments(tokens, open) else {
            return;
        };
        let secret: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.len() == 1 && is_secret_name(token_source(text, tokens[c.start])))
            .map(|(k, _)| k)
            .collect();
        i = close + 1;
        if secret.is_empty() {
            continue;
        }
        // OVERRIDING … VALUE may stand before VALUES.
        let Some(values) = tokens[i..]
            .iter()
            .position(|t| matches!(t.token(), Token::Values | Token::Select | Token::Ascii59))
            .map(|v| i + v)
        else {
            return;
        };
        if tokens[values].token() != Token::Values {
            i = values;
            continue;
        }
        let mut row = values + 1;
        while tokens.get(row).is_some_and(|t| t.token() == Token::Ascii40) {
            let Some((args, close)) = arguments(tokens, row) else {
                return;
            };
            for &k in &secret {
                if let Some(arg) = args.get(k) {
                    withhold_argument(tokens, text, arg.clone(), taken, ranges, params);
                }
            }
            row = close + 1;
            if tokens.get(row).is_some_and(|t| t.token() == Token::Ascii44) {
                row += 1;
            } else {
                break;
            }
        }
        i = row;
    }
}

/// Functions that take a password or key by position (pgcrypto's): the
/// name, and the positions (from 0) of those arguments.
const SECRET_ARGUMENTS: [(&str, &[usize]); 12] = [
    ("crypt", &[0]),
    ("encrypt", &[1]),
    ("decrypt", &[1]),
    ("encrypt_iv", &[1]),
    ("decrypt_iv", &[1]),
    ("hmac", &[1]),
    ("pgp_sym_encrypt", &[1]),
    ("pgp_sym_decrypt", &[1]),
    ("pgp_sym_encrypt_bytea", &[1]),
    ("pgp_sym_decrypt_bytea", &[1]),
    ("pgp_pub_decrypt", &[1, 2]),
    ("pgp_pub_decrypt_bytea", &[1, 2]),
];

/// `crypt('…', gen_salt('bf'))`, `pgp_sym_encrypt(data, '…')`: the
/// arguments of [`SECRET_ARGUMENTS`] that are passwords or keys.
fn secret_arguments(
    tokens: &[&ScanToken],
    text: &str,
    taken: &mut [bool],
    ranges: &mut Vec<(Range<usize>, SecretKind)>,
    params: &mut Vec<(u32, SecretKind)>,
) {
    for i in 0..tokens.len() {
        if !is_word(tokens[i])
            || tokens
                .get(i + 1)
                .is_none_or(|t| t.token() != Token::Ascii40)
        {
            continue;
        }
        let name = identifier(token_source(text, tokens[i]));
        let Some((_, positions)) = SECRET_ARGUMENTS.iter().find(|(f, _)| *f == name) else {
            continue;
        };
        let Some((args, _)) = arguments(tokens, i + 1) else {
            continue;
        };
        for &k in *positions {
            if let Some(arg) = args.get(k) {
                withhold_argument(tokens, text, arg.clone(), taken, ranges, params);
            }
        }
    }
}

/// `EXECUTE name(…)`: the arguments `executing` says are secrets.
fn execute_args(
    tokens: &[&ScanToken],
    text: &str,
    executing: &[SecretArgs],
    taken: &mut [bool],
    ranges: &mut Vec<(Range<usize>, SecretKind)>,
    params: &mut Vec<(u32, SecretKind)>,
) {
    for i in 0..tokens.len() {
        if tokens[i].token() != Token::Execute {
            continue;
        }
        let (Some(name), Some(open)) = (tokens.get(i + 1), tokens.get(i + 2)) else {
            continue;
        };
        if open.token() != Token::Ascii40 {
            continue;
        }
        // A name written with Unicode escapes may be any of them.
        let name = match name.token() {
            Token::Ident => Some(identifier(token_source(text, name))),
            Token::Uident => None,
            _ if name.keyword_kind() != KeywordKind::NoKeyword => {
                Some(token_source(text, name).to_ascii_lowercase())
            }
            _ => continue,
        };
        let runs: Vec<&SecretArgs> = executing
            .iter()
            .filter(|e| name.as_deref().is_none_or(|n| n == e.name))
            .collect();
        if runs.is_empty() {
            continue;
        }
        let Some((args, _)) = arguments(tokens, i + 2) else {
            continue;
        };
        for (k, arg) in args.into_iter().enumerate() {
            let position = u32::try_from(k + 1).unwrap_or(u32::MAX);
            if runs.iter().any(|e| e.takes(position)) {
                withhold_argument(tokens, text, arg, taken, ranges, params);
            }
        }
    }
}

/// An identifier as the server names it: quoted as written, otherwise in
/// lowercase.
fn identifier(source: &str) -> String {
    match source.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => source.to_ascii_lowercase(),
    }
}

fn withheld() -> Secrets {
    Secrets {
        whole: true,
        ..Secrets::default()
    }
}

fn is_string(t: &ScanToken) -> bool {
    matches!(t.token(), Token::Sconst | Token::Usconst)
}

/// A token that is a value: a literal, or a bare word (`SET x TO word`).
fn is_value(t: &ScanToken) -> bool {
    matches!(
        t.token(),
        Token::Sconst
            | Token::Usconst
            | Token::Iconst
            | Token::Fconst
            | Token::Bconst
            | Token::Xconst
            | Token::Ident
    ) || (t.keyword_kind() != KeywordKind::NoKeyword
        && t.keyword_kind() != KeywordKind::ReservedKeyword)
}

/// A simple string literal's content (for comparing names): the text
/// between its quotes, without an `E` prefix. Escapes are left as they are;
/// a name with one is not a name this module looks for.
fn unquote(literal: &str) -> &str {
    let literal = literal.strip_prefix(['E', 'e']).unwrap_or(literal);
    literal
        .strip_prefix('\'')
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or(literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(text: &str) -> String {
        find_secrets(text, Reading::default()).redact(text)
    }

    #[test]
    fn role_passwords_are_withheld() {
        for (text, want) in [
            (
                "CREATE ROLE bob LOGIN PASSWORD 'hunter2'",
                "CREATE ROLE bob LOGIN PASSWORD '[redacted]'",
            ),
            (
                "alter user bob with encrypted password 'SCRAM-SHA-256$4096:abc' valid until 'infinity'",
                "alter user bob with encrypted password '[redacted]' valid until 'infinity'",
            ),
            (
                "ALTER ROLE bob PASSWORD /* new */ $pw$hunter2$pw$",
                "ALTER ROLE bob PASSWORD /* new */ '[redacted]'",
            ),
            (
                "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'remote', password 'hunter2')",
                "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'remote', password '[redacted]')",
            ),
            (
                "ALTER USER MAPPING FOR bob SERVER s OPTIONS (SET \"password\" E'hun\\'ter2')",
                "ALTER USER MAPPING FOR bob SERVER s OPTIONS (SET \"password\" '[redacted]')",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
        // Nothing to withhold.
        assert_eq!(
            redacted("ALTER ROLE bob PASSWORD NULL"),
            "ALTER ROLE bob PASSWORD NULL"
        );
    }

    #[test]
    fn secret_settings_are_withheld() {
        for (text, want) in [
            (
                "SET app.api_token = 'abc123'",
                "SET app.api_token = '[redacted]'",
            ),
            ("set app.secret to abc123", "set app.secret to '[redacted]'"),
            (
                "ALTER SYSTEM SET app.encryption_key = 'k'",
                "ALTER SYSTEM SET app.encryption_key = '[redacted]'",
            ),
            (
                "ALTER ROLE bob SET app.password TO 12345",
                "ALTER ROLE bob SET app.password TO '[redacted]'",
            ),
            (
                "SELECT set_config('app.secret', 'abc', false)",
                "SELECT set_config('app.secret', '[redacted]', false)",
            ),
            (
                "UPDATE users SET password = 'x' WHERE id = 1",
                "UPDATE users SET password = '[redacted]' WHERE id = 1",
            ),
            // A function of the secret: the call is withheld whole.
            (
                "UPDATE users SET password = crypt('x', gen_salt('bf')) WHERE id = 1",
                "UPDATE users SET password = '[redacted]' WHERE id = 1",
            ),
            (
                "SELECT 1 FROM users WHERE api_key = pg_catalog.digest($1, 'sha256')",
                "SELECT 1 FROM users WHERE api_key = '[redacted]'",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
        // Other settings, and a secret-looking column that is only named.
        for text in [
            "SET search_path = app, public",
            "SET statement_timeout TO 5000",
            "CREATE TABLE users (id int, password text, api_key text)",
            "SELECT password FROM users WHERE id = 1",
            "SELECT 'password'",
            "UPDATE users SET api_key = excluded.api_key",
            "SELECT * FROM a JOIN b ON a.token = b.token",
        ] {
            assert_eq!(redacted(text), text);
        }
    }

    #[test]
    fn parameters_in_a_secret_place_are_named() {
        let s = find_secrets(
            "SELECT set_config('app.secret', $2, false), $1",
            Reading::default(),
        );
        assert_eq!(s.params, vec![(2, SecretKind::Value)]);
        assert!(s.spans.is_empty());
        let s = find_secrets("SELECT * FROM t WHERE api_key = $1", Reading::default());
        assert_eq!(s.params, vec![(1, SecretKind::Value)]);
    }

    #[test]
    fn connection_strings_with_passwords_are_withheld() {
        for (text, want) in [
            (
                "SELECT dblink_connect('c', 'host=db user=u password=hunter2')",
                "SELECT dblink_connect('c', '[redacted]')",
            ),
            (
                "CREATE SUBSCRIPTION s CONNECTION 'host=db password = x' PUBLICATION p",
                "CREATE SUBSCRIPTION s CONNECTION '[redacted]' PUBLICATION p",
            ),
            (
                "SELECT dblink('postgresql://u:hunter2@db/app', 'select 1')",
                "SELECT dblink('[redacted]', 'select 1')",
            ),
            (
                "COPY t TO PROGRAM 'PGPASSWORD=x psql -h db'",
                "COPY t TO PROGRAM '[redacted]'",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
            assert_eq!(
                find_secrets(text, Reading::default()).spans[0].1,
                SecretKind::ConnectionString
            );
        }
        for text in [
            "SELECT dblink('host=db user=u', 'select 1')",
            "SELECT 'https://example.com/a:b@c'",
            "SELECT 'forgot my password'",
        ] {
            assert_eq!(redacted(text), text);
        }
    }

    #[test]
    fn unreadable_text_that_may_hold_a_secret_is_withheld_whole() {
        let s = find_secrets("ALTER ROLE bob PASSWORD 'unterminated", Reading::default());
        assert!(s.whole);
        let off = Reading {
            standard_conforming_strings: false,
        };
        let text = r"ALTER ROLE bob PASSWORD 'a\' x'";
        assert!(find_secrets(text, off).whole);
        assert_eq!(
            find_secrets(text, off).redact(text),
            "[statement withheld: it may hold a secret]"
        );
        // Without a backslash the scanner reads it as the server does.
        let text = "ALTER ROLE bob PASSWORD 'x'";
        assert_eq!(
            find_secrets(text, off).redact(text),
            "ALTER ROLE bob PASSWORD '[redacted]'"
        );
        // Text that names nothing secret is never scanned or withheld.
        assert!(find_secrets("SELECT 'unterminated", Reading::default()).is_empty());
    }

    #[test]
    fn the_words_that_open_a_scan() {
        for text in [
            "x PASSWORD",
            "PGPASS",
            "pwd",
            "a.SeCrEt",
            "TOKEN",
            "credentials",
            "primary_conninfo",
            "KEY",
            "postgres://h",
            "pgp_sym_encrypt",
            "HMAC",
        ] {
            assert!(may_hold_secrets(text), "{text}");
        }
        for text in [
            "",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "pas",
            "ke",
            ":/",
        ] {
            assert!(!may_hold_secrets(text), "{text}");
        }
    }

    #[test]
    fn secrets_in_bodies_and_strings_of_sql_are_withheld() {
        for (text, want) in [
            // The usual idempotent role creation of a migration.
            (
                "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN \
                 CREATE ROLE app LOGIN PASSWORD 'hunter2'; END IF; END$$",
                "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN \
                 CREATE ROLE app LOGIN PASSWORD '[redacted]'; END IF; END$$",
            ),
            (
                "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $body$\
                 DECLARE api_token text := 'tok-1'; BEGIN \
                 PERFORM set_config('app.secret', 'abc', false); END $body$",
                "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $body$\
                 DECLARE api_token text := '[redacted]'; BEGIN \
                 PERFORM set_config('app.secret', '[redacted]', false); END $body$",
            ),
            // A string the body executes: withheld whole.
            (
                "DO $$BEGIN EXECUTE 'ALTER ROLE app PASSWORD ''hunter2'''; END$$",
                "DO $$BEGIN EXECUTE '[redacted]'; END$$",
            ),
            (
                "DO 'BEGIN ALTER ROLE app PASSWORD ''hunter2''; END'",
                "DO '[redacted]'",
            ),
            // PL/pgSQL assignment, a named argument.
            (
                "DO $$BEGIN pwd := 'x1'; END$$",
                "DO $$BEGIN pwd := '[redacted]'; END$$",
            ),
            (
                "SELECT make_user(name => 'a', password => 'x2')",
                "SELECT make_user(name => 'a', password => '[redacted]')",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
        // Strings that only mention a secret word hold no statement.
        for text in [
            "SELECT 'forgot my password: ask the admin'",
            "DO $$BEGIN RAISE NOTICE 'rotate the api key'; END$$",
            "SELECT 'it''s the key'",
        ] {
            assert_eq!(redacted(text), text);
        }
    }

    #[test]
    fn values_given_to_a_parameter_bound_to_a_secret_name_are_withheld() {
        let known = Known {
            secret_names: &[1, 3],
            ..Known::default()
        };
        for (text, params, want) in [
            (
                "SELECT set_config($1, $2, false)",
                vec![(2, SecretKind::Value)],
                "SELECT set_config($1, $2, false)",
            ),
            (
                "SELECT set_config($1, 'literal-secret', false), set_config($4, 'shown', false)",
                vec![],
                "SELECT set_config($1, '[redacted]', false), set_config($4, 'shown', false)",
            ),
            (
                "SELECT jsonb_build_object($3, $4)",
                vec![(4, SecretKind::Value)],
                "SELECT jsonb_build_object($3, $4)",
            ),
        ] {
            let s = find_secrets_with(text, Reading::default(), known);
            assert_eq!(s.params, params, "{text}");
            assert_eq!(s.redact(text), want, "{text}");
        }
        // Not known to be a secret's name: nothing withheld.
        let s = find_secrets("SELECT set_config($1, $2, false)", Reading::default());
        assert!(s.is_empty());
    }

    #[test]
    fn passwords_and_keys_given_to_pgcrypto_are_withheld() {
        for (text, want) in [
            (
                "SELECT id FROM users WHERE hash = crypt('hunter2', hash)",
                "SELECT id FROM users WHERE hash = crypt('[redacted]', hash)",
            ),
            (
                "INSERT INTO t VALUES (pgp_sym_encrypt('123-45-6789', 'k3y-material', 'cipher-algo=aes256'))",
                "INSERT INTO t VALUES (pgp_sym_encrypt('123-45-6789', '[redacted]', 'cipher-algo=aes256'))",
            ),
            (
                "SELECT public.hmac(body, 'mac-secret'::bytea, 'sha256') FROM m",
                "SELECT public.hmac(body, '[redacted]', 'sha256') FROM m",
            ),
            (
                "SELECT pgp_pub_decrypt(data, dearmor('-----BEGIN PGP-----'), 'psw') FROM t",
                "SELECT pgp_pub_decrypt(data, '[redacted]', '[redacted]') FROM t",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
        let s = find_secrets("SELECT decrypt(data, $1, 'aes') FROM t", Reading::default());
        assert_eq!(s.params, vec![(1, SecretKind::Value)]);
        // A column or a function of the same name is not a call.
        for text in ["SELECT crypt FROM t", "SELECT encrypt_iv(data) FROM t"] {
            assert_eq!(redacted(text), text);
        }
    }

    #[test]
    fn json_documents_with_secret_keys_are_withheld() {
        for (text, want) in [
            (
                r#"INSERT INTO settings (cfg) VALUES ('{"url": "https://x", "api_key": "k1"}')"#,
                "INSERT INTO settings (cfg) VALUES ('[redacted]')",
            ),
            (
                r#"SELECT '[{"auth": {"Password": "p2"}}]'::jsonb"#,
                "SELECT '[redacted]'::jsonb",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
        for text in [
            r#"SELECT '{"password": null, "user": "a"}'::jsonb"#,
            r#"SELECT '{"keys": 3}'::jsonb"#,
            r#"SELECT '{"api_key": '"#,
        ] {
            assert_eq!(redacted(text), text);
        }
        assert!(json_holds_secret(r#"{"token": 1}"#));
        assert!(!json_holds_secret("token"));
    }

    #[test]
    fn inserted_values_of_secret_columns_are_withheld() {
        for (text, want) in [
            (
                "INSERT INTO users (name, password) VALUES ('a', 'x1'), \
                 ('b', crypt('x2', gen_salt('bf')))",
                "INSERT INTO users (name, password) VALUES ('a', '[redacted]'), \
                 ('b', '[redacted]')",
            ),
            (
                "insert into app.creds as c (\"API_KEY\", id) overriding system value \
                 values (E'k', 1) on conflict (id) do update set api_key = excluded.api_key",
                "insert into app.creds as c (\"API_KEY\", id) overriding system value \
                 values ('[redacted]', 1) on conflict (id) do update set api_key = excluded.api_key",
            ),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
        let s = find_secrets(
            "INSERT INTO users (name, password) VALUES ($1, $2)",
            Reading::default(),
        );
        assert_eq!(s.params, vec![(2, SecretKind::Value)]);
        for text in [
            "INSERT INTO users (name, password) SELECT name, password FROM old_users",
            "INSERT INTO users (name, password) VALUES ('a', DEFAULT)",
            "INSERT INTO users VALUES ('a', 'not known to be a password column')",
        ] {
            assert_eq!(redacted(text), text);
        }
    }

    #[test]
    fn arguments_of_an_execute_that_binds_a_secret_are_withheld() {
        let prepared = SecretArgs::of(
            "p",
            "PREPARE p(text, int) AS SELECT set_config('app.secret', $1, false), $2",
            Reading::default(),
        )
        .unwrap();
        assert_eq!(prepared.params, vec![1]);
        let executing = [prepared];
        for (text, want) in [
            ("EXECUTE p('hunter2', 1)", "EXECUTE p('[redacted]', 1)"),
            (
                "execute P ( 'a' || 'b' , 2 )",
                "execute P ( '[redacted]' , 2 )",
            ),
            (
                "CREATE TABLE t AS EXECUTE p(/* c */ $x$hunter2$x$, 3)",
                "CREATE TABLE t AS EXECUTE p(/* c */ '[redacted]', 3)",
            ),
            // Another statement's arguments are its own.
            ("EXECUTE q('visible', 1)", "EXECUTE q('visible', 1)"),
            ("EXECUTE \"P\"('visible', 1)", "EXECUTE \"P\"('visible', 1)"),
        ] {
            let known = Known {
                executing: &executing,
                ..Known::default()
            };
            let found = find_secrets_with(text, Reading::default(), known);
            assert_eq!(found.redact(text), want, "{text}");
        }
        let known = Known {
            executing: &executing,
            ..Known::default()
        };
        let s = find_secrets_with("EXECUTE p($2, $1)", Reading::default(), known);
        assert_eq!(s.params, vec![(2, SecretKind::Value)]);
        // A prepared text withheld whole withholds every argument.
        let all = SecretArgs::of(
            "w",
            "PREPARE w AS SELECT 'unterminated password",
            Reading::default(),
        )
        .unwrap();
        assert!(all.all);
        let text = "EXECUTE w(1, 'two')";
        assert_eq!(
            find_secrets_with(
                text,
                Reading::default(),
                Known {
                    executing: &[all],
                    ..Known::default()
                }
            )
            .redact(text),
            "EXECUTE w('[redacted]', '[redacted]')"
        );
        assert!(SecretArgs::of("s", "PREPARE s AS SELECT 1", Reading::default()).is_none());
    }

    /// Text the server would refuse (a list cut short, empty arguments,
    /// unbalanced parentheses) is read without a panic, and its spans are
    /// in order and apart, within the text.
    #[test]
    fn malformed_text_is_read_without_a_panic() {
        let fragments = [
            "INSERT INTO t (password",
            ") VALUES (",
            ", ",
            "'x'",
            "$1",
            "crypt(",
            "EXECUTE p(",
            "(",
            ")",
            "]",
            "password =",
            "$$BEGIN pwd := 'y'; END$$",
            "'{\"token\": 1}'",
        ];
        let prepared = SecretArgs::of(
            "p",
            "SELECT set_config('app.secret', $1, false)",
            Reading::default(),
        )
        .unwrap();
        let known = Known {
            executing: std::slice::from_ref(&prepared),
            secret_names: &[1],
        };
        for a in fragments {
            for b in fragments {
                for c in fragments {
                    let text = format!("{a}{b} {c}");
                    let s = find_secrets_with(&text, Reading::default(), known);
                    let mut end = 0;
                    for (r, _) in &s.spans {
                        assert!(
                            end <= r.start && r.start <= r.end && r.end <= text.len(),
                            "{text}: {s:?}"
                        );
                        end = r.end;
                    }
                    let _ = s.redact(&text);
                }
            }
        }
    }

    #[test]
    fn names() {
        for name in [
            "password",
            "PGPASSWORD",
            "app.secret",
            "api_key",
            "key",
            "app.key",
            "x_token",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["search_path", "keepalives", "monkey", "primary"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
