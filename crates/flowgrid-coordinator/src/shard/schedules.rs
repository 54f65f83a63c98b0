//! Scheduled runs: the shard that holds a flow's catalog starts the runs of its schedule.
//!
//! The latest version's schedule is the one that runs. Each slot's run is started through
//! the API like any other, with the idempotency key `schedule-<slot ms>`: the run id
//! follows from it, so a slot starts one run however often it is fired (a retried
//! request, a shard that moved and fires the slot again, two owners for a moment).
//! A shard that is acquired (or reloaded) fires the newest slot of the last
//! [`CATCH_UP_MS`] (one it may have missed during the hand-over); older ones are skipped.

use flowgrid_model::{FlowPlan, Millis};
use flowgrid_proto::StartRun;
use flowgrid_store::ShardStore;
use tracing::{info, warn};

use super::actor::ShardActor;

/// How far back a shard that starts serving looks for slots it may have missed.
pub(super) const CATCH_UP_MS: Millis = 60_000;

impl<S: ShardStore> ShardActor<S> {
    /// Arms the schedule of `plan`, the latest version of its flow, at its first slot after
    /// `after_ms`; a version without a schedule, or a paused flow, stops the flow's (the
    /// slots of a pause are skipped).
    pub(super) fn arm_schedule(&mut self, plan: &FlowPlan, after_ms: Millis) {
        let timetable = plan.schedule.as_ref().filter(|_| !self.flow_pauses.contains_key(&plan.name));
        match timetable.and_then(|timetable| timetable.next_after(after_ms)) {
            Some(slot) => {
                self.schedules.insert(plan.name.clone(), slot);
            }
            None => {
                self.schedules.remove(&plan.name);
            }
        }
    }

    /// Arms the schedule of `plan` for a shard that starts serving: at the newest slot
    /// since `from_ms` that is due by `now` (it may have been missed while the shard had no
    /// owner), else at the first slot after `now`.
    pub(super) fn arm_schedule_catching_up(&mut self, plan: &FlowPlan, from_ms: Millis, now: Millis) {
        let Some(timetable) = plan.schedule.as_ref().filter(|_| !self.flow_pauses.contains_key(&plan.name)) else {
            self.schedules.remove(&plan.name);
            return;
        };
        let first = timetable.next_after(from_ms);
        let due = first.filter(|&first| first <= now).map(|first| newest_due(timetable, first, now));
        match due.or(first) {
            Some(slot) => self.schedules.insert(plan.name.clone(), slot),
            None => self.schedules.remove(&plan.name),
        };
    }

    /// The earliest slot armed.
    pub(super) fn next_schedule_due(&self) -> Option<Millis> {
        self.schedules.values().min().copied()
    }

    /// Starts the run of every slot due by `now` and arms each schedule's next slot after
    /// `now` (slots missed meanwhile are skipped).
    pub(super) fn start_due_schedules(&mut self, now: Millis) {
        self.schedules_checked_ms = now;
        if self.next_schedule_due().is_none_or(|due| due > now) {
            return;
        }
        // A process that wakes from a stop past its lease no longer owns the shard: the slot
        // is the new owner's to start (this one would start it late, after newer ones).
        if !self.context.lease.holds(self.term) {
            return;
        }
        let due: Vec<(String, Millis)> =
            self.schedules.iter().filter(|(_, &slot)| slot <= now).map(|(flow, &slot)| (flow.clone(), slot)).collect();
        for (flow, slot) in due {
            let Some(plan) =
                self.catalog.get(&flow).and_then(|versions| versions.last()).map(|latest| latest.plan.clone())
            else {
                self.schedules.remove(&flow);
                continue;
            };
            // A process that was stopped (or starved) past its next slots wakes with an old
            // slot armed: the newest one due is the one to start, older ones are skipped, as
            // when a shard moves (the new owner may have started that newest one already).
            let slot = match plan.schedule.as_ref() {
                Some(timetable) => newest_due(timetable, slot, now),
                None => slot,
            };
            let schedule = plan.definition.schedule.clone().unwrap_or_default();
            let start = StartRun::for_schedule_slot(flow.clone(), &schedule, slot);
            let client = flowgrid_sdk::Client::new(self.context.nats.clone(), self.context.subjects.prefix());
            tokio::spawn(async move {
                let outcome = match client.start(start).await {
                    Ok(started) if started.created => {
                        info!(flow = %flow, slot_ms = slot, run = %started.run_id, "scheduled run started");
                        "started"
                    }
                    Ok(started) => {
                        info!(flow = %flow, slot_ms = slot, run = %started.run_id, "scheduled run was started already");
                        "already_started"
                    }
                    Err(error) => {
                        warn!(flow = %flow, slot_ms = slot, error = %error, "cannot start a scheduled run; this slot is skipped");
                        "failed"
                    }
                };
                ::metrics::counter!(crate::metrics::SCHEDULED_RUNS, "outcome" => outcome).increment(1);
            });
            self.arm_schedule(&plan, now.max(slot));
        }
    }
}

/// The newest slot of `timetable` due by `now`, from `slot` (due) on.
fn newest_due(timetable: &flowgrid_model::schedule::Timetable, slot: Millis, now: Millis) -> Millis {
    let mut newest = slot;
    while let Some(next) = timetable.next_after(newest).filter(|&next| next <= now) {
        newest = next;
    }
    newest
}

#[cfg(test)]
mod tests {
    use flowgrid_model::schedule::Timetable;

    use super::newest_due;

    #[test]
    fn a_process_that_wakes_past_its_slots_starts_the_newest_due_only() {
        let every_3s = Timetable::Every(3_000);
        assert_eq!(newest_due(&every_3s, 6_000, 11_700), 9_000, "slot 6 s is skipped for 9 s");
        assert_eq!(newest_due(&every_3s, 6_000, 6_000), 6_000, "on time: the slot itself");
        assert_eq!(newest_due(&every_3s, 6_000, 8_999), 6_000);
    }
}
