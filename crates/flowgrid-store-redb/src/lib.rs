//! The embedded store backend: one [redb](https://docs.rs/redb) file per shard under a data
//! directory (`shard-00017.redb`), holding one table `kv: &[u8] -> &[u8]` with the keys of
//! [`flowgrid_store::keys`].
//!
//! Invariants:
//! - A shard's file is open in at most one process: redb locks the file, and a second
//!   open fails with [`Error::Busy`]. Several coordinator processes on one host can hand a
//!   shard to each other by closing it ([`RedbShard::close`] or drop) and opening it there.
//! - Every commit is one redb write transaction that reads the epoch, compares it, applies
//!   the batch in order and commits with [`Durability::Immediate`] (fsync): when `commit`
//!   returns `Ok`, the batch is on disk; when it returns an error, nothing of it is.
//! - Limits are FoundationDB's ([`StoreLimits`]): the batch is checked before the
//!   transaction starts, and a transaction that ran past `transaction_ms_max` is aborted
//!   before its commit, so that what passes here passes in a cluster.
//! - redb is blocking: every call runs on tokio's blocking pool, never on a runtime worker.
//!
//! ```no_run
//! # async fn example() -> flowgrid_store::Result<()> {
//! use flowgrid_model::ShardId;
//! use flowgrid_store::{keys, ShardStore, Store, StoreLimits, WriteBatch};
//! use flowgrid_store_redb::RedbStore;
//!
//! let store = RedbStore::open("data", StoreLimits::default())?;
//! let shard = store.open_shard(ShardId(17)).await?; // data/shard-00017.redb
//! let epoch = shard.acquire().await?;
//! let mut batch = WriteBatch::new();
//! batch.set(keys::run(&flowgrid_model::RunId("r1".into())), b"record".to_vec());
//! shard.commit(epoch, batch).await?;
//! shard.close()?; // another process may open the shard from here on
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use redb::{AccessGuard, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition};

use flowgrid_model::{Epoch, ShardId};
use flowgrid_store::{keys, Error, Key, KeyRange, Mutation, Result, ShardStore, Store, StoreLimits, Value, WriteBatch};

/// The one table of a shard file.
const KV: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("kv");

/// redb's page cache per shard file unless [`RedbStore::with_cache_bytes_per_shard`] says
/// otherwise. A process may hold hundreds of shards and the hot state lives in the
/// coordinator's memory, so the store's cache only serves reloads and listings: keep it small.
pub const CACHE_BYTES_PER_SHARD_DEFAULT: usize = 256 * 1024;

/// Opens shard files under one data directory. Cheap to share; holds no file itself.
#[derive(Clone, Debug)]
pub struct RedbStore {
    dir: PathBuf,
    limits: StoreLimits,
    cache_bytes_per_shard: usize,
}

impl RedbStore {
    /// A store over `dir`, which is created if missing. Shards are opened with
    /// [`Store::open_shard`].
    pub fn open(dir: impl AsRef<Path>, limits: StoreLimits) -> Result<RedbStore> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|error| backend(PathError::new("create the data directory", &dir, error)))?;
        Ok(RedbStore { dir, limits, cache_bytes_per_shard: CACHE_BYTES_PER_SHARD_DEFAULT })
    }

    /// Sets redb's page cache of each shard file opened from now on (the process holds up
    /// to this times the number of its shards).
    pub fn with_cache_bytes_per_shard(mut self, cache_bytes_per_shard: usize) -> RedbStore {
        self.cache_bytes_per_shard = cache_bytes_per_shard;
        self
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `shard`: `<dir>/shard-00017.redb`.
    pub fn shard_path(&self, shard: ShardId) -> PathBuf {
        self.dir.join(format!("shard-{:05}.redb", shard.0))
    }
}

impl Store for RedbStore {
    type Shard = RedbShard;

    async fn open_shard(&self, shard: ShardId) -> Result<RedbShard> {
        let path = self.shard_path(shard);
        let (limits, cache_bytes) = (self.limits, self.cache_bytes_per_shard);
        blocking(move || open_shard_file(shard, path, limits, cache_bytes)).await
    }
}

fn open_shard_file(shard: ShardId, path: PathBuf, limits: StoreLimits, cache_bytes: usize) -> Result<RedbShard> {
    let db = Database::builder().set_cache_size(cache_bytes).create(&path).map_err(|error| match error {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => Error::Busy {
            shard,
            detail: format!(
                "{} is locked ({error}); it is open in another process (or already in this one): \
                 close it there first, or wait until its owner gives the shard up",
                path.display()
            ),
        },
        other => backend(PathError::new("open the shard file", &path, other)),
    })?;
    // Create the table once, so that reads never meet a missing table.
    let txn = db.begin_write().map_err(backend)?;
    txn.open_table(KV).map_err(backend)?;
    txn.commit().map_err(backend)?;
    Ok(RedbShard { shard, path, db: Arc::new(db), limits })
}

/// One open shard file. Holding it holds the file lock: drop it or call
/// [`RedbShard::close`] to let another process open the shard.
#[derive(Debug)]
pub struct RedbShard {
    shard: ShardId,
    path: PathBuf,
    db: Arc<Database>,
    limits: StoreLimits,
}

impl RedbShard {
    /// The shard this file holds.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file and releases its lock, reporting any error that dropping would
    /// ignore. If a blocking call of a cancelled future still runs, the file closes when it
    /// ends (within `transaction_ms_max`), and this returns `Ok`.
    pub fn close(self) -> Result<()> {
        match Arc::try_unwrap(self.db) {
            Ok(db) => db.close().map_err(|error| backend(PathError::new("close the shard file", &self.path, error))),
            Err(_still_in_use) => Ok(()),
        }
    }

    fn run_blocking<T, F>(&self, work: F) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Database, ShardId, StoreLimits) -> Result<T> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let (shard, limits) = (self.shard, self.limits);
        blocking(move || work(&db, shard, limits))
    }
}

impl ShardStore for RedbShard {
    async fn acquire(&self) -> Result<Epoch> {
        self.run_blocking(|db, _, _| {
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate).map_err(backend)?;
            let next = {
                let mut table = txn.open_table(KV).map_err(backend)?;
                let current = read_epoch(&table)?;
                let next = Epoch(current.0.checked_add(1).expect("an epoch of 2^64 acquisitions is unreachable"));
                table.insert(keys::epoch().as_slice(), keys::encode_epoch(next).as_slice()).map_err(backend)?;
                next
            };
            txn.commit().map_err(backend)?;
            Ok(next)
        })
        .await
    }

    async fn current_epoch(&self) -> Result<Epoch> {
        self.run_blocking(|db, _, _| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(KV).map_err(backend)?;
            read_epoch(&table)
        })
        .await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Value>> {
        let key = key.to_vec();
        self.run_blocking(move |db, _, _| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(KV).map_err(backend)?;
            let value = table.get(key.as_slice()).map_err(backend)?;
            Ok(value.map(|guard| guard.value().to_vec()))
        })
        .await
    }

    async fn scan(&self, range: KeyRange, limit: usize, reverse: bool) -> Result<Vec<(Key, Value)>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        self.run_blocking(move |db, _, _| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(KV).map_err(backend)?;
            let entries = table.range(range.begin.as_slice()..range.end.as_slice()).map_err(backend)?;
            if reverse {
                collect_pairs(entries.rev(), limit)
            } else {
                collect_pairs(entries, limit)
            }
        })
        .await
    }

    async fn commit(&self, epoch: Epoch, batch: WriteBatch) -> Result<()> {
        batch.check(&self.limits)?;
        self.run_blocking(move |db, shard, limits| {
            let started = Instant::now();
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate).map_err(backend)?;
            {
                let mut table = txn.open_table(KV).map_err(backend)?;
                let current = read_epoch(&table)?;
                if current != epoch {
                    // Dropping the transaction aborts it; nothing was written.
                    return Err(Error::StaleEpoch { shard, epoch, current });
                }
                for mutation in batch.into_mutations() {
                    apply(&mut table, mutation)?;
                }
            }
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if elapsed_ms > limits.transaction_ms_max {
                txn.abort().map_err(backend)?;
                return Err(Error::TooSlow { elapsed_ms, limit_ms: limits.transaction_ms_max });
            }
            txn.commit().map_err(backend)
        })
        .await
    }
}

fn apply(table: &mut Table<'_, &'static [u8], &'static [u8]>, mutation: Mutation) -> Result<()> {
    match mutation {
        Mutation::Set(key, value) => {
            table.insert(key.as_slice(), value.as_slice()).map_err(backend)?;
        }
        Mutation::Clear(key) => {
            table.remove(key.as_slice()).map_err(backend)?;
        }
        Mutation::ClearRange(range) => {
            if !range.is_empty() {
                table.retain_in(range.begin.as_slice()..range.end.as_slice(), |_, _| false).map_err(backend)?;
            }
        }
    }
    Ok(())
}

type Entry<'a> = (AccessGuard<'a, &'static [u8]>, AccessGuard<'a, &'static [u8]>);

fn collect_pairs<'a>(
    entries: impl Iterator<Item = Result<Entry<'a>, redb::StorageError>>,
    limit: usize,
) -> Result<Vec<(Key, Value)>> {
    entries
        .take(limit)
        .map(|entry| {
            let (key, value) = entry.map_err(backend)?;
            Ok((key.value().to_vec(), value.value().to_vec()))
        })
        .collect()
}

fn read_epoch(table: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<Epoch> {
    let stored = table.get(keys::epoch().as_slice()).map_err(backend)?;
    keys::decode_epoch(stored.as_ref().map(|guard| guard.value()))
}

/// Runs blocking redb work on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => std::panic::resume_unwind(join_error.into_panic()),
        Err(join_error) => Err(backend(join_error)),
    }
}

fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend(Box::new(error))
}

/// A failure on a named file, with its cause chained.
#[derive(Debug, thiserror::Error)]
#[error("could not {action} {}: {source}", path.display())]
struct PathError<E: std::error::Error + 'static> {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: E,
}

impl<E: std::error::Error + 'static> PathError<E> {
    fn new(action: &'static str, path: &Path, source: E) -> Self {
        PathError { action, path: path.to_path_buf(), source }
    }
}
