//! Scheduled runs: the shard that holds a flow's catalog starts the runs of its schedule.
//!
//! The latest version's schedule is the one that runs. Each slot's run is started through
//! the API like any other, with the idempotency key `schedule-<slot ms>`: the run id
//! follows from it, so a slot starts one run however often it is fired (a retried
//! request, a shard that moved and fires the slot again, two owners for a moment).
//! A shard that is acquired fires the newest slot of the last [`CATCH_UP_MS`] (one it may
//! have missed during the hand-over); older ones are skipped. A shard that kept serving but
//! whose turn ran late (a slow commit, a disk stall, a failed commit and the reload after
//! it) starts every slot that fell meanwhile, oldest first, those of the last
//! [`CATCH_UP_MS`]. A version deployed in the turn a slot falls due starts that slot.

use std::collections::BTreeMap;
use std::sync::Arc;

use flowgrid_model::{FlowPlan, Millis};
use flowgrid_proto::StartRun;
use flowgrid_store::ShardStore;
use tracing::{info, warn};

use super::actor::ShardActor;

/// How far back a shard that starts serving looks for slots it may have missed.
pub(super) const CATCH_UP_MS: Millis = 60_000;

/// How far the clock may step back before the schedules are armed again from the new time:
/// less is the jitter of a clock slewed by NTP.
const CLOCK_BACK_TOLERANCE_MS: Millis = 5_000;

/// Slots of one schedule a turn starts at most: a shard late by many slots starts the
/// rest in its next turns instead of holding this one.
const SLOTS_PER_TURN_MAX: usize = 60;

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

    /// Arms the schedule of `plan`, a version deployed (or the latest of a flow paused or
    /// resumed) in the turn, once it is stored: at its first slot after the turn looked at
    /// the schedules, or, when the flow's armed slot is due by then, from that slot on, so
    /// that the turn's [`ShardActor::start_due_schedules`] still starts it (and every one
    /// after it), with the version now latest.
    pub(super) fn arm_deployed_schedule(&mut self, plan: &FlowPlan) {
        let checked_ms = self.schedules_checked_ms;
        let after_ms = match self.schedules.get(&plan.name) {
            Some(&due) if due <= checked_ms => due.saturating_sub(1),
            _ => checked_ms,
        };
        self.arm_schedule(plan, after_ms);
    }

    /// After the reload that follows a failed commit: each schedule the reload armed goes on
    /// from the slot `armed` before it where that one is older, so that the slots that fell
    /// while the commit failed start as those of a late turn do (every one of the last
    /// [`CATCH_UP_MS`], and the span skipped before that logged), not the newest only.
    pub(super) fn keep_armed_slots(&mut self, armed: BTreeMap<String, Millis>) {
        keep_older_slots(&mut self.schedules, armed);
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

    /// Notes that the turn looks at the schedules as of `now`: a version deployed (or a flow
    /// resumed) in the turn arms its schedule from there, or from its slot due by then (see
    /// [`ShardActor::arm_deployed_schedule`]). A clock set back re-arms them.
    pub(super) fn schedules_checked(&mut self, now: Millis) {
        if now.saturating_add(CLOCK_BACK_TOLERANCE_MS) < self.schedules_checked_ms {
            self.rearm_after_clock_fell_back(now);
        }
        self.schedules_checked_ms = now;
    }

    /// Starts the run of every slot due by `now` (those of the last [`CATCH_UP_MS`], at
    /// most [`SLOTS_PER_TURN_MAX`] a turn), oldest first, and arms each schedule's next.
    /// Called after the turn's commit: a version deployed in the turn is the latest only
    /// once it is stored, so a slot never starts with an input that may not last.
    pub(super) fn start_due_schedules(&mut self, now: Millis) {
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
            // The lease held since the last turn, so no other owner started these slots: each
            // one that fell meanwhile starts (a late turn skips none), oldest first.
            let (slots, skipped_before) = match plan.schedule.as_ref() {
                Some(timetable) => due_slots(timetable, slot, now),
                None => (vec![slot], None),
            };
            if let Some(floor) = skipped_before {
                warn!(flow = %flow, before_ms = floor, "the flow's shard fell behind its schedule by over {CATCH_UP_MS} ms; its slots before then are skipped (`flow backfill` starts them)");
            }
            let schedule = plan.definition.schedule.clone().unwrap_or_default();
            for &slot in &slots {
                self.start_slot(&flow, &schedule, slot);
            }
            let last = slots.last().copied();
            let next = last.and_then(|last| plan.schedule.as_ref()?.next_after(last)).filter(|&next| next <= now);
            match next {
                // More were due than a turn starts: the next turn goes on from there.
                Some(next) => {
                    self.schedules.insert(flow, next);
                }
                // None left due (or none in the window at all): the first slot after now.
                None => self.arm_schedule(&plan, last.map_or(now, |last| now.max(last))),
            }
        }
    }

    /// The host's clock went back (a time correction): every schedule is armed at its first
    /// slot after `now`, not left at a slot the old clock chose, which would come only when
    /// the clock got there again (an hour's step back, an hour without runs). A slot started
    /// already is not started twice: its run id follows from it.
    fn rearm_after_clock_fell_back(&mut self, now: Millis) {
        warn!(back_ms = self.schedules_checked_ms - now, "the clock went back; the schedules are armed again from now");
        let latest: Vec<Arc<FlowPlan>> = self
            .schedules
            .keys()
            .filter_map(|flow| self.catalog.get(flow).and_then(|versions| versions.last()))
            .map(|latest| latest.plan.clone())
            .collect();
        for plan in latest {
            self.arm_schedule(&plan, now);
        }
    }

    /// Starts the run of `flow`'s `slot` through the API (beside the actor).
    fn start_slot(&self, flow: &str, schedule: &flowgrid_model::Schedule, slot: Millis) {
        let start = StartRun::for_schedule_slot(flow.to_owned(), schedule, slot);
        let client = flowgrid_sdk::Client::new(self.context.nats.clone(), self.context.subjects.prefix());
        let flow = flow.to_owned();
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
    }
}

/// The slots of `timetable` to start at `now` from the armed `slot` (due), oldest first:
/// those of the last [`CATCH_UP_MS`], at most [`SLOTS_PER_TURN_MAX`]; and, when older
/// ones were skipped, the time before which they were.
fn due_slots(
    timetable: &flowgrid_model::schedule::Timetable,
    slot: Millis,
    now: Millis,
) -> (Vec<Millis>, Option<Millis>) {
    let floor = now.saturating_sub(CATCH_UP_MS);
    let (mut next, skipped_before) =
        if slot < floor { (timetable.next_after(floor.saturating_sub(1)), Some(floor)) } else { (Some(slot), None) };
    let mut slots = Vec::new();
    while let Some(at) = next.filter(|&at| at <= now && slots.len() < SLOTS_PER_TURN_MAX) {
        slots.push(at);
        next = timetable.next_after(at);
    }
    (slots, skipped_before)
}

/// Arms each flow of `reloaded` at its slot in `armed` where that one is older; a flow no
/// longer in `reloaded` (its schedule gone, or paused) stays unarmed.
fn keep_older_slots(reloaded: &mut BTreeMap<String, Millis>, armed: BTreeMap<String, Millis>) {
    for (flow, slot) in armed {
        if let Some(reloaded_slot) = reloaded.get_mut(&flow) {
            *reloaded_slot = (*reloaded_slot).min(slot);
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

    use std::collections::BTreeMap;

    use super::{due_slots, keep_older_slots, newest_due, CATCH_UP_MS, SLOTS_PER_TURN_MAX};

    #[test]
    fn a_process_that_wakes_past_its_slots_starts_the_newest_due_only() {
        let every_3s = Timetable::Every(3_000);
        assert_eq!(newest_due(&every_3s, 6_000, 11_700), 9_000, "slot 6 s is skipped for 9 s");
        assert_eq!(newest_due(&every_3s, 6_000, 6_000), 6_000, "on time: the slot itself");
        assert_eq!(newest_due(&every_3s, 6_000, 8_999), 6_000);
    }

    /// A shard that kept serving but whose turn came late starts every slot that fell
    /// meanwhile, oldest first; past the catch-up window, only those within it; and no more
    /// than a turn takes (the rest go in the next turns).
    #[test]
    fn a_late_turn_starts_every_slot_that_fell_meanwhile() {
        let every_1s = Timetable::Every(1_000);
        assert_eq!(due_slots(&every_1s, 6_000, 8_500), (vec![6_000, 7_000, 8_000], None));
        assert_eq!(due_slots(&every_1s, 6_000, 6_000), (vec![6_000], None), "on time: the slot itself");
        let now = 10 * CATCH_UP_MS;
        let (slots, skipped) = due_slots(&Timetable::Every(10_000), 1_000_000 - CATCH_UP_MS * 5, 1_000_000);
        assert_eq!(slots, (940_000..=1_000_000).step_by(10_000).collect::<Vec<_>>());
        assert_eq!(skipped, Some(1_000_000 - CATCH_UP_MS));
        // Behind by hours, with no slot in the last minute: none to start, the rest skipped.
        let hourly = Timetable::Every(3_600_000);
        assert_eq!(due_slots(&hourly, 36_000_000, 45_000_000), (vec![], Some(45_000_000 - CATCH_UP_MS)));
        let (slots, skipped) = due_slots(&every_1s, now - CATCH_UP_MS, now);
        assert_eq!((slots.len(), slots[0], skipped), (SLOTS_PER_TURN_MAX, now - CATCH_UP_MS, None));
    }

    /// A reload after a failed commit goes on from the slots armed before it: the reload
    /// alone arms the newest due slot, which would skip those that fell meanwhile.
    #[test]
    fn a_reload_after_a_failed_commit_keeps_the_older_slots_armed() {
        let mut reloaded = BTreeMap::from([("late".to_owned(), 9_000), ("new".to_owned(), 5_000)]);
        let armed = BTreeMap::from([("late".to_owned(), 6_000), ("new".to_owned(), 7_000), ("gone".to_owned(), 1_000)]);
        keep_older_slots(&mut reloaded, armed);
        let expected = BTreeMap::from([("late".to_owned(), 6_000), ("new".to_owned(), 5_000)]);
        assert_eq!(reloaded, expected, "a flow the reload did not arm stays unarmed");
    }
}
