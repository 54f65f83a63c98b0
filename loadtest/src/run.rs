//! `flowgrid-loadtest run`: the broker floor, the engine under one workload, and the
//! broker floor again.
//!
//! The floor is measured on both sides of the engine run, because a shared host's speed
//! drifts over a minute: the ratio to the floor compares the engine with the mean of the
//! two, and a report whose two floors differ by more than [`FLOOR_DRIFT_WARN`] says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use flowgrid_sdk::StartBatcher;
use flowgrid_testkit::metric_value;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{LoopMode, RunArgs};
use crate::driver::{self, Errors, Starter};
use crate::floor::{self, FloorResult};
use crate::flows::Plan;
use crate::grid::Grid;
use crate::latency_floor::{self, LatencyFloor};
use crate::profile::{self, Recording};
use crate::report::{self, describe_errors, describe_latency, print_table, quantiles_ms, round1, round3};
use crate::tracker::{TaskSink, Tracker};
use crate::worker::spawn_pool_workers;

/// Period of the progress line and of RSS samples.
const TICK: Duration = Duration::from_secs(1);
/// Relative difference between the floors before and after the engine run past which the
/// report warns that the host's speed changed during the run.
const FLOOR_DRIFT_WARN: f64 = 0.2;

/// The broker floor measured before and after the engine run.
struct Floors {
    before: FloorResult,
    after: FloorResult,
}

impl Floors {
    fn tasks_per_s(&self) -> f64 {
        (self.before.tasks_per_s + self.after.tasks_per_s) / 2.0
    }

    fn errors(&self) -> u64 {
        self.before.errors + self.after.errors
    }

    /// Difference between the two floors, relative to their mean.
    fn drift(&self) -> f64 {
        let mean = self.tasks_per_s();
        if mean > 0.0 {
            (self.before.tasks_per_s - self.after.tasks_per_s).abs() / mean
        } else {
            0.0
        }
    }
}

/// What the timeline observed.
struct Observed {
    measured_s: f64,
    rss_end_mb: Option<f64>,
    rss_max_mb: Option<f64>,
    /// CPU time the coordinators used in the measured window.
    coordinator_cpu: Option<Duration>,
    /// The coordinators' metrics when the window began and when it ended, by address.
    metrics_from: HashMap<String, String>,
    metrics_to: HashMap<String, String>,
    /// The `perf` recording `--profile` started with the window.
    recording: Option<Result<Recording>>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    args.validate()?;
    let plan = Arc::new(Plan::new(args.workload, args.tasks_per_run));
    let mut grid = Grid::open(&args.grid, &[]).await?;
    let client = grid.client().await?.with_retry_budget(Duration::ZERO);
    let deployed = grid.deploy(&client, &plan.definition).await?;
    eprintln!("deployed {} version {}", deployed.name, deployed.version);

    let floor_before =
        if args.floor_enabled() { Some(measure_floor(&args, &grid, &plan, "before").await?) } else { None };

    let (verify_sender, verify_receiver) = tokio::sync::mpsc::unbounded_channel();
    let tracker = Tracker::new(plan.tasks_per_run, Some(verify_sender), args.verify_share);
    let errors = Arc::new(Errors::default());
    let workers_shutdown = CancellationToken::new();
    let mut workers = JoinSet::new();
    let sink: Arc<dyn TaskSink> = tracker.clone();
    spawn_pool_workers(&grid, &plan.pools, &args.workers, sink, &workers_shutdown, &mut workers).await?;

    let verified = Arc::new(AtomicU64::new(0));
    let verifier =
        tokio::spawn(driver::verify(grid.client().await?, verify_receiver, errors.clone(), verified.clone()));
    let (batch_max, requests_max) = (args.start_batch_max as usize, args.start_requests_max as usize);
    let starter = Starter {
        client: client.clone(),
        batcher: (batch_max > 1).then(|| StartBatcher::new(client.clone(), batch_max, requests_max)),
        // Single starts keep to --start-requests-max too, as the batches do.
        requests: (batch_max <= 1).then(|| Arc::new(Semaphore::new(requests_max))),
        plan: plan.clone(),
        tracker: tracker.clone(),
        errors: errors.clone(),
        sequence: Arc::new(AtomicU64::new(0)),
        key_prefix: args.idempotency_keys.then(key_prefix),
    };
    let stop = CancellationToken::new();
    let driver = match args.mode {
        LoopMode::Open => tokio::spawn(driver::open_loop(starter, args.rate(), stop.clone())),
        LoopMode::Closed => {
            tokio::spawn(driver::closed_loop(starter, args.concurrency(), driver::CLOSED_LOOP_RUN_WAIT, stop.clone()))
        }
    };

    let mut observed = timeline(&args, &grid, &tracker, &errors, &stop).await;
    grid.check_coordinators()?;
    if !driver::drain(driver, &stop, &tracker, &errors, args.drain).await {
        eprintln!(
            "runs or starts still open after the drain time ({:?}); counted as errors (run_unfinished, start_unanswered)",
            args.drain
        );
    }
    workers_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while workers.join_next().await.is_some() {} }).await;
    workers.abort_all();
    // Let the verifier check the runs it was sent.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while verified.load(Ordering::Relaxed) < tracker.counters.runs_sampled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    verifier.abort();
    // A sampled run left unchecked might have been one that failed.
    let unchecked =
        tracker.counters.runs_sampled.load(Ordering::Relaxed).saturating_sub(verified.load(Ordering::Relaxed));
    errors.add("verify_not_done", unchecked);
    // A result the coordinator took without applying it: its answer to an earlier send was
    // lost, or the task was delivered twice; neither happens on a healthy grid.
    errors.add("result_not_applied", tracker.counters.results_not_applied.load(Ordering::Relaxed));
    let latency_floor = if args.latency_floor { Some(measure_latency_floor(&args, &grid, &plan).await?) } else { None };
    let floors = match floor_before {
        Some(before) => {
            let after = measure_floor(&args, &grid, &plan, "after").await?;
            let floors = Floors { before, after };
            if floors.drift() > FLOOR_DRIFT_WARN {
                eprintln!(
                    "warning: the broker floor moved from {:.0} to {:.0} tasks/s during the run: this host's speed changed, so the ratio to the floor is uncertain; run again",
                    floors.before.tasks_per_s, floors.after.tasks_per_s
                );
            }
            Some(floors)
        }
        None => None,
    };
    grid.stop();
    // A profile that failed still lets the run report; the error is returned after the report.
    let (profile, profile_error) = match observed.recording.take() {
        Some(recording) => {
            eprintln!("folding the coordinator profile (perf script takes a while)");
            match tokio::task::spawn_blocking(move || recording?.finish()).await {
                Ok(Ok(profile)) => (Some(profile), None),
                Ok(Err(error)) => (None, Some(error)),
                Err(panicked) => (None, Some(anyhow::Error::new(panicked).context("fold the profile"))),
            }
        }
        None => (None, None),
    };

    let mut summary =
        summarize(&args, &plan, &tracker, &errors, floors.as_ref(), &observed, verified.load(Ordering::Relaxed));
    summary["latency_floor"] = latency_floor.as_ref().map_or(serde_json::Value::Null, describe_latency_floor);
    if let Some(profile) = &profile {
        summary["profile"] = json!({ "flamegraph": profile.flamegraph, "cpu_s": round3(profile.cpu.as_secs_f64()) });
    }
    if !args.json_only {
        print_summary_table(&summary);
        if let Some(profile) = &profile {
            profile.print();
        }
    }
    report::print_json_line(&summary);
    match profile_error {
        Some(error) => Err(error.context("--profile")),
        None => Ok(()),
    }
}

async fn measure_floor(args: &RunArgs, grid: &Grid, plan: &Plan, when: &str) -> Result<FloorResult> {
    eprintln!(
        "broker floor {when} the engine run: {:?} of publish, pull, result and ack without the engine",
        args.floor_duration
    );
    let outstanding = floor::outstanding(plan, &args.workers, args.runs_in_flight());
    let floor = floor::measure(grid, plan, &args.workers, outstanding, args.floor_duration).await?;
    eprintln!("broker floor {when} the engine run: {:.0} tasks/s, {outstanding} tasks outstanding", floor.tasks_per_s);
    Ok(floor)
}

async fn measure_latency_floor(args: &RunArgs, grid: &Grid, plan: &Plan) -> Result<LatencyFloor> {
    eprintln!(
        "latency floor: {:?} of the same open loop at {} runs/s, a responder in the coordinator's place",
        args.floor_duration,
        args.rate()
    );
    let floor = latency_floor::measure(grid, plan, &args.workers, args.rate(), args.floor_duration).await?;
    eprintln!(
        "latency floor: step overhead p50 {:.3} ms, run e2e p50 {:.3} ms",
        floor.histograms.step_overhead.value_at_quantile(0.5) as f64 / 1e3,
        floor.histograms.run_e2e.value_at_quantile(0.5) as f64 / 1e3
    );
    Ok(floor)
}

fn describe_latency_floor(floor: &LatencyFloor) -> serde_json::Value {
    let histograms = &floor.histograms;
    json!({
        "runs_per_s": round1(floor.runs_per_s),
        "run_e2e_ms": quantiles_ms(&histograms.run_e2e),
        "start_overhead_ms": quantiles_ms(&histograms.start_overhead),
        "step_overhead_ms": quantiles_ms(&histograms.step_overhead),
        "step_round_trip_ms": quantiles_ms(&histograms.step_round_trip),
        "errors": floor.errors,
    })
}

/// Warm-up, measured window, stop; prints the progress line every second.
async fn timeline(
    args: &RunArgs,
    grid: &Grid,
    tracker: &Tracker,
    errors: &Errors,
    stop: &CancellationToken,
) -> Observed {
    let origin = Instant::now();
    let window_start = origin + args.warmup;
    let window_end = window_start + args.duration;
    let mut ticks = tokio::time::interval(TICK);
    let mut last_tasks = 0;
    let mut rss_max_mb: Option<f64> = None;
    let mut measured_from = None;
    let mut cpu_from = None;
    let mut metrics_from = HashMap::new();
    let mut recording = None;
    loop {
        ticks.tick().await;
        let now = Instant::now();
        if measured_from.is_none() && now >= window_start {
            tracker.set_measuring(true);
            measured_from = Some(now);
            cpu_from = grid.coordinator_cpu();
            metrics_from = grid.coordinator_metrics().await;
            if let Some(dir) = &args.profile {
                recording =
                    Some(profile::start(dir, grid.coordinator_pids(), args.profile_duration.min(args.duration)));
            }
        }
        let rss = grid.coordinator_rss_mb();
        if measured_from.is_some() {
            rss_max_mb = larger(rss_max_mb, rss);
        }
        let tasks = tracker.counters.tasks_acked.load(Ordering::Relaxed);
        if !args.quiet {
            let phase = if measured_from.is_some() { "measure" } else { "warmup" };
            eprintln!(
                "[{:>6.1}s {phase}] runs started {} done {} in flight {} | tasks/s {} | errors {} | e2e p99 {:.2} ms | rss {}",
                origin.elapsed().as_secs_f64(),
                tracker.counters.runs_started.load(Ordering::Relaxed),
                tracker.counters.runs_done.load(Ordering::Relaxed),
                tracker.in_flight(),
                tasks - last_tasks,
                errors.total() + tracker.counters.task_failures.load(Ordering::Relaxed),
                tracker.e2e_p99_us() as f64 / 1_000.0,
                rss.map(|mb| format!("{mb:.0} MB")).unwrap_or_else(|| "n/a".to_owned()),
            );
        }
        last_tasks = tasks;
        if now >= window_end {
            break;
        }
    }
    tracker.set_measuring(false);
    stop.cancel();
    let measured_s = measured_from.map(|from| from.elapsed().as_secs_f64()).unwrap_or(0.0);
    let coordinator_cpu = match (cpu_from, grid.coordinator_cpu()) {
        (Some(from), Some(to)) => Some(to.saturating_sub(from)),
        _ => None,
    };
    Observed {
        measured_s,
        rss_end_mb: grid.coordinator_rss_mb(),
        rss_max_mb,
        coordinator_cpu,
        metrics_from,
        metrics_to: grid.coordinator_metrics().await,
        recording,
    }
}

fn summarize(
    args: &RunArgs,
    plan: &Plan,
    tracker: &Tracker,
    errors: &Errors,
    floors: Option<&Floors>,
    observed: &Observed,
    verified: u64,
) -> serde_json::Value {
    let histograms = tracker.histograms();
    let measured_s = observed.measured_s.max(f64::EPSILON);
    let tasks_measured = tracker.counters.tasks_acked_measured.load(Ordering::Relaxed);
    let tasks_per_s = tasks_measured as f64 / measured_s;
    let cpu_s = observed.coordinator_cpu.map(|cpu| cpu.as_secs_f64());
    let runs_per_s = tracker.counters.runs_done_measured.load(Ordering::Relaxed) as f64 / measured_s;
    let task_failures = tracker.counters.task_failures.load(Ordering::Relaxed);
    errors.add("task_result_failed", task_failures);
    let floor_tasks_per_s = floors.map(|floors| round1(floors.tasks_per_s()));
    let ratio =
        floors.filter(|floors| floors.tasks_per_s() > 0.0).map(|floors| round3(tasks_per_s / floors.tasks_per_s()));
    let (task_bytes, result_bytes) = plan.message_sizes();
    let task_bytes_by_pool: serde_json::Map<String, serde_json::Value> =
        task_bytes.iter().map(|(pool, bytes)| ((*pool).to_owned(), json!(bytes))).collect();
    json!({
        "workload": plan.workload.as_str(),
        "flow": plan.flow_name,
        "tasks_per_run": plan.tasks_per_run,
        "mode": match args.mode { LoopMode::Open => "open", LoopMode::Closed => "closed" },
        "rate": (args.mode == LoopMode::Open).then_some(args.rate()),
        "concurrency": (args.mode == LoopMode::Closed).then_some(args.concurrency()),
        "start_batch_max": args.start_batch_max,
        "start_requests_max": args.start_requests_max,
        "idempotency_keys": args.idempotency_keys,
        "duration_s": round3(measured_s),
        "runs_per_s": round1(runs_per_s),
        "tasks_per_s": round1(tasks_per_s),
        "floor_tasks_per_s": floor_tasks_per_s,
        "floor_before_tasks_per_s": floors.map(|floors| round1(floors.before.tasks_per_s)),
        "floor_after_tasks_per_s": floors.map(|floors| round1(floors.after.tasks_per_s)),
        "floor_tasks_outstanding": floors.map(|_| floor::outstanding(plan, &args.workers, args.runs_in_flight())),
        "ratio_to_floor": ratio,
        "run_e2e_ms": quantiles_ms(&histograms.run_e2e),
        "start_overhead_ms": quantiles_ms(&histograms.start_overhead),
        "start_reply_ms": quantiles_ms(&histograms.start_reply),
        "step_overhead_ms": quantiles_ms(&histograms.step_overhead),
        "step_round_trip_ms": quantiles_ms(&histograms.step_round_trip),
        "coordinator_rss_mb": observed.rss_end_mb.map(round1),
        "coordinator_rss_max_mb": observed.rss_max_mb.map(round1),
        "coordinator_cpu_cores": cpu_s.map(|cpu_s| round3(cpu_s / measured_s)),
        "coordinator_cpu_us_per_task": cpu_s.filter(|_| tasks_measured > 0).map(|cpu_s| round1(cpu_s * 1e6 / tasks_measured as f64)),
        "coordinator_commit_ms": coordinator_timing_ms(COMMIT_SECONDS, &observed.metrics_from, &observed.metrics_to),
        "coordinator_publish_ms": coordinator_timing_ms(PUBLISH_SECONDS, &observed.metrics_from, &observed.metrics_to),
        "coordinator_step_ms": coordinator_timing_ms(STEP_SECONDS, &observed.metrics_from, &observed.metrics_to),
        "coordinator_quantiles_span": coordinator_quantiles_span(measured_s),
        "coordinator_metrics_endpoints": observed.metrics_to.len(),
        "errors": errors.total(),
        "error_kinds": errors.kinds(),
        "runs_started": tracker.counters.runs_started.load(Ordering::Relaxed),
        "runs_done": tracker.counters.runs_done.load(Ordering::Relaxed),
        "runs_verified": verified,
        "results_not_applied": tracker.counters.results_not_applied.load(Ordering::Relaxed),
        "task_bytes": task_bytes[0].1,
        "task_bytes_by_pool": task_bytes_by_pool,
        "result_bytes": result_bytes,
        "coordinators": args.grid.nats_url.is_none().then_some(args.grid.coordinators),
        "workers_per_pool": args.workers.workers_per_pool,
        "worker_concurrency": args.workers.worker_concurrency,
        "service_time": args.workers.service_time().describe(),
        "floor_errors": floors.map(Floors::errors),
    })
}

/// The coordinator's histograms of one store commit, of a task's commit to its publish ack,
/// and of a step (a result taken by its shard to the publish ack of the next task).
const COMMIT_SECONDS: &str = "flowgrid_store_commit_seconds";
const PUBLISH_SECONDS: &str = "flowgrid_task_publish_seconds";
const STEP_SECONDS: &str = "flowgrid_step_seconds";

/// How far back the p50 and p99 of the coordinator's exporter reach: its summaries roll over
/// 3 buckets of 20 s (metrics-exporter-prometheus's defaults, which the coordinator keeps), so
/// when read they cover the last 40 to 60 s, whatever the measured window.
const COORDINATOR_QUANTILES_SPAN_S: f64 = 60.0;
/// The shortest span those quantiles cover: the rolling summary drops a bucket at a time.
const COORDINATOR_QUANTILES_SPAN_MIN_S: f64 = 40.0;

/// One of the coordinators' timing histograms, in ms: its mean over the measured window (from
/// the change of its sum and count) and the p50 and p99 its exporter reports at the end (over
/// its last [`COORDINATOR_QUANTILES_SPAN_S`] at most, see [`coordinator_quantiles_span`]); the
/// worst over the coordinators. `metrics_from` and `metrics_to` are each coordinator's metrics
/// page at the start and the end of the window, by address. Null where no endpoint answered
/// (the mean, where none answered at the start), and where the histogram never had a sample
/// (its exporter then reports quantiles of 0).
fn coordinator_timing_ms(
    metric: &str,
    metrics_from: &HashMap<String, String>,
    metrics_to: &HashMap<String, String>,
) -> serde_json::Value {
    let (mut mean, mut p50, mut p99): (Option<f64>, Option<f64>, Option<f64>) = (None, None, None);
    for (addr, body) in metrics_to {
        // A page read at the start without the series: the coordinator had no sample yet
        // (its exporter shows a series from its first), as when the window starts at once.
        let at_start = |suffix: &str| {
            metrics_from.get(addr).map(|from| metric_value(from, &format!("{metric}_{suffix} ")).unwrap_or(0.0))
        };
        let at_end = |suffix: &str| metric_value(body, &format!("{metric}_{suffix} "));
        if !at_end("count").is_some_and(|count| count > 0.0) {
            continue;
        }
        let count = at_end("count").zip(at_start("count")).map(|(end, start)| end - start);
        let sum = at_end("sum").zip(at_start("sum")).map(|(end, start)| end - start);
        let window_mean = sum.zip(count.filter(|count| *count > 0.0)).map(|(sum, count)| sum / count * 1e3);
        let quantile = |q: &str| metric_value(body, &format!("{metric}{{quantile=\"{q}\"}}")).map(|s| s * 1e3);
        mean = larger(mean, window_mean);
        p50 = larger(p50, quantile("0.5"));
        p99 = larger(p99, quantile("0.99"));
    }
    json!({ "mean": mean.map(round3), "p50": p50.map(round3), "p99": p99.map(round3) })
}

/// The larger of two values that may be unknown; unknown only if both are.
fn larger(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// What the coordinator's quantiles cover, for a window of `measured_s`: the exporter's last
/// [`COORDINATOR_QUANTILES_SPAN_S`] at most, and how many seconds of them may lie before the
/// window (its warm-up, the grid's start), where the harness records nothing.
fn coordinator_quantiles_span(measured_s: f64) -> serde_json::Value {
    json!({
        "last_s_max": COORDINATOR_QUANTILES_SPAN_S as u64,
        "before_window_s_max": round1((COORDINATOR_QUANTILES_SPAN_S - measured_s).max(0.0)),
    })
}

/// [`coordinator_quantiles_span`] in words.
pub fn describe_quantile_span(span: &serde_json::Value) -> String {
    let last =
        format!("p50 and p99 over the last {COORDINATOR_QUANTILES_SPAN_MIN_S:.0}-{COORDINATOR_QUANTILES_SPAN_S:.0} s");
    match span["before_window_s_max"].as_f64() {
        Some(before) if before > 0.0 => {
            format!("{last}: up to {before:.0} s before the window (warm-up, grid start)")
        }
        _ => format!("{last} of the window"),
    }
}

/// One of the coordinator's timings on a line; `endpoints`: the metrics endpoints that
/// answered at the end of the window.
fn describe_coordinator_timing(value: &serde_json::Value, endpoints: u64, span: &serde_json::Value) -> String {
    let ms = |key: &str| value[key].as_f64().map_or_else(|| "n/a".to_owned(), |ms| format!("{ms:.3} ms"));
    if endpoints == 0 {
        return "n/a (no metrics endpoint of the coordinators known)".to_owned();
    }
    if ["mean", "p50", "p99"].iter().all(|key| value[key].is_null()) {
        return "n/a (no samples)".to_owned();
    }
    format!(
        "mean {} over the window   p50 {}   p99 {}; {}",
        ms("mean"),
        ms("p50"),
        ms("p99"),
        describe_quantile_span(span)
    )
}

fn print_summary_table(summary: &serde_json::Value) {
    let text = |key: &str| match &summary[key] {
        serde_json::Value::Null => "n/a".to_owned(),
        serde_json::Value::String(value) => value.clone(),
        other => other.to_string(),
    };
    let load = match (summary["rate"].as_f64(), summary["concurrency"].as_u64()) {
        (Some(rate), _) => format!("open loop, {rate} runs/s scheduled"),
        (_, Some(concurrency)) => format!("closed loop, {concurrency} runs in flight"),
        _ => "n/a".to_owned(),
    };
    let errors: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(summary["error_kinds"].clone()).unwrap_or_default();
    let coordinator_timing = |key: &str| {
        let endpoints = summary["coordinator_metrics_endpoints"].as_u64().unwrap_or(0);
        describe_coordinator_timing(&summary[key], endpoints, &summary["coordinator_quantiles_span"])
    };
    let rows = vec![
        (
            "workload".to_owned(),
            format!("{} ({}, tasks per run: {})", text("workload"), text("flow"), text("tasks_per_run")),
        ),
        ("load".to_owned(), load),
        ("measured".to_owned(), format!("{} s", text("duration_s"))),
        (
            "workers".to_owned(),
            format!(
                "{} per pool x {} tasks each, service time {}",
                text("workers_per_pool"),
                text("worker_concurrency"),
                text("service_time")
            ),
        ),
        ("message sizes".to_owned(), describe_message_sizes(summary)),
        ("runs/s".to_owned(), text("runs_per_s")),
        ("tasks/s".to_owned(), text("tasks_per_s")),
        (
            "broker floor tasks/s".to_owned(),
            if summary["floor_tasks_per_s"].is_null() {
                "not measured (--no-floor)".to_owned()
            } else {
                format!(
                    "{} (mean of {} before and {} after)",
                    text("floor_tasks_per_s"),
                    text("floor_before_tasks_per_s"),
                    text("floor_after_tasks_per_s")
                )
            },
        ),
        ("ratio to floor".to_owned(), text("ratio_to_floor")),
        ("run e2e".to_owned(), describe_latency(&summary["run_e2e_ms"])),
        ("start overhead".to_owned(), describe_latency(&summary["start_overhead_ms"])),
        ("start reply".to_owned(), describe_latency(&summary["start_reply_ms"])),
        ("step overhead".to_owned(), describe_latency(&summary["step_overhead_ms"])),
        ("step round trip".to_owned(), describe_latency(&summary["step_round_trip_ms"])),
        ("latency floor".to_owned(), describe_floor_latencies(&summary["latency_floor"])),
        (
            "coordinator RSS".to_owned(),
            format!("{} MB (max {} MB)", text("coordinator_rss_mb"), text("coordinator_rss_max_mb")),
        ),
        (
            "coordinator CPU".to_owned(),
            format!("{} cores, {} µs per task", text("coordinator_cpu_cores"), text("coordinator_cpu_us_per_task")),
        ),
        ("commit (coordinator)".to_owned(), coordinator_timing("coordinator_commit_ms")),
        ("commit to publish ack (coordinator)".to_owned(), coordinator_timing("coordinator_publish_ms")),
        (
            "step overhead (coordinator)".to_owned(),
            if summary["coordinator_step_ms"]["p50"].is_null() && !summary["coordinator_commit_ms"]["p50"].is_null() {
                "no samples (no run had a second task)".to_owned()
            } else {
                coordinator_timing("coordinator_step_ms")
            },
        ),
        (
            "runs started / done / verified".to_owned(),
            format!("{} / {} / {}", text("runs_started"), text("runs_done"), text("runs_verified")),
        ),
        ("errors".to_owned(), describe_errors(summary["errors"].as_u64().unwrap_or(0), &errors)),
    ];
    print_table("flowgrid load test", &rows);
}

/// The task message of each pool and the result, in bytes: "task 165 B, result 84 B", or
/// for the mix "task 2715 B on lt-a, 165 B on lt-b, result 84 B".
fn describe_message_sizes(summary: &serde_json::Value) -> String {
    let result = &summary["result_bytes"];
    match summary["task_bytes_by_pool"].as_object() {
        Some(pools) if pools.len() > 1 => {
            let tasks: Vec<String> = pools.iter().map(|(pool, bytes)| format!("{bytes} B on {pool}")).collect();
            format!("task {}, result {result} B", tasks.join(", "))
        }
        _ => format!("task {} B, result {result} B", summary["task_bytes"]),
    }
}

/// The latency floor's figures on one line: what the broker and the workers alone take.
pub fn describe_floor_latencies(floor: &serde_json::Value) -> String {
    if floor.is_null() {
        return "not measured (--latency-floor)".to_owned();
    }
    let ms = |key: &str, quantile: &str| match floor[key][quantile].as_f64() {
        Some(ms) => format!("{ms:.3} ms"),
        None => "n/a".to_owned(),
    };
    format!(
        "no engine, {} runs/s: step overhead p50 {} p99 {}, start overhead p99 {}, run e2e p50 {}, errors {}",
        floor["runs_per_s"],
        ms("step_overhead_ms", "p50"),
        ms("step_overhead_ms", "p99"),
        ms("start_overhead_ms", "p99"),
        ms("run_e2e_ms", "p50"),
        floor["errors"]
    )
}

/// A prefix for this run's idempotency keys that no earlier run against the same grid used.
fn key_prefix() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("lt-{}-{}", std::process::id(), since_epoch.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(count: u64, sum: f64, p50: f64) -> String {
        format!(
            "flowgrid_step_seconds{{quantile=\"0.5\"}} {p50}\nflowgrid_step_seconds{{quantile=\"0.99\"}} {p50}\n\
             flowgrid_step_seconds_sum {sum}\nflowgrid_step_seconds_count {count}\n"
        )
    }

    #[test]
    fn a_coordinator_histogram_gives_its_window_mean_and_quantiles_in_ms() {
        let from = HashMap::from([("a".to_owned(), page(10, 0.010, 0.001))]);
        let to = HashMap::from([("a".to_owned(), page(30, 0.070, 0.002))]);
        let timing = coordinator_timing_ms(STEP_SECONDS, &from, &to);
        // 20 samples and 60 ms in the window.
        assert_eq!(timing, json!({ "mean": 3.0, "p50": 2.0, "p99": 2.0 }));
    }

    /// With no warm-up the window starts before the coordinator's first step: its page then
    /// has no such series yet, which counts as no samples, not as an unknown mean.
    #[test]
    fn a_series_missing_at_the_window_start_counts_from_zero() {
        let from = HashMap::from([("a".to_owned(), "flowgrid_store_commit_seconds_count 3\n".to_owned())]);
        let to = HashMap::from([("a".to_owned(), page(20, 0.060, 0.002))]);
        let timing = coordinator_timing_ms(STEP_SECONDS, &from, &to);
        assert_eq!(timing, json!({ "mean": 3.0, "p50": 2.0, "p99": 2.0 }));
        let span = json!({ "last_s_max": 60, "before_window_s_max": 30.0 });
        let shown = describe_coordinator_timing(&timing, 1, &span);
        assert!(shown.starts_with("mean 3.000 ms over the window"), "{shown}");
        assert!(shown.contains("up to 30 s before the window"), "{shown}");
        // A page that did not answer at the start leaves the mean unknown, the rest shown.
        let timing = coordinator_timing_ms(STEP_SECONDS, &HashMap::new(), &to);
        assert_eq!(timing, json!({ "mean": null, "p50": 2.0, "p99": 2.0 }));
        let shown = describe_coordinator_timing(&timing, 1, &span);
        assert!(shown.contains("p50 2.000 ms") && !shown.contains("no metrics endpoint"), "{shown}");
    }

    /// The exporter's quantiles reach back a minute: a shorter window has some of the time
    /// before it (its warm-up, the grid's start) in them, and the report says how much.
    #[test]
    fn the_coordinator_quantiles_say_how_far_before_the_window_they_reach() {
        assert_eq!(coordinator_quantiles_span(30.0), json!({ "last_s_max": 60, "before_window_s_max": 30.0 }));
        assert_eq!(coordinator_quantiles_span(60.004), json!({ "last_s_max": 60, "before_window_s_max": 0.0 }));
        let inside = describe_quantile_span(&coordinator_quantiles_span(90.0));
        assert_eq!(inside, "p50 and p99 over the last 40-60 s of the window");
        let before = describe_quantile_span(&coordinator_quantiles_span(25.0));
        assert_eq!(before, "p50 and p99 over the last 40-60 s: up to 35 s before the window (warm-up, grid start)");
    }

    #[test]
    fn a_histogram_without_samples_gives_nulls_not_zeros() {
        let from = HashMap::from([("a".to_owned(), page(0, 0.0, 0.0))]);
        let to = HashMap::from([("a".to_owned(), page(0, 0.0, 0.0))]);
        let timing = coordinator_timing_ms(STEP_SECONDS, &from, &to);
        assert_eq!(timing, json!({ "mean": null, "p50": null, "p99": null }));
        let none = coordinator_timing_ms(STEP_SECONDS, &HashMap::new(), &HashMap::new());
        assert_eq!(none, json!({ "mean": null, "p50": null, "p99": null }));
    }
}
