//! The latency floor: the engine's open loop of chains at the same rate, with no engine.
//!
//! Runs are "started" on the open loop's fixed clock by publishing their first task to the
//! floor's stream. A responder stands where the coordinator would: it takes each result
//! the simulated workers send, publishes the run's next task at once (no run state, no
//! commit) and answers the result. The same workers and the same tracker as the engine
//! run time it, so its step overhead, step round trip and end-to-end latency are what
//! NATS and the workers take on this machine at that rate: the engine's latencies if the
//! engine cost nothing. Its start overhead is a start's scheduled time to its first task
//! at a worker; with no start request to send and answer, it is the publish, the store
//! and the delivery only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use flowgrid_model::AttemptId;
use flowgrid_proto::{decode, Encoding, Subjects, TaskResult, CONTENT_TYPE_HEADER};
use flowgrid_sdk::StreamPublisher;

use crate::args::WorkerArgs;
use crate::driver::paced;
use crate::floor::{floor_run_id, task_message, FloorStream, FLOOR_PREFIX, FLOOR_WARMUP, PUBLISH_ACK_TIMEOUT};
use crate::flows::{chain_position, result_ack_bytes, Plan};
use crate::grid::Grid;
use crate::tracker::{Histograms, Tracker};

/// Runs due whose first task has not been handed to the responder yet, at most; a run due
/// past it is not started and counts as an error, as the open loop's backlog does.
const STARTS_PENDING_MAX: usize = 50_000;
/// Tasks published and not acknowledged yet, at most; past it a task is dropped and
/// counted as an error rather than queued without bound.
const PUBLISHES_IN_FLIGHT_MAX: usize = 50_000;
/// How long runs started in the window may take to end after it.
const DRAIN: Duration = Duration::from_secs(5);

pub struct LatencyFloor {
    pub runs_per_s: f64,
    pub histograms: Histograms,
    pub errors: u64,
}

/// Starts `rate` runs a second for `duration` after a short warm-up, and times them.
pub async fn measure(
    grid: &Grid,
    plan: &Plan,
    workers: &WorkerArgs,
    rate: f64,
    duration: Duration,
) -> Result<LatencyFloor> {
    anyhow::ensure!(
        plan.map_items == 0 && plan.pools.len() == 1,
        "the latency floor mirrors single and chain runs only"
    );
    let tracker = Tracker::new(plan.tasks_per_run, None, 0.0);
    let mut floor = FloorStream::start(grid, plan, workers, tracker.clone()).await?;
    let errors = Arc::new(AtomicU64::new(0));

    let nats = grid.connect("flowgrid-loadtest-latency-floor-responder").await?;
    let results = nats.subscribe(format!("{FLOOR_PREFIX}.shard.*.result")).await?;
    let publisher =
        StreamPublisher::new(nats.clone(), PUBLISH_ACK_TIMEOUT).await.context("subscribe to the floor's acks")?;
    let (starts, started) = mpsc::channel(STARTS_PENDING_MAX);
    let responder = Responder {
        nats,
        publisher,
        subjects: floor.subjects.clone(),
        pool: plan.pools[0],
        tasks_per_run: plan.tasks_per_run,
        input: plan.run_input(0),
        ack: Bytes::from(result_ack_bytes()),
        errors: errors.clone(),
    };
    floor.tasks.spawn(responder.run(results, started));

    let stop = CancellationToken::new();
    let pacer = tokio::spawn({
        let (tracker, errors, stop) = (tracker.clone(), errors.clone(), stop.clone());
        paced(
            rate,
            STARTS_PENDING_MAX,
            stop,
            move || {
                errors.fetch_add(1, Ordering::Relaxed);
            },
            move |sequence, scheduled| {
                tracker.started(floor_run_id(sequence), scheduled.into_std(), None);
                let starts = starts.clone();
                async move {
                    let _ = starts.send(sequence).await;
                }
            },
        )
    });

    tokio::time::sleep(FLOOR_WARMUP).await;
    tracker.set_measuring(true);
    let measured_from = Instant::now();
    tokio::time::sleep(duration).await;
    tracker.set_measuring(false);
    let elapsed = measured_from.elapsed().as_secs_f64();
    stop.cancel();
    let _ = pacer.await;
    let _ = tokio::time::timeout(DRAIN, tracker.runs_ended()).await;
    // Its runs start without a request: none can be left unanswered.
    let unfinished = tracker.unfinished().runs;
    floor.stop().await?;
    let failed_results = tracker.counters.task_failures.load(Ordering::Relaxed);
    Ok(LatencyFloor {
        runs_per_s: tracker.counters.runs_done_measured.load(Ordering::Relaxed) as f64 / elapsed,
        histograms: tracker.histograms(),
        errors: errors.load(Ordering::Relaxed) + unfinished + failed_results,
    })
}

/// Where the coordinator would be: answers results and publishes the next tasks.
struct Responder {
    nats: async_nats::Client,
    publisher: StreamPublisher<()>,
    subjects: Subjects,
    pool: &'static str,
    tasks_per_run: u32,
    /// The input of every task (a run's input, as the engine passes it on).
    input: serde_json::Value,
    ack: Bytes,
    errors: Arc<AtomicU64>,
}

impl Responder {
    async fn run(mut self, mut results: async_nats::Subscriber, mut starts: mpsc::Receiver<u64>) {
        loop {
            tokio::select! {
                Some(sequence) = starts.recv() => {
                    let attempt = AttemptId { run_id: floor_run_id(sequence), step: "s1".to_owned(), item: None, attempt: 1 };
                    // Spread over as many result subjects as a grid of the default size has.
                    let shard = (sequence % u64::from(flowgrid_model::SHARDS_DEFAULT)) as u32;
                    self.publish(attempt, self.subjects.shard_results(shard)).await;
                }
                Some(message) = results.next() => self.take_result(message).await,
                Some(((), outcome)) = self.publisher.next(), if self.publisher.in_flight() > 0 => {
                    if let Err(error) = outcome {
                        self.failed(&format!("publish failed: {error}"));
                    }
                }
                else => return,
            }
        }
    }

    /// Publishes the run's next task, if the result was not its last, then answers it.
    async fn take_result(&mut self, message: async_nats::Message) {
        let content_type = message.headers.as_ref().and_then(|headers| headers.get(CONTENT_TYPE_HEADER));
        let encoding = Encoding::from_content_type(content_type.map(|value| value.as_str()));
        match decode::<TaskResult>(encoding, &message.payload) {
            Ok(result) => {
                let position = chain_position(&result.attempt.step).unwrap_or(self.tasks_per_run);
                if position < self.tasks_per_run {
                    let next = AttemptId { step: format!("s{}", position + 1), ..result.attempt };
                    self.publish(next, message.subject.to_string()).await;
                }
            }
            Err(error) => self.failed(&format!("a result does not decode: {error}")),
        }
        if let Some(reply) = message.reply {
            let _ = self.nats.publish(reply, self.ack.clone()).await;
        }
    }

    async fn publish(&mut self, attempt: AttemptId, reply_to: String) {
        if self.publisher.in_flight() >= PUBLISHES_IN_FLIGHT_MAX {
            return self.failed("too many publishes await their ack; task dropped");
        }
        let Some((subject, headers, payload)) =
            task_message(&self.subjects, self.pool, attempt, self.input.clone(), reply_to)
        else {
            return self.failed("a task does not encode");
        };
        if let Err(((), error)) = self.publisher.publish(subject, headers, payload, ()).await {
            self.failed(&format!("publish not sent: {error}"));
        }
    }

    fn failed(&self, reason: &str) {
        // The first says what went wrong; the report counts them all.
        if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("latency floor: {reason}");
        }
    }
}
