//! Retry decisions and backoff delays.
//!
//! The delay is a pure function of the policy and the failed attempt: the jitter is a
//! hash of the attempt's message id, never a random draw, so a replayed run arms the same
//! timers at the same times.

use flowgrid_model::{AttemptId, Millis, RetryPolicy};
use xxhash_rust::xxh3::xxh3_64;

use crate::TaskError;

/// Whether a failed attempt is retried; `tries` counts it and the attempts of its slot
/// before it (1 for the first).
pub(super) fn should_retry(policy: &RetryPolicy, error: &TaskError, tries: u32) -> bool {
    error.retryable
        && tries < policy.max_attempts
        && policy.retry_on.iter().any(|code| code == "*" || *code == error.code)
}

/// The delay after `failed`, the `tries`-th attempt of its slot, before its next attempt:
/// `min(initial * multiplier^(tries-1), max)`, shortened by up to `jitter` of itself.
pub(super) fn backoff_ms(policy: &RetryPolicy, failed: &AttemptId, tries: u32) -> Millis {
    let exponent = i32::try_from(tries.saturating_sub(1)).unwrap_or(i32::MAX);
    let grown = policy.initial_backoff_ms as f64 * policy.backoff_multiplier.powi(exponent);
    let ceiling = policy.max_backoff_ms as f64;
    // A NaN or infinite growth (absurd multipliers) is capped like any other long delay.
    let capped = if grown.is_finite() { grown.clamp(0.0, ceiling) } else { ceiling };
    let jitter = if policy.jitter.is_finite() { policy.jitter.clamp(0.0, 1.0) } else { 0.0 };
    let delay = capped * (1.0 - jitter * unit_hash(&failed.message_id()));
    delay.floor() as Millis
}

/// A number in `[0, 1)` derived from `text` (53 bits of its xxh3 hash).
pub(super) fn unit_hash(text: &str) -> f64 {
    const MANTISSA_BITS: u32 = 53;
    (xxh3_64(text.as_bytes()) >> (64 - MANTISSA_BITS)) as f64 / (1u64 << MANTISSA_BITS) as f64
}

#[cfg(test)]
mod tests {
    use flowgrid_model::RunId;

    use super::*;

    fn attempt(number: u32) -> AttemptId {
        AttemptId { run_id: RunId("run-1".into()), step: "fetch".to_owned(), item: None, attempt: number }
    }

    fn error(code: &str, retryable: bool) -> TaskError {
        TaskError { code: code.to_owned(), message: "boom".to_owned(), retryable }
    }

    #[test]
    fn backoff_grows_and_is_capped_without_jitter() {
        let policy = RetryPolicy {
            initial_backoff_ms: 100,
            backoff_multiplier: 3.0,
            max_backoff_ms: 1_000,
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let delays: Vec<Millis> = (1..=4).map(|number| backoff_ms(&policy, &attempt(number), number)).collect();
        assert_eq!(delays, vec![100, 300, 900, 1_000]);
    }

    #[test]
    fn jitter_stays_in_bounds_and_is_deterministic() {
        let policy = RetryPolicy { initial_backoff_ms: 1_000, jitter: 0.5, ..RetryPolicy::default() };
        for number in 1..50 {
            let failed = attempt(number);
            let full = (1_000.0 * 2f64.powi(number as i32 - 1)).min(30_000.0);
            let delay = backoff_ms(&policy, &failed, number) as f64;
            assert!(delay <= full);
            assert!(delay >= (full * 0.5).floor());
            assert_eq!(backoff_ms(&policy, &failed, number), backoff_ms(&policy, &failed, number));
        }
    }

    #[test]
    fn unit_hash_is_below_one() {
        for number in 0..1_000 {
            let value = unit_hash(&number.to_string());
            assert!((0.0..1.0).contains(&value));
        }
    }

    #[test]
    fn retry_respects_attempts_codes_and_retryable() {
        let policy = RetryPolicy { max_attempts: 3, retry_on: vec!["busy".to_owned()], ..RetryPolicy::default() };
        assert!(should_retry(&policy, &error("busy", true), 1));
        assert!(should_retry(&policy, &error("busy", true), 2));
        assert!(!should_retry(&policy, &error("busy", true), 3));
        assert!(!should_retry(&policy, &error("busy", false), 1));
        assert!(!should_retry(&policy, &error("other", true), 1));
        let all = RetryPolicy::default();
        assert!(should_retry(&all, &error("other", true), 1));
    }
}
