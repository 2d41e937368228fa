//! A CNI call as the runtime makes it: environment variables and the network configuration on
//! stdin.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::error::{code, CniError};
use crate::store::Hints;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(text: &str) -> Result<Command, CniError> {
        Ok(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!(
                    "unknown CNI_COMMAND {:?} (expected ADD, DEL, CHECK, GC, STATUS or VERSION)",
                    crate::files::shown(other)
                ),
                ))
            }
        })
    }
}

/// `CNI_ARGS`: `K=V;K=V`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs(Vec<(String, String)>);

impl CniArgs {
    pub fn parse(text: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for item in text.split(';').filter(|s| !s.trim().is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!(
                        "invalid CNI_ARGS item {:?}: expected KEY=VALUE",
                        crate::files::shown(item)
                    ),
                )
            })?;
            pairs.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(CniArgs(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// The most the network configuration on stdin may hold. Real configurations are a few KiB;
/// a GC's list of attachments for a full node stays far below this.
pub const MAX_STDIN_BYTES: u64 = 1 << 20;

/// Reads stdin up to [`MAX_STDIN_BYTES`]: more is a decoding error (code 6), not unbounded work.
pub fn read_stdin(mut input: impl Read) -> Result<Vec<u8>, CniError> {
    let mut stdin = Vec::new();
    input
        .by_ref()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|err| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot read the network configuration from stdin: {err}"),
            )
        })?;
    if stdin.len() as u64 > MAX_STDIN_BYTES {
        return Err(CniError::new(
            code::DECODING_FAILURE,
            format!("the network configuration on stdin is larger than {MAX_STDIN_BYTES} bytes"),
        ));
    }
    Ok(stdin)
}

/// The process environment as text. A variable the plugin reads (`CNI_*`, `WHEREABOUTS_*`,
/// `NODENAME`) that is not valid UTF-8 is an error naming it (code 4); any other such variable
/// is none of our business and is left out.
pub fn decode_environment(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<HashMap<String, String>, CniError> {
    let mut out = HashMap::new();
    for (name, value) in vars {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                out.insert(name, value);
            }
            (Ok(name), Err(_)) if is_ours(&name) => {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT,
                    format!("environment variable {name} is not valid UTF-8"),
                ))
            }
            _ => {}
        }
    }
    Ok(out)
}

fn is_ours(name: &str) -> bool {
    name.starts_with("CNI_") || name.starts_with("WHEREABOUTS_") || name == "NODENAME"
}

/// The CNI environment of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: CniArgs,
}

impl CniEnv {
    /// Reads the environment; `vars` is the process environment in production.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<CniEnv, CniError> {
        let get = |k: &str| {
            vars.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let command = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set"))?;
        Ok(CniEnv {
            command: Command::parse(&command)?,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?,
        })
    }

    /// Refuses a container ID or interface name that the CNI specification does not allow for a
    /// new attachment (code 4, naming the variable, never showing its value). The interface
    /// name is chosen by whoever writes the pod's network selection, so it is untrusted; runtimes
    /// built on libcni check both before they call a plugin, so a runtime's real call never fails
    /// here. Only ADD checks: what was attached before must stay removable.
    pub fn check_new_attachment(container_id: &str, ifname: &str) -> Result<(), CniError> {
        let invalid = |name: &str, rule: &str| {
            Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("{name} is not valid: {rule}"),
            ))
        };
        if !valid_container_id(container_id) {
            return invalid(
                "CNI_CONTAINERID",
                "it must start with a letter or digit followed by letters, digits, '_', '.' or '-'",
            );
        }
        if !valid_ifname(ifname) {
            return invalid(
                "CNI_IFNAME",
                "an interface name is 1 to 15 bytes, not \".\" or \"..\", without '/', ':', \
                 whitespace or control characters",
            );
        }
        Ok(())
    }

    /// The variable a command needs, or a code 4 error naming it.
    pub fn require<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        value.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("required environment variable {name} is not set"),
            )
        })
    }
}

/// A container ID as the CNI specification defines it.
fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An interface name Linux accepts (shorter than `IFNAMSIZ`), as libcni checks it, and without
/// control characters, which would reach logs and the operator's tables.
fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| matches!(c, '/' | ':') || c.is_whitespace() || c.is_control())
}

/// The network configuration on stdin, as far as an IPAM plugin reads it.
#[derive(Clone, Debug, Default)]
pub struct NetConf {
    pub cni_version: Option<String>,
    pub cni_versions: Vec<String>,
    pub name: String,
    pub ipam: Option<Value>,
    /// Static addresses from `runtimeConfig.ips` (Multus passes the pod's `ips` only when the
    /// network configuration declares the capability).
    pub requested_ips: Vec<String>,
    /// Static addresses from `args.cni.ips` (Multus passes the pod's `cni-args` there, whatever
    /// the network configuration says).
    pub arg_ips: Vec<String>,
    /// Why `requested_ips` or `arg_ips` could not be read (both then empty): an error of the
    /// ADD that uses them only. A DEL must still release what the pod holds, whatever its own
    /// `cni-args` (which Multus passes on unchecked) say.
    pub static_ips_error: Option<CniError>,
    /// `cni.dev/valid-attachments` (or the older `cni.dev/attachments`) of a GC.
    pub valid_attachments: Option<Vec<(String, String)>>,
    /// The addresses of `prevResult` (CNI 0.3.0 and later), which runtimes pass on DEL: at
    /// most [`Hints::MAX_IPS`], and none when it does not read as a result. Only a hint
    /// ([`Hints`]): a malformed one never fails the call.
    pub prev_ips: Vec<IpAddr>,
}

/// A GC's `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), as (container ID,
/// interface name) pairs.
fn valid_attachments(map: &Map<String, Value>) -> Result<Option<Vec<(String, String)>>, CniError> {
    let attachments = map
        .get("cni.dev/valid-attachments")
        .or_else(|| map.get("cni.dev/attachments"));
    let items = match attachments {
        None => return Ok(None),
        // What a runtime writing Go sends for no attachment at all (a nil list): none valid.
        Some(Value::Null) => return Ok(Some(Vec::new())),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(decode_error(format!(
                "cni.dev/valid-attachments must be a list, got {}",
                kind_of(other)
            )))
        }
    };
    let pair = |item: &Value| {
        let field = |k: &str| item.get(k).and_then(Value::as_str).map(String::from);
        match (field("containerID"), field("ifname")) {
            (Some(c), Some(i)) => Ok((c, i)),
            _ => Err(decode_error(format!(
                "cni.dev/valid-attachments entry {} needs containerID and ifname",
                crate::files::shown(&item.to_string())
            ))),
        }
    };
    items.iter().map(pair).collect::<Result<_, _>>().map(Some)
}

/// The addresses listed in a `prevResult` (`ips[].address`, `ip/prefix`).
fn prev_result_ips(prev: Option<&Value>) -> Vec<IpAddr> {
    let Some(Value::Array(ips)) = prev.and_then(|p| p.get("ips")) else {
        return Vec::new();
    };
    ips.iter()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|address| address.split('/').next()?.parse().ok())
        .take(Hints::MAX_IPS)
        .collect()
}

/// A key of the network configuration, matched in any case as the runtime's plugins match it
/// ([`crate::config::get_any_case`]).
fn any_case<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Value>, CniError> {
    crate::config::get_any_case(map, key).map_err(|crate::config::SameField(a, b)| {
        decode_error(format!(
            "the network configuration has both {:?} and {:?}, which name {key} (keys match in \
             any case): keep one",
            crate::files::shown(&a),
            crate::files::shown(&b)
        ))
    })
}

/// The value at `path` through nested objects, each key matched in any case; none when a
/// step is missing or not an object.
fn nested<'a>(map: &'a Map<String, Value>, path: &[&str]) -> Result<Option<&'a Value>, CniError> {
    let mut object = map;
    let mut found = None;
    for (i, key) in path.iter().enumerate() {
        found = any_case(object, key)?;
        match found {
            Some(Value::Object(inner)) => object = inner,
            Some(_) if i + 1 == path.len() => {}
            _ => return Ok(None),
        }
    }
    Ok(found)
}

/// The JSON type of a value, for messages that must not show it.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn decode_error(err: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::DECODING_FAILURE,
        format!("cannot decode the network configuration: {err}"),
    )
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(decode_error)?;
        let Value::Object(map) = &value else {
            return Err(decode_error(format!(
                "expected a JSON object, got {}",
                kind_of(&value)
            )));
        };
        let get = |key: &str| any_case(map, key);
        let string = |key: &str| -> Result<Option<String>, CniError> {
            match get(key)? {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(decode_error(format!(
                    "{key} must be a string, got {}",
                    kind_of(other)
                ))),
            }
        };
        let strings = |v: Option<&Value>, what: &str| -> Result<Vec<String>, CniError> {
            match v {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| decode_error(format!("{what} must be a list of strings: {e}"))),
            }
        };
        let requested = nested(map, &["runtimeConfig", "ips"])
            .and_then(|ips| strings(ips, "runtimeConfig.ips"));
        let args =
            nested(map, &["args", "cni", "ips"]).and_then(|ips| strings(ips, "args.cni.ips"));
        let (requested_ips, arg_ips, static_ips_error) = match (requested, args) {
            (Ok(requested), Ok(args)) => (requested, args, None),
            (Err(err), _) | (_, Err(err)) => (Vec::new(), Vec::new(), Some(err)),
        };
        Ok(NetConf {
            cni_version: string("cniVersion")?,
            cni_versions: strings(get("cniVersions")?, "cniVersions")?,
            name: string("name")?.unwrap_or_default(),
            ipam: get("ipam")?.filter(|v| !v.is_null()).cloned(),
            requested_ips,
            arg_ips,
            static_ips_error,
            valid_attachments: valid_attachments(map)?,
            prev_ips: prev_result_ips(map.get("prevResult")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_attachment_takes_only_names_the_specification_allows() {
        let check = |id: &str, ifname: &str| CniEnv::check_new_attachment(id, ifname);
        for (id, ifname) in [
            ("c1", "eth0"),
            ("0f3a9b_x.y-z", "net1"),
            ("a", "fifteen-bytes.x"),
            ("k", "eth0.100"),
        ] {
            assert!(check(id, ifname).is_ok(), "{id} {ifname}");
        }
        for id in ["-c", "_c", ".c", "c/1", "c 1", "c\n1", "c:1", "cé", "c%2F"] {
            let err = check(id, "eth0").unwrap_err();
            assert_eq!(err.code, 4, "{id:?}");
            assert!(err.msg.contains("CNI_CONTAINERID"), "{err:?}");
            assert!(!err.msg.contains(id), "the value is shown: {err:?}");
        }
        let long = "sixteen-bytes-xy";
        for ifname in [
            long, ".", "..", "a/b", "a:b", "a b", "a\tb", "a\u{85}b", "a\u{1b}b",
        ] {
            let err = check("c1", ifname).unwrap_err();
            assert_eq!(err.code, 4, "{ifname:?}");
            assert!(err.msg.contains("CNI_IFNAME"), "{err:?}");
            let shown = ifname.len() > 2 && err.msg.contains(ifname);
            assert!(!shown, "the value is shown: {err:?}");
        }
    }

    #[test]
    fn cni_args() {
        let args =
            CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;IP=").unwrap();
        assert_eq!(args.get("K8S_POD_NAME"), Some("p"));
        assert_eq!(args.get("IP"), None);
        assert_eq!(CniArgs::parse("garbage").unwrap_err().code, 4);
    }

    #[test]
    fn netconf() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","runtimeConfig":{"ips":["10.0.0.5/24"]},
                "cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.requested_ips, ["10.0.0.5/24"]);
        assert_eq!(
            conf.valid_attachments.unwrap(),
            [("c".to_string(), "eth0".to_string())]
        );
        assert!(conf.ipam.is_none());
        assert!(conf.prev_ips.is_empty());
        assert_eq!(NetConf::parse(b"{ asdf }").unwrap_err().code, 6);
    }

    #[test]
    fn the_network_configurations_keys_match_in_any_case_as_the_runtimes_plugins_read_them() {
        let conf = NetConf::parse(
            br#"{"CNIVersion":"1.0.0","Name":"n","IPAM":{"type":"whereabouts"},
                "RuntimeConfig":{"IPs":["10.0.0.5/24"]},"ARGS":{"Cni":{"ips":["10.0.0.6"]}}}"#,
        )
        .unwrap();
        assert_eq!(conf.cni_version.as_deref(), Some("1.0.0"));
        assert_eq!(conf.name, "n");
        assert_eq!(conf.ipam, Some(serde_json::json!({"type": "whereabouts"})));
        assert_eq!(conf.requested_ips, ["10.0.0.5/24"]);
        assert_eq!(conf.arg_ips, ["10.0.0.6"]);

        // The runtime writes `name` and `cniVersion` beside the file's spelling: its key wins.
        let conf = NetConf::parse(
            br#"{"Name":"file","name":"runtime","ipam":{"range":"a"},"Ipam":{"range":"b"}}"#,
        )
        .unwrap();
        assert_eq!(conf.name, "runtime");
        assert_eq!(conf.ipam, Some(serde_json::json!({"range": "a"})));

        // Two spellings and not the one as written: which one Go reads depends on an order
        // the parse does not keep.
        let err = NetConf::parse(br#"{"IPAM":{"range":"a"},"Ipam":{"range":"b"}}"#).unwrap_err();
        assert_eq!(err.code, 6);
        assert!(
            err.msg.contains("\"IPAM\"") && err.msg.contains("\"Ipam\""),
            "{err:?}"
        );
        assert!(!err.msg.contains("range"), "a value is shown: {err:?}");
        // ... and in a static address's path, only an ADD that uses them fails.
        let conf = NetConf::parse(br#"{"args":{"cni":{"IPS":["10.0.0.6"],"Ips":[]}}}"#).unwrap();
        assert_eq!(conf.static_ips_error.map(|e| e.code), Some(6));
        assert!(conf.arg_ips.is_empty());
    }

    #[test]
    fn prev_result_addresses_are_a_hint_that_never_fails() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"cniVersion":"1.0.0",
                "interfaces":[{"name":"eth0"}],
                "ips":[{"address":"10.0.0.5/24","gateway":"10.0.0.1"},{"address":"fd00::5/64"},
                       {"address":"garbage"},{"gateway":"10.0.0.1"},7]}}"#,
        )
        .unwrap();
        let want: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        assert_eq!(conf.prev_ips, want);
        for odd in [
            r#"{"name":"n","prevResult":"x"}"#,
            r#"{"name":"n","prevResult":{"ips":{"address":"10.0.0.5/24"}}}"#,
            r#"{"name":"n","prevResult":{"ip4":{"ip":"10.0.0.5/24"}}}"#,
        ] {
            assert!(
                NetConf::parse(odd.as_bytes()).unwrap().prev_ips.is_empty(),
                "{odd}"
            );
        }
        let many: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"address":"10.0.0.{i}/24"}}"#))
            .collect();
        let conf = format!(
            r#"{{"name":"n","prevResult":{{"ips":[{}]}}}}"#,
            many.join(",")
        );
        let conf = NetConf::parse(conf.as_bytes()).unwrap();
        assert_eq!(conf.prev_ips.len(), Hints::MAX_IPS);
    }
}
