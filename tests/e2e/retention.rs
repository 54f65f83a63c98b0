//! Retention: a coordinator deletes the runs that ended longer ago than
//! `--retain-ended-runs`, and only those: never a run whose end has not reached the run
//! that waits for it.

use std::time::Duration;

use flowgrid_model::{shard_of, ParentRef};
use flowgrid_sdk::{ErrorCode, ListRuns, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, ECHO_FLOW, RUN_DEADLINE};

const IDLE_FLOW: &str = r#"
name: idle
steps:
  - { id: wait, kind: task, pool: idle, task: echo }
"#;

/// A child that ends when its signal `approve` comes, with the signal's data.
const SIGNALLED_CHILD: &str = r#"
name: signalled-child
output: 'steps.approve.output'
steps:
  - { id: approve, kind: signal }
"#;

/// Its parent, which ends with the child's output.
const SIGNALLED_PARENT: &str = r#"
name: signalled-parent
output: 'steps.invoke.output'
steps:
  - { id: invoke, kind: subflow, flow: signalled-child }
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

/// A child ends while its parent's shard is out of reach (its coordinator paused, its file
/// still locked by it) for longer than the retention: the child's end waits in its shard's
/// outbox, and the child stays until its parent took it. Deleted, the parent's shard, back,
/// would start it again (it still waits for it) as a new run under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_child_stays_until_its_parent_took_its_end() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    for _ in 0..2 {
        grid.spawn_coordinator_with_args(&["--retain-ended-runs", "1s"])?;
    }
    let owners = grid.wait_shards_served_by(2, RUN_DEADLINE).await?;
    // Requests that reach the paused coordinator get no answer: the client tries again soon.
    let client = grid.client().await?.with_request_timeout(Duration::from_millis(500));
    for flow in [SIGNALLED_CHILD, SIGNALLED_PARENT] {
        deploy(&grid, &client, flow).await?;
    }
    let shard = |key: &str| shard_of(key, grid.shards).0 as usize;
    let owned_by = |key: &str, coordinator: usize| {
        owners[shard(key)].contains(&format!("-{}-", grid.coordinators[coordinator].pid()))
    };
    // A parent served by coordinator 1 whose child is served by coordinator 0.
    let (key, parent, child) = (0..10_000)
        .map(|n| {
            let key = format!("order-{n}");
            let parent = RunId::from_idempotency_key("signalled-parent", &key);
            let child = ParentRef::child_run_id("signalled-child", &parent, "invoke", None, 0);
            (key, parent, child)
        })
        .find(|(_, parent, child)| owned_by(parent.as_str(), 1) && owned_by(child.as_str(), 0))
        .expect("a key that splits parent and child between the coordinators");
    // A run of the child's shard that ends after the child: once the retention deleted
    // it, a pass has looked at the child too. Its flow's catalog is served by coordinator
    // 0, which starts it while coordinator 1 is paused.
    let marker_flow = (0..10_000).map(|n| format!("marker-{n}")).find(|name| owned_by(name, 0)).expect("a name");
    deploy(&grid, &client, &format!("name: {marker_flow}\nsteps:\n  - {{ id: done, kind: transform, output: '1' }}\n"))
        .await?;
    let marker_key = (0..10_000)
        .map(|n| format!("marker-{n}"))
        .find(|key| shard(RunId::from_idempotency_key(&marker_flow, key).as_str()) == shard(child.as_str()))
        .expect("a key in every shard");

    let start = StartRun { flow: "signalled-parent".into(), idempotency_key: Some(key), ..Default::default() };
    assert_eq!(client.start(start).await.or_logs(&grid)?.run_id, parent);
    let created_ms = wait_for("the child to wait for its signal", RUN_DEADLINE, || async {
        let view = client.get(&child).await.ok()?;
        (step(&view, "approve").status == StepStatus::Running).then_some(view.created_ms)
    })
    .await
    .or_logs(&grid)?;

    let paused = grid.coordinators[1].pid().to_string();
    let signal = |name: &str| std::process::Command::new("kill").args([name, paused.as_str()]).status();
    assert!(signal("-STOP")?.success(), "pause coordinator-1");
    wait_for("the child's signal", RUN_DEADLINE, || async {
        client.signal(&child, "approve", json!({"approved": true})).await.ok()
    })
    .await
    .or_logs(&grid)?;
    assert_eq!(grid.wait_run(&client, &child, RUN_DEADLINE).await?.status, RunStatus::Succeeded);
    let marker = StartRun { flow: marker_flow, idempotency_key: Some(marker_key), ..Default::default() };
    let marker = wait_for("the marker's start", RUN_DEADLINE, || async { client.start(marker.clone()).await.ok() })
        .await
        .or_logs(&grid)?
        .run_id;
    wait_for("the retention to delete the marker", RUN_DEADLINE, || async {
        client.get(&marker).await.err().filter(|error| error.api().is_some_and(|api| api.code == ErrorCode::NotFound))
    })
    .await
    .or_logs(&grid)?;
    let kept = wait_for("an answer about the child", RUN_DEADLINE, || async {
        match client.get(&child).await {
            Ok(view) => Some(Ok(view)),
            Err(error) if error.api().is_some() => Some(Err(error)),
            Err(_) => None,
        }
    })
    .await
    .or_logs(&grid)?;
    let kept = match kept {
        Ok(view) => view,
        Err(error) => anyhow::bail!("the child was deleted before its parent took its end: {error}\n{}", grid.logs()),
    };
    assert_eq!((kept.status, kept.created_ms), (RunStatus::Succeeded, created_ms), "{kept:?}");

    assert!(signal("-CONT")?.success(), "resume coordinator-1");
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    assert_eq!((view.status, &view.output), (RunStatus::Succeeded, &Some(json!({"approved": true}))), "{view:?}");
    // The child was not started again: it is the one that ended, or gone since its end was taken.
    match client.get(&child).await {
        Ok(view) => assert_eq!((view.status, view.created_ms), (RunStatus::Succeeded, created_ms), "{view:?}"),
        Err(error) => assert_eq!(refusal(&error).code, ErrorCode::NotFound, "{error:?}"),
    }
    Ok(())
}
