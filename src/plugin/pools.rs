//! From the configuration to the pools of a request, and static addresses to their ranges.

use std::net::IpAddr;

use crate::cni::error::{code, CniError};
use crate::config::{IpamConfig, StaticAddress};
use crate::ipam::addr::{family_bits, parse_ip};
use crate::ipam::names::pool_name;
use crate::ipam::{Cidr, Range, RangeError, RangeSpec};
use crate::store::{PoolRef, RangeRequest};

/// The pools of the configured ranges, in order.
pub fn pools(cfg: &IpamConfig) -> Result<Vec<PoolRef>, CniError> {
    resolved_pools(cfg, Range::resolve)
}

/// As [`pools`], for DEL, CHECK and GC: a range too small to hand out an address is a pool
/// with nothing free ([`Range::resolve_held`]).
pub fn held_pools(cfg: &IpamConfig) -> Result<Vec<PoolRef>, CniError> {
    resolved_pools(cfg, Range::resolve_held)
}

fn resolved_pools(
    cfg: &IpamConfig,
    resolve: fn(&RangeSpec, Option<IpAddr>) -> Result<Range, RangeError>,
) -> Result<Vec<PoolRef>, CniError> {
    cfg.ranges
        .iter()
        .map(|spec| {
            let range = resolve(spec, cfg.gateway).map_err(|err| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("invalid range {}: {err}", spec.cidr),
                )
            })?;
            Ok(PoolRef {
                name: pool_name(&spec.cidr, &cfg.network_name, None),
                spec: spec.clone(),
                gateway: cfg.gateway,
                range,
            })
        })
        .collect()
}

/// Parses a requested address from CNI_ARGS `IP=` or `runtimeConfig.ips`: a CIDR, or a bare
/// address (which takes the prefix length of the range containing it).
pub fn parse_requested(text: &str, source: &str) -> Result<(IpAddr, Option<u8>), CniError> {
    let bad = || {
        CniError::new(
            code::INVALID_CONFIG,
            format!(
                "invalid {source}: {:?} is not an IP address or CIDR",
                crate::files::shown(text)
            ),
        )
    };
    match text.trim().split_once('/') {
        Some(_) => {
            let cidr = Cidr::parse(text, false).ok_or_else(bad)?;
            Ok((cidr.addr, Some(cidr.prefix)))
        }
        None => Ok((parse_ip(text).ok_or_else(bad)?, None)),
    }
}

/// A static address inside a range must be one a pod may hold: not the network or broadcast
/// address, not the gateway, not excluded. The pod's own (`pods_own`) must also lie between
/// `range_start` and `range_end`: admins keep their routers and appliances outside that
/// window, where only the network configuration places addresses.
fn refuse_unusable(pool: &PoolRef, ip: IpAddr, pods_own: bool) -> Result<(), CniError> {
    let cidr = pool.cidr();
    let offset = cidr.offset_of(ip).unwrap_or_default();
    let window = &pool.range;
    if pods_own && !window.within(offset) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "args.cni.ips asks for {ip}, outside {}-{} of range {cidr}: only the network \
                 configuration's addresses may lie outside range_start..range_end",
                window.first_ip(),
                window.last_ip()
            ),
        ));
    }
    let why = if offset == 0 {
        Some("the network address")
    } else if offset == cidr.last_offset() {
        Some("the broadcast (last) address")
    } else if pool.gateway == Some(ip) {
        Some("the gateway")
    } else if pool.spec.exclude.iter().any(|e| e.network().contains(ip)) {
        Some("excluded")
    } else {
        None
    };
    match why {
        Some(why) => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("requested static address {ip} is {why} of range {cidr}"),
        )),
        None => Ok(()),
    }
}

/// A static address asked for: the address, its prefix length if given, and its gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requested {
    pub ip: IpAddr,
    pub prefix: Option<u8>,
    pub gateway: Option<IpAddr>,
    /// Asked by the pod itself (`args.cni.ips`, which Multus fills from the pod's annotation
    /// without the network configuration opting in): honoured inside a configured range only,
    /// where it is reserved like any other. Outside, nothing would stop a pod from taking its
    /// segment's router address.
    pub pods_own: bool,
}

/// The static addresses of a call, split between the ranges that contain them (reserved there,
/// replacing the dynamic choice) and the rest (returned as they are).
pub struct Placement {
    pub ranges: Vec<RangeRequest>,
    /// For each of `ranges`, the gateway its static address was asked with, if any.
    pub gateways: Vec<Option<IpAddr>>,
    pub outside: Vec<StaticAddress>,
}

/// The range a static address is placed in: the first that contains it; for a pod's own
/// address, the first whose `range_start..range_end` holds it, if one does (a range may lie
/// inside another's CIDR, with a window of its own).
fn range_of(ranges: &[RangeRequest], ip: IpAddr, pods_own: bool) -> Option<usize> {
    let window_holds = |r: &RangeRequest| {
        let range = &r.pool.range;
        range.cidr.offset_of(ip).is_some_and(|o| range.within(o))
    };
    let in_window = pods_own
        .then(|| ranges.iter().position(window_holds))
        .flatten();
    in_window.or_else(|| ranges.iter().position(|r| r.pool.cidr().contains(ip)))
}

pub fn place_statics(pools: Vec<PoolRef>, statics: Vec<Requested>) -> Result<Placement, CniError> {
    let mut ranges: Vec<RangeRequest> = pools
        .into_iter()
        .map(|pool| RangeRequest {
            pool,
            requested: None,
        })
        .collect();
    let mut gateways = vec![None; ranges.len()];
    let mut outside = Vec::new();
    for Requested {
        ip,
        prefix,
        gateway,
        pods_own,
    } in statics
    {
        match range_of(&ranges, ip, pods_own) {
            Some(at) => {
                let slot = &mut ranges[at];
                gateways[at] = gateway.or(gateways[at]);
                refuse_unusable(&slot.pool, ip, pods_own)?;
                let offset = slot.pool.cidr().offset_of(ip).unwrap_or_default();
                match slot.requested {
                    Some(prev) if prev != offset => {
                        return Err(CniError::new(
                            code::INVALID_CONFIG,
                            format!(
                                "two static addresses requested in range {}: {} and {ip} (one address per range)",
                                slot.pool.cidr(),
                                slot.pool.cidr().at(prev)
                            ),
                        ))
                    }
                    _ => slot.requested = Some(offset),
                }
            }
            None if pods_own => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "args.cni.ips asks for {ip}, which is in no configured range: only the \
                         network configuration's addresses may lie outside its ranges"
                    ),
                ))
            }
            None => {
                let address = Cidr {
                    addr: ip,
                    prefix: prefix.unwrap_or_else(|| family_bits(ip)),
                };
                if !outside.iter().any(|s: &StaticAddress| s.address.addr == ip) {
                    outside.push(StaticAddress { address, gateway });
                }
            }
        }
    }
    Ok(Placement {
        ranges,
        gateways,
        outside,
    })
}
