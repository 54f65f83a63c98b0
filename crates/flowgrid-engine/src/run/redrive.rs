//! Redrive: a run that ended goes again from the steps that did not succeed, and from
//! the steps it is asked to run again from.
//!
//! What stays: every step that succeeded or was skipped, and every failure a catch took
//! (with whatever its catch started), unless it is one of the steps named to run again
//! from or comes after one. What starts again, of a run that did not succeed: every step
//! that failed without a catch or was cancelled when the run ended, once its dependencies
//! have resolved (a map, or a subflow step with items, with its items that did not succeed;
//! a subflow step with a new child run); one that waited for dependencies waits again. Of a
//! run that succeeded (a `succeed` step ended it and cancelled the steps still going), only
//! the cancelled steps that a step started anew waits for, directly or through other
//! cancelled steps: the others were not reached and stay cancelled, even when a step that
//! goes again leads to them (they are after it, its catch's steps or the branches of a
//! choice that goes again): they take no edges. A step named to run again from, and every
//! step its edges lead to, start from scratch: each counts only the dependencies before the
//! named steps as resolved, as they resolved then (the branch a choice took, the catch that
//! took a failure), and waits for the others; a map runs all its items again.
//! Attempt numbers go on from where each step left them, so a late result of an earlier
//! attempt never passes for a new one, and a child of the new round has an id of its own.
//! The run's timeout counts from the redrive. A run cancelled before its start time
//! (a delayed run) waits for that time again if it is still to come, and its timeout
//! counts from that time.

use flowgrid_model::limits::REDRIVES_MAX;
use flowgrid_model::StepIndex;

use super::resolve::{edges_to, Agenda, Resolution};
use super::state::{StepState, Work};
use super::{Context, Run};
use crate::{Applied, RedriveRefused, Redriven, RunStatus, StepStatus, TimerKey};

impl Run {
    /// Why the run cannot be redriven now (from steps `from`, none for only the steps that
    /// did not succeed), if it cannot.
    pub fn redrive_refused(&self, from: &[String]) -> Option<RedriveRefused> {
        if self.status == RunStatus::Running {
            return Some(RedriveRefused::Going);
        }
        if let Some(parent) = self.parent.as_deref() {
            return Some(RedriveRefused::Child { parent: parent.clone() });
        }
        let times = self.redriven.as_ref().map_or(0, |redriven| redriven.times);
        if times >= REDRIVES_MAX {
            return Some(RedriveRefused::TooOften { times });
        }
        for step in from {
            let Some(index) = self.plan.step_index(step) else {
                return Some(RedriveRefused::NoSuchStep { step: step.clone() });
            };
            if self.steps[usize::from(index)].status == StepStatus::Skipped {
                return Some(RedriveRefused::Skipped { step: step.clone() });
            }
        }
        (self.status == RunStatus::Succeeded && from.is_empty()).then_some(RedriveRefused::Succeeded)
    }

    /// Puts the steps that did not succeed back to pending (of a run that succeeded, only
    /// those the steps from `from` on wait for), and the steps from `from` on back to where
    /// they were before they started, and starts those whose dependencies have resolved
    /// (holds them, `queued`, until the run is admitted).
    pub(super) fn redrive(&mut self, from: &[String], queued: bool, context: &mut Context<'_>) -> Applied {
        if self.redrive_refused(from).is_some() {
            return Applied::Ignored("the run cannot be redriven");
        }
        // Read before the run goes again: only a run that did not succeed goes again from
        // the steps that did not succeed.
        let succeeded = self.status == RunStatus::Succeeded;
        self.status = RunStatus::Running;
        self.output = None;
        self.error = None;
        self.ended_ms = None;
        // A run cancelled before its start time waits for it again, and asks for its slot
        // (a limited flow) only then, as a delayed start does.
        let delayed = self.delay.as_deref_mut().is_some_and(|delay| delay.wait_again(context.now));
        self.queued = (queued && !delayed).then(|| super::queue::Queue::new(context.now));
        let redriven = self.redriven.get_or_insert_with(|| Box::new(Redriven { times: 0, last_ms: 0 }));
        redriven.times += 1;
        redriven.last_ms = context.now;
        let anew = self.steps_from(from);
        let again = if succeeded { self.cut_off_steps_waited_for(&anew) } else { self.steps_not_succeeded() };
        for ((state, &anew), &again) in self.steps.iter_mut().zip(&anew).zip(&again) {
            if anew {
                reset_to_new(state);
            } else if again {
                reset(state);
            } else if state.status == StepStatus::Succeeded && state.resolved_as.is_none() {
                // A `succeed` step that ended the run before it was marked resolved.
                state.resolved_as = Some(Resolution::Succeeded);
            }
        }
        // Every step that goes again counts the dependencies that stay resolved (those
        // that go again resolve again later). Counting them afresh, rather than keeping
        // the count from before, takes in a `succeed` step that ended the run: its edges
        // never led anywhere.
        for target in 0..self.steps.len() {
            if self.steps[target].status == StepStatus::Pending {
                self.recount_deps(target as StepIndex, &anew);
            }
        }
        self.unresolved = self.steps.iter().filter(|state| state.is_open()).count();
        for position in 0..self.steps.len() {
            let state = &self.steps[position];
            let deps = self.plan.steps[position].deps.len();
            if state.status != StepStatus::Pending || state.deps_resolved as usize != deps {
                continue;
            }
            if state.activated {
                self.agenda.push_back(Agenda::Start(position as StepIndex));
            } else {
                // Only a step started anew gets here: the steps before it skip it again.
                self.steps[position].status = StepStatus::Skipped;
                self.resolve_step(position as StepIndex, Resolution::Skipped, context);
            }
        }
        if let Some(timeout_ms) = self.plan.timeout_ms {
            self.arm_timer(TimerKey::RunTimeout, self.went_ms().saturating_add(timeout_ms), context);
        }
        if let Some((timer, due_ms)) = self.delay_timer() {
            self.arm_timer(timer, due_ms, context);
        }
        self.work_agenda(context);
        Applied::Accepted
    }

    /// Which steps start anew: those named in `from` and every step their edges lead to.
    fn steps_from(&self, from: &[String]) -> Vec<bool> {
        let mut anew = vec![false; self.steps.len()];
        let mut queue: Vec<StepIndex> = from.iter().filter_map(|step| self.plan.step_index(step)).collect();
        while let Some(index) = queue.pop() {
            if std::mem::replace(&mut anew[usize::from(index)], true) {
                continue;
            }
            queue.extend(self.plan.step(index).outgoing.iter().map(|edge| edge.to));
        }
        anew
    }

    /// The steps a run that did not succeed goes again from: every step that failed
    /// without a catch or was cancelled when the run ended.
    fn steps_not_succeeded(&self) -> Vec<bool> {
        self.steps.iter().map(unresolved_at_the_end).collect()
    }

    /// The steps of a succeeded run that go again besides those started anew (`anew`): of
    /// the steps its `succeed` step cancelled, only those a step started anew waits for,
    /// directly or through other such steps. The others were not reached and keep what
    /// they have; one that a step going again waits for must resolve again, else that step
    /// would wait for ever.
    fn cut_off_steps_waited_for(&self, anew: &[bool]) -> Vec<bool> {
        let mut again = vec![false; self.steps.len()];
        let mut queue: Vec<StepIndex> =
            (0..self.steps.len()).filter(|&position| anew[position]).map(|position| position as StepIndex).collect();
        while let Some(index) = queue.pop() {
            for &dep in &self.plan.step(index).deps {
                let position = usize::from(dep);
                let cut_off = unresolved_at_the_end(&self.steps[position]) && !anew[position];
                if cut_off && !std::mem::replace(&mut again[position], true) {
                    queue.push(dep);
                }
            }
        }
        again
    }

    /// Step `index` is one a redrive of a succeeded run left cancelled: not reached, and
    /// waited for by no step started anew. It takes no edges, so a step that goes again and
    /// leads to it (it is after that step, its catch's step or a branch of its choice)
    /// neither starts nor skips it. A step is cancelled only when its run ends, so a cancelled step of a run
    /// that goes again after a redrive is one of these.
    pub(super) fn left_cancelled(&self, index: StepIndex) -> bool {
        let cancelled = self.steps[usize::from(index)].status == StepStatus::Cancelled;
        cancelled && self.redriven.is_some() && !self.status.is_terminal()
    }

    /// Step `target` goes again: it counts the dependencies that stay and have resolved,
    /// activated as they resolved; those that start anew resolve again later.
    fn recount_deps(&mut self, target: StepIndex, anew: &[bool]) {
        let deps = &self.plan.step(target).deps;
        let mut resolved = 0;
        let mut activated = deps.is_empty();
        for &dep in deps {
            let Some(resolution) = self.steps[usize::from(dep)].resolved_as.filter(|_| !anew[usize::from(dep)]) else {
                continue;
            };
            resolved += 1;
            activated |= edges_to(&self.plan.step(dep).outgoing, target).any(|edge| resolution.activates(edge.when));
        }
        let state = self.state(target);
        state.deps_resolved = resolved;
        state.activated = activated;
    }
}

/// The step did not resolve in the run's last try: it was cancelled when the run ended,
/// or it failed without a catch (and so failed the run).
fn unresolved_at_the_end(state: &StepState) -> bool {
    state.status == StepStatus::Cancelled || (state.status == StepStatus::Failed && !state.caught())
}

/// A step that goes again: pending, with the dependencies it had and its attempts counted;
/// a map (or a subflow step's items) keeps its items that succeeded for its next start.
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

/// A step that starts anew: as [`reset`], but nothing of what it did stays (its
/// dependencies are counted again) except its attempts, whose numbers go on.
fn reset_to_new(state: &mut StepState) {
    reset(state);
    state.resolved_as = None;
    state.work = Work::Idle;
}
