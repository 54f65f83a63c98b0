//! A worker written in Python from docs/protocol.md serves a pool of its own (its tasks of
//! three priorities), and a client written in Python the same way starts a run and waits
//! for it.

use std::process::Command;
use std::time::{Duration, Instant};

use flowgrid_sdk::{RunId, RunStatus, StepStatus};
use flowgrid_tests::{python_bin, repo_root, step, Grid};
use serde_json::json;

use crate::cancels::{wait_held, STOP_DEADLINE};
use crate::{deploy, OrLogs, RUN_DEADLINE};

const PYTHON_FLOW: &str = r#"
name: python-pool
output: '#{ echo: steps.echoed.output, upper: steps.shout.output.text, double: steps.twice.output.value, doubled: steps.doubled.output }'
steps:
  - id: echoed
    kind: task
    pool: py
    task: echo
    input: '#{ text: input.text, tags: input.tags }'
  - id: shout
    kind: task
    pool: py
    task: upper
    priority: 8
    after: [echoed]
    input: '#{ text: steps.echoed.output.text }'
  - id: twice
    kind: task
    pool: py
    task: double
    input: '#{ value: input.n }'
  - id: doubled
    kind: map
    pool: py
    task: double
    priority: 2
    items: input.values
"#;

/// Tasks one run of `PYTHON_FLOW` gives: three task steps and five map items.
const PYTHON_TASKS: usize = 8;

/// Fails (never skips) when the interpreter or its modules are missing.
fn check_python() {
    let python = python_bin();
    let probe = Command::new(&python).args(["-c", "import nats, msgpack"]).output();
    match probe {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "{} cannot import the `nats` and `msgpack` modules ({}): run `make setup`",
            python.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => panic!("cannot run {} ({error}): run `make setup`", python.display()),
    }
}

/// The Python worker serving pool `py` of `grid`, with `more` arguments.
fn python_worker(grid: &Grid, more: &[&str]) -> Command {
    let mut command = Command::new(python_bin());
    command
        .arg(repo_root().join("tests/python_worker/worker.py"))
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "--pool", "py"])
        .args(more);
    command
}

/// A grid with no demo workers and the Python worker serving pool `py` (exiting after
/// `max_tasks`, if given), and a client.
async fn grid_with_python_worker(max_tasks: Option<usize>) -> anyhow::Result<(Grid, flowgrid_sdk::Client)> {
    let max_tasks = max_tasks.map(|max_tasks| max_tasks.to_string());
    let more: Vec<&str> = max_tasks.iter().flat_map(|max_tasks| ["--max-tasks", max_tasks.as_str()]).collect();
    grid_with_python_worker_args(&more).await
}

/// [`grid_with_python_worker`] with the worker's `more` arguments.
async fn grid_with_python_worker_args(more: &[&str]) -> anyhow::Result<(Grid, flowgrid_sdk::Client)> {
    check_python();
    let mut grid = Grid::start(&[]).await?;
    grid.spawn_worker("python-worker", &mut python_worker(&grid, more))?;
    let client = grid.client().await?;
    Ok((grid, client))
}

/// The worker's and the client's rules, unit-tested with fake messages and connections
/// (tests/python_worker/test_worker.py and test_client.py).
#[test]
fn python_worker_unit_tests() {
    check_python();
    let output = Command::new(python_bin())
        .args(["-m", "unittest", "-v", "test_worker.py", "test_client.py"])
        .current_dir(repo_root().join("tests/python_worker"))
        .output()
        .expect("run the Python unit tests");
    assert!(
        output.status.success(),
        "tests/python_worker/test_worker.py, test_client.py:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_interrupted_hands_its_task_back_to_another_worker() -> anyhow::Result<()> {
    let (mut grid, client) = grid_with_python_worker_args(&["--shutdown-grace", "1"]).await?;
    let flow = "name: py-nap\nsteps:\n  - { id: nap, kind: task, pool: py, task: sleep, input: '#{ ms: 6000 }' }\n";
    deploy(&grid, &client, flow).await?;
    let run =
        client.start(flowgrid_sdk::StartRun { flow: "py-nap".into(), ..Default::default() }).await.or_logs(&grid)?;
    wait_held(&grid, "py", (1, 0), RUN_DEADLINE).await?;
    // Ctrl-C while it holds the task: the worker waits its 1 s grace, hands the task back
    // and exits.
    let interrupted = Instant::now();
    interrupt_and_wait_exit(&mut grid, 0).await?;
    grid.spawn_worker("python-worker-2", &mut python_worker(&grid, &[]))?;
    // Run again at once by the other worker: not left to the attempt's timeout (5 min), nor to
    // the ack wait (30 s).
    let view = grid.wait_run(&client, &run.run_id, Duration::from_secs(20)).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "nap").attempts, 1, "the same attempt, delivered again: {view:?}");
    assert!(interrupted.elapsed() < Duration::from_secs(20), "{:?}", interrupted.elapsed());
    let first = grid.workers[0].log_tail(200);
    assert!(!first.contains("cancelled by its run"), "the stop is not the run's cancel:\n{first}");
    assert!(first.contains("handed back"), "{first}");
    Ok(())
}

/// Ctrl-C stops a worker still waiting for its pool's stream at startup (no coordinator
/// made it, or the prefix is wrong): it exits, rather than trying to bind for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_interrupted_before_its_pool_is_bound_exits() -> anyhow::Result<()> {
    check_python();
    let mut grid = Grid::start_nats()?;
    grid.spawn_worker("python-worker", &mut python_worker(&grid, &["--prefix", "nobody-serves"]))?;
    flowgrid_tests::wait_for("the worker to wait for its pool's stream", RUN_DEADLINE, || async {
        grid.workers[0].log_tail(20).contains("NOBODY_SERVES_TASKS does not exist yet").then_some(())
    })
    .await
    .or_logs(&grid)?;
    interrupt_and_wait_exit(&mut grid, 0).await?;
    let log = grid.workers[0].log_tail(20);
    assert!(log.contains("stopped before pool py's consumer was bound"), "a clean stop, not a crash:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_lives_through_a_nats_restart() -> anyhow::Result<()> {
    let (mut grid, client) = grid_with_python_worker(None).await?;
    let echo = "name: py-echo\nsteps:\n  - { id: e, kind: task, pool: py, task: echo }\n";
    deploy(&grid, &client, echo).await?;
    // Idle, scanning its lanes every second while NATS is away and JetStream comes back.
    grid.restart_nats(Duration::from_secs(2))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!grid.workers[0].has_exited(), "the Python worker died with NATS away\n{}", grid.logs());
    let client = grid.client().await.map(|_| client)?;
    let view = flowgrid_tests::wait_for("a run through the Python worker", RUN_DEADLINE, || async {
        let start = flowgrid_sdk::StartRun { flow: "py-echo".into(), ..Default::default() };
        let run = client.start(start).await.ok()?;
        grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await.ok()
    })
    .await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert!(!grid.workers[0].has_exited(), "{}", grid.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_completes_its_pools_tasks() -> anyhow::Result<()> {
    let (grid, client) = grid_with_python_worker(Some(PYTHON_TASKS)).await?;
    deploy(&grid, &client, PYTHON_FLOW).await?;

    let input = json!({"text": "héllo grid", "tags": ["a", 1, null, 2.5], "n": 21, "values": [1, 2, 3, 4, 5]});
    let output = Command::new(python_bin())
        .arg(repo_root().join("tests/python_worker/client.py"))
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "--flow", "python-pool"])
        .args(["--input", &input.to_string(), "--idempotency-key", "order-1", "--wait", "30"])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python client: {stdout}\n{stderr}\n{}", grid.logs());
    let printed: flowgrid_sdk::RunView = serde_json::from_str(stdout.trim())?;
    assert_eq!(printed.run_id, RunId::from_idempotency_key("python-pool", "order-1"), "the key names the run");
    let view = client.get(&printed.run_id).await.or_logs(&grid)?;
    assert_eq!(printed, view, "the client printed the run as the grid has it");

    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let expected = json!({
        "echo": {"text": "héllo grid", "tags": ["a", 1, null, 2.5]},
        "upper": "héllo grid".to_uppercase(),
        "double": 42,
        "doubled": [2, 4, 6, 8, 10],
    });
    assert_eq!(view.output, Some(expected), "{view:?}\n{}", grid.logs());
    for id in ["echoed", "shout", "twice", "doubled"] {
        assert_eq!(step(&view, id).status, StepStatus::Succeeded, "{:?}", step(&view, id));
    }
    assert_eq!(step(&view, "doubled").attempts, 5, "{:?}", step(&view, "doubled"));
    // Done with its tasks, it stopped and deleted its record, as docs/protocol.md says: long
    // before the bucket would drop the record by its age (30 s).
    flowgrid_tests::wait_for("the stopped worker's record to go", std::time::Duration::from_secs(5), || async {
        let (ok, text, _) = grid.cli(&["workers", "--pool", "py"]).ok()?;
        (ok && !text.contains("python nats-py")).then_some(())
    })
    .await
    .or_logs(&grid)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_stops_a_task_its_run_no_longer_needs() -> anyhow::Result<()> {
    let (grid, client) = grid_with_python_worker(None).await?;
    let flow = "name: py-sleep\nsteps:\n  - { id: nap, kind: task, pool: py, task: sleep, input: '#{ ms: 600000 }' }\n";
    deploy(&grid, &client, flow).await?;
    let start = flowgrid_sdk::StartRun { flow: "py-sleep".into(), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    wait_held(&grid, "py", (1, 0), RUN_DEADLINE).await?;
    client.cancel(&run.run_id, "not needed").await.or_logs(&grid)?;
    // Ten minutes of sleep stopped and acked, not handed back.
    wait_held(&grid, "py", (0, 0), STOP_DEADLINE).await?;
    assert!(grid.logs().contains("cancelled by its run; acking it without a result"), "{}", grid.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_reports_progress_that_its_retry_resumes_from() -> anyhow::Result<()> {
    let (grid, client) = grid_with_python_worker(None).await?;
    let flow =
        "name: py-steps\noutput: steps.count.output\nsteps:\n  - { id: count, kind: task, pool: py, task: steps, \
                input: '#{ to: 5, fail_at: 2 }', retry: { max_attempts: 2, initial_backoff_ms: 200, jitter: 0 } }\n";
    deploy(&grid, &client, flow).await?;
    let start = flowgrid_sdk::StartRun { flow: "py-steps".into(), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    // The retry began where the failed attempt's last report said it got to.
    assert_eq!(view.output, Some(json!({"from": 2, "done": 5})), "{view:?}");
    // It wrote its record, as docs/protocol.md says a worker may.
    let (ok, text, errors) = grid.cli(&["workers", "--pool", "py"])?;
    assert!(ok && text.contains("python nats-py"), "{text}{errors}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_fails_a_step_whose_output_is_too_large_at_once() -> anyhow::Result<()> {
    let (grid, client) = grid_with_python_worker(None).await?;
    let flow = "name: py-big\nsteps:\n  - { id: big, kind: task, pool: py, task: big, input: '#{ bytes: 1572864 }' }\n";
    deploy(&grid, &client, flow).await?;
    let start = flowgrid_sdk::StartRun { flow: "py-big".into(), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    // Failed by the worker's error result, long before the attempt's 5 min timeout.
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    let error = step(&view, "big").error.clone().expect("the step's error");
    assert_eq!(error.code, "payload_too_large", "{error:?}");
    // The worker lived through it and serves the next task.
    let echo = "name: py-echo\nsteps:\n  - { id: e, kind: task, pool: py, task: echo }\n";
    deploy(&grid, &client, echo).await?;
    let run =
        client.start(flowgrid_sdk::StartRun { flow: "py-echo".into(), ..Default::default() }).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    Ok(())
}

/// A lane at its bound of tasks out (`pool limit`) with more waiting holds a no-wait pull
/// until a slot frees: the Python worker's pulls on such a lane expire, so a worker with
/// nothing to do there takes the default lane's task instead of waiting on lane 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_passes_over_a_lane_at_its_bound() -> anyhow::Result<()> {
    check_python();
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let flow = |name: &str, ms: u64, priority: &str| {
        format!("name: {name}\nsteps:\n  - {{ id: nap, kind: task, pool: py, task: sleep, input: '#{{ ms: {ms} }}'{priority} }}\n")
    };
    deploy(&grid, &client, &flow("py-long-high", 3_000, ", priority: 9")).await?;
    deploy(&grid, &client, &flow("py-short", 30, "")).await?;
    let start = |flow: &str| flowgrid_sdk::StartRun { flow: flow.into(), ..Default::default() };
    let mut high = Vec::new();
    for _ in 0..3 {
        high.push(client.start(start("py-long-high")).await.or_logs(&grid)?.run_id);
    }
    let (ok, text, errors) = grid.cli(&["pool", "limit", "py", "--max-in-flight", "1"])?;
    anyhow::ensure!(ok, "{text}{errors}");
    // One worker holds lane 9's one task out; the other finds two more waiting there.
    grid.spawn_worker("python-worker-1", &mut python_worker(&grid, &[]))?;
    grid.spawn_worker("python-worker-2", &mut python_worker(&grid, &[]))?;
    flowgrid_tests::wait_for("one task of lane 9 out and two waiting", RUN_DEADLINE, || async {
        let pool = crate::pools::pool_status(&grid, "py").ok()?;
        let lanes = pool["lanes"].as_array()?.clone();
        let high = lanes.into_iter().find(|lane| lane["priority"] == 9)?;
        (high["in_flight"] == 1 && high["pending"] == 2).then_some(())
    })
    .await
    .or_logs(&grid)?;
    let short = client.start(start("py-short")).await.or_logs(&grid)?.run_id;
    let short_view = grid.wait_run(&client, &short, RUN_DEADLINE).await?;
    let mut first_high_end = u64::MAX;
    for run_id in &high {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
        first_high_end = first_high_end.min(step(&view, "nap").ended_ms.unwrap_or(u64::MAX));
    }
    let short_end = step(&short_view, "nap").ended_ms.unwrap_or(u64::MAX);
    assert!(
        short_end < first_high_end,
        "the default lane's task ended at {short_end}, after the first of lane 9 ({first_high_end})\n{}",
        grid.logs()
    );
    Ok(())
}

/// Sends Ctrl-C (SIGINT) to worker `index` and waits, up to [`STOP_DEADLINE`], for it to exit.
async fn interrupt_and_wait_exit(grid: &mut Grid, index: usize) -> anyhow::Result<()> {
    let pid = grid.workers[index].pid().to_string();
    anyhow::ensure!(Command::new("kill").args(["-INT", &pid]).status()?.success(), "send SIGINT to {pid}");
    let deadline = Instant::now() + STOP_DEADLINE;
    while !grid.workers[index].has_exited() {
        anyhow::ensure!(Instant::now() < deadline, "the interrupted worker still runs\n{}", grid.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
