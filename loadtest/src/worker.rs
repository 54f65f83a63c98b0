//! Simulated workers: the protocol's worker loop on raw async-nats, with time stamps.
//!
//! Each worker has its own NATS connection and consumes its pool's durable pull consumer
//! with at most `concurrency` tasks in hand (plus one pull batch buffered by the client).
//! Per task: stamp the receipt (and read when JetStream stored the task), decode, sleep
//! the service time, send the result as a request to `reply_to`, stamp the send and the
//! coordinator's ack, then ack the task message, in the order docs/protocol.md prescribes.
//! A result that finds no coordinator (one restarting, a shard moving) is sent again with
//! backoff until the task's deadline plus a grace, as the SDK's worker does; only then is
//! the task handed back. Simulated tasks last far less than the ack wait, so a task
//! message is heartbeated only while its result is retried. The same code serves the
//! broker floor, whose "coordinator" is a responder that answers at once.
//!
//! The SDK's `Worker` is not used because it hides the moments the harness must stamp
//! (result sent, ack received); the loop here does the same NATS operations per task.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use flowgrid_proto::{decode, encode, Encoding, Reply, ResultAck, TaskMessage, TaskResult, CONTENT_TYPE_HEADER};
use flowgrid_sdk::backoff::Backoff;
use flowgrid_sdk::broker::BrokerLimits;

use crate::flows::task_output;
use crate::service_time::{ServiceTime, XorShift};
use crate::tracker::TaskSink;

/// How long one result request waits for the coordinator's ack.
const RESULT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the task's deadline, its result is still sent again this long (as by the SDK's
/// worker) before the task is handed back (nak).
const RESULT_GRACE: Duration = Duration::from_secs(30);
/// When a worker stops, how long the tasks in hand may take to finish (a result retried
/// with backoff among them); those still at it then are stopped.
pub(crate) const TASKS_IN_HAND_WAIT: Duration = Duration::from_secs(10);
/// First and largest pause between two tries of a result (the SDK worker's).
const RESULT_RETRY_FIRST: Duration = Duration::from_millis(50);
const RESULT_RETRY_MAX: Duration = Duration::from_secs(2);

pub struct WorkerSpec {
    pub concurrency: usize,
    pub service_time: ServiceTime,
    pub seed: u64,
}

/// Serves `consumer` until `shutdown`; tasks in hand are given [`TASKS_IN_HAND_WAIT`] to
/// finish, and none is still running when it returns (or when it is dropped): a result is
/// never sent after the worker stopped.
pub async fn run_worker(
    nats: async_nats::Client,
    consumer: PullConsumer,
    spec: WorkerSpec,
    sink: Arc<dyn TaskSink>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(spec.concurrency)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .context("open the pull stream")?;
    let slots = Arc::new(Semaphore::new(spec.concurrency));
    let mut random = XorShift::new(spec.seed);
    // Dropped with the worker, which aborts what is left in it.
    let mut in_hand = JoinSet::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = messages.next() => next,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                // Missed heartbeats and the like: the stream keeps going.
                eprintln!("worker: pull error: {error}");
                continue;
            }
            None => break,
        };
        let service = spec.service_time.sample(&mut random);
        let nats = nats.clone();
        let sink = sink.clone();
        in_hand.spawn(async move {
            serve(&nats, message, service, sink.as_ref()).await;
            drop(slot);
        });
        // Tasks served are taken out, so that the set holds only those in hand.
        while in_hand.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(TASKS_IN_HAND_WAIT, async { while in_hand.join_next().await.is_some() {} }).await;
    in_hand.shutdown().await;
    Ok(())
}

async fn serve(
    nats: &async_nats::Client,
    message: async_nats::jetstream::Message,
    service: Duration,
    sink: &dyn TaskSink,
) {
    let received = Instant::now();
    // Read for every task, the floor's too (which ignores it): both sides of the ratio pay for it.
    let stored = stored_at(&message, received, SystemTime::now());
    let content_type = message.headers.as_ref().and_then(|headers| headers.get(CONTENT_TYPE_HEADER));
    let encoding = Encoding::from_content_type(content_type.map(|value| value.as_str()));
    let task: TaskMessage = match decode(encoding, &message.payload) {
        Ok(task) => task,
        Err(error) => {
            eprintln!("worker: malformed task message: {error}");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    sink.received(&task.attempt, stored, received);
    if !service.is_zero() {
        tokio::time::sleep(service).await;
    }
    let result = TaskResult { attempt: task.attempt.clone(), output: Some(task_output()), error: None, progress: None };
    let payload = match encode(encoding, &result) {
        Ok(bytes) => Bytes::from(bytes),
        Err(error) => {
            sink.failed(&task.attempt, &error.to_string());
            return;
        }
    };
    // Made at the first refusal: most results pass at once.
    let mut retrying: Option<Retrying> = None;
    loop {
        if retrying.is_none() {
            sink.result_sent(&task.attempt, Instant::now());
        }
        match send_result(nats, &task.reply_to, payload.clone(), encoding).await {
            Ok(applied) => {
                if !applied {
                    sink.not_applied(&task.attempt);
                }
                sink.acked(&task.attempt, Instant::now(), applied);
                let _ = message.ack().await;
                return;
            }
            Err(Refusal::Final(reason)) => {
                sink.failed(&task.attempt, &reason);
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
            Err(Refusal::Retry(reason)) => {
                let retrying = retrying.get_or_insert_with(|| Retrying::until(task.deadline_ms));
                let Some(delay) = retrying.next_delay() else {
                    sink.failed(&task.attempt, &reason);
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    return;
                };
                retrying.heartbeat(&message).await;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A result being sent again: until when, the pauses between tries, and when its task
/// message was last heartbeated.
struct Retrying {
    give_up: Instant,
    backoff: Backoff,
    progressed: Instant,
}

impl Retrying {
    /// Retries until `deadline_ms` (Unix ms, the task's) plus [`RESULT_GRACE`].
    fn until(deadline_ms: u64) -> Retrying {
        let now_ms =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64);
        let now = Instant::now();
        Retrying {
            give_up: now + Duration::from_millis(deadline_ms.saturating_sub(now_ms)) + RESULT_GRACE,
            backoff: Backoff::new(RESULT_RETRY_FIRST, RESULT_RETRY_MAX),
            progressed: now,
        }
    }

    /// The pause before the next try; `None` once it is time to give up.
    fn next_delay(&mut self) -> Option<Duration> {
        self.backoff.next_delay_within(self.give_up.saturating_duration_since(Instant::now()))
    }

    /// Keeps JetStream from delivering the task again while its result waits: a progress
    /// ack every third of the ack wait.
    async fn heartbeat(&mut self, message: &async_nats::jetstream::Message) {
        if self.progressed.elapsed() >= BrokerLimits::default().ack_wait / 3 {
            let _ = message.ack_with(AckKind::Progress).await;
            self.progressed = Instant::now();
        }
    }
}

/// When JetStream stored the task, on the monotonic clock of `received` (`received_wall`
/// is the same moment on the wall clock): the stream's time stamp comes from nats-server's
/// wall clock, so this holds when nats-server runs on this host (or on one whose clock is
/// in step). `received` when the message has no stamp; never after `received`.
fn stored_at(message: &async_nats::jetstream::Message, received: Instant, received_wall: SystemTime) -> Instant {
    let Ok(info) = message.info() else { return received };
    let wall_ns = received_wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_nanos() as i128);
    let age_ns = u64::try_from(wall_ns - info.published.unix_timestamp_nanos()).unwrap_or(0);
    received.checked_sub(Duration::from_nanos(age_ns)).unwrap_or(received)
}

enum Refusal {
    Retry(String),
    Final(String),
}

/// Sends a task's result; `Ok(false)` when the coordinator took it without applying it: a
/// repeat of a result it applied before (its answer was lost), or one for an attempt no
/// longer open (a redelivered task, a result too late).
async fn send_result(
    nats: &async_nats::Client,
    reply_to: &str,
    payload: Bytes,
    encoding: Encoding,
) -> Result<bool, Refusal> {
    let mut request = async_nats::Request::new().payload(payload).timeout(Some(RESULT_TIMEOUT));
    if let Some(content_type) = encoding.content_type() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE_HEADER, content_type);
        request = request.headers(headers);
    }
    let reply =
        nats.send_request(reply_to.to_owned(), request).await.map_err(|error| Refusal::Retry(error.to_string()))?;
    match decode::<Reply<ResultAck>>(encoding, &reply.payload) {
        Ok(Reply::Ok(ack)) => Ok(ack.applied),
        Ok(Reply::Error(refusal)) if refusal.retryable => Err(Refusal::Retry(refusal.to_string())),
        Ok(Reply::Error(refusal)) => Err(Refusal::Final(refusal.to_string())),
        Err(error) => Err(Refusal::Retry(error.to_string())),
    }
}

/// Starts `workers.workers_per_pool` simulated workers (one NATS connection each) for
/// every pool of the grid under `prefix`.
pub async fn spawn_pool_workers(
    grid: &crate::grid::Grid,
    pools: &[&str],
    workers: &crate::args::WorkerArgs,
    sink: Arc<dyn TaskSink>,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<()> {
    use flowgrid_sdk::broker;
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    let limits = BrokerLimits::default();
    let admin = async_nats::jetstream::new(grid.connect("flowgrid-loadtest-admin").await?);
    let stream = broker::tasks_stream(&admin, &subjects, &limits).await?;
    let mut seed = 1;
    for pool in pools {
        let consumer = broker::pool_consumer(&stream, &subjects, pool, &limits).await?;
        for _ in 0..workers.workers_per_pool {
            seed += 1;
            let nats = grid.connect(&format!("flowgrid-loadtest-worker-{pool}")).await?;
            let spec =
                WorkerSpec { concurrency: workers.worker_concurrency, service_time: workers.service_time(), seed };
            let (consumer, sink, shutdown) = (consumer.clone(), sink.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Err(error) = run_worker(nats, consumer, spec, sink, shutdown).await {
                    eprintln!("worker: {error:#}");
                }
            });
        }
    }
    Ok(())
}
