//! Opening the database: pragmas and a schema that many processes may race to create.
//!
//! Every CNI call is a fresh process, so opening must cost a few page reads when the schema is
//! already there, and must be safe when hundreds of processes meet a brand-new file at once.

use std::fs::{Metadata, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::Fail;
use crate::store::StoreError;

/// The schema this binary writes. Bumped (with a migration) when the tables change.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a process waits for another one's write lock before giving up with "try again".
/// Generous: 300 plugins started at once must all get through one after the other.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Offsets and run bounds are 16-byte big-endian blobs, so SQLite's memcmp order is numeric
/// order and `lo <= ?` range scans work for the whole u128 space (IPv6 /64 and wider).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pools (
    name         TEXT PRIMARY KEY,
    network_name TEXT NOT NULL,
    cidr         TEXT NOT NULL,
    base         BLOB NOT NULL,
    prefix       INTEGER NOT NULL,
    v6           INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pools_by_network ON pools(network_name, v6);

CREATE TABLE IF NOT EXISTS allocations (
    pool         TEXT NOT NULL,
    off          BLOB NOT NULL,
    ip           TEXT NOT NULL,
    network_name TEXT NOT NULL,
    cni_network  TEXT NOT NULL,
    container_id TEXT NOT NULL,
    ifname       TEXT NOT NULL,
    pod_ref      TEXT,
    pod_uid      TEXT,
    created      INTEGER NOT NULL,
    PRIMARY KEY (pool, off)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS allocations_by_container ON allocations(container_id, ifname);
CREATE INDEX IF NOT EXISTS allocations_by_pod ON allocations(pod_ref, ifname);
CREATE INDEX IF NOT EXISTS allocations_by_cni_network ON allocations(cni_network);

-- Maximal runs of allocated offsets per pool, kept in step with `allocations` in the same
-- transaction, so the next free offset is found by jumping over whole runs.
CREATE TABLE IF NOT EXISTS runs (
    pool TEXT NOT NULL,
    lo   BLOB NOT NULL,
    hi   BLOB NOT NULL,
    PRIMARY KEY (pool, lo)
) WITHOUT ROWID;
";

/// Opens `path` (creating it and its directory), sets the pragmas and makes sure the schema is
/// there.
pub fn connect(path: &Path) -> Result<Connection, Fail> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            Fail::Store(
                StoreError::io(format!(
                    "cannot create the directory {} of the local database",
                    dir.display()
                ))
                .because(e),
            )
        })?;
    }
    let found = refuse_special_file(path)?;
    owner_only(path, found.as_ref())?;
    // NOFOLLOW: a symbolic link planted at the path must not make root write elsewhere.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Each CNI call is a process that closes the database right away. By default the last
    // connection to close checkpoints the WAL and deletes it (several fsyncs and unlinks per
    // call). Keeping it makes a call cheap; [`trim_wal`] keeps it short.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    let deadline = Instant::now() + BUSY_TIMEOUT;
    // Reading the header first makes SQLite notice a database that is already in WAL mode, so
    // the common case needs no lock at all.
    let version = user_version(&conn)?;
    enable_wal(&conn, deadline)?;
    // NORMAL is durable against a killed process (the WAL is fsynced at checkpoints; only a
    // power loss can drop the last transactions) and much cheaper than FULL.
    conn.execute_batch("PRAGMA synchronous = NORMAL")?;
    if version != SCHEMA_VERSION {
        create_schema(&conn, path)?;
    }
    Ok(conn)
}

/// An existing path must be a regular file (not a link, device, FIFO or folder): SQLite would
/// otherwise block on a FIFO or write through to whatever the path names. What it found there.
fn refuse_special_file(path: &Path) -> Result<Option<Metadata>, Fail> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(Fail::Msg(format!(
            "the local database {} is not a regular file",
            crate::files::shown_path(path)
        ))),
        found => Ok(found.ok()),
    }
}

/// The database and its `-wal` and `-shm` files are root's alone. Anyone who can open the
/// `-shm` file can hold the lock every writer needs, and stall each ADD and DEL of the node
/// for the busy timeout (besides reading its pods' names). SQLite gives the `-wal` and `-shm`
/// files the database file's own mode when it creates them, so a new database file is created
/// 0600 before SQLite opens it; one an earlier release created readable by all is made 0600,
/// with the `-wal` and `-shm` files it kept beside it. Nothing follows a link.
fn owner_only(path: &Path, found: Option<&Metadata>) -> Result<(), Fail> {
    let failed =
        |message: String, e: std::io::Error| Fail::Store(StoreError::io(message).because(e));
    let shown = crate::files::shown_path;
    // NONBLOCK: a FIFO swapped in since the path was looked at must not hang the call.
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let mut create = OpenOptions::new();
    create
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(flags);
    let mut existing = OpenOptions::new();
    existing.read(true).custom_flags(flags);
    match found {
        None => create.open(path).map(drop).map_err(|e| {
            failed(
                format!("cannot create the local database file {}", shown(path)),
                e,
            )
        }),
        Some(meta) if meta.permissions().mode() & 0o077 == 0 => Ok(()),
        Some(_) => {
            for suffix in ["", "-wal", "-shm"] {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                let file = Path::new(&name);
                let not_unshared = |e| {
                    let what = format!(
                        "cannot make the local database file {} readable by its owner only",
                        shown(file)
                    );
                    failed(what, e)
                };
                match existing.open(file) {
                    Ok(f) => f
                        .set_permissions(std::fs::Permissions::from_mode(0o600))
                        .map_err(not_unshared)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(not_unshared(e)),
                }
            }
            Ok(())
        }
    }
}

fn user_version(conn: &Connection) -> Result<i64, Fail> {
    Ok(conn.query_row("PRAGMA user_version", [], |row| row.get(0))?)
}

/// Switches the file to WAL. The switch needs an exclusive lock and SQLite reports SQLITE_BUSY
/// for it without always consulting the busy handler, so retry with jitter until the deadline.
fn enable_wal(conn: &Connection, deadline: Instant) -> Result<(), Fail> {
    let current: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if current.eq_ignore_ascii_case("wal") {
        return Ok(());
    }
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
            row.get::<_, String>(0)
        }) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(Fail::Msg(format!(
                    "cannot switch the local database to WAL mode (it stays in {mode} mode)"
                )))
            }
            Err(e) if super::is_busy(&e) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(rand::rng().random_range(1..=20)));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Creates the tables inside `BEGIN IMMEDIATE`, re-checking the version under the write lock so
/// that of many processes racing on a fresh file exactly one creates and the others see it done.
fn create_schema(conn: &Connection, path: &Path) -> Result<(), Fail> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let version = user_version(&tx)?;
    if version > SCHEMA_VERSION {
        // Broken for this binary (after a downgrade): its DELs succeed, loudly, instead of
        // holding every pod's teardown until the newer binary is back.
        return Err(Fail::Store(StoreError::broken(format!(
            "the local database {} has schema version {version}, newer than this binary's \
             {SCHEMA_VERSION}: use a newer whereabouts binary",
            crate::files::shown_path(path)
        ))));
    }
    if version < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    tx.commit()?;
    Ok(())
}

/// Above this size the WAL is folded into the database by the process that notices.
pub const WAL_TRIM_BYTES: u64 = 256 << 10;

/// Folds a long WAL into the database and truncates it.
///
/// SQLite's own auto-checkpoint cannot do this for one-call processes: each opens the database
/// alone, rebuilds the WAL index from the whole WAL (reading every frame), and that rebuilt
/// index no longer knows what was checkpointed, so the WAL is never restarted and every call
/// reads more of it. Truncating it here bounds what the next process reads. It does not wait:
/// when other processes are using the database, one of them does it later.
pub fn trim_wal(conn: &Connection, path: &Path) {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let long = std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_TRIM_BYTES);
    if !long || conn.busy_timeout(Duration::ZERO).is_err() {
        return;
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
}
