//! Metric names of the coordinator, in one place, with their descriptions, and the
//! handles the per-task path records to.
//!
//! A `counter!` or `gauge!` call builds its key, hashes it and looks it up in the
//! recorder's registry every time, and with labels it also allocates them. The paths that
//! run for every task (a shard actor's starts, results and commits, the dispatcher's
//! publishes, the API's requests) register their handles once and keep them.

use std::collections::HashMap;
use std::sync::Arc;

use flowgrid_engine::RunStatus;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Histogram, Unit,
};

pub const RUNS_STARTED: &str = "flowgrid_runs_started_total";
pub const SUBMITS_REFUSED: &str = "flowgrid_submits_refused_total";
pub const RUNS_FINISHED: &str = "flowgrid_runs_finished_total";
pub const RUN_DURATION: &str = "flowgrid_run_duration_seconds";
/// Buckets of [`RUN_DURATION`]: from a few milliseconds (a run of engine steps) to an hour.
pub const RUN_DURATION_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1_800.0, 3_600.0];
pub const RUNS_ACTIVE: &str = "flowgrid_runs_active";
pub const RUNS_HELD_BACK: &str = "flowgrid_runs_held_back";
pub const TASKS_DISPATCHED: &str = "flowgrid_tasks_dispatched_total";
pub const TASKS_PUBLISH_FAILED: &str = "flowgrid_tasks_publish_failed_total";
pub const TASKS_PUBLISH_GIVEN_UP: &str = "flowgrid_tasks_publish_given_up_total";
pub const TASK_PUBLISH_SECONDS: &str = "flowgrid_task_publish_seconds";
pub const STEP_SECONDS: &str = "flowgrid_step_seconds";
pub const TASK_RESULTS: &str = "flowgrid_task_results_total";
pub const TASKS_IN_FLIGHT: &str = "flowgrid_tasks_in_flight";
pub const TASKS_CANCELLED: &str = "flowgrid_tasks_cancelled_total";
pub const TASK_CACHE: &str = "flowgrid_task_cache_total";
pub const COMMIT_SECONDS: &str = "flowgrid_store_commit_seconds";
pub const COMMIT_BATCH_EVENTS: &str = "flowgrid_store_commit_batch_events";
pub const COMMIT_FAILED: &str = "flowgrid_store_commit_failed_total";
pub const SHARDS_OWNED: &str = "flowgrid_shards_owned";
pub const API_REQUESTS: &str = "flowgrid_api_requests_total";
pub const API_REJECTED: &str = "flowgrid_api_rejected_total";
pub const TIMERS_FIRED: &str = "flowgrid_timers_fired_total";
pub const LEASE_LOST: &str = "flowgrid_lease_lost_total";
pub const SHARD_ACQUIRE_SECONDS: &str = "flowgrid_shard_acquire_seconds";
pub const SHARD_RELEASE_SECONDS: &str = "flowgrid_shard_release_seconds";
pub const SHARD_TAKEOVERS: &str = "flowgrid_shard_takeovers_total";
pub const RUNS_PRUNED: &str = "flowgrid_runs_pruned_total";
pub const RUNS_REDRIVEN: &str = "flowgrid_runs_redriven_total";
pub const RUNS_PAUSED: &str = "flowgrid_runs_paused_total";
pub const RUNS_QUEUED: &str = "flowgrid_runs_queued_total";
pub const RUNS_ADMITTED: &str = "flowgrid_runs_admitted_total";
pub const RUNS_TURNED_AWAY: &str = "flowgrid_runs_turned_away_total";
pub const RUNS_WAITING_FOR_SLOT: &str = "flowgrid_runs_waiting_for_slot";
pub const RUNS_RESUMED: &str = "flowgrid_runs_resumed_total";
pub const TRIGGER_MESSAGES: &str = "flowgrid_trigger_messages_total";
pub const SCHEDULED_RUNS: &str = "flowgrid_scheduled_runs_total";
pub const RUN_MESSAGES_PENDING: &str = "flowgrid_run_messages_pending";
pub const RUN_MESSAGES_RETRIED: &str = "flowgrid_run_messages_retried_total";
pub const RUN_MESSAGES_UNREADABLE: &str = "flowgrid_run_messages_unreadable_total";
pub const POOL_TASKS_WAITING: &str = "flowgrid_pool_tasks_waiting";
pub const POOL_TASKS_WITH_WORKERS: &str = "flowgrid_pool_tasks_with_workers";
pub const POOL_PULLS_WAITING: &str = "flowgrid_pool_pulls_waiting";
pub const POOL_WORKERS: &str = "flowgrid_pool_workers";
pub const POOL_WORKER_SLOTS: &str = "flowgrid_pool_worker_slots";

/// Every metric a coordinator exports (its store's too), for checks of dashboards and alert
/// rules against them. A new metric goes here as well as into [`describe`].
pub const NAMES: &[&str] = &[
    RUNS_STARTED,
    SUBMITS_REFUSED,
    RUNS_FINISHED,
    RUN_DURATION,
    RUNS_ACTIVE,
    RUNS_HELD_BACK,
    TASKS_DISPATCHED,
    TASKS_PUBLISH_FAILED,
    TASKS_PUBLISH_GIVEN_UP,
    TASK_PUBLISH_SECONDS,
    STEP_SECONDS,
    TASK_RESULTS,
    TASKS_IN_FLIGHT,
    TASKS_CANCELLED,
    TASK_CACHE,
    COMMIT_SECONDS,
    COMMIT_BATCH_EVENTS,
    COMMIT_FAILED,
    SHARDS_OWNED,
    API_REQUESTS,
    API_REJECTED,
    TIMERS_FIRED,
    LEASE_LOST,
    SHARD_ACQUIRE_SECONDS,
    SHARD_RELEASE_SECONDS,
    SHARD_TAKEOVERS,
    RUNS_PRUNED,
    RUNS_REDRIVEN,
    RUNS_PAUSED,
    RUNS_QUEUED,
    RUNS_ADMITTED,
    RUNS_TURNED_AWAY,
    RUNS_WAITING_FOR_SLOT,
    RUNS_RESUMED,
    TRIGGER_MESSAGES,
    SCHEDULED_RUNS,
    RUN_MESSAGES_PENDING,
    RUN_MESSAGES_RETRIED,
    RUN_MESSAGES_UNREADABLE,
    POOL_TASKS_WAITING,
    POOL_TASKS_WITH_WORKERS,
    POOL_PULLS_WAITING,
    POOL_WORKERS,
    POOL_WORKER_SLOTS,
    flowgrid_store_redb::JOURNAL_BYTES,
    flowgrid_store_redb::JOURNAL_SYNC_SECONDS,
    flowgrid_store_redb::CHECKPOINT_SECONDS,
    flowgrid_store_redb::CHECKPOINT_FAILED,
];

/// The one histogram exported with buckets (`_bucket` series); the others are summaries
/// (`quantile` labels).
pub const BUCKETED: &[&str] = &[RUN_DURATION];

pub fn describe() {
    flowgrid_store_redb::describe_metrics();
    // Counters the alerts watch exist from the start, at 0: `increase` over a series that
    // appears with its first event does not see that event.
    for name in [API_REJECTED, COMMIT_FAILED, LEASE_LOST, SHARD_TAKEOVERS] {
        ::metrics::counter!(name).increment(0);
    }
    for kind in crate::records::OUTBOX_KINDS.iter().chain([&crate::shard::START_CHILD]) {
        ::metrics::counter!(RUN_MESSAGES_RETRIED, "kind" => *kind).increment(0);
        ::metrics::gauge!(RUN_MESSAGES_PENDING, "kind" => *kind).increment(0.0);
    }
    ::metrics::gauge!(RUNS_WAITING_FOR_SLOT).increment(0.0);
    // Exported at 0 before any shard opens, so that a grid whose coordinators serve no
    // shard at all (none can open its store) is seen by the alert on owned shards.
    ::metrics::gauge!(SHARDS_OWNED).increment(0.0);
    describe_counter!(RUNS_STARTED, Unit::Count, "Runs started.");
    describe_counter!(
        SUBMITS_REFUSED,
        Unit::Count,
        "Durable submits refused and kept in the refused-submits stream (label: code)."
    );
    describe_counter!(RUNS_FINISHED, Unit::Count, "Runs that reached a terminal status (label: status).");
    describe_histogram!(
        RUN_DURATION,
        Unit::Seconds,
        "From a run's start to its end, by flow and status (its count: runs ended by flow and status)."
    );
    describe_gauge!(RUNS_ACTIVE, Unit::Count, "Runs started and not yet ended, held in memory.");
    describe_gauge!(
        RUNS_HELD_BACK,
        Unit::Count,
        "Active runs their shard could not load from the store (the coordinator's log says why); requests about them \
         are refused until a coordinator that can load them serves the shard."
    );
    describe_counter!(TASKS_DISPATCHED, Unit::Count, "Task attempts published to JetStream (label: pool).");
    describe_counter!(TASKS_PUBLISH_FAILED, Unit::Count, "Task publishes that failed and were retried (label: pool).");
    describe_counter!(
        TASKS_PUBLISH_GIVEN_UP,
        Unit::Count,
        "Tasks whose publish failed and was given up, past their attempt's deadline or while too many others waited to \
         be retried: their attempt timeouts retry them (label: pool)."
    );
    describe_histogram!(
        TASK_PUBLISH_SECONDS,
        Unit::Seconds,
        "From the commit that dispatched a task to JetStream's ack of its publish (queue, retries included)."
    );
    describe_histogram!(
        STEP_SECONDS,
        Unit::Seconds,
        "Step overhead: from a shard taking a worker's result to JetStream's ack of the next task it led to."
    );
    describe_counter!(
        TASK_RESULTS,
        Unit::Count,
        "Attempts closed by a result or a timeout (labels: pool, outcome: succeeded, failed, timed_out)."
    );
    describe_gauge!(TASKS_IN_FLIGHT, Unit::Count, "Task attempts dispatched and not finished (label: pool).");
    describe_counter!(
        TASKS_CANCELLED,
        Unit::Count,
        "Task attempts closed without their results while out with workers, whose workers were told to stop \
         (label: pool)."
    );
    describe_counter!(
        TASK_CACHE,
        Unit::Count,
        "Task cache lookups and stores of steps with `cache` (labels: pool, outcome: hit, miss, stored, skipped \
         when too many were out or the bucket failed)."
    );
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Duration of one shard store commit (group commit).");
    describe_histogram!(COMMIT_BATCH_EVENTS, Unit::Count, "Commands applied in one shard store commit.");
    describe_counter!(COMMIT_FAILED, Unit::Count, "Shard store commits that failed.");
    describe_gauge!(SHARDS_OWNED, Unit::Count, "Shards this coordinator owns.");
    describe_counter!(API_REQUESTS, Unit::Count, "API requests handled (labels: verb, outcome).");
    describe_counter!(API_REJECTED, Unit::Count, "API requests refused because of overload.");
    describe_counter!(TIMERS_FIRED, Unit::Count, "Durable timers that came due (retries, timeouts, waits).");
    describe_counter!(RUNS_PRUNED, Unit::Count, "Ended runs deleted from the store after --retain-ended-runs.");
    describe_counter!(RUNS_REDRIVEN, Unit::Count, "Ended runs redriven (run.redrive) and active again.");
    describe_counter!(RUNS_PAUSED, Unit::Count, "Running runs paused (run.pause).");
    describe_counter!(RUNS_RESUMED, Unit::Count, "Paused runs resumed (run.resume).");
    describe_counter!(
        RUNS_QUEUED,
        Unit::Count,
        "Runs of flows with a concurrency limit that started (or were redriven) queued, asking for a slot."
    );
    describe_counter!(RUNS_ADMITTED, Unit::Count, "Queued runs admitted by their flow's concurrency limit.");
    describe_gauge!(
        RUNS_WAITING_FOR_SLOT,
        Unit::Count,
        "Runs queued in the concurrency limits whose gates this coordinator's shards keep, waiting for a slot."
    );
    describe_counter!(
        RUNS_TURNED_AWAY,
        Unit::Count,
        "Runs a concurrency limit asked to be cancelled, by its `when_full` (cancel_new: the new run; cancel_oldest: \
         the oldest one)."
    );
    describe_counter!(
        TRIGGER_MESSAGES,
        Unit::Count,
        "Messages of a flow's trigger stream, by flow and outcome: started (a run), malformed (not JSON), input_failed (the input expression failed), refused, or too_old (published longer ago than the retention of ended runs, so its run may have been deleted)."
    );
    describe_gauge!(
        RUN_MESSAGES_PENDING,
        Unit::Count,
        "Messages a commit decided, being sent: child starts, child ends, child cancels, run-end announcements, concurrency limits' acquires, admissions and releases (label: kind)."
    );
    describe_counter!(
        RUN_MESSAGES_RETRIED,
        Unit::Count,
        "Tries of such a message that did not get through and were repeated (label: kind)."
    );
    describe_counter!(
        RUN_MESSAGES_UNREADABLE,
        Unit::Count,
        "Messages in a shard's outbox this coordinator cannot read (they do not decode, or their chunks do not join): \
         kept and not sent; its log names each key (label: kind)."
    );
    describe_counter!(
        SCHEDULED_RUNS,
        Unit::Count,
        "Slots of flow schedules fired (label outcome: started, already_started, failed)."
    );
    describe_counter!(
        LEASE_LOST,
        Unit::Count,
        "Times this coordinator's lease ran out before a heartbeat got through."
    );
    describe_histogram!(
        SHARD_ACQUIRE_SECONDS,
        Unit::Seconds,
        "From claiming a shard to serving it (file open, epoch bump, reload)."
    );
    describe_histogram!(
        SHARD_RELEASE_SECONDS,
        Unit::Seconds,
        "From stopping work on a shard to releasing its claim (last commit, close)."
    );
    describe_counter!(SHARD_TAKEOVERS, Unit::Count, "Shards taken from a coordinator whose lease ran out.");
    // The pools' figures: every coordinator exports the same ones (aggregate with `max by (pool)`).
    describe_gauge!(
        POOL_TASKS_WAITING,
        Unit::Count,
        "Tasks of the pool waiting for a worker, over its priority lanes (label: pool; the same on every coordinator)."
    );
    describe_gauge!(
        POOL_TASKS_WITH_WORKERS,
        Unit::Count,
        "Tasks of the pool delivered to a worker and not yet acknowledged (label: pool)."
    );
    describe_gauge!(
        POOL_PULLS_WAITING,
        Unit::Count,
        "Pull requests open on the pool's consumers: each worker with a free slot keeps one (label: pool)."
    );
    describe_gauge!(POOL_WORKERS, Unit::Count, "Live workers of the pool, by their records (label: pool).");
    describe_gauge!(
        POOL_WORKER_SLOTS,
        Unit::Count,
        "Tasks the pool's live workers run at once, at most: the sum of their concurrency (label: pool)."
    );
}

/// What a shard actor records, registered when the actor starts.
pub struct ShardMetrics {
    pub runs_started: Counter,
    pub runs_active: Gauge,
    pub runs_held_back: Gauge,
    pub commit_seconds: Histogram,
    pub commit_batch_events: Histogram,
    /// Runs ended, by status, in the order of [`ENDED`].
    runs_finished: [Counter; 4],
    /// Run durations by flow, then by status in the order of [`ENDED`].
    flows: HashMap<String, [Histogram; 4], foldhash::fast::RandomState>,
    pools: HashMap<Arc<str>, TaskMetrics>,
}

/// A pool's task attempts, as a shard actor sees them.
pub struct TaskMetrics {
    pub in_flight: Gauge,
    pub succeeded: Counter,
    pub failed: Counter,
    pub timed_out: Counter,
}

/// The statuses a run ends in.
const ENDED: [RunStatus; 4] = [RunStatus::Succeeded, RunStatus::Failed, RunStatus::Cancelled, RunStatus::TimedOut];

impl ShardMetrics {
    pub fn register() -> ShardMetrics {
        ShardMetrics {
            runs_started: counter!(RUNS_STARTED),
            runs_active: gauge!(RUNS_ACTIVE),
            runs_held_back: gauge!(RUNS_HELD_BACK),
            commit_seconds: histogram!(COMMIT_SECONDS),
            commit_batch_events: histogram!(COMMIT_BATCH_EVENTS),
            runs_finished: ENDED.map(|status| counter!(RUNS_FINISHED, "status" => status.as_str())),
            flows: HashMap::default(),
            pools: HashMap::new(),
        }
    }

    /// A run of `flow` ended in `status`, `seconds` after it started.
    pub fn run_finished(&mut self, flow: &str, status: RunStatus, seconds: f64) {
        let Some(index) = ENDED.iter().position(|ended| *ended == status) else { return };
        self.runs_finished[index].increment(1);
        // One lookup for a flow seen before; its handles are registered the first time.
        match self.flows.get(flow) {
            Some(durations) => durations[index].record(seconds),
            None => {
                let durations = ENDED
                    .map(|status| histogram!(RUN_DURATION, "flow" => flow.to_owned(), "status" => status.as_str()));
                durations[index].record(seconds);
                self.flows.insert(flow.to_owned(), durations);
            }
        }
    }

    /// The pool's handles, registered the first time the pool is seen (pools are few).
    pub fn pool(&mut self, pool: &Arc<str>) -> &TaskMetrics {
        self.pools.entry(Arc::clone(pool)).or_insert_with_key(|pool| {
            let result =
                |outcome: &'static str| counter!(TASK_RESULTS, "pool" => Arc::clone(pool), "outcome" => outcome);
            TaskMetrics {
                in_flight: gauge!(TASKS_IN_FLIGHT, "pool" => Arc::clone(pool)),
                succeeded: result("succeeded"),
                failed: result("failed"),
                timed_out: result("timed_out"),
            }
        })
    }
}

/// Helpers for tests of what is recorded.
#[cfg(test)]
pub(crate) mod testing {
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

    /// A recorder of a test's own: it records what runs in [`Recording::record`], on that
    /// thread only, so tests running at once do not see each other's metrics. Handles
    /// registered there keep recording to it.
    pub(crate) struct Recording {
        recorder: PrometheusRecorder,
        handle: PrometheusHandle,
    }

    impl Recording {
        pub(crate) fn new() -> Recording {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            Recording { recorder, handle }
        }

        /// Runs `work` with this recorder.
        pub(crate) fn record<T>(&self, work: impl FnOnce() -> T) -> T {
            ::metrics::with_local_recorder(&self.recorder, work)
        }

        /// What was recorded, as the coordinator's endpoint renders it.
        pub(crate) fn render(&self) -> String {
            self.handle.render()
        }

        /// The value of the first sample whose line starts with `prefix` (`name{label="v"`,
        /// or `name ` for a sample without labels).
        pub(crate) fn sample(&self, prefix: &str) -> Option<f64> {
            let body = self.render();
            body.lines().filter(|line| line.starts_with(prefix)).find_map(|line| line.rsplit(' ').next()?.parse().ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FlowgridShardsUnowned` sums `flowgrid_shards_owned` over the coordinators: a
    /// coordinator that opened no shard yet exports it at 0, not nothing.
    #[test]
    fn owned_shards_are_exported_before_any_shard_opens() {
        let recording = testing::Recording::new();
        recording.record(describe);
        assert_eq!(recording.sample("flowgrid_shards_owned "), Some(0.0), "{}", recording.render());
    }

    #[test]
    fn every_metric_named_in_this_module_is_listed_in_names() {
        let source = include_str!("metrics.rs");
        let declared: Vec<&str> = source
            .lines()
            .filter(|line| line.starts_with("pub const ") && line.contains(": &str = \"flowgrid_"))
            .filter_map(|line| line.split('"').nth(1))
            .collect();
        assert!(declared.len() > 30, "the scan found the names: {declared:?}");
        for name in declared {
            assert!(NAMES.contains(&name), "{name} is missing from NAMES");
        }
    }
}
