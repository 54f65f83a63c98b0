//! Retention: a coordinator deletes the runs that ended longer ago than
//! `--retain-ended-runs`, and only those.

use std::time::Duration;

use flowgrid_sdk::{ErrorCode, ListRuns, RunStatus, StartRun};
use flowgrid_tests::{wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, ECHO_FLOW, RUN_DEADLINE};

const IDLE_FLOW: &str = r#"
name: idle
steps:
  - { id: wait, kind: task, pool: idle, task: echo }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_past_the_retention_are_deleted_and_running_ones_stay() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    grid.spawn_coordinator_with_args(&["--retain-ended-runs", "2s"])?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    deploy(&grid, &client, IDLE_FLOW).await?;
    let start = |flow: &str, n: i64| StartRun {
        flow: flow.into(),
        version: None,
        input: json!({ "n": n }),
        idempotency_key: None,
        ..Default::default()
    };
    let mut ended = Vec::new();
    for n in 0..5 {
        let keyed = StartRun { idempotency_key: Some(format!("order-{n}")), ..start("echo-once", n) };
        let run_id = client.start(keyed).await.or_logs(&grid)?.run_id;
        assert_eq!(grid.wait_run(&client, &run_id, RUN_DEADLINE).await?.status, RunStatus::Succeeded);
        ended.push(run_id);
    }
    let running = client.start(start("idle", 0)).await.or_logs(&grid)?.run_id;
    let query = || ListRuns { flow: Some("echo-once".into()), ..Default::default() };
    assert_eq!(client.list(query()).await?.runs.len(), 5);

    wait_for("the ended runs to be deleted", Duration::from_secs(20), || async {
        client.list(query()).await.ok().filter(|list| list.runs.is_empty())
    })
    .await
    .or_logs(&grid)?;
    for run_id in &ended {
        let error = client.get(run_id).await.expect_err("deleted");
        assert_eq!(refusal(&error).code, ErrorCode::NotFound, "{error:?}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let view = client.get(&running).await.or_logs(&grid)?;
    assert_eq!(view.status, RunStatus::Running, "a run that has not ended stays however old it is");

    // A deleted run's idempotency key starts a new run under the same id, whose tasks the
    // broker must not drop as duplicates of the earlier run's (within its 120 s window).
    let again = StartRun { idempotency_key: Some("order-0".into()), ..start("echo-once", 0) };
    let started = client.start(again).await.or_logs(&grid)?;
    assert!(started.created && started.run_id == ended[0], "{started:?}");
    let view = grid.wait_run(&client, &started.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    Ok(())
}
