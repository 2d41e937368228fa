//! ADD: read the pool, choose, reserve the address network-wide, write the pool entry only if
//! the pool is unchanged; on conflict wait a jittered while and do it again.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use super::api::ApiError;
use super::choose;
use super::engine::{Engine, Step, UndoLog};
use super::pool_doc::{add_op, replace_id_op, PoolDoc};
use super::reservation::{self, Held};
use crate::ipam::names::object_name;
use crate::store::{AddRequest, Attachment, PoolRef, StoreError};

/// What reserving an address found.
enum Reserve {
    Ours(Held),
    /// Held by another attachment (described for the error message).
    Taken(String),
}

impl Engine {
    /// One address per range, in order; what was written is in `undo` for the caller to take
    /// back if this fails.
    pub async fn add(&self, req: &AddRequest, undo: &UndoLog) -> Result<Vec<IpAddr>, StoreError> {
        let mut ips = Vec::with_capacity(req.ranges.len());
        for wanted in &req.ranges {
            let pool = self
                .pool_for_add(
                    &wanted.pool,
                    req.node_slice_size,
                    &req.network_name,
                    &req.cni_network,
                )
                .await?;
            let requested = match wanted.requested {
                // A static address is given as an offset of the configured range; the node's
                // pool counts from its slice.
                Some(offset) => {
                    let ip = wanted.pool.range.cidr.at(offset);
                    Some(pool.range.cidr.offset_of(ip).ok_or_else(|| {
                        StoreError::Config(format!(
                            "requested address {ip} is outside this node's slice {}",
                            pool.range.cidr
                        ))
                    })?)
                }
                None => None,
            };
            ips.push(self.allocate(&pool, requested, req, undo).await?);
        }
        Ok(ips)
    }

    async fn allocate(
        &self,
        pool: &PoolRef,
        requested: Option<u128>,
        req: &AddRequest,
        undo: &UndoLog,
    ) -> Result<IpAddr, StoreError> {
        let name = object_name(&pool.name);
        let who = &req.attachment;
        let range = &pool.range;
        // Addresses whose reservation another attachment holds (the pool does not show them).
        let mut avoid: BTreeSet<u128> = BTreeSet::new();
        let mut reserved: Option<(u128, Held)> = None;
        let mut salt = 0u32;
        let mut conflicts = 0u32;
        // The resourceVersion of the last write that failed: reading it back unchanged means the
        // write was refused for another reason than a concurrent change.
        let mut failed_rv: Option<String> = None;
        loop {
            let object = self.kube.get_pool(&name).await?;
            let doc = PoolDoc::new(&name, range.cidr, object)?;
            if let (Some(failed), Some(now)) = (&failed_rv, doc.resource_version()) {
                if failed == now {
                    return Err(StoreError::Io(format!(
                        "the API server refused the update of IPPool {name} although it is unchanged"
                    )));
                }
            }

            if let Some(entry) = doc.held_by_same_owner(who) {
                // A repeated ADD: hand back what the owner holds, with the new container ID.
                if let Some((offset, held)) = reserved.take() {
                    if offset != entry.offset {
                        self.drop_reservation(&held, undo).await?;
                    }
                }
                if entry.attachment.container_id != who.container_id {
                    let rv = doc.resource_version().unwrap_or_default().to_string();
                    let op = replace_id_op(&entry.key, &who.container_id);
                    match self.kube.patch_pool(&name, &rv, &[op]).await {
                        Ok(_) => {}
                        Err(ApiError::Conflict(_)) => {
                            failed_rv = Some(rv);
                            conflicts = self.after_conflict(&name, conflicts).await?;
                            continue;
                        }
                        Err(err) => return Err(err.into()),
                    }
                }
                if req.overlap {
                    self.ensure_reservation(entry.ip, req).await?;
                }
                return Ok(entry.ip);
            }

            let taken = doc.taken();
            if let Some((offset, held)) = reserved.take() {
                if taken.contains(offset) {
                    // Someone that does not use reservations wrote this address meanwhile.
                    self.drop_reservation(&held, undo).await?;
                    avoid.insert(offset);
                } else {
                    reserved = Some((offset, held));
                }
            }
            let offset = match &reserved {
                Some((offset, _)) => *offset,
                None => loop {
                    let offset = match requested {
                        Some(offset) => {
                            self.check_requested(pool, &doc, offset)?;
                            offset
                        }
                        None => {
                            let offset =
                                choose::candidate(range, &taken, &avoid, choose::seed(who, salt))
                                    .ok_or_else(|| StoreError::Exhausted {
                                    range: range.to_string(),
                                })?;
                            if doc.unaddressable(offset) {
                                avoid.insert(offset);
                                continue;
                            }
                            offset
                        }
                    };
                    if !req.overlap {
                        break offset;
                    }
                    match self.reserve(range.ip(offset), req, undo).await? {
                        Reserve::Ours(held) => {
                            reserved = Some((offset, held));
                            break offset;
                        }
                        Reserve::Taken(holder) => {
                            if requested.is_some() {
                                return Err(StoreError::InUse {
                                    ip: range.ip(offset),
                                    range: range.to_string(),
                                    holder,
                                });
                            }
                            avoid.insert(offset);
                            salt += 1;
                        }
                    }
                },
            };

            if req.sleep_for_race > 0 {
                tokio::time::sleep(Duration::from_secs(req.sleep_for_race)).await;
            }

            let Some(key) = doc.key_of(offset) else {
                return Err(StoreError::Io(format!(
                    "IPPool {name} cannot record {}",
                    range.ip(offset)
                )));
            };
            undo.push(Step::PoolEntry {
                pool: name.clone(),
                cidr: range.cidr,
                key: key.clone(),
                container_id: who.container_id.clone(),
                ifname: who.ifname.clone(),
            });
            let written = match doc.resource_version() {
                Some(rv) => {
                    let result = self.kube.patch_pool(&name, rv, &[add_op(&key, who)]).await;
                    if result.is_err() {
                        failed_rv = Some(rv.to_string());
                    }
                    result.map(drop)
                }
                None => {
                    failed_rv = None;
                    self.kube
                        .create_pool(&doc.new_object(&key, who))
                        .await
                        .map(drop)
                }
            };
            match written {
                Ok(()) => return Ok(range.ip(offset)),
                Err(ApiError::Conflict(_)) | Err(ApiError::AlreadyExists(_)) => {
                    conflicts = self.after_conflict(&name, conflicts).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Counts a conflict and waits before the next attempt; gives up when the bound is reached.
    async fn after_conflict(&self, pool: &str, conflicts: u32) -> Result<u32, StoreError> {
        let conflicts = conflicts + 1;
        let backoff = &self.settings.conflicts;
        if conflicts >= backoff.attempts {
            return Err(StoreError::TryAgain(format!(
                "IPPool {pool} kept changing under {conflicts} attempts to update it; gave up"
            )));
        }
        tokio::time::sleep(backoff.delay(conflicts)).await;
        Ok(conflicts)
    }

    fn check_requested(
        &self,
        pool: &PoolRef,
        doc: &PoolDoc,
        offset: u128,
    ) -> Result<(), StoreError> {
        let range = &pool.range;
        if offset > range.cidr.last_offset() || doc.unaddressable(offset) {
            return Err(StoreError::Config(format!(
                "requested address {} cannot be held in pool {}",
                range.ip(offset),
                doc.name
            )));
        }
        if let Some(holder) = doc.entries().into_iter().find(|e| e.offset == offset) {
            return Err(StoreError::InUse {
                ip: range.ip(offset),
                range: range.to_string(),
                holder: describe(&holder.attachment),
            });
        }
        Ok(())
    }

    /// Creates the reservation of `ip`, or finds who holds it.
    async fn reserve(
        &self,
        ip: IpAddr,
        req: &AddRequest,
        undo: &UndoLog,
    ) -> Result<Reserve, StoreError> {
        let name = reservation::name(ip, &req.network_name);
        let object = reservation::new_object(&name, &req.attachment);
        // A reservation can vanish between the failed create and the read; try again then.
        for _ in 0..3 {
            match self.kube.create_reservation(&object).await {
                Ok(created) => {
                    let held = Held::of(&created);
                    undo.push(Step::Reservation(held.clone()));
                    return Ok(Reserve::Ours(held));
                }
                Err(ApiError::AlreadyExists(_)) => {}
                Err(err) => return Err(err.into()),
            }
            match self.kube.get_reservation(&name).await? {
                // Left by an earlier attempt of this same attachment: adopt it.
                Some(found) if reservation::held_by(&found, &req.attachment) => {
                    let held = Held::of(&found);
                    undo.push(Step::Reservation(held.clone()));
                    return Ok(Reserve::Ours(held));
                }
                Some(found) => {
                    return Ok(Reserve::Taken(format!(
                        "{} (reservation {name})",
                        describe(&Attachment {
                            container_id: found.spec.containerid.clone(),
                            ifname: found.spec.ifname.clone(),
                            pod_ref: Some(found.spec.podref.clone()),
                            pod_uid: None,
                        })
                    )))
                }
                None => continue,
            }
        }
        Err(StoreError::TryAgain(format!(
            "reservation {name} keeps appearing and disappearing"
        )))
    }

    /// A repeated ADD keeps its reservation: re-create it if it is missing.
    async fn ensure_reservation(&self, ip: IpAddr, req: &AddRequest) -> Result<(), StoreError> {
        let name = reservation::name(ip, &req.network_name);
        match self
            .kube
            .create_reservation(&reservation::new_object(&name, &req.attachment))
            .await
        {
            Ok(_) | Err(ApiError::AlreadyExists(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn drop_reservation(&self, held: &Held, undo: &UndoLog) -> Result<(), StoreError> {
        match self
            .kube
            .delete_reservation(&held.name, held.uid.as_deref(), None)
            .await
        {
            // A failed precondition: the object is no longer the one we created.
            Ok(()) | Err(ApiError::Conflict(_)) => {
                undo.forget_reservation(held);
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Takes back what a failed ADD wrote: pool entries first (only those still held by the
    /// attachment), then reservations, so an address is never in a pool without its
    /// reservation. Returns the first failure, after trying everything.
    pub async fn undo(&self, steps: Vec<Step>) -> Result<(), StoreError> {
        let mut first_error = None;
        let (entries, reservations): (Vec<_>, Vec<_>) = steps
            .into_iter()
            .partition(|s| matches!(s, Step::PoolEntry { .. }));
        for step in entries.into_iter().rev() {
            if let Step::PoolEntry {
                pool,
                cidr,
                key,
                container_id,
                ifname,
            } = step
            {
                let result = self
                    .remove_entries(&pool, cidr, |e| {
                        e.key == key
                            && e.attachment.container_id == container_id
                            && e.attachment.ifname == ifname
                    })
                    .await;
                if let Err(err) = result {
                    first_error.get_or_insert(err);
                }
            }
        }
        for step in reservations.into_iter().rev() {
            if let Step::Reservation(held) = step {
                let result = self
                    .kube
                    .delete_reservation(&held.name, held.uid.as_deref(), None)
                    .await;
                match result {
                    Ok(()) | Err(ApiError::Conflict(_)) => {}
                    Err(err) => {
                        first_error.get_or_insert(err.into());
                    }
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// The holder of an address, for messages.
pub fn describe(who: &Attachment) -> String {
    match &who.pod_ref {
        Some(pod) if !pod.is_empty() => format!(
            "pod {pod} (container {}, interface {})",
            who.container_id, who.ifname
        ),
        _ => format!("container {} (interface {})", who.container_id, who.ifname),
    }
}
