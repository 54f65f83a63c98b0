//! Scheduled runs: a flow's schedule starts one run per slot, with the slot in the run's
//! idempotency key, goes on across a coordinator restart, deploys and a failed commit, and
//! stops with a version deployed without it; `flow backfill` starts the runs of past slots.

use std::time::{Duration, Instant};

use flowgrid_model::shard_of;
use flowgrid_sdk::{ListRuns, RunId, RunSummary};
use flowgrid_tests::{wait_for, Grid};
use serde_json::json;

use crate::store_failure::BreakableStore;
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

/// A flow whose schedule starts a run every second, and whose runs need no worker.
fn every_second(name: &str, description: &str) -> String {
    format!(
        "name: {name}\ndescription: {description}\nschedule: {{ every_ms: 1000 }}\n\
         steps:\n  - {{ id: t, kind: transform, output: '1' }}\n"
    )
}

/// The Unix time in ms.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

/// Waits until every whole second after `after_ms` up to `until_ms` has the run its slot of
/// `flow`'s 1 s schedule starts; fails naming the slots without one.
async fn wait_for_a_run_per_second(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
    flow: &str,
    after_ms: u64,
    until_ms: u64,
) -> anyhow::Result<()> {
    let slots: Vec<u64> = (after_ms / 1000 + 1..=until_ms / 1000).map(|second| second * 1000).collect();
    assert!(slots.len() >= 2, "the span holds {} slots", slots.len());
    let missing = || async {
        let runs = runs_of_flow(client, flow).await.unwrap_or_default();
        let ids: Vec<&RunId> = runs.iter().map(|run| &run.run_id).collect();
        slots
            .iter()
            .copied()
            .filter(|slot| !ids.contains(&&RunId::from_idempotency_key(flow, &format!("schedule-{slot}"))))
            .collect::<Vec<u64>>()
    };
    // The slot after the span has its run: the span's own were started before it.
    let after = RunId::from_idempotency_key(flow, &format!("schedule-{}", slots[slots.len() - 1] + 1000));
    let ready = wait_for("a run for every slot of the span", Duration::from_secs(15), || async {
        let runs = runs_of_flow(client, flow).await.ok()?;
        (runs.iter().any(|run| run.run_id == after) && missing().await.is_empty()).then_some(())
    })
    .await;
    let missing = missing().await;
    assert!(missing.is_empty(), "slots of {slots:?} without a run: {missing:?}\n{}", grid.logs());
    ready.or_logs(grid)
}

/// Versions of a 1 s schedule deployed back to back, several in every turn of the shard:
/// the slot due in a deploy's turn still starts its run, and so does every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_deployed_back_to_back_drop_no_slot_of_the_schedule() -> anyhow::Result<()> {
    const DEPLOYING: Duration = Duration::from_secs(4);
    const DEPLOYERS: usize = 4;
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, &every_second("busy", "version 0")).await?;
    let (began, began_ms) = (Instant::now(), unix_ms());
    let deployers: Vec<_> = (0..DEPLOYERS)
        .map(|deployer| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut deploys = deployer;
                while began.elapsed() < DEPLOYING {
                    client.deploy(every_second("busy", &format!("version {}", deploys % 2))).await?;
                    deploys += 1;
                }
                anyhow::Ok(deploys)
            })
        })
        .collect();
    for deployer in deployers {
        deployer.await?.or_logs(&grid)?;
    }
    let ended_ms = unix_ms();
    let versions = client.flow("busy", None).await?.version;
    assert!(versions > 10, "{versions} versions deployed");
    wait_for_a_run_per_second(&grid, &client, "busy", began_ms, ended_ms).await
}

/// How long the stalled commit hangs: several slots of a 1 s schedule fall meanwhile.
const STALL: Duration = Duration::from_millis(3_200);

/// A shard whose commit hung for seconds and then failed reloads from its store and then
/// starts every slot of its schedules that fell meanwhile, as a late turn that committed
/// would have, not only the newest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_reloaded_after_a_late_failed_commit_starts_every_slot_that_fell_meanwhile() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let store = BreakableStore::open(&grid)?;
    let _coordinator = crate::store_failure::spawn_coordinator(&grid, store.clone())?;
    grid.wait_shards_served_by(1, Duration::from_secs(30)).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, &every_second("steady", "a run a second")).await?;
    wait_for("a scheduled run", Duration::from_secs(20), || async {
        runs_of_flow(&client, "steady").await.ok().filter(|runs| !runs.is_empty())
    })
    .await?;

    // The deploy of a flow whose catalog is in the same shard makes that shard commit.
    let catalog = shard_of("steady", grid.shards);
    let neighbour = (0..)
        .map(|n| format!("neighbour-{n}"))
        .find(|name| shard_of(name, grid.shards) == catalog)
        .expect("a name in every shard");
    store.stall_next_commit(catalog, STALL);
    let began_ms = unix_ms();
    let impatient = client.clone().with_retry_budget(Duration::ZERO);
    let refused = impatient.deploy(every_second(&neighbour, "a neighbour")).await;
    wait_for("the stalled commit to fail", Duration::from_secs(20), || async { store.stalled().then_some(()) }).await?;
    let ended_ms = unix_ms();
    assert!(ended_ms - began_ms >= STALL.as_millis() as u64, "the commit stalled: {refused:?}");
    wait_for_a_run_per_second(&grid, &client, "steady", began_ms, ended_ms).await
}

/// A backfill of a schedule whose input is large (200 KiB here, where a start may carry
/// 1 MiB): its starts go in requests that fit the NATS server's `max_payload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_a_large_input_sends_requests_that_fit_the_server() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats_with_config("max_payload: 1MB")?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    let blob = "x".repeat(200 * 1024);
    let bulky = format!(
        "name: bulky\nschedule: {{ every_ms: 3600000, input: {{ blob: {blob} }} }}\n\
         steps:\n  - {{ id: t, kind: transform, output: '1' }}\n"
    );
    deploy(&grid, &client, &bulky).await?;
    let (ok, stdout, stderr) =
        grid.cli(&["flow", "backfill", "bulky", "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T10:00:00Z"])?;
    assert!(
        ok && stdout.contains(
            "10 slots of flow bulky from 2026-01-01T00:00:00Z to 2026-01-01T09:00:00Z: 10 runs started, 0 had a run \
             already, 0 refused"
        ),
        "{stdout}{stderr}"
    );
    let runs = runs_of_flow(&client, "bulky").await?;
    assert_eq!(runs.len(), 10, "{runs:?}");
    let first = client.get(&RunId::from_idempotency_key("bulky", "schedule-1767225600000")).await?;
    assert_eq!(first.input, json!({ "blob": blob }), "the schedule's input");
    Ok(())
}

/// A backfill of a flow whose concurrency limit cancels the runs past it is refused: its
/// slots would start at once, all but the first be cancelled, and keep their cancelled runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_a_flow_whose_limit_cancels_runs_is_refused() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let nightly = |when_full: &str| {
        format!(
            "name: nightly\nconcurrency: {{ max: 1, when_full: {when_full} }}\nschedule: {{ every_ms: 3600000 }}\n\
             steps:\n  - {{ id: t, kind: transform, output: '1' }}\n"
        )
    };
    let span = ["flow", "backfill", "nightly", "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T05:00:00Z"];
    for when_full in ["cancel_new", "cancel_oldest"] {
        deploy(&grid, &client, &nightly(when_full)).await?;
        let (ok, stdout, stderr) = grid.cli(&span)?;
        assert!(
            !ok && stderr.contains(&format!("`when_full: {when_full}`")) && stderr.contains("`when_full: queue`"),
            "{stdout}{stderr}"
        );
        assert!(runs_of_flow(&client, "nightly").await?.is_empty(), "a refused backfill starts nothing");
    }
    // Deployed to queue, the same backfill starts every slot: the runs go one at a time.
    deploy(&grid, &client, &nightly("queue")).await?;
    let (ok, stdout, stderr) = grid.cli(&span)?;
    assert!(ok && stdout.contains("5 runs started"), "{stdout}{stderr}");
    wait_for("five backfilled runs to succeed", Duration::from_secs(20), || async {
        let runs = runs_of_flow(&client, "nightly").await.ok()?;
        (runs.len() == 5 && runs.iter().all(|run| run.status == flowgrid_sdk::RunStatus::Succeeded)).then_some(())
    })
    .await
    .or_logs(&grid)
}

async fn runs_of_flow(client: &flowgrid_sdk::Client, flow: &str) -> anyhow::Result<Vec<RunSummary>> {
    let query = ListRuns { flow: Some(flow.into()), limit: Some(1000), ..Default::default() };
    Ok(client.list(query).await?.runs)
}
