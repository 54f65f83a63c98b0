//! Edge resolution: what a resolved step does to the steps after it.
//!
//! Per the plan's edge semantics: when a step resolves, each distinct target of its
//! outgoing edges counts the dependency as resolved, and is activated if any of this
//! source's edges to it matches how the source resolved. A target whose deps have all
//! resolved starts if it was activated, else it is skipped, which resolves it in turn
//! with no edge activated. The work is queued on the agenda, never recursed, so a long
//! chain of skips cannot exhaust the stack, and it is done in a fixed order. A step that a
//! redrive of a succeeded run left cancelled takes no edges: a step that goes again and
//! leads to it neither starts nor skips it (see `Run::left_cancelled`).

use flowgrid_model::plan::{Edge, EdgeWhen};
use flowgrid_model::StepIndex;

use super::{Context, Run};
use crate::StepStatus;

/// How a step resolved, as far as its outgoing edges care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resolution {
    /// A task, map or transform succeeded.
    Succeeded,
    /// A choice took rule `n`.
    Branch(u16),
    /// A choice took its default.
    Default,
    /// A failure handled by catch `n`.
    Caught(u16),
    /// The step was skipped: it activates nothing.
    Skipped,
}

/// Work queued during one transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Agenda {
    /// All deps of the step resolved and one activated it: start it.
    Start(StepIndex),
    /// The step resolved: propagate along its edges.
    Propagate(StepIndex, Resolution),
}

impl Resolution {
    pub(super) fn activates(self, when: EdgeWhen) -> bool {
        match when {
            EdgeWhen::Succeeded => {
                matches!(self, Resolution::Succeeded | Resolution::Branch(_) | Resolution::Default)
            }
            EdgeWhen::Branch(rule) => self == Resolution::Branch(rule),
            EdgeWhen::Default => self == Resolution::Default,
            EdgeWhen::Caught(catch) => self == Resolution::Caught(catch),
        }
    }
}

impl Run {
    /// Records that step `index` resolved as `resolution` (its status is already set) and
    /// queues the propagation.
    pub(super) fn resolve_step(&mut self, index: StepIndex, resolution: Resolution, context: &Context<'_>) {
        let state = self.state(index);
        assert!(state.status.is_resolved(), "a step resolves with a resolved status");
        assert!(!state.has_work_in_flight(), "a resolved step has no attempt in flight");
        state.ended_ms = Some(context.now);
        state.resolved_as = Some(resolution);
        self.unresolved -= 1;
        self.agenda.push_back(Agenda::Propagate(index, resolution));
    }

    /// Works through the agenda until it is empty or the run has ended, then ends the run
    /// if every step has resolved.
    pub(super) fn work_agenda(&mut self, context: &mut Context<'_>) {
        while let Some(work) = self.agenda.pop_front() {
            if self.status.is_terminal() {
                break;
            }
            match work {
                Agenda::Start(index) => {
                    if !self.hold(index) {
                        self.start_step(index, context);
                    }
                }
                Agenda::Propagate(index, resolution) => self.propagate(index, resolution, context),
            }
        }
        self.agenda.clear();
        if !self.status.is_terminal() && self.unresolved == 0 {
            self.finish_by_itself(context);
        }
    }

    fn propagate(&mut self, source: StepIndex, resolution: Resolution, context: &Context<'_>) {
        let plan = std::sync::Arc::clone(&self.plan);
        let outgoing = &plan.step(source).outgoing;
        for (position, edge) in outgoing.iter().enumerate() {
            if outgoing[..position].iter().any(|earlier| earlier.to == edge.to) {
                continue;
            }
            let activated = edges_to(outgoing, edge.to).any(|same| resolution.activates(same.when));
            self.dependency_resolved(edge.to, activated, context);
        }
    }

    fn dependency_resolved(&mut self, target: StepIndex, activated: bool, context: &Context<'_>) {
        if self.left_cancelled(target) {
            return;
        }
        let deps = self.plan.step(target).deps.len() as u32;
        let state = self.state(target);
        assert!(state.status == StepStatus::Pending, "a step waiting for deps is pending");
        assert!(state.deps_resolved < deps, "a dependency resolves once");
        state.deps_resolved += 1;
        state.activated |= activated;
        if state.deps_resolved < deps {
            return;
        }
        if state.activated {
            self.agenda.push_back(Agenda::Start(target));
        } else {
            self.skip_step(target, context);
        }
    }

    /// Step `index` will not run (no edge activated it, or its `when` is false): it is
    /// skipped, which activates nothing after it.
    pub(super) fn skip_step(&mut self, index: StepIndex, context: &Context<'_>) {
        let state = self.state(index);
        state.status = StepStatus::Skipped;
        // A signal kept for a step that never starts is dropped.
        state.output = None;
        self.resolve_step(index, Resolution::Skipped, context);
    }
}

pub(super) fn edges_to(outgoing: &[Edge], target: StepIndex) -> impl Iterator<Item = &Edge> {
    outgoing.iter().filter(move |edge| edge.to == target)
}
