//! `flowgrid-loadtest memory`: coordinator memory per active run.
//!
//! Starts `--runs` one-task runs whose task goes to a pool that no worker serves, so every
//! run stays active, waiting on a worker; reads the coordinator's RSS before and after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use flowgrid_proto::Subjects;
use flowgrid_sdk::StartRun;

use crate::args::MemoryArgs;
use crate::driver::{error_kind, Errors};
use crate::flows::Plan;
use crate::grid::Grid;
use crate::report::{self, describe_errors, print_table, round1};

/// The target: at most this much coordinator memory per active run.
pub const TARGET_BYTES_PER_RUN: u64 = 2_048;

pub async fn memory(args: MemoryArgs) -> Result<()> {
    anyhow::ensure!(args.runs >= 1 && args.concurrency >= 1, "--runs and --concurrency must be at least 1");
    let mut grid = Grid::open(&args.grid, &[]).await?;
    // Its figure is the coordinators' memory: refused at once when it cannot be read.
    grid.coordinator_rss_mb_now()?;
    let plan = Plan::idle();
    let client = grid.client().await?.with_retry_budget(Duration::ZERO);
    grid.deploy(&client, &plan.definition).await?;
    // One run creates the pool's consumer and warms the caches before the baseline.
    let _ = client
        .start(StartRun {
            flow: plan.flow_name.clone(),
            version: None,
            input: plan.run_input(0),
            idempotency_key: None,
            ..Default::default()
        })
        .await;
    tokio::time::sleep(args.settle).await;
    let rss_before_mb = grid.coordinator_rss_mb_now()?;

    let errors = Arc::new(Errors::default());
    let started = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(Semaphore::new(args.concurrency));
    let mut requests = JoinSet::new();
    let origin = Instant::now();
    let mut last_progress = Instant::now();
    for sequence in 1..=args.runs {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (client, request_errors, request_started) = (client.clone(), errors.clone(), started.clone());
        let request = StartRun {
            flow: plan.flow_name.clone(),
            version: None,
            input: plan.run_input(sequence),
            idempotency_key: None,
            ..Default::default()
        };
        requests.spawn(async move {
            match client.start(request).await {
                Ok(_) => {
                    request_started.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => request_errors.add(&error_kind(&error), 1),
            }
            drop(slot);
        });
        while requests.try_join_next().is_some() {}
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!(
                "[{:>6.1}s] runs started {} errors {} | rss {:.0} MB",
                origin.elapsed().as_secs_f64(),
                started.load(Ordering::Relaxed),
                errors.total(),
                grid.coordinator_rss_mb().unwrap_or(0.0)
            );
        }
    }
    while requests.join_next().await.is_some() {}
    let start_seconds = origin.elapsed().as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let rss_after_mb = grid.coordinator_rss_mb_now()?;
    let waiting_tasks = waiting_tasks(&grid).await.unwrap_or(0);
    grid.stop();

    let active = started.load(Ordering::Relaxed);
    let bytes_per_run =
        if active > 0 { ((rss_after_mb - rss_before_mb) * 1_048_576.0 / active as f64).round() } else { 0.0 };
    let summary = json!({
        "mode": "memory",
        "runs": args.runs,
        "runs_active": active,
        "start_rate_per_s": round1(active as f64 / start_seconds),
        "coordinator_rss_before_mb": round1(rss_before_mb),
        "coordinator_rss_after_mb": round1(rss_after_mb),
        "bytes_per_active_run": bytes_per_run,
        "target_bytes_per_active_run": TARGET_BYTES_PER_RUN,
        "tasks_waiting_in_stream": waiting_tasks,
        "errors": errors.total(),
        "error_kinds": errors.kinds(),
    });
    print_table(
        "flowgrid coordinator memory per active run",
        &[
            ("runs active".to_owned(), format!("{active} of {}", args.runs)),
            ("start rate".to_owned(), format!("{:.0} runs/s", active as f64 / start_seconds)),
            ("coordinator RSS".to_owned(), format!("{rss_before_mb:.1} MB before, {rss_after_mb:.1} MB after")),
            ("per active run".to_owned(), format!("{bytes_per_run} bytes (target <= {TARGET_BYTES_PER_RUN})")),
            ("tasks waiting in the stream".to_owned(), waiting_tasks.to_string()),
            ("errors".to_owned(), describe_errors(errors.total(), &errors.kinds())),
        ],
    );
    report::print_json_line(&summary);
    Ok(())
}

/// Messages in the grid's tasks stream (the tasks of the idle runs).
async fn waiting_tasks(grid: &Grid) -> Result<u64> {
    let jetstream = async_nats::jetstream::new(grid.connect("flowgrid-loadtest-admin").await?);
    let mut stream = jetstream.get_stream(Subjects::new(grid.prefix.clone()).tasks_stream()).await?;
    Ok(stream.info().await?.state.messages)
}
