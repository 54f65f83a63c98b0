//! Per-step state of a run.
//!
//! Invariants:
//! - a task step holds a [`Slot`] exactly while it is `Running` or `Retrying`;
//! - a map item is `Active` exactly while one of its attempts is open or waiting for a
//!   retry, and `MapState::active` counts those items;
//! - a slot keeps the evaluated task input once: every attempt and every republish reads it.

use std::sync::Arc;

use flowgrid_model::{Millis, Prepared};
use serde_json::Value;

use super::resolve::Resolution;
use crate::{ItemCounts, StepStatus, TaskError};

/// What one step of the run is doing and what it produced.
#[derive(Debug)]
pub(super) struct StepState {
    pub status: StepStatus,
    /// Dependencies that have resolved so far (out of `PlanStep::deps`).
    pub deps_resolved: u32,
    /// At least one resolved dependency activated an edge to this step.
    pub activated: bool,
    /// Attempts dispatched so far (for a map: over all items; for a subflow step: the
    /// children asked for, refused ones included, so that no round is used twice; a
    /// refusal recorded before refusals kept their round took its child back out).
    pub attempts: u32,
    /// Of a subflow step's `attempts`, the children whose start the grid refused and whose
    /// round the refusal kept (for one with items: over all items): none of them ran, so
    /// the view leaves them out.
    pub refused_children: u32,
    /// The latest child a subflow step with one child asked for was refused: the view
    /// names no child run until the step asks for another.
    pub child_refused: bool,
    /// Attempts the task cache answered (for a map: over all items).
    pub cached: u32,
    pub started_ms: Option<Millis>,
    pub ended_ms: Option<Millis>,
    pub output: Option<Value>,
    /// Boxed, like every rarely set field of the per-step state: a run keeps one of these
    /// per step for as long as it is active.
    pub error: Option<Box<TaskError>>,
    /// How the step resolved, once it has: what its outgoing edges saw (which branch a
    /// choice took, which catch took a failure). A redrive from a later step reads it.
    pub resolved_as: Option<Resolution>,
    pub work: Work,
}

/// Worker-side work of a step.
#[derive(Debug)]
pub(super) enum Work {
    /// Nothing in flight (not started, an engine-side step, or finished).
    Idle,
    /// A task step's current attempt.
    Task(Slot),
    /// A map step's items.
    Map(Box<MapState>),
    /// A wait step's timer, armed for `due_ms`, `waited_ms` after the step started.
    Wait { due_ms: Millis, waited_ms: u64 },
    /// A signal step waiting for its signal, until `deadline_ms` if it has a timeout.
    Signal { deadline_ms: Option<Millis> },
    /// A subflow step waiting for its child run, started with `input` (kept to start it
    /// again after a reload); with `repeat`, the child of loop iteration `iteration`.
    Child { input: Arc<Value>, iteration: u32 },
}

/// The current attempt of a task step or of one map item.
#[derive(Debug)]
pub(super) struct Slot {
    /// Number of the last dispatched attempt (`first` before the first dispatch).
    pub attempt: u32,
    /// The number before this slot's first attempt: 0, or the step's attempts before it
    /// started again after a redrive, so that no attempt number of a step is used twice
    /// (a late result of an earlier attempt never passes for a new one). Retry policies
    /// count from here.
    pub first: u32,
    pub phase: Phase,
    /// The evaluated task input, shared by every attempt and its dispatches (and with the
    /// run input when the step has no `input` mapping).
    pub input: Arc<Value>,
    /// The last progress a worker reported for an attempt of this slot: sent with its
    /// later attempts.
    pub progress: Option<Arc<Value>>,
    /// What identifies its result in the task cache, when its step caches results.
    pub cache_key: Option<Arc<Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// No attempt out and none waiting: before the first dispatch, and between the end
    /// of an attempt and what follows it.
    New,
    /// Attempt `Slot::attempt` is out since `opened_ms` (the time of the event that
    /// dispatched it, so that a replay rebuilds it the same), due back by `deadline_ms`;
    /// its worker sent `reports` progress reports so far, of `reported_kib` KiB of JSON
    /// (each rounded up).
    Open { opened_ms: Millis, deadline_ms: Millis, reports: u32, reported_kib: u32 },
    /// Attempt `Slot::attempt` failed; the next one is dispatched at `due_ms`.
    Retrying { due_ms: Millis },
}

/// The fan-out of a map step.
#[derive(Debug)]
pub(super) struct MapState {
    /// Emptied when the step ends (the counts stay).
    pub items: Vec<Item>,
    /// The `first` of every item's slot: the step's attempts when it started.
    pub first: u32,
    pub total: u32,
    /// Items below this index have been started.
    pub next_pending: u32,
    pub max_concurrency: u32,
    pub active: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// The scope of the step's `input` expression, converted once for all its items;
    /// dropped once the last item has started.
    pub prepared: Option<Prepared>,
}

/// One item of a map step.
#[derive(Debug)]
pub(super) enum Item {
    /// Not started: the item value, evaluated into a task input when it starts.
    Pending(Value),
    Active(Slot),
    Succeeded(Value),
    Failed(TaskError),
    /// The step ended while the item was active; its results are ignored.
    Abandoned,
}

impl StepState {
    pub fn new() -> StepState {
        StepState {
            status: StepStatus::Pending,
            deps_resolved: 0,
            activated: false,
            attempts: 0,
            refused_children: 0,
            child_refused: false,
            cached: 0,
            started_ms: None,
            ended_ms: None,
            output: None,
            error: None,
            resolved_as: None,
            work: Work::Idle,
        }
    }

    /// It failed and a catch took the failure.
    pub fn caught(&self) -> bool {
        matches!(self.resolved_as, Some(Resolution::Caught(_)))
    }

    /// Pending, running or retrying: the step has not resolved yet.
    pub fn is_open(&self) -> bool {
        matches!(self.status, StepStatus::Pending | StepStatus::Running | StepStatus::Retrying)
    }

    /// An attempt of this step (or of one of its items) is out or waiting for a retry, its
    /// wait is not over, or it waits for a signal or a child run.
    pub fn has_work_in_flight(&self) -> bool {
        match &self.work {
            Work::Idle => false,
            Work::Task(_) | Work::Wait { .. } | Work::Signal { .. } | Work::Child { .. } => true,
            Work::Map(map) => map.active > 0,
        }
    }
}

impl Slot {
    /// A slot whose first attempt will be number `first + 1`.
    pub fn new(first: u32, input: Arc<Value>, cache_key: Option<Arc<Value>>) -> Slot {
        Slot { attempt: first, first, phase: Phase::New, input, progress: None, cache_key }
    }

    /// Attempts of this slot dispatched so far.
    pub fn tries(&self) -> u32 {
        self.attempt - self.first
    }
}

impl MapState {
    pub fn counts(&self) -> ItemCounts {
        ItemCounts { total: self.total, succeeded: self.succeeded, failed: self.failed, running: self.active }
    }

    /// Every item has been started and none is active.
    pub fn is_done(&self) -> bool {
        self.active == 0 && self.next_pending == self.total
    }
}
