//! `flowgrid pool limit`: a bound on a pool's tasks out with its workers at once, over all
//! of them, set while the workers run.

use std::time::Duration;

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::{json, Value};

use crate::{deploy, OrLogs, RUN_DEADLINE};

/// Six tasks of 400 ms each, all at once unless the pool is bounded.
const FAN_OUT: &str = r#"
name: naps
steps:
  - { id: each, kind: map, items: 'input.items', pool: a, task: sleep, input: '#{ ms: 400 }' }
"#;

/// Pool `pool`'s backlog as `flowgrid --json status` gives it (null when it has none).
pub(crate) fn pool_status(grid: &Grid, pool: &str) -> anyhow::Result<Value> {
    let (ok, text, errors) = grid.cli(&["--json", "status"])?;
    anyhow::ensure!(ok, "flowgrid status failed: {errors}");
    let status: Value = serde_json::from_str(&text)?;
    let pools = status["backlog"]["pools"].as_array().cloned().unwrap_or_default();
    Ok(pools.into_iter().find(|found| found["pool"] == pool).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_limit_bounds_the_tasks_out_over_all_workers_until_reset() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, FAN_OUT).await?;

    let (ok, text, errors) = grid.cli(&["pool", "limit", "a", "--max-in-flight", "2"])?;
    assert!(ok, "{text}{errors}");
    assert_eq!(text, "pool a: at most 2 tasks out with its workers at once (it was 20000)\n");
    assert_eq!(pool_status(&grid, "a")?["max_in_flight"], json!(2));

    let start = StartRun { flow: "naps".into(), input: json!({"items": [1, 2, 3, 4, 5, 6]}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let mut most_out = 0;
    while client.get(&run.run_id).await.or_logs(&grid)?.status == RunStatus::Running {
        most_out = most_out.max(pool_status(&grid, "a")?["in_flight"].as_u64().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert!((1..=2).contains(&most_out), "at most 2 tasks out at once, seen {most_out}");
    let each = step(&view, "each");
    let took = each.ended_ms.unwrap_or(0).saturating_sub(each.started_ms.unwrap_or(0));
    assert!(took >= 1_150, "six 400 ms tasks two at a time take three rounds: {took} ms");

    let (ok, text, _) = grid.cli(&["--json", "pool", "limit", "a", "--reset"])?;
    assert!(ok, "{text}");
    let reply: Value = serde_json::from_str(&text)?;
    assert_eq!(reply, json!({"pool": "a", "max_in_flight": 20000, "previous": 2, "lanes": [5]}));
    assert_eq!(pool_status(&grid, "a")?["max_in_flight"], json!(20000));

    // Bad bounds and names are refused and change nothing.
    for args in [&["pool", "limit", "a", "--max-in-flight", "0"][..], &["pool", "limit", "a b", "--max-in-flight", "3"]]
    {
        let (ok, _, errors) = grid.cli(args)?;
        assert!(!ok && (errors.contains("use 1 to 20000") || errors.contains("not a pool name")), "{errors}");
    }
    let (ok, _, errors) = grid.cli(&["pool", "limit", "a"])?;
    assert!(!ok && errors.contains("--max-in-flight"), "{errors}");
    // A pool nothing used yet takes the bound, with a word in case its name is misspelt.
    let (ok, _, errors) = grid.cli(&["pool", "limit", "aa", "--max-in-flight", "3"])?;
    assert!(ok && errors.contains("note: pool aa had no task and no worker yet"), "{errors}");
    let (ok, _, errors) = grid.cli(&["pool", "limit", "a", "--max-in-flight", "3"])?;
    assert!(ok && !errors.contains("note:"), "{errors}");
    grid.cli(&["pool", "limit", "a", "--reset"])?;
    assert_eq!(pool_status(&grid, "a")?["max_in_flight"], json!(20000));
    Ok(())
}

/// The records of `pool`'s live workers, as `flowgrid --json workers` lists them.
pub(crate) fn workers_listed(grid: &Grid, pool: &str) -> anyhow::Result<Vec<Value>> {
    let (ok, text, errors) = grid.cli(&["--json", "workers", "--pool", pool])?;
    anyhow::ensure!(ok, "flowgrid workers failed: {errors}");
    Ok(serde_json::from_str::<Vec<Value>>(&text)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_workers_are_listed_with_their_load_until_they_stop() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    grid.start_workers(&["a", "b"], 3)?;
    let client = grid.client().await?;
    let listed = wait_for("the worker of pool a listed", RUN_DEADLINE, || async {
        workers_listed(&grid, "a").ok().filter(|workers| workers.len() == 1)
    })
    .await
    .or_logs(&grid)?;
    let worker = &listed[0];
    assert_eq!((worker["pool"].as_str(), worker["concurrency"].as_u64()), (Some("a"), Some(3)), "{worker}");
    assert_eq!(worker["pid"].as_u64(), Some(u64::from(grid.workers[0].pid())), "{worker}");
    assert!(worker["sdk"].as_str().is_some_and(|sdk| sdk.starts_with("flowgrid-sdk ")), "{worker}");

    // Two tasks of 6 s: the record shows them running, then done.
    deploy(&grid, &client, FAN_OUT.replace("400", "6000").as_str()).await?;
    let start = StartRun { flow: "naps".into(), input: json!({"items": [1, 2]}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    // Within a second or two of the change, not at the next 5 s heartbeat.
    wait_for("two tasks running on the worker", Duration::from_secs(3), || async {
        workers_listed(&grid, "a").ok()?.first().filter(|worker| worker["running"] == 2).map(|_| ())
    })
    .await
    .or_logs(&grid)?;
    let (ok, text, _) = grid.cli(&["status"])?;
    assert!(ok && text.contains("workers: a 1 (2/3 busy), b 1 (0/3 busy)"), "{text}");
    grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    wait_for("the tasks counted as done", RUN_DEADLINE, || async {
        workers_listed(&grid, "a").ok()?.first().filter(|worker| worker["tasks_done"] == 2).map(|_| ())
    })
    .await
    .or_logs(&grid)?;
    let (ok, text, _) = grid.cli(&["workers"])?;
    assert!(ok && text.starts_with("POOL  HOST") && text.lines().count() == 3, "{text}");

    // A worker that stops takes its records with it.
    assert!(grid.workers[0].stop(Duration::from_secs(10)), "the worker stops on SIGTERM");
    let (ok, text, errors) = grid.cli(&["workers"])?;
    assert!(ok && text.is_empty() && errors.contains("the grid has no live worker"), "{text}{errors}");
    Ok(())
}
