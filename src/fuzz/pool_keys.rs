//! The keys of an IPPool in upstream's format, read back and written, checked for agreement.

use std::net::IpAddr;

use crate::ipam::addr::{from_u128, to_u128};
use crate::ipam::Cidr;
use crate::k8s::crd::{IPAllocation, IPPool, IPPoolSpec};
use crate::store::kubernetes::pool_doc::PoolDoc;

/// A configured range, a pool's `spec.range` (its address anywhere, inside the range or not,
/// and either family), keys and offsets, all from the bytes. Keys count from the address of
/// `spec.range` (upstream writes host bits there), offsets from the range's network address;
/// near the top of a family's space the two overflow differently. A pool whose `spec.range`
/// is another network is refused; otherwise every key read names an address of the range at
/// its offset, every offset that has a key reads back from it, and only an offset below the
/// address of `spec.range` has none.
pub fn pool_keys(bytes: &[u8]) {
    let Some((cidr, spec_addr, numbers)) = layout(bytes) else {
        return;
    };
    let spec_range = format!("{spec_addr}/{}", cidr.prefix);
    let keys: Vec<String> = numbers.iter().map(|n| key_text(*n)).collect();
    let Ok(doc) = PoolDoc::new("p", cidr, Some(pool(&spec_range, &keys))) else {
        let spec = Cidr::parse(&spec_range, false).map(|c| c.network());
        assert_ne!(
            spec,
            Some(cidr.network()),
            "{spec_range} refused for {cidr}"
        );
        return;
    };
    for entry in doc.entries() {
        assert_eq!(
            cidr.network().offset_of(entry.ip),
            Some(entry.offset),
            "{entry:?}"
        );
        let key: u128 = entry.key.trim_start_matches('0').parse().unwrap_or(0);
        assert_eq!(doc.key_of(entry.offset), Some(key.to_string()), "{entry:?}");
    }
    for n in numbers {
        let offset = n & cidr.last_offset();
        let Some(key) = doc.key_of(offset) else {
            // Keys are not negative: only an address below that of spec.range has none.
            let below = Cidr::parse(&spec_range, false)
                .is_some_and(|spec| to_u128(cidr.network().at(offset)) < to_u128(spec.addr));
            assert!(below, "offset {offset} of {spec_range} has no key");
            continue;
        };
        let written = PoolDoc::new(
            "p",
            cidr,
            Some(pool(&spec_range, std::slice::from_ref(&key))),
        );
        let read = written.map(|doc| doc.entries()).unwrap_or_default();
        assert_eq!(
            read.len(),
            1,
            "key {key} of offset {offset} in {spec_range}"
        );
        assert_eq!(read[0].offset, offset, "key {key} in {spec_range}");
    }
}

/// The range (family, address, prefix), the address of `spec.range` (the range's base plus or
/// minus a number, or the other family's), and 16-byte numbers.
fn layout(bytes: &[u8]) -> Option<(Cidr, IpAddr, Vec<u128>)> {
    let (&kind, rest) = bytes.split_first()?;
    let v6 = kind & 1 != 0;
    let bits = if v6 { 128 } else { 32 };
    let mut numbers = rest.chunks(16).map(|chunk| {
        let mut n = [0u8; 16];
        n[16 - chunk.len()..].copy_from_slice(chunk);
        u128::from_be_bytes(n)
    });
    let addr = from_u128(numbers.next()?, v6);
    let prefix = (kind >> 1) % (bits + 1);
    let cidr = Cidr { addr, prefix }.network();
    let shift = spread(numbers.next().unwrap_or(0));
    let spec_addr = match (kind >> 5) & 3 {
        0 => from_u128(cidr.base().wrapping_add(shift), v6),
        1 => from_u128(cidr.base().wrapping_sub(shift), v6),
        2 => from_u128(shift, !v6),
        _ => cidr.addr,
    };
    Some((cidr, spec_addr, numbers.take(32).collect()))
}

/// A number of any magnitude: `n` without its low byte, shifted right by that byte (mod 128).
fn spread(n: u128) -> u128 {
    (n >> 8) >> (n & 0x7f)
}

/// A key upstream could have written for a number, or one it would not have: leading zeros,
/// past 2^128, or not a number.
fn key_text(n: u128) -> String {
    let value = spread(n);
    match (n >> 7) % 8 {
        0 => format!("00{value}"),
        1 => format!("{}0", u128::MAX),
        2 => value.to_string().replace('1', "x"),
        _ => value.to_string(),
    }
}

fn pool(range: &str, keys: &[String]) -> IPPool {
    let holder = IPAllocation {
        id: "c".to_string(),
        podref: "ns/pod".to_string(),
        ifname: "net1".to_string(),
    };
    IPPool {
        metadata: Default::default(),
        spec: IPPoolSpec {
            range: range.to_string(),
            allocations: keys.iter().map(|k| (k.clone(), holder.clone())).collect(),
        },
    }
}
