//! The Kubernetes doctor's survey over objects built from the bytes, checked against what the
//! objects say entry by entry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::ipam::names::{object_name, pool_name};
use crate::ipam::Cidr;
use crate::k8s::crd::{
    IPAllocation, IPPool, IPPoolSpec, NodeSliceAllocation, NodeSlicePool, NodeSlicePoolSpec,
    NodeSlicePoolStatus, OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec,
};
use crate::store::kubernetes::doctor::{Problem, Survey};
use crate::store::kubernetes::pool_doc::attachment_of;
use crate::store::kubernetes::reservation;

/// The pools' ranges and networks: two networks over one range, a second range of a network,
/// an IPv6 range, a network named like a node in a range a sliced network overlaps (its
/// pool's name reads as that node's slice of a network without a name), and, last, a node's
/// slice of the sliced network.
const POOLS: [(&str, &str, Option<&str>); 6] = [
    ("10.0.0.0/28", "", None),
    ("10.0.0.0/28", "n1", None),
    ("10.0.0.16/28", "n1", None),
    ("fd00::/124", "n1", None),
    ("10.0.0.32/28", "node-b", None),
    ("10.0.0.32/28", "n1", Some("node-a")),
];

/// The sliced network's whole range, and the two slices its NodeSlicePool may give `node-a`.
const SLICED: (&str, [&str; 2]) = ("10.0.0.32/27", ["10.0.0.32/28", "10.0.0.48/28"]);

/// One finding, as compared: the problem, the objects (sorted) and the address.
type Seen = (Problem, Vec<String>, Option<String>);

/// 4-byte records, each a pool entry (a readable key, with or without leading zeros or a `+`
/// sign, or one past the range or negative; one of four holders, with or without a pod), a reservation
/// (of any network, for an address of any of the pools or none, held by one of the holders
/// or by a container or pod alone), or the slice the NodeSlicePool gives the node; a later
/// record replaces an earlier one of the same object and key. The survey must report exactly
/// what the entries say: every key it cannot read, every entry without a pod, without its
/// reservation or whose reservation another attachment holds, every address of a network held
/// by two attachments, every reservation no entry accounts for, and the node's pool holding
/// addresses outside its slice.
pub fn k8s_doctor(bytes: &[u8]) {
    let objects = Objects::from_bytes(bytes);
    let survey = Survey::of(
        objects.pools(),
        objects.reservations(),
        (&[objects.slice_pool()], Default::default()),
        Duration::ZERO,
    );
    let mut reported: Vec<Seen> = survey
        .findings()
        .iter()
        .map(|f| {
            let mut names: Vec<String> = f.object.split(',').map(str::to_string).collect();
            names.sort();
            (f.problem, names, f.address.clone())
        })
        .collect();
    reported.sort();
    assert_eq!(reported, objects.expected(), "{objects:?}");
}

/// Who holds one address of a network: the pools' names and the attachments.
#[derive(Default)]
struct Holders {
    pools: Vec<String>,
    owners: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Objects {
    /// Per pool of [`POOLS`], its entries by key.
    entries: [BTreeMap<String, IPAllocation>; POOLS.len()],
    /// By name.
    reservations: BTreeMap<String, OverlappingRangeIPReservationSpec>,
    /// Which of [`SLICED`]'s slices the node holds.
    slice: usize,
}

impl Objects {
    fn from_bytes(bytes: &[u8]) -> Objects {
        let mut objects = Objects::default();
        for record in bytes.chunks_exact(4).take(128) {
            let [kind, a, b, c] = [record[0], record[1], record[2], record[3]];
            match kind % 3 {
                0 => {
                    let pool = usize::from(a) % POOLS.len();
                    objects.entries[pool].insert(key(b), holder(c));
                }
                1 => {
                    let network = ["", "n1", "node-b"][usize::from(a % 3)];
                    let name = reservation::name(address(a / 3, b), network);
                    let holder = holder(c);
                    let spec = OverlappingRangeIPReservationSpec {
                        containerid: if c & 0x40 == 0 {
                            holder.id
                        } else {
                            String::new()
                        },
                        ifname: holder.ifname,
                        podref: holder.podref,
                    };
                    objects.reservations.insert(name, spec);
                }
                _ => objects.slice = usize::from(a & 1),
            }
        }
        objects
    }

    fn name(pool: usize) -> String {
        let (range, network, node) = POOLS[pool];
        object_name(&pool_name(&cidr(range), network, node))
    }

    fn pools(&self) -> Vec<IPPool> {
        let pools = self.entries.iter().enumerate();
        pools
            .map(|(pool, allocations)| IPPool {
                metadata: meta(Objects::name(pool)),
                spec: IPPoolSpec {
                    range: POOLS[pool].0.to_string(),
                    allocations: allocations.clone(),
                },
            })
            .collect()
    }

    fn reservations(&self) -> Vec<OverlappingRangeIPReservation> {
        let names = self.reservations.keys();
        names
            .filter_map(|name| self.reservation_named(name))
            .collect()
    }

    fn slice_pool(&self) -> NodeSlicePool {
        NodeSlicePool {
            metadata: meta("n1".to_string()),
            spec: NodeSlicePoolSpec {
                range: SLICED.0.to_string(),
                slice_size: "28".to_string(),
            },
            status: Some(NodeSlicePoolStatus {
                allocations: vec![NodeSliceAllocation {
                    node_name: "node-a".to_string(),
                    slice_range: SLICED.1[self.slice].to_string(),
                }],
            }),
        }
    }

    /// What the survey must report, entry by entry, sorted.
    fn expected(&self) -> Vec<Seen> {
        let mut expected = Vec::new();
        let mut holders: BTreeMap<(&str, IpAddr), Holders> = BTreeMap::new();
        for (pool, entries) in self.entries.iter().enumerate() {
            let (range, network, _) = POOLS[pool];
            let object = format!("IPPool/{}", Objects::name(pool));
            for (key, alloc) in entries {
                let Some(ip) = offset(key).map(|o| cidr(range).at(o)) else {
                    expected.push((Problem::UnreadableEntry, vec![object.clone()], None));
                    continue;
                };
                for problem in self.entry_problems(network, ip, alloc) {
                    expected.push((problem, vec![object.clone()], Some(ip.to_string())));
                }
                let held = holders.entry((network, ip)).or_default();
                held.pools.push(object.clone());
                held.owners.insert(attachment_of(alloc).describe());
            }
        }
        for ((_, ip), mut held) in holders {
            if held.owners.len() > 1 {
                held.pools.sort();
                expected.push((Problem::HeldTwice, held.pools, Some(ip.to_string())));
            }
        }
        expected.extend(self.orphans());
        let node_pool = POOLS.len() - 1;
        if self.slice != 0 && self.entries[node_pool].keys().any(|k| offset(k).is_some()) {
            let object = vec![format!("IPPool/{}", Objects::name(node_pool))];
            expected.push((Problem::SliceMismatch, object, None));
        }
        expected.sort();
        expected
    }

    /// What is wrong with one readable entry alone: its pod, its reservation.
    fn entry_problems(&self, network: &str, ip: IpAddr, alloc: &IPAllocation) -> Vec<Problem> {
        let mut problems = Vec::new();
        if alloc.podref.is_empty() {
            problems.push(Problem::Podless);
        }
        match self.reservation_named(&reservation::name(ip, network)) {
            None => problems.push(Problem::MissingReservation),
            Some(held) if !reservation::held_by(&held, &attachment_of(alloc)) => {
                problems.push(Problem::ReservationHolderDiffers)
            }
            Some(_) => {}
        }
        problems
    }

    /// The reservations no readable entry's address names.
    fn orphans(&self) -> Vec<Seen> {
        let accounted: BTreeSet<String> = (0..POOLS.len())
            .flat_map(|pool| {
                let (range, network, _) = POOLS[pool];
                let offsets = self.entries[pool].keys().filter_map(|k| offset(k));
                offsets.map(move |o| reservation::name(cidr(range).at(o), network))
            })
            .collect();
        let orphans = self.reservations.keys().filter(|n| !accounted.contains(*n));
        orphans
            .map(|name| {
                let object = vec![format!("OverlappingRangeIPReservation/{name}")];
                (Problem::OrphanReservation, object, None)
            })
            .collect()
    }

    /// The reservation named `name`, as the survey reads it.
    fn reservation_named(&self, name: &str) -> Option<OverlappingRangeIPReservation> {
        let spec = self.reservations.get(name)?;
        Some(OverlappingRangeIPReservation {
            metadata: meta(name.to_string()),
            spec: spec.clone(),
        })
    }
}

/// The offset a key names in a pool of 16 addresses: decimal digits, after a `+` sign if any
/// (as Go's strconv.ParseInt reads them).
fn offset(key: &str) -> Option<u128> {
    let key = key.strip_prefix('+').unwrap_or(key);
    let digits = !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| key.parse::<u128>().ok())
        .flatten()
        .filter(|&o| o < 16)
}

fn cidr(text: &str) -> Cidr {
    Cidr::parse(text, false).expect("a CIDR of the layout")
}

fn meta(name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        ..ObjectMeta::default()
    }
}

/// A key of a pool of 16 addresses: an offset, the same with leading zeros or a `+` sign, one
/// past the range, or a negative number (which no build reads).
fn key(b: u8) -> String {
    match b >> 6 {
        0 | 1 => (b % 16).to_string(),
        2 => format!("00{}", b % 16),
        _ if b & 1 == 0 => (16 + b % 32).to_string(),
        _ if b & 2 == 0 => format!("+{}", b % 16),
        _ => format!("-{}", b % 16),
    }
}

/// One of four attachments: its container, pod (or none) and interface.
fn holder(c: u8) -> IPAllocation {
    let who = c % 4;
    IPAllocation {
        id: format!("c{who}"),
        podref: if c & 0x10 == 0 {
            format!("ns/p{who}")
        } else {
            String::new()
        },
        ifname: if c & 0x20 == 0 { "eth0" } else { "net1" }.to_string(),
    }
}

/// An address of the IPv4 ranges (and past them), or of the IPv6 one.
fn address(family: u8, b: u8) -> IpAddr {
    match family & 1 {
        0 => IpAddr::from([10, 0, 0, b % 80]),
        _ => cidr("fd00::/120").at(u128::from(b % 24)),
    }
}
