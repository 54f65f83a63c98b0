//! The worker: serves one pool's tasks from JetStream with bounded concurrency.
//!
//! Invariants:
//! - at most `concurrency` task messages are held (delivered and not yet acked) at once:
//!   a pull asks for exactly as many messages as there are free slots;
//! - a held message is heartbeated (`AckKind::Progress`) every `ack_wait / 3` of its lane's
//!   consumer until it is settled, so JetStream does not hand it to another worker while it
//!   is worked on;
//! - a message is acked only after the coordinator confirmed the result
//!   (`Reply<ResultAck>`); if the coordinator stays unreachable past the task's deadline
//!   plus a grace period the message is nak'ed and delivered again later;
//! - a malformed message is logged and terminated, never retried;
//! - with several priority lanes, a free slot takes the highest lane's waiting task (the
//!   lanes are looked for once a slot is free, so a lane opened meanwhile counts), and a
//!   slot listening on a lane for its next task holds its permit while it listens;
//! - a lane that gives nothing (empty, or at its bound of tasks out) or whose pull fails
//!   holds no other lane: the pass goes on to the next one;
//! - a stop hands back (nak) every task not settled once the shutdown grace is over, whether
//!   its handler still runs (a detached one too) or its result is still being sent;
//! - a pull that does not wait is given up when no message of it came for [`FETCH_TIMEOUT`]
//!   (from the pull, then from each message), and what still comes of it is handed back.

mod lanes;
mod registry;
mod report;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use flowgrid_engine::TaskError;
use flowgrid_model::{AttemptId, Millis};
use flowgrid_proto::{
    decode, ApiError, Encoding, ErrorCode, LiveOutput, Subjects, TaskMessage, TaskResult, TasksCancelled,
    PRIORITY_DEFAULT,
};

use crate::backoff::Backoff;
use crate::broker::{self, BrokerLimits};
use crate::error::{Error, Result};
use crate::token::TaskToken;
use lanes::{Lane, Lanes};
use report::{report, Settle};

/// Default tasks held at once by one worker.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// The most tasks one worker holds at once: past it, [`Worker::concurrency`] holds this
/// many (a pool's consumer lets at most 20,000 out at once by default).
pub const CONCURRENCY_MAX: usize = 100_000;
/// How long a shutdown waits for in-flight tasks before abandoning them (handed back at
/// once, so JetStream delivers them to another worker).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long one pull request waits at the server for messages; an idle worker sends one
/// pull per period, and looks for new priority lanes of its pool between two.
const PULL_EXPIRES: Duration = lanes::SCAN_EVERY;
/// How long a pull that takes the tasks waiting on a lane (`no_wait`) may stay at the
/// server when the lane has a bound of tasks out ([`Lane::is_bounded`]). The server holds
/// such a pull while the lane is at its bound with tasks waiting, until a slot frees (for as
/// long as the lane's tasks are out); with an expiry it ends the pull then, and the pass goes
/// on to the next lane. The price: an empty lane answers such a pull only after the expiry,
/// where it answers one without at once (`404`), so the lanes without a bound go without.
const FETCH_EXPIRES: Duration = Duration::from_millis(100);
/// How long a pull that does not wait, and has no expiry, may go without a message (from
/// the pull, then from each message: a large batch may take longer to come whole). The
/// server answers it within a round trip unless it holds it (the lane reached a bound set
/// after it was bound: its pulls carry an expiry from then on) or the connection was lost.
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a slot listens on a lane when there are fewer free slots than lanes to listen
/// on: the lanes left without one are looked at again this often while the pool is idle.
const LISTEN_SHORT: Duration = Duration::from_millis(100);
/// After shutdown, how long to keep reading a pull's messages that are already on their
/// way, to hand them back at once instead of after the ack wait.
const PULL_DRAIN: Duration = Duration::from_millis(100);
/// A handler may overrun the task's deadline by this much (clock skew between hosts)
/// before it is abandoned.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);
/// Floor of the heartbeat period, whatever the ack wait.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
/// Why [`Task::report_progress`] refuses `null`.
const PROGRESS_NULL_REFUSED: &str = "a progress report of null reports nothing; send how far the attempt got";
/// How long a stopping worker waits, past its shutdown grace, for the tasks it hands back
/// to be naked, and then for NATS to take what is left to send.
const STOP_STEP_WAIT: Duration = Duration::from_secs(2);

/// One task as a handler sees it.
#[derive(Clone, Debug)]
pub struct Task {
    attempt: AttemptId,
    pool: String,
    name: String,
    input: Value,
    deadline_ms: Millis,
    cancellation: CancellationToken,
    /// What an earlier attempt reported (see [`Task::progress`]).
    progress: Option<Arc<Value>>,
    /// Where this attempt's progress goes; `None` for a task made by hand.
    reporter: Option<Arc<ProgressReporter>>,
    /// Set by [`Task::detach`]: the worker sends no result for this attempt.
    detached: Arc<AtomicBool>,
}

/// The connection and subject a task's progress reports travel on, and where its live
/// output goes.
struct ProgressReporter {
    nats: async_nats::Client,
    reply_to: String,
    subjects: Arc<Subjects>,
    /// The last live output piece's number.
    live_seq: AtomicU64,
}

impl std::fmt::Debug for ProgressReporter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ProgressReporter").field("reply_to", &self.reply_to).finish_non_exhaustive()
    }
}

impl Task {
    pub fn new(
        attempt: AttemptId,
        pool: impl Into<String>,
        name: impl Into<String>,
        input: Value,
        deadline_ms: Millis,
    ) -> Task {
        Task {
            attempt,
            pool: pool.into(),
            name: name.into(),
            input,
            deadline_ms,
            cancellation: CancellationToken::new(),
            progress: None,
            reporter: None,
            detached: Arc::default(),
        }
    }

    /// Makes this an async task: the worker sends no result when the handler returns (what
    /// it returns is ignored) and acks the task, and the attempt stays open until a result
    /// comes with the token this returns ([`crate::Client::complete_task`], `flowgrid task
    /// complete`), or until its step's `timeout_ms`. Hand the token to whatever finishes
    /// the work; reporting it with [`Task::report_progress`] shows it with the step. `None`
    /// for a task made by hand (it has nowhere to send a result).
    ///
    /// A detached task counts no more against the worker's concurrency or the pool's
    /// bound. Like any task it may be delivered again (after a coordinator takeover), and
    /// then detached again with the same attempt: completing either token completes it.
    ///
    /// Only a handler that returns is taken to have handed its token on. One stopped before
    /// it returns is not: the worker's stop past its shutdown grace hands the task back (its
    /// next delivery detaches the same attempt again), and a panic or an overrun of the
    /// deadline sends its error result, as for any task.
    pub fn detach(&self) -> Option<TaskToken> {
        let reporter = self.reporter.as_ref()?;
        self.detached.store(true, Ordering::Relaxed);
        Some(TaskToken {
            attempt: self.attempt.clone(),
            reply_to: reporter.reply_to.clone(),
            deadline_ms: self.deadline_ms,
        })
    }

    /// Whether [`Task::detach`] was called.
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Relaxed)
    }

    /// The same task, resuming from `progress` (what an earlier attempt reported).
    pub fn with_progress(mut self, progress: Option<Arc<Value>>) -> Task {
        self.progress = progress;
        self
    }

    /// The last progress reported by an earlier attempt of this step (or map item) that
    /// then failed, as that attempt's [`Task::report_progress`] gave it: where this one may
    /// resume. `None` on a first attempt, or when nothing was reported.
    pub fn progress(&self) -> Option<&Value> {
        self.progress.as_deref()
    }

    /// Tells the grid how far this attempt got (any JSON: `{"segments_done": 40}`), once
    /// the report is committed. It shows with the step in `run get` and the UI, and if
    /// this attempt fails, the next one gets it as [`Task::progress`]. Each report is a
    /// commit in the run's history: report every few seconds at most, not per item of a
    /// loop. Returns `false` when the attempt is over (cancelled, timed out) and the report
    /// was ignored, or the task was made by hand ([`Task::new`]) and has no grid to report
    /// to; fails when the grid refused it or did not answer in time, and, without sending
    /// it, for `null` (which the grid reads as no report at all).
    pub async fn report_progress(&self, details: Value) -> Result<bool> {
        if details.is_null() {
            return Err(ApiError::new(ErrorCode::InvalidRequest, PROGRESS_NULL_REFUSED).into());
        }
        let Some(reporter) = &self.reporter else { return Ok(false) };
        let report = TaskResult { attempt: self.attempt.clone(), output: None, error: None, progress: Some(details) };
        progress_outcome(report::send(&reporter.nats, &reporter.reply_to, &report).await, &self.attempt)
    }

    /// Publishes a piece of this attempt's live output (a model's next tokens, a log line)
    /// for whoever tails the run (`flowgrid run tail`, [`crate::Client::tail`]): in order,
    /// numbered, kept an hour by the grid. Best effort and cheap (no answer is awaited), so
    /// call it as often as the output comes; the task's result is still what counts. A
    /// text is written out as it is by `flowgrid run tail`: send the pieces of a text as
    /// texts. Does nothing for a task made by hand ([`Task::new`]); fails when the piece
    /// is over 64 KiB encoded or the connection is closed.
    pub async fn emit(&self, data: Value) -> Result<()> {
        let Some(reporter) = &self.reporter else { return Ok(()) };
        let seq = reporter.live_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let piece = LiveOutput { attempt: self.attempt.clone(), seq, data };
        let bytes = flowgrid_proto::encode(Encoding::MsgPack, &piece)?;
        if bytes.len() > LiveOutput::BYTES_MAX {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a piece of live output is {} bytes encoded; at most {} (send a long output in several)",
                    bytes.len(),
                    LiveOutput::BYTES_MAX
                ),
            )
            .into());
        }
        let subject = reporter.subjects.live(&self.attempt.run_id.to_string(), &self.attempt.step);
        reporter.nats.publish(subject.clone(), bytes.into()).await.map_err(|source| Error::Nats {
            context: format!("publish live output to {subject}"),
            source: source.into(),
        })
    }

    /// The attempt this task is: run, step, map item and attempt number.
    pub fn attempt(&self) -> &AttemptId {
        &self.attempt
    }

    /// The 1-based attempt number (2 on the first retry).
    pub fn attempt_number(&self) -> u32 {
        self.attempt.attempt
    }

    /// The pool the task was published to.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The task name: what to do.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn input(&self) -> &Value {
        &self.input
    }

    pub fn into_input(self) -> Value {
        self.input
    }

    /// When the coordinator times the attempt out (Unix ms); work past it is wasted.
    pub fn deadline_ms(&self) -> Millis {
        self.deadline_ms
    }

    /// Cancelled when the grid no longer needs the task: its run was cancelled, failed or
    /// timed out while it ran (the worker is told on `<prefix>.cancels.<pool>`). The worker
    /// then drops the handler's future and acks the task; a handler that hands work to
    /// threads or processes of its own can watch this token to stop them too.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation
    }

    /// Time left until the deadline, by this host's clock.
    pub fn time_left(&self) -> Duration {
        Duration::from_millis(self.deadline_ms.saturating_sub(now_ms()))
    }
}

/// Runs tasks. Implemented for every `Fn(Task) -> impl Future<Output = Result<Value,
/// TaskError>>`; implement it by hand for handlers with state.
///
/// A handler runs on the worker's async runtime, beside its pulls and the heartbeats that
/// keep JetStream from delivering a long task again: it must not block a runtime thread.
/// Work that holds a CPU for more than a few milliseconds (encoding media, a model's
/// inference) or blocking calls go to `tokio::task::spawn_blocking` (or a thread pool of
/// their own), awaited by the handler; otherwise, with every runtime thread busy, heartbeats
/// stop and after the ack wait (30 s) JetStream gives the tasks to other workers while they
/// still run here.
pub trait TaskHandler: Send + Sync + 'static {
    /// Does the work of one task: its output, or an error whose `retryable` decides
    /// whether the grid may try again. Returns its future at once (the work goes in it).
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<Value, TaskError>>;
}

impl<F, Fut> TaskHandler for F
where
    F: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<Value, TaskError>> {
        Box::pin(self(task))
    }
}

/// A shared handler, e.g. one serving several pools.
#[derive(Clone)]
pub struct SharedHandler(pub Arc<dyn TaskHandler>);

impl TaskHandler for SharedHandler {
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<Value, TaskError>> {
        self.0.handle(task)
    }
}

/// Serves the tasks of one pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use flowgrid_sdk::{Task, TaskError, Worker};
/// use tokio_util::sync::CancellationToken;
///
/// let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let shutdown = CancellationToken::new();
/// let handler = |task: Task| async move {
///     match task.name() {
///         "echo" => Ok(task.into_input()),
///         // A long job: resume where a failed attempt got to, report each segment done.
///         // A run cancelled meanwhile drops this future, and the worker acks the task.
///         "transcode" => {
///             let done = task.progress().and_then(|progress| progress["segments"].as_u64()).unwrap_or(0);
///             for segment in done..10 {
///                 // CPU-bound work goes off the runtime's threads (see `TaskHandler`).
///                 tokio::task::spawn_blocking(move || { /* ... transcode `segment` ... */ }).await.ok();
///                 let _ = task.report_progress(serde_json::json!({ "segments": segment + 1 })).await;
///             }
///             Ok(serde_json::json!({ "segments": 10 }))
///         }
///         other => Err(TaskError { code: "unknown_task".into(), message: format!("no task {other}"), retryable: false }),
///     }
/// };
/// Worker::new(nats, "flowgrid", "cpu-media").concurrency(32).run(handler, shutdown).await?;
/// # Ok(())
/// # }
/// ```
pub struct Worker {
    nats: async_nats::Client,
    subjects: Subjects,
    pool: String,
    concurrency: usize,
    limits: BrokerLimits,
    shutdown_grace: Duration,
    /// At most this many tasks a second start (`None`: no bound).
    max_rate: Option<f64>,
}

impl Worker {
    /// A worker for `pool` of the grid under `prefix`.
    pub fn new(nats: async_nats::Client, prefix: impl Into<String>, pool: impl Into<String>) -> Worker {
        Worker {
            nats,
            subjects: Subjects::new(prefix),
            pool: pool.into(),
            concurrency: DEFAULT_CONCURRENCY,
            limits: BrokerLimits::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_rate: None,
        }
    }

    /// Starts at most `per_second` tasks a second, in the order they arrive, for a service
    /// with a quota (a value not above 0, or not finite, sets no bound, as without this
    /// call; one below [`MAX_RATE_MIN`] is taken as that). The worker takes tasks from the
    /// stream only as far as their turns come within a second: the rest stay in the stream
    /// for the pool's other workers. A task waiting for its turn is held and heartbeated,
    /// so JetStream does not hand it to another worker; a task cancelled meanwhile is
    /// dropped. The bound is this worker's: give each of a pool's workers its share.
    pub fn max_rate(mut self, per_second: f64) -> Worker {
        self.max_rate = (per_second.is_finite() && per_second > 0.0).then_some(per_second.max(MAX_RATE_MIN));
        self
    }

    /// Tasks held at once (at least 1, at most [`CONCURRENCY_MAX`]).
    pub fn concurrency(mut self, tasks: usize) -> Worker {
        self.concurrency = tasks.clamp(1, CONCURRENCY_MAX);
        self
    }

    /// Stream and consumer settings, when the stream or consumer does not exist yet (an
    /// existing consumer keeps its settings; its ack wait sets the heartbeat period of its
    /// lane's tasks).
    pub fn broker_limits(mut self, limits: BrokerLimits) -> Worker {
        self.limits = limits;
        self
    }

    /// How long a shutdown waits for in-flight tasks (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Worker {
        self.shutdown_grace = grace;
        self
    }

    /// Pulls and runs tasks until `shutdown` is cancelled, then stops pulling, waits for
    /// the tasks in flight (up to the shutdown grace; those not settled by then, whose
    /// handler still runs or whose result no coordinator confirmed yet, are handed back),
    /// flushes what is left to send, deletes the worker's record (`flowgrid workers` lists
    /// it until then), and returns. Fails only if the tasks stream or the pool's consumer
    /// cannot be opened at start.
    pub async fn run<H: TaskHandler>(self, handler: H, shutdown: CancellationToken) -> Result<()> {
        let jetstream = jetstream::new(self.nats.clone());
        let mut lanes = self.bind(&jetstream).await?;
        let ack_wait = lanes.highest_first()[0].consumer.cached_info().config.ack_wait;
        let shared = Arc::new(Shared {
            nats: self.nats.clone(),
            subjects: Arc::new(self.subjects.clone()),
            tasks_done: AtomicU64::new(0),
            handler: Arc::new(handler),
            running: Running::default(),
            pacer: self.max_rate.map(Pacer::new),
            shutdown: shutdown.clone(),
            abandon: CancellationToken::new(),
        });
        let cancels = self.subjects.cancels(&self.pool);
        let listener = tokio::spawn(listen_for_cancels(self.nats.clone(), cancels, shared.clone()));
        let identity = registry::Identity { pool: self.pool.clone(), concurrency: self.concurrency };
        // Cancelled once the worker is done with its tasks, not when the stop is asked for.
        let stopped = CancellationToken::new();
        let registered = tokio::spawn(registry::keep_registered(
            jetstream.clone(),
            self.subjects.clone(),
            identity,
            shared.clone(),
            stopped.clone(),
        ));
        info!(pool = %self.pool, concurrency = self.concurrency, ack_wait_ms = ack_wait.as_millis() as u64, "worker started");

        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut in_flight = JoinSet::new();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let woken = Arc::new(Notify::new());
        let announced = Arc::new(lanes::Announced::default());
        let announcements = tokio::spawn(listen_for_new_lanes(
            self.nats.clone(),
            self.subjects.lane_opened(&self.pool),
            Arc::clone(&announced),
            Arc::clone(&woken),
        ));
        loop {
            while in_flight.try_join_next().is_some() {}
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit.expect("the slot semaphore is never closed"),
            };
            let mut permits = vec![first];
            let room = match &shared.pacer {
                Some(pacer) => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    room = pacer.room() => room,
                },
                None => usize::MAX,
            };
            // Looked for once a slot is free, right before the pull: a lane opened while every
            // slot was busy (the pool's first task of a priority) takes the slot if it is higher.
            // A stop does not wait for a look that NATS may be slow to answer (or never, when it is gone).
            let scanned = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                scanned = lanes.scan(&self.subjects, &self.pool, &self.limits, &announced) => scanned,
            };
            match scanned {
                Ok(bound) if !bound.is_empty() => {
                    info!(pool = %self.pool, priorities = ?bound, "pulling from more priority lanes")
                }
                Ok(_) => {}
                Err(error) => warn!(pool = %self.pool, error = %error, "looking for the pool's priority lanes failed"),
            }
            permits.extend(std::iter::from_fn(|| slots.clone().try_acquire_owned().ok()).take(room - 1));
            let failed = self.pull_lanes(&lanes, permits, &shared, &mut in_flight, &shutdown, &woken).await;
            let mut pool_lane_failed = false;
            for (priority, error) in failed {
                warn!(pool = %self.pool, priority, error = %error, "pulling tasks failed");
                if priority == PRIORITY_DEFAULT {
                    pool_lane_failed = true;
                } else {
                    // Its consumer is opened again beside the pulls, made anew if it was lost.
                    lanes.forget(priority);
                }
            }
            if !pool_lane_failed {
                backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
                continue;
            }
            // The pool's own consumer, and the stream with it had NATS lost its store, are
            // opened again after a pause that grows while they fail; the other lanes stay.
            let delay = backoff.next_delay();
            debug!(pool = %self.pool, delay_ms = delay.as_millis() as u64, "opening the pool consumer again");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            let opened = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                opened = self.open(&jetstream) => opened,
            };
            match opened {
                Ok((stream, consumer)) => lanes.reopen(stream, consumer),
                Err(error) => warn!(pool = %self.pool, error = %error, "reopening the pool consumer failed"),
            }
        }
        self.finish(in_flight, &shared).await;
        listener.abort();
        announcements.abort();
        // Its record goes once its tasks are done or handed back (or expires if that takes too long).
        stopped.cancel();
        let _ = tokio::time::timeout(STOP_STEP_WAIT, registered).await;
        Ok(())
    }

    /// Opens the tasks stream and the pool's consumer; other lanes are bound as they are found.
    async fn bind(&self, jetstream: &jetstream::Context) -> Result<Lanes> {
        let (stream, consumer) = self.open(jetstream).await?;
        Ok(Lanes::new(stream, consumer, &self.limits))
    }

    /// The tasks stream and the pool's consumer, each made if it does not exist.
    async fn open(&self, jetstream: &jetstream::Context) -> Result<(jetstream::stream::Stream, PullConsumer)> {
        let stream = broker::tasks_stream(jetstream, &self.subjects, &self.limits).await?;
        let consumer = broker::pool_consumer(&stream, &self.subjects, &self.pool, &self.limits).await?;
        Ok((stream, consumer))
    }

    /// Takes the tasks waiting on the pool's lanes, highest first, for as many as
    /// `permits`; when no lane has one, leaves a slot listening on each lane that has no
    /// listener (highest first, as far as the permits go) and returns when one of them
    /// took a task or stopped waiting. Returns the lanes whose pull failed (by priority),
    /// each passed over for the next: the permits go to the lanes that work.
    async fn pull_lanes(
        &self,
        lanes: &Lanes,
        mut permits: Vec<OwnedSemaphorePermit>,
        shared: &Arc<Shared>,
        in_flight: &mut JoinSet<()>,
        shutdown: &CancellationToken,
        woken: &Arc<Notify>,
    ) -> Vec<(u8, async_nats::Error)> {
        let free = permits.len();
        let mut failed = Vec::new();
        for lane in lanes.highest_first().iter().filter(|lane| !lane.is_listened()) {
            if permits.is_empty() {
                return failed;
            }
            if let Err(error) = self.fetch(lane, &mut permits, shared, in_flight).await {
                failed.push((lane.priority, error));
            }
        }
        // Lanes that failed are opened again before any slot listens, and lanes that gave
        // tasks are pulled again at once (they may have more).
        if permits.len() < free || !failed.is_empty() {
            return failed;
        }
        let unlistened: Vec<_> = lanes.highest_first().iter().filter(|lane| !lane.is_listened()).collect();
        let expires = if permits.len() >= unlistened.len() { PULL_EXPIRES } else { LISTEN_SHORT };
        for (lane, permit) in unlistened.into_iter().zip(std::iter::from_fn(|| permits.pop())) {
            lane.listening.store(true, std::sync::atomic::Ordering::Release);
            let (consumer, listening) = (lane.consumer.clone(), Arc::clone(&lane.listening));
            let (shared, woken, shutdown) = (Arc::clone(shared), Arc::clone(woken), shutdown.clone());
            let heartbeat_every = lane.heartbeat_every;
            in_flight.spawn(async move {
                let message = lanes::listen(&consumer, &listening, expires, &shutdown).await;
                let turn = message.as_ref().and_then(|_| shared.pacer.as_ref().map(Pacer::book));
                woken.notify_one();
                if let Some(message) = message {
                    serve(shared, message, permit, turn, heartbeat_every).await;
                }
            });
        }
        drop(permits);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            () = woken.notified() => {}
        }
        failed
    }

    /// Takes the tasks waiting on one lane, as many as `permits` (fewer, or none, when the
    /// lane has fewer or is at its bound of tasks out), and starts each with one of them.
    async fn fetch(
        &self,
        lane: &Lane,
        permits: &mut Vec<OwnedSemaphorePermit>,
        shared: &Arc<Shared>,
        in_flight: &mut JoinSet<()>,
    ) -> std::result::Result<(), async_nats::Error> {
        let pull = lane.consumer.fetch().max_messages(permits.len());
        if lane.is_bounded() {
            // Ended by the server (by async-nats 5 s past its expiry, should no answer come).
            let batch = pull.expires(FETCH_EXPIRES).messages().await?;
            self.start_each(batch, lane, permits, shared, in_flight, None).await?;
            return Ok(());
        }
        // A pull without an expiry has no timer of its own: one held, or lost with the
        // connection, would wait for good. It is given up once no message came for a while,
        // not after a while in all: a batch may take longer than that to come whole.
        let batch = pull.messages().await?;
        match self.start_each(batch, lane, permits, shared, in_flight, Some(FETCH_TIMEOUT)).await? {
            PullEnded::Done | PullEnded::Stopped => Ok(()),
            PullEnded::Quiet if self.nats.connection_state() == async_nats::connection::State::Connected => {
                // Held: the server drops the pull given up here when a slot frees, its reply
                // subject having no subscriber by then.
                info!(
                    pool = %self.pool,
                    priority = lane.priority,
                    "the pool's lane is at a bound of tasks out set since it was bound; its pulls end after \
                     {FETCH_EXPIRES:?} from now on"
                );
                lane.set_bounded();
                Ok(())
            }
            PullEnded::Quiet => {
                Err(format!("a pull got no message in {FETCH_TIMEOUT:?}; the connection to NATS is down").into())
            }
        }
    }

    /// Starts a task of `lane` for each message of `batch` as it comes, each with one of
    /// `permits`, until the pull ends, the worker stops or, with `idle`, no message came for
    /// that long ([`read_pull`]); in the last two cases, hands back (nak) the messages of the
    /// pull still on their way.
    async fn start_each(
        &self,
        mut batch: jetstream::consumer::pull::Batch,
        lane: &Lane,
        permits: &mut Vec<OwnedSemaphorePermit>,
        shared: &Arc<Shared>,
        in_flight: &mut JoinSet<()>,
        idle: Option<Duration>,
    ) -> std::result::Result<PullEnded, async_nats::Error> {
        let mut extra = Vec::new();
        let ended = read_pull(&mut batch, idle, &shared.shutdown, |message| match permits.pop() {
            Some(permit) => {
                let turn = shared.pacer.as_ref().map(Pacer::book);
                in_flight.spawn(serve(shared.clone(), message, permit, turn, lane.heartbeat_every));
            }
            None => extra.push(message),
        })
        .await;
        if !extra.is_empty() {
            // The server never sends more than asked; hand back anything extra.
            warn!(pool = %self.pool, extra = extra.len(), "pull delivered more messages than requested");
            for message in &extra {
                settle(message, Settle::Nak).await;
            }
        }
        if matches!(ended, Ok(PullEnded::Quiet | PullEnded::Stopped)) {
            hand_back_unstarted(&mut batch).await;
        }
        ended
    }

    /// Waits for the tasks in flight up to the shutdown grace, then hands back those not
    /// settled yet, whose handler still runs or whose result is still being sent (JetStream
    /// delivers them again at once, not after the ack wait), and sends what is left to send
    /// (acks, naks) before the worker returns.
    async fn finish(&self, mut in_flight: JoinSet<()>, shared: &Shared) {
        let running = in_flight.len();
        info!(pool = %self.pool, in_flight = running, "worker stopping");
        let mut drained = tokio::time::timeout(self.shutdown_grace, join_all(&mut in_flight)).await.is_ok();
        if !drained {
            warn!(
                pool = %self.pool,
                abandoned = in_flight.len(),
                grace_ms = self.shutdown_grace.as_millis() as u64,
                "tasks still running after the shutdown grace; those not settled yet are handed back to be delivered again"
            );
            shared.abandon.cancel();
            drained = tokio::time::timeout(STOP_STEP_WAIT, join_all(&mut in_flight)).await.is_ok();
        }
        if !drained {
            in_flight.shutdown().await;
        }
        if tokio::time::timeout(STOP_STEP_WAIT, shared.nats.flush()).await.is_err() {
            warn!(pool = %self.pool, "the last acks of the worker may not have reached NATS");
        }
        info!(pool = %self.pool, "worker stopped");
    }
}

/// Waits for every task of `in_flight` to end.
async fn join_all(in_flight: &mut JoinSet<()>) {
    while in_flight.join_next().await.is_some() {}
}

/// What every task of a worker shares.
struct Shared {
    nats: async_nats::Client,
    subjects: Arc<Subjects>,
    /// Tasks settled since the worker started (for its record in the workers bucket).
    tasks_done: AtomicU64,
    handler: Arc<dyn TaskHandler>,
    running: Running,
    pacer: Option<Pacer>,
    /// The worker's stop: a task still waiting for its turn then goes back unstarted.
    shutdown: CancellationToken,
    /// The shutdown grace is over: a task whose handler still runs, or whose result is
    /// still being sent, goes back (nak).
    abandon: CancellationToken,
}

/// The lowest rate [`Worker::max_rate`] takes: one task a day.
pub const MAX_RATE_MIN: f64 = 1.0 / 86_400.0;

/// How far ahead a worker under [`Worker::max_rate`] books turns for the tasks it takes.
const PACER_AHEAD: Duration = Duration::from_secs(1);

/// Spaces task starts at most `rate` a second, in the order they ask.
struct Pacer {
    interval: Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            interval: Duration::from_secs_f64(1.0 / rate),
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until the worker may take tasks from the stream, and returns how many: as
    /// many as start within [`PACER_AHEAD`] after the turns booked already (at least one).
    /// A worker under a bound so takes a task at most that long before it can start it: the
    /// tasks it holds wait no longer, well within their deadline, and the pool's other
    /// workers take the rest of the stream.
    async fn room(&self) -> usize {
        loop {
            let booked = self.next().saturating_duration_since(tokio::time::Instant::now());
            if booked < PACER_AHEAD {
                let turns = (PACER_AHEAD - booked).as_secs_f64() / self.interval.as_secs_f64();
                return (turns.ceil() as usize).max(1);
            }
            tokio::time::sleep(booked - PACER_AHEAD + Duration::from_millis(1)).await;
        }
    }

    /// Books the next free turn for a task taken now: when it may start. Booked as the task
    /// is taken, before anything else runs, so that [`Pacer::room`] counts it at once.
    fn book(&self) -> tokio::time::Instant {
        let mut next = self.next.lock().expect("the pacer's lock is never poisoned");
        let turn = (*next).max(tokio::time::Instant::now());
        *next = turn + self.interval;
        turn
    }

    fn next(&self) -> tokio::time::Instant {
        *self.next.lock().expect("the pacer's lock is never poisoned")
    }
}

/// The cancellation of every task running, by attempt (an attempt delivered twice to the
/// same worker shares one, counted).
#[derive(Default)]
struct Running(std::sync::Mutex<HashMap<AttemptId, (CancellationToken, usize)>>);

impl Running {
    /// Notes `task` as running until the guard is dropped.
    fn enter<'a>(&'a self, task: &mut Task) -> RunningGuard<'a> {
        let mut running = self.0.lock().expect("the running tasks' lock is never poisoned");
        let (token, count) = running.entry(task.attempt.clone()).or_insert_with(|| (task.cancellation.clone(), 0));
        *count += 1;
        task.cancellation = token.clone();
        RunningGuard { running: self, attempt: task.attempt.clone() }
    }

    /// Tasks running now.
    fn count(&self) -> usize {
        self.0.lock().expect("the running tasks' lock is never poisoned").len()
    }

    /// Cancels the tasks of these attempts that run here; returns how many did.
    fn cancel(&self, attempts: &[AttemptId]) -> usize {
        let running = self.0.lock().expect("the running tasks' lock is never poisoned");
        let tokens: Vec<_> = attempts.iter().filter_map(|attempt| running.get(attempt)).collect();
        tokens.iter().for_each(|(token, _)| token.cancel());
        tokens.len()
    }
}

struct RunningGuard<'a> {
    running: &'a Running,
    attempt: AttemptId,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut running = self.running.0.lock().expect("the running tasks' lock is never poisoned");
        if let Some((_, count)) = running.get_mut(&self.attempt) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.attempt);
            }
        }
    }
}

/// Cancels the running tasks the coordinators say are no longer needed, until the worker
/// has stopped (tasks still run during its shutdown grace). Notices are advisory: without
/// them, a task runs to its end and its result is ignored.
async fn listen_for_cancels(nats: async_nats::Client, subject: String, shared: Arc<Shared>) {
    let mut notices = match nats.subscribe(subject.clone()).await {
        Ok(notices) => notices,
        Err(error) => {
            warn!(subject = %subject, error = %error, "cannot listen for cancelled tasks; cancelled tasks run to their end");
            return;
        }
    };
    while let Some(notice) = notices.next().await {
        let encoding = crate::encoding_of(notice.headers.as_ref());
        match decode::<TasksCancelled>(encoding, &notice.payload) {
            Ok(cancelled) => {
                let stopped = shared.running.cancel(&cancelled.attempts);
                if stopped > 0 {
                    debug!(subject = %subject, stopped, "tasks cancelled by their runs");
                }
            }
            Err(error) => warn!(subject = %subject, error = %error, "malformed notice of cancelled tasks ignored"),
        }
    }
}

/// Wakes the pull loop to look for lanes when a coordinator announces a new one of the pool.
async fn listen_for_new_lanes(
    nats: async_nats::Client,
    subject: String,
    announced: Arc<lanes::Announced>,
    woken: Arc<Notify>,
) {
    let mut announcements = match nats.subscribe(subject.clone()).await {
        Ok(announcements) => announcements,
        Err(error) => {
            // The pool's lanes are still found every second.
            debug!(subject = %subject, error = %error, "cannot subscribe to new lanes' announcements");
            return;
        }
    };
    while let Some(announcement) = announcements.next().await {
        if announced.note(&announcement.payload) {
            woken.notify_one();
        }
    }
}

/// How the reading of a pull ended ([`read_pull`]).
#[derive(Debug, PartialEq)]
enum PullEnded {
    /// The pull ended: every message it brought was read.
    Done,
    /// No message came for the idle time: the server holds the pull, or the connection is lost.
    Quiet,
    /// The worker is stopping.
    Stopped,
}

/// Passes each message of a pull to `take` as it comes, until the pull ends, the worker
/// stops or, with `idle`, no message came for that long: from the pull, then from each
/// message, so that a pull answered slowly (a large batch) is read to its end however long
/// it takes in all.
async fn read_pull<S, M>(
    messages: &mut S,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
    mut take: impl FnMut(M),
) -> std::result::Result<PullEnded, async_nats::Error>
where
    S: futures::Stream<Item = std::result::Result<M, async_nats::Error>> + Unpin,
{
    loop {
        let next = async {
            match idle {
                Some(idle) => tokio::time::timeout(idle, messages.next()).await.ok(),
                None => Some(messages.next().await),
            }
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(PullEnded::Stopped),
            next = next => next,
        };
        match next {
            None => return Ok(PullEnded::Quiet),
            Some(None) => return Ok(PullEnded::Done),
            Some(Some(Err(error))) => return Err(error),
            Some(Some(Ok(message))) => take(message),
        }
    }
}

/// Messages of a pull that arrive after shutdown, or after the pull was given up, are
/// handed back at once.
async fn hand_back_unstarted(batch: &mut jetstream::consumer::pull::Batch) {
    let _ = tokio::time::timeout(PULL_DRAIN, async {
        while let Some(Ok(message)) = batch.next().await {
            settle(&message, Settle::Nak).await;
        }
    })
    .await;
}

/// Runs one task message to its end: decode, wait for its `turn` under the worker's rate
/// bound, run, report, settle, heartbeating it every `heartbeat_every` (its lane's period)
/// meanwhile. Holds its slot until the message is settled.
async fn serve(
    shared: Arc<Shared>,
    message: jetstream::Message,
    _slot: OwnedSemaphorePermit,
    turn: Option<tokio::time::Instant>,
    heartbeat_every: Duration,
) {
    let encoding = crate::encoding_of(message.headers.as_ref());
    let task_message: TaskMessage = match decode(encoding, &message.payload) {
        Ok(task_message) => task_message,
        Err(error) => {
            warn!(subject = %message.subject, error = %error, "malformed task message, terminating it");
            settle(&message, Settle::Term).await;
            return;
        }
    };
    let attempt = task_message.attempt.clone();
    debug!(attempt = %attempt, task = %task_message.task, "task received");
    let outcome = tokio::select! {
        outcome = work(&shared, task_message, turn) => outcome,
        never = heartbeat(&message, heartbeat_every) => match never {},
    };
    debug!(attempt = %attempt, outcome = ?outcome, "task settled");
    settle(&message, outcome).await;
    shared.tasks_done.fetch_add(1, Ordering::Relaxed);
}

/// Runs the handler and reports its result; returns how to settle the message.
async fn work(shared: &Shared, task_message: TaskMessage, turn: Option<tokio::time::Instant>) -> Settle {
    let TaskMessage { attempt, pool, task, input, deadline_ms, reply_to, progress } = task_message;
    let input = Arc::unwrap_or_clone(input);
    let reporter = Arc::new(ProgressReporter {
        nats: shared.nats.clone(),
        reply_to: reply_to.clone(),
        subjects: Arc::clone(&shared.subjects),
        live_seq: AtomicU64::new(0),
    });
    let mut task = Task::new(attempt.clone(), &*pool, &*task, input, deadline_ms).with_progress(progress);
    task.reporter = Some(reporter);
    let _running = shared.running.enter(&mut task);
    if let Some(turn) = turn {
        tokio::select! {
            () = tokio::time::sleep_until(turn) => {}
            () = task.cancellation().cancelled() => {
                debug!(attempt = %attempt, "task cancelled by its run while waiting for its turn");
                return Settle::Ack;
            }
            () = shared.shutdown.cancelled() => {
                debug!(attempt = %attempt, "worker stopping; the task waiting for its turn is handed back");
                return Settle::Nak;
            }
        }
    }
    let detached = Arc::clone(&task.detached);
    let cancellation = task.cancellation().clone();
    let ran = tokio::select! {
        ran = run_handler(shared.handler.clone(), task) => ran,
        () = shared.abandon.cancelled() => {
            // The handler is aborted with `run_handler`; its own threads learn it from the token.
            cancellation.cancel();
            // Detached or not: a handler stopped before it returned may not have handed its
            // token on. A redelivery detaches the same attempt again.
            return Settle::Nak;
        }
    };
    let outcome = match ran {
        Ran::Cancelled => {
            debug!(attempt = %attempt, "task cancelled by its run; acking it without a result");
            return Settle::Ack;
        }
        Ran::Returned(_) if detached.load(Ordering::Relaxed) => {
            debug!(attempt = %attempt, "async task detached; its result comes with its token");
            return Settle::Ack;
        }
        Ran::Returned(outcome) => outcome,
        // Detached or not: a handler that did not return may not have handed its token on.
        Ran::Aborted(error) => Err(error),
    };
    let result = match outcome {
        Ok(output) => TaskResult { attempt, output: Some(output), error: None, progress: None },
        Err(error) => TaskResult { attempt, output: None, error: Some(error), progress: None },
    };
    let give_up_ms = deadline_ms.saturating_add(report::REPORT_GRACE_MS);
    report(&shared.nats, &reply_to, result, give_up_ms, &shared.abandon).await
}

/// How a handler's run ended ([`run_handler`]).
#[derive(Debug)]
enum Ran {
    /// The handler returned this.
    Returned(std::result::Result<Value, TaskError>),
    /// The handler panicked, or was abandoned at its deadline (or the deadline was over
    /// before it started): the task's result is this error.
    Aborted(TaskError),
    /// The task was cancelled, and the handler with it.
    Cancelled,
}

/// Runs the handler in its own task, so that a panic becomes an error result and an
/// overrun is abandoned at the deadline.
async fn run_handler(handler: Arc<dyn TaskHandler>, task: Task) -> Ran {
    let Some(budget) = handler_budget(task.deadline_ms(), now_ms()) else {
        return Ran::Aborted(deadline_exceeded());
    };
    let cancellation = task.cancellation().clone();
    // Aborted with the task that awaits it too: a worker that stops after its shutdown
    // grace leaves no handler running on without heartbeats.
    let mut running = AbortOnDropHandle::new(tokio::spawn(handler.handle(task)));
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(budget, &mut running) => outcome,
        _ = cancellation.cancelled() => {
            running.abort();
            return Ran::Cancelled;
        }
    };
    match outcome {
        Ok(Ok(outcome)) => Ran::Returned(outcome),
        Ok(Err(join_error)) => Ran::Aborted(TaskError {
            code: "worker_panic".into(),
            message: format!("the task handler panicked: {join_error}"),
            retryable: true,
        }),
        Err(_elapsed) => {
            // A handler's own threads or processes learn it from the token.
            cancellation.cancel();
            running.abort();
            Ran::Aborted(deadline_exceeded())
        }
    }
}

/// What [`Task::report_progress`] returns for what its request got.
fn progress_outcome(sent: report::Sent, attempt: &AttemptId) -> Result<bool> {
    match sent {
        report::Sent::Confirmed(ack) => Ok(ack.applied),
        report::Sent::Refused(refusal) => Err(refusal.into()),
        report::Sent::TooLarge => {
            Err(ApiError::new(ErrorCode::PayloadTooLarge, "the progress report is over the server's message limit")
                .into())
        }
        report::Sent::NoAnswer { request: Some(error), .. }
            if error.kind() == async_nats::RequestErrorKind::TimedOut =>
        {
            Err(Error::Timeout { what: format!("progress report of {attempt}"), after: report::RESULT_REQUEST_TIMEOUT })
        }
        // Nobody listening or a lost connection, said as it was (`is_no_responders`).
        report::Sent::NoAnswer { request: Some(error), .. } => {
            Err(Error::Nats { context: format!("progress report of {attempt}"), source: Box::new(error) })
        }
        report::Sent::NoAnswer { reason, request: None } => Err(Error::Nats {
            context: format!("progress report of {attempt}: the reply was unreadable"),
            source: reason.into(),
        }),
    }
}

fn deadline_exceeded() -> TaskError {
    TaskError {
        code: "deadline_exceeded".into(),
        message: "the task ran past its deadline and was abandoned by the worker".into(),
        retryable: true,
    }
}

/// How long the handler may run: until the deadline plus a grace for clock skew; `None`
/// when that is already over.
fn handler_budget(deadline_ms: Millis, now: Millis) -> Option<Duration> {
    let end = deadline_ms.saturating_add(DEADLINE_GRACE.as_millis() as u64);
    (end > now).then(|| Duration::from_millis(end - now))
}

/// A third of the ack wait, so that two heartbeats may be lost before JetStream gives up.
fn heartbeat_period(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(HEARTBEAT_MIN)
}

/// Tells JetStream the message is still being worked on, forever (cancelled by dropping).
async fn heartbeat(message: &jetstream::Message, period: Duration) -> std::convert::Infallible {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        ticks.tick().await;
        if let Err(error) = message.ack_with(AckKind::Progress).await {
            debug!(subject = %message.subject, error = %error, "heartbeat failed");
        }
    }
}

async fn settle(message: &jetstream::Message, outcome: Settle) {
    let kind = match outcome {
        Settle::Ack => AckKind::Ack,
        Settle::Nak => AckKind::Nak(None),
        Settle::Term => AckKind::Term,
    };
    if let Err(error) = message.ack_with(kind).await {
        // JetStream delivers the message again after its ack wait; the coordinator ignores
        // a duplicate result.
        warn!(subject = %message.subject, error = %error, "settling a task message failed");
    }
}

pub(crate) fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|since| since.as_millis() as Millis).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under a bound, a worker takes a task at most a second before it can start it: at a
    /// rate of one task every 2 s, a second before its turn (before, it took as many as it
    /// had slots, whose turns went far past their deadlines); at 100 a second, a second's
    /// worth.
    #[tokio::test(start_paused = true)]
    async fn a_paced_worker_takes_tasks_about_when_it_can_start_them() {
        let slow = Pacer::new(0.5);
        assert_eq!(slow.room().await, 1);
        let first = slow.book();
        assert_eq!(first, tokio::time::Instant::now(), "the first task starts at once");
        // Its successor is taken a second before its turn, 2 s on, not at once.
        assert_eq!(slow.room().await, 1);
        assert!(first.elapsed() >= Duration::from_millis(990), "{:?}", first.elapsed());
        let second = slow.book();
        assert_eq!(second, first + Duration::from_secs(2));
        assert_eq!(slow.room().await, 1);
        assert!(first.elapsed() >= Duration::from_millis(2_990), "a third task waited: {:?}", first.elapsed());

        let fast = Pacer::new(100.0);
        assert_eq!(fast.room().await, 100, "a second's worth of turns");
        let started = tokio::time::Instant::now();
        for _ in 0..100 {
            fast.book();
        }
        assert_eq!(fast.room().await, 1, "room again as the first turns go");
        assert!(started.elapsed() >= Duration::from_millis(1), "{:?}", started.elapsed());
    }

    #[test]
    fn handler_budget_runs_to_the_deadline_plus_grace() {
        assert_eq!(handler_budget(10_000, 9_000), Some(Duration::from_millis(2_000)));
        assert_eq!(handler_budget(10_000, 10_500), Some(Duration::from_millis(500)));
        assert_eq!(handler_budget(10_000, 11_000), None);
        assert_eq!(handler_budget(10_000, 20_000), None);
    }

    #[test]
    fn heartbeats_come_three_times_per_ack_wait() {
        assert_eq!(heartbeat_period(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(heartbeat_period(Duration::from_millis(30)), HEARTBEAT_MIN);
    }

    #[test]
    fn a_progress_report_fails_as_what_happened_to_its_request() {
        use async_nats::{RequestError, RequestErrorKind};
        let no_answer = |kind| report::Sent::NoAnswer { reason: "x".into(), request: Some(RequestError::new(kind)) };
        let timed_out = progress_outcome(no_answer(RequestErrorKind::TimedOut), &attempt()).unwrap_err();
        assert!(matches!(timed_out, Error::Timeout { .. }), "{timed_out:?}");
        let nobody = progress_outcome(no_answer(RequestErrorKind::NoResponders), &attempt()).unwrap_err();
        assert!(nobody.is_no_responders(), "no coordinator is not a timeout: {nobody:?}");
        let garbled = report::Sent::NoAnswer { reason: "invalid MessagePack".into(), request: None };
        let unreadable = progress_outcome(garbled, &attempt()).unwrap_err().to_string();
        assert!(unreadable.contains("unreadable"), "{unreadable}");
        let confirmed = report::Sent::Confirmed(flowgrid_proto::ResultAck { applied: false });
        assert!(!progress_outcome(confirmed, &attempt()).unwrap(), "an attempt that is over ignores the report");
    }

    #[tokio::test]
    async fn a_panicking_handler_becomes_a_retryable_error() {
        let handler: Arc<dyn TaskHandler> = Arc::new(|_task: Task| async move {
            if true {
                panic!("bad input");
            }
            Ok(Value::Null)
        });
        let task = Task::new(attempt(), "pool", "explode", Value::Null, now_ms() + 60_000);
        let Ran::Aborted(error) = run_handler(handler, task).await else { panic!("the handler did not return") };
        assert_eq!(error.code, "worker_panic");
        assert!(error.retryable);
    }

    #[tokio::test]
    async fn a_handler_past_its_deadline_is_abandoned() {
        let handler: Arc<dyn TaskHandler> = Arc::new(|_task: Task| async move {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
            Ok(Value::Null)
        });
        let task = Task::new(attempt(), "pool", "slow", Value::Null, now_ms().saturating_sub(500));
        let started = std::time::Instant::now();
        let Ran::Aborted(error) = run_handler(handler, task).await else { panic!("the handler did not return") };
        assert_eq!(error.code, "deadline_exceeded");
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_cancelled_task_stops_its_handler_and_only_its_own() {
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let handler: Arc<dyn TaskHandler> = Arc::new({
            let stopped = stopped.clone();
            move |_task: Task| {
                let stopped = stopped.clone();
                async move {
                    // Set only if the handler's future is not dropped while it sleeps.
                    tokio::time::sleep(Duration::from_secs(3_600)).await;
                    stopped.store(false, std::sync::atomic::Ordering::Relaxed);
                    Ok(Value::Null)
                }
            }
        });
        let running = Running::default();
        let mut task = Task::new(attempt(), "pool", "slow", Value::Null, now_ms() + 3_600_000);
        let mut again = task.clone();
        let guard = running.enter(&mut task);
        let second = running.enter(&mut again);
        let other = AttemptId { attempt: 2, ..attempt() };
        assert_eq!(running.cancel(std::slice::from_ref(&other)), 0, "another attempt is not running here");
        assert!(!task.cancellation().is_cancelled());
        let handling = tokio::spawn(run_handler(handler, task));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(running.cancel(&[attempt(), other]), 1, "one attempt, delivered twice, is one entry");
        let outcome = tokio::time::timeout(Duration::from_secs(10), handling).await.expect("stops at once");
        assert!(matches!(outcome.expect("no panic"), Ran::Cancelled), "a cancelled task has no outcome");
        assert!(again.cancellation().is_cancelled(), "the second delivery is cancelled with the first");
        assert!(stopped.load(std::sync::atomic::Ordering::Relaxed));
        drop(guard);
        assert_eq!(running.0.lock().unwrap().len(), 1, "the second delivery still runs");
        drop(second);
        assert!(running.0.lock().unwrap().is_empty());
    }

    /// A progress report of `null` is refused as such, before anything is sent: the grid
    /// reads it as no report at all, and refused it as a result with neither an output nor an
    /// error.
    #[tokio::test]
    async fn a_progress_report_of_null_is_refused_saying_what_to_send() {
        let task = Task::new(attempt(), "pool", "steps", Value::Null, now_ms() + 60_000);
        let refused = task.report_progress(Value::Null).await.unwrap_err();
        let refusal = refused.api().unwrap_or_else(|| panic!("an API refusal: {refused:?}"));
        assert_eq!(refusal.code, ErrorCode::InvalidRequest);
        assert_eq!(refusal.message, PROGRESS_NULL_REFUSED);
        assert!(!task.report_progress(serde_json::json!({"done": 1})).await.unwrap(), "a task made by hand");
    }

    /// A pull's messages are read as they come, however long they take in all, as long as
    /// each comes within the idle time of the one before; a pull that goes quiet is given up.
    /// The time used to run for the whole pull: a large batch that took longer to come was
    /// given up halfway, the messages still on their way left to wait for the ack wait.
    #[tokio::test(start_paused = true)]
    async fn a_pull_answered_slowly_is_read_to_its_end_and_a_quiet_one_given_up() {
        const MESSAGES: u64 = 4;
        let gap = FETCH_TIMEOUT * 3 / 5;
        assert!(gap * MESSAGES as u32 > FETCH_TIMEOUT, "the pull takes longer than the idle time in all");
        let spaced = move |count: u64| {
            futures::stream::iter(1..=count).then(move |n| async move {
                tokio::time::sleep(gap).await;
                Ok::<u64, async_nats::Error>(n)
            })
        };
        let shutdown = CancellationToken::new();

        let mut taken = Vec::new();
        let mut slow = Box::pin(spaced(MESSAGES));
        let ended = read_pull(&mut slow, Some(FETCH_TIMEOUT), &shutdown, |n| taken.push(n)).await.unwrap();
        assert_eq!((ended, taken), (PullEnded::Done, vec![1, 2, 3, 4]), "every message of a slow pull");

        let mut taken = Vec::new();
        let mut quiet = Box::pin(spaced(2).chain(futures::stream::pending()));
        let ended = read_pull(&mut quiet, Some(FETCH_TIMEOUT), &shutdown, |n| taken.push(n)).await.unwrap();
        assert_eq!((ended, taken), (PullEnded::Quiet, vec![1, 2]), "a pull that went quiet");

        shutdown.cancel();
        let mut held = Box::pin(futures::stream::pending::<std::result::Result<u64, async_nats::Error>>());
        let ended = read_pull(&mut held, None, &shutdown, |_| {}).await.unwrap();
        assert_eq!(ended, PullEnded::Stopped);
    }

    fn attempt() -> AttemptId {
        AttemptId { run_id: flowgrid_model::RunId("run-1".into()), step: "step".into(), item: None, attempt: 1 }
    }
}
