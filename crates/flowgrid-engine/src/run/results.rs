//! Attempts: dispatching them, and applying results and timers to them.
//!
//! A result or timer is applied only to the attempt that is open: same run, step, item and
//! attempt number, with the step still running. Anything else is `Applied::Ignored` and
//! changes nothing, which makes duplicated and late deliveries harmless.

use std::sync::Arc;

use flowgrid_model::limits::{json_bytes, PROGRESS_BYTES_PER_ATTEMPT_MAX, PROGRESS_REPORTS_MAX};
use flowgrid_model::plan::TaskSpec;
use flowgrid_model::{AttemptId, ExprError, Millis, StepIndex};
use serde_json::Value;

use super::retry::{backoff_ms, should_retry};
use super::scope::Locals;
use super::state::{Item, Phase, Slot, Work};
use super::steps::task_spec;
use super::{Context, Run};
use crate::{Applied, Effect, RunStatus, StepStatus, TaskError, TimerKey};

/// The phase an event expects the attempt's slot to be in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A result or timeout: the named attempt is out.
    Open,
    /// A retry timer: the attempt before the named one failed and waits for its backoff.
    RetryDue,
}

impl Run {
    pub(super) fn on_task_succeeded(
        &mut self,
        attempt: &AttemptId,
        output: &Value,
        cached: bool,
        context: &mut Context<'_>,
    ) -> Applied {
        let index = match self.close_open_attempt(attempt, context) {
            Ok(index) => index,
            Err(reason) => return Applied::Ignored(reason),
        };
        if cached {
            self.state(index).cached += 1;
        } else {
            self.store_in_cache(index, attempt.item, output, context);
        }
        match attempt.item {
            None => self.task_succeeded(index, output.clone(), context),
            Some(item) => self.item_succeeded(index, item, output.clone(), context),
        }
        Applied::Accepted
    }

    /// The step of `attempt` if it is the open attempt, which it closes (disarming its
    /// timeout); else why the result must be ignored.
    fn close_open_attempt(
        &mut self,
        attempt: &AttemptId,
        context: &mut Context<'_>,
    ) -> Result<StepIndex, &'static str> {
        let index = self.find_slot(attempt, Expect::Open)?;
        self.cancel_slot_timer(index, attempt.item, self.slot(index, attempt.item), context);
        self.slot_mut(index, attempt.item).phase = Phase::New;
        Ok(index)
    }

    pub(super) fn on_task_failed(
        &mut self,
        attempt: &AttemptId,
        error: &TaskError,
        context: &mut Context<'_>,
    ) -> Applied {
        let index = match self.close_open_attempt(attempt, context) {
            Ok(index) => index,
            Err(reason) => return Applied::Ignored(reason),
        };
        self.attempt_failed(index, attempt, error.clone(), context);
        Applied::Accepted
    }

    /// A worker says how far the open attempt `attempt` got; kept for the step's view and
    /// its next attempts. Ignored unless the attempt is open, and past
    /// [`PROGRESS_REPORTS_MAX`] reports of one attempt, or [`PROGRESS_BYTES_PER_ATTEMPT_MAX`]
    /// bytes of them.
    pub(super) fn on_task_progress(&mut self, attempt: &AttemptId, details: &Value) -> Applied {
        let index = match self.find_slot(attempt, Expect::Open) {
            Ok(index) => index,
            Err(reason) => return Applied::Ignored(reason),
        };
        let slot = self.slot_mut(index, attempt.item);
        if let Phase::Open { reports, reported_kib, .. } = &mut slot.phase {
            if *reports >= PROGRESS_REPORTS_MAX {
                return Applied::Ignored("too many progress reports for one attempt");
            }
            let kib = u32::try_from(json_bytes(details).div_ceil(1024)).unwrap_or(u32::MAX);
            let total_kib = reported_kib.saturating_add(kib);
            if u64::from(total_kib) * 1024 > PROGRESS_BYTES_PER_ATTEMPT_MAX {
                return Applied::Ignored("progress reports of one attempt over their size budget");
            }
            *reports += 1;
            *reported_kib = total_kib;
        }
        slot.progress = Some(Arc::new(details.clone()));
        Applied::Accepted
    }

    /// A timer fired; the driver has dropped it. Applied only if the state still arms it.
    pub(super) fn on_timer(&mut self, timer: &TimerKey, context: &mut Context<'_>) -> Applied {
        match timer {
            TimerKey::RunTimeout => {
                let Some(timeout_ms) = self.plan.timeout_ms else {
                    return Applied::Ignored("timer not armed");
                };
                let error = TaskError {
                    code: "run_timeout".to_owned(),
                    message: format!("the run did not end within its timeout of {timeout_ms} ms"),
                    retryable: false,
                };
                self.finish(RunStatus::TimedOut, None, Some(error), context);
            }
            TimerKey::AttemptTimeout { attempt } => {
                let index = match self.find_slot(attempt, Expect::Open) {
                    Ok(index) => index,
                    Err(_) => return Applied::Ignored("timer not armed"),
                };
                self.slot_mut(index, attempt.item).phase = Phase::New;
                let plan = Arc::clone(&self.plan);
                let spec = task_spec(&plan.step(index).kind).expect("only task and map steps have attempts");
                if let (Some(step_deadline_ms), Some(total_ms)) =
                    (self.step_deadline(index, spec), spec.total_timeout_ms)
                {
                    if context.now >= step_deadline_ms {
                        // Cut short by the step's budget, not by its own timeout: no retry fits.
                        let error = TaskError {
                            code: "timeout".to_owned(),
                            message: format!(
                                "step `{}` did not finish within its total_timeout_ms of {total_ms} ms ({}; the last \
                                 one was cut short by it)",
                                attempt.step,
                                attempts(self.slot(index, attempt.item).tries())
                            ),
                            retryable: false,
                        };
                        self.attempt_failed_for_good(index, attempt.item, error, context);
                        return Applied::Accepted;
                    }
                }
                let error = TaskError {
                    code: "timeout".to_owned(),
                    message: format!(
                        "attempt {} of step `{}` did not finish by its deadline",
                        attempt.attempt, attempt.step
                    ),
                    retryable: true,
                };
                self.attempt_failed(index, attempt, error, context);
            }
            TimerKey::SignalTimeout { step } => return self.on_signal_timeout(step, context),
            TimerKey::StartDue => return self.start_due(context),
            TimerKey::SubflowTimeout { step } => return self.on_subflow_timeout(step, context),
            TimerKey::WaitOver { step } => {
                let Some(index) = self.plan.step_index(step) else {
                    return Applied::Ignored("timer not armed");
                };
                let state = &self.steps[usize::from(index)];
                let Work::Wait { waited_ms, .. } = state.work else {
                    return Applied::Ignored("timer not armed");
                };
                self.wait_over(index, waited_ms, context);
            }
            TimerKey::RetryDue { attempt } => {
                let index = match self.find_slot(attempt, Expect::RetryDue) {
                    Ok(index) => index,
                    Err(_) => return Applied::Ignored("timer not armed"),
                };
                // Due before the step's budget ran out but fired after it (a shard reloaded
                // late): the retry would only time out, after its worker began on it.
                if let Some(error) = self.retry_past_budget(index, attempt.item, context.now) {
                    self.attempt_failed_for_good(index, attempt.item, error, context);
                    return Applied::Accepted;
                }
                self.dispatch(index, attempt.item, context);
            }
        }
        Applied::Accepted
    }

    /// Dispatches the next attempt of the task step `index` or of its item `item`.
    pub(super) fn dispatch(&mut self, index: StepIndex, item: Option<u32>, context: &mut Context<'_>) {
        let spec = task_spec(&self.plan.step(index).kind).expect("only task and map steps dispatch");
        let deadline_ms = context.now.saturating_add(spec.timeout_ms);
        // No attempt outlives the step's total timeout.
        let deadline_ms = match self.step_deadline(index, spec) {
            Some(step_deadline_ms) => deadline_ms.min(step_deadline_ms.max(context.now)),
            None => deadline_ms,
        };
        let state = self.state(index);
        state.attempts += 1;
        state.status = StepStatus::Running;
        let slot = self.slot_mut(index, item);
        assert!(!matches!(slot.phase, Phase::Open { .. }), "one attempt of a slot is open at a time");
        slot.attempt += 1;
        slot.phase = Phase::Open { opened_ms: context.now, deadline_ms, reports: 0, reported_kib: 0 };
        let dispatch = self.task_dispatch(index, item, self.slot(index, item), context.now, deadline_ms);
        let timer = TimerKey::AttemptTimeout { attempt: dispatch.attempt.clone() };
        context.effects.push(Effect::Dispatch(dispatch));
        self.arm_timer(timer, deadline_ms, context);
    }

    /// The open attempt `attempt` failed: retry it after a backoff if the policy allows
    /// and the step's total timeout leaves time for it, else the task step (or map item)
    /// fails for good.
    fn attempt_failed(
        &mut self,
        index: StepIndex,
        attempt: &AttemptId,
        mut error: TaskError,
        context: &mut Context<'_>,
    ) {
        let plan = Arc::clone(&self.plan);
        let spec = task_spec(&plan.step(index).kind).expect("only task and map steps have attempts");
        let policy = &spec.retry;
        let tries = self.slot(index, attempt.item).tries();
        if should_retry(policy, &error, tries) {
            let due_ms = context.now.saturating_add(backoff_ms(policy, attempt, tries));
            if let (Some(step_deadline_ms), Some(total_ms)) = (self.step_deadline(index, spec), spec.total_timeout_ms) {
                if due_ms >= step_deadline_ms {
                    error = TaskError {
                        code: "timeout".to_owned(),
                        message: format!(
                            "step `{}` did not finish within its total_timeout_ms of {total_ms} ms ({}; the last one \
                             failed with `{}`: {})",
                            attempt.step,
                            attempts(tries),
                            error.code,
                            error.message
                        ),
                        retryable: false,
                    };
                    return self.attempt_failed_for_good(index, attempt.item, error, context);
                }
            }
            self.slot_mut(index, attempt.item).phase = Phase::Retrying { due_ms };
            if attempt.item.is_none() {
                self.state(index).status = StepStatus::Retrying;
            }
            let next = AttemptId { attempt: attempt.attempt + 1, ..attempt.clone() };
            self.arm_timer(TimerKey::RetryDue { attempt: next }, due_ms, context);
            return;
        }
        self.attempt_failed_for_good(index, attempt.item, error, context);
    }

    /// The task step `index` (or its map item `item`) fails with `error`: no attempt is left.
    fn attempt_failed_for_good(
        &mut self,
        index: StepIndex,
        item: Option<u32>,
        error: TaskError,
        context: &mut Context<'_>,
    ) {
        match item {
            None => {
                self.state(index).work = Work::Idle;
                self.step_failed(index, error, context);
            }
            Some(item) => self.item_failed(index, item, error, context),
        }
    }

    /// When task or map step `index` (of spec `spec`) must be done by: `total_timeout_ms`
    /// after it started, if it has one.
    fn step_deadline(&self, index: StepIndex, spec: &TaskSpec) -> Option<Millis> {
        let total_ms = spec.total_timeout_ms?;
        Some(self.steps[usize::from(index)].started_ms?.saturating_add(total_ms))
    }

    /// The failure of the task step `index` (or its map item `item`), waiting for a retry,
    /// when its step's total timeout is spent by `now`: a retry is not made at or after it.
    fn retry_past_budget(&self, index: StepIndex, item: Option<u32>, now: Millis) -> Option<TaskError> {
        let spec = task_spec(&self.plan.step(index).kind).expect("only task and map steps have attempts");
        let deadline_ms = self.step_deadline(index, spec)?;
        (deadline_ms <= now).then(|| TaskError {
            code: "timeout".to_owned(),
            message: format!(
                "step `{}` did not finish within its total_timeout_ms of {} ms ({}; the retry after the last one \
                 could not start before it ran out)",
                self.plan.step(index).id,
                spec.total_timeout_ms.unwrap_or_default(),
                attempts(self.slot(index, item).tries())
            ),
            retryable: false,
        })
    }

    /// The failure of map item `item` of step `index` when its step's total timeout is
    /// spent by `now`: the item is not sent to a worker only to time out at once.
    pub(super) fn budget_spent(&self, index: StepIndex, spec: &TaskSpec, item: u32, now: Millis) -> Option<TaskError> {
        let deadline_ms = self.step_deadline(index, spec)?;
        (deadline_ms <= now).then(|| TaskError {
            code: "timeout".to_owned(),
            message: format!(
                "step `{}` did not finish within its total_timeout_ms of {} ms: item {item} was not started",
                self.plan.step(index).id,
                spec.total_timeout_ms.unwrap_or_default()
            ),
            retryable: false,
        })
    }

    fn task_succeeded(&mut self, index: StepIndex, result: Value, context: &mut Context<'_>) {
        self.state(index).work = Work::Idle;
        self.succeed_with_result(index, result, context);
    }

    /// Ends a task or map step that produced `result`: applies the step's `output` mapping
    /// (over `result`) and resolves the step as succeeded, or fails the run if the mapping
    /// fails.
    pub(super) fn succeed_with_result(&mut self, index: StepIndex, result: Value, context: &mut Context<'_>) {
        match self.mapped_output(index, result, context) {
            Ok(output) => self.succeed_with_output(index, output, context),
            Err(failed) => self.expression_failed(index, "output", &failed.1, context),
        }
    }

    /// The output of step `index` for its `result`: the step's `output` mapping over it, or
    /// the result itself (a subflow step's merged items are its output as they are). When
    /// the mapping fails, the result comes back with the error.
    pub(super) fn mapped_output(
        &self,
        index: StepIndex,
        result: Value,
        context: &Context<'_>,
    ) -> Result<Value, Box<(Value, ExprError)>> {
        match task_spec(&self.plan.step(index).kind).and_then(|spec| spec.output.as_ref()) {
            Some(expr) => {
                let locals = Locals { result: Some(&result), ..Locals::default() };
                match self.evaluate(context.evaluator, expr, locals) {
                    Ok(output) => Ok(output),
                    Err(error) => Err(Box::new((result, error))),
                }
            }
            None => Ok(result),
        }
    }

    /// Resolves step `index` as succeeded with `output`.
    pub(super) fn succeed_with_output(&mut self, index: StepIndex, output: Value, context: &mut Context<'_>) {
        let state = self.state(index);
        state.status = StepStatus::Succeeded;
        state.output = Some(output);
        self.resolve_step(index, super::resolve::Resolution::Succeeded, context);
    }

    /// The step of `attempt` if its slot is in the phase `expect` for exactly this attempt.
    fn find_slot(&self, attempt: &AttemptId, expect: Expect) -> Result<StepIndex, &'static str> {
        if attempt.run_id != self.run_id {
            return Err("attempt of another run");
        }
        let index = self.plan.step_index(&attempt.step).ok_or("no such step")?;
        let state = &self.steps[usize::from(index)];
        if !matches!(state.status, StepStatus::Running | StepStatus::Retrying) {
            return Err("step not running");
        }
        let slot = match (&state.work, attempt.item) {
            (Work::Task(slot), None) => slot,
            (Work::Map(map), Some(item)) => match map.items.get(item as usize) {
                Some(Item::Active(slot)) => slot,
                _ => return Err("item not active"),
            },
            _ => return Err("attempt does not fit the step"),
        };
        match (expect, slot.phase) {
            (Expect::Open, Phase::Open { .. }) if slot.attempt == attempt.attempt => Ok(index),
            (Expect::RetryDue, Phase::Retrying { .. }) if slot.attempt + 1 == attempt.attempt => Ok(index),
            _ => Err("attempt not open"),
        }
    }

    pub(super) fn slot(&self, index: StepIndex, item: Option<u32>) -> &Slot {
        match (&self.steps[usize::from(index)].work, item) {
            (Work::Task(slot), None) => slot,
            (Work::Map(map), Some(item)) => match &map.items[item as usize] {
                Item::Active(slot) => slot,
                _ => panic!("item {item} of step {index} is not active"),
            },
            _ => panic!("step {index} has no slot for item {item:?}"),
        }
    }

    fn slot_mut(&mut self, index: StepIndex, item: Option<u32>) -> &mut Slot {
        match (&mut self.steps[usize::from(index)].work, item) {
            (Work::Task(slot), None) => slot,
            (Work::Map(map), Some(item)) => match &mut map.items[item as usize] {
                Item::Active(slot) => slot,
                _ => panic!("item {item} of step {index} is not active"),
            },
            _ => panic!("step {index} has no slot for item {item:?}"),
        }
    }
}

/// "1 attempt", "3 attempts".
fn attempts(count: u32) -> String {
    if count == 1 {
        "1 attempt".to_owned()
    } else {
        format!("{count} attempts")
    }
}
