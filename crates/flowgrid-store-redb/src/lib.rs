//! The embedded store backend: one [redb](https://docs.rs/redb) file per shard under a data
//! directory (`shard-00017.redb`), holding one table `kv: &[u8] -> &[u8]` with the keys of
//! [`flowgrid_store::keys`].
//!
//! Invariants:
//! - A shard's file is open in at most one process: redb locks the file, and a second
//!   open fails with [`Error::Busy`]. Several coordinator processes on one host can hand a
//!   shard to each other by closing it ([`RedbShard::close`] or drop) and opening it there.
//! - A commit checks the epoch, then appends the batch to the process journal
//!   ([`journal`]), which all shards of the process share: one `fdatasync` makes every
//!   batch that arrived meanwhile durable (group commit across shards). When `commit`
//!   returns `Ok`, the batch is on disk; when it returns [`Error::OutcomeUnknown`] (the
//!   journal's write failed after some of it may have reached the disk), it may be; when
//!   it returns another error, nothing of it is.
//! - A committed batch is read from memory (the shard's overlay) until a checkpoint writes
//!   it to the shard file in one durable redb transaction, about
//!   [`CHECKPOINT_INTERVAL_DEFAULT`] later, and records how far into the journal the file
//!   is. Opening a shard first replays whatever its last writer journaled after that point
//!   (that writer died, or closed the shard without its checkpoint completing).
//! - A failed checkpoint is retried after a pause; the commits it did not write stay in
//!   memory and in the journal. Once [`WAITING_BYTES_MAX`] of them wait, the shard refuses
//!   new commits until a checkpoint succeeds, so memory stays bounded. A failed write
//!   or read (a full disk, an I/O error) latches redb's file: every later read and write
//!   of it fails until it is opened again, so the checkpointer opens the file again
//!   first (after a failed read too, with nothing to write). The file then holds its last
//!   successful checkpoint, and the retry writes what followed.
//! - A shard file, once it exists, is listed in the data directory's `shard-files`
//!   ([`created`]); a listed file that is missing or holds only zeros is refused, never
//!   created again empty.
//! - Only the epoch holder writes: the epoch is bumped in the file by
//!   [`ShardStore::acquire`], and the file lock keeps every other process out while the
//!   shard is open here, so the epoch this handle holds is the file's. A handle commits
//!   only once it has acquired the shard: `acquire` is what names this process's journal in
//!   the file, and the next opener replays the journal the file names.
//! - Limits are FoundationDB's ([`StoreLimits`]): the batch is checked before anything is
//!   written, and a batch whose preparation ran past `transaction_ms_max` is refused, so
//!   that what passes here passes in a cluster.
//! - redb and the journal are blocking: file work runs on the reader thread (point
//!   reads), tokio's blocking pool (opening files, range scans), the journal's writer
//!   thread or the checkpointer thread, never on a runtime worker (except a drop, which
//!   checkpoints what is left).
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use redb::{
    AccessGuard, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError, TableDefinition,
    TransactionError, WriteTransaction,
};

use flowgrid_model::{Epoch, ShardId};
use flowgrid_store::{keys, Error, Key, KeyRange, Mutation, Result, ShardStore, Store, StoreLimits, Value, WriteBatch};
use tracing::{info, warn};

mod created;
mod journal;
mod overlay;
mod reader;

use journal::{Journal, Position};
use overlay::{CheckpointFailure, Layer, Lookup, Overlay, RangeView};
use reader::Reader;

/// The one table of shard data in a shard file.
const KV: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("kv");
/// Where the shard's newest commits are journaled: the writer id (`writer`) and the
/// journal position up to which they are in this file (`applied`).
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("journal");
const META_WRITER: &str = "writer";
const META_APPLIED: &str = "applied";

/// redb's page cache per shard file unless [`RedbStore::with_cache_bytes_per_shard`] says
/// otherwise. A process may hold hundreds of shards and the hot state lives in the
/// coordinator's memory, so the store's cache only serves reloads and listings: keep it small.
pub const CACHE_BYTES_PER_SHARD_DEFAULT: usize = 256 * 1024;
/// How long a shard's commits stay in the journal only, unless
/// [`RedbStore::with_checkpoint_interval`] says otherwise (a little longer when many shards
/// are due at once: see `checkpoints_per_tick`). Longer means fewer, larger writes to the
/// shard files and a longer replay after a crash.
pub const CHECKPOINT_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// A shard whose journal-only writes hold this many bytes of memory (their keys and
/// values, and what the overlay keeps for each write and range clear) is checkpointed at
/// once: bounds the memory they hold.
pub const CHECKPOINT_BYTES: usize = 8 << 20;
/// A shard whose commits waiting for their checkpoint hold this many bytes of memory
/// (counted as for [`CHECKPOINT_BYTES`]: a write of an empty key and value counts too)
/// refuses new ones until a checkpoint succeeds: only a checkpoint that keeps failing (or a
/// disk far slower than the commits) lets them pile up this far.
pub const WAITING_BYTES_MAX: usize = 4 * CHECKPOINT_BYTES;
/// How long a shard waits after a failed checkpoint before it tries again.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);
/// How often the checkpointer looks for shards due.
const CHECKPOINT_TICK: Duration = Duration::from_millis(50);
/// How often the checkpointer looks for the journals of dead processes to delete.
const DEAD_JOURNAL_SWEEP: Duration = Duration::from_secs(60);
/// How long [`RedbShard::close`] waits for the other holders of the shard (the checkpointer,
/// a range scan, a queued point read) to let the file go before it reports it still open:
/// a checkpoint or a scan takes well under a second unless the disk stalls.
const CLOSE_WAIT_MAX: Duration = Duration::from_secs(5);

/// Bytes written to the process journal (a counter).
pub const JOURNAL_BYTES: &str = "flowgrid_store_journal_bytes_total";
/// One journal group's write and `fdatasync`, which every commit in the group waited for.
pub const JOURNAL_SYNC_SECONDS: &str = "flowgrid_store_journal_sync_seconds";
/// One shard's checkpoint: its commits written from memory into its file.
pub const CHECKPOINT_SECONDS: &str = "flowgrid_store_checkpoint_seconds";
/// Checkpoints that failed (their commits stay in memory and in the journal, and are retried).
pub const CHECKPOINT_FAILED: &str = "flowgrid_store_checkpoint_failed_total";

/// Describes the store's metrics to the installed recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(JOURNAL_BYTES, Unit::Bytes, "Bytes written to the process journal.");
    describe_histogram!(
        JOURNAL_SYNC_SECONDS,
        Unit::Seconds,
        "One journal group's write and fdatasync, which every commit of the group waited for."
    );
    describe_histogram!(CHECKPOINT_SECONDS, Unit::Seconds, "One shard checkpoint: its commits written into its file.");
    describe_counter!(
        CHECKPOINT_FAILED,
        Unit::Count,
        "Shard checkpoints that failed; their commits stay in memory and in the journal until a retry succeeds."
    );
}

/// Opens shard files under one data directory. Cheap to clone; clones share one journal.
#[derive(Clone)]
pub struct RedbStore {
    dir: PathBuf,
    limits: StoreLimits,
    cache_bytes_per_shard: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedbStore").field("dir", &self.dir).field("limits", &self.limits).finish()
    }
}

/// What a store's shards share: the journal, the open shards, the checkpointer and the
/// reader thread.
struct Shared {
    journal: Journal,
    /// Runs the shards' point reads.
    reader: Reader,
    open: Mutex<HashMap<ShardId, Weak<ShardCore>>>,
    checkpoint_interval: Mutex<Duration>,
    /// Wakes the checkpointer early (a shard over [`CHECKPOINT_BYTES`]); set once it runs.
    checkpointer: OnceLock<mpsc::Sender<()>>,
    /// Makes reads or writes of the shard files fail, as a failing or full disk would.
    #[cfg(test)]
    faults: Arc<tests::Faults>,
}

impl RedbStore {
    /// A store over `dir`, which is created if missing. Shards are opened with
    /// [`Store::open_shard`].
    pub fn open(dir: impl AsRef<Path>, limits: StoreLimits) -> Result<RedbStore> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|error| backend(PathError::new("create the data directory", &dir, error)))?;
        let shared = Arc::new(Shared {
            journal: Journal::new(&dir),
            reader: Reader::start(),
            open: Mutex::new(HashMap::new()),
            checkpoint_interval: Mutex::new(CHECKPOINT_INTERVAL_DEFAULT),
            checkpointer: OnceLock::new(),
            #[cfg(test)]
            faults: Arc::default(),
        });
        Ok(RedbStore { dir, limits, cache_bytes_per_shard: CACHE_BYTES_PER_SHARD_DEFAULT, shared })
    }

    /// Sets redb's page cache of each shard file opened from now on (the process holds up
    /// to this times the number of its shards).
    pub fn with_cache_bytes_per_shard(mut self, cache_bytes_per_shard: usize) -> RedbStore {
        self.cache_bytes_per_shard = cache_bytes_per_shard;
        self
    }

    /// Sets how long commits may stay in the journal before they are written to their
    /// shard file ([`CHECKPOINT_INTERVAL_DEFAULT`]).
    pub fn with_checkpoint_interval(self, interval: Duration) -> RedbStore {
        *lock(&self.shared.checkpoint_interval) = interval;
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

    /// True when the data directory has held the file of `shard` (its `shard-files` lists
    /// it): such a shard is refused while its file is missing.
    pub fn shard_file_listed(&self, shard: ShardId) -> Result<bool> {
        created::listed(&self.shard_path(shard))
    }
}

impl Store for RedbStore {
    type Shard = RedbShard;

    fn broken(&self) -> Option<String> {
        self.shared.journal.failure()
    }

    async fn open_shard(&self, shard: ShardId) -> Result<RedbShard> {
        let path = self.shard_path(shard);
        let (limits, cache_bytes) = (self.limits, self.cache_bytes_per_shard);
        let shared = Arc::clone(&self.shared);
        let core = blocking(move || open_shard_file_guarded(shard, path, limits, cache_bytes, shared)).await?;
        lock(&self.shared.open).insert(shard, Arc::downgrade(&core));
        Shared::start_checkpointer(&self.shared);
        Ok(RedbShard { core: Some(core) })
    }
}

impl Shared {
    /// Opens (or creates) the file of `shard` at `path`.
    /// `listed`: the data directory's list of shard files names it (see [`created`]).
    fn open_database(&self, shard: ShardId, path: &Path, cache_bytes: usize, listed: bool) -> Result<Database> {
        if listed && matches!(path.try_exists(), Ok(false)) {
            return Err(created::lost(path, "is missing"));
        }
        let opened = match self.open_database_once(path, cache_bytes) {
            // A creation that failed part way (a full disk) leaves a file of zeros, which
            // redb refuses as not its own; it holds nothing, so it is created afresh,
            // unless it was listed, so written before.
            Err(error) if !is_busy(&error) && holds_only_zeros(path) => {
                if listed {
                    return Err(created::lost(path, "holds only zeros"));
                }
                warn!(shard = %shard, file = %path.display(), error = %error, "the shard file holds only zeros (its creation failed part way); creating it again");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|file| file.set_len(0))
                    .map_err(|error| backend(PathError::new("empty the shard file", path, error)))?;
                self.open_database_once(path, cache_bytes)
            }
            opened => opened,
        };
        opened.map_err(|error| match error {
            busy if is_busy(&busy) => Error::Busy {
                shard,
                detail: format!(
                    "{} is locked ({busy}); it is open in another process (or already in this one): \
                     close it there first, or wait until its owner gives the shard up",
                    path.display()
                ),
            },
            other => backend(PathError::new("open the shard file", path, other)),
        })
    }

    fn open_database_once(&self, path: &Path, cache_bytes: usize) -> std::result::Result<Database, DatabaseError> {
        let mut builder = Database::builder();
        builder.set_cache_size(cache_bytes);
        #[cfg(not(test))]
        return builder.create(path);
        #[cfg(test)]
        return tests::FlakyFile::open(path, &self.faults).and_then(|file| builder.create_with_backend(file));
    }

    /// Starts the checkpointer thread once. It ends when the store and its shards are gone.
    fn start_checkpointer(shared: &Arc<Shared>) {
        shared.checkpointer.get_or_init(|| {
            // Present at 0 from the start, so that an alert needs no `absent()`.
            metrics::counter!(CHECKPOINT_FAILED).increment(0);
            let (wake, woken) = mpsc::channel();
            let weak = Arc::downgrade(shared);
            std::thread::Builder::new()
                .name("flowgrid-checkpoint".into())
                .spawn(move || checkpointer(weak, woken))
                .expect("the checkpointer thread starts");
            wake
        });
    }

    fn wake_checkpointer(&self) {
        if let Some(wake) = self.checkpointer.get() {
            let _ = wake.send(());
        }
    }
}

/// Writes every shard's journal-only commits to its file once they are old or large
/// enough, and now and then deletes the journals of dead processes nobody needs.
fn checkpointer(shared: Weak<Shared>, woken: mpsc::Receiver<()>) {
    let mut last_sweep: Option<Instant> = None;
    loop {
        match woken.recv_timeout(CHECKPOINT_TICK) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(shared) = shared.upgrade() else { return };
        if last_sweep.is_none_or(|at| at.elapsed() >= DEAD_JOURNAL_SWEEP) {
            journal::collect_dead_journals(shared.journal.root(), shared.journal.writer());
            shared.journal.forget_replayed();
            last_sweep = Some(Instant::now());
        }
        let interval = *lock(&shared.checkpoint_interval);
        let cores: Vec<Arc<ShardCore>> = {
            let mut open = lock(&shared.open);
            open.retain(|_, core| core.strong_count() > 0);
            open.values().filter_map(Weak::upgrade).collect()
        };
        let mut budget = checkpoints_per_tick(cores.len(), interval);
        let mut due: Vec<(Due, Arc<ShardCore>)> =
            cores.into_iter().filter_map(|core| Some((core.checkpoint_due(interval)?, core))).collect();
        due.sort_unstable_by_key(|(due, _)| *due);
        for (due, core) in due {
            if due != Due::Full {
                if budget == 0 {
                    break;
                }
                budget -= 1;
            }
            // A failure leaves the writes in the overlay and the journal; retried next tick.
            // One that opens the file again holds the shard's commits back meanwhile.
            let reopen = core.needs_reopen();
            let _in_order = reopen.then(|| core.commit_order.blocking_lock());
            let _ = core.checkpoint(reopen);
        }
    }
}

/// Checkpoints of shards whose interval has passed that one tick writes: the rate that
/// writes every open shard once per interval, plus one. Under steady load the shards'
/// checkpoints then spread over the interval instead of following each other in a burst
/// that takes a core from the shard actors once a second (layers that must go, frozen or
/// full, always go).
fn checkpoints_per_tick(open: usize, interval: Duration) -> usize {
    let per_tick = (open as u128 * CHECKPOINT_TICK.as_nanos()).div_ceil(interval.as_nanos().max(1));
    usize::try_from(per_tick).unwrap_or(usize::MAX).saturating_add(1)
}

/// How urgent a shard's checkpoint is; the most urgent sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A frozen layer, or one over [`CHECKPOINT_BYTES`].
    Full,
    /// The interval has passed since this write, the layer's oldest.
    Since(Instant),
}

/// [`open_shard_file`], with a panic of redb's on a damaged file (some damage it meets as
/// an assertion, not an error) turned into an error naming the file, so that the shard is
/// refused like any file that cannot be opened.
fn open_shard_file_guarded(
    shard: ShardId,
    path: PathBuf,
    limits: StoreLimits,
    cache_bytes: usize,
    shared: Arc<Shared>,
) -> Result<Arc<ShardCore>> {
    let shown = path.display().to_string();
    let opened = catch_quietly(|| open_shard_file(shard, path, limits, cache_bytes, shared));
    opened.unwrap_or_else(|panic| {
        let reason = panic_reason(&*panic);
        Err(Error::Corrupt {
            key: shown,
            detail: format!(
                "the shard file is damaged (reading it failed: {reason}); the shard is not served until it is \
                 restored: restore the data directory from a backup"
            ),
        })
    })
}

/// Runs `work`, catching a panic (unprinted: the caller turns it into an error that says
/// what happened, and the same work may be tried again and again).
fn catch_quietly<T>(work: impl FnOnce() -> T) -> std::thread::Result<T> {
    quiet_caught_panics();
    CATCHING.set(true);
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    CATCHING.set(false);
    done
}

/// What a caught panic said.
fn panic_reason(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or(panic.downcast_ref::<&str>().copied())
        .unwrap_or("no reason given")
}

thread_local! {
    /// Set while this thread runs work under [`catch_quietly`].
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Leaves the panics [`catch_quietly`] catches unprinted; every other panic goes to the
/// hook installed before.
fn quiet_caught_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.get() {
                before(info);
            }
        }));
    });
}

fn open_shard_file(
    shard: ShardId,
    path: PathBuf,
    limits: StoreLimits,
    cache_bytes: usize,
    shared: Arc<Shared>,
) -> Result<Arc<ShardCore>> {
    let listed = created::listed(&path)?;
    let db = shared.open_database(shard, &path, cache_bytes, listed)?;
    // Create the tables once, so that reads never meet a missing table.
    const SET_UP: &str = "set up the tables of the shard file";
    let txn = db.begin_write().map_err(file_error(SET_UP, &path))?;
    let (epoch, writer, applied) = {
        let kv = txn.open_table(KV).map_err(file_error(SET_UP, &path))?;
        let meta = txn.open_table(META).map_err(file_error(SET_UP, &path))?;
        let writer = meta
            .get(META_WRITER)
            .map_err(file_error(SET_UP, &path))?
            .map(|guard| String::from_utf8_lossy(guard.value()).into_owned());
        let applied = meta
            .get(META_APPLIED)
            .map_err(file_error(SET_UP, &path))?
            .and_then(|guard| Position::decode(guard.value()));
        (read_epoch(&kv, &path)?, writer, applied.unwrap_or_default())
    };
    txn.commit().map_err(file_error(SET_UP, &path))?;
    if !listed {
        created::add(&path)?;
    }
    let own = writer.as_deref() == Some(shared.journal.writer());
    if let Some(writer) = writer {
        replay(&db, &path, shard, epoch, &shared.journal, &writer, applied)?;
    }
    if own {
        // Open here again: its frames in this process's journal are this handle's to
        // checkpoint, not left for another owner.
        shared.journal.reopened(shard);
    } else {
        // Acquired elsewhere since this process held it (if it ever did): that process
        // replayed this process's frames of the shard, which nothing needs any more.
        shared.journal.replayed_elsewhere(shard);
    }
    Ok(Arc::new(ShardCore {
        shard,
        path,
        db: RwLock::new(Some(db)),
        cache_bytes,
        latched: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        limits,
        epoch: Mutex::new(epoch),
        overlay: Mutex::new(Overlay::default()),
        commit_order: tokio::sync::Mutex::new(()),
        checkpointing: Mutex::new(()),
        wrote: AtomicBool::new(false),
        acquired: AtomicBool::new(false),
        journaled_through: Mutex::new(None),
        shared,
    }))
}

/// Brings the file (`db`, at `path`) up to date with the shard's commits that only reached
/// the journal of `writer` (the last process that owned it, which died or closed it):
/// every data frame of the shard after `applied`, in one durable transaction.
fn replay(
    db: &Database,
    path: &Path,
    shard: ShardId,
    epoch: Epoch,
    journal: &Journal,
    writer: &str,
    applied: Position,
) -> Result<()> {
    if writer != journal.writer() {
        if let Some(lost) = journal::lost_journal(journal.root(), writer, shard) {
            return Err(lost);
        }
    }
    let dir = journal.root().join(writer);
    let mut mutations = Vec::new();
    let mut through = None;
    journal::read_frames(&dir, applied, |frame| {
        if frame.shard != shard || frame.clean {
            return Ok(());
        }
        if frame.epoch != epoch {
            return Err(Error::Corrupt {
                key: format!("journal {}", dir.display()),
                detail: format!(
                    "shard {shard} has a commit under epoch {} after its last checkpoint, but its file {} holds \
                     epoch {epoch}: the shard file and this journal do not belong together (a file restored without \
                     its journal?); restore the whole data directory from one backup",
                    frame.epoch,
                    path.display()
                ),
            });
        }
        mutations.extend(frame.mutations(&dir)?);
        through = Some(frame.end);
        Ok(())
    })?;
    if let Some(through) = through {
        let mut layer = Layer::default();
        layer.apply(mutations, through);
        write_layer(db, path, &layer)?;
    }
    if writer == journal.writer() {
        // The shard's frames of this process are in its file now: a checkpoint that failed
        // before its close left them noted as needed, which would keep every later segment.
        journal.checkpointed(shard, through.unwrap_or(applied));
    } else {
        journal::note_replayed(journal.root(), writer, shard, epoch)?;
    }
    Ok(())
}

/// Writes a layer to the file (`db`, at `path`) in one durable transaction, with the
/// journal position it covers. A failure names the file.
fn write_layer(db: &Database, path: &Path, layer: &Layer) -> Result<()> {
    let write = || -> std::result::Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(KV)?;
            for range in layer.cleared() {
                table.retain_in(range.begin.as_slice()..range.end.as_slice(), |_, _| false)?;
            }
            for (key, value) in layer.latest_by_key() {
                match value {
                    Some(value) => table.insert(key.as_slice(), value.as_slice())?,
                    None => table.remove(key.as_slice())?,
                };
            }
            if let Some(through) = layer.through {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_APPLIED, through.encode().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    };
    write().map_err(file_error("write commits into the shard file", path))
}

/// What maps a redb failure on the shard file at `path` to an error that names the file
/// and what failed on it (`action`, as in "could not {action} {path}").
fn file_error<'a, E: Into<redb::Error>>(action: &'static str, path: &'a Path) -> impl Fn(E) -> Error + 'a {
    move |error| backend(PathError::new(action, path, error.into()))
}

/// True when redb refuses every access to the file since a read or write of it failed.
/// Asked without waiting: `begin_write` would wait for a write transaction in progress (a
/// checkpoint), on the reader thread that serves every shard's point reads; redb checks for
/// the latch before it looks for another writer.
fn is_latched(db: &Database) -> bool {
    matches!(db.try_begin_write(), Err(TransactionError::Storage(StorageError::PreviousIo)))
}

/// The file is locked by another handle.
fn is_busy(error: &DatabaseError) -> bool {
    matches!(error, DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch)
}

/// True when the file at `path` is no larger than a new shard file and holds only zeros:
/// nothing was ever written to it. A larger file is never taken for one.
fn holds_only_zeros(path: &Path) -> bool {
    use std::io::Read;
    /// A creation sizes the file to redb's first region (1 MiB here); 16 times that
    /// leaves room for other page and region sizes, and bounds what is read to tell.
    const NEW_FILE_BYTES_MAX: u64 = 16 << 20;
    let Ok(mut file) = std::fs::File::open(path) else { return false };
    if file.metadata().map_or(true, |metadata| metadata.len() > NEW_FILE_BYTES_MAX) {
        return false;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return true,
            Ok(read) if chunk[..read].iter().all(|&byte| byte == 0) => {}
            Ok(_) | Err(_) => return false,
        }
    }
}

fn begin_durable(db: &Database) -> Result<WriteTransaction> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(Durability::Immediate).map_err(backend)?;
    Ok(txn)
}

/// One open shard file. Holding it holds the file lock: drop it or call
/// [`RedbShard::close`] to let another process open the shard.
///
/// A commit is durable once its batch is in the process journal; the batch is kept in
/// memory (and read from there) until a checkpoint writes it to the file. Closing or
/// dropping the shard checkpoints it first.
#[derive(Debug)]
pub struct RedbShard {
    /// Always `Some` until `close` takes it.
    core: Option<Arc<ShardCore>>,
}

struct ShardCore {
    shard: ShardId,
    path: PathBuf,
    /// The open file; `None` while opening it again after a failed access fails (see
    /// [`ShardCore::reopen_if_latched`]).
    db: RwLock<Option<Database>>,
    cache_bytes: usize,
    /// An access failed and left the file latched by redb, or a checkpoint panicked: the
    /// checkpointer opens the file again, even with nothing to write.
    latched: AtomicBool,
    /// The file was acquired by another process while it was closed here to be opened
    /// again: this handle commits, checkpoints and reads nothing more.
    lost: AtomicBool,
    limits: StoreLimits,
    /// The epoch in the file: only this process changes it while it holds the file.
    epoch: Mutex<Epoch>,
    overlay: Mutex<Overlay>,
    /// Commits enter the overlay in journal order.
    commit_order: tokio::sync::Mutex<()>,
    /// One checkpoint at a time.
    checkpointing: Mutex<()>,
    /// True once this process journaled a commit of the shard: closing then writes a
    /// `clean` frame.
    wrote: AtomicBool,
    /// True once this handle acquired the shard: only then does it commit (see
    /// [`ShardCore::check_acquired`]).
    acquired: AtomicBool,
    /// The end of the last frame this handle journaled.
    journaled_through: Mutex<Option<Position>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ShardCore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ShardCore").field("shard", &self.shard).field("path", &self.path).finish()
    }
}

impl ShardCore {
    fn epoch(&self) -> Epoch {
        *lock(&self.epoch)
    }

    fn checkpoint_due(&self, interval: Duration) -> Option<Due> {
        let overlay = lock(&self.overlay);
        if overlay.failure.as_ref().is_some_and(|failure| failure.retry_at > Instant::now()) {
            return None;
        }
        if overlay.frozen.is_some() || overlay.active.bytes >= CHECKPOINT_BYTES || self.latched.load(Ordering::Relaxed)
        {
            return Some(Due::Full);
        }
        let since = overlay.active.since.filter(|since| since.elapsed() >= interval)?;
        (!overlay.active.is_empty()).then_some(Due::Since(since))
    }

    /// Writes the overlay, as it is now, to the file; blocking. Commits that arrive
    /// meanwhile wait for the next checkpoint. A failure is logged (the first of a streak),
    /// counted, and retried after [`CHECKPOINT_RETRY`].
    /// `commits_held`: no commit of the shard can run meanwhile (its `commit_order` is held,
    /// or the handle is gone), which opening the file again needs.
    fn checkpoint(&self, commits_held: bool) -> Result<()> {
        let started = Instant::now();
        // A panic of redb's (some damage it meets as an assertion) fails this checkpoint
        // like an error, rather than ending the thread that checkpoints every shard. The
        // file is opened again before the next try.
        let written = catch_quietly(|| self.write_overlay(commits_held)).unwrap_or_else(|panic| {
            self.latched.store(true, Ordering::Relaxed);
            Err(backend(std::io::Error::other(format!(
                "writing {} panicked: {}",
                self.path.display(),
                panic_reason(&*panic)
            ))))
        });
        match written {
            Ok(wrote) => {
                if wrote {
                    metrics::histogram!(CHECKPOINT_SECONDS).record(started.elapsed().as_secs_f64());
                }
                if let Some(failure) = lock(&self.overlay).failure.take() {
                    info!(shard = %self.shard, failures = failure.failures, "checkpoints of the shard succeed again");
                }
                Ok(())
            }
            Err(error) => {
                metrics::counter!(CHECKPOINT_FAILED).increment(1);
                let mut overlay = lock(&self.overlay);
                let failures = overlay.failure.as_ref().map_or(0, |failure| failure.failures) + 1;
                if failures == 1 {
                    warn!(
                        shard = %self.shard,
                        file = %self.path.display(),
                        error = %error,
                        "a checkpoint into the shard file failed; its commits stay in memory and in the journal and it is \
                         retried every {CHECKPOINT_RETRY:?}; the shard refuses new commits once {} MiB wait",
                        WAITING_BYTES_MAX >> 20,
                    );
                }
                let retry_at = Instant::now() + CHECKPOINT_RETRY;
                overlay.failure = Some(CheckpointFailure { message: error.to_string(), failures, retry_at });
                Err(error)
            }
        }
    }

    /// Whether the file is to be opened again (see [`Self::reopen_if_latched`]): a failed
    /// access latched it (or a checkpoint panicked), or opening it again failed.
    fn needs_reopen(&self) -> bool {
        // The flag alone after a panic: redb's state is unknown then, so it is not asked.
        self.latched.load(Ordering::Relaxed) || read_lock(&self.db).as_ref().is_none_or(is_latched)
    }

    /// The checkpoint's work: true when it wrote something.
    fn write_overlay(&self, commits_held: bool) -> Result<bool> {
        let _one_at_a_time = lock(&self.checkpointing);
        self.check_not_lost()?;
        if self.needs_reopen() {
            self.reopen_if_latched(commits_held)?;
        }
        let mut wrote = false;
        // A failed checkpoint's layer goes first, then the active one: two rounds at most.
        for _ in 0..2 {
            let (layer, retried) = {
                let mut overlay = lock(&self.overlay);
                match &overlay.frozen {
                    Some(frozen) => (Arc::clone(frozen), true),
                    None if overlay.active.is_empty() => return Ok(wrote),
                    None => {
                        let successor = overlay.active.successor();
                        let layer = Arc::new(std::mem::replace(&mut overlay.active, successor));
                        overlay.frozen = Some(Arc::clone(&layer));
                        (layer, false)
                    }
                }
            };
            self.with_db(|db| write_layer(db, &self.path, &layer))?;
            wrote = true;
            lock(&self.overlay).frozen = None;
            if let Some(through) = layer.through {
                self.shared.journal.checkpointed(self.shard, through);
            }
            if !retried {
                break;
            }
        }
        Ok(wrote)
    }

    /// What a scan of `range` merges, as of one moment: the overlay's part, and a read
    /// transaction of the file begun while the overlay could not change. Otherwise a
    /// checkpoint finishing in between would put a commit in the file that the overlay's
    /// copy does not have, and the scan could return a state that never was (a record that
    /// commit cleared next to one it set).
    fn scan_snapshot(&self, range: &KeyRange) -> Result<(RangeView, redb::ReadTransaction)> {
        self.check_not_lost()?;
        let overlay = lock(&self.overlay);
        let read = self.with_db(|db| db.begin_read().map_err(backend))?;
        Ok((overlay.view(range), read))
    }

    /// Up to `limit` pairs of `range`: the file as `read` sees it, with `view` over it.
    fn scan_merge(
        &self,
        view: RangeView,
        read: &redb::ReadTransaction,
        range: &KeyRange,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Key, Value)>> {
        // Through `with_db`, so that a failure that latched the file is noted.
        self.with_db(|_| {
            let table = read.open_table(KV).map_err(backend)?;
            let entries = table.range(range.begin.as_slice()..range.end.as_slice()).map_err(backend)?;
            let pairs = entries.map(|entry| {
                let (key, value): Entry<'_> = entry.map_err(backend)?;
                Ok((key.value().to_vec(), value.value().to_vec()))
            });
            if reverse {
                view.merge(pairs.rev(), limit, true)
            } else {
                view.merge(pairs, limit, false)
            }
        })
    }

    /// Runs `work` on the open file. A failure that latched the file is noted, so that the
    /// checkpointer opens it again.
    fn with_db<T>(&self, work: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        self.check_not_lost()?;
        match &*read_lock(&self.db) {
            Some(db) => {
                let done = work(db);
                if done.is_err() && is_latched(db) {
                    self.latched.store(true, Ordering::Relaxed);
                }
                done
            }
            None => Err(backend(std::io::Error::other(format!(
                "shard {}: {} is closed here to be opened again after a failed access (it is being opened, or \
                 opening it failed and the next checkpoint retries); try again shortly (the coordinator's log has \
                 the checkpoint errors; free or fix the data directory's disk)",
                self.shard,
                self.path.display()
            )))),
        }
    }

    /// Opens the file again if a failed read or write latched it in redb (which then fails
    /// every read and write of it until it is reopened). Opening rolls the file back to its last
    /// successful checkpoint; the commits after it are still in memory and in the journal.
    ///
    /// Closing the file lets go of its lock: another process may open and acquire the
    /// shard meanwhile, and replay this process's journal as it is then. So no commit of
    /// the shard runs while it is closed (`commits_held`, else the reopen waits for a call
    /// that holds them), a commit is refused while the file is not open here, and a file
    /// whose epoch moved meanwhile is lost to this handle.
    ///
    /// The file is opened without the lock on its handle: opening may run redb's repair of
    /// the file, seconds on a large one, and reads of the shard meanwhile fail at once (the
    /// file is not open) instead of holding up the reader thread, which serves every shard,
    /// or a scan that holds the shard's overlay. Only this method puts a handle in, under
    /// `checkpointing`, so no other is put in meanwhile.
    fn reopen_if_latched(&self, commits_held: bool) -> Result<()> {
        if !commits_held {
            return Err(backend(std::io::Error::other(format!(
                "shard {}: {} is to be opened again after a failed access; the next checkpoint does it",
                self.shard,
                self.path.display()
            ))));
        }
        // The old handle goes first: it holds the file's lock. Taken out before it is
        // dropped, so that a panic while dropping it leaves no handle behind.
        let latched = write_lock(&self.db).take();
        drop(latched);
        // Open before, so listed: a file wiped meanwhile is refused, not created again.
        let opened = self.shared.open_database(self.shard, &self.path, self.cache_bytes, true)?;
        let epoch = opened
            .begin_read()
            .map_err(file_error("read the epoch from the shard file", &self.path))?
            .open_table(KV)
            .map_err(file_error("read the epoch from the shard file", &self.path))
            .and_then(|kv| read_epoch(&kv, &self.path))?;
        if epoch != self.epoch() {
            self.lost.store(true, Ordering::Relaxed);
            warn!(
                shard = %self.shard,
                file = %self.path.display(),
                epoch = epoch.0,
                held = self.epoch().0,
                "another process acquired the shard while its file was closed here to be opened again; this process \
                 gives the shard up"
            );
            return self.check_not_lost();
        }
        let mut db = write_lock(&self.db);
        assert!(db.is_none(), "only the checkpoint that opens the file again puts a handle in");
        *db = Some(opened);
        drop(db);
        self.latched.store(false, Ordering::Relaxed);
        info!(shard = %self.shard, file = %self.path.display(), "opened the shard file again after a failed read or write");
        Ok(())
    }

    /// Refuses whatever this handle is asked once another process took its file.
    fn check_not_lost(&self) -> Result<()> {
        if !self.lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(Error::Busy {
            shard: self.shard,
            detail: format!(
                "{} was acquired by another process while it was closed here to be opened again after a failed \
                 access; open the shard again to serve it here",
                self.path.display()
            ),
        })
    }

    /// Refuses a commit on a handle that has not acquired the shard. The file names the
    /// journal of the process that acquired it last (`acquire` writes it), and the next
    /// opener replays that journal: a commit journaled here before this process acquired the
    /// shard would be lost in a crash, though answered as durable.
    fn check_acquired(&self) -> Result<()> {
        if self.acquired.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(Error::NotAcquired {
            shard: self.shard,
            detail: format!(
                "{} was opened but not acquired by this handle: acquire the shard before committing to it (commit \
                 with the epoch acquire returns)",
                self.path.display()
            ),
        })
    }

    /// Refuses a commit while the file is not open here: its lock is let go then, and
    /// another process that opened the shard would not replay the commit.
    fn check_open(&self) -> Result<()> {
        self.check_not_lost()?;
        if read_lock(&self.db).is_some() {
            return Ok(());
        }
        Err(backend(std::io::Error::other(format!(
            "shard {}: {} could not be opened again after a failed access, so this process no longer holds it; the \
             next checkpoint retries (free or fix the data directory's disk)",
            self.shard,
            self.path.display()
        ))))
    }

    /// Refuses a commit while too many commits wait for their checkpoint: they are held in
    /// memory, so a checkpoint that keeps failing must not let them grow without bound.
    fn check_waiting(&self) -> Result<()> {
        let overlay = lock(&self.overlay);
        let waiting = overlay.bytes();
        if waiting < WAITING_BYTES_MAX {
            return Ok(());
        }
        let why = match &overlay.failure {
            Some(failure) => {
                format!("its last {} checkpoints failed, the last one with: {}", failure.failures, failure.message)
            }
            None => "its checkpoints do not keep up with its commits".to_owned(),
        };
        Err(backend(std::io::Error::other(format!(
            "shard {}: {} MiB of commits wait to be written to {}, the most a shard holds in memory ({} MiB), \
             because {why}; new commits are refused until a checkpoint succeeds (the coordinator's log has the \
             checkpoint errors; free or fix the data directory's disk)",
            self.shard,
            waiting >> 20,
            self.path.display(),
            WAITING_BYTES_MAX >> 20,
        ))))
    }

    /// Checkpoints and notes in the journal that nothing of the shard is needed there.
    fn finish(&self) -> Result<()> {
        // The handle is gone: no commit can run.
        if let Err(error) = self.checkpoint(true) {
            // Its frames stay in the journal until its next owner replayed them. A handle
            // whose file another process took has nothing left here: that process replayed
            // its frames when it opened the file. Its frames are forgotten, or they would keep
            // every later segment until the process stops, unless this shard is open here
            // again and journaled since (those frames are the new handle's).
            if self.lost.load(Ordering::Relaxed) {
                self.shared.journal.forget_taken(self.shard, *lock(&self.journaled_through));
            } else {
                self.shared.journal.released(self.shard, self.epoch());
            }
            return Err(error);
        }
        if self.wrote.swap(false, Ordering::Relaxed) {
            self.shared.journal.append_clean_blocking(self.shard, self.epoch())?;
        }
        self.shared.journal.forget(self.shard);
        Ok(())
    }
}

impl Drop for ShardCore {
    fn drop(&mut self) {
        // A failure here leaves the commits in the journal, and the next owner replays them.
        let _ = self.finish();
    }
}

impl RedbShard {
    fn core(&self) -> &Arc<ShardCore> {
        self.core.as_ref().expect("a shard is used only until it is closed")
    }

    /// The shard this file holds.
    pub fn shard(&self) -> ShardId {
        self.core().shard
    }

    /// The shard's file.
    pub fn path(&self) -> &Path {
        &self.core().path
    }

    /// Writes every commit to the file, closes it and releases its lock, reporting any
    /// error that dropping would ignore. Blocks while it writes; call it off the runtime's
    /// worker threads when that matters.
    ///
    /// `Ok` means the file is closed: another process may open the shard now. The
    /// checkpointer, a range scan or a queued point read may hold the shard for a moment,
    /// and the file closes when the last holder lets go; one that holds it past
    /// [`CLOSE_WAIT_MAX`] makes the close fail, as the file is still locked then (it
    /// closes later, when that holder is done).
    pub fn close(mut self) -> Result<()> {
        let mut core = self.core.take().expect("closed once");
        core.finish()?;
        let started = Instant::now();
        loop {
            match Arc::try_unwrap(core) {
                Ok(_closed) => return Ok(()),
                Err(still_shared) => core = still_shared,
            }
            if started.elapsed() >= CLOSE_WAIT_MAX {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let holders = Arc::strong_count(&core) - 1;
        Err(backend(std::io::Error::other(format!(
            "shard {}: {} is still open in this process {CLOSE_WAIT_MAX:?} after its close began: {holders} other \
             holder(s) of the shard (the checkpointer, a range scan or a queued point read; a stalled disk, most \
             likely) have not let go; its commits are in the file, and it closes when they let go: until then no \
             other process can open the shard",
            core.shard,
            core.path.display()
        ))))
    }

    fn run_blocking<T, F>(&self, work: F) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&ShardCore) -> Result<T> + Send + 'static,
    {
        let core = Arc::clone(self.core());
        blocking(move || work(&core))
    }
}

impl ShardStore for RedbShard {
    async fn acquire(&self) -> Result<Epoch> {
        // No commit is between its epoch check and the overlay meanwhile: one that was
        // would be journaled under the old epoch after the position written here, and
        // answered after this returned the new one.
        let _in_order = self.core().commit_order.lock().await;
        self.run_blocking(|core| {
            // Whatever this process journaled under the old epoch goes to the file first:
            // from here on a replay starts after it.
            core.checkpoint(true)?;
            let next = core.with_db(|db| {
                let txn = begin_durable(db)?;
                let next = {
                    let mut table = txn.open_table(KV).map_err(backend)?;
                    let current = read_epoch(&table, &core.path)?;
                    let next = Epoch(current.0.checked_add(1).expect("an epoch of 2^64 acquisitions is unreachable"));
                    table.insert(keys::epoch().as_slice(), keys::encode_epoch(next).as_slice()).map_err(backend)?;
                    let journal = &core.shared.journal;
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    meta.insert(META_WRITER, journal.writer().as_bytes()).map_err(backend)?;
                    meta.insert(META_APPLIED, journal.end().encode().as_slice()).map_err(backend)?;
                    next
                };
                txn.commit().map_err(backend)?;
                Ok(next)
            })?;
            *lock(&core.epoch) = next;
            core.acquired.store(true, Ordering::Relaxed);
            Ok(next)
        })
        .await
    }

    async fn current_epoch(&self) -> Result<Epoch> {
        Ok(self.core().epoch())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Value>> {
        self.core().check_not_lost()?;
        match lock(&self.core().overlay).get(key) {
            Lookup::Value(value) => return Ok(Some(value)),
            Lookup::Absent => return Ok(None),
            Lookup::Unknown => {}
        }
        let key = key.to_vec();
        let core = Arc::clone(self.core());
        self.core()
            .shared
            .reader
            .run(move || {
                core.with_db(|db| {
                    let table = db.begin_read().map_err(backend)?.open_table(KV).map_err(backend)?;
                    let value = table.get(key.as_slice()).map_err(backend)?;
                    Ok(value.map(|guard| guard.value().to_vec()))
                })
            })
            .await
    }

    async fn scan(&self, range: KeyRange, limit: usize, reverse: bool) -> Result<Vec<(Key, Value)>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let (view, read) = self.core().scan_snapshot(&range)?;
        self.run_blocking(move |core| core.scan_merge(view, &read, &range, limit, reverse)).await
    }

    async fn commit(&self, epoch: Epoch, batch: WriteBatch) -> Result<()> {
        self.core().check_acquired()?;
        batch.check(&self.core().limits)?;
        let core = self.core();
        let started = Instant::now();
        let current = core.epoch();
        if current != epoch {
            return Err(Error::StaleEpoch { shard: core.shard, epoch, current });
        }
        let mut mutations = batch.into_mutations();
        // A range that holds no key (empty or inverted) clears nothing, as in FoundationDB.
        // Journaled, it would leave a frame that no checkpoint covers (the overlay takes
        // nothing from it, so there is nothing to write), and the journal would keep that
        // segment and every later one.
        mutations.retain(|mutation| !matches!(mutation, Mutation::ClearRange(range) if range.is_empty()));
        if mutations.is_empty() {
            return Ok(());
        }
        let frame = journal::encode_data(core.shard, epoch, &mutations);
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if elapsed_ms > core.limits.transaction_ms_max {
            return Err(Error::TooSlow { elapsed_ms, limit_ms: core.limits.transaction_ms_max });
        }
        core.check_waiting()?;
        let _in_order = core.commit_order.lock().await;
        // Again under the lock: an `acquire` may have taken the shard meanwhile.
        let current = core.epoch();
        if current != epoch {
            return Err(Error::StaleEpoch { shard: core.shard, epoch, current });
        }
        core.check_open()?;
        let through = core.shared.journal.append(core.shard, frame).await?;
        core.wrote.store(true, Ordering::Relaxed);
        *lock(&core.journaled_through) = Some(through);
        let over = {
            let mut overlay = lock(&core.overlay);
            overlay.active.apply(mutations, through);
            overlay.bytes() >= CHECKPOINT_BYTES
        };
        if over {
            core.shared.wake_checkpointer();
        }
        Ok(())
    }
}

type Entry<'a> = (AccessGuard<'a, &'static [u8]>, AccessGuard<'a, &'static [u8]>);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The epoch in the shard file at `path`, which an error names.
fn read_epoch(table: &impl ReadableTable<&'static [u8], &'static [u8]>, path: &Path) -> Result<Epoch> {
    let stored = table.get(keys::epoch().as_slice()).map_err(file_error("read the epoch from the shard file", path))?;
    keys::decode_epoch(stored.as_ref().map(|guard| guard.value())).map_err(|error| match error {
        Error::Corrupt { key, detail } => Error::Corrupt {
            key: format!("{key} in {}", path.display()),
            detail: format!(
                "{detail}; the shard is not served until its file is restored: restore the data directory from a \
                 backup"
            ),
        },
        other => other,
    })
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

pub(crate) fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend(Box::new(error))
}

/// A failure on a named file, with its cause chained.
#[derive(Debug, thiserror::Error)]
#[error("could not {action} {}: {source}", path.display())]
pub(crate) struct PathError<E: std::error::Error + 'static> {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: E,
}

impl<E: std::error::Error + 'static> PathError<E> {
    pub(crate) fn new(action: &'static str, path: &Path, source: E) -> Self {
        PathError { action, path: path.to_path_buf(), source }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::ops::Bound;

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    use super::*;

    /// Failures the test turns on for every shard file of a store.
    #[derive(Debug, Default)]
    pub(super) struct Faults {
        /// Writes, length changes and syncs fail as on a full disk.
        writes: AtomicBool,
        /// Reads fail as on a failing disk.
        reads: AtomicBool,
        /// The next write panics, as redb does on some damage it meets as an assertion.
        panics: AtomicBool,
        /// Holds opens of shard files, as redb's repair of a large file would.
        pub(super) opens: OpenGate,
    }

    /// Opens of shard files wait while the gate is held.
    #[derive(Debug, Default)]
    pub(super) struct OpenGate {
        /// Whether it is held, and how many opens wait.
        state: Mutex<(bool, usize)>,
        changed: std::sync::Condvar,
    }

    impl OpenGate {
        pub(super) fn hold(&self) {
            lock(&self.state).0 = true;
        }

        pub(super) fn let_go(&self) {
            lock(&self.state).0 = false;
            self.changed.notify_all();
        }

        /// Waits until an open waits at the gate.
        pub(super) fn wait_for_an_open(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut state = lock(&self.state);
            while state.1 == 0 {
                let left = deadline.checked_duration_since(Instant::now()).expect("no open came to the gate");
                state = self.changed.wait_timeout(state, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
            }
        }

        fn pass(&self) {
            let mut state = lock(&self.state);
            state.1 += 1;
            self.changed.notify_all();
            while state.0 {
                state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.1 -= 1;
        }
    }

    /// A shard file that fails as its store's [`Faults`] say.
    #[derive(Debug)]
    pub(super) struct FlakyFile {
        file: FileBackend,
        faults: Arc<Faults>,
    }

    impl FlakyFile {
        pub(super) fn open(path: &Path, faults: &Arc<Faults>) -> std::result::Result<FlakyFile, DatabaseError> {
            faults.opens.pass();
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            Ok(FlakyFile { file: FileBackend::new(file)?, faults: Arc::clone(faults) })
        }

        fn check_write(&self) -> std::io::Result<()> {
            if self.faults.panics.swap(false, Ordering::Relaxed) {
                panic!("a panic the test made");
            }
            if self.faults.writes.load(Ordering::Relaxed) {
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            Ok(())
        }
    }

    impl StorageBackend for FlakyFile {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            if self.faults.reads.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("an unreadable sector the test made"));
            }
            self.file.read(offset, out)
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check_write()?;
            self.file.set_len(len)
        }

        fn sync_data(&self) -> std::io::Result<()> {
            self.check_write()?;
            self.file.sync_data()
        }

        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check_write()?;
            self.file.write(offset, data)
        }

        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }

        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<bool, BackendError> {
            self.file.try_lock_range(start, end)
        }

        fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<bool, BackendError> {
            self.file.try_lock_shared_range(start, end)
        }

        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<(), BackendError> {
            self.file.lock_range(start, end)
        }

        fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<(), BackendError> {
            self.file.lock_shared_range(start, end)
        }

        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<(), BackendError> {
            self.file.unlock_range(start, end)
        }

        fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<bool, BackendError> {
            self.file.query_lock_range(start, end)
        }
    }

    #[test]
    fn a_tick_checkpoints_each_shard_once_per_interval_plus_one() {
        let second = Duration::from_secs(1);
        // 64 shards, 50 ms ticks, 1 s: 3.2 a tick, rounded up, plus one.
        assert_eq!(checkpoints_per_tick(64, second), 5);
        assert_eq!(checkpoints_per_tick(1, second), 2);
        assert_eq!(checkpoints_per_tick(0, second), 1);
        // An interval shorter than the tick: every shard each tick.
        assert_eq!(checkpoints_per_tick(64, Duration::from_millis(10)), 321);
        assert!(checkpoints_per_tick(3, Duration::ZERO) > 3);
    }

    /// Commits of `count` values of 64 KiB each under keys `prefix00000`, ... in batches
    /// of 100; stops at the first refusal and returns it with the number committed.
    async fn commit_values(shard: &RedbShard, epoch: Epoch, prefix: &str, count: usize) -> (usize, Option<Error>) {
        let value = vec![7u8; 64 * 1024];
        let mut committed = 0;
        while committed < count {
            let mut batch = WriteBatch::new();
            for index in committed..(committed + 100).min(count) {
                batch.set(format!("{prefix}{index:05}").into_bytes(), value.clone());
            }
            let size = batch.len();
            if let Err(error) = shard.commit(epoch, batch).await {
                return (committed, Some(error));
            }
            committed += size;
        }
        (committed, None)
    }

    /// Shard `shard` of `store`, acquired, with one value under `prefix` committed and
    /// checkpointed into its file.
    async fn shard_with_a_checkpointed_value(store: &RedbStore, shard: ShardId, prefix: &str) -> (RedbShard, Epoch) {
        let shard = store.open_shard(shard).await.unwrap();
        let epoch = shard.acquire().await.unwrap();
        let (_, refusal) = commit_values(&shard, epoch, prefix, 1).await;
        assert!(refusal.is_none(), "{refusal:?}");
        shard.core().checkpoint(true).unwrap();
        (shard, epoch)
    }

    #[tokio::test]
    async fn a_commit_that_waits_while_the_shard_is_acquired_again_is_refused_as_stale() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(5), "before").await;
        // Another commit is between its epoch check and the overlay: both wait for it.
        let in_flight = shard.core().commit_order.lock().await;
        let mut acquire = std::pin::pin!(shard.acquire());
        let mut batch = WriteBatch::new();
        batch.set(b"late".to_vec(), b"v".to_vec());
        let mut commit = std::pin::pin!(shard.commit(epoch, batch));
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(acquire.as_mut().poll(&mut context).is_pending());
        assert!(commit.as_mut().poll(&mut context).is_pending());
        // The acquire does not write its journal position past a frame not yet in the
        // overlay: it waits for the commit in flight.
        let waited = tokio::time::timeout(Duration::from_millis(300), acquire.as_mut()).await;
        assert!(waited.is_err(), "the shard was acquired again under a commit in flight");
        assert_eq!(shard.core().epoch(), epoch);
        drop(in_flight);
        let next = acquire.await.unwrap();
        assert_eq!(next, Epoch(epoch.0 + 1));
        let refused = commit.await.unwrap_err();
        assert!(
            matches!(refused, Error::StaleEpoch { epoch: old, current, .. } if old == epoch && current == next),
            "{refused}"
        );
        assert_eq!(shard.get(b"late").await.unwrap(), None);
    }

    /// A scan's overlay and file are of one moment: a commit checkpointed after the scan
    /// began is in neither. The commit moves a token from one key to another; merging the
    /// overlay of before it with the file of after it gave both.
    #[tokio::test]
    async fn a_scan_sees_the_overlay_and_the_file_of_one_moment() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let shard = store.open_shard(ShardId(6)).await.unwrap();
        let epoch = shard.acquire().await.unwrap();
        let mut first = WriteBatch::new();
        first.set(b"slot/0".to_vec(), b"token".to_vec());
        shard.commit(epoch, first).await.unwrap();
        let range = KeyRange { begin: b"slot/".to_vec(), end: b"slot0".to_vec() };
        let (view, read) = shard.core().scan_snapshot(&range).unwrap();
        let mut moved = WriteBatch::new();
        moved.clear(b"slot/0".to_vec());
        moved.set(b"slot/1".to_vec(), b"token".to_vec());
        shard.commit(epoch, moved).await.unwrap();
        shard.core().checkpoint(true).unwrap();
        let tokens = shard.core().scan_merge(view, &read, &range, 10, false).unwrap();
        assert_eq!(tokens, vec![(b"slot/0".to_vec(), b"token".to_vec())], "as before the move");
        let now = shard.scan(range, 10, false).await.unwrap();
        assert_eq!(now, vec![(b"slot/1".to_vec(), b"token".to_vec())], "after it");
    }

    /// Shard 4 of `store` with a value committed after its last checkpoint, closed while
    /// writes fail: its close's checkpoint fails, so the journal keeps its frames.
    async fn close_shard_4_with_frames_unchecked(store: &RedbStore) {
        let (shard, epoch) = shard_with_a_checkpointed_value(store, ShardId(4), "before").await;
        let (_, refusal) = commit_values(&shard, epoch, "k", 1).await;
        assert!(refusal.is_none(), "{refusal:?}");
        store.shared.faults.writes.store(true, Ordering::Relaxed);
        assert!(shard.close().is_err(), "its checkpoint fails");
        assert!(store.shared.journal.keeps_frames_of(ShardId(4)));
        store.shared.faults.writes.store(false, Ordering::Relaxed);
    }

    #[tokio::test]
    async fn a_shard_closed_unchecked_and_opened_again_here_keeps_no_segment() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        close_shard_4_with_frames_unchecked(&store).await;
        // Opened again here, with no commit: its frames are replayed into its file.
        let shard = store.open_shard(ShardId(4)).await.unwrap();
        assert_eq!(shard.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
        assert!(!store.shared.journal.keeps_frames_of(ShardId(4)), "the journal still keeps the shard's frames");
    }

    #[tokio::test]
    async fn a_shard_released_here_replayed_elsewhere_and_opened_here_again_keeps_no_segment() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        // No checkpointer: its sweep would forget the released shard if it ran between the
        // other process's replay and the open here, which this test is about.
        store.shared.checkpointer.set(mpsc::channel().0).unwrap();
        close_shard_4_with_frames_unchecked(&store).await;
        // Another process replays this journal's frames of the shard, acquires it and
        // gives it up.
        let elsewhere = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let taken = elsewhere.open_shard(ShardId(4)).await.unwrap();
        taken.acquire().await.unwrap();
        assert_eq!(taken.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
        taken.close().unwrap();
        // Opened and acquired here again, and idle: nothing of it is kept in the journal.
        let shard = store.open_shard(ShardId(4)).await.unwrap();
        shard.acquire().await.unwrap();
        assert!(
            !store.shared.journal.keeps_frames_of(ShardId(4)),
            "the journal keeps frames of the shard the other process replayed"
        );
        assert_eq!(shard.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
    }

    #[tokio::test]
    async fn a_commit_of_only_empty_or_inverted_range_clears_leaves_no_frame_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(9), "k").await;
        assert!(!store.shared.journal.keeps_frames_of(ShardId(9)));
        let mut batch = WriteBatch::new();
        batch.clear_range(KeyRange { begin: b"k".to_vec(), end: b"k".to_vec() });
        batch.clear_range(KeyRange { begin: b"l".to_vec(), end: b"k".to_vec() });
        shard.commit(epoch, batch).await.unwrap();
        shard.core().checkpoint(true).unwrap();
        // Kept, it would keep its segment and every later one until the shard closes.
        assert!(
            !store.shared.journal.keeps_frames_of(ShardId(9)),
            "the journal keeps a frame of the shard that no checkpoint covers"
        );
        assert_eq!(shard.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024), "nothing cleared");
    }

    #[tokio::test]
    async fn failing_checkpoints_bound_the_commits_held_in_memory_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default())
            .unwrap()
            .with_checkpoint_interval(Duration::from_millis(10));
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(3), "before").await;
        let fail_writes = &store.shared.faults.writes;
        fail_writes.store(true, Ordering::Relaxed);

        let (committed, refusal) = commit_values(&shard, epoch, "k", 2_000).await;
        let refusal = refusal.expect("commits must be refused while checkpoints fail");
        let text = refusal.to_string();
        assert!(text.contains("new commits are refused") && text.contains("no storage space"), "{text}");
        let held = lock(&shard.core().overlay).bytes();
        assert!(held < WAITING_BYTES_MAX + 7 * 1024 * 1024, "{held} bytes held");
        // Refused at the first commit past the bound, not before: one batch is 6.25 MiB.
        assert!(committed * 64 * 1024 >= WAITING_BYTES_MAX, "refused after {committed} values");
        // What was committed is still read, from memory.
        assert_eq!(shard.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));

        // Once the disk takes writes again, the backlog goes to the file and commits pass:
        // the file, which redb latched at the first failed write, is opened again.
        fail_writes.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, refusal) = commit_values(&shard, epoch, "after", 1).await;
            match refusal {
                None => break,
                Some(error) => assert!(Instant::now() < deadline, "still refused: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The failure is forgotten once the checkpoint that wrote the backlog returns.
        while lock(&shard.core().overlay).failure.is_some() {
            assert!(Instant::now() < deadline, "the failure is still recorded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The file is read again too, without closing the shard.
        assert!(matches!(lock(&shard.core().overlay).get(b"before00000"), Lookup::Unknown));
        assert_eq!(shard.get(b"before00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
        shard.close().unwrap();
        let shard = store.open_shard(ShardId(3)).await.unwrap();
        let last = format!("k{:05}", committed - 1);
        assert_eq!(shard.get(last.as_bytes()).await.unwrap().map(|value| value.len()), Some(64 * 1024));
        assert_eq!(shard.get(b"after00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
    }

    #[tokio::test]
    async fn failing_checkpoints_bound_the_memory_held_by_commits_of_empty_keys_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default())
            .unwrap()
            .with_checkpoint_interval(Duration::from_millis(10));
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(3), "before").await;
        store.shared.faults.writes.store(true, Ordering::Relaxed);

        // As many as a batch may hold with a key prefix on every key.
        const WRITES_PER_BATCH: usize = 30_000;
        // Each write holds its entry in memory, whatever its key and value: past this many
        // batches they hold more than the bound.
        let batches_to_the_bound =
            WAITING_BYTES_MAX.div_ceil(WRITES_PER_BATCH * std::mem::size_of::<(Key, Option<Value>)>());
        let mut refusal = None;
        for _ in 0..=batches_to_the_bound {
            let mut batch = WriteBatch::new();
            for _ in 0..WRITES_PER_BATCH {
                batch.set(Vec::new(), Vec::new());
            }
            if let Err(error) = shard.commit(epoch, batch).await {
                refusal = Some(error);
                break;
            }
        }
        let held = lock(&shard.core().overlay).bytes();
        let refusal = refusal.unwrap_or_else(|| {
            panic!(
                "{} writes of empty keys and values were never refused ({held} bytes counted)",
                (batches_to_the_bound + 1) * WRITES_PER_BATCH
            )
        });
        let text = refusal.to_string();
        assert!(text.contains("new commits are refused"), "{text}");
    }

    #[tokio::test]
    async fn a_failed_read_latches_the_file_and_the_checkpointer_opens_it_again_with_nothing_to_write() {
        let dir = tempfile::tempdir().unwrap();
        // No page cache: every read of the file goes to the disk.
        let store = RedbStore::open(dir.path(), StoreLimits::default())
            .unwrap()
            .with_cache_bytes_per_shard(0)
            .with_checkpoint_interval(Duration::from_millis(10));
        let (shard, _) = shard_with_a_checkpointed_value(&store, ShardId(2), "k").await;
        assert!(matches!(lock(&shard.core().overlay).get(b"k00000"), Lookup::Unknown));

        store.shared.faults.reads.store(true, Ordering::Relaxed);
        let error = shard.get(b"k00000").await.unwrap_err().to_string();
        assert!(error.contains("unreadable sector"), "{error}");
        store.shared.faults.reads.store(false, Ordering::Relaxed);
        // The shard has nothing to write; the checkpointer opens its file again all the same.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match shard.get(b"k00000").await {
                Ok(value) => {
                    assert_eq!(value.map(|value| value.len()), Some(64 * 1024));
                    break;
                }
                Err(error) => assert!(Instant::now() < deadline, "still failing: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!shard.core().latched.load(Ordering::Relaxed));
    }

    /// A store over `dir` whose checkpointer leaves commits alone for an hour: the test
    /// checkpoints itself.
    fn store_checkpointed_by_hand(dir: &Path) -> RedbStore {
        RedbStore::open(dir, StoreLimits::default()).unwrap().with_checkpoint_interval(Duration::from_secs(3600))
    }

    /// Another process over `dir` acquires the shard of `shard`, whose file is closed here to
    /// be opened again (as after a failed access), and gives it up; opened again here, the
    /// file's epoch tells the handle it lost the shard. That process replays the frames of
    /// the shard it finds in this process's journal, `unchecked` among them.
    async fn take_elsewhere_while_closed_here(dir: &Path, shard: &RedbShard, epoch: Epoch, unchecked: &[u8]) {
        assert!(read_lock(&shard.core().db).is_none(), "the file is closed here");
        let elsewhere = RedbStore::open(dir, StoreLimits::default()).unwrap();
        let taken = elsewhere.open_shard(shard.shard()).await.unwrap();
        assert!(taken.acquire().await.unwrap() > epoch);
        assert!(taken.get(unchecked).await.unwrap().is_some(), "the other process replayed this journal");
        taken.close().unwrap();
        shard.core().latched.store(true, Ordering::Relaxed);
        let lost = shard.core().checkpoint(true).unwrap_err();
        assert!(matches!(lost, Error::Busy { .. }), "{lost}");
    }

    #[tokio::test]
    async fn a_file_acquired_elsewhere_while_it_was_closed_to_be_reopened_is_lost_to_this_handle() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(6), "k").await;
        let (_, refusal) = commit_values(&shard, epoch, "unchecked", 1).await;
        assert!(refusal.is_none(), "{refusal:?}");
        assert!(store.shared.journal.keeps_frames_of(ShardId(6)));
        // The file closed to be opened again (as after a failed access), and that failed:
        // its lock is let go, so a commit is refused, not journaled where nobody replays it.
        drop(write_lock(&shard.core().db).take());
        let mut batch = WriteBatch::new();
        batch.set(b"while-closed".to_vec(), b"v".to_vec());
        let refused = shard.commit(epoch, batch).await.unwrap_err().to_string();
        assert!(refused.contains("could not be opened again"), "{refused}");

        // Another process takes the shard meanwhile, and gives it up; opened again here, the
        // file's epoch says so: the handle gives the shard up.
        take_elsewhere_while_closed_here(dir.path(), &shard, epoch, b"unchecked00000").await;
        let mut batch = WriteBatch::new();
        batch.set(b"after".to_vec(), b"v".to_vec());
        assert!(matches!(shard.commit(epoch, batch).await, Err(Error::Busy { .. })));
        assert!(matches!(shard.get(b"k00000").await, Err(Error::Busy { .. })), "nothing read from the lost file");
        assert!(read_lock(&shard.core().db).is_none(), "the file is not held here");

        // The other process replayed the shard's frames: once the handle is gone, the journal
        // keeps none of them, or it would keep every later segment until the process stops.
        drop(shard);
        assert!(!store.shared.journal.keeps_frames_of(ShardId(6)), "the journal still keeps the lost shard's frames");
    }

    #[tokio::test]
    async fn a_lost_handle_let_go_after_its_shard_was_opened_here_again_leaves_the_new_handles_frames() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        let (lost, epoch) = shard_with_a_checkpointed_value(&store, ShardId(7), "k").await;
        let (_, refusal) = commit_values(&lost, epoch, "unchecked", 1).await;
        assert!(refusal.is_none(), "{refusal:?}");
        drop(write_lock(&lost.core().db).take());
        take_elsewhere_while_closed_here(dir.path(), &lost, epoch, b"unchecked00000").await;

        // The shard is opened here again, and committed to, before the lost handle is let go.
        let shard = store.open_shard(ShardId(7)).await.unwrap();
        let epoch = shard.acquire().await.unwrap();
        let (_, refusal) = commit_values(&shard, epoch, "new", 1).await;
        assert!(refusal.is_none(), "{refusal:?}");
        drop(lost);
        assert!(
            store.shared.journal.keeps_frames_of(ShardId(7)),
            "the lost handle let go of the frames of the handle that holds the shard now"
        );
        shard.core().checkpoint(true).unwrap();
        assert!(!store.shared.journal.keeps_frames_of(ShardId(7)));
    }

    #[tokio::test]
    async fn a_close_that_another_holder_outlasts_fails_naming_the_file_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let (shard, _) = shard_with_a_checkpointed_value(&store, ShardId(8), "k").await;
        // What a long scan, a queued point read or the checkpointer holds.
        let held = Arc::clone(shard.core());
        let closed = tokio::task::spawn_blocking(move || shard.close()).await.unwrap();
        let Err(error) = closed else { panic!("a close that left the file open returned Ok") };
        let error = error.to_string();
        assert!(error.contains("shard-00008.redb is still open in this process"), "{error}");
        assert!(error.contains("other holder(s) of the shard"), "{error}");
        let elsewhere = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        assert!(matches!(elsewhere.open_shard(ShardId(8)).await, Err(Error::Busy { .. })), "the file is still locked");
        // The file closes when its last holder lets go, with every commit in it.
        drop(held);
        let taken = elsewhere.open_shard(ShardId(8)).await.unwrap();
        assert_eq!(taken.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
    }

    #[tokio::test]
    async fn telling_whether_a_file_is_latched_does_not_wait_for_a_write_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        let (shard, _) = shard_with_a_checkpointed_value(&store, ShardId(2), "k").await;
        let file = read_lock(&shard.core().db);
        let db = file.as_ref().unwrap();
        // A checkpoint's write transaction, in progress.
        let writing = db.begin_write().unwrap();
        std::thread::scope(|scope| {
            let (told, answer) = mpsc::channel();
            scope.spawn(move || told.send(is_latched(db)));
            let answered = answer.recv_timeout(Duration::from_secs(5));
            drop(writing);
            assert_eq!(answered, Ok(false), "asking whether the file is latched waited for the write in progress");
        });
    }

    #[tokio::test]
    async fn while_a_latched_file_is_opened_again_its_reads_fail_at_once_and_other_shards_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        let (shard, _) = shard_with_a_checkpointed_value(&store, ShardId(2), "k").await;
        let (other, _) = shard_with_a_checkpointed_value(&store, ShardId(3), "k").await;
        // Opening the file again takes a while (redb repairing a large file): the open waits.
        let gate = &store.shared.faults.opens;
        gate.hold();
        shard.core().latched.store(true, Ordering::Relaxed);
        let core = Arc::clone(shard.core());
        let reopening = std::thread::spawn(move || core.checkpoint(true));
        gate.wait_for_an_open();

        let quick = Duration::from_secs(2);
        let read_here = tokio::time::timeout(quick, shard.get(b"k00000")).await;
        let read_other = tokio::time::timeout(quick, other.get(b"k00000")).await;
        let (sent, scanned) = mpsc::channel();
        let core = Arc::clone(shard.core());
        let range = KeyRange { begin: b"k".to_vec(), end: b"l".to_vec() };
        std::thread::spawn(move || {
            sent.send(core.scan_snapshot(&range).map(|_| ()).map_err(|error| error.to_string()))
        });
        let scanned = scanned.recv_timeout(quick);
        gate.let_go();
        reopening.join().unwrap().unwrap();

        let Ok(Err(refused)) = read_here else {
            panic!("a read of the shard waited for its file to open: {read_here:?}")
        };
        assert!(refused.to_string().contains("to be opened again"), "{refused}");
        let Ok(Ok(Some(value))) = read_other else { panic!("a read of another shard waited: {read_other:?}") };
        assert_eq!(value.len(), 64 * 1024);
        assert!(matches!(&scanned, Ok(Err(refused)) if refused.contains("to be opened again")), "{scanned:?}");
        // Open again: read as before.
        assert!(!shard.core().latched.load(Ordering::Relaxed));
        assert_eq!(shard.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));
    }

    #[tokio::test]
    async fn a_checkpoint_that_panics_fails_like_an_error_and_a_later_one_writes_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default())
            .unwrap()
            .with_checkpoint_interval(Duration::from_millis(10));
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(4), "before").await;
        store.shared.faults.panics.store(true, Ordering::Relaxed);
        let (_, refusal) = commit_values(&shard, epoch, "k", 3).await;
        assert!(refusal.is_none(), "{refusal:?}");

        // The checkpointer's next checkpoint panics: it is a failed checkpoint, and the
        // commits are still read from memory.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(failure) = &lock(&shard.core().overlay).failure {
                assert!(failure.message.contains("panicked: a panic the test made"), "{}", failure.message);
                break;
            }
            assert!(Instant::now() < deadline, "no checkpoint failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shard.get(b"k00002").await.unwrap().map(|value| value.len()), Some(64 * 1024));
        // The same thread retries: the file is opened again and the commits written.
        let written =
            |overlay: &Overlay| overlay.failure.is_none() && overlay.active.is_empty() && overlay.frozen.is_none();
        loop {
            if written(&lock(&shard.core().overlay)) {
                break;
            }
            assert!(Instant::now() < deadline, "the commits were never checkpointed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shard.close().unwrap();
        let shard = store.open_shard(ShardId(4)).await.unwrap();
        for key in [&b"before00000"[..], b"k00000", b"k00002"] {
            assert_eq!(shard.get(key).await.unwrap().map(|value| value.len()), Some(64 * 1024));
        }
    }

    #[tokio::test]
    async fn a_shard_file_of_zeros_is_created_again_and_any_other_unreadable_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        // What a creation on a full disk leaves: the file's first region, never written.
        std::fs::write(store.shard_path(ShardId(5)), vec![0u8; 1 << 20]).unwrap();
        let shard = store.open_shard(ShardId(5)).await.unwrap();
        let epoch = shard.acquire().await.unwrap();
        let (committed, refusal) = commit_values(&shard, epoch, "k", 1).await;
        assert!(committed == 1 && refusal.is_none(), "{refusal:?}");
        shard.close().unwrap();
        let shard = store.open_shard(ShardId(5)).await.unwrap();
        assert_eq!(shard.get(b"k00000").await.unwrap().map(|value| value.len()), Some(64 * 1024));

        // One byte that is not zero: it may be someone's data, so it is not touched.
        let mut foreign = vec![0u8; 1 << 20];
        foreign[4096] = 1;
        std::fs::write(store.shard_path(ShardId(6)), &foreign).unwrap();
        let error = store.open_shard(ShardId(6)).await.unwrap_err().to_string();
        assert!(error.contains("could not open the shard file"), "{error}");
        assert_eq!(std::fs::read(store.shard_path(ShardId(6))).unwrap(), foreign);
    }

    #[tokio::test]
    async fn a_listed_shard_file_gone_missing_or_wiped_is_refused_never_created_again_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let list = dir.path().join(created::FILE_NAME);
        let (shard, _) = shard_with_a_checkpointed_value(&store, ShardId(2), "k").await;
        shard.close().unwrap();
        // A file that was there before the list (an older data directory) is listed when opened.
        std::fs::remove_file(&list).unwrap();
        store.open_shard(ShardId(2)).await.unwrap().close().unwrap();
        assert_eq!(std::fs::read_to_string(&list).unwrap(), "\nshard-00002.redb\n");

        let path = store.shard_path(ShardId(2));
        std::fs::remove_file(&path).unwrap();
        let Err(error) = store.open_shard(ShardId(2)).await else { panic!("a listed file gone missing is refused") };
        let error = error.to_string();
        assert!(error.contains("shard-00002.redb: the shard file is missing"), "{error}");
        assert!(error.contains("remove the line `shard-00002.redb` from shard-files"), "{error}");
        assert!(!path.exists(), "nothing was created");

        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let Err(error) = store.open_shard(ShardId(2)).await else { panic!("a listed file of zeros is refused") };
        assert!(error.to_string().contains("the shard file holds only zeros"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 1 << 20], "the file is left as it was");

        // What the refusal says to do to start the shard over.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&list, "").unwrap();
        let shard = store.open_shard(ShardId(2)).await.unwrap();
        assert_eq!(shard.get(b"k00000").await.unwrap(), None);
        assert!(created::listed(&path).unwrap());
    }

    #[tokio::test]
    async fn a_damaged_shard_file_is_refused_naming_it_even_where_redb_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let (shard, _) = shard_with_a_checkpointed_value(&store, ShardId(4), "k").await;
        shard.close().unwrap();
        let path = store.shard_path(ShardId(4));
        let mut bytes = std::fs::read(&path).unwrap();
        // Every page after the file's header.
        for byte in &mut bytes[4096..] {
            *byte ^= 0xFF;
        }
        std::fs::write(&path, &bytes).unwrap();
        let Err(error) = store.open_shard(ShardId(4)).await else { panic!("a damaged file is refused") };
        let error = error.to_string();
        assert!(error.contains("shard-00004.redb") && error.contains("the shard file is damaged"), "{error}");
    }

    #[tokio::test]
    async fn a_shard_file_that_fails_a_checkpoint_or_holds_a_bad_epoch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_checkpointed_by_hand(dir.path());
        let (shard, epoch) = shard_with_a_checkpointed_value(&store, ShardId(4), "k").await;
        let path = store.shard_path(ShardId(4));
        let (_, refusal) = commit_values(&shard, epoch, "unchecked", 1).await;
        assert!(refusal.is_none(), "{refusal:?}");
        store.shared.faults.writes.store(true, Ordering::Relaxed);
        let error = shard.core().checkpoint(true).unwrap_err().to_string();
        assert!(error.contains(&format!("could not write commits into the shard file {}", path.display())), "{error}");
        store.shared.faults.writes.store(false, Ordering::Relaxed);
        shard.close().unwrap();

        // An epoch that is not 8 bytes, as no version writes it.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(KV).unwrap().insert(keys::epoch().as_slice(), &b"bad"[..]).unwrap();
            txn.commit().unwrap();
        }
        let Err(error) = store.open_shard(ShardId(4)).await else { panic!("a bad epoch is refused") };
        let error = error.to_string();
        assert!(error.contains(&path.display().to_string()) && error.contains("epoch value is 3 bytes"), "{error}");
        assert!(error.contains("restore the data directory from a backup"), "{error}");
    }

    #[tokio::test]
    async fn a_failed_journal_breaks_the_store_for_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let shard = store.open_shard(ShardId(1)).await.unwrap();
        let epoch = shard.acquire().await.unwrap();
        let (committed, refusal) = commit_values(&shard, epoch, "k", 1).await;
        assert!(committed == 1 && refusal.is_none(), "{refusal:?}");
        assert_eq!(store.broken(), None);
        store.shared.journal.fail_for_test("journal write failed: No space left on device (os error 28)");
        assert!(store.broken().is_some_and(|failure| failure.contains("No space left")), "{:?}", store.broken());
        let (_, refusal) = commit_values(&shard, epoch, "after", 1).await;
        let refusal = refusal.expect("no commit passes a failed journal");
        assert!(refusal.to_string().contains("No space left"), "{refusal}");
    }

    #[test]
    fn full_layers_come_first_then_the_oldest() {
        let now = Instant::now();
        let mut due = vec![Due::Since(now), Due::Full, Due::Since(now - Duration::from_secs(2))];
        due.sort_unstable();
        assert_eq!(due, vec![Due::Full, Due::Since(now - Duration::from_secs(2)), Due::Since(now)]);
    }
}
