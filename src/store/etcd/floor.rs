//! The run at or before an offset: the greatest run key not above the offset's.
//!
//! etcd answers a range read in descending order by reading every key of the range and
//! sorting them; a limit of one only trims the answer. Over a whole pool's runs that costs the
//! members one read of every run below the offset, at each release, fold and search of a
//! fragmented pool. So the read first looks at the runs starting in the [`NEAR`] offsets up to
//! the offset, and reaches further back only when none starts there: a conditional
//! transaction nested in the read, so it is still one round trip and one revision.

use etcd_client::TxnOpResponse;
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, SortOrder, SortTarget, Txn, TxnOp};

use super::keys::Keys;

/// Offsets before the one asked about whose runs the read looks at first. A fragmented pool
/// has a run starting within a few offsets of any allocated one; a pool of long runs has few
/// keys, so reaching further back costs little there.
pub const NEAR: u128 = 64;

/// Where a floor read goes in its transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Among the operations of a transaction of reads at most [`super::session::MAX_READS`]
    /// long: the bounded read, which nests a transaction of one operation.
    Top,
    /// In a branch of a nested transaction, whose budget of operations its callers share out
    /// already: one plain descending read of every run below the offset.
    Branch,
}

/// A get of the greatest run key of `pool` not above `offset`'s; [`got`] reads its answer.
pub fn floor_get(keys: &Keys, pool: &str, offset: u128, level: Level) -> TxnOp {
    let dir = keys.runs_dir(pool);
    let mut end = keys.run(pool, offset).into_bytes();
    end.push(0);
    let near = offset.saturating_sub(NEAR - 1);
    if level == Level::Branch || near == 0 {
        return greatest(dir, end);
    }
    // A key that starts a run sorts after every key of an earlier offset, and the directory
    // holds nothing but run keys: the keys below `near` are those from `dir` up to it.
    let near = keys.run(pool, near);
    let none_near = Compare::version(near.clone(), CompareOp::Equal, 0).with_range(end.clone());
    TxnOp::txn(
        Txn::new()
            .when([none_near])
            .and_then([greatest(dir, near.clone().into_bytes())])
            .or_else([greatest(near, end)]),
    )
}

/// A get of the greatest key from `from` up to `end` (excluded).
fn greatest(from: String, end: Vec<u8>) -> TxnOp {
    TxnOp::get(
        from,
        Some(
            GetOptions::new()
                .with_range(end)
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(1),
        ),
    )
}

/// What a get found, or a [`floor_get`]'s nested read; `None` for the answer of anything else.
pub fn got(answer: TxnOpResponse) -> Option<Vec<KeyValue>> {
    match answer {
        TxnOpResponse::Get(mut get) => Some(get.take_kvs()),
        TxnOpResponse::Txn(txn) => match txn.op_responses().as_mut_slice() {
            [TxnOpResponse::Get(get)] => Some(get.take_kvs()),
            _ => None,
        },
        _ => None,
    }
}
