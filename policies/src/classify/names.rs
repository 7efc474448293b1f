//! Names as PostgreSQL resolves them.
//!
//! PostgreSQL folds an unquoted identifier to lowercase (ASCII letters only,
//! for a UTF8 database) and keeps a quoted one as written; either is then
//! truncated to `NAMEDATALEN - 1` = 63 bytes. Doing the same here means
//! `"Accounts"`, `ACCOUNTS` and a 70-character spelling of a 63-character
//! table name come out as the names the server will use.

use sqlparser::ast::{Ident, ObjectName, ObjectNamePart};

/// Longest identifier PostgreSQL keeps, in bytes (`NAMEDATALEN - 1`).
const MAX_IDENT_BYTES: usize = 63;

/// Appends `value` as PostgreSQL resolves it: folded to lowercase unless
/// `quoted`, truncated to 63 bytes at a character boundary.
pub(super) fn push_word(out: &mut String, value: &str, quoted: bool) {
    let mut end = value.len().min(MAX_IDENT_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let value = &value[..end];
    if quoted {
        out.push_str(value);
    } else {
        out.extend(value.chars().map(|c| c.to_ascii_lowercase()));
    }
}

/// One identifier as PostgreSQL resolves it.
pub(super) fn ident(ident: &Ident) -> String {
    let mut out = String::with_capacity(ident.value.len());
    push_word(&mut out, &ident.value, ident.quote_style.is_some());
    out
}

/// A possibly qualified name (`public.accounts`), each part resolved,
/// joined with `.` as written.
pub(super) fn object(name: &ObjectName) -> String {
    let mut out = String::with_capacity(name.0.iter().map(part_len).sum::<usize>() + name.0.len());
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part {
            ObjectNamePart::Identifier(id) => {
                push_word(&mut out, &id.value, id.quote_style.is_some())
            }
            // Not produced by the PostgreSQL dialect; keep something visible
            // rather than dropping the part.
            other => out.push_str(&other.to_string().to_ascii_lowercase()),
        }
    }
    out
}

fn part_len(part: &ObjectNamePart) -> usize {
    match part {
        ObjectNamePart::Identifier(id) => id.value.len(),
        ObjectNamePart::Function(_) => 16,
    }
}

/// A function's name as policies see it: the last part of the name,
/// lowercased whether quoted or not (so a deny list of lowercase names
/// also catches `"PG_READ_FILE"`), truncated like any identifier.
pub(super) fn function(name: &ObjectName) -> String {
    let mut out = String::new();
    match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => push_word(&mut out, &id.value, false),
        Some(other) => out.push_str(&other.to_string().to_ascii_lowercase()),
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(value: &str, quoted: bool) -> String {
        let mut s = String::new();
        push_word(&mut s, value, quoted);
        s
    }

    #[test]
    fn folds_unquoted_keeps_quoted() {
        assert_eq!(w("Accounts", false), "accounts");
        assert_eq!(w("Accounts", true), "Accounts");
        // Only ASCII letters fold, as in a UTF8 database.
        assert_eq!(w("ÉTÉ", false), "ÉtÉ");
    }

    #[test]
    fn truncates_to_63_bytes_on_a_char_boundary() {
        let long = "a".repeat(70);
        assert_eq!(w(&long, false).len(), 63);
        let multi = format!("{}é", "a".repeat(62)); // é is 2 bytes: 64 in all
        assert_eq!(w(&multi, true), "a".repeat(62));
    }
}
