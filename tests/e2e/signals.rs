//! Signal steps: a run waits for a signal from outside, takes the first one exactly once,
//! refuses signals it cannot take with a reason, times out into a catch, and keeps what
//! it took across a coordinator crash.

use std::time::Duration;

use flowgrid_sdk::{ErrorCode, Event, RunId, RunStatus, StartRun, StepStatus};
use flowgrid_tests::{api_request_json, step, wait_for, Grid};
use serde_json::{json, Value};

use crate::{deploy, refusal, OrLogs, RUN_DEADLINE};

/// A draft on pool `a`, an approval signal (a timeout caught by `escalate`), then a publish
/// step that reads the approval.
const APPROVAL_FLOW: &str = r#"
name: approval
steps:
  - { id: draft, kind: task, pool: a, task: echo }
  - id: approve
    kind: signal
    after: [draft]
    timeout_ms: 60000
    catch: [{ errors: [timeout], next: escalate }]
  - { id: publish, kind: task, pool: a, task: echo, after: [approve], input: 'steps.approve.output' }
  - { id: escalate, kind: transform, output: '"nobody approved in time"' }
"#;

async fn start_waiting(grid: &Grid, client: &flowgrid_sdk::Client, flow: &str) -> anyhow::Result<RunId> {
    let start =
        StartRun { flow: flow.into(), version: None, input: json!({}), idempotency_key: None, ..Default::default() };
    let run_id = client.start(start).await.or_logs(grid)?.run_id;
    wait_for("the signal step to wait", RUN_DEADLINE, || async {
        let view = client.get(&run_id).await.ok()?;
        (step(&view, "approve").status == StepStatus::Running).then_some(())
    })
    .await?;
    Ok(run_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_signal_goes_on_with_its_data_and_a_repeat_changes_nothing() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, APPROVAL_FLOW).await?;
    let run_id = start_waiting(&grid, &client, "approval").await?;

    let (_, _, stderr) = grid.cli(&["run", "get", run_id.as_str()])?;
    assert!(
        stderr.contains(&format!("hint: step approve waits for a signal: flowgrid run signal {run_id} approve")),
        "{stderr}"
    );
    let (ok, stdout, stderr) =
        grid.cli(&["run", "signal", run_id.as_str(), "approve", "--data", r#"{"by": "ana"}"#])?;
    assert!(ok && stdout.contains("took the signal"), "{stdout}\n{stderr}");

    let again = client.signal(&run_id, "approve", json!({"by": "bob"})).await.or_logs(&grid)?;
    assert!(!again.applied, "a second signal is not applied: {again:?}");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "approve").output, Some(json!({"by": "ana"})));
    assert_eq!(step(&view, "publish").output, Some(json!({"by": "ana"})), "the step after reads the signal");
    assert_eq!(step(&view, "escalate").status, StepStatus::Skipped);

    let after_end = client.signal(&run_id, "approve", Value::Null).await.or_logs(&grid)?;
    assert_eq!((after_end.applied, after_end.status), (false, RunStatus::Succeeded), "{after_end:?}");
    // A step the ended run does not have, or one that waits for no signal, is refused as
    // on a run that goes.
    for (target, code) in [("nope", ErrorCode::NotFound), ("publish", ErrorCode::InvalidRequest)] {
        let error = client.signal(&run_id, target, Value::Null).await.expect_err("refused");
        assert_eq!(refusal(&error).code, code, "{target}: {error:?}");
    }
    Ok(())
}

/// Sends `signal` as JSON over NATS, as any client may, and returns the answer.
async fn signal_json(grid: &Grid, signal: &Value) -> anyhow::Result<Value> {
    let nats = grid.nats_client().await?;
    let reply = api_request_json(&nats, &grid.prefix, "run.signal", signal, RUN_DEADLINE).await?;
    Ok(serde_json::from_slice(&reply.payload)?)
}

/// Whether `signal` was applied.
async fn signal_raw(grid: &Grid, signal: Value) -> anyhow::Result<bool> {
    let reply = signal_json(grid, &signal).await?;
    reply["ok"]["applied"].as_bool().ok_or_else(|| anyhow::anyhow!("not an answer: {reply}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_again_with_its_id_is_answered_as_taken() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, APPROVAL_FLOW).await?;
    let run_id = start_waiting(&grid, &client, "approval").await?;
    let signal = |id: Option<&str>| json!({"run_id": run_id, "step": "approve", "data": "ok", "id": id});

    assert!(signal_raw(&grid, signal(Some("from-ana"))).await?, "the first signal is taken");
    // Its answer lost, the sender sends it again: it was taken, and only once.
    assert!(signal_raw(&grid, signal(Some("from-ana"))).await?, "a repeat of the taken signal");
    assert!(!signal_raw(&grid, signal(Some("from-bob"))).await?, "another sender's signal");
    assert!(!signal_raw(&grid, signal(None)).await?, "a signal without an id");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    assert!(signal_raw(&grid, signal(Some("from-ana"))).await?, "after the run ended too");
    assert!(!signal_raw(&grid, signal(Some("from-bob"))).await?);
    let history = client.history(&run_id, None, None).await?;
    let taken =
        history.records.iter().filter(|record| matches!(record.event, Some(Event::SignalReceived { .. }))).count();
    assert_eq!(taken, 1, "one signal in the history: {history:?}");

    let reply = signal_json(&grid, &signal(Some(&"x".repeat(129)))).await?;
    assert!(reply.to_string().contains("a signal's id must be 1 to 128 bytes"), "{reply}");

    // Copies sent together reach the coordinator before the first one's commit: every one
    // is answered as taken, not only the first.
    let run_id = start_waiting(&grid, &client, "approval").await?;
    let signal = json!({"run_id": run_id, "step": "approve", "data": "ok", "id": "from-ana"});
    let nats = grid.nats_client().await?;
    let copies = (0..64).map(|_| api_request_json(&nats, &grid.prefix, "run.signal", &signal, RUN_DEADLINE));
    let answers: Vec<Value> = futures::future::try_join_all(copies)
        .await?
        .iter()
        .map(|reply| serde_json::from_slice(&reply.payload))
        .collect::<Result<_, _>>()?;
    let applied: Vec<&Value> = answers.iter().map(|answer| &answer["ok"]["applied"]).collect();
    assert_eq!(applied, vec![&Value::Bool(true); 64], "every copy of the taken signal: {answers:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_the_run_cannot_take_is_refused_with_the_reason() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, APPROVAL_FLOW).await?;
    // No worker serves pool `a`: the draft stays open and the approval has not started.
    let start = StartRun {
        flow: "approval".into(),
        version: None,
        input: json!({}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;

    let cases = [
        ("approve", ErrorCode::Conflict, "has not started"),
        ("draft", ErrorCode::InvalidRequest, "is a task step"),
        ("nope", ErrorCode::NotFound, "no step `nope`"),
    ];
    for (target, code, phrase) in cases {
        let error = client.signal(&run_id, target, json!(1)).await.expect_err("refused");
        let refused = refusal(&error);
        assert_eq!(refused.code, code, "{target}: {refused:?}");
        assert!(refused.message.contains(phrase), "{target}: {refused:?}");
    }
    let error = client.signal(&RunId("no-such-run".into()), "approve", json!(1)).await.expect_err("refused");
    assert_eq!(refusal(&error).code, ErrorCode::NotFound, "{error:?}");
    let blob = "x".repeat(2 * 1024 * 1024);
    let error = client.signal(&run_id, "approve", json!({ "blob": blob })).await.expect_err("too large");
    assert_eq!(refusal(&error).code, ErrorCode::PayloadTooLarge, "{error:?}");

    let view = client.get(&run_id).await.or_logs(&grid)?;
    assert_eq!((view.status, step(&view, "approve").status), (RunStatus::Running, StepStatus::Pending), "unchanged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_signal_in_time_goes_to_the_catch() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, &APPROVAL_FLOW.replace("name: approval", "name: approval-quick").replace("60000", "300"))
        .await?;
    let start = StartRun {
        flow: "approval-quick".into(),
        version: None,
        input: json!({}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let approve = step(&view, "approve");
    assert_eq!((approve.status, approve.caught), (StepStatus::Failed, true), "{approve:?}");
    assert_eq!(approve.error.as_ref().map(|error| error.code.as_str()), Some("timeout"));
    assert!(approve.ended_ms.unwrap() - approve.started_ms.unwrap() >= 300, "{approve:?}");
    assert_eq!(step(&view, "escalate").output, Some(json!("nobody approved in time")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_and_a_taken_signal_survive_a_coordinator_crash() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, APPROVAL_FLOW).await?;
    let waiting = start_waiting(&grid, &client, "approval").await?;
    let signalled = start_waiting(&grid, &client, "approval").await?;
    // Stop the worker pool's progress after the signal: the publish step stays open, so the
    // run is still going when the coordinator dies.
    grid.workers[0].kill_hard();
    let taken = client.signal(&signalled, "approve", json!("yes")).await.or_logs(&grid)?;
    assert!(taken.applied, "{taken:?}");

    grid.coordinators[0].kill_hard();
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 8)?;
    let view = grid.wait_run(&client, &signalled, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "publish").output, Some(json!("yes")), "the signal taken before the crash counts");

    let view = client.get(&waiting).await.or_logs(&grid)?;
    assert_eq!(step(&view, "approve").status, StepStatus::Running, "still waiting after the restart");
    assert!(client.signal(&waiting, "approve", json!("later")).await.or_logs(&grid)?.applied);
    let view = grid.wait_run(&client, &waiting, Duration::from_secs(30)).await?;
    assert_eq!(step(&view, "publish").output, Some(json!("later")), "{view:?}");
    Ok(())
}

/// A wait before a signal step that keeps early signals: the signal arrives first.
const PAYMENT_FLOW: &str = r#"
name: payment
output: 'steps.ship.output'
steps:
  - { id: check, kind: wait, duration_ms: 400 }
  - { id: paid, kind: signal, after: [check], keep_early: true }
  - { id: ship, kind: task, pool: a, task: echo, after: [paid], input: 'steps.paid.output' }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_keeps_early_signals_takes_one_sent_before_it_started() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, PAYMENT_FLOW).await?;
    let start = StartRun {
        flow: "payment".into(),
        version: None,
        input: json!({}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;
    let kept = client.signal(&run_id, "paid", json!({"amount": 12})).await.or_logs(&grid)?;
    assert!(kept.applied, "kept for the step: {kept:?}");
    let view = client.get(&run_id).await.or_logs(&grid)?;
    let paid = step(&view, "paid");
    assert_eq!((paid.status, paid.output.clone()), (StepStatus::Pending, Some(json!({"amount": 12}))), "{view:?}");
    let again = client.signal(&run_id, "paid", json!({"amount": 99})).await.or_logs(&grid)?;
    assert!(!again.applied, "a second early signal changes nothing: {again:?}");

    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!((view.status, view.output), (RunStatus::Succeeded, Some(json!({"amount": 12}))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_to_a_flows_runs_reaches_those_that_match_and_wait() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    let flow = "name: approvals\noutput: 'steps.approve.output'\nsteps:\n  - { id: hold, kind: wait, duration: \
                'input.hold_ms' }\n  - { id: approve, kind: signal, after: [hold] }\n";
    deploy(&grid, &client, flow).await?;
    let start = |customer: &str, hold_ms: u64| StartRun {
        flow: "approvals".into(),
        input: json!({"hold_ms": hold_ms}),
        labels: [("customer".to_owned(), customer.to_owned())].into(),
        ..Default::default()
    };
    let mut waiting = Vec::new();
    for customer in ["acme", "acme", "initech"] {
        waiting.push(client.start(start(customer, 0)).await.or_logs(&grid)?.run_id);
    }
    let held = client.start(start("acme", 600_000)).await.or_logs(&grid)?.run_id;
    for run_id in &waiting {
        wait_for("the run to wait for its signal", RUN_DEADLINE, || async {
            let view = client.get(run_id).await.ok()?;
            (step(&view, "approve").status == StepStatus::Running).then_some(())
        })
        .await
        .or_logs(&grid)?;
    }

    let args =
        ["run", "signal", "--flow", "approvals", "--label", "customer=acme", "approve", "--data", r#"{"ok": 1}"#];
    let (ok, stdout, stderr) = grid.cli(&args)?;
    assert!(
        ok && stdout.contains("signalled 2 of 3 run(s) at step approve (1 as they were); 0 refused"),
        "{stdout}{stderr}"
    );
    for run_id in &waiting[..2] {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.output, Some(json!({"ok": 1})), "{view:?}");
    }
    let initech = client.get(&waiting[2]).await?;
    assert_eq!(step(&initech, "approve").status, StepStatus::Running, "another customer's run still waits");
    let held = client.get(&held).await?;
    assert_eq!((held.status, step(&held, "approve").status), (RunStatus::Running, StepStatus::Pending));

    let (ok, _, stderr) = grid.cli(&["run", "signal", "approve"])?;
    assert!(!ok && stderr.contains("RUN_ID STEP"), "{stderr}");
    let (ok, _, stderr) = grid.cli(&["run", "signal", waiting[2].as_str(), "approve", "--label", "a=b"])?;
    assert!(!ok && stderr.contains("go with --flow"), "{stderr}");
    Ok(())
}
