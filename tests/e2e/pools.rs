//! `flowgrid pool limit`: a bound on a pool's tasks out with its workers at once, over all
//! of them, set while the workers run.

use std::time::Duration;

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{step, Grid};
use serde_json::{json, Value};

use crate::{deploy, OrLogs, RUN_DEADLINE};

/// Six tasks of 400 ms each, all at once unless the pool is bounded.
const FAN_OUT: &str = r#"
name: naps
steps:
  - { id: each, kind: map, items: 'input.items', pool: a, task: sleep, input: '#{ ms: 400 }' }
"#;

fn pool_status(grid: &Grid) -> anyhow::Result<Value> {
    let (ok, text, errors) = grid.cli(&["--json", "status"])?;
    anyhow::ensure!(ok, "flowgrid status failed: {errors}");
    let status: Value = serde_json::from_str(&text)?;
    let pools = status["backlog"]["pools"].as_array().cloned().unwrap_or_default();
    Ok(pools.into_iter().find(|pool| pool["pool"] == "a").unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_limit_bounds_the_tasks_out_over_all_workers_until_reset() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, FAN_OUT).await?;

    let (ok, text, errors) = grid.cli(&["pool", "limit", "a", "--max-in-flight", "2"])?;
    assert!(ok, "{text}{errors}");
    assert_eq!(text, "pool a: at most 2 tasks out with its workers at once (it was 20000)\n");
    assert_eq!(pool_status(&grid)?["max_in_flight"], json!(2));

    let start = StartRun { flow: "naps".into(), input: json!({"items": [1, 2, 3, 4, 5, 6]}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let mut most_out = 0;
    while client.get(&run.run_id).await.or_logs(&grid)?.status == RunStatus::Running {
        most_out = most_out.max(pool_status(&grid)?["in_flight"].as_u64().unwrap_or(0));
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
    assert_eq!(reply, json!({"pool": "a", "max_in_flight": 20000, "previous": 2}));
    assert_eq!(pool_status(&grid)?["max_in_flight"], json!(20000));

    // Bad bounds and names are refused and change nothing.
    for args in [&["pool", "limit", "a", "--max-in-flight", "0"][..], &["pool", "limit", "a b", "--max-in-flight", "3"]]
    {
        let (ok, _, errors) = grid.cli(args)?;
        assert!(!ok && (errors.contains("use 1 to 20000") || errors.contains("not a pool name")), "{errors}");
    }
    let (ok, _, errors) = grid.cli(&["pool", "limit", "a"])?;
    assert!(!ok && errors.contains("--max-in-flight"), "{errors}");
    assert_eq!(pool_status(&grid)?["max_in_flight"], json!(20000));
    Ok(())
}
