//! Task priorities: a pool's tasks of a higher priority start before the lower ones that
//! wait, whatever order they were published in.

use async_nats::jetstream;
use flowgrid_proto::Subjects;
use flowgrid_sdk::{RunId, RunStatus, StartRun};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::json;

use crate::pools::pool_status;
use crate::{deploy, OrLogs, RUN_DEADLINE};

/// Runs of each priority started, in the order low, default, high.
const RUNS_PER_PRIORITY: usize = 5;

fn flow(name: &str, priority: Option<u8>) -> String {
    let priority = priority.map(|priority| format!(", priority: {priority}")).unwrap_or_default();
    format!(
        "name: {name}\nsteps:\n  - {{ id: work, kind: task, pool: p, task: sleep, input: '#{{ ms: 30 }}'{priority} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_tasks_of_a_higher_priority_start_first() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let flows = [("low", Some(1)), ("normal", None), ("high", Some(9))];
    for (name, priority) in flows {
        deploy(&grid, &client, &flow(name, priority)).await?;
    }
    // No worker yet: every task waits, the lowest published first.
    let mut runs: Vec<(&str, RunId)> = Vec::new();
    for (name, _) in flows {
        for _ in 0..RUNS_PER_PRIORITY {
            let start = StartRun { flow: name.into(), input: json!({}), ..Default::default() };
            runs.push((name, client.start(start).await.or_logs(&grid)?.run_id));
        }
    }
    let waiting = (3 * RUNS_PER_PRIORITY) as u64;
    let pool = wait_for("every task waiting in the pool", RUN_DEADLINE, || async {
        let pool = pool_status(&grid, "p").ok()?;
        (pool["pending"].as_u64() == Some(waiting)).then_some(pool)
    })
    .await
    .or_logs(&grid)?;
    let lanes: Vec<(u64, u64)> = pool["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .map(|lane| (lane["priority"].as_u64().unwrap_or(99), lane["pending"].as_u64().unwrap_or(0)))
        .collect();
    let each = RUNS_PER_PRIORITY as u64;
    assert_eq!(lanes, vec![(9, each), (5, each), (1, each)], "{pool}");
    let (ok, text, _) = grid.cli(&["status"])?;
    assert!(ok && text.contains("pool p by priority: 9: 5 pending, 0 in flight; 5: 5 pending"), "{text}");

    // The pool's bound reaches every lane.
    let (ok, text, errors) = grid.cli(&["pool", "limit", "p", "--max-in-flight", "3"])?;
    assert!(ok, "{text}{errors}");
    assert!(text.contains("the pool has 3 lanes (9, 5, 1), so up to 9 of its tasks may be out in all"), "{text}");
    let stream = jetstream::new(grid.nats_client().await?).get_stream("FLOWGRID_TASKS").await?;
    let subjects = Subjects::new("flowgrid");
    for priority in [9, 5, 1] {
        let info = stream.consumer_info(subjects.lane_consumer("p", priority)).await?;
        assert_eq!(info.config.max_ack_pending, 3, "lane {priority}");
    }
    let (ok, _, errors) = grid.cli(&["pool", "limit", "p", "--reset"])?;
    assert!(ok, "{errors}");

    // One worker, one task at a time: the high runs end first, then the default ones, then the low.
    grid.start_workers(&["p"], 1)?;
    let mut ended = Vec::new();
    for (name, run_id) in &runs {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        ended.push((step(&view, "work").ended_ms.expect("ended"), *name));
    }
    ended.sort();
    let order: Vec<&str> = ended.iter().map(|(_, name)| *name).collect();
    let expected: Vec<&str> =
        ["high", "normal", "low"].iter().flat_map(|name| std::iter::repeat_n(*name, RUNS_PER_PRIORITY)).collect();
    assert_eq!(order, expected, "{}", grid.logs());

    // An idle worker takes a task of any lane at once.
    for name in ["low", "high", "normal"] {
        let start = StartRun { flow: name.into(), input: json!({}), ..Default::default() };
        let run = client.start(start).await.or_logs(&grid)?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        let work = step(&view, "work");
        let took = work.ended_ms.unwrap_or(0).saturating_sub(work.started_ms.unwrap_or(0));
        assert!(took < 2_000, "a {name} task on an idle pool took {took} ms");
    }
    let logs = grid.logs();
    assert!(logs.contains("pulling from more priority lanes"), "the worker found the lanes: {logs}");
    assert!(!logs.contains("pulling tasks failed") && !logs.contains("priority lanes failed"), "{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_stream_made_before_priority_lanes_takes_them() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let jetstream = jetstream::new(grid.nats_client().await?);
    // The stream as an earlier version made it: one subject per pool, no lanes.
    jetstream
        .create_stream(jetstream::stream::Config {
            name: "FLOWGRID_TASKS".into(),
            subjects: vec!["flowgrid.tasks.*".into()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    grid.start_coordinator().await?;
    grid.start_workers(&["p"], 4)?;
    let client = grid.client().await?;
    deploy(&grid, &client, &flow("high", Some(8))).await?;
    let start = StartRun { flow: "high".into(), input: json!({}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let mut stream = jetstream.get_stream("FLOWGRID_TASKS").await?;
    assert_eq!(stream.info().await?.config.subjects, vec!["flowgrid.tasks.>".to_owned()]);
    Ok(())
}
