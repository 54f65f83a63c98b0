//! This member's lease, as the member itself sees it.
//!
//! Others declare a member dead when they have not seen its record change for `lease`.
//! The member counts its lease from the moment it *sent* its last successful renewal
//! (others saw it no earlier), and keeps only two thirds of it, so it always stops
//! before anyone else may start: [`Lease::valid`] turns false while others still wait.
//!
//! A lease that ran out and was renewed later (the process was paused, or NATS was out of
//! reach) starts a new *term*: whatever was started under the old term must stop, since
//! others may have taken its shards in between. [`Lease::holds`] checks both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Lease {
    /// The lease others wait for before taking this member's shards.
    duration: Duration,
    origin: Instant,
    /// Microseconds after `origin` until which the lease holds; 0: not held.
    valid_until_us: AtomicU64,
    /// Renewals that came after the lease had run out.
    term: AtomicU64,
}

impl Lease {
    pub fn new(duration: Duration) -> Lease {
        Lease { duration, origin: Instant::now(), valid_until_us: AtomicU64::new(0), term: AtomicU64::new(0) }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The part of the lease this member uses: two thirds, the rest is the safety margin.
    pub fn held_for(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Records a renewal sent at `sent` and confirmed since.
    pub fn renewed(&self, sent: Instant) {
        self.renewed_at(sent, Instant::now());
    }

    fn renewed_at(&self, sent: Instant, now: Instant) {
        let until = sent.saturating_duration_since(self.origin) + self.held_for();
        let now_us = now.saturating_duration_since(self.origin).as_micros() as u64;
        // The new term first, then the new expiry: a check that sees the lease valid again
        // sees the new term too, so work of the old term never passes it.
        let before = self.valid_until_us.load(Ordering::Acquire);
        if before != 0 && before <= now_us {
            self.term.fetch_add(1, Ordering::AcqRel);
        }
        self.valid_until_us.fetch_max(until.as_micros() as u64, Ordering::AcqRel);
    }

    /// The current term: it changes each time the lease is renewed after running out.
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Whether the lease holds now and has held without a gap since `term` began.
    pub fn holds(&self, term: u64) -> bool {
        self.valid() && self.term() == term
    }

    /// Gives the lease up at once.
    pub fn revoke(&self) {
        self.valid_until_us.store(0, Ordering::Release);
    }

    /// Whether this member may still act for its shards.
    pub fn valid(&self) -> bool {
        self.valid_at(Instant::now())
    }

    fn valid_at(&self, now: Instant) -> bool {
        let now_us = now.saturating_duration_since(self.origin).as_micros() as u64;
        now_us < self.valid_until_us.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_two_thirds_of_its_duration_from_the_send() {
        let lease = Lease::new(Duration::from_millis(1500));
        let sent = Instant::now();
        assert!(!lease.valid_at(sent));
        lease.renewed(sent);
        assert!(lease.valid_at(sent + Duration::from_millis(999)));
        assert!(!lease.valid_at(sent + Duration::from_millis(1000)));
        lease.revoke();
        assert!(!lease.valid_at(sent));
    }

    #[test]
    fn a_renewal_after_the_lease_ran_out_starts_a_new_term() {
        let lease = Lease::new(Duration::from_millis(300));
        let sent = Instant::now();
        lease.renewed_at(sent, sent);
        assert_eq!(lease.term(), 0);
        // Renewed in time: same term.
        lease.renewed_at(sent + Duration::from_millis(100), sent + Duration::from_millis(150));
        assert_eq!(lease.term(), 0);
        // Renewed after running out (valid until +300 ms): a new term.
        lease.renewed_at(sent + Duration::from_millis(900), sent + Duration::from_millis(950));
        assert_eq!(lease.term(), 1);
    }

    #[test]
    fn an_older_renewal_never_shortens_the_lease() {
        let lease = Lease::new(Duration::from_millis(300));
        let sent = Instant::now();
        lease.renewed(sent + Duration::from_millis(100));
        lease.renewed(sent);
        assert!(lease.valid_at(sent + Duration::from_millis(250)));
    }
}
