//! Errors that stop a coordinator.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or variable has a bad value; the message says which and what to use.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// NATS is unreachable or refused the connection, or its credentials or TLS settings
    /// cannot be used; the message says what to check.
    #[error(transparent)]
    Connect(flowgrid_sdk::Error),
    /// Stream or consumer setup failed.
    #[error(transparent)]
    Broker(#[from] flowgrid_sdk::broker::BrokerError),
    /// A NATS operation failed (subscribe, publish).
    #[error("NATS {what} failed: {source}")]
    Nats {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The store failed; the data directory may be unwritable or held by another process.
    #[error("store: {0}")]
    Store(#[from] flowgrid_store::Error),
    /// The store can take no more commits in this process (its journal failed a write or a
    /// sync); the coordinator handed its shards over and stopped.
    #[error(
        "the store takes no more commits in this process ({0}); the coordinator released its shards for the other \
         coordinators and stopped. Free or fix the data directory's disk, then start it again: the shards' commits \
         are replayed from its journal"
    )]
    StoreBroken(String),
    /// The grid's state in NATS (its streams and buckets) is gone: the server lost its store
    /// or someone deleted them. The coordinator left; [`crate::run`] joins again.
    #[error("the grid's streams and buckets are gone from NATS; the coordinator left the grid to join it again")]
    GridLost,
    /// The shard manager stopped without being asked (a panic, a bug): the coordinator
    /// stopped its shards and left, so that its supervisor sees a failure and restarts it.
    #[error("the shard manager stopped unexpectedly ({0}); the coordinator stopped its shards and left the grid: start it again")]
    ManagerStopped(String),
    /// The metrics endpoint could not start (address in use?): pick another `--metrics-addr`.
    #[error("cannot serve metrics on {addr}: {message}")]
    Metrics { addr: String, message: String },
    /// A persisted record could not be decoded: the data directory is corrupt or from an
    /// incompatible version.
    #[error("corrupt record {what}: {message}")]
    Corrupt { what: String, message: String },
}

/// The start of `text`, enough to recognise it in a message.
pub(crate) fn cut(text: &str) -> String {
    const CHARS_SHOWN: usize = 200;
    match text.char_indices().nth(CHARS_SHOWN) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
