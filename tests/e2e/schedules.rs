//! Scheduled runs: a flow's schedule starts one run per slot, with the slot in the run's
//! idempotency key, goes on across a coordinator restart, and stops with a version
//! deployed without it.

use std::time::Duration;

use flowgrid_sdk::{ListRuns, RunId, RunSummary};
use flowgrid_tests::{wait_for, Grid};
use serde_json::json;

use crate::{deploy, OrLogs};

const TICKER: &str = r#"
name: ticker
schedule: { every_ms: 1000, input: { from: schedule }, labels: { source: ticker } }
steps:
  - { id: tick, kind: task, pool: a, task: echo }
"#;

async fn runs_of(client: &flowgrid_sdk::Client) -> anyhow::Result<Vec<RunSummary>> {
    runs_of_flow(client, "ticker").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_starts_one_run_per_slot_until_a_version_without_it() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, TICKER).await?;
    let runs = wait_for("three scheduled runs", Duration::from_secs(20), || async {
        runs_of(&client).await.ok().filter(|runs| runs.len() >= 3)
    })
    .await
    .or_logs(&grid)?;
    for run in &runs {
        // The run id says which slot started it: a whole second, shortly before the run.
        let slot = (run.created_ms / 1000) * 1000;
        let slot = [slot, slot.saturating_sub(1000)]
            .into_iter()
            .find(|slot| RunId::from_idempotency_key("ticker", &format!("schedule-{slot}")) == run.run_id);
        let slot = slot.unwrap_or_else(|| panic!("{run:?} was not started for a slot of the schedule"));
        assert!(run.created_ms - slot < 1_000, "started {} ms after its slot", run.created_ms - slot);
    }
    let view = client.get(&runs[0].run_id).await.or_logs(&grid)?;
    assert_eq!(view.input, json!({"from": "schedule"}), "the schedule's input");
    assert_eq!(view.labels.get("source").map(String::as_str), Some("ticker"), "the schedule's labels");

    // The schedule lives in the store with the flow: a restarted coordinator keeps it going.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let before = runs_of(&client).await?.len();
    wait_for("scheduled runs after the restart", Duration::from_secs(20), || async {
        runs_of(&client).await.ok().filter(|runs| runs.len() >= before + 2)
    })
    .await
    .or_logs(&grid)?;

    deploy(
        &grid,
        &client,
        &TICKER.replace("schedule: { every_ms: 1000, input: { from: schedule }, labels: { source: ticker } }\n", ""),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stopped = runs_of(&client).await?.len();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(runs_of(&client).await?.len(), stopped, "a version without a schedule starts no more runs");
    Ok(())
}

/// A schedule and a trigger on the same flow: both stop while the flow is paused.
const TICKER_AND_EVENTS: &str = r#"
name: ticker
schedule: { every_ms: 1000, input: { from: schedule }, labels: { source: ticker } }
trigger: { stream: TICKS }
steps:
  - { id: tick, kind: task, pool: a, task: echo }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_flow_starts_no_run_by_schedule_or_trigger_until_it_is_resumed() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "TICKS".into(),
            subjects: vec!["ticks".into()],
            ..Default::default()
        })
        .await?;
    deploy(&grid, &client, TICKER_AND_EVENTS).await?;
    wait_for("a scheduled run", Duration::from_secs(20), || async {
        runs_of(&client).await.ok().filter(|runs| !runs.is_empty())
    })
    .await
    .or_logs(&grid)?;

    let (ok, stdout, stderr) = grid.cli(&["flow", "pause", "ticker", "--reason", "incident 42"])?;
    assert!(ok && stdout.contains("flow ticker is paused"), "{stdout}\n{stderr}");
    let (_, stdout, _) = grid.cli(&["flow", "list"])?;
    assert!(stdout.contains("every 1.0s, stream TICKS (paused)"), "{stdout}");
    let flows = client.flows().await.or_logs(&grid)?.flows;
    assert_eq!(flows[0].paused.as_ref().map(|pause| pause.reason.as_str()), Some("incident 42"));
    // A run of a slot due as the pause went through may still be starting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = runs_of(&client).await?.len();
    let mut from_messages = Vec::new();
    for tick in 0..2 {
        let ack = jetstream.publish("ticks", format!("{{\"tick\": {tick}}}").into()).await?.await?;
        from_messages.push(RunId::from_idempotency_key("ticker", &format!("trigger/TICKS/{}", ack.sequence)));
    }
    // Two slots of the schedule, and the time the messages' runs would need to start.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(runs_of(&client).await?.len(), paused_at, "a paused flow starts no run");

    // The pause is kept with the flow: a restarted coordinator keeps it.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(runs_of(&client).await?.len(), paused_at, "still paused after a restart");

    let (ok, stdout, stderr) = grid.cli(&["flow", "resume", "ticker"])?;
    assert!(
        ok && stdout.contains("flow ticker is resumed: its schedule and trigger start runs again"),
        "{stdout}\n{stderr}"
    );
    let runs = wait_for("the messages' runs and a scheduled run", Duration::from_secs(20), || async {
        let runs = runs_of(&client).await.ok()?;
        let ids: Vec<&RunId> = runs.iter().map(|run| &run.run_id).collect();
        let messages_started = from_messages.iter().all(|run_id| ids.contains(&run_id));
        (messages_started && runs.len() >= paused_at + 3).then_some(runs)
    })
    .await
    .or_logs(&grid)?;
    assert!(runs.len() >= paused_at + 3, "{runs:?}");
    let (ok, stdout, _) = grid.cli(&["flow", "resume", "ticker"])?;
    assert!(ok && stdout.contains("it was already; nothing changed"), "{stdout}");
    let (ok, _, stderr) = grid.cli(&["flow", "pause", "no-such-flow"])?;
    assert!(!ok && stderr.contains("no flow named"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_starts_one_run_per_past_slot_once() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let hourly = "name: hourly\nschedule: { every_ms: 3600000, input: { report: hourly }, labels: { source: cron } }\n\
                  steps:\n  - { id: t, kind: transform, output: 'input.report' }\n";
    deploy(&grid, &client, hourly).await?;
    let span = ["--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T05:00:00Z"];

    let (ok, stdout, stderr) = grid.cli(&[&["flow", "backfill", "hourly", "--dry-run"][..], &span].concat())?;
    assert!(ok && stdout.lines().count() == 5 && stdout.starts_with("2026-01-01T00:00:00Z\n"), "{stdout}{stderr}");
    assert!(runs_of_flow(&client, "hourly").await?.is_empty(), "a dry run starts nothing");

    let (ok, stdout, stderr) = grid.cli(&[&["flow", "backfill", "hourly"][..], &span].concat())?;
    assert!(ok && stdout.contains("5 slots of flow hourly from 2026-01-01T00:00:00Z to 2026-01-01T04:00:00Z: 5 runs started, 0 had a run already"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = grid.cli(
        &[&["flow", "backfill", "hourly", "--since", "2026-01-01T03:00:00Z", "--until", "2026-01-01T07:00:00Z"][..]]
            .concat(),
    )?;
    assert!(ok && stdout.contains("4 slots of flow hourly from 2026-01-01T03:00:00Z to 2026-01-01T06:00:00Z: 2 runs started, 2 had a run already"), "{stdout}{stderr}");

    let runs = wait_for("seven backfilled runs to succeed", Duration::from_secs(20), || async {
        let runs = runs_of_flow(&client, "hourly").await.ok()?;
        (runs.len() == 7 && runs.iter().all(|run| run.status == flowgrid_sdk::RunStatus::Succeeded)).then_some(runs)
    })
    .await
    .or_logs(&grid)?;
    let third = RunId::from_idempotency_key("hourly", "schedule-1767232800000");
    assert!(runs.iter().any(|run| run.run_id == third), "the run of 02:00 has the id the schedule gives it: {runs:?}");
    let view = client.get(&third).await?;
    assert_eq!(
        (view.input, view.labels.get("source").map(String::as_str)),
        (json!({"report": "hourly"}), Some("cron"))
    );

    // What it refuses, and why.
    let (ok, _, stderr) = grid.cli(&["flow", "backfill", "hourly", "--since", "1h", "--until", "2099-01-01"])?;
    assert!(!ok && stderr.contains("is ahead"), "{stderr}");
    let (ok, _, stderr) =
        grid.cli(&["flow", "backfill", "hourly", "--since", "2020-01-01", "--until", "2022-01-01"])?;
    assert!(!ok && stderr.contains("more than 10000 slots"), "{stderr}");
    deploy(&grid, &client, "name: plain\nsteps:\n  - { id: t, kind: transform, output: '1' }\n").await?;
    let (ok, _, stderr) = grid.cli(&["flow", "backfill", "plain", "--since", "2h"])?;
    assert!(!ok && stderr.contains("has no schedule"), "{stderr}");
    Ok(())
}

/// A slot that fell in a pause stays skipped when the coordinator restarts right after the
/// resume (a restart looks back a minute for a slot it missed, but not into the pause).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_a_pause_is_not_started_by_a_restart_soon_after_the_resume() -> anyhow::Result<()> {
    const EVERY_MS: u64 = 5_000;
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let flow = TICKER.replace("ticker", "slow").replace("every_ms: 1000", &format!("every_ms: {EVERY_MS}"));
    deploy(&grid, &client, &flow).await?;
    let (ok, _, stderr) = grid.cli(&["flow", "pause", "slow"])?;
    assert!(ok, "{stderr}");
    // The first slot after the pause passes, paused; the flow is resumed just after it.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let slot = (now_ms / EVERY_MS + 1) * EVERY_MS;
    tokio::time::sleep(Duration::from_millis(slot + 300 - now_ms)).await;
    let (ok, _, stderr) = grid.cli(&["flow", "resume", "slow"])?;
    assert!(ok, "{stderr}");
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    // The schedule goes on from its next slot; by then a run of the pause's slot would have
    // started too.
    let runs = wait_for("the next slot's run", Duration::from_secs(15), || async {
        let next = RunId::from_idempotency_key("slow", &format!("schedule-{}", slot + EVERY_MS));
        runs_of_flow(&client, "slow").await.ok().filter(|runs| runs.iter().any(|run| run.run_id == next))
    })
    .await
    .or_logs(&grid)?;
    let skipped = RunId::from_idempotency_key("slow", &format!("schedule-{slot}"));
    assert!(runs.iter().all(|run| run.run_id != skipped), "the slot of the pause started a run: {runs:?}");
    Ok(())
}

async fn runs_of_flow(client: &flowgrid_sdk::Client, flow: &str) -> anyhow::Result<Vec<RunSummary>> {
    let query = ListRuns { flow: Some(flow.into()), limit: Some(1000), ..Default::default() };
    Ok(client.list(query).await?.runs)
}
