//! A worker that stops: the tasks it could not finish or settle go back to the pool at once,
//! and it stays listed until it is done with the others.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use flowgrid_proto::{encode, Encoding, Subjects, TaskMessage, PRIORITY_DEFAULT};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_sdk::{AttemptId, RunId, RunStatus, StartRun, Task, TaskError, Worker};
use flowgrid_tests::{wait_for, Grid};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::pools::workers_listed;
use crate::{deploy, OrLogs, RUN_DEADLINE};

/// How long a stopping worker here waits for its tasks before it hands them back.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

/// How long NATS may take to deliver a task handed back (at once; the ack wait is 30 s) or
/// a worker to rewrite its record after a change (within a second).
const SETTLE_DEADLINE: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0)
}

/// A handler that holds each task until the test releases it (a permit each).
fn held_until_released(
    release: Arc<Semaphore>,
) -> impl Fn(Task) -> futures::future::BoxFuture<'static, Result<Value, TaskError>> {
    move |task: Task| {
        let release = release.clone();
        Box::pin(async move {
            release.acquire().await.expect("the release semaphore is never closed").forget();
            Ok(task.into_input())
        })
    }
}

/// A task whose handler is done but whose result no coordinator confirms (nobody serves
/// its `reply_to`: the worker sends it again and again, up to the task's deadline plus 30 s)
/// is handed back (nak) when the worker stops after its shutdown grace, so the pool's next
/// worker gets it at once. It used to be dropped with neither an ack nor a nak, and waited
/// for the consumer's ack wait (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_hands_back_a_task_whose_result_is_not_confirmed() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let subjects = Subjects::new(grid.prefix.clone());
    let limits = BrokerLimits::default();
    let stream = broker::tasks_stream(&jetstream::new(nats.clone()), &subjects, &limits).await?;
    let consumer = broker::pool_consumer(&stream, &subjects, "unconfirmed", &limits).await?;
    let task = TaskMessage {
        attempt: AttemptId { run_id: RunId("run-1".into()), step: "only".into(), item: None, attempt: 1 },
        pool: "unconfirmed".into(),
        task: "echo".into(),
        input: Arc::new(json!({"n": 1})),
        deadline_ms: now_ms() + 60_000,
        // No coordinator: nobody answers the result.
        reply_to: subjects.shard_results(0),
        progress: None,
    };
    let subject = subjects.task_lane("unconfirmed", PRIORITY_DEFAULT);
    jetstream::new(nats.clone()).publish(subject, encode(Encoding::MsgPack, &task)?.into()).await?.await?;

    let handled = Arc::new(Notify::new());
    let handler = {
        let handled = handled.clone();
        move |task: Task| {
            let handled = handled.clone();
            async move {
                handled.notify_one();
                Ok(task.into_input())
            }
        }
    };
    let shutdown = CancellationToken::new();
    let worker = Worker::new(grid.nats_client().await?, grid.prefix.clone(), "unconfirmed")
        .concurrency(1)
        .shutdown_grace(SHUTDOWN_GRACE);
    let running = tokio::spawn(worker.run(handler, shutdown.clone()));
    tokio::time::timeout(RUN_DEADLINE, handled.notified()).await.or_logs(&grid)?;
    shutdown.cancel();
    tokio::time::timeout(RUN_DEADLINE, running).await??.or_logs(&grid)?;

    // Handed back: delivered again at once (a nak'ed message counts as out until then), not
    // after the consumer's ack wait.
    let mut batch = consumer.fetch().max_messages(1).expires(SETTLE_DEADLINE).messages().await?;
    let next = batch.next().await;
    let message = next
        .ok_or_else(|| anyhow::anyhow!("the task was not handed back: not delivered again within {SETTLE_DEADLINE:?}"))
        .or_logs(&grid)?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(message.info().map_err(anyhow::Error::msg)?.delivered, 2, "{:?}", message.info());
    Ok(())
}

/// Two tasks of pool `held`, the items of a map, each held by the test's worker until released.
const HELD_FLOW: &str = r#"
name: held
steps:
  - { id: each, kind: map, items: 'input.items', pool: held, task: hold }
"#;

/// A worker asked to stop while it runs tasks stays listed (`flowgrid workers`), with the
/// tasks it still runs, until they are done; then its record goes. It used to delete its
/// record as soon as the stop was asked for, and was not listed for the rest of its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_is_listed_until_its_tasks_are_done() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, HELD_FLOW).await?;
    let start = StartRun { flow: "held".into(), input: json!({"items": [1, 2]}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;

    let release = Arc::new(Semaphore::new(0));
    let shutdown = CancellationToken::new();
    let worker = Worker::new(grid.nats_client().await?, grid.prefix.clone(), "held").concurrency(2);
    let running = tokio::spawn(worker.run(held_until_released(release.clone()), shutdown.clone()));
    let listed_running = |tasks: u64| {
        let grid = &grid;
        move || async move {
            let workers = workers_listed(grid, "held").ok()?;
            (workers.len() == 1 && workers[0]["running"] == tasks).then_some(())
        }
    };
    wait_for("the worker listed with its two tasks", RUN_DEADLINE, listed_running(2)).await.or_logs(&grid)?;

    shutdown.cancel();
    release.add_permits(1);
    wait_for("the stopping worker listed with the task it still runs", SETTLE_DEADLINE, listed_running(1))
        .await
        .or_logs(&grid)?;
    release.add_permits(1);
    tokio::time::timeout(RUN_DEADLINE, running).await??.or_logs(&grid)?;
    assert!(workers_listed(&grid, "held")?.is_empty(), "a worker that stopped is not listed");
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    Ok(())
}
