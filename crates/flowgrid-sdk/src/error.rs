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
    /// again within the retry budget; any other request may have been applied.
    #[error("{what} timed out after {after:?}")]
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

    /// The same failure for each call a batched request carried (the source error itself
    /// cannot be shared, so it is kept as text).
    pub(crate) fn copy_for_batch(&self) -> Error {
        match self {
            Error::Api(refusal) => Error::Api(refusal.clone()),
            Error::Timeout { what, after } => Error::Timeout { what: what.clone(), after: *after },
            other => Error::Nats { context: "batched request failed".to_owned(), source: other.to_string().into() },
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
