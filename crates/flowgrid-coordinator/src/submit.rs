//! The durable submit path: `StartRun` messages published to `<prefix>.submit` wait in a
//! JetStream stream until a coordinator has started their run, so a service loses no
//! request while no coordinator is up.
//!
//! A message without an idempotency key gets `submit-<stream created>-<stream sequence>` as
//! its key ([`default_key`]), so a redelivery (the coordinator died between the commit and
//! the ack) starts nothing new. The stream's creation time (Unix nanoseconds) tells its
//! sequences apart from those of a stream of the same name before it: one made anew after
//! nats-server lost its store counts from 1 again, and a message keyed by its sequence
//! alone would take an earlier submit's run and start nothing.
//!
//! A submit the grid refuses (a flow not deployed, an input its schema refuses, a
//! malformed message) is kept in the refused-submits stream with why ([`Refusals`]) before
//! it leaves the submit stream: a submit JetStream stored is never dropped without a trace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use flowgrid_proto::{
    ApiError, ErrorCode, StartRun, Subjects, CONTENT_TYPE_HEADER, REFUSAL_CODE_HEADER, REFUSAL_HEADER,
    SUBMIT_SEQUENCE_HEADER,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use flowgrid_sdk::backoff::Backoff;
use flowgrid_sdk::broker::{self, BrokerLimits};

use crate::api::{encoding_of, msgpack_request_bytes, Api};
use crate::metrics;

/// Submitted runs started at once: bounds memory, and leaves room for API requests.
const SUBMITS_IN_FLIGHT_MAX: usize = 256;
/// Delay before a refused (overloaded, unavailable) submit or trigger message is delivered
/// again the first time; twice as long after each refusal in a row, up to
/// [`FAILED_RETRY_DELAY`] ([`retry_delay`]).
pub(crate) const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Delay before a submit or trigger message whose start failed on the grid's side (an
/// owner that did not answer in time, a store failure) is delivered again: long enough not
/// to flood the logs.
pub(crate) const FAILED_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Pause before the submit stream's consumer is opened again after it went away.
const REOPEN_PAUSE: Duration = Duration::from_secs(5);

/// The longest refusal message kept in a header, in bytes; a longer one is cut.
const REFUSAL_HEADER_BYTES_MAX: usize = 1_024;
/// How often a coordinator tries to make the refused-submits stream again when it is missing.
const REFUSED_STREAM_RETRY: Duration = Duration::from_secs(30);

/// Room kept under the server's `max_payload` for a refused submit's subject and headers.
const REFUSAL_OVERHEAD_BYTES: usize = 4 * 1024;

/// Where refused submits are kept: the refused-submits stream.
#[derive(Clone)]
pub struct Refusals {
    nats: async_nats::Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    limits: BrokerLimits,
    /// When the stream was last made again after a refusal could not be kept.
    remade: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Refusals {
    pub fn new(nats: async_nats::Client, subjects: Subjects, limits: BrokerLimits) -> Refusals {
        let jetstream = jetstream::new(nats.clone());
        Refusals { nats, jetstream, subjects, limits, remade: Arc::default() }
    }

    /// Keeps a refused submit, and where that fails, makes the stream again (it may have
    /// been deleted, or not made when this coordinator started) at most once per
    /// [`REFUSED_STREAM_RETRY`].
    async fn keep_or_remake(&self, message: &jetstream::Message, refused: &Refused<'_>) -> Result<(), String> {
        let failure = match self.keep(message, refused).await {
            Ok(()) => return Ok(()),
            Err(failure) => failure,
        };
        {
            let mut remade = self.remade.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if remade.is_some_and(|at| at.elapsed() < REFUSED_STREAM_RETRY) {
                return Err(failure);
            }
            *remade = Some(Instant::now());
        }
        broker::submit_refused_stream(&self.jetstream, &self.subjects, &self.limits)
            .await
            .map_err(|error| format!("{failure}; making the stream again failed: {error}"))?;
        self.keep(message, refused).await
    }

    /// Keeps `message` with why it was refused; `Ok` once JetStream stored it.
    async fn keep(&self, message: &jetstream::Message, refused: &Refused<'_>) -> Result<(), String> {
        let Refused { created, sequence, code, reason } = *refused;
        // A submit that filled the server's `max_payload` leaves no room for the headers:
        // its refusal is kept without it.
        let fits = message.payload.len() + REFUSAL_OVERHEAD_BYTES <= self.nats.server_info().max_payload;
        let (payload, reason) = if fits {
            (message.payload.clone(), header_text(reason))
        } else {
            let left_out = format!(" (the submit's {} bytes are not kept: too large)", message.payload.len());
            (bytes::Bytes::new(), header_text(&format!("{reason}{left_out}")))
        };
        let mut headers = HeaderMap::new();
        // Kept again by a coordinator that dies before it acks the submit: the same id.
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("refused-{created}-{sequence}").as_str());
        headers.insert(REFUSAL_CODE_HEADER, code.to_string().as_str());
        headers.insert(REFUSAL_HEADER, reason.as_str());
        headers.insert(SUBMIT_SEQUENCE_HEADER, sequence.to_string().as_str());
        if let Some(content_type) = flowgrid_sdk::content_type(message.headers.as_ref()) {
            headers.insert(CONTENT_TYPE_HEADER, content_type);
        }
        let published = self.jetstream.publish_with_headers(self.subjects.submit_refused(), headers, payload);
        let stored = async { published.await?.await.map_err(async_nats::Error::from) };
        stored.await.map(|_| ()).map_err(|error| error.to_string())
    }
}

/// A refused submit: its place in the submit stream (created at `created`, Unix ns), and
/// why it was refused.
#[derive(Clone, Copy)]
struct Refused<'a> {
    created: i128,
    sequence: u64,
    code: ErrorCode,
    reason: &'a str,
}

/// `text` as a header value: on one line, and cut to [`REFUSAL_HEADER_BYTES_MAX`].
fn header_text(text: &str) -> String {
    let mut line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.len() > REFUSAL_HEADER_BYTES_MAX {
        let mut cut = REFUSAL_HEADER_BYTES_MAX - "...".len();
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

/// The idempotency key of a submit without one of its own: `created` is the stream's
/// creation time in Unix nanoseconds, `sequence` the message's place in it.
pub fn default_key(created: i128, sequence: u64) -> String {
    format!("submit-{created}-{sequence}")
}

/// Where durable submits come from: the submit stream's consumer, opened anew (and the
/// stream made again) when it goes away, as when an operator deletes either to clear a
/// backlog.
pub struct SubmitSource {
    pub jetstream: jetstream::Context,
    pub subjects: Subjects,
    pub limits: BrokerLimits,
}

impl SubmitSource {
    /// The consumer, and the creation time (Unix nanoseconds) of the stream it reads.
    pub async fn open(&self) -> Result<(PullConsumer, i128), broker::BrokerError> {
        let stream = broker::submit_stream(&self.jetstream, &self.subjects, &self.limits).await?;
        let consumer = broker::submit_consumer(&stream, &self.subjects, &self.limits).await?;
        Ok((consumer, stream.cached_info().created.unix_timestamp_nanos()))
    }
}

/// Starts the runs of the messages of the submit stream, from `consumer` (of the stream
/// created at `created`) on, until `shutdown`.
pub async fn serve(
    api: Arc<Api>,
    source: SubmitSource,
    (mut consumer, mut created): (PullConsumer, i128),
    refusals: Refusals,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(SUBMITS_IN_FLIGHT_MAX));
    loop {
        match consumer.stream().max_messages_per_batch(SUBMITS_IN_FLIGHT_MAX).messages().await {
            Ok(mut messages) => loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = messages.next() => match message {
                        Some(Ok(message)) => message,
                        Some(Err(error)) => {
                            debug!(error = %error, "submit stream read failed; continuing");
                            continue;
                        }
                        None => break,
                    },
                };
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (api, refusals) = (api.clone(), refusals.clone());
                tokio::spawn(async move {
                    start_submitted(&api, &refusals, message, created).await;
                    drop(permit);
                });
            },
            Err(error) => warn!(error = %error, "cannot read the submit stream"),
        }
        // The consumer (or its stream) went away: open it again until it is back.
        warn!("the submit stream's consumer is gone; durable submits wait until it is opened again, tried every {REOPEN_PAUSE:?}");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REOPEN_PAUSE) => {}
            }
            match source.open().await {
                Ok(opened) => {
                    (consumer, created) = opened;
                    info!("the submit stream's consumer is open again; durable submits are started again");
                    break;
                }
                Err(error) => warn!(error = %error, "cannot open the submit stream's consumer"),
            }
        }
    }
}

async fn start_submitted(api: &Api, refusals: &Refusals, message: jetstream::Message, created: i128) {
    // The sequence keys a submit without a key of its own: without it, the message is
    // delivered again rather than started under a key another submit would share.
    let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
        warn!("a submit came without its stream metadata; it is delivered again");
        let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
        return;
    };
    let encoding = encoding_of(&message);
    let request: StartRun = match flowgrid_proto::decode(encoding, &message.payload) {
        Ok(request) => request,
        Err(error) => {
            let reason = format!("the submit is not a StartRun: {error}");
            let refused = Refused { created, sequence, code: ErrorCode::InvalidRequest, reason: &reason };
            refuse(refusals, &message, None, &refused).await;
            return;
        }
    };
    let flow = request.flow.clone();
    let request_bytes = msgpack_request_bytes(encoding, &message.payload);
    match api.start_run(request, Some(default_key(created, sequence)), request_bytes, None).await {
        Ok(started) => {
            debug!(run = %started.run_id, flow = %flow, "submitted run started");
            let _ = message.double_ack().await;
        }
        Err(error) => match after_failed_start(&error) {
            AfterFailedStart::Soon => {
                let _ = message.ack_with(AckKind::Nak(Some(retry_delay(&message)))).await;
            }
            AfterFailedStart::Later => {
                warn!(sequence, flow = %flow, error = %error, "submitted run not started yet; it is tried again in {FAILED_RETRY_DELAY:?}");
                let _ = message.ack_with(AckKind::Nak(Some(FAILED_RETRY_DELAY))).await;
            }
            AfterFailedStart::Refused => {
                let reason = error.to_string();
                let refused = Refused { created, sequence, code: error.code, reason: &reason };
                refuse(refusals, &message, Some(&flow), &refused).await;
            }
        },
    }
}

/// How long a message refused for now waits before it is delivered again: [`RETRY_DELAY`]
/// after its first delivery, doubling with each one, up to [`FAILED_RETRY_DELAY`]. A
/// message refused for a while (its shard unavailable for minutes) is not tried every
/// second, as thousands of them would be.
pub(crate) fn retry_delay(message: &jetstream::Message) -> Duration {
    retry_delay_after(message.info().map_or(1, |info| info.delivered))
}

/// [`retry_delay`] of a message delivered `delivered` times.
fn retry_delay_after(delivered: i64) -> Duration {
    Backoff::after(RETRY_DELAY, FAILED_RETRY_DELAY, u64::try_from(delivered).unwrap_or(0))
}

/// What becomes of a stream message (a durable submit, a trigger's message) whose run's
/// start failed. Its start carries an idempotency key, so sending it again is safe.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AfterFailedStart {
    /// Refused for now (overloaded, unavailable): delivered again after [`retry_delay`].
    Soon,
    /// Not a refusal of the start itself: it may have been applied (an owner that did not
    /// answer), or the coordinator failed on it. Delivered again after [`FAILED_RETRY_DELAY`].
    Later,
    /// Refused for good (bad input, no such flow): no run starts for it.
    Refused,
}

pub(crate) fn after_failed_start(error: &ApiError) -> AfterFailedStart {
    if error.retryable {
        AfterFailedStart::Soon
    } else if refused_for_good(error) {
        AfterFailedStart::Refused
    } else {
        AfterFailedStart::Later
    }
}

/// Whether a run's start (a submit's, a trigger's, a subflow step's child, a failure
/// handler) failed with a refusal of the start itself, which the same start would meet
/// again: no such flow, a bad input, too large. Not one that may have been applied, nor an
/// `internal` error: the grid failed on it for a reason that may pass (a store failure, a
/// batch whose commit failed for another event, an older coordinator during a rolling
/// upgrade that answers unexpectedly), so the start is tried again.
pub(crate) fn refused_for_good(error: &ApiError) -> bool {
    error.is_final() && error.code != ErrorCode::Internal
}

/// Keeps a refused submit in the refused-submits stream, then takes it out of the submit
/// stream; one that cannot be kept stays there and is tried again.
async fn refuse(refusals: &Refusals, message: &jetstream::Message, flow: Option<&str>, refused: &Refused<'_>) {
    let Refused { sequence, code, reason, .. } = *refused;
    match refusals.keep_or_remake(message, refused).await {
        Ok(()) => {
            warn!(sequence, flow, error = %reason, "submitted run refused; kept with why (`flowgrid run refused` lists them)");
            ::metrics::counter!(metrics::SUBMITS_REFUSED, "code" => code.to_string()).increment(1);
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(failure) => {
            warn!(sequence, flow, error = %reason, failure = %failure, "submitted run refused, and it cannot be kept in the refused-submits stream; it stays in the submit stream and is tried again in {FAILED_RETRY_DELAY:?}");
            let _ = message.ack_with(AckKind::Nak(Some(FAILED_RETRY_DELAY))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_refused_again_and_again_comes_back_less_and_less_often() {
        let delays: Vec<u64> = [0, 1, 2, 3, 5, 6, 100, i64::MAX].map(|n| retry_delay_after(n).as_secs()).to_vec();
        assert_eq!(delays, vec![1, 1, 2, 4, 16, 30, 30, 30]);
    }

    #[test]
    fn default_keys_are_the_grids_own_and_differ_between_streams_of_one_name() {
        let (before, after) = (1_700_000_000_000_000_000, 1_800_000_000_000_000_000);
        assert_eq!(default_key(before, 1), "submit-1700000000000000000-1");
        assert_ne!(default_key(before, 1), default_key(after, 1), "a stream made anew counts from 1 again");
        assert!(flowgrid_proto::is_grid_key(&default_key(after, 1)), "a caller may not take a submit's key");
    }

    #[test]
    fn a_refusal_is_kept_on_one_line_and_cut_when_long() {
        assert_eq!(header_text("no flow\r\nnamed x"), "no flow  named x");
        let long = "é".repeat(REFUSAL_HEADER_BYTES_MAX);
        let kept = header_text(&long);
        assert!(kept.len() <= REFUSAL_HEADER_BYTES_MAX && kept.len() > REFUSAL_HEADER_BYTES_MAX - 5, "{}", kept.len());
        assert!(kept.ends_with("...") && kept.trim_end_matches("...").chars().all(|c| c == 'é'));
    }

    /// A submit's or trigger message's start that may have been applied, or that the
    /// coordinator failed on, is tried again; only a refusal of the start itself ends it.
    #[test]
    fn a_failed_start_is_tried_again_unless_the_start_itself_was_refused() {
        let maybe_applied = ApiError { retryable: false, ..ApiError::new(ErrorCode::Unavailable, "no answer") };
        for (error, after) in [
            (ApiError::new(ErrorCode::Overloaded, "full"), AfterFailedStart::Soon),
            (ApiError::new(ErrorCode::Unavailable, "moving"), AfterFailedStart::Soon),
            (maybe_applied, AfterFailedStart::Later),
            (ApiError::new(ErrorCode::Internal, "store"), AfterFailedStart::Later),
            (ApiError::new(ErrorCode::NotFound, "no flow"), AfterFailedStart::Refused),
            (ApiError::new(ErrorCode::InvalidRequest, "bad input"), AfterFailedStart::Refused),
        ] {
            assert_eq!(after_failed_start(&error), after, "{error:?}");
        }
    }

    /// An `internal` error (a store failure, an older coordinator's unexpected reply) may
    /// pass: a child's or a failure handler's start is tried again rather than taken as
    /// refused. Only a refusal of the start itself is for good.
    #[test]
    fn only_a_refusal_of_the_start_itself_is_for_good() {
        let unexpected = crate::routing::unexpected(&crate::routing::ShardReply::Runs(Vec::new()));
        let maybe_applied = ApiError { retryable: false, ..ApiError::new(ErrorCode::Unavailable, "no answer") };
        for error in [
            ApiError::new(ErrorCode::Internal, "the batch's commit failed"),
            unexpected,
            maybe_applied,
            ApiError::new(ErrorCode::Overloaded, "full"),
        ] {
            assert!(!refused_for_good(&error), "{error:?}");
        }
        for code in [ErrorCode::NotFound, ErrorCode::InvalidRequest, ErrorCode::PayloadTooLarge] {
            let error = ApiError::new(code, "refused");
            assert!(refused_for_good(&error), "{error:?}");
        }
    }
}
