//! The load-test harness as its users run it: `flowgrid-loadtest` as a process that starts
//! its own grid, prints one JSON line last, and stops everything it started.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flowgrid_tests::{flowgrid_bin, Grid};
use serde_json::Value;

/// What a harness run printed.
pub struct Harnessed {
    pub status: ExitStatus,
    /// Exit status, stdout and stderr, for failure messages.
    pub output: String,
    /// The JSON line, last on stdout.
    pub summary: Value,
    pub line: String,
}

impl Harnessed {
    /// A count in the JSON line; panics with the output when it is not one.
    pub fn count(&self, key: &str) -> u64 {
        self.summary[key].as_u64().unwrap_or_else(|| panic!("{key} is not a count in {}\n{}", self.line, self.output))
    }

    /// A number in the JSON line; panics with the output when it is not one.
    pub fn number(&self, key: &str) -> f64 {
        self.summary[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {}\n{}", self.line, self.output))
    }
}

/// Runs `flowgrid-loadtest` with `args` against the `flowgrid` binary under test. Past
/// `deadline` it is interrupted (ctrl-c lets it stop every process it started) and the
/// test fails.
pub fn run_harness(args: &[&str], deadline: Duration) -> Harnessed {
    let flowgrid = flowgrid_bin();
    let harness = flowgrid.with_file_name("flowgrid-loadtest");
    assert!(harness.exists(), "{} is missing: run `cargo build --bins` first (make test does)", harness.display());
    let mut child = Command::new(&harness)
        .args(args)
        .arg("--flowgrid-bin")
        .arg(&flowgrid)
        .env_remove("FLOWGRID_LT_KEEP_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start flowgrid-loadtest");
    let out = read_to_end(child.stdout.take().expect("piped"));
    let err = read_to_end(child.stderr.take().expect("piped"));

    let started = Instant::now();
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the harness") {
            break status;
        }
        if started.elapsed() > deadline && !interrupted {
            let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
            interrupted = true;
        }
        if started.elapsed() > deadline + Duration::from_secs(15) {
            let _ = child.kill();
            break child.wait().expect("wait for the killed harness");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let output = format!("exit status: {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(!interrupted, "the harness ran over {deadline:?}\n{output}");
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line\n{output}"))
        .to_owned();
    let summary: Value = serde_json::from_str(&line).unwrap_or_else(|error| panic!("bad JSON line: {error}\n{output}"));
    Harnessed { status, output, summary, line }
}

/// Reads a child's pipe to its end on a thread of its own, so that neither pipe fills up
/// while the other is read.
fn read_to_end(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// `run --workload <workload>` for 3 s after 1 s of warm-up, 16 runs in flight, with `extra`
/// flags; interrupted past 90 s.
fn run_short(workload: &str, extra: &[&str]) -> Harnessed {
    let mut args = vec!["run", "--workload", workload, "--concurrency", "16", "--warmup", "1s", "--duration", "3s"];
    args.extend_from_slice(extra);
    run_harness(&args, Duration::from_secs(90))
}

/// A short closed-loop chain run with the floor measured on both sides: every started run
/// ends, and the ratio is taken against the mean of the two floors.
#[test]
fn a_run_reports_its_throughput_against_the_floor_before_and_after() {
    let run = run_short("chain", &["--drain", "10s", "--floor-duration", "1s", "--json-only"]);
    let output = &run.output;
    assert!(run.status.success(), "the harness failed\n{output}");
    assert_eq!(run.count("errors"), 0, "errors in the run\n{output}");
    assert!(run.count("runs_started") > 0, "no run started\n{output}");
    assert_eq!(run.count("runs_started"), run.count("runs_done"), "runs left unfinished\n{output}");
    let (before, after) = (run.number("floor_before_tasks_per_s"), run.number("floor_after_tasks_per_s"));
    assert!(before > 0.0 && after > 0.0, "a floor measured nothing\n{output}");
    let floor = run.number("floor_tasks_per_s");
    assert!((floor - (before + after) / 2.0).abs() <= 0.1, "the floor is not the mean of the two\n{output}");
    let ratio = run.number("ratio_to_floor");
    let expected = run.number("tasks_per_s") / floor;
    assert!((ratio - expected).abs() <= 0.001, "ratio {ratio}, tasks/s over the floor {expected}\n{output}");
    for key in ["run_e2e_ms", "start_overhead_ms", "step_overhead_ms", "step_round_trip_ms"] {
        assert!(run.summary[key]["p99"].as_f64().is_some(), "{key} has no p99\n{output}");
    }
    for key in ["coordinator_commit_ms", "coordinator_publish_ms", "coordinator_step_ms"] {
        for field in ["mean", "p50", "p99"] {
            let ms = run.summary[key][field].as_f64().unwrap_or(f64::NAN);
            assert!(
                ms > 0.0 && ms < 10_000.0,
                "{key}.{field} is {ms}: the coordinator's metrics were not read\n{output}"
            );
        }
    }
    let p50 = |key: &str| run.summary[key]["p50"].as_f64().expect("a latency with a p99 has a p50");
    let (step, round_trip) = (p50("step_overhead_ms"), p50("step_round_trip_ms"));
    assert!(
        step < round_trip,
        "the step overhead ends when JetStream stored the task, before a worker receives it: {step} vs {round_trip} ms\n{output}"
    );
    eprintln!("{}", run.line);
}

/// `--latency-floor`: after the engine's open loop, the same loop with a responder in the
/// coordinator's place; it runs at the rate asked for, every run it starts ends, and its
/// latencies are measured the way the engine's are.
#[test]
fn an_open_loop_run_times_the_same_load_without_the_engine() {
    let args = [
        "run",
        "--workload",
        "chain",
        "--mode",
        "open",
        "--rate",
        "200",
        "--warmup",
        "1s",
        "--duration",
        "3s",
        "--no-floor",
        "--latency-floor",
        "--floor-duration",
        "3s",
        "--json-only",
    ];
    let run = run_harness(&args, Duration::from_secs(90));
    let output = &run.output;
    assert!(run.status.success(), "the harness failed\n{output}");
    assert_eq!(run.count("errors"), 0, "errors in the engine run\n{output}");
    let floor = &run.summary["latency_floor"];
    assert_eq!(floor["errors"], 0, "errors in the latency floor\n{output}");
    let runs_per_s = floor["runs_per_s"].as_f64().unwrap_or_else(|| panic!("no latency floor\n{output}"));
    assert!((160.0..=240.0).contains(&runs_per_s), "the floor ran {runs_per_s} runs/s, not 200\n{output}");
    let samples = |key: &str| floor[key]["count"].as_u64().unwrap_or(0);
    // 3 s at 200 runs/s: ~600 runs, each with a first task and two steps.
    assert!(samples("run_e2e_ms") >= 400, "{} runs timed\n{output}", samples("run_e2e_ms"));
    assert!(samples("step_overhead_ms") >= 2 * samples("run_e2e_ms") - 20, "steps missing\n{output}");
    let p50 = |key: &str| floor[key]["p50"].as_f64().unwrap_or(f64::NAN);
    assert!(p50("step_overhead_ms") > 0.0, "{output}");
    assert!(
        p50("run_e2e_ms") > 2.0 * p50("step_overhead_ms"),
        "a run of three tasks takes two steps and more\n{output}"
    );
}

/// `--idempotency-keys`: every start carries a key of its own, as a durable submit does,
/// so every start is looked up in the store; a key used twice would hand back an ended run
/// whose end the harness never sees, and count as unfinished.
#[test]
fn a_run_with_idempotency_keys_starts_a_new_run_per_key() {
    let run = run_short("single", &["--no-floor", "--drain", "10s", "--idempotency-keys", "--json-only"]);
    let output = &run.output;
    assert!(run.status.success(), "the harness failed\n{output}");
    assert_eq!(run.summary["idempotency_keys"], true, "{output}");
    assert_eq!(run.count("errors"), 0, "errors in the run\n{output}");
    assert!(run.count("runs_started") > 0, "no run started\n{output}");
    assert_eq!(run.count("runs_started"), run.count("runs_done"), "runs left unfinished\n{output}");
}

/// A coordinator down for longer than JetStream's 10 deliveries of a task last (each a
/// 500 ms task and its result's first tries): the simulated workers send their results
/// again until a coordinator is back, so no task is given up and every accepted run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_across_a_coordinator_outage_gives_up_no_task() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    grid.start_coordinator().await?;
    let url = grid.nats_url.clone();
    let harness = tokio::task::spawn_blocking(move || {
        let args = format!(
            "run --nats-url {url} --workload single --mode open --rate 200 --service-time 500ms --warmup 1s \
             --duration 25s --no-floor --drain 60s --json-only"
        );
        let args: Vec<&str> = args.split_whitespace().collect();
        run_harness(&args, Duration::from_secs(150))
    });
    // Durations, not conditions: the kill lands inside the measured window (after the 1 s
    // warm-up and the harness's start), and the outage must outlast 10 deliveries.
    tokio::time::sleep(Duration::from_secs(6)).await;
    grid.coordinators[0].kill_hard();
    tokio::time::sleep(Duration::from_secs(20)).await;
    grid.spawn_coordinator()?;
    let run = harness.await?;
    let output = &run.output;
    assert!(run.status.success(), "the harness failed\n{output}\n{}", grid.logs());
    let kinds = &run.summary["error_kinds"];
    assert!(kinds.get("start_nats").is_some(), "starts were refused while no coordinator ran\n{output}");
    for given_up in ["task_result_failed", "run_unfinished"] {
        assert!(kinds.get(given_up).is_none(), "{given_up} after the outage\n{output}\n{}", grid.logs());
    }
    assert!(run.count("runs_done") > 1_000, "too few runs ended\n{output}");
    Ok(())
}

/// `--profile`: the coordinator is sampled during the window, and the run writes a flame
/// graph and the folded stacks and prints where the coordinator's CPU went. Needs `perf`
/// allowed to sample this user's processes; without it the test says so and does not run.
#[test]
fn a_profiled_run_writes_a_flame_graph_of_the_coordinator() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let probe = Command::new(std::env::var("PERF").unwrap_or_else(|_| "perf".to_owned()))
        .args(["record", "--quiet", "-e", "cpu-clock", "-o"])
        .arg(dir.path().join("probe.data"))
        .args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|status| status.success()) {
        eprintln!("SKIPPED: `perf record` cannot run here (install linux-perf, or lower kernel.perf_event_paranoid)");
        return;
    }
    let profile = dir.path().join("profile");
    let profile_arg = profile.to_str().expect("a UTF-8 temporary path");
    let run = run_short("single", &["--no-floor", "--quiet", "--profile", profile_arg, "--profile-duration", "2s"]);
    let output = &run.output;
    assert!(run.status.success(), "the harness failed\n{output}");
    let cpu_s = run.summary["profile"]["cpu_s"].as_f64().unwrap_or(0.0);
    assert!(cpu_s > 0.0, "the profile sampled no coordinator CPU\n{output}");
    for file in ["coordinator.svg", "coordinator.folded"] {
        let bytes = std::fs::metadata(profile.join(file)).map(|meta| meta.len()).unwrap_or(0);
        assert!(bytes > 0, "{file} is missing or empty\n{output}");
    }
    let svg = std::fs::read_to_string(profile.join("coordinator.svg")).expect("read the flame graph");
    assert!(svg.starts_with("<?xml") && svg.contains("tokio-rt-worker"), "not a flame graph of the coordinator");
    assert!(output.contains("by thread") && output.contains("flowgrid_coordinator::"), "no summary\n{output}");
}

/// `targets`: the chain step's maximum sets the half-load rate, and every verdict agrees
/// with the figure it was taken from.
#[test]
fn targets_measure_each_step_and_judge_every_figure() {
    let args =
        ["targets", "--steps", "chain,half-load", "--duration", "3s", "--warmup", "1s", "--floor-duration", "1s"];
    let run = run_harness(&args, Duration::from_secs(150));
    let output = &run.output;
    assert!(run.status.success(), "the harness failed\n{output}");
    assert_eq!(run.summary["mode"], "targets", "{output}");
    let steps = &run.summary["steps"];
    let chain_runs_per_s = steps["chain"]["runs_per_s"].as_f64().unwrap_or_else(|| panic!("no chain step\n{output}"));
    let half_rate = steps["half-load"]["rate"].as_f64().unwrap_or_else(|| panic!("no half-load step\n{output}"));
    assert!(
        (half_rate - chain_runs_per_s / 2.0).abs() <= 0.5,
        "half-load at {half_rate}/s, chain {chain_runs_per_s}/s\n{output}"
    );
    assert_eq!(steps["half-load"]["mode"], "open", "{output}");
    let floor_step = &steps["half-load"]["latency_floor"]["step_overhead_ms"]["p50"];
    assert!(floor_step.as_f64().is_some_and(|ms| ms > 0.0), "no latency floor at half load\n{output}");
    assert!(output.contains("the same half load without the engine"), "{output}");
    let verdicts = run.summary["targets"].as_array().unwrap_or_else(|| panic!("no targets\n{output}"));
    // chain: tasks/s, sustained s, ratio, errors; half-load: six latencies, errors.
    assert_eq!(verdicts.len(), 11, "{output}");
    for verdict in verdicts {
        let target = verdict["target"].as_str().expect("a target names itself");
        let measured = verdict["measured"].as_f64().unwrap_or_else(|| panic!("{target}: not measured\n{output}"));
        // "name >= x" is a lower bound; "name <= x" and "errors = 0" are upper bounds.
        let (bound, at_least) = match (target.rsplit_once(" >= "), target.rsplit_once(" <= ")) {
            (Some((_, bound)), _) => (bound, true),
            (None, Some((_, bound))) => (bound, false),
            (None, None) => (target.rsplit_once(" = ").map_or("", |(_, bound)| bound), false),
        };
        let bound: f64 = bound.parse().unwrap_or_else(|_| panic!("{target}: no bound\n{output}"));
        let met = if at_least { measured >= bound } else { measured <= bound };
        assert_eq!(verdict["met"], met, "{target}: measured {measured}\n{output}");
    }
    let met = verdicts.iter().filter(|verdict| verdict["met"] == true).count() as u64;
    assert_eq!(run.count("met"), met, "{output}");
    assert_eq!(run.count("missed"), verdicts.len() as u64 - met, "{output}");
    assert!(run.output.contains("flowgrid performance targets"), "no table\n{output}");
}
