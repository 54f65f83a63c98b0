//! `flowgrid audit`: checks a stopped grid's embedded store for broken promises (results
//! applied twice, commits under a stale epoch, gaps in a run's history) and exits 1 when
//! it finds any, so that a chaos run can end with it.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context};

use flowgrid_coordinator::audit::{audit as audit_store, AuditReport};

use crate::args::AuditArgs;
use crate::output::{out, print_json};
use crate::Session;

pub(crate) async fn audit(args: &AuditArgs, session: &Session) -> anyhow::Result<ExitCode> {
    if !args.data_dir.is_dir() {
        bail!(
            "{} is not a directory; pass the --data-dir the coordinators used (`make up` uses .grid/data)",
            args.data_dir.display()
        );
    }
    let recorded = flowgrid_coordinator::data_dir::recorded_shards(&args.data_dir)?;
    let shards = match (args.shards, recorded) {
        (Some(given), Some(recorded)) if given != recorded => bail!(
            "{}'s grid has {recorded} shards (its grid.json), not {given}: pass --shards {recorded}, or leave \
             --shards out",
            args.data_dir.display()
        ),
        (Some(given), _) => given,
        (None, recorded) => recorded.unwrap_or(flowgrid_model::SHARDS_DEFAULT),
    };
    if shards == 0 {
        bail!("--shards is 0; pass the --shards the coordinators used ({} by default)", flowgrid_model::SHARDS_DEFAULT);
    }
    if recorded.is_none() {
        // No grid.json says the count: the shard files say at least how many there are.
        if let Some((last, path)) = flowgrid_coordinator::audit::last_shard_file(&args.data_dir) {
            if last >= shards {
                let taken = if args.shards.is_some() { "given with --shards" } else { "by default" };
                bail!(
                    "{} holds shard files up to {}, beyond the {shards} shards to audit ({taken}; no grid.json \
                     records the grid's count): pass --shards {}, or the grid's shard count if it is more",
                    args.data_dir.display(),
                    path.file_name().map_or_else(|| path.display().to_string(), |name| name.to_string_lossy().into()),
                    u64::from(last) + 1
                );
            }
        }
    }
    // The audit's own errors say what to fix (e.g. a coordinator still holds a shard file).
    let report = audit_store(&args.data_dir, shards)
        .await
        .with_context(|| format!("cannot audit the store in {}", args.data_dir.display()))?;
    if session.json {
        print_json(&report)?;
    } else {
        out!("{}", render_report(&report, &args.data_dir.display().to_string()))?;
    }
    Ok(if violations(&report) == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Broken invariants found: each one is a promise of the grid that did not hold.
fn violations(report: &AuditReport) -> u64 {
    report.results_double_applied
        + u64::from(report.shards_not_served)
        + u64::from(report.shard_files_beyond)
        + report.stale_epoch_commits
        + report.history_gaps
        + report.gate_places_leaked
        + report.runs_misplaced
        + report.corrupt_records
}

/// Fields of the report printed by name; every other count is listed under "other checks".
const REPORTED_FIELDS: [&str; 11] = [
    "shards",
    "shards_not_served",
    "shard_files_beyond",
    "runs",
    "runs_active",
    "runs_by_status",
    "results_double_applied",
    "stale_epoch_commits",
    "history_gaps",
    "gate_places_leaked",
    "problems",
];

fn render_report(report: &AuditReport, data_dir: &str) -> String {
    let mut rows: Vec<(String, String)> =
        vec![("runs".into(), format!("{} ({} active)", report.runs, report.runs_active))];
    for (status, count) in &report.runs_by_status {
        rows.push((format!("  {status}"), count.to_string()));
    }
    if report.shards_not_served > 0 {
        rows.push(("shards not served".into(), report.shards_not_served.to_string()));
    }
    if report.shard_files_beyond > 0 {
        rows.push(("shard files not audited".into(), report.shard_files_beyond.to_string()));
    }
    rows.push(("results applied twice".into(), report.results_double_applied.to_string()));
    rows.push(("stale-epoch commits".into(), report.stale_epoch_commits.to_string()));
    rows.push(("history gaps".into(), report.history_gaps.to_string()));
    rows.push(("concurrency slots lost".into(), report.gate_places_leaked.to_string()));
    let others = other_counts(report);
    if !others.is_empty() {
        rows.push(("other checks:".into(), String::new()));
        for (name, count) in others {
            rows.push((format!("  {}", name.replace('_', " ")), count.to_string()));
        }
    }
    let width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0) + 2;
    let mut text = String::new();
    let _ = writeln!(text, "audit of {data_dir} ({} shards)", report.shards);
    for (label, value) in &rows {
        let _ = writeln!(text, "{}", format!("{label:<width$}{value}").trim_end());
    }
    if !report.problems.is_empty() {
        text.push_str("problems:\n");
        for problem in &report.problems {
            let _ = writeln!(text, "  {problem}");
        }
    }
    let broken = violations(report);
    if broken == 0 {
        text.push_str("ok: no result applied twice, no stale-epoch commit, no history gap, no concurrency slot lost\n");
    } else {
        let _ = writeln!(text, "FAILED: {broken} violation{}", if broken == 1 { "" } else { "s" });
    }
    text
}

/// Counts of the report beyond the ones printed by name, in name order.
fn other_counts(report: &AuditReport) -> Vec<(String, u64)> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(report) else { return Vec::new() };
    fields
        .into_iter()
        .filter(|(name, _)| !REPORTED_FIELDS.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name, value.as_u64()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> AuditReport {
        let mut report = AuditReport { shards: 8, runs: 12, runs_active: 2, ..Default::default() };
        report.runs_by_status.insert("running".into(), 2);
        report.runs_by_status.insert("succeeded".into(), 10);
        report
    }

    #[test]
    fn a_clean_store_passes() {
        let report = report();
        assert_eq!(violations(&report), 0);
        let text = render_report(&report, "data");
        assert!(text.starts_with("audit of data (8 shards)\nruns "), "{text}");
        assert!(text.contains(" 12 (2 active)\n  running "), "{text}");
        assert!(text.contains("\nstale-epoch commits "), "{text}");
        let width = text.lines().nth(1).unwrap().find("12").unwrap();
        for line in text.lines().skip(1).take(5) {
            assert!(line.len() > width && line.as_bytes()[width - 1] == b' ', "values align: {text}");
        }
        assert!(
            text.ends_with(
                "ok: no result applied twice, no stale-epoch commit, no history gap, no concurrency slot lost\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn any_violation_fails_and_lists_the_problems() {
        for field in 0..8 {
            let mut report = report();
            match field {
                0 => report.results_double_applied = 1,
                1 => report.stale_epoch_commits = 1,
                2 => report.shards_not_served = 1,
                3 => report.gate_places_leaked = 1,
                4 => report.runs_misplaced = 1,
                // A record that does not decode (an outbox message, a concurrency limit's place).
                5 => report.corrupt_records = 1,
                // A shard file past the shards audited: its runs were not read.
                6 => report.shard_files_beyond = 1,
                _ => report.history_gaps = 1,
            }
            assert_eq!(violations(&report), 1);
        }
        let mut report = report();
        report.history_gaps = 2;
        report.problems.push("run r-1: history sequence 4 missing".into());
        let text = render_report(&report, "data");
        assert!(text.contains("problems:\n  run r-1: history sequence 4 missing\n"), "{text}");
        assert!(text.ends_with("FAILED: 2 violations\n"), "{text}");
    }
}
