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
//!   or assigned columns of that name), or `'name', value` (`set_config`,
//!   `json_build_object`);
//! - a string that is itself a connection string with a password
//!   ([`is_connection_secret`]: `password=…`, `PGPASSWORD=…`,
//!   `scheme://user:password@host`).
//!
//! Text the scanner cannot read as the server will (an unterminated
//! literal; `standard_conforming_strings` off, where a backslash in `'…'`
//! escapes and the scanner would end a string elsewhere) is withheld whole
//! when it may hold a secret at all. Text that names nothing secret-looking
//! is not scanned: [`find_secrets`] costs one pass over the bytes then.

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
    /// Byte ranges of the text, in order and apart, each a whole token.
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
/// connection secret): `pass`, `pwd`, `secret`, `token`, `credential`,
/// `conninfo`, `key` or `://`, in any case. One pass over the bytes: this
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
        b'c' => at(i, b"credential") || at(i, b"conninfo"),
        b'k' => at(i, b"key"),
        // ':' | 0x20 is ':' itself.
        b':' => at(i, b"://"),
        _ => false,
    })
}

/// The secrets in `text`, read as the server reads it with `reading`.
pub fn find_secrets(text: &str, reading: Reading) -> Secrets {
    if !may_hold_secrets(text) {
        return Secrets::default();
    }
    // With standard_conforming_strings off, a backslash escapes inside
    // '…' and the scanner (which reads with it on) could end a string
    // elsewhere than the server.
    if !reading.standard_conforming_strings && text.contains('\\') {
        return withheld();
    }
    let Ok(tokens) = pg_query::scan_tokens(text) else {
        return withheld();
    };
    let tokens: Vec<&ScanToken> = tokens
        .iter()
        .filter(|t| !matches!(t.token(), Token::SqlComment | Token::CComment))
        .collect();
    let mut secrets = Secrets::default();
    let mut taken = vec![false; tokens.len()];
    let source = |t: &ScanToken| text.get(t.start as usize..t.end as usize).unwrap_or("");
    for (i, t) in tokens.iter().enumerate() {
        if is_string(t) && is_connection_secret(source(t)) {
            taken[i] = true;
            continue;
        }
        let names_secret = match t.token() {
            Token::Sconst => is_secret_name(unquote(source(t))),
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
            (Token::Sconst, Some(comma)) if comma.token() == Token::Ascii44 => Some(i + 2),
            (Token::Sconst, _) => None,
            // name = value, name TO value
            (_, Some(op)) if matches!(op.token(), Token::Ascii61 | Token::To) => Some(i + 2),
            // name 'value'
            (_, Some(v)) if is_string(v) => Some(i + 1),
            _ => None,
        };
        let Some(v) = value else { continue };
        match next(v) {
            Some(p) if p.token() == Token::Param => {
                if let Some(n) = source(p).strip_prefix('$').and_then(|n| n.parse().ok()) {
                    secrets.params.push((n, SecretKind::Value));
                }
            }
            Some(p) if is_value(p) => taken[v] = true,
            _ => {}
        }
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
        secrets.spans.push((t.start as usize..t.end as usize, kind));
    }
    secrets.params.sort_unstable_by_key(|(n, _)| *n);
    secrets.params.dedup_by_key(|(n, _)| *n);
    secrets
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
