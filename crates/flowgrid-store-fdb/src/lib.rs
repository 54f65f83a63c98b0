//! The FoundationDB store backend: every shard is the subspace `(root, shard)` of one
//! cluster, holding the keys of [`flowgrid_store::keys`].
//!
//! Invariants:
//! - `acquire` and `commit` run in one FoundationDB transaction each ([`Database::run`]).
//!   `commit` reads the epoch key (a serializable read, so it adds a read conflict range),
//!   compares it and applies the batch; an `acquire` that commits in between makes the
//!   commit conflict, retry, see the new epoch and fail with [`Error::StaleEpoch`].
//! - Batches are checked against [`StoreLimits`] before the transaction starts, and the
//!   limits must leave room for this backend's key prefix ([`FdbStore::from_database`]
//!   refuses a root that does not fit), the size of a batch counted as FoundationDB counts
//!   it, a prefix on every key included, so that it is refused then, not retried. Each
//!   transaction carries a timeout of `transaction_ms_max` across its retries; running out
//!   is [`Error::TooSlow`], or a [`Error::Backend`] saying the cluster is unavailable when
//!   no attempt got as far as a read version.
//! - Retries are safe: a commit that may have committed and runs again applies the same
//!   sets and clears under the same epoch (the result is the same); an acquire that runs
//!   again bumps the epoch once more, which only fences harder. A transaction that fails
//!   after an attempt that may have committed is [`Error::OutcomeUnknown`], never an error
//!   that says nothing was changed.
//! - An [`Error::OutcomeUnknown`] is *settled* before it is returned wherever FoundationDB
//!   does not settle it itself: once it is returned, the attempt either committed or never
//!   will, unless its message says the outcome could not be settled. A commit cut off by
//!   the client's timeout is settled by a transaction that writes a conflict on the
//!   shard's epoch key, which the cut-off commit read (the trick the client itself uses for
//!   `commit_unknown_result`).
//! - Reads are bounded in time: a [`ShardStore::scan`] or [`ShardStore::scan_records`]
//!   that has read for half the transaction limit goes on in a new transaction from where
//!   it stopped, so a long range never runs into FoundationDB's 5 s limit (and such a scan
//!   may span versions, see [`FdbShard`]'s `scan`). Such a `scan` may go on in a new
//!   transaction between two chunks of one record, so a chunked record it returns may be
//!   joined from two versions: read chunked records with [`ShardStore::get_chunked`] or
//!   [`ShardStore::scan_records`], which read each record whole in one transaction.
//!
//! # The network thread
//!
//! The FoundationDB client runs one network thread per process. The *process* (its
//! `main`) boots it once with `unsafe { foundationdb::boot() }` before any [`FdbStore`] is
//! opened, and keeps the returned guard alive until every store is dropped and the process
//! is about to exit; dropping the guard stops the network for good (it cannot be booted
//! again). This crate never boots it, so libraries and tests cannot stop it under a
//! running coordinator.
//!
//! ```no_run
//! use flowgrid_store::StoreLimits;
//! use flowgrid_store_fdb::FdbStore;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Safety: booted once, and the guard outlives every store (dropped at the end of main).
//!     let network = unsafe { flowgrid_store_fdb::foundationdb::boot() };
//!     let runtime = tokio::runtime::Runtime::new()?;
//!     runtime.block_on(async {
//!         // Fails at once, naming the cluster file, when the cluster does not answer.
//!         let store = FdbStore::open(None, "flowgrid/prod-eu", StoreLimits::default()).await?;
//!         // ... run the coordinator with `store` ...
//!         drop(store);
//!         Ok::<(), Box<dyn std::error::Error>>(())
//!     })?;
//!     drop(runtime);
//!     drop(network);
//!     Ok(())
//! }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foundationdb::options::{ConflictRangeType, StreamingMode, TransactionOption};
use foundationdb::tuple::Subspace;
use foundationdb::{
    Database, FdbBindingError, FdbError, FdbResult, KeySelector, RangeOption, RetryableTransaction, RunnerHooks,
    TransactionCommitError,
};

use flowgrid_model::{Epoch, ShardId};
use flowgrid_store::{
    join_chunks, join_records, keys, printable_key, Error, Key, KeyRange, Mutation, RecordPage, Result, ShardStore,
    Store, StoreLimits, Value, WriteBatch, FDB_KEY_BYTES_MAX, FDB_VALUE_BYTES_MAX,
};

/// The client crate, re-exported so that the process boots the same version it links.
pub use foundationdb;

/// FoundationDB's error code for a transaction that ran past its timeout option.
const TRANSACTION_TIMED_OUT: i32 = 1031;
/// FoundationDB's `transaction_cancelled`.
const TRANSACTION_CANCELLED: i32 = 1025;
/// How long FoundationDB lets a transaction read at one read version (its MVCC window):
/// past it, reads fail with `transaction_too_old`, whatever the timeout.
const FDB_READ_VERSION_MS_MAX: u64 = 5_000;

/// Opens shards as subspaces of one cluster. Cheap to clone and share.
#[derive(Clone)]
pub struct FdbStore {
    db: Arc<Database>,
    root: String,
    limits: StoreLimits,
    /// The cluster as error messages name it (its cluster file, when known).
    cluster: Arc<str>,
    /// How long one transaction of a scan reads before the scan goes on in a new one.
    scan_budget: Duration,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("cluster", &self.cluster)
            .field("root", &self.root)
            .field("limits", &self.limits)
            .field("scan_budget", &self.scan_budget)
            .finish_non_exhaustive()
    }
}

impl FdbStore {
    /// Connects to the cluster of `cluster_file` (`None`: `FDB_CLUSTER_FILE`, else
    /// `fdb.cluster` in the working directory, else the platform's default cluster file) and
    /// keeps every shard under the tuple prefix `(root, shard)`, e.g. root
    /// `"flowgrid/<cluster>"`. The network must already be booted (see the crate docs).
    ///
    /// Reads from the cluster before it returns ([`FdbStore::check_cluster`]): a wrong
    /// cluster file or a cluster that is down fails here, with an error naming the cluster
    /// file, instead of as a slow first transaction.
    pub async fn open(cluster_file: Option<&str>, root: &str, limits: StoreLimits) -> Result<FdbStore> {
        let cluster = cluster_name(cluster_file);
        let db = Database::new(cluster_file)
            .map_err(|error| backend(format!("cannot open FoundationDB through {cluster}: {error}")))?;
        let mut store = FdbStore::from_database(Arc::new(db), root, limits)?;
        store.cluster = cluster.into();
        store.check_cluster().await?;
        Ok(store)
    }

    /// A store over an already opened database (one `Database` can serve many roots).
    /// Fails when the longest shard prefix is over `limits.key_prefix_bytes_max`, or plus
    /// `limits.key_bytes_max` over FoundationDB's key limit: shorten the root. Fails when
    /// `limits.value_bytes_max` is over FoundationDB's value limit (records would be chunked
    /// into values no commit can write): lower it.
    ///
    /// Unlike [`FdbStore::open`] it does not contact the cluster: call
    /// [`FdbStore::check_cluster`] before serving from it.
    pub fn from_database(db: Arc<Database>, root: &str, limits: StoreLimits) -> Result<FdbStore> {
        let prefix_bytes_max = shard_subspace(root, ShardId(u32::MAX)).bytes().len();
        if prefix_bytes_max > limits.key_prefix_bytes_max {
            return Err(Error::TooLarge {
                what: "key prefix (root and shard): shorten the root, or raise key_prefix_bytes_max",
                size: prefix_bytes_max,
                limit: limits.key_prefix_bytes_max,
            });
        }
        if prefix_bytes_max + limits.key_bytes_max > FDB_KEY_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "key prefix (root) plus key_bytes_max",
                size: prefix_bytes_max + limits.key_bytes_max,
                limit: FDB_KEY_BYTES_MAX,
            });
        }
        if limits.value_bytes_max > FDB_VALUE_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "value_bytes_max (lower it to FoundationDB's value limit)",
                size: limits.value_bytes_max,
                limit: FDB_VALUE_BYTES_MAX,
            });
        }
        let scan_budget = Duration::from_millis(limits.transaction_ms_max.min(FDB_READ_VERSION_MS_MAX) / 2);
        Ok(FdbStore {
            db,
            root: root.to_string(),
            limits,
            cluster: "the cluster of the database given to FdbStore::from_database".into(),
            scan_budget,
        })
    }

    /// Sets how long one transaction of a scan reads before the scan goes on in a new
    /// transaction (default: half of `transaction_ms_max`, at most 2.5 s). A scan always
    /// reads at least one batch of keys per transaction, so 0 makes every scan go on after
    /// each batch (tests use it to exercise scans that span transactions).
    pub fn with_scan_budget(mut self, budget: Duration) -> FdbStore {
        self.scan_budget = budget;
        self
    }

    /// Reads this root's epoch key of shard 0 within `transaction_ms_max`, and fails with a
    /// [`Error::Backend`] naming the cluster (file) when the cluster does not answer (a wrong
    /// cluster file, coordinators down, no quorum) or refuses the read. [`FdbStore::open`]
    /// calls it; a caller of [`FdbStore::from_database`] should too.
    pub async fn check_cluster(&self) -> Result<()> {
        let mut key = shard_subspace(&self.root, ShardId(0)).bytes().to_vec();
        key.extend_from_slice(&keys::epoch());
        let timeout_ms = timeout_ms(&self.limits);
        let read = self
            .db
            .run(|trx, _maybe_committed| {
                let key = key.clone();
                async move {
                    trx.set_option(TransactionOption::Timeout(timeout_ms))?;
                    trx.get(&key, true).await?;
                    Ok(())
                }
            })
            .await;
        read.map_err(|error| match error.get_fdb_error().map(FdbError::code) {
            Some(TRANSACTION_TIMED_OUT) => backend(format!(
                "FoundationDB cluster unreachable: {} did not answer within {} ms; check that the cluster \
                 file names the cluster's coordinators and that they are up (fdbcli -C <cluster file> --exec status)",
                self.cluster, timeout_ms
            )),
            _ => backend(format!("FoundationDB cluster unavailable: {} refused a first read: {error}", self.cluster)),
        })
    }

    /// The root every shard's subspace starts with.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The database, e.g. to clear a test root.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }
}

/// The cluster `cluster_file` names, as error messages say it.
fn cluster_name(cluster_file: Option<&str>) -> String {
    match cluster_file {
        Some(path) => format!("the cluster of cluster file {path}"),
        None => match std::env::var("FDB_CLUSTER_FILE") {
            Ok(path) if !path.is_empty() => format!("the cluster of cluster file {path} (FDB_CLUSTER_FILE)"),
            _ => "the cluster of the default cluster file (./fdb.cluster, else /etc/foundationdb/fdb.cluster)"
                .to_string(),
        },
    }
}

fn backend(message: String) -> Error {
    Error::Backend(message.into())
}

/// The timeout option of every transaction, in FoundationDB's unit.
fn timeout_ms(limits: &StoreLimits) -> i32 {
    i32::try_from(limits.transaction_ms_max).unwrap_or(i32::MAX).max(1)
}

fn shard_subspace(root: &str, shard: ShardId) -> Subspace {
    Subspace::from(&(root, shard.0))
}

impl Store for FdbStore {
    type Shard = FdbShard;

    async fn open_shard(&self, shard: ShardId) -> Result<FdbShard> {
        Ok(FdbShard {
            shard,
            db: Arc::clone(&self.db),
            prefix: shard_subspace(&self.root, shard).bytes().to_vec(),
            limits: self.limits,
            cluster: Arc::clone(&self.cluster),
            scan_budget: self.scan_budget,
        })
    }
}

/// One shard's subspace. Opening it takes no lock: ownership is the epoch alone.
///
/// # Scans that span transactions
///
/// FoundationDB gives a transaction 5 s. [`ShardStore::scan`] and
/// [`ShardStore::scan_records`] read a batch at a time, and once a transaction of theirs has
/// read for its budget ([`FdbStore::with_scan_budget`]) they go on in a new transaction
/// from the key after the last one read (`scan_records`: after the last whole record). Such
/// a scan is then not one snapshot: a key written or cleared in the not yet read part of
/// the range meanwhile may or may not be seen, though no key is returned twice or out of
/// order, and every record `scan_records` returns was read whole in one transaction. That
/// is fine where the shard's owner reads ranges only it writes, before it writes them (a
/// reload: the active runs, the catalog, the gates), and for listings; a scan whose keys
/// must be one snapshot has to fit in one budget. A scan that fits in one budget (every
/// short one) is one transaction, as before.
pub struct FdbShard {
    shard: ShardId,
    db: Arc<Database>,
    prefix: Vec<u8>,
    limits: StoreLimits,
    cluster: Arc<str>,
    scan_budget: Duration,
}

impl std::fmt::Debug for FdbShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbShard").field("shard", &self.shard).finish_non_exhaustive()
    }
}

/// Whether a transaction writes: only one that writes can have committed when it fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

impl FdbShard {
    /// The shard this subspace holds.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn epoch_key(&self) -> Vec<u8> {
        self.full_key(&keys::epoch())
    }

    /// Runs `work` as one retried transaction with the time limit set, and turns binding
    /// errors back into store errors (settling a commit whose outcome is unknown, see
    /// [`FdbShard::settle`]).
    async fn transact<T, F, Fut>(&self, access: Access, work: F) -> Result<T>
    where
        F: Fn(RetryableTransaction) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, FdbBindingError>>,
    {
        let started = Instant::now();
        let timeout_ms = timeout_ms(&self.limits);
        let attempts = Attempts::default();
        let outcome = self
            .db
            .run_with_hooks(&attempts, |trx, _maybe_committed| {
                let (work, attempts) = (&work, &attempts);
                async move {
                    trx.set_option(TransactionOption::Timeout(timeout_ms))?;
                    // The reads below use this read version; asking for it first tells a
                    // cluster that never answered from a transaction that was slow.
                    trx.get_read_version().await?;
                    attempts.read_version.store(true, Ordering::Relaxed);
                    work(trx).await
                }
            })
            .await;
        match outcome {
            Ok(value) => Ok(value),
            Err(error) => Err(self.store_error(error, started, access, &attempts).await),
        }
    }

    async fn store_error(
        &self,
        error: FdbBindingError,
        started: Instant,
        access: Access,
        attempts: &Attempts,
    ) -> Error {
        // A transaction that writes nothing commits nothing, whatever its commit said.
        let maybe_committed = access == Access::Write && attempts.maybe_committed.load(Ordering::Relaxed);
        match error {
            FdbBindingError::CustomError(custom) => match custom.downcast::<Error>() {
                // A retry after an attempt that may have committed found the shard acquired
                // since (its owner moved while the cluster was in trouble): that attempt may
                // stand, so this is no refusal that changed nothing. It is settled: retries
                // only follow commit_unknown_result, which the client settles, and the epoch
                // key was written since.
                Ok(store_error) if maybe_committed && matches!(*store_error, Error::StaleEpoch { .. }) => {
                    Error::OutcomeUnknown {
                        detail: format!("an earlier attempt may have committed; then {store_error}"),
                    }
                }
                Ok(store_error) => *store_error,
                Err(other) => Error::Backend(other),
            },
            // The retries applied the same writes under the same epoch; the last failed, so
            // whether the earlier one committed is not known.
            other if maybe_committed => {
                let detail = if attempts.unsettled.load(Ordering::Relaxed) {
                    match self.settle().await {
                        Ok(()) => format!(
                            "{other}; settled: a transaction conflicting with that attempt committed since, so it \
                             either committed before that or never will: read the shard to tell which"
                        ),
                        Err(settle_error) => format!(
                            "{other}; the outcome could not be settled ({settle_error}): that attempt may still \
                             commit later, until the shard's epoch is written again (an acquire) or FoundationDB's \
                             5 s transaction lifetime has passed for it"
                        ),
                    }
                } else {
                    other.to_string()
                };
                Error::OutcomeUnknown { detail }
            }
            other => match other.get_fdb_error().map(FdbError::code) {
                Some(TRANSACTION_TIMED_OUT) if !attempts.read_version.load(Ordering::Relaxed) => backend(format!(
                    "FoundationDB cluster unavailable: no read version from {} within {} ms",
                    self.cluster,
                    started.elapsed().as_millis()
                )),
                Some(TRANSACTION_TIMED_OUT) => Error::TooSlow {
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    limit_ms: self.limits.transaction_ms_max,
                },
                _ => Error::Backend(Box::new(other)),
            },
        }
    }

    /// Settles an attempt of this shard's `acquire` or `commit` whose commit was cut off by
    /// the client (`transaction_timed_out`, 1031, or `transaction_cancelled`, 1025) while it
    /// was on its way: unlike `commit_unknown_result` (1021), after which the client itself
    /// makes sure that the attempt can no longer commit, such an attempt may still reach the
    /// cluster and commit seconds later, after the coordinator has read the shard again and
    /// gone on, under the same epoch, so nothing would fence it.
    ///
    /// The attempt read the shard's epoch key (a read conflict range) at a read version
    /// older than now. This commits a fresh transaction that only adds a *write* conflict
    /// range on that key (its value unchanged): the cluster resolves every commit against
    /// the writes committed after its read version, so an attempt that arrives after this
    /// transaction conflicts and can never commit, and one that arrived before is decided
    /// (and visible to every later read). The same trick the FoundationDB client uses for
    /// 1021 (its dummy transaction on a key the lost commit read). The cost: a commit of
    /// this shard running at the same moment conflicts and retries.
    ///
    /// Fails (the attempt's outcome stays open) when this transaction does not commit
    /// within the transaction limit.
    async fn settle(&self) -> std::result::Result<(), String> {
        let epoch_key = self.epoch_key();
        let mut after = epoch_key.clone();
        after.push(0);
        let timeout_ms = timeout_ms(&self.limits);
        self.db
            .run(|trx, _maybe_committed| {
                let (epoch_key, after) = (epoch_key.clone(), after.clone());
                async move {
                    trx.set_option(TransactionOption::Timeout(timeout_ms))?;
                    trx.add_conflict_range(&epoch_key, &after, ConflictRangeType::Write)?;
                    Ok(())
                }
            })
            .await
            .map_err(|error| format!("the settling transaction failed: {error}"))
    }

    fn apply(&self, trx: &RetryableTransaction, mutation: &Mutation) {
        match mutation {
            Mutation::Set(key, value) => trx.set(&self.full_key(key), value),
            Mutation::Clear(key) => trx.clear(&self.full_key(key)),
            Mutation::ClearRange(range) => {
                if !range.is_empty() {
                    trx.clear_range(&self.full_key(&range.begin), &self.full_key(&range.end));
                }
            }
        }
    }
}

/// What the attempts of one transaction ran into, seen through the runner's hooks (also
/// where no attempt follows: the transaction's time ran out).
#[derive(Default)]
struct Attempts {
    /// An attempt's commit failed in a way that may have committed it.
    maybe_committed: AtomicBool,
    /// ... and it was cut off by the client (timed out or cancelled while on its way), so
    /// nothing made sure that it can no longer commit: [`FdbShard::settle`] must.
    unsettled: AtomicBool,
    /// An attempt got a read version: the cluster answered.
    read_version: AtomicBool,
}

impl RunnerHooks for Attempts {
    fn on_commit_error(
        &self,
        error: &TransactionCommitError,
    ) -> impl std::future::Future<Output = FdbResult<()>> + Send {
        // `commit_unknown_result`: the client committed a conflicting transaction before it
        // returned the error, so the attempt cannot commit later.
        if error.is_maybe_committed() {
            self.maybe_committed.store(true, Ordering::Relaxed);
        }
        // A transaction cancelled (or timed out, which cancels it) while its commit was
        // out may or may not have committed, as FoundationDB documents, and nothing settled
        // it. Neither error is retried, so it is the transaction's last.
        if matches!(error.code(), TRANSACTION_TIMED_OUT | TRANSACTION_CANCELLED) {
            self.maybe_committed.store(true, Ordering::Relaxed);
            self.unsettled.store(true, Ordering::Relaxed);
        }
        async { Ok(()) }
    }
}

/// A store error carried through `Database::run`, which does not retry it.
fn abort_with(error: Error) -> FdbBindingError {
    FdbBindingError::CustomError(Box::new(error))
}

async fn read_epoch(trx: &RetryableTransaction, epoch_key: &[u8]) -> std::result::Result<Epoch, FdbBindingError> {
    let stored = trx.get(epoch_key, false).await?;
    keys::decode_epoch(stored.as_deref()).map_err(abort_with)
}

impl ShardStore for FdbShard {
    async fn acquire(&self) -> Result<Epoch> {
        let epoch_key = self.epoch_key();
        self.transact(Access::Write, |trx| {
            let epoch_key = epoch_key.clone();
            async move {
                let current = read_epoch(&trx, &epoch_key).await?;
                let next = Epoch(current.0.checked_add(1).expect("an epoch of 2^64 acquisitions is unreachable"));
                trx.set(&epoch_key, &keys::encode_epoch(next));
                Ok(next)
            }
        })
        .await
    }

    async fn current_epoch(&self) -> Result<Epoch> {
        let epoch_key = self.epoch_key();
        self.transact(Access::Read, |trx| {
            let epoch_key = epoch_key.clone();
            async move { read_epoch(&trx, &epoch_key).await }
        })
        .await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Value>> {
        let full_key = self.full_key(key);
        self.transact(Access::Read, |trx| {
            let full_key = full_key.clone();
            async move { Ok(trx.get(&full_key, true).await?.map(|value| value.to_vec())) }
        })
        .await
    }

    /// Reads a batch at a time; past the scan budget it goes on in a new transaction, so a
    /// long scan may span versions (see [`FdbShard`]).
    async fn scan(&self, range: KeyRange, limit: usize, reverse: bool) -> Result<Vec<(Key, Value)>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let (mut begin, mut end) = (self.full_key(&range.begin), self.full_key(&range.end));
        let prefix_len = self.prefix.len();
        let mut pairs: Vec<(Key, Value)> = Vec::new();
        loop {
            let deadline = Instant::now() + self.scan_budget;
            let want = limit - pairs.len();
            let piece = self
                .transact(Access::Read, |trx| {
                    let (begin, end) = (begin.clone(), end.clone());
                    async move { scan_piece(&trx, begin, end, want, reverse, prefix_len, Some(deadline)).await }
                })
                .await?;
            if !piece.finished {
                let (last, _) = piece.pairs.last().expect("a scan stops early only after a batch of pairs");
                if reverse {
                    end = self.full_key(last);
                } else {
                    begin = self.full_key(last);
                    begin.push(0);
                }
            }
            pairs.extend(piece.pairs);
            if piece.finished || pairs.len() >= limit {
                pairs.truncate(limit);
                return Ok(pairs);
            }
        }
    }

    async fn commit(&self, epoch: Epoch, batch: WriteBatch) -> Result<()> {
        // Counts the size as the cluster does, with a prefix at least as long as this shard's
        // (`from_database` refused a longer root): over it, the cluster would refuse the
        // transaction (transaction_too_large) at each retry.
        batch.check(&self.limits)?;
        let epoch_key = self.epoch_key();
        let shard = self.shard;
        let batch = Arc::new(batch);
        self.transact(Access::Write, |trx| {
            let (epoch_key, batch) = (epoch_key.clone(), Arc::clone(&batch));
            async move {
                let current = read_epoch(&trx, &epoch_key).await?;
                if current != epoch {
                    return Err(abort_with(Error::StaleEpoch { shard, epoch, current }));
                }
                for mutation in batch.mutations() {
                    self.apply(&trx, mutation);
                }
                Ok(())
            }
        })
        .await
    }

    /// One transaction: the point read of chunk 0 of 1, and only when that is absent the
    /// scan of the record's chunks, so a record is never joined from two versions.
    async fn get_chunked(&self, record_key: &[u8]) -> Result<Option<Value>> {
        let mut single = record_key.to_vec();
        foundationdb_tuple::pack_into(&(0u32, 1u32), &mut single);
        let single = self.full_key(&single);
        let chunks = keys::chunks_range(record_key);
        let (begin, end) = (self.full_key(&chunks.begin), self.full_key(&chunks.end));
        let prefix_len = self.prefix.len();
        self.transact(Access::Read, |trx| {
            let (single, begin, end) = (single.clone(), begin.clone(), end.clone());
            async move {
                if let Some(value) = trx.get(&single, true).await? {
                    return Ok(Some(value.to_vec()));
                }
                let piece = scan_piece(&trx, begin, end, usize::MAX, false, prefix_len, None).await?;
                join_chunks(piece.pairs).map_err(abort_with)
            }
        })
        .await
    }

    /// Reads the range a batch (at most about 80 KB, or one value) at a time and stops as
    /// soon as the page is full: `limit` records, or a record that would take it past
    /// `bytes_max` (seen as soon as the chunks read of it do). So a page costs about its
    /// own size plus one batch, however large the values and however long the range. Past
    /// the scan budget it goes on in a new transaction after the last whole record (see
    /// [`FdbShard`]); each record is read whole in one transaction.
    async fn scan_records(&self, range: KeyRange, limit: usize, bytes_max: usize) -> Result<RecordPage> {
        let limit = limit.max(1);
        let mut page = RecordPage::default();
        if range.is_empty() {
            return Ok(page);
        }
        let end = self.full_key(&range.end);
        let mut begin = self.full_key(&range.begin);
        let prefix_len = self.prefix.len();
        let mut bytes = 0usize;
        loop {
            let deadline = Instant::now() + self.scan_budget;
            let so_far = PageSoFar { records: page.records.len(), bytes, limit, bytes_max };
            let piece = self
                .transact(Access::Read, |trx| {
                    let (begin, end) = (begin.clone(), end.clone());
                    async move { records_piece(&trx, begin, end, prefix_len, so_far, deadline).await }
                })
                .await?;
            bytes = piece.records.iter().fold(bytes, |sum, (_, value)| sum.saturating_add(value.len()));
            page.records.extend(piece.records);
            match piece.more {
                Some(more) => {
                    page.more = more;
                    return Ok(page);
                }
                None => {
                    let (last, _) = page.records.last().expect("a page stops early only after a whole record");
                    begin = self.full_key(&keys::chunks_range(last).end);
                }
            }
        }
    }
}

/// What one transaction of a scan read.
struct ScanPiece {
    /// Keys stripped of the shard prefix.
    pairs: Vec<(Key, Value)>,
    /// False when the scan budget ran out before the limit or the end of the range.
    finished: bool,
}

/// Reads `[begin, end)` a batch at a time up to `limit` pairs, keys stripped of the prefix;
/// stops early (not finished) after the first batch that ends past `deadline`.
async fn scan_piece(
    trx: &RetryableTransaction,
    begin: Vec<u8>,
    end: Vec<u8>,
    limit: usize,
    reverse: bool,
    prefix_len: usize,
    deadline: Option<Instant>,
) -> std::result::Result<ScanPiece, FdbBindingError> {
    let mut option = RangeOption {
        begin: KeySelector::first_greater_or_equal(begin),
        end: KeySelector::first_greater_or_equal(end),
        limit: (limit != usize::MAX).then_some(limit),
        reverse,
        // At most about 80 KB (or one pair) per batch, so the budget is checked often.
        mode: StreamingMode::WantAll,
        ..RangeOption::default()
    };
    let mut pairs = Vec::new();
    let mut iteration = 1;
    loop {
        let batch = trx.get_range(&option, iteration, true).await?;
        pairs.extend(batch.iter().map(|pair| (pair.key()[prefix_len..].to_vec(), pair.value().to_vec())));
        match option.next_range(&batch) {
            Some(next) if pairs.len() < limit => {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return Ok(ScanPiece { pairs, finished: false });
                }
                option = next;
            }
            _ => break,
        }
        iteration += 1;
    }
    pairs.truncate(limit);
    Ok(ScanPiece { pairs, finished: true })
}

/// Where a page of `scan_records` stands when a transaction of it starts.
#[derive(Clone, Copy)]
struct PageSoFar {
    records: usize,
    bytes: usize,
    limit: usize,
    bytes_max: usize,
}

/// What one transaction of `scan_records` read.
struct RecordsPiece {
    /// Whole records, keys stripped of the shard prefix.
    records: Vec<(Key, Value)>,
    /// `Some(more)` when the page is done; `None` when the scan budget ran out first (the
    /// page goes on after the last record, which there is).
    more: Option<bool>,
}

/// Reads whole chunked records from `[begin, end)` for a page that already holds
/// `so_far`, until the page is full or the range ends; stops early after a batch that ends
/// past `deadline`, once it holds a whole record.
async fn records_piece(
    trx: &RetryableTransaction,
    begin: Vec<u8>,
    end: Vec<u8>,
    prefix_len: usize,
    so_far: PageSoFar,
    deadline: Instant,
) -> std::result::Result<RecordsPiece, FdbBindingError> {
    let mut option = RangeOption {
        begin: KeySelector::first_greater_or_equal(begin),
        end: KeySelector::first_greater_or_equal(end),
        mode: StreamingMode::WantAll,
        ..RangeOption::default()
    };
    let mut records: Vec<(Key, Value)> = Vec::new();
    let mut bytes = so_far.bytes;
    // The chunks read so far of the record not yet whole, and their bytes.
    let mut chunks: Vec<(Key, Value)> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut iteration = 1;
    loop {
        let batch = trx.get_range(&option, iteration, true).await?;
        for pair in batch.iter() {
            let key = &pair.key()[prefix_len..];
            let page_len = so_far.records + records.len();
            if chunks.is_empty() && page_len == so_far.limit {
                // A record follows a full page.
                return Ok(RecordsPiece { records, more: Some(true) });
            }
            let (index, count) = flowgrid_store::chunk_position(key).map_err(abort_with)?;
            chunk_bytes = chunk_bytes.saturating_add(pair.value().len());
            chunks.push((key.to_vec(), pair.value().to_vec()));
            if page_len > 0 && bytes.saturating_add(chunk_bytes) > so_far.bytes_max {
                // This record takes the page past bytes_max, however much of it follows
                // (the first record of a page always comes).
                return Ok(RecordsPiece { records, more: Some(true) });
            }
            if index + 1 == count {
                records.push(one_record(std::mem::take(&mut chunks))?);
                bytes = bytes.saturating_add(chunk_bytes);
                chunk_bytes = 0;
            }
        }
        match option.next_range(&batch) {
            Some(next) => {
                if !records.is_empty() && Instant::now() >= deadline {
                    return Ok(RecordsPiece { records, more: None });
                }
                option = next;
                if chunks.is_empty() && so_far.records + records.len() == so_far.limit {
                    // The page is full: one more key says whether a record follows.
                    option.limit = Some(1);
                }
            }
            None => break,
        }
        iteration += 1;
    }
    if !chunks.is_empty() {
        // The range ends inside a record: join_records names what is missing.
        one_record(chunks)?;
    }
    Ok(RecordsPiece { records, more: Some(false) })
}

/// Joins the chunks of one record, read through its last chunk.
fn one_record(chunks: Vec<(Key, Value)>) -> std::result::Result<(Key, Value), FdbBindingError> {
    let first_key = chunks.first().map(|(key, _)| printable_key(key)).unwrap_or_default();
    let mut joined = join_records(chunks).map_err(abort_with)?;
    match (joined.pop(), joined.is_empty()) {
        (Some(record), true) => Ok(record),
        _ => Err(abort_with(Error::Corrupt {
            key: first_key,
            detail: "the chunks read through a record's last chunk are not exactly that record".to_string(),
        })),
    }
}
