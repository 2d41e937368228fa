//! The JSON values stored under allocation and reservation keys.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ipam::Cidr;
use crate::store::{AddRequest, Allocation, Attachment};

/// One held address: the value of `pools/<pool>/a/<offset>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationRecord {
    pub ip: IpAddr,
    /// The pool's range, so a record can be read without the configuration.
    pub range: String,
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default)]
    pub cni_network: String,
    #[serde(default)]
    pub network_name: String,
    /// Whether an overlap reservation was written with this allocation.
    #[serde(default)]
    pub reserved: bool,
    /// The node that made the ADD: a node's CNI GC releases only its own allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl AllocationRecord {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            pod_ref: self.pod_ref.clone(),
            pod_uid: self.pod_uid.clone(),
        }
    }

    /// Whether the record is the attachment of `container_id` and `ifname` (what a DEL names).
    pub fn is_of(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and an address cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Option<AllocationRecord> {
        Self::parse(bytes).ok()
    }

    /// As [`Self::from_json`], with what made it unreadable (where, never the value).
    pub fn parse(bytes: &[u8]) -> Result<AllocationRecord, UnreadableRecord> {
        serde_json::from_slice(bytes).map_err(|err| UnreadableRecord {
            category: err.classify(),
            line: err.line(),
            column: err.column(),
        })
    }

    /// The allocation this record describes; `None` only for a record whose range and address are
    /// both unreadable, which this engine never writes.
    pub fn allocation(&self, pool: &str) -> Option<Allocation> {
        let bits = if self.ip.is_ipv6() { 128 } else { 32 };
        let range = Cidr::parse(&self.range, false).or_else(|| Cidr::new(self.ip, bits))?;
        Some(Allocation {
            pool: pool.to_string(),
            range,
            ip: self.ip,
            network_name: self.network_name.clone(),
            cni_network: (!self.cni_network.is_empty()).then(|| self.cni_network.clone()),
            slice_node: None,
            attachment: self.attachment(),
        })
    }
}

/// The value of `reservations/<network>/<ip>`: who holds the address network-wide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    pub pool: String,
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<String>,
}

impl ReservationRecord {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Option<ReservationRecord> {
        serde_json::from_slice(bytes).ok()
    }

    /// The reservation of `record` in `pool`.
    pub fn of(pool: &str, record: &AllocationRecord) -> ReservationRecord {
        ReservationRecord {
            pool: pool.to_string(),
            container_id: record.container_id.clone(),
            ifname: record.ifname.clone(),
            pod_ref: record.pod_ref.clone(),
        }
    }

    /// Whether this is the reservation of `record` in `pool` (whatever pod it names: an
    /// older build wrote none).
    pub fn is_for(&self, pool: &str, record: &AllocationRecord) -> bool {
        self.pool == pool && record.is_of(&self.container_id, &self.ifname)
    }

    /// The attachment this reservation names (no pod UID: it records none).
    pub fn owner(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            pod_ref: self.pod_ref.clone(),
            pod_uid: None,
        }
    }

    /// Whether this is `req`'s attachment's own, through a pool `req` does not name (a range
    /// edited since its ADD).
    pub fn owner_elsewhere(&self, req: &AddRequest) -> bool {
        self.owner().same_owner(&req.attachment)
            && req.ranges.iter().all(|rr| rr.pool.name != self.pool)
    }

    pub fn holder(&self) -> String {
        match &self.pod_ref {
            Some(pod) => format!("pod {pod} ({}) in pool {}", self.ifname, self.pool),
            None => format!(
                "container {} ({}) in pool {}",
                self.container_id, self.ifname, self.pool
            ),
        }
    }
}

/// Why a stored record could not be read, by where: serde's own message quotes the value it
/// met, which a hand edit may have filled with anything.
#[derive(Debug, thiserror::Error)]
#[error("not an allocation record ({category:?} error at line {line}, column {column})")]
pub struct UnreadableRecord {
    category: serde_json::error::Category,
    line: usize,
    column: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_record_is_told_by_where_not_by_its_value() {
        let stored: [&[u8]; 4] = [
            br#"{"ip": "hidden-value"}"#,
            br#""hidden-value""#,
            b"hidden-value",
            br#"{"ip": 7"#,
        ];
        for stored in stored {
            let err = AllocationRecord::parse(stored).unwrap_err().to_string();
            assert!(!err.contains("hidden"), "{err}");
            assert!(err.contains("line 1"), "{err}");
        }
    }
}
