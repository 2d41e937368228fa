//! Structural-schema validation and pruning after a CRD's openAPIV3Schema, the subset the
//! upstream CRDs use: type, properties, required, additionalProperties, items.

use serde_json::{Map, Value};

/// Validates `value` against `schema`, dropping fields the schema does not know (as the API
/// server prunes them). Errors name the field, like the API server's messages.
pub fn validate_and_prune(value: &mut Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    let kind = schema.get("type").and_then(Value::as_str);
    match (kind, &mut *value) {
        (Some("object"), Value::Object(map)) => object(map, schema, path, errors),
        (Some("object"), _) => {
            errors.push(format!("{path}: Invalid value: must be of type object"))
        }
        (Some("string"), Value::String(_)) => {}
        (Some("string"), _) => {
            errors.push(format!("{path}: Invalid value: must be of type string"))
        }
        (Some("array"), Value::Array(items)) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    validate_and_prune(item, item_schema, &format!("{path}[{i}]"), errors);
                }
            }
        }
        (Some("array"), _) => errors.push(format!("{path}: Invalid value: must be of type array")),
        (Some("integer"), v) if v.is_i64() || v.is_u64() => {}
        (Some("integer"), _) => {
            errors.push(format!("{path}: Invalid value: must be of type integer"))
        }
        (Some("boolean"), Value::Bool(_)) => {}
        (Some("boolean"), _) => {
            errors.push(format!("{path}: Invalid value: must be of type boolean"))
        }
        _ => {}
    }
}

fn object(map: &mut Map<String, Value>, schema: &Value, path: &str, errors: &mut Vec<String>) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    // `metadata` is declared as a bare object: the server keeps it as ObjectMeta.
    if properties.is_none() && additional.is_none() {
        check_required(map, schema, path, errors);
        return;
    }
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let child_path = format!("{path}.{key}");
        let child_schema = properties.and_then(|p| p.get(&key)).or(additional);
        match child_schema {
            Some(s) => {
                if let Some(child) = map.get_mut(&key) {
                    // null is dropped like an absent field for non-nullable fields
                    if child.is_null() {
                        map.remove(&key);
                        continue;
                    }
                    validate_and_prune(child, s, &child_path, errors);
                }
            }
            None => {
                map.remove(&key);
            }
        }
    }
    check_required(map, schema, path, errors);
}

fn check_required(map: &Map<String, Value>, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(field) {
                errors.push(format!("{path}.{field}: Required value"));
            }
        }
    }
}
