//! Publishes dispatched tasks to JetStream, after the commit that dispatched them.
//!
//! Each publish carries `Nats-Msg-Id` = the attempt id and its run's creation time (a run
//! made again under the same id is another), so republishing the same attempt
//! (after a reload, or a retried publish) is dropped by JetStream inside its duplicate
//! window. Publishes are pipelined through one [`StreamPublisher`] (many acks awaited at
//! once, bounded). A publish that fails is retried with backoff until its attempt's
//! deadline (JetStream electing a leader, a full stream, a NATS restart); past it the
//! engine's attempt timeout retries the attempt, so a task is never silently lost.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::metrics::{Counter, Histogram};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use flowgrid_engine::TaskDispatch;
use flowgrid_model::ShardId;
use flowgrid_proto::{Encoding, Subjects, TaskMessage, PRIORITY_DEFAULT};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_sdk::{PublishFailure, StreamPublisher};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::metrics;

/// Tasks waiting to be published, over all shards: bounds memory; shard actors wait
/// (back-pressure) when it is full.
const QUEUE_TASKS_MAX: usize = 16_384;
/// Publishes awaiting their JetStream ack (or their retry's backoff) at once: enough to
/// keep the broker busy.
const PUBLISHES_IN_FLIGHT_MAX: usize = 1_024;
/// A task whose publish failed this many times in a row is logged as a warning (the earlier
/// failures at debug level); it is still retried until its attempt's deadline.
const PUBLISH_TRIES_WARN: u32 = 8;
/// Publishes waiting out a retry's backoff at most. A task that fails past it is left to
/// its attempt's timeout: the other half of [`PUBLISHES_IN_FLIGHT_MAX`] stays for new
/// tasks, so that the queue keeps moving and shard actors go on taking results (which let
/// workers ack their tasks and free room in a full stream).
const RETRYING_MAX: usize = PUBLISHES_IN_FLIGHT_MAX / 2;
/// At most one warning per this long about tasks left to their attempt's timeout.
const GIVEN_UP_WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a publish waits for JetStream's ack before it is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the publisher waits before it tries again to create a lane's consumer that it
/// could not create (workers create it too).
const LANE_RETRY: Duration = Duration::from_secs(1);
/// How long a task message outlives its attempt's deadline in the stream (`Nats-TTL`):
/// past the deadline the attempt is over (a worker skips such a message, and the engine
/// has retried or failed the attempt), so the message only took room and counted as
/// backlog. The second is TTL's grain.
const TASK_TTL_PAST_DEADLINE_S: u64 = 1;

/// Where shard actors hand tasks to publish.
#[derive(Clone)]
pub struct Dispatcher {
    sender: mpsc::Sender<Queued>,
}

/// A task on its way to the publisher, with when its commit handed it over.
struct Queued {
    shard: ShardId,
    task: TaskDispatch,
    at: Instant,
    result_taken: Option<Instant>,
}

impl Dispatcher {
    /// Subscribes for the acks and starts the publishing task.
    pub async fn spawn(
        nats: async_nats::Client,
        tasks_stream: async_nats::jetstream::stream::Stream,
        subjects: Subjects,
        limits: BrokerLimits,
        shutdown: CancellationToken,
    ) -> Result<(Dispatcher, tokio::task::JoinHandle<()>)> {
        let stream = StreamPublisher::new(nats.clone(), ACK_TIMEOUT)
            .await
            .map_err(|source| Error::Nats { what: "subscribe to task publish acks", source: Box::new(source) })?;
        let (sender, receiver) = mpsc::channel(QUEUE_TASKS_MAX);
        let message_ttl = tasks_stream.cached_info().config.allow_message_ttl;
        if !message_ttl {
            warn!("the tasks stream keeps no message lifetime (nats-server before 2.11?): tasks of attempts that ended wait there until a worker takes and skips them");
        }
        let publisher = Publisher {
            nats,
            stream,
            tasks_stream,
            message_ttl,
            subjects: Arc::new(subjects),
            limits,
            lanes_ready: HashMap::new(),
            lanes_failed: HashMap::new(),
            lanes: HashMap::new(),
            result_subjects: HashMap::new(),
            publish_seconds: ::metrics::histogram!(metrics::TASK_PUBLISH_SECONDS),
            step_seconds: ::metrics::histogram!(metrics::STEP_SECONDS),
            given_up: 0,
            given_up_warned: None,
        };
        let handle = tokio::spawn(publisher.run(receiver, shutdown));
        Ok((Dispatcher { sender }, handle))
    }

    /// Queues a task; waits while the queue is full. `result_taken`: when the shard took
    /// the result that led to the task, for the step overhead.
    pub async fn send(&self, shard: ShardId, task: TaskDispatch, result_taken: Option<Instant>) {
        if self.sender.send(Queued { shard, task, at: Instant::now(), result_taken }).await.is_err() {
            debug!("dispatcher stopped; the task will be republished when its shard reloads");
        }
    }
}

struct Publisher {
    nats: async_nats::Client,
    stream: StreamPublisher<(Publication, u32)>,
    tasks_stream: async_nats::jetstream::stream::Stream,
    /// Whether the tasks stream takes a lifetime per message.
    message_ttl: bool,
    subjects: Arc<Subjects>,
    limits: BrokerLimits,
    /// Lanes whose consumer exists: by pool, a bit per priority (looked up per task
    /// without building a key).
    lanes_ready: HashMap<Arc<str>, u16>,
    /// Lanes whose consumer could not be created, and when that was last tried.
    lanes_failed: HashMap<(Arc<str>, u8), Instant>,
    /// Each lane's task subject and its pool's counters, and each shard's result subject,
    /// made once.
    lanes: HashMap<(Arc<str>, u8), Arc<PoolTarget>>,
    result_subjects: HashMap<ShardId, String>,
    publish_seconds: Histogram,
    step_seconds: Histogram,
    /// Tasks left to their attempt's timeout since the last warning, and when that was.
    given_up: u64,
    given_up_warned: Option<Instant>,
}

/// Where a pool's tasks of one priority go, and what counts them.
struct PoolTarget {
    subject: Subject,
    dispatched: Counter,
    /// Failed publishes queued to be retried.
    publish_failed: Counter,
    /// Tasks whose publish failed and was given up: left to their attempt's timeout.
    publish_given_up: Counter,
}

/// One task, encoded once; a retried publish sends the same bytes.
struct Publication {
    pool: Arc<PoolTarget>,
    /// The attempt's message id: the `Nats-Msg-Id` header, and the attempt in logs.
    message_id: String,
    /// Its lifetime in the stream (`Nats-TTL`, seconds), where the stream takes one.
    ttl: Option<String>,
    payload: Bytes,
    /// The attempt's deadline (Unix ms): a publish still failing then is given up, as the
    /// attempt has timed out and the engine retries it.
    deadline_ms: u64,
    /// When the commit handed the task over: its publish latency starts there.
    queued: Instant,
    /// When the shard took the result that led to the task: its step overhead starts there.
    result_taken: Option<Instant>,
}

/// Retries waiting out their backoff: the publication and its try number.
type Backoffs = FuturesUnordered<BoxFuture<'static, (Publication, u32)>>;

impl Publisher {
    async fn run(mut self, mut receiver: mpsc::Receiver<Queued>, shutdown: CancellationToken) {
        let mut backoffs = Backoffs::new();
        loop {
            let room = self.stream.in_flight() + backoffs.len() < PUBLISHES_IN_FLIGHT_MAX;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                received = receiver.recv(), if room => {
                    let Some(queued) = received else { break };
                    self.ensure_lane(&queued.task.pool, queued.task.priority).await;
                    if let Some(publication) = self.encode(queued) {
                        self.publish(publication, 1, &mut backoffs).await;
                    }
                }
                Some(outcome) = self.stream.next(), if self.stream.in_flight() > 0 => {
                    self.after_publish(outcome, &mut backoffs);
                }
                Some((publication, try_number)) = backoffs.next(), if !backoffs.is_empty() => {
                    self.publish(publication, try_number, &mut backoffs).await;
                }
            }
        }
        // Wait for the acks of what was sent, so a clean stop loses nothing in flight;
        // retries still in backoff are left to the attempt timeout.
        while self.stream.in_flight() > 0 {
            let Some(outcome) = self.stream.next().await else { break };
            self.after_publish(outcome, &mut Backoffs::new());
        }
    }

    /// Creates the consumer of the pool's lane of `priority` before its first task, so that
    /// the task waits for workers that start later. Workers also create it, so a failure
    /// here only logs.
    async fn ensure_lane(&mut self, pool: &Arc<str>, priority: u8) {
        let bit = 1u16 << priority;
        if self.lanes_ready.get(&**pool).is_some_and(|ready| ready & bit != 0) {
            return;
        }
        // Every task waits for this call: while JetStream fails it, try once per interval,
        // not once per task.
        if self.lanes_failed.get(&(Arc::clone(pool), priority)).is_some_and(|at| at.elapsed() < LANE_RETRY) {
            return;
        }
        match broker::lane_consumer(&self.tasks_stream, &self.subjects, pool, priority, &self.limits).await {
            Ok(_) => {
                *self.lanes_ready.entry(Arc::clone(pool)).or_default() |= bit;
                self.lanes_failed.remove(&(Arc::clone(pool), priority));
                if priority != PRIORITY_DEFAULT {
                    // Idle workers of the pool look for the new lane at once (best effort:
                    // they also look every second).
                    let opened = self.subjects.lane_opened(pool);
                    if let Err(error) = self.nats.publish(opened, priority.to_string().into()).await {
                        debug!(pool = %pool, priority, error = %error, "cannot announce a new lane");
                    }
                }
            }
            Err(error) => {
                warn!(pool = %pool, priority, error = %error, "cannot create the pool's consumer; tried again in {LANE_RETRY:?}");
                self.lanes_failed.insert((Arc::clone(pool), priority), Instant::now());
            }
        }
    }

    /// The task's message, moved out of the dispatch (no copy of the input).
    fn encode(&mut self, Queued { shard, task, at, result_taken }: Queued) -> Option<Publication> {
        let subjects = &self.subjects;
        let pool = Arc::clone(self.lanes.entry((Arc::clone(&task.pool), task.priority)).or_insert_with_key(
            |(pool, priority)| {
                Arc::new(PoolTarget {
                    subject: subjects.task_lane(pool, *priority).into(),
                    dispatched: ::metrics::counter!(metrics::TASKS_DISPATCHED, "pool" => Arc::clone(pool)),
                    publish_failed: ::metrics::counter!(metrics::TASKS_PUBLISH_FAILED, "pool" => Arc::clone(pool)),
                    publish_given_up: ::metrics::counter!(
                        metrics::TASKS_PUBLISH_GIVEN_UP,
                        "pool" => Arc::clone(pool)
                    ),
                })
            },
        ));
        let reply_to = self.result_subjects.entry(shard).or_insert_with(|| subjects.shard_results(shard.0)).clone();
        let mut message_id = task.attempt.message_id();
        // Writing to a `String` cannot fail.
        let _ = write!(message_id, ":{}", task.run_created_ms);
        let ttl = self.message_ttl.then(|| {
            let left_ms = task.deadline_ms.saturating_sub(crate::clock::now_ms());
            (left_ms.div_ceil(1000) + TASK_TTL_PAST_DEADLINE_S).to_string()
        });
        let message = TaskMessage {
            attempt: task.attempt,
            pool: task.pool,
            task: task.task,
            input: task.input,
            deadline_ms: task.deadline_ms,
            reply_to,
            progress: task.progress,
        };
        match flowgrid_proto::encode(Encoding::MsgPack, &message) {
            Ok(bytes) => {
                let payload = Bytes::from(bytes);
                let deadline_ms = message.deadline_ms;
                Some(Publication { pool, message_id, ttl, payload, deadline_ms, queued: at, result_taken })
            }
            Err(error) => {
                // Every task is plain data; the attempt timeout retries it if this ever happens.
                warn!(attempt = %message_id, error = %error, "cannot encode a task");
                None
            }
        }
    }

    /// Sends one try; its ack comes from `self.stream.next()`.
    async fn publish(&mut self, publication: Publication, try_number: u32, backoffs: &mut Backoffs) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", publication.message_id.as_str());
        if let Some(ttl) = &publication.ttl {
            headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl.as_str());
        }
        let (subject, payload) = (publication.pool.subject.clone(), publication.payload.clone());
        if let Err(refused) = self.stream.publish(subject, headers, payload, (publication, try_number)).await {
            self.after_publish((refused.0, Err(refused.1)), backoffs);
        }
    }

    /// Counts the outcome; a failed try is queued to be retried after its backoff (counted in
    /// `flowgrid_tasks_publish_failed_total`), or given up past the attempt's deadline or
    /// while too many others wait (counted in `flowgrid_tasks_publish_given_up_total`).
    fn after_publish(
        &mut self,
        ((publication, try_number), result): ((Publication, u32), Result<(), PublishFailure>),
        backoffs: &mut Backoffs,
    ) {
        let error = match result {
            Ok(()) => {
                self.publish_seconds.record(publication.queued.elapsed().as_secs_f64());
                if let Some(taken) = publication.result_taken {
                    self.step_seconds.record(taken.elapsed().as_secs_f64());
                }
                publication.pool.dispatched.increment(1);
                return;
            }
            Err(error) => error,
        };
        let attempt = &publication.message_id;
        let delay = retry_delay(try_number + 1);
        let past_deadline = crate::clock::now_ms().saturating_add(delay.as_millis() as u64) >= publication.deadline_ms;
        if past_deadline || backoffs.len() >= RETRYING_MAX {
            publication.pool.publish_given_up.increment(1);
            self.given_up += 1;
            if self.given_up_warned.is_none_or(|warned| warned.elapsed() >= GIVEN_UP_WARN_EVERY) {
                warn!(
                    attempt = %attempt,
                    error = %error,
                    tasks = self.given_up,
                    retrying = backoffs.len(),
                    "task publishes failed until their attempts' deadline, or while {RETRYING_MAX} others waited to be \
                     retried; their attempt timeouts retry them"
                );
                (self.given_up, self.given_up_warned) = (0, Some(Instant::now()));
            }
            return;
        }
        if try_number == PUBLISH_TRIES_WARN {
            warn!(attempt = %attempt, error = %error, try_number, "task publish keeps failing; retrying until the attempt's deadline");
        } else {
            debug!(attempt = %attempt, error = %error, try_number, "task publish failed; retrying");
        }
        publication.pool.publish_failed.increment(1);
        backoffs.push(Box::pin(async move {
            tokio::time::sleep(delay).await;
            (publication, try_number + 1)
        }));
    }
}

/// Backoff before publish try `n` (1-based): none for the first, then 50 ms doubling to 5 s.
fn retry_delay(try_number: u32) -> Duration {
    if try_number <= 1 {
        return Duration::ZERO;
    }
    let millis = 50u64.saturating_mul(1 << (try_number - 2).min(7));
    Duration::from_millis(millis.min(5_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_retries_back_off_and_are_capped() {
        assert_eq!(retry_delay(1), Duration::ZERO);
        assert_eq!(retry_delay(2), Duration::from_millis(50));
        assert_eq!(retry_delay(3), Duration::from_millis(100));
        assert_eq!(retry_delay(20), Duration::from_millis(5_000));
    }
}
