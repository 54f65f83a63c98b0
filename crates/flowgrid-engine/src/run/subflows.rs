//! Subflow steps: a step that starts a child run of another flow (or one per item) and
//! waits for its end.
//!
//! A child's run id follows from the parent's id, the step, the item and the flow
//! ([`ParentRef::child_run_id`]), so the step knows its child before it exists, starting
//! it again starts nothing new, and only that child's end is taken. Every child a step asks
//! for takes a round of its own, one whose start was refused too (the refusal may have
//! come after the grid made the child), so no id is asked for twice. (A refusal recorded
//! before refusals kept their round gave it back: replaying it, the step's next child takes
//! that round again, as it did then.) The child's end comes
//! back as [`Event::ChildEnded`](crate::Event::ChildEnded): its output is the step's
//! output; any other end fails the step with the child's error, which a catch may take.
//! With `items` the step is a map whose items are child runs ([`super::map`]): each
//! child's end is its item's result. With `repeat` it is a loop: each child that succeeds
//! while `until` is false is followed by the next iteration's child, one round later (so
//! its id is new), until `until` holds or `max_iterations` ran. A parent that ends while
//! children go asks for them to be cancelled, and so does a map that fails.

use std::sync::Arc;

use flowgrid_model::{Expr, FlowLoop, Millis, ParentRef, PlanStep, PlanStepKind, RunId, StepIndex, SubflowSpec};
use serde_json::Value;

use super::resolve::Resolution;
use super::scope::Locals;
use super::state::{Item, StepState, Work};
use super::{Context, Run};
use crate::{Applied, ChildStart, Effect, RunStatus, StepStatus, TaskError, TimerKey};

/// How a child run ended, as its end came back.
pub(super) struct ChildEnd<'a> {
    pub child: &'a RunId,
    pub status: RunStatus,
    pub output: Option<&'a Value>,
    pub error: Option<&'a TaskError>,
    /// The grid refused to start the child: it ran nothing (though a start refused after
    /// its shard applied it may have made it, so its round is not used again).
    pub refused: bool,
    /// The refusal keeps its round (every refusal recorded since refusals do); without it,
    /// one recorded before gave its round back, for the step's next child to take again.
    pub keeps_round: bool,
}

impl Run {
    /// Starts subflow step `index`: fans out over its items, or evaluates the one child's
    /// input and asks for the child.
    pub(super) fn start_subflow(&mut self, index: StepIndex, spec: &SubflowSpec, context: &mut Context<'_>) {
        if let Some(items) = &spec.items {
            self.start_map(index, &items.items, items.max_concurrency, context);
        } else {
            let input = match spec.repeat {
                Some(_) => self.iteration_input(index, spec.input.as_ref(), 0, None, context),
                None => self.step_input(index, spec.input.as_ref(), context),
            };
            let Some(input) = input else { return };
            self.start_child(index, input, 0, context);
        }
        let step = self.plan.step(index);
        if let (false, Some(deadline_ms)) =
            (self.status.is_terminal(), subflow_deadline(&self.steps[usize::from(index)], step))
        {
            self.arm_timer(TimerKey::SubflowTimeout { step: step.id.clone() }, deadline_ms, context);
        }
    }

    /// Starts the one child of subflow step `index` (of loop iteration `iteration`) with
    /// `input`. Its round is the children this step asked for before (after a redrive, or
    /// in earlier iterations; refused ones included), which its id follows from.
    fn start_child(&mut self, index: StepIndex, input: Arc<Value>, iteration: u32, context: &mut Context<'_>) {
        let state = self.state(index);
        let round = state.attempts;
        state.work = Work::Child { input: Arc::clone(&input), iteration };
        state.attempts += 1;
        state.child_refused = false;
        self.ask_for_child(index, None, input, round, context);
    }

    /// The input of loop iteration `iteration` of step `index`: its `input` expression
    /// with `iteration` and `previous` (the iteration before's output, `()` in the
    /// first) in scope; without one, the run's input first and then the iteration
    /// before's output. `None` when the expression failed, which failed the step and the run.
    fn iteration_input(
        &mut self,
        index: StepIndex,
        expr: Option<&Expr>,
        iteration: u32,
        previous: Option<&Value>,
        context: &mut Context<'_>,
    ) -> Option<Arc<Value>> {
        match (expr, previous) {
            (None, None) => Some(Arc::clone(&self.input)),
            (None, Some(previous)) => Some(Arc::new(previous.clone())),
            (Some(expr), previous) => {
                let previous = Some(previous.unwrap_or(&Value::Null));
                let locals = Locals { iteration: Some(iteration), previous, ..Locals::default() };
                self.evaluate_input(index, expr, locals, context)
            }
        }
    }

    /// Loop iteration `iteration` of step `index` succeeded with `output`: the step
    /// succeeds with it when `until` holds; otherwise the next iteration's child starts,
    /// or, after the last one, the step fails with `iterations_exhausted`.
    fn iteration_succeeded(
        &mut self,
        index: StepIndex,
        spec: &SubflowSpec,
        repeat: &FlowLoop,
        iteration: u32,
        output: Value,
        context: &mut Context<'_>,
    ) {
        self.state(index).work = Work::Idle;
        let locals = Locals { result: Some(&output), iteration: Some(iteration), ..Locals::default() };
        match self.evaluate_bool(context.evaluator, &repeat.until, locals) {
            Err(error) => self.expression_failed(index, "repeat.until", &error, context),
            Ok(true) => self.child_succeeded(index, output, context),
            Ok(false) if iteration.saturating_add(1) >= repeat.max_iterations => {
                let error = TaskError {
                    code: ITERATIONS_EXHAUSTED.to_owned(),
                    message: format!(
                        "the loop of step `{}` ran {} iterations of flow `{}` (its `max_iterations`) and `until` was \
                         still false after the last",
                        self.plan.step(index).id,
                        repeat.max_iterations,
                        spec.flow
                    ),
                    retryable: false,
                };
                self.step_failed(index, error, context);
            }
            Ok(false) => {
                let next = iteration + 1;
                let Some(input) = self.iteration_input(index, spec.input.as_ref(), next, Some(&output), context) else {
                    return;
                };
                self.start_child(index, input, next, context);
            }
        }
    }

    /// The one child of step `index` succeeded with `output`, and so does the step.
    fn child_succeeded(&mut self, index: StepIndex, output: Value, context: &mut Context<'_>) {
        let state = self.state(index);
        state.work = Work::Idle;
        state.status = StepStatus::Succeeded;
        state.output = Some(output);
        self.resolve_step(index, Resolution::Succeeded, context);
    }

    /// Asks the driver to start the child of step `index` (item `item`, round `round`)
    /// with `input`.
    pub(super) fn ask_for_child(
        &self,
        index: StepIndex,
        item: Option<u32>,
        input: Arc<Value>,
        round: u32,
        context: &mut Context<'_>,
    ) {
        let start = self.child_start(index, item, input, round).expect("only subflow steps have children");
        context.effects.push(Effect::StartChild(start));
    }

    /// The start of every child run a subflow step waits for: the driver starts them
    /// again after reloading a shard (a child that exists already is not started twice).
    pub fn open_child_starts(&self) -> Vec<ChildStart> {
        self.waiting_children()
            .filter_map(|(index, item, input, round)| self.child_start(index, item, input, round))
            .collect()
    }

    /// Every child a subflow step waits for: its step, item, input and round.
    fn waiting_children(&self) -> impl Iterator<Item = (StepIndex, Option<u32>, Arc<Value>, u32)> + '_ {
        let subflows = self.plan.steps.iter().zip(&self.steps).enumerate().filter_map(|(position, (step, state))| {
            matches!(step.kind, PlanStepKind::Subflow(_)).then_some((position as StepIndex, state))
        });
        subflows.flat_map(|(index, state)| {
            let single = match &state.work {
                Work::Child { input, .. } => Some((index, None, Arc::clone(input), single_round(state))),
                _ => None,
            };
            let items = match &state.work {
                Work::Map(map) => map.items.as_slice(),
                _ => &[],
            };
            let active = items.iter().enumerate().filter_map(move |(item, entry)| match entry {
                Item::Active(slot) => Some((index, Some(item as u32), Arc::clone(&slot.input), slot.first)),
                _ => None,
            });
            single.into_iter().chain(active)
        })
    }

    fn child_start(&self, index: StepIndex, item: Option<u32>, input: Arc<Value>, round: u32) -> Option<ChildStart> {
        let step = self.plan.step(index);
        let PlanStepKind::Subflow(spec) = &step.kind else { return None };
        Some(ChildStart {
            child: ParentRef::child_run_id(&spec.flow, &self.run_id, &step.id, item, round),
            parent: self.run_id.clone(),
            step: step.id.clone(),
            item,
            round,
            flow: spec.flow.clone(),
            version: spec.version,
            input,
            labels: self.labels.as_deref().cloned().unwrap_or_default(),
        })
    }

    /// The latest child run of a subflow step with one child, once it was asked for and
    /// unless its start was refused (for the view, whose `attempts` leaves the refused
    /// children out).
    pub(super) fn started_child(&self, index: StepIndex, state: &StepState) -> Option<RunId> {
        let step = self.plan.step(index);
        let PlanStepKind::Subflow(SubflowSpec { flow, items: None, .. }) = &step.kind else { return None };
        let started = state.attempts > 0 && !state.child_refused;
        started.then(|| ParentRef::child_run_id(flow, &self.run_id, &step.id, None, single_round(state)))
    }

    /// A child run of step `step` (item `item`) ended: the step, or its item, succeeds with
    /// the child's output or fails with its error. An end from a child the step does not
    /// wait for changes nothing.
    pub(super) fn on_child_ended(
        &mut self,
        step: &str,
        item: Option<u32>,
        ended: ChildEnd<'_>,
        context: &mut Context<'_>,
    ) -> Applied {
        let Some(index) = self.plan.step_index(step) else { return Applied::Ignored("no step of that id") };
        let plan = Arc::clone(&self.plan);
        let PlanStepKind::Subflow(spec) = &plan.step(index).kind else {
            return Applied::Ignored("not a subflow step");
        };
        let deadline_ms = subflow_deadline(&self.steps[usize::from(index)], plan.step(index));
        let state = &self.steps[usize::from(index)];
        let (round, iteration) = match (&state.work, item) {
            (Work::Child { iteration, .. }, None) => (single_round(state), *iteration),
            (Work::Map(map), Some(item)) => match map.items.get(item as usize) {
                Some(Item::Active(slot)) => (slot.first, 0),
                _ => return Applied::Ignored("the subflow step does not wait for that child"),
            },
            _ => return Applied::Ignored("the subflow step does not wait for that child"),
        };
        if *ended.child != ParentRef::child_run_id(&spec.flow, &self.run_id, step, item, round) {
            return Applied::Ignored("not the child of this step");
        }
        // A child that succeeded with an error succeeded with an output too large to pass on.
        let error =
            (ended.status != RunStatus::Succeeded || ended.error.is_some()).then(|| child_error(&spec.flow, &ended));
        if ended.refused {
            let state = self.state(index);
            if ended.keeps_round {
                // Its round stays taken: the next child of the step gets a new one.
                state.refused_children += 1;
            } else {
                // Recorded when a refusal gave its round back: the step's next child took
                // it again, and its end in this history names that child.
                state.attempts = state.attempts.saturating_sub(1);
            }
            state.child_refused = item.is_none();
        }
        let output = ended.output.cloned().unwrap_or(Value::Null);
        match (item, error) {
            (Some(item), None) => self.item_succeeded(index, item, output, context),
            (Some(item), Some(error)) => self.item_failed(index, item, error, context),
            (None, None) => match &spec.repeat {
                Some(repeat) => self.iteration_succeeded(index, spec, repeat, iteration, output, context),
                None => self.child_succeeded(index, output, context),
            },
            (None, Some(error)) => {
                self.state(index).work = Work::Idle;
                self.step_failed(index, error, context);
            }
        }
        let resolved = subflow_deadline(&self.steps[usize::from(index)], plan.step(index)).is_none();
        if let (true, Some(due_ms)) = (resolved, deadline_ms) {
            // Before the run's end, if this end ended it too: a finished run's last effect
            // is its `RunFinished`.
            let timer = TimerKey::SubflowTimeout { step: step.to_owned() };
            let cancel = Effect::CancelTimer { run_id: self.run_id.clone(), timer, due_ms };
            match context.effects.iter().position(|effect| matches!(effect, Effect::RunFinished { .. })) {
                Some(position) => context.effects.insert(position, cancel),
                None => context.effects.push(cancel),
            }
        }
        Applied::Accepted
    }

    /// The timeout of subflow step `step` fired: its children still going are cancelled
    /// and it fails with code `timeout` (a catch may take it).
    pub(super) fn on_subflow_timeout(&mut self, step: &str, context: &mut Context<'_>) -> Applied {
        let Some(index) = self.plan.step_index(step) else { return Applied::Ignored("timer not armed") };
        let plan = Arc::clone(&self.plan);
        let (PlanStepKind::Subflow(spec), Some(_)) =
            (&plan.step(index).kind, subflow_deadline(&self.steps[usize::from(index)], plan.step(index)))
        else {
            return Applied::Ignored("timer not armed");
        };
        let timeout_ms = spec.timeout_ms.unwrap_or_default();
        self.cancel_step_children(
            index,
            &format!("step `{step}` of its parent run {} timed out", self.run_id),
            context,
        );
        let error = TaskError {
            code: "timeout".to_owned(),
            message: format!(
                "the child runs of step `{step}` (flow `{}`) did not end within {timeout_ms} ms",
                spec.flow
            ),
            retryable: false,
        };
        self.step_failed(index, error, context);
        Applied::Accepted
    }

    /// Asks for every child of step `index` still going to be cancelled: its map failed,
    /// or it timed out.
    pub(super) fn cancel_step_children(&self, index: StepIndex, why: &str, context: &mut Context<'_>) {
        self.cancel_waiting_children(Some(index), || why.to_owned(), context);
    }

    /// The run ends with `status`: every child run still going is to be cancelled.
    pub(super) fn cancel_children(&self, status: RunStatus, context: &mut Context<'_>) {
        let why = || format!("its parent run {} {}", self.run_id, status.as_str());
        self.cancel_waiting_children(None, why, context);
    }

    /// Asks for the children still going, of step `only` or of every step, to be
    /// cancelled; the reason is built only when there is one (a run without children
    /// ends without it).
    fn cancel_waiting_children(&self, only: Option<StepIndex>, why: impl Fn() -> String, context: &mut Context<'_>) {
        let waiting = self.waiting_children().filter(|(index, ..)| only.is_none_or(|only| only == *index));
        for (index, item, _, round) in waiting {
            let step = self.plan.step(index);
            let PlanStepKind::Subflow(spec) = &step.kind else { continue };
            let child = ParentRef::child_run_id(&spec.flow, &self.run_id, &step.id, item, round);
            context.effects.push(Effect::CancelChild { child, reason: why() });
        }
    }
}

/// The error code of a loop whose `until` was still false after its last iteration.
pub const ITERATIONS_EXHAUSTED: &str = "iterations_exhausted";

/// The error a child that did not succeed fails its step (or item) with: the child's own
/// code, and a message naming the child (one that was refused, by its flow only).
fn child_error(flow: &str, ended: &ChildEnd<'_>) -> TaskError {
    let (code, message) = match ended.error {
        Some(error) => (error.code.clone(), error.message.as_str()),
        None => (ended.status.as_str().to_owned(), "no error given"),
    };
    // A child the grid refused to start never existed: its id would name nothing.
    let message = if ended.refused {
        format!("a child run of flow `{flow}` was refused: {message}")
    } else if ended.status == RunStatus::Succeeded {
        format!("child run {} of flow `{flow}` succeeded, but {message}", ended.child)
    } else {
        format!("child run {} of flow `{flow}` {}: {message}", ended.child, ended.status.as_str())
    };
    TaskError { code, message, retryable: false }
}

/// The round of the latest child of a subflow step with one child: one child per round,
/// so the children it asked for before (refused ones included, unless their refusal gave
/// its round back).
fn single_round(state: &StepState) -> u32 {
    state.attempts.saturating_sub(1)
}

/// When subflow step `step` times out, while it waits for children and has a timeout.
pub(super) fn subflow_deadline(state: &StepState, step: &PlanStep) -> Option<Millis> {
    let PlanStepKind::Subflow(SubflowSpec { timeout_ms: Some(timeout_ms), .. }) = &step.kind else { return None };
    let waiting = state.status == StepStatus::Running && state.has_work_in_flight();
    waiting.then_some(state.started_ms?.saturating_add(*timeout_ms))
}
