//! `whereabouts pools`: every pool with its range, how many addresses are used and free.

use std::collections::BTreeMap;

use serde::Serialize;

use super::output::{print, OutputArgs};
use super::store_args::StoreArgs;
use crate::ipam::Cidr;
use crate::plugin;

#[derive(clap::Args, Debug)]
pub struct PoolsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub format: OutputArgs,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct PoolRow {
    pub pool: String,
    pub range: String,
    pub used: u128,
    /// Free addresses; for a pool the configuration does not describe, the range's size less
    /// the network and broadcast addresses.
    pub free: u128,
    pub utilisation: f64,
}

fn default_capacity(cidr: &Cidr) -> u128 {
    cidr.last_offset().saturating_sub(1)
}

pub fn rows(args: &StoreArgs) -> anyhow::Result<Vec<PoolRow>> {
    let (cfg, store) = args.open()?;
    let mut pools: BTreeMap<String, (Cidr, u128, u128)> = BTreeMap::new();
    for pool in plugin::pools(&cfg).map_err(|e| anyhow::anyhow!(e.msg))? {
        pools.insert(pool.name.clone(), (pool.cidr(), pool.range.capacity(), 0));
    }
    for allocation in store.allocations(None).map_err(anyhow::Error::new)? {
        let entry = pools
            .entry(allocation.pool.clone())
            .or_insert_with(|| (allocation.range, default_capacity(&allocation.range), 0));
        entry.2 += 1;
    }
    Ok(pools
        .into_iter()
        .map(|(pool, (range, capacity, used))| PoolRow {
            pool,
            range: range.to_string(),
            used,
            free: capacity.saturating_sub(used),
            utilisation: if capacity == 0 {
                0.0
            } else {
                used as f64 / capacity as f64
            },
        })
        .collect())
}

pub fn run(args: PoolsArgs) -> anyhow::Result<()> {
    let rows = rows(&args.store)?;
    print(
        args.format.output,
        &rows,
        &["POOL", "RANGE", "USED", "FREE", "UTILISATION"],
        |r| {
            vec![
                r.pool.clone(),
                r.range.clone(),
                r.used.to_string(),
                r.free.to_string(),
                format!("{:.1}%", r.utilisation * 100.0),
            ]
        },
    )
}
