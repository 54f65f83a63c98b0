//! `targets`: every performance target of docs/performance.md in one command.
//!
//! The step overhead is judged twice: as the harness measures it (from the worker sending
//! the result to JetStream storing the next task: an upper bound, with the result's trip
//! to the coordinator in it) and as the coordinator measures it (`flowgrid_step_seconds`:
//! from its shard taking the result to JetStream's ack of the next task; p50 and p99 over
//! the last 40-60 s, as its exporter gives them, so a window shorter than that has some of
//! its warm-up and of the grid's start in them: their verdicts say how much).
//!
//! Each step is this harness run again as a child process (`run`, `memory`, `overload`),
//! on a grid of its own, with the flags the figure is defined by; its table and JSON line
//! pass through. The half-load step runs at half the runs/s the chain step reached. Then
//! a table gives each target, the measured value and the verdict, and a JSON line (last)
//! holds the verdicts and every step's JSON line.
//!
//! Children get none of the `FLOWGRID_LT_*` variables: a stray one (a running grid's
//! URL, a kept directory, the floor switched off) would change what a figure means.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::args::{Step, TargetsArgs, WORKERS_PER_POOL_DEFAULT, WORKER_CONCURRENCY_DEFAULT};
use crate::floor;
use crate::report::{print_json_line, print_table};
use crate::run::{describe_floor_latencies, describe_quantile_span};

/// Tasks per second both throughput steps must sustain.
const TASKS_PER_S_MIN: f64 = 15_000.0;
/// For this long at least (s): the 60 s, less the window's rounding (a 60 s window
/// measures 59.99 s and more).
const SUSTAINED_S_MIN: f64 = 59.5;
/// Engine throughput over the broker floor of the same run.
const RATIO_TO_FLOOR_MIN: f64 = 0.5;
/// Tasks of each run of the chain and half-load steps.
const CHAIN_TASKS: &str = "3";
/// Items of the map step's one run.
const MAP_ITEMS: &str = "10000";
/// Waiting runs the memory step starts.
const MEMORY_RUNS: &str = "100000";
/// At half load: step overhead p50 and p99, start overhead p99 and a chain-of-3 run end to
/// end p50, at most, in ms.
const STEP_P50_MS_MAX: f64 = 1.0;
const STEP_P99_MS_MAX: f64 = 10.0;
const START_P99_MS_MAX: f64 = 10.0;
const RUN_E2E_P50_MS_MAX: f64 = 3.0;
/// The slowest map run over 10,000 items, at most, in ms.
const MAP_RUN_MS_MAX: f64 = 2_000.0;
/// Overload: start rate and how long starts go on after the workers stop. Long enough for
/// the active-run bound to be reached and the memory series to show whether it levels off.
const OVERLOAD_RATE: &str = "4000";
const OVERLOAD_DURATION: &str = "70s";

enum Bound {
    AtLeast(f64),
    AtMost(f64),
    /// A JSON `true`.
    Holds,
}

/// One target: the step that measures it, where its value is in that step's JSON line.
struct Target {
    step: Step,
    name: &'static str,
    path: &'static [&'static str],
    bound: Bound,
}

const fn target(step: Step, name: &'static str, path: &'static [&'static str], bound: Bound) -> Target {
    Target { step, name, path, bound }
}

const TARGETS: &[Target] = &[
    target(Step::Chain, "tasks/s", &["tasks_per_s"], Bound::AtLeast(TASKS_PER_S_MIN)),
    target(Step::Chain, "sustained s", &["duration_s"], Bound::AtLeast(SUSTAINED_S_MIN)),
    target(Step::Chain, "ratio to floor", &["ratio_to_floor"], Bound::AtLeast(RATIO_TO_FLOOR_MIN)),
    target(Step::Single, "tasks/s", &["tasks_per_s"], Bound::AtLeast(TASKS_PER_S_MIN)),
    target(Step::Single, "sustained s", &["duration_s"], Bound::AtLeast(SUSTAINED_S_MIN)),
    target(Step::Single, "ratio to floor", &["ratio_to_floor"], Bound::AtLeast(RATIO_TO_FLOOR_MIN)),
    target(Step::HalfLoad, "step overhead p50 ms", &["step_overhead_ms", "p50"], Bound::AtMost(STEP_P50_MS_MAX)),
    target(Step::HalfLoad, "step overhead p99 ms", &["step_overhead_ms", "p99"], Bound::AtMost(STEP_P99_MS_MAX)),
    target(
        Step::HalfLoad,
        "step overhead p50 ms, coordinator",
        &["coordinator_step_ms", "p50"],
        Bound::AtMost(STEP_P50_MS_MAX),
    ),
    target(
        Step::HalfLoad,
        "step overhead p99 ms, coordinator",
        &["coordinator_step_ms", "p99"],
        Bound::AtMost(STEP_P99_MS_MAX),
    ),
    target(Step::HalfLoad, "start overhead p99 ms", &["start_overhead_ms", "p99"], Bound::AtMost(START_P99_MS_MAX)),
    target(Step::HalfLoad, "run e2e p50 ms", &["run_e2e_ms", "p50"], Bound::AtMost(RUN_E2E_P50_MS_MAX)),
    target(Step::Map, "run e2e max ms", &["run_e2e_ms", "max"], Bound::AtMost(MAP_RUN_MS_MAX)),
    target(
        Step::Memory,
        "bytes per waiting run",
        &["bytes_per_active_run"],
        Bound::AtMost(crate::memory::TARGET_BYTES_PER_RUN as f64),
    ),
    // Any refusal: the grid said `overloaded` once its bound was reached.
    target(Step::Overload, "starts refused `overloaded`", &["rejected_overloaded"], Bound::AtLeast(1.0)),
    target(Step::Overload, "memory plateau", &["plateau"], Bound::Holds),
];

/// What one step gave: its JSON line, or why there is none.
type Outcome = std::result::Result<Value, String>;

pub async fn targets(args: TargetsArgs) -> Result<()> {
    args.validate()?;
    let exe = std::env::current_exe().context("find this harness's own binary to run each step with")?;
    let outcomes = run_steps(&exe, &args).await;
    let (met, missed) = report(&outcomes);
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(step, outcome)| outcome.as_ref().err().map(|reason| format!("{}: {reason}", step.as_str())))
        .collect();
    if !failed.is_empty() {
        bail!("{} of {} steps did not run to the end: {}", failed.len(), outcomes.len(), failed.join("; "));
    }
    if args.fail_on_miss && missed > 0 {
        bail!("{missed} of {} targets missed (--fail-on-miss)", met + missed);
    }
    Ok(())
}

/// Runs the steps asked for, once each, in their order.
async fn run_steps(exe: &Path, args: &TargetsArgs) -> BTreeMap<Step, Outcome> {
    let mut steps = args.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    let mut outcomes: BTreeMap<Step, Outcome> = BTreeMap::new();
    for (index, &step) in steps.iter().enumerate() {
        let outcome = match step_args(step, args, chain_maximum(&outcomes)) {
            Ok(step_args) => {
                let (number, name, line) = (index + 1, step.as_str(), step_args.join(" "));
                eprintln!("== step {number} of {}: {name}: flowgrid-loadtest {line}", steps.len());
                run_step(exe, &step_args).await.map_err(|error| format!("{error:#}"))
            }
            Err(reason) => Err(reason),
        };
        if let Err(reason) = &outcome {
            eprintln!("== step {}: {reason}", step.as_str());
        }
        outcomes.insert(step, outcome);
    }
    outcomes
}

/// The runs/s the chain step reached without errors, which the half-load step takes half
/// of: runs it lost would lower its rate, and the latencies would be judged at a lighter load.
fn chain_maximum(outcomes: &BTreeMap<Step, Outcome>) -> Option<f64> {
    let line = outcomes.get(&Step::Chain)?.as_ref().ok().filter(|line| line["errors"] == json!(0))?;
    line["runs_per_s"].as_f64()
}

/// Prints the verdict table and the JSON line (last); returns the targets met and missed.
fn report(outcomes: &BTreeMap<Step, Outcome>) -> (usize, usize) {
    let verdicts = verdicts(outcomes);
    let text = |verdict: &Value, key: &str| verdict[key].as_str().unwrap_or_default().to_owned();
    let rows: Vec<(String, String)> = verdicts
        .iter()
        .map(|verdict| (format!("{:<10} {}", text(verdict, "step"), text(verdict, "target")), text(verdict, "verdict")))
        .collect();
    print_table("flowgrid performance targets", &rows);
    let met = verdicts.iter().filter(|verdict| verdict["met"] == json!(true)).count();
    let missed = verdicts.len() - met;
    println!("{met} of {} targets met", verdicts.len());
    if let Some(Ok(half_load)) = outcomes.get(&Step::HalfLoad) {
        print_latency_floor(half_load);
    }
    let steps: serde_json::Map<String, Value> = outcomes
        .iter()
        .map(|(step, outcome)| {
            let line = outcome.clone().unwrap_or_else(|reason| json!({ "failed": reason }));
            (step.as_str().to_owned(), line)
        })
        .collect();
    print_json_line(&json!({ "mode": "targets", "met": met, "missed": missed, "targets": verdicts, "steps": steps }));
    (met, missed)
}

/// What the half-load latencies are without the engine, for comparison with their targets.
fn print_latency_floor(half_load: &Value) {
    let floor = &half_load["latency_floor"];
    if floor.is_object() {
        println!("the same half load without the engine (latency floor): {}", describe_floor_latencies(floor));
    }
}

/// The harness command line of `step`; `Err` says why it cannot run.
fn step_args(
    step: Step,
    args: &TargetsArgs,
    chain_runs_per_s: Option<f64>,
) -> std::result::Result<Vec<String>, String> {
    let ms = |duration: Duration| format!("{}ms", duration.as_millis());
    let run = |workload: &str, duration: Duration| {
        let mut line = vec!["run", "--workload", workload].into_iter().map(str::to_owned).collect::<Vec<_>>();
        line.extend(["--duration".to_owned(), ms(duration), "--warmup".to_owned(), ms(args.warmup)]);
        line
    };
    let throughput = |workload: &str| {
        let mut line = run(workload, args.duration);
        line.extend(["--mode", "closed", "--concurrency"].map(str::to_owned));
        line.push(throughput_concurrency().to_string());
        line.extend(["--floor-duration".to_owned(), ms(args.floor_duration)]);
        line
    };
    let mut line = match step {
        Step::Chain => {
            let mut line = throughput("chain");
            line.extend(["--tasks-per-run", CHAIN_TASKS].map(str::to_owned));
            line
        }
        Step::Single => throughput("single"),
        Step::HalfLoad => {
            let Some(runs_per_s) = chain_runs_per_s.filter(|rate| *rate >= 2.0) else {
                return Err(
                    "not run: the chain step gave no maximum to take half of (it failed or had errors)".to_owned()
                );
            };
            let mut line = run("chain", args.duration / 2);
            line.extend(["--tasks-per-run", CHAIN_TASKS, "--mode", "open", "--no-floor", "--rate"].map(str::to_owned));
            line.push(format!("{:.0}", runs_per_s / 2.0));
            line.extend(["--latency-floor".to_owned(), "--floor-duration".to_owned(), ms(args.floor_duration)]);
            line
        }
        Step::Map => {
            let mut line = run("map", (args.duration / 6).max(Duration::from_secs(3)));
            line.extend(
                ["--tasks-per-run", MAP_ITEMS, "--mode", "closed", "--concurrency", "1", "--no-floor"]
                    .map(str::to_owned),
            );
            line
        }
        Step::Memory => ["memory", "--runs", MEMORY_RUNS].map(str::to_owned).to_vec(),
        Step::Overload => {
            ["overload", "--rate", OVERLOAD_RATE, "--duration", OVERLOAD_DURATION].map(str::to_owned).to_vec()
        }
    };
    if let Some(bin) = &args.flowgrid_bin {
        line.extend(["--flowgrid-bin".to_owned(), bin.display().to_string()]);
    }
    if !args.coordinator_args.trim().is_empty() {
        line.push(format!("--coordinator-args={}", args.coordinator_args));
    }
    Ok(line)
}

/// Runs in flight in the throughput steps: as many as the broker floor keeps tasks
/// outstanding (one pool, the default workers), so that the engine and the floor are
/// compared with the same depth of work queued. `run`'s default of 512 gives lower latency
/// and less throughput (docs/performance.md).
fn throughput_concurrency() -> usize {
    floor::outstanding_max(WORKERS_PER_POOL_DEFAULT, WORKER_CONCURRENCY_DEFAULT, 1)
}

/// Runs this harness with `step_args`, passing its output through; returns its JSON line.
async fn run_step(exe: &Path, step_args: &[String]) -> Result<Value> {
    let mut command = tokio::process::Command::new(exe);
    command.args(step_args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FLOWGRID_LT_") {
            command.env_remove(name);
        }
    }
    let mut child = command.spawn().with_context(|| format!("start {}", exe.display()))?;
    // Dropped early (ctrl-c, an error), the step is interrupted the way a user would, so
    // that it stops the grid it started.
    let mut interrupt = InterruptOnDrop(child.id());
    let mut lines = BufReader::new(child.stdout.take().context("the step's stdout")?).lines();
    let mut json_line = None;
    while let Some(line) = lines.next_line().await.context("read the step's output")? {
        println!("{line}");
        if line.starts_with('{') {
            json_line = Some(line);
        }
    }
    let status = child.wait().await.context("wait for the step")?;
    interrupt.0 = None;
    if !status.success() {
        bail!("the step failed ({status}); its messages are above");
    }
    let line = json_line.context("the step printed no JSON line")?;
    serde_json::from_str(&line).context("the step's JSON line does not parse")
}

/// Sends SIGINT to a child process when dropped, unless the pid was taken out (the child
/// ended).
struct InterruptOnDrop(Option<u32>);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: kill(2) takes plain integers; the child is not reaped yet (its
            // handle is still alive), so the pid is still its own.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
    }
}

/// One verdict per target of the steps that were asked for, in the order of [`TARGETS`],
/// plus one per step on its errors.
fn verdicts(outcomes: &BTreeMap<Step, Outcome>) -> Vec<Value> {
    let no_errors: Vec<Target> =
        outcomes.keys().map(|&step| target(step, "errors", &["errors"], Bound::AtMost(0.0))).collect();
    let mut targets: Vec<&Target> =
        TARGETS.iter().filter(|target| outcomes.contains_key(&target.step)).chain(&no_errors).collect();
    targets.sort_by_key(|target| target.step);
    targets.iter().map(|target| verdict(target, outcomes.get(&target.step))).collect()
}

fn verdict(target: &Target, outcome: Option<&Outcome>) -> Value {
    let measured = outcome
        .and_then(|outcome| outcome.as_ref().ok())
        .map(|line| target.path.iter().fold(line, |value, key| &value[*key]));
    let judged = measured.and_then(|measured| target.bound.judge(measured));
    // A figure of a step that lost runs or tasks (or whose floor did) was measured on what
    // was left: it meets nothing.
    let line = outcome.and_then(|outcome| outcome.as_ref().ok());
    let count = |key: &str| line.and_then(|line| line[key].as_f64()).unwrap_or(0.0);
    let (errors, floor_errors) = (count("errors"), count("floor_errors"));
    let (met, verdict) = match judged {
        Some((shown, None)) if errors > 0.0 && target.path != ["errors"] => {
            (false, format!("{shown}  MISSED (the step had {errors} errors)"))
        }
        Some((shown, None)) if floor_errors > 0.0 && target.path == ["ratio_to_floor"] => {
            (false, format!("{shown}  MISSED (its broker floor had {floor_errors} errors)"))
        }
        Some((shown, None)) => (true, format!("{shown}  met")),
        Some((shown, Some(off))) if off.is_empty() => (false, format!("{shown}  MISSED")),
        Some((shown, Some(off))) => (false, format!("{shown}  MISSED ({off})")),
        None => (false, "not measured  MISSED".to_owned()),
    };
    // The coordinator's quantiles are its exporter's, over a span of their own.
    let span = line
        .filter(|line| target.path[0].starts_with("coordinator_") && line["coordinator_quantiles_span"].is_object())
        .map(|line| describe_quantile_span(&line["coordinator_quantiles_span"]));
    let verdict = match (&span, measured.is_some_and(|measured| !measured.is_null())) {
        (Some(span), true) => format!("{verdict}; {span}"),
        _ => verdict,
    };
    let mut verdict = json!({
        "step": target.step.as_str(),
        "target": format!("{} {}", target.name, target.bound.describe()),
        "measured": measured.cloned().unwrap_or(Value::Null),
        "met": met,
        "verdict": verdict,
    });
    if let Some(span) = span {
        verdict["span"] = json!(span);
    }
    verdict
}

impl Bound {
    fn describe(&self) -> String {
        match self {
            Bound::AtLeast(bound) => format!(">= {}", number(*bound)),
            Bound::AtMost(bound) if *bound == 0.0 => "= 0".to_owned(),
            Bound::AtMost(bound) => format!("<= {}", number(*bound)),
            Bound::Holds => "holds".to_owned(),
        }
    }

    /// The measured value as the table shows it, and `None` if it meets the bound, else
    /// by how much it misses (empty when there is no measure of it). `None` altogether
    /// when the value is missing or not of the bound's kind.
    fn judge(&self, measured: &Value) -> Option<(String, Option<String>)> {
        match (self, measured) {
            (Bound::Holds, Value::Bool(holds)) => {
                Some((if *holds { "yes" } else { "no" }.to_owned(), (!holds).then(String::new)))
            }
            (Bound::AtLeast(bound), Value::Number(value)) => {
                let value = value.as_f64()?;
                let off = (value < *bound).then(|| format!("{:.0}% short", (1.0 - value / bound) * 100.0));
                Some((number(value), off))
            }
            (Bound::AtMost(bound), Value::Number(value)) => {
                let value = value.as_f64()?;
                let off = (value > *bound).then(|| match value / bound {
                    times if !times.is_finite() => "over".to_owned(),
                    times if times < 2.0 => format!("{:.0}% over", (times - 1.0) * 100.0),
                    times => format!("{times:.1}x the bound"),
                });
                Some((number(value), off))
            }
            _ => None,
        }
    }
}

/// A figure as the table shows it: whole numbers and figures from 100 up without decimals,
/// others with three.
fn number(value: f64) -> String {
    if value.fract() == 0.0 || value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(entries: &[(Step, Outcome)]) -> BTreeMap<Step, Outcome> {
        entries.iter().cloned().collect()
    }

    fn verdict_of<'a>(verdicts: &'a [Value], step: &str, target: &str) -> &'a Value {
        verdicts
            .iter()
            .find(|verdict| verdict["step"] == step && verdict["target"].as_str().unwrap().starts_with(target))
            .unwrap_or_else(|| panic!("no verdict for {step} {target} in {verdicts:?}"))
    }

    #[test]
    fn bounds_are_checked_both_ways_and_say_by_how_much() {
        let chain = json!({"tasks_per_s": 12_000.0, "ratio_to_floor": 0.55, "errors": 0, "duration_s": 59.996});
        let half = json!({"step_overhead_ms": {"p50": 2.5, "p99": 9.0}, "start_overhead_ms": {"p50": 1.0, "p99": 10.0}, "run_e2e_ms": {"p50": 3.1}, "errors": 2});
        let verdicts = verdicts(&outcomes(&[(Step::Chain, Ok(chain)), (Step::HalfLoad, Ok(half))]));
        let tasks = verdict_of(&verdicts, "chain", "tasks/s");
        assert_eq!(tasks["met"], false);
        assert_eq!(tasks["verdict"], "12000  MISSED (20% short)");
        assert_eq!(tasks["target"], "tasks/s >= 15000");
        assert_eq!(verdict_of(&verdicts, "chain", "ratio")["met"], true);
        assert_eq!(verdict_of(&verdicts, "chain", "sustained s")["met"], true, "a 60 s window");
        assert_eq!(
            verdict_of(&verdicts, "half-load", "step overhead p50")["verdict"],
            "2.500  MISSED (2.5x the bound)"
        );
        assert_eq!(verdict_of(&verdicts, "half-load", "run e2e p50")["verdict"], "3.100  MISSED (3% over)");
        // Within its bound, but measured on a step that lost runs: missed.
        let step_p99 = verdict_of(&verdicts, "half-load", "step overhead p99");
        assert_eq!(
            (step_p99["met"].clone(), step_p99["verdict"].clone()),
            (json!(false), json!("9  MISSED (the step had 2 errors)"))
        );
        let errors = verdict_of(&verdicts, "half-load", "errors");
        assert_eq!(
            (errors["target"].clone(), errors["verdict"].clone()),
            (json!("errors = 0"), json!("2  MISSED (over)"))
        );
        assert_eq!(verdict_of(&verdicts, "chain", "errors")["met"], true);
        // The coordinator's own step figures are missing from this line: missed, not skipped.
        assert_eq!(
            verdict_of(&verdicts, "half-load", "step overhead p50 ms, coordinator")["verdict"],
            "not measured  MISSED"
        );
        // Only the steps asked for have verdicts: 3 + 6 targets, and one errors row each.
        assert_eq!(verdicts.len(), 11);
    }

    #[test]
    fn a_step_that_failed_or_a_missing_figure_is_a_miss() {
        let map = json!({"run_e2e_ms": {"p50": null, "max": null, "count": 0}, "errors": 0});
        let verdicts =
            verdicts(&outcomes(&[(Step::Map, Ok(map)), (Step::Overload, Err("the step failed".to_owned()))]));
        let map = verdict_of(&verdicts, "map", "run e2e max");
        assert_eq!((map["met"].clone(), map["verdict"].clone()), (json!(false), json!("not measured  MISSED")));
        let plateau = verdict_of(&verdicts, "overload", "memory plateau");
        assert_eq!(plateau["met"], false);
        assert_eq!(verdict_of(&verdicts, "overload", "errors")["met"], false);
    }

    #[test]
    fn a_bound_is_inclusive_and_a_ratio_over_a_floor_with_errors_is_a_miss() {
        let chain = json!({"tasks_per_s": 20_000.0, "ratio_to_floor": 0.6, "errors": 0, "floor_errors": 40, "duration_s": 10.0});
        let half = json!({"start_overhead_ms": {"p99": 10.0}, "errors": 0});
        let verdicts = verdicts(&outcomes(&[(Step::Chain, Ok(chain)), (Step::HalfLoad, Ok(half))]));
        assert_eq!(verdict_of(&verdicts, "half-load", "start overhead p99")["met"], true);
        let ratio = verdict_of(&verdicts, "chain", "ratio");
        assert_eq!(ratio["verdict"], "0.600  MISSED (its broker floor had 40 errors)");
        assert_eq!(verdict_of(&verdicts, "chain", "tasks/s")["met"], true);
        assert_eq!(verdict_of(&verdicts, "chain", "sustained s")["met"], false, "10 s is not 60");
    }

    /// The coordinator's p50 and p99 are its exporter's over up to a minute: a half-load
    /// window of 30 s has up to 30 s from before it in them, and the verdict says so.
    #[test]
    fn the_coordinators_own_step_verdicts_say_what_span_they_cover() {
        let half = json!({
            "coordinator_step_ms": {"mean": 0.8, "p50": 0.9, "p99": 4.0},
            "coordinator_quantiles_span": {"last_s_max": 60, "before_window_s_max": 30.0},
            "step_overhead_ms": {"p50": 0.95},
            "errors": 0,
        });
        let verdicts = verdicts(&outcomes(&[(Step::HalfLoad, Ok(half))]));
        let p50 = verdict_of(&verdicts, "half-load", "step overhead p50 ms, coordinator");
        assert_eq!(
            p50["verdict"],
            "0.900  met; p50 and p99 over the last 40-60 s: up to 30 s before the window (warm-up, grid start)"
        );
        assert_eq!(
            p50["span"],
            "p50 and p99 over the last 40-60 s: up to 30 s before the window (warm-up, grid start)"
        );
        let harness = verdict_of(&verdicts, "half-load", "step overhead p50 ms <=");
        assert_eq!((harness["verdict"].clone(), harness.get("span")), (json!("0.950  met"), None));
    }

    #[test]
    fn the_plateau_must_be_true() {
        let overload = json!({"rejected_overloaded": 10, "plateau": true, "errors": 0});
        let verdicts = verdicts(&outcomes(&[(Step::Overload, Ok(overload))]));
        assert_eq!(verdict_of(&verdicts, "overload", "memory plateau")["verdict"], "yes  met");
        assert_eq!(verdict_of(&verdicts, "overload", "starts refused")["met"], true);
    }

    #[test]
    fn half_load_runs_at_half_the_chain_maximum_and_steps_keep_their_defining_flags() {
        let cli = <crate::args::Cli as clap::Parser>::try_parse_from([
            "flowgrid-loadtest",
            "targets",
            "--duration",
            "60s",
            "--coordinator-args",
            "--batch-events-max 4096",
        ])
        .unwrap();
        let crate::args::Command::Targets(args) = cli.command else { panic!("expected targets") };
        let half = step_args(Step::HalfLoad, &args, Some(4_180.4)).unwrap().join(" ");
        assert!(
            half.contains("--mode open") && half.contains("--rate 2090") && half.contains("--duration 30000ms"),
            "{half}"
        );
        assert!(half.ends_with("--coordinator-args=--batch-events-max 4096"), "{half}");
        assert!(step_args(Step::HalfLoad, &args, None).unwrap_err().contains("no maximum"));
        // A chain step with errors gives none.
        let erred = outcomes(&[(Step::Chain, Ok(json!({"runs_per_s": 4_180.4, "errors": 3})))]);
        assert_eq!(chain_maximum(&erred), None);
        let clean = outcomes(&[(Step::Chain, Ok(json!({"runs_per_s": 4_180.4, "errors": 0})))]);
        assert_eq!(chain_maximum(&clean), Some(4_180.4));
        let single = step_args(Step::Single, &args, None).unwrap().join(" ");
        assert!(single.contains("--workload single") && single.contains("--concurrency 2048"), "{single}");
        assert!(!single.contains("--no-floor"), "{single}");
        let map = step_args(Step::Map, &args, None).unwrap().join(" ");
        assert!(map.contains("--tasks-per-run 10000") && map.contains("--duration 10000ms"), "{map}");
    }
}
