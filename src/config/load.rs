//! From the `ipam` object (and the flat file) to a validated [`IpamConfig`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::ConfigError;
use super::raw::{field, folded_map, merge_flat_file, text, SameField};
use super::trust::{screen, Screened, Trust, FLAT_FILE_ENV};
use super::{
    Datastore, EtcdConfig, GoPeers, IpamConfig, KubernetesConfig, LogLevel, StaticAddress,
    DEFAULT_KUBECONFIG, DEFAULT_LOCAL_PATH, FLAT_FILE_PATHS, MAX_EXCLUDES, MAX_RANGES, MAX_ROUTES,
    MAX_STATIC_ADDRESSES,
};
use crate::cni::request::kind_of;
use crate::cni::types::{Dns, Route};
use crate::files::{self, shown, shown_path, without_values};
use crate::ipam::addr::parse_ip;
use crate::ipam::slices::parse_slice_size;
use crate::ipam::{parse_exclude, parse_range_text, Cidr, Range, RangeError, RangeSpec};

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::invalid(msg)
}

/// Loads the configuration of a CNI call: the `ipam` object of a network configuration (not
/// trusted, see [`super::trust`]) and the admin's flat file, `$WHEREABOUTS_FLAT_FILE` or the
/// first of the standard places that exists.
pub fn load(ipam: Option<&Value>) -> Result<IpamConfig, ConfigError> {
    load_inner(ipam, &flat_files(), Caller::Network, Narrowing::Refused)
}

/// As [`load`], for the calls that release or look at what is held (DEL, CHECK, GC): a range's
/// `range_start`, `range_end` or `exclude` that [`load`] refuses is left out, with a warning. A
/// pool is its range and network name alone, so nothing they find changes; a configuration Go's
/// plugin accepts (it ignores a start outside the range, checks exclusions only when it
/// allocates) keeps releasing the addresses of its pods here, while its ADDs are refused.
pub fn load_to_release(ipam: Option<&Value>) -> Result<IpamConfig, ConfigError> {
    load_inner(ipam, &flat_files(), Caller::Network, Narrowing::Warned)
}

/// As [`load`], for the operator's commands and the node agent: the engine settings matter,
/// ranges may be absent (the flat file written by the installer names only the engine), and
/// what the operator gives is trusted. The flat file is the one the node's plugin reads, so
/// they reach the store the plugin would use.
pub fn load_for_operator(ipam: Option<&Value>) -> Result<IpamConfig, ConfigError> {
    load_inner(ipam, &flat_files(), Caller::Operator, Narrowing::Refused)
}

/// As [`load_for_operator`] with the flat-file locations given (tests, which must not read the
/// host's).
pub fn load_for_operator_with_flat_files(
    ipam: Option<&Value>,
    flat_files: &[PathBuf],
) -> Result<IpamConfig, ConfigError> {
    load_inner(ipam, flat_files, Caller::Operator, Narrowing::Refused)
}

/// Where the flat file is looked for: `$WHEREABOUTS_FLAT_FILE` alone when set, else the
/// standard places.
fn flat_files() -> Vec<PathBuf> {
    match std::env::var_os(FLAT_FILE_ENV).filter(|v| !v.is_empty()) {
        Some(file) => vec![PathBuf::from(file)],
        None => FLAT_FILE_PATHS.iter().map(PathBuf::from).collect(),
    }
}

/// As [`load`] with the default flat-file locations given and the `ipam` object trusted as
/// the admin's own (tests, and callers holding an admin's configuration).
pub fn load_with_flat_files(
    ipam: Option<&Value>,
    default_flat_files: &[PathBuf],
) -> Result<IpamConfig, ConfigError> {
    load_inner(ipam, default_flat_files, Caller::Admin, Narrowing::Refused)
}

/// As [`load`] with the default flat-file locations given: the `ipam` object is a network
/// configuration's, screened by the flat file's trust rules.
pub fn load_untrusted(
    ipam: Option<&Value>,
    default_flat_files: &[PathBuf],
) -> Result<IpamConfig, ConfigError> {
    load_inner(
        ipam,
        default_flat_files,
        Caller::Network,
        Narrowing::Refused,
    )
}

/// Who hands over the `ipam` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Caller {
    /// A CNI call: a network configuration, perhaps a namespace user's.
    Network,
    /// The admin (trusted, ranges required).
    Admin,
    /// An operator's command or the controller (trusted, ranges optional).
    Operator,
}

/// What a wrong `range_start`, `range_end` or `exclude` of a range does to a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Narrowing {
    /// The load fails: an ADD, which would hand out an address the admin meant to keep.
    Refused,
    /// The range is read without them, with a warning ([`load_to_release`]).
    Warned,
}

pub(super) fn load_inner(
    ipam: Option<&Value>,
    default_flat_files: &[PathBuf],
    caller: Caller,
    narrowing: Narrowing,
) -> Result<IpamConfig, ConfigError> {
    let ipam = ipam.ok_or_else(|| invalid("IPAM config missing 'ipam' key"))?;
    let Value::Object(ipam) = ipam else {
        return Err(invalid(format!(
            "ipam must be an object, got {}",
            kind_of(ipam)
        )));
    };
    let mut map = folded_map(ipam).map_err(|SameField(a, b)| {
        invalid(format!(
            "ipam has both {:?} and {:?}, which name the same field (keys match in any case): keep one",
            shown(&a),
            shown(&b)
        ))
    })?;
    let kind = text(&map, "type", "ipam.type")?.unwrap_or_default();
    if kind != "whereabouts" {
        return Err(invalid(format!(
            "ipam.type is {:?}: this plugin only serves \"whereabouts\"",
            shown(&kind)
        )));
    }
    let configuration_path = text(&map, "configuration_path", "ipam.configuration_path")?;
    let (flat, trust, screened) = if caller == Caller::Network {
        let (flat, trust) = admin_flat_file(configuration_path.as_deref(), default_flat_files)?;
        let mut flat = flat.unwrap_or_default();
        let screened = screen(&mut map, &mut flat, &trust)?;
        (flat, trust, screened)
    } else {
        let flat = match find_flat_file(configuration_path.as_deref(), default_flat_files)? {
            Some(file) => read_flat_file(&file)?,
            None => Map::new(),
        };
        (flat, Trust::operator(), Screened::default())
    };
    let go_peers = go_peers(&flat)?;
    let from_flat = merge_flat_file(&mut map, &flat);
    let mut cfg = resolve(&map, caller == Caller::Operator, narrowing)
        .map_err(|err| values_hidden(err, &from_flat, &flat))?;
    cfg.go_peers = go_peers;
    cfg.trust = trust;
    cfg.warnings.extend(screened.warnings);
    cfg.own_store = screened.own_store;
    if cfg.node_slice_size.is_some() {
        cfg.warnings.extend(slice_keys_from_flat_file(&from_flat));
    }
    Ok(cfg)
}

/// What the node-slice controller reads from a NetworkAttachmentDefinition to make its
/// NodeSlicePool; it reads no flat file (the file is a node's, the controller runs anywhere).
const SLICE_KEYS: [&str; 4] = ["node_slice_size", "network_name", "range", "ipranges"];

/// A warning for each of [`SLICE_KEYS`] the flat file set: the plugin then looks for a slice
/// the controller does not make (another name, another range, or none at all), and its ADDs
/// fail with "assigns no slice"; this says why.
fn slice_keys_from_flat_file(from_flat: &[String]) -> impl Iterator<Item = String> + '_ {
    from_flat
        .iter()
        .filter(|key| SLICE_KEYS.contains(&key.as_str()))
        .map(|key| {
            format!(
                "ipam.{key} comes from the flat file, but the node-slice controller reads only \
                 the NetworkAttachmentDefinition: set it there, or this node looks for a slice \
                 the controller does not make"
            )
        })
}

/// `err`, with its values hidden when it names a field the flat file filled, or shows one of
/// the values it filled in: a network configuration's author reads the errors (the pod's
/// events), and the flat file is the admin's. What is wrong, and where, stays.
fn values_hidden(err: ConfigError, from_flat: &[String], flat: &Map<String, Value>) -> ConfigError {
    let ConfigError::Invalid(msg) = err else {
        return err;
    };
    let mut filled_texts = Vec::new();
    for key in from_flat {
        texts_in(&flat[key], &mut filled_texts);
    }
    // Addresses and ranges are shown as parsed, which need not be as written (`10.77.0.0/16`
    // for `10.77.5.5/16`, `10.0.0.5` for `010.0.0.5`).
    let parsed: Vec<String> = filled_texts.iter().flat_map(|t| as_parsed(t)).collect();
    filled_texts.extend(parsed);
    let shows_a_value = filled_texts
        .iter()
        .any(|t| t.len() >= 3 && msg.contains(t.as_str()));
    let lower = msg.to_lowercase();
    let names = |key: &String| {
        let field = format!("ipam.{key}");
        lower.match_indices(&field).any(|(at, _)| {
            let next = lower[at + field.len()..].chars().next();
            !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    };
    if !shows_a_value && !from_flat.iter().any(names) {
        return ConfigError::Invalid(msg);
    }
    ConfigError::Invalid(format!(
        "{} (a field of this configuration comes from the flat file: values not shown)",
        without_values(&msg)
    ))
}

/// The forms an error may show `text` in once parsed as an address or a range.
fn as_parsed(text: &str) -> Vec<String> {
    if let Some(ip) = parse_ip(text) {
        return vec![ip.to_string()];
    }
    match Cidr::parse(text, false) {
        Some(cidr) => vec![
            cidr.to_string(),
            cidr.network().to_string(),
            cidr.addr.to_string(),
        ],
        None => Vec::new(),
    }
}

/// The strings and numbers in `value`, as text.
fn texts_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Number(number) => out.push(number.to_string()),
        Value::Array(items) => items.iter().for_each(|v| texts_in(v, out)),
        Value::Object(map) => map.values().for_each(|v| texts_in(v, out)),
        Value::Bool(_) | Value::Null => {}
    }
}

/// The admin's flat file and its trust rules, for a network configuration naming
/// `configuration_path`: honoured only inside the folders the default flat file (or the
/// installer's layout) allows.
fn admin_flat_file(
    configuration_path: Option<&str>,
    defaults: &[PathBuf],
) -> Result<(Option<Map<String, Value>>, Trust), ConfigError> {
    let base = match find_flat_file(None, defaults)? {
        Some(file) => Some((file.clone(), read_flat_file(&file)?)),
        None => None,
    };
    let base_trust = match &base {
        Some((_, flat)) => Trust::from_flat_file(flat)?,
        None => Trust::default(),
    };
    // Checked whether it exists or not: the folder also holds the `nodename` file.
    if let Some(named) = configuration_path {
        if !base_trust.allows_installer_file(Path::new(named)) {
            return Err(invalid(format!(
                "ipam.configuration_path {:?} is not allowed in a network configuration: \
                 the flat file must be in the installer's folder or in the default flat file's allow_inline_paths",
                shown(named)
            )));
        }
    }
    let named = match configuration_path {
        Some(named) => find_flat_file(Some(named), &[])?,
        None => None,
    };
    let chosen = match named {
        Some(file) if base.as_ref().is_some_and(|(path, _)| *path == file) => base,
        Some(file) => Some((file.clone(), read_flat_file(&file)?)),
        None => base,
    };
    match chosen {
        Some((_, flat)) => {
            let trust = Trust::from_flat_file(&flat)?;
            Ok((Some(flat), trust))
        }
        None => Ok((None, Trust::default())),
    }
}

/// The first flat file that exists: `configuration_path` (a file, or a folder holding
/// `whereabouts.conf`), then the defaults. None is not an error.
pub fn find_flat_file(
    configuration_path: Option<&str>,
    defaults: &[PathBuf],
) -> Result<Option<PathBuf>, ConfigError> {
    let explicit = configuration_path.map(|p| {
        let path = PathBuf::from(p);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            path.join("whereabouts.conf")
        } else {
            path
        }
    });
    for candidate in explicit.into_iter().chain(defaults.iter().cloned()) {
        match std::fs::symlink_metadata(&candidate) {
            Ok(_) => return Ok(Some(candidate)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(ConfigError::Unreadable {
                    what: format!("cannot look up flat file {}", shown_path(&candidate)),
                    cause: Box::new(err),
                })
            }
        }
    }
    Ok(None)
}

/// Reads the flat file; errors name it and the position, never its content.
fn read_flat_file(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let bytes = files::read_config_file(path).map_err(|err| ConfigError::Unreadable {
        what: "cannot read the flat file".into(),
        cause: Box::new(err),
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => folded_map(&map).map_err(|_| {
            invalid(format!(
                "flat file {} has two keys that name the same field (keys match in any case)",
                shown_path(path)
            ))
        }),
        Ok(other) => Err(invalid(format!(
            "flat file {} must hold a JSON object, not {}",
            shown_path(path),
            kind_of(&other)
        ))),
        Err(err) => Err(invalid(format!(
            "cannot parse flat file {}: invalid JSON at line {} column {}",
            shown_path(path),
            err.line(),
            err.column()
        ))),
    }
}

/// Refuses a list longer than its cap, naming it.
pub(crate) fn at_most(len: usize, max: usize, what: &str) -> Result<(), ConfigError> {
    if len > max {
        return Err(invalid(format!(
            "{what} has {len} entries, more than the {max} allowed"
        )));
    }
    Ok(())
}

fn ip_field(
    map: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<IpAddr>, ConfigError> {
    text(map, key, path)?
        .map(|t| {
            parse_ip(&t).ok_or_else(|| {
                invalid(format!(
                    "invalid {path}: {:?} is not an IP address",
                    shown(&t)
                ))
            })
        })
        .transpose()
}

/// One range entry (the top level or an `ipRanges` item).
fn range_spec(
    map: &Map<String, Value>,
    path: &str,
    narrowing: Narrowing,
    warnings: &mut Vec<String>,
) -> Result<Option<RangeSpec>, ConfigError> {
    let Some(range_text) = text(map, "range", &format!("{path}range"))? else {
        return Ok(None);
    };
    let parsed = parse_range_text(range_text.trim())
        .map_err(|err| invalid(format!("invalid {path}range: {err}")))?;
    match (narrowed(map, path, &range_text, parsed), narrowing) {
        (Ok(spec), _) => Ok(Some(spec)),
        (Err(err), Narrowing::Warned) => {
            warnings.push(format!(
                "{err}: the range is read without its range_start, range_end and exclude"
            ));
            Ok(Some(RangeSpec {
                cidr: parsed.0,
                start: None,
                end: None,
                exclude: Vec::new(),
            }))
        }
        (Err(err), Narrowing::Refused) => Err(err),
    }
}

/// The range `range_text` parsed to `(cidr, dash_start, dash_end)`, narrowed by the entry's
/// `range_start`, `range_end` and `exclude`, and checked to leave an address.
fn narrowed(
    map: &Map<String, Value>,
    path: &str,
    range_text: &str,
    (cidr, dash_start, dash_end): (Cidr, Option<IpAddr>, Option<IpAddr>),
) -> Result<RangeSpec, ConfigError> {
    let start = match dash_start {
        Some(start) => Some(start),
        None => ip_field(map, "range_start", &format!("{path}range_start"))?,
    };
    let end = match dash_end {
        Some(end) => Some(end),
        None => ip_field(map, "range_end", &format!("{path}range_end"))?,
    };
    let exclude_texts: Vec<String> =
        field(map, "exclude", &format!("{path}exclude"))?.unwrap_or_default();
    at_most(exclude_texts.len(), MAX_EXCLUDES, &format!("{path}exclude"))?;
    let mut exclude = Vec::with_capacity(exclude_texts.len());
    for (i, text) in exclude_texts.iter().enumerate() {
        exclude.push(
            parse_exclude(text)
                .map_err(|err| invalid(format!("invalid {path}exclude[{i}]: {err}")))?,
        );
    }
    let spec = RangeSpec {
        cidr,
        start,
        end,
        exclude,
    };
    // Resolving now reports an unusable range, a start outside it or a family mismatch up front.
    let range = Range::resolve(&spec, None).map_err(|err| {
        invalid(format!(
            "invalid {path}range {:?}: {err}",
            shown(range_text)
        ))
    })?;
    if range.capacity() == 0 {
        return Err(invalid(format!(
            "invalid {path}range {:?}: {}",
            shown(range_text),
            RangeError::NothingLeft(spec.cidr)
        )));
    }
    Ok(spec)
}

fn resolve(
    map: &Map<String, Value>,
    operator: bool,
    narrowing: Narrowing,
) -> Result<IpamConfig, ConfigError> {
    let mut warnings = Vec::new();
    let ranges = ranges(map, narrowing, &mut warnings)?;
    let gateway = ip_field(map, "gateway", "ipam.gateway")?;
    let routes = routes(map)?;
    let dns: Option<Dns> = field(map, "dns", "ipam.dns")?;
    let addresses = static_addresses(map)?;
    if !operator && ranges.is_empty() && addresses.is_empty() {
        return Err(invalid(
            "ipam needs a range, ipRanges or addresses: none is set",
        ));
    }
    let log_level = log_level(map, &mut warnings)?;
    let node_slice_size = text(map, "node_slice_size", "ipam.node_slice_size")?
        .map(|s| {
            parse_slice_size(&s)
                .map_err(|err| invalid(format!("invalid ipam.node_slice_size: {err}")))
        })
        .transpose()?;
    for key in [
        "leader_lease_duration",
        "leader_renew_deadline",
        "leader_retry_period",
    ] {
        field::<u64>(map, key, &format!("ipam.{key}"))?;
    }

    Ok(IpamConfig {
        ranges,
        gateway,
        routes,
        dns,
        addresses,
        enable_overlapping_ranges: field(
            map,
            "enable_overlapping_ranges",
            "ipam.enable_overlapping_ranges",
        )?
        .unwrap_or(true),
        network_name: text(map, "network_name", "ipam.network_name")?.unwrap_or_default(),
        configuration_path: text(map, "configuration_path", "ipam.configuration_path")?
            .map(PathBuf::from),
        log_file: text(map, "log_file", "ipam.log_file")?.map(PathBuf::from),
        log_level,
        node_slice_size,
        reconciler_cron_expression: text(
            map,
            "reconciler_cron_expression",
            "ipam.reconciler_cron_expression",
        )?,
        sleep_for_race: field(map, "sleep_for_race", "ipam.sleep_for_race")?.unwrap_or(0),
        datastore: datastore(map, operator)?,
        agent_socket: text(map, "agent_socket", "flat file agent_socket")?.map(PathBuf::from),
        trust: Trust::default(),
        warnings,
        own_store: false,
        go_peers: GoPeers::default(),
    })
}

/// The flat file's `go_whereabouts`: the admin's word on whether Go binaries remain.
fn go_peers(flat: &Map<String, Value>) -> Result<GoPeers, ConfigError> {
    let path = "flat file go_whereabouts";
    match text(flat, "go_whereabouts", path)? {
        None => Ok(GoPeers::Auto),
        Some(named) => GoPeers::parse(&named).ok_or_else(|| {
            invalid(format!(
                "invalid {path}: expected \"auto\", \"present\" or \"absent\""
            ))
        }),
    }
}

/// `range` (with `range_start`, `range_end`, `exclude`) and `ipRanges`, in that order.
fn ranges(
    map: &Map<String, Value>,
    narrowing: Narrowing,
    warnings: &mut Vec<String>,
) -> Result<Vec<RangeSpec>, ConfigError> {
    let mut ranges = Vec::new();
    if let Some(top) = range_spec(map, "ipam.", narrowing, warnings)? {
        ranges.push(top);
    } else {
        // They apply to `range` alone (an ipRanges entry takes its own): the admin's intent,
        // an address kept out, cannot be honoured. Go's plugin ignores them.
        for key in ["range_start", "range_end", "exclude"] {
            if map.get(key).is_some_and(|v| !super::raw::is_unset(v)) {
                let refusal = format!("ipam.{key} is set but ipam.range is not");
                match narrowing {
                    Narrowing::Refused => return Err(invalid(refusal)),
                    Narrowing::Warned => warnings.push(format!("{refusal}: ignored")),
                }
            }
        }
    }
    let ip_ranges: Vec<Value> = field(map, "ipranges", "ipam.ipRanges")?.unwrap_or_default();
    at_most(
        ip_ranges.len() + ranges.len(),
        MAX_RANGES,
        "ipam.range and ipam.ipRanges",
    )?;
    for (i, item) in ip_ranges.iter().enumerate() {
        let path = format!("ipam.ipRanges[{i}].");
        let Value::Object(entry) = item else {
            return Err(invalid(format!(
                "invalid {path}: {} is not an object",
                kind_of(item)
            )));
        };
        let spec = range_spec(entry, &path, narrowing, warnings)?
            .ok_or_else(|| invalid(format!("{path}range is missing")))?;
        if ranges.iter().any(|r: &RangeSpec| r.cidr == spec.cidr) {
            let refusal = format!(
                "invalid {path}range: {} is configured twice (one address is taken per range)",
                spec.cidr
            );
            // One pool either way: what a DEL, CHECK or GC finds does not change.
            match narrowing {
                Narrowing::Refused => return Err(invalid(refusal)),
                Narrowing::Warned => warnings.push(format!("{refusal}: the second is ignored")),
            }
            continue;
        }
        ranges.push(spec);
    }
    Ok(ranges)
}

/// `routes`, each destination a CIDR and each gateway an address.
fn routes(map: &Map<String, Value>) -> Result<Vec<Route>, ConfigError> {
    let routes: Vec<Route> = field(map, "routes", "ipam.routes")?.unwrap_or_default();
    at_most(routes.len(), MAX_ROUTES, "ipam.routes")?;
    for (i, route) in routes.iter().enumerate() {
        if Cidr::parse(&route.dst, false).is_none() {
            return Err(invalid(format!(
                "invalid ipam.routes[{i}].dst: {:?} is not a CIDR",
                shown(&route.dst)
            )));
        }
        if let Some(gw) = &route.gw {
            if parse_ip(gw).is_none() {
                return Err(invalid(format!(
                    "invalid ipam.routes[{i}].gw: {:?} is not an IP address",
                    shown(gw)
                )));
            }
        }
    }
    Ok(routes)
}

/// `addresses`: static addresses with their prefix length and optional gateway.
fn static_addresses(map: &Map<String, Value>) -> Result<Vec<StaticAddress>, ConfigError> {
    let raw_addresses: Vec<Value> = field(map, "addresses", "ipam.addresses")?.unwrap_or_default();
    at_most(raw_addresses.len(), MAX_STATIC_ADDRESSES, "ipam.addresses")?;
    let mut addresses = Vec::new();
    for (i, item) in raw_addresses.iter().enumerate() {
        let path = format!("ipam.addresses[{i}]");
        let Value::Object(entry) = item else {
            return Err(invalid(format!(
                "invalid {path}: {} is not an object",
                kind_of(item)
            )));
        };
        let address = text(entry, "address", &format!("{path}.address"))?
            .ok_or_else(|| invalid(format!("{path}.address is missing")))?;
        let address = Cidr::parse(&address, false).ok_or_else(|| {
            invalid(format!(
                "invalid {path}.address: {:?} is not an address with a prefix length (10.0.0.5/24)",
                shown(&address)
            ))
        })?;
        let gateway = ip_field(entry, "gateway", &format!("{path}.gateway"))?;
        addresses.push(StaticAddress { address, gateway });
    }
    Ok(addresses)
}

/// The log level; one that names none is a warning. Go's plugin ignores a level it does not
/// know (`info`, `warn`), so configurations carry them: refusing one would fail every DEL of the
/// pods they served, and logging never fails a CNI call.
fn log_level(
    map: &Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Result<Option<LogLevel>, ConfigError> {
    let Some(level) = text(map, "log_level", "ipam.log_level")? else {
        return Ok(None);
    };
    let known = match level.to_ascii_lowercase().as_str() {
        "debug" => Some(LogLevel::Debug),
        "verbose" => Some(LogLevel::Verbose),
        "error" => Some(LogLevel::Error),
        "panic" => Some(LogLevel::Panic),
        _ => None,
    };
    if known.is_none() {
        warnings.push(format!(
            "ipam.log_level {:?} is not a level (debug, verbose, error or panic): the default is \
             used",
            shown(&level)
        ));
    }
    Ok(known)
}

/// `operator`: an operator's command or the controller, for which the Kubernetes engine's
/// kubeconfig defaults to [`DEFAULT_KUBECONFIG`] (the node's, as the installer writes it; in a
/// pod without that file the store uses the pod's service account). The plugin must be told.
fn datastore(map: &Map<String, Value>, operator: bool) -> Result<Datastore, ConfigError> {
    let kubeconfig = kubeconfig(map, "ipam.")?;
    let etcd_host = text(map, "etcd_host", "ipam.etcd_host")?;
    let chosen = named_engine(map, "ipam.")?.unwrap_or_else(|| "local".into());
    match chosen.as_str() {
        "local" => Ok(Datastore::Local {
            path: PathBuf::from(
                text(map, "local_path", "ipam.local_path")?
                    .unwrap_or_else(|| DEFAULT_LOCAL_PATH.into()),
            ),
        }),
        "kubernetes" => {
            let kubeconfig = kubeconfig
                .or_else(|| operator.then(|| DEFAULT_KUBECONFIG.to_string()))
                .ok_or_else(|| {
                    invalid("ipam.datastore is \"kubernetes\" but ipam.kubernetes.kubeconfig is not set")
                })?;
            Ok(Datastore::Kubernetes(KubernetesConfig {
                kubeconfig: PathBuf::from(kubeconfig),
                namespace: None,
            }))
        }
        "etcd" => {
            let hosts = etcd_host.ok_or_else(|| {
                invalid("ipam.datastore is \"etcd\" but ipam.etcd_host is not set")
            })?;
            etcd_settings(map, &hosts).map(Datastore::Etcd)
        }
        other => Err(invalid(format!(
            "invalid ipam.datastore: {:?} (expected \"local\", \"kubernetes\" or \"etcd\")",
            shown(other)
        ))),
    }
}

/// The engine a flat file (as read from its JSON, keys in any case) names or implies, as the
/// plugin reads it; `None` when it names none or cannot be read so.
pub fn flat_file_engine(flat: &Map<String, Value>) -> Option<String> {
    let folded = folded_map(flat).ok()?;
    named_engine(&folded, "flat file ").ok().flatten()
}

/// The engine (lower-cased) `map` names in `datastore`, or else implies: a kubeconfig means
/// Kubernetes, an etcd endpoint etcd. None when it says nothing of it (for a whole
/// configuration, the local engine). `prefix` names the map in errors (`ipam.`).
pub(super) fn named_engine(
    map: &Map<String, Value>,
    prefix: &str,
) -> Result<Option<String>, ConfigError> {
    if let Some(named) = text(map, "datastore", &format!("{prefix}datastore"))? {
        return Ok(Some(named.trim().to_ascii_lowercase()));
    }
    if kubeconfig(map, prefix)?.is_some() {
        return Ok(Some("kubernetes".into()));
    }
    let etcd_host = text(map, "etcd_host", &format!("{prefix}etcd_host"))?;
    Ok(etcd_host.map(|_| "etcd".into()))
}

/// `kubernetes.kubeconfig` of `map`.
fn kubeconfig(map: &Map<String, Value>, prefix: &str) -> Result<Option<String>, ConfigError> {
    match map.get("kubernetes") {
        Some(Value::Object(k)) => text(k, "kubeconfig", &format!("{prefix}kubernetes.kubeconfig")),
        Some(Value::Null) | None => Ok(None),
        Some(other) => Err(invalid(format!(
            "invalid {prefix}kubernetes: {} is not an object",
            kind_of(other)
        ))),
    }
}

/// The etcd engine's settings: the endpoints of `hosts` (comma-separated) and its credentials.
fn etcd_settings(map: &Map<String, Value>, hosts: &str) -> Result<EtcdConfig, ConfigError> {
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        return Err(invalid(format!(
            "invalid ipam.etcd_host: {:?} names no endpoint",
            shown(hosts)
        )));
    }
    let path = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
        Ok(text(map, key, &format!("ipam.{key}"))?.map(PathBuf::from))
    };
    let cfg = EtcdConfig {
        endpoints,
        username: text(map, "etcd_username", "ipam.etcd_username")?,
        password: text(map, "etcd_password", "ipam.etcd_password")?,
        cert_file: path("etcd_cert_file")?,
        key_file: path("etcd_key_file")?,
        ca_cert_file: path("etcd_ca_cert_file")?,
    };
    if cfg.cert_file.is_some() != cfg.key_file.is_some() {
        return Err(invalid(
            "ipam.etcd_cert_file and ipam.etcd_key_file must be set together",
        ));
    }
    Ok(cfg)
}
