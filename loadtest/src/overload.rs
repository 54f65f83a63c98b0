//! `flowgrid-loadtest overload`: workers stop, starts continue.
//!
//! One-task runs are started at `--rate` (open loop) with workers serving them for the
//! warm-up; then the workers stop and starts continue for `--duration`. The grid must
//! refuse starts explicitly (`overloaded`) once a bound is reached and its RSS must stop
//! growing. Reported: the RSS every second, starts accepted and refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{OverloadArgs, Workload};
use crate::driver::{self, Errors, Starter};
use crate::flows::Plan;
use crate::grid::Grid;
use crate::report::{self, describe_errors, print_table, round1};
use crate::tracker::{TaskSink, Tracker};
use crate::worker::spawn_pool_workers;

/// RSS grew less than this share from the first refused start to the end: a plateau.
const PLATEAU_GROWTH_MAX: f64 = 0.05;
/// Seconds of refusals needed to judge a plateau.
const PLATEAU_SAMPLES_MIN: usize = 10;

pub async fn overload(args: OverloadArgs) -> Result<()> {
    args.validate()?;
    let extra: Vec<String> = match args.active_runs_max {
        Some(max) => vec!["--active-runs-max".to_owned(), max.to_string()],
        None => Vec::new(),
    };
    let mut grid = Grid::open(&args.grid, &extra).await?;
    // Its verdict is the coordinators' memory: refused at once when it cannot be read.
    grid.coordinator_rss_mb_now()?;
    let plan = Arc::new(Plan::new(Workload::Single, 1));
    let client = grid.client().await?.with_retry_budget(Duration::ZERO);
    grid.deploy(&client, &plan.definition).await?;

    let tracker = Tracker::new(plan.tasks_per_run, None, 0.0);
    let errors = Arc::new(Errors::default());
    let workers_shutdown = CancellationToken::new();
    let mut workers = JoinSet::new();
    let sink: Arc<dyn TaskSink> = tracker.clone();
    spawn_pool_workers(&grid, &plan.pools, &args.workers, sink, &workers_shutdown, &mut workers).await?;
    // Each start on its own: the report counts every refusal, and a batch would retry them.
    let starter = Starter {
        client,
        batcher: None,
        requests: None,
        plan: plan.clone(),
        tracker: tracker.clone(),
        errors: errors.clone(),
        sequence: Arc::new(AtomicU64::new(0)),
        key_prefix: None,
    };
    let stop = CancellationToken::new();
    let driver = tokio::spawn(driver::open_loop(starter, args.rate, stop.clone()));

    tokio::time::sleep(args.warmup).await;
    workers_shutdown.cancel();
    while workers.join_next().await.is_some() {}
    let stopped_at = Instant::now();
    let started_at_stop = tracker.counters.runs_started.load(Ordering::Relaxed);
    eprintln!("workers stopped after {:?}; starts continue for {:?}", args.warmup, args.duration);

    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    while stopped_at.elapsed() < args.duration {
        ticks.tick().await;
        let rss = grid.coordinator_rss_mb_now()?;
        let accepted = tracker.counters.runs_started.load(Ordering::Relaxed) - started_at_stop;
        let refused = errors.count("start_overloaded");
        eprintln!(
            "[{:>5.1}s after stop] starts accepted {accepted} refused overloaded {refused} other errors {} | rss {rss:.1} MB",
            stopped_at.elapsed().as_secs_f64(),
            errors.total() - refused
        );
        samples.push(json!({
            "t_s": round1(stopped_at.elapsed().as_secs_f64()),
            "rss_mb": round1(rss),
            "accepted": accepted,
            "refused_overloaded": refused,
        }));
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), driver).await;
    grid.stop();

    let rss: Vec<f64> = samples.iter().filter_map(|sample| sample["rss_mb"].as_f64()).collect();
    let refusals: Vec<u64> = samples.iter().filter_map(|sample| sample["refused_overloaded"].as_u64()).collect();
    let plateau = Plateau::judge(&rss, &refusals);
    let bound_reached_s = plateau.bound_reached.and_then(|index| samples[index]["t_s"].as_f64());
    let refused = errors.count("start_overloaded");
    let accepted = tracker.counters.runs_started.load(Ordering::Relaxed) - started_at_stop;
    // Starts still accepted once the bound refused one: runs that ended (timed out) left room.
    let accepted_after_bound = plateau
        .bound_reached
        .and_then(|index| samples[index]["accepted"].as_u64())
        .map(|at_bound| accepted.saturating_sub(at_bound));
    let summary = json!({
        "mode": "overload",
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "active_runs_max": args.active_runs_max,
        "accepted_after_stop": accepted,
        "rejected_overloaded": refused,
        "errors": errors.total() - refused,
        "error_kinds": errors.kinds(),
        "rss_start_mb": rss.first().copied().map(round1),
        "rss_end_mb": rss.last().copied().map(round1),
        "bound_reached_s": bound_reached_s,
        "rss_at_bound_mb": plateau.rss_at_bound_mb.map(round1),
        "rss_growth_after_bound_mb": plateau.growth_mb.map(round1),
        "accepted_after_bound": accepted_after_bound,
        "plateau": plateau.holds,
        "rss_mb_series": samples,
    });
    print_table(
        "flowgrid overload (workers stopped, starts continuing)",
        &[
            ("start rate".to_owned(), format!("{} runs/s scheduled", args.rate)),
            ("starts after the stop".to_owned(), format!("{accepted} accepted, {refused} refused overloaded")),
            (
                "coordinator RSS".to_owned(),
                format!(
                    "{:.1} MB at the stop, {:.1} MB at the end",
                    rss.first().copied().unwrap_or(0.0),
                    rss.last().copied().unwrap_or(0.0)
                ),
            ),
            (
                "bound reached".to_owned(),
                match (bound_reached_s, plateau.rss_at_bound_mb) {
                    (Some(at), Some(rss)) => format!(
                        "{at:.0} s after the stop, at {rss:.1} MB; {} starts accepted after it",
                        accepted_after_bound.unwrap_or(0)
                    ),
                    _ => "no".to_owned(),
                },
            ),
            ("plateau".to_owned(), plateau.describe()),
            ("other errors".to_owned(), describe_errors(errors.total() - refused, &errors.kinds())),
        ],
    );
    report::print_json_line(&summary);
    Ok(())
}

/// Whether the coordinator's memory stopped growing once it refused starts: judged from
/// the first second with a refusal (its bound reached) to the end, so that the growth
/// before the bound never counts, however long it took to reach it.
#[derive(Debug, PartialEq)]
struct Plateau {
    /// Index of the first sample with a refusal.
    bound_reached: Option<usize>,
    rss_at_bound_mb: Option<f64>,
    growth_mb: Option<f64>,
    holds: bool,
}

impl Plateau {
    /// `rss` and `refusals` (cumulative) are sampled once a second.
    fn judge(rss: &[f64], refusals: &[u64]) -> Plateau {
        let bound_reached = refusals.iter().position(|&refused| refused > 0);
        let Some(first) = bound_reached else {
            return Plateau { bound_reached, rss_at_bound_mb: None, growth_mb: None, holds: false };
        };
        // The highest sample after the bound, not the last: memory that grew and fell back
        // by the end did not stop growing.
        let at_bound = rss[first];
        let growth = rss[first..].iter().copied().fold(at_bound, f64::max) - at_bound;
        let long_enough = rss.len() - first >= PLATEAU_SAMPLES_MIN;
        Plateau {
            bound_reached,
            rss_at_bound_mb: Some(at_bound),
            growth_mb: Some(growth),
            holds: long_enough && growth <= at_bound * PLATEAU_GROWTH_MAX,
        }
    }

    fn describe(&self) -> String {
        match self.growth_mb {
            Some(growth) => format!(
                "{} ({growth:+.1} MB at most from the first refused start to the end; a plateau grows at most {}% \
                 over {} s or more)",
                self.holds,
                PLATEAU_GROWTH_MAX * 100.0,
                PLATEAU_SAMPLES_MIN
            ),
            None => "false (no start was refused: the bound was not reached; lengthen --duration or raise --rate)"
                .to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_before_the_bound_does_not_count() {
        // 45 s of growth to the bound, then 15 s flat: a plateau, though the last third of
        // the samples grew 12%.
        let rss: Vec<f64> = (0..60).map(|second| 60.0 + 5.0 * second.min(45) as f64).collect();
        let refusals: Vec<u64> = (0..60).map(|second| if second >= 45 { (second - 44) * 4_000 } else { 0 }).collect();
        let plateau = Plateau::judge(&rss, &refusals);
        assert_eq!(plateau.bound_reached, Some(45));
        assert_eq!(plateau.growth_mb, Some(0.0));
        assert!(plateau.holds, "{plateau:?}");
    }

    #[test]
    fn growth_after_the_bound_or_no_bound_or_too_short_is_no_plateau() {
        let growing: Vec<f64> = (0..60).map(|second| 60.0 + 5.0 * second as f64).collect();
        let refused_from_40: Vec<u64> = (0..60).map(|second| if second >= 40 { 1 } else { 0 }).collect();
        let plateau = Plateau::judge(&growing, &refused_from_40);
        assert_eq!(plateau.growth_mb, Some(95.0));
        assert!(!plateau.holds);

        let never_refused = vec![0; 60];
        let plateau = Plateau::judge(&growing, &never_refused);
        assert_eq!((plateau.bound_reached, plateau.holds), (None, false));
        assert!(plateau.describe().contains("not reached"), "{}", plateau.describe());

        // Grown and fallen back by the end: the peak counts.
        let spike: Vec<f64> = (0..60).map(|second| if second == 50 { 200.0 } else { 100.0 }).collect();
        let plateau = Plateau::judge(&spike, &refused_from_40);
        assert_eq!((plateau.growth_mb, plateau.holds), (Some(100.0), false));

        let flat = vec![100.0; 60];
        let refused_from_55: Vec<u64> = (0..60).map(|second| if second >= 55 { 1 } else { 0 }).collect();
        assert!(!Plateau::judge(&flat, &refused_from_55).holds, "five seconds of refusals are too few to judge");
    }
}
