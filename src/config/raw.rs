//! Reading the `ipam` object the way upstream's decoder does: keys matched case-insensitively,
//! unknown keys ignored, each field decoded on its own so an error can name it.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ConfigError;
use crate::files::shown;

/// A key as upstream's decoder matches it to a field: Go's encoding/json compares names under
/// Unicode case folding, where two letters beyond ASCII also match ASCII ones (KELVIN SIGN is
/// `k`, LONG S is `s`). Every field name is ASCII, so no other letter matters.
pub fn folded_key(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{212A}' => 'k',
            '\u{17F}' => 's',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Whether two keys name the same field, as [`folded_key`] matches them.
pub fn same_key(a: &str, b: &str) -> bool {
    folded_key(a) == folded_key(b)
}

/// Two keys of one object that name the same field.
#[derive(Debug, PartialEq, Eq)]
pub struct SameField(pub String, pub String);

/// The value of `key` in a network configuration's object, found as the runtime's plugins
/// (Go's decoder) find it: the key as written, else the one key that folds alike
/// ([`folded_key`]). The key as written wins over others that fold alike because the runtime
/// writes `name`, `cniVersion` and `runtimeConfig` so beside whatever spelling the file had;
/// two other spellings and not that one are refused, the order deciding between them in Go
/// being lost here.
pub fn get_any_case<'a>(
    map: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Value>, SameField> {
    if let Some(value) = map.get(key) {
        return Ok(Some(value));
    }
    let mut alike = map.iter().filter(|(k, _)| same_key(k, key));
    match (alike.next(), alike.next()) {
        (Some((a, _)), Some((b, _))) => Err(SameField(a.clone(), b.clone())),
        (found, _) => Ok(found.map(|(_, value)| value)),
    }
}

/// The object with every key folded ([`folded_key`]), recursively. Two keys of one object that
/// fold alike are refused: upstream's decoder takes the later one in the document, an order
/// this parse does not keep, and a node reading another value than a Go node does (another
/// pool name, another range) hands out addresses that node hands out too.
pub fn folded_keys(value: &Value) -> Result<Value, SameField> {
    match value {
        Value::Object(map) => folded_map(map).map(Value::Object),
        Value::Array(items) => items
            .iter()
            .map(folded_keys)
            .collect::<Result<_, _>>()
            .map(Value::Array),
        other => Ok(other.clone()),
    }
}

/// As [`folded_keys`], for an object.
pub fn folded_map(map: &Map<String, Value>) -> Result<Map<String, Value>, SameField> {
    let mut out = Map::new();
    let mut first_of: std::collections::HashMap<String, &str> = Default::default();
    for (key, value) in map {
        let folded = folded_key(key);
        if let Some(earlier) = first_of.insert(folded.clone(), key) {
            return Err(SameField(earlier.to_string(), key.clone()));
        }
        out.insert(folded, folded_keys(value)?);
    }
    Ok(out)
}

/// Whether a value counts as "not set" when merging with the flat file (Go's zero values).
/// A blank string is unset, as [`text`] reads it: were it kept, the flat file's value would
/// not fill it and the field would read as absent, so a network configuration could blank the
/// admin's engine, paths or endpoint.
pub fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_unset),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(_) => false,
    }
}

/// Fills the fields `inline` leaves unset from `file`; the inline value always wins, and
/// `enable_overlapping_ranges` is never taken from the file. Returns the top-level keys it
/// filled, wholly or inside an object both have.
pub fn merge_flat_file(inline: &mut Map<String, Value>, file: &Map<String, Value>) -> Vec<String> {
    let mut filled = Vec::new();
    for (key, file_value) in file {
        if key == "enable_overlapping_ranges" {
            continue;
        }
        match inline.get_mut(key) {
            Some(Value::Object(inner)) if file_value.is_object() => {
                merge_flat_file(inner, file_value.as_object().unwrap_or(&Map::new()));
            }
            Some(existing) if !is_unset(existing) => continue,
            _ => {
                inline.insert(key.clone(), file_value.clone());
            }
        }
        filled.push(key.clone());
    }
    filled
}

/// Decodes field `key` of `map`, naming `path` in the error. The value is shown cut and
/// escaped, and not at all for a secret.
pub fn field<T: DeserializeOwned>(
    map: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<T>, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|err| {
                let msg = if is_secret(key) {
                    format!("invalid {path}: expected a string")
                } else if path.starts_with("flat file") {
                    // The flat file's content is never shown; serde's message quotes it.
                    let expected = err.to_string();
                    let expected = expected.rsplit_once(", expected ").map(|(_, e)| e);
                    format!(
                        "invalid {path}: expected {}",
                        shown(expected.unwrap_or("another value"))
                    )
                } else {
                    format!(
                        "invalid {path}: {}: {}",
                        shown_closed(&value.to_string()),
                        shown_closed(&err.to_string())
                    )
                };
                ConfigError::invalid(msg)
            }),
    }
}

/// [`shown`], with a quote its cut left open closed. A field the flat file filled has its
/// values hidden later by what quotes enclose: an open quote would turn that inside out, and
/// leave serde's own quoted copy of the value outside quotes.
fn shown_closed(text: &str) -> String {
    let mut out = shown(text);
    let (mut quoted, mut escaped) = (false, false);
    for c in out.chars() {
        match (quoted, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, true, _) => escaped = false,
            (_, _, '"') => quoted = !quoted,
            _ => {}
        }
    }
    if escaped {
        out.push('\\');
    }
    if quoted {
        out.push('"');
    }
    out
}

fn is_secret(key: &str) -> bool {
    key.contains("password") || key.contains("username") || key.contains("token")
}

/// A string field; an empty string is treated as absent.
pub fn text(
    map: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<String>, ConfigError> {
    Ok(field::<String>(map, key, path)?.filter(|s| !s.trim().is_empty()))
}
