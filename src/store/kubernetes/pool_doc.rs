//! An IPPool in upstream's format: allocations keyed by the decimal offset of the address from
//! the IP part of `spec.range`. Offsets here are read as 128-bit numbers, so the upper half of an
//! IPv6 /64 works too.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::api::ObjectMeta;
use serde_json::{json, Value};

use crate::ipam::addr::{from_u128, to_u128};
use crate::ipam::{Cidr, OffsetRuns};
use crate::k8s::crd::{IPAllocation, IPPool, IPPoolSpec};
use crate::store::{Attachment, StoreError};

/// One allocation of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key in `spec.allocations`, as stored.
    pub key: String,
    /// Offset from the network address of the pool's range (the core's offsets).
    pub offset: u128,
    pub ip: IpAddr,
    pub attachment: Attachment,
}

/// Whether an entry of `who`, beside the entries of `others` (in the same pool), is the
/// attachment (`container_id`, `ifname`) a DEL or CHECK names. Upstream versions before
/// interface names wrote entries without one and released them by container alone: such an
/// entry is its container's, for an interface the container holds no entry of its own for.
pub fn named_by<'a>(
    who: &Attachment,
    others: impl IntoIterator<Item = &'a Attachment>,
    container_id: &str,
    ifname: &str,
) -> bool {
    let exact = |w: &Attachment| w.container_id == container_id && w.ifname == ifname;
    exact(who)
        || (who.container_id == container_id
            && who.ifname.is_empty()
            && !others.into_iter().any(exact))
}

/// The holders of `entries`, for [`named_by`].
pub fn holders(entries: &[Entry]) -> impl Iterator<Item = &Attachment> {
    entries.iter().map(|e| &e.attachment)
}

/// A pool as read (or about to be created, when `object` is None).
pub struct PoolDoc {
    pub name: String,
    pub cidr: Cidr,
    /// The integer value of the IP part of `spec.range`: what the keys count from.
    key_base: u128,
    pub object: Option<IPPool>,
}

impl PoolDoc {
    /// A pool read from the API server (or None: not created yet) for range `cidr`.
    pub fn new(name: &str, cidr: Cidr, object: Option<IPPool>) -> Result<PoolDoc, StoreError> {
        let key_base = match &object {
            Some(pool) => spec_base(&pool.spec.range, cidr).ok_or_else(|| {
                StoreError::io(format!(
                    "IPPool {name} has range {:?}, which does not match the configured range {}",
                    pool.spec.range,
                    cidr.network()
                ))
            })?,
            None => cidr.base(),
        };
        Ok(PoolDoc {
            name: name.to_string(),
            cidr: cidr.network(),
            key_base,
            object,
        })
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.object
            .as_ref()
            .and_then(|pool| pool.metadata.resource_version.as_deref())
    }

    /// The allocations that name an address inside the range; other keys are left alone.
    pub fn entries(&self) -> Vec<Entry> {
        let Some(pool) = &self.object else {
            return Vec::new();
        };
        pool.spec
            .allocations
            .iter()
            .filter_map(|(key, alloc)| {
                let offset = self.offset_of_key(key)?;
                Some(Entry {
                    key: key.clone(),
                    offset,
                    ip: self.cidr.at(offset),
                    attachment: attachment_of(alloc),
                })
            })
            .collect()
    }

    /// The offsets held (the core's offsets).
    pub fn taken(&self) -> OffsetRuns {
        self.entries().into_iter().map(|e| e.offset).collect()
    }

    /// The last offset of the block around `offset` that cannot be written in this pool's key
    /// space (below the IP part of a `spec.range` written with host bits), which must be treated
    /// as taken; `None` when `offset` can be written. One block: a search passes it in one step,
    /// not one address at a time (2^48 of them below `fd00::1:0:0:0/64`).
    pub fn unaddressable_until(&self, offset: u128) -> Option<u128> {
        if self.key_of(offset).is_some() {
            return None;
        }
        let shift = self.key_base.saturating_sub(self.cidr.base());
        Some(if offset < shift { shift - 1 } else { offset })
    }

    /// The first offset whose key is `key_limit` or more (keys count from the IP part of
    /// `spec.range`, offsets from the network address).
    pub fn offset_limit(&self, key_limit: u128) -> u128 {
        let shift = self.key_base.saturating_sub(self.cidr.base());
        key_limit.saturating_add(shift)
    }

    /// The key upstream uses for the address at `offset`.
    pub fn key_of(&self, offset: u128) -> Option<String> {
        let value = self.cidr.base().checked_add(offset)?;
        value.checked_sub(self.key_base).map(|k| k.to_string())
    }

    fn offset_of_key(&self, key: &str) -> Option<u128> {
        // As Go's strconv.ParseInt reads it: a `+` sign and leading zeros are taken (such a key
        // written by hand holds its address for a Go node, so it must for ours; writes to an
        // entry go under its key as stored), any other sign is not.
        let key = key.strip_prefix('+').unwrap_or(key);
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value = self.key_base.checked_add(key.parse::<u128>().ok()?)?;
        let ip = from_u128(value, self.cidr.is_v6());
        if to_u128(ip) != value {
            return None; // beyond the IPv4 space
        }
        self.cidr.offset_of(ip)
    }

    /// The allocations of the attachment (container ID and interface), as DEL matches them.
    pub fn held_by_container(&self, container_id: &str, ifname: &str) -> Vec<Entry> {
        let entries = self.entries();
        entries
            .iter()
            .filter(|e| named_by(&e.attachment, holders(&entries), container_id, ifname))
            .cloned()
            .collect()
    }

    /// The new pool object holding the allocations, for when the pool does not exist yet.
    pub fn new_object(&self, entries: &[(String, Attachment)]) -> IPPool {
        let allocations: BTreeMap<String, IPAllocation> = entries
            .iter()
            .map(|(key, who)| (key.clone(), allocation_of(who)))
            .collect();
        IPPool {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: IPPoolSpec {
                range: self.cidr.to_string(),
                allocations,
            },
        }
    }
}

/// The integer value of the IP part of a pool's `spec.range`, if it is the configured range.
fn spec_base(spec_range: &str, cidr: Cidr) -> Option<u128> {
    let spec = Cidr::parse(spec_range, false)?;
    (spec.network() == cidr.network()).then(|| to_u128(spec.addr))
}

pub fn attachment_of(alloc: &IPAllocation) -> Attachment {
    Attachment {
        container_id: alloc.id.clone(),
        ifname: alloc.ifname.clone(),
        pod_ref: (!alloc.podref.is_empty()).then(|| alloc.podref.clone()),
        pod_uid: None,
    }
}

pub fn allocation_of(who: &Attachment) -> IPAllocation {
    IPAllocation {
        id: who.container_id.clone(),
        podref: who.pod_ref.clone().unwrap_or_default(),
        ifname: who.ifname.clone(),
    }
}

/// A JSON pointer segment for a key (RFC 6901 escaping).
fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

pub fn add_op(key: &str, who: &Attachment) -> Value {
    json!({
        "op": "add",
        "path": format!("/spec/allocations/{}", pointer_segment(key)),
        "value": allocation_of(who),
    })
}

/// A precondition that the pool holds no entry at `key`. The API server's JSON patch passes a
/// `test` of `null` on a missing member (RFC 6902 would call that an error); the tests against
/// the real server prove it, and the write fails safe if it ever stops doing so.
pub fn absent_test(key: &str) -> Value {
    json!({
        "op": "test",
        "path": format!("/spec/allocations/{}", pointer_segment(key)),
        "value": null,
    })
}

/// A precondition that the entry at `key` still belongs to container `container_id`.
pub fn holder_test(key: &str, container_id: &str) -> Value {
    json!({
        "op": "test",
        "path": format!("/spec/allocations/{}/id", pointer_segment(key)),
        "value": container_id,
    })
}

pub fn remove_op(key: &str) -> Value {
    json!({"op": "remove", "path": format!("/spec/allocations/{}", pointer_segment(key))})
}

pub fn replace_id_op(key: &str, container_id: &str) -> Value {
    json!({
        "op": "replace",
        "path": format!("/spec/allocations/{}/id", pointer_segment(key)),
        "value": container_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_without_an_interface_is_its_containers_for_an_interface_it_lacks() {
        let entry = |offset: u128, container: &str, ifname: &str| Entry {
            key: offset.to_string(),
            offset,
            ip: format!("10.0.0.{offset}").parse().unwrap(),
            attachment: Attachment {
                container_id: container.into(),
                ifname: ifname.into(),
                pod_ref: None,
                pod_uid: None,
            },
        };
        let entries = [
            entry(3, "c", ""),
            entry(4, "c", "net2"),
            entry(5, "d", "net1"),
        ];
        let named = |e: &Entry, ifname| named_by(&e.attachment, holders(&entries), "c", ifname);
        // The DEL of net2 frees net2's entry, not the old one, which is another interface's.
        assert!(named(&entries[1], "net2") && !named(&entries[0], "net2"));
        // The DEL of net1 (no entry of its own): the old entry.
        assert!(named(&entries[0], "net1") && !named(&entries[1], "net1"));
        assert!(!named(&entries[2], "net1"), "another container's");
    }

    fn pool(range: &str, keys: &[&str]) -> IPPool {
        let mut allocations = BTreeMap::new();
        for key in keys {
            allocations.insert(
                key.to_string(),
                IPAllocation {
                    id: format!("c{key}"),
                    podref: format!("ns/p{key}"),
                    ifname: "net1".into(),
                },
            );
        }
        IPPool {
            metadata: ObjectMeta::default(),
            spec: IPPoolSpec {
                range: range.into(),
                allocations,
            },
        }
    }

    #[test]
    fn keys_count_from_the_ip_part_of_the_range() {
        let cidr = Cidr::parse("10.0.0.0/24", false).unwrap();
        let doc =
            PoolDoc::new("x", cidr, Some(pool("10.0.0.4/24", &["1", "junk", "999"]))).unwrap();
        let entries = doc.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].ip.to_string(), "10.0.0.5");
        assert_eq!(entries[0].offset, 5);
        assert_eq!(doc.key_of(5).as_deref(), Some("1"));
        // Keys written by hand, as Go reads them.
        let by_hand = PoolDoc::new("x", cidr, Some(pool("10.0.0.0/24", &["+7", "009"]))).unwrap();
        let offsets: Vec<u128> = by_hand.entries().iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [7, 9]);
        // Offsets 0 to 3 have no key: one block, passed in one step.
        assert_eq!(doc.unaddressable_until(1), Some(3));
        assert_eq!(doc.unaddressable_until(4), None);
    }

    #[test]
    fn offsets_beyond_two_to_the_63() {
        let cidr = Cidr::parse("fd00::/64", false).unwrap();
        let big = (1u128 << 63) + 5;
        let doc = PoolDoc::new("x", cidr, Some(pool("fd00::/64", &[&big.to_string()]))).unwrap();
        let entries = doc.entries();
        assert_eq!(entries[0].ip.to_string(), "fd00::8000:0:0:5");
        assert_eq!(doc.key_of(big).unwrap(), big.to_string());
    }

    #[test]
    fn a_pool_of_another_range_is_an_error() {
        let cidr = Cidr::parse("10.0.0.0/24", false).unwrap();
        assert!(PoolDoc::new("x", cidr, Some(pool("10.0.1.0/24", &[]))).is_err());
    }
}
