//! A network configuration file as the runtime and its plugins read it (a NetworkAttachmentDefinition's
//! `spec.config`, a file given to the operator's commands): where its whereabouts `ipam` object
//! and its name are. Keys are matched as Go's decoder matches them ([`get_any_case`]), except
//! a configuration list's own keys, which the runtime's library reads as written.

use serde_json::Value;

use super::raw::{get_any_case, same_key};

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

/// The network's name as its plugins receive it: a configuration list's `name` as written, a
/// single configuration's in any case (the runtime passes on the name it decoded so).
pub fn network_name_of(file: &Value) -> Option<&str> {
    let map = file.as_object()?;
    let name = if map.contains_key("plugins") {
        map.get("name")
    } else {
        get_any_case(map, "name").ok().flatten()
    };
    name.and_then(Value::as_str)
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
        assert_eq!(network_name_of(&single), Some("net"));
        let list = json!({"name": "list", "plugins": [
            {"type": "macvlan", "Ipam": {"type": "host-local"}},
            {"type": "ipvlan", "ipam": ipam},
        ]});
        assert_eq!(ipam_of(&list), Some(ipam.clone()));
        assert_eq!(network_name_of(&list), Some("list"));
        assert_eq!(ipam_of(&ipam), Some(ipam.clone()), "a bare ipam object");
        // The library reads a list's name as written.
        assert_eq!(network_name_of(&json!({"Name": "x", "plugins": []})), None);
        // Two spellings: the plugin refuses it, so no pool of it is described.
        let twice = json!({"IPAM": ipam, "Ipam": ipam});
        assert_eq!(ipam_of(&twice), None);
        assert!(!names_whereabouts(&json!({"type": "host-local"})));
        assert!(!names_whereabouts(&json!("whereabouts")));
    }
}
