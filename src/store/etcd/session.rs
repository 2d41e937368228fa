//! A connected client with its own single-threaded runtime. The plugin is synchronous; every
//! call into etcd goes through [`Session::call`], which bounds it by the request timeout and by
//! what is left of the operation's deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, GetOptions, GetResponse, KeyValue, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use tokio::runtime::{Handle, Runtime};

use super::connect::{self, Timeouts, TlsFiles};
use super::keys::Keys;
use crate::config::EtcdConfig;
use crate::files::shown_url;
use crate::store::queues::lock;
use crate::store::StoreError;

/// Operations etcd accepts in one transaction by default (`--max-txn-ops`): at each level, the
/// compares, the success and the failure operations each. A nested transaction gets what its
/// parent's operations leave of it.
pub const MAX_TXN_OPS: usize = 128;

/// gRPC status codes for credentials etcd will not accept: invalid argument, permission
/// denied, unauthenticated.
const REFUSED_CREDENTIALS: [i32; 3] = [3, 7, 16];

/// gRPC status codes of a request etcd did not answer: cancelled, unknown, deadline exceeded,
/// unavailable.
const NOT_ANSWERED: [i32; 4] = [1, 2, 4, 14];

/// gRPC status code "permission denied": what etcd answers (with authentication on) to a user
/// whose roles do not grant the keys a request reads or writes.
const PERMISSION_DENIED: i32 = 7;

/// gRPC status code "invalid argument": what etcd answers, among others, to a transaction of
/// more operations than its `--max-txn-ops` allows.
const INVALID_ARGUMENT: i32 = 3;

/// gRPC status code "out of range": what etcd answers to a read at a revision it has compacted
/// away ("etcdserver: mvcc: required revision has been compacted") or has not reached yet.
const OUT_OF_RANGE: i32 = 11;

/// What etcd answers (invalid argument) to a token issued before the latest change of its
/// users, roles or permissions, when its tokens are signed (`--auth-token jwt`).
const OLD_AUTH_REVISION: &str = "etcdserver: revision of auth store is old";

/// Whether `err` refuses a token that predates a change of the cluster's auth store: a new
/// token is accepted. (A token etcd forgot, unused for its TTL, is renewed by etcd-client.) The
/// token is shared by every clone of the client, so the agent's watches and lists of its copies
/// use the renewed one too.
fn token_outdated(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if i32::from(status.code()) == 3 && status.message() == OLD_AUTH_REVISION)
}

/// When one operation must have finished.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(d: Duration) -> Deadline {
        Deadline(Instant::now() + d)
    }

    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn passed(&self) -> bool {
        self.remaining().is_zero()
    }
}

/// A failed call. The request may or may not have been applied: callers resolve that by
/// reading again before they retry.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{what}")]
pub struct CallFailed {
    pub what: String,
    #[source]
    pub cause: Option<Arc<etcd_client::Error>>,
}

impl CallFailed {
    pub fn new(what: impl Into<String>) -> CallFailed {
        CallFailed {
            what: what.into(),
            cause: None,
        }
    }

    /// Whether etcd answered with a gRPC status (its code and message) that `holds`.
    fn status_is(&self, holds: impl Fn(i32, &str) -> bool) -> bool {
        matches!(self.cause.as_deref(), Some(etcd_client::Error::GRpcStatus(status))
            if holds(i32::from(status.code()), status.message()))
    }

    /// Whether etcd answered, refusing (its database full, say), as opposed to not answering:
    /// unreachable, too slow, or without a leader (gRPC "unavailable", which is also what the
    /// client makes of a connection that fails), or cancelled.
    fn refused(&self) -> bool {
        self.status_is(|code, _| !NOT_ANSWERED.contains(&code))
    }

    /// Whether etcd refused a write because its database is full (`--quota-backend-bytes`):
    /// it refuses every write until an admin frees space and disarms the NOSPACE alarm.
    pub fn no_space(&self) -> bool {
        self.status_is(|_, message| message.contains("database space exceeded"))
    }

    /// Whether etcd refused the user access to the keys asked for: its roles must change, which
    /// no retry can do.
    pub fn permission_denied(&self) -> bool {
        self.status_is(|code, _| code == PERMISSION_DENIED)
    }

    /// Whether etcd refused a transaction for holding more operations than its `--max-txn-ops`
    /// allows: the cluster must be started with more, which no retry can do.
    pub fn too_many_ops(&self) -> bool {
        self.status_is(|code, message| {
            code == INVALID_ARGUMENT && message.contains("too many operations in txn request")
        })
    }

    /// Whether the cluster refuses the engine until an admin changes it: the user's roles, the
    /// members' `--max-txn-ops`. Such a failure is final, and says what to change.
    pub fn misconfigured(&self) -> bool {
        self.permission_denied() || self.too_many_ops()
    }

    /// Whether etcd refused to read at a revision it has compacted away.
    pub fn compacted(&self) -> bool {
        self.status_is(|code, message| code == OUT_OF_RANGE && message.contains("compacted"))
    }
}

impl CallFailed {
    /// What the runtime may be told: what failed and, when etcd answered, its answer (its own
    /// words: "etcdserver: permission denied"). The client's failures (transport, TLS) quote
    /// the endpoints and stay in the cause, for the log.
    pub fn answered(&self, summary: &str) -> String {
        match self.cause.as_deref() {
            Some(etcd_client::Error::GRpcStatus(status)) => {
                format!("{summary}: {}: {}", self.what, status.message())
            }
            _ => format!("{summary}: {}", self.what),
        }
    }
}

impl From<CallFailed> for StoreError {
    fn from(e: CallFailed) -> Self {
        if e.permission_denied() {
            let what = e.answered("etcd denied access to the engine's keys");
            return StoreError::config(what).because(e);
        }
        if e.too_many_ops() {
            let what = e.answered("etcd refused the engine's transactions");
            return StoreError::config(what).because(e);
        }
        if e.refused() {
            return StoreError::try_again(e.answered("etcd refused the request")).because(e);
        }
        StoreError::try_again(e.answered("etcd did not answer")).because(e)
    }
}

/// Where a session's calls run.
enum Executor {
    /// The plugin process: a single-threaded runtime of its own, driven by each call.
    Own(Runtime),
    /// The node agent: its multi-threaded runtime, whose workers drive the client's connections
    /// while each request waits on a blocking thread. Calls from many requests then overlap
    /// instead of taking turns at one runtime.
    Shared(Handle),
}

impl Executor {
    fn block_on<F: Future>(&self, fut: F) -> F::Output {
        match self {
            Executor::Own(rt) => rt.block_on(fut),
            Executor::Shared(handle) => handle.block_on(fut),
        }
    }
}

pub struct Session {
    rt: Executor,
    client: SharedClient,
    /// The node agent's: a plugin process lives for one call and reads the files as it starts.
    renewal: Option<Renewal>,
    pub keys: Keys,
    pub timeouts: Timeouts,
    pub runs_written: RunsWritten,
    pub freed: FreedCount,
}

/// A session's client, shared with the node agent's watches: replaced when the session
/// connects again, after which every call and every new watch uses the new one.
#[derive(Clone)]
pub struct SharedClient(Arc<RwLock<Client>>);

impl SharedClient {
    pub fn current(&self) -> Client {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, client: Client) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = client;
    }
}

/// What a session needs to connect again with TLS files renewed on disk (a certificate or CA
/// rotated, a secret mounted again at the same paths). A client keeps the identity and the CA
/// it was built with for every connection it opens later, so a node agent running for months
/// would be refused by members restarted with the new ones.
struct Renewal {
    cfg: EtcdConfig,
    endpoints: Vec<String>,
    /// The TLS files the client was built with, and when they were last compared with the
    /// disk.
    built_with: Mutex<(TlsFiles, Instant)>,
}

/// The TLS files are compared with the disk after a failed call, at most this often.
const RENEWAL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The revision a transaction's answer reports: after a write, the revision it made.
pub fn revision_of(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

/// Per pool, the revision of this session's latest change to the pool's runs (an ADD's new
/// run, a DEL's split, a merge). The agent plans from its watched copy of a pool's runs only
/// once the copy shows that revision: a plan from a copy that misses the agent's own change
/// loses its commit to the agent itself, and a second such loss would make the pool look
/// contended.
///
/// A change is forgotten once [`RUNS_WRITTEN_KEPT`] old: a copy in step shows it long before
/// (its watch brings it within milliseconds), so an agent that served many pools over months
/// holds only the recent ones.
#[derive(Default)]
pub struct RunsWritten(Mutex<HashMap<String, (i64, Instant)>>);

/// How long [`RunsWritten`] keeps a pool's latest change.
pub const RUNS_WRITTEN_KEPT: Duration = Duration::from_secs(600);

impl RunsWritten {
    /// This session changed `pool`'s runs at `revision`.
    pub fn note(&self, pool: &str, revision: i64) {
        let mut written = lock(&self.0);
        let now = Instant::now();
        match written.get_mut(pool) {
            Some((latest, at)) => {
                *latest = (*latest).max(revision);
                *at = now;
            }
            None => {
                written.retain(|_, (_, at)| now.duration_since(*at) < RUNS_WRITTEN_KEPT);
                written.insert(pool.to_string(), (revision, now));
            }
        }
    }

    /// The revision of this session's latest change to `pool`'s runs; 0 before any.
    pub fn latest(&self, pool: &str) -> i64 {
        lock(&self.0).get(pool).map_or(0, |(latest, _)| *latest)
    }
}

/// Addresses this session marked freed and marks its folds cut out of runs (`freed`), since
/// the node agent last took the counts for its metrics.
#[derive(Default)]
pub struct FreedCount {
    marked: AtomicU64,
    folded: AtomicU64,
}

impl FreedCount {
    pub fn marked(&self, count: usize) {
        self.marked.fetch_add(count as u64, Ordering::Relaxed);
    }

    pub fn folded(&self, count: usize) {
        self.folded.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// The counts since the last take: (marked, folded).
    pub fn take(&self) -> (u64, u64) {
        let marked = self.marked.swap(0, Ordering::Relaxed);
        (marked, self.folded.swap(0, Ordering::Relaxed))
    }
}

impl Session {
    /// Builds the runtime (or shares the multi-threaded runtime `shared`) and the client.
    /// Connecting is lazy in the client (members are dialled on first use); with credentials it
    /// authenticates here, bounded by the connect timeout.
    pub fn connect(
        shared: Option<Handle>,
        (cfg, endpoints): (&EtcdConfig, Vec<String>),
        keys: Keys,
        timeouts: Timeouts,
    ) -> Result<Session, StoreError> {
        let (options, files) = connect::options(cfg, &timeouts)?;
        let agent = shared.is_some();
        let rt = match shared {
            Some(handle) => Executor::Shared(handle),
            None => Executor::Own(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| {
                        StoreError::io("cannot start the etcd client runtime").because(e)
                    })?,
            ),
        };
        let client = dial(&rt, &endpoints, options, &timeouts)?;
        let renewal = agent.then(|| Renewal {
            cfg: cfg.clone(),
            endpoints,
            built_with: Mutex::new((files, Instant::now())),
        });
        Ok(Session {
            rt,
            client: SharedClient(Arc::new(RwLock::new(client))),
            renewal,
            keys,
            timeouts,
            runs_written: RunsWritten::default(),
            freed: FreedCount::default(),
        })
    }

    /// The client, for calls that outlive one operation (the agent's watch).
    pub fn client(&self) -> SharedClient {
        self.client.clone()
    }

    /// After a failed call: when the TLS files differ from those the client was built with,
    /// connects with them and replaces the client. Compared at most every
    /// [`RENEWAL_CHECK_EVERY`], by one caller at a time; files unreadable mid-rotation, or a
    /// connection that fails, leave the client as it is until a later failure.
    fn renew_if_rotated(&self) {
        let Some(renewal) = self.renewal.as_ref().filter(|r| connect::uses_tls(&r.cfg)) else {
            return;
        };
        let Ok(mut built_with) = renewal.built_with.try_lock() else {
            return;
        };
        if built_with.1.elapsed() < RENEWAL_CHECK_EVERY {
            return;
        }
        built_with.1 = Instant::now();
        let Ok((options, files)) = connect::options(&renewal.cfg, &self.timeouts) else {
            return;
        };
        if files == built_with.0 {
            return;
        }
        match dial(&self.rt, &renewal.endpoints, options, &self.timeouts) {
            Ok(client) => {
                self.client.replace(client);
                built_with.0 = files;
                tracing::info!("etcd: the TLS files changed on disk; connected again with them");
            }
            Err(err) => tracing::warn!(
                "etcd: the TLS files changed on disk, and connecting with them failed: {}",
                crate::store::error::chain(&err)
            ),
        }
    }

    /// Runs one request, bounded by the request timeout and the deadline. A request refused
    /// for a token older than the cluster's latest change of users or roles is sent once more
    /// with a new token, and a failed one renews the client when its TLS files changed on
    /// disk (for the caller's next attempt): a node agent's client lives through such changes.
    pub fn call<T, F>(
        &self,
        dl: &Deadline,
        what: &str,
        make: impl Fn(Client) -> F,
    ) -> Result<T, CallFailed>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let limit = self.timeouts.request.min(dl.remaining());
        if limit.is_zero() {
            return Err(CallFailed::new(format!(
                "etcd {what}: deadline of {:?} passed",
                self.timeouts.deadline
            )));
        }
        let until = tokio::time::Instant::now() + limit;
        let client = self.client.current();
        let send = || tokio::time::timeout_at(until, make(client.clone()));
        let r = self.rt.block_on(async {
            match send().await {
                Ok(Err(e)) if token_outdated(&e) => {
                    let renewed = client.refresh_token();
                    match tokio::time::timeout_at(until, renewed).await {
                        Ok(Ok(())) => send().await,
                        Ok(Err(refused)) => Ok(Err(refused)),
                        Err(late) => Err(late),
                    }
                }
                r => r,
            }
        });
        if !matches!(r, Ok(Ok(_))) {
            self.renew_if_rotated();
        }
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let mut failed = CallFailed {
                    what: format!("etcd {what} failed"),
                    cause: Some(Arc::new(e)),
                };
                if failed.permission_denied() {
                    failed.what = format!(
                        "{}: the etcd user (ipam.etcd_username, or the client certificate's \
                         common name) needs a role granting readwrite on the prefix {}",
                        failed.what,
                        self.keys.prefix()
                    );
                }
                if failed.too_many_ops() {
                    failed.what = format!(
                        "{}: the cluster's members need --max-txn-ops of at least {MAX_TXN_OPS} \
                         (etcd's default)",
                        failed.what
                    );
                }
                Err(failed)
            }
            Err(_) => Err(CallFailed::new(format!(
                "etcd {what} timed out after {limit:?}"
            ))),
        }
    }

    /// Sleeps for `d` or until the deadline, whichever comes first.
    pub fn pause(&self, dl: &Deadline, d: Duration) {
        std::thread::sleep(d.min(dl.remaining()));
    }

    pub fn txn(&self, dl: &Deadline, what: &str, txn: Txn) -> Result<TxnResponse, CallFailed> {
        self.call(dl, what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
    }

    /// Several reads in one round trip, at one revision (a transaction of gets only). More
    /// than a transaction may hold ([`MAX_TXN_OPS`]) take a round trip per full transaction,
    /// each at its own revision: callers compare what they rely on when they commit.
    pub fn reads(
        &self,
        dl: &Deadline,
        what: &str,
        mut gets: Vec<TxnOp>,
    ) -> Result<Vec<Vec<KeyValue>>, CallFailed> {
        let mut found = Vec::with_capacity(gets.len());
        while !gets.is_empty() {
            let rest = gets.split_off(gets.len().min(MAX_TXN_OPS));
            let resp = self.txn(dl, what, Txn::new().and_then(gets))?;
            found.extend(resp.op_responses().into_iter().map(|r| match r {
                TxnOpResponse::Get(mut g) => g.take_kvs(),
                _ => Vec::new(),
            }));
            gets = rest;
        }
        Ok(found)
    }

    pub fn get(
        &self,
        dl: &Deadline,
        what: &str,
        key: String,
        opts: Option<GetOptions>,
    ) -> Result<GetResponse, CallFailed> {
        self.call(dl, what, |mut c| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { c.get(key, opts).await }
        })
    }

    /// Every key-value under `dir`, page by page, so a pool of a million entries never becomes
    /// one oversized response. Each page is read at the revision current then.
    pub fn scan(
        &self,
        dl: &Deadline,
        dir: &str,
        mut each: impl FnMut(KeyValue),
    ) -> Result<(), CallFailed> {
        let keys_only = |scanned| {
            if let Scanned::Key(kv) = scanned {
                each(kv)
            }
        };
        self.scan_pages(dl, dir, false, keys_only).map(drop)
    }

    /// As [`Session::scan`], every page at the revision of the first: one consistent picture
    /// (for the doctor). When the cluster compacts that revision before the last page (etcd
    /// then refuses to read at it), the scan starts over at the current revision, up to
    /// [`COMPACTED_RESTARTS`] times, and says so first ([`Scanned::StartedOver`]): the caller
    /// drops what it was handed. The revision read at.
    pub fn scan_at_one_revision(
        &self,
        dl: &Deadline,
        dir: &str,
        mut each: impl FnMut(Scanned),
    ) -> Result<i64, CallFailed> {
        let mut restarts = 0;
        loop {
            match self.scan_pages(dl, dir, true, &mut each) {
                Err(failed) if failed.compacted() && restarts < COMPACTED_RESTARTS => {
                    restarts += 1;
                    each(Scanned::StartedOver);
                }
                scanned => return scanned,
            }
        }
    }

    fn scan_pages(
        &self,
        dl: &Deadline,
        dir: &str,
        pin: bool,
        mut each: impl FnMut(Scanned),
    ) -> Result<i64, CallFailed> {
        const PAGE: i64 = 1000;
        let end = super::keys::range_end(dir);
        let mut from = dir.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if pin && revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp = self.call(dl, "scan", |mut c| {
                let (from, opts) = (from.clone(), opts.clone());
                async move { c.get(from, Some(opts)).await }
            })?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let last = kvs.last().map(|kv| kv.key().to_vec());
            for kv in kvs {
                each(Scanned::Key(kv));
            }
            each(Scanned::PageRead);
            match (more, last) {
                (true, Some(mut last)) => {
                    last.push(0);
                    from = last;
                }
                _ => return Ok(revision),
            }
        }
    }
}

/// How many times a scan at one revision starts over after the cluster compacted the revision
/// it read at. A cluster compacting every few minutes (`--auto-compaction-retention`) catches
/// a long scan at most once or twice; one that compacts faster than a scan can read is out of
/// its reach, and the scan fails rather than read for ever.
const COMPACTED_RESTARTS: usize = 3;

/// What a scan hands its caller, in order.
pub enum Scanned {
    Key(KeyValue),
    /// A page was read (after its keys).
    PageRead,
    /// The scan at one revision starts over at a later one: what it handed so far is void.
    StartedOver,
}

/// A client of `endpoints`, connected within the timeouts (members are dialled on first use;
/// with credentials it authenticates here).
fn dial(
    rt: &Executor,
    endpoints: &[String],
    options: etcd_client::ConnectOptions,
    timeouts: &Timeouts,
) -> Result<Client, StoreError> {
    let wait = timeouts
        .connect
        .max(timeouts.request)
        .min(timeouts.deadline);
    let connected = rt.block_on(async {
        tokio::time::timeout(wait, Client::connect(endpoints, Some(options))).await
    });
    // The endpoints as messages show them: without user information.
    let at = || {
        let shown: Vec<String> = endpoints.iter().map(|e| shown_url(e)).collect();
        shown.join(",")
    };
    let client = match connected {
        Ok(Ok(client)) => client,
        Ok(Err(etcd_client::Error::InvalidArgs(msg))) => {
            return Err(StoreError::config(format!("invalid etcd settings: {msg}")))
        }
        Ok(Err(etcd_client::Error::InvalidUri(e))) => {
            return Err(StoreError::config("invalid etcd endpoint").because(e))
        }
        // Wrong credentials: retrying cannot help, the configuration must change.
        Ok(Err(etcd_client::Error::GRpcStatus(status)))
            if REFUSED_CREDENTIALS.contains(&i32::from(status.code())) =>
        {
            return Err(StoreError::config(format!(
                "etcd at {} refused the credentials of ipam.etcd_username: {}",
                at(),
                status.message()
            )))
        }
        Ok(Err(e)) => {
            return Err(
                StoreError::try_again(format!("cannot connect to etcd at {}", at())).because(e),
            )
        }
        Err(_) => {
            return Err(StoreError::try_again(format!(
                "timed out after {wait:?} connecting to etcd at {}",
                at()
            )))
        }
    };
    Ok(client)
}

/// A get of the greatest key in `dir` that is not greater than `key`.
pub fn floor_get(dir: &str, key: &str) -> TxnOp {
    let mut end = key.as_bytes().to_vec();
    end.push(0);
    TxnOp::get(
        dir,
        Some(
            GetOptions::new()
                .with_range(end)
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(1),
        ),
    )
}

/// A get of one key.
pub fn key_get(key: &str) -> TxnOp {
    TxnOp::get(key, None)
}
