//! A flow's timetable: when its schedule starts a run.
//!
//! Slots are moments in UTC, the same on every coordinator: an `every_ms` schedule's slots
//! are the multiples of `every_ms` since the Unix epoch, a cron schedule's slots the
//! minutes its expression matches on the wall clock of its time zone (UTC by default). A
//! run started for a slot carries the slot in its idempotency key, so each slot starts one
//! run however many coordinators see it.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::definition::Schedule;
use crate::Millis;

/// The shortest `every_ms`: a schedule is for periodic work, not a loop.
pub const EVERY_MS_MIN: u64 = 1_000;
/// The longest `every_ms` (366 days).
pub const EVERY_MS_MAX: u64 = crate::limits::DURATION_MS_MAX;

/// When a schedule starts runs.
#[derive(Clone, Debug)]
pub enum Timetable {
    /// At every multiple of this many milliseconds since the Unix epoch.
    Every(u64),
    /// At every minute a cron expression (5 fields) matches on the wall clock of a zone.
    Cron(Box<croner::Cron>, Tz),
}

/// Searches for one slot of a cron expression in an hour a clock change repeats: from a
/// minute later each, for up to two hours.
const CRON_STEPS_MAX: usize = 120;
const CRON_STEP_MS: Millis = 60_000;
/// Times the search for a cron slot starts again later when it found none (a clock that
/// jumps by more than an hour), and by how much.
const CRON_JUMPS_MAX: u32 = 3;
const CRON_JUMP_MS: Millis = 3 * 3_600_000;

impl Timetable {
    /// Parses a cron expression: 5 fields (minute, hour, day of month, month, day of week).
    /// One that never matches (`0 0 30 2 *`) is refused too.
    pub fn cron(expression: &str) -> Result<Timetable, String> {
        Timetable::cron_in(expression, Tz::UTC)
    }

    /// [`Timetable::cron`] read on the wall clock of `zone`.
    pub fn cron_in(expression: &str, zone: Tz) -> Result<Timetable, String> {
        let cron = croner::Cron::new(expression).parse().map_err(|error| error.to_string())?;
        let timetable = Timetable::Cron(Box::new(cron), zone);
        match timetable.next_after(0) {
            Some(_) => Ok(timetable),
            None => Err("it never matches".to_owned()),
        }
    }

    /// The timetable of a schedule as a definition gives it, or why it has none.
    pub fn of(schedule: &Schedule) -> Result<Timetable, String> {
        match (schedule.every_ms, &schedule.cron) {
            (Some(every_ms), _) => Ok(Timetable::Every(every_ms.max(1))),
            (None, Some(cron)) => {
                let zone = schedule.timezone.as_deref().map_or(Ok(Tz::UTC), Timetable::zone)?;
                Timetable::cron_in(cron, zone)
            }
            (None, None) => Err("a schedule needs `every_ms` or `cron`".to_owned()),
        }
    }

    /// The slots from `since_ms` (included) to `until_ms` (excluded), oldest first; `Err`
    /// with `max` when there are more than `max` of them.
    pub fn slots_between(&self, since_ms: Millis, until_ms: Millis, max: usize) -> Result<Vec<Millis>, usize> {
        let mut slots = Vec::new();
        let mut slot = self.next_after(since_ms.saturating_sub(1));
        while let Some(at_ms) = slot.filter(|at_ms| *at_ms < until_ms) {
            if slots.len() == max {
                return Err(max);
            }
            slots.push(at_ms);
            slot = self.next_after(at_ms);
        }
        Ok(slots)
    }

    /// The first slot strictly after `after_ms`; `None` when there is none (a cron
    /// expression that never matches again).
    pub fn next_after(&self, after_ms: Millis) -> Option<Millis> {
        match self {
            Timetable::Every(every_ms) => Some((after_ms / every_ms + 1) * every_ms),
            Timetable::Cron(cron, zone) => {
                let next_from = |from_ms: Millis| {
                    let from =
                        DateTime::<Utc>::from_timestamp_millis(i64::try_from(from_ms).ok()?)?.with_timezone(zone);
                    let next = cron.find_next_occurrence(&from, false).ok()?;
                    u64::try_from(next.timestamp_millis()).ok()
                };
                // Around a clock change the search may give a time of the first pass of an
                // hour the clock repeats, before `after_ms` (it goes on a minute later), or
                // none when the clock jumps further than it looks (it looks again from later).
                let (mut from_ms, mut jumps) = (after_ms, 0);
                for _ in 0..CRON_STEPS_MAX {
                    match next_from(from_ms) {
                        Some(next_ms) if next_ms > after_ms => return Some(next_ms),
                        Some(_) => from_ms = from_ms.saturating_add(CRON_STEP_MS),
                        _ if jumps < CRON_JUMPS_MAX => {
                            jumps += 1;
                            from_ms = from_ms.saturating_add(CRON_JUMP_MS);
                        }
                        _ => return None,
                    }
                }
                None
            }
        }
    }

    /// The IANA time zone `name` (`Europe/Berlin`), or why it is none.
    pub fn zone(name: &str) -> Result<Tz, String> {
        name.parse::<Tz>().map_err(|_| format!("`{name}` is not an IANA time zone: use a name such as `Europe/Berlin`"))
    }

    /// The idempotency key of the run started for `slot_ms`.
    pub fn run_key(slot_ms: Millis) -> String {
        format!("schedule-{slot_ms}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slots_are_multiples_of_the_period() {
        let every = Timetable::Every(60_000);
        assert_eq!(every.next_after(0), Some(60_000));
        assert_eq!(every.next_after(59_999), Some(60_000));
        assert_eq!(every.next_after(60_000), Some(120_000), "strictly after");
    }

    #[test]
    fn cron_slots_are_the_minutes_it_matches_in_utc() {
        let six_hourly = Timetable::cron("0 */6 * * *").unwrap();
        // 2026-01-01T00:00:00Z is 1767225600000.
        let midnight = 1_767_225_600_000;
        assert_eq!(six_hourly.next_after(midnight), Some(midnight + 6 * 3_600_000));
        assert_eq!(six_hourly.next_after(midnight - 1), Some(midnight));
        assert!(Timetable::cron("61 * * * *").is_err());
        assert!(Timetable::cron("not a cron").is_err());
        let started = std::time::Instant::now();
        assert_eq!(Timetable::cron("0 0 30 2 *").err().as_deref(), Some("it never matches"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(Timetable::run_key(midnight), "schedule-1767225600000");
    }

    #[test]
    fn the_slots_between_two_times_include_the_first_and_not_the_last() {
        let every = Timetable::Every(60_000);
        assert_eq!(every.slots_between(60_000, 240_000, 10), Ok(vec![60_000, 120_000, 180_000]));
        assert_eq!(every.slots_between(60_001, 120_001, 10), Ok(vec![120_000]));
        assert_eq!(every.slots_between(60_000, 11 * 60_000, 10).map(|slots| slots.len()), Ok(10), "up to the bound");
        assert_eq!(every.slots_between(60_000, 11 * 60_000 + 1, 10), Err(10), "more than the bound");
        let schedule = Schedule {
            cron: Some("0 9 * * 1-5".into()),
            timezone: Some("Europe/Berlin".into()),
            ..Schedule::default()
        };
        let weekdays = Timetable::of(&schedule).expect("a valid schedule");
        // 2026-01-05 (a Monday) to 2026-01-12: five mornings at 8:00 UTC.
        let monday = 1_767_571_200_000;
        let slots = weekdays.slots_between(monday, monday + 7 * 86_400_000, 100).expect("five");
        assert_eq!(slots, (0..5).map(|day| monday + day * 86_400_000 + 8 * 3_600_000).collect::<Vec<_>>());
        let no_zone =
            Schedule { cron: Some("0 9 * * *".into()), timezone: Some("Mars/Olympus".into()), ..Schedule::default() };
        assert!(Timetable::of(&no_zone).unwrap_err().contains("IANA"));
        assert!(Timetable::of(&Schedule::default()).is_err());
    }

    #[test]
    fn the_next_slot_is_later_even_in_the_hour_a_clock_change_repeats() {
        let every_five = Timetable::cron_in("*/5 * * * *", Timetable::zone("Europe/Berlin").unwrap()).unwrap();
        // 2026-10-25T01:30:00Z is 2:30 in Berlin, the second time (clocks went back at 3:00).
        let after = 1_792_891_800_000;
        let next = every_five.next_after(after).expect("a slot");
        assert!(next > after && next <= after + 3_600_000, "{next} after {after}");
        // And every slot from there on is later than the one before.
        let slots = every_five.slots_between(after - 3 * 3_600_000, after + 3 * 3_600_000, 1_000).unwrap();
        assert!(slots.windows(2).all(|pair| pair[0] < pair[1]), "{slots:?}");
    }

    #[test]
    fn cron_slots_in_a_zone_follow_its_wall_clock_through_summer_time() {
        let nine = Timetable::cron_in("0 9 * * *", Timetable::zone("Europe/Berlin").unwrap()).unwrap();
        // 2026-01-15T00:00:00Z: 9:00 in Berlin is 8:00 UTC in winter (UTC+1).
        let winter = 1_768_435_200_000;
        assert_eq!(nine.next_after(winter), Some(winter + 8 * 3_600_000));
        // 2026-07-15T00:00:00Z: and 7:00 UTC in summer (UTC+2).
        let summer = 1_784_073_600_000;
        assert_eq!(nine.next_after(summer), Some(summer + 7 * 3_600_000));
        assert!(Timetable::zone("Mars/Olympus").unwrap_err().contains("not an IANA time zone"));
    }

    #[test]
    fn a_wall_clock_time_skipped_goes_after_the_jump_and_one_passed_twice_goes_once() {
        let half_past_two = Timetable::cron_in("30 2 * * *", Timetable::zone("Europe/Berlin").unwrap()).unwrap();
        let slots = |after: Millis| {
            let first = half_past_two.next_after(after).expect("a slot");
            [first, half_past_two.next_after(first).expect("a slot")]
        };
        // 2026-03-29, 2:00 -> 3:00 in Berlin: that day's slot is 3:00 (1:00 UTC).
        let hour = 3_600_000;
        let march_29 = 1_774_742_400_000;
        assert_eq!(slots(march_29 - 12 * hour), [march_29 + hour, march_29 + 24 * hour + hour / 2]);
        // 2026-10-25, 3:00 -> 2:00: 2:30 comes twice, the slot once (0:30 UTC).
        let october_25 = 1_792_886_400_000;
        assert_eq!(slots(october_25 - 12 * hour), [october_25 + hour / 2, october_25 + 24 * hour + 3 * hour / 2]);
    }
}
