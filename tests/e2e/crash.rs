//! Crashes: a coordinator killed mid-run resumes from its store; a restarted nats-server
//! loses nothing; a durable submit waits for a coordinator.

use std::time::Duration;

use flowgrid_engine::ItemCounts;
use flowgrid_sdk::{ListRuns, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::{json, Value};

use crate::{deploy, OrLogs, ECHO_FLOW, RUN_DEADLINE};

const ITEMS: u32 = 1_000;

const CRASH_FLOW: &str = r#"
name: crash-map
output: 'steps.counted.output'
steps:
  - id: counted
    kind: map
    items: input.items
    pool: a
    task: count
    max_concurrency: 50
"#;

/// Polls the run until its map has at least `done` items succeeded; returns that count, or
/// an error if the run ended first.
async fn wait_for_progress(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
    run_id: &RunId,
    done: u32,
) -> anyhow::Result<u32> {
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    loop {
        let view = client.get(run_id).await.or_logs(grid)?;
        let succeeded = step(&view, "counted").items.map(|items| items.succeeded).unwrap_or(0);
        if view.status.is_terminal() {
            anyhow::bail!("the run ended ({:?}) before the kill, at {succeeded} items: make it slower", view.status);
        }
        if succeeded >= done {
            return Ok(succeeded);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("only {succeeded} of {ITEMS} items done after {RUN_DEADLINE:?}\n{}", grid.logs());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deploys the map flow and starts one run over [`ITEMS`] items; returns its id and the
/// items, which are also the expected output.
async fn start_crash_map(grid: &Grid, client: &flowgrid_sdk::Client) -> anyhow::Result<(RunId, Vec<Value>)> {
    deploy(grid, client, CRASH_FLOW).await?;
    let items: Vec<Value> = (0..ITEMS).map(|i| json!({"i": i, "label": format!("item-{i}")})).collect();
    let start = StartRun {
        flow: "crash-map".into(),
        version: None,
        input: json!({"items": items}),
        idempotency_key: None,
        ..Default::default()
    };
    let run = client.start(start).await.or_logs(grid)?;
    Ok((run.run_id, items))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_map_resumes_and_applies_every_item_once() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let (run_id, items) = start_crash_map(&grid, &client).await?;

    let done_at_kill = wait_for_progress(&grid, &client, &run_id, ITEMS / 3).await?;
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let resumed = client.get(&run_id).await.or_logs(&grid)?;
    eprintln!(
        "killed the coordinator at {done_at_kill} of {ITEMS} items; after the restart: {:?} {:?}",
        resumed.status,
        step(&resumed, "counted").items
    );

    let view = grid.wait_run(&client, &run_id, Duration::from_secs(60)).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "killed at {done_at_kill} items: {:?}\n{}", view.error, grid.logs());
    let output = view.output.as_ref().and_then(Value::as_array).expect("the output is the list of item results");
    assert_eq!(output.len(), items.len(), "one result per item");
    for (index, (got, want)) in output.iter().zip(&items).enumerate() {
        assert_eq!(got, want, "item {index}: wrong result (killed at {done_at_kill} items)");
    }
    let counted = step(&view, "counted");
    assert_eq!(counted.status, StepStatus::Succeeded, "{counted:?}");
    let all_done = ItemCounts { total: ITEMS, succeeded: ITEMS, failed: 0, running: 0 };
    assert_eq!(counted.items, Some(all_done), "every item applied exactly once: {counted:?}");
    assert_eq!(
        counted.attempts, ITEMS,
        "the restarted coordinator must resume the open attempts, not open new ones (killed at {done_at_kill} items): {counted:?}\n{}",
        grid.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_map_loses_no_item() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let (run_id, items) = start_crash_map(&grid, &client).await?;

    let done_at_restart = wait_for_progress(&grid, &client, &run_id, ITEMS / 3).await?;
    // Publishes, results and acks in flight when the broker dies are lost with it; the
    // coordinator's publisher, the workers and the client must all recover on reconnect.
    grid.restart_nats(Duration::from_millis(500))?;

    let view = grid.wait_run(&client, &run_id, Duration::from_secs(90)).await?;
    assert_eq!(
        view.status,
        RunStatus::Succeeded,
        "restarted at {done_at_restart} items: {:?}\n{}",
        view.error,
        grid.logs()
    );
    let output = view.output.as_ref().and_then(Value::as_array).expect("the output is the list of item results");
    assert_eq!(output, &items, "one result per item, in order (restarted at {done_at_restart} items)");
    let counted = step(&view, "counted");
    let all_done = ItemCounts { total: ITEMS, succeeded: ITEMS, failed: 0, running: 0 };
    assert_eq!(counted.items, Some(all_done), "every item applied exactly once: {counted:?}");
    assert!(!grid.coordinators[0].has_exited(), "the coordinator rides out the broker's restart\n{}", grid.logs());
    Ok(())
}

/// Publishes a durable submit of `flow` without an idempotency key, as a service in any
/// language would, straight to the submit stream.
async fn submit_without_key(grid: &Grid, flow: &str) -> anyhow::Result<()> {
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subject = flowgrid_proto::Subjects::new(grid.prefix.clone()).submit();
    let payload = serde_json::to_vec(&json!({"flow": flow, "input": {"order": 1}}))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(flowgrid_proto::CONTENT_TYPE_HEADER, flowgrid_proto::JSON_CONTENT_TYPE);
    jetstream.publish_with_headers(subject, headers, payload.into()).await?.await?;
    Ok(())
}

/// Waits until `count` runs of `flow` succeeded.
async fn wait_runs_succeeded(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
    flow: &str,
    count: usize,
) -> anyhow::Result<()> {
    let query = || ListRuns { flow: Some(flow.into()), status: Some(RunStatus::Succeeded), ..Default::default() };
    let what = format!("{count} runs of {flow} succeeded");
    let listed = wait_for(&what, RUN_DEADLINE, || async {
        client.list(query()).await.ok().filter(|list| list.runs.len() >= count)
    });
    let runs = listed.await.or_logs(grid)?.runs;
    assert_eq!(runs.len(), count, "{runs:?}");
    Ok(())
}

/// nats-server loses its store (every stream, bucket and shard claim of the grid) while two
/// coordinators run with tasks waiting: each finds its members bucket gone, leaves, joins
/// again (making the streams and buckets anew), claims shards and republishes the open
/// tasks, so every run ends. They used to stay joined to nothing, warning on every
/// heartbeat, until they were restarted. A submit without a key after the loss starts its
/// own run: the new submit stream counts from 1 again, and keyed by its sequence alone it
/// used to take the run of the old stream's first submit and start nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_rejoin_when_nats_loses_its_store_and_every_run_ends() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, RUN_DEADLINE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    deploy(&grid, &client, &ECHO_FLOW.replace("echo-once", "echo-b").replace("pool: a", "pool: b")).await?;
    deploy(&grid, &client, &ECHO_FLOW.replace("echo-once", "echo-submitted")).await?;
    submit_without_key(&grid, "echo-submitted").await?;
    wait_runs_succeeded(&grid, &client, "echo-submitted", 1).await?;
    let start =
        |flow: &str, order: u32| StartRun { flow: flow.into(), input: json!({"order": order}), ..Default::default() };
    // Tasks of pool b wait (no worker yet) when the store is lost.
    let mut runs = Vec::new();
    for order in 0..10 {
        runs.push(client.start(start("echo-b", order)).await.or_logs(&grid)?.run_id);
    }
    grid.restart_nats_empty(Duration::from_millis(300))?;
    // Pool a's workers, there from before, serve runs started after.
    for order in 0..10 {
        let started = wait_for("a start after the loss", RUN_DEADLINE, || async {
            client.start(start("echo-once", order)).await.ok()
        });
        runs.push(started.await.or_logs(&grid)?.run_id);
    }
    grid.start_workers(&["b"], 8)?;
    for run_id in &runs {
        let view = grid.wait_run(&client, run_id, Duration::from_secs(60)).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{:?}\n{}", view.error, grid.logs());
    }
    grid.wait_shards_served_by(2, RUN_DEADLINE).await?;
    submit_without_key(&grid, "echo-submitted").await?;
    wait_runs_succeeded(&grid, &client, "echo-submitted", 2).await?;
    let (ok, stdout, stderr) = grid.cli(&["members"])?;
    assert!(ok && stdout.matches(" alive ").count() == 2, "both coordinators are members again: {stdout}{stderr}");
    assert!(grid.coordinators.iter_mut().all(|coordinator| !coordinator.has_exited()), "the same processes rejoined");
    assert!(grid.logs().contains("joining the grid again"), "{}", grid.logs());
    Ok(())
}

/// A coordinator paused while NATS lost its store, and resumed once another one made the
/// grid's buckets anew, finds its member record gone from a bucket made since it joined: it
/// joins again. It used to write its record into the new bucket and carry on with claims
/// that were gone, serving none of the shards handed to it, and their runs stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_paused_while_nats_lost_its_store_joins_again_once_resumed() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, RUN_DEADLINE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let paused = grid.coordinators[0].pid().to_string();
    let signal = |name: &str| std::process::Command::new("kill").args([name, paused.as_str()]).status();
    assert!(signal("-STOP")?.success(), "pause coordinator-0");
    grid.restart_nats_empty(Duration::from_millis(300))?;
    // The other coordinator joins again and makes the grid's state anew, alone.
    let joined_again = |count: usize| grid.logs().matches("joining the grid again").count() >= count;
    wait_for("the running coordinator to join again", RUN_DEADLINE, || async { joined_again(1).then_some(()) })
        .await
        .or_logs(&grid)?;
    // (It waits for the shards whose files the paused one holds.)
    assert!(signal("-CONT")?.success(), "resume coordinator-0");
    wait_for("the resumed coordinator to join again", RUN_DEADLINE, || async { joined_again(2).then_some(()) })
        .await
        .or_logs(&grid)?;
    grid.wait_shards_served_by(2, RUN_DEADLINE).await.or_logs(&grid)?;
    for order in 0..4 {
        let start = StartRun { flow: "echo-once".into(), input: json!({"order": order}), ..Default::default() };
        let run = wait_for("a start after the loss", RUN_DEADLINE, || async { client.start(start.clone()).await.ok() })
            .await
            .or_logs(&grid)?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{:?}\n{}", view.error, grid.logs());
    }
    assert!(grid.coordinators.iter_mut().all(|coordinator| !coordinator.has_exited()), "the same processes rejoined");
    Ok(())
}

/// An operator deletes the submit stream's consumer, then the whole stream (to clear a
/// backlog, or to change its limits): the coordinator opens them again, and durable submits
/// start their runs. Before, its submit loop ended for good and no submit started a run
/// until the coordinator was restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_submits_start_again_after_the_submit_consumer_or_stream_is_deleted() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    for (order, deleted) in [(1, "consumer"), (2, "stream")] {
        if deleted == "consumer" {
            let stream = jetstream.get_stream(subjects.submit_stream()).await?;
            stream.delete_consumer(&subjects.submit_consumer()).await?;
        } else {
            jetstream.delete_stream(subjects.submit_stream()).await?;
        }
        let start = StartRun {
            flow: "echo-once".into(),
            input: json!({"order": order}),
            idempotency_key: Some(format!("after-{deleted}")),
            ..Default::default()
        };
        let submitted = client.submit(start).await.or_logs(&grid)?;
        let view = grid.wait_run(&client, &submitted.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "after the {deleted} was deleted: {view:?}\n{}", grid.logs());
    }
    assert!(grid.logs().contains("the submit stream's consumer is open again"), "{}", grid.logs());
    Ok(())
}

/// The submit stream deleted while no coordinator runs (an operator clearing a backlog,
/// nats-server losing its store): the client that made it makes it again, and its durable
/// submits are stored. Before, the client took the stream for made for good, and each later
/// submit failed after its whole retry budget with "no stream found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_submit_makes_the_submit_stream_again_once_it_is_deleted() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    // Short, so that a submit that cannot store fails soon.
    let client = grid.client().await?.with_retry_budget(Duration::from_secs(2));
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    let submit =
        |key: &str| StartRun { flow: "echo-once".into(), idempotency_key: Some(key.to_owned()), ..Default::default() };
    let first = client.submit(submit("before")).await?;
    assert!(!first.duplicate, "{first:?}");
    jetstream.delete_stream(subjects.submit_stream()).await?;
    let second = client.submit(submit("after")).await?;
    assert_eq!(second.run_id, RunId::from_idempotency_key("echo-once", "after"));
    let mut stream = jetstream.get_stream(subjects.submit_stream()).await?;
    assert_eq!(stream.info().await?.state.messages, 1, "the stream made again holds the second submit only");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_submit_without_a_coordinator_runs_once_one_starts() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    grid.coordinators[0].stop(Duration::from_secs(10));

    let input = json!({"order": 7});
    let start = StartRun {
        flow: "echo-once".into(),
        version: None,
        input: input.clone(),
        idempotency_key: Some("order-7".into()),
        ..Default::default()
    };
    let submitted = client.submit(start).await.or_logs(&grid)?;
    assert_eq!(submitted.run_id, RunId::from_idempotency_key("echo-once", "order-7"));
    assert!(!submitted.duplicate, "{submitted:?}");
    let again = StartRun {
        flow: "echo-once".into(),
        version: None,
        input: json!({"order": 8}),
        idempotency_key: Some("order-7".into()),
        ..Default::default()
    };
    let resubmitted = client.submit(again).await.or_logs(&grid)?;
    assert_eq!(resubmitted.run_id, submitted.run_id);
    // Stored (a submit refused before would otherwise be dropped): the key keeps the two to one run.
    assert!(!resubmitted.duplicate, "a later submit with the same key is stored: {resubmitted:?}");
    let unanswered = client.clone().with_retry_budget(Duration::ZERO).flows().await;
    assert!(unanswered.is_err_and(|error| error.is_no_responders()), "no coordinator should be serving");
    // The CLI cannot ask whether the flow is deployed, and submits all the same.
    let (ok, stdout, stderr) = grid.cli(&["run", "submit", "echo-once", "--idempotency-key", "order-7"])?;
    assert!(ok && stdout.trim() == submitted.run_id.as_str(), "{stdout}{stderr}");
    // A key of the grid's own could take the place of a submit without a key.
    let (ok, stdout, stderr) = grid.cli(&["run", "submit", "echo-once", "--idempotency-key", "submit-7"])?;
    assert!(!ok && stderr.contains("keeps for starts of its own"), "{stdout}{stderr}");
    // What a coordinator would refuse on its face is refused before it is stored.
    let (ok, stdout, stderr) = grid.cli(&["run", "submit", "echo-once", "--at", "400d"])?;
    assert!(!ok && stderr.contains("more than 366 days ahead"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = grid.cli(&["run", "submit", "echo-once", "--label", "bad key=x"])?;
    assert!(!ok && stderr.contains("label key"), "{stdout}{stderr}");

    grid.start_coordinator().await?;
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    let view = loop {
        match client.get(&submitted.run_id).await {
            Ok(view) if view.status.is_terminal() => break view,
            Ok(_) => {}
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(error).or_logs(&grid),
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the submitted run did not end within {RUN_DEADLINE:?}\n{}", grid.logs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    // The submits with the key are started together: the run is whichever was first.
    assert!([input, json!({"order": 8}), Value::Null].contains(&view.input), "{view:?}");
    assert_eq!(view.output.clone().unwrap_or(Value::Null), view.input, "{view:?}");
    assert_eq!(view.flow, "echo-once");
    let runs = client.list(ListRuns { flow: Some("echo-once".into()), ..Default::default() }).await?;
    assert_eq!(runs.runs.len(), 1, "three submits with one key start one run: {runs:?}");
    // With a coordinator to ask, the CLI refuses to submit a run of a flow that is not
    // deployed (the coordinator taking it would drop it, telling no one).
    let (ok, stdout, stderr) = grid.cli(&["run", "submit", "echo-twice"])?;
    assert!(!ok && stderr.contains("echo-twice") && stderr.contains("deploy it first"), "{stdout}{stderr}");
    Ok(())
}

const WAIT_FLOW: &str = r#"
name: cool-down
steps:
  - { id: first, kind: task, pool: a, task: echo }
  - { id: pause, kind: wait, after: [first], duration: 'steps.first.output.wait_ms' }
  - { id: then, kind: task, pool: a, task: echo, after: [pause], input: 'steps.pause.output' }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_holds_the_run_for_its_time_also_across_a_coordinator_crash() -> anyhow::Result<()> {
    const WAIT_MS: u64 = 3_000;
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, WAIT_FLOW).await?;
    let start = StartRun {
        flow: "cool-down".into(),
        version: None,
        input: json!({ "wait_ms": WAIT_MS }),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;
    let waiting = flowgrid_tests::wait_for("the wait step to start", RUN_DEADLINE, || async {
        let view = client.get(&run_id).await.ok()?;
        (step(&view, "pause").status == StepStatus::Running).then_some(view)
    })
    .await?;
    assert_eq!(step(&waiting, "then").status, StepStatus::Pending, "nothing runs while the wait goes on");

    // The timer lives in the run's state: a new coordinator arms it again from the store.
    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let pause = step(&view, "pause");
    let waited = pause.ended_ms.unwrap() - pause.started_ms.unwrap();
    assert!(waited >= WAIT_MS, "the wait ended after {waited} ms, before its {WAIT_MS} ms");
    assert!(waited < WAIT_MS + 10_000, "the wait ended {waited} ms after it started, long after its time");
    assert_eq!(view.output, Some(json!({ "then": { "waited_ms": WAIT_MS } })), "{view:?}");
    Ok(())
}

/// A durable submit the grid refuses (its flow is not deployed, it is not a `StartRun`)
/// leaves the submit stream only once it is kept, with why, in the refused-submits
/// stream: `flowgrid run refused` lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_durable_submits_are_kept_with_why_and_listed() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let start = StartRun {
        flow: "never-deployed".into(),
        idempotency_key: Some("order-9".into()),
        input: json!({"order": 9}),
        ..Default::default()
    };
    client.submit(start).await.or_logs(&grid)?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    jetstream.publish(subjects.submit(), "not a request".into()).await?.await?;

    let refused = wait_for("both refusals to be kept", RUN_DEADLINE, || async {
        let refused = client.refused_submits(10).await.ok()?;
        (refused.len() == 2).then_some(refused)
    })
    .await
    .or_logs(&grid)?;
    // Newest first.
    let (malformed, not_deployed) = (&refused[0], &refused[1]);
    assert_eq!(not_deployed.code, "not_found", "{not_deployed:?}");
    assert!(not_deployed.reason.contains("never-deployed"), "{not_deployed:?}");
    let request = not_deployed.request.as_ref().expect("the request as it was submitted");
    assert_eq!((request.idempotency_key.as_deref(), &request.input), (Some("order-9"), &json!({"order": 9})));
    assert_eq!((malformed.code.as_str(), &malformed.request), ("invalid_request", &None), "{malformed:?}");
    assert!(malformed.submit_sequence > not_deployed.submit_sequence, "{refused:?}");
    // Neither is left in the submit stream (each is acked once its refusal is kept).
    wait_for("both submits to leave the stream", RUN_DEADLINE, || async {
        let submits = jetstream.get_stream(subjects.submit_stream()).await.ok()?.get_info().await.ok()?;
        (submits.state.messages == 0).then_some(())
    })
    .await
    .or_logs(&grid)?;

    let (ok, stdout, stderr) = grid.cli(&["run", "refused"])?;
    assert!(ok && stdout.contains("never-deployed") && stdout.contains("order-9"), "{stdout}{stderr}");
    assert!(stdout.contains("not_found") && stdout.contains("invalid_request"), "{stdout}");
    let (ok, stdout, stderr) = grid.cli(&["--json", "run", "refused", "--limit", "1"])?;
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).map_err(|error| anyhow::anyhow!("{error}: {stdout}{stderr}"))?;
    assert!(ok && listed.len() == 1 && listed[0]["code"] == "invalid_request", "{stdout}");
    let (ok, stdout, stderr) = grid.cli(&["status"])?;
    assert!(ok && stdout.contains("submit: 0 waiting, 0 being started, 2 refused"), "{stdout}{stderr}");
    Ok(())
}

/// Sixty runs of one shard whose timeouts came due while their coordinator was down, each
/// with a 200 KB input its final view holds: together over what one commit takes. They
/// end over several commits. Before, one batch fired every due timer; its commit was too
/// large, the shard reloaded and fired them all again, for good, and no run ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_due_together_end_their_runs_over_several_commits() -> anyhow::Result<()> {
    const RUNS: usize = 60;
    let mut grid = Grid::start_nats()?;
    grid.shards = 1;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    deploy(
        &grid,
        &client,
        "name: unserved\ntimeout_ms: 2000\nsteps:\n  - { id: t, kind: task, pool: nobody, task: t }\n",
    )
    .await?;
    let mut runs = Vec::new();
    for index in 0..RUNS {
        let input = json!({"index": index, "blob": "x".repeat(200_000)});
        let start = StartRun { flow: "unserved".into(), input, ..Default::default() };
        runs.push(client.start(start).await.or_logs(&grid)?.run_id);
    }
    grid.coordinators[0].kill_hard();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    grid.start_coordinator().await?;
    for run_id in &runs {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::TimedOut, "{view:?}");
    }
    assert!(!grid.logs().contains("reloading the shard"), "{}", grid.logs());
    Ok(())
}

/// `run start --wait` whose run started, then lost every coordinator while it waited: no
/// coordinator answering is otherwise a failure to simply try again, but here the start
/// was applied, and the same command again would start a second run. The JSON answer says
/// `retryable: false` and names the run and how to follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_loses_every_coordinator_after_the_start_is_not_to_be_started_again() -> anyhow::Result<()> {
    use std::io::{BufRead, Read};

    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, "name: waits\nsteps:\n  - { id: go, kind: signal }\n").await?;
    // Long enough that the coordinator is gone before the wait would end with the run
    // still running (which is no failure).
    let mut cli = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "--json"])
        .args(["run", "start", "waits", "--wait", "--timeout", "3s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stderr = std::io::BufReader::new(cli.stderr.take().expect("a piped stderr"));
    let mut line = String::new();
    let run_id = loop {
        line.clear();
        anyhow::ensure!(stderr.read_line(&mut line)? > 0, "the CLI ended without starting the run");
        if let Some(rest) = line.strip_prefix("started run ") {
            break rest.split_whitespace().next().unwrap_or_default().to_owned();
        }
    };
    grid.coordinators[0].kill_hard();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest)?;
    let output = cli.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}\n{rest}");
    let answer: Value = serde_json::from_str(&stdout).map_err(|error| anyhow::anyhow!("{error}: {stdout}\n{rest}"))?;
    let error = &answer["error"];
    assert_eq!((&error["code"], &error["retryable"]), (&json!("unavailable"), &json!(false)), "{answer}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("flowgrid run watch {run_id}")), "{message}");
    assert!(rest.contains(&format!("run {run_id} was started")), "{rest}");
    Ok(())
}

/// A durable submit the grid refused (its flow not deployed yet), submitted again with the
/// same key once the flow is deployed, within the stream's duplicate window: it is stored
/// and its run starts. Before, its message id was the run id alone, which JetStream still
/// held for the refused submit: the second was acknowledged as a duplicate and dropped,
/// with no run and no refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_sent_again_after_its_refusal_is_stored_and_runs() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let input = json!({"order": 11});
    let submit = || StartRun {
        flow: "echo-once".into(),
        input: input.clone(),
        idempotency_key: Some("order-11".into()),
        ..Default::default()
    };
    let refused = client.submit(submit()).await.or_logs(&grid)?;
    wait_for("the submit's refusal to be kept", RUN_DEADLINE, || async {
        let refused = client.refused_submits(10).await.ok()?;
        refused.iter().any(|refused| refused.reason.contains("echo-once")).then_some(())
    })
    .await
    .or_logs(&grid)?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let submitted = client.submit(submit()).await.or_logs(&grid)?;
    assert_eq!(submitted.run_id, refused.run_id);
    assert!(!submitted.duplicate, "the submit after the refusal is stored: {submitted:?}");
    let view = grid.wait_run(&client, &submitted.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(input), "{view:?}");
    Ok(())
}

/// A client's first durable submit while nats-server restarts, down for longer than a
/// JetStream request of the client's connection waits for its answer: it is retried within
/// the client's retry budget, and stored once nats-server is back. Before, the first try
/// to make sure the submit stream exists was made once, outside the retries: the submit
/// failed with that request's timeout, asking whether JetStream was enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_durable_submit_rides_out_a_nats_server_restart() -> anyhow::Result<()> {
    /// How long a request of the client's connection (a JetStream one too) waits for its
    /// answer: short, so that the test is.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
    /// Longer than [`REQUEST_TIMEOUT`], shorter than the client's retry budget.
    const DOWN_FOR: Duration = Duration::from_secs(3);
    let mut grid = Grid::start_nats()?;
    let nats = async_nats::ConnectOptions::new().request_timeout(Some(REQUEST_TIMEOUT)).connect(&grid.nats_url).await?;
    let client = flowgrid_sdk::Client::new(nats, grid.prefix.clone());
    grid.nats.kill_hard();
    let restarted = std::thread::spawn(move || grid.restart_nats(DOWN_FOR).map(|()| grid));
    let start = StartRun { flow: "echo-once".into(), idempotency_key: Some("order-12".into()), ..Default::default() };
    let submitted = client.submit(start).await;
    let grid = restarted.join().map_err(|_| anyhow::anyhow!("restarting nats-server panicked"))??;
    let submitted = submitted.or_logs(&grid)?;
    assert_eq!(submitted.run_id, RunId::from_idempotency_key("echo-once", "order-12"));
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    let mut stream = jetstream.get_stream(subjects.submit_stream()).await?;
    assert_eq!(stream.info().await?.state.messages, 1, "the submit is stored");
    Ok(())
}
