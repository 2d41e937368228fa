//! OverlappingRangeIPReservations: one object per address and network name, held by one
//! attachment, so an address is handed out once across all the ranges of a network name.

use std::net::IpAddr;

use kube::api::ObjectMeta;

use crate::ipam::names::{object_name, reservation_name};
use crate::k8s::crd::{OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec};
use crate::store::Attachment;

/// The object name of the reservation of `ip` (upstream's name when it is valid).
pub fn name(ip: IpAddr, network_name: &str) -> String {
    object_name(&reservation_name(ip, network_name))
}

pub fn new_object(name: &str, who: &Attachment) -> OverlappingRangeIPReservation {
    OverlappingRangeIPReservation {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        spec: spec_of(who),
    }
}

/// What a reservation held by `who` says.
fn spec_of(who: &Attachment) -> OverlappingRangeIPReservationSpec {
    OverlappingRangeIPReservationSpec {
        containerid: who.container_id.clone(),
        ifname: who.ifname.clone(),
        podref: who.pod_ref.clone().unwrap_or_default(),
    }
}

/// Whether the reservation names exactly `who`'s container and interface, as one `who`
/// created (or took over) does.
pub fn names_container(reservation: &OverlappingRangeIPReservation, who: &Attachment) -> bool {
    reservation.spec.containerid == who.container_id && reservation.spec.ifname == who.ifname
}

/// Whether the reservation belongs to `who`: the same pod (or, without a pod, the same
/// container) and interface. Reservations written by old upstream versions carry no interface
/// name, so an empty one matches any.
pub fn held_by(reservation: &OverlappingRangeIPReservation, who: &Attachment) -> bool {
    let spec = &reservation.spec;
    if !spec.ifname.is_empty() && spec.ifname != who.ifname {
        return false;
    }
    let same_pod = !spec.podref.is_empty() && who.pod_ref.as_deref() == Some(spec.podref.as_str());
    let same_container = !spec.containerid.is_empty() && spec.containerid == who.container_id;
    same_pod || same_container
}

/// Whether releasing the address of `who` deletes the reservation: it names `who`'s container
/// (or, naming none, as upstream's oldest do not, `who`'s pod) and interface. A reservation of
/// the same pod's other container is that sandbox's: a pod re-created under its name took it
/// over, and releasing the old sandbox's address must not take it away.
pub fn released_with(reservation: &OverlappingRangeIPReservation, who: &Attachment) -> bool {
    let spec = &reservation.spec;
    if spec.containerid.is_empty() {
        held_by(reservation, who)
    } else {
        spec.containerid == who.container_id
            && (spec.ifname.is_empty() || spec.ifname == who.ifname)
    }
}

/// When an ADD took the reservation over from an earlier sandbox of its pod (RFC 3339, the
/// node's clock). The sweeps of unbacked reservations judge their age from it: taken over, an
/// old object is as young as a new one whose pool entry is still on its way.
pub const TAKEN_OVER_AT: &str = "whereabouts.cni.cncf.io/taken-over-at";

/// `found`, held by `who` from now on (its container, pod and interface) and stamped with
/// [`TAKEN_OVER_AT`]; the rest of the object (its resourceVersion, the precondition of the
/// update, labels, owners) as read.
pub fn taken_over(
    found: &OverlappingRangeIPReservation,
    who: &Attachment,
) -> OverlappingRangeIPReservation {
    let mut object = found.clone();
    object.spec = spec_of(who);
    object.metadata.managed_fields = None;
    object
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(TAKEN_OVER_AT.into(), jiff::Timestamp::now().to_string());
    object
}

/// Whether an ADD of this build took the reservation over (it names its holder exactly since).
pub fn taken_over_ever(reservation: &OverlappingRangeIPReservation) -> bool {
    let annotations = reservation.metadata.annotations.as_ref();
    annotations.is_some_and(|a| a.contains_key(TAKEN_OVER_AT))
}

/// When the reservation was last given its holder, in seconds: made, or taken over since.
/// A take-over is dated by its stamp (the node's clock) and, where the server records one, by
/// the time of the object's last write (the server's): a node's clock behind the sweeper's
/// does not make a fresh take-over look old.
pub fn held_since(reservation: &OverlappingRangeIPReservation) -> Option<i64> {
    let meta = &reservation.metadata;
    let created = meta.creation_timestamp.as_ref().map(|t| t.0.as_second());
    let annotations = meta.annotations.as_ref();
    let Some(stamp) = annotations.and_then(|a| a.get(TAKEN_OVER_AT)) else {
        return created;
    };
    let stamped = stamp.parse::<jiff::Timestamp>().ok().map(|t| t.as_second());
    let written = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|entry| entry.time.as_ref())
        .map(|time| time.0.as_second())
        .max();
    created.max(stamped).max(written)
}

/// Whether reservation `name` is one of `ip` (in whichever network: the name ends with the
/// address as reservation names write it).
pub fn names_address(name: &str, ip: IpAddr) -> bool {
    let bare = reservation_name(ip, "");
    // Without a network name, an address written from a leading `::` gets a valid object
    // name of its own (`0--1` for `::1`).
    name == bare || name == object_name(&bare) || name.ends_with(&format!("-{bare}"))
}

/// The attachment a reservation names, as far as it records one.
pub fn holder(reservation: &OverlappingRangeIPReservation) -> Attachment {
    let spec = &reservation.spec;
    Attachment {
        container_id: spec.containerid.clone(),
        ifname: spec.ifname.clone(),
        pod_ref: Some(spec.podref.clone()),
        pod_uid: None,
    }
}

/// The identity of a reservation we created, to delete exactly that object again: its uid, and
/// its resourceVersion as we wrote it (the pod's next sandbox may take the same object over,
/// and then it is no longer ours to delete).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub name: String,
    pub uid: Option<String>,
    pub rv: Option<String>,
    /// Whom it named before this ADD took it over (an earlier sandbox of the pod, which may
    /// still hold the address through another pool of the network): taken back, it names them
    /// again instead of going.
    pub before: Option<Attachment>,
}

impl Held {
    pub fn of(reservation: &OverlappingRangeIPReservation) -> Held {
        Held {
            name: reservation.metadata.name.clone().unwrap_or_default(),
            uid: reservation.metadata.uid.clone(),
            rv: reservation.metadata.resource_version.clone(),
            before: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(container: &str, pod: Option<&str>, ifname: &str) -> Attachment {
        Attachment {
            container_id: container.into(),
            ifname: ifname.into(),
            pod_ref: pod.map(String::from),
            pod_uid: None,
        }
    }

    #[test]
    fn names_of_an_address_in_any_network() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (address, network) in [
            ("::1", ""),
            ("::1", "net"),
            ("10.0.0.1", ""),
            ("fd00::", ""),
        ] {
            let object = name(ip(address), network);
            assert!(names_address(&object, ip(address)), "{object} of {address}");
            assert!(!names_address(&object, ip("10.9.9.9")), "{object}");
        }
    }

    #[test]
    fn ownership() {
        let r = new_object("10.0.0.1", &who("c1", Some("ns/a"), "net1"));
        assert!(held_by(&r, &who("c1", Some("ns/a"), "net1")));
        assert!(held_by(&r, &who("c2", Some("ns/a"), "net1")));
        assert!(!held_by(&r, &who("c1", Some("ns/a"), "net2")));
        assert!(!held_by(&r, &who("c3", Some("ns/b"), "net1")));
        // Released only with its own container; the pod's other sandbox holds it otherwise.
        assert!(released_with(&r, &who("c1", Some("ns/a"), "net1")));
        assert!(!released_with(&r, &who("c2", Some("ns/a"), "net1")));
        assert!(!released_with(&r, &who("c1", Some("ns/a"), "net2")));
        assert_eq!(name("2001::".parse().unwrap(), ""), "2001--0");
        assert_eq!(name("::".parse().unwrap(), ""), "0--0");
    }

    #[test]
    fn a_reservations_address_is_read_from_its_name() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(names_address("10.0.0.1", ip("10.0.0.1")));
        assert!(names_address("blue-10.0.0.1", ip("10.0.0.1")));
        assert!(!names_address("blue-110.0.0.1", ip("10.0.0.1")));
        assert!(!names_address("10.0.0.11", ip("10.0.0.1")));
        assert!(names_address("net-fd00--1", ip("fd00::1")));
    }
}
