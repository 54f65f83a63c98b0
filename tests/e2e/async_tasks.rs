//! Async tasks: a worker hands an attempt off with its task token, and another process
//! completes it later.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use flowgrid_proto::{decode, encode, Encoding, Reply, ResultAck, Subjects, TaskMessage, TaskResult, PRIORITY_DEFAULT};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_sdk::{AttemptId, RunId, RunStatus, StartRun, Task, TaskError, Worker};
use flowgrid_tests::{step, wait_for, Grid};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{deploy, OrLogs, RUN_DEADLINE};

const REVIEW_FLOW: &str = r#"
name: review
output: 'steps.approve.output'
steps:
  - { id: approve, kind: task, pool: a, task: hand_off, timeout_ms: 60000, retry: { max_attempts: 1 } }
"#;

/// Starts a review run and returns it with the token its worker handed off.
async fn handed_off(grid: &Grid, client: &flowgrid_sdk::Client) -> anyhow::Result<(RunId, String)> {
    let start = StartRun { flow: "review".into(), input: json!({"doc": 7}), ..Default::default() };
    let run_id = client.start(start).await.or_logs(grid)?.run_id;
    let token = wait_for("the task token in the step's progress", RUN_DEADLINE, || async {
        let view = client.get(&run_id).await.ok()?;
        step(&view, "approve").progress.as_ref()?["token"].as_str().map(str::to_owned)
    })
    .await?;
    Ok((run_id, token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_task_waits_for_its_token_and_takes_the_result_sent_with_it_once() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, REVIEW_FLOW).await?;

    let (run_id, token) = handed_off(&grid, &client).await?;
    assert!(token.starts_with("fgt1."), "{token}");
    // The worker acked the task: it holds nothing while the attempt waits for its token.
    wait_for("the handed-off task to leave the pool", RUN_DEADLINE, || async {
        let (ok, text, _) = grid.cli(&["--json", "status"]).ok()?;
        let status: Value = serde_json::from_str(&text).ok().filter(|_| ok)?;
        (status["backlog"]["pools"][0]["in_flight"] == json!(0)).then_some(())
    })
    .await?;
    assert_eq!(client.get(&run_id).await.or_logs(&grid)?.status, RunStatus::Running);

    let (ok, text, errors) = grid.cli(&["task", "complete", &token, "--output", r#"{"approved": true}"#])?;
    assert!(ok, "{text}{errors}");
    assert!(text.starts_with(&format!("step approve of run {run_id} took the result")), "{text}");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!({"approved": true})));
    assert_eq!(step(&view, "approve").attempts, 1);

    // The same token again: the attempt is closed, nothing changes, exit 1.
    let (ok, text, _) = grid.cli(&["task", "complete", &token, "--output", "2"])?;
    assert!(!ok && text.starts_with("not applied: attempt 1 of step approve"), "{text}");
    assert_eq!(client.get(&run_id).await.or_logs(&grid)?.output, Some(json!({"approved": true})));

    // An error through the token fails the step as a worker's error would.
    let (run_id, token) = handed_off(&grid, &client).await?;
    let args = ["task", "complete", &token, "--error", "rejected", "--message", "not on brand", "--not-retryable"];
    let (ok, text, errors) = grid.cli(&args)?;
    assert!(ok, "{text}{errors}");
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed);
    let error = view.error.expect("the run's error");
    assert_eq!((error.code.as_str(), error.message.as_str()), ("rejected", "not on brand"));

    // A token that is not one is refused, saying so; so is one whose result would go
    // anywhere but to a shard of this grid.
    let (ok, _, errors) = grid.cli(&["task", "complete", "nope", "--output", "1"])?;
    assert!(!ok && errors.contains("not a task token"), "{errors}");
    let mut forged = flowgrid_sdk::TaskToken::decode(&token).expect("a task token");
    forged.reply_to = "elsewhere.admin.reset".to_owned();
    let (ok, _, errors) = grid.cli(&["task", "complete", &forged.encode(), "--output", "1"])?;
    assert!(!ok && errors.contains("\"elsewhere.admin.reset\" is not one of this grid's"), "{errors}");
    Ok(())
}

/// How long a stopping worker waits for its tasks before it hands them back.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long NATS may take to deliver a task handed back (at once; the ack wait is 30 s).
const REDELIVERY_DEADLINE: Duration = Duration::from_secs(5);

/// Publishes one task of `pool`, as a coordinator would (none runs: its result goes to
/// shard 0's result subject, which the test serves itself when it wants one), and returns it.
async fn publish_task(grid: &Grid, pool: &str) -> anyhow::Result<TaskMessage> {
    let nats = grid.nats_client().await?;
    let subjects = Subjects::new(grid.prefix.clone());
    let limits = BrokerLimits::default();
    let stream = broker::tasks_stream(&jetstream::new(nats.clone()), &subjects, &limits).await?;
    broker::pool_consumer(&stream, &subjects, pool, &limits).await?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let task = TaskMessage {
        attempt: AttemptId { run_id: RunId("run-1".into()), step: "review".into(), item: None, attempt: 1 },
        pool: pool.into(),
        task: "hand_off".into(),
        input: Arc::new(json!({"doc": 7})),
        deadline_ms: now_ms + 120_000,
        reply_to: subjects.shard_results(0),
        progress: None,
    };
    let subject = subjects.task_lane(pool, PRIORITY_DEFAULT);
    jetstream::new(nats).publish(subject, encode(Encoding::MsgPack, &task)?.into()).await?.await?;
    Ok(task)
}

/// A handler that detaches its task, tells `detached` the attempt, and then works on for a
/// minute (`for_long`) or returns at once.
fn detaching(
    detached: mpsc::UnboundedSender<AttemptId>,
    for_long: bool,
) -> impl Fn(Task) -> futures::future::BoxFuture<'static, Result<Value, TaskError>> {
    move |task: Task| {
        let detached = detached.clone();
        Box::pin(async move {
            task.detach().expect("a task served by a worker has a token");
            let _ = detached.send(task.attempt().clone());
            if for_long {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(Value::Null)
        })
    }
}

/// A handler that detached its task and is stopped before it returns (the worker's stop,
/// past its shutdown grace) may not have handed its token on: the task goes back to the
/// pool, and the next worker detaches the same attempt again. It used to be acked, and with
/// no one holding its token the attempt waited for its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_task_whose_handler_is_stopped_goes_to_the_next_worker() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let task = publish_task(&grid, "detach").await?;
    let (detached, mut detaches) = mpsc::unbounded_channel();

    let stop_first = CancellationToken::new();
    let first = Worker::new(grid.nats_client().await?, grid.prefix.clone(), "detach").shutdown_grace(SHUTDOWN_GRACE);
    let first = tokio::spawn(first.run(detaching(detached.clone(), true), stop_first.clone()));
    let attempt = tokio::time::timeout(RUN_DEADLINE, detaches.recv()).await?.context("the first detach")?;
    assert_eq!(attempt, task.attempt);
    stop_first.cancel();
    tokio::time::timeout(RUN_DEADLINE, first).await??.or_logs(&grid)?;

    let stop_second = CancellationToken::new();
    let second = Worker::new(grid.nats_client().await?, grid.prefix.clone(), "detach");
    let second = tokio::spawn(second.run(detaching(detached, false), stop_second.clone()));
    let again = tokio::time::timeout(REDELIVERY_DEADLINE, detaches.recv())
        .await
        .context("the task was not handed back: no other worker got it")?
        .context("the second detach")?;
    assert_eq!(again, task.attempt, "the same attempt, detached again");
    stop_second.cancel();
    tokio::time::timeout(RUN_DEADLINE, second).await??.or_logs(&grid)?;
    Ok(())
}

/// A handler that detached its task and then panicked may not have handed its token on:
/// its error is sent as any task's, so the step's retry policy takes it. The task used to be
/// acked with no result, and the attempt waited for its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_task_whose_handler_panics_reports_the_panic() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let task = publish_task(&grid, "detach").await?;
    let mut results = nats.subscribe(task.reply_to.clone()).await?;
    let handler = |task: Task| async move {
        task.detach().expect("a task served by a worker has a token");
        if task.is_detached() {
            panic!("the handler fails before it hands its token on");
        }
        Ok(Value::Null)
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(nats.clone(), grid.prefix.clone(), "detach").run(handler, shutdown.clone()));

    let request = tokio::time::timeout(REDELIVERY_DEADLINE, results.next())
        .await
        .context("no result came for the task whose handler panicked")?
        .context("the results' subscription ended")?;
    let result: TaskResult = decode(Encoding::MsgPack, &request.payload)?;
    assert_eq!(result.attempt, task.attempt);
    let error = result.error.context("an error result")?;
    assert_eq!((error.code.as_str(), error.retryable), ("worker_panic", true), "{error:?}");
    let reply = request.reply.context("a result is a request")?;
    nats.publish(reply, encode(Encoding::MsgPack, &Reply::Ok(ResultAck { applied: true }))?.into()).await?;
    shutdown.cancel();
    tokio::time::timeout(RUN_DEADLINE, worker).await??.or_logs(&grid)?;
    Ok(())
}
