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
//!   it, a prefix on every key included, so that it is refused then, not retried. Each transaction carries a timeout of
//!   `transaction_ms_max` across its retries; running out is [`Error::TooSlow`].
//! - Retries are safe: a commit that may have committed and runs again applies the same
//!   sets and clears under the same epoch (the result is the same); an acquire that runs
//!   again bumps the epoch once more, which only fences harder. A transaction that fails
//!   after an attempt that may have committed is [`Error::OutcomeUnknown`], never an error
//!   that says nothing was changed.
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
//!     let store = FdbStore::open(None, "flowgrid/prod-eu", StoreLimits::default())?;
//!     // ... run the coordinator with `store` ...
//!     drop(store);
//!     drop(network);
//!     Ok(())
//! }
//! ```

use std::sync::Arc;
use std::time::Instant;

use foundationdb::options::{StreamingMode, TransactionOption};
use foundationdb::tuple::Subspace;
use foundationdb::{
    Database, FdbBindingError, FdbError, FdbResult, KeySelector, RangeOption, RetryableTransaction, RunnerHooks,
    TransactionCommitError,
};

use flowgrid_model::{Epoch, ShardId};
use flowgrid_store::{
    keys, Error, Key, KeyRange, Mutation, Result, ShardStore, Store, StoreLimits, Value, WriteBatch, FDB_KEY_BYTES_MAX,
};

/// The client crate, re-exported so that the process boots the same version it links.
pub use foundationdb;

/// FoundationDB's error code for a transaction that ran past its timeout option.
const TRANSACTION_TIMED_OUT: i32 = 1031;
/// FoundationDB's `transaction_cancelled`.
const TRANSACTION_CANCELLED: i32 = 1025;

/// Opens shards as subspaces of one cluster. Cheap to clone and share.
#[derive(Clone)]
pub struct FdbStore {
    db: Arc<Database>,
    root: String,
    limits: StoreLimits,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore").field("root", &self.root).field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl FdbStore {
    /// Connects to the cluster of `cluster_file` (`None`: the default cluster file, or
    /// `FDB_CLUSTER_FILE`) and keeps every shard under the tuple prefix `(root, shard)`,
    /// e.g. root `"flowgrid/<cluster>"`. The network must already be booted (see the crate
    /// docs).
    pub fn open(cluster_file: Option<&str>, root: &str, limits: StoreLimits) -> Result<FdbStore> {
        let db = Database::new(cluster_file).map_err(|error| Error::Backend(Box::new(error)))?;
        FdbStore::from_database(Arc::new(db), root, limits)
    }

    /// A store over an already opened database (one `Database` can serve many roots).
    /// Fails when the longest shard prefix is over `limits.key_prefix_bytes_max`, or plus
    /// `limits.key_bytes_max` over FoundationDB's key limit: shorten the root.
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
        Ok(FdbStore { db, root: root.to_string(), limits })
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
        })
    }
}

/// One shard's subspace. Opening it takes no lock: ownership is the epoch alone.
pub struct FdbShard {
    shard: ShardId,
    db: Arc<Database>,
    prefix: Vec<u8>,
    limits: StoreLimits,
}

impl std::fmt::Debug for FdbShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbShard").field("shard", &self.shard).finish_non_exhaustive()
    }
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

    /// Runs `work` as one retried transaction with the time limit set, and turns binding
    /// errors back into store errors.
    async fn transact<T, F, Fut>(&self, work: F) -> Result<T>
    where
        F: Fn(RetryableTransaction) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, FdbBindingError>>,
    {
        let started = Instant::now();
        let timeout_ms = i32::try_from(self.limits.transaction_ms_max).unwrap_or(i32::MAX).max(1);
        let hooks = CommitOutcome::default();
        let outcome = self
            .db
            .run_with_hooks(&hooks, |trx, _maybe_committed| {
                let attempt = trx.set_option(TransactionOption::Timeout(timeout_ms)).map(|()| work(trx));
                async move { attempt?.await }
            })
            .await;
        let maybe_committed = hooks.maybe_committed.load(std::sync::atomic::Ordering::Relaxed);
        outcome.map_err(|error| self.store_error(error, started, maybe_committed))
    }

    /// `maybe_committed`: an earlier attempt of the transaction may have committed.
    fn store_error(&self, error: FdbBindingError, started: Instant, maybe_committed: bool) -> Error {
        match error {
            FdbBindingError::CustomError(custom) => match custom.downcast::<Error>() {
                // A retry after an attempt that may have committed found the shard acquired
                // since (its owner moved while the cluster was in trouble): that attempt may
                // stand, so this is no refusal that changed nothing.
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
            other if maybe_committed => Error::OutcomeUnknown { detail: other.to_string() },
            other => match other.get_fdb_error().map(FdbError::code) {
                Some(TRANSACTION_TIMED_OUT) => Error::TooSlow {
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    limit_ms: self.limits.transaction_ms_max,
                },
                _ => Error::Backend(Box::new(other)),
            },
        }
    }
}

/// Notes whether a commit of a transaction failed in a way that may have committed it
/// (`commit_unknown_result`), even where no attempt runs after it (the transaction's
/// time ran out).
#[derive(Default)]
struct CommitOutcome {
    maybe_committed: std::sync::atomic::AtomicBool,
}

impl RunnerHooks for CommitOutcome {
    fn on_commit_error(
        &self,
        error: &TransactionCommitError,
    ) -> impl std::future::Future<Output = FdbResult<()>> + Send {
        // A transaction cancelled (or timed out, which cancels it) while its commit was
        // out may or may not have committed, as FoundationDB documents.
        if error.is_maybe_committed() || matches!(error.code(), TRANSACTION_TIMED_OUT | TRANSACTION_CANCELLED) {
            self.maybe_committed.store(true, std::sync::atomic::Ordering::Relaxed);
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
        let epoch_key = self.full_key(&keys::epoch());
        self.transact(|trx| {
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
        let epoch_key = self.full_key(&keys::epoch());
        self.transact(|trx| {
            let epoch_key = epoch_key.clone();
            async move { read_epoch(&trx, &epoch_key).await }
        })
        .await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Value>> {
        let full_key = self.full_key(key);
        self.transact(|trx| {
            let full_key = full_key.clone();
            async move { Ok(trx.get(&full_key, true).await?.map(|value| value.to_vec())) }
        })
        .await
    }

    async fn scan(&self, range: KeyRange, limit: usize, reverse: bool) -> Result<Vec<(Key, Value)>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let (begin, end) = (self.full_key(&range.begin), self.full_key(&range.end));
        let prefix_len = self.prefix.len();
        self.transact(|trx| {
            let (begin, end) = (begin.clone(), end.clone());
            async move { scan_in(&trx, begin, end, limit, reverse, prefix_len).await }
        })
        .await
    }

    async fn commit(&self, epoch: Epoch, batch: WriteBatch) -> Result<()> {
        // Counts the size as the cluster does, with a prefix at least as long as this shard's
        // (`from_database` refused a longer root): over it, the cluster would refuse the
        // transaction (transaction_too_large) at each retry.
        batch.check(&self.limits)?;
        let epoch_key = self.full_key(&keys::epoch());
        let shard = self.shard;
        let batch = Arc::new(batch);
        self.transact(|trx| {
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
}

impl FdbShard {
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

/// Reads `[begin, end)` page by page up to `limit` pairs, keys stripped of the prefix.
async fn scan_in(
    trx: &RetryableTransaction,
    begin: Vec<u8>,
    end: Vec<u8>,
    limit: usize,
    reverse: bool,
    prefix_len: usize,
) -> std::result::Result<Vec<(Key, Value)>, FdbBindingError> {
    let mut option = RangeOption {
        begin: KeySelector::first_greater_or_equal(begin),
        end: KeySelector::first_greater_or_equal(end),
        limit: (limit != usize::MAX).then_some(limit),
        reverse,
        mode: StreamingMode::WantAll,
        ..RangeOption::default()
    };
    let mut pairs = Vec::new();
    let mut iteration = 1;
    loop {
        let page = trx.get_range(&option, iteration, true).await?;
        pairs.extend(page.iter().map(|pair| (pair.key()[prefix_len..].to_vec(), pair.value().to_vec())));
        match option.next_range(&page) {
            Some(next) if pairs.len() < limit => option = next,
            _ => break,
        }
        iteration += 1;
    }
    pairs.truncate(limit);
    Ok(pairs)
}
