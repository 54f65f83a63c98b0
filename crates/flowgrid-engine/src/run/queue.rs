//! Queued runs: a run of a flow with a `concurrency` limit starts no step until the grid
//! admits it.
//!
//! A queued run holds each step that becomes ready, in order, as a paused run does; its
//! admission starts them (or hands them to its pause, if it was paused meanwhile). A run
//! is queued only from its start, its start time (a delayed run) or a redrive on, so it is
//! never queued and holding steps for a pause at once. Its timeout counts while it waits;
//! a cancel or an end clears it.

use flowgrid_model::{Millis, StepIndex};

use super::Run;
use crate::{Applied, Queued};

/// The state of a queued run.
#[derive(Debug)]
pub(super) struct Queue {
    since_ms: Millis,
    /// Steps ready to start, held until the admission.
    held: Vec<StepIndex>,
}

impl Queue {
    pub(super) fn new(since_ms: Millis) -> Box<Queue> {
        Box::new(Queue { since_ms, held: Vec::new() })
    }

    pub(super) fn hold(&mut self, index: StepIndex) {
        self.held.push(index);
    }
}

impl Run {
    /// Since when the run waits to be admitted, with the steps it holds; `None` once it
    /// was admitted (or when its flow has no limit).
    pub fn queued(&self) -> Option<Queued> {
        self.queued.as_deref().map(|queue| Queued {
            since_ms: queue.since_ms,
            held: queue.held.iter().map(|&index| self.plan.step(index).id.clone()).collect(),
        })
    }

    /// Whether the run waits to be admitted (without building its [`Queued`] view).
    pub fn is_queued(&self) -> bool {
        self.queued.is_some()
    }

    /// Admits a queued run: the steps it held start, in the order they became ready, or
    /// wait for the resume if the run is paused.
    pub(super) fn admit(&mut self) -> Applied {
        let Some(queue) = self.queued.take() else {
            return Applied::Ignored("the run is not queued");
        };
        self.release(queue.held);
        Applied::Accepted
    }
}
