//! The pure run state machine of one run.
//!
//! `Run::start` and `Run::apply` take the current time as an argument and push
//! [`Effect`]s; they never do I/O, read a clock, draw randomness or log. The driver (a
//! shard actor) persists every *accepted* event to the run's history before it carries
//! out the effects, and rebuilds a run after a restart by replaying that history through
//! the same functions: so `apply` must be deterministic (backoff jitter is a hash of the
//! attempt id, not a random draw).
//!
//! Invariants:
//! - a run reaches exactly one terminal [`RunStatus`], and after that accepts no event;
//! - a result is accepted only for the attempt that is currently open, so duplicated or
//!   late results are ignored (`Applied::Ignored`) and change nothing;
//! - no step starts before every step it depends on has resolved.
//!
//! A terminal transition emits a `CancelTimer` for every timer the run still has armed,
//! then exactly one `RunFinished`; effects never depend on hash-map iteration order.

mod event;
mod run;
mod view;

pub use event::{
    Applied, CacheLookup, ChildStart, Effect, Event, HandlerStart, RedriveRefused, SignalRefused, TaskDispatch,
    TaskError, TimerKey,
};
pub use run::{signal_step_refused, Run, RunStart};
pub use view::{Delayed, ItemCounts, Paused, Queued, Redriven, RunStatus, RunView, RunViewRef, StepStatus, StepView};

#[cfg(test)]
mod tests;
