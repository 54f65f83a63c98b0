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
schedule: { every_ms: 1000, input: { from: schedule } }
steps:
  - { id: tick, kind: task, pool: a, task: echo }
"#;

async fn runs_of(client: &flowgrid_sdk::Client) -> anyhow::Result<Vec<RunSummary>> {
    let query = ListRuns { parent: None, flow: Some("ticker".into()), status: None, limit: Some(1000), cursor: None };
    Ok(client.list(query).await?.runs)
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

    // The schedule lives in the store with the flow: a restarted coordinator keeps it going.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let before = runs_of(&client).await?.len();
    wait_for("scheduled runs after the restart", Duration::from_secs(20), || async {
        runs_of(&client).await.ok().filter(|runs| runs.len() >= before + 2)
    })
    .await
    .or_logs(&grid)?;

    deploy(&grid, &client, &TICKER.replace("schedule: { every_ms: 1000, input: { from: schedule } }\n", "")).await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stopped = runs_of(&client).await?.len();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(runs_of(&client).await?.len(), stopped, "a version without a schedule starts no more runs");
    Ok(())
}
