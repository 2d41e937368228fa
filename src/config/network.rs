//! A network configuration file as the runtime and its plugins read it (a NetworkAttachmentDefinition's
//! `spec.config`, a file given to the operator's commands): where its whereabouts `ipam` object
//! and its name are. `ipam` is matched as Go's decoder matches it ([`get_any_case`]); `name`
//! and `plugins` as written, as Multus and the runtime's library read them.

use serde_json::Value;

use super::raw::{get_any_case, same_key, SameField};

/// The `ipam` object of a configuration file: a network configuration, a configuration list
/// (its first plugin using whereabouts) or a bare `ipam` object. A key spelled twice in
/// different case reads as missing; the plugin refuses such a configuration.
pub fn ipam_of(file: &Value) -> Option<Value> {
    if names_whereabouts(file) {
        return Some(file.clone());
    }
    if let Some(ipam) = ipam_in(file) {
        return Some(ipam.clone());
    }
    file.get("plugins")?
        .as_array()?
        .iter()
        .filter_map(ipam_in)
        .find(|ipam| names_whereabouts(ipam))
        .cloned()
}

/// A configuration's `ipam` key, in any case.
fn ipam_in(conf: &Value) -> Option<&Value> {
    get_any_case(conf.as_object()?, "ipam").ok().flatten()
}

/// Whether the `ipam` object's `type` is this plugin, its key matched in any case: the
/// runtime's plugins (Go's decoder) call the IPAM plugin so, and the plugin reads its keys so.
pub fn names_whereabouts(ipam: &Value) -> bool {
    ipam.as_object().is_some_and(|fields| {
        fields
            .iter()
            .any(|(key, value)| same_key(key, "type") && value.as_str() == Some("whereabouts"))
    })
}

/// The network's name as its plugins receive it: `name` as written. Multus reads that key
/// alone, and gives a configuration without it (or with an empty one) its
/// NetworkAttachmentDefinition's name, `nad_name`, which the runtime then passes on as `name`
/// beside any other spelling. Another spelling beside `name` is refused: the runtime's decoder
/// takes the later one in the document, an order not kept here.
pub fn network_name_of<'a>(file: &'a Value, nad_name: &'a str) -> Result<&'a str, SameField> {
    let map = file.as_object();
    let name = map.and_then(|m| m.get("name"));
    if let Some((other, _)) = map
        .into_iter()
        .flatten()
        .find(|(k, _)| name.is_some() && *k != "name" && same_key(k, "name"))
    {
        return Err(SameField("name".into(), other.clone()));
    }
    let named = name.and_then(Value::as_str).filter(|n| !n.is_empty());
    Ok(named.unwrap_or(nad_name))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_ipam_object_and_name_are_found_in_any_case_as_the_runtime_finds_them() {
        let ipam = json!({"Type": "whereabouts", "range": "10.0.0.0/24"});
        let single = json!({"Name": "net", "type": "macvlan", "IPAM": ipam});
        assert_eq!(ipam_of(&single), Some(ipam.clone()));
        // Multus reads `name` as written, and gives a configuration without it the
        // NetworkAttachmentDefinition's name (which the caller supplies).
        assert_eq!(network_name_of(&single, "nad"), Ok("nad"));
        assert_eq!(network_name_of(&json!({"name": ""}), "nad"), Ok("nad"));
        assert_eq!(network_name_of(&json!({"name": "net"}), "nad"), Ok("net"));
        assert!(network_name_of(&json!({"name": "a", "Name": "b"}), "nad").is_err());
        let list = json!({"name": "list", "plugins": [
            {"type": "macvlan", "Ipam": {"type": "host-local"}},
            {"type": "ipvlan", "ipam": ipam},
        ]});
        assert_eq!(ipam_of(&list), Some(ipam.clone()));
        assert_eq!(network_name_of(&list, "nad"), Ok("list"));
        assert_eq!(ipam_of(&ipam), Some(ipam.clone()), "a bare ipam object");
        // Two spellings: the plugin refuses it, so no pool of it is described.
        let twice = json!({"IPAM": ipam, "Ipam": ipam});
        assert_eq!(ipam_of(&twice), None);
        assert!(!names_whereabouts(&json!({"type": "host-local"})));
        assert!(!names_whereabouts(&json!("whereabouts")));
    }
}
