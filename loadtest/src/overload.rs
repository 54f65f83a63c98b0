//! `flowgrid-loadtest overload`: workers stop, starts continue.
//!
//! One-task runs are started at `--rate` (open loop) with workers serving them for the
//! warm-up; then the workers stop and starts continue for `--duration`. The grid must
//! refuse starts explicitly (`overloaded`) once a bound is reached and its RSS must stop
//! growing. Reported: the RSS every second, starts accepted and refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{validate_workers, OverloadArgs, Workload};
use crate::driver::{self, Errors, Starter};
use crate::flows::Plan;
use crate::grid::Grid;
use crate::report::{self, describe_errors, print_table, round1};
use crate::tracker::{TaskSink, Tracker};
use crate::worker::spawn_pool_workers;

/// RSS grew less than this share over the last third of the overload: a plateau.
const PLATEAU_GROWTH_MAX: f64 = 0.05;

pub async fn overload(args: OverloadArgs) -> Result<()> {
    validate_workers(&args.workers)?;
    anyhow::ensure!(args.rate.is_finite() && args.rate > 0.0, "--rate must be positive");
    let extra: Vec<String> = match args.active_runs_max {
        Some(max) => vec!["--active-runs-max".to_owned(), max.to_string()],
        None => Vec::new(),
    };
    let mut grid = Grid::open(&args.grid, &extra).await?;
    let plan = Arc::new(Plan::new(Workload::Single, 1));
    let client = grid.client().await?.with_retry_budget(Duration::ZERO);
    client.deploy(plan.definition.clone()).await.context("deploy the load-test flow")?;

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
        plan: plan.clone(),
        tracker: tracker.clone(),
        errors: errors.clone(),
        sequence: Arc::new(AtomicU64::new(0)),
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
        let rss = grid.coordinator_rss_mb().unwrap_or(0.0);
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
    let third = rss.len() / 3;
    let (growth_last_third_mb, plateau) = match (rss.get(rss.len().saturating_sub(third + 1)), rss.last()) {
        (Some(from), Some(to)) if third > 0 => (to - from, (to - from) <= from * PLATEAU_GROWTH_MAX),
        _ => (0.0, false),
    };
    let refused = errors.count("start_overloaded");
    let accepted = tracker.counters.runs_started.load(Ordering::Relaxed) - started_at_stop;
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
        "rss_growth_last_third_mb": round1(growth_last_third_mb),
        "plateau": plateau,
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
                    "{:.1} MB at the stop, {:.1} MB at the end, {growth_last_third_mb:+.1} MB over the last third",
                    rss.first().copied().unwrap_or(0.0),
                    rss.last().copied().unwrap_or(0.0)
                ),
            ),
            ("plateau".to_owned(), plateau.to_string()),
            ("other errors".to_owned(), describe_errors(errors.total() - refused, &errors.kinds())),
        ],
    );
    report::print_json_line(&summary);
    Ok(())
}
