//! Starts from many tasks of one process, sent as few `run.start_many` requests.
//!
//! Each [`StartBatcher::start`] joins a queue. A sender takes whatever waits there (up to
//! `batch_max` starts) whenever fewer than `requests_max` requests are out: a lone start
//! goes out at once, alone, and the starts that arrive while requests are out share the
//! next one. Under load a start costs a fraction of a request and of a reply, for the
//! client, the broker and the coordinator.
//!
//! The starts of a batch that may be sent again as [`Client::start`] would send them (a
//! retryable refusal such as overload or a moving shard; with an idempotency key, also a
//! timeout or an owner that may have applied it) go again together, after a backoff,
//! within the client's retry budget, while their batch still holds its request's place:
//! under overload the batcher slows its callers down instead of multiplying requests.
//! Every other outcome is the one the grid gave.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Semaphore};

use flowgrid_proto::{RunStarted, StartRun, START_MANY_RUNS_MAX};

use crate::client::{should_retry, Client, OnTimeout};
use crate::error::{Error, Result};

/// Starts a batch holds unless [`StartBatcher::new`] says otherwise.
pub const DEFAULT_START_BATCH_MAX: usize = 256;
/// Batches awaiting their reply at once unless [`StartBatcher::new`] says otherwise. A
/// batch's reply waits for the slowest of its shards' commits, so a start that finds every
/// request out waits for one of them: with 16 instead of 4, starts at 5,000 runs a second
/// reached their first worker 0.6-1.0 ms sooner at the median, and throughput at full load
/// was the same (docs/performance.md).
pub const DEFAULT_START_REQUESTS_MAX: usize = 16;

/// Sends the starts of many tasks as batches. Cheap to clone; clones share the queue.
///
/// ```no_run
/// # async fn demo(client: flowgrid_sdk::Client) -> flowgrid_sdk::Result<()> {
/// use flowgrid_sdk::{StartBatcher, StartRun};
///
/// let starts = StartBatcher::new(client, 256, 4);
/// let started = starts
///     .start(StartRun { flow: "resize".into(), version: None, input: serde_json::json!({}), idempotency_key: None, ..Default::default() })
///     .await?;
/// println!("started {}", started.run_id);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StartBatcher {
    queue: mpsc::Sender<Queued>,
}

#[derive(Debug)]
struct Queued {
    start: StartRun,
    outcome: oneshot::Sender<Result<RunStarted>>,
}

impl StartBatcher {
    /// Starts the sender on the current tokio runtime. `batch_max` is capped at
    /// [`START_MANY_RUNS_MAX`]; both bounds are at least 1. At most `batch_max *
    /// requests_max` starts wait in the queue; past that, [`StartBatcher::start`] waits.
    pub fn new(client: Client, batch_max: usize, requests_max: usize) -> StartBatcher {
        let batch_max = batch_max.clamp(1, START_MANY_RUNS_MAX);
        let requests_max = requests_max.max(1);
        let (queue, waiting) = mpsc::channel(batch_max * requests_max);
        tokio::spawn(send_batches(client, waiting, batch_max, requests_max));
        StartBatcher { queue }
    }

    /// Starts a run, like [`Client::start`], as part of the next batch.
    pub async fn start(&self, start: StartRun) -> Result<RunStarted> {
        let (outcome, answer) = oneshot::channel();
        let stopped =
            || Error::Nats { context: "the start batcher stopped".to_owned(), source: "runtime shut down".into() };
        self.queue.send(Queued { start, outcome }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes what waits whenever a request may go out, until every [`StartBatcher`] is dropped.
async fn send_batches(client: Client, mut waiting: mpsc::Receiver<Queued>, batch_max: usize, requests_max: usize) {
    let requests = Arc::new(Semaphore::new(requests_max));
    loop {
        let Ok(request) = requests.clone().acquire_owned().await else { return };
        let mut batch = Vec::with_capacity(batch_max);
        if waiting.recv_many(&mut batch, batch_max).await == 0 {
            return;
        }
        let client = client.clone();
        tokio::spawn(async move {
            send_batch(&client, batch, Instant::now()).await;
            drop(request);
        });
    }
}

/// Sends one batch, then again what may go again, each caller getting its own outcome. A
/// batch over what one message may carry goes as two halves (and so on): only a start too
/// large on its own is refused, not every start that shared its request. The client's
/// retry budget counts from `started`, when the batch was first sent: its halves and its
/// rounds share it.
fn send_batch(client: &Client, batch: Vec<Queued>, started: Instant) -> futures::future::BoxFuture<'_, ()> {
    Box::pin(async move {
        let (starts, outcomes): (Vec<StartRun>, Vec<_>) =
            batch.into_iter().map(|queued| (queued.start, queued.outcome)).unzip();
        send_starts(client, starts, outcomes, started).await;
    })
}

async fn send_starts(
    client: &Client,
    mut starts: Vec<StartRun>,
    mut outcomes: Vec<oneshot::Sender<Result<RunStarted>>>,
    started: Instant,
) {
    let mut backoff = Client::retry_backoff();
    loop {
        // Each round retries (a missing coordinator, say) for what is left of the batch's
        // budget, not for a whole budget of its own.
        let left = client.retry_budget().saturating_sub(started.elapsed());
        let results = match client.clone().with_retry_budget(left).start_many(&starts).await {
            Ok(results) => results,
            Err(error) if starts.len() > 1 && is_too_large(&error) => {
                let queued: Vec<Queued> =
                    starts.into_iter().zip(outcomes).map(|(start, outcome)| Queued { start, outcome }).collect();
                let mut first = queued;
                let second = first.split_off(first.len() / 2);
                send_batch(client, first, started).await;
                send_batch(client, second, started).await;
                return;
            }
            Err(error) => starts.iter().map(|_| Err(error.copy_for_batch())).collect(),
        };
        let delay = backoff.next_delay_within(client.retry_budget().saturating_sub(started.elapsed()));
        let (mut again, mut waiting) = (Vec::new(), Vec::new());
        for ((start, outcome), result) in starts.into_iter().zip(outcomes).zip(results) {
            match result {
                Err(error) if delay.is_some() && may_send_again(&start, &error) => {
                    again.push(start);
                    waiting.push(outcome);
                }
                result => {
                    let _ = outcome.send(result);
                }
            }
        }
        match delay {
            Some(delay) if !again.is_empty() => tokio::time::sleep(delay).await,
            _ => return,
        }
        (starts, outcomes) = (again, waiting);
    }
}

/// Whether a whole request was refused for its size (the client's check against the
/// server's `max_payload`, or the grid's against its own limit).
fn is_too_large(error: &Error) -> bool {
    error.api().is_some_and(|refusal| refusal.code == flowgrid_proto::ErrorCode::PayloadTooLarge)
}

/// Whether a start that failed with `error` may be sent again, as [`Client::start`] would.
fn may_send_again(start: &StartRun, error: &Error) -> bool {
    should_retry(error, OnTimeout::retry_if(start.idempotency_key.is_some()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flowgrid_proto::{ApiError, ErrorCode};

    use super::*;

    #[test]
    fn a_start_goes_again_where_client_start_would_send_it_again() {
        let keyless = StartRun { flow: "f".into(), ..Default::default() };
        let keyed = StartRun { idempotency_key: Some("order-7".into()), ..keyless.clone() };
        let timeout = Error::Timeout { what: "request on run.start_many".into(), after: Duration::from_secs(10) };
        let overloaded = Error::Api(ApiError::new(ErrorCode::Overloaded, "too many runs"));
        let maybe_applied = Error::Api(ApiError {
            retryable: false,
            ..ApiError::new(ErrorCode::Unavailable, "the owner did not answer")
        });
        let invalid = Error::Api(ApiError::new(ErrorCode::InvalidRequest, "no such flow"));
        for start in [&keyless, &keyed] {
            assert!(may_send_again(start, &overloaded), "a retryable refusal goes again");
            assert!(!may_send_again(start, &invalid), "a refusal for good does not");
        }
        assert!(may_send_again(&keyed, &timeout) && may_send_again(&keyed, &maybe_applied), "its key makes it safe");
        assert!(!may_send_again(&keyless, &timeout), "without a key it may have started");
        assert!(!may_send_again(&keyless, &maybe_applied));
    }
}
