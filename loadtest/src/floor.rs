//! The broker floor: the engine's message flow with no engine.
//!
//! A publisher publishes task messages of the workload's size (with `Nats-Msg-Id`, like
//! the coordinator) to a stream of its own made with the grid's settings (work-queue,
//! file storage, same pool consumers, under the prefix `ltfloor`); the same simulated
//! workers, as many and as concurrent as in the engine run, pull them and send a result
//! of the workload's size as a request to a responder that answers a `ResultAck` at
//! once, then ack the task. Tasks per second of that is what NATS itself can do on this
//! machine with these sizes: the ceiling of the engine's throughput.
//!
//! The publisher keeps at most twice the workers' total concurrency of tasks outstanding,
//! so the floor measures throughput, not an ever-growing backlog; against a closed loop,
//! no more than the engine run can have out (its runs in flight times each run's tasks in
//! flight), so that both are measured at the same depth of queued work (for the mix, over
//! its two pools together: the floor shares it evenly, the engine's chain and map do not).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use flowgrid_model::{AttemptId, RunId};
use flowgrid_proto::{encode, Encoding, Subjects, TaskMessage};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_sdk::{PublishFailure, StreamPublisher};

use crate::args::WorkerArgs;
use crate::flows::{result_ack_bytes, Plan, TASK_NAME};
use crate::grid::Grid;
use crate::tracker::TaskSink;
use crate::worker::{run_worker, WorkerSpec, TASKS_IN_HAND_WAIT};

/// Prefix of the floor's subjects and stream.
pub(crate) const FLOOR_PREFIX: &str = "ltfloor";
/// JetStream publishes awaiting their ack at once (the coordinator's dispatcher uses the same).
const PUBLISHES_IN_FLIGHT_MAX: usize = 1_024;
/// How long a publish waits for its ack before it counts as failed (the dispatcher's timeout).
pub(crate) const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// After a publish that could not be sent (connection closed or reconnecting), a pause
/// before the next one, so a broken connection is not spun on.
const NOT_SENT_PAUSE: Duration = Duration::from_millis(10);
/// How much longer than a worker's own wait for its tasks in hand [`FloorStream::stop`]
/// waits for the workers before it stops them.
const WORKERS_STOP_MARGIN: Duration = Duration::from_secs(1);
/// Warm-up of the floor before it is measured.
pub(crate) const FLOOR_WARMUP: Duration = Duration::from_secs(2);
/// The creation time of the floor's run ids (2026-01-01), and the origin of its deadlines.
const FLOOR_ORIGIN_MS: flowgrid_sdk::Millis = 1_767_225_600_000;

pub struct FloorResult {
    pub tasks_per_s: f64,
    pub errors: u64,
}

struct FloorSink {
    outstanding: Arc<Semaphore>,
    measuring: AtomicBool,
    acked_measured: AtomicU64,
    failed: AtomicU64,
}

impl TaskSink for FloorSink {
    fn received(&self, _attempt: &AttemptId, _stored: Instant, _at: Instant) {}

    fn acked(&self, _attempt: &AttemptId, _acked: Instant, _applied: bool) {
        if self.measuring.load(Ordering::Relaxed) {
            self.acked_measured.fetch_add(1, Ordering::Relaxed);
        }
        self.outstanding.add_permits(1);
    }

    fn failed(&self, _attempt: &AttemptId, _reason: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.outstanding.add_permits(1);
    }
}

/// Tasks the floor keeps outstanding: twice the simulated workers' slots, so that every
/// worker has its next pull batch waiting in the stream.
pub fn outstanding_max(workers_per_pool: usize, worker_concurrency: usize, pools: usize) -> usize {
    2 * workers_per_pool * worker_concurrency * pools
}

/// Tasks the floor keeps outstanding for an engine run of `plan` with `runs_in_flight`
/// (a closed loop's concurrency; `None` for an open loop): [`outstanding_max`], or what the
/// engine run can have out if that is less.
pub fn outstanding(plan: &Plan, workers: &WorkerArgs, runs_in_flight: Option<usize>) -> usize {
    let slots = outstanding_max(workers.workers_per_pool, workers.worker_concurrency, plan.pools.len());
    runs_in_flight.map_or(slots, |runs| slots.min(runs.saturating_mul(plan.tasks_in_flight_per_run())).max(1))
}

/// Measures the floor for `duration` after a short warm-up, with `outstanding_max` tasks
/// outstanding at most.
pub async fn measure(
    grid: &Grid,
    plan: &Plan,
    workers: &WorkerArgs,
    outstanding_max: usize,
    duration: Duration,
) -> Result<FloorResult> {
    let sink = Arc::new(FloorSink {
        outstanding: Arc::new(Semaphore::new(outstanding_max)),
        measuring: AtomicBool::new(false),
        acked_measured: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let mut floor = FloorStream::start(grid, plan, workers, sink.clone()).await?;

    floor.spawn_responder(grid).await?;

    let publisher = grid.connect("flowgrid-loadtest-floor-publisher").await?;
    let publisher =
        StreamPublisher::new(publisher, PUBLISH_ACK_TIMEOUT).await.context("subscribe to the floor's acks")?;
    floor.tasks.spawn(publish(publisher, floor.subjects.clone(), plan.clone(), sink.clone(), floor.shutdown.clone()));

    tokio::time::sleep(FLOOR_WARMUP).await;
    sink.measuring.store(true, Ordering::SeqCst);
    let measured_from = Instant::now();
    tokio::time::sleep(duration).await;
    sink.measuring.store(false, Ordering::SeqCst);
    let elapsed = measured_from.elapsed().as_secs_f64();
    sink.outstanding.close();
    floor.stop().await?;
    Ok(FloorResult {
        tasks_per_s: sink.acked_measured.load(Ordering::Relaxed) as f64 / elapsed,
        errors: sink.failed.load(Ordering::Relaxed),
    })
}

/// The floor's own stream, made with the grid's settings, and the simulated workers that
/// serve it; [`FloorStream::stop`] stops every task spawned on it and deletes the stream.
pub(crate) struct FloorStream {
    pub subjects: Subjects,
    jetstream: jetstream::Context,
    pub shutdown: CancellationToken,
    /// What serves the floor beside the workers (its responder, its publisher): stopped
    /// after the workers, so that the results of the tasks they hold are still answered.
    pub tasks: JoinSet<()>,
    workers: JoinSet<()>,
}

impl FloorStream {
    /// Creates the stream and starts the same simulated workers as the engine run has,
    /// reporting to `sink`.
    pub async fn start(grid: &Grid, plan: &Plan, workers: &WorkerArgs, sink: Arc<dyn TaskSink>) -> Result<FloorStream> {
        let subjects = Subjects::new(FLOOR_PREFIX);
        let limits = BrokerLimits::default();
        let jetstream = jetstream::new(grid.connect("flowgrid-loadtest-floor-admin").await?);
        // A stream an interrupted floor left on a running grid would take this one's task ids
        // as duplicates (they repeat from one floor to the next) and never deliver them, so
        // the floor would read near zero: it is made anew.
        match jetstream.delete_stream(subjects.tasks_stream()).await {
            Ok(_) => {}
            Err(error)
                if matches!(error.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(source)
                if source.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(error) => return Err(error).context("delete the stream an earlier floor left"),
        }
        let stream = broker::tasks_stream(&jetstream, &subjects, &limits).await?;
        let shutdown = CancellationToken::new();
        let mut worker_tasks = JoinSet::new();
        for pool in &plan.pools {
            let consumer = broker::pool_consumer(&stream, &subjects, pool, &limits).await?;
            for index in 0..workers.workers_per_pool {
                let nats = grid.connect("flowgrid-loadtest-floor-worker").await?;
                let spec = WorkerSpec {
                    concurrency: workers.worker_concurrency,
                    service_time: workers.service_time(),
                    seed: 1_000 + index as u64,
                };
                let (consumer, sink, shutdown) = (consumer.clone(), sink.clone(), shutdown.clone());
                worker_tasks.spawn(async move {
                    if let Err(error) = run_worker(nats, consumer, spec, sink, shutdown).await {
                        eprintln!("floor worker: {error:#}");
                    }
                });
            }
        }
        Ok(FloorStream { subjects, jetstream, shutdown, tasks: JoinSet::new(), workers: worker_tasks })
    }

    /// Starts the responder that stands where the coordinator would: it answers each result
    /// with a `ResultAck` at once.
    pub async fn spawn_responder(&mut self, grid: &Grid) -> Result<()> {
        let responder = grid.connect("flowgrid-loadtest-floor-responder").await?;
        let mut results = responder.subscribe(format!("{FLOOR_PREFIX}.shard.*.result")).await?;
        responder.flush().await.context("subscribe the floor's responder")?;
        let ack = Bytes::from(result_ack_bytes());
        self.tasks.spawn(async move {
            while let Some(message) = results.next().await {
                if let Some(reply) = message.reply {
                    let _ = responder.publish(reply, ack.clone()).await;
                }
            }
        });
        Ok(())
    }

    /// Stops the workers, which finish the tasks in hand while the responder still answers
    /// their results (for [`TASKS_IN_HAND_WAIT`] at most, then they are stopped), then the
    /// floor's other tasks, and deletes the stream. No result of the floor's is sent after
    /// it returns: one left retrying would land on the engine's run.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        let workers_done = async { while self.workers.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(TASKS_IN_HAND_WAIT + WORKERS_STOP_MARGIN, workers_done).await;
        // Aborted, a worker drops its tasks in hand with it.
        self.workers.shutdown().await;
        self.tasks.shutdown().await;
        self.jetstream
            .delete_stream(self.subjects.tasks_stream())
            .await
            .with_context(|| format!("delete the floor stream {}", self.subjects.tasks_stream()))?;
        Ok(())
    }
}

/// The id of the floor's run number `sequence`.
pub(crate) fn floor_run_id(sequence: u64) -> RunId {
    RunId::from_parts(FLOOR_ORIGIN_MS + sequence / 1_000, u128::from(sequence))
}

/// Seconds a floor task may stay in the stream (`Nats-TTL`): what the coordinator gives a
/// task of a five-minute timeout, a second past its deadline.
const TASK_TTL_S: &str = "301";

/// A task message as the coordinator publishes it: MessagePack, `Nats-Msg-Id` the
/// attempt's message id and its run's creation time, a lifetime in the stream; its result
/// goes to `reply_to`.
pub(crate) fn task_message(
    subjects: &Subjects,
    pool: &str,
    attempt: AttemptId,
    input: serde_json::Value,
    reply_to: String,
) -> Option<(async_nats::Subject, async_nats::HeaderMap, Bytes)> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{}:{FLOOR_ORIGIN_MS}", attempt.message_id()).as_str());
    headers.insert(async_nats::header::NATS_MESSAGE_TTL, TASK_TTL_S);
    let message = TaskMessage {
        attempt,
        pool: pool.into(),
        task: TASK_NAME.into(),
        input: input.into(),
        deadline_ms: FLOOR_ORIGIN_MS + 300_000,
        reply_to,
        progress: None,
    };
    let payload = encode(Encoding::MsgPack, &message).ok()?;
    Some((subjects.tasks(pool).into(), headers, Bytes::from(payload)))
}

/// The floor's task number `sequence`: round-robin over the plan's pools, each pool's of
/// the size the engine's tasks there have ([`Plan::task_shape`]: a chain step carries the
/// run input, a map item its item).
fn floor_task(
    subjects: &Subjects,
    plan: &Plan,
    sequence: u64,
) -> Option<(async_nats::Subject, async_nats::HeaderMap, Bytes)> {
    let pool = plan.pools[(sequence % plan.pools.len() as u64) as usize];
    let shape = plan.task_shape(pool, sequence);
    let attempt = AttemptId { run_id: floor_run_id(sequence), step: shape.step, item: shape.item, attempt: 1 };
    // Spread over as many result subjects as a grid of the default size has.
    let reply_to = subjects.shard_results((sequence % u64::from(flowgrid_model::SHARDS_DEFAULT)) as u32);
    task_message(subjects, pool, attempt, shape.input, reply_to)
}

/// Publishes task messages round-robin over the plan's pools while there is room, the
/// way the coordinator's dispatcher does.
async fn publish(
    mut publisher: StreamPublisher<()>,
    subjects: Subjects,
    plan: Plan,
    sink: Arc<FloorSink>,
    shutdown: CancellationToken,
) {
    for sequence in 0u64.. {
        let permit = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                permit = sink.outstanding.acquire(), if publisher.in_flight() < PUBLISHES_IN_FLIGHT_MAX => match permit {
                    Ok(permit) => break permit,
                    Err(_closed) => return,
                },
                Some(((), outcome)) = publisher.next(), if publisher.in_flight() > 0 => {
                    if let Err(error) = outcome {
                        floor_publish_failed(&sink, &error);
                    }
                }
            }
        };
        permit.forget();
        let Some((subject, headers, payload)) = floor_task(&subjects, &plan, sequence) else {
            return;
        };
        if let Err(((), error)) = publisher.publish(subject, headers, payload, ()).await {
            floor_publish_failed(&sink, &error);
            tokio::time::sleep(NOT_SENT_PAUSE).await;
        }
    }
}

/// A task that will never reach a worker: counted, and its room given back.
fn floor_publish_failed(sink: &FloorSink, error: &PublishFailure) {
    sink.failed.fetch_add(1, Ordering::Relaxed);
    sink.outstanding.add_permits(1);
    eprintln!("floor: publish failed: {error}");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::args::{WorkerArgs, Workload};
    use crate::flows::{POOL_A, POOL_B};
    use crate::service_time::ServiceTime;

    #[test]
    fn the_floor_is_no_deeper_than_the_closed_loop_it_is_compared_with() {
        let workers = WorkerArgs {
            workers_per_pool: 4,
            worker_concurrency: 256,
            service_time: ServiceTime::Fixed(Duration::ZERO),
            service_time_dist: None,
        };
        let chain = Plan::new(Workload::Chain, 3);
        assert_eq!(outstanding(&chain, &workers, None), 2_048, "an open loop: twice the slots");
        assert_eq!(outstanding(&chain, &workers, Some(512)), 512);
        assert_eq!(outstanding(&chain, &workers, Some(4_096)), 2_048);
        assert_eq!(outstanding(&Plan::new(Workload::Map, 100), &workers, Some(8)), 800);
    }

    /// Counts what the floor's workers report.
    #[derive(Default)]
    struct CountingSink {
        received: AtomicU64,
        acked: AtomicU64,
    }

    impl TaskSink for CountingSink {
        fn received(&self, _attempt: &AttemptId, _stored: Instant, _at: Instant) {
            self.received.fetch_add(1, Ordering::SeqCst);
        }

        fn acked(&self, _attempt: &AttemptId, _acked: Instant, _applied: bool) {
            self.acked.fetch_add(1, Ordering::SeqCst);
        }

        fn failed(&self, _attempt: &AttemptId, _reason: &str) {}
    }

    /// The floor stops while its workers hold tasks: their results are answered before
    /// `stop` returns, and none is sent after it (one would land on the engine's run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_result_of_the_floor_is_sent_after_it_stopped() {
        const TASKS: u64 = 8;
        /// Bound of the waits for what a working floor does at once.
        const TEST_WAIT: Duration = Duration::from_secs(10);
        /// How long the test listens for a result after the floor stopped.
        const LISTEN: Duration = Duration::from_secs(1);
        let dir = tempfile::tempdir().expect("temporary dir");
        let (_nats, url) = crate::grid::start_nats(dir.path(), "127.0.0.1").expect("start nats-server");
        let grid_args = crate::args::GridArgs {
            nats_url: Some(url),
            nats: flowgrid_sdk::NatsOptions::default(),
            prefix: flowgrid_proto::DEFAULT_PREFIX.to_owned(),
            coordinator_pid: None,
            flowgrid_bin: None,
            shards: flowgrid_model::SHARDS_DEFAULT,
            coordinators: 1,
            coordinator_args: String::new(),
            keep_dir: None,
        };
        let grid = Grid::open(&grid_args, &[]).await.expect("the running nats-server");
        let plan = Plan::new(Workload::Single, 1);
        // Tasks stay in hand for a while, shorter than the test listens.
        let workers = WorkerArgs {
            workers_per_pool: 1,
            worker_concurrency: TASKS as usize,
            service_time: ServiceTime::Fixed(Duration::from_millis(300)),
            service_time_dist: None,
        };
        let sink = Arc::new(CountingSink::default());
        let mut floor = FloorStream::start(&grid, &plan, &workers, sink.clone()).await.expect("start the floor");
        floor.spawn_responder(&grid).await.expect("start the responder");
        let jetstream = jetstream::new(grid.connect("floor-test-publisher").await.expect("connect"));
        for sequence in 0..TASKS {
            let (subject, headers, payload) = floor_task(&floor.subjects, &plan, sequence).expect("encodes");
            let stored = jetstream.publish_with_headers(subject, headers, payload).await.expect("publish");
            stored.await.expect("stored");
        }
        let in_hand = tokio::time::timeout(TEST_WAIT, async {
            while sink.received.load(Ordering::SeqCst) < TASKS {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(in_hand.is_ok(), "the workers took the {TASKS} tasks within {TEST_WAIT:?}");

        floor.stop().await.expect("stop the floor");
        let listener = grid.connect("floor-test-listener").await.expect("connect");
        let mut late = listener.subscribe(format!("{FLOOR_PREFIX}.shard.*.result")).await.expect("subscribe");
        listener.flush().await.expect("flush");
        if let Ok(Some(result)) = tokio::time::timeout(LISTEN, late.next()).await {
            panic!("a result was sent within {LISTEN:?} after the floor stopped, to {}", result.subject);
        }
        assert_eq!(sink.acked.load(Ordering::SeqCst), TASKS, "each task in hand was answered before the floor stopped");
    }

    /// The engine gives the mix's chain steps on lt-a the run input (its 1,000 items
    /// included) and its map items on lt-b one number: the floor's tasks on each pool are
    /// of that size, not all of a map item's.
    #[test]
    fn the_mix_floor_sends_each_pool_tasks_of_its_own_size() {
        let plan = Plan::new(Workload::Mix, 1_000);
        let subjects = Subjects::new(FLOOR_PREFIX);
        let engine_task = |step: &str, item: Option<u32>, input: serde_json::Value| {
            let attempt = AttemptId { run_id: floor_run_id(0), step: step.into(), item, attempt: 1 };
            task_message(&subjects, POOL_A, attempt, input, subjects.shard_results(0)).expect("encodes").2.len()
        };
        let chain_step = engine_task("s1", None, plan.run_input(0));
        let map_item = engine_task("m", Some(500), serde_json::json!(500));
        for sequence in 0..4 {
            let (subject, _, payload) = floor_task(&subjects, &plan, sequence).expect("encodes");
            let (pool, expected) = if subject.as_str() == subjects.tasks(POOL_A) {
                (POOL_A, chain_step)
            } else {
                assert_eq!(subject.as_str(), subjects.tasks(POOL_B));
                (POOL_B, map_item)
            };
            assert!(
                payload.len().abs_diff(expected) <= 8,
                "floor task {sequence} on {pool}: {} B, the engine's {expected} B",
                payload.len()
            );
        }
        assert!(chain_step > 2_000, "a chain step of the mix carries the 1,000 items: {chain_step} B");
    }
}
