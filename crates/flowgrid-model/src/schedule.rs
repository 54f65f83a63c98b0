//! A flow's timetable: when its schedule starts a run.
//!
//! Slots are moments in UTC, the same on every coordinator: an `every_ms` schedule's slots
//! are the multiples of `every_ms` since the Unix epoch, a cron schedule's slots the
//! minutes its expression matches. A run started for a slot carries the slot in its
//! idempotency key, so each slot starts one run however many coordinators see it.

use chrono::{DateTime, Utc};

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
    /// At every minute a cron expression (5 fields, UTC) matches.
    Cron(Box<croner::Cron>),
}

impl Timetable {
    /// Parses a cron expression: 5 fields (minute, hour, day of month, month, day of week).
    /// One that never matches (`0 0 30 2 *`) is refused too.
    pub fn cron(expression: &str) -> Result<Timetable, String> {
        let cron = croner::Cron::new(expression).parse().map_err(|error| error.to_string())?;
        let timetable = Timetable::Cron(Box::new(cron));
        match timetable.next_after(0) {
            Some(_) => Ok(timetable),
            None => Err("it never matches".to_owned()),
        }
    }

    /// The first slot strictly after `after_ms`; `None` when there is none (a cron
    /// expression that never matches again).
    pub fn next_after(&self, after_ms: Millis) -> Option<Millis> {
        match self {
            Timetable::Every(every_ms) => Some((after_ms / every_ms + 1) * every_ms),
            Timetable::Cron(cron) => {
                let after = DateTime::<Utc>::from_timestamp_millis(i64::try_from(after_ms).ok()?)?;
                let next = cron.find_next_occurrence(&after, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
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
}
