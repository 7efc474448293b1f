//! Run-time settings that bear on access: the role, read-only mode, and how
//! the server reads SQL text.

use pg_query::protobuf::a_const::Val;
use pg_query::protobuf::{VariableSetKind, VariableSetStmt};
use pg_query::{Node, NodeEnum};

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
        // Any change, either way: the worker reads later text only once the
        // server has confirmed the settings in force.
        Setting::ConformingStrings | Setting::ClientEncoding => effect.changes_parsing = true,
        Setting::Identity => effect.identity = true,
        Setting::Other => {}
    }
    effect
}

/// `RESET ALL` (and `DISCARD ALL`, which runs it): every setting goes back
/// to its session default, which may be read-write if the worker set
/// read-only mode with `SET` rather than at connection start, and may be
/// another client encoding than the one in force. The role and session
/// authorization are not reset by `RESET ALL`.
pub(super) fn reset_all() -> Effect {
    Effect {
        disables_read_only: true,
        changes_parsing: true,
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

/// A value written as a literal or a bare word: `off`, `'off'`, `false`,
/// `0`, `$$off$$`, `'off'::text` (the parser turns bare words into string
/// constants). `None` for anything computed and for NULL.
pub(super) fn literal(node: &Node) -> Option<String> {
    match node.node.as_ref()? {
        NodeEnum::AConst(c) if !c.isnull => match c.val.as_ref()? {
            Val::Sval(s) => Some(s.sval.clone()),
            Val::Ival(i) => Some(i.ival.to_string()),
            Val::Fval(f) => Some(f.fval.clone()),
            Val::Boolval(b) => Some(if b.boolval { "true" } else { "false" }.to_owned()),
            Val::Bsval(_) => None,
        },
        NodeEnum::TypeCast(cast) => literal(cast.arg.as_deref()?),
        // Option values (`EXPLAIN (ANALYZE off)`, transaction modes) are
        // bare value nodes.
        NodeEnum::String(s) => Some(s.sval.clone()),
        NodeEnum::Integer(i) => Some(i.ival.to_string()),
        NodeEnum::Float(f) => Some(f.fval.clone()),
        NodeEnum::Boolean(b) => Some(if b.boolval { "true" } else { "false" }.to_owned()),
        _ => None,
    }
}

/// The effect of `set_config(setting_name, new_value, is_local)`: by the
/// literal name when there is one; a computed name could be any setting, so
/// it counts as disabling read-only mode and changing parsing (it already
/// makes the statement `writes`, set_config being a writing function).
pub(super) fn set_config(args: &[Node]) -> Effect {
    let mut name = None;
    let mut value = None;
    for (i, arg) in args.iter().enumerate() {
        let (slot, expr) = match arg.node.as_ref() {
            // `setting_name => …`, `new_value => …`.
            Some(NodeEnum::NamedArgExpr(named)) => match named.arg.as_deref() {
                Some(expr) => (named_slot(&named.name), expr),
                None => continue,
            },
            Some(_) => (i, arg),
            None => continue,
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

/// The effect of a `SET`/`RESET` (also inside `ALTER SYSTEM`, `ALTER ROLE
/// … SET`, `ALTER DATABASE … SET`). `SET TRANSACTION`/`SET SESSION
/// CHARACTERISTICS AS TRANSACTION` carry their modes as options.
pub(super) fn variable_set(set: &VariableSetStmt) -> Effect {
    match VariableSetKind::try_from(set.kind) {
        Ok(VariableSetKind::VarSetValue) => {
            let value = match set.args.as_slice() {
                [one] => literal(one),
                _ => None,
            };
            assign(Setting::named(&set.name), value.as_deref())
        }
        Ok(VariableSetKind::VarSetMulti) => Effect {
            disables_read_only: set.args.iter().any(turns_read_only_off),
            ..Effect::default()
        },
        Ok(VariableSetKind::VarResetAll) => reset_all(),
        // DEFAULT, FROM CURRENT, RESET: a value the text does not show.
        _ => assign(Setting::named(&set.name), None),
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

/// A transaction mode (`DefElem`) that makes the transaction read-write:
/// `transaction_read_only` set to anything but a true value.
pub(super) fn turns_read_only_off(option: &Node) -> bool {
    match option.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if d.defname == "transaction_read_only" => {
            d.arg
                .as_deref()
                .and_then(literal)
                .as_deref()
                .and_then(pg_bool)
                != Some(true)
        }
        _ => false,
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
}
