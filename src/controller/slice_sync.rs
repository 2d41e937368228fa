//! The node-slice controller: for every NetworkAttachmentDefinition whose whereabouts `ipam`
//! sets `node_slice_size`, a NodeSlicePool (named as the Kubernetes engine looks it up) that
//! gives every node a slice and frees the slices of removed nodes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    DeleteParams, DynamicObject, ListParams, ObjectMeta, PartialObjectMeta, PostParams,
    Preconditions,
};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use serde_json::Value;

use super::leader::Leadership;
use super::metrics::Metrics;
use super::slices::{assign, unusable_slices, withdrawn, Assignment};
use crate::config::{self, ipam_of, names_whereabouts};
use crate::ipam::names::{is_valid_object_name, object_name, pool_name};
use crate::ipam::{Cidr, Range};
use crate::k8s::crd::{
    nad_resource, IPPool, NodeSliceAllocation, NodeSlicePool, NodeSlicePoolSpec,
    NodeSlicePoolStatus,
};
use crate::k8s::described::pool_part;
use crate::store::error::chain;
use crate::store::kubernetes::slice_pool_name;

/// What one NodeSlicePool must divide.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    pub name: String,
    pub range: Cidr,
    pub size: u8,
    /// `node_slice_size` as the NetworkAttachmentDefinition writes it (`"24"` or `"/24"`): the
    /// Go controller writes it so and re-slices every node when the text differs, so the text
    /// is kept for a rollback; sizes are compared by value.
    pub size_text: String,
    /// `network_name`, which prefixes the names of the network's IPPools.
    pub network_name: String,
    /// The NetworkAttachmentDefinition it came from, for messages.
    pub source: String,
    /// The slices a new node must not get: it could hand out no address of them (outside the
    /// bounds, excluded), as blocks.
    pub unusable: Vec<Cidr>,
    /// The NetworkAttachmentDefinitions of the pool's namespace that ask for it, as owner
    /// references (the first, the oldest, as the controller), as the Go controller sets them.
    pub owners: Vec<OwnerReference>,
}

/// The NodeSlicePool a NetworkAttachmentDefinition's `spec.config` asks for, if any. The
/// `ipam` object is read by the `config` module, as the plugin reads it on the node (keys in
/// any case, the flat file's trust rules at their defaults).
pub fn wanted(source: &str, nad_name: &str, config_text: &str) -> Result<Option<Wanted>, String> {
    let conf: Value = match serde_json::from_str(config_text) {
        Ok(conf) => conf,
        // A configuration that cannot be read wants no pool of ours unless it might name this
        // plugin (an escape can spell it): an empty `config`, which Multus fills from a file
        // on the node, or any other network's typo, must not hold up every pool's removal.
        Err(_) if !might_name_whereabouts(config_text) => return Ok(None),
        Err(e) => return Err(format!("{source}: spec.config is not JSON: {e}")),
    };
    let Some(ipam) = ipam_of(&conf) else {
        return Ok(None);
    };
    if !names_whereabouts(&ipam) || !has_key(&ipam, "node_slice_size") {
        return Ok(None);
    }
    let cfg = config::load_untrusted(Some(&pool_part(&ipam, "node_slice_size")), &[])
        .map_err(|e| format!("{source}: {e}"))?;
    let Some(size) = cfg.node_slice_size else {
        return Ok(None);
    };
    let spec = cfg
        .ranges
        .first()
        .ok_or_else(|| format!("{source}: node_slice_size is set but no range is"))?;
    let range = spec.cidr;
    let usable = Range::resolve(spec, cfg.gateway).map_err(|e| format!("{source}: {e}"))?;
    // Multus gives a configuration without a name its NetworkAttachmentDefinition's name: the
    // plugin then looks for the NodeSlicePool under that name.
    let cni_network =
        config::network_name_of(&conf, nad_name).map_err(|config::SameField(a, b)| {
            format!(
                "{source}: spec.config has both {a:?} and {b:?}, which name the network: keep one"
            )
        })?;
    let size_text = ipam
        .as_object()
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| config::same_key(k, "node_slice_size"))
                .and_then(|(_, v)| v.as_str())
        })
        .map_or_else(|| format!("/{size}"), str::to_string);
    let name = slice_pool_name(&cfg.network_name, cni_network);
    if !is_valid_object_name(&name) {
        // No NodeSlicePool can have the name (the plugin refuses its ADDs for it), and it must
        // not reach a request path; a pass that skips it may still remove unwanted pools.
        tracing::warn!(%source, "ignored: ipam.network_name (else the configuration's name) cannot name a NodeSlicePool");
        return Ok(None);
    }
    Ok(Some(Wanted {
        name,
        range: range.network(),
        size,
        unusable: unusable_slices(&range, size, &usable),
        size_text,
        network_name: cfg.network_name.clone(),
        source: source.to_string(),
        owners: Vec::new(),
    }))
}

/// Whether JSON text that does not parse may still have been meant to name this plugin.
fn might_name_whereabouts(text: &str) -> bool {
    text.to_ascii_lowercase().contains("whereabouts") || text.contains("\\u")
}

/// The owner reference of a NetworkAttachmentDefinition; `first`: the controlling one. It does
/// not block its owner's deletion: where the API server enforces owner reference permissions
/// (OpenShift, hardened clusters), setting `blockOwnerDeletion` needs `update` on the
/// definitions' `finalizers`, which the controller is not granted, and a foreground deletion
/// of a definition has no reason to wait for its pool.
fn owner_of(nad: &DynamicObject, first: bool) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: nad_resource().api_version,
        kind: nad_resource().kind,
        name: nad.metadata.name.clone()?,
        uid: nad.metadata.uid.clone()?,
        controller: first.then_some(true),
        block_owner_deletion: None,
    })
}

/// Whether `object` has `key`, in any case (as the `config` module reads keys).
fn has_key(object: &Value, key: &str) -> bool {
    object
        .as_object()
        .is_some_and(|m| m.keys().any(|k| config::same_key(k, key)))
}

/// The pools the NetworkAttachmentDefinitions ask for, and whether every one of them could be
/// read (when one cannot, its pool, whatever it is, must not be taken for unwanted). Those of
/// `namespace` (the pools') that agree on the layout own the pool; one in another namespace
/// cannot (the garbage collector takes an owner outside the namespace for a missing one, and
/// would delete the pool).
///
/// Pool names hold no namespace, so definitions anywhere may ask for one pool. Of those that
/// disagree, the oldest that asks for the layout the pool already has wins (`existing`: name
/// to range and slice size), else the oldest: a newer definition elsewhere cannot re-slice a
/// network in use (nor take it over when its own definition is re-created), and one whose
/// author edits it cannot make the pool flap between layouts while another still asks for it.
fn wanted_pools(
    nads: &[Arc<DynamicObject>],
    namespace: &str,
    existing: &BTreeMap<String, Layout>,
) -> (BTreeMap<String, Wanted>, bool) {
    let mut asked: BTreeMap<String, Vec<(Wanted, Option<OwnerReference>)>> = BTreeMap::new();
    let mut complete = true;
    for nad in nads {
        let source = format!(
            "NetworkAttachmentDefinition {}/{}",
            nad.metadata.namespace.as_deref().unwrap_or_default(),
            nad.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(config) = nad
            .data
            .get("spec")
            .and_then(|s| s.get("config"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        let local = nad.metadata.namespace.as_deref() == Some(namespace);
        let nad_name = nad.metadata.name.as_deref().unwrap_or_default();
        match wanted(&source, nad_name, config) {
            Ok(Some(w)) => {
                let owner = local.then(|| owner_of(nad, false)).flatten();
                asked.entry(w.name.clone()).or_default().push((w, owner));
            }
            Ok(None) => {}
            Err(err) => {
                complete = false;
                tracing::warn!(%err, "ignored");
            }
        }
    }
    let pools = asked
        .into_iter()
        .map(|(name, candidates)| {
            let chosen = chosen(candidates, existing.get(&name));
            (name, chosen)
        })
        .collect();
    (pools, complete)
}

/// A NodeSlicePool's layout: its range and slice size.
pub type Layout = (Cidr, u8);

/// The layout each NodeSlicePool has; none for a pool whose spec does not read.
fn layouts(pools: &[NodeSlicePool]) -> BTreeMap<String, Layout> {
    let layout = |p: &NodeSlicePool| {
        let range = Cidr::parse(&p.spec.range, false)?.network();
        let size = crate::ipam::slices::parse_slice_size(&p.spec.slice_size).ok()?;
        Some((p.metadata.name.clone()?, (range, size)))
    };
    pools.iter().filter_map(layout).collect()
}

/// Of the definitions asking for one pool (oldest first), the one that decides it ([`wanted_pools`]),
/// owned by those of its layout in the pool's namespace, the oldest as the controller.
fn chosen(candidates: Vec<(Wanted, Option<OwnerReference>)>, has: Option<&Layout>) -> Wanted {
    let layout = |w: &Wanted| (w.range, w.size);
    let at = has
        .and_then(|has| candidates.iter().position(|(w, _)| layout(w) == *has))
        .unwrap_or(0);
    let first = &candidates[at].0;
    let winner = layout(first);
    let mut owners = Vec::new();
    for (w, owner) in &candidates {
        if layout(w) == winner {
            owners.extend(owner.clone());
            // Merged, but what they would hand out differs: the chosen one's bounds,
            // exclusions and IPPool names apply to the other's nodes too.
            if w.unusable != first.unusable || w.network_name != first.network_name {
                tracing::warn!(
                    pool = %w.name, chosen = %first.source, other = %w.source,
                    "two NetworkAttachmentDefinitions want the same NodeSlicePool with the same range and slice size but different bounds, exclusions or network_name; the chosen one's apply"
                );
            }
        } else {
            tracing::warn!(
                pool = %w.name, chosen = %first.source, ignored = %w.source,
                "two NetworkAttachmentDefinitions want the same NodeSlicePool with different ranges or slice sizes; the one the pool already follows (else the oldest) wins"
            );
        }
    }
    if let Some(first) = owners.first_mut() {
        first.controller = Some(true);
    }
    let mut want = candidates
        .into_iter()
        .nth(at)
        .map(|(w, _)| w)
        .expect("a candidate");
    want.owners = owners;
    want
}

/// One pass over the cached NetworkAttachmentDefinitions and nodes: every wanted pool brought
/// up to date with the nodes, and the pools no NetworkAttachmentDefinition wants any more
/// removed.
pub async fn sync(
    client: &Client,
    namespace: &str,
    (nads, nodes): (&Store<DynamicObject>, &Store<PartialObjectMeta<Node>>),
    metrics: &Arc<Metrics>,
    leadership: &Leadership,
) -> Result<Pass, String> {
    // Oldest first, so "the first one wins" names the same one every time.
    let mut nads = nads.state();
    nads.sort_by(|a, b| {
        let key = |o: &DynamicObject| {
            (
                o.metadata.creation_timestamp.clone(),
                o.metadata.uid.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let api: Api<NodeSlicePool> = Api::namespaced(client.clone(), namespace);
    let existing = slice_pools(&api).await?;
    let (pools, complete) = wanted_pools(&nads, namespace, &layouts(&existing));
    let nodes: BTreeSet<String> = nodes
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let mut failed = Vec::new();
    let mut pass = Pass::Done;
    if complete {
        if let Err(err) = remove_unwanted(&api, &pools, &existing, metrics, leadership).await {
            failed.push(err);
        }
    }
    if !pools.is_empty() {
        // The IPPools are listed after the NodeSlicePools are read: an ADD that read a pool's
        // slice before any change the pass starts from (its own, another writer's, a deletion)
        // wrote its entry before this list, or reads the change when it checks its slice.
        let mut existing: BTreeMap<String, NodeSlicePool> = existing
            .into_iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, p)))
            .collect();
        let held = Held {
            pools: held_pools(client, namespace).await?,
            networks: pools
                .values()
                .map(|w| object_name(&w.network_name))
                .filter(|n| !n.is_empty())
                .collect(),
        };
        for want in pools.values() {
            if !leadership.is_leader() {
                return Err(NOT_LEADING.to_string());
            }
            let current = existing.remove(&want.name);
            match sync_pool(&api, (want, current), &nodes, &held, metrics).await {
                Ok(Pass::Again) => pass = Pass::Again,
                Ok(Pass::Done) => {}
                Err(err) => failed.push(err),
            }
        }
    }
    if failed.is_empty() {
        Ok(pass)
    } else {
        Err(failed.join("; "))
    }
}

/// What a pass that succeeded leaves to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Nothing until the next change or the minute's check.
    Done,
    /// Slices were withdrawn from nodes: the next pass, soon after, may give them out.
    Again,
}

/// The label the controller puts on every NodeSlicePool it writes: it removes only pools it
/// made (or a NetworkAttachmentDefinition owns, as Go's controller makes them), never one made
/// by hand for a network configured outside NetworkAttachmentDefinitions.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "whereabouts-controller");

fn with_managed_by(labels: Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    let mut labels = labels.unwrap_or_default();
    labels.insert(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string());
    labels
}

fn managed_here(pool: &NodeSlicePool) -> bool {
    let labels = pool.metadata.labels.as_ref();
    labels.and_then(|l| l.get(MANAGED_BY.0)).map(String::as_str) == Some(MANAGED_BY.1)
}

/// Whether the controller may remove `pool` once no NetworkAttachmentDefinition asks for it:
/// it made the pool, or a NetworkAttachmentDefinition owns it.
fn removable(pool: &NodeSlicePool) -> bool {
    let nad = nad_resource();
    let mut owners = pool.metadata.owner_references.iter().flatten();
    managed_here(pool) || owners.any(|o| o.kind == nad.kind && o.api_version == nad.api_version)
}

/// A pass cut short: the Lease was lost (or its renewal is late) since it started.
const NOT_LEADING: &str = "not the leader any more: pass stopped";

/// NodeSlicePools that no NetworkAttachmentDefinition asks for, which the controller made or a
/// NetworkAttachmentDefinition owns: their network is gone. The IPPools of their slices stay
/// (their allocations are cleanup's to judge).
async fn remove_unwanted(
    api: &Api<NodeSlicePool>,
    pools: &BTreeMap<String, Wanted>,
    existing: &[NodeSlicePool],
    metrics: &Arc<Metrics>,
    leadership: &Leadership,
) -> Result<(), String> {
    for pool in existing {
        let Some(name) = pool.metadata.name.clone() else {
            continue;
        };
        if pools.contains_key(&name) {
            continue;
        }
        if !removable(pool) {
            tracing::debug!(pool = %name, "NodeSlicePool kept: made by hand (no NetworkAttachmentDefinition owns it and the controller did not make it)");
            continue;
        }
        // A pass takes a while (each request up to its timeout): a replica that lost the Lease
        // meanwhile must not delete a pool the new leader has just made for a network its own
        // caches have not seen yet.
        if !leadership.is_leader() {
            return Err(NOT_LEADING.to_string());
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: pool.metadata.resource_version.clone(),
                uid: pool.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => {
                metrics.forget_slices(&name);
                tracing::info!(pool = %name, "NodeSlicePool removed: no NetworkAttachmentDefinition asks for it");
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                metrics.conflicts.inc();
            }
            Err(e) => return Err(format!("cannot delete NodeSlicePool {name}: {}", chain(&e))),
        }
    }
    Ok(())
}

/// The IPPools that hold addresses, by name with their ranges. Without the IPPool resource
/// (another engine), none.
async fn held_pools(client: &Client, namespace: &str) -> Result<Vec<(String, Cidr)>, String> {
    let api: Api<IPPool> = Api::namespaced(client.clone(), namespace);
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list
            .items
            .iter()
            .filter(|p| !p.spec.allocations.is_empty())
            .filter_map(|p| {
                let range = Cidr::parse(&p.spec.range, false)?.network();
                Some((p.metadata.name.clone()?, range))
            })
            .collect()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(format!("cannot list IPPools: {}", chain(&e))),
    }
}

/// The IPPools that hold addresses, and the sliced networks' names that tell them apart.
struct Held {
    pools: Vec<(String, Cidr)>,
    /// The `network_name`s of the sliced networks, as objects are named.
    networks: BTreeSet<String>,
}

/// What the IPPools holding addresses say to one network's slices.
#[derive(Debug, Default, PartialEq, Eq)]
struct NetworkPools {
    /// Their ranges: a slice among them is not free for a new node, whoever it belonged to.
    busy: HashSet<Cidr>,
    /// The slice of the layout each node's own pool holds addresses in: the node's slice again
    /// when the NodeSlicePool has lost it (re-created with its NetworkAttachmentDefinition).
    by_node: Vec<NodeSliceAllocation>,
}

/// Names that tell one network's pools from another's.
struct Names<'a> {
    /// The nodes, and those the NodeSlicePool names.
    known: &'a BTreeSet<String>,
    /// The `network_name`s of the sliced networks, as objects are named.
    networks: &'a BTreeSet<String>,
}

/// The held pools of `want`'s network (`[network_name-][node-]<range>`): another network's
/// are another address space, with addresses and reservations named apart. Without a network
/// name, a pool `<x>-<range>` is a node's when `x` is a known node, or when its range is a slice
/// of this layout or of one before (a node removed since, whose pods' entries may not be
/// cleaned up yet) and `x` is not another sliced network's pool; another network's plain pools
/// over the whole range do not count.
fn network_pools(want: &Wanted, held: &[(String, Cidr)], names: &Names<'_>) -> NetworkPools {
    let network = object_name(&want.network_name);
    let is_slice = |range: &Cidr| range.prefix == want.size && want.range.contains(range.addr);
    // A slice of this layout or of one before (a node removed with or before a change of the
    // slice size), not the whole range, which another network's plain pool may be.
    let node_sized =
        |range: &Cidr| range.prefix > want.range.prefix && want.range.contains(range.addr);
    let another_networks = |prefix: &str| {
        let networks = names.networks.iter();
        networks.filter(|n| **n != network).any(|n| {
            prefix
                .strip_prefix(n.as_str())
                .is_some_and(|r| r.starts_with('-'))
        })
    };
    let known = names.known;
    let mut out = NetworkPools::default();
    let mut ranges = Vec::new();
    let mut nodes_pools = Vec::new();
    for (name, range) in held {
        let text = pool_name(range, "", None);
        let prefix = if *name == object_name(&text) {
            ""
        } else {
            match name.strip_suffix(&format!("-{text}")) {
                Some(prefix) => prefix,
                None => continue,
            }
        };
        let node = if want.network_name.is_empty() {
            let removed_nodes = node_sized(range) && !another_networks(prefix);
            if !prefix.is_empty() && !known.contains(prefix) && !removed_nodes {
                continue;
            }
            prefix
        } else if prefix == network {
            ""
        } else {
            match prefix
                .strip_prefix(&network)
                .and_then(|p| p.strip_prefix('-'))
            {
                Some(node) => node,
                None => continue,
            }
        };
        out.busy.insert(*range);
        ranges.push(*range);
        if known.contains(node) && is_slice(range) {
            nodes_pools.push((node, *range));
        }
    }
    // A node takes up its pool's slice again only where no other pool of the network holds
    // addresses: those would be handed out again from the node's pool.
    let others_overlap = |node: &str, slice: &Cidr| {
        ranges.iter().filter(|r| r.overlaps(slice)).count() > 1
            || nodes_pools
                .iter()
                .any(|(n, r)| *n != node && r.overlaps(slice))
    };
    for (node, slice) in &nodes_pools {
        if !others_overlap(node, slice) {
            out.by_node.push(NodeSliceAllocation {
                node_name: node.to_string(),
                slice_range: slice.to_string(),
            });
        }
    }
    out
}

/// The NodeSlicePools of the namespace; none without the resource.
async fn slice_pools(api: &Api<NodeSlicePool>) -> Result<Vec<NodeSlicePool>, String> {
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(format!("cannot list NodeSlicePools: {}", chain(&e))),
    }
}

/// Brings `want`'s NodeSlicePool (`existing`, as the pass read it) up to date; a write is
/// refused if the pool changed since.
async fn sync_pool(
    api: &Api<NodeSlicePool>,
    (want, existing): (&Wanted, Option<NodeSlicePool>),
    nodes: &BTreeSet<String>,
    held: &Held,
    metrics: &Arc<Metrics>,
) -> Result<Pass, String> {
    let creating = existing.is_none();
    let mut known = nodes.clone();
    known.extend(assigned_nodes(existing.as_ref()));
    let names = Names {
        known: &known,
        networks: &held.networks,
    };
    let pools = network_pools(want, &held.pools, &names);
    let Desired {
        pool,
        plan,
        withdraws,
        waiting,
    } = match desired_pool(existing, want, nodes, &pools) {
        Ok(desired) => desired,
        // The network's layout cannot be sliced (a slice larger than its range): no
        // pass can do better until its NetworkAttachmentDefinition changes, which wakes the
        // loop. Failing the pass would hold every other network's new nodes in its back-off.
        Err(err) => {
            tracing::warn!(pool = %want.name, source = %want.source, %err, "NodeSlicePool not made: the network cannot be sliced");
            return Ok(Pass::Done);
        }
    };
    if !waiting.is_empty() {
        tracing::info!(pool = %want.name, nodes = ?waiting, "these nodes wait for the next pass: the slices this one withdraws are given out after the IPPools are listed again");
    }
    let full: Vec<&String> = plan
        .unassigned
        .iter()
        .filter(|n| !waiting.contains(n))
        .collect();
    if !full.is_empty() {
        tracing::warn!(pool = %want.name, nodes = ?full, "no free slice left for these nodes");
    }
    let assigned = plan
        .allocations
        .iter()
        .filter(|a| !a.node_name.is_empty())
        .count() as u64;
    metrics.set_slices(
        &want.name,
        assigned,
        u64::try_from(plan.total).unwrap_or(u64::MAX),
    );
    let Some(pool) = pool else {
        return Ok(Pass::Done);
    };
    let result = if creating {
        api.create(&PostParams::default(), &pool).await.map(|_| ())
    } else {
        api.replace(&want.name, &PostParams::default(), &pool)
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) => {
            tracing::info!(pool = %want.name, assigned, "NodeSlicePool updated");
            Ok(if withdraws { Pass::Again } else { Pass::Done })
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            metrics.conflicts.inc();
            Err(format!("NodeSlicePool {} changed meanwhile", want.name))
        }
        Err(err) => Err(format!(
            "cannot write NodeSlicePool {}: {}",
            want.name,
            chain(&err)
        )),
    }
}

/// The nodes `pool`'s status gives a slice to.
fn assigned_nodes(pool: Option<&NodeSlicePool>) -> impl Iterator<Item = String> + '_ {
    let status = pool.and_then(|p| p.status.as_ref());
    let given = status.into_iter().flat_map(|s| &s.allocations);
    given
        .filter(|a| !a.node_name.is_empty())
        .map(|a| a.node_name.clone())
}

/// What a pass makes of one NodeSlicePool.
struct Desired {
    /// The object to write; `None`: the existing one is up to date.
    pool: Option<NodeSlicePool>,
    plan: Assignment,
    /// Whether the write takes slices from nodes, which a later pass may give out.
    withdraws: bool,
    /// The nodes left without a slice only because the free ones were withdrawn in this pass.
    waiting: Vec<String>,
}

/// The slices the status and the nodes' own pools give to nodes, as `assign` reads them (the
/// status's first; how many of them is the second value), and the plan they make. A slice the
/// bounds and exclusions leave no address in is dropped, so that its node gets a usable one:
/// Go's controller gives slices out in order whatever the bounds, and an exclusion may be added
/// later, and the node's ADDs would fail for as long as it held it. A node no usable slice is
/// left for keeps it: without a slice, its DELs would find nothing to release either.
fn first_plan(
    existing: Option<&NodeSlicePool>,
    want: &Wanted,
    nodes: &BTreeSet<String>,
    pools: &NetworkPools,
    busy: &HashSet<Cidr>,
) -> Result<(Vec<NodeSliceAllocation>, usize, Assignment), crate::ipam::slices::SliceError> {
    let status = existing
        .and_then(|p| p.status.as_ref())
        .map_or(&[][..], |s| &s.allocations);
    let unusable = |a: &NodeSliceAllocation| {
        let slice = Cidr::parse(&a.slice_range, false);
        slice.is_some_and(|slice| want.unusable.iter().any(|u| u.overlaps(&slice)))
    };
    let plan_keeping = |keep: &dyn Fn(&NodeSliceAllocation) -> bool| {
        let mut current: Vec<NodeSliceAllocation> =
            status.iter().filter(|a| keep(a)).cloned().collect();
        let from_status = current.len();
        current.extend(pools.by_node.iter().filter(|a| keep(a)).cloned());
        let plan = assign(&want.range, want.size, nodes, &current, busy)?;
        Ok((current, from_status, plan))
    };
    let first = plan_keeping(&|a| !unusable(a))?;
    let stranded: BTreeSet<&str> = first.2.unassigned.iter().map(String::as_str).collect();
    let dropped_from_stranded = status
        .iter()
        .chain(&pools.by_node)
        .any(|a| unusable(a) && stranded.contains(a.node_name.as_str()));
    if !dropped_from_stranded {
        return Ok(first);
    }
    plan_keeping(&|a| !unusable(a) || stranded.contains(a.node_name.as_str()))
}

/// The NodeSlicePool to write, and the assignment. The slice size is compared by value (`"24"`
/// is `"/24"`) and written as the NetworkAttachmentDefinition has it; owner references to
/// NetworkAttachmentDefinitions are the wanted ones, others are kept.
fn desired_pool(
    existing: Option<NodeSlicePool>,
    want: &Wanted,
    nodes: &BTreeSet<String>,
    pools: &NetworkPools,
) -> Result<Desired, crate::ipam::slices::SliceError> {
    let spec = NodeSlicePoolSpec {
        range: want.range.to_string(),
        slice_size: want.size_text.clone(),
    };
    // After a change of range or slice size a node keeps its slice only if it is still one of
    // the new layout (`assign` drops the others); the new slices avoid every pool of the
    // network that still holds addresses, so the live addresses of the old layout are never
    // handed out again. A node the status does not name takes up its own pool's slice again.
    let mut busy = pools.busy.clone();
    busy.extend(want.unusable.iter().copied());
    let (mut current, from_status, mut plan) =
        first_plan(existing.as_ref(), want, nodes, pools, &busy)?;
    let mut waiting = Vec::new();
    // A slice this pass takes from a node (the node removed, a new layout) is judged free from
    // a list of the IPPools made before this write; an ADD on that node that read the old
    // NodeSlicePool may still write into it meanwhile. It goes to another node only in a later
    // pass, whose list sees such an entry (the plugin takes back one whose slice it finds
    // withdrawn after its write).
    let given = existing.as_ref().and_then(|p| p.status.as_ref());
    let withdrawn = withdrawn(given.map_or(&[], |s| &s.allocations), &plan.allocations);
    if !withdrawn.is_empty() {
        busy.extend(withdrawn.iter().copied());
        // Nor does a node take such a slice up again in this pass for its own pool's addresses.
        let mut taken_up = current.split_off(from_status);
        taken_up.retain(|a| {
            let slice = Cidr::parse(&a.slice_range, false);
            !slice.is_some_and(|slice| withdrawn.iter().any(|w| w.overlaps(&slice)))
        });
        current.extend(taken_up);
        let first = plan;
        plan = assign(&want.range, want.size, nodes, &current, &busy)?;
        waiting = plan.unassigned.clone();
        waiting.retain(|node| !first.unassigned.contains(node));
    }
    let status = Some(NodeSlicePoolStatus {
        allocations: plan.allocations.clone(),
    });
    let nad_kind = nad_resource().kind;
    let mut owners: Vec<OwnerReference> = existing
        .as_ref()
        .and_then(|p| p.metadata.owner_references.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.kind != nad_kind)
        .collect();
    owners.extend(want.owners.iter().cloned());
    let owners = (!owners.is_empty()).then_some(owners);
    let pool = match existing {
        None => {
            let mut pool = NodeSlicePool::new(&want.name, spec);
            pool.status = status;
            pool.metadata.owner_references = owners;
            pool.metadata.labels = Some(with_managed_by(None));
            Some(pool)
        }
        Some(pool)
            if pool.spec == spec
                && pool.status == status
                && pool.metadata.owner_references == owners
                && managed_here(&pool) =>
        {
            None
        }
        Some(mut pool) => {
            pool.spec = spec;
            pool.status = status;
            let labels = with_managed_by(pool.metadata.labels.take());
            pool.metadata = ObjectMeta {
                managed_fields: None,
                owner_references: owners,
                labels: Some(labels),
                ..pool.metadata
            };
            Some(pool)
        }
    };
    Ok(Desired {
        pool,
        plan,
        withdraws: !withdrawn.is_empty(),
        waiting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_attachment_config() {
        let conf = r#"{"cniVersion":"0.3.1","name":"net-a","type":"macvlan","ipam":{"type":"whereabouts","range":"10.0.0.0/16","node_slice_size":"/24","network_name":"blue"}}"#;
        let w = wanted("nad", "nad", conf).unwrap().unwrap();
        assert_eq!(w.name, "blue");
        assert_eq!(w.size, 24);
        let plain = r#"{"name":"net-b","ipam":{"type":"whereabouts","range":"fd00::/64","node_slice_size":"80"}}"#;
        let w = wanted("nad", "nad", plain).unwrap().unwrap();
        assert_eq!(w.name, "net-b");
        assert!(wanted(
            "nad",
            "nad",
            r#"{"name":"x","ipam":{"type":"whereabouts","range":"10.0.0.0/24"}}"#
        )
        .unwrap()
        .is_none());
        // Unreadable: another network's (or an empty config, which Multus reads from a file on
        // the node) wants no pool; one that may name this plugin leaves the pass incomplete.
        for other in ["", "not json", r#"{"name":"x","ipam":{"type":"host-local""#] {
            assert_eq!(wanted("nad", "nad", other), Ok(None), "{other:?}");
        }
        for ours in [
            r#"{"name":"x","ipam":{"type":"whereabouts""#,
            r#"{"name":"x","ipam":{"type":"Whereabouts","#,
            r#"{"name":"x","ipam":{"type":"where\u0061bouts""#,
        ] {
            assert!(wanted("nad", "nad", ours).is_err(), "{ours:?}");
        }
        // Keys in any case, as the plugin reads them; engine settings play no part.
        let mixed = r#"{"name":"net-c","ipam":{"Type":"whereabouts","Range":"10.1.0.0/16","Node_Slice_Size":"/24","kubernetes":{"kubeconfig":"/elsewhere/k"}}}"#;
        let w = wanted("nad", "nad", mixed).unwrap().unwrap();
        assert_eq!((w.name.as_str(), w.size), ("net-c", 24));
        assert_eq!(w.size_text, "/24");
        // `ipam` in any case too; `name` as Multus reads it, as written (without it, Multus
        // passes the plugin the NetworkAttachmentDefinition's name).
        let spelled = r#"{"Name":"net-f","IPAM":{"type":"whereabouts","range":"10.1.0.0/16","node_slice_size":"/24"}}"#;
        let w = wanted("nad", "fast-net", spelled).unwrap().unwrap();
        assert_eq!(w.name, "fast-net");
        let twice = r#"{"name":"a","Name":"b","ipam":{"type":"whereabouts","range":"10.1.0.0/16","node_slice_size":"/24"}}"#;
        assert!(wanted("nad", "nad", twice).is_err());
        // A name the API server would refuse is skipped, not sent: the refusal would fail the
        // pass of every network.
        let unnameable = r#"{"name":"x..y","ipam":{"type":"whereabouts","range":"10.1.0.0/16","node_slice_size":"/24"}}"#;
        assert_eq!(wanted("nad", "nad", unnameable), Ok(None));
        let bare = r#"{"name":"net-d","ipam":{"type":"whereabouts","range":"10.1.0.0/16","node_slice_size":"24"}}"#;
        assert_eq!(wanted("nad", "nad", bare).unwrap().unwrap().size_text, "24");
        // Without a name, the NetworkAttachmentDefinition's, which Multus gives the plugin.
        let nameless = r#"{"cniVersion":"0.4.0","type":"macvlan","ipam":{"type":"whereabouts","range":"10.1.0.0/16","node_slice_size":"24"}}"#;
        let w = wanted("nad", "fast-net", nameless).unwrap().unwrap();
        assert_eq!(w.name, "fast-net");
        // The bounds and exclusions keep new nodes off slices they could hand nothing out of.
        let bounded = r#"{"name":"net-e","ipam":{"type":"whereabouts","range":"10.1.0.0/16","range_start":"10.1.128.0","exclude":["10.1.192.0/18"],"node_slice_size":"/24"}}"#;
        let unusable = wanted("nad", "nad", bounded).unwrap().unwrap().unusable;
        let shown: Vec<String> = unusable.iter().map(Cidr::to_string).collect();
        assert_eq!(shown, ["10.1.0.0/17", "10.1.192.0/18"]);
    }

    fn nad(namespace: &str, name: &str, size: &str) -> Arc<DynamicObject> {
        let config = format!(
            r#"{{"name":"shared","ipam":{{"type":"whereabouts","range":"10.2.0.0/16","node_slice_size":"{size}"}}}}"#
        );
        let mut object = DynamicObject::new(name, &nad_resource()).within(namespace);
        object.metadata.uid = Some(format!("uid-{namespace}-{name}"));
        object.data = serde_json::json!({"spec": {"config": config}});
        Arc::new(object)
    }

    #[test]
    fn a_network_name_no_object_can_have_wants_no_pool() {
        for name in ["my_net", "victim?x", "a/b", "a b"] {
            let ipam = serde_json::json!({"type": "whereabouts", "range": "10.0.0.0/16",
                "node_slice_size": "/24", "network_name": name});
            let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "net", "ipam": ipam});
            assert_eq!(
                wanted("nad", "nad", &conf.to_string()).unwrap(),
                None,
                "{name}"
            );
        }
        let conf = r#"{"cniVersion":"1.0.0","name":"Net.A","ipam":{"type":"whereabouts","range":"10.0.0.0/16","node_slice_size":"/24"}}"#;
        assert_eq!(wanted("nad", "nad", conf).unwrap().unwrap().name, "net.a");
    }

    #[test]
    fn owners_are_the_agreeing_attachments_of_the_pools_namespace() {
        let nads = [
            nad("kube-system", "first", "24"),
            nad("default", "elsewhere", "24"),
            nad("kube-system", "second", "/24"),
            nad("kube-system", "other-size", "/25"),
        ];
        let (pools, complete) = wanted_pools(&nads, "kube-system", &BTreeMap::new());
        assert!(complete);
        let want = &pools["shared"];
        assert_eq!(want.size_text, "24");
        let owners: Vec<(&str, Option<bool>)> = want
            .owners
            .iter()
            .map(|o| (o.name.as_str(), o.controller))
            .collect();
        assert_eq!(owners, vec![("first", Some(true)), ("second", None)]);
        assert!(want
            .owners
            .iter()
            .all(|o| o.api_version == "k8s.cni.cncf.io/v1"
                && o.kind == "NetworkAttachmentDefinition"
                && o.uid.starts_with("uid-kube-system-")));
    }

    /// A newer definition elsewhere naming the same pool cannot re-slice a network in use: the
    /// layout the pool already has wins, the oldest only when none asks for it.
    #[test]
    fn the_layout_a_pool_already_follows_wins_over_an_older_definition_elsewhere() {
        let nads = [
            nad("tenant-b", "squatter", "/28"),
            nad("kube-system", "net", "/24"),
        ];
        let layout = |size| (Cidr::parse("10.2.0.0/16", false).unwrap(), size);
        let existing = BTreeMap::from([("shared".to_string(), layout(24))]);
        let (pools, _) = wanted_pools(&nads, "kube-system", &existing);
        let want = &pools["shared"];
        assert_eq!(
            (want.size, want.source.as_str()),
            (24, "NetworkAttachmentDefinition kube-system/net")
        );
        let owners: Vec<(&str, Option<bool>)> = want
            .owners
            .iter()
            .map(|o| (o.name.as_str(), o.controller))
            .collect();
        assert_eq!(owners, vec![("net", Some(true))]);
        // The pool's layout as the controller (or Go's) wrote it.
        for size in ["24", "/24"] {
            let spec = NodeSlicePoolSpec {
                range: "10.2.0.0/16".into(),
                slice_size: size.into(),
            };
            let read = layouts(&[NodeSlicePool::new("shared", spec)]);
            assert_eq!(read, existing, "{size}");
        }
        // No pool yet, or one of a layout no one asks for any more: the oldest.
        for existing in [
            BTreeMap::new(),
            BTreeMap::from([("shared".to_string(), layout(20))]),
        ] {
            let (pools, _) = wanted_pools(&nads, "kube-system", &existing);
            assert_eq!(pools["shared"].size, 28);
            assert!(
                pools["shared"].owners.is_empty(),
                "the winner's namespace is not the pool's"
            );
        }
    }

    /// Who gets which slice of `conf`'s layout, with `held` IPPools holding addresses and no
    /// NodeSlicePool yet (a new network, or one re-created with its attachment definition).
    fn slices_with(conf: &str, held: &[&str], nodes: &[&str]) -> Vec<(String, String)> {
        let want = wanted("nad", "nad", conf).unwrap().unwrap();
        let nodes: BTreeSet<String> = nodes.iter().map(|n| n.to_string()).collect();
        let held: Vec<(String, Cidr)> = held
            .iter()
            .map(|h| {
                let (name, range) = h.split_once(' ').unwrap();
                (name.to_string(), Cidr::parse(range, false).unwrap())
            })
            .collect();
        // "data" is a sliced network of the tests.
        let networks = BTreeSet::from(["data".to_string()]);
        let names = Names {
            known: &nodes,
            networks: &networks,
        };
        let pools = network_pools(&want, &held, &names);
        let plan = desired_pool(None, &want, &nodes, &pools).unwrap().plan;
        let given = plan.allocations.into_iter();
        given
            .filter(|a| !a.node_name.is_empty())
            .map(|a| (a.node_name, a.slice_range))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, r)| (n.to_string(), r.to_string()))
            .collect()
    }

    /// Why, the configuration, the pools holding addresses, the nodes, and the slices given.
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
    );

    #[test]
    fn only_the_networks_own_pools_hold_slices_back() {
        let data = r#"{"name":"d","ipam":{"type":"whereabouts","range":"10.10.0.0/22","node_slice_size":"/24","network_name":"data"}}"#;
        let upper = data.replace("\"data\"", "\"Data\"");
        let plain = r#"{"name":"p","ipam":{"type":"whereabouts","range":"10.10.0.0/22","node_slice_size":"/24"}}"#;
        let ab: &[&str] = &["a", "b"];
        let cases: &[Case] = &[
            (
                "another network over the same range is another address space",
                data,
                &["storage-10.10.0.0-22 10.10.0.0/22"],
                ab,
                &[("a", "10.10.0.0/24"), ("b", "10.10.1.0/24")],
            ),
            (
                "the network's own pool of the layout before holds every slice back",
                data,
                &["data-10.10.0.0-23 10.10.0.0/23"],
                ab,
                &[("a", "10.10.2.0/24"), ("b", "10.10.3.0/24")],
            ),
            (
                "a node whose own pool holds addresses takes up its slice again",
                data,
                &["data-b-10.10.0.0-24 10.10.0.0/24"],
                ab,
                &[("b", "10.10.0.0/24"), ("a", "10.10.1.0/24")],
            ),
            (
                "names are written in lower case, whatever the network name's case",
                &upper,
                &["data-b-10.10.0.0-24 10.10.0.0/24"],
                ab,
                &[("b", "10.10.0.0/24"), ("a", "10.10.1.0/24")],
            ),
            (
                "without a network name, a node's pool is told from another network's by its node",
                plain,
                &[
                    "storage-10.10.0.0-22 10.10.0.0/22",
                    "b-10.10.2.0-24 10.10.2.0/24",
                ],
                ab,
                &[("a", "10.10.0.0/24"), ("b", "10.10.2.0/24")],
            ),
            (
                "a pool without a network name of the layout before holds the slices back",
                plain,
                &["10.10.0.0-23 10.10.0.0/23"],
                &["a"],
                &[("a", "10.10.2.0/24")],
            ),
            (
                "a removed node's pool holds its slice back, another sliced network's do not",
                plain,
                &[
                    "c-10.10.0.0-24 10.10.0.0/24",
                    "data-b-10.10.1.0-24 10.10.1.0/24",
                ],
                ab,
                &[("a", "10.10.1.0/24"), ("b", "10.10.2.0/24")],
            ),
            (
                "a removed node's pool of the layout before holds its range back",
                plain,
                &["c-10.10.0.0-23 10.10.0.0/23"],
                ab,
                &[("a", "10.10.2.0/24"), ("b", "10.10.3.0/24")],
            ),
            (
                "a slice another pool of the network holds addresses in is taken up by nobody",
                data,
                &[
                    "data-a-10.10.0.0-24 10.10.0.0/24",
                    "data-b-10.10.0.0-24 10.10.0.0/24",
                ],
                ab,
                &[("a", "10.10.1.0/24"), ("b", "10.10.2.0/24")],
            ),
            (
                "pools are counted, not ranges: the old layout's pool may be exactly the slice",
                data,
                &[
                    "data-b-10.10.0.0-24 10.10.0.0/24",
                    "data-10.10.0.0-24 10.10.0.0/24",
                ],
                ab,
                &[("a", "10.10.1.0/24"), ("b", "10.10.2.0/24")],
            ),
            (
                "a node's pool under the layout before's is not taken up",
                data,
                &[
                    "data-b-10.10.0.0-24 10.10.0.0/24",
                    "data-10.10.0.0-23 10.10.0.0/23",
                ],
                ab,
                &[("a", "10.10.2.0/24"), ("b", "10.10.3.0/24")],
            ),
        ];
        for (why, conf, held, nodes, given) in cases {
            assert_eq!(slices_with(conf, held, nodes), pairs(given), "{why}");
        }
    }

    /// The network's pools when `node`'s own pool holds addresses in `slice` (and no other does).
    fn own_pool_of(node: &str, slice: &str) -> NetworkPools {
        NetworkPools {
            by_node: vec![NodeSliceAllocation {
                node_name: node.into(),
                slice_range: slice.into(),
            }],
            ..NetworkPools::default()
        }
    }

    /// The nodes given a slice by `pool`, with their slices.
    fn given(pool: &NodeSlicePool) -> Vec<(String, String)> {
        let status = pool.status.iter().flat_map(|s| &s.allocations);
        let given = status.filter(|a| !a.node_name.is_empty());
        given
            .map(|a| (a.node_name.clone(), a.slice_range.clone()))
            .collect()
    }

    /// A slice taken from a node goes to another only in a later pass, which lists the IPPools
    /// again: an ADD on the first node that read the old NodeSlicePool may still write into the
    /// slice's pool after this pass's list.
    #[test]
    fn a_withdrawn_slice_is_given_out_in_a_later_pass_only() {
        let conf = |size: &str| nad_config("10.3.0.0/23", size);
        let none = NetworkPools::default();
        let halves = wanted("nad", "nad", &conf("/24")).unwrap().unwrap();
        let first = desired_pool(None, &halves, &nodes(&["a", "gone"]), &none).unwrap();
        assert!(!first.withdraws);
        let first = first.pool.unwrap();
        let first_again = first.clone();
        assert_eq!(
            given(&first),
            pairs(&[("a", "10.3.0.0/24"), ("gone", "10.3.1.0/24")])
        );
        // "gone" is removed and "b" joins: no other slice is free, so "b" waits.
        let removed = desired_pool(Some(first), &halves, &nodes(&["a", "b"]), &none).unwrap();
        assert!(removed.withdraws);
        assert_eq!(removed.plan.unassigned, ["b"]);
        let removed = removed.pool.unwrap();
        assert_eq!(given(&removed), pairs(&[("a", "10.3.0.0/24")]));
        // The next pass (no pool holds addresses there) gives it.
        let next = desired_pool(Some(removed), &halves, &nodes(&["a", "b"]), &none).unwrap();
        assert!(!next.withdraws);
        let next = next.pool.unwrap();
        assert_eq!(
            given(&next),
            pairs(&[("a", "10.3.0.0/24"), ("b", "10.3.1.0/24")])
        );
        // A new layout: the nodes' old slices are withdrawn, the new slices avoid them first.
        let quarters = wanted("nad", "nad", &conf("/25")).unwrap().unwrap();
        let relaid = desired_pool(Some(next.clone()), &quarters, &nodes(&["a", "b"]), &none);
        let relaid = relaid.unwrap();
        assert!(relaid.withdraws);
        assert_eq!(relaid.plan.unassigned, ["a", "b"]);
        let relaid = relaid.pool.unwrap();
        assert!(given(&relaid).is_empty(), "{:?}", given(&relaid));
        let after = desired_pool(Some(relaid), &quarters, &nodes(&["a", "b"]), &none).unwrap();
        assert!(!after.withdraws);
        let after = after.pool.unwrap();
        assert_eq!(
            given(&after),
            pairs(&[("a", "10.3.0.0/25"), ("b", "10.3.0.128/25")])
        );
        // A node whose own pool holds addresses in a slice this pass withdraws from another
        // node takes it up in a later pass only.
        let mine = own_pool_of("b", "10.3.1.0/24");
        let retaken = desired_pool(
            Some(first_again.clone()),
            &halves,
            &nodes(&["a", "b"]),
            &mine,
        );
        let retaken = retaken.unwrap();
        assert!(retaken.withdraws);
        assert_eq!(retaken.plan.unassigned, ["b"]);
        // A node keeps a slice the new layout still has; nothing is withdrawn from it.
        let same = desired_pool(Some(next), &halves, &nodes(&["a", "b", "c"]), &none).unwrap();
        assert!(!same.withdraws);
        assert_eq!(same.plan.unassigned, ["c"]);
    }

    /// A node whose slice the bounds and exclusions leave no address in gets a usable one:
    /// slices Go's controller gave out in order whatever the bounds, or an exclusion added
    /// later, would otherwise fail its ADDs for as long as it kept the slice.
    #[test]
    fn a_slice_left_without_usable_addresses_is_replaced() {
        let none = NetworkPools::default();
        let unbounded = wanted("nad", "nad", &nad_config("10.6.0.0/22", "/24"));
        let unbounded = unbounded.unwrap().unwrap();
        let ab = nodes(&["a", "b"]);
        let in_order = desired_pool(None, &unbounded, &ab, &none)
            .unwrap()
            .pool
            .unwrap();
        assert_eq!(
            given(&in_order),
            pairs(&[("a", "10.6.0.0/24"), ("b", "10.6.1.0/24")])
        );
        let bounded = r#"{"name":"n","ipam":{"type":"whereabouts","range":"10.6.0.0/22","range_start":"10.6.1.0","exclude":["10.6.3.0/24"],"node_slice_size":"/24"}}"#;
        let bounded = wanted("nad", "nad", bounded).unwrap().unwrap();
        let replaced = desired_pool(Some(in_order), &bounded, &ab, &none).unwrap();
        assert!(replaced.withdraws);
        let replaced = replaced.pool.unwrap();
        assert_eq!(
            given(&replaced),
            pairs(&[("b", "10.6.1.0/24"), ("a", "10.6.2.0/24")])
        );
        // Nor does a node take such a slice up again for its own pool's addresses (the
        // NodeSlicePool made again, naming no node).
        let held = own_pool_of("a", "10.6.3.0/24");
        let remade = desired_pool(None, &bounded, &ab, &held)
            .unwrap()
            .pool
            .unwrap();
        assert_eq!(
            given(&remade),
            pairs(&[("a", "10.6.1.0/24"), ("b", "10.6.2.0/24")])
        );
        // A node no usable slice is left for keeps its own: without one, its DELs would find
        // nothing to release either.
        let abc = nodes(&["a", "b", "c"]);
        let three = desired_pool(None, &unbounded, &abc, &none)
            .unwrap()
            .pool
            .unwrap();
        let low_half_out = r#"{"name":"n","ipam":{"type":"whereabouts","range":"10.6.0.0/22","exclude":["10.6.0.0/23"],"node_slice_size":"/24"}}"#;
        let low_half_out = wanted("nad", "nad", low_half_out).unwrap().unwrap();
        let stranded = desired_pool(Some(three), &low_half_out, &abc, &none).unwrap();
        assert!(stranded.plan.unassigned.is_empty(), "{:?}", stranded.plan);
        assert_eq!(
            given(&stranded.pool.unwrap()),
            pairs(&[
                ("b", "10.6.1.0/24"),
                ("c", "10.6.2.0/24"),
                ("a", "10.6.3.0/24")
            ])
        );
    }

    #[test]
    fn only_pools_the_controller_made_or_a_network_owns_are_removable() {
        let want = wanted("nad", "nad", &nad_config("10.5.0.0/24", "/26")).unwrap();
        let want = want.unwrap();
        let made = desired_pool(None, &want, &nodes(&["a"]), &NetworkPools::default());
        let made = made.unwrap().pool.unwrap();
        assert!(removable(&made));
        let by_hand = NodeSlicePool::new("by-hand", made.spec.clone());
        assert!(!removable(&by_hand));
        // Go's controller's pools: owned by their NetworkAttachmentDefinition, unlabelled.
        let mut by_go = by_hand.clone();
        by_go.metadata.owner_references = wanted_pools(
            &[nad("kube-system", "a", "24")],
            "kube-system",
            &BTreeMap::new(),
        )
        .0["shared"]
            .owners
            .clone()
            .into();
        assert!(removable(&by_go));
        // A wanted pool made before the label is labelled by the next pass, its labels kept.
        let mut unlabelled = made.clone();
        unlabelled.metadata.labels = Some(BTreeMap::from([("team".into(), "x".into())]));
        let relabelled = desired_pool(
            Some(unlabelled),
            &want,
            &nodes(&["a"]),
            &NetworkPools::default(),
        );
        let labels = relabelled.unwrap().pool.unwrap().metadata.labels.unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("x"));
        assert_eq!(
            labels.get(MANAGED_BY.0).map(String::as_str),
            Some(MANAGED_BY.1)
        );
    }

    fn nad_config(range: &str, size: &str) -> String {
        format!(
            r#"{{"name":"n","ipam":{{"type":"whereabouts","range":"{range}","node_slice_size":"{size}"}}}}"#
        )
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_size_written_the_other_way_keeps_every_slice() {
        let nodes: BTreeSet<String> = ["a", "b"].iter().map(|n| n.to_string()).collect();
        let none = NetworkPools::default();
        let conf = |size: &str| {
            format!(
                r#"{{"name":"n","ipam":{{"type":"whereabouts","range":"10.3.0.0/22","node_slice_size":"{size}"}}}}"#
            )
        };
        let go_style = wanted("nad", "nad", &conf("24")).unwrap().unwrap();
        let created = desired_pool(None, &go_style, &nodes, &none).unwrap().pool;
        let created = created.unwrap();
        assert_eq!(created.spec.slice_size, "24");
        // Unchanged: nothing to write.
        let same = desired_pool(Some(created.clone()), &go_style, &nodes, &none)
            .unwrap()
            .pool;
        assert!(same.is_none());
        // The NetworkAttachmentDefinition now says "/24": the same slices, the text follows it.
        let ours = wanted("nad", "nad", &conf("/24")).unwrap().unwrap();
        let rewritten = desired_pool(Some(created.clone()), &ours, &nodes, &none)
            .unwrap()
            .pool;
        let rewritten = rewritten.unwrap();
        assert_eq!(rewritten.spec.slice_size, "/24");
        assert_eq!(rewritten.status, created.status);
        // Foreign owner references stay; NetworkAttachmentDefinition ones follow the wanted.
        let mut owned = created;
        owned.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "keep".into(),
            uid: "u".into(),
            ..OwnerReference::default()
        }]);
        let unchanged = desired_pool(Some(owned.clone()), &go_style, &nodes, &none)
            .unwrap()
            .pool;
        assert!(unchanged.is_none());
        let mut owned_by_nad = go_style;
        owned_by_nad.owners = wanted_pools(
            &[nad("kube-system", "a", "24")],
            "kube-system",
            &BTreeMap::new(),
        )
        .0["shared"]
            .owners
            .clone();
        let kept = desired_pool(Some(owned), &owned_by_nad, &nodes, &none)
            .unwrap()
            .pool;
        let refs = kept.unwrap().metadata.owner_references.unwrap();
        let names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["keep", "a"]);
    }
}
