//! One run's state and its transitions.
//!
//! The submodules split the transitions by idea: [`steps`] starts a ready step by kind,
//! [`map`] fans a map step out and in, [`results`] applies results and timers to open
//! attempts, [`signals`] takes signals from outside, [`subflows`] starts child runs and
//! takes their ends, [`pause`] holds the steps of a paused run, [`redrive`] runs an ended
//! run again, [`resolve`] propagates a resolved
//! step along its edges, [`retry`] computes backoff delays, [`scope`] evaluates
//! expressions.
//!
//! Invariants kept here:
//! - the armed timers follow from the state alone, so the run stores none: an
//!   `AttemptTimeout` per open attempt (due at its deadline), a `RetryDue` per attempt
//!   waiting for its backoff, a `WaitOver` per wait step waiting, a `SignalTimeout` per
//!   signal step waiting with a timeout, a `SubflowTimeout` per subflow step with a
//!   timeout waiting for children, and `RunTimeout` while the run goes (if the flow has
//!   one);
//! - `unresolved` counts the steps that have not resolved (pending, running, retrying);
//! - `agenda` is empty between two calls.
//!
//! On a terminal transition the run emits a `CancelTimer` for every armed timer, a
//! `CancelChild` for every child run still going, then exactly one `RunFinished`;
//! afterwards it arms nothing and accepts no event but a redrive, which makes it go again.

mod cache;
mod delay;
mod map;
mod on_failure;
mod pause;
mod queue;
mod redrive;
mod resolve;
mod results;
mod retry;
mod scope;
mod signals;
pub use signals::signal_step_refused;
mod state;
mod steps;
mod subflows;

use std::collections::VecDeque;
use std::sync::Arc;

use flowgrid_model::limits::msgpack_bytes;
use flowgrid_model::{
    AttemptId, Evaluator, FlowPlan, Labels, Millis, ParentRef, PlanStep, PlanStepKind, RunId, StepIndex, SubflowSpec,
};
use serde_json::Value;

use crate::view::{RunViewRef, StepViewRef};
use crate::{Applied, Effect, Event, Redriven, RunStatus, RunView, StepStatus, TaskDispatch, TaskError, TimerKey};
use resolve::Agenda;
use state::{Item, Phase, Slot, StepState, Work};

/// What a run starts with.
#[derive(Clone, Debug)]
pub struct RunStart {
    pub run_id: RunId,
    pub input: Value,
    /// Its labels, which its child runs carry too.
    pub labels: Labels,
    pub now: Millis,
    /// Its flow's concurrency limit had no room: it holds its steps until it is admitted.
    pub queued: bool,
    /// Start no step before this time (later than `now`); its timeout counts from then.
    pub start_at: Option<Millis>,
}

/// The state of one run. Built by [`Run::start`], advanced by [`Run::apply`].
#[derive(Debug)]
pub struct Run {
    plan: Arc<FlowPlan>,
    run_id: RunId,
    input: Arc<Value>,
    status: RunStatus,
    output: Option<Value>,
    /// Boxed: most runs never fail, and every active run carries this field.
    error: Option<Box<TaskError>>,
    created_ms: Millis,
    ended_ms: Option<Millis>,
    /// The subflow step that started this run, if one did (boxed: most runs have none).
    parent: Option<Box<ParentRef>>,
    /// The labels it was started with (boxed: many runs have none).
    labels: Option<Box<Labels>>,
    /// How often the run was redriven, and when last (boxed: most runs never are).
    redriven: Option<Box<Redriven>>,
    /// Set while the run is paused, with the steps it holds (boxed: most runs never are).
    paused: Option<Box<pause::Pause>>,
    /// Set while the run waits for its flow's concurrency limit to admit it, with the steps
    /// it holds (boxed: most flows have no limit).
    queued: Option<Box<queue::Queue>>,
    /// Set for a run started with a later start time (boxed: most runs start at once).
    delay: Option<Box<delay::Delay>>,
    /// Pauses so far (at most [`flowgrid_model::limits::PAUSES_MAX`]).
    pauses: u32,
    /// The grid's payload limit ([`flowgrid_model::Limits::payload_bytes_max`]), which a
    /// task message's input and progress must fit together; kept because republishing the
    /// open attempts ([`Run::open_dispatches`]) has no evaluator to read it from.
    payload_bytes_max: usize,
    /// By step index.
    steps: Vec<StepState>,
    /// Steps not resolved yet; the run succeeds by itself when this reaches zero.
    unresolved: usize,
    /// Work left over from the current transition (always empty between calls).
    agenda: VecDeque<Agenda>,
}

/// What one transition needs besides the run: the evaluator, the time and the effects.
struct Context<'a> {
    evaluator: &'a Evaluator,
    now: Millis,
    effects: &'a mut Vec<Effect>,
}

impl Run {
    /// Starts a run of `plan` as `start` says: evaluates and dispatches the steps without
    /// dependencies (holds them, for a queued start, until [`Event::Admitted`]) and arms the
    /// run timeout. A run may end at once (e.g. a flow of transforms only), in which case
    /// `RunFinished` is among the effects.
    pub fn start(plan: Arc<FlowPlan>, evaluator: &Evaluator, start: RunStart, effects: &mut Vec<Effect>) -> Run {
        let RunStart { run_id, input, labels, now, queued, start_at } = start;
        let steps = plan.steps.iter().map(|_| StepState::new()).collect();
        let mut run = Run {
            unresolved: plan.steps.len(),
            plan: Arc::clone(&plan),
            run_id,
            input: Arc::new(input),
            status: RunStatus::Running,
            output: None,
            error: None,
            created_ms: now,
            ended_ms: None,
            parent: None,
            labels: (!labels.is_empty()).then(|| Box::new(labels)),
            redriven: None,
            paused: None,
            queued: queued.then(|| queue::Queue::new(now)),
            delay: start_at.filter(|start_at| *start_at > now).map(delay::Delay::new),
            pauses: 0,
            payload_bytes_max: evaluator.limits().payload_bytes_max,
            steps,
            agenda: VecDeque::new(),
        };
        let mut context = Context { evaluator, now, effects };
        if let Some(timeout_ms) = plan.timeout_ms {
            run.arm_timer(TimerKey::RunTimeout, run.went_ms().saturating_add(timeout_ms), &mut context);
        }
        if let Some((timer, due_ms)) = run.delay_timer() {
            run.arm_timer(timer, due_ms, &mut context);
        }
        for (position, step) in plan.steps.iter().enumerate() {
            if step.deps.is_empty() {
                run.steps[position].activated = true;
                run.agenda.push_back(Agenda::Start(position as StepIndex));
            }
        }
        run.work_agenda(&mut context);
        run
    }

    /// Applies one event at `now`.
    pub fn apply(&mut self, evaluator: &Evaluator, now: Millis, event: &Event, effects: &mut Vec<Effect>) -> Applied {
        let mut context = Context { evaluator, now, effects };
        if let Event::Redriven { from, queued, .. } = event {
            return self.redrive(from, *queued, &mut context);
        }
        if self.status.is_terminal() {
            return Applied::Ignored("run already ended");
        }
        let applied = match event {
            Event::TaskSucceeded { attempt, output } => self.on_task_succeeded(attempt, output, false, &mut context),
            Event::TaskCached { attempt, output } => self.on_task_succeeded(attempt, output, true, &mut context),
            Event::TaskFailed { attempt, error } => self.on_task_failed(attempt, error, &mut context),
            Event::TaskProgress { attempt, details } => self.on_task_progress(attempt, details),
            Event::TimerFired { timer } => self.on_timer(timer, &mut context),
            Event::SignalReceived { step, data, .. } => self.on_signal(step, data, &mut context),
            Event::ChildEnded { step, item, child, status, output, error, refused, keeps_round } => {
                let ended = subflows::ChildEnd {
                    child,
                    status: *status,
                    output: output.as_ref(),
                    error: error.as_ref(),
                    refused: *refused,
                    keeps_round: *keeps_round,
                };
                self.on_child_ended(step, *item, ended, &mut context)
            }
            Event::PauseRequested { reason } => self.pause(reason, &mut context),
            Event::ResumeRequested { .. } => self.resume(),
            Event::Admitted => self.admit(),
            Event::CancelRequested { reason } => {
                let error = TaskError { code: "cancelled".to_owned(), message: reason.clone(), retryable: false };
                self.finish(RunStatus::Cancelled, None, Some(error), &mut context);
                Applied::Accepted
            }
            Event::Redriven { .. } => unreachable!("taken above"),
        };
        if applied == Applied::Accepted {
            self.work_agenda(&mut context);
        }
        assert!(self.agenda.is_empty(), "agenda left over after an event");
        applied
    }

    /// Every attempt that is dispatched and not finished, as it was dispatched: the driver
    /// republishes these after reloading a shard (duplicates are harmless), oldest first by
    /// when each was dispatched ([`TaskDispatch::opened_ms`]).
    pub fn open_dispatches(&self) -> Vec<TaskDispatch> {
        self.slots().filter_map(|(index, item, slot)| self.open_dispatch(index, item, slot)).collect()
    }

    /// Every armed timer with its due time, in key order: the driver re-arms these after a
    /// reload. They follow from the state: the slots' phases and the run timeout.
    pub fn armed_timers(&self) -> Vec<(TimerKey, Millis)> {
        let mut armed = Vec::new();
        if let (false, Some(timeout_ms)) = (self.status.is_terminal(), self.plan.timeout_ms) {
            armed.push((TimerKey::RunTimeout, self.went_ms().saturating_add(timeout_ms)));
        }
        armed.extend(self.delay_timer());
        armed.extend(self.slots().filter_map(|(index, item, slot)| self.slot_timer(index, item, slot)));
        armed.extend(self.steps.iter().zip(&self.plan.steps).filter_map(|(state, step)| step_timer(state, step)));
        armed.sort_unstable();
        armed
    }

    /// Every slot in use, with its step and item: a task step's current attempt, a map's
    /// active items.
    fn slots(&self) -> impl Iterator<Item = (StepIndex, Option<u32>, &Slot)> + '_ {
        self.steps.iter().enumerate().flat_map(|(position, state)| {
            let index = position as StepIndex;
            let task = match &state.work {
                Work::Task(slot) => Some((index, None, slot)),
                _ => None,
            };
            let items = match &state.work {
                Work::Map(map) => map.items.as_slice(),
                _ => &[],
            };
            let active = items.iter().enumerate().filter_map(move |(item, entry)| match entry {
                Item::Active(slot) => Some((index, Some(item as u32), slot)),
                _ => None,
            });
            task.into_iter().chain(active)
        })
    }

    /// The timer `slot` has armed, if any: its attempt's timeout while it is out, its next
    /// attempt's retry while it waits for the backoff.
    fn slot_timer(&self, index: StepIndex, item: Option<u32>, slot: &Slot) -> Option<(TimerKey, Millis)> {
        match slot.phase {
            Phase::New => None,
            Phase::Open { deadline_ms, .. } => {
                Some((TimerKey::AttemptTimeout { attempt: self.attempt_id(index, item, slot.attempt) }, deadline_ms))
            }
            Phase::Retrying { due_ms } => {
                Some((TimerKey::RetryDue { attempt: self.attempt_id(index, item, slot.attempt + 1) }, due_ms))
            }
        }
    }

    /// The input the run started with.
    pub fn input(&self) -> &Value {
        &self.input
    }

    /// The run's id.
    pub fn id(&self) -> &RunId {
        &self.run_id
    }

    /// Records the subflow step that started this run (right after [`Run::start`], and
    /// before its effects are carried out): its end is reported there.
    pub fn set_parent(&mut self, parent: ParentRef) {
        self.parent = Some(Box::new(parent));
    }

    /// The subflow step that started this run, if one did.
    pub fn parent(&self) -> Option<&ParentRef> {
        self.parent.as_deref()
    }

    /// The labels the run was started with, if any.
    pub fn labels(&self) -> Option<&Labels> {
        self.labels.as_deref()
    }

    /// When the run started.
    pub fn created_ms(&self) -> Millis {
        self.created_ms
    }

    /// When the run last started going: its start, or its last redrive, or its start time
    /// if that is later. Its timeout counts from here.
    fn went_ms(&self) -> Millis {
        let went = self.redriven.as_deref().map_or(self.created_ms, |redriven| redriven.last_ms);
        self.delay.as_deref().map_or(went, |delay| delay.until_ms.max(went))
    }

    /// How often the run was redriven, and when last.
    pub fn redriven(&self) -> Option<Redriven> {
        self.redriven.as_deref().copied()
    }

    /// The run's status; terminal once it has ended.
    pub fn status(&self) -> RunStatus {
        self.status
    }

    /// When the run ended; `None` while it runs.
    pub fn ended_ms(&self) -> Option<Millis> {
        self.ended_ms
    }

    /// The run's output once it succeeded.
    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    /// The error it ended with, if it did not succeed.
    pub fn error(&self) -> Option<&TaskError> {
        self.error.as_deref()
    }

    /// The plan the run executes.
    pub fn plan(&self) -> &Arc<FlowPlan> {
        &self.plan
    }

    /// A snapshot of the run for the API.
    pub fn view(&self) -> RunView {
        self.view_ref().to_view()
    }

    /// The run's view borrowed from the run: it serializes exactly as [`Run::view`] does,
    /// without copying the input and outputs (a final snapshot is encoded from it).
    pub fn view_ref(&self) -> RunViewRef<'_> {
        let steps = self
            .plan
            .steps
            .iter()
            .zip(&self.steps)
            .enumerate()
            .map(|(position, (step, state))| StepViewRef {
                id: &step.id,
                kind: kind_name(&step.kind),
                status: state.status,
                attempts: state.attempts.saturating_sub(state.refused_children),
                cached: state.cached,
                started_ms: state.started_ms,
                ended_ms: state.ended_ms,
                output: state.output.as_ref(),
                error: state.error.as_deref(),
                progress: match &state.work {
                    Work::Task(slot) => slot.progress.as_deref(),
                    _ => None,
                },
                caught: state.caught(),
                items: match &state.work {
                    Work::Map(map) => Some(map.counts()),
                    _ => None,
                },
                child_run: self.started_child(position as StepIndex, state),
                child_round: match (&step.kind, &state.work) {
                    (PlanStepKind::Subflow(_), Work::Map(map)) => map.first,
                    _ => 0,
                },
                iteration: match (&step.kind, &state.work) {
                    (PlanStepKind::Subflow(SubflowSpec { repeat: Some(_), .. }), Work::Child { iteration, .. }) => {
                        Some(*iteration)
                    }
                    _ => None,
                },
            })
            .collect();
        RunViewRef {
            run_id: &self.run_id,
            flow: &self.plan.name,
            version: self.plan.version,
            status: self.status,
            input: &self.input,
            output: self.output.as_ref(),
            error: self.error.as_deref(),
            created_ms: self.created_ms,
            ended_ms: self.ended_ms,
            parent: self.parent.as_deref(),
            labels: self.labels.as_deref(),
            redriven: self.redriven(),
            paused: self.paused(),
            queued: self.queued(),
            delayed: self.delayed(),
            on_failure_run: self.failure_handler_run(),
            steps,
        }
    }

    /// The dispatch of `slot` if its attempt is out.
    fn open_dispatch(&self, index: StepIndex, item: Option<u32>, slot: &Slot) -> Option<TaskDispatch> {
        match slot.phase {
            Phase::Open { opened_ms, deadline_ms, .. } => {
                Some(self.task_dispatch(index, item, slot, opened_ms, deadline_ms))
            }
            Phase::New | Phase::Retrying { .. } => None,
        }
    }

    /// The task message of the current attempt of `slot`, dispatched at `opened_ms`. Its
    /// deadline is the attempt's, or the run's timeout if that comes first: the worker's
    /// work is wasted past either.
    fn task_dispatch(
        &self,
        index: StepIndex,
        item: Option<u32>,
        slot: &Slot,
        opened_ms: Millis,
        deadline_ms: Millis,
    ) -> TaskDispatch {
        let spec = steps::task_spec(&self.plan.step(index).kind).expect("only task and map steps dispatch");
        let run_deadline_ms = self.plan.timeout_ms.map(|timeout_ms| self.went_ms().saturating_add(timeout_ms));
        let deadline_ms = run_deadline_ms.map_or(deadline_ms, |run_deadline_ms| deadline_ms.min(run_deadline_ms));
        TaskDispatch {
            attempt: self.attempt_id(index, item, slot.attempt),
            run_created_ms: self.created_ms,
            pool: spec.pool.clone(),
            task: spec.task.clone(),
            input: Arc::clone(&slot.input),
            opened_ms,
            deadline_ms,
            priority: spec.priority,
            progress: self.progress_to_send(slot),
            cache: spec
                .cache
                .as_ref()
                .zip(slot.cache_key.as_ref())
                .map(|(cache, key)| crate::CacheLookup { key: Arc::clone(key), ttl_ms: cache.ttl_ms }),
        }
    }

    /// The last progress reported for `slot`, to send with its next attempt: left out when
    /// it and the input together are over the payload limit. The coordinator makes sure
    /// the NATS server takes a message of one payload (and the message's other fields), not
    /// of an input up to the limit and a progress report (up to
    /// [`flowgrid_model::limits::PROGRESS_BYTES_MAX`]) besides; a message over the server's
    /// bound is never delivered, and its attempt only times out. Without the progress the
    /// attempt is delivered and starts from the beginning. Both are measured as MessagePack,
    /// the encoding the task is sent in.
    fn progress_to_send(&self, slot: &Slot) -> Option<Arc<Value>> {
        let progress = slot.progress.as_ref()?;
        let bytes = msgpack_bytes(&*slot.input).saturating_add(msgpack_bytes(&**progress));
        (bytes <= self.payload_bytes_max).then(|| Arc::clone(progress))
    }

    fn attempt_id(&self, index: StepIndex, item: Option<u32>, attempt: u32) -> AttemptId {
        AttemptId { run_id: self.run_id.clone(), step: self.plan.step(index).id.clone(), item, attempt }
    }

    fn state(&mut self, index: StepIndex) -> &mut StepState {
        &mut self.steps[usize::from(index)]
    }

    /// Tells the driver about a timer the state just armed (a slot's new phase, or the run
    /// timeout at the start).
    fn arm_timer(&self, timer: TimerKey, due_ms: Millis, context: &mut Context<'_>) {
        assert!(!self.status.is_terminal(), "a finished run arms no timer");
        context.effects.push(Effect::ArmTimer { run_id: self.run_id.clone(), timer, due_ms });
    }

    /// Tells the driver to forget the timer `slot` has armed, if any; the caller then
    /// moves the slot out of that phase.
    fn cancel_slot_timer(&self, index: StepIndex, item: Option<u32>, slot: &Slot, context: &mut Context<'_>) {
        if let Some((timer, due_ms)) = self.slot_timer(index, item, slot) {
            context.effects.push(Effect::CancelTimer { run_id: self.run_id.clone(), timer, due_ms });
        }
    }

    /// Ends the run: every unresolved step is cancelled, every timer cancelled, and one
    /// `RunFinished` emitted.
    fn finish(
        &mut self,
        status: RunStatus,
        output: Option<Value>,
        error: Option<TaskError>,
        context: &mut Context<'_>,
    ) {
        assert!(!self.status.is_terminal(), "a run finishes once");
        assert!(status.is_terminal(), "a run finishes in a terminal status");
        for (timer, due_ms) in self.armed_timers() {
            // A run times out only when its `RunTimeout` fires: the driver has dropped that one.
            if status == RunStatus::TimedOut && timer == TimerKey::RunTimeout {
                continue;
            }
            context.effects.push(Effect::CancelTimer { run_id: self.run_id.clone(), timer, due_ms });
        }
        self.status = status;
        self.output = output;
        self.error = error.map(Box::new);
        self.ended_ms = Some(context.now);
        // The steps it held are cancelled with the others; a redrive starts them.
        self.paused = None;
        self.queued = None;
        if let Some(delay) = self.delay.as_deref_mut() {
            delay.clear();
        }
        self.cancel_children(status, context);
        for state in self.steps.iter_mut().filter(|state| state.is_open()) {
            cancel_step(state, context.now);
        }
        self.agenda.clear();
        self.start_failure_handler(context);
        context.effects.push(Effect::RunFinished { run_id: self.run_id.clone(), status });
    }

    /// Fails the run with `error`.
    fn fail_run(&mut self, error: TaskError, context: &mut Context<'_>) {
        self.finish(RunStatus::Failed, None, Some(error), context);
    }

    /// Marks step `index` failed with `error` and fails the run with the same error (an
    /// error no catch may handle, such as a broken expression).
    fn fail_step_and_run(&mut self, index: StepIndex, error: TaskError, context: &mut Context<'_>) {
        let now = context.now;
        let state = &mut self.steps[usize::from(index)];
        assert!(state.is_open(), "only an unresolved step fails");
        state.status = StepStatus::Failed;
        state.error = Some(Box::new(error.clone()));
        state.ended_ms = Some(now);
        if state.started_ms.is_none() {
            // A signal kept for a step that failed before it started (its `when` could not
            // be evaluated) is dropped: a step that did not succeed has no output.
            state.output = None;
        }
        self.unresolved -= 1;
        // The run ends while the step's items are still out, so that it cancels their
        // timers (which tells their workers) and child runs; then the step lets them go.
        self.fail_run(error, context);
        let state = &mut self.steps[usize::from(index)];
        state.work = abandon_with_run(std::mem::replace(&mut state.work, Work::Idle));
    }
}

/// Cancels an unresolved step because the run ended.
fn cancel_step(state: &mut StepState, now: Millis) {
    if state.started_ms.is_some() {
        state.ended_ms = Some(now);
    } else {
        // A signal kept for a step that never started is dropped.
        state.output = None;
    }
    state.status = StepStatus::Cancelled;
    state.work = abandon_with_run(std::mem::replace(&mut state.work, Work::Idle));
}

/// The work of a step that ends with its run: as [`abandon`], but a `map` step, or a
/// `subflow` step with items, keeps the outputs of its items that succeeded (tasks, or
/// child runs), which a redrive of the run does not run again.
fn abandon_with_run(work: Work) -> Work {
    match work {
        Work::Map(mut map) => {
            if map.items.iter().any(|item| matches!(item, Item::Succeeded(_))) {
                for item in map.items.iter_mut().filter(|item| !matches!(item, Item::Succeeded(_))) {
                    *item = Item::Abandoned;
                }
            } else {
                map.items.clear();
            }
            map.active = 0;
            map.prepared = None;
            Work::Map(map)
        }
        other => abandon(other),
    }
}

/// The work of a step that ended: a task drops its slot, a map keeps its counts and
/// abandons its active items.
fn abandon(work: Work) -> Work {
    match work {
        Work::Idle | Work::Task(_) | Work::Wait { .. } | Work::Signal { .. } | Work::Child { .. } => Work::Idle,
        Work::Map(mut map) => {
            map.items.clear();
            map.active = 0;
            map.prepared = None;
            Work::Map(map)
        }
    }
}

fn kind_name(kind: &PlanStepKind) -> &'static str {
    match kind {
        PlanStepKind::Task(_) => "task",
        PlanStepKind::Map { .. } => "map",
        PlanStepKind::Choice { .. } => "choice",
        PlanStepKind::Transform { .. } => "transform",
        PlanStepKind::Succeed { .. } => "succeed",
        PlanStepKind::Fail { .. } => "fail",
        PlanStepKind::Wait(_) => "wait",
        PlanStepKind::Signal { .. } => "signal",
        PlanStepKind::Subflow(_) => "subflow",
    }
}

/// The timer a wait, signal or subflow step has armed, if any: the end of its wait, its
/// signal's timeout, or its children's.
fn step_timer(state: &StepState, step: &PlanStep) -> Option<(TimerKey, Millis)> {
    match state.work {
        Work::Wait { due_ms, .. } => Some((TimerKey::WaitOver { step: step.id.clone() }, due_ms)),
        Work::Signal { deadline_ms: Some(deadline_ms) } => {
            Some((TimerKey::SignalTimeout { step: step.id.clone() }, deadline_ms))
        }
        _ => subflows::subflow_deadline(state, step)
            .map(|deadline_ms| (TimerKey::SubflowTimeout { step: step.id.clone() }, deadline_ms)),
    }
}
