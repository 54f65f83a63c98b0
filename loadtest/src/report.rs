//! The end of a run: a readable table on stdout, then one JSON line, last.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// p50/p99 (and more) of a histogram in microseconds, as milliseconds; `null` when empty.
pub fn quantiles_ms(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return json!({ "p50": null, "p99": null, "p999": null, "max": null, "count": 0 });
    }
    let at = |quantile: f64| round3(histogram.value_at_quantile(quantile) as f64 / 1_000.0);
    json!({
        "p50": at(0.5),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round3(histogram.max() as f64 / 1_000.0),
        "count": histogram.len(),
    })
}

pub fn round3(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

pub fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Prints `rows` as an aligned two-column table under `title`.
pub fn print_table(title: &str, rows: &[(String, String)]) {
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    println!("{title}");
    println!("{}", "-".repeat(title.len().max(width + 20)));
    for (name, value) in rows {
        println!("{name:<width$}  {value}");
    }
    println!();
}

/// `p50 1.234 ms  p99 5.678 ms  p99.9 ...  (n samples)` or `no samples`.
pub fn describe_latency(value: &Value) -> String {
    match (value["p50"].as_f64(), value["p99"].as_f64()) {
        (Some(p50), Some(p99)) => format!(
            "p50 {p50:.3} ms   p99 {p99:.3} ms   p99.9 {:.3} ms   max {:.3} ms   ({} samples)",
            value["p999"].as_f64().unwrap_or(0.0),
            value["max"].as_f64().unwrap_or(0.0),
            value["count"]
        ),
        _ => "no samples".to_owned(),
    }
}

pub fn describe_errors(total: u64, kinds: &BTreeMap<String, u64>) -> String {
    if kinds.is_empty() {
        return total.to_string();
    }
    let parts: Vec<String> = kinds.iter().map(|(kind, count)| format!("{kind} {count}")).collect();
    format!("{total} ({})", parts.join(", "))
}

/// The final line: compact JSON, nothing after it.
pub fn print_json_line(value: &Value) {
    println!("{}", serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::new_histogram;

    #[test]
    fn empty_histograms_give_nulls() {
        let value = quantiles_ms(&new_histogram());
        assert!(value["p50"].is_null());
        assert_eq!(describe_latency(&value), "no samples");
    }

    #[test]
    fn quantiles_are_in_milliseconds() {
        let mut histogram = new_histogram();
        for micros in 1..=1_000 {
            histogram.record(micros).unwrap();
        }
        let value = quantiles_ms(&histogram);
        let p50 = value["p50"].as_f64().unwrap();
        assert!((0.49..0.51).contains(&p50), "{p50}");
    }
}
