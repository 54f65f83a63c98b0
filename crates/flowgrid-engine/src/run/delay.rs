//! Delayed runs: a run started with a start time later than its start request exists at
//! once (listed, read, cancelled like any other) but starts no step until then.
//!
//! A delayed run holds each step that becomes ready, as a paused or queued run does, and
//! its `StartDue` timer releases them; its timeout counts from the start time. A run of a
//! flow with a concurrency limit asks for its slot only then: it becomes queued when the
//! delay is over, so it holds no slot while it waits. A cancel or an end clears it.

use flowgrid_model::{Millis, StepIndex};

use super::{Context, Run};
use crate::{Applied, Delayed, TimerKey};

/// The start time of a delayed run, and the steps it holds while it waits.
#[derive(Debug)]
pub(super) struct Delay {
    pub(super) until_ms: Millis,
    /// Steps ready to start, held until `until_ms`; `None` once it passed.
    held: Option<Vec<StepIndex>>,
}

impl Delay {
    pub(super) fn new(until_ms: Millis) -> Box<Delay> {
        Box::new(Delay { until_ms, held: Some(Vec::new()) })
    }

    /// Holds step `index` while the delay lasts: `true` if it did.
    pub(super) fn hold(&mut self, index: StepIndex) -> bool {
        match self.held.as_mut() {
            Some(held) => {
                held.push(index);
                true
            }
            None => false,
        }
    }

    pub(super) fn is_waiting(&self) -> bool {
        self.held.is_some()
    }

    /// Ends the wait (the run ended): nothing is held any more.
    pub(super) fn clear(&mut self) {
        self.held = None;
    }

    /// Waits again (the run was redriven before its start time): `true` if it does.
    pub(super) fn wait_again(&mut self, now: Millis) -> bool {
        if self.until_ms > now {
            self.held.get_or_insert_with(Vec::new);
        }
        self.is_waiting()
    }
}

impl Run {
    /// Until when the run waits to start, with the steps it holds; `None` when it was not
    /// started with a later start time, or that time passed.
    pub fn delayed(&self) -> Option<Delayed> {
        let delay = self.delay.as_deref()?;
        let held = delay.held.as_ref()?;
        Some(Delayed {
            until_ms: delay.until_ms,
            held: held.iter().map(|&index| self.plan.step(index).id.clone()).collect(),
        })
    }

    /// Whether the run waits for its start time (without building its [`Delayed`] view).
    pub fn is_delayed(&self) -> bool {
        self.delay.as_deref().is_some_and(Delay::is_waiting)
    }

    /// The start time came: a run of a limited flow becomes queued (its driver asks for its
    /// slot), and the steps it held start, or wait for the admission or the resume.
    pub(super) fn start_due(&mut self, context: &mut Context<'_>) -> Applied {
        let Some(held) = self.delay.as_deref_mut().and_then(|delay| delay.held.take()) else {
            return Applied::Ignored("timer not armed");
        };
        if self.plan.concurrency.is_some() && self.queued.is_none() {
            self.queued = Some(super::queue::Queue::new(context.now));
        }
        self.release(held);
        Applied::Accepted
    }

    /// The timer of a delay still waiting.
    pub(super) fn delay_timer(&self) -> Option<(TimerKey, Millis)> {
        self.delay.as_deref().filter(|delay| delay.is_waiting()).map(|delay| (TimerKey::StartDue, delay.until_ms))
    }
}
