//! Signal steps: a step that waits for a signal sent to the run from outside.
//!
//! The step takes the first signal that arrives while it waits: the signal's data is its
//! output. A signal before the step starts is refused, unless the step keeps early
//! signals (`keep_early`): then the first one is kept as the step's output while it is
//! pending, and the step succeeds with it as soon as it starts. A signal after the step is
//! over (or once one is kept) changes nothing and says why ([`SignalRefused`]), so a
//! sender can tell a repeated signal from a mistake.

use flowgrid_model::{FlowPlan, PlanStepKind, StepIndex};
use serde_json::Value;

use super::resolve::Resolution;
use super::state::Work;
use super::{Context, Run};
use crate::{Applied, Effect, SignalRefused, StepStatus, TaskError, TimerKey};

/// Why no run of `plan` takes a signal for `step`, whatever its state: the flow has no
/// such step, or it is no `signal` step.
pub fn signal_step_refused(plan: &FlowPlan, step: &str) -> Option<SignalRefused> {
    let Some(index) = plan.step_index(step) else { return Some(SignalRefused::NoSuchStep) };
    let kind = &plan.step(index).kind;
    (!matches!(kind, PlanStepKind::Signal { .. }))
        .then(|| SignalRefused::NotASignalStep { kind: super::kind_name(kind) })
}

impl Run {
    /// Starts signal step `index`: it takes the signal kept for it, else it waits, until
    /// `timeout_ms` from now if it has one.
    pub(super) fn start_signal(&mut self, index: StepIndex, timeout_ms: Option<u64>, context: &mut Context<'_>) {
        if self.steps[usize::from(index)].output.is_some() {
            self.state(index).status = StepStatus::Succeeded;
            return self.resolve_step(index, Resolution::Succeeded, context);
        }
        let deadline_ms = timeout_ms.map(|timeout_ms| context.now.saturating_add(timeout_ms));
        self.state(index).work = Work::Signal { deadline_ms };
        if let Some(deadline_ms) = deadline_ms {
            let timer = TimerKey::SignalTimeout { step: self.plan.step(index).id.clone() };
            self.arm_timer(timer, deadline_ms, context);
        }
    }

    /// Why the run would not take a signal for `step` now; `None` when it would.
    pub fn signal_refused(&self, step: &str) -> Option<SignalRefused> {
        if let Some(refused) = signal_step_refused(&self.plan, step) {
            return Some(refused);
        }
        let index = self.plan.step_index(step).expect("checked: the flow has the step");
        let kind = &self.plan.step(index).kind;
        let keep_early = matches!(kind, PlanStepKind::Signal { keep_early: true, .. });
        let state = &self.steps[usize::from(index)];
        match (&state.work, state.status) {
            _ if self.status.is_terminal() => Some(SignalRefused::Over { status: state.status }),
            (Work::Signal { .. }, _) => None,
            (_, StepStatus::Pending) if !keep_early => Some(SignalRefused::NotStarted),
            (_, StepStatus::Pending) if state.output.is_none() => None,
            (_, status) => Some(SignalRefused::Over { status }),
        }
    }

    /// A signal for `step`: the step succeeds with `data` if it is waiting for one.
    pub(super) fn on_signal(&mut self, step: &str, data: &Value, context: &mut Context<'_>) -> Applied {
        if let Some(refused) = self.signal_refused(step) {
            return Applied::Ignored(match refused {
                SignalRefused::NoSuchStep => "no step of that id",
                SignalRefused::NotASignalStep { .. } => "not a signal step",
                SignalRefused::NotStarted => "the signal step has not started",
                SignalRefused::Over { .. } => "the signal step is over",
            });
        }
        let index = self.plan.step_index(step).expect("signal_refused checked the step");
        if self.steps[usize::from(index)].status == StepStatus::Pending {
            // Kept for the step (`keep_early`): it succeeds with it when it starts.
            self.state(index).output = Some(data.clone());
            return Applied::Accepted;
        }
        if let Work::Signal { deadline_ms: Some(deadline_ms) } = self.steps[usize::from(index)].work {
            let timer = TimerKey::SignalTimeout { step: step.to_owned() };
            context.effects.push(Effect::CancelTimer { run_id: self.run_id.clone(), timer, due_ms: deadline_ms });
        }
        let state = self.state(index);
        state.work = Work::Idle;
        state.status = StepStatus::Succeeded;
        state.output = Some(data.clone());
        self.resolve_step(index, Resolution::Succeeded, context);
        Applied::Accepted
    }

    /// The timeout of signal step `step` fired: it fails with code `timeout` (a catch may
    /// take it) if it is still waiting.
    pub(super) fn on_signal_timeout(&mut self, step: &str, context: &mut Context<'_>) -> Applied {
        let Some(index) = self.plan.step_index(step) else { return Applied::Ignored("timer not armed") };
        let (Work::Signal { deadline_ms: Some(_) }, PlanStepKind::Signal { timeout_ms: Some(timeout_ms), .. }) =
            (&self.steps[usize::from(index)].work, &self.plan.step(index).kind)
        else {
            return Applied::Ignored("timer not armed");
        };
        let error = TaskError {
            code: "timeout".to_owned(),
            message: format!("step `{step}` got no signal within {timeout_ms} ms"),
            retryable: false,
        };
        self.state(index).work = Work::Idle;
        self.step_failed(index, error, context);
        Applied::Accepted
    }
}
