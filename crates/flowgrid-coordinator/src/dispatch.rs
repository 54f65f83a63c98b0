//! Publishes dispatched tasks to JetStream, after the commit that dispatched them.
//!
//! Each publish carries `Nats-Msg-Id` = the attempt id, so republishing the same attempt
//! (after a reload, or a retried publish) is dropped by JetStream inside its duplicate
//! window. Publishes are pipelined (many acks awaited at once, bounded). A publish that
//! fails is retried with backoff; if it keeps failing the engine's attempt timeout
//! eventually retries the attempt, so a task is never silently lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use flowgrid_engine::TaskDispatch;
use flowgrid_model::ShardId;
use flowgrid_proto::{Encoding, Subjects, TaskMessage};
use flowgrid_sdk::broker::{self, BrokerLimits};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics;

/// Tasks waiting to be published, over all shards: bounds memory; shard actors wait
/// (back-pressure) when it is full.
const QUEUE_TASKS_MAX: usize = 16_384;
/// Publishes awaiting their JetStream ack at once: enough to keep the broker busy.
const PUBLISHES_IN_FLIGHT_MAX: usize = 1_024;
/// Tries per task before the attempt timeout is left to recover it.
const PUBLISH_TRIES_MAX: u32 = 8;

/// Where shard actors hand tasks to publish.
#[derive(Clone)]
pub struct Dispatcher {
    sender: mpsc::Sender<(ShardId, TaskDispatch)>,
}

impl Dispatcher {
    /// Starts the publishing task.
    pub fn spawn(
        jetstream: jetstream::Context,
        tasks_stream: jetstream::stream::Stream,
        subjects: Subjects,
        limits: BrokerLimits,
        shutdown: CancellationToken,
    ) -> (Dispatcher, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(QUEUE_TASKS_MAX);
        let publisher = Publisher {
            jetstream,
            tasks_stream,
            subjects: Arc::new(subjects),
            limits,
            pools_ready: HashSet::new(),
            task_subjects: HashMap::new(),
            result_subjects: HashMap::new(),
        };
        let handle = tokio::spawn(publisher.run(receiver, shutdown));
        (Dispatcher { sender }, handle)
    }

    /// Queues a task; waits while the queue is full.
    pub async fn send(&self, shard: ShardId, task: TaskDispatch) {
        if self.sender.send((shard, task)).await.is_err() {
            debug!("dispatcher stopped; the task will be republished when its shard reloads");
        }
    }
}

struct Publisher {
    jetstream: jetstream::Context,
    tasks_stream: jetstream::stream::Stream,
    subjects: Arc<Subjects>,
    limits: BrokerLimits,
    pools_ready: HashSet<String>,
    /// Each pool's task subject and each shard's result subject, formatted once.
    task_subjects: HashMap<Arc<str>, Subject>,
    result_subjects: HashMap<ShardId, String>,
}

/// One task, encoded once; a retried publish sends the same bytes.
struct Publication {
    subject: Subject,
    pool: Arc<str>,
    /// The attempt's message id: the `Nats-Msg-Id` header, and the attempt in logs.
    message_id: String,
    payload: Bytes,
}

type PublishOutcome = (Publication, u32, Result<(), String>);

impl Publisher {
    async fn run(mut self, mut receiver: mpsc::Receiver<(ShardId, TaskDispatch)>, shutdown: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                received = receiver.recv(), if in_flight.len() < PUBLISHES_IN_FLIGHT_MAX => {
                    let Some((shard, task)) = received else { break };
                    self.ensure_pool(&task.pool).await;
                    if let Some(publication) = self.encode(shard, task) {
                        in_flight.push(self.publish(publication, 1));
                    }
                }
                Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(retry) = self.after_publish(outcome) {
                        in_flight.push(retry);
                    }
                }
            }
        }
        // Drain acks of what was sent, so a clean stop loses nothing in flight.
        while let Some(outcome) = in_flight.next().await {
            let _ = self.after_publish(outcome);
        }
    }

    /// Creates the pool's consumer before its first task, so that the task waits for
    /// workers that start later. Workers also create it, so a failure here only logs.
    async fn ensure_pool(&mut self, pool: &str) {
        if self.pools_ready.contains(pool) {
            return;
        }
        match broker::pool_consumer(&self.tasks_stream, &self.subjects, pool, &self.limits).await {
            Ok(_) => {
                self.pools_ready.insert(pool.to_owned());
            }
            Err(error) => warn!(pool = %pool, error = %error, "cannot create the pool consumer"),
        }
    }

    /// The task's message, moved out of the dispatch (no copy of the input).
    fn encode(&mut self, shard: ShardId, task: TaskDispatch) -> Option<Publication> {
        let subjects = &self.subjects;
        let subject = self
            .task_subjects
            .entry(Arc::clone(&task.pool))
            .or_insert_with_key(|pool| subjects.tasks(pool).into())
            .clone();
        let reply_to = self.result_subjects.entry(shard).or_insert_with(|| subjects.shard_results(shard.0)).clone();
        let pool = Arc::clone(&task.pool);
        let message_id = task.attempt.message_id();
        let message = TaskMessage {
            attempt: task.attempt,
            pool: task.pool,
            task: task.task,
            input: task.input,
            deadline_ms: task.deadline_ms,
            reply_to,
        };
        match flowgrid_proto::encode(Encoding::MsgPack, &message) {
            Ok(bytes) => Some(Publication { subject, pool, message_id, payload: Bytes::from(bytes) }),
            Err(error) => {
                // Every task is plain data; the attempt timeout retries it if this ever happens.
                warn!(attempt = %message_id, error = %error, "cannot encode a task");
                None
            }
        }
    }

    /// Starts one publish; the returned future resolves when JetStream acked (or refused) it.
    fn publish(&self, publication: Publication, try_number: u32) -> BoxFuture<'static, PublishOutcome> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", publication.message_id.as_str());
        let jetstream = self.jetstream.clone();
        let delay = retry_delay(try_number);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let subject = publication.subject.clone();
            let result = match jetstream.publish_with_headers(subject, headers, publication.payload.clone()).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            (publication, try_number, result)
        })
    }

    fn after_publish(
        &self,
        (publication, try_number, result): PublishOutcome,
    ) -> Option<BoxFuture<'static, PublishOutcome>> {
        let pool = publication.pool.clone();
        match result {
            Ok(()) => {
                ::metrics::counter!(metrics::TASKS_DISPATCHED, "pool" => pool).increment(1);
                None
            }
            Err(error) => {
                ::metrics::counter!(metrics::TASKS_PUBLISH_FAILED, "pool" => pool).increment(1);
                let attempt = &publication.message_id;
                if try_number >= PUBLISH_TRIES_MAX {
                    warn!(attempt = %attempt, error = %error, "task publish keeps failing; the attempt timeout will retry it");
                    return None;
                }
                debug!(attempt = %attempt, error = %error, try_number, "task publish failed; retrying");
                Some(self.publish(publication, try_number + 1))
            }
        }
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
