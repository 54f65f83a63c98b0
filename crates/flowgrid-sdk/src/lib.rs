//! The flowgrid SDK.
//!
//! - [`Client`]: deploy flows, start, query, list and cancel runs over NATS, and submit
//!   runs durably; [`StartBatcher`] sends the starts of many tasks as few requests.
//! - [`Worker`]: serve one pool's tasks with bounded concurrency, heartbeats and result
//!   reporting.
//! - [`broker`]: the JetStream streams and consumers flowgrid uses (shared by the
//!   coordinator and workers so they agree on every setting).
//! - [`StreamPublisher`]: pipelined JetStream publishing, every ack on one subscription.
//! - [`NatsOptions`]: credentials and TLS for a secured nats-server.

pub mod backoff;
pub mod broker;
mod client;
mod connect;
mod duration;
mod encoding;
mod error;
mod publisher;
mod refused;
mod starts;
mod token;
pub mod trigger_stream;
mod worker;

pub use client::{Client, Submitted, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY_BUDGET};
pub use connect::{redact, NatsOptions};
pub use duration::{parse_duration, parse_start_time, parse_time};
pub use encoding::{content_type, encoding_of};
pub use error::{Error, Result};
pub use publisher::{PublishFailure, StreamPublisher, TIMEOUT_CHECK};
pub use refused::{RefusedSubmit, REFUSED_SUBMITS_MAX};
pub use starts::{StartBatcher, DEFAULT_START_BATCH_MAX, DEFAULT_START_REQUESTS_MAX};
pub use token::TaskToken;
pub use worker::{
    SharedHandler, Task, TaskHandler, Worker, CONCURRENCY_MAX, DEFAULT_CONCURRENCY, DEFAULT_SHUTDOWN_GRACE,
    MAX_RATE_MIN,
};

/// This host's name, reduced to the characters a NATS KV key allows (`localhost` when it
/// cannot be read): how coordinators and workers name themselves.
pub fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    let name: String =
        name.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// The future a [`TaskHandler`] returns.
pub use futures::future::BoxFuture;

pub use flowgrid_engine::{Event, Paused, RunStatus, RunView, StepStatus, StepView, TaskError, TimerKey};
pub use flowgrid_model::{AttemptId, Millis, RunId, StartRate};
pub use flowgrid_proto::{
    ApiError, ErrorCode, FlowDeployed, FlowInfo, FlowList, FlowPause, FlowPaused, FlowSummary, HistoryRecord,
    HistoryStart, LimitList, LimitSummary, ListRuns, LiveOutput, RunCancelled, RunHistory, RunList, RunPaused,
    RunRedriven, RunSignalled, RunStarted, RunSummary, RunsStarted, StartRun, StartRuns, START_MANY_RUNS_MAX,
};
