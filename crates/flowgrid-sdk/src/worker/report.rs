//! Sending a task's result to the coordinator, and deciding what happens to the task
//! message afterwards.
//!
//! The decision ([`decide`]) is a pure function of what the send returned, the time and
//! the give-up time, so the rules are unit-tested without a server:
//! - confirmed (applied or not): ack;
//! - refused as retryable, or no answer (coordinator restarting, shard moving): retry
//!   with backoff until the give-up time, then nak so the task is delivered again;
//! - refused as too large: send instead the error with its message cut to
//!   [`ERROR_MESSAGE_CUT`] bytes, its code and `retryable` kept (a retry policy or a catch
//!   still takes it), or in place of an output a non-retryable `payload_too_large` error;
//!   terminate the message when the result is already as small as that;
//! - refused for good: terminate the message (sending it again cannot help).
//!
//! A worker that stops past its shutdown grace stops sending and naks, whatever the rules
//! would do next: the task is delivered again at once, not after the consumer's ack wait.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use flowgrid_engine::TaskError;
use flowgrid_model::Millis;
use flowgrid_proto::{decode, encode, ApiError, Encoding, ErrorCode, Reply, ResultAck, TaskResult};

use crate::backoff::Backoff;

use super::now_ms;

/// After a task's deadline, a worker keeps trying to report its result this much longer
/// (a coordinator restart takes a few seconds) before handing the task back.
pub(crate) const REPORT_GRACE_MS: Millis = 30_000;
/// How long one result request (or progress report) waits for the coordinator's
/// confirmation.
pub(crate) const RESULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest pause between two tries of a result.
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(50);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);
/// Code of the error sent in place of an output the grid refused as too large.
const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
/// The bytes an error's message is cut to, a note of the cut included, when the grid
/// refused the error result as too large.
const ERROR_MESSAGE_CUT: usize = 16 * 1024;

/// What to do with a task message once its result is dealt with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// The result is durable (or was a duplicate): remove the task.
    Ack,
    /// The result could not be delivered: deliver the task again later.
    Nak,
    /// The task can never succeed as is (malformed, or refused for good): drop it.
    Term,
}

/// What one result request returned.
#[derive(Debug)]
pub(crate) enum Sent {
    /// The coordinator confirmed the result.
    Confirmed(ResultAck),
    /// The coordinator refused the result.
    Refused(ApiError),
    /// The result is over the server's maximum message size.
    TooLarge,
    /// No confirmation: nobody listening, timeout, lost connection (`request` says which) or
    /// an unreadable reply.
    NoAnswer { reason: String, request: Option<async_nats::RequestError> },
}

/// The next move after one send.
#[derive(Debug, PartialEq)]
pub(crate) enum Next {
    Settle(Settle),
    RetryLater,
    SendInstead(Box<TaskResult>),
}

/// Sends `result` to `reply_to` until it is confirmed or `give_up_ms` passes, or until
/// `abandon` (the worker's shutdown grace is over): then the task is handed back (nak).
pub(crate) async fn report(
    nats: &async_nats::Client,
    reply_to: &str,
    result: TaskResult,
    give_up_ms: Millis,
    abandon: &CancellationToken,
) -> Settle {
    let attempt = result.attempt.clone();
    tokio::select! {
        settle = send_until_settled(nats, reply_to, result, give_up_ms) => settle,
        () = abandon.cancelled() => {
            warn!(attempt = %attempt, "the worker stopped before a coordinator confirmed the result; handing the task back");
            Settle::Nak
        }
    }
}

/// [`report`] without the worker's stop.
async fn send_until_settled(
    nats: &async_nats::Client,
    reply_to: &str,
    result: TaskResult,
    give_up_ms: Millis,
) -> Settle {
    let mut result = result;
    let mut backoff = Backoff::new(RETRY_DELAY_FIRST, RETRY_DELAY_MAX);
    loop {
        let sent = send(nats, reply_to, &result).await;
        let next = decide(&sent, &result, now_ms(), give_up_ms);
        match next {
            Next::Settle(settle) => {
                match &sent {
                    Sent::Confirmed(ack) => {
                        debug!(attempt = %result.attempt, applied = ack.applied, "result confirmed")
                    }
                    Sent::Refused(refusal) => {
                        warn!(attempt = %result.attempt, error = %refusal, "coordinator refused the result")
                    }
                    Sent::NoAnswer { reason, .. } => warn!(
                        attempt = %result.attempt,
                        reason = %reason,
                        "no coordinator confirmed the result in time; handing the task back"
                    ),
                    Sent::TooLarge => warn!(
                        attempt = %result.attempt,
                        "the result is over the server's message limit even at its smallest; the attempt ends by its \
                         timeout"
                    ),
                }
                return settle;
            }
            Next::SendInstead(replacement) => {
                warn!(attempt = %result.attempt, "the result is over the grid's payload limit; sending a smaller one");
                result = *replacement;
            }
            Next::RetryLater => {
                let remaining = Duration::from_millis(give_up_ms.saturating_sub(now_ms()));
                let delay = backoff.next_delay().min(remaining);
                debug!(attempt = %result.attempt, sent = ?sent, delay_ms = delay.as_millis() as u64, "retrying result");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

pub(crate) async fn send(nats: &async_nats::Client, reply_to: &str, result: &TaskResult) -> Sent {
    let payload = match encode(Encoding::MsgPack, result) {
        Ok(payload) => Bytes::from(payload),
        // Every TaskResult encodes; should one not, retrying cannot help.
        Err(error) => return Sent::Refused(ApiError::new(ErrorCode::Internal, error.to_string())),
    };
    let request = async_nats::Request::new().payload(payload).timeout(Some(RESULT_REQUEST_TIMEOUT));
    let message = match nats.send_request(reply_to.to_owned(), request).await {
        Ok(message) => message,
        Err(error) if error.kind() == async_nats::RequestErrorKind::MaxPayloadExceeded => return Sent::TooLarge,
        Err(error) => return Sent::NoAnswer { reason: error.to_string(), request: Some(error) },
    };
    let encoding = crate::encoding_of(message.headers.as_ref());
    match decode::<Reply<ResultAck>>(encoding, &message.payload) {
        Ok(Reply::Ok(ack)) => Sent::Confirmed(ack),
        Ok(Reply::Error(refusal)) => Sent::Refused(refusal),
        Err(error) => Sent::NoAnswer { reason: error.to_string(), request: None },
    }
}

/// The rules of the module doc, as a pure function.
pub(crate) fn decide(sent: &Sent, result: &TaskResult, now: Millis, give_up_ms: Millis) -> Next {
    let retry_or_hand_back = || if now < give_up_ms { Next::RetryLater } else { Next::Settle(Settle::Nak) };
    match sent {
        Sent::Confirmed(_) => Next::Settle(Settle::Ack),
        Sent::TooLarge => replace_too_large(result),
        Sent::Refused(refusal) if refusal.code == ErrorCode::PayloadTooLarge => replace_too_large(result),
        Sent::Refused(refusal) if refusal.retryable => retry_or_hand_back(),
        Sent::Refused(_) => Next::Settle(Settle::Term),
        Sent::NoAnswer { .. } => retry_or_hand_back(),
    }
}

/// What to send in place of a result refused as too large: an error with its message cut
/// (its code and `retryable` kept, so that a retry policy or a catch still takes it); an
/// error `payload_too_large` in place of an output, or of an error whose message is short
/// already (its code is what is too large); nothing, the message terminated, when the result
/// is that `payload_too_large` error already.
fn replace_too_large(result: &TaskResult) -> Next {
    let too_large = TaskError {
        code: PAYLOAD_TOO_LARGE.into(),
        message: "the task's result is over the grid's payload limit".into(),
        retryable: false,
    };
    let error = match &result.error {
        Some(error) if error.message.len() > ERROR_MESSAGE_CUT => {
            TaskError { message: cut_message(&error.message), ..error.clone() }
        }
        // An output, or an error too large for another reason than its message.
        _ => too_large,
    };
    if result.output.is_none() && result.error.as_ref() == Some(&error) {
        return Next::Settle(Settle::Term);
    }
    Next::SendInstead(Box::new(TaskResult {
        attempt: result.attempt.clone(),
        output: None,
        error: Some(error),
        progress: None,
    }))
}

/// The start of `message` (whole characters) and a note saying it was cut: at most
/// [`ERROR_MESSAGE_CUT`] bytes in all.
fn cut_message(message: &str) -> String {
    let note = format!("… (cut from {} bytes)", message.len());
    let mut end = ERROR_MESSAGE_CUT.saturating_sub(note.len()).min(message.len());
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &message[..end])
}

#[cfg(test)]
mod tests {
    use flowgrid_model::{AttemptId, RunId};
    use serde_json::json;

    use super::*;

    const NOW: Millis = 1_000_000;

    fn output() -> TaskResult {
        let attempt = AttemptId { run_id: RunId("run".into()), step: "s".into(), item: Some(3), attempt: 2 };
        TaskResult { attempt, output: Some(json!({"ok": true})), error: None, progress: None }
    }

    #[test]
    fn a_confirmed_result_acks_even_when_not_applied() {
        for applied in [true, false] {
            let next = decide(&Sent::Confirmed(ResultAck { applied }), &output(), NOW, NOW + 1);
            assert_eq!(next, Next::Settle(Settle::Ack));
        }
    }

    #[test]
    fn no_answer_retries_until_the_give_up_time_then_hands_back() {
        let sent = Sent::NoAnswer { reason: "no responders".into(), request: None };
        assert_eq!(decide(&sent, &output(), NOW, NOW + 1), Next::RetryLater);
        assert_eq!(decide(&sent, &output(), NOW, NOW), Next::Settle(Settle::Nak));
    }

    #[test]
    fn retryable_refusals_retry_and_final_ones_terminate() {
        let moving = Sent::Refused(ApiError::new(ErrorCode::Unavailable, "shard moving"));
        assert_eq!(decide(&moving, &output(), NOW, NOW + 1), Next::RetryLater);
        assert_eq!(decide(&moving, &output(), NOW + 1, NOW), Next::Settle(Settle::Nak));
        let invalid = Sent::Refused(ApiError::new(ErrorCode::InvalidRequest, "bad attempt"));
        assert_eq!(decide(&invalid, &output(), NOW, NOW + 1), Next::Settle(Settle::Term));
    }

    #[test]
    fn a_too_large_output_is_replaced_once_by_an_error() {
        for sent in [Sent::TooLarge, Sent::Refused(ApiError::new(ErrorCode::PayloadTooLarge, "2 MiB"))] {
            let Next::SendInstead(replacement) = decide(&sent, &output(), NOW, NOW + 1) else {
                panic!("expected a replacement for {sent:?}");
            };
            assert_eq!(replacement.attempt, output().attempt);
            assert_eq!(replacement.output, None);
            let error = replacement.error.as_ref().expect("replacement carries an error");
            assert_eq!(error.code, PAYLOAD_TOO_LARGE);
            assert!(!error.retryable);
            assert_eq!(decide(&sent, &replacement, NOW, NOW + 1), Next::Settle(Settle::Term));
        }
    }

    /// An error whose message makes the result too large is sent with its message cut, its
    /// code and `retryable` kept, so that the step's retry policy and catches still take it;
    /// an error `payload_too_large` of the handler's own too. It used to become a final
    /// `payload_too_large` (never retried, no catch on its code), and the handler's own
    /// `payload_too_large` was terminated with no result sent at all.
    #[test]
    fn a_too_large_error_keeps_its_code_and_retryable_with_its_message_cut() {
        // Two bytes a character: the cut falls between characters, not inside one.
        let message = "é".repeat(1024 * 1024);
        for code in ["upstream_down", PAYLOAD_TOO_LARGE] {
            for sent in [Sent::TooLarge, Sent::Refused(ApiError::new(ErrorCode::PayloadTooLarge, "2 MiB"))] {
                let error = TaskError { code: code.into(), message: message.clone(), retryable: true };
                let failed = TaskResult { output: None, error: Some(error), ..output() };
                let Next::SendInstead(cut) = decide(&sent, &failed, NOW, NOW + 1) else {
                    panic!("expected the error with its message cut for {code} and {sent:?}");
                };
                assert_eq!(cut.attempt, failed.attempt);
                assert_eq!(cut.output, None);
                let error = cut.error.as_ref().expect("the cut result carries the error");
                assert_eq!((error.code.as_str(), error.retryable), (code, true));
                assert!(error.message.len() <= ERROR_MESSAGE_CUT, "{} bytes", error.message.len());
                assert!(error.message.starts_with("éé"), "{}", &error.message[..8]);
                assert!(error.message.ends_with("é… (cut from 2097152 bytes)"), "{}", &error.message[16_000..]);
                // Still too large (its code, then): the smallest error, then nothing more.
                let Next::SendInstead(smallest) = decide(&sent, &cut, NOW, NOW + 1) else {
                    panic!("expected the smallest error after the cut one for {code}");
                };
                let error = smallest.error.as_ref().expect("the smallest result carries an error");
                assert_eq!((error.code.as_str(), error.retryable), (PAYLOAD_TOO_LARGE, false));
                assert_eq!(decide(&sent, &smallest, NOW, NOW + 1), Next::Settle(Settle::Term));
            }
        }
    }
}
