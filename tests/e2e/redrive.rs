//! Redrive: a run that failed goes again from the steps that did not succeed, through the
//! CLI and the SDK; refusals say why; a redrive survives a coordinator crash; a parent
//! redriven after its child flow was fixed starts a new child.

use std::time::Duration;

use flowgrid_sdk::{ErrorCode, ListRuns, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, RUN_DEADLINE};

/// An echo, then a task that fails its first attempt (no retries), then an echo; each end
/// announced on the run-ends stream.
const SHAKY_FLOW: &str = r#"
name: shaky
publish_ended: true
steps:
  - { id: fetch, kind: task, pool: a, task: echo }
  - id: convert
    kind: task
    after: [fetch]
    pool: a
    task: flaky
    input: '#{ fail_times: 1, got: steps.fetch.output }'
    retry: { max_attempts: 1 }
  - { id: store, kind: task, after: [convert], pool: a, task: echo, input: 'steps.convert.output.got' }
"#;

async fn failed_run(grid: &Grid, client: &flowgrid_sdk::Client) -> anyhow::Result<RunId> {
    let start = StartRun {
        flow: "shaky".into(),
        version: None,
        input: json!({"n": 5}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(grid)?.run_id;
    let view = grid.wait_run(client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "convert").error.as_ref().map(|error| error.code.as_str()), Some("transient"));
    assert_eq!(step(&view, "store").status, StepStatus::Cancelled);
    Ok(run_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_goes_again_from_its_failed_step_and_is_announced_again() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SHAKY_FLOW).await?;
    let run_id = failed_run(&grid, &client).await?;

    let (ok, stdout, stderr) = grid.cli(&["run", "redrive", run_id.as_str(), "--wait", "--reason", "worker fixed"])?;
    assert!(ok, "the redriven run succeeds: {stdout}\n{stderr}\n{}", grid.logs());
    assert!(stderr.contains("redrive 1"), "{stderr}");
    assert!(stdout.contains("status    succeeded") && stdout.contains("redriven  once"), "{stdout}");
    let view = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!(view.output, Some(json!({"store": {"n": 5}})), "{view:?}");
    assert_eq!(step(&view, "fetch").attempts, 1, "a step that succeeded does not run again");
    assert_eq!(step(&view, "convert").attempts, 2, "the failed step ran again, as attempt 2");
    assert_eq!(view.redriven.map(|redriven| redriven.times), Some(1));
    assert!(view.ended_ms > view.redriven.map(|redriven| redriven.last_ms));

    // Listed once, as it is now.
    let listed = client.list(ListRuns { flow: Some("shaky".into()), ..Default::default() }).await.or_logs(&grid)?;
    let statuses: Vec<_> = listed.runs.iter().map(|run| (run.run_id.clone(), run.status)).collect();
    assert_eq!(statuses, vec![(run_id.clone(), RunStatus::Succeeded)]);

    // Both ends are on the run-ends stream: the failure and the success.
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    let stream = run_ends_holding(&grid, 2).await?;
    let last = stream.get_last_raw_message_by_subject(&subjects.run_ended("shaky")).await?;
    let ended: flowgrid_proto::RunEnded = serde_json::from_slice(&last.payload)?;
    assert_eq!((ended.run_id, ended.status, ended.redriven), (run_id.clone(), RunStatus::Succeeded, 1));

    // A run that succeeded, one that goes, and one that does not exist are refused.
    let error = client.redrive(&run_id, "again").await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::Conflict, "{error:?}");
    assert!(refusal(&error).message.contains("succeeded"), "{error:?}");
    let error = client.redrive(&RunId("no-such-run".into()), "").await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::NotFound, "{error:?}");
    deploy(&grid, &client, "name: idle\nsteps:\n  - { id: wait, kind: signal }\n").await?;
    let start =
        StartRun { flow: "idle".into(), version: None, input: json!({}), idempotency_key: None, ..Default::default() };
    let going = client.start(start).await.or_logs(&grid)?.run_id;
    let error = client.redrive(&going, "").await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::Conflict, "{error:?}");
    assert!(refusal(&error).message.contains("still running"), "{error:?}");
    let (ok, _, stderr) = grid.cli(&["run", "redrive", going.as_str()])?;
    assert!(!ok && stderr.contains("still running"), "{stderr}");

    // Named a step, the succeeded run goes again from it: that step and the one after it.
    let (ok, stdout, stderr) = grid.cli(&["run", "redrive", run_id.as_str(), "--from", "convert", "--wait"])?;
    assert!(ok, "{stdout}\n{stderr}\n{}", grid.logs());
    assert!(stderr.contains("from step `convert` (redrive 2)"), "{stderr}");
    let view = client.get(&run_id).await.or_logs(&grid)?;
    let attempts: Vec<u32> = ["fetch", "convert", "store"].iter().map(|id| step(&view, id).attempts).collect();
    assert_eq!((view.status, attempts), (RunStatus::Succeeded, vec![1, 3, 2]), "{view:?}");
    let (ok, _, stderr) = grid.cli(&["run", "redrive", run_id.as_str(), "--from", "nope"])?;
    assert!(!ok && stderr.contains("no step `nope`"), "{stderr}");
    let (ok, _, stderr) = grid.cli(&["run", "redrive", "--flow", "shaky", "--status", "succeeded"])?;
    assert!(!ok && stderr.contains("--from"), "succeeded runs only from a step: {stderr}");
    let (ok, stdout, stderr) =
        grid.cli(&["run", "redrive", "--flow", "shaky", "--status", "succeeded", "--from", "store"])?;
    assert!(ok && stdout.contains("redrove 1 of 1 run(s) from step `store`; 0 refused"), "{stdout}\n{stderr}");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!((view.status, step(&view, "store").attempts), (RunStatus::Succeeded, 3), "{view:?}");
    assert_eq!(view.redriven.map(|redriven| redriven.times), Some(3));
    // A succeeded run redriven from a step ended again with the records of an ended run.
    for coordinator in &mut grid.coordinators {
        coordinator.stop(Duration::from_secs(20));
    }
    let report = flowgrid_coordinator::audit::audit(&grid.data_dir(), grid.shards).await?;
    assert!(report.is_clean(), "the audit found problems: {report:?}");
    assert_eq!(report.runs_by_status.get("succeeded"), Some(&1), "{report:?}");
    // `flowgrid audit` takes the grid's shard count from the data directory, and refuses
    // another one.
    let data_dir = grid.data_dir().display().to_string();
    let (ok, stdout, stderr) = grid.cli(&["audit", "--data-dir", &data_dir])?;
    assert!(ok && stdout.contains(&format!("({} shards)", grid.shards)), "{stdout}\n{stderr}");
    let other = (grid.shards * 2).to_string();
    let (ok, _, stderr) = grid.cli(&["audit", "--data-dir", &data_dir, "--shards", &other])?;
    assert!(!ok && stderr.contains(&format!("pass --shards {}", grid.shards)), "{stderr}");
    // Without grid.json, a --shards below the shard files the directory holds is refused
    // (before, half the store went unread and the audit said ok, exit 0).
    std::fs::remove_file(grid.data_dir().join("grid.json"))?;
    let half = (grid.shards / 2).to_string();
    let (ok, stdout, stderr) = grid.cli(&["audit", "--data-dir", &data_dir, "--shards", &half])?;
    assert!(!ok && stderr.contains(&format!("pass --shards {}", grid.shards)), "{stdout}\n{stderr}");
    Ok(())
}

/// A run's history is read for a redrive beside its shard's actor, so redrives of one run
/// can pass each other there: the run is taken up once, the others are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrives_of_one_run_at_once_take_it_up_once() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SHAKY_FLOW).await?;
    let run_id = failed_run(&grid, &client).await?;
    let redrives = (0..6).map(|n| client.redrive(&run_id, format!("redrive {n}")));
    let outcomes = futures::future::join_all(redrives).await;
    let taken = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert_eq!(taken, 1, "{outcomes:?}");
    for error in outcomes.into_iter().filter_map(Result::err) {
        let code = refusal(&error).code;
        assert!(matches!(code, ErrorCode::Conflict | ErrorCode::Unavailable), "{error:?}");
    }
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    assert_eq!(view.redriven.map(|redriven| redriven.times), Some(1), "{view:?}");
    assert_eq!(step(&view, "convert").attempts, 2, "the failed step ran again once: {view:?}");
    Ok(())
}

/// A run whose end is not announced yet (the run-ends stream does not take it) is not
/// redriven: its next end would write its announcement over the one still waiting, and the
/// first end would never be announced. Once the stream takes it, the redrive goes, and the
/// stream holds both ends. (The check looked for the announcement under a key the outbox
/// never writes, as it keeps its messages in chunks, and let every such redrive through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_end_is_not_announced_yet_is_not_redriven() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?.with_retry_budget(Duration::ZERO);
    deploy(&grid, &client, SHAKY_FLOW).await?;
    // The run-ends stream holds one message and takes no more (discard new): every
    // announcement is refused until its limit goes.
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    jetstream.publish(subjects.run_ended("other"), "{}".into()).await?.await?;
    let mut stream = jetstream.get_stream(subjects.run_ends_stream()).await?;
    let open = stream.info().await?.config.clone();
    let full = async_nats::jetstream::stream::Config {
        max_messages: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..open.clone()
    };
    jetstream.update_stream(&full).await?;

    let run_id = failed_run(&grid, &client).await?;
    let error = client.redrive(&run_id, "too early").await.expect_err("refused while its end is not announced");
    assert_eq!(refusal(&error).code, ErrorCode::Unavailable, "{error:?}");
    assert!(refusal(&error).message.contains("not announced on the run-ends stream yet"), "{error:?}");
    let view = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!((view.status, view.redriven), (RunStatus::Failed, None), "{view:?}");

    jetstream.update_stream(&open).await?;
    let redriven = wait_for("the redrive taken once the end is announced", RUN_DEADLINE, || async {
        client.redrive(&run_id, "announced now").await.ok()
    })
    .await
    .or_logs(&grid)?;
    assert_eq!(redriven.times, 1);
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    // Both ends of the run are on the stream, the failure first.
    let mut ends = Vec::new();
    run_ends_holding(&grid, 3).await?;
    for sequence in 2..=3 {
        let message = stream.get_raw_message(sequence).await?;
        let ended: flowgrid_proto::RunEnded = serde_json::from_slice(&message.payload)?;
        ends.push((ended.run_id, ended.status, ended.redriven));
    }
    assert_eq!(ends, vec![(run_id.clone(), RunStatus::Failed, 0), (run_id, RunStatus::Succeeded, 1)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_survives_a_coordinator_crash() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SHAKY_FLOW).await?;
    let run_id = failed_run(&grid, &client).await?;
    // No worker: the redriven step stays out while the coordinator dies.
    grid.workers[0].kill_hard();
    let redriven = client.redrive(&run_id, "").await.or_logs(&grid)?;
    assert_eq!((redriven.status, redriven.times), (RunStatus::Running, 1));
    grid.coordinators[0].kill_hard();
    // The redrive's commit made the run active again: no run record, listing entry or
    // snapshot of its earlier end is left.
    let report = flowgrid_coordinator::audit::audit(&grid.data_dir(), grid.shards).await?;
    assert!(report.is_clean(), "the audit found problems: {report:?}");
    assert_eq!((report.runs, report.runs_active), (1, 1), "{report:?}");
    grid.start_coordinator().await?;
    let view = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!(view.status, RunStatus::Running, "still redriven after the restart: {view:?}");
    assert_eq!(step(&view, "convert").status, StepStatus::Running);
    grid.start_workers(&["a"], 8)?;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "convert").attempts, 2);
    for coordinator in &mut grid.coordinators {
        coordinator.stop(Duration::from_secs(20));
    }
    let report = flowgrid_coordinator::audit::audit(&grid.data_dir(), grid.shards).await?;
    assert!(report.is_clean(), "the audit found problems: {report:?}");
    assert_eq!((report.runs, report.runs_active), (1, 0), "{report:?}");
    assert_eq!(report.runs_by_status.get("succeeded"), Some(&1), "{report:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_redriven_after_its_child_flow_was_fixed_starts_a_new_child() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let broken = "name: convert\nsteps:\n  - { id: work, kind: task, pool: a, task: fail, input: '#{ code: \"bug\", retryable: false }' }\n";
    deploy(&grid, &client, broken).await?;
    let parent_flow = "name: pipeline\noutput: 'steps.invoke.output'\nsteps:\n  - { id: invoke, kind: subflow, flow: convert, input: '#{ n: 2 }' }\n";
    deploy(&grid, &client, parent_flow).await?;
    let start = StartRun {
        flow: "pipeline".into(),
        version: None,
        input: json!({}),
        idempotency_key: None,
        ..Default::default()
    };
    let parent = client.start(start).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    let first_child = step(&view, "invoke").child_run.clone().expect("a child ran");

    // The child is redriven through its parent.
    let error = client.redrive(&first_child, "").await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::InvalidRequest, "{error:?}");
    assert!(refusal(&error).message.contains(&format!("redrive run {parent}")), "{error:?}");

    deploy(&grid, &client, "name: convert\nsteps:\n  - { id: work, kind: task, pool: a, task: echo }\n").await?;
    client.redrive(&parent, "convert fixed").await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!({"work": {"n": 2}})));
    let second_child = step(&view, "invoke").child_run.clone().expect("a new child ran");
    assert_ne!(second_child, first_child, "the new round has a child of its own");
    let child = client.get(&second_child).await.or_logs(&grid)?;
    assert_eq!((child.version, child.parent.map(|parent| parent.round)), (2, Some(1)));
    let old = client.get(&first_child).await.or_logs(&grid)?;
    assert_eq!(old.status, RunStatus::Failed, "the first child stays as it ended");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redriven_fan_out_of_child_runs_keeps_the_children_that_succeeded() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    // The child fails for odd numbers until it is fixed.
    let picky = "name: convert\nsteps:\n  - id: pick\n    kind: choice\n    choices: [{ when: 'input % 2 == 1', next: refuse }]\n    default: work\n  - { id: work, kind: task, pool: a, task: echo }\n  - { id: refuse, kind: fail, error: odd }\n";
    deploy(&grid, &client, picky).await?;
    let parent_flow = "name: fan\noutput: 'steps.each.output'\nsteps:\n  - { id: each, kind: subflow, flow: convert, items: 'input', max_concurrency: 1 }\n";
    deploy(&grid, &client, parent_flow).await?;
    let start = StartRun {
        flow: "fan".into(),
        version: None,
        input: json!([2, 3, 4]),
        idempotency_key: None,
        ..Default::default()
    };
    let parent = client.start(start).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    let children = |parent: &RunId| {
        let parent = parent.clone();
        let client = client.clone();
        async move {
            let query = ListRuns { parent: Some(parent), ..Default::default() };
            client.list(query).await.map(|list| list.runs)
        }
    };
    let before = children(&parent).await.or_logs(&grid)?;

    deploy(&grid, &client, "name: convert\nsteps:\n  - { id: work, kind: task, pool: a, task: echo }\n").await?;
    client.redrive(&parent, "convert fixed").await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &parent, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!([{"work": 2}, {"work": 3}, {"work": 4}])), "{view:?}");
    let after = children(&parent).await.or_logs(&grid)?;
    // The items' children that succeeded are not started again: the new round has only
    // children for the items that did not succeed.
    let succeeded_before = before.iter().filter(|run| run.status == RunStatus::Succeeded).count();
    assert_eq!(after.len(), before.len() + (3 - succeeded_before), "before {before:?}\nafter {after:?}");
    assert!(succeeded_before >= 1, "{before:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_run_of_a_flow_is_redriven_in_one_command() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SHAKY_FLOW).await?;
    let mut failed = Vec::new();
    for _ in 0..3 {
        failed.push(failed_run(&grid, &client).await?);
    }
    let (ok, stdout, stderr) = grid.cli(&["run", "redrive", "--flow", "shaky", "--status", "failed"])?;
    assert!(ok && stdout.contains("redrove 3 of 3 run(s); 0 refused"), "{stdout}\n{stderr}");
    for run_id in &failed {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!((view.status, view.redriven.map(|redriven| redriven.times)), (RunStatus::Succeeded, Some(1)));
    }
    let (ok, stdout, _) = grid.cli(&["run", "redrive", "--flow", "shaky"])?;
    assert!(ok && stdout.contains("redrove 0 of 0"), "nothing failed any more: {stdout}");
    let (ok, stdout, _) = grid.cli(&["run", "redrive", failed[0].as_str(), "no-such-run"])?;
    assert!(!ok, "refusals make the command fail: {stdout}");
    assert!(stdout.contains("redrove 0 of 2 run(s); 2 refused") && stdout.contains("no-such-run: "), "{stdout}");

    // Nothing to act on is a mistake said as one, not "0 of 0" and success.
    let mistakes: [(&[&str], &str); 6] = [
        (&["run", "redrive", "--flow", "shakey"], "no flow named \"shakey\""),
        (&["run", "redrive", failed[0].as_str(), "--limit", "1"], "--limit goes with --flow or --status"),
        (&["run", "cancel", "--flow", "shakey"], "no flow named \"shakey\""),
        (&["run", "pause", "--flow", "shakey"], "no flow named \"shakey\""),
        (&["run", "pause", "--flow", "shaky", "--limit", "0"], "--limit 0 selects no run"),
        (&["run", "redrive", "--limit", "5"], "name the runs to redrive, or --flow / --status"),
    ];
    for (args, said) in mistakes {
        let (ok, stdout, stderr) = grid.cli(args)?;
        assert!(!ok && stderr.contains(said), "{args:?}: {stdout}\n{stderr}");
    }
    Ok(())
}

/// Waits until the grid's run-ends stream holds `count` messages, and returns it.
pub(crate) async fn run_ends_holding(grid: &Grid, count: u64) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let name = flowgrid_proto::Subjects::new(grid.prefix.clone()).run_ends_stream();
    wait_for(&format!("{count} ends on the run-ends stream"), RUN_DEADLINE, || async {
        let mut stream = jetstream.get_stream(&name).await.ok()?;
        (stream.info().await.ok()?.state.messages == count).then_some(())
    })
    .await
    .or_logs(grid)?;
    Ok(jetstream.get_stream(&name).await?)
}
