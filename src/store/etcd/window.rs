//! A window of a pool's runs read in one request: the run at or before an offset and the next
//! few after it. The lowest-free search walks the window locally and reads another one only
//! when it walks past what it knows, so a typical allocation needs a single read.

use etcd_client::{GetOptions, KeyValue, SortOrder, SortTarget, TxnOp};

use super::keys::{range_end, Keys};
use super::runs::ReadRun;
use super::session::floor_get;

/// Runs fetched after the first one; more means fewer reads when the pool is fragmented.
pub const AHEAD: i64 = 32;

/// The two gets that read the window starting at `from`.
pub fn gets(keys: &Keys, pool: &str, from: u128) -> Vec<TxnOp> {
    let dir = keys.runs_dir(pool);
    let mut gets = vec![floor_get(&dir, &keys.run(pool, from))];
    match from.checked_add(1) {
        Some(next) => gets.push(TxnOp::get(
            keys.run(pool, next),
            Some(
                GetOptions::new()
                    .with_range(range_end(&dir))
                    .with_sort(SortTarget::Key, SortOrder::Ascend)
                    .with_limit(AHEAD),
            ),
        )),
        // Nothing can start after the last offset; read the floor twice to keep the shape.
        None => gets.push(floor_get(&dir, &keys.run(pool, from))),
    }
    gets
}

/// The window from `from`, from the answers to [`gets`] (the next two, consumed).
pub fn parse(from: u128, results: &mut impl Iterator<Item = Vec<KeyValue>>) -> Window {
    let runs = |kvs: Option<Vec<KeyValue>>| -> Vec<ReadRun> {
        kvs.unwrap_or_default()
            .iter()
            .filter_map(ReadRun::from_kv)
            .collect()
    };
    let floor = runs(results.next());
    let ahead = results.next().unwrap_or_default();
    let page_full = ahead.len() as i64 >= AHEAD;
    Window::of_runs(from, floor, runs(Some(ahead)), page_full)
}

/// What is known of a pool's runs between `from` and `to` (inclusive).
#[derive(Clone, Debug, Default)]
pub struct Window {
    from: u128,
    to: u128,
    runs: Vec<ReadRun>,
}

impl Window {
    /// The window from the run at or before `from` (if any) and the runs after it, as read or
    /// as the agent's copy holds them: `page_full` when [`AHEAD`] keys were read, counted before
    /// unreadable ones were left out (a full page may have more after it, so the window then
    /// ends with its last readable run). A page with no readable run at all says nothing of
    /// what follows: the search goes on past it, and a commit on an address an unreadable run
    /// covers loses on its record, which exists.
    pub fn of_runs(
        from: u128,
        mut runs: Vec<ReadRun>,
        ahead: Vec<ReadRun>,
        page_full: bool,
    ) -> Window {
        let ahead = if from == u128::MAX { Vec::new() } else { ahead };
        let to = match ahead.last() {
            Some(last) if page_full => last.run.end,
            _ => u128::MAX,
        };
        runs.extend(ahead);
        Window { from, to, runs }
    }

    pub fn knows(&self, offset: u128) -> bool {
        self.from <= offset && offset <= self.to
    }

    /// The run containing `offset`.
    pub fn covering(&self, offset: u128) -> Option<ReadRun> {
        self.runs
            .iter()
            .copied()
            .find(|r| r.run.start <= offset && offset <= r.run.end)
    }
}
