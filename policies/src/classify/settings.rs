//! Run-time settings that bear on access: the role, read-only mode, and how
//! the server reads SQL text.

use sqlparser::ast::{Expr, FunctionArg, FunctionArgExpr, Value};

/// What changing a setting means to a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Setting {
    /// `default_transaction_read_only`, `transaction_read_only`.
    ReadOnly,
    /// `standard_conforming_strings`.
    ConformingStrings,
    /// `client_encoding` (also `SET NAMES`).
    ClientEncoding,
    /// `role`, `session_authorization`: who the session acts as.
    Identity,
    /// Anything else.
    Other,
}

impl Setting {
    /// The setting called `name`, compared case-insensitively (PostgreSQL
    /// ignores case in setting names, quoted or not).
    pub(super) fn named(name: &str) -> Self {
        const NAMES: [(&str, Setting); 6] = [
            ("default_transaction_read_only", Setting::ReadOnly),
            ("transaction_read_only", Setting::ReadOnly),
            ("standard_conforming_strings", Setting::ConformingStrings),
            ("client_encoding", Setting::ClientEncoding),
            ("role", Setting::Identity),
            ("session_authorization", Setting::Identity),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or(Setting::Other, |(_, s)| *s)
    }
}

/// What assigning a value to a setting does, as facts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Effect {
    pub(super) disables_read_only: bool,
    pub(super) changes_parsing: bool,
    /// Changes who the session acts as (a `dcl`).
    pub(super) identity: bool,
}

/// The effect of setting `setting` to `value`; `None` means a value that
/// is not a literal (or `DEFAULT`, or a reset), which is taken at its worst.
pub(super) fn assign(setting: Setting, value: Option<&str>) -> Effect {
    let mut effect = Effect::default();
    match setting {
        Setting::ReadOnly => effect.disables_read_only = value.and_then(pg_bool) != Some(true),
        Setting::ConformingStrings => {
            effect.changes_parsing = value.and_then(pg_bool) != Some(true)
        }
        Setting::ClientEncoding => effect.changes_parsing = !value.is_some_and(is_utf8),
        Setting::Identity => effect.identity = true,
        Setting::Other => {}
    }
    effect
}

/// `RESET ALL` (and `DISCARD ALL`, which runs it): every setting goes back
/// to its session default, which may be read-write if the worker set
/// read-only mode with `SET` rather than at connection start. The role and
/// session authorization are not reset by `RESET ALL`, and the parsing
/// settings return to the server's (UTF8, conforming) defaults.
pub(super) fn reset_all() -> Effect {
    Effect {
        disables_read_only: true,
        ..Effect::default()
    }
}

/// PostgreSQL's `parse_bool`: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`,
/// any case, and unique prefixes of them.
pub(super) fn pg_bool(text: &str) -> Option<bool> {
    let len = text.len();
    if len == 0 {
        return None;
    }
    let prefix_of = |word: &str| len <= word.len() && word[..len].eq_ignore_ascii_case(text);
    match text.as_bytes()[0].to_ascii_lowercase() {
        b't' if prefix_of("true") => Some(true),
        b'y' if prefix_of("yes") => Some(true),
        b'f' if prefix_of("false") => Some(false),
        b'n' if prefix_of("no") => Some(false),
        b'o' if len >= 2 && prefix_of("on") => Some(true),
        b'o' if len >= 2 && prefix_of("off") => Some(false),
        b'1' if len == 1 => Some(true),
        b'0' if len == 1 => Some(false),
        _ => None,
    }
}

/// Whether an encoding name means UTF8, as PostgreSQL normalizes encoding
/// names (case and punctuation ignored; `unicode` is an alias).
fn is_utf8(name: &str) -> bool {
    let mut buf = [0u8; 8];
    let mut len = 0;
    for b in name.bytes().filter(u8::is_ascii_alphanumeric) {
        if len == buf.len() {
            return false;
        }
        buf[len] = b.to_ascii_lowercase();
        len += 1;
    }
    matches!(&buf[..len], b"utf8" | b"unicode")
}

/// A value written as a literal or a bare word: `off`, `'off'`, `false`,
/// `0`, `$$off$$`, `'off'::text`. `None` for anything computed and for
/// `DEFAULT`.
pub(super) fn literal(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s) => Some(s.clone()),
            Value::DollarQuotedString(s) => Some(s.value.clone()),
            Value::Boolean(b) => Some(if *b { "true" } else { "false" }.to_owned()),
            Value::Number(n, _) => Some(n.to_string()),
            _ => None,
        },
        Expr::Identifier(id) if !id.value.eq_ignore_ascii_case("default") => Some(id.value.clone()),
        Expr::Nested(inner) => literal(inner),
        Expr::Cast { expr, .. } => literal(expr),
        _ => None,
    }
}

/// The effect of `set_config(setting_name, new_value, is_local)`: by the
/// literal name when there is one; a computed name could be any setting, so
/// it counts as disabling read-only mode and changing parsing (it already
/// makes the statement `writes`, set_config being a side-effect function).
pub(super) fn set_config(args: &[FunctionArg]) -> Effect {
    let mut name = None;
    let mut value = None;
    for (i, arg) in args.iter().enumerate() {
        let (slot, expr) = match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => (i, e),
            // `setting_name => …`, `new_value => …`.
            FunctionArg::Named {
                name,
                arg: FunctionArgExpr::Expr(e),
                ..
            } => (named_slot(&name.value), e),
            FunctionArg::ExprNamed {
                name: Expr::Identifier(name),
                arg: FunctionArgExpr::Expr(e),
                ..
            } => (named_slot(&name.value), e),
            _ => continue,
        };
        match slot {
            0 => name = Some(literal(expr)),
            1 => value = Some(literal(expr)),
            _ => {}
        }
    }
    match name.flatten() {
        Some(name) => assign(Setting::named(name.trim()), value.flatten().as_deref()),
        None => Effect {
            disables_read_only: true,
            changes_parsing: true,
            identity: false,
        },
    }
}

/// The position of a named argument of `set_config`.
fn named_slot(name: &str) -> usize {
    if name.eq_ignore_ascii_case("setting_name") {
        0
    } else if name.eq_ignore_ascii_case("new_value") {
        1
    } else {
        usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_booleans_like_postgres() {
        for t in ["on", "ON", "true", "t", "tr", "yes", "y", "1"] {
            assert_eq!(pg_bool(t), Some(true), "{t}");
        }
        for f in ["off", "of", "OFF", "false", "f", "no", "n", "0"] {
            assert_eq!(pg_bool(f), Some(false), "{f}");
        }
        for x in ["", "o", "10", "onn", "truee", " on", "2"] {
            assert_eq!(pg_bool(x), None, "{x:?}");
        }
    }

    #[test]
    fn recognizes_utf8_spellings() {
        assert!(is_utf8("UTF8"));
        assert!(is_utf8("utf-8"));
        assert!(is_utf8("Unicode"));
        assert!(!is_utf8("SJIS"));
        assert!(!is_utf8("utf8x"));
        assert!(!is_utf8(""));
    }
}
