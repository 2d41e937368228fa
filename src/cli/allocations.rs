//! `whereabouts allocations [RANGE]`: every allocated address and who holds it.

use serde::Serialize;

use super::output::{print, OutputArgs};
use super::store_args::StoreArgs;
use crate::ipam::{parse_range_text, Cidr};
use crate::store::Allocation;

#[derive(clap::Args, Debug)]
pub struct AllocationsArgs {
    /// Only the addresses inside this CIDR (a range, a node's slice of it, a wider block), or
    /// of this pool (its name).
    pub range: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub format: OutputArgs,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct AllocationRow {
    pub address: String,
    pub pool: String,
    pub range: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub interface: String,
}

impl From<Allocation> for AllocationRow {
    fn from(l: Allocation) -> Self {
        AllocationRow {
            address: l.ip.to_string(),
            pool: l.pool,
            range: l.range.to_string(),
            pod: l.attachment.pod_ref.unwrap_or_default(),
            pod_uid: l.attachment.pod_uid.unwrap_or_default(),
            container: l.attachment.container_id,
            interface: l.attachment.ifname,
        }
    }
}

/// Whether `allocation` belongs to `filter` (a CIDR holding its address, or its pool's name):
/// a node-sliced range's addresses are in pools of the slices, each of its own range.
fn selected(allocation: &Allocation, filter: Option<&(String, Option<Cidr>)>) -> bool {
    match filter {
        None => true,
        Some((name, cidr)) => {
            allocation.pool == *name || cidr.is_some_and(|c| c.network().contains(allocation.ip))
        }
    }
}

pub fn rows(args: &AllocationsArgs) -> anyhow::Result<Vec<AllocationRow>> {
    let (_, store) = args.store.open()?;
    let filter = args
        .range
        .as_ref()
        .map(|r| (r.clone(), parse_range_text(r).ok().map(|(c, _, _)| c)));
    let mut allocations: Vec<Allocation> = store
        .allocations(None)
        .map_err(anyhow::Error::new)?
        .into_iter()
        .filter(|l| selected(l, filter.as_ref()))
        .collect();
    allocations.sort_by_key(|l| (l.pool.clone(), crate::ipam::addr::to_u128(l.ip)));
    Ok(allocations.into_iter().map(AllocationRow::from).collect())
}

pub fn run(args: AllocationsArgs) -> anyhow::Result<()> {
    let rows = rows(&args)?;
    print(
        args.format.output,
        &rows,
        &["ADDRESS", "POOL", "POD", "CONTAINER", "INTERFACE"],
        |r| {
            vec![
                r.address.clone(),
                r.pool.clone(),
                r.pod.clone(),
                r.container.clone(),
                r.interface.clone(),
            ]
        },
    )
}
