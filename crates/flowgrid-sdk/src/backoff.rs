//! Exponential backoff: a delay that doubles from `initial` up to `max`.
//!
//! Pure (no clock, no sleeping) so that schedules are unit-tested; callers sleep.

use std::time::Duration;

/// A doubling delay schedule.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial` and doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        assert!(!initial.is_zero(), "backoff must start above zero");
        assert!(initial <= max, "backoff must start at or below its maximum");
        Backoff { next: initial, max }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// The delay before try `tries + 1` of a schedule that starts at `initial` and doubles
    /// up to `max`: `initial` after the first try (and after none), `max` from far enough
    /// on. For callers that count their tries elsewhere (a message's deliveries).
    pub fn after(initial: Duration, max: Duration, tries: u64) -> Duration {
        // Past 31 doublings any delay is at `max`; the shift stays within a u32.
        let doublings = tries.saturating_sub(1).min(31) as u32;
        initial.saturating_mul(1 << doublings).min(max)
    }

    /// The next delay, cut to what is left of a budget; `None` once the budget is spent.
    pub fn next_delay_within(&mut self, remaining: Duration) -> Option<Duration> {
        if remaining.is_zero() {
            return None;
        }
        Some(self.next_delay().min(remaining))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    #[test]
    fn delays_double_up_to_the_maximum() {
        let mut backoff = Backoff::new(ms(50), ms(2_000));
        let delays: Vec<_> = (0..9).map(|_| backoff.next_delay()).collect();
        let expected = [50, 100, 200, 400, 800, 1_600, 2_000, 2_000, 2_000].map(ms);
        assert_eq!(delays, expected);
    }

    #[test]
    fn a_budget_cuts_the_last_delay_and_then_stops() {
        let mut backoff = Backoff::new(ms(20), ms(500));
        assert_eq!(backoff.next_delay_within(ms(1_000)), Some(ms(20)));
        assert_eq!(backoff.next_delay_within(ms(30)), Some(ms(30)));
        assert_eq!(backoff.next_delay_within(Duration::ZERO), None);
    }
}
