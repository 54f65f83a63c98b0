//! Pause and resume: a paused run starts no step until it is resumed.
//!
//! A step whose dependencies resolve while the run is paused is held, pending, in the
//! order it became ready; the resume starts the held steps in that order. What a step had
//! started before the pause goes on: its attempts, their retries, a map's further items,
//! a wait, a signal step waiting, a child run. The run's timeout keeps counting, a cancel
//! ends the run as ever, and a run that ends while paused is no longer paused (the steps
//! it held are cancelled with the others).

use flowgrid_model::limits::PAUSES_MAX;
use flowgrid_model::{Millis, StepIndex};

use super::resolve::Agenda;
use super::{Context, Run};
use crate::{Applied, Paused};

/// The state of a paused run.
#[derive(Debug)]
pub(super) struct Pause {
    since_ms: Millis,
    reason: String,
    /// Steps ready to start, held until the resume.
    held: Vec<StepIndex>,
}

impl Run {
    /// Since when and why the run is paused, with the steps it holds; `None` while it is not.
    pub fn paused(&self) -> Option<Paused> {
        self.paused.as_deref().map(|pause| Paused {
            since_ms: pause.since_ms,
            reason: pause.reason.clone(),
            held: pause.held.iter().map(|&index| self.plan.step(index).id.clone()).collect(),
        })
    }

    /// Whether the run is paused now (without building its [`Paused`] view).
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Pauses so far, none refused.
    pub fn pauses(&self) -> u32 {
        self.pauses
    }

    /// Pauses the run; a run paused already stays as it is.
    pub(super) fn pause(&mut self, reason: &str, context: &mut Context<'_>) -> Applied {
        if self.paused.is_some() {
            return Applied::Ignored("the run is paused already");
        }
        if self.pauses >= PAUSES_MAX {
            return Applied::Ignored("the run was paused the most times a run may be");
        }
        self.pauses += 1;
        let pause = Pause { since_ms: context.now, reason: reason.to_owned(), held: Vec::new() };
        self.paused = Some(Box::new(pause));
        Applied::Accepted
    }

    /// Resumes a paused run: the steps it held start, in the order they became ready
    /// (or wait for the run's admission, if it is queued).
    pub(super) fn resume(&mut self) -> Applied {
        let Some(pause) = self.paused.take() else {
            return Applied::Ignored("the run is not paused");
        };
        self.release(pause.held);
        Applied::Accepted
    }

    /// Starts the steps a pause or a queue held, in the order they became ready, unless
    /// the run still holds them for the other.
    pub(super) fn release(&mut self, held: Vec<StepIndex>) {
        for index in held {
            if !self.hold(index) {
                self.agenda.push_back(Agenda::Start(index));
            }
        }
    }

    /// Holds step `index`, ready to start, if the run is delayed, queued or paused: `true`
    /// if it did.
    pub(super) fn hold(&mut self, index: StepIndex) -> bool {
        if self.delay.as_deref_mut().is_some_and(|delay| delay.hold(index)) {
            return true;
        }
        if let Some(queue) = self.queued.as_deref_mut() {
            queue.hold(index);
            return true;
        }
        match self.paused.as_deref_mut() {
            Some(pause) => {
                pause.held.push(index);
                true
            }
            None => false,
        }
    }
}
