//! Redrive: a run that failed, timed out or was cancelled goes again from the steps that
//! did not succeed.
//!
//! What stays: every step that succeeded or was skipped, and every failure a catch took
//! (with whatever its catch started). What starts again: every step that failed without a
//! catch or was cancelled when the run ended. Such a step starts anew once its
//! dependencies have resolved (a map with its items that did not succeed, a subflow step
//! with new child runs for all its items); one that waited for dependencies waits again.
//! Attempt numbers go on from where the step left them, so a late result of an earlier
//! attempt never passes for a new one, and a child of the new round has an id of its own.
//! The run's timeout counts from the redrive.

use flowgrid_model::limits::REDRIVES_MAX;
use flowgrid_model::StepIndex;

use super::resolve::Agenda;
use super::state::{StepState, Work};
use super::{Context, Run};
use crate::{Applied, RedriveRefused, Redriven, RunStatus, StepStatus, TimerKey};

impl Run {
    /// Why the run cannot be redriven now, if it cannot.
    pub fn redrive_refused(&self) -> Option<RedriveRefused> {
        match self.status {
            RunStatus::Running => Some(RedriveRefused::Going),
            RunStatus::Succeeded => Some(RedriveRefused::Succeeded),
            RunStatus::Failed | RunStatus::TimedOut | RunStatus::Cancelled => {
                if let Some(parent) = self.parent.as_deref() {
                    return Some(RedriveRefused::Child { parent: parent.clone() });
                }
                let times = self.redriven.as_ref().map_or(0, |redriven| redriven.times);
                (times >= REDRIVES_MAX).then_some(RedriveRefused::TooOften { times })
            }
        }
    }

    /// Puts the steps that did not succeed back to pending and starts those whose
    /// dependencies have resolved.
    pub(super) fn redrive(&mut self, context: &mut Context<'_>) -> Applied {
        if self.redrive_refused().is_some() {
            return Applied::Ignored("the run cannot be redriven");
        }
        self.status = RunStatus::Running;
        self.output = None;
        self.error = None;
        self.ended_ms = None;
        let redriven = self.redriven.get_or_insert_with(|| Box::new(Redriven { times: 0, last_ms: 0 }));
        redriven.times += 1;
        redriven.last_ms = context.now;
        for (position, (state, step)) in self.steps.iter_mut().zip(&self.plan.steps).enumerate() {
            let again = state.status == StepStatus::Cancelled || (state.status == StepStatus::Failed && !state.caught);
            if !again {
                continue;
            }
            reset(state);
            if state.activated && state.deps_resolved as usize == step.deps.len() {
                self.agenda.push_back(Agenda::Start(position as StepIndex));
            }
        }
        self.unresolved = self.steps.iter().filter(|state| state.is_open()).count();
        if let Some(timeout_ms) = self.plan.timeout_ms {
            self.arm_timer(TimerKey::RunTimeout, context.now.saturating_add(timeout_ms), context);
        }
        self.work_agenda(context);
        Applied::Accepted
    }
}

/// A step that goes again: pending, with the dependencies it had and its attempts counted;
/// a map keeps its items that succeeded for its next start.
fn reset(state: &mut StepState) {
    state.status = StepStatus::Pending;
    state.started_ms = None;
    state.ended_ms = None;
    state.output = None;
    state.error = None;
    state.work = match std::mem::replace(&mut state.work, Work::Idle) {
        Work::Map(map) if !map.items.is_empty() => Work::Map(map),
        _ => Work::Idle,
    };
}
