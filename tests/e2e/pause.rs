//! Pause and resume: a paused run holds the steps that become ready, also across a
//! coordinator crash, and starts them when resumed; runs of a flow are paused and resumed
//! in one command.

use std::time::Duration;

use flowgrid_sdk::{ErrorCode, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, RUN_DEADLINE};

/// A signal step, then a task: the signal makes the task ready while the test holds the run.
const GATED_FLOW: &str = r#"
name: gated
steps:
  - { id: approve, kind: signal }
  - { id: store, kind: task, after: [approve], pool: a, task: echo, input: 'steps.approve.output' }
"#;

async fn gated_run(grid: &Grid, client: &flowgrid_sdk::Client) -> anyhow::Result<RunId> {
    let start =
        StartRun { flow: "gated".into(), version: None, input: json!({}), idempotency_key: None, ..Default::default() };
    Ok(client.start(start).await.or_logs(grid)?.run_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_run_holds_its_next_step_across_a_crash_until_it_is_resumed() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, GATED_FLOW).await?;
    let run_id = gated_run(&grid, &client).await?;

    let (ok, stdout, stderr) = grid.cli(&["run", "pause", run_id.as_str(), "--reason", "db maintenance"])?;
    assert!(ok && stdout.contains("is paused"), "{stdout}\n{stderr}");
    let (ok, stdout, _) = grid.cli(&["run", "pause", run_id.as_str()])?;
    assert!(ok && stdout.contains("paused already; nothing changed"), "a repeat changes nothing: {stdout}");
    let signalled = client.signal(&run_id, "approve", json!({"row": 7})).await.or_logs(&grid)?;
    assert!(signalled.applied, "a step that waited before the pause takes its signal");
    // The time a held step would need to run and the run to end, were it not held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!((view.status, step(&view, "approve").status), (RunStatus::Running, StepStatus::Succeeded));
    assert_eq!((step(&view, "store").status, step(&view, "store").attempts), (StepStatus::Pending, 0), "{view:?}");
    let paused = view.paused.clone().expect("the view says the run is paused");
    assert_eq!((paused.reason.as_str(), paused.held), ("db maintenance", vec!["store".to_owned()]));
    let (_, stdout, _) = grid.cli(&["run", "get", run_id.as_str()])?;
    assert!(stdout.contains("paused    since ") && stdout.contains("holding step store"), "{stdout}");
    let (_, stdout, _) = grid.cli(&["run", "list", "--flow", "gated"])?;
    assert!(stdout.contains("running (paused)"), "{stdout}");

    // The pause is in the run's history: a new coordinator holds the step too.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let view = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!(view.paused.map(|paused| paused.held), Some(vec!["store".to_owned()]), "still paused after a crash");

    let (ok, stdout, stderr) = grid.cli(&["run", "resume", run_id.as_str()])?;
    assert!(ok && stdout.contains("is running again"), "{stdout}\n{stderr}");
    // `run watch` follows it to its end.
    let (ok, stdout, stderr) = grid.cli(&["run", "watch", run_id.as_str(), "--timeout", "30s"])?;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("run            started (gated@1)"), "{stdout}");
    assert!(stdout.contains("approve        succeeded in "), "{stdout}");
    assert!(
        stdout.contains("store          succeeded in ") && stdout.contains("run            succeeded in "),
        "{stdout}"
    );
    // With --json, one object per line and change.
    let (ok, stdout, stderr) = grid.cli(&["--json", "run", "watch", run_id.as_str(), "--timeout", "30s"])?;
    assert!(ok, "{stdout}\n{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|error| anyhow::anyhow!("{error}: {stdout}"))?;
    assert!(
        lines.iter().any(|line| line["subject"] == "store"
            && line["what"].as_str().is_some_and(|what| what.starts_with("succeeded in "))),
        "{stdout}"
    );
    assert!(lines.iter().all(|line| line["at_ms"].is_u64()), "{stdout}");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!((view.status, view.output), (RunStatus::Succeeded, Some(json!({"store": {"row": 7}}))));
    assert_eq!(view.paused, None);
    let (ok, stdout, _) = grid.cli(&["run", "pause", run_id.as_str()])?;
    assert!(ok && stdout.contains("had already ended: succeeded"), "{stdout}");

    // A resume that lets the last (instant) steps go ends the run at once: it says so.
    let short = "name: short\nsteps:\n  - { id: w, kind: wait, duration_ms: 300 }\n  - { id: x, kind: transform, after: [w], output: '1' }\n";
    deploy(&grid, &client, short).await?;
    let run = client.start(StartRun { flow: "short".into(), ..Default::default() }).await.or_logs(&grid)?;
    let (ok, stdout, _) = grid.cli(&["run", "pause", run.run_id.as_str()])?;
    assert!(ok && stdout.contains("is paused"), "{stdout}");
    wait_for("the wait to end, holding x", RUN_DEADLINE, || async {
        let view = client.get(&run.run_id).await.ok()?;
        view.paused.filter(|paused| paused.held == ["x"]).map(|_| ())
    })
    .await?;
    let (ok, stdout, _) = grid.cli(&["run", "resume", run.run_id.as_str()])?;
    assert!(ok && stdout.contains("resumed and ended: succeeded"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_runs_of_a_flow_are_paused_and_resumed_in_one_command() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, GATED_FLOW).await?;
    let runs = [gated_run(&grid, &client).await?, gated_run(&grid, &client).await?];

    let (ok, stdout, stderr) = grid.cli(&["run", "pause", "--flow", "gated"])?;
    assert!(ok && stdout.contains("paused 2 of 2 run(s); 0 refused"), "{stdout}\n{stderr}");
    let (ok, stdout, _) = grid.cli(&["run", "pause", "--flow", "gated"])?;
    assert!(ok && stdout.contains("paused 0 of 2 run(s) (2 as they were); 0 refused"), "{stdout}");
    for run_id in &runs {
        client.signal(run_id, "approve", json!(1)).await.or_logs(&grid)?;
    }
    let (ok, stdout, stderr) = grid.cli(&["run", "resume", "--flow", "gated"])?;
    assert!(ok && stdout.contains("resumed 2 of 2 run(s); 0 refused"), "{stdout}\n{stderr}");
    for run_id in &runs {
        assert_eq!(grid.wait_run(&client, run_id, RUN_DEADLINE).await?.status, RunStatus::Succeeded);
    }
    let error = client.pause(&runs[0], "x".repeat(2_000)).await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    assert!(refusal(&error).message.contains("2000 bytes; at most 1024"), "{error:?}");
    let (ok, _, stderr) = grid.cli(&["run", "resume", "--reason", "x"])?;
    assert!(!ok && stderr.contains("name the runs to resume"), "{stderr}");
    let (ok, _, stderr) = grid.cli(&["run", "resume", runs[0].as_str(), "--limit", "1"])?;
    assert!(!ok && stderr.contains("--limit, --label, --since and --until go with --flow"), "{stderr}");
    let (ok, stdout, _) = grid.cli(&["run", "pause", "no-such-run", runs[0].as_str()])?;
    assert!(!ok && stdout.contains("paused 0 of 2 run(s) (1 as they were); 1 refused"), "{stdout}");
    Ok(())
}

/// `run watch` prints a reason as one line, whatever it holds (a newline cannot pass for
/// a line of the watch's own), and ends with 141, as Unix tools do, once its reader has
/// gone (`run watch RUN | grep -m1 paused`) instead of printing into nothing until the run
/// ends or its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_watch_prints_reasons_on_one_line_and_stops_when_its_reader_goes() -> anyhow::Result<()> {
    use std::io::BufRead;
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, GATED_FLOW).await?;
    let run_id = gated_run(&grid, &client).await?;
    let mut watch = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix])
        .args(["run", "watch", run_id.as_str(), "--timeout", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut lines = std::io::BufReader::new(watch.stdout.take().expect("piped")).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    assert!(first.contains("run            started (gated@1)"), "{first}");

    let forged = "maintenance\n00:00:00.000  run            succeeded in 1s";
    client.pause(&run_id, forged).await.or_logs(&grid)?;
    let paused = lines.by_ref().map_while(Result::ok).find(|line| line.contains("paused")).unwrap_or_default();
    assert!(paused.ends_with(r"paused: maintenance\n00:00:00.000  run            succeeded in 1s"), "{paused}");

    // The reader goes; the next change the watch prints ends it.
    drop(lines);
    client.resume(&run_id, "").await.or_logs(&grid)?;
    let until = std::time::Instant::now() + RUN_DEADLINE;
    let status = loop {
        match watch.try_wait()? {
            Some(status) => break Some(status),
            None if std::time::Instant::now() > until => break None,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let _ = watch.kill();
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(141),
        "the exit status of a command whose reader has gone"
    );
    Ok(())
}

/// `run pause|resume|cancel --flow` answers in the form for many runs (`matched`, and how
/// many it changed), however many runs match, one among them: a script reads one form for
/// one way of asking. A run named alone gets the form for one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_selection_is_answered_for_many_runs_also_when_one_matches() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, GATED_FLOW).await?;
    let run_id = gated_run(&grid, &client).await?;
    let answer = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let (ok, stdout, stderr) = grid.cli(args)?;
        anyhow::ensure!(ok, "{args:?} failed: {stdout}\n{stderr}");
        serde_json::from_str(&stdout).map_err(|error| anyhow::anyhow!("{args:?}: {error}: {stdout}"))
    };

    let (ok, stdout, stderr) = grid.cli(&["run", "pause", "--flow", "gated"])?;
    assert!(ok && stdout.contains("paused 1 of 1 run(s)"), "{stdout}\n{stderr}");
    for (verb, key) in [("resume", "resumed"), ("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")] {
        let answer = answer(&["--json", "run", verb, "--flow", "gated"])?;
        assert_eq!((&answer["matched"], &answer[key]), (&json!(1), &json!(1)), "{verb}: {answer}");
    }
    let answer = answer(&["--json", "run", "cancel", run_id.as_str()])?;
    assert_eq!((&answer["run_id"], &answer["applied"]), (&json!(run_id.as_str()), &json!(false)), "{answer}");
    Ok(())
}
