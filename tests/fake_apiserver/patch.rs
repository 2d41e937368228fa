//! RFC 6902 JSON patch, as the API server applies `application/json-patch+json`.

use serde_json::Value;

/// Why a patch could not be applied; `test` failures are told apart because the API server
/// answers them like every other patch failure (422) but tests want to see them.
#[derive(Debug)]
pub enum PatchError {
    TestFailed(String),
    Invalid(String),
}

fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

fn split(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Invalid(format!("path {path:?} does not start with /")))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn get<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in path {
        cur = match cur {
            Value::Object(map) => map.get(seg)?,
            Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn parent_mut<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for seg in &path[..path.len() - 1] {
        cur = match cur {
            Value::Object(map) => map
                .get_mut(seg)
                .ok_or_else(|| PatchError::Invalid(format!("missing path segment {seg:?}")))?,
            Value::Array(items) => {
                let idx = seg
                    .parse::<usize>()
                    .map_err(|_| PatchError::Invalid(format!("bad index {seg:?}")))?;
                items
                    .get_mut(idx)
                    .ok_or_else(|| PatchError::Invalid(format!("index {idx} out of range")))?
            }
            _ => return Err(PatchError::Invalid(format!("cannot descend into {seg:?}"))),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &[String], value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let last = &path[path.len() - 1];
    match parent_mut(doc, path)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            if last == "-" {
                items.push(value);
                return Ok(());
            }
            let idx = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i <= items.len())
                .ok_or_else(|| PatchError::Invalid(format!("bad index {last:?}")))?;
            items.insert(idx, value);
            Ok(())
        }
        _ => Err(PatchError::Invalid(format!("cannot add at {last:?}"))),
    }
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, PatchError> {
    let last = path
        .last()
        .ok_or_else(|| PatchError::Invalid("cannot remove the whole document".into()))?;
    match parent_mut(doc, path)? {
        Value::Object(map) => map
            .remove(last)
            .ok_or_else(|| PatchError::Invalid(format!("remove: no member {last:?}"))),
        Value::Array(items) => {
            let idx = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < items.len())
                .ok_or_else(|| PatchError::Invalid(format!("bad index {last:?}")))?;
            Ok(items.remove(idx))
        }
        _ => Err(PatchError::Invalid(format!("cannot remove {last:?}"))),
    }
}

pub fn apply(doc: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| PatchError::Invalid("a JSON patch must be an array".into()))?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path =
            split(op.get("path").and_then(Value::as_str).ok_or_else(|| {
                PatchError::Invalid("every patch operation needs a path".into())
            })?)?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Invalid(format!("{kind} needs a value")))
        };
        match kind {
            "test" => {
                let want = value()?;
                let found = get(doc, &path);
                // As the API server's JSON patch does: a test of null passes on a member
                // missing from an object that exists.
                let absent = found.is_none()
                    && path
                        .split_last()
                        .is_some_and(|(_, parent)| get(doc, parent).is_some_and(Value::is_object));
                if found != Some(&want) && !(want.is_null() && absent) {
                    return Err(PatchError::TestFailed(format!(
                        "testing value {:?} failed",
                        op.get("path")
                    )));
                }
            }
            "add" => add(doc, &path, value()?)?,
            "remove" => {
                remove(doc, &path)?;
            }
            "replace" => {
                remove(doc, &path)?;
                add(doc, &path, value()?)?;
            }
            "move" | "copy" => {
                let from = split(op.get("from").and_then(Value::as_str).unwrap_or_default())?;
                let moved = if kind == "move" {
                    remove(doc, &from)?
                } else {
                    get(doc, &from)
                        .cloned()
                        .ok_or_else(|| PatchError::Invalid("copy: no source".into()))?
                };
                add(doc, &path, moved)?;
            }
            other => return Err(PatchError::Invalid(format!("unknown op {other:?}"))),
        }
    }
    Ok(())
}
