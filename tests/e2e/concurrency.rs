//! Concurrency limits: at most `max` runs of a flow (of each key) go at once; the others
//! wait, queued, and go in the order they started as slots free up, across coordinators,
//! crashes, cancels and redrives.

use std::time::Duration;

use flowgrid_sdk::{Client, ErrorCode, LimitSummary, ListRuns, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{api_request_json, metric_value, scrape_metrics, step, wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, RUN_DEADLINE};

/// Two runs at once; each waits for a signal.
const LIMITED_FLOW: &str = r#"
name: limited
concurrency: { max: 2 }
steps:
  - { id: go, kind: signal }
"#;

/// One run at once per customer.
const PER_CUSTOMER_FLOW: &str = r#"
name: per-customer
concurrency: { max: 1, key: input.customer }
steps:
  - { id: go, kind: signal }
"#;

/// The time a slot handed out wrongly would need to show (acquire, commit, admit, commit):
/// how long the runs must stay as they are once they got there.
const SETTLE: Duration = Duration::from_millis(500);

async fn start(grid: &Grid, client: &Client, flow: &str, input: serde_json::Value) -> anyhow::Result<RunId> {
    let start = StartRun { flow: flow.into(), input, ..Default::default() };
    Ok(client.start(start).await.or_logs(grid)?.run_id)
}

/// Whether each run was admitted (its signal step waits) or waits queued (the step is
/// pending); fails on anything else.
async fn admitted(client: &Client, runs: &[&RunId]) -> anyhow::Result<Vec<bool>> {
    let mut states = Vec::new();
    for run_id in runs {
        let view = client.get(run_id).await?;
        let state = (view.status, view.queued.is_some(), step(&view, "go").status);
        states.push(match state {
            (RunStatus::Running, false, StepStatus::Running) => true,
            (RunStatus::Running, true, StepStatus::Pending) => false,
            other => anyhow::bail!("run {run_id} is neither admitted nor queued: {other:?}"),
        });
    }
    Ok(states)
}

/// Waits until the runs are admitted (or queued) as `expected` says.
async fn wait_admitted(grid: &Grid, client: &Client, runs: &[&RunId], expected: &[bool]) -> anyhow::Result<()> {
    wait_for(&format!("admitted: {expected:?}"), RUN_DEADLINE, || async {
        admitted(client, runs).await.ok().filter(|states| states == expected)
    })
    .await
    .or_logs(grid)?;
    // And it stays so: no further slot is handed out (nothing to wait for but time).
    tokio::time::sleep(SETTLE).await;
    assert_eq!(admitted(client, runs).await?, expected, "the runs stay as they were");
    Ok(())
}

/// Waits until the limit of `flow` and `key` counts `runs` runs (going or queued): each
/// start's request for a slot reached it.
async fn wait_counted(grid: &Grid, client: &Client, flow: &str, key: &str, runs: u32) -> anyhow::Result<()> {
    wait_for(&format!("{runs} runs under {flow}/{key}"), RUN_DEADLINE, || async {
        let limits = client.limits(Some(flow)).await.ok()?.limits;
        let limit = limits.into_iter().find(|limit| limit.key == key)?;
        (limit.going + limit.queued == runs).then_some(())
    })
    .await
    .or_logs(grid)
}

/// Lets `run_id` (admitted, or about to be) end: signals its step `go` once it waits, and
/// waits for the run's success.
async fn finish(grid: &Grid, client: &Client, run_id: &RunId) -> anyhow::Result<()> {
    // The limit's admission may still be on its way to the run's shard: the signal would find
    // its step not waiting yet.
    wait_until_admitted(grid, client, run_id).await?;
    client.signal(run_id, "go", json!({"done": true})).await.or_logs(grid)?;
    let view = grid.wait_run(client, run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_past_the_limit_wait_queued_and_go_in_order_as_slots_free_up() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    // Two coordinators: a run's shard and its limit's are mostly in different processes.
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, RUN_DEADLINE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, LIMITED_FLOW).await?;
    let mut runs = Vec::new();
    for n in 0..5 {
        runs.push(start(&grid, &client, "limited", json!({"n": n})).await?);
        // Each asks for its slot before the next: the queue's order is the start order.
        wait_counted(&grid, &client, "limited", "", n + 1).await?;
    }
    let [r0, r1, r2, r3, r4] = <[RunId; 5]>::try_from(runs).expect("five runs");
    wait_admitted(&grid, &client, &[&r0, &r1, &r2, &r3, &r4], &[true, true, false, false, false]).await?;

    let (ok, stdout, _) = grid.cli(&["run", "list", "--flow", "limited"])?;
    assert!(ok && stdout.matches("running (queued)").count() == 3, "{stdout}");
    // The limit in use, as an operator lists it.
    let limits = client.limits(Some("limited")).await.or_logs(&grid)?;
    let expected = LimitSummary {
        flow: "limited".into(),
        key: String::new(),
        max: 2,
        rate: None,
        when_full: Default::default(),
        going: 2,
        queued: 3,
        next_start_ms: None,
    };
    assert_eq!(limits.limits, vec![expected], "{limits:?}");
    let (ok, _, stderr) = grid.cli(&["flow", "limits", "limitd"])?;
    assert!(!ok && stderr.contains("no flow named \"limitd\""), "a misspelt flow is not 'no limit in use': {stderr}");
    let (ok, stdout, _) = grid.cli(&["flow", "limits", "limited"])?;
    assert!(
        ok && stdout
            .lines()
            .nth(1)
            .is_some_and(|row| row.split_whitespace().eq(["limited", "-", "2", "-", "queue", "2", "3", "-"])),
        "{stdout}"
    );
    let (_, stdout, _) = grid.cli(&["run", "get", r2.as_str()])?;
    assert!(stdout.contains("waiting for its turn under its flow's concurrency limit; holding step go"), "{stdout}");
    let error = client.signal(&r2, "go", json!({})).await.expect_err("a queued run's signal step has not started");
    assert_eq!(refusal(&error).code, ErrorCode::Conflict, "{error:?}");

    // A run ends: the first in the queue takes its slot.
    finish(&grid, &client, &r0).await?;
    wait_admitted(&grid, &client, &[&r1, &r2, &r3, &r4], &[true, true, false, false]).await?;
    // A queued run that is cancelled leaves the queue; the one after it moves up.
    let cancelled = client.cancel(&r3, "not needed").await.or_logs(&grid)?;
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    finish(&grid, &client, &r1).await?;
    wait_admitted(&grid, &client, &[&r2, &r4], &[true, true]).await?;
    for run_id in [&r2, &r4] {
        finish(&grid, &client, run_id).await?;
    }

    // A redriven run queues again; it goes once a slot is free.
    let blockers =
        [start(&grid, &client, "limited", json!({})).await?, start(&grid, &client, "limited", json!({})).await?];
    wait_admitted(&grid, &client, &[&blockers[0], &blockers[1]], &[true, true]).await?;
    let redriven = client.redrive(&r3, "needed after all").await.or_logs(&grid)?;
    assert_eq!(redriven.status, RunStatus::Running);
    wait_admitted(&grid, &client, &[&r3], &[false]).await?;
    // A late acquire of its first round (its outbox retried it while the limit's shard was
    // slow) changes nothing: the run keeps its place of the second round. Before, it took
    // that place, and the admission of the stale round was refused: the run stayed queued.
    let stale = json!({"flow": "limited", "run_id": r3, "round": 0, "max": 2});
    let nats = grid.nats_client().await?;
    let reply = api_request_json(&nats, &grid.prefix, "gate.acquire", &stale, RUN_DEADLINE).await?;
    let taken: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    assert_eq!(taken["ok"]["applied"], json!(false), "{taken}");
    finish(&grid, &client, &blockers[0]).await?;
    wait_admitted(&grid, &client, &[&r3, &blockers[1]], &[true, true]).await?;
    for run_id in [&r3, &blockers[1]] {
        finish(&grid, &client, run_id).await?;
    }
    let runs = client.list(ListRuns { flow: Some("limited".into()), ..Default::default() }).await?.runs;
    assert!(runs.iter().all(|run| run.status == RunStatus::Succeeded), "{runs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_per_key_holds_across_a_coordinator_crash() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, PER_CUSTOMER_FLOW).await?;
    let acme = start(&grid, &client, "per-customer", json!({"customer": "acme"})).await?;
    wait_counted(&grid, &client, "per-customer", "acme", 1).await?;
    let acme_next = start(&grid, &client, "per-customer", json!({"customer": "acme"})).await?;
    let initech = start(&grid, &client, "per-customer", json!({"customer": "initech"})).await?;
    wait_admitted(&grid, &client, &[&acme, &acme_next, &initech], &[true, false, true]).await?;

    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    wait_admitted(&grid, &client, &[&acme, &acme_next, &initech], &[true, false, true]).await?;
    let limits = client.limits(None).await.or_logs(&grid)?.limits;
    let counts: Vec<_> = limits.iter().map(|limit| (limit.key.as_str(), limit.going, limit.queued)).collect();
    assert_eq!(counts, [("acme", 1, 1), ("initech", 1, 0)], "by key: {limits:?}");
    finish(&grid, &client, &acme).await?;
    wait_admitted(&grid, &client, &[&acme_next, &initech], &[true, true]).await?;
    for run_id in [&acme_next, &initech] {
        finish(&grid, &client, run_id).await?;
    }

    let long = json!({"customer": "x".repeat(300)});
    let error = client.start(StartRun { flow: "per-customer".into(), input: long, ..Default::default() }).await;
    let error = error.expect_err("a key over its limit is refused");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    assert!(refusal(&error).message.contains("concurrency.key gives 300 bytes"), "{error:?}");
    Ok(())
}

/// Two runs per customer start at once, then one a second: each run ends as it starts.
const RATED_FLOW: &str = r#"
name: rated
concurrency: { rate: { runs: 2, per_ms: 2000 }, key: input.customer }
steps:
  - { id: t, kind: transform, output: '1' }
"#;

/// When each run ended, once all of them did (each successfully).
async fn ended_ms(grid: &Grid, client: &Client, runs: &[RunId]) -> anyhow::Result<Vec<u64>> {
    let mut ends = Vec::new();
    for run_id in runs {
        let view = grid.wait_run(client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        ends.push(view.ended_ms.expect("an ended run has its end time"));
    }
    Ok(ends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_rate_lets_a_burst_go_then_one_run_per_interval_per_key() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, RUN_DEADLINE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, RATED_FLOW).await?;
    let mut acme = Vec::new();
    for _ in 0..5 {
        acme.push(start(&grid, &client, "rated", json!({"customer": "acme"})).await?);
    }
    let initech = start(&grid, &client, "rated", json!({"customer": "initech"})).await?;
    let (ok, stdout, _) = grid.cli(&["run", "get", acme[4].as_str()])?;
    assert!(ok && stdout.contains("waiting for its turn under its flow's concurrency limit"), "{stdout}");
    // The rate holds acme's last runs back: the limit says when the next one goes.
    let limits = client.limits(Some("rated")).await.or_logs(&grid)?.limits;
    let acme_limit = limits.iter().find(|limit| limit.key == "acme").expect("acme's limit is in use");
    assert_eq!(acme_limit.rate, Some(flowgrid_sdk::StartRate { runs: 2, per_ms: 2000 }), "{acme_limit:?}");
    if acme_limit.queued > 0 {
        assert!(acme_limit.next_start_ms.is_some(), "a queued run held by the rate has a next start: {acme_limit:?}");
    }

    let acme_ends = ended_ms(&grid, &client, &acme).await?;
    let initech_end = ended_ms(&grid, &client, &[initech]).await?[0];
    // Two at once, then one each 1,000 ms: the fifth starts 3,000 ms after the first (less
    // the few ms between a run's admission and its end, which may differ from run to run).
    let spread = acme_ends[4] - acme_ends[0];
    assert!(spread >= 2_800, "five runs of one key took {spread} ms: {acme_ends:?}");
    // Another key has a rate of its own: initech's run did not wait behind acme's.
    assert!(initech_end < acme_ends[4], "initech ended at {initech_end}, acme's: {acme_ends:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_rate_holds_across_a_coordinator_crash() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    // Two at once, then one each 5 s.
    deploy(&grid, &client, &RATED_FLOW.replace("per_ms: 2000", "per_ms: 10000")).await?;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(start(&grid, &client, "rated", json!({"customer": "acme"})).await?);
    }
    let first_two = ended_ms(&grid, &client, &runs[..2]).await?;
    // The coordinator dies with the third run queued and starts again at once: its bucket
    // is as empty as before, so the third run still waits its 5 s.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let third = ended_ms(&grid, &client, &runs[2..]).await?[0];
    let waited = third - first_two[0];
    assert!(waited >= 4_800, "the third run started {waited} ms after the first: {first_two:?}, {third}");
    Ok(())
}

/// One run at once; each waits for a signal.
const ONE_AT_A_TIME: &str = r#"
name: one-at-a-time
concurrency: { max: 1 }
steps:
  - { id: go, kind: signal }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_run_waits_for_its_start_time_and_takes_no_slot_until_then() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ONE_AT_A_TIME).await?;
    deploy(&grid, &client, "name: later\nsteps:\n  - { id: t, kind: transform, output: '1' }\n").await?;

    // Started from the command line 1.5 s ahead: it exists, delayed, then runs.
    let (ok, stdout, stderr) = grid.cli(&["run", "start", "later", "--at", "1500ms"])?;
    assert!(ok, "{stdout}{stderr}");
    let later = RunId(stdout.trim().into());
    let view = client.get(&later).await?;
    assert_eq!(view.status, RunStatus::Running, "{view:?}");
    assert!(view.delayed.as_ref().is_some_and(|delayed| delayed.held == ["t"]), "{view:?}");
    let (_, listed, _) = grid.cli(&["run", "list", "--flow", "later"])?;
    assert!(listed.contains("running (delayed)"), "{listed}");
    let (_, shown, _) = grid.cli(&["run", "get", later.as_str()])?;
    assert!(shown.contains("duration  not started yet (delayed)"), "{shown}");
    let view = grid.wait_run(&client, &later, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let took = view.ended_ms.expect("ended") - view.created_ms;
    assert!(took >= 1_400, "a run delayed 1,500 ms ended {took} ms after its start request");

    // Cancelled before its start time and redriven: it waits for that time again.
    let (ok, stdout, stderr) = grid.cli(&["run", "start", "later", "--at", "3s"])?;
    assert!(ok, "{stdout}{stderr}");
    let again = RunId(stdout.trim().into());
    for command in ["cancel", "redrive"] {
        let (ok, stdout, stderr) = grid.cli(&["run", command, &again.0])?;
        assert!(ok, "run {command}: {stdout}{stderr}");
    }
    let view = client.get(&again).await?;
    assert!(view.status == RunStatus::Running && view.delayed.is_some(), "waits again: {view:?}");
    let view = grid.wait_run(&client, &again, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let took = view.ended_ms.expect("ended") - view.created_ms;
    assert!(took >= 2_900, "a run delayed 3 s, cancelled and redriven, ended {took} ms after its start request");

    // A delayed run of a limited flow holds no slot while it waits: a run started after it
    // goes at once, and the delayed one queues behind it at its start time.
    let at = flowgrid_sdk::parse_start_time("2s").expect("a duration");
    let delayed_start = StartRun { flow: "one-at-a-time".into(), start_at_ms: Some(at), ..Default::default() };
    let delayed = client.start(delayed_start).await.or_logs(&grid)?.run_id;
    let now = start(&grid, &client, "one-at-a-time", json!({})).await?;
    wait_admitted(&grid, &client, &[&now], &[true]).await?;
    wait_for("the delayed run queued", RUN_DEADLINE, || async {
        let view = client.get(&delayed).await.ok()?;
        (view.delayed.is_none() && view.queued.is_some()).then_some(())
    })
    .await
    .or_logs(&grid)?;
    finish(&grid, &client, &now).await?;
    wait_admitted(&grid, &client, &[&delayed], &[true]).await?;
    finish(&grid, &client, &delayed).await?;

    // More than 366 days ahead is refused.
    let far = StartRun { flow: "later".into(), start_at_ms: Some(at + 367 * 86_400_000), ..Default::default() };
    let error = client.start(far).await.expect_err("too far ahead");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    let said = &refusal(&error).message;
    assert!(said.contains("more than 366 days ahead (20") && said.contains("Z);"), "a date, not milliseconds: {said}");
    Ok(())
}

/// A run that finds its limit full is cancelled (`cancel_new`), or cancels the oldest run
/// of its key (`cancel_oldest`): one run per customer at a time either way.
const WHEN_FULL_FLOW: &str = r#"
name: when-full
concurrency: { max: 1, key: input.customer, when_full: cancel_new }
steps:
  - { id: go, kind: signal }
"#;

/// Waits until `run_id` ended cancelled, and gives its error message.
async fn wait_cancelled(grid: &Grid, client: &Client, run_id: &RunId) -> anyhow::Result<String> {
    let view = grid.wait_run(client, run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Cancelled, "{view:?}\n{}", grid.logs());
    Ok(view.error.map(|error| error.message).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_limit_cancels_the_new_run_or_the_oldest_one_as_it_says() -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&["a"], 1).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WHEN_FULL_FLOW).await?;

    // cancel_new: the run going keeps its slot; one started meanwhile ends at once.
    let first = start(&grid, &client, "when-full", json!({"customer": "acme"})).await?;
    wait_admitted(&grid, &client, &[&first], &[true]).await?;
    let skipped = start(&grid, &client, "when-full", json!({"customer": "acme"})).await?;
    let other = start(&grid, &client, "when-full", json!({"customer": "initech"})).await?;
    let message = wait_cancelled(&grid, &client, &skipped).await?;
    assert!(message.contains("for key `acme` (max 1) had no room for it (`when_full: cancel_new`)"), "{message}");
    wait_admitted(&grid, &client, &[&first, &other], &[true, true]).await?;
    let (ok, stdout, _) = grid.cli(&["flow", "limits", "when-full"])?;
    let acme = stdout.lines().find(|line| line.contains("acme")).unwrap_or_default();
    assert!(ok && acme.split_whitespace().eq(["when-full", "acme", "1", "-", "cancel_new", "1", "0", "-"]), "{stdout}");
    finish(&grid, &client, &first).await?;
    let next = start(&grid, &client, "when-full", json!({"customer": "acme"})).await?;
    wait_admitted(&grid, &client, &[&next], &[true]).await?;
    finish(&grid, &client, &next).await?;

    // cancel_oldest: each new run cancels the one going (or waiting) before it, and goes
    // once that one ended.
    deploy(&grid, &client, &WHEN_FULL_FLOW.replace("cancel_new", "cancel_oldest")).await?;
    let oldest = start(&grid, &client, "when-full", json!({"customer": "acme"})).await?;
    wait_admitted(&grid, &client, &[&oldest], &[true]).await?;
    let newer = start(&grid, &client, "when-full", json!({"customer": "acme"})).await?;
    let message = wait_cancelled(&grid, &client, &oldest).await?;
    assert!(message.contains(&format!("run {newer} took its place under flow `when-full`")), "{message}");
    wait_admitted(&grid, &client, &[&newer, &other], &[true, true]).await?;
    let newest = start(&grid, &client, "when-full", json!({"customer": "acme"})).await?;
    wait_cancelled(&grid, &client, &newer).await?;
    wait_admitted(&grid, &client, &[&newest, &other], &[true, true]).await?;
    finish(&grid, &client, &newest).await?;
    finish(&grid, &client, &other).await?;
    let body = scrape_metrics(&metrics_addr).or_logs(&grid)?;
    let turned_away =
        |why: &str| metric_value(&body, &format!("flowgrid_runs_turned_away_total{{when_full=\"{why}\"}}"));
    assert_eq!((turned_away("cancel_new"), turned_away("cancel_oldest")), (Some(1.0), Some(2.0)), "{body}");
    Ok(())
}

/// One run at once: those that find it full are turned away.
const ONE_AT_A_TIME_FLOW: &str = r#"
name: one-at-a-time
concurrency: { max: 1, when_full: cancel_new }
steps:
  - { id: go, kind: signal }
"#;

/// `flowgrid_runs_waiting_for_slot` of the coordinator that keeps the limit, once it is
/// scraped; fails without it.
fn runs_waiting_for_slot(metrics_addr: &str) -> anyhow::Result<f64> {
    let body = scrape_metrics(metrics_addr)?;
    metric_value(&body, "flowgrid_runs_waiting_for_slot ")
        .ok_or_else(|| anyhow::anyhow!("no flowgrid_runs_waiting_for_slot in:\n{body}"))
}

/// Waits until `flowgrid_runs_waiting_for_slot` reads `expected`.
async fn wait_waiting_for_slot(grid: &Grid, metrics_addr: &str, expected: f64) -> anyhow::Result<()> {
    wait_for(&format!("{expected} runs waiting for a slot"), RUN_DEADLINE, || async {
        runs_waiting_for_slot(metrics_addr).ok().filter(|waiting| *waiting == expected)
    })
    .await
    .or_logs(grid)?;
    Ok(())
}

/// The gauge of runs waiting for a slot counts what waits, unlike the difference of the
/// runs queued and admitted: runs turned away (`cancel_new`) and queued runs cancelled are
/// never admitted, but they do not wait either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_waiting_for_a_slot_are_counted_while_they_wait_and_no_longer() -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&[], 1).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ONE_AT_A_TIME_FLOW).await?;
    let first = start(&grid, &client, "one-at-a-time", json!({})).await?;
    wait_for("the first run admitted", RUN_DEADLINE, || async {
        admitted(&client, &[&first]).await.ok().filter(|states| states == &[true])
    })
    .await
    .or_logs(&grid)?;
    let turned_away = [
        start(&grid, &client, "one-at-a-time", json!({})).await?,
        start(&grid, &client, "one-at-a-time", json!({})).await?,
    ];
    for run_id in &turned_away {
        wait_cancelled(&grid, &client, run_id).await?;
    }
    let body = scrape_metrics(&metrics_addr).or_logs(&grid)?;
    let count = |name: &str| metric_value(&body, name).unwrap_or_default();
    let (queued, admitted) = (count("flowgrid_runs_queued_total "), count("flowgrid_runs_admitted_total "));
    assert_eq!(queued - admitted, 2.0, "the two turned away count as queued and never as admitted:\n{body}");
    assert_eq!(runs_waiting_for_slot(&metrics_addr)?, 0.0, "but they do not wait");
    finish(&grid, &client, &first).await?;

    // Queueing: one goes, two wait; a waiting run cancelled waits no more, and one
    // admitted neither.
    deploy(&grid, &client, &ONE_AT_A_TIME_FLOW.replace("cancel_new", "queue")).await?;
    let mut runs = Vec::new();
    for n in 0..3 {
        runs.push(start(&grid, &client, "one-at-a-time", json!({"n": n})).await?);
        wait_counted(&grid, &client, "one-at-a-time", "", n + 1).await?;
    }
    assert_eq!(runs_waiting_for_slot(&metrics_addr).or_logs(&grid)?, 2.0);
    client.cancel(&runs[1], "not needed").await.or_logs(&grid)?;
    wait_waiting_for_slot(&grid, &metrics_addr, 1.0).await?;
    finish(&grid, &client, &runs[0]).await?;
    wait_waiting_for_slot(&grid, &metrics_addr, 0.0).await?;
    finish(&grid, &client, &runs[2]).await
}

/// A queueing limit of one run, with many waiting.
const QUEUEING_FLOW: &str = r#"
name: lowered
concurrency: { max: 1, when_full: queue }
steps:
  - { id: go, kind: signal }
"#;

/// A limit changed to `cancel_oldest` with more runs waiting than one commit turns away
/// turns them all away, a commit's worth at a time, and the newest run goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_oldest_turns_away_more_runs_than_one_commit_takes() -> anyhow::Result<()> {
    const WAITING: usize = 1_500;
    let (mut grid, metrics_addr) = Grid::start_with_metrics(&["a"], 1).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, QUEUEING_FLOW).await?;
    let starts: Vec<StartRun> =
        (0..WAITING).map(|_| StartRun { flow: "lowered".into(), input: json!({}), ..Default::default() }).collect();
    let mut runs = Vec::new();
    for chunk in starts.chunks(500) {
        for started in client.start_many(chunk).await.or_logs(&grid)? {
            runs.push(started?.run_id);
        }
    }
    wait_counted(&grid, &client, "lowered", "", WAITING as u32).await?;

    deploy(&grid, &client, &QUEUEING_FLOW.replace("when_full: queue", "when_full: cancel_oldest")).await?;
    let newest = start(&grid, &client, "lowered", json!({})).await?;
    // Every older run ends cancelled and gives its place back: only the newest is left.
    wait_counted(&grid, &client, "lowered", "", 1).await?;
    wait_admitted(&grid, &client, &[&newest], &[true]).await?;
    // The newest run took the place of one of them; the others were past the limit before
    // it asked, and say so.
    let took_its_place = format!("run {newest} took its place under flow `lowered`");
    let mut named = Vec::new();
    for run_id in &runs {
        let message = wait_cancelled(&grid, &client, run_id).await?;
        if message.contains(&took_its_place) {
            named.push(run_id.clone());
        } else {
            assert!(message.contains("newer runs took its place under flow `lowered`"), "{run_id}: {message}");
        }
    }
    assert_eq!(named.len(), 1, "the newest run names itself on one run (the first: {:?})", named.first());
    let body = scrape_metrics(&metrics_addr).or_logs(&grid)?;
    let turned_away = metric_value(&body, "flowgrid_runs_turned_away_total{when_full=\"cancel_oldest\"}");
    assert_eq!(turned_away, Some(WAITING as f64), "{body}");
    // The runs turned away left no place behind: reloaded, the limit holds the newest alone.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    wait_admitted(&grid, &client, &[&newest], &[true]).await?;
    wait_counted(&grid, &client, "lowered", "", 1).await?;
    finish(&grid, &client, &newest).await
}

/// One run at once per key; a new run cancels the one going before it.
const LATEST_WINS_FLOW: &str = r#"
name: latest-wins
concurrency: { max: 1, key: input.k, when_full: cancel_oldest }
steps:
  - { id: go, kind: signal }
"#;

/// Waits until `run_id` is admitted (its signal step waits).
async fn wait_until_admitted(grid: &Grid, client: &Client, run_id: &RunId) -> anyhow::Result<()> {
    wait_for(&format!("run {run_id} admitted"), RUN_DEADLINE, || async {
        admitted(client, &[run_id]).await.ok().filter(|states| states == &[true])
    })
    .await
    .or_logs(grid)?;
    Ok(())
}

/// `verb` (`gate.acquire` or `gate.release`) sent over NATS as a coordinator sends it,
/// and whether the limit applied it.
async fn gate_request(grid: &Grid, verb: &str, message: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let nats = grid.nats_client().await?;
    let reply = api_request_json(&nats, &grid.prefix, verb, &message, RUN_DEADLINE).await?;
    let taken: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    anyhow::ensure!(taken["ok"].is_object(), "{verb} refused: {taken}");
    Ok(taken["ok"]["applied"].clone())
}

/// An acquire that comes after its run's round ended (its outbox sent it again after the
/// reply to the first was lost), or after a release of its round that came first, changes
/// nothing: the run that ended takes no place, and does not turn away the run going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_of_a_round_that_ended_takes_no_place_and_cancels_nobody() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, LATEST_WINS_FLOW).await?;
    let ended = start(&grid, &client, "latest-wins", json!({"k": "x"})).await?;
    wait_until_admitted(&grid, &client, &ended).await?;
    finish(&grid, &client, &ended).await?;
    // Admitted under `max: 1`: the slot of the run that ended came back.
    let going = start(&grid, &client, "latest-wins", json!({"k": "x"})).await?;
    wait_until_admitted(&grid, &client, &going).await?;

    // The first run's acquire again, as its outbox sends it.
    let version = client.get(&ended).await?.version;
    let acquire = |round: u32| {
        json!({"flow": "latest-wins", "key": "x", "run_id": ended, "round": round, "max": 1,
               "when_full": "cancel_oldest", "version": version})
    };
    assert_eq!(gate_request(&grid, "gate.acquire", acquire(0)).await?, json!(false), "a repeat of an ended round");
    // A release that comes before its acquire (as if the run had been redriven, and its
    // second round ended queued): the acquire, late, changes nothing either.
    let release = json!({"flow": "latest-wins", "key": "x", "run_id": ended, "round": 1});
    assert_eq!(gate_request(&grid, "gate.release", release).await?, json!(false), "nothing to release");
    assert_eq!(gate_request(&grid, "gate.acquire", acquire(1)).await?, json!(false), "an acquire after its release");

    wait_admitted(&grid, &client, &[&going], &[true]).await?;
    let limits = client.limits(Some("latest-wins")).await.or_logs(&grid)?.limits;
    let counts: Vec<_> = limits.iter().map(|limit| (limit.key.as_str(), limit.going, limit.queued)).collect();
    assert_eq!(counts, [("x", 1, 0)], "the run going alone: {limits:?}");
    finish(&grid, &client, &going).await
}

/// Three runs at once in its first version (one in the next); each waits for a signal.
const VERSIONED_FLOW: &str = r#"
name: versioned
concurrency: { max: 3 }
steps:
  - { id: go, kind: signal }
"#;

/// The limit of `flow` without a key, as `limit.list` gives it.
async fn limit_of(grid: &Grid, client: &Client, flow: &str) -> anyhow::Result<LimitSummary> {
    let limits = client.limits(Some(flow)).await.or_logs(grid)?.limits;
    let limit = limits.iter().find(|limit| limit.key.is_empty()).cloned();
    limit.ok_or_else(|| anyhow::anyhow!("no limit of {flow} in use: {limits:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_keeps_its_newest_versions_max_against_older_runs_and_repeats() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, VERSIONED_FLOW).await?;
    // A run of version 1, cancelled: redriven later, it asks again with version 1's bounds.
    let older = start(&grid, &client, "versioned", json!({})).await?;
    wait_admitted(&grid, &client, &[&older], &[true]).await?;
    client.cancel(&older, "not yet").await.or_logs(&grid)?;
    wait_for("the limit idle", RUN_DEADLINE, || async {
        client.limits(Some("versioned")).await.ok().filter(|limits| limits.limits.is_empty())
    })
    .await
    .or_logs(&grid)?;
    deploy(&grid, &client, &VERSIONED_FLOW.replace("max: 3", "max: 1")).await?;
    let mut runs = Vec::new();
    for n in 0..3 {
        runs.push(start(&grid, &client, "versioned", json!({})).await?);
        wait_counted(&grid, &client, "versioned", "", n + 1).await?;
    }
    let [first, second, third] = <[RunId; 3]>::try_from(runs).expect("three runs");
    wait_admitted(&grid, &client, &[&first, &second, &third], &[true, false, false]).await?;

    // The run of version 1 (`max: 3`) asks: it queues, and lets no other run go with it.
    let redriven = client.redrive(&older, "needed after all").await.or_logs(&grid)?;
    assert_eq!(redriven.status, RunStatus::Running);
    assert_eq!(client.get(&older).await?.version, 1, "a redriven run keeps its version");
    wait_counted(&grid, &client, "versioned", "", 4).await?;
    let limit = limit_of(&grid, &client, "versioned").await?;
    assert_eq!((limit.max, limit.going, limit.queued), (1, 1, 3), "version 2's max holds: {limit:?}");
    wait_admitted(&grid, &client, &[&first, &second, &third, &older], &[true, false, false, false]).await?;

    // A repeat of an acquire taken (its outbox sent it again) changes nothing, whatever
    // bounds it carries.
    let version = client.get(&second).await?.version;
    let repeat = json!({"flow": "versioned", "run_id": second, "max": 5, "version": version});
    let nats = grid.nats_client().await?;
    let reply = api_request_json(&nats, &grid.prefix, "gate.acquire", &repeat, RUN_DEADLINE).await?;
    let taken: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    assert_eq!(taken["ok"]["applied"], json!(false), "{taken}");
    let limit = limit_of(&grid, &client, "versioned").await?;
    assert_eq!((limit.max, limit.going, limit.queued), (1, 1, 3), "a repeat leaves the limit: {limit:?}");

    // One at a time, in the order they asked.
    finish(&grid, &client, &first).await?;
    wait_admitted(&grid, &client, &[&second, &third, &older], &[true, false, false]).await?;
    for (run_id, next) in [(&second, &third), (&third, &older)] {
        finish(&grid, &client, run_id).await?;
        wait_admitted(&grid, &client, &[next], &[true]).await?;
    }
    finish(&grid, &client, &older).await
}

/// Three runs at once in its first version; a run past the limit is cancelled.
const SKIPPING_FLOW: &str = r#"
name: skipping
concurrency: { max: 3, when_full: cancel_new }
steps:
  - { id: go, kind: signal }
"#;

/// A newer version's bounds that came with a run the limit turned away (no place of it is
/// stored) are still the limit's after its coordinator restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_versions_max_taken_from_a_run_turned_away_holds_across_a_crash() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SKIPPING_FLOW).await?;
    let going =
        [start(&grid, &client, "skipping", json!({})).await?, start(&grid, &client, "skipping", json!({})).await?];
    wait_admitted(&grid, &client, &[&going[0], &going[1]], &[true, true]).await?;
    deploy(&grid, &client, &SKIPPING_FLOW.replace("max: 3", "max: 1")).await?;
    let skipped = start(&grid, &client, "skipping", json!({})).await?;
    let message = wait_cancelled(&grid, &client, &skipped).await?;
    assert!(message.contains("(max 1) had no room for it"), "{message}");

    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    wait_admitted(&grid, &client, &[&going[0], &going[1]], &[true, true]).await?;
    let limit = limit_of(&grid, &client, "skipping").await?;
    assert_eq!((limit.max, limit.going), (1, 2), "reloaded with version 2's max: {limit:?}");
    // So one run going is still one too many for a new one.
    finish(&grid, &client, &going[0]).await?;
    let skipped = start(&grid, &client, "skipping", json!({})).await?;
    let message = wait_cancelled(&grid, &client, &skipped).await?;
    assert!(message.contains("(max 1) had no room for it"), "{message}");
    finish(&grid, &client, &going[1]).await
}

/// One run a day; each run ends as it starts.
const DAILY_FLOW: &str = r#"
name: daily
concurrency: { rate: { runs: 1, per_ms: 86400000 } }
steps:
  - { id: t, kind: transform, output: '1' }
"#;

/// A version with a faster rate is not held back by what a slower one left in the bucket:
/// at most one period of the new rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faster_start_rate_is_not_held_back_by_a_slower_versions_bucket() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, DAILY_FLOW).await?;
    let today = start(&grid, &client, "daily", json!({})).await?;
    ended_ms(&grid, &client, &[today]).await?;
    // 100 a minute: the bucket the daily run emptied is full again within a minute, and
    // the next run goes one interval (600 ms) after the deploy, not a day after the run.
    deploy(&grid, &client, &DAILY_FLOW.replace("runs: 1, per_ms: 86400000", "runs: 100, per_ms: 60000")).await?;
    let next = start(&grid, &client, "daily", json!({})).await?;
    ended_ms(&grid, &client, &[next]).await?;
    Ok(())
}
