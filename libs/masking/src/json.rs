//! JSON values, field by field: a key matching a column pattern has its
//! value masked whole; the detectors run on every string.

use serde_json::Value;

use crate::{Masker, Stats};

/// Whether `value` may be a JSON object or array (the only JSON worth
/// walking: a scalar is masked as text).
pub(crate) fn looks_like_json(value: &[u8]) -> bool {
    matches!(
        value.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// Masks a JSON document into `out`. `None` if it is not JSON; otherwise
/// whether anything changed (`out` holds the document re-serialized only
/// then).
pub(crate) fn mask(
    m: &mut Masker,
    value: &[u8],
    out: &mut Vec<u8>,
    stats: &mut Stats,
) -> Option<bool> {
    let mut doc: Value = serde_json::from_slice(value).ok()?;
    let mut scratch = Vec::new();
    let changed = walk(m, &mut doc, &mut scratch, stats);
    if changed {
        out.clear();
        serde_json::to_writer(&mut *out, &doc).expect("a Value serializes");
    }
    Some(changed)
}

fn walk(m: &mut Masker, v: &mut Value, scratch: &mut Vec<u8>, stats: &mut Stats) -> bool {
    match v {
        Value::String(s) => {
            scratch.clear();
            if m.mask_content(s.as_bytes(), scratch, stats) {
                *s = String::from_utf8_lossy(scratch).into_owned();
                true
            } else {
                false
            }
        }
        Value::Array(items) => {
            let mut changed = false;
            for item in items {
                changed |= walk(m, item, scratch, stats);
            }
            changed
        }
        Value::Object(fields) => {
            let mut changed = false;
            for (key, field) in fields.iter_mut() {
                if let Some(style) = m.column_style(None, key).cloned() {
                    if !field.is_null() {
                        let text = match field {
                            Value::String(s) => std::mem::take(s),
                            ref other => other.to_string(),
                        };
                        scratch.clear();
                        m.styled(text.as_bytes(), &style, None, scratch);
                        *field = Value::String(String::from_utf8_lossy(scratch).into_owned());
                        stats.by_column += 1;
                        changed = true;
                    }
                } else {
                    changed |= walk(m, field, scratch, stats);
                }
            }
            changed
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}
