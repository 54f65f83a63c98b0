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
//! A batch the grid refused as a whole without applying any of it (over what one message
//! may carry, or not decodable) goes again as halves. When the grid applied a batch but
//! refused its reply as too large for one message, the starts with an idempotency key go
//! again in smaller batches, and each one without a key fails as one the grid may have
//! applied. Every other outcome is the one the grid gave.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Semaphore};

use flowgrid_proto::{ApiError, ErrorCode, RunStarted, StartRun, START_MANY_RUNS_MAX};

use crate::client::{should_retry, Client, OnTimeout, StartManyError};
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
/// batch the grid could not take as one request goes as two halves (and so on), so that
/// only a start the grid refuses on its own is refused, not every start that shared its
/// request: one over what one message may carry (the client does not send it), or one the
/// grid could not decode (a start nested too deep to be read inside a batch); neither
/// applied any start. The client's retry budget counts from `started`, when the batch was
/// first sent: its halves and its rounds share it.
fn send_batch(client: &Client, batch: Vec<Queued>, started: Instant) -> futures::future::BoxFuture<'_, ()> {
    Box::pin(async move {
        let (starts, outcomes): (Vec<StartRun>, Vec<_>) =
            batch.into_iter().map(|queued| (queued.start, queued.outcome)).unzip();
        send_starts(client, starts, outcomes, started).await;
    })
}

/// Sends the first and the second half of `batch` as batches of their own, one after the other.
async fn send_halves(client: &Client, mut batch: Vec<Queued>, started: Instant) {
    let second = batch.split_off(batch.len() / 2);
    send_batch(client, batch, started).await;
    send_batch(client, second, started).await;
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
        let results = match client.clone().with_retry_budget(left).try_start_many(&starts).await {
            Ok(results) => results,
            Err(StartManyError::TooLargeToSend(_)) if starts.len() > 1 => {
                return send_halves(client, queued(starts, outcomes), started).await;
            }
            Err(StartManyError::Failed(error)) if starts.len() > 1 && is_undecodable(&error) => {
                return send_halves(client, queued(starts, outcomes), started).await;
            }
            Err(StartManyError::Failed(error)) if is_reply_too_large(&error) => {
                return send_unanswered(client, queued(starts, outcomes), &error, started).await;
            }
            Err(error) => {
                let error = error.into_error();
                starts.iter().map(|start| Err(copy_for_start(start, &error))).collect()
            }
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

/// The starts of a batch with their callers again.
fn queued(starts: Vec<StartRun>, outcomes: Vec<oneshot::Sender<Result<RunStarted>>>) -> Vec<Queued> {
    starts.into_iter().zip(outcomes).map(|(start, outcome)| Queued { start, outcome }).collect()
}

/// The starts of a batch whose reply the grid refused as too large for one message
/// (`refused`): it had applied or refused each of them, and the reply that said which was
/// lost. A start with an idempotency key goes again, in a smaller batch (whose reply is
/// smaller), and learns its run (`created: false`) or its refusal; one
/// without a key is not sent again, which could start its run twice: it may have started,
/// and its caller is told so ([`Error::may_have_been_applied`]).
async fn send_unanswered(client: &Client, batch: Vec<Queued>, refused: &Error, started: Instant) {
    let size = batch.len();
    let (keyed, keyless): (Vec<Queued>, Vec<Queued>) =
        batch.into_iter().partition(|queued| queued.start.idempotency_key.is_some());
    for queued in keyless {
        let _ = queued.outcome.send(Err(reply_lost(refused)));
    }
    match keyed.len() {
        0 => {}
        // Alone in its request already: there is no smaller one to send.
        1 if size == 1 => {
            for queued in keyed {
                let _ = queued.outcome.send(Err(refused.copy_for_batch()));
            }
        }
        1 => send_batch(client, keyed, started).await,
        _ => send_halves(client, keyed, started).await,
    }
}

/// The failure of a start without an idempotency key whose batch's reply the grid refused
/// as too large (`refused`): the grid may have started its run.
fn reply_lost(refused: &Error) -> Error {
    let why = refused.api().map_or_else(|| refused.to_string(), |refusal| refusal.message.clone());
    Error::Api(ApiError {
        retryable: false,
        ..ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "the grid took this start with the others of its batch, but refused their reply as too large \
                 ({why}): the grid may have applied it: read the flow's runs before sending it again, or give \
                 starts an idempotency_key"
            ),
        )
    })
}

/// The failure of a whole request, as `start`'s caller gets it: a timeout of a start with
/// an idempotency key says what [`Client::start`] would say, not that it may have started
/// (a batch that also held starts without a key was not sent again when it timed out).
fn copy_for_start(start: &StartRun, error: &Error) -> Error {
    if start.idempotency_key.is_some() {
        error.copy_for_batch_safe_to_repeat()
    } else {
        error.copy_for_batch()
    }
}

/// Whether the grid refused a whole request for the size of its reply, which a coordinator
/// sends in place of a reply too large for one message, once it has applied or refused
/// every start (the client's own check before it sends is [`StartManyError::TooLargeToSend`]).
fn is_reply_too_large(error: &Error) -> bool {
    error.api().is_some_and(|refusal| refusal.code == ErrorCode::PayloadTooLarge)
}

/// How the grid's refusal of a request it could not decode begins: the text of
/// [`flowgrid_proto::ProtoError::Malformed`], which it sends as `invalid_request`.
const UNDECODABLE_REQUEST: &str = "malformed ";

/// Whether the grid refused a whole request as one it could not decode (one of its starts
/// nested deeper than the grid reads inside a batch, say): it applied none of its starts.
fn is_undecodable(error: &Error) -> bool {
    error.api().is_some_and(|refusal| {
        refusal.code == ErrorCode::InvalidRequest && refusal.message.starts_with(UNDECODABLE_REQUEST)
    })
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

    /// The grid's refusal of a batch it could not decode, as a coordinator sends it, is
    /// told from its other refusals of a whole request.
    #[test]
    fn a_batch_the_grid_could_not_decode_is_told_from_other_refusals() {
        let deep = (0..126).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
        let batch =
            flowgrid_proto::StartRuns { runs: vec![StartRun { flow: "f".into(), input: deep, ..Default::default() }] };
        let bytes = flowgrid_proto::encode(flowgrid_proto::Encoding::MsgPack, &batch).expect("a batch encodes");
        let undecodable =
            flowgrid_proto::decode::<flowgrid_proto::StartRuns>(flowgrid_proto::Encoding::MsgPack, &bytes)
                .expect_err("nested past what the grid decodes");
        let refused = Error::Api(ApiError::new(ErrorCode::InvalidRequest, undecodable.to_string()));
        assert!(is_undecodable(&refused), "{refused}");
        let too_many = ApiError::new(ErrorCode::InvalidRequest, "runs must hold 1 to 1000 starts, it holds 0");
        assert!(!is_undecodable(&Error::Api(too_many)));
        let unknown = ApiError::new(ErrorCode::NotFound, "malformed flow");
        assert!(!is_undecodable(&Error::Api(unknown)));
    }

    /// A batch with starts without a key that timed out: a start with a key is told what
    /// [`Client::start`] would tell it, not to add a key.
    #[test]
    fn a_keyed_start_of_a_batch_that_timed_out_is_told_what_a_start_alone_would_be() {
        let subject = "flowgrid.api.run.start_many";
        let after = Duration::from_millis(300);
        let OnTimeout::Fail(advice) = OnTimeout::retry_if(false) else {
            panic!("a request with a start without a key is not sent again when it times out")
        };
        let timeout = Error::request_timed_out(subject, 1, after, Some(advice));
        let keyless = StartRun { flow: "f".into(), ..Default::default() };
        let keyed = StartRun { idempotency_key: Some("order-7".into()), ..keyless.clone() };
        assert!(copy_for_start(&keyless, &timeout).may_have_been_applied());
        let copy = copy_for_start(&keyed, &timeout);
        assert_eq!(copy.to_string(), Error::request_timed_out(subject, 1, after, None).to_string());
        assert!(!copy.may_have_been_applied(), "{copy}");
    }

    /// A start without a key whose batch's reply was lost may have started, and says so.
    #[test]
    fn a_keyless_start_whose_reply_was_refused_as_too_large_may_have_been_applied() {
        let refused = Error::Api(ApiError::new(ErrorCode::PayloadTooLarge, "the reply is 2000000 bytes"));
        let lost = reply_lost(&refused);
        assert!(lost.may_have_been_applied(), "{lost:?}");
        assert!(!may_send_again(&StartRun::default(), &lost), "{lost:?}");
        assert!(lost.to_string().contains("the reply is 2000000 bytes"), "{lost}");
    }
}
