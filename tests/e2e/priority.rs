//! Task priorities: a pool's tasks of a higher priority start before the lower ones that
//! wait, whatever order they were published in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use flowgrid_proto::{encode, Encoding, Reply, ResultAck, Subjects, TaskMessage};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_sdk::{AttemptId, RunId, RunStatus, StartRun, Task, Worker};
use flowgrid_tests::{step, wait_for, Grid};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

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

/// A task step of pool `p` that sleeps `ms`, at `priority` (the default when `None`).
fn sleeping_flow(name: &str, ms: u64, priority: Option<u8>) -> String {
    flow(name, priority).replace("ms: 30", &format!("ms: {ms}"))
}

/// The ends of step `work` of `runs`, each waited for and succeeded.
async fn work_ends(grid: &Grid, client: &flowgrid_sdk::Client, runs: &[RunId]) -> anyhow::Result<Vec<u64>> {
    let mut ends = Vec::new();
    for run_id in runs {
        let view = grid.wait_run(client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
        ends.push(step(&view, "work").ended_ms.expect("a step that succeeded ended"));
    }
    Ok(ends)
}

/// When the pool's bound of tasks out is set in [`bounded_lane_leaves_the_free_slots_to_the_others`].
#[derive(Clone, Copy, PartialEq)]
enum BoundSet {
    /// Before the worker starts: it finds the lanes bound as it opens them.
    BeforeTheWorker,
    /// Once the worker pulls from lane 9: it learns the bound from a pull held.
    WhileTheWorkerRuns,
}

/// A lane at its bound of tasks out (`pool limit`) with more waiting leaves the worker's
/// other slots to the other lanes. The server holds a no-wait pull on such a lane until a
/// slot frees: the worker used to wait on it with every free slot, give up after 5 s as if
/// the connection were lost, forget its lanes and wait on the same lane again, so a task of
/// a lower lane started only once the bounded lane's backlog was all out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_at_its_bound_leaves_the_free_slots_to_the_other_lanes() -> anyhow::Result<()> {
    bounded_lane_leaves_the_free_slots_to_the_others(BoundSet::BeforeTheWorker).await
}

/// [`a_lane_at_its_bound_leaves_the_free_slots_to_the_other_lanes`] with the bound set
/// after the worker opened the lane: its first pull held there tells it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_bounded_while_the_worker_runs_leaves_the_free_slots_to_the_other_lanes() -> anyhow::Result<()> {
    bounded_lane_leaves_the_free_slots_to_the_others(BoundSet::WhileTheWorkerRuns).await
}

/// `flowgrid pool limit p --max-in-flight 1`.
fn bound_pool_to_one(grid: &Grid) -> anyhow::Result<()> {
    let (ok, text, errors) = grid.cli(&["pool", "limit", "p", "--max-in-flight", "1"])?;
    anyhow::ensure!(ok, "{text}{errors}");
    Ok(())
}

/// Three tasks of 3 s on lane 9, bounded to one out at once, and a worker with four slots:
/// a task of the default lane started while the first of them runs ends before it.
async fn bounded_lane_leaves_the_free_slots_to_the_others(bound_set: BoundSet) -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, &sleeping_flow("long-high", 3_000, Some(9))).await?;
    deploy(&grid, &client, &sleeping_flow("short-high", 30, Some(9))).await?;
    deploy(&grid, &client, &sleeping_flow("short", 30, None)).await?;
    let start = |flow: &str| StartRun { flow: flow.into(), input: json!({}), ..Default::default() };
    if bound_set == BoundSet::BeforeTheWorker {
        bound_pool_to_one(&grid)?;
    } else {
        // Lane 9 opened, and pulled by the worker, without a bound.
        grid.start_workers(&["p"], 4)?;
        let opened = client.start(start("short-high")).await.or_logs(&grid)?.run_id;
        work_ends(&grid, &client, &[opened]).await?;
        bound_pool_to_one(&grid)?;
    }
    let mut high = Vec::new();
    for _ in 0..3 {
        high.push(client.start(start("long-high")).await.or_logs(&grid)?.run_id);
    }
    if bound_set == BoundSet::BeforeTheWorker {
        grid.start_workers(&["p"], 4)?;
    }
    // The worker holds one task of lane 9, its bound, and two more wait there.
    wait_for("one task of lane 9 out and two waiting", RUN_DEADLINE, || async {
        let pool = pool_status(&grid, "p").ok()?;
        let lanes = pool["lanes"].as_array()?.clone();
        let high = lanes.into_iter().find(|lane| lane["priority"] == 9)?;
        (high["in_flight"] == 1 && high["pending"] == 2).then_some(())
    })
    .await
    .or_logs(&grid)?;
    let short = client.start(start("short")).await.or_logs(&grid)?.run_id;

    let short_end = work_ends(&grid, &client, std::slice::from_ref(&short)).await?[0];
    let high_ends = work_ends(&grid, &client, &high).await?;
    let first_high_end = high_ends.iter().min().copied().unwrap_or(0);
    assert!(
        short_end < first_high_end,
        "the default lane's task ended at {short_end}, after the first task of the bounded lane ({high_ends:?})\n{}",
        grid.logs()
    );
    let logs = grid.logs();
    assert!(!logs.contains("pulling tasks failed"), "{logs}");
    let learnt = logs.contains("the pool's lane is at a bound of tasks out set since it was bound");
    assert_eq!(learnt, bound_set == BoundSet::WhileTheWorkerRuns, "{logs}");
    Ok(())
}

/// A lane that opens while every slot is busy (the pool's first task of a priority) takes
/// the next slot that frees, before the tasks of a lower lane that waited longer: the worker
/// used to look for lanes before it waited for a slot, and pulled with the lanes it knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_opened_while_every_slot_is_busy_takes_the_next_free_slot() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    grid.start_workers(&["p"], 1)?;
    let client = grid.client().await?;
    deploy(&grid, &client, &sleeping_flow("normal", 2_000, None)).await?;
    deploy(&grid, &client, &sleeping_flow("urgent", 30, Some(9))).await?;
    let start = |flow: &str| StartRun { flow: flow.into(), input: json!({}), ..Default::default() };
    let running = client.start(start("normal")).await.or_logs(&grid)?.run_id;
    wait_for("the worker's one slot busy", RUN_DEADLINE, || async {
        (pool_status(&grid, "p").ok()?["in_flight"] == 1).then_some(())
    })
    .await
    .or_logs(&grid)?;
    let waiting = client.start(start("normal")).await.or_logs(&grid)?.run_id;
    let urgent = client.start(start("urgent")).await.or_logs(&grid)?.run_id;

    let ends = work_ends(&grid, &client, &[running, waiting, urgent]).await?;
    let (running_end, waiting_end, urgent_end) = (ends[0], ends[1], ends[2]);
    assert!(running_end <= urgent_end, "{ends:?}");
    assert!(
        urgent_end < waiting_end,
        "the first task of lane 9 ended at {urgent_end}, after the default lane's task that waited ({waiting_end})\n{}",
        grid.logs()
    );
    Ok(())
}

/// The pool consumer's ack wait in [`a_lanes_tasks_are_heartbeated_as_its_own_consumer_needs`].
const POOL_ACK_WAIT: Duration = Duration::from_secs(6);
/// The ack wait of lane 9's consumer there, made beforehand: shorter than the pool's.
const LANE_ACK_WAIT: Duration = Duration::from_millis(1_500);
/// How long the task runs there: past the lane's ack wait, within the pool's.
const TASK_RUNS: Duration = Duration::from_secs(4);

/// A task of a lane whose consumer has a shorter ack wait than the pool's own consumer is
/// heartbeated as often as its lane's consumer needs: JetStream does not deliver it again
/// while it runs. The worker used to heartbeat the tasks of every lane by the pool
/// consumer's ack wait (every 2 s here, where lane 9 gives a task to another after 1.5 s),
/// and the task ran again on each redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lanes_tasks_are_heartbeated_as_its_own_consumer_needs() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let jetstream = jetstream::new(nats.clone());
    let subjects = Subjects::new(grid.prefix.clone());
    let limits = BrokerLimits { ack_wait: POOL_ACK_WAIT, ..BrokerLimits::default() };
    let stream = broker::tasks_stream(&jetstream, &subjects, &limits).await?;
    broker::pool_consumer(&stream, &subjects, "p", &limits).await?;
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(subjects.lane_consumer("p", 9)),
            filter_subject: subjects.task_lane("p", 9),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: LANE_ACK_WAIT,
            ..Default::default()
        })
        .await?;
    // No coordinator: the test confirms the result itself.
    let reply_to = subjects.shard_results(0);
    let mut results = nats.subscribe(reply_to.clone()).await?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let task = TaskMessage {
        attempt: AttemptId { run_id: RunId("run-1".into()), step: "work".into(), item: None, attempt: 1 },
        pool: "p".into(),
        task: "sleep".into(),
        input: Arc::new(json!({})),
        deadline_ms: now_ms + 60_000,
        reply_to,
        progress: None,
    };
    jetstream.publish(subjects.task_lane("p", 9), encode(Encoding::MsgPack, &task)?.into()).await?.await?;

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |task: Task| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(TASK_RUNS).await;
                Ok(task.into_input())
            }
        }
    };
    let shutdown = CancellationToken::new();
    let worker = Worker::new(nats.clone(), grid.prefix.clone(), "p").broker_limits(limits);
    let worker = tokio::spawn(worker.run(handler, shutdown.clone()));

    let result =
        tokio::time::timeout(RUN_DEADLINE, results.next()).await?.context("the results' subscription ended")?;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the task was delivered again while it ran");
    let reply = result.reply.context("a result is a request")?;
    nats.publish(reply, encode(Encoding::MsgPack, &Reply::Ok(ResultAck { applied: true }))?.into()).await?;
    shutdown.cancel();
    tokio::time::timeout(RUN_DEADLINE, worker).await??.or_logs(&grid)?;
    Ok(())
}
