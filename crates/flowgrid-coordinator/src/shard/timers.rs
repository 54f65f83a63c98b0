//! The in-memory timer wheel of one shard. Timers are durable because they are part of
//! each run's state (rebuilt from history); this wheel only schedules them.

use std::collections::{BTreeSet, HashMap};

use flowgrid_engine::TimerKey;
use flowgrid_model::{Millis, RunId};

#[derive(Default)]
pub struct TimerWheel {
    due: BTreeSet<(Millis, RunId, TimerKey)>,
    /// Armed timers by run, so that forgetting a run's timers does not scan the wheel.
    armed: HashMap<RunId, HashMap<TimerKey, Millis>>,
}

impl TimerWheel {
    /// Arms `timer` at `due_ms`, moving it if it was armed already.
    pub fn arm(&mut self, run_id: RunId, timer: TimerKey, due_ms: Millis) {
        let run_timers = self.armed.entry(run_id.clone()).or_default();
        if let Some(previous) = run_timers.insert(timer.clone(), due_ms) {
            self.due.remove(&(previous, run_id.clone(), timer.clone()));
        }
        self.due.insert((due_ms, run_id, timer));
    }

    pub fn cancel(&mut self, run_id: &RunId, timer: &TimerKey) {
        let Some(run_timers) = self.armed.get_mut(run_id) else { return };
        if let Some(previous) = run_timers.remove(timer) {
            self.due.remove(&(previous, run_id.clone(), timer.clone()));
        }
        if run_timers.is_empty() {
            self.armed.remove(run_id);
        }
    }

    /// Forgets every timer of a run.
    pub fn cancel_run(&mut self, run_id: &RunId) {
        let Some(run_timers) = self.armed.remove(run_id) else { return };
        for (timer, due) in run_timers {
            self.due.remove(&(due, run_id.clone(), timer));
        }
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
                    if let Some(run_timers) = self.armed.get_mut(&run_id) {
                        run_timers.remove(&timer);
                        if run_timers.is_empty() {
                            self.armed.remove(&run_id);
                        }
                    }
                    fired.push((run_id, timer));
                }
                _ => break,
            }
        }
        fired
    }

    pub fn clear(&mut self) {
        self.due.clear();
        self.armed.clear();
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
        wheel.arm(run.clone(), TimerKey::RunTimeout, 50);
        wheel.arm(RunId("s".into()), TimerKey::RunTimeout, 10);
        wheel.arm(run.clone(), TimerKey::RunTimeout, 30);
        assert_eq!(wheel.len(), 2);
        assert_eq!(wheel.next_due(), Some(10));
        let fired = wheel.pop_due(40, 10);
        assert_eq!(fired.len(), 2);
        assert_eq!(fired[0].0, RunId("s".into()));
        assert!(wheel.pop_due(1_000, 10).is_empty(), "the moved timer must not fire twice");
    }

    #[test]
    fn cancel_run_forgets_its_timers_only() {
        let mut wheel = TimerWheel::default();
        wheel.arm(RunId("a".into()), TimerKey::RunTimeout, 5);
        wheel.arm(RunId("b".into()), TimerKey::RunTimeout, 5);
        wheel.cancel_run(&RunId("a".into()));
        let fired = wheel.pop_due(10, 10);
        assert_eq!(fired, vec![(RunId("b".into()), TimerKey::RunTimeout)]);
    }
}
