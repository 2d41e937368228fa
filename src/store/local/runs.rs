//! The `runs` table: maximal runs of allocated offsets per pool.
//!
//! Allocation asks "is this offset taken, and up to where?" and jumps past the answer, so the
//! number of queries follows how fragmented a pool is, never how big or how full it is.

use rusqlite::{Connection, OptionalExtension};

use super::Fail;

/// An offset as stored: 16 bytes, big-endian.
pub type Blob = [u8; 16];

pub fn blob(offset: u128) -> Blob {
    offset.to_be_bytes()
}

pub fn unblob(blob: Blob) -> u128 {
    u128::from_be_bytes(blob)
}

pub(super) const RUN_AT_OR_BEFORE: &str =
    "SELECT lo, hi FROM runs WHERE pool = ?1 AND lo <= ?2 ORDER BY lo DESC LIMIT 1";

/// The run of `pool` starting at or before `offset` that is closest to it, as (lo, hi).
fn run_at_or_before(
    conn: &Connection,
    pool: &str,
    offset: u128,
) -> Result<Option<(u128, u128)>, Fail> {
    let mut stmt = conn.prepare_cached(RUN_AT_OR_BEFORE)?;
    let run = stmt
        .query_row((pool, blob(offset)), |row| {
            Ok((unblob(row.get(0)?), unblob(row.get(1)?)))
        })
        .optional()?;
    Ok(run)
}

/// The last offset of the run of `pool` containing `offset`, if `offset` is allocated.
pub fn end_of_run(conn: &Connection, pool: &str, offset: u128) -> Result<Option<u128>, Fail> {
    Ok(run_at_or_before(conn, pool, offset)?
        .filter(|(_, hi)| *hi >= offset)
        .map(|(_, hi)| hi))
}

/// Records `offset` as allocated, merging with the neighbouring runs.
pub fn insert(conn: &Connection, pool: &str, offset: u128) -> Result<(), Fail> {
    let mut hi = offset;
    if let Some(next) = offset.checked_add(1) {
        let mut stmt =
            conn.prepare_cached("DELETE FROM runs WHERE pool = ?1 AND lo = ?2 RETURNING hi")?;
        if let Some(next_hi) = stmt
            .query_row((pool, blob(next)), |row| row.get::<_, Blob>(0))
            .optional()?
        {
            hi = unblob(next_hi);
        }
    }
    let prev = match offset.checked_sub(1) {
        Some(before) => run_at_or_before(conn, pool, before)?,
        None => None,
    };
    match prev {
        Some((lo, prev_hi)) if prev_hi >= offset => {
            // Already covered: the allocations table's primary key makes this unreachable, but
            // a run must never shrink here.
            let _ = lo;
        }
        Some((lo, prev_hi)) if prev_hi + 1 == offset => {
            conn.prepare_cached("UPDATE runs SET hi = ?3 WHERE pool = ?1 AND lo = ?2")?
                .execute((pool, blob(lo), blob(hi)))?;
        }
        _ => {
            conn.prepare_cached("INSERT INTO runs (pool, lo, hi) VALUES (?1, ?2, ?3)")?
                .execute((pool, blob(offset), blob(hi)))?;
        }
    }
    Ok(())
}

/// Records `offset` as free, splitting the run that held it.
pub fn remove(conn: &Connection, pool: &str, offset: u128) -> Result<(), Fail> {
    let Some((lo, hi)) = run_at_or_before(conn, pool, offset)?.filter(|(_, hi)| *hi >= offset)
    else {
        return Ok(());
    };
    if lo < offset {
        conn.prepare_cached("UPDATE runs SET hi = ?3 WHERE pool = ?1 AND lo = ?2")?
            .execute((pool, blob(lo), blob(offset - 1)))?;
    } else {
        conn.prepare_cached("DELETE FROM runs WHERE pool = ?1 AND lo = ?2")?
            .execute((pool, blob(lo)))?;
    }
    if offset < hi {
        conn.prepare_cached("INSERT INTO runs (pool, lo, hi) VALUES (?1, ?2, ?3)")?
            .execute((pool, blob(offset + 1), blob(hi)))?;
    }
    Ok(())
}

/// The runs of `pool` computed from its allocations, in order.
pub fn derive(conn: &Connection, pool: &str) -> Result<Vec<(u128, u128)>, Fail> {
    let mut stmt = conn.prepare("SELECT off FROM allocations WHERE pool = ?1 ORDER BY off")?;
    let mut rows = stmt.query([pool])?;
    let mut runs: Vec<(u128, u128)> = Vec::new();
    while let Some(row) = rows.next()? {
        let offset = unblob(row.get(0)?);
        match runs.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(offset) => last.1 = offset,
            _ => runs.push((offset, offset)),
        }
    }
    Ok(runs)
}

/// The runs of `pool` as stored, in order.
pub fn stored(conn: &Connection, pool: &str) -> Result<Vec<(u128, u128)>, Fail> {
    let mut stmt = conn.prepare("SELECT lo, hi FROM runs WHERE pool = ?1 ORDER BY lo")?;
    let runs = stmt
        .query_map([pool], |row| Ok((unblob(row.get(0)?), unblob(row.get(1)?))))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(runs)
}

/// Replaces the stored runs of `pool` with those derived from its allocations.
pub fn rebuild(conn: &Connection, pool: &str) -> Result<(), Fail> {
    let runs = derive(conn, pool)?;
    conn.execute("DELETE FROM runs WHERE pool = ?1", [pool])?;
    let mut stmt = conn.prepare_cached("INSERT INTO runs (pool, lo, hi) VALUES (?1, ?2, ?3)")?;
    for (lo, hi) in runs {
        stmt.execute((pool, blob(lo), blob(hi)))?;
    }
    Ok(())
}
