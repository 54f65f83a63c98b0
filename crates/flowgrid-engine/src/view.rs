//! Read-only views of a run, for the API and for final snapshots.

use flowgrid_model::{Labels, Millis, ParentRef, RunId};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::TaskError;

/// Where a run is: running, or one of the four terminal statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Not ended yet.
    Running,
    /// Ended by itself or by a `succeed` step; the run has an output.
    Succeeded,
    /// A step failed without a catch, a `fail` step ran, or an expression broke.
    Failed,
    /// Someone cancelled it.
    Cancelled,
    /// It ran past the flow's `timeout_ms`.
    TimedOut,
}

impl RunStatus {
    /// Every status but `Running`: the run accepts no more events.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Running)
    }

    /// The status as the API spells it (`timed_out`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
        }
    }
}

/// Where one step of a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for its dependencies.
    Pending,
    /// Dispatched (or fanned out) and not finished.
    Running,
    /// Waiting for a retry backoff to end.
    Retrying,
    /// Finished with an output (a choice: took a branch).
    Succeeded,
    /// Failed; `caught` in the view says whether a catch took over.
    Failed,
    /// Not run: none of its incoming edges was activated.
    Skipped,
    /// The run ended while the step was pending or running.
    Cancelled,
}

impl StepStatus {
    /// The status as expressions and the API spell it (`running`, `succeeded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Retrying => "retrying",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }

    /// Resolved for its dependants: succeeded, failed (caught or not) or skipped.
    pub fn is_resolved(self) -> bool {
        matches!(self, StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped)
    }
}

/// A run as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunView {
    /// The run's id.
    pub run_id: RunId,
    /// Flow name.
    pub flow: String,
    /// Flow version.
    pub version: u32,
    /// Running or how it ended.
    pub status: RunStatus,
    /// The run input as given.
    pub input: Value,
    /// The run output, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Why the run failed, was cancelled or timed out.
    pub error: Option<TaskError>,
    /// When the run started.
    pub created_ms: Millis,
    /// When it reached its terminal status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<Millis>,
    /// The subflow step that started this run, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The labels it was started with.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// How often the run was redriven, and when last; absent if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redriven: Option<Redriven>,
    /// Since when and why the run is paused; absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
    /// Since when the run waits for its flow's concurrency limit to admit it; absent once
    /// it was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<Queued>,
    /// Until when a run started with a later start time waits; absent once it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed: Option<Delayed>,
    /// The run its end started: its flow's `on_failure` handler, for this end (its start
    /// may have been refused: the coordinator's log says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure_run: Option<RunId>,
    /// In definition order.
    pub steps: Vec<StepView>,
    /// Whether this view leaves out the run's input and every output (asked for without
    /// them, or too large for one message): they are in the run's history.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_left_out: bool,
}

/// A paused run: it starts no step until it is resumed; the steps it started go on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Paused {
    /// When it was paused.
    pub since_ms: Millis,
    /// Why, as the pause request said.
    pub reason: String,
    /// Steps ready to start that wait for the resume (ids, in the order they became ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// A run started with a later start time: it starts no step until then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Delayed {
    /// When it starts.
    pub until_ms: Millis,
    /// Steps ready to start that wait for that time (ids, in the order they became ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// A run that waits for its flow's concurrency limit to admit it: it starts no step until then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Queued {
    /// Since when it waits (its start, or its redrive).
    pub since_ms: Millis,
    /// Steps ready to start that wait for the admission (ids, in the order they became ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// How often a run was redriven (started again from the steps that did not succeed after
/// it failed, timed out or was cancelled), and when last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Redriven {
    /// Redrives so far.
    pub times: u32,
    /// When the last one went through; the run's timeout counts from here.
    pub last_ms: Millis,
}

/// One step of a run as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepView {
    /// Step id from the definition.
    pub id: String,
    /// Step kind as written in definitions (`task`, `map`, ...).
    pub kind: String,
    /// Where the step is.
    pub status: StepStatus,
    /// Attempts dispatched so far (for a map: over all items).
    pub attempts: u32,
    /// Attempts the task cache answered with a stored result instead of a worker (for a
    /// map: over all items).
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub cached: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// When the step started.
    pub started_ms: Option<Millis>,
    /// When it resolved, or was cancelled after it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<Millis>,
    /// The step output once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The error it failed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// For a task step still going: the last progress its worker reported (by this attempt
    /// or an earlier one), as the worker wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    /// The failure was handled by a catch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub caught: bool,
    /// For a map: items in all, finished, failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemCounts>,
    /// For a subflow step that started: its (latest) child run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run: Option<RunId>,
    /// For a subflow step with items: the round of the children it started last
    /// ([`ParentRef::round`]), which their ids follow from; 0 until a redrive starts the
    /// step again. Children of items that succeeded in an earlier round are kept, with the
    /// ids of their round (list them all by their parent).
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub child_round: u32,
    /// For a subflow step with `repeat` waiting for a child: the loop's iteration (from
    /// 0) that child runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
}

/// A [`RunView`] borrowed from its run ([`Run::view_ref`](crate::Run::view_ref)): the
/// same fields, names, order and omissions, so that it serializes exactly as the owned
/// view does (a test holds the two together) without copying the run's values.
#[derive(Debug, Serialize)]
pub struct RunViewRef<'a> {
    pub(crate) run_id: &'a RunId,
    pub(crate) flow: &'a str,
    pub(crate) version: u32,
    pub(crate) status: RunStatus,
    pub(crate) input: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a TaskError>,
    pub(crate) created_ms: Millis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ended_ms: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) parent: Option<&'a ParentRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) labels: Option<&'a Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redriven: Option<Redriven>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) paused: Option<Paused>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) queued: Option<Queued>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) delayed: Option<Delayed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) on_failure_run: Option<RunId>,
    pub(crate) steps: Vec<StepViewRef<'a>>,
}

/// A [`StepView`] borrowed from its run.
#[derive(Debug, Serialize)]
pub(crate) struct StepViewRef<'a> {
    pub(crate) id: &'a str,
    pub(crate) kind: &'static str,
    pub(crate) status: StepStatus,
    pub(crate) attempts: u32,
    #[serde(skip_serializing_if = "flowgrid_model::is_zero")]
    pub(crate) cached: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) started_ms: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ended_ms: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a TaskError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) progress: Option<&'a Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) caught: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) items: Option<ItemCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) child_run: Option<RunId>,
    #[serde(skip_serializing_if = "flowgrid_model::is_zero")]
    pub(crate) child_round: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) iteration: Option<u32>,
}

impl RunView {
    /// Leaves the input and every output out (the run's, each step's, progress reports):
    /// what is left says where the run is, however large its data.
    pub fn drop_data(&mut self) {
        self.data_left_out = true;
        self.input = Value::Null;
        self.output = None;
        for step in &mut self.steps {
            step.output = None;
            step.progress = None;
        }
    }
}

impl RunViewRef<'_> {
    /// The owned view, for the API ([`Run::view`](crate::Run::view)).
    pub(crate) fn to_view(&self) -> RunView {
        RunView {
            run_id: self.run_id.clone(),
            flow: self.flow.to_owned(),
            version: self.version,
            status: self.status,
            input: self.input.clone(),
            output: self.output.cloned(),
            error: self.error.cloned(),
            created_ms: self.created_ms,
            ended_ms: self.ended_ms,
            parent: self.parent.cloned(),
            labels: self.labels.cloned().unwrap_or_default(),
            redriven: self.redriven,
            paused: self.paused.clone(),
            queued: self.queued.clone(),
            delayed: self.delayed.clone(),
            on_failure_run: self.on_failure_run.clone(),
            steps: self.steps.iter().map(StepViewRef::to_view).collect(),
            data_left_out: false,
        }
    }
}

impl StepViewRef<'_> {
    fn to_view(&self) -> StepView {
        StepView {
            id: self.id.to_owned(),
            kind: self.kind.to_owned(),
            status: self.status,
            attempts: self.attempts,
            cached: self.cached,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            output: self.output.cloned(),
            error: self.error.cloned(),
            progress: self.progress.cloned(),
            caught: self.caught,
            items: self.items,
            child_run: self.child_run.clone(),
            child_round: self.child_round,
            iteration: self.iteration,
        }
    }
}

/// Item counts of a map step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ItemCounts {
    /// Items the list held.
    pub total: u32,
    /// Items that succeeded.
    pub succeeded: u32,
    /// Items that failed after their retries.
    pub failed: u32,
    /// Items with an attempt out or waiting for a retry.
    pub running: u32,
}
