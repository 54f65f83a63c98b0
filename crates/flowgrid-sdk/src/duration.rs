//! Durations and moments as flowgrid's tools read them on the command line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowgrid_model::Millis;

/// `250ms`, `60s`, `5m`, `1h 30m`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(text)
            .map_err(|error| format!("{text:?} is not a duration ({error}); use e.g. 500ms, 60s, 5m")),
    }
}

/// A moment as Unix ms: `2026-12-05T10:00:00Z` (RFC 3339, with any offset; without one,
/// UTC), `2026-12-05` (its midnight, UTC), or a duration that long ago (`90m`, `2h`, `7d`).
pub fn parse_time(text: &str) -> Result<Millis, String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as Millis);
    parse_time_at(text, now)
}

/// A moment ahead as Unix ms: a time as [`parse_time`] takes it, or a duration that long
/// from now (`90m`, `2h`): when a run given a start time starts.
pub fn parse_start_time(text: &str) -> Result<Millis, String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as Millis);
    let text = text.trim();
    match duration_of(text) {
        Some(ahead) => Ok(now.saturating_add(ahead)),
        None => moment(text).ok_or_else(|| {
            format!(
                "{text:?} is neither a time nor a duration; use e.g. 2026-12-05T10:00:00Z, 2026-12-05 or 2h (from now)"
            )
        }),
    }
}

fn parse_time_at(text: &str, now_ms: Millis) -> Result<Millis, String> {
    let text = text.trim();
    let refused =
        || format!("{text:?} is neither a time nor a duration; use e.g. 2026-12-05T10:00:00Z, 2026-12-05 or 2h (ago)");
    if let Some(ago) = duration_of(text) {
        return Ok(now_ms.saturating_sub(ago));
    }
    moment(text).ok_or_else(refused)
}

/// `text` as a duration in ms (`90m`, `2h`), if it is one (a date is not).
fn duration_of(text: &str) -> Option<Millis> {
    let duration = humantime::parse_duration(text).ok().filter(|_| !text.contains('-'))?;
    Millis::try_from(duration.as_millis()).ok()
}

/// `text` as a time (RFC 3339, a time without offset in UTC, or a date's midnight UTC).
fn moment(text: &str) -> Option<Millis> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text)
        .map(|moment| moment.timestamp_millis())
        .or_else(|_| {
            let text = text.replacen(' ', "T", 1);
            chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|moment| moment.and_utc().timestamp_millis())
        })
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(|day| day.and_time(chrono::NaiveTime::MIN).and_utc().timestamp_millis())
        });
    parsed.ok().and_then(|ms| Millis::try_from(ms).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_moments_or_durations_ago() {
        let now = 1_764_930_000_000; // 2025-12-05T10:20:00Z
        assert_eq!(parse_time_at("2025-12-05T10:00:00Z", now), Ok(1_764_928_800_000));
        assert_eq!(parse_time_at("2025-12-05T11:00:00+01:00", now), Ok(1_764_928_800_000));
        assert_eq!(parse_time_at("2025-12-05 10:00:00", now), Ok(1_764_928_800_000), "no zone: UTC");
        assert_eq!(parse_time_at("2025-12-05T10:00:00.250Z", now), Ok(1_764_928_800_250));
        assert_eq!(parse_time_at("2025-12-05", now), Ok(1_764_892_800_000), "a date: its midnight");
        assert_eq!(parse_time_at("20m", now), Ok(1_764_928_800_000), "a duration: that long ago");
        assert_eq!(parse_time_at("1h 30m", now), Ok(now - 5_400_000));
        for bad in ["yesterday", "2025-13-05", "10:00", "-5m", "", "20000000000000000s"] {
            let refusal = parse_time_at(bad, now).unwrap_err();
            assert!(refusal.contains("use e.g."), "{bad}: {refusal}");
        }
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2 days"), Ok(Duration::from_secs(2 * 86_400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
