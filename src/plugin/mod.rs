//! The plugin: one CNI call, from environment and stdin to the JSON on stdout and an exit code.

mod agent;
mod pools;

use std::collections::HashMap;
use std::io::Write;

use serde_json::Value;

use crate::cni::error::{code, CniError};
use crate::cni::request::{self, CniEnv, Command, NetConf};
use crate::cni::result::{IpConfig, IpamResult};
use crate::cni::version::{self, at_least, LATEST, SUPPORTED};
use crate::config::{self, IpamConfig};
use crate::ipam::addr::parse_ip;
use crate::ipam::Cidr;
use crate::store::{
    self, AddRequest, Attachment, AttachmentRequest, GcRequest, Hints, Opener, StoreError,
};

pub use pools::{held_pools, parse_requested, place_statics, pools, Requested};

/// What the process prints on stdout and the code it exits with.
pub struct Outcome {
    pub stdout: Option<Value>,
    pub exit_code: i32,
}

impl Outcome {
    /// Prints the answer on stdout (a runtime that went away does not make it fail) and gives
    /// the process's exit code.
    pub fn finish(self) -> std::process::ExitCode {
        if let Some(json) = self.stdout {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{json}");
            let _ = out.flush();
        }
        std::process::ExitCode::from(self.exit_code as u8)
    }
}

/// The "about" text printed on stderr when the binary runs without CNI_COMMAND.
pub fn about() -> String {
    format!(
        "CNI whereabouts plugin v{} (cluster-wide IPAM); CNI protocol versions supported: {}",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED.join(", ")
    )
}

/// Runs one CNI call from the process's environment and stdin, as `main` does; work that no
/// agent takes goes to the engine `open` opens ([`store::open`] in the full binary).
pub fn run_process(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    stdin: impl std::io::Read,
    open: Opener,
) -> Outcome {
    let input = request::decode_environment(vars)
        .and_then(|vars| request::read_stdin(stdin).map(|stdin| (vars, stdin)));
    match input {
        Ok((vars, stdin)) => run(&vars, &stdin, open),
        Err(err) => Outcome {
            stdout: Some(err.to_json(LATEST)),
            exit_code: 1,
        },
    }
}

/// Runs one CNI call, work no agent takes on the engine `open` opens. Never panics on input:
/// every failure becomes CNI error JSON.
pub fn run(vars: &HashMap<String, String>, stdin: &[u8], open: Opener) -> Outcome {
    // The version errors are reported in: the request's own, once known.
    let mut reply_version = LATEST.to_string();
    // A panic is a defect; the runtime still gets an error it can read, not an empty stdout.
    // Whatever a panicking call had begun is undone as it unwinds (a store transaction rolls
    // back when dropped).
    let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        call(vars, stdin, open, &mut reply_version)
    }));
    let result = called.unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        // The panic's text may quote anything the plugin held: the log's, not the runtime's.
        let mut err = CniError::new(
            code::INTERNAL,
            "internal error, a defect of the plugin (its message is in the node's whereabouts log)",
        );
        err.logged = Some(format!("internal error, a defect of the plugin: {what}"));
        Err(err)
    });
    match result {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(err) => {
            tracing::error!(code = err.code, "{}", err.for_the_log());
            Outcome {
                stdout: Some(err.to_json(&reply_version)),
                exit_code: 1,
            }
        }
    }
}

fn call(
    vars: &HashMap<String, String>,
    stdin: &[u8],
    open: Opener,
    reply_version: &mut String,
) -> Result<Option<Value>, CniError> {
    let env = CniEnv::from_vars(vars)?;
    if env.command == Command::Version {
        return Ok(Some(version_reply(stdin, reply_version)));
    }
    let conf = NetConf::parse(stdin)?;
    if let Some(v) = conf
        .cni_version
        .as_deref()
        .filter(|v| version::is_supported(v))
    {
        *reply_version = v.to_string();
    }
    let version = version::negotiate(conf.cni_version.as_deref(), &conf.cni_versions)?;
    *reply_version = version.clone();
    // The verbs came with these versions; a configuration older than its verb is refused,
    // as the spec's library does.
    let needs = match env.command {
        Command::Gc | Command::Status => Some("1.1.0"),
        Command::Check => Some("0.4.0"),
        _ => None,
    };
    if let Some(needs) = needs.filter(|n| !at_least(&version, n)) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{:?} needs cniVersion {needs} or later, the configuration has {version}",
                env.command
            ),
        ));
    }
    let loaded = match env.command {
        Command::Del | Command::Check | Command::Gc => config::load_to_release(conf.ipam.as_ref()),
        _ => config::load(conf.ipam.as_ref()),
    };
    let cfg = match loaded {
        Ok(cfg) => cfg,
        // STATUS answers whether ADDs can be served: a configuration they would refuse says no.
        Err(err) if env.command == Command::Status => return Err(not_available(err.into())),
        Err(err) => return Err(err.into()),
    };
    crate::logging::init(cfg.log_file.as_deref(), cfg.log_level);
    for warning in &cfg.warnings {
        tracing::warn!("{warning}");
    }
    tracing::debug!(command = ?env.command, container = ?env.container_id, ifname = ?env.ifname, "CNI call");
    let done = match env.command {
        Command::Add => add(&env, &conf, &cfg, &version, open).map(Some),
        Command::Del => del(&env, &conf, &cfg, open).map(|_| None),
        Command::Check => check(&env, &conf, &cfg, open).map(|_| None),
        Command::Gc => gc(&conf, &cfg, open).map(|_| None),
        Command::Status => status(&cfg, open).map(|_| None),
        Command::Version => unreachable!("answered above"),
    };
    done.map_err(|err| err.hiding(&cfg.admin_values()))
}

fn version_reply(stdin: &[u8], reply_version: &mut String) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            // As the other commands read it (the runtime's decoder matches keys in any case);
            // two other spellings answer with the latest version, as a missing one does.
            let conf = v.as_object()?;
            let asked = config::get_any_case(conf, "cniVersion").ok().flatten()?;
            asked.as_str().map(String::from)
        })
        .filter(|v| version::is_supported(v))
        .unwrap_or_else(|| LATEST.to_string());
    *reply_version = asked.clone();
    serde_json::json!({ "cniVersion": asked, "supportedVersions": SUPPORTED })
}

/// This node's name, where it can be told. Only engines shared by many nodes need it; the
/// local store is one machine's, so its ADDs skip the lookup (file reads on the hot path).
fn this_node(cfg: &IpamConfig) -> Option<String> {
    if matches!(cfg.datastore, config::Datastore::Local { .. }) {
        return None;
    }
    store::node::node_name(cfg.configuration_path.as_deref()).ok()
}

fn attachment(env: &CniEnv) -> Result<Attachment, CniError> {
    let args = &env.args;
    // A pod name without its namespace names no pod: taken for `default`'s, cleanup would judge
    // the address by a pod that may not exist, and free it. Nor do parts holding the separator
    // (no Kubernetes name does): `a/b` with `c` and `a` with `b/c` would be one pod, and the
    // second would take the first one's address over.
    let pod_ref = match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
        (Some(ns), Some(name)) if !ns.contains('/') && !name.contains('/') => {
            Some(format!("{ns}/{name}"))
        }
        _ => None,
    };
    Ok(Attachment {
        container_id: CniEnv::require(&env.container_id, "CNI_CONTAINERID")?.to_string(),
        ifname: CniEnv::require(&env.ifname, "CNI_IFNAME")?.to_string(),
        pod_ref,
        pod_uid: args.get("K8S_POD_UID").map(String::from),
    })
}

/// Static addresses of the call: `addresses`, CNI_ARGS `IP=` and `runtimeConfig.ips`.
fn statics(env: &CniEnv, conf: &NetConf, cfg: &IpamConfig) -> Result<Vec<Requested>, CniError> {
    if let Some(err) = &conf.static_ips_error {
        return Err(err.clone());
    }
    let mut out: Vec<Requested> = cfg
        .addresses
        .iter()
        .map(|s| Requested {
            ip: s.address.addr,
            prefix: Some(s.address.prefix),
            gateway: s.gateway,
            pods_own: false,
        })
        .collect();
    let arg_gateway = match env.args.get("GATEWAY") {
        Some(text) => Some(parse_ip(text).ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "invalid CNI_ARGS GATEWAY: {:?} is not an IP address",
                    crate::files::shown(text)
                ),
            )
        })?),
        None => None,
    };
    for text in env
        .args
        .get("IP")
        .map(|v| v.split(',').collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let (ip, prefix) = parse_requested(text, "CNI_ARGS IP")?;
        out.push(Requested {
            ip,
            prefix,
            gateway: arg_gateway,
            pods_own: false,
        });
    }
    let asked = [
        (&conf.requested_ips, "runtimeConfig.ips", false),
        (&conf.arg_ips, "args.cni.ips", true),
    ];
    for (texts, field, pods_own) in asked {
        for text in texts {
            let (ip, prefix) = parse_requested(text, field)?;
            out.push(Requested {
                ip,
                prefix,
                gateway: None,
                pods_own,
            });
        }
    }
    if out.len() > config::MAX_STATIC_ADDRESSES {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "{} static addresses requested (addresses, CNI_ARGS IP, runtimeConfig.ips), more than the {} allowed",
                out.len(),
                config::MAX_STATIC_ADDRESSES
            ),
        ));
    }
    Ok(out)
}

fn add(
    env: &CniEnv,
    conf: &NetConf,
    cfg: &IpamConfig,
    version: &str,
    open: Opener,
) -> Result<Value, CniError> {
    CniEnv::require(&env.netns, "CNI_NETNS")?;
    let attachment = attachment(env)?;
    CniEnv::check_new_attachment(&attachment.container_id, &attachment.ifname)?;
    check_network_names(conf, cfg)?;
    let placement = place_statics(pools(cfg)?, statics(env, conf, cfg)?)?;
    let mut result = IpamResult {
        ips: Vec::new(),
        routes: cfg.routes.clone(),
        dns: cfg.dns.clone(),
    };
    if !placement.ranges.is_empty() {
        let req = AddRequest {
            cni_network: conf.name.clone(),
            network_name: cfg.network_name.clone(),
            overlap: cfg.enable_overlapping_ranges,
            attachment,
            ranges: placement.ranges.clone(),
            node_slice_size: cfg.node_slice_size,
            sleep_for_race: cfg.sleep_for_race,
            node: this_node(cfg),
        };
        let ips = agent::add(cfg, &req, open)?;
        if ips.len() != placement.ranges.len() {
            // Never an answer short of a range, nor one that drops an address it was given (the
            // runtime's DEL after this failure frees what was granted).
            return Err(CniError::new(
                code::IO_FAILURE,
                format!(
                    "the engine answered {} addresses for {} ranges",
                    ips.len(),
                    placement.ranges.len()
                ),
            ));
        }
        let slots = placement.ranges.iter().zip(&placement.gateways);
        for (ip, (slot, asked_gateway)) in ips.into_iter().zip(slots) {
            let cidr = slot.pool.cidr();
            let gateway = asked_gateway.or(cfg.gateway);
            result.ips.push(IpConfig {
                address: Cidr {
                    addr: ip,
                    prefix: cidr.prefix,
                },
                gateway: gateway.filter(|gw| cidr.contains(*gw)),
            });
        }
    }
    for s in placement.outside {
        result.ips.push(IpConfig {
            address: s.address,
            gateway: s.gateway,
        });
    }
    tracing::info!(ips = ?result.ips.iter().map(|i| i.address.to_string()).collect::<Vec<_>>(), "allocated");
    Ok(result.to_json(version))
}

/// Refuses, for an ADD, network names longer than [`config::MAX_NETWORK_NAME_BYTES`] (code 7,
/// naming the field). Only ADD checks: what was attached before must stay removable.
fn check_network_names(conf: &NetConf, cfg: &IpamConfig) -> Result<(), CniError> {
    let max = config::MAX_NETWORK_NAME_BYTES;
    for (value, field) in [
        (&conf.name, "name"),
        (&cfg.network_name, "ipam.network_name"),
    ] {
        if value.len() > max {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("{field} is longer than {max} bytes"),
            ));
        }
    }
    Ok(())
}

fn attachment_request(
    env: &CniEnv,
    conf: &NetConf,
    cfg: &IpamConfig,
) -> Result<AttachmentRequest, CniError> {
    let who = attachment(env)?;
    Ok(AttachmentRequest {
        cni_network: conf.name.clone(),
        network_name: cfg.network_name.clone(),
        container_id: who.container_id,
        ifname: who.ifname,
        pools: held_pools(cfg)?,
        node_slice_size: cfg.node_slice_size,
        hints: Hints {
            pod_ref: who.pod_ref,
            ips: conf.prev_ips.clone(),
        },
    })
}

/// A store that is broken for good does not hold pod teardown hostage: DEL succeeds, loudly,
/// and STATUS reports the store until an admin repairs it. A transient failure is code 11.
fn del(env: &CniEnv, conf: &NetConf, cfg: &IpamConfig, open: Opener) -> Result<(), CniError> {
    let req = attachment_request(env, conf, cfg)?;
    match agent::del(cfg, &req, open) {
        Ok(released) => {
            tracing::info!(released = released.len(), "released");
            Ok(())
        }
        Err(broken @ StoreError::Broken { .. }) => {
            tracing::error!(
                container = %req.container_id,
                ifname = %req.ifname,
                "DEL succeeds WITHOUT releasing what the broken store holds ({}); \
                 those addresses stay recorded until the store is repaired",
                broken.describe()
            );
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

fn check(env: &CniEnv, conf: &NetConf, cfg: &IpamConfig, open: Opener) -> Result<(), CniError> {
    CniEnv::require(&env.netns, "CNI_NETNS")?;
    let req = attachment_request(env, conf, cfg)?;
    let allocations = agent::check(cfg, &req, open)?;
    for pool in &req.pools {
        if !allocations.iter().any(|l| l.range == pool.cidr()) {
            return Err(CniError::new(
                code::NOT_RECORDED,
                format!(
                    "no address is recorded for container {} interface {} in range {}",
                    req.container_id,
                    req.ifname,
                    pool.cidr()
                ),
            ));
        }
    }
    // The runtime's prevResult says which addresses the container was given: each inside a
    // configured range must still be this attachment's (a repeated ADD may have moved it).
    let in_ranges = |ip: &std::net::IpAddr| req.pools.iter().any(|p| p.cidr().contains(*ip));
    for ip in conf.prev_ips.iter().filter(|ip| in_ranges(ip)) {
        if !allocations.iter().any(|l| l.ip == *ip) {
            return Err(CniError::new(
                code::NOT_RECORDED,
                format!(
                    "{ip} of prevResult is not recorded for container {} interface {}",
                    req.container_id, req.ifname
                ),
            ));
        }
    }
    Ok(())
}

fn gc(conf: &NetConf, cfg: &IpamConfig, open: Opener) -> Result<(), CniError> {
    // Without the list every allocation of the network would look stale.
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (an empty list releases everything)",
        )
    })?;
    let req = GcRequest {
        cni_network: conf.name.clone(),
        network_name: cfg.network_name.clone(),
        pools: held_pools(cfg)?,
        valid,
        node: this_node(cfg),
        node_slice_size: cfg.node_slice_size,
    };
    let released = agent::gc(cfg, &req, open)?;
    tracing::info!(released = released.len(), "garbage collected");
    Ok(())
}

fn status(cfg: &IpamConfig, open: Opener) -> Result<(), CniError> {
    agent::status(cfg, open).map_err(|e| not_available(e.into()))
}

/// STATUS's answer when ADDs cannot be served, with the reason.
fn not_available(err: CniError) -> CniError {
    let mut answer = CniError::new(code::NOT_AVAILABLE, format!("not available: {}", err.msg));
    answer.logged = Some(format!("not available: {}", err.for_the_log()));
    answer
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn attachment_of(cni_args: &str) -> Attachment {
        let vars: HashMap<String, String> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "net1"),
            ("CNI_ARGS", cni_args),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        attachment(&CniEnv::from_vars(&vars).unwrap()).unwrap()
    }

    #[test]
    fn a_pod_is_named_by_its_namespace_and_name_together() {
        let both = attachment_of("K8S_POD_NAMESPACE=web;K8S_POD_NAME=w-0;K8S_POD_UID=u");
        assert_eq!(both.pod_ref.as_deref(), Some("web/w-0"));
        assert_eq!(both.pod_uid.as_deref(), Some("u"));
        assert_eq!(attachment_of("K8S_POD_NAME=w-0").pod_ref, None);
        assert_eq!(attachment_of("K8S_POD_NAMESPACE=web").pod_ref, None);
        for split in [
            "K8S_POD_NAMESPACE=a/b;K8S_POD_NAME=c",
            "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b/c",
        ] {
            assert_eq!(attachment_of(split).pod_ref, None, "{split}");
        }
    }
}
