//! The in-memory timer wheel of one shard. Timers are durable because they are part of
//! each run's state (rebuilt from history); this wheel only schedules them.

use std::collections::BTreeSet;

use flowgrid_engine::TimerKey;
use flowgrid_model::{Millis, RunId};

/// Armed timers in due order. Moving or cancelling a timer names its due time (the run
/// knows it), so the wheel needs no index by run.
#[derive(Default)]
pub struct TimerWheel {
    due: BTreeSet<(Millis, RunId, TimerKey)>,
}

impl TimerWheel {
    /// Arms `timer` at `due_ms` (the engine arms a key once).
    pub fn arm(&mut self, run_id: RunId, timer: TimerKey, due_ms: Millis) {
        self.due.insert((due_ms, run_id, timer));
    }

    /// Forgets `timer`, armed at `due_ms`.
    pub fn cancel(&mut self, run_id: RunId, timer: TimerKey, due_ms: Millis) {
        self.due.remove(&(due_ms, run_id, timer));
    }

    /// The earliest due time.
    pub fn next_due(&self) -> Option<Millis> {
        self.due.first().map(|(due, _, _)| *due)
    }

    /// Removes and returns the earliest timer due at or before `now`, if any.
    pub fn pop_due(&mut self, now: Millis) -> Option<(RunId, TimerKey)> {
        let (due, _, _) = self.due.first()?;
        if *due > now {
            return None;
        }
        self.due.pop_first().map(|(_, run_id, timer)| (run_id, timer))
    }

    pub fn clear(&mut self) {
        self.due.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_due_order_up_to_now() {
        let mut wheel = TimerWheel::default();
        wheel.arm(RunId("r".into()), TimerKey::RunTimeout, 50);
        wheel.arm(RunId("s".into()), TimerKey::RunTimeout, 10);
        wheel.arm(RunId("t".into()), TimerKey::RunTimeout, 30);
        assert_eq!(wheel.next_due(), Some(10));
        let fired: Vec<_> = std::iter::from_fn(|| wheel.pop_due(40)).collect();
        assert_eq!(fired.iter().map(|(run, _)| run.as_str()).collect::<Vec<_>>(), ["s", "t"]);
        assert_eq!(wheel.len(), 1);
        assert!(wheel.pop_due(1_000).is_some());
        assert!(wheel.pop_due(1_000).is_none(), "a timer fires once");
    }

    #[test]
    fn cancel_forgets_that_timer_only() {
        let mut wheel = TimerWheel::default();
        wheel.arm(RunId("a".into()), TimerKey::RunTimeout, 5);
        wheel.arm(RunId("b".into()), TimerKey::RunTimeout, 5);
        wheel.cancel(RunId("a".into()), TimerKey::RunTimeout, 5);
        let fired: Vec<_> = std::iter::from_fn(|| wheel.pop_due(10)).collect();
        assert_eq!(fired, vec![(RunId("b".into()), TimerKey::RunTimeout)]);
    }
}
