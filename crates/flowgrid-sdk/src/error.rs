//! The SDK's one error type. Each variant says what the caller should do.

use std::time::Duration;

use flowgrid_proto::{ApiError, ErrorCode, ProtoError};

use crate::broker::BrokerError;
use crate::connect::connect_hint;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a client or worker call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The grid refused the request. `code`, `message` and `issues` say what to change;
    /// when `retryable` is set the SDK has already retried for its whole retry budget.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// NATS could not be reached at `url`, or refused the connection: the message says
    /// what to check (the server, its credentials, its TLS).
    #[error("cannot connect to NATS at {url}: {source}{}", connect_hint(source.kind()))]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// The credentials or TLS settings for NATS cannot be used as given (two kinds of
    /// credentials, a file that cannot be read); the message names the flag to fix.
    #[error("NATS connection settings: {0}")]
    NatsOptions(String),
    /// A NATS operation failed (connection lost, nobody answered, JetStream refused a
    /// publish). `context` names the operation and subject; retry later.
    #[error("{context}: {source}")]
    Nats {
        context: String,
        #[source]
        source: async_nats::Error,
    },
    /// No answer in time. For `wait` the run is still going. A request that is safe to
    /// repeat (reads, deploys, cancels, starts with an idempotency key) was already sent
    /// again within the retry budget; any other request may have been applied
    /// ([`Error::may_have_been_applied`]). `what` names what timed out (a request with the
    /// times it was sent) and, after a `": "`, what to do about it; `after` is the time all
    /// its tries took.
    #[error("{}", timeout_message(what, *after))]
    Timeout { what: String, after: Duration },
    /// A message could not be encoded or decoded: the client and the grid disagree on the
    /// protocol (upgrade one of them).
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The tasks stream or a pool consumer could not be created or opened (is JetStream
    /// enabled on the server?).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Error {
    /// The grid's refusal, if this is one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(error) => Some(error),
            _ => None,
        }
    }

    /// True when the request was refused because a flow, version or run does not exist.
    pub fn is_not_found(&self) -> bool {
        self.api().is_some_and(|error| error.code == ErrorCode::NotFound)
    }

    /// The same failure for each call a batched request carried. The source error itself
    /// cannot be shared: a failed request keeps its kind (so that [`Error::is_no_responders`]
    /// says the same for each call), any other source is kept as text.
    pub(crate) fn copy_for_batch(&self) -> Error {
        match self {
            Error::Api(refusal) => Error::Api(refusal.clone()),
            Error::Timeout { what, after } => Error::Timeout { what: what.clone(), after: *after },
            Error::Nats { context, source } => match source.downcast_ref::<async_nats::RequestError>() {
                Some(request) => Error::Nats {
                    context: context.clone(),
                    source: Box::new(async_nats::RequestError::new(request.kind())),
                },
                None => self.as_text_for_batch(),
            },
            _ => self.as_text_for_batch(),
        }
    }

    /// [`Error::copy_for_batch`] for a call that is safe to repeat (a start with an
    /// idempotency key) in a batch that was not: a timeout says what timed out, how often
    /// and for how long, as that call's own would, not that the grid may have applied it.
    pub(crate) fn copy_for_batch_safe_to_repeat(&self) -> Error {
        match self {
            Error::Timeout { what, after } if self.may_have_been_applied() => {
                let timed_out = what.split_once(TIMEOUT_ADVICE).map_or(what.as_str(), |(timed_out, _)| timed_out);
                Error::Timeout { what: timed_out.to_owned(), after: *after }
            }
            _ => self.copy_for_batch(),
        }
    }

    /// This failure as text, for a source that cannot be copied.
    fn as_text_for_batch(&self) -> Error {
        Error::Nats { context: "batched request failed".to_owned(), source: self.to_string().into() }
    }

    /// The timeout of a request on `subject` sent `tries` times in `elapsed`; `advice`, for
    /// a request not safe to repeat, says what to do before sending it again.
    pub(crate) fn request_timed_out(subject: &str, tries: u32, elapsed: Duration, advice: Option<&str>) -> Error {
        let tries = if tries == 1 { "1 try".to_owned() } else { format!("{tries} tries") };
        let what = match advice {
            Some(advice) => format!("request on {subject} ({tries}){TIMEOUT_ADVICE}{MAY_HAVE_APPLIED}: {advice}"),
            None => format!("request on {subject} ({tries})"),
        };
        // Whole milliseconds: the time is read by people, not compared.
        let after = Duration::from_millis(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        Error::Timeout { what, after }
    }

    /// True when the grid may have applied a request that was not safe to repeat (a start
    /// without an idempotency key, a redrive), so read what it would have changed before
    /// sending it again: the request timed out (the message says so), or the grid refused
    /// it as `unavailable` with `retryable: false` (a shard's owner that did not answer a
    /// forwarded request, a store commit whose outcome is unknown).
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            Error::Timeout { what, .. } => {
                what.split_once(TIMEOUT_ADVICE).is_some_and(|(_, advice)| advice.starts_with(MAY_HAVE_APPLIED))
            }
            Error::Api(refusal) => refusal.code == ErrorCode::Unavailable && !refusal.retryable,
            _ => false,
        }
    }

    /// True when nobody answered on the API subject: no coordinator is running (or none
    /// has subscribed yet).
    pub fn is_no_responders(&self) -> bool {
        match self {
            Error::Nats { source, .. } => source
                .downcast_ref::<async_nats::RequestError>()
                .is_some_and(|error| error.kind() == async_nats::RequestErrorKind::NoResponders),
            _ => false,
        }
    }
}

/// Where the `what` of an [`Error::Timeout`] goes on from what timed out to what to do
/// about it; the message puts the time in between.
const TIMEOUT_ADVICE: &str = ": ";
/// How the advice of a timed-out request that is not safe to repeat begins.
const MAY_HAVE_APPLIED: &str = "the grid may have applied it";

/// The message of an [`Error::Timeout`]: what timed out, after how long, then what to do.
fn timeout_message(what: &str, after: Duration) -> String {
    match what.split_once(TIMEOUT_ADVICE) {
        Some((timed_out, advice)) => format!("{timed_out} timed out after {after:?}{TIMEOUT_ADVICE}{advice}"),
        None => format!("{what} timed out after {after:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_error(kind: async_nats::RequestErrorKind) -> Error {
        let context = "no coordinator answers on flowgrid.api.run.start_many".to_owned();
        Error::Nats { context, source: Box::new(async_nats::RequestError::new(kind)) }
    }

    #[test]
    fn a_batched_call_that_nobody_answered_says_so_for_each_start() {
        let nobody = request_error(async_nats::RequestErrorKind::NoResponders);
        assert!(nobody.is_no_responders());
        let copy = nobody.copy_for_batch();
        assert!(copy.is_no_responders(), "{copy:?}");
        assert_eq!(copy.to_string(), nobody.to_string());
        let other = request_error(async_nats::RequestErrorKind::Other).copy_for_batch();
        assert!(!other.is_no_responders(), "{other:?}");
        let lost = Error::Nats { context: "request".into(), source: "connection lost".into() }.copy_for_batch();
        assert!(!lost.is_no_responders() && lost.to_string().contains("connection lost"), "{lost}");
    }

    #[test]
    fn a_timeout_says_how_long_its_tries_took_and_what_to_do_when_it_may_have_been_applied() {
        let after = Duration::from_micros(15_021_394);
        let safe = Error::request_timed_out("flowgrid.api.run.get", 2, after, None);
        assert_eq!(safe.to_string(), "request on flowgrid.api.run.get (2 tries) timed out after 15.021s");
        assert!(!safe.may_have_been_applied());
        let advice = "read the run before sending it again";
        let start = Error::request_timed_out("flowgrid.api.run.start", 1, after, Some(advice));
        assert_eq!(
            start.to_string(),
            "request on flowgrid.api.run.start (1 try) timed out after 15.021s: the grid may have applied it: read \
             the run before sending it again"
        );
        assert!(start.may_have_been_applied());
        assert_eq!(start.copy_for_batch().to_string(), start.to_string());
        let waited = Error::Timeout { what: "waiting for run r1".into(), after: Duration::from_secs(60) };
        assert_eq!(waited.to_string(), "waiting for run r1 timed out after 60s");
        assert!(!waited.may_have_been_applied());
    }

    #[test]
    fn an_unavailable_refusal_that_is_not_retryable_may_have_been_applied() {
        let unanswered =
            ApiError { retryable: false, ..ApiError::new(ErrorCode::Unavailable, "shard 2 did not answer") };
        assert!(Error::Api(unanswered).may_have_been_applied());
        let moving = ApiError::new(ErrorCode::Unavailable, "shard 2 is moving to another coordinator; retry");
        assert!(!Error::Api(moving).may_have_been_applied());
        let conflict = ApiError { retryable: false, ..ApiError::new(ErrorCode::Conflict, "run r1 is running") };
        assert!(!Error::Api(conflict).may_have_been_applied());
    }
}
