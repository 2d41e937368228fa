//! The embedded default engine: a SQLite database on the local machine.
//!
//! One short-lived process per CNI call, so every write is one `BEGIN IMMEDIATE` transaction:
//! the write lock is taken before anything is read, the choice is made on what cannot change
//! underneath, and a process killed at any point leaves either all of its change or none of it.
//! WAL mode keeps readers (CHECK, the CLI) off the writers' path.

mod runs;
mod schema;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, Transaction, TransactionBehavior};

use crate::ipam::addr::from_u128;
use crate::ipam::{decide, Ask, Cidr, Contention, Decision, Range, Snapshot};
use crate::store::{
    AddRequest, Allocation, Attachment, AttachmentRequest, GcRequest, PoolRef, RangeRequest, Store,
    StoreError,
};

pub use schema::{BUSY_TIMEOUT, SCHEMA_VERSION, WAL_TRIM_BYTES};

/// Opens (creating if needed) the database at `path`.
pub fn open(path: &Path) -> Result<Box<dyn Store>, StoreError> {
    Ok(Box::new(LocalStore::open(path)?))
}

/// A failure inside the engine, turned into a [`StoreError`] naming the database at the edge.
#[derive(Debug)]
pub(crate) enum Fail {
    Sql(rusqlite::Error),
    /// Already a store error (exhausted, in use): passed through unchanged.
    Store(StoreError),
    /// An I/O or consistency problem described in words.
    Msg(String),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

/// How long STATUS waits for another process's write lock before taking it as a sign of life.
const STATUS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Whether SQLite gave up waiting for another process's lock, or (SQLITE_PROTOCOL) for the
/// WAL's locks, which it tries many times before giving up under heavy contention.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::FileLockingProtocolFailed
        )
    )
}

/// Failures that may clear by themselves: a full disk, an I/O error, a read-only remount.
fn is_transient(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DiskFull | ErrorCode::SystemIoFailure | ErrorCode::ReadOnly)
    )
}

/// A database that will not work again without an admin.
fn is_broken(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn to_store_error(path: &Path, fail: Fail) -> StoreError {
    match fail {
        Fail::Store(e) => e,
        Fail::Sql(e) if is_busy(&e) => StoreError::try_again(format!(
            "local database {} is busy: another process held its lock for over {} s",
            path.display(),
            BUSY_TIMEOUT.as_secs()
        ))
        .because(e),
        Fail::Sql(e) if is_transient(&e) => StoreError::try_again(format!(
            "local database {} cannot be written (the disk may be full or read-only)",
            path.display()
        ))
        .because(e),
        Fail::Sql(e) if is_broken(&e) => StoreError::broken(format!(
            "local database {} is damaged; a new one knows none of the addresses this node's pods \
             hold: drain the node and stop its container runtime before moving it aside, with \
             its -wal and -shm files",
            path.display()
        ))
        .because(e),
        // SQLite's own kind of failure (`CannotOpen`, `ReadOnly`, `SystemIoFailure`) is told;
        // its message, which may quote a statement or a path, is the log's.
        Fail::Sql(e) => {
            let kind = e.sqlite_error_code().map(|code| format!(": {code:?}"));
            let what = format!(
                "local database {}{}",
                path.display(),
                kind.unwrap_or_default()
            );
            StoreError::io(what).because(e)
        }
        Fail::Msg(m) => StoreError::io(format!("local database {}: {m}", path.display())),
    }
}

/// The SQLite engine. Public beyond [`open`] for benchmarks and tests that need to build large
/// pools quickly ([`LocalStore::import`]) or audit the database ([`LocalStore::audit`]).
pub struct LocalStore {
    conn: Connection,
    path: PathBuf,
}

/// A pool as recorded in the `pools` table.
struct PoolRow {
    name: String,
    cidr: Cidr,
}

/// One allocation row, with its pool's prefix.
struct AllocRow {
    pool: String,
    cidr: Cidr,
    offset: u128,
    network_name: String,
    cni_network: String,
    attachment: Attachment,
}

impl AllocRow {
    /// [`AllocRow::from_row`] for columns starting at `start`.
    fn from_row_at(row: &Row<'_>, start: usize) -> rusqlite::Result<AllocRow> {
        let col = |i: usize| start + i;
        let base = runs::unblob(row.get(col(2))?);
        let prefix: u8 = row.get(col(3))?;
        let v6: bool = row.get(col(4))?;
        Ok(AllocRow {
            pool: row.get(col(0))?,
            offset: runs::unblob(row.get(col(1))?),
            cidr: Cidr {
                addr: from_u128(base, v6),
                prefix,
            },
            network_name: row.get(col(5))?,
            cni_network: row.get(col(6))?,
            attachment: Attachment {
                container_id: row.get(col(7))?,
                ifname: row.get(col(8))?,
                pod_ref: row.get(col(9))?,
                pod_uid: row.get(col(10))?,
            },
        })
    }

    /// Columns selected by [`ALLOC_COLUMNS`], in that order.
    fn from_row(row: &Row<'_>) -> rusqlite::Result<AllocRow> {
        AllocRow::from_row_at(row, 0)
    }

    fn allocation(self) -> Allocation {
        Allocation {
            ip: self.cidr.at(self.offset),
            pool: self.pool,
            range: self.cidr,
            network_name: self.network_name,
            cni_network: Some(self.cni_network),
            slice_node: None,
            attachment: self.attachment,
        }
    }
}

/// The columns [`AllocRow::from_row`] reads, from `allocations a JOIN pools p`.
const ALLOC_COLUMNS: &str = "a.pool, a.off, p.base, p.prefix, p.v6, a.network_name, \
     a.cni_network, a.container_id, a.ifname, a.pod_ref, a.pod_uid \
     FROM allocations a JOIN pools p ON p.name = a.pool";

impl LocalStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<LocalStore, StoreError> {
        let conn = schema::connect(path).map_err(|f| to_store_error(path, f))?;
        Ok(LocalStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write, as an ADD makes: a full or read-only disk shows here. A lock held by another
    /// process means writes are going through; waiting for it would only delay STATUS. It
    /// writes back the schema version it reads under the lock: the one STATUS checked before
    /// may have been raised meanwhile by a newer binary's migration, which must not run again.
    fn probe_write(&self) -> Result<(), StoreError> {
        let probe = || -> Result<(), rusqlite::Error> {
            self.conn.busy_timeout(STATUS_LOCK_WAIT)?;
            let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
            let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            tx.execute_batch(&format!("PRAGMA user_version = {version}"))?;
            tx.commit()
        };
        let outcome = probe();
        let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
        match outcome {
            Err(e) if !is_busy(&e) => Err(self.err(e.into())),
            // Each probe adds a page to the WAL: a runtime asking every few seconds on a quiet
            // node would grow it, and every process would read more of it, as after writes.
            _ => {
                schema::trim_wal(&self.conn, &self.path);
                Ok(())
            }
        }
    }

    fn err(&self, fail: Fail) -> StoreError {
        to_store_error(&self.path, fail)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, committed only if `f` succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        let run = || -> Result<T, Fail> {
            let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        };
        let out = run().map_err(|f| self.err(f))?;
        schema::trim_wal(&self.conn, &self.path);
        Ok(out)
    }

    /// Runs `f` in one read transaction, so it sees a single snapshot.
    fn read<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        let run = || -> Result<T, Fail> {
            let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Deferred)?;
            f(&tx)
        };
        run().map_err(|f| self.err(f))
    }

    /// Records many allocations of one pool in one transaction (for benchmarks and tests that
    /// need a pool with a million entries). Offsets already held are left as they are. Returns
    /// how many were added.
    pub fn import(
        &self,
        pool: &PoolRef,
        network_name: &str,
        cni_network: &str,
        allocations: impl IntoIterator<Item = (u128, Attachment)>,
    ) -> Result<u64, StoreError> {
        self.write(|tx| {
            ensure_pool(tx, pool, network_name)?;
            let mut stmt = tx.prepare(
                "INSERT OR IGNORE INTO allocations (pool, off, ip, network_name, cni_network, \
                 container_id, ifname, pod_ref, pod_uid, created) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, CAST(strftime('%s','now') AS INTEGER))",
            )?;
            let mut added = 0;
            for (offset, who) in allocations {
                if offset > pool.cidr().last_offset() {
                    return Err(Fail::Store(StoreError::config(format!(
                        "offset {offset} is outside range {}",
                        pool.cidr()
                    ))));
                }
                added += stmt.execute((
                    &pool.name,
                    runs::blob(offset),
                    pool.cidr().at(offset).to_string(),
                    network_name,
                    cni_network,
                    &who.container_id,
                    &who.ifname,
                    &who.pod_ref,
                    &who.pod_uid,
                ))? as u64;
            }
            runs::rebuild(tx, &pool.name)?;
            Ok(added)
        })
    }

    /// Checks the database for damage: SQLite's own integrity check, every pool's runs against
    /// its allocations, and every recorded address against its offset. Returns the problems
    /// found (empty when sound).
    pub fn audit(&self) -> Result<Vec<String>, StoreError> {
        self.read(|tx| {
            let mut problems = Vec::new();
            let mut stmt = tx.prepare("PRAGMA integrity_check")?;
            for line in stmt.query_map([], |row| row.get::<_, String>(0))? {
                let line = line?;
                if line != "ok" {
                    problems.push(format!("integrity_check: {line}"));
                }
            }
            let names: Vec<String> = tx
                .prepare("SELECT name FROM pools UNION SELECT DISTINCT pool FROM allocations")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            for name in names {
                if pool_row(tx, &name)?.is_none() {
                    problems.push(format!("allocations of pool {name} without a pools row"));
                }
                if runs::derive(tx, &name)? != runs::stored(tx, &name)? {
                    problems.push(format!("runs of pool {name} differ from its allocations"));
                }
            }
            let mut stmt = tx.prepare(&format!("SELECT a.ip, {ALLOC_COLUMNS}"))?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let ip: String = row.get(0)?;
                let alloc = AllocRow::from_row_at(row, 1)?;
                let expected = alloc.cidr.at(alloc.offset).to_string();
                if ip != expected || alloc.offset > alloc.cidr.last_offset() {
                    problems.push(format!(
                        "pool {} offset {} records {ip}, expected {expected}",
                        alloc.pool, alloc.offset
                    ));
                }
            }
            Ok(problems)
        })
    }
}

/// Records the pool (its prefix and network) so overlap checks and the CLI can find it.
///
/// A pool's name is the network's name and the range's text joined by `-`, which two pairs can
/// share (`a` with `2001:db8::/64`, `a-2001` with `db8::/64`): a pool recorded for another
/// pair is refused while it holds an address, or the two would hand out each other's
/// addresses. Once it holds none it is recorded again for the pair asking: the first pair to
/// use a name on a node (another namespace's network, perhaps) must not keep it from the other
/// for ever.
fn ensure_pool(tx: &Connection, pool: &PoolRef, network_name: &str) -> Result<(), Fail> {
    let cidr = pool.cidr().network();
    // One read in the usual case: the pool is recorded already.
    let recorded: Option<(String, String)> = tx
        .prepare_cached("SELECT network_name, cidr FROM pools WHERE name = ?1")?
        .query_row([&pool.name], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    match recorded {
        Some((network, range)) if network == network_name && range == cidr.to_string() => Ok(()),
        Some((_, range)) if holds_any(tx, &pool.name)? => {
            Err(Fail::Store(StoreError::config(format!(
                "pool {} is already that of range {range} of another network_name: range {cidr} \
                 with this ipam.network_name gives the same pool name; it is this range's once \
                 the other holds no address on this node, or choose another ipam.network_name",
                pool.name
            ))))
        }
        // Not recorded, or recorded for another pair and empty: recorded for this one.
        _ => {
            tx.prepare_cached(
                "INSERT INTO pools (name, network_name, cidr, base, prefix, v6) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (name) DO UPDATE SET network_name = excluded.network_name, \
                 cidr = excluded.cidr, base = excluded.base, prefix = excluded.prefix, \
                 v6 = excluded.v6",
            )?
            .execute((
                &pool.name,
                network_name,
                cidr.to_string(),
                runs::blob(cidr.base()),
                cidr.prefix,
                cidr.is_v6(),
            ))?;
            Ok(())
        }
    }
}

/// Whether the pool `name` holds an address (its runs follow its allocations).
fn holds_any(tx: &Connection, name: &str) -> Result<bool, Fail> {
    let held = tx
        .prepare_cached("SELECT 1 FROM allocations WHERE pool = ?1 LIMIT 1")?
        .query_row([name], |_| Ok(()))
        .optional()?;
    Ok(held.is_some())
}

fn pool_row(tx: &Connection, name: &str) -> Result<Option<PoolRow>, Fail> {
    let row = tx
        .prepare_cached("SELECT base, prefix, v6 FROM pools WHERE name = ?1")?
        .query_row([name], |row| {
            let base = runs::unblob(row.get(0)?);
            Ok(Cidr {
                addr: from_u128(base, row.get(2)?),
                prefix: row.get(1)?,
            })
        })
        .optional()?;
    Ok(row.map(|cidr| PoolRow {
        name: name.to_string(),
        cidr,
    }))
}

const NETWORK_POOLS_QUERY: &str =
    "SELECT name, base, prefix FROM pools WHERE network_name = ?1 AND v6 = ?2 AND name <> ?3";

/// The other pools of `network_name` whose prefix shares addresses with `cidr`.
fn overlapping_pools(
    tx: &Connection,
    own: &str,
    network_name: &str,
    cidr: Cidr,
) -> Result<Vec<PoolRow>, Fail> {
    let mut stmt = tx.prepare_cached(NETWORK_POOLS_QUERY)?;
    let rows = stmt.query_map((network_name, cidr.is_v6(), own), |row| {
        let base = runs::unblob(row.get(1)?);
        Ok(PoolRow {
            name: row.get(0)?,
            cidr: Cidr {
                addr: from_u128(base, cidr.is_v6()),
                prefix: row.get(2)?,
            },
        })
    })?;
    let mut pools = Vec::new();
    for pool in rows {
        let pool = pool?;
        if pool.cidr.overlaps(&cidr) {
            pools.push(pool);
        }
    }
    Ok(pools)
}

const HOLDER_QUERY: &str =
    "SELECT container_id, ifname, pod_ref, pod_uid FROM allocations WHERE pool = ?1 AND off = ?2";

/// The attachment holding `offset` of `pool`, if any.
fn holder(tx: &Connection, pool: &str, offset: u128) -> Result<Option<Attachment>, Fail> {
    Ok(tx
        .prepare_cached(HOLDER_QUERY)?
        .query_row((pool, runs::blob(offset)), |row| {
            Ok(Attachment {
                container_id: row.get(0)?,
                ifname: row.get(1)?,
                pod_ref: row.get(2)?,
                pod_uid: row.get(3)?,
            })
        })
        .optional()?)
}

/// Candidates for [`owned`]. Looked up through the container and pod indexes (the unary `+`
/// keeps SQLite from scanning the whole pool by its primary key instead), so the cost does not
/// grow with the pool.
const OWNED_QUERY: &str = "\
    SELECT off, container_id, ifname, pod_ref, pod_uid FROM allocations \
    WHERE container_id = ?3 AND ifname = ?2 AND +pool = ?1 \
    UNION \
    SELECT off, container_id, ifname, pod_ref, pod_uid FROM allocations \
    WHERE pod_ref = ?4 AND ifname = ?2 AND +pool = ?1 \
    ORDER BY off";

/// The offsets of `pool` held by the same owner as `who` ([`Attachment::same_owner`]), lowest
/// first.
fn owned(tx: &Connection, pool: &str, who: &Attachment) -> Result<Vec<(u128, Attachment)>, Fail> {
    let mut stmt = tx.prepare_cached(OWNED_QUERY)?;
    let rows = stmt.query_map(
        (pool, &who.ifname, &who.container_id, &who.pod_ref),
        |row| {
            Ok((
                runs::unblob(row.get(0)?),
                Attachment {
                    container_id: row.get(1)?,
                    ifname: row.get(2)?,
                    pod_ref: row.get(3)?,
                    pod_uid: row.get(4)?,
                },
            ))
        },
    )?;
    let mut held = Vec::new();
    for item in rows {
        let item = item?;
        if item.1.same_owner(who) {
            held.push(item);
        }
    }
    Ok(held)
}

fn insert_allocation(
    tx: &Connection,
    pool: &PoolRef,
    offset: u128,
    req: &AddRequest,
) -> Result<(), Fail> {
    let who = &req.attachment;
    tx.prepare_cached(
        "INSERT INTO allocations (pool, off, ip, network_name, cni_network, container_id, \
         ifname, pod_ref, pod_uid, created) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, CAST(strftime('%s','now') AS INTEGER))",
    )?
    .execute((
        &pool.name,
        runs::blob(offset),
        pool.range.ip(offset).to_string(),
        &req.network_name,
        &req.cni_network,
        &who.container_id,
        &who.ifname,
        &who.pod_ref,
        &who.pod_uid,
    ))?;
    runs::insert(tx, &pool.name, offset)
}

fn delete_allocation(tx: &Connection, pool: &str, offset: u128) -> Result<(), Fail> {
    let deleted = tx
        .prepare_cached("DELETE FROM allocations WHERE pool = ?1 AND off = ?2")?
        .execute((pool, runs::blob(offset)))?;
    if deleted > 0 {
        runs::remove(tx, pool, offset)?;
    }
    Ok(())
}

/// Hands the existing allocation to the attachment asking again: a restarted sandbox has a new
/// container ID (and possibly pod UID) but is the same owner. It may come through another
/// network configuration of the same range: GC of the one it came through before does not list
/// it, so the allocation follows.
fn refresh_owner(tx: &Connection, pool: &str, offset: u128, req: &AddRequest) -> Result<(), Fail> {
    let who = &req.attachment;
    tx.prepare_cached(
        "UPDATE allocations SET container_id = ?3, pod_uid = COALESCE(?4, pod_uid), \
         pod_ref = COALESCE(?5, pod_ref), cni_network = ?6 WHERE pool = ?1 AND off = ?2",
    )?
    .execute((
        pool,
        runs::blob(offset),
        &who.container_id,
        &who.pod_uid,
        &who.pod_ref,
        &req.cni_network,
    ))?;
    Ok(())
}

/// Where an offset of `range` falls in another pool, if inside it.
fn offset_in(range: &Range, offset: u128, other: &Cidr) -> Option<u128> {
    other.offset_of(range.ip(offset))
}

/// The end of the taken block containing `offset` of `pool`, counting the pool's own runs and,
/// for overlapping ranges, the runs of `others` mapped back into this range (clipped to it), so
/// collisions with other pools are also skipped a whole run at a time.
fn taken_until(
    tx: &Connection,
    pool: &PoolRef,
    others: &[PoolRow],
    offset: u128,
) -> Result<Option<u128>, Fail> {
    let mut end = runs::end_of_run(tx, &pool.name, offset)?;
    let cidr = pool.cidr();
    for other in others {
        let Some(there) = offset_in(&pool.range, offset, &other.cidr) else {
            continue;
        };
        if let Some(hi) = runs::end_of_run(tx, &other.name, there)? {
            // hi >= there, so the absolute address is >= ours, and fits: it is inside `other`.
            let absolute = other.cidr.base() + hi;
            let back = (absolute - cidr.base()).min(cidr.last_offset());
            end = Some(end.map_or(back, |e| e.max(back)));
        }
    }
    Ok(end)
}

/// One pool as the ADD's transaction sees it, for [`crate::ipam::decide`].
struct PoolView<'a> {
    tx: &'a Connection,
    pool: &'a PoolRef,
    /// Pools of the same network overlapping this one (empty without overlap).
    others: Vec<PoolRow>,
    who: &'a Attachment,
}

impl Snapshot for PoolView<'_> {
    /// The holder, and the range it holds the address through.
    type Holder = (Attachment, String);
    type Error = Fail;

    fn owned(&mut self) -> Result<Vec<u128>, Fail> {
        let held = owned(self.tx, &self.pool.name, self.who)?;
        Ok(held.into_iter().map(|(offset, _)| offset).collect())
    }

    fn holder(&mut self, offset: u128) -> Result<Option<(Attachment, String)>, Fail> {
        let range = &self.pool.range;
        if let Some(h) = holder(self.tx, &self.pool.name, offset)? {
            if !h.same_owner(self.who) {
                return Ok(Some((h, range.to_string())));
            }
        }
        for other in &self.others {
            if let Some(there) = offset_in(range, offset, &other.cidr) {
                if let Some(h) = holder(self.tx, &other.name, there)? {
                    if !h.same_owner(self.who) {
                        return Ok(Some((h, other.cidr.to_string())));
                    }
                }
            }
        }
        Ok(None)
    }

    fn taken_until(&mut self, offset: u128) -> Result<Option<u128>, Fail> {
        taken_until(self.tx, self.pool, &self.others, offset)
    }
}

/// Allocates (or finds) the address of one range of an ADD, inside the ADD's transaction: the
/// core decides, this commits.
fn add_one(
    tx: &Connection,
    req: &AddRequest,
    wanted: &RangeRequest,
    slept: &mut bool,
) -> Result<IpAddr, Fail> {
    let pool = &wanted.pool;
    let range = &pool.range;
    ensure_pool(tx, pool, &req.network_name)?;
    if let Some(offset) = wanted.requested {
        if offset > pool.cidr().last_offset() {
            return Err(Fail::Store(StoreError::config(format!(
                "requested offset {offset} is outside range {}",
                pool.cidr()
            ))));
        }
    }
    let others = if req.overlap {
        overlapping_pools(tx, &pool.name, &req.network_name, pool.cidr())?
    } else {
        Vec::new()
    };
    let mut view = PoolView {
        tx,
        pool,
        others,
        who: &req.attachment,
    };
    let ask = Ask {
        requested: wanted.requested,
        contention: Contention::None,
        // Go binaries never write the local store: the whole range is ours.
        limit: None,
    };
    let decision = decide(range, &ask, &mut view)?;
    if req.sleep_for_race > 0 && !*slept {
        *slept = true;
        std::thread::sleep(Duration::from_secs(req.sleep_for_race));
    }
    commit(tx, req, pool, decision)
}

/// Writes what the core decided for `pool`: the address taken, moved to or kept (its owner
/// refreshed), and the releases that go with it; a refusal as the error it is.
fn commit(
    tx: &Connection,
    req: &AddRequest,
    pool: &PoolRef,
    decision: Decision<(Attachment, String)>,
) -> Result<IpAddr, Fail> {
    let range = &pool.range;
    let (chosen, release, kept) = match decision {
        Decision::Keep { offset, release } => (offset, release, true),
        Decision::Take { offset } => (offset, Vec::new(), false),
        Decision::Move { to, release } => (to, release, false),
        // Held through an overlapping range: the error names that range.
        Decision::InUse {
            offset,
            holder: (holder, range),
        } => {
            return Err(Fail::Store(StoreError::InUse {
                ip: pool.range.ip(offset),
                range,
                holder: holder.describe(),
            }))
        }
        // Not asked for (no limit), so never beyond it.
        refusal => {
            let refusal = refusal.map_holder(|(holder, _)| holder.describe());
            let limit = "the offsets this pool may hold";
            return Err(Fail::Store(StoreError::refusing(range, refusal, limit)));
        }
    };
    for offset in release {
        delete_allocation(tx, &pool.name, offset)?;
    }
    if kept {
        refresh_owner(tx, &pool.name, chosen, req)?;
    } else {
        insert_allocation(tx, pool, chosen, req)?;
    }
    Ok(range.ip(chosen))
}

impl Store for LocalStore {
    fn add(&self, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError> {
        self.write(|tx| {
            let mut slept = false;
            req.ranges
                .iter()
                .map(|wanted| add_one(tx, req, wanted, &mut slept))
                .collect()
        })
    }

    fn del(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        self.write(|tx| {
            // Every pool of the database, not only the configured ones: a configuration that
            // changed since the ADD must not leak the old addresses.
            let held = select_allocations(tx, BY_ATTACHMENT, (&req.container_id, &req.ifname))?;
            for alloc in &held {
                delete_allocation(tx, &alloc.pool, alloc.offset)?;
            }
            Ok(held.into_iter().map(AllocRow::allocation).collect())
        })
    }

    fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        self.read(|tx| {
            let pools: HashSet<&str> = req.pools.iter().map(|p| p.name.as_str()).collect();
            let held = select_allocations(tx, BY_ATTACHMENT, (&req.container_id, &req.ifname))?;
            Ok(held
                .into_iter()
                .filter(|a| pools.contains(a.pool.as_str()))
                .map(AllocRow::allocation)
                .collect())
        })
    }

    fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
        self.write(|tx| {
            let valid: HashSet<(&str, &str)> = req
                .valid
                .iter()
                .map(|(c, i)| (c.as_str(), i.as_str()))
                .collect();
            let recorded = select_allocations(tx, BY_CNI_NETWORK, [&req.cni_network])?;
            let mut released = Vec::new();
            for alloc in recorded {
                let key = (
                    alloc.attachment.container_id.as_str(),
                    alloc.attachment.ifname.as_str(),
                );
                if !valid.contains(&key) {
                    delete_allocation(tx, &alloc.pool, alloc.offset)?;
                    released.push(alloc.allocation());
                }
            }
            Ok(released)
        })
    }

    fn status(&self) -> Result<(), StoreError> {
        self.read(|tx| {
            let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            if version != SCHEMA_VERSION {
                return Err(Fail::Msg(format!(
                    "schema version {version}, expected {SCHEMA_VERSION}"
                )));
            }
            tx.query_row("SELECT count(*) FROM pools", [], |row| row.get::<_, i64>(0))?;
            Ok(())
        })?;
        self.probe_write()?;
        let verdict: String = self
            .conn
            .query_row("PRAGMA quick_check(1)", [], |row| row.get(0))
            .map_err(|e| self.err(e.into()))?;
        if verdict != "ok" {
            return Err(StoreError::broken(format!(
                "local database {} fails its integrity check: {}",
                self.path.display(),
                crate::files::shown(&verdict)
            )));
        }
        Ok(())
    }

    fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
        self.read(|tx| {
            let rows = match pool {
                Some(name) => select_allocations(tx, "WHERE a.pool = ?1", [name])?,
                None => select_allocations(tx, "", [])?,
            };
            Ok(rows.into_iter().map(AllocRow::allocation).collect())
        })
    }

    fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError> {
        self.write(|tx| {
            let Some(row) = pool_row(tx, pool)? else {
                return Ok(None);
            };
            let Some(offset) = row.cidr.offset_of(ip) else {
                return Ok(None);
            };
            let mut held = select_allocations(
                tx,
                "WHERE a.pool = ?1 AND a.off = ?2",
                (&row.name, runs::blob(offset)),
            )?;
            let Some(alloc) = held.pop() else {
                return Ok(None);
            };
            if holder.is_some_and(|who| !who.same_attachment(&alloc.attachment)) {
                return Ok(None);
            }
            delete_allocation(tx, &alloc.pool, alloc.offset)?;
            Ok(Some(alloc.allocation()))
        })
    }
}

/// Filters for [`select_allocations`].
const BY_ATTACHMENT: &str = "WHERE a.container_id = ?1 AND a.ifname = ?2";
const BY_CNI_NETWORK: &str = "WHERE a.cni_network = ?1";

fn select_allocations(
    tx: &Connection,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<AllocRow>, Fail> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {ALLOC_COLUMNS} {filter} ORDER BY a.pool, a.off"
    ))?;
    let rows = stmt
        .query_map(params, AllocRow::from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::OffsetRuns;
    use rand::Rng;

    fn memory() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::SCHEMA).unwrap();
        conn
    }

    /// Lock contention that clears by itself is "try again" (11), not an I/O failure (5).
    #[test]
    fn lock_contention_is_worth_another_try() {
        for code in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_PROTOCOL,
        ] {
            let e = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
            let err = to_store_error(Path::new("/x.db"), Fail::Sql(e));
            assert!(
                matches!(err, StoreError::TryAgain { .. }),
                "{code}: {err:?}"
            );
        }
    }

    /// SQLite's kind of failure reaches the runtime; its message (which may quote a statement
    /// or a path) and the database's path only the log.
    #[test]
    fn a_database_failure_is_told_by_its_kind() {
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some("cannot open /var/lib/secret/x.db".into()),
        );
        let err = to_store_error(Path::new("/var/lib/secret/x.db"), Fail::Sql(e));
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert!(err.public().contains(": CannotOpen"), "{}", err.public());
        assert!(!err.public().contains("cannot open"), "{}", err.public());
        assert!(
            err.describe().contains("cannot open /var/lib/secret"),
            "{}",
            err.describe()
        );
    }

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let values: Vec<i64> = (0..stmt.parameter_count() as i64).collect();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), |row| {
                row.get::<_, String>(3)
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
    }

    /// STATUS's probe write keeps the schema version it finds, though its check read an older
    /// one: a newer binary's migration in between is not undone.
    #[test]
    fn the_probe_write_keeps_a_newer_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("w.db")).unwrap();
        let newer = SCHEMA_VERSION + 1;
        store
            .conn
            .execute_batch(&format!("PRAGMA user_version = {newer}"))
            .unwrap();
        store.probe_write().unwrap();
        let version: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, newer);
    }

    /// The queries on the allocation path answer through an index, never by walking a pool:
    /// that is what keeps an ADD as cheap in a full /8 as in an empty /24.
    #[test]
    fn hot_queries_use_indexes() {
        let conn = memory();
        let owned = plan(&conn, OWNED_QUERY);
        assert!(owned.contains("allocations_by_container"), "{owned}");
        assert!(owned.contains("allocations_by_pod"), "{owned}");
        for (sql, index) in [
            (runs::RUN_AT_OR_BEFORE, "PRIMARY KEY (pool=? AND lo<?)"),
            (HOLDER_QUERY, "PRIMARY KEY (pool=? AND off=?)"),
            (NETWORK_POOLS_QUERY, "pools_by_network"),
            (
                &format!("SELECT {ALLOC_COLUMNS} {BY_ATTACHMENT}"),
                "allocations_by_container",
            ),
            (
                &format!("SELECT {ALLOC_COLUMNS} {BY_CNI_NETWORK}"),
                "allocations_by_cni_network",
            ),
        ] {
            let got = plan(&conn, sql);
            assert!(got.contains(index), "{sql}: {got}");
            assert!(!got.contains("SCAN"), "{sql}: {got}");
        }
    }

    /// The runs table follows random inserts and removals exactly like the in-memory model.
    #[test]
    fn runs_match_the_model() {
        let conn = memory();
        let mut model = OffsetRuns::new();
        let seed = std::env::var("WHEREABOUTS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("seed {seed} (WHEREABOUTS_TEST_SEED={seed} replays this run)");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let edges = [0, 1, u128::MAX - 1, u128::MAX];
        for step in 0..3000 {
            let offset = if step % 10 == 0 {
                edges[rng.random_range(0..edges.len())]
            } else {
                rng.random_range(0..64u128)
            };
            if model.contains(offset) {
                model.remove(offset);
                runs::remove(&conn, "p", offset).unwrap();
            } else {
                model.insert(offset);
                runs::insert(&conn, "p", offset).unwrap();
            }
            if step % 50 == 0 {
                let stored = runs::stored(&conn, "p").unwrap();
                let mut expected: Vec<(u128, u128)> = Vec::new();
                for o in model.iter() {
                    match expected.last_mut() {
                        Some(last) if last.1 + 1 == o => last.1 = o,
                        _ => expected.push((o, o)),
                    }
                }
                assert_eq!(stored, expected, "after step {step}");
                for probe in edges.iter().copied().chain(0..64) {
                    assert_eq!(
                        runs::end_of_run(&conn, "p", probe).unwrap(),
                        model.run_containing(probe),
                        "probe {probe}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_lock_held_too_long_is_try_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wb.db");
        let store = LocalStore::open(&path).unwrap();
        store.conn.busy_timeout(Duration::from_millis(50)).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = store
            .release("p", "10.0.0.1".parse().unwrap(), None)
            .unwrap_err();
        assert!(matches!(err, StoreError::TryAgain { .. }), "{err}");
        assert!(err.to_string().contains("wb.db"), "{err}");
        // Readers are not blocked by a writer in WAL mode.
        store.allocations(None).unwrap();
        store.status().unwrap();
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(
            store
                .release("p", "10.0.0.1".parse().unwrap(), None)
                .unwrap(),
            None
        );
    }

    /// STATUS writes a page with each probe; the WAL is trimmed as after any write.
    #[test]
    fn status_probes_keep_the_wal_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wb.db");
        let store = LocalStore::open(&path).unwrap();
        let wal = dir.path().join("wb.db-wal");
        let mut longest = 0;
        for _ in 0..2 * schema::WAL_TRIM_BYTES / 4096 {
            store.status().unwrap();
            longest = longest.max(std::fs::metadata(&wal).unwrap().len());
        }
        assert!(longest <= schema::WAL_TRIM_BYTES + 64 * 1024, "{longest}");
    }

    #[test]
    fn schema_is_created_once_and_wal_is_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wb.db");
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || LocalStore::open(&path).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let store = LocalStore::open(&path).unwrap();
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // A newer schema is refused with a clear message instead of being misread.
        store
            .conn
            .execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        let err = LocalStore::open(&path).err().unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
