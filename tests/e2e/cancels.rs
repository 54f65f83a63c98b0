//! Tasks cancelled with their runs: the coordinator tells the pool's workers, which stop
//! the handlers and ack the tasks at once instead of finishing work nobody needs.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{metric_value, scrape_metrics, Grid};

use crate::{deploy, OrLogs, RUN_DEADLINE};

/// Three items, each ten minutes of work unless cancelled.
const LONG_FLOW: &str = r#"
name: long-items
steps:
  - id: work
    kind: map
    items: '[1, 2, 3]'
    pool: a
    task: sleep
    input: '#{ ms: 600000, value: item }'
    timeout_ms: 7200000
"#;

/// How long workers may take to stop once told: far less than the tasks' ten minutes, far more
/// than a notice's trip.
pub(crate) const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Task messages of `pool` delivered to a worker and not acked yet, and those not
/// delivered at all.
async fn held_and_waiting(grid: &Grid, pool: &str) -> Option<(u64, u64)> {
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    let jetstream = async_nats::jetstream::new(grid.nats_client().await.ok()?);
    let stream = jetstream.get_stream(subjects.tasks_stream()).await.ok()?;
    let mut consumer = stream.get_consumer::<pull::Config>(&subjects.pool_consumer(pool)).await.ok()?;
    let info = consumer.info().await.ok()?;
    Some((info.num_ack_pending as u64, info.num_pending))
}

/// Waits until `pool`'s task messages are held by workers and waiting as `expected` says.
pub(crate) async fn wait_held(grid: &Grid, pool: &str, expected: (u64, u64), within: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    loop {
        let now = held_and_waiting(grid, pool).await;
        if now == Some(expected) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "tasks held and waiting: {now:?}, expected {expected:?}\n{}",
            grid.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_runs_tasks_are_stopped_and_acked_by_their_workers() -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&["a"], 8).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, LONG_FLOW).await?;
    let run = client.start(StartRun { flow: "long-items".into(), ..Default::default() }).await.or_logs(&grid)?;
    // The worker holds all three, heartbeating them.
    wait_held(&grid, "a", (3, 0), RUN_DEADLINE).await?;

    let cancelled = client.cancel(&run.run_id, "not needed").await.or_logs(&grid)?;
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    // Told, the worker stops the three handlers and acks their messages: nothing held,
    // nothing handed back for another worker to run.
    wait_held(&grid, "a", (0, 0), STOP_DEADLINE).await?;
    let body = scrape_metrics(&metrics_addr).or_logs(&grid)?;
    assert_eq!(metric_value(&body, "flowgrid_tasks_cancelled_total{pool=\"a\"}"), Some(3.0), "{body}");
    assert_eq!(metric_value(&body, "flowgrid_tasks_in_flight{pool=\"a\"}"), Some(0.0), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_item_stops_the_other_items_of_its_run() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    // The third item's input is not a duration: it fails at once, for good, and fails the
    // map (no failure tolerated) and the run; the other two were ten minutes of work each.
    let definition = LONG_FLOW
        .replace("name: long-items", "name: one-fails")
        .replace("items: '[1, 2, 3]'", "items: '[600000, 600000, \"x\"]'")
        .replace("#{ ms: 600000, value: item }", "#{ ms: item }");
    deploy(&grid, &client, &definition).await?;
    let run = client.start(StartRun { flow: "one-fails".into(), ..Default::default() }).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}");
    wait_held(&grid, "a", (0, 0), STOP_DEADLINE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_cancels_the_runs_of_a_flow_that_match_its_filter() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, LONG_FLOW).await?;
    let start = |customer: &str| StartRun {
        flow: "long-items".into(),
        labels: [("customer".to_owned(), customer.to_owned())].into_iter().collect(),
        ..Default::default()
    };
    let acme = [client.start(start("acme")).await.or_logs(&grid)?.run_id, client.start(start("acme")).await?.run_id];
    let initech = client.start(start("initech")).await.or_logs(&grid)?.run_id;
    wait_held(&grid, "a", (9, 0), RUN_DEADLINE).await?;

    let (ok, stdout, stderr) =
        grid.cli(&["run", "cancel", "--flow", "long-items", "--label", "customer=acme", "--reason", "acme left"])?;
    assert!(ok && stdout.contains("cancelled 2 of 2 run(s); 0 refused"), "{stdout}{stderr}");
    for run_id in &acme {
        assert_eq!(client.get(run_id).await?.status, RunStatus::Cancelled);
    }
    assert_eq!(client.get(&initech).await?.status, RunStatus::Running);
    // Acme's six tasks stopped; initech's go on.
    wait_held(&grid, "a", (3, 0), STOP_DEADLINE).await?;
    let (ok, _, stderr) = grid.cli(&["run", "cancel", initech.as_str(), "--label", "customer=acme"])?;
    assert!(!ok && stderr.contains("go with --flow"), "{stderr}");
    assert_eq!(client.get(&initech).await?.status, RunStatus::Running, "a refused command changes nothing");
    // Cancelling runs that are cancelled already changes nothing, and says so.
    let (ok, stdout, stderr) = grid.cli(&["run", "cancel", acme[0].as_str(), acme[1].as_str()])?;
    assert!(ok && stdout.contains("cancelled 0 of 2 run(s) (2 as they were)"), "{stdout}{stderr}");
    let (ok, stdout, _) = grid.cli(&["run", "cancel", acme[0].as_str()])?;
    assert!(ok && stdout.contains("had already ended: cancelled"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_of_a_run_cancelled_before_a_worker_came_leaves_the_stream_by_its_deadline() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(
        &grid,
        &client,
        "name: unserved\nsteps:\n  - { id: only, kind: task, pool: idle, task: echo, timeout_ms: 2000 }\n",
    )
    .await?;
    let run = client.start(StartRun { flow: "unserved".into(), ..Default::default() }).await.or_logs(&grid)?;
    flowgrid_tests::wait_for("the task in the stream", RUN_DEADLINE, || async {
        (held_and_waiting(&grid, "idle").await? == (0, 1)).then_some(())
    })
    .await
    .or_logs(&grid)?;
    client.cancel(&run.run_id, "nobody serves it").await?;
    // No worker will ever take it; past its attempt's deadline it is gone all the same, so
    // that it is no backlog and a worker coming later does not run it.
    let started = Instant::now();
    flowgrid_tests::wait_for("the task to leave the stream", Duration::from_secs(15), || async {
        (held_and_waiting(&grid, "idle").await? == (0, 0)).then_some(())
    })
    .await
    .or_logs(&grid)?;
    assert!(started.elapsed() >= Duration::from_millis(500), "gone at its deadline, not at the cancel");
    Ok(())
}
