//! DEL, CHECK, GC and the CLI's listing and release: pool entries are removed first, then their
//! reservations (the reverse of ADD), so an address is never in a pool without its reservation.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::api::{ApiError, RefusedWrite};
use super::batch::{answers, in_halves, released_by, Batches, PendingRelease, Served};
use super::engine::{newer, Engine, Owed};
use super::go_lease::Hold;
use super::node_slice;
use super::pool_doc::{holder_test, remove_op, Entry, PoolDoc};
use super::reservation;
use crate::cleanup::judge::{leaked_on_node, PodPlace};
use crate::ipam::names::{object_name, pool_name};
use crate::ipam::Cidr;
use crate::k8s::crd::{IPPool, NodeSlicePool, OverlappingRangeIPReservation};
use crate::store::queues::{dropped, Serving};
use crate::store::{
    Allocation, Attachment, AttachmentRequest, GcRequest, PoolRef, Reservation, StoreError,
};

/// An entry removed from a pool; `at`: the resourceVersion of the write that removed it, when
/// that was this call's write and its answer came (not when an earlier write, whose answer was
/// lost, had removed it already).
pub(super) struct Removed {
    pub entry: Entry,
    pub at: Option<String>,
}

/// The patch removing `picked`, each removal testing that its entry is still the one read.
fn removal(picked: &[Entry]) -> Vec<serde_json::Value> {
    picked
        .iter()
        .flat_map(|e| {
            [
                holder_test(&e.key, &e.attachment.container_id),
                remove_op(&e.key),
            ]
        })
        .collect()
}

impl Engine {
    /// Removes the entries of pool `name` that `pick` selects, compare-and-swap, retried on
    /// conflict. Returns what was removed.
    pub(super) async fn remove_entries(
        &self,
        name: &str,
        cidr: Cidr,
        pick: impl Fn(&Entry, &[Entry]) -> bool,
    ) -> Result<Vec<Removed>, StoreError> {
        let mut conflicts = 0u32;
        // The agent's guess may show the entries: then it spares the read (the write is
        // conditional). Its lacking them proves nothing, so the server is asked.
        let mut cached = self.guess_pool(name);
        // The entries a refused write was sent for. A write whose answer was lost may have been
        // applied and then refused when sent again (its tests no longer hold): entries of it that
        // are gone when read again were removed, by it or by another remover, and their
        // reservations must be released all the same.
        let mut sent: Vec<Entry> = Vec::new();
        let mut refused: Option<RefusedWrite> = None;
        let earlier = |sent: Vec<Entry>| sent.into_iter().map(|entry| Removed { entry, at: None });
        loop {
            let Some((object, from_copy)) = self.pool_for_removal(name, &mut cached).await? else {
                return Ok(earlier(sent).collect());
            };
            let doc = PoolDoc::new(name, cidr, Some(object))?;
            RefusedWrite::still_refused(refused.as_ref(), doc.resource_version(), || {
                format!("the API server refused a removal from the unchanged IPPool {name}")
            })?;
            let entries = doc.entries();
            // A refused write's entry counts as removed only if its address is free now: held
            // again, by the pod's new sandbox (its entry taken over, not removed) or by anyone,
            // its reservation is the holder's.
            sent.retain(|gone| !entries.iter().any(|e| e.key == gone.key));
            let mut picked: Vec<Entry> = entries
                .iter()
                .filter(|e| pick(e, &entries))
                .cloned()
                .collect();
            if picked.is_empty() {
                if from_copy {
                    continue;
                }
                return Ok(earlier(sent).collect());
            }
            // An entry written without an interface name is picked for the attachment's lack
            // of an entry of its own, which a copy cannot prove: the server is asked.
            if from_copy && picked.iter().any(|e| e.attachment.ifname.is_empty()) {
                continue;
            }
            // Each removal tests that its entry is still the one read. The agent writes nothing
            // else, so it needs no more; a plugin process also tests the whole pool, as before.
            let whole_rv = match self.batches {
                Some(_) => None,
                None => doc.resource_version(),
            };
            match self
                .kube
                .patch_pool(name, whole_rv, &removal(&picked))
                .await
            {
                Ok(written) => {
                    if let Some(batches) = &self.batches {
                        batches.wrote(&written);
                    }
                    let at = written.metadata.resource_version.clone();
                    let gone_before: Vec<Entry> =
                        sent.into_iter().filter(|e| !picked.contains(e)).collect();
                    let by_this = picked.into_iter().map(|entry| Removed {
                        entry,
                        at: at.clone(),
                    });
                    return Ok(by_this.chain(earlier(gone_before)).collect());
                }
                // Changed or deleted since it was read: the next read tells.
                Err(refusal @ (ApiError::Conflict(_) | ApiError::NotFound(_))) => {
                    refused = doc.resource_version().map(|rv| RefusedWrite {
                        rv: rv.to_string(),
                        refusal,
                    });
                    picked.retain(|entry| !sent.contains(entry));
                    sent.extend(picked);
                    conflicts = self.after_conflict("del", name, conflicts).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The pool to remove entries from, with whether it is the agent's guess (`cached`, taken
    /// once) rather than the server's answer; `None` when the pool does not exist.
    async fn pool_for_removal(
        &self,
        name: &str,
        cached: &mut Option<IPPool>,
    ) -> Result<Option<(IPPool, bool)>, StoreError> {
        if let Some(object) = cached.take() {
            return Ok(Some((object, true)));
        }
        Ok(self
            .kube
            .get_pool(name)
            .await?
            .map(|object| (object, false)))
    }

    /// Notes the reservations of removed entries as owed until they are released.
    fn owe_releases(&self, removed: &[Removed], pool: &str, network_name: &str) -> Vec<Owed> {
        let owed: Vec<Owed> = removed
            .iter()
            .map(|r| Owed {
                ip: r.entry.ip,
                pool: pool.to_string(),
                network_name: network_name.to_string(),
                who: r.entry.attachment.clone(),
                removed_at: r.at.clone(),
            })
            .collect();
        for o in &owed {
            self.unreleased.add(o.clone());
        }
        owed
    }

    /// [`Self::release_reservation`] of an owed reservation; no longer owed once it is done.
    async fn release_owed(&self, owed: &Owed, go: Option<&Hold>) -> Result<bool, StoreError> {
        let go = go.map(|hold| UnderGo {
            hold,
            pool: &owed.pool,
        });
        let released = self
            .release_reservation(
                owed.ip,
                &owed.network_name,
                &owed.who,
                owed.removed_at.as_deref(),
                go,
            )
            .await?;
        self.unreleased.done(owed.ip, &owed.network_name);
        Ok(released)
    }

    /// Releases the reservations that operations cut off by their deadline still owe, within
    /// the undo budget, under the Go binaries' Lease while they may write the pools (as every
    /// release). What this cannot finish stays owed, for the agent's next failed operation to
    /// try again.
    pub async fn finish_owed_releases(&self) {
        let owed = self.unreleased.pending();
        if owed.is_empty() {
            return;
        }
        let budget = self.settings.undo_budget;
        let finish = self.releasing(false, async |go| {
            let releases = owed.iter().map(|o| self.release_owed(o, go));
            Ok(futures::future::join_all(releases).await)
        });
        match tokio::time::timeout(budget, finish).await {
            Ok(Err(err)) => {
                tracing::error!(%err, "could not release the reservations of removed entries")
            }
            Ok(Ok(outcomes)) => {
                for err in outcomes.into_iter().filter_map(Result::err) {
                    tracing::error!(%err, "could not release a reservation whose entry is gone");
                }
            }
            Err(_) => tracing::error!(
                owed = owed.len(),
                "could not release the reservations of removed entries in time"
            ),
        }
    }

    /// Deletes the reservation of `ip` if `who` holds it ([`released_with`]): it names `who`'s
    /// container, or names the pod's older sandbox, was last written before the write that
    /// removed the entry (`removed_at`) and was never taken over. That is one upstream's binary
    /// (or a build before the take-over) left naming the container the entry was taken over
    /// from; one taken over by the pod's next sandbox names that sandbox exactly, also when
    /// that sandbox holds the address through another pool of the network (a range edited
    /// since), which this pool's removal says nothing about.
    ///
    /// Under Go binaries (`go`), the Lease is checked before the delete, and a reservation whose
    /// address the pool holds again for the same pod stays: see [`Self::held_again_by_its_pod`].
    pub(super) async fn release_reservation(
        &self,
        ip: IpAddr,
        network_name: &str,
        who: &Attachment,
        removed_at: Option<&str>,
        go: Option<UnderGo<'_>>,
    ) -> Result<bool, StoreError> {
        let releases = |found: &OverlappingRangeIPReservation| {
            let version = found.metadata.resource_version.as_deref();
            reservation::released_with(found, who)
                || (removed_at.is_some()
                    && found.spec.ifname == who.ifname
                    && reservation::held_by(found, who)
                    && !reservation::taken_over_ever(found)
                    && !newer(version, removed_at))
        };
        let name = reservation::name(ip, network_name);
        // The agent's watched copy spares the read: the delete's uid and resourceVersion
        // preconditions refuse it if the reservation changed since, and what the copy lacks or
        // gives to someone else is looked up on the server.
        let mut watched = self.cache.as_ref().and_then(|c| c.reservation(&name));
        let mut reads = 0;
        while reads < 3 {
            let from_copy = watched.is_some();
            let found = match watched.take() {
                Some(found) => found,
                None => {
                    reads += 1;
                    match self.kube.get_reservation(&name).await? {
                        Some(found) => found,
                        None => return Ok(false),
                    }
                }
            };
            if !releases(&found) {
                if from_copy {
                    continue;
                }
                return Ok(false);
            }
            if let Some(go) = go {
                if self.held_again_by_its_pod(go.pool, ip, &found).await? {
                    return Ok(false);
                }
                // Right before the write: the pool's read may have taken a while.
                go.hold.check()?;
            }
            match self
                .kube
                .delete_reservation(
                    &name,
                    found.metadata.uid.as_deref(),
                    found.metadata.resource_version.as_deref(),
                )
                .await
            {
                Ok(()) => return Ok(true),
                // Changed in between: look again.
                Err(ApiError::Conflict(_)) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Ok(false)
    }

    /// Whether `pool` holds `ip` again for the pod (and interface) `reservation` names. A Go ADD
    /// of the pod's next sandbox that finds the reservation naming its pod keeps it as it is,
    /// naming the old container, and writes its own entry: the reservation is that entry's now.
    async fn held_again_by_its_pod(
        &self,
        pool: &str,
        ip: IpAddr,
        reservation: &OverlappingRangeIPReservation,
    ) -> Result<bool, StoreError> {
        let (pod, ifname) = (reservation.spec.podref.as_str(), &reservation.spec.ifname);
        let Some(object) = self.kube.get_pool(pool).await? else {
            return Ok(false);
        };
        let Some(cidr) = Cidr::parse(&object.spec.range, false) else {
            return Ok(false);
        };
        let again = PoolDoc::new(pool, cidr, Some(object))?
            .entries()
            .into_iter()
            .any(|e| {
                let same_pod = !pod.is_empty() && e.attachment.pod_ref.as_deref() == Some(pod);
                let same_interface = ifname.is_empty() || e.attachment.ifname == *ifname;
                e.ip == ip && same_pod && same_interface
            });
        if again {
            tracing::info!(%ip, pod, pool, "reservation kept: the pod's next sandbox holds the address again");
        }
        Ok(again)
    }

    fn allocation(pool: &PoolDoc, entry: Entry, network_name: &str) -> Allocation {
        Allocation {
            pool: pool.name.clone(),
            range: pool.cidr,
            ip: entry.ip,
            network_name: network_name.to_string(),
            cni_network: None,
            slice_node: None,
            attachment: entry.attachment,
        }
    }

    /// The pools an operation works on: with node slices, this node's pool (none if no slice),
    /// each with the configured range it serves (allocations report that range, as the caller
    /// configured it, not the node's slice).
    async fn pools_of(
        &self,
        configured: &[PoolRef],
        node_slice_size: Option<u8>,
        network_name: &str,
        cni_network: &str,
    ) -> Result<Vec<(Cidr, PoolRef)>, StoreError> {
        if node_slice_size.is_none() {
            let unsliced = configured
                .iter()
                .map(|pool| (pool.range.cidr, pool.clone()));
            return Ok(unsliced.collect());
        }
        let Some((slice, node)) = self.node_slice(network_name, cni_network).await? else {
            return Ok(Vec::new());
        };
        let mut pools = Vec::with_capacity(configured.len());
        for pool in configured {
            match node_slice::pool_to_release(pool, slice, network_name, &node) {
                Some(held) => pools.push((pool.range.cidr, held)),
                None => {
                    tracing::debug!(%slice, range = %pool.range.cidr, "this node's slice is not of the range: nothing of it is looked for")
                }
            }
        }
        Ok(pools)
    }

    /// Removes the entries `pick` selects from `pool`, then the reservations they hold.
    async fn release_picked(
        &self,
        (configured, pool): (Cidr, &PoolRef),
        network_name: &str,
        pick: impl Fn(&Entry, &[Entry]) -> bool,
        go: Option<&Hold>,
    ) -> Result<Vec<Allocation>, StoreError> {
        let name = object_name(&pool.name);
        go.map_or(Ok(()), Hold::check)?;
        let removed = self.remove_entries(&name, pool.range.cidr, pick).await?;
        let doc = PoolDoc::new(&name, configured, None)?;
        let owed = self.owe_releases(&removed, &name, network_name);
        let mut released = Vec::with_capacity(removed.len());
        for (gone, owed) in removed.into_iter().zip(&owed) {
            self.release_owed(owed, go).await?;
            released.push(Self::allocation(&doc, gone.entry, network_name));
        }
        Ok(released)
    }

    pub async fn del(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        let node_slices = req.node_slice_size.is_some();
        self.releasing(node_slices, async |go| match (&self.batches, go) {
            // While Go binaries may write, each release is served on its own, as each ADD is.
            (Some(batches), None) => self.del_batched(batches, req).await,
            _ => self.del_alone(req, go).await,
        })
        .await
    }

    async fn del_alone(
        &self,
        req: &AttachmentRequest,
        go: Option<&Hold>,
    ) -> Result<Vec<Allocation>, StoreError> {
        let mine = |e: &Entry, all: &[Entry]| {
            let others = super::pool_doc::holders(all);
            super::pool_doc::named_by(&e.attachment, others, &req.container_id, &req.ifname)
        };
        let wanted = (req.node_slice_size, req.network_name.as_str());
        self.release_everywhere(&req.pools, wanted, &req.cni_network, mine, go)
            .await
    }

    /// The agent's DEL: each pool's release joins the pool's batch (see [`super::batch`]).
    async fn del_batched(
        &self,
        batches: &Arc<Batches>,
        req: &AttachmentRequest,
    ) -> Result<Vec<Allocation>, StoreError> {
        let pools = self
            .pools_of(
                &req.pools,
                req.node_slice_size,
                &req.network_name,
                &req.cni_network,
            )
            .await?;
        let mut released = Vec::new();
        for (configured, pool) in pools {
            let name = object_name(&pool.name);
            let key = [
                self.scope.as_str(),
                &name,
                &pool.range.cidr.to_string(),
                &configured.to_string(),
                &req.network_name,
            ]
            .join("\n");
            let pending = PendingRelease {
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
            };
            let (answer, start) = batches.releases.submit(&key, pending);
            if start {
                let (engine, batches, work) = (self.clone(), batches.clone(), batches.work.clone());
                let target = ReleaseTarget {
                    name,
                    cidr: pool.range.cidr,
                    configured,
                    network_name: req.network_name.clone(),
                };
                work.spawn(async move { engine.serve_releases(&batches, &key, &target).await });
            }
            released.extend(answer.await.unwrap_or_else(|_| Err(dropped()))?);
        }
        Ok(released)
    }

    /// Serves a pool's queue of DELs: one conditional write removes the entries of every
    /// waiting DEL, then their reservations go, concurrently. A batch the server refuses for
    /// what it removes is served in halves ([`in_halves`]).
    async fn serve_releases(&self, batches: &Batches, key: &str, target: &ReleaseTarget) {
        let _serving = Serving {
            queues: &batches.releases,
            key,
        };
        loop {
            let waiting = batches.releases.take_or_close(key);
            if waiting.is_empty() {
                return;
            }
            batches.observer.batch("del", waiting.len());
            let (jobs, replies): (Vec<PendingRelease>, Vec<_>) = waiting.into_iter().unzip();
            let deadline = tokio::time::Instant::now() + self.settings.deadline;
            let serve = |jobs: Vec<PendingRelease>| -> BoxFuture<'_, Served<Vec<Allocation>>> {
                Box::pin(async move { self.release_batch(target, &jobs, deadline).await })
            };
            let answers = match self.release_batch(target, &jobs, deadline).await {
                Ok(answers) => answers,
                Err(err) => in_halves(jobs, err, &serve).await,
            };
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
    }

    /// One batch of DELs, before `deadline`: one write removes the entries of every job, then
    /// their reservations go; each job's answer.
    async fn release_batch(
        &self,
        target: &ReleaseTarget,
        jobs: &[PendingRelease],
        deadline: tokio::time::Instant,
    ) -> Served<Vec<Allocation>> {
        let pick = |e: &Entry, all: &[Entry]| jobs.iter().any(|job| released_by(e, all, job));
        let released = tokio::time::timeout_at(deadline, self.release_entries(target, pick))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::try_again(format!(
                    "the batch of DELs of IPPool {} did not complete within {:?}",
                    target.name, self.settings.deadline
                )))
            });
        if released.is_err() {
            self.finish_owed_releases().await;
        }
        let released = released?;
        let holders: Vec<&Attachment> = released.iter().map(|(a, _)| &a.attachment).collect();
        let answer = |job: &PendingRelease| {
            released
                .iter()
                .filter(|(a, _)| answers(&a.attachment, &holders, job))
                .map(|(a, done)| done.clone().map(|()| a.clone()))
                .collect()
        };
        Ok(jobs.iter().map(answer).collect())
    }

    /// Removes the picked entries of a pool in one write, then their reservations; each
    /// allocation with the outcome of its reservation's release.
    async fn release_entries(
        &self,
        target: &ReleaseTarget,
        pick: impl Fn(&Entry, &[Entry]) -> bool,
    ) -> Result<Vec<(Allocation, Result<(), StoreError>)>, StoreError> {
        let removed = self.remove_entries(&target.name, target.cidr, pick).await?;
        let doc = PoolDoc::new(&target.name, target.configured, None)?;
        let owed = self.owe_releases(&removed, &target.name, &target.network_name);
        // The agent combines releases only while no Go binary writes the pools.
        let releases = owed.iter().map(|o| self.release_owed(o, None));
        let outcomes = futures::future::join_all(releases).await;
        Ok(removed
            .into_iter()
            .zip(outcomes)
            .map(|(gone, outcome)| {
                let allocation = Self::allocation(&doc, gone.entry, &target.network_name);
                (allocation, outcome.map(|_| ()))
            })
            .collect())
    }

    /// [`Self::release_picked`] in each pool of an operation ([`Self::pools_of`]).
    async fn release_everywhere(
        &self,
        configured: &[PoolRef],
        (node_slice_size, network_name): (Option<u8>, &str),
        cni_network: &str,
        pick: impl Fn(&Entry, &[Entry]) -> bool,
        go: Option<&Hold>,
    ) -> Result<Vec<Allocation>, StoreError> {
        let mut released = Vec::new();
        let pools = self
            .pools_of(configured, node_slice_size, network_name, cni_network)
            .await?;
        for (range, pool) in pools {
            released.extend(
                self.release_picked((range, &pool), network_name, &pick, go)
                    .await?,
            );
        }
        Ok(released)
    }

    pub async fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        let mut held = Vec::new();
        for (configured, pool) in self
            .pools_of(
                &req.pools,
                req.node_slice_size,
                &req.network_name,
                &req.cni_network,
            )
            .await?
        {
            let name = object_name(&pool.name);
            let object = self.kube.get_pool(&name).await?;
            let doc = PoolDoc::new(&name, pool.range.cidr, object)?;
            for entry in doc.held_by_container(&req.container_id, &req.ifname) {
                let mut allocation = Self::allocation(&doc, entry, &req.network_name);
                allocation.range = configured;
                held.push(allocation);
            }
        }
        Ok(held)
    }

    /// Frees the network configuration's allocations that are this node's leaks: not listed as
    /// valid, and their pod gone (or, in this node's slice pools, running on another node; see
    /// [`leaked_on_node`]). Then the reservations
    /// of the configured ranges' addresses that no pool entry backs and no valid attachment
    /// holds (old ones only).
    ///
    /// While Go binaries may write the pools, each pool's release and each orphan's delete holds
    /// their Lease; the pod lookups that decide them do not.
    pub async fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
        let valid: BTreeSet<(&str, &str)> = req
            .valid
            .iter()
            .map(|(c, i)| (c.as_str(), i.as_str()))
            .collect();
        let is_valid =
            |who: &Attachment| valid.contains(&(who.container_id.as_str(), who.ifname.as_str()));
        let released = match req.node.as_deref() {
            Some(node) => {
                // With node slices, this node's slice pools; else the configured ones.
                let pools = self
                    .pools_of(
                        &req.pools,
                        req.node_slice_size,
                        &req.network_name,
                        &req.cni_network,
                    )
                    .await?;
                let node_slices = req.node_slice_size.is_some();
                let this_node = (node, node_slices);
                self.gc_pools(req, &pools, this_node, &is_valid).await?
            }
            None => {
                tracing::info!(
                    "GC without the node's name cannot tell this node's leaks: it leaves them to the cleanup controller"
                );
                Vec::new()
            }
        };
        self.gc_orphan_reservations(req, &is_valid).await?;
        Ok(released)
    }

    /// GC of `pools` (each with the configured range it serves; `node_slices`: this node's
    /// slice pools). The valid list is this node's runtime's for this network configuration,
    /// and an entry records the pod, not its node or network, so each unlisted entry's pod is
    /// looked up and [`leaked_on_node`] decides. The removal itself re-reads the pool and
    /// matches the entries by attachment and address.
    async fn gc_pools(
        &self,
        req: &GcRequest,
        pools: &[(Cidr, PoolRef)],
        (node, node_slices): (&str, bool),
        is_valid: &(dyn Fn(&Attachment) -> bool + Sync),
    ) -> Result<Vec<Allocation>, StoreError> {
        let mut released = Vec::new();
        let mut other_slices = OtherSlices::default();
        for (configured, pool) in pools {
            let name = object_name(&pool.name);
            let Some(object) = self.kube.get_pool(&name).await? else {
                continue;
            };
            let slice_of = node_slices.then(|| SliceOf {
                req,
                configured: req.pools.iter().find(|p| p.range.cidr == *configured),
            });
            // Each pod is looked up once per pool, after the pool is read: a pod gone when an
            // earlier pool was judged may have been created again since, and its ADD may have
            // written its new sandbox into this pool's entry, which must be judged by the pod
            // as it is now.
            let mut places: HashMap<String, PodPlace> = HashMap::new();
            let doc = PoolDoc::new(&name, pool.range.cidr, Some(object))?;
            let mut leaked = BTreeSet::new();
            for entry in doc
                .entries()
                .into_iter()
                .filter(|e| !is_valid(&e.attachment))
            {
                let moved = slice_of.as_ref().map(|s| (s, &mut other_slices));
                if self
                    .is_leak_of(&entry.attachment, node, moved, &mut places)
                    .await?
                {
                    leaked.insert((
                        entry.ip,
                        entry.attachment.container_id,
                        entry.attachment.ifname,
                    ));
                }
            }
            if leaked.is_empty() {
                continue;
            }
            let pick = |e: &Entry, _: &[Entry]| {
                let key = (
                    e.ip,
                    e.attachment.container_id.clone(),
                    e.attachment.ifname.clone(),
                );
                leaked.contains(&key)
            };
            let release = async |go: Option<&Hold>| {
                self.release_picked((*configured, pool), &req.network_name, pick, go)
                    .await
            };
            released.extend(self.releasing(node_slices, release).await?);
        }
        Ok(released)
    }

    /// Whether an unlisted entry held by `who` is this node's leak (its pod is looked up, once).
    /// In this node's slice pool (`in_slice`), a pod running on another node is looked for in
    /// that node's slice pool of the network.
    async fn is_leak_of(
        &self,
        who: &Attachment,
        node: &str,
        in_slice: Option<(&SliceOf<'_>, &mut OtherSlices)>,
        places: &mut HashMap<String, PodPlace>,
    ) -> Result<bool, StoreError> {
        let Some(pod_ref) = who.pod_ref.as_deref() else {
            return Ok(false);
        };
        let Some(place) = self.place_of(pod_ref, places).await? else {
            return Ok(false);
        };
        let moved_off = match (&place, in_slice) {
            (PodPlace::Exists { node: Some(on), .. }, Some((slice_of, seen))) if on != node => {
                self.holds_from_slice(slice_of, who, on, seen).await?
            }
            _ => false,
        };
        Ok(leaked_on_node(
            Some(pod_ref),
            who.pod_uid.as_deref(),
            &place,
            node,
            moved_off,
        ))
    }

    /// Whether the pod of `who` holds an address of the GC's network, on the same interface,
    /// from node `on`'s slice of the configured range: the network's NodeSlicePool and that
    /// node's pool are read once per GC.
    async fn holds_from_slice(
        &self,
        slice_of: &SliceOf<'_>,
        who: &Attachment,
        on: &str,
        seen: &mut OtherSlices,
    ) -> Result<bool, StoreError> {
        let Some(configured) = slice_of.configured else {
            return Ok(false);
        };
        let req = slice_of.req;
        if seen.slices.is_none() {
            let name = node_slice::slice_pool_name(&req.network_name, &req.cni_network);
            seen.slices = Some(self.kube.get_slice_pool(&name).await?);
        }
        let key = (on.to_string(), configured.range.cidr);
        if !seen.holders.contains_key(&key) {
            let slices = seen.slices.as_ref().and_then(Option::as_ref);
            let slice = slices.and_then(|s| node_slice::slice_of(s, on).ok().flatten());
            let pool = slice.and_then(|slice| {
                node_slice::pool_to_release(configured, slice, &req.network_name, on)
            });
            let mut holders = Vec::new();
            if let Some(pool) = pool {
                let name = object_name(&pool.name);
                if let Some(object) = self.kube.get_pool(&name).await? {
                    let doc = PoolDoc::new(&name, pool.range.cidr, Some(object))?;
                    let entries = doc.entries().into_iter().map(|e| e.attachment);
                    holders.extend(entries.map(|a| (a.pod_ref, a.ifname)));
                }
            }
            seen.holders.insert(key.clone(), holders);
        }
        let held = &seen.holders[&key];
        Ok(held
            .iter()
            .any(|(pod_ref, ifname)| *pod_ref == who.pod_ref && *ifname == who.ifname))
    }

    /// Where pod `pod_ref` is, looked up once per `places`; `None` when the reference cannot
    /// name a pod (only `namespace/name` of two object names can: an empty name would read as
    /// a list, and a runtime outside Kubernetes records its container's name, `web_1/web_1`).
    async fn place_of(
        &self,
        pod_ref: &str,
        places: &mut HashMap<String, PodPlace>,
    ) -> Result<Option<PodPlace>, StoreError> {
        if let Some(place) = places.get(pod_ref) {
            return Ok(Some(place.clone()));
        }
        let Some((namespace, name)) = crate::cleanup::pods::namespace_and_name(pod_ref) else {
            return Ok(None);
        };
        let place = self.kube.pod_place(namespace, name).await?;
        places.insert(pod_ref.to_string(), place.clone());
        Ok(Some(place))
    }

    /// Deletes the reservations, among the addresses of the configured ranges, that no pool of
    /// the namespace backs (left by an ADD that could not finish its undo). Only old ones: an
    /// ADD in flight holds its reservation for a moment before its pool entry lands. And only
    /// those whose pod is gone: a pool entry lost while its pod runs (an IPPool deleted or
    /// restored by hand, a Go binary dropping an offset beyond 2^63) leaves the reservation the
    /// one guard of a live address, and the valid list names this node's attachments only. A
    /// reservation that names no pod stays (`whereabouts doctor` reports it).
    async fn gc_orphan_reservations(
        &self,
        req: &GcRequest,
        is_valid: &(dyn Fn(&Attachment) -> bool + Sync),
    ) -> Result<(), StoreError> {
        let min_age = (self.settings.deadline.as_secs() as i64 * 2).max(300);
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let mut places: HashMap<String, PodPlace> = HashMap::new();
        for found in self.unbacked_reservations().await? {
            let Some(ip) = reservation_ip(&found.name, &req.network_name) else {
                continue;
            };
            let ours = req.pools.iter().any(|p| p.range.cidr.contains(ip));
            let old = found.created.is_some_and(|t| now - t >= min_age);
            let mut holder = found.reservation.attachment.clone();
            let pod_ref = holder.pod_ref.take().filter(|r| !r.is_empty());
            if !ours || !old || is_valid(&holder) {
                continue;
            }
            // One that names no pod may be another node's: nothing tells its address unused.
            let Some(pod_ref) = pod_ref else {
                continue;
            };
            if self.place_of(&pod_ref, &mut places).await? == Some(PodPlace::Gone) {
                self.release_unbacked(&found.reservation).await?;
            }
        }
        Ok(())
    }

    /// The reservations that no pool entry of the namespace backs. Reservations are listed
    /// before the pools: an ADD writes its reservation before its pool entry, so one whose entry
    /// landed in between counts as backed; one still in flight is listed, and the caller's
    /// judgement (its pod exists; it is recent) keeps it.
    pub async fn unbacked_reservations(&self) -> Result<Vec<Unbacked>, StoreError> {
        let reservations = self.kube.list_reservations(None).await?;
        let backed = self.held_addresses().await?;
        Ok(reservations
            .into_iter()
            .filter_map(Unbacked::of)
            .filter(|found| !addresses_named_by(&found.name).any(|ip| backed.contains(&ip)))
            .collect())
    }

    /// Deletes the reservation if it is still the object listed (same uid and version). While
    /// Go binaries may write the pools, under their Lease, and only if no pool holds its address
    /// by then: a Go ADD of the holder's pod keeps the reservation unwritten for its own entry.
    pub async fn release_unbacked(&self, reservation: &Reservation) -> Result<bool, StoreError> {
        self.releasing(false, async |go| {
            if let Some(hold) = go {
                if self.backed_now(&reservation.name).await? {
                    return Ok(false);
                }
                hold.check()?;
            }
            self.delete_unbacked(reservation).await
        })
        .await
    }

    /// Whether a pool of the namespace holds an address reservation `name` may name.
    async fn backed_now(&self, name: &str) -> Result<bool, StoreError> {
        let held = self.held_addresses().await?;
        Ok(addresses_named_by(name).any(|ip| held.contains(&ip)))
    }

    /// Every address the namespace's pools hold (one list of the pools).
    async fn held_addresses(&self) -> Result<BTreeSet<IpAddr>, StoreError> {
        let mut held = BTreeSet::new();
        for object in self.kube.list_pools(None).await? {
            let name = object.metadata.name.clone().unwrap_or_default();
            let Some(cidr) = Cidr::parse(&object.spec.range, false) else {
                continue;
            };
            if let Ok(doc) = PoolDoc::new(&name, cidr, Some(object)) {
                held.extend(doc.entries().iter().map(|e| e.ip));
            }
        }
        Ok(held)
    }

    async fn delete_unbacked(&self, reservation: &Reservation) -> Result<bool, StoreError> {
        let (uid, rv) = reservation.version.split_once('/').unwrap_or_default();
        match self
            .kube
            .delete_reservation(&reservation.name, Some(uid), Some(rv))
            .await
        {
            Ok(()) => Ok(true),
            Err(ApiError::Conflict(_)) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Every allocation, or those of one pool (by its name).
    pub async fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
        let objects: Vec<IPPool> = match pool {
            Some(name) => self
                .kube
                .get_pool(&object_name(name))
                .await?
                .into_iter()
                .collect(),
            None => self.kube.list_pools(None).await?,
        };
        let slices = self.slice_holders().await;
        let mut allocations = Vec::new();
        for object in objects {
            let name = object.metadata.name.clone().unwrap_or_default();
            let Some(cidr) = Cidr::parse(&object.spec.range, false) else {
                continue;
            };
            let (network, slice_node) = network_of_pool(&name, cidr)
                .map(|prefix| split_slice_holder(prefix, cidr, &slices))
                .unwrap_or_default();
            let doc = PoolDoc::new(&name, cidr, Some(object))?;
            for entry in doc.entries() {
                let mut allocation = Self::allocation(&doc, entry, &network);
                allocation.slice_node = slice_node.clone();
                allocations.push(allocation);
            }
        }
        Ok(allocations)
    }

    /// Which node each slice of the NodeSlicePools is given to, by the slice's range: a
    /// node-slice pool's name holds its node between the network and the range. Only to name
    /// networks: without the list (no such resource, no right to read it) the names are read as
    /// they stand.
    async fn slice_holders(&self) -> SliceHolders {
        let slices = match self.kube.list_slices().await {
            Ok(slices) => slices,
            Err(err) => {
                tracing::debug!(%err, "node-slice pools' networks read from their names alone");
                Vec::new()
            }
        };
        let mut holders = SliceHolders::new();
        for pool in &slices {
            let network = pool.metadata.name.clone().unwrap_or_default();
            let given = pool
                .status
                .iter()
                .flat_map(|status| &status.allocations)
                .filter(|slice| !slice.node_name.is_empty());
            for slice in given {
                if let Some(range) = Cidr::parse(&slice.slice_range, false) {
                    let holder = (network.clone(), slice.node_name.clone());
                    holders.entry(range.network()).or_default().push(holder);
                }
            }
        }
        holders
    }

    /// Releases one address of one pool, whoever holds it or only while `holder` does, and its
    /// reservation.
    pub async fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError> {
        // Whether the pool is a node's slice is not known here: the Lease is taken for those
        // too, which costs time only.
        self.releasing(false, async |go| {
            self.release_alone(pool, ip, holder, go).await
        })
        .await
    }

    async fn release_alone(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
        go: Option<&Hold>,
    ) -> Result<Option<Allocation>, StoreError> {
        let name = object_name(pool);
        let Some(object) = self.kube.get_pool(&name).await? else {
            return Ok(None);
        };
        let Some(cidr) = Cidr::parse(&object.spec.range, false) else {
            return Err(StoreError::io(format!(
                "IPPool {name} has an unreadable range {:?}",
                object.spec.range
            )));
        };
        let held = |e: &Entry| holder.is_none_or(|who| who.same_attachment(&e.attachment));
        go.map_or(Ok(()), Hold::check)?;
        let removed = self
            .remove_entries(&name, cidr, |e, _| e.ip == ip && held(e))
            .await?;
        let Some(Removed { entry, at }) = removed.into_iter().next() else {
            return Ok(None);
        };
        // The pool's name starts with the network name (and, for node slices, the node): try
        // each reading; the owner check makes a wrong guess harmless.
        let prefix = network_of_pool(&name, cidr).unwrap_or_default();
        let mut candidates = vec![prefix.clone()];
        let mut rest = prefix.as_str();
        while let Some((head, _)) = rest.rsplit_once('-') {
            candidates.push(head.to_string());
            rest = head;
        }
        if !prefix.is_empty() {
            candidates.push(String::new());
        }
        let go = go.map(|hold| UnderGo { hold, pool: &name });
        for network in &candidates {
            if self
                .release_reservation(entry.ip, network, &entry.attachment, at.as_deref(), go)
                .await?
            {
                break;
            }
        }
        let doc = PoolDoc::new(&name, cidr, None)?;
        Ok(Some(Self::allocation(&doc, entry, &prefix)))
    }
}

/// The pool a batch of DELs releases from: its object, the range it covers, the range the
/// callers configured (what their allocations report) and the network of the reservations.
struct ReleaseTarget {
    name: String,
    cidr: Cidr,
    configured: Cidr,
    network_name: String,
}

/// What precedes the range in a pool's name: the network name (and node, for node slices).
fn network_of_pool(name: &str, cidr: Cidr) -> Option<String> {
    let range_part = object_name(&pool_name(&cidr, "", None));
    if name == range_part {
        return Some(String::new());
    }
    let upstream_part = pool_name(&cidr, "", None);
    name.strip_suffix(&format!("-{upstream_part}"))
        .or_else(|| name.strip_suffix(&format!("-{range_part}")))
        .map(str::to_string)
}

/// By a slice's range, the NodeSlicePools that give it (their names) and the node each gives
/// it to.
type SliceHolders = HashMap<Cidr, Vec<(String, String)>>;

/// The network part of `prefix` (what precedes the range in a pool's name), and the node a
/// node-slice pool of range `cidr` names after it: `network-node`, where a NodeSlicePool of that
/// name gives the slice to that node, or `node` alone (a network with no `network_name`, whose
/// NodeSlicePool is named after its configuration). No node for a pool that is no node's slice.
fn split_slice_holder(
    prefix: String,
    cidr: Cidr,
    holders: &SliceHolders,
) -> (String, Option<String>) {
    let given = holders.get(&cidr.network()).into_iter().flatten();
    for (network, node) in given {
        if prefix == *node || prefix == format!("{network}-{node}") {
            let network = if prefix == *node {
                ""
            } else {
                network.as_str()
            };
            return (network.to_string(), Some(node.clone()));
        }
    }
    (prefix, None)
}

/// What a node's GC needs to look for a pod in another node's slice pool of its network: the
/// request, and the configured range the pool under judgement serves.
struct SliceOf<'a> {
    req: &'a GcRequest,
    configured: Option<&'a PoolRef>,
}

/// What a node's GC read of other nodes' slices: the network's NodeSlicePool (once), and the
/// holders of each node's slice pool of a configured range, by node and range.
#[derive(Default)]
struct OtherSlices {
    slices: Option<Option<NodeSlicePool>>,
    holders: HashMap<(String, Cidr), Vec<PodInterface>>,
}

/// An entry's pod reference and interface.
type PodInterface = (Option<String>, String);

/// While Go binaries may write the pools, what a reservation's release needs: their Lease as
/// held (checked before the delete) and the pool the released entry was in.
#[derive(Clone, Copy)]
pub(super) struct UnderGo<'a> {
    pub hold: &'a Hold,
    pub pool: &'a str,
}

/// A reservation found unbacked, with when it was made (or taken over: see
/// [`reservation::TAKEN_OVER_AT`]).
pub struct Unbacked {
    pub name: String,
    pub created: Option<i64>,
    pub reservation: Reservation,
}

impl Unbacked {
    /// The reservation as listed (its version for the conditional delete), if it has a name.
    pub(super) fn of(found: OverlappingRangeIPReservation) -> Option<Unbacked> {
        let name = found.metadata.name.clone()?;
        let uid = found.metadata.uid.clone().unwrap_or_default();
        let rv = found.metadata.resource_version.clone().unwrap_or_default();
        let created = reservation::held_since(&found);
        let spec = found.spec;
        Some(Unbacked {
            created,
            reservation: Reservation {
                name: name.clone(),
                attachment: Attachment {
                    container_id: spec.containerid,
                    ifname: spec.ifname,
                    pod_ref: Some(spec.podref).filter(|p| !p.is_empty()),
                    pod_uid: None,
                },
                version: format!("{uid}/{rv}"),
            },
            name,
        })
    }
}

/// Every address a reservation's name can stand for. The name does not say where the network
/// name ends (both may hold dashes, and an IPv6 address is written with dashes), so each
/// suffix after a dash is tried: a reservation counts as backed if any of them is in a pool,
/// which errs on the side of keeping it.
fn addresses_named_by(name: &str) -> impl Iterator<Item = IpAddr> + '_ {
    std::iter::once(0)
        .chain(name.match_indices('-').map(|(i, _)| i + 1))
        .filter_map(|start| reservation_ip(&name[start..], ""))
}

/// The address a reservation of `network_name` is named after.
fn reservation_ip(name: &str, network_name: &str) -> Option<IpAddr> {
    let rest = if network_name.is_empty() {
        name
    } else {
        name.strip_prefix(&object_name(network_name))?
            .strip_prefix('-')?
    };
    if let Ok(ip) = rest.parse::<IpAddr>() {
        return Some(ip);
    }
    let text = rest.replace('-', ":");
    let text = text
        .strip_prefix('0')
        .filter(|t| t.starts_with("::"))
        .unwrap_or(&text);
    text.parse::<IpAddr>().ok().filter(IpAddr::is_ipv6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reservation taken over by a pod's next sandbox counts as made then: the sweeps of
    /// unbacked reservations must not take it while its pool entry is on its way.
    #[test]
    fn a_reservation_taken_over_is_as_young_as_the_take_over() {
        let mut found = reservation::new_object("10.0.0.5", &Attachment::default());
        let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(48);
        found.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(long_ago),
        );
        assert_eq!(
            Unbacked::of(found.clone()).unwrap().created,
            Some(long_ago.as_second())
        );
        let now = jiff::Timestamp::now().as_second();
        let mut taken = reservation::taken_over(&found, &Attachment::default());
        let created = Unbacked::of(taken.clone()).unwrap().created.unwrap();
        assert!((now - created).abs() <= 5, "{created} is not about {now}");

        // Stamped by a node whose clock is an hour behind: the server's time of the write
        // counts.
        let behind = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
        let annotations = taken.metadata.annotations.as_mut().unwrap();
        annotations.insert(reservation::TAKEN_OVER_AT.into(), behind);
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
        taken.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            time: Some(Time(jiff::Timestamp::now())),
            ..Default::default()
        }]);
        let created = Unbacked::of(taken).unwrap().created.unwrap();
        assert!((now - created).abs() <= 5, "{created} is not about {now}");
    }

    #[test]
    fn names_read_back() {
        let cidr = Cidr::parse("10.0.0.0/8", false).unwrap();
        assert_eq!(network_of_pool("10.0.0.0-8", cidr).as_deref(), Some(""));
        assert_eq!(
            network_of_pool("net-node1-10.0.0.0-8", cidr).as_deref(),
            Some("net-node1")
        );
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(reservation_ip("10.0.0.1", ""), ip("10.0.0.1"));
        assert_eq!(reservation_ip("mynet-10.0.0.1", "mynet"), ip("10.0.0.1"));
        assert_eq!(reservation_ip("other-10.0.0.1", "mynet"), None);
        assert_eq!(reservation_ip("2001--0", ""), ip("2001::"));
        assert_eq!(reservation_ip("abcd--1", ""), ip("abcd::1"));
        assert_eq!(reservation_ip("0--0", ""), ip("::"));
        assert_eq!(reservation_ip("0--5", ""), ip("::5"));
    }

    #[test]
    fn a_node_slice_pools_network_leaves_its_node_out() {
        let slice = Cidr::parse("10.0.1.0/26", false).unwrap();
        let given = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(network, node)| (network.to_string(), node.to_string()))
                .collect()
        };
        let holders = HashMap::from([(
            slice,
            given(&[
                ("net", "node1"),
                ("my-net", "node-b"),
                ("x", "gpu-node1"),
                ("cfg", "node2"),
            ]),
        )]);
        let split = |prefix: &str, cidr| {
            let (network, node) = split_slice_holder(prefix.into(), cidr, &holders);
            (network, node.unwrap_or_default())
        };
        let read = |network: &str, node: &str| (network.to_string(), node.to_string());
        assert_eq!(split("net-node1", slice), read("net", "node1"));
        assert_eq!(split("my-net-node-b", slice), read("my-net", "node-b"));
        assert_eq!(split("x-gpu-node1", slice), read("x", "gpu-node1"));
        // A network without `network_name`: the node alone.
        assert_eq!(split("node2", slice), read("", "node2"));
        // Only as a NodeSlicePool gives the slice: neither `ml` gives it to `gpu-node1` nor
        // `ml-gpu` to `node1`, so the name stands as it is.
        assert_eq!(split("ml-gpu-node1", slice), read("ml-gpu-node1", ""));
        // A pool that is no slice of that node, or of a range no slice has, stands as named.
        assert_eq!(split("net-node10", slice), read("net-node10", ""));
        let other = Cidr::parse("10.0.2.0/26", false).unwrap();
        assert_eq!(split("net-node1", other), read("net-node1", ""));
    }
}
