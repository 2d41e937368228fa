//! The etcd v3 engine: allocations as small keys, each ADD or release one transaction.
//!
//! See `keys` for the layout and `runs` for how the lowest free address is found without
//! reading the whole pool.

mod allocate;
mod combine;
mod commit;
mod connect;
mod contention;
mod copy;
pub mod doctor;
mod freed;
pub(crate) mod keys;
mod plan;
pub(crate) mod records;
mod release;
mod release_together;
mod runs;
mod session;
mod window;

use std::net::IpAddr;

pub use combine::Combining;
pub use connect::{Timeouts, DEADLINE_ENV};
pub use copy::Following;
pub use keys::DEFAULT_PREFIX;

use crate::config::{EtcdConfig, IpamConfig};
use crate::store::queues::Observer;
use crate::store::retry::Backoff;
use crate::store::{
    AddRequest, Allocation, Attachment, AttachmentRequest, GcRequest, Store, StoreError,
};
use session::{Deadline, Scanned, Session, MAX_TXN_OPS};

/// Connects to the etcd cluster with the default timeouts (the deadline may be overridden by
/// [`DEADLINE_ENV`]).
pub fn open(ipam: &IpamConfig, cfg: &EtcdConfig) -> Result<Box<dyn Store>, StoreError> {
    open_with(ipam, cfg, Timeouts::from_env(), DEFAULT_PREFIX)
}

/// How long the doctor may take: it reads every key under the prefix, a page at a time.
const DOCTOR_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// `whereabouts doctor` on the etcd engine ([`doctor`]): the findings, each key read at one
/// revision. With `fix`, the freed marks are folded first (as the controller's reconcile does),
/// unless a marked offset is also allocated (a fold would uncover its record); findings the
/// fold ended are listed as fixed. `progress` hears how the reading goes (a store of millions
/// of keys takes a while).
pub fn doctor(
    ipam: &IpamConfig,
    cfg: &EtcdConfig,
    fix: bool,
    progress: &mut dyn FnMut(doctor::Progress),
) -> Result<Vec<doctor::Finding>, StoreError> {
    let store = open_store(None, ipam, cfg, Timeouts::from_env(), DEFAULT_PREFIX)?;
    let s = &store.session;
    let mut survey = || -> Result<Vec<doctor::Finding>, StoreError> {
        let dl = Deadline::after(DOCTOR_DEADLINE);
        let mut kvs = Vec::new();
        s.scan_at_one_revision(&dl, s.keys.prefix(), |scanned| match scanned {
            Scanned::Key(kv) => kvs.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )),
            Scanned::PageRead => progress(doctor::Progress::Read(kvs.len())),
            Scanned::StartedOver => {
                kvs.clear();
                progress(doctor::Progress::StartedOver);
            }
        })
        .map_err(|e| StoreError::try_again("cannot read the etcd store").because(e))?;
        Ok(doctor::findings(s.keys.prefix(), kvs))
    };
    let before = survey()?;
    let uncovers = before
        .iter()
        .any(|f| f.problem == doctor::Problem::MarkedAndHeld);
    if !fix || uncovers {
        return Ok(before);
    }
    let dl = Deadline::after(DOCTOR_DEADLINE);
    freed::fold_everywhere(s, &dl)?;
    let after = survey()?;
    Ok(doctor::after_repair(s.keys.prefix(), before, after))
}

/// As [`open`], for the node agent, which shares the one client among its requests and
/// combines its concurrent ADDs (`combine`), planning them from watched copies of the pools'
/// runs, as `following` says (the agent: [`Following::AGENT`]). The client runs on the agent's
/// multi-threaded `runtime`; its [`Store`] calls must come from the runtime's blocking threads
/// (`spawn_blocking`), its `*_waiting` calls from its tasks.
pub fn open_shared(
    runtime: tokio::runtime::Handle,
    ipam: &IpamConfig,
    cfg: &EtcdConfig,
    observer: std::sync::Arc<dyn Observer>,
    following: Following,
) -> Result<std::sync::Arc<Combining>, StoreError> {
    let store = open_store(
        Some(runtime.clone()),
        ipam,
        cfg,
        Timeouts::from_env(),
        DEFAULT_PREFIX,
    )?;
    Ok(std::sync::Arc::new(combine::Combining::new(
        store, observer, runtime, following,
    )))
}

/// Connects with explicit timeouts and key prefix.
pub fn open_with(
    ipam: &IpamConfig,
    cfg: &EtcdConfig,
    timeouts: Timeouts,
    prefix: &str,
) -> Result<Box<dyn Store>, StoreError> {
    Ok(Box::new(open_store(None, ipam, cfg, timeouts, prefix)?))
}

fn open_store(
    runtime: Option<tokio::runtime::Handle>,
    ipam: &IpamConfig,
    cfg: &EtcdConfig,
    timeouts: Timeouts,
    prefix: &str,
) -> Result<EtcdStore, StoreError> {
    if ipam.node_slice_size.is_some() {
        return Err(StoreError::config(
            "node_slice_size is not supported with datastore \"etcd\" yet; remove it or use \
             datastore \"kubernetes\"",
        ));
    }
    let endpoints = connect::endpoints(cfg)?;
    connect::require_tls_for_credentials(cfg, &endpoints, ipam.trust.insecure_tls)?;
    let session = Session::connect(runtime, (cfg, endpoints), keys::Keys::new(prefix), timeouts)?;
    Ok(EtcdStore {
        session,
        backoff: Backoff {
            // The deadline bounds an operation; the attempt count only stops a livelock.
            attempts: 500,
            base: std::time::Duration::from_millis(2),
            max: std::time::Duration::from_millis(200),
        },
    })
}

struct EtcdStore {
    session: Session,
    backoff: Backoff,
}

impl Store for EtcdStore {
    fn add(&self, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError> {
        allocate::add(&self.session, &self.backoff, req)
    }

    fn del(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        release::del(&self.session, &self.backoff, req)
    }

    fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        release::check(&self.session, req)
    }

    fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
        release::gc(&self.session, &self.backoff, req)
    }

    /// A linearizable read, as a transaction of as many operations as the engine's may hold: it
    /// succeeds only when a quorum with a leader answers, which is exactly when an ADD could
    /// commit, and when the members' `--max-txn-ops` allows the engine's transactions.
    fn status(&self) -> Result<(), StoreError> {
        let s = &self.session;
        let dl = Deadline::after(s.timeouts.deadline.min(s.timeouts.request * 2));
        let read = || {
            let opts = etcd_client::GetOptions::new().with_count_only();
            etcd_client::TxnOp::get(s.keys.prefix(), Some(opts))
        };
        let reads: Vec<etcd_client::TxnOp> = (0..MAX_TXN_OPS).map(|_| read()).collect();
        s.txn(&dl, "status read", etcd_client::Txn::new().and_then(reads))
            .map(|_| ())
            .map_err(|e| {
                if e.misconfigured() {
                    e.into()
                } else {
                    StoreError::try_again("etcd cluster is not available").because(e)
                }
            })
    }

    fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
        release::allocations(&self.session, pool)
    }

    fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError> {
        release::release(&self.session, &self.backoff, (pool, ip), holder)
    }

    fn free_released(&self) -> Result<usize, StoreError> {
        let dl = Deadline::after(self.session.timeouts.deadline);
        Ok(freed::fold_everywhere(&self.session, &dl)?)
    }
}
