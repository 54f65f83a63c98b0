//! The write-ahead journal a process's shards share: one append and one `fdatasync` make
//! the batches of every shard that committed meanwhile durable (group commit across shards).
//! The shard files catch up later, in checkpoints ([`crate::RedbShard`]).
//!
//! Layout under the data directory: `journal/<writer>/` per process (a fresh writer id per
//! start), holding segment files `0000000001.log`, ..., a `lock` file the writer holds
//! while it lives, `replayed`, where the processes that replayed one of its shards note
//! the shard and the epoch they replayed, and `spare.prep`, the next segment being made.
//!
//! Segments after the first are preallocated: a spare file of [`SEGMENT_BYTES_MAX`] zeros,
//! written and synced in the background once the current segment is half full, is renamed
//! into place when the writer moves on. Frames are then written over zeros, so an
//! `fdatasync` flushes the data alone, without the inode update a growing file needs
//! (measured on ext4: one disk write instead of two per sync). An all-zero frame header
//! ends a segment's frames.
//!
//! A frame is `u32 length | u32 crc32 | payload`; the payload is a kind byte, the shard
//! (`u32`), the epoch (`u64`) and, for data frames, the batch's mutations. Integers are
//! little-endian. A `clean` frame says the shard was checkpointed and closed: nothing of it
//! in this journal is needed any more.
//!
//! Invariants:
//! - An append is answered only after the `fdatasync` that covers it returned.
//! - Frames are written in one order; a torn or corrupt frame can only be the last one of
//!   the last segment of a writer that died (nothing after it was ever answered).
//! - A segment gets a successor only once every frame in it is durable, so the zeros after
//!   the frames of any segment but the last were never written to.
//! - A segment is deleted only when every frame in it is in its shard file durably, which
//!   the writer learns from [`Journal::checkpointed`], or, for frames another process
//!   replayed, from that process's note ([`Journal::forget_replayed`]) or from the shard
//!   file naming it ([`Journal::forget_taken`], [`Journal::replayed_elsewhere`]). A writer
//!   that ends with every shard clean deletes its directory.
//! - A dead writer's directory is deleted once every shard it left dirty was replayed, under
//!   the epoch of its last frames, by whoever opened that shard next
//!   ([`collect_dead_journals`]). A note for an older epoch does not count: the writer may
//!   have owned the shard again since.
//! - A writer marks itself in `journal-writers/<writer>` (beside `journal/`, in the data
//!   directory) before its first frame, and the mark is removed only just before its
//!   directory is deleted by the rules above. A shard file naming a marked writer whose
//!   directory is gone lost the commits that directory held ([`lost_journal`]); without the
//!   mark, a missing directory held nothing (deleted as garbage, or never written).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

use flowgrid_model::{Epoch, ShardId};
use flowgrid_store::{Error, KeyRange, Mutation, Result};

use crate::{backend, PathError};

/// A segment is closed and a new one begun once it holds this much: small enough that a
/// replay reads little and checkpointed segments are freed soon.
pub(crate) const SEGMENT_BYTES_MAX: u64 = 8 << 20;
/// At most this much is written per `fdatasync`: bounds the latency of the first append
/// of a group.
const GROUP_BYTES_MAX: usize = 4 << 20;
const FRAME_HEADER_BYTES: usize = 8;
/// How long a writer waits for its journal's lock while another process's sweep holds it,
/// and how often it tries meanwhile.
const WRITER_LOCK_WAIT: Duration = Duration::from_secs(5);
const WRITER_LOCK_POLL: Duration = Duration::from_millis(10);
/// Zeros written per call while a spare segment is made; the writer's shutdown waits for
/// at most one such write.
const SPARE_CHUNK_BYTES: usize = 1 << 20;
/// The next segment while it is being made; renamed to its segment's name when used.
const SPARE_NAME: &str = "spare.prep";
/// The next segment is made once the current one holds this much: zero-filling takes tens
/// of milliseconds, far less than writing the other half takes under any load, and a
/// journal that never fills half a segment never pays for a spare.
const SPARE_FROM_BYTES: u64 = SEGMENT_BYTES_MAX / 2;
/// A group whose write and `fdatasync` take longer than this is logged: every shard's
/// commits waited for it.
const SLOW_SYNC: Duration = Duration::from_millis(100);
/// At most one slow-sync warning per this long; the others are counted into the next.
const SLOW_SYNC_WARN_EVERY: Duration = Duration::from_secs(10);
/// A payload starts with its kind (1 byte), shard (4) and epoch (8); mutations follow.
const PAYLOAD_HEADER_BYTES: usize = 13;
/// A writer's directory being removed is renamed to its name with this suffix first.
const REMOVED_SUFFIX: &str = ".removed";
/// The data directory's directory of writer marks (see the module's invariants).
const MARKS_DIR: &str = "journal-writers";
const KIND_DATA: u8 = 1;
const KIND_CLEAN: u8 = 2;
const TAG_SET: u8 = 1;
const TAG_CLEAR: u8 = 2;
const TAG_CLEAR_RANGE: u8 = 3;

/// A place in a writer's journal: a segment and a byte offset in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl Position {
    /// 16 bytes, for the shard file's meta table.
    pub(crate) fn encode(self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.segment.to_le_bytes());
        bytes[8..].copy_from_slice(&self.offset.to_le_bytes());
        bytes
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Position> {
        let segment = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let offset = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Position { segment, offset })
    }
}

/// One process's journal. Files appear with the first append.
pub(crate) struct Journal {
    root: PathBuf,
    writer: String,
    state: Arc<Mutex<State>>,
    sender: OnceLock<Sender<Append>>,
    /// The writer thread, joined on drop so that its files are settled before the
    /// directory may be removed.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Held from choosing the segments to delete through deleting them, so that the
    /// checkpoints of several shards delete them one after the other, oldest first: a crash
    /// in the middle leaves an unbroken run of segments, never a gap.
    deleting: Mutex<()>,
}

/// What the writer thread and the checkpoints share.
#[derive(Default)]
struct State {
    /// Where the next frame goes.
    end: Position,
    /// Per shard: a position at or before its oldest frame that is not yet checkpointed.
    unchecked: HashMap<ShardId, Position>,
    /// Per shard: the end of its last data frame.
    last_appended: HashMap<ShardId, Position>,
    /// Segments on disk, oldest first.
    segments: BTreeSet<u64>,
    /// Shards closed without their last frames checkpointed (their file failed), with the
    /// epoch of those frames and the end of the last one: kept in `unchecked` until their
    /// next owner notes in `replayed` that it replayed them.
    released: HashMap<ShardId, (Epoch, Option<Position>)>,
    /// Set when a write or sync failed: the file's state is unknown, so nothing more is
    /// appended and every commit fails with this message.
    failed: Option<String>,
}

struct Append {
    shard: ShardId,
    data: bool,
    frame: Vec<u8>,
    done: Done,
}

type Answer = std::result::Result<Position, Failure>;

/// Why an append failed, and whether its frame may be on disk all the same.
#[derive(Clone, Debug)]
struct Failure {
    message: String,
    /// The group's write began: whole frames of it may be on disk, and a replay (by the
    /// shard's next owner) would apply them.
    maybe_written: bool,
}

impl Failure {
    /// The commit's error: [`Error::OutcomeUnknown`] when its frame may be on disk.
    fn into_error(self) -> Error {
        if self.maybe_written {
            Error::OutcomeUnknown {
                detail: format!("{}; restart the coordinator once the disk is healthy", self.message),
            }
        } else {
            journal_failed(&self.message)
        }
    }
}

/// Where an append's outcome goes: an async caller or a blocked thread.
enum Done {
    Async(tokio::sync::oneshot::Sender<Answer>),
    Blocking(mpsc::SyncSender<Answer>),
}

impl Done {
    fn send(self, answer: Answer) {
        // The caller may have given up waiting; nothing to do then.
        let _ = match self {
            Done::Async(sender) => sender.send(answer).map_err(|_| ()),
            Done::Blocking(sender) => sender.send(answer).map_err(|_| ()),
        };
    }
}

impl Journal {
    pub(crate) fn new(data_dir: &Path) -> Journal {
        Journal {
            root: data_dir.join("journal"),
            writer: uuid::Uuid::new_v4().simple().to_string(),
            state: Arc::new(Mutex::new(State { end: Position { segment: 1, offset: 0 }, ..State::default() })),
            sender: OnceLock::new(),
            thread: Mutex::new(None),
            deleting: Mutex::new(()),
        }
    }

    /// This process's writer id (the name of its journal directory).
    pub(crate) fn writer(&self) -> &str {
        &self.writer
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Where the next frame goes: every frame appended from now on starts at or after it.
    pub(crate) fn end(&self) -> Position {
        lock(&self.state).end
    }

    /// Appends a data frame and waits until it is durable. Returns the end of the frame.
    pub(crate) async fn append(&self, shard: ShardId, frame: Vec<u8>) -> Result<Position> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.submit(Append { shard, data: true, frame, done: Done::Async(done) })?;
        match answer.await {
            Ok(Ok(end)) => Ok(end),
            Ok(Err(failure)) => Err(failure.into_error()),
            Err(_) => Err(journal_failed("the journal writer stopped")),
        }
    }

    /// Appends a `clean` frame for `shard` and waits, blocking the thread, until it is
    /// durable.
    pub(crate) fn append_clean_blocking(&self, shard: ShardId, epoch: Epoch) -> Result<()> {
        let frame = encode_frame(KIND_CLEAN, shard, epoch, &[]);
        let (done, answer) = mpsc::sync_channel(1);
        self.submit(Append { shard, data: false, frame, done: Done::Blocking(done) })?;
        match answer.recv() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(failure)) => Err(failure.into_error()),
            Err(_) => Err(journal_failed("the journal writer stopped")),
        }
    }

    /// Hands an append to the writer thread, started with the first one. The queue is
    /// bounded by its callers: each shard waits for its commit before the next.
    fn submit(&self, append: Append) -> Result<()> {
        if let Some(failure) = &lock(&self.state).failed {
            return Err(journal_failed(failure));
        }
        let sender = self.sender.get_or_init(|| self.start_writer());
        sender.send(append).map_err(|_| journal_failed("the journal writer stopped"))
    }

    fn start_writer(&self) -> Sender<Append> {
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            dir: self.root.join(&self.writer),
            state: Arc::clone(&self.state),
            file: None,
            spare: None,
            slow_syncs: SlowSyncs::default(),
            // Made here, on the first append: the metrics recorder is installed by then.
            bytes_written: metrics::counter!(crate::JOURNAL_BYTES),
            sync_seconds: metrics::histogram!(crate::JOURNAL_SYNC_SECONDS),
        };
        let thread = std::thread::Builder::new()
            .name("flowgrid-journal".into())
            .spawn(move || writer.run(receiver))
            .expect("the journal writer thread starts");
        *lock(&self.thread) = Some(thread);
        sender
    }

    /// Why the journal takes no more appends (a write or sync failed), or `None`.
    pub(crate) fn failure(&self) -> Option<String> {
        lock(&self.state).failed.clone()
    }

    /// Whether the journal keeps frames of `shard` not yet in its file.
    #[cfg(test)]
    pub(crate) fn keeps_frames_of(&self, shard: ShardId) -> bool {
        lock(&self.state).unchecked.contains_key(&shard)
    }

    /// Makes every later append fail as a failed write would.
    #[cfg(test)]
    pub(crate) fn fail_for_test(&self, failure: &str) {
        lock(&self.state).failed = Some(failure.to_owned());
    }

    /// Notes that every data frame of `shard` ending at or before `through` is durable in
    /// its shard file, and deletes the segments nothing needs any more.
    pub(crate) fn checkpointed(&self, shard: ShardId, through: Position) {
        let _deleting = lock(&self.deleting);
        let mut state = lock(&self.state);
        let fully = state.last_appended.get(&shard).is_none_or(|last| *last <= through);
        if fully {
            state.unchecked.remove(&shard);
        } else {
            state.unchecked.insert(shard, through);
        }
        self.delete_obsolete(state);
    }

    /// Deletes the segments before the oldest one a shard still needs.
    fn delete_obsolete(&self, mut state: std::sync::MutexGuard<'_, State>) {
        let keep_from = state.unchecked.values().map(|position| position.segment).min().unwrap_or(u64::MAX);
        let keep_from = keep_from.min(state.end.segment);
        let obsolete: Vec<u64> = state.segments.range(..keep_from).copied().collect();
        for segment in &obsolete {
            state.segments.remove(segment);
        }
        // Deleting a segment takes a while; the writer needs the state for every group.
        drop(state);
        let dir = self.root.join(&self.writer);
        // Oldest first, and none after one that cannot be deleted now (retried after the
        // next checkpoint): the segments left are always one unbroken run, so that a gap
        // can only be damage.
        let deleted =
            obsolete.iter().take_while(|segment| fs::remove_file(segment_path(&dir, **segment)).is_ok()).count();
        lock(&self.state).segments.extend(&obsolete[deleted..]);
    }

    /// Notes that `shard` was closed without its frames up to `epoch` checkpointed (its
    /// file failed): they stay until its next owner replayed them.
    pub(crate) fn released(&self, shard: ShardId, epoch: Epoch) {
        let mut state = lock(&self.state);
        let last = state.last_appended.get(&shard).copied();
        state.released.insert(shard, (epoch, last));
    }

    /// `shard` is open here again: its frames are this process's to checkpoint once more.
    pub(crate) fn reopened(&self, shard: ShardId) {
        lock(&self.state).released.remove(&shard);
    }

    /// `shard`'s file, opened here, names another writer's journal (or none): every frame
    /// of the shard in this journal is in the file, as whoever acquired the shard since this
    /// process last held it replayed them when it opened the file. Forgets them and deletes
    /// the segments nothing needs any more: a shard released here and opened here again would
    /// otherwise keep every later segment for as long as it stays idle (its checkpoints write
    /// nothing, so they never say it is checkpointed).
    pub(crate) fn replayed_elsewhere(&self, shard: ShardId) {
        let _deleting = lock(&self.deleting);
        let mut state = lock(&self.state);
        state.released.remove(&shard);
        state.last_appended.remove(&shard);
        if state.unchecked.remove(&shard).is_some() {
            self.delete_obsolete(state);
        }
    }

    /// Forgets the released shards whose next owner noted that it replayed their frames,
    /// and deletes the segments nothing needs any more: without it, one shard closed with
    /// a failed checkpoint would keep every later segment until the process stopped.
    pub(crate) fn forget_replayed(&self) {
        let _deleting = lock(&self.deleting);
        if lock(&self.state).released.is_empty() {
            return;
        }
        let replayed = read_replayed(&self.root.join(&self.writer));
        let mut state = lock(&self.state);
        // A shard with frames past those it was released with is open here again: its
        // frames are its new handle's.
        let done: Vec<ShardId> = state
            .released
            .iter()
            .filter(|(shard, (epoch, last))| {
                replayed.get(&shard.0).is_some_and(|noted| *noted >= epoch.0)
                    && state.last_appended.get(*shard) == last.as_ref()
            })
            .map(|(shard, _)| *shard)
            .collect();
        if done.is_empty() {
            return;
        }
        for shard in done {
            state.released.remove(&shard);
            state.unchecked.remove(&shard);
            state.last_appended.remove(&shard);
        }
        self.delete_obsolete(state);
    }

    /// Forgets the frames of `shard` of a handle whose file another process took: that
    /// process replayed them when it opened the file. `last`: the end of the handle's last
    /// frame. Frames of the shard past it are a newer handle's of this process (the shard
    /// was opened here again since), which still needs them: the shard is then left alone,
    /// as in [`Self::forget_replayed`].
    pub(crate) fn forget_taken(&self, shard: ShardId, last: Option<Position>) {
        let _deleting = lock(&self.deleting);
        let mut state = lock(&self.state);
        if state.last_appended.get(&shard) != last.as_ref() {
            return;
        }
        state.unchecked.remove(&shard);
        state.last_appended.remove(&shard);
        self.delete_obsolete(state);
    }

    /// Forgets `shard` after it was closed clean.
    pub(crate) fn forget(&self, shard: ShardId) {
        let mut state = lock(&self.state);
        state.unchecked.remove(&shard);
        state.last_appended.remove(&shard);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Stop the writer; with every shard clean, the whole directory is garbage.
        self.sender.take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        let state = lock(&self.state);
        if state.unchecked.is_empty() && state.failed.is_none() {
            remove_journal_dir(&self.root.join(&self.writer));
        }
    }
}

/// The writer thread: gathers every append waiting, writes them at once, syncs, answers.
struct Writer {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    /// The segment being written, and the lock file held while the writer lives.
    file: Option<(File, File)>,
    /// The next segment, being made in the background.
    spare: Option<Spare>,
    slow_syncs: SlowSyncs,
    bytes_written: metrics::Counter,
    sync_seconds: metrics::Histogram,
}

/// Slow groups since the last warning, and when that was.
#[derive(Default)]
struct SlowSyncs {
    warned: Option<Instant>,
    unreported: u64,
    worst: Duration,
}

impl SlowSyncs {
    fn record(&mut self, dir: &Path, took: Duration, bytes: usize) {
        if took < SLOW_SYNC {
            return;
        }
        self.unreported += 1;
        self.worst = self.worst.max(took);
        if self.warned.is_some_and(|warned| warned.elapsed() < SLOW_SYNC_WARN_EVERY) {
            return;
        }
        warn!(
            journal = %dir.display(),
            took_ms = took.as_millis() as u64,
            bytes,
            slow_groups = self.unreported,
            worst_ms = self.worst.as_millis() as u64,
            "a journal write and sync was slow, and every shard's commits waited for it: the disk stalls (shared, \
             throttled or busy with other writes); put the data dir on a disk of its own",
        );
        *self = SlowSyncs { warned: Some(Instant::now()), unreported: 0, worst: Duration::ZERO };
    }
}

/// A preallocated segment in the making: `spare.prep`, zero-filled and synced by its own
/// thread.
struct Spare {
    thread: JoinHandle<io::Result<()>>,
    stop: Arc<AtomicBool>,
}

impl Spare {
    /// `None` when no thread can be started now; the writer tries again after its next sync.
    fn start(dir: &Path) -> Option<Spare> {
        let path = dir.join(SPARE_NAME);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("flowgrid-journal-spare".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || zero_fill(&path, SEGMENT_BYTES_MAX, &stop)
            })
            .ok()?;
        Some(Spare { thread, stop })
    }

    /// Waits for the spare; true when it is ready to be renamed into place.
    fn finish(self, dir: &Path) -> bool {
        match self.thread.join() {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                warn!(journal = %dir.display(), error = %error, "cannot preallocate the next journal segment; it will grow as it is written, which makes each sync slower");
                false
            }
            Err(_panic) => {
                warn!(journal = %dir.display(), "preallocating the next journal segment panicked; it will grow as it is written");
                false
            }
        }
    }

    /// Stops making the spare and removes it.
    fn abandon(self, dir: &Path) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let _ = fs::remove_file(dir.join(SPARE_NAME));
    }
}

/// Writes `bytes` zeros to a new file at `path` and syncs it; stops early when `stop` is set.
fn zero_fill(path: &Path, bytes: u64, stop: &AtomicBool) -> io::Result<()> {
    let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(path)?;
    let zeros = vec![0u8; SPARE_CHUNK_BYTES];
    let mut written = 0;
    while written < bytes {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped"));
        }
        let chunk = (bytes - written).min(SPARE_CHUNK_BYTES as u64) as usize;
        file.write_all(&zeros[..chunk])?;
        written += chunk as u64;
    }
    file.sync_data()
}

impl Writer {
    fn run(mut self, receiver: Receiver<Append>) {
        let mut buffer = Vec::with_capacity(GROUP_BYTES_MAX);
        let mut group = Vec::new();
        while let Ok(first) = receiver.recv() {
            let mut bytes = first.frame.len();
            group.push(first);
            while bytes < GROUP_BYTES_MAX {
                match receiver.try_recv() {
                    Ok(append) => {
                        bytes += append.frame.len();
                        group.push(append);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let outcome = self.write_group(&mut group, &mut buffer);
            let end = outcome.last().and_then(|last| last.as_ref().ok()).copied();
            for (append, result) in group.drain(..).zip(outcome) {
                append.done.send(result);
            }
            buffer.clear();
            if let Some(end) = end {
                self.make_spare_if_due(end);
            }
        }
        if let Some(spare) = self.spare.take() {
            spare.abandon(&self.dir);
        }
    }

    /// Starts making the next segment once the current one, written up to `end`, holds
    /// [`SPARE_FROM_BYTES`].
    fn make_spare_if_due(&mut self, end: Position) {
        if self.spare.is_none() && end.offset >= SPARE_FROM_BYTES {
            self.spare = Spare::start(&self.dir);
        }
    }

    /// Writes the group and syncs; one result per append, in order.
    fn write_group(&mut self, group: &mut [Append], buffer: &mut Vec<u8>) -> Vec<Answer> {
        if let Some(message) = lock(&self.state).failed.clone() {
            return vec![Err(Failure { message, maybe_written: false }); group.len()];
        }
        // How many of the group's bytes may be on disk after a failed write.
        let mut on_disk = 0;
        let bytes: usize = group.iter().map(|append| append.frame.len()).sum();
        let written = self.prepare(bytes as u64).and_then(|start| {
            let mut ends = Vec::with_capacity(group.len());
            let mut offset = start.offset;
            for append in group.iter_mut() {
                buffer.extend_from_slice(&append.frame);
                offset += append.frame.len() as u64;
                ends.push(Position { segment: start.segment, offset });
            }
            let (file, _) = self.file.as_mut().expect("prepare opened a segment");
            let started = Instant::now();
            // The segment is open with O_DSYNC: the write returns once its bytes are durable.
            if let Err((error, written)) = write_all_at(file, buffer, start.offset) {
                // Part of the group may be on disk: whole frames a replay would apply. A
                // zero header ends the segment's frames there, but only if it reaches the
                // disk, which is failing: the commits whose frames may be whole on disk are
                // answered as maybe applied.
                on_disk = bytes_maybe_on_disk(&error, written, buffer.len());
                let _ = file.write_all_at(&[0; FRAME_HEADER_BYTES], start.offset);
                return Err(io_failure(&error));
            }
            let took = started.elapsed();
            self.sync_seconds.record(took.as_secs_f64());
            self.bytes_written.increment(buffer.len() as u64);
            self.slow_syncs.record(&self.dir, took, buffer.len());
            Ok(ends)
        });
        let mut state = lock(&self.state);
        match written {
            Ok(ends) => {
                state.end = *ends.last().expect("a group is never empty");
                for (append, end) in group.iter().zip(&ends) {
                    if append.data {
                        state.last_appended.insert(append.shard, *end);
                        let start = Position { segment: end.segment, offset: end.offset - append.frame.len() as u64 };
                        state.unchecked.entry(append.shard).or_insert(start);
                    }
                }
                ends.into_iter().map(Ok).collect()
            }
            Err(error) => {
                let message = format!("journal write to {} failed: {error}", self.dir.display());
                state.failed = Some(message.clone());
                let mut end = 0;
                group
                    .iter()
                    .map(|append| {
                        end += append.frame.len();
                        Err(Failure { message: message.clone(), maybe_written: end <= on_disk })
                    })
                    .collect()
            }
        }
    }

    /// Makes room for `bytes`: opens the first segment, or a new one when the current one
    /// is full. Returns where the group starts.
    fn prepare(&mut self, bytes: u64) -> std::result::Result<Position, String> {
        let end = lock(&self.state).end;
        let roll = self.file.is_some() && end.offset > 0 && end.offset + bytes > SEGMENT_BYTES_MAX;
        if self.file.is_some() && !roll {
            return Ok(end);
        }
        let start = if roll { Position { segment: end.segment + 1, offset: 0 } } else { end };
        // The lock comes before the first segment: a journal with segments and a free lock
        // belongs to a dead writer.
        let lock_file = match self.file.take() {
            Some((_, held)) => held,
            None => fs::create_dir_all(&self.dir)
                .and_then(|()| take_writer_lock(&self.dir))
                // Its entry in `journal/`, and that one's in the data directory: the first
                // frame is answered as durable, so the directory holding it must be too.
                .and_then(|held| self.dir.ancestors().skip(1).take(2).try_for_each(sync_dir).map(|()| held))
                .and_then(|held| mark_writer(&self.dir).map(|()| held))
                .map_err(|error| format!("cannot lock and mark the journal {}: {error}", self.dir.display()))?,
        };
        let path = segment_path(&self.dir, start.segment);
        // Every frame of the current segment is durable: its successor may appear.
        if self.spare.take().is_some_and(|spare| spare.finish(&self.dir)) {
            if let Err(error) = fs::rename(self.dir.join(SPARE_NAME), &path) {
                warn!(journal = %self.dir.display(), error = %error, "cannot rename the preallocated journal segment into place; writing the segment without preallocation");
            }
        }
        // With O_DSYNC a write returns once its bytes are durable, as a write followed by
        // `fdatasync` would, in one system call instead of two (a 4 KiB overwrite of a
        // preallocated file: about 15% quicker and 25% less CPU on the test machine's disk).
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(&path)
            .and_then(|file| sync_dir(&self.dir).map(|()| file))
            .map_err(|error| {
                format!("cannot open a journal segment in {}: {}", self.dir.display(), io_failure(&error))
            });
        let file = match file {
            Ok(file) => file,
            Err(error) => {
                self.file = None;
                drop(lock_file);
                return Err(error);
            }
        };
        self.file = Some((file, lock_file));
        let mut state = lock(&self.state);
        state.end = start;
        state.segments.insert(start.segment);
        Ok(start)
    }
}

/// An I/O error of the journal's, with what a full disk needs.
fn io_failure(error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::StorageFull {
        format!(
            "{error} (the journal writes segments of {} MiB, the next one made while the current one fills: keep \
             at least twice that free on its disk, besides the shard files' growth)",
            SEGMENT_BYTES_MAX >> 20
        )
    } else {
        error.to_string()
    }
}

/// Takes `<dir>/lock`, held for the life of the writer: others see the writer alive. Nobody
/// else writes in `dir` (its name is this process's own), but another process's sweep of
/// dead journals may hold the lock for a moment to tell whether its writer lives: that is
/// waited out, for a while.
fn take_writer_lock(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
    let deadline = Instant::now() + WRITER_LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(WRITER_LOCK_POLL);
            }
            Err(error) => return Err(io::Error::other(format!("journal lock {}: {error}", dir.display()))),
        }
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:010}.log"))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How many of a write's `total` bytes may be on disk when it failed with `error` after
/// `written` of them: a full disk refuses the bytes it has no room for and takes none of
/// them, any other failure may have put all of them there.
fn bytes_maybe_on_disk(error: &io::Error, written: usize, total: usize) -> usize {
    if error.kind() == io::ErrorKind::StorageFull {
        written
    } else {
        total
    }
}

/// Writes all of `bytes` at `offset`; on failure, the error and how many bytes were written
/// before it.
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> std::result::Result<(), (io::Error, usize)> {
    let mut written = 0;
    while written < bytes.len() {
        match file.write_at(&bytes[written..], offset + written as u64) {
            Ok(0) => return Err((io::Error::from(io::ErrorKind::WriteZero), written)),
            Ok(count) => written += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err((error, written)),
        }
    }
    Ok(())
}

fn journal_failed(failure: &str) -> Error {
    backend(io::Error::other(format!("{failure}; restart the coordinator once the disk is healthy")))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Encodes a frame. Data frames carry `mutations`.
pub(crate) fn encode_frame(kind: u8, shard: ShardId, epoch: Epoch, mutations: &[Mutation]) -> Vec<u8> {
    let payload_bytes: usize = PAYLOAD_HEADER_BYTES
        + mutations
            .iter()
            .map(|mutation| match mutation {
                Mutation::Set(key, value) => 9 + key.len() + value.len(),
                Mutation::Clear(key) => 5 + key.len(),
                Mutation::ClearRange(range) => 9 + range.begin.len() + range.end.len(),
            })
            .sum::<usize>();
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload_bytes);
    frame.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    frame.push(kind);
    frame.extend_from_slice(&shard.0.to_le_bytes());
    frame.extend_from_slice(&epoch.0.to_le_bytes());
    for mutation in mutations {
        match mutation {
            Mutation::Set(key, value) => {
                frame.push(TAG_SET);
                put_bytes(&mut frame, key);
                put_bytes(&mut frame, value);
            }
            Mutation::Clear(key) => {
                frame.push(TAG_CLEAR);
                put_bytes(&mut frame, key);
            }
            Mutation::ClearRange(range) => {
                frame.push(TAG_CLEAR_RANGE);
                put_bytes(&mut frame, &range.begin);
                put_bytes(&mut frame, &range.end);
            }
        }
    }
    let payload_len = (frame.len() - FRAME_HEADER_BYTES) as u32;
    let crc = crc32fast::hash(&frame[FRAME_HEADER_BYTES..]);
    frame[..4].copy_from_slice(&payload_len.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    frame
}

/// A data frame.
pub(crate) fn encode_data(shard: ShardId, epoch: Epoch, mutations: &[Mutation]) -> Vec<u8> {
    encode_frame(KIND_DATA, shard, epoch, mutations)
}

fn put_bytes(frame: &mut Vec<u8>, bytes: &[u8]) {
    frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    frame.extend_from_slice(bytes);
}

/// A frame read back.
pub(crate) struct Frame {
    pub end: Position,
    pub clean: bool,
    pub shard: ShardId,
    pub epoch: Epoch,
    payload: Vec<u8>,
}

impl Frame {
    /// The frame's mutations. `dir`: the writer directory it was read from, which an error
    /// names: a frame that passes its checksum but does not decode was damaged in a way the
    /// checksum missed, or written by a version that encodes mutations otherwise.
    pub(crate) fn mutations(&self, dir: &Path) -> Result<Vec<Mutation>> {
        self.decode().map_err(|what| {
            let length = (FRAME_HEADER_BYTES + self.payload.len()) as u64;
            let start = Position { segment: self.end.segment, offset: self.end.offset - length };
            corrupt(
                start,
                format!(
                    "a frame of shard {} in {} passes its checksum but does not decode ({what}): it was damaged, or \
                     written by another version of flowgrid; {DAMAGED_JOURNAL_REMEDY}",
                    self.shard,
                    segment_path(dir, self.end.segment).display()
                ),
            )
        })
    }

    /// The mutations, or what does not decode.
    fn decode(&self) -> std::result::Result<Vec<Mutation>, String> {
        let mut reader = Reader { bytes: &self.payload[PAYLOAD_HEADER_BYTES..] };
        let mut mutations = Vec::new();
        while !reader.bytes.is_empty() {
            let tag = reader.byte()?;
            mutations.push(match tag {
                TAG_SET => Mutation::Set(reader.bytes()?, reader.bytes()?),
                TAG_CLEAR => Mutation::Clear(reader.bytes()?),
                TAG_CLEAR_RANGE => Mutation::ClearRange(KeyRange { begin: reader.bytes()?, end: reader.bytes()? }),
                other => return Err(format!("unknown mutation tag {other}")),
            });
        }
        Ok(mutations)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

/// What a mutation that runs past the end of its frame is said to be.
const PAST_THE_END: &str = "a mutation runs past the end of its frame";

impl Reader<'_> {
    fn byte(&mut self) -> std::result::Result<u8, String> {
        let (&first, rest) = self.bytes.split_first().ok_or_else(|| PAST_THE_END.to_owned())?;
        self.bytes = rest;
        Ok(first)
    }

    fn bytes(&mut self) -> std::result::Result<Vec<u8>, String> {
        if self.bytes.len() < 4 {
            return Err(PAST_THE_END.to_owned());
        }
        let len = u32::from_le_bytes(self.bytes[..4].try_into().expect("four bytes")) as usize;
        let rest = &self.bytes[4..];
        if rest.len() < len {
            return Err(PAST_THE_END.to_owned());
        }
        self.bytes = &rest[len..];
        Ok(rest[..len].to_vec())
    }
}

fn corrupt(at: Position, detail: String) -> Error {
    Error::Corrupt { key: format!("journal segment {} offset {}", at.segment, at.offset), detail }
}

/// What an operator may do about a damaged journal, said with every error about one.
const DAMAGED_JOURNAL_REMEDY: &str = "the shards whose commits it holds are not served while it is damaged: restore \
    the data directory from a backup, or, to serve them from their shard files alone (losing their commits since \
    their last checkpoint), move this journal directory out of the data directory and delete its mark, the file of \
    the same name in the data directory's journal-writers";

/// Reads the frames of writer directory `dir` from `from` on, in order, calling `visit`
/// for each. An all-zero frame header ends a segment (the rest was preallocated). A frame
/// cut short or failing its checksum ends the reading when it is in the last segment (a
/// writer that died mid-write); anywhere else it is corruption, and so are frames after
/// the zeros that end a segment other than the last, and a segment missing between two
/// that are there. Segments before the first were deleted because everything in them was
/// checkpointed (the oldest go first).
pub(crate) fn read_frames(dir: &Path, from: Position, mut visit: impl FnMut(Frame) -> Result<()>) -> Result<()> {
    // Segments before `from` hold nothing still needed here: they may be gone in any order.
    let mut segments = list_segments(dir)?;
    segments.retain(|segment| *segment >= from.segment);
    let last = segments.last().copied();
    if let Some(missing) = segments.windows(2).find(|pair| pair[1] != pair[0] + 1).map(|pair| pair[0] + 1) {
        return Err(corrupt(
            Position { segment: missing, offset: 0 },
            format!(
                "{} is missing, and later segments are there; {DAMAGED_JOURNAL_REMEDY}",
                segment_path(dir, missing).display()
            ),
        ));
    }
    for segment in segments {
        let path = segment_path(dir, segment);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(backend(PathError::new("read the journal segment", &path, error))),
        };
        let mut offset = if segment == from.segment { from.offset as usize } else { 0 };
        while offset < bytes.len() {
            let at = Position { segment, offset: offset as u64 };
            if is_unwritten(&bytes[offset..]) {
                // Only the last segment may end with a write cut short; before a successor
                // was made, every frame of a segment was durable.
                if Some(segment) != last && bytes[offset..].iter().any(|byte| *byte != 0) {
                    return Err(corrupt(
                        at,
                        format!(
                            "{} has zeros where a frame should be, and frames after them: part of it was lost; \
                             {DAMAGED_JOURNAL_REMEDY}",
                            path.display()
                        ),
                    ));
                }
                break;
            }
            match parse_frame(&bytes[offset..]) {
                Some((frame_len, payload)) => {
                    offset += frame_len;
                    let end = Position { segment, offset: offset as u64 };
                    let frame = Frame {
                        end,
                        clean: payload[0] == KIND_CLEAN,
                        shard: ShardId(u32::from_le_bytes(payload[1..5].try_into().expect("four bytes"))),
                        epoch: Epoch(u64::from_le_bytes(
                            payload[5..PAYLOAD_HEADER_BYTES].try_into().expect("eight bytes"),
                        )),
                        payload: payload.to_vec(),
                    };
                    visit(frame)?;
                }
                None if Some(segment) == last => return Ok(()),
                None => {
                    return Err(corrupt(
                        at,
                        format!(
                            "a frame in {} is cut short or fails its checksum; {DAMAGED_JOURNAL_REMEDY}",
                            path.display()
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Whether `bytes` start with an all-zero frame header (or the zeros that remain are too
/// few for one): the preallocated part of a segment that no frame reached. A frame always
/// has a nonzero length.
fn is_unwritten(bytes: &[u8]) -> bool {
    bytes.iter().take(FRAME_HEADER_BYTES).all(|byte| *byte == 0)
}

/// A whole, valid frame at the start of `bytes`: its length and payload.
fn parse_frame(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let header = bytes.get(..FRAME_HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let payload = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len)?;
    (len >= PAYLOAD_HEADER_BYTES && crc32fast::hash(payload) == crc && matches!(payload[0], KIND_DATA | KIND_CLEAN))
        .then_some((FRAME_HEADER_BYTES + len, payload))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(backend(PathError::new("list the journal", dir, error))),
    };
    let mut segments: Vec<u64> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    segments.sort_unstable();
    Ok(segments)
}

/// Where the mark of the writer whose journal directory is `dir` lives.
fn mark_path(dir: &Path) -> PathBuf {
    let root = dir.parent().unwrap_or(Path::new("."));
    let writer = dir.file_name().unwrap_or_default();
    root.with_file_name(MARKS_DIR).join(writer)
}

/// Marks the writer of `dir` as one whose directory holds commits, durably.
fn mark_writer(dir: &Path) -> io::Result<()> {
    let mark = mark_path(dir);
    let marks = mark.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(marks)
        .and_then(|()| File::create(&mark))
        .and_then(|_| sync_dir(marks))
        // The marks' directory may be new: its own entry must survive a crash too.
        .and_then(|()| sync_dir(marks.parent().unwrap_or(Path::new("."))))
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", mark.display())))
}

/// The refusal of a shard whose file names `writer` as the journal of its last commits
/// when that journal's directory is gone though its mark is there; `None` when nothing is
/// missing. Only a journal deleted by hand (or lost with its disk) is refused: the grid
/// removes a mark before the directory it stands for.
pub(crate) fn lost_journal(root: &Path, writer: &str, shard: ShardId) -> Option<Error> {
    let dir = root.join(writer);
    let mark = mark_path(&dir);
    if !matches!(dir.try_exists(), Ok(false)) || !matches!(mark.try_exists(), Ok(true)) {
        return None;
    }
    Some(Error::Corrupt {
        key: dir.display().to_string(),
        detail: format!(
            "shard {shard}'s last commits were journaled in this directory, which is gone, though {} says it held \
             commits: those not yet in the shard file are lost, so the shard is not served. Put the directory back \
             (restore the whole data directory from one backup); or, to serve the shard with what its file holds and \
             give up those commits, delete {}",
            mark.display(),
            mark.display()
        ),
    })
}

/// Removes a writer's mark, then its journal directory (true when both are gone). The
/// directory is renamed first, so that a crash in the middle of deleting its files leaves
/// no journal with segments missing, which would read as damage, but a directory the next
/// sweep deletes.
fn remove_journal_dir(dir: &Path) -> bool {
    match fs::remove_file(mark_path(dir)) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(_) => return false,
    }
    let mut removed = dir.as_os_str().to_owned();
    removed.push(REMOVED_SUFFIX);
    match fs::rename(dir, &removed) {
        Ok(()) => fs::remove_dir_all(&removed).is_ok(),
        Err(error) => error.kind() == io::ErrorKind::NotFound,
    }
}

/// Notes in a writer's directory that its frames of `shard` under `epoch` were replayed
/// into the shard file.
///
/// Several processes append to `replayed`, and a full disk may cut a note short. Each note
/// is one `write` to a file opened for appending, so notes never interleave; each begins
/// with a line break of its own, so that a line cut short before it never reads with it as
/// another shard's note (`1` and `2 1` as shard 12); and a note cut short is not finished
/// by a second write, which could land after another process's note. What a cut note
/// leaves is a line [`read_replayed`] ignores, or one with its epoch cut short, which
/// claims less than was replayed.
pub(crate) fn note_replayed(root: &Path, writer: &str, shard: ShardId, epoch: Epoch) -> Result<()> {
    let path = root.join(writer).join("replayed");
    let open = |create| OpenOptions::new().create(create).append(true).open(&path);
    let mut file = match open(false) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound && !root.join(writer).exists() => return Ok(()),
        Err(_) => open(true).map_err(|error| backend(PathError::new("note a replayed shard in", &path, error)))?,
    };
    let mut append = || -> io::Result<()> {
        // A line of its own whatever came before: another process's note cut short (a full
        // disk) may end the file at any moment, so the last byte read first would not do.
        let note = format!("\n{} {}\n", shard.0, epoch.0);
        let written = file.write(note.as_bytes())?;
        if written < note.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "the note was cut short after {written} of its {} bytes (is the disk full?); free space on the \
                     data directory's disk and open the shard again",
                    note.len()
                ),
            ));
        }
        file.sync_data()
    };
    append().map_err(|error| backend(PathError::new("note a replayed shard in", &path, error)))
}

/// The notes of a writer's `replayed`: per shard, the latest epoch its frames were
/// replayed under. Only whole lines of exactly two numbers count: a final line without its
/// `'\n'` may be a note cut short, and a line of another shape is what such a note left.
fn read_replayed(dir: &Path) -> HashMap<u32, u64> {
    let mut replayed: HashMap<u32, u64> = HashMap::new();
    let text = fs::read_to_string(dir.join("replayed")).unwrap_or_default();
    for line in text.split_inclusive('\n').filter_map(|line| line.strip_suffix('\n')) {
        let mut fields = line.split_whitespace();
        let (Some(shard), Some(epoch), None) = (fields.next(), fields.next(), fields.next()) else { continue };
        if let (Ok(shard), Ok(epoch)) = (shard.parse::<u32>(), epoch.parse::<u64>()) {
            let noted = replayed.entry(shard).or_default();
            *noted = (*noted).max(epoch);
        }
    }
    replayed
}

/// Deletes the journals of writers that died once every shard they left dirty was replayed
/// by its next owner, under the epoch of the shard's last frames. Returns how many were
/// deleted. A journal whose writer lives (its lock is held) is never touched, nor one
/// without segments (its writer may be creating it).
pub(crate) fn collect_dead_journals(root: &Path, own: &str) -> usize {
    let Ok(entries) = fs::read_dir(root) else { return 0 };
    let mut deleted = 0;
    for entry in entries.filter_map(|entry| entry.ok()) {
        let dir = entry.path();
        let Some(writer) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if writer == own || !dir.is_dir() {
            continue;
        }
        if writer.ends_with(REMOVED_SUFFIX) {
            // A removal cut short (by a crash): nothing in it is needed.
            let _ = fs::remove_dir_all(&dir);
            continue;
        }
        // Segments first, the lock then: a writer takes its lock before its first segment,
        // so a journal without segments may be one being made, whose lock this sweep must
        // not hold even for a moment (its writer would find it taken and fail).
        if list_segments(&dir).map_or(true, |segments| segments.is_empty()) {
            continue;
        }
        let Ok(held) = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")) else {
            continue;
        };
        if held.try_lock().is_err() {
            continue; // alive
        }
        // Per shard: the epoch of its last frame when that frame is data (it is dirty).
        let mut dirty: HashMap<ShardId, Option<Epoch>> = HashMap::new();
        let read = read_frames(&dir, Position::default(), |frame| {
            dirty.insert(frame.shard, (!frame.clean).then_some(frame.epoch));
            Ok(())
        });
        if read.is_err() {
            continue;
        }
        let replayed = read_replayed(&dir);
        let all_replayed = dirty.iter().all(|(shard, dirty_epoch)| match dirty_epoch {
            None => true,
            Some(epoch) => replayed.get(&shard.0).is_some_and(|noted| *noted >= epoch.0),
        });
        if all_replayed {
            drop(held);
            if remove_journal_dir(&dir) {
                deleted += 1;
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_torn_tail_ends_the_reading() {
        let dir = tempfile::tempdir().unwrap();
        let mutations = vec![
            Mutation::Set(b"k".to_vec(), b"v".to_vec()),
            Mutation::Clear(b"gone".to_vec()),
            Mutation::ClearRange(KeyRange { begin: b"a".to_vec(), end: b"b".to_vec() }),
        ];
        let mut bytes = encode_data(ShardId(7), Epoch(3), &mutations);
        bytes.extend_from_slice(&encode_frame(KIND_CLEAN, ShardId(7), Epoch(3), &[]));
        let torn = encode_data(ShardId(8), Epoch(1), &mutations);
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
        let mut seen = Vec::new();
        read_frames(dir.path(), Position::default(), |frame| {
            seen.push((frame.shard, frame.epoch, frame.clean, frame.mutations(dir.path()).unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 2, "the torn third frame is not read");
        assert_eq!(seen[0], (ShardId(7), Epoch(3), false, mutations));
        assert_eq!(seen[1], (ShardId(7), Epoch(3), true, Vec::new()));
    }

    #[test]
    fn a_frame_that_passes_its_checksum_but_does_not_decode_names_its_segment_and_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let first = encode_data(ShardId(5), Epoch(1), &[Mutation::Clear(b"a".to_vec())]);
        let mut undecodable = encode_data(ShardId(5), Epoch(1), &[Mutation::Clear(b"b".to_vec())]);
        // An unknown mutation tag, under a checksum that matches it.
        undecodable[FRAME_HEADER_BYTES + PAYLOAD_HEADER_BYTES] = 0xEE;
        let crc = crc32fast::hash(&undecodable[FRAME_HEADER_BYTES..]);
        undecodable[4..8].copy_from_slice(&crc.to_le_bytes());
        fs::write(segment_path(dir.path(), 1), [first.clone(), undecodable].concat()).unwrap();
        let error = read_frames(dir.path(), Position::default(), |frame| frame.mutations(dir.path()).map(drop))
            .unwrap_err()
            .to_string();
        let segment = segment_path(dir.path(), 1).display().to_string();
        assert!(error.contains(&format!("journal segment 1 offset {}", first.len())), "{error}");
        assert!(error.contains(&segment) && error.contains("unknown mutation tag 238"), "{error}");
        assert!(error.contains(DAMAGED_JOURNAL_REMEDY), "{error}");
    }

    #[test]
    fn a_bad_frame_before_the_last_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = encode_data(ShardId(1), Epoch(1), &[Mutation::Clear(b"k".to_vec())]);
        let last = first.len() - 1;
        first[last] ^= 0xFF;
        fs::write(segment_path(dir.path(), 1), &first).unwrap();
        fs::write(segment_path(dir.path(), 2), encode_data(ShardId(1), Epoch(1), &[])).unwrap();
        let read = read_frames(dir.path(), Position::default(), |_| Ok(()));
        assert!(matches!(read, Err(Error::Corrupt { .. })), "got {read:?}");
    }

    /// What operations.md says of damage to the last segment: it cannot be told from the
    /// torn end a crash leaves, so the frames after a bad one there are not read.
    #[test]
    fn a_bad_frame_in_the_last_segment_ends_the_reading_and_the_frames_after_it_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let frame = |shard| encode_data(ShardId(shard), Epoch(1), &[Mutation::Clear(b"k".to_vec())]);
        let mut bad = frame(2);
        let last = bad.len() - 1;
        bad[last] ^= 0xFF;
        let bytes = [frame(1), bad, frame(3)].concat();
        fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
        let mut shards = Vec::new();
        read_frames(dir.path(), Position::default(), |frame| {
            shards.push(frame.shard.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(shards, vec![1], "the third frame, whole, is not read after the bad second one");
    }

    #[test]
    fn zeros_after_the_frames_end_a_segment_that_is_not_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = encode_data(ShardId(1), Epoch(1), &[Mutation::Clear(b"a".to_vec())]);
        first.resize(first.len() + 4_096, 0);
        fs::write(segment_path(dir.path(), 1), &first).unwrap();
        fs::write(segment_path(dir.path(), 2), encode_data(ShardId(2), Epoch(1), &[])).unwrap();
        let mut shards = Vec::new();
        read_frames(dir.path(), Position::default(), |frame| {
            shards.push(frame.shard);
            Ok(())
        })
        .unwrap();
        assert_eq!(shards, vec![ShardId(1), ShardId(2)]);
    }

    #[test]
    fn frames_after_zeros_or_a_missing_segment_are_corruption_not_the_end() {
        let frame = |shard| encode_data(ShardId(shard), Epoch(1), &[Mutation::Clear(b"a".to_vec())]);
        // A frame zeroed out in a segment that is not the last, with frames after it.
        let dir = tempfile::tempdir().unwrap();
        let mut first = frame(1);
        first.resize(first.len() + 4_096, 0);
        first.extend_from_slice(&frame(2));
        fs::write(segment_path(dir.path(), 1), &first).unwrap();
        fs::write(segment_path(dir.path(), 2), frame(3)).unwrap();
        let read = read_frames(dir.path(), Position::default(), |_| Ok(()));
        let Err(Error::Corrupt { detail, .. }) = read else { panic!("got {read:?}") };
        assert!(detail.contains("zeros where a frame should be") && detail.contains("restore"), "{detail}");
        // A segment missing between two that are there.
        let dir = tempfile::tempdir().unwrap();
        for segment in [3, 5] {
            fs::write(segment_path(dir.path(), segment), frame(1)).unwrap();
        }
        let read = read_frames(dir.path(), Position::default(), |_| Ok(()));
        let Err(Error::Corrupt { key, detail }) = read else { panic!("got {read:?}") };
        assert!(key.contains("segment 4") && detail.contains("0000000004.log is missing"), "{key}: {detail}");
        // The shards of the frames read from `segment` on.
        let shards_from = |segment| {
            let mut shards = Vec::new();
            read_frames(dir.path(), Position { segment, offset: 0 }, |frame| {
                shards.push(frame.shard.0);
                Ok(())
            })
            .unwrap();
            shards
        };
        // Segments before the first were checkpointed and deleted: no gap.
        fs::write(segment_path(dir.path(), 4), frame(2)).unwrap();
        assert_eq!(shards_from(1), vec![1, 2, 1]);
        // A gap before where a reading starts held only checkpointed frames: no damage.
        fs::remove_file(segment_path(dir.path(), 4)).unwrap();
        assert_eq!(shards_from(4), vec![1]);
    }

    #[test]
    fn a_journal_directory_whose_removal_was_cut_short_is_removed_by_the_next_sweep() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("gone");
        fs::create_dir(&dir).unwrap();
        fs::write(segment_path(&dir, 7), encode_data(ShardId(1), Epoch(1), &[])).unwrap();
        assert!(remove_journal_dir(&dir) && !dir.exists());
        assert!(remove_journal_dir(&dir), "a directory already gone is removed");
        // What a crash leaves when it cuts the deletion of the renamed directory short.
        let cut = root.path().join(format!("other{REMOVED_SUFFIX}"));
        fs::create_dir(&cut).unwrap();
        fs::write(segment_path(&cut, 8), encode_data(ShardId(1), Epoch(1), &[])).unwrap();
        collect_dead_journals(root.path(), "own");
        assert!(!cut.exists());
    }

    fn mib_value() -> Vec<u8> {
        vec![7u8; 1 << 20]
    }

    #[test]
    fn a_failed_write_is_a_maybe_applied_commit_where_its_frame_may_be_whole_on_disk() {
        let full = io::Error::from(io::ErrorKind::StorageFull);
        assert_eq!(bytes_maybe_on_disk(&full, 0, 9_000), 0);
        assert_eq!(bytes_maybe_on_disk(&full, 4_096, 9_000), 4_096, "a prefix of the group reached the disk");
        assert_eq!(bytes_maybe_on_disk(&io::Error::other("EIO"), 0, 9_000), 9_000, "a failing disk may have taken all");
        let failure = |maybe_written| Failure { message: "journal write failed".into(), maybe_written };
        assert!(matches!(failure(true).into_error(), Error::OutcomeUnknown { .. }));
        assert!(matches!(failure(false).into_error(), Error::Backend(_)));
    }

    /// Appends `count` frames of one 1 MiB value each, frame `i` for shard `i`; their ends.
    async fn append_mib_frames(journal: &Journal, count: u32) -> Vec<Position> {
        let mut ends = Vec::new();
        for index in 0..count {
            let frame = encode_data(ShardId(index), Epoch(1), &[Mutation::Set(b"k".to_vec(), mib_value())]);
            ends.push(journal.append(ShardId(index), frame).await.unwrap());
        }
        ends
    }

    #[tokio::test]
    async fn segments_after_the_first_are_preallocated_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let writer_dir = journal.root().join(journal.writer());
        // Seven frames fit in a segment; the five in the second pass its half, so the next
        // spare is in the making when the writer ends.
        let last = *append_mib_frames(&journal, 12).await.last().unwrap();
        assert_eq!(last.segment, 2, "twelve frames of 1 MiB fill more than one segment");
        let second = fs::metadata(segment_path(&writer_dir, 2)).unwrap().len();
        assert_eq!(second, SEGMENT_BYTES_MAX, "the second segment was preallocated");
        assert!(last.offset < second);
        let mut shards = Vec::new();
        read_frames(&writer_dir, Position::default(), |frame| {
            assert_eq!(frame.mutations(&writer_dir).unwrap(), vec![Mutation::Set(b"k".to_vec(), mib_value())]);
            shards.push(frame.shard.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(shards, (0..12).collect::<Vec<_>>());
        // Shard 0 stays dirty: the directory outlives the writer, without a spare in it.
        for index in 1..12 {
            journal.checkpointed(ShardId(index), last);
        }
        drop(journal);
        assert!(segment_path(&writer_dir, 2).exists());
        assert!(!writer_dir.join(SPARE_NAME).exists(), "a spare in the making is removed when the writer ends");
    }

    #[test]
    fn slow_syncs_are_warned_at_most_once_per_interval_and_counted_meanwhile() {
        let dir = Path::new("journal");
        let mut slow = SlowSyncs::default();
        slow.record(dir, SLOW_SYNC / 2, 10);
        assert!(slow.warned.is_none() && slow.unreported == 0, "a fast group is not slow");
        slow.record(dir, SLOW_SYNC * 3, 10);
        assert!(slow.warned.is_some(), "the first slow group is warned at once");
        assert_eq!((slow.unreported, slow.worst), (0, Duration::ZERO), "and reported");
        slow.record(dir, SLOW_SYNC * 2, 10);
        slow.record(dir, SLOW_SYNC * 4, 10);
        assert_eq!((slow.unreported, slow.worst), (2, SLOW_SYNC * 4), "later ones wait for the next warning");
    }

    #[test]
    fn a_writer_waits_out_a_sweep_that_holds_its_lock_for_a_moment() {
        let dir = tempfile::tempdir().unwrap();
        // Another process's sweep looking at this journal: its lock held for 100 ms.
        let sweep = OpenOptions::new().create(true).truncate(false).write(true).open(dir.path().join("lock")).unwrap();
        sweep.try_lock().unwrap();
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(sweep);
        });
        let held = take_writer_lock(dir.path()).expect("the lock once the sweep let go");
        released.join().unwrap();
        // A journal without segments is not the sweep's to lock: its writer may be making it.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("starting")).unwrap();
        assert_eq!(collect_dead_journals(root.path(), "me"), 0);
        assert!(!root.path().join("starting").join("lock").exists(), "the sweep took the lock of a journal being made");
        drop(held);
    }

    #[tokio::test]
    async fn a_shard_closed_unchecked_keeps_its_segment_until_its_next_owner_replayed_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let writer_dir = journal.root().join(journal.writer());
        let ends = append_mib_frames(&journal, 9).await;
        // Shard 0 closed with its checkpoint failed; every other shard checkpointed.
        journal.released(ShardId(0), Epoch(1));
        for index in 1..9u32 {
            journal.checkpointed(ShardId(index), ends[index as usize]);
        }
        journal.forget_replayed();
        assert!(segment_path(&writer_dir, 1).exists(), "shard 0's frames are not replayed yet");
        // Its next owner replays them under their epoch and notes it.
        note_replayed(journal.root(), journal.writer(), ShardId(0), Epoch(1)).unwrap();
        journal.forget_replayed();
        assert!(!segment_path(&writer_dir, 1).exists(), "nothing needs the first segment any more");

        // A shard opened here again is this process's own once more: a note changes nothing.
        let later = journal.append(ShardId(9), encode_data(ShardId(9), Epoch(1), &[])).await.unwrap();
        journal.released(ShardId(9), Epoch(1));
        journal.reopened(ShardId(9));
        note_replayed(journal.root(), journal.writer(), ShardId(9), Epoch(1)).unwrap();
        journal.forget_replayed();
        assert_eq!(lock(&journal.state).unchecked.get(&ShardId(9)).map(|at| at.segment), Some(later.segment));
    }

    #[tokio::test]
    async fn a_segment_is_deleted_once_every_shard_in_it_is_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let writer_dir = journal.root().join(journal.writer());
        let ends = append_mib_frames(&journal, 9).await;
        assert_eq!(ends.last().unwrap().segment, 2, "nine frames of 1 MiB fill more than one segment");
        for index in 1..9u32 {
            journal.checkpointed(ShardId(index), ends[index as usize]);
        }
        assert!(segment_path(&writer_dir, 1).exists(), "shard 0 still needs the first segment");
        journal.checkpointed(ShardId(0), ends[0]);
        assert!(!segment_path(&writer_dir, 1).exists(), "no shard needs the first segment any more");
        assert!(segment_path(&writer_dir, 2).exists(), "the writer still appends to the second");
        let later = journal.append(ShardId(0), encode_data(ShardId(0), Epoch(1), &[])).await.unwrap();
        assert!(later > *ends.last().unwrap());
    }

    #[tokio::test]
    async fn appends_are_durable_positions_grow_and_a_clean_journal_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let writer_dir = journal.root().join(journal.writer());
        let first = journal.append(ShardId(1), encode_data(ShardId(1), Epoch(1), &[])).await.unwrap();
        let second = journal.append(ShardId(2), encode_data(ShardId(2), Epoch(1), &[])).await.unwrap();
        assert!(first < second);
        assert_eq!(journal.end(), second);
        let mark = mark_path(&writer_dir);
        assert!(mark.exists(), "a writer is marked before its first frame");
        let mut shards = Vec::new();
        read_frames(&writer_dir, Position::default(), |frame| {
            shards.push(frame.shard);
            Ok(())
        })
        .unwrap();
        assert_eq!(shards, vec![ShardId(1), ShardId(2)]);
        journal.checkpointed(ShardId(1), first);
        journal.checkpointed(ShardId(2), second);
        drop(journal);
        assert!(!writer_dir.exists(), "a journal with every shard clean is removed when its writer ends");
        assert!(!mark.exists(), "and so is its mark");
    }

    #[test]
    fn a_dead_journal_goes_once_its_dirty_shards_were_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("journal");
        let dead = root.join("dead");
        fs::create_dir_all(&dead).unwrap();
        mark_writer(&dead).unwrap();
        let mut bytes = encode_data(ShardId(1), Epoch(1), &[]);
        bytes.extend_from_slice(&encode_data(ShardId(2), Epoch(1), &[]));
        bytes.extend_from_slice(&encode_frame(KIND_CLEAN, ShardId(2), Epoch(1), &[]));
        fs::write(segment_path(&dead, 1), &bytes).unwrap();
        fs::write(dead.join("lock"), b"").unwrap();
        assert_eq!(collect_dead_journals(&root, "me"), 0, "shard 1 was left dirty and is not replayed yet");
        // A replay under an older epoch (the writer owned the shard again since) does not count.
        fs::write(segment_path(&dead, 2), encode_data(ShardId(1), Epoch(3), &[])).unwrap();
        note_replayed(&root, "dead", ShardId(1), Epoch(1)).unwrap();
        assert_eq!(collect_dead_journals(&root, "me"), 0, "shard 1 has frames of epoch 3 nobody replayed");
        note_replayed(&root, "dead", ShardId(1), Epoch(3)).unwrap();
        assert_eq!(collect_dead_journals(&root, "me"), 1);
        assert!(!dead.exists());
        assert!(!mark_path(&dead).exists(), "the mark goes with the directory");
        assert!(lost_journal(&root, "dead", ShardId(1)).is_none(), "a journal deleted as garbage lost nothing");
    }

    #[test]
    fn a_note_cut_short_never_reads_as_another_shards() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("journal");
        let dead = root.join("dead");
        fs::create_dir_all(&dead).unwrap();
        mark_writer(&dead).unwrap();
        let mut bytes = Vec::new();
        for shard in [12, 17, 2] {
            bytes.extend_from_slice(&encode_data(ShardId(shard), Epoch(1), &[]));
        }
        bytes.extend_from_slice(&encode_frame(KIND_CLEAN, ShardId(2), Epoch(1), &[]));
        fs::write(segment_path(&dead, 1), &bytes).unwrap();
        fs::write(dead.join("lock"), b"").unwrap();
        // A note of shard 17 cut short by a full disk after its first byte; the next notes
        // are whole.
        fs::write(dead.join("replayed"), b"1").unwrap();
        note_replayed(&root, "dead", ShardId(2), Epoch(1)).unwrap();
        note_replayed(&root, "dead", ShardId(17), Epoch(1)).unwrap();
        assert_eq!(read_replayed(&dead), HashMap::from([(2, 1), (17, 1)]));
        assert_eq!(collect_dead_journals(&root, "me"), 0, "shard 12 was left dirty and is not replayed yet");
        assert!(dead.exists() && mark_path(&dead).exists());
        // Neither a last line without its end nor a line of three fields is a note.
        fs::write(dead.join("replayed"), b"17 1 9\n12 1").unwrap();
        assert!(read_replayed(&dead).is_empty(), "{:?}", read_replayed(&dead));
    }

    #[test]
    fn a_marked_journal_deleted_by_hand_is_lost_until_its_mark_goes_too() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("journal");
        let journal = root.join("w1");
        fs::create_dir_all(&journal).unwrap();
        mark_writer(&journal).unwrap();
        assert!(lost_journal(&root, "w1", ShardId(4)).is_none(), "the journal is there");
        assert!(lost_journal(&root, "never-written", ShardId(4)).is_none(), "no mark: it held nothing");
        fs::remove_dir_all(&root).unwrap();
        let lost = lost_journal(&root, "w1", ShardId(4)).expect("a marked journal gone is lost").to_string();
        assert!(lost.contains("shard 4") && lost.contains("delete") && lost.contains("journal-writers"), "{lost}");
        fs::remove_file(mark_path(&journal)).unwrap();
        assert!(lost_journal(&root, "w1", ShardId(4)).is_none(), "deleting the mark accepts the loss");
    }
}
