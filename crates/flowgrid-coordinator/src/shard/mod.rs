//! Shard actors: one tokio task per owned shard drives the engine for the shard's runs.
//!
//! The actor applies a short batch of commands (starts, results, timers, cancels), writes
//! everything they changed into one store transaction (group commit, epoch-fenced), and
//! only after that transaction is durable publishes tasks, replies and acks. A failed
//! commit discards the in-memory state and reloads it from the store; a stale epoch stops
//! the actor (another owner has the shard).

mod actor;
mod batch;
mod cached;
mod catalog;
mod gates;
mod history;
mod outbox;
mod reload;
mod retention;
mod runs;
mod schedules;
mod timers;
mod triggers;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use flowgrid_engine::RunView;
use flowgrid_model::{FlowPlan, ParentRef, RunId, ShardId};
use flowgrid_proto::{
    ApiError, ChildEndTaken, ChildRunEnded, ErrorCode, FlowDeployed, FlowInfo, ListRuns, PauseRun, RedriveRun,
    RunCancelled, RunPaused, RunRedriven, RunSignalled, RunStarted, RunSummary, SignalRun, Subjects,
};
use flowgrid_store::StoreLimits;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use actor::spawn_shard;
pub use catalog::FlowsPage;
pub use gates::{gate_routing_key, GateVerb};
pub use history::PAGE_RECORDS_MAX as HISTORY_PAGE_MAX;
pub use outbox::{IN_FLIGHT_MAX as MESSAGES_IN_FLIGHT_MAX, START_CHILD};
pub use runs::{cursor, cursor_of};

use crate::dispatch::Dispatcher;
use crate::plans::PlanCache;

/// Where a reply goes once the commit behind it is durable.
pub type Responder<T> = oneshot::Sender<Result<T, ApiError>>;

/// Everything shard actors of one coordinator share.
pub struct NodeContext {
    pub subjects: Subjects,
    pub nats: async_nats::Client,
    pub plans: Arc<PlanCache>,
    pub dispatcher: Dispatcher,
    pub task_cache: Arc<crate::cache::TaskCache>,
    pub store_limits: StoreLimits,
    pub batch_events_max: usize,
    pub active_runs_max: u64,
    /// Runs in memory over all shards of this coordinator.
    pub active_runs: AtomicU64,
    /// This coordinator's lease: a shard commits nothing once it has run out.
    pub lease: Arc<crate::cluster::Lease>,
    /// How long an ended run stays in the store; `None` keeps every run.
    pub retain_ended_ms: Option<u64>,
    /// The API as a client: shards start child runs and send their outbox through it.
    pub client: flowgrid_sdk::Client,
    /// Bounds the requests for other shards' runs out at once.
    pub messages_in_flight: Arc<tokio::sync::Semaphore>,
    /// Child runs being started by this coordinator.
    pub children_starting: Arc<outbox::ChildrenStarting>,
}

/// A run start, resolved to a plan and a run id by the API layer.
pub struct StartCommand {
    pub run_id: RunId,
    pub plan: Arc<FlowPlan>,
    pub input: Value,
    /// Set when the caller gave an idempotency key: the run may exist already.
    pub idempotent: bool,
    /// The subflow step that starts this run, if one does.
    pub parent: Option<ParentRef>,
    /// The labels it is started with.
    pub labels: flowgrid_model::Labels,
    /// A later start time: the run waits, delayed, until then.
    pub start_at: Option<flowgrid_model::Millis>,
}

/// A redrive's run rebuilt from its history (with the run record it was checked against),
/// or why it could not be: for its shard's actor alone.
pub struct Replayed(Box<Result<(actor::ActiveRun, crate::records::RunRecord), ApiError>>);

pub enum Command {
    Start {
        start: StartCommand,
        reply: Responder<RunStarted>,
    },
    Cancel {
        run_id: RunId,
        reason: String,
        reply: Responder<RunCancelled>,
    },
    Redrive {
        request: RedriveRun,
        reply: Responder<RunRedriven>,
    },
    /// A redrive's run, rebuilt from its history beside the actor, to be taken up.
    RedriveReplayed {
        request: RedriveRun,
        replayed: Replayed,
        reply: Responder<RunRedriven>,
    },
    /// Pause (`pause`) or resume the run.
    Pause {
        request: PauseRun,
        pause: bool,
        reply: Responder<RunPaused>,
    },
    Signal {
        request: SignalRun,
        reply: Responder<RunSignalled>,
    },
    Get {
        run_id: RunId,
        reply: Responder<RunView>,
    },
    /// Up to `limit` records of the run's history after record `after`.
    History {
        run_id: RunId,
        after: Option<u64>,
        limit: usize,
        reply: Responder<flowgrid_proto::RunHistory>,
    },
    List {
        query: ListRuns,
        limit: usize,
        reply: Responder<RunsPage>,
    },
    Deploy {
        definition: Box<flowgrid_model::FlowDefinition>,
        reply: Responder<FlowDeployed>,
    },
    /// Pause (`pause`) or resume the flow's schedule and trigger.
    PauseFlow {
        request: flowgrid_proto::PauseFlow,
        pause: bool,
        reply: Responder<flowgrid_proto::FlowPaused>,
    },
    /// A flow version's plan (the latest when `version` is `None`), for starting runs.
    Plan {
        name: String,
        version: Option<u32>,
        reply: Responder<Arc<FlowPlan>>,
    },
    GetFlow {
        name: String,
        version: Option<u32>,
        reply: Responder<FlowInfo>,
    },
    /// The flows named after `after`, a page of at most `limit` (without a bound in bytes
    /// when `bytes_unbounded`).
    ListFlows {
        after: Option<String>,
        limit: usize,
        bytes_unbounded: bool,
        reply: Responder<FlowsPage>,
    },
    /// A child run of one of this shard's runs ended.
    ChildEnded {
        ended: ChildRunEnded,
        reply: Responder<ChildEndTaken>,
    },
    /// A message about a run's place under a concurrency limit (see [`GateVerb`]).
    Gate {
        verb: GateVerb,
        message: flowgrid_proto::GateMessage,
        reply: Responder<flowgrid_proto::GateTaken>,
    },
    /// The concurrency limits this shard keeps (of one flow, or all).
    Limits {
        flow: Option<String>,
        reply: Responder<Vec<flowgrid_proto::LimitSummary>>,
    },
    /// A message of this shard's outbox was taken by its receiver: delete it, unless a
    /// later write than `write` replaced it.
    OutboxDelivered {
        key: Vec<u8>,
        write: u64,
    },
    /// The task cache holds a result for an attempt that was about to go to a worker.
    CachedResult {
        attempt: flowgrid_model::AttemptId,
        output: Value,
    },
}

/// How long a request waits for its shard's answer: three times the SDK's default request
/// timeout, so no caller is still waiting. Only a shard that stalls (a disk that hangs
/// under its store) reaches it; without it, each request waiting on that shard would hold
/// one of the API's permits for as long as the stall lasts.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A request whose shard did not answer, or whose forwarding to the shard's owner failed:
/// it may have been applied, so it is not retryable as such; the SDK repeats it only where
/// repeating is safe, as it does after a timeout of its own.
pub(crate) fn maybe_applied(what: String) -> ApiError {
    ApiError {
        retryable: false,
        ..ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "{what}: the request may have been applied; send it again only if that is safe (reads, \
                 cancels, signals, deploys and starts with an idempotency key are), else read the state first"
            ),
        )
    }
}

/// One shard's part of a run listing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunsPage {
    /// Its newest matching runs older than the cursor, newest first.
    pub runs: Vec<RunSummary>,
    /// Where its scan of the listing index stopped (creation time and run id) when it read
    /// as many entries as one request may before it found enough matches, or the last run
    /// it kept when its page reached its byte bound: its runs older than that were not
    /// looked at or not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned_to: Option<(flowgrid_model::Millis, RunId)>,
}

/// The sending side of a shard actor's inbox.
#[derive(Clone)]
pub struct ShardHandle {
    pub shard: ShardId,
    sender: mpsc::Sender<Command>,
}

impl ShardHandle {
    /// Sends `command` unless the shard's queue is full (then: overloaded, retry later; see
    /// `--shard-queue-max`) or the actor has stopped (then: unavailable).
    pub fn try_send(&self, command: Command) -> Result<(), ApiError> {
        self.sender.try_send(command).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => {
                crate::api::overloaded(format!("shard {} has too many requests waiting; retry later", self.shard))
            }
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::new(ErrorCode::Unavailable, format!("shard {} is not served right now; retry", self.shard))
            }
        })
    }

    /// Sends a command built around a fresh responder and waits for its reply.
    pub async fn ask<T>(&self, build: impl FnOnce(Responder<T>) -> Command) -> Result<T, ApiError> {
        let (reply, receiver) = oneshot::channel();
        self.try_send(build(reply))?;
        match tokio::time::timeout(ASK_TIMEOUT, receiver).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("shard {} stopped before replying; retry", self.shard),
            )),
            Err(_) => Err(maybe_applied(format!("shard {} did not answer within {ASK_TIMEOUT:?}", self.shard))),
        }
    }
}

/// A shard file of the embedded store, for tests of what a shard reads and writes.
#[cfg(test)]
pub(crate) mod testing {
    use flowgrid_model::{Epoch, ShardId};
    use flowgrid_store::{ShardStore, Store, StoreLimits};
    use flowgrid_store_redb::{RedbShard, RedbStore};

    /// Shard 0 of an embedded store in a directory of its own, acquired at `epoch`; the
    /// directory goes when `_dir` drops.
    pub(crate) struct TestShard {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) file: RedbShard,
        pub(crate) epoch: Epoch,
    }

    /// A new [`TestShard`].
    pub(crate) async fn test_shard() -> TestShard {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path(), StoreLimits::default()).unwrap();
        let file = store.open_shard(ShardId(0)).await.unwrap();
        let epoch = file.acquire().await.unwrap();
        TestShard { _dir: dir, file, epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::Recording;

    /// A command refused because its shard's queue is full is an overload refusal, counted
    /// where the overload alert looks; one for a stopped shard is not.
    #[test]
    fn a_full_shard_queue_refusal_is_counted_as_rejected() {
        let delivered = || Command::OutboxDelivered { key: Vec::new(), write: 0 };
        let recording = Recording::new();
        recording.record(|| {
            let (sender, inbox) = mpsc::channel(1);
            let handle = ShardHandle { shard: ShardId(3), sender };
            handle.try_send(delivered()).expect("room for one command");
            let refusal = handle.try_send(delivered()).expect_err("the queue is full");
            assert_eq!((refusal.code, refusal.retryable), (ErrorCode::Overloaded, true), "{refusal:?}");
            assert!(refusal.message.contains("shard 3 has too many requests waiting"), "{refusal:?}");
            drop(inbox);
            let refusal = handle.try_send(delivered()).expect_err("the actor stopped");
            assert_eq!(refusal.code, ErrorCode::Unavailable, "{refusal:?}");
        });
        assert_eq!(recording.sample("flowgrid_api_rejected_total "), Some(1.0), "{}", recording.render());
    }
}
