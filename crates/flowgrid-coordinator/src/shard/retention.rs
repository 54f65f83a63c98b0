//! Retention: a shard deletes the runs that ended longer ago than `--retain-ended-runs`.
//!
//! The listing index holds ended runs by creation time, oldest first, so a sweep reads it
//! from its start up to the cutoff and deletes every run there that ended before the
//! cutoff: its record, history, snapshot and listing entry, in the batch the actor commits
//! next (epoch-fenced like every other write, and all of a run or none of it). A pass reads
//! at most [`PRUNE_SCAN_MAX`] entries and deletes at most [`PRUNE_RUNS_MAX`] runs; a pass
//! that did not reach the cutoff leaves the sweep's place and the next comes soon, so a
//! backlog drains in steps that keep commits small, and runs that ended after the cutoff
//! (created long before it, they fill the index's start) do not hide the runs behind them.
//! A pass stops once the batch holds its bytes, but deletes one run first whatever the
//! batch holds (a deletion is a few small clears): under a load that fills every batch,
//! the store would otherwise grow without end.
//!
//! A run stays while the shard's outbox holds a message about it (`outbox.rs`), above all
//! a child's end that its parent has not taken yet: the parent's shard may be out of reach
//! for longer than the retention (its owner stopped or cut off), and once back it still
//! waits for the child and starts it again; a child deleted meanwhile would run again, as
//! a new run under the same id. A pass reads the outbox once, at most
//! [`PRUNE_OUTBOX_SCAN_MAX`] messages in run id order; the runs after the last one read stay
//! until the outbox holds fewer.

use std::collections::HashSet;

use flowgrid_model::{Millis, RunId};
use flowgrid_proto::RunSummary;
use flowgrid_store::{keys, Key, KeyRange, ShardStore, WriteBatch};
use tracing::{debug, warn};

use super::actor::ShardActor;
use super::batch::Batch;
use crate::metrics;
use crate::records;

/// Listing entries one pass reads.
const PRUNE_SCAN_MAX: usize = 2_000;
/// Runs one pass deletes.
const PRUNE_RUNS_MAX: usize = 500;
/// Outbox messages one pass reads to learn which runs they are about, and their bytes
/// (only their keys matter; a page ends before more).
const PRUNE_OUTBOX_SCAN_MAX: usize = 1_000;
const PRUNE_OUTBOX_SCAN_BYTES_MAX: usize = 1 << 20;
/// The next pass after one that did not reach the cutoff (a backlog, or runs kept).
const PRUNE_BACKLOG_PAUSE_MS: Millis = 1_000;

/// How often a shard looks for runs past the retention: a quarter of it, from 1 s to 1 min.
pub(super) fn prune_interval_ms(retain_ms: u64) -> Millis {
    (retain_ms / 4).clamp(1_000, 60_000)
}

/// What one pass may read and delete: [`PASS_BOUNDS`] in a shard, smaller in tests.
#[derive(Clone, Copy, Debug)]
struct PassBounds {
    scan_entries: usize,
    runs: usize,
    outbox_messages: usize,
}

const PASS_BOUNDS: PassBounds =
    PassBounds { scan_entries: PRUNE_SCAN_MAX, runs: PRUNE_RUNS_MAX, outbox_messages: PRUNE_OUTBOX_SCAN_MAX };

/// What one pass queued.
#[derive(Debug)]
struct Pass {
    /// Runs whose deletion is queued.
    pruned: usize,
    /// Where the next pass goes on; `None`: from the listing's start.
    resume_at: Option<Key>,
    /// The read that ended the pass early.
    failed: Option<flowgrid_store::Error>,
}

impl Pass {
    /// The pass ends at the listing entry `key`, which the next one reads again.
    fn stopped_at(mut self, key: Key, error: flowgrid_store::Error) -> Pass {
        self.resume_at = Some(key);
        self.failed = Some(error);
        self
    }
}

impl<S: ShardStore> ShardActor<S> {
    /// Runs a retention pass when one is due (never without `--retain-ended-runs`).
    pub(super) async fn prune_if_due(&mut self, now: Millis, batch: &mut Batch) {
        let (Some(retain_ms), Some(due)) = (self.context.retain_ended_ms, self.next_prune_ms) else { return };
        if now >= due {
            self.next_prune_ms = Some(self.prune_ended_runs(retain_ms, now, batch).await);
        }
    }

    /// Queues the deletion of the runs that ended before `now - retain_ms` on `batch`;
    /// returns when the next pass is due.
    async fn prune_ended_runs(&mut self, retain_ms: u64, now: Millis, batch: &mut Batch) -> Millis {
        let cutoff = now.saturating_sub(retain_ms);
        let from = self.prune_from.take();
        let bytes_max = self.batch_bytes_max();
        let runs = &self.runs;
        let loaded = |run_id: &RunId| runs.contains_key(run_id);
        let pass = queue_pass(&*self.store, from, cutoff, loaded, &mut batch.writes, bytes_max, &PASS_BOUNDS).await;
        if let Some(error) = &pass.failed {
            warn!(shard = %self.shard, error = %error, "cannot read the store to apply the retention; trying again later");
        }
        if pass.pruned > 0 {
            ::metrics::counter!(metrics::RUNS_PRUNED).increment(pass.pruned as u64);
            debug!(shard = %self.shard, runs = pass.pruned, "ended runs past the retention deleted");
        }
        let pause = match (&pass.failed, &pass.resume_at) {
            (None, Some(_)) => PRUNE_BACKLOG_PAUSE_MS,
            _ => prune_interval_ms(retain_ms),
        };
        self.prune_from = pass.resume_at;
        now + pause
    }
}

/// Queues on `writes` the deletion of the runs of the listing from `from` (or its start)
/// that ended before `cutoff`, are not `loaded` and have no message in the outbox, within
/// `bounds` and until `writes` holds `bytes_max`, but at least one however much it holds.
async fn queue_pass<S: ShardStore>(
    store: &S,
    from: Option<Key>,
    cutoff: Millis,
    loaded: impl Fn(&RunId) -> bool,
    writes: &mut WriteBatch,
    bytes_max: usize,
    bounds: &PassBounds,
) -> Pass {
    // Only runs created before the cutoff can have ended before it.
    let end = keys::created(cutoff, &RunId("".into()));
    let begin = from.clone().filter(|from| *from < end).unwrap_or(keys::created_range().begin);
    let entries = match store.scan(KeyRange { begin, end }, bounds.scan_entries, false).await {
        Ok(entries) => entries,
        Err(error) => return Pass { pruned: 0, resume_at: from, failed: Some(error) },
    };
    // Where the next pass goes on: after what this one read, unless it read to the cutoff.
    let resume_at = (entries.len() == bounds.scan_entries)
        .then(|| entries.last().map(|(last, _)| [last.as_slice(), &[0]].concat()))
        .flatten();
    let mut pass = Pass { pruned: 0, resume_at, failed: None };
    // Read when the first run to delete is found: most passes find none.
    let mut outbox: Option<OutboxRuns> = None;
    for (key, value) in entries {
        if pass.pruned == bounds.runs || (pass.pruned > 0 && writes.bytes() >= bytes_max) {
            pass.resume_at = Some(key);
            break;
        }
        let Ok((created_ms, run_id)) = keys::decode_created(&key) else { continue };
        if created_ms >= cutoff {
            break;
        }
        let Ok(summary) = records::decode::<RunSummary>("run summary", &value) else { continue };
        // A running run (a listing entry written by an older release) stays.
        let ended_before_cutoff = summary.ended_ms.is_some_and(|ended| ended < cutoff);
        if !ended_before_cutoff || loaded(&run_id) {
            continue;
        }
        if outbox.is_none() {
            match OutboxRuns::read(store, bounds.outbox_messages).await {
                Ok(read) => outbox = Some(read),
                Err(error) => return pass.stopped_at(key, error),
            }
        }
        if outbox.as_ref().is_some_and(|outbox| outbox.may_hold(&run_id)) {
            continue;
        }
        writes.clear(keys::run(&run_id));
        writes.clear_range(keys::history_range(&run_id));
        writes.clear_range(keys::chunks_range(&keys::snapshot(&run_id)));
        writes.clear(key);
        pass.pruned += 1;
    }
    pass
}

/// The runs the shard's outbox holds messages about, as far as a pass reads it.
struct OutboxRuns {
    runs: HashSet<RunId>,
    /// The key of the last message read when more follow: the runs after it (the outbox is
    /// in run id order) may have messages too.
    read_up_to: Option<Key>,
}

impl OutboxRuns {
    async fn read<S: ShardStore>(store: &S, messages_max: usize) -> flowgrid_store::Result<OutboxRuns> {
        let page = store.scan_records(keys::outbox_range(), messages_max, PRUNE_OUTBOX_SCAN_BYTES_MAX).await?;
        // A key that does not decode names no run (a reload that sends the outbox fails on it).
        let runs = page.records.iter().filter_map(|(key, _)| keys::decode_outbox(key).ok()).map(|(run, _)| run);
        let runs = runs.collect();
        let read_up_to = page.more.then(|| page.records.last().map(|(key, _)| key.clone())).flatten();
        Ok(OutboxRuns { runs, read_up_to })
    }

    /// Whether the outbox may hold a message about `run_id`.
    fn may_hold(&self, run_id: &RunId) -> bool {
        // Every message about a run sorts at or after its key with an empty `what`.
        self.runs.contains(run_id) || self.read_up_to.as_ref().is_some_and(|last| keys::outbox(run_id, "") > *last)
    }
}

#[cfg(test)]
mod tests {
    use flowgrid_engine::RunStatus;
    use flowgrid_store::StoreLimits;

    use super::*;
    use crate::records::RunRecord;
    use crate::shard::testing::{test_shard, TestShard};

    /// Every run of these tests ended at this time; passes look with a later cutoff.
    const ENDED_MS: Millis = 5_000;
    const CUTOFF_MS: Millis = 10_000;

    /// The shard the tests' runs are in.
    struct Shard(TestShard);

    async fn shard() -> Shard {
        Shard(test_shard().await)
    }

    impl std::ops::Deref for Shard {
        type Target = TestShard;

        fn deref(&self) -> &TestShard {
            &self.0
        }
    }

    impl Shard {
        async fn commit(&self, batch: WriteBatch) {
            self.file.commit(self.epoch, batch).await.unwrap();
        }

        /// Writes an ended run as a shard does: a history of two records, its record,
        /// snapshot and listing entry.
        async fn write_ended(&self, run: &str, created_ms: Millis) {
            let (run_id, limits) = (RunId(run.into()), StoreLimits::default());
            let mut batch = WriteBatch::new();
            for seq in 0..2 {
                batch.insert_chunked(&keys::history(&run_id, seq), b"h", &limits);
            }
            let record = RunRecord {
                flow: "f".into(),
                version: 1,
                status: RunStatus::Succeeded,
                created_ms,
                ended_ms: Some(ENDED_MS),
                view_in_history: false,
            };
            batch.set(keys::run(&run_id), records::encode(&record));
            batch.set_chunked(&keys::snapshot(&run_id), b"view", &limits);
            let summary = RunSummary {
                run_id: run_id.clone(),
                flow: "f".into(),
                version: 1,
                status: RunStatus::Succeeded,
                created_ms,
                ended_ms: Some(ENDED_MS),
                parent: None,
                paused: false,
                queued: false,
                delayed: false,
                labels: Default::default(),
            };
            batch.set(keys::created(created_ms, &run_id), records::encode(&summary));
            self.commit(batch).await;
        }

        /// Puts a message about `run` into the outbox (its content does not matter here).
        async fn write_message(&self, run: &str) -> Vec<u8> {
            let key = keys::outbox(&RunId(run.into()), "child_ended");
            let mut batch = WriteBatch::new();
            batch.set_chunked(&key, b"message", &StoreLimits::default());
            self.commit(batch).await;
            key
        }

        /// One pass, committed; returns it.
        async fn pass(&self, from: Option<Key>, bounds: &PassBounds) -> Pass {
            let mut writes = WriteBatch::new();
            let pass = queue_pass(&self.file, from, CUTOFF_MS, |_| false, &mut writes, usize::MAX, bounds).await;
            assert!(pass.failed.is_none(), "{pass:?}");
            self.commit(writes).await;
            pass
        }

        /// The runs of `runs` whose record, history, snapshot and listing entry are all still
        /// there (and none of them is half deleted).
        async fn kept(&self, runs: &[&str]) -> Vec<String> {
            let mut kept = Vec::new();
            for run in runs {
                let run_id = RunId((*run).into());
                let record = self.file.get(&keys::run(&run_id)).await.unwrap().is_some();
                let history = !self.file.scan(keys::history_range(&run_id), 1, false).await.unwrap().is_empty();
                let snapshot = self.file.get_chunked(&keys::snapshot(&run_id)).await.unwrap().is_some();
                let listing = self.file.scan(keys::created_range(), usize::MAX, false).await.unwrap();
                let listed = listing.iter().any(|(key, _)| keys::decode_created(key).is_ok_and(|(_, id)| id == run_id));
                assert!(record == history && history == snapshot && snapshot == listed, "{run} is half deleted");
                if record {
                    kept.push((*run).to_owned());
                }
            }
            kept
        }
    }

    #[tokio::test]
    async fn a_run_with_a_message_in_the_outbox_stays_until_the_message_is_taken() {
        let shard = shard().await;
        // A child whose end its parent has not taken yet, and one whose end it took.
        for (run, created_ms) in [("waiting-child", 1_000), ("taken-child", 1_001)] {
            shard.write_ended(run, created_ms).await;
        }
        let message = shard.write_message("waiting-child").await;

        let pass = shard.pass(None, &PASS_BOUNDS).await;
        assert_eq!((pass.pruned, pass.resume_at), (1, None));
        assert_eq!(shard.kept(&["waiting-child", "taken-child"]).await, ["waiting-child"]);

        // The parent took the end: the next pass deletes the child.
        let mut batch = WriteBatch::new();
        batch.clear_range(keys::chunks_range(&message));
        shard.commit(batch).await;
        assert_eq!(shard.pass(None, &PASS_BOUNDS).await.pruned, 1);
        assert!(shard.kept(&["waiting-child"]).await.is_empty());
    }

    /// Under a load that fills every batch to its bytes before the pass, retention still
    /// goes on, a run at a time.
    #[tokio::test]
    async fn a_pass_deletes_a_run_though_the_batch_is_already_full() {
        let shard = shard().await;
        let runs = ["run-a", "run-b"];
        for (created_ms, run) in (1_000..).zip(runs) {
            shard.write_ended(run, created_ms).await;
        }
        let bytes_max = 1_000;
        let mut writes = WriteBatch::new();
        writes.set(b"other-commands".to_vec(), vec![0; bytes_max]);
        assert!(writes.bytes() >= bytes_max);
        let pass = queue_pass(&shard.file, None, CUTOFF_MS, |_| false, &mut writes, bytes_max, &PASS_BOUNDS).await;
        assert!(pass.failed.is_none(), "{pass:?}");
        assert_eq!(pass.pruned, 1, "{pass:?}");
        assert!(pass.resume_at.is_some(), "the next pass goes on where this one stopped: {pass:?}");
        shard.commit(writes).await;
        assert_eq!(shard.kept(&runs).await, ["run-b"]);
    }

    #[tokio::test]
    async fn a_pass_reads_part_of_a_long_outbox_and_keeps_the_runs_after_what_it_read() {
        let shard = shard().await;
        let runs = ["run-0", "run-a", "run-b", "run-c"];
        for (created_ms, run) in (1_000..).zip(runs) {
            shard.write_ended(run, created_ms).await;
        }
        shard.write_message("run-a").await;
        shard.write_message("run-b").await;
        // The pass reads run-a's message only: run-b and run-c may have messages too.
        let short = PassBounds { outbox_messages: 1, ..PASS_BOUNDS };
        assert_eq!(shard.pass(None, &short).await.pruned, 1);
        assert_eq!(shard.kept(&runs).await, ["run-a", "run-b", "run-c"]);
        assert_eq!(shard.pass(None, &PASS_BOUNDS).await.pruned, 1);
        assert_eq!(shard.kept(&runs).await, ["run-a", "run-b"]);
    }
}
