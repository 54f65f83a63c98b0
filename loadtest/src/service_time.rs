//! Simulated service time of a task: fixed, exponential or uniform.
//!
//! Samples come from a small xorshift generator seeded per worker, so a run's service
//! times are reproducible and no random-number crate is needed.

use std::time::Duration;

use flowgrid_sdk::parse_duration;

#[derive(Clone, Debug, PartialEq)]
pub enum ServiceTime {
    Fixed(Duration),
    /// Exponential with this mean.
    Exponential(Duration),
    /// Uniform between the two bounds.
    Uniform(Duration, Duration),
}

impl ServiceTime {
    /// `--service-time`: one duration.
    pub fn parse_fixed(text: &str) -> Result<ServiceTime, String> {
        parse_duration(text).map(ServiceTime::Fixed)
    }

    /// `--service-time-dist`: `exp:MEAN`, `uniform:LOW..HIGH` or `fixed:D`.
    pub fn parse_distribution(text: &str) -> Result<ServiceTime, String> {
        let (kind, rest) =
            text.split_once(':').ok_or_else(|| format!("{text:?}: use exp:2ms, uniform:1ms..3ms or fixed:1ms"))?;
        match kind {
            "fixed" => parse_duration(rest).map(ServiceTime::Fixed),
            "exp" => parse_duration(rest).map(ServiceTime::Exponential),
            "uniform" => {
                let (low, high) = rest.split_once("..").ok_or_else(|| format!("{text:?}: use uniform:1ms..3ms"))?;
                let (low, high) = (parse_duration(low)?, parse_duration(high)?);
                if low > high {
                    return Err(format!("{text:?}: the lower bound is above the upper one"));
                }
                Ok(ServiceTime::Uniform(low, high))
            }
            other => Err(format!("unknown distribution {other:?}; use exp, uniform or fixed")),
        }
    }

    /// One sample, drawing from `random`.
    pub fn sample(&self, random: &mut XorShift) -> Duration {
        match self {
            ServiceTime::Fixed(duration) => *duration,
            ServiceTime::Exponential(mean) => {
                // 1 - u is in (0, 1], so the logarithm is finite.
                let uniform = 1.0 - random.next_unit();
                mean.mul_f64(-uniform.ln())
            }
            ServiceTime::Uniform(low, high) => *low + (*high - *low).mul_f64(random.next_unit()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ServiceTime::Fixed(duration) => format!("{duration:?}"),
            ServiceTime::Exponential(mean) => format!("exp(mean {mean:?})"),
            ServiceTime::Uniform(low, high) => format!("uniform({low:?}..{high:?})"),
        }
    }
}

/// xorshift64*: fast, small, good enough for service times and sampling.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // The state must never be zero.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse() {
        assert_eq!(ServiceTime::parse_distribution("exp:2ms"), Ok(ServiceTime::Exponential(Duration::from_millis(2))));
        assert_eq!(
            ServiceTime::parse_distribution("uniform:1ms..3ms"),
            Ok(ServiceTime::Uniform(Duration::from_millis(1), Duration::from_millis(3)))
        );
        assert!(ServiceTime::parse_distribution("uniform:3ms..1ms").is_err());
        assert!(ServiceTime::parse_distribution("normal:1ms").is_err());
    }

    #[test]
    fn exponential_samples_have_about_the_mean() {
        let mut random = XorShift::new(7);
        let distribution = ServiceTime::Exponential(Duration::from_millis(2));
        let total: Duration = (0..100_000).map(|_| distribution.sample(&mut random)).sum();
        let mean_ms = total.as_secs_f64() * 1_000.0 / 100_000.0;
        assert!((1.9..2.1).contains(&mean_ms), "mean {mean_ms} ms");
    }

    #[test]
    fn uniform_samples_stay_in_bounds() {
        let mut random = XorShift::new(3);
        let distribution = ServiceTime::Uniform(Duration::from_millis(1), Duration::from_millis(3));
        for _ in 0..10_000 {
            let sample = distribution.sample(&mut random);
            assert!(sample >= Duration::from_millis(1) && sample <= Duration::from_millis(3));
        }
    }
}
