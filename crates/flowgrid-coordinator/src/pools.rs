//! Gauges of every worker pool, for alerts and for scaling a pool's workers on its backlog:
//! its tasks waiting, out with workers and asked for, as the tasks stream's consumers count
//! them over the pool's priority lanes, and its live workers and their slots, as their
//! records in the workers bucket say.
//!
//! Invariants:
//! - The figures are the pool's, not this coordinator's: every coordinator exports the
//!   same ones, so dashboards and alerts aggregate them with `max by (pool)`, never `sum`.
//! - A worker counts while this coordinator saw its record written at most
//!   [`WorkerRecord::KEPT_MS`] ago, on this coordinator's clock: the bucket drops a
//!   silent worker's record without telling its watchers, and the record's `heartbeat_ms`
//!   is the worker's clock, which may be far off. A watch started anew replays the
//!   records as seen then, so a worker that stopped just before counts up to twice as long.
//! - A pool that had figures and no longer has (its consumers deleted, its workers gone)
//!   is set to zero rather than left at its last value.
//! - A read that fails (NATS away, a slow server) leaves the gauges as they were until
//!   the next one succeeds.
//! - When the reading ends (the coordinator stops serving, or serves a grid made anew
//!   after NATS lost its store), every pool it set is set to zero: a pool the next grid
//!   does not have keeps no figures of the last one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use futures::{StreamExt, TryStreamExt};
use metrics::gauge;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use flowgrid_proto::{decode, Encoding, Subjects, WorkerRecord};

use crate::clock::now_ms;
use crate::metrics::{
    POOL_PULLS_WAITING, POOL_TASKS_WAITING, POOL_TASKS_WITH_WORKERS, POOL_WORKERS, POOL_WORKER_SLOTS,
};

/// How long one read of the tasks stream's consumers may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One pool's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Figures {
    waiting: u64,
    with_workers: u64,
    pulls_waiting: u64,
    workers: u64,
    worker_slots: u64,
}

/// Reads the pools every `every` and sets their gauges, until `stop`.
pub async fn run(tasks: stream::Stream, workers_bucket: Option<kv::Store>, every: Duration, stop: CancellationToken) {
    let mut workers: HashMap<String, Seen> = HashMap::new();
    let mut watch: Option<kv::Watch> = None;
    let mut exported = Exported::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            entry = next_entry(&mut watch) => match entry {
                Some(Ok(entry)) => apply(&mut workers, entry, now_ms()),
                Some(Err(error)) => {
                    debug!(error = %error, "the workers bucket's watch failed; watching it again at the next read");
                    watch = None;
                }
                None => watch = None,
            },
            _ = tick.tick() => {
                if watch.is_none() {
                    if let Some(bucket) = &workers_bucket {
                        // Replays every record the bucket holds, then follows it.
                        match bucket.watch_with_history(">").await {
                            Ok(started) => {
                                workers.clear();
                                watch = Some(started);
                            }
                            Err(error) => debug!(error = %error, "cannot watch the workers bucket"),
                        }
                    }
                }
                let consumers = tokio::time::timeout(READ_TIMEOUT, tasks.consumers().try_collect::<Vec<_>>()).await;
                let consumers = match consumers {
                    Ok(Ok(consumers)) => consumers,
                    Ok(Err(error)) => {
                        debug!(error = %error, "cannot list the pools' consumers; pool gauges kept as they were");
                        continue;
                    }
                    Err(_) => {
                        debug!("listing the pools' consumers timed out; pool gauges kept as they were");
                        continue;
                    }
                };
                forget_silent(&mut workers, now_ms());
                let figures = pool_figures(&consumers, workers.values().map(|seen| &seen.record));
                export(&figures, &mut exported);
            }
        }
    }
}

/// The watch's next entry; never, while there is no watch.
async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

/// A worker's record, and when this coordinator saw it written (its own clock, in
/// Unix milliseconds).
struct Seen {
    record: WorkerRecord,
    seen_ms: u64,
}

/// Follows one change of the workers bucket, seen at `now`.
fn apply(workers: &mut HashMap<String, Seen>, entry: kv::Entry, now: u64) {
    match entry.operation {
        kv::Operation::Put => match decode::<WorkerRecord>(Encoding::MsgPack, &entry.value) {
            Ok(record) => {
                workers.insert(entry.key, Seen { record, seen_ms: now });
            }
            // A worker of another release: not counted rather than counted wrong.
            Err(error) => debug!(key = %entry.key, error = %error, "skipping a worker record"),
        },
        kv::Operation::Delete | kv::Operation::Purge => {
            workers.remove(&entry.key);
        }
    }
}

/// Forgets the workers whose record was not seen written for more than
/// [`WorkerRecord::KEPT_MS`] before `now` (the bucket has dropped it), whatever time the
/// worker's own clock put in it.
fn forget_silent(workers: &mut HashMap<String, Seen>, now: u64) {
    workers.retain(|_, seen| now.saturating_sub(seen.seen_ms) <= WorkerRecord::KEPT_MS);
}

/// Sums the lanes' consumers and the workers' records by pool.
fn pool_figures<'a>(
    consumers: &[async_nats::jetstream::consumer::Info],
    workers: impl Iterator<Item = &'a WorkerRecord>,
) -> BTreeMap<String, Figures> {
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    for info in consumers {
        let Some((pool, _priority)) = Subjects::parse_lane_consumer(&info.name) else { continue };
        let pool = figures.entry(pool.to_owned()).or_default();
        pool.waiting += info.num_pending;
        pool.with_workers += info.num_ack_pending as u64;
        pool.pulls_waiting += info.num_waiting as u64;
    }
    for record in workers {
        let pool = figures.entry(record.pool.clone()).or_default();
        pool.workers += 1;
        pool.worker_slots += u64::from(record.concurrency);
    }
    figures
}

/// The pools whose gauges a reading set last; it zeroes them when it is dropped, as
/// [`run`] returns or is dropped.
#[derive(Default)]
struct Exported(BTreeSet<String>);

impl Drop for Exported {
    fn drop(&mut self) {
        for pool in &self.0 {
            set_gauges(pool, &Figures::default());
        }
    }
}

/// Sets each pool's gauges, and zeroes those of pools that are gone.
fn export(figures: &BTreeMap<String, Figures>, exported: &mut Exported) {
    for gone in exported.0.iter().filter(|pool| !figures.contains_key(*pool)) {
        set_gauges(gone, &Figures::default());
    }
    for (pool, pool_figures) in figures {
        set_gauges(pool, pool_figures);
    }
    exported.0 = figures.keys().cloned().collect();
}

fn set_gauges(pool: &str, figures: &Figures) {
    let values = [
        (POOL_TASKS_WAITING, figures.waiting),
        (POOL_TASKS_WITH_WORKERS, figures.with_workers),
        (POOL_PULLS_WAITING, figures.pulls_waiting),
        (POOL_WORKERS, figures.workers),
        (POOL_WORKER_SLOTS, figures.worker_slots),
    ];
    for (name, value) in values {
        gauge!(name, "pool" => pool.to_owned()).set(value as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pool: &str, concurrency: u32) -> WorkerRecord {
        WorkerRecord {
            id: format!("{pool}.host-1-0000"),
            pool: pool.to_owned(),
            host: "host".to_owned(),
            pid: 1,
            concurrency,
            running: 0,
            tasks_done: 0,
            started_ms: 0,
            heartbeat_ms: 0,
            sdk: "test".to_owned(),
        }
    }

    /// A worker counts by when its record was seen written, not by its clock: one whose clock
    /// is behind still counts, one whose clock is ahead does not count once silent.
    #[test]
    fn a_worker_counts_by_when_its_record_was_seen_not_by_its_clock() {
        let now = 1_767_225_600_000;
        let with_heartbeat = |heartbeat_ms: u64| WorkerRecord { heartbeat_ms, ..worker("gpu", 4) };
        let mut workers = HashMap::from([
            ("behind".to_owned(), Seen { record: with_heartbeat(now - 40_000), seen_ms: now }),
            ("ahead".to_owned(), Seen { record: with_heartbeat(now + 3_600_000), seen_ms: now - 60_000 }),
            ("last".to_owned(), Seen { record: with_heartbeat(now), seen_ms: now - WorkerRecord::KEPT_MS }),
        ]);
        forget_silent(&mut workers, now);
        let mut kept: Vec<&str> = workers.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["behind", "last"]);
    }

    /// A pool no longer read is set to zero, and so is every pool a reading set once it
    /// ends: a coordinator serving a grid made anew keeps no figures of the last one.
    #[test]
    fn the_gauges_of_every_pool_exported_are_zeroed_when_the_reading_ends() {
        let recording = crate::metrics::testing::Recording::new();
        let gauges = |pool: &str| {
            let names =
                [POOL_TASKS_WAITING, POOL_TASKS_WITH_WORKERS, POOL_PULLS_WAITING, POOL_WORKERS, POOL_WORKER_SLOTS];
            names.map(|name| recording.sample(&format!("{name}{{pool=\"{pool}\"}}")).unwrap_or(f64::NAN))
        };
        let serving = Figures { waiting: 3, with_workers: 2, pulls_waiting: 1, workers: 1, worker_slots: 4 };
        let unserved = Figures { waiting: 3, ..Figures::default() };
        recording.record(|| {
            let mut exported = Exported::default();
            let both = BTreeMap::from([("gpu".to_owned(), serving), ("cpu".to_owned(), unserved)]);
            export(&both, &mut exported);
            assert_eq!((gauges("gpu"), gauges("cpu")), ([3.0, 2.0, 1.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0, 0.0]));
            export(&BTreeMap::from([("cpu".to_owned(), unserved)]), &mut exported);
            assert_eq!(gauges("gpu"), [0.0; 5], "a pool gone");
            drop(exported);
        });
        assert_eq!(gauges("cpu"), [0.0; 5], "{}", recording.render());
    }

    #[test]
    fn figures_sum_a_pools_workers_and_leave_pools_without_consumers_at_no_tasks() {
        let workers = [worker("gpu", 4), worker("gpu", 2), worker("cpu", 8)];
        let figures = pool_figures(&[], workers.iter());
        assert_eq!(figures["gpu"], Figures { workers: 2, worker_slots: 6, ..Figures::default() });
        assert_eq!(figures["cpu"], Figures { workers: 1, worker_slots: 8, ..Figures::default() });
    }
}
