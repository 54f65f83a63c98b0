//! Starting a ready step, by kind, and the ways a run ends by a step.
//!
//! Engine-side steps (choice, transform, succeed, fail) complete inside the transition
//! that starts them; task and map steps dispatch attempts and wait for results; a wait
//! step arms a timer and completes when it fires; a signal step waits for a signal, a
//! subflow step for its child run. An expression error anywhere fails the run with
//! `expression_error`: no catch applies, since the flow itself is broken for this input.

use std::sync::Arc;

use flowgrid_model::limits::msgpack_bytes;
use flowgrid_model::plan::TaskSpec;
use flowgrid_model::{Expr, ExprError, Limits, PlanStepKind, StepIndex, WaitFor};
use serde_json::{json, Map, Value};

use super::resolve::Resolution;
use super::scope::{expression_error, Locals};
use super::state::{Slot, Work};
use super::{abandon, abandon_with_run, Context, Run};
use crate::{RunStatus, StepStatus, TaskError, TimerKey};

/// The worker-side settings of a task or map step.
pub(super) fn task_spec(kind: &PlanStepKind) -> Option<&TaskSpec> {
    match kind {
        PlanStepKind::Task(spec) | PlanStepKind::Map { spec, .. } => Some(spec),
        _ => None,
    }
}

impl Run {
    /// Starts step `index`, whose deps have all resolved and activated it.
    pub(super) fn start_step(&mut self, index: StepIndex, context: &mut Context<'_>) {
        let deps = self.plan.step(index).deps.len() as u32;
        let state = self.state(index);
        assert!(state.status == StepStatus::Pending, "a step starts once");
        assert!(state.deps_resolved == deps, "a step starts after all its deps resolved");
        assert!(state.activated, "a step starts only when an edge activated it");
        let plan = Arc::clone(&self.plan);
        if let Some(when) = &plan.step(index).when {
            match self.evaluate_bool(context.evaluator, when, Locals::default()) {
                Ok(true) => {}
                Ok(false) => return self.skip_step(index, context),
                Err(error) => return self.expression_failed(index, "when", &error, context),
            }
        }
        let state = self.state(index);
        state.status = StepStatus::Running;
        state.started_ms = Some(context.now);
        match &plan.step(index).kind {
            PlanStepKind::Task(spec) => self.start_task(index, spec, context),
            PlanStepKind::Map { items, max_concurrency, .. } => self.start_map(index, items, *max_concurrency, context),
            PlanStepKind::Choice { rules, default } => self.take_choice(index, rules, default.is_some(), context),
            PlanStepKind::Transform { output } => self.run_transform(index, output, context),
            PlanStepKind::Succeed { output } => self.succeed_at_step(index, output.as_ref(), context),
            PlanStepKind::Fail { error, message } => self.fail_at_step(index, error, message.as_ref(), context),
            PlanStepKind::Wait(wait_for) => self.start_wait(index, wait_for, context),
            PlanStepKind::Signal { timeout_ms, .. } => self.start_signal(index, *timeout_ms, context),
            PlanStepKind::Subflow(spec) => self.start_subflow(index, spec, context),
        }
    }

    /// A `wait` step arms its timer; a wait of 0 ms is over at once.
    fn start_wait(&mut self, index: StepIndex, wait_for: &WaitFor, context: &mut Context<'_>) {
        let waited_ms = match wait_for {
            WaitFor::Fixed(duration_ms) => *duration_ms,
            WaitFor::Expr(expr) => match self.evaluate_wait_ms(context.evaluator, expr) {
                Ok(duration_ms) => duration_ms,
                Err(error) => return self.expression_failed(index, "duration", &error, context),
            },
            WaitFor::Until(expr) => match self.evaluate_wait_until(context.evaluator, expr, context.now) {
                Ok(duration_ms) => duration_ms,
                Err(error) => return self.expression_failed(index, "until", &error, context),
            },
        };
        if waited_ms == 0 {
            return self.wait_over(index, 0, context);
        }
        let due_ms = context.now.saturating_add(waited_ms);
        self.state(index).work = Work::Wait { due_ms, waited_ms };
        let timer = TimerKey::WaitOver { step: self.plan.step(index).id.clone() };
        self.arm_timer(timer, due_ms, context);
    }

    /// The wait of step `index` is over: it succeeds with `{"waited_ms": n}`.
    pub(super) fn wait_over(&mut self, index: StepIndex, waited_ms: u64, context: &mut Context<'_>) {
        let state = self.state(index);
        state.work = Work::Idle;
        state.status = StepStatus::Succeeded;
        state.output = Some(json!({ "waited_ms": waited_ms }));
        self.resolve_step(index, Resolution::Succeeded, context);
    }

    fn start_task(&mut self, index: StepIndex, spec: &TaskSpec, context: &mut Context<'_>) {
        let Some(input) = self.step_input(index, spec.input.as_ref(), context) else { return };
        // The run's own input was measured when it started; what an expression made was not.
        if let Some(error) = spec.input.as_ref().and_then(|_| oversized_input(&input, context.evaluator.limits())) {
            return self.step_failed(index, error, context);
        }
        let Ok(cache_key) = self.cache_key(index, &input, context) else { return };
        let state = self.state(index);
        state.work = Work::Task(Slot::new(state.attempts, input, cache_key));
        self.dispatch(index, None, context);
    }

    fn take_choice(
        &mut self,
        index: StepIndex,
        rules: &[(Expr, StepIndex)],
        has_default: bool,
        context: &mut Context<'_>,
    ) {
        let mut taken = None;
        for (rule, (condition, _next)) in rules.iter().enumerate() {
            match self.evaluate_bool(context.evaluator, condition, Locals::default()) {
                Ok(true) => {
                    taken = Some(Resolution::Branch(rule as u16));
                    break;
                }
                Ok(false) => {}
                Err(error) => return self.expression_failed(index, &format!("choices[{rule}].when"), &error, context),
            }
        }
        let taken = taken.or(has_default.then_some(Resolution::Default));
        let Some(resolution) = taken else {
            let error = TaskError {
                code: "no_choice_matched".to_owned(),
                message: format!("choice `{}`: no rule matched and it has no default", self.plan.step(index).id),
                retryable: false,
            };
            return self.fail_step_and_run(index, error, context);
        };
        self.state(index).status = StepStatus::Succeeded;
        self.resolve_step(index, resolution, context);
    }

    fn run_transform(&mut self, index: StepIndex, output: &Expr, context: &mut Context<'_>) {
        match self.evaluate(context.evaluator, output, Locals::default()) {
            Ok(value) => {
                let state = self.state(index);
                state.status = StepStatus::Succeeded;
                state.output = Some(value);
                self.resolve_step(index, Resolution::Succeeded, context);
            }
            Err(error) => self.expression_failed(index, "output", &error, context),
        }
    }

    /// A `succeed` step: the run ends `Succeeded` with the step's output expression, else
    /// the flow's output, else the outputs of the sinks that succeeded and of the steps it
    /// follows. The step keeps that output as its own, as any step that succeeded does: the
    /// run's view shows it, `steps.<id>.output` reads it, and a run redriven from another
    /// step that then ends by itself has it among its sinks' outputs.
    fn succeed_at_step(&mut self, index: StepIndex, output: Option<&Expr>, context: &mut Context<'_>) {
        let value = match output {
            Some(expr) => match self.evaluate(context.evaluator, expr, Locals::default()) {
                Ok(value) => value,
                Err(error) => return self.expression_failed(index, "output", &error, context),
            },
            // The step is a sink itself, without an output: the sinks that succeeded and the
            // steps it follows.
            None if self.plan.output.is_none() => {
                let mut steps = self.plan.sinks.clone();
                steps.extend(self.plan.step(index).deps.iter().filter(|dep| !self.plan.sinks.contains(dep)));
                self.outputs_of(&steps)
            }
            None => match self.run_output(context) {
                Ok(value) => value,
                Err(error) => return self.fail_step_and_run(index, error, context),
            },
        };
        let now = context.now;
        let state = self.state(index);
        state.status = StepStatus::Succeeded;
        state.ended_ms = Some(now);
        state.output = Some(value.clone());
        // The run ends here, so its edges lead nowhere now; a redrive of a step after it
        // counts it as resolved.
        state.resolved_as = Some(super::resolve::Resolution::Succeeded);
        self.unresolved -= 1;
        self.finish(RunStatus::Succeeded, Some(value), None, context);
    }

    /// A `fail` step: the run ends `Failed` with the step's error code and message.
    fn fail_at_step(&mut self, index: StepIndex, code: &str, message: Option<&Expr>, context: &mut Context<'_>) {
        let message = match message {
            Some(expr) => match self.evaluate(context.evaluator, expr, Locals::default()) {
                Ok(Value::String(text)) => text,
                Ok(other) => other.to_string(),
                Err(error) => return self.expression_failed(index, "message", &error, context),
            },
            None => format!("the flow failed at step `{}`", self.plan.step(index).id),
        };
        let error = TaskError { code: code.to_owned(), message, retryable: false };
        self.fail_step_and_run(index, error, context);
    }

    /// A task, map, signal or subflow step failed for good: a matching catch takes over, else the
    /// run fails with the step's error. A catch whose step a redrive of a succeeded run left
    /// cancelled (the step went again only for a later step) does not: its failure is the
    /// run's, not dropped on a step that will not run.
    pub(super) fn step_failed(&mut self, index: StepIndex, error: TaskError, context: &mut Context<'_>) {
        let plan = Arc::clone(&self.plan);
        let caught = plan.step(index).kind.catch_for(&error.code).filter(|(_, rule)| !self.left_cancelled(rule.next));
        let Some((catch, _rule)) = caught else {
            // The step's own failure cancelled what it had out (a map's items, a subflow's
            // children), so the run's end has nothing more of it to cancel.
            let state = self.state(index);
            state.work = abandon_with_run(std::mem::replace(&mut state.work, Work::Idle));
            return self.fail_step_and_run(index, error, context);
        };
        let state = self.state(index);
        state.status = StepStatus::Failed;
        state.error = Some(Box::new(error));
        state.work = abandon(std::mem::replace(&mut state.work, Work::Idle));
        self.resolve_step(index, Resolution::Caught(catch), context);
    }

    /// The input of step `index`: its `input` expression evaluated over the run, or the
    /// run's input without one. `None` when the expression failed, which failed the step
    /// and the run.
    pub(super) fn step_input(
        &mut self,
        index: StepIndex,
        expr: Option<&Expr>,
        context: &mut Context<'_>,
    ) -> Option<Arc<Value>> {
        let Some(expr) = expr else { return Some(Arc::clone(&self.input)) };
        self.evaluate_input(index, expr, Locals::default(), context)
    }

    /// Evaluates step `index`'s input expression with `locals` in scope; a failure fails
    /// the step and the run.
    pub(super) fn evaluate_input(
        &mut self,
        index: StepIndex,
        expr: &Expr,
        locals: Locals<'_>,
        context: &mut Context<'_>,
    ) -> Option<Arc<Value>> {
        match self.evaluate(context.evaluator, expr, locals) {
            Ok(input) => Some(Arc::new(input)),
            Err(error) => {
                self.expression_failed(index, "input", &error, context);
                None
            }
        }
    }

    /// Fails step `index` and the run because expression `field` of the step failed.
    pub(super) fn expression_failed(
        &mut self,
        index: StepIndex,
        field: &str,
        error: &ExprError,
        context: &mut Context<'_>,
    ) {
        let error = expression_error(&self.plan.step(index).id, field, error);
        self.fail_step_and_run(index, error, context);
    }

    /// Every step resolved and nothing is open: the run succeeds with its output.
    pub(super) fn finish_by_itself(&mut self, context: &mut Context<'_>) {
        assert!(self.unresolved == 0, "a run ends by itself only when every step resolved");
        assert!(self.steps.iter().all(|state| !state.has_work_in_flight()), "no attempt is open at the end");
        match self.run_output(context) {
            Ok(output) => self.finish(RunStatus::Succeeded, Some(output), None, context),
            Err(error) => self.fail_run(error, context),
        }
    }

    /// The flow's output expression over every step, else `{sink id: output}` over the
    /// sinks that succeeded.
    fn run_output(&self, context: &Context<'_>) -> Result<Value, TaskError> {
        if let Some(expr) = &self.plan.output {
            return self.evaluate_over_all_steps(context.evaluator, expr, Locals::default()).map_err(|error| {
                TaskError {
                    code: super::scope::EXPRESSION_ERROR.to_owned(),
                    message: format!("flow output: {error}"),
                    retryable: false,
                }
            });
        }
        Ok(self.outputs_of(&self.plan.sinks))
    }

    /// `{id: output}` of those of `steps` that succeeded.
    fn outputs_of(&self, steps: &[StepIndex]) -> Value {
        let mut outputs = Map::new();
        for &step in steps {
            let state = &self.steps[usize::from(step)];
            if let (StepStatus::Succeeded, Some(output)) = (state.status, &state.output) {
                outputs.insert(self.plan.step(step).id.clone(), output.clone());
            }
        }
        Value::Object(outputs)
    }
}

/// Why a task cannot be given `input`, if it cannot: no message may carry more than a
/// payload, so the step (or map item) fails with `payload_too_large` instead of sending it.
/// The input is measured as MessagePack, the encoding its task message is sent in (and the
/// one the API measures a run's input in): its JSON size differs both ways, a control
/// character taking 6 bytes of JSON and 1 of MessagePack, `0.5` 3 and 9.
pub(super) fn oversized_input(input: &Value, limits: &Limits) -> Option<TaskError> {
    let bytes = msgpack_bytes(input);
    (bytes > limits.payload_bytes_max).then(|| TaskError {
        code: "payload_too_large".to_owned(),
        message: format!(
            "the task's input is {bytes} bytes as MessagePack (as it is sent), over the limit of {}: give the task a \
             reference to large data, or pick less in its `input` expression",
            limits.payload_bytes_max
        ),
        retryable: false,
    })
}
