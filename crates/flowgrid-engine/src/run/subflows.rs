//! Subflow steps: a step that starts a child run of another flow and waits for its end.
//!
//! The child's run id follows from the parent's, the step's and the flow's
//! ([`ParentRef::child_run_id`]), so the step knows its child before it exists, starting
//! it again starts nothing new, and only that child's end is taken. The child's end comes
//! back as [`Event::ChildEnded`](crate::Event::ChildEnded): its output is the step's
//! output; any other end fails the step with the child's error, which a catch may take.
//! A parent that ends while a child goes asks for the child to be cancelled.

use std::sync::Arc;

use flowgrid_model::{ParentRef, PlanStep, PlanStepKind, RunId, StepIndex, SubflowSpec};
use serde_json::Value;

use super::resolve::Resolution;
use super::scope::Locals;
use super::state::{StepState, Work};
use super::{Context, Run};
use crate::{Applied, ChildStart, Effect, RunStatus, StepStatus, TaskError};

impl Run {
    /// Starts subflow step `index`: evaluates the child's input and asks for the child.
    pub(super) fn start_subflow(&mut self, index: StepIndex, spec: &SubflowSpec, context: &mut Context<'_>) {
        let input = match &spec.input {
            Some(expr) => match self.evaluate(context.evaluator, expr, Locals::default()) {
                Ok(input) => Arc::new(input),
                Err(error) => return self.expression_failed(index, "input", &error, context),
            },
            None => Arc::clone(&self.input),
        };
        let start = self.child_start(index, spec, Arc::clone(&input));
        self.state(index).work = Work::Child { input };
        context.effects.push(Effect::StartChild(start));
    }

    /// The start of every child run a subflow step waits for: the driver starts them
    /// again after reloading a shard (a child that exists already is not started twice).
    pub fn open_child_starts(&self) -> Vec<ChildStart> {
        let waiting = self.plan.steps.iter().zip(&self.steps).enumerate();
        waiting
            .filter_map(|(position, (step, state))| match (&step.kind, &state.work) {
                (PlanStepKind::Subflow(spec), Work::Child { input }) => {
                    Some(self.child_start(position as StepIndex, spec, Arc::clone(input)))
                }
                _ => None,
            })
            .collect()
    }

    fn child_start(&self, index: StepIndex, spec: &SubflowSpec, input: Arc<Value>) -> ChildStart {
        let step = &self.plan.step(index).id;
        ChildStart {
            child: ParentRef::child_run_id(&spec.flow, &self.run_id, step),
            parent: self.run_id.clone(),
            step: step.clone(),
            flow: spec.flow.clone(),
            version: spec.version,
            input,
        }
    }

    /// The child run of a subflow step that started one (for the view).
    pub(super) fn started_child(&self, step: &PlanStep, state: &StepState) -> Option<RunId> {
        let PlanStepKind::Subflow(spec) = &step.kind else { return None };
        // A step whose input expression failed never asked for its child.
        let asked = state.started_ms.is_some()
            && state.error.as_ref().is_none_or(|error| error.code != super::scope::EXPRESSION_ERROR);
        asked.then(|| ParentRef::child_run_id(&spec.flow, &self.run_id, &step.id))
    }

    /// Child run `child` of step `step` ended: the step succeeds with its output, or fails
    /// with its error. An end from a child the step does not wait for changes nothing.
    pub(super) fn on_child_ended(
        &mut self,
        step: &str,
        child: &RunId,
        status: RunStatus,
        output: Option<&Value>,
        error: Option<&TaskError>,
        context: &mut Context<'_>,
    ) -> Applied {
        let Some(index) = self.plan.step_index(step) else { return Applied::Ignored("no step of that id") };
        let PlanStepKind::Subflow(spec) = &self.plan.step(index).kind else {
            return Applied::Ignored("not a subflow step");
        };
        if !matches!(self.steps[usize::from(index)].work, Work::Child { .. }) {
            return Applied::Ignored("the subflow step does not wait for a child");
        }
        if *child != ParentRef::child_run_id(&spec.flow, &self.run_id, step) {
            return Applied::Ignored("not the child of this step");
        }
        if status == RunStatus::Succeeded {
            let state = self.state(index);
            state.work = Work::Idle;
            state.status = StepStatus::Succeeded;
            state.output = Some(output.cloned().unwrap_or(Value::Null));
            self.resolve_step(index, Resolution::Succeeded, context);
        } else {
            let (code, message) = match error {
                Some(error) => (error.code.clone(), error.message.as_str()),
                None => (status.as_str().to_owned(), "no error given"),
            };
            let error = TaskError {
                code,
                message: format!("child run {child} of flow `{}` {}: {message}", spec.flow, status.as_str()),
                retryable: false,
            };
            self.state(index).work = Work::Idle;
            self.step_failed(index, error, context);
        }
        Applied::Accepted
    }

    /// The run ends with `status`: every child run still going is to be cancelled.
    pub(super) fn cancel_children(&self, status: RunStatus, context: &mut Context<'_>) {
        for (step, state) in self.plan.steps.iter().zip(&self.steps) {
            if let (PlanStepKind::Subflow(spec), Work::Child { .. }) = (&step.kind, &state.work) {
                context.effects.push(Effect::CancelChild {
                    child: ParentRef::child_run_id(&spec.flow, &self.run_id, &step.id),
                    reason: format!("its parent run {} {}", self.run_id, status.as_str()),
                });
            }
        }
    }
}
