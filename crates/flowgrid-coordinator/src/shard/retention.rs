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

use flowgrid_model::{Millis, RunId};
use flowgrid_proto::RunSummary;
use flowgrid_store::{keys, KeyRange, ShardStore};
use tracing::{debug, warn};

use super::actor::ShardActor;
use super::batch::Batch;
use crate::metrics;
use crate::records;

/// Listing entries one pass reads.
const PRUNE_SCAN_MAX: usize = 2_000;
/// Runs one pass deletes.
const PRUNE_RUNS_MAX: usize = 500;
/// The next pass after one that did not reach the cutoff (a backlog, or runs kept).
const PRUNE_BACKLOG_PAUSE_MS: Millis = 1_000;

/// How often a shard looks for runs past the retention: a quarter of it, from 1 s to 1 min.
pub(super) fn prune_interval_ms(retain_ms: u64) -> Millis {
    (retain_ms / 4).clamp(1_000, 60_000)
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
        // Only runs created before the cutoff can have ended before it.
        let end = keys::created(cutoff, &RunId("".into()));
        let begin = self.prune_from.take().filter(|from| *from < end).unwrap_or(keys::created_range().begin);
        let entries = match self.store.scan(KeyRange { begin, end }, PRUNE_SCAN_MAX, false).await {
            Ok(entries) => entries,
            Err(error) => {
                warn!(shard = %self.shard, error = %error, "cannot read the runs listing to apply the retention; trying again later");
                return now + prune_interval_ms(retain_ms);
            }
        };
        let mut pruned = 0;
        let bytes_max = self.batch_bytes_max();
        // Where the next pass goes on: after what this one read, unless it read to the cutoff.
        let mut resume_at = (entries.len() == PRUNE_SCAN_MAX)
            .then(|| entries.last().map(|(last, _)| [last.as_slice(), &[0]].concat()))
            .flatten();
        for (key, value) in entries {
            if pruned == PRUNE_RUNS_MAX || batch.writes.bytes() >= bytes_max {
                resume_at = Some(key);
                break;
            }
            let Ok((created_ms, run_id)) = keys::decode_created(&key) else { continue };
            if created_ms >= cutoff {
                break;
            }
            let Ok(summary) = records::decode::<RunSummary>("run summary", &value) else { continue };
            // A running run (a listing entry written by an older release) stays.
            let ended_before_cutoff = summary.ended_ms.is_some_and(|ended| ended < cutoff);
            if !ended_before_cutoff || self.runs.contains_key(&run_id) {
                continue;
            }
            batch.writes.clear(keys::run(&run_id));
            batch.writes.clear_range(keys::history_range(&run_id));
            batch.writes.clear_range(keys::chunks_range(&keys::snapshot(&run_id)));
            batch.writes.clear(key);
            pruned += 1;
        }
        if pruned > 0 {
            ::metrics::counter!(metrics::RUNS_PRUNED).increment(pruned as u64);
            debug!(shard = %self.shard, runs = pruned, "ended runs past the retention deleted");
        }
        let pause = if resume_at.is_some() { PRUNE_BACKLOG_PAUSE_MS } else { prune_interval_ms(retain_ms) };
        self.prune_from = resume_at;
        now + pause
    }
}
