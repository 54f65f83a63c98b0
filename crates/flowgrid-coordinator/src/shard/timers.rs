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
    /// Arms `timer` at `due_ms`; `previous_due_ms` is where it was armed before, if it was.
    pub fn arm(&mut self, run_id: RunId, timer: TimerKey, due_ms: Millis, previous_due_ms: Option<Millis>) {
        if let Some(previous) = previous_due_ms {
            self.due.remove(&(previous, run_id.clone(), timer.clone()));
        }
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

    /// Removes and returns up to `count_max` timers due at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: Millis, count_max: usize) -> Vec<(RunId, TimerKey)> {
        let mut fired = Vec::new();
        while fired.len() < count_max {
            match self.due.first() {
                Some((due, _, _)) if *due <= now => {
                    let (_, run_id, timer) = self.due.pop_first().expect("checked above");
                    fired.push((run_id, timer));
                }
                _ => break,
            }
        }
        fired
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
    fn fires_in_due_order_and_rearming_moves_a_timer() {
        let mut wheel = TimerWheel::default();
        let run = RunId("r".into());
        wheel.arm(run.clone(), TimerKey::RunTimeout, 50, None);
        wheel.arm(RunId("s".into()), TimerKey::RunTimeout, 10, None);
        wheel.arm(run.clone(), TimerKey::RunTimeout, 30, Some(50));
        assert_eq!(wheel.len(), 2);
        assert_eq!(wheel.next_due(), Some(10));
        let fired = wheel.pop_due(40, 10);
        assert_eq!(fired.len(), 2);
        assert_eq!(fired[0].0, RunId("s".into()));
        assert!(wheel.pop_due(1_000, 10).is_empty(), "the moved timer must not fire twice");
    }

    #[test]
    fn cancel_forgets_that_timer_only() {
        let mut wheel = TimerWheel::default();
        wheel.arm(RunId("a".into()), TimerKey::RunTimeout, 5, None);
        wheel.arm(RunId("b".into()), TimerKey::RunTimeout, 5, None);
        wheel.cancel(RunId("a".into()), TimerKey::RunTimeout, 5);
        let fired = wheel.pop_due(10, 10);
        assert_eq!(fired, vec![(RunId("b".into()), TimerKey::RunTimeout)]);
    }
}
