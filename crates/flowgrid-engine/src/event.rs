//! Events the engine accepts and effects it asks the driver to carry out.

use std::sync::Arc;

use flowgrid_model::{AttemptId, Millis, RunId};

use crate::RunStatus;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An input to a run. Every accepted event is persisted (the run's history) before its
/// effects are carried out; replaying the history rebuilds the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A worker finished an attempt.
    TaskSucceeded { attempt: AttemptId, output: Value },
    /// The task cache answered an attempt with a result a worker gave an earlier attempt
    /// of the same pool, task and key (the driver looked it up for the dispatch's
    /// [`CacheLookup`]).
    TaskCached { attempt: AttemptId, output: Value },
    /// A worker reported an error for an attempt.
    TaskFailed { attempt: AttemptId, error: TaskError },
    /// A worker reported how far an open attempt got (`details`, the worker's own JSON):
    /// shown with the step, and handed to the step's next attempt if this one fails.
    TaskProgress { attempt: AttemptId, details: Value },
    /// A timer the run armed came due.
    TimerFired { timer: TimerKey },
    /// Someone asked to cancel the run.
    CancelRequested { reason: String },
    /// A signal for signal step `step` came from outside the run, carrying `data`, and the
    /// sender's `id` for it, if it gave one.
    SignalReceived {
        step: String,
        data: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Child run `child`, started by subflow step `step`, ended with `status` (and its
    /// output or error); also sent when the child could not be started at all.
    ChildEnded {
        step: String,
        /// The item, for a subflow step with `items`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<u32>,
        child: RunId,
        status: RunStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<TaskError>,
        /// The child could not be started at all: the grid refused its start.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        refused: bool,
        /// The refusal keeps its round, so the step's next child takes a new one. False in
        /// histories recorded before this field: the refusal gave its round back, and the
        /// step's next child took the refused one's round (and id) again.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        keeps_round: bool,
    },
    /// Someone asked to pause the run: it starts no more steps until it is resumed (see
    /// [`crate::Run::paused`]).
    PauseRequested { reason: String },
    /// Someone asked a paused run to go on: the steps it held start.
    ResumeRequested { reason: String },
    /// Someone asked to run a run that ended again: from the steps that did not succeed,
    /// and from steps `from` (with every step after them) even if they succeeded (see
    /// [`crate::Run::redrive_refused`]).
    Redriven {
        reason: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        from: Vec<String>,
        /// The run goes again queued: its flow's concurrency limit admits it later.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        queued: bool,
    },
    /// The flow's concurrency limit admitted a queued run: the steps it held start.
    Admitted,
}

/// Why a run does not take a signal for a step: see [`crate::Run::signal_refused`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignalRefused {
    /// The run's flow has no step of that id.
    NoSuchStep,
    /// The step is of another kind (`task`, `wait`, ...).
    NotASignalStep { kind: &'static str },
    /// The step has not started (the steps before it are still going) and does not keep
    /// early signals.
    NotStarted,
    /// The step is over: it took a signal already (or keeps one sent before it started),
    /// timed out, was skipped or cancelled, or the run ended.
    Over { status: crate::StepStatus },
}

/// Why a run cannot be redriven: see [`crate::Run::redrive_refused`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveRefused {
    /// It has not ended.
    Going,
    /// It succeeded and no step to run again from was named: there is nothing to run again.
    Succeeded,
    /// A subflow step started it: its parent took its end already.
    Child { parent: flowgrid_model::ParentRef },
    /// It was redriven [`flowgrid_model::limits::REDRIVES_MAX`] times.
    TooOften { times: u32 },
    /// A step to run again from is not a step of the run's flow version.
    NoSuchStep { step: String },
    /// A step to run again from was skipped: the steps before it would skip it again.
    Skipped { step: String },
}

/// The result of [`crate::Run::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The event changed the run: persist it, then carry out the effects.
    Accepted,
    /// The event changed nothing (stale attempt, run already ended, timer no longer
    /// armed): do not persist it. The string says why, for logs and metrics.
    Ignored(&'static str),
}

/// An error reported for an attempt (by a worker, or `timeout` by the engine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskError {
    /// Machine-readable code; retry policies and catches match on it.
    pub code: String,
    /// What went wrong, for people (empty when a worker gave none).
    #[serde(default)]
    pub message: String,
    /// `false` means never retry, whatever the policy says.
    #[serde(default = "default_true")]
    pub retryable: bool,
}

fn default_true() -> bool {
    true
}

/// What a timer is for. Timers are scoped to one run.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TimerKey {
    /// Backoff after a failed attempt is over: dispatch attempt `attempt.attempt`.
    RetryDue { attempt: AttemptId },
    /// Start-to-close timeout of an open attempt.
    AttemptTimeout { attempt: AttemptId },
    /// The flow's `timeout_ms`.
    RunTimeout,
    /// The time of `wait` step `step` is over.
    WaitOver { step: String },
    /// Signal step `step` got no signal within its `timeout_ms`.
    SignalTimeout { step: String },
    /// Subflow step `step`'s children did not all end within its `timeout_ms`.
    SubflowTimeout { step: String },
    /// A delayed run's start time came.
    StartDue,
}

/// Work for a worker pool: the driver publishes it to the pool's task subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskDispatch {
    /// The attempt; with `run_created_ms`, its message id de-duplicates republished tasks.
    pub attempt: AttemptId,
    /// When the attempt's run was created: a run made again under the same id (its
    /// idempotency key reused after the earlier run was deleted) publishes its tasks
    /// under message ids of its own, which the broker does not drop as duplicates.
    pub run_created_ms: Millis,
    /// Worker pool whose task subject carries it.
    pub pool: Arc<str>,
    /// Task name the worker dispatches on.
    pub task: Arc<str>,
    /// The evaluated task input, shared with the run's state (a task without an `input`
    /// mapping gets the run input itself).
    pub input: Arc<Value>,
    /// When the attempt was dispatched: the time of the event that opened it, so a replay
    /// of the run's history gives the same. A reloaded shard sends its open tasks again in
    /// this order, oldest first (not by deadline, which a step's timeouts set apart): of
    /// the tasks of one cache key, the one already with a worker leads again.
    #[serde(default)]
    pub opened_ms: Millis,
    /// Absolute start-to-close deadline of this attempt.
    pub deadline_ms: Millis,
    /// 0-9, higher first: the lane of the pool it is published to.
    pub priority: u8,
    /// The last progress a worker reported for this step (or map item), by this attempt
    /// or an earlier one: where a retry may resume.
    pub progress: Option<Arc<Value>>,
    /// Set when the step's results are cached: look the result up before publishing, and
    /// feed a fresh one back as [`Event::TaskCached`] instead.
    pub cache: Option<CacheLookup>,
}

/// What identifies a task's result in the task cache, and how old a stored one may be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheLookup {
    /// What the step's `cache.key` gave for the task input (the input without one). The
    /// driver keys the cache by the pool, the task name and this value.
    pub key: Arc<Value>,
    /// A stored result older than this is not used.
    pub ttl_ms: u64,
}

/// The child run a subflow step starts: the driver starts it through the API with the
/// idempotency key [`flowgrid_model::ParentRef::child_key`], so starting it again (after
/// a reload) starts nothing new.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildStart {
    /// The child's run id, which follows from the parent, the step and the flow.
    pub child: RunId,
    /// The parent run and its subflow step (and item, for a step with `items`).
    pub parent: RunId,
    pub step: String,
    pub item: Option<u32>,
    /// The step's round ([`flowgrid_model::ParentRef::round`]).
    pub round: u32,
    pub flow: String,
    /// `None`: the latest version.
    pub version: Option<u32>,
    pub input: Arc<Value>,
    /// The parent's labels, which the child carries too.
    pub labels: flowgrid_model::Labels,
}

/// The run of a flow's `on_failure` handler that a run's end starts: the driver starts it
/// with `idempotency_key`, so a start sent again (after a crash) starts nothing new.
#[derive(Clone, Debug, PartialEq)]
pub struct HandlerStart {
    /// The run whose end starts it.
    pub failed: RunId,
    /// How often that run was redriven before this end: each end starts its own handler.
    pub round: u32,
    pub flow: String,
    pub input: Value,
    pub idempotency_key: String,
    /// The failed run's labels, and [`flowgrid_model::ON_FAILURE_OF_LABEL`] with its id.
    pub labels: flowgrid_model::Labels,
}

/// What the driver must do, in order, after persisting the event behind it.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Publish a task to its pool.
    Dispatch(TaskDispatch),
    /// Arm a timer; when due, feed `Event::TimerFired`. A timer key is armed at most once.
    ArmTimer { run_id: RunId, timer: TimerKey, due_ms: Millis },
    /// Forget a timer armed at `due_ms` (it would be ignored anyway; this keeps the wheel
    /// small).
    CancelTimer { run_id: RunId, timer: TimerKey, due_ms: Millis },
    /// Start a subflow step's child run.
    StartChild(ChildStart),
    /// Cancel a child run that is still going: its parent ended (emitted before
    /// `RunFinished`).
    CancelChild { child: RunId, reason: String },
    /// A worker's result for a task whose step caches its results: store it for later
    /// attempts with the same pool, task and key (best effort; losing it costs a worker
    /// call later, nothing else).
    CacheResult { pool: Arc<str>, task: Arc<str>, key: Arc<Value>, output: Value },
    /// Start the run of the flow's failure handler (emitted before `RunFinished`).
    StartFailureHandler(HandlerStart),
    /// The run reached its terminal status (emitted exactly once per run).
    RunFinished { run_id: RunId, status: crate::RunStatus },
}
