//! The agent's protocol, version 1: JSON over HTTP/1.1 on the node's unix socket.
//!
//! `POST /v1/add`, `/v1/del`, `/v1/check`, `/v1/gc`, `/v1/status`, each with a body below;
//! the answer is 200 with the result, or an error status with [`ErrorBody`]. A new version
//! gets new paths, so a plugin and an agent of different releases either speak the same
//! version or the plugin falls back to doing the work itself.
//!
//! Ranges travel as configured (network, bounds, exclusions, gateway) and the agent resolves
//! them again with the same core functions: what it serves never depends on a resolved form
//! a caller could get wrong.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{Datastore, MAX_EXCLUDES, MAX_RANGES};
use crate::ipam::names::pool_name;
use crate::ipam::{Cidr, Range, RangeError, RangeSpec};
use crate::store::{
    AddRequest, Allocation, Attachment, AttachmentRequest, GcRequest, Hints, PoolRef, RangeRequest,
    StoreError,
};

/// The path prefix of this version.
pub const PREFIX: &str = "/v1";

/// The engine a request is for; an agent serving another one refuses it and the plugin does
/// the work itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    Kubernetes,
    Etcd,
}

impl EngineKind {
    /// The agent-served engine of a datastore; `None` for the local engine (always in-process).
    pub fn of(datastore: &Datastore) -> Option<EngineKind> {
        match datastore {
            Datastore::Kubernetes(_) => Some(EngineKind::Kubernetes),
            Datastore::Etcd(_) => Some(EngineKind::Etcd),
            Datastore::Local { .. } => None,
        }
    }
}

/// A configured range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePool {
    pub cidr: String,
    pub start: Option<IpAddr>,
    pub end: Option<IpAddr>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub gateway: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRange {
    pub pool: WirePool,
    /// A static address asked for in this range.
    pub requested: Option<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddBody {
    pub engine: EngineKind,
    pub cni_network: String,
    pub network_name: String,
    pub overlap: bool,
    pub attachment: Attachment,
    pub ranges: Vec<WireRange>,
    pub node_slice_size: Option<u8>,
    pub sleep_for_race: u64,
    pub node: Option<String>,
}

/// DEL and CHECK.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentBody {
    pub engine: EngineKind,
    pub cni_network: String,
    pub network_name: String,
    pub container_id: String,
    pub ifname: String,
    pub pools: Vec<WirePool>,
    pub node_slice_size: Option<u8>,
    /// [`crate::store::Hints`]; absent from plugins of earlier releases.
    #[serde(default)]
    pub pod_ref: Option<String>,
    #[serde(default)]
    pub prev_ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcBody {
    pub engine: EngineKind,
    pub cni_network: String,
    pub network_name: String,
    pub pools: Vec<WirePool>,
    pub valid: Vec<(String, String)>,
    pub node: Option<String>,
    pub node_slice_size: Option<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusBody {
    pub engine: EngineKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddedBody {
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireAllocation {
    pub pool: String,
    pub range: String,
    pub ip: IpAddr,
    pub network_name: String,
    pub cni_network: Option<String>,
    pub attachment: Attachment,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllocationsBody {
    pub allocations: Vec<WireAllocation>,
}

/// A failure, with what the plugin needs to report it with the engine's CNI code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    Exhausted {
        range: String,
    },
    InUse {
        ip: IpAddr,
        range: String,
        holder: String,
    },
    TryAgain {
        message: String,
    },
    Config {
        message: String,
    },
    Io {
        message: String,
    },
    Broken {
        message: String,
    },
    /// The agent serves another engine than the request's.
    WrongEngine {
        message: String,
    },
    /// The agent could not read the request (a plugin of another release).
    BadRequest {
        message: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: WireError,
}

impl WireError {
    /// Whether the plugin should do the work itself rather than report this.
    pub fn falls_back(&self) -> bool {
        matches!(
            self,
            WireError::WrongEngine { .. } | WireError::BadRequest { .. }
        )
    }

    /// Every [`WireError::kind`], so that metrics can show each from the start.
    pub const KINDS: [&'static str; 8] = [
        "exhausted",
        "in_use",
        "try_again",
        "config",
        "io",
        "broken",
        "wrong_engine",
        "bad_request",
    ];

    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::Exhausted { .. } => "exhausted",
            WireError::InUse { .. } => "in_use",
            WireError::TryAgain { .. } => "try_again",
            WireError::Config { .. } => "config",
            WireError::Io { .. } => "io",
            WireError::Broken { .. } => "broken",
            WireError::WrongEngine { .. } => "wrong_engine",
            WireError::BadRequest { .. } => "bad_request",
        }
    }

    /// The message of an error that carries one.
    pub fn message_mut(&mut self) -> Option<&mut String> {
        match self {
            WireError::Exhausted { .. } | WireError::InUse { .. } => None,
            WireError::TryAgain { message }
            | WireError::Config { message }
            | WireError::Io { message }
            | WireError::Broken { message }
            | WireError::WrongEngine { message }
            | WireError::BadRequest { message } => Some(message),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> WireError {
        WireError::BadRequest {
            message: message.into(),
        }
    }
}

impl From<&StoreError> for WireError {
    fn from(err: &StoreError) -> WireError {
        match err {
            StoreError::Exhausted { range } => WireError::Exhausted {
                range: range.clone(),
            },
            StoreError::InUse { ip, range, holder } => WireError::InUse {
                ip: *ip,
                range: range.clone(),
                holder: holder.clone(),
            },
            // What the runtime may be told: the plugin passes it on, the agent logs the causes.
            StoreError::TryAgain { .. } => WireError::TryAgain {
                message: err.public(),
            },
            StoreError::Config { .. } => WireError::Config {
                message: err.public(),
            },
            StoreError::Io { .. } => WireError::Io {
                message: err.public(),
            },
            StoreError::Broken { .. } => WireError::Broken {
                message: err.public(),
            },
        }
    }
}

impl From<WireError> for StoreError {
    fn from(err: WireError) -> StoreError {
        match err {
            WireError::Exhausted { range } => StoreError::Exhausted { range },
            WireError::InUse { ip, range, holder } => StoreError::InUse { ip, range, holder },
            WireError::TryAgain { message } => StoreError::try_again(message),
            WireError::Config { message } => StoreError::config(message),
            WireError::Io { message }
            | WireError::WrongEngine { message }
            | WireError::BadRequest { message } => StoreError::io(message),
            WireError::Broken { message } => StoreError::broken(message),
        }
    }
}

impl WirePool {
    pub fn of(pool: &PoolRef) -> WirePool {
        WirePool {
            cidr: pool.spec.cidr.to_string(),
            start: pool.spec.start,
            end: pool.spec.end,
            exclude: pool.spec.exclude.iter().map(Cidr::to_string).collect(),
            gateway: pool.gateway,
        }
    }

    /// The pool of an ADD, resolved again as the plugin resolves the configuration.
    pub fn resolve(&self, network_name: &str) -> Result<PoolRef, WireError> {
        self.resolve_with(network_name, Range::resolve)
    }

    /// The pool of a DEL, CHECK or GC, resolved as the plugin does ([`Range::resolve_held`]).
    fn resolve_held(&self, network_name: &str) -> Result<PoolRef, WireError> {
        self.resolve_with(network_name, Range::resolve_held)
    }

    fn resolve_with(
        &self,
        network_name: &str,
        resolve: fn(&RangeSpec, Option<IpAddr>) -> Result<Range, RangeError>,
    ) -> Result<PoolRef, WireError> {
        let cidr = Cidr::parse(&self.cidr, false)
            .ok_or_else(|| WireError::bad_request(format!("range {:?} is not a CIDR", self.cidr)))?
            .network();
        if self.exclude.len() > MAX_EXCLUDES {
            return Err(WireError::bad_request(format!(
                "range {cidr} has more than {MAX_EXCLUDES} exclusions"
            )));
        }
        let exclude = self
            .exclude
            .iter()
            .map(|text| {
                Cidr::parse(text, true).ok_or_else(|| {
                    WireError::bad_request(format!("exclusion {text:?} is not a CIDR"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = RangeSpec {
            cidr,
            start: self.start,
            end: self.end,
            exclude,
        };
        let range = resolve(&spec, self.gateway)
            .map_err(|err| WireError::bad_request(format!("invalid range {cidr}: {err}")))?;
        Ok(PoolRef {
            name: pool_name(&spec.cidr, network_name, None),
            spec,
            gateway: self.gateway,
            range,
        })
    }
}

fn pools_of(pools: &[WirePool], network_name: &str) -> Result<Vec<PoolRef>, WireError> {
    if pools.len() > MAX_RANGES {
        return Err(WireError::bad_request(format!(
            "more than {MAX_RANGES} ranges"
        )));
    }
    pools.iter().map(|p| p.resolve_held(network_name)).collect()
}

impl AddBody {
    pub fn of(engine: EngineKind, req: &AddRequest) -> AddBody {
        AddBody {
            engine,
            cni_network: req.cni_network.clone(),
            network_name: req.network_name.clone(),
            overlap: req.overlap,
            attachment: req.attachment.clone(),
            ranges: req
                .ranges
                .iter()
                .map(|r| WireRange {
                    pool: WirePool::of(&r.pool),
                    requested: r.requested.map(|offset| r.pool.range.cidr.at(offset)),
                })
                .collect(),
            node_slice_size: req.node_slice_size,
            sleep_for_race: req.sleep_for_race,
            node: req.node.clone(),
        }
    }

    pub fn request(&self) -> Result<AddRequest, WireError> {
        if self.ranges.len() > MAX_RANGES {
            return Err(WireError::bad_request(format!(
                "more than {MAX_RANGES} ranges"
            )));
        }
        let mut ranges = Vec::with_capacity(self.ranges.len());
        for wanted in &self.ranges {
            let pool = wanted.pool.resolve(&self.network_name)?;
            let requested = match wanted.requested {
                Some(ip) => Some(pool.range.cidr.offset_of(ip).ok_or_else(|| {
                    WireError::bad_request(format!("{ip} is outside range {}", pool.range.cidr))
                })?),
                None => None,
            };
            ranges.push(RangeRequest { pool, requested });
        }
        Ok(AddRequest {
            cni_network: self.cni_network.clone(),
            network_name: self.network_name.clone(),
            overlap: self.overlap,
            attachment: self.attachment.clone(),
            ranges,
            node_slice_size: self.node_slice_size,
            sleep_for_race: self.sleep_for_race,
            node: self.node.clone(),
        })
    }
}

impl AttachmentBody {
    pub fn of(engine: EngineKind, req: &AttachmentRequest) -> AttachmentBody {
        AttachmentBody {
            engine,
            cni_network: req.cni_network.clone(),
            network_name: req.network_name.clone(),
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            pools: req.pools.iter().map(WirePool::of).collect(),
            node_slice_size: req.node_slice_size,
            pod_ref: req.hints.pod_ref.clone(),
            prev_ips: req.hints.ips.clone(),
        }
    }

    pub fn request(&self) -> Result<AttachmentRequest, WireError> {
        Ok(AttachmentRequest {
            cni_network: self.cni_network.clone(),
            network_name: self.network_name.clone(),
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            pools: pools_of(&self.pools, &self.network_name)?,
            node_slice_size: self.node_slice_size,
            hints: Hints {
                pod_ref: self.pod_ref.clone(),
                ips: self.prev_ips.iter().take(Hints::MAX_IPS).copied().collect(),
            },
        })
    }
}

impl GcBody {
    pub fn of(engine: EngineKind, req: &GcRequest) -> GcBody {
        GcBody {
            engine,
            cni_network: req.cni_network.clone(),
            network_name: req.network_name.clone(),
            pools: req.pools.iter().map(WirePool::of).collect(),
            valid: req.valid.clone(),
            node: req.node.clone(),
            node_slice_size: req.node_slice_size,
        }
    }

    pub fn request(&self) -> Result<GcRequest, WireError> {
        Ok(GcRequest {
            cni_network: self.cni_network.clone(),
            network_name: self.network_name.clone(),
            pools: pools_of(&self.pools, &self.network_name)?,
            valid: self.valid.clone(),
            node: self.node.clone(),
            node_slice_size: self.node_slice_size,
        })
    }
}

impl AllocationsBody {
    pub fn of(allocations: &[Allocation]) -> AllocationsBody {
        AllocationsBody {
            allocations: allocations
                .iter()
                .map(|a| WireAllocation {
                    pool: a.pool.clone(),
                    range: a.range.to_string(),
                    ip: a.ip,
                    network_name: a.network_name.clone(),
                    cni_network: a.cni_network.clone(),
                    attachment: a.attachment.clone(),
                })
                .collect(),
        }
    }

    /// The allocations; one whose range cannot be read back is an error (not dropped: CHECK
    /// would then report an address as missing).
    pub fn allocations(self) -> Result<Vec<Allocation>, StoreError> {
        self.allocations
            .into_iter()
            .map(|a| {
                let range = Cidr::parse(&a.range, false).ok_or_else(|| {
                    StoreError::io(format!(
                        "the agent answered an unreadable range {:?}",
                        a.range
                    ))
                })?;
                Ok(Allocation {
                    pool: a.pool,
                    range,
                    ip: a.ip,
                    network_name: a.network_name,
                    cni_network: a.cni_network,
                    slice_node: None,
                    attachment: a.attachment.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::addr::parse_ip;

    /// `KINDS` lists every kind, and each kind is the tag the error travels with.
    #[test]
    fn every_kind_is_listed() {
        let message = || "m".to_string();
        let errors = [
            WireError::Exhausted { range: message() },
            WireError::InUse {
                ip: "10.0.0.1".parse().unwrap(),
                range: message(),
                holder: message(),
            },
            WireError::TryAgain { message: message() },
            WireError::Config { message: message() },
            WireError::Io { message: message() },
            WireError::Broken { message: message() },
            WireError::WrongEngine { message: message() },
            WireError::BadRequest { message: message() },
        ];
        let kinds: Vec<&str> = errors.iter().map(WireError::kind).collect();
        assert_eq!(kinds, WireError::KINDS);
        for error in &errors {
            let tagged = serde_json::to_value(error).unwrap();
            assert_eq!(tagged["kind"], error.kind());
        }
    }

    fn pool(network_name: &str) -> PoolRef {
        let spec = RangeSpec {
            cidr: Cidr::parse("10.1.0.0/24", false).unwrap(),
            start: parse_ip("10.1.0.10"),
            end: parse_ip("10.1.0.200"),
            exclude: vec![Cidr::parse("10.1.0.32/28", false).unwrap()],
        };
        let gateway = parse_ip("10.1.0.1");
        PoolRef {
            name: pool_name(&spec.cidr, network_name, None),
            range: Range::resolve(&spec, gateway).unwrap(),
            spec,
            gateway,
        }
    }

    #[test]
    fn an_add_travels_unchanged() {
        let pool = pool("net");
        let req = AddRequest {
            cni_network: "cni".into(),
            network_name: "net".into(),
            overlap: true,
            attachment: Attachment {
                container_id: "c".into(),
                ifname: "eth0".into(),
                pod_ref: Some("ns/p".into()),
                pod_uid: Some("u".into()),
            },
            ranges: vec![RangeRequest {
                requested: pool.range.cidr.offset_of(parse_ip("10.1.0.50").unwrap()),
                pool,
            }],
            node_slice_size: None,
            sleep_for_race: 0,
            node: Some("n".into()),
        };
        let body = AddBody::of(EngineKind::Kubernetes, &req);
        let text = serde_json::to_vec(&body).unwrap();
        let back: AddBody = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.request().unwrap(), req);
    }

    #[test]
    fn a_del_travels_with_its_hints_and_an_earlier_plugins_without() {
        let req = AttachmentRequest {
            cni_network: "cni".into(),
            network_name: "net".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            pools: vec![pool("net")],
            node_slice_size: None,
            hints: Hints {
                pod_ref: Some("ns/p".into()),
                ips: vec![parse_ip("10.1.0.50").unwrap()],
            },
        };
        let body = AttachmentBody::of(EngineKind::Etcd, &req);
        let text = serde_json::to_value(&body).unwrap();
        let back: AttachmentBody = serde_json::from_value(text.clone()).unwrap();
        assert_eq!(back.request().unwrap(), req);

        let mut earlier = text;
        let fields = earlier.as_object_mut().unwrap();
        fields.remove("pod_ref");
        fields.remove("prev_ips");
        let back: AttachmentBody = serde_json::from_value(earlier).unwrap();
        let without = AttachmentRequest {
            hints: Hints::default(),
            ..req
        };
        assert_eq!(back.request().unwrap(), without);
    }

    #[test]
    fn errors_keep_their_code() {
        let errors = [
            StoreError::Exhausted {
                range: "10.0.0.0/30".into(),
            },
            StoreError::InUse {
                ip: parse_ip("10.0.0.1").unwrap(),
                range: "10.0.0.0/30".into(),
                holder: "x".into(),
            },
            StoreError::try_again("later"),
            StoreError::config("bad"),
            StoreError::io("disk").because(std::io::Error::other("full")),
            StoreError::broken("corrupt"),
        ];
        for err in errors {
            let wire = WireError::from(&err);
            let text = serde_json::to_string(&ErrorBody { error: wire }).unwrap();
            let back: ErrorBody = serde_json::from_str(&text).unwrap();
            let again = StoreError::from(back.error);
            let code = |e: &StoreError| crate::cni::error::CniError::from(e.clone()).code;
            assert_eq!(code(&again), code(&err), "{err:?}");
            // What the runtime is told is the same with or without the agent.
            assert_eq!(again.public(), err.public());
        }
    }

    #[test]
    fn hostile_ranges_are_refused_not_trusted() {
        let mut wire = WirePool::of(&pool(""));
        wire.cidr = "10.1.0.0/33".into();
        assert!(wire.resolve("").is_err());
        let mut wire = WirePool::of(&pool(""));
        wire.exclude = vec!["10.0.0.0/8".into(); MAX_EXCLUDES + 1];
        assert!(wire.resolve("").is_err());
        let mut wire = WirePool::of(&pool(""));
        wire.start = parse_ip("192.168.0.1");
        assert!(wire.resolve("").is_err());
    }

    /// A range with no address to hand out is refused for an ADD; a DEL, CHECK or GC of it
    /// looks for what is held, as the plugin does without the agent.
    #[test]
    fn a_range_without_addresses_is_released_from() {
        let mut wire = WirePool::of(&pool(""));
        wire.cidr = "10.1.2.3/32".into();
        assert!(wire.resolve("").is_err());
        let held = wire.resolve_held("").unwrap();
        assert_eq!(
            (held.name.as_str(), held.range.capacity()),
            ("10.1.2.3-32", 0)
        );
    }
}
