//! Pipelined JetStream publishing: every publish ends in one outcome that says what happened.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use flowgrid_sdk::{PublishFailure, StreamPublisher};
use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::Grid;
use serde_json::json;

use crate::{deploy, wait_for_log, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// Waits for the next outcome, at most `deadline`.
async fn outcome(publisher: &mut StreamPublisher<u32>, deadline: Duration) -> (u32, Result<(), PublishFailure>) {
    tokio::time::timeout(deadline, publisher.next())
        .await
        .expect("every publish ends in an outcome")
        .expect("the ack subscription stays open")
}

fn message_id(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_refusals_missing_streams_and_silence_each_end_a_publish() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let context = jetstream::new(nats.clone());
    context
        .create_stream(stream::Config {
            name: "one".into(),
            subjects: vec!["one.>".into()],
            max_messages: 1,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await?;
    // A plain subscriber makes the subject have interest, so no "no responders" comes back,
    // and it never answers: the publish can only time out.
    let _silent = nats.subscribe("silent.>").await?;
    let mut publisher = StreamPublisher::new(nats.clone(), Duration::from_millis(300)).await?;
    let wait = Duration::from_secs(5);

    publisher.publish("one.a".into(), message_id("m1"), Bytes::from_static(b"1"), 1).await.map_err(|(_, e)| e)?;
    assert_eq!(outcome(&mut publisher, wait).await, (1, Ok(())));
    // The same message id again: JetStream drops it as a duplicate and acks it.
    publisher.publish("one.a".into(), message_id("m1"), Bytes::from_static(b"1"), 2).await.map_err(|(_, e)| e)?;
    assert_eq!(outcome(&mut publisher, wait).await, (2, Ok(())));
    // A new message into the full stream (one message, discard new) is refused.
    publisher.publish("one.b".into(), message_id("m2"), Bytes::from_static(b"2"), 3).await.map_err(|(_, e)| e)?;
    let (tag, refused) = outcome(&mut publisher, wait).await;
    assert_eq!(tag, 3);
    assert!(
        matches!(refused, Err(PublishFailure::Refused(ref why)) if why.contains("maximum messages")),
        "{refused:?}"
    );

    publisher.publish("nowhere.x".into(), HeaderMap::new(), Bytes::from_static(b"x"), 4).await.map_err(|(_, e)| e)?;
    assert_eq!(outcome(&mut publisher, wait).await, (4, Err(PublishFailure::NoStream)));

    publisher.publish("silent.x".into(), HeaderMap::new(), Bytes::from_static(b"x"), 5).await.map_err(|(_, e)| e)?;
    assert_eq!(publisher.in_flight(), 1);
    assert_eq!(outcome(&mut publisher, wait).await, (5, Err(PublishFailure::TimedOut)));
    assert_eq!(publisher.in_flight(), 0);
    Ok(())
}

/// A tasks stream filled to its limit refuses the next tasks; the coordinator publishes
/// them once workers make room, however long that takes within their attempts' deadline
/// (it used to give up after eight tries, about 6 s, and leave them to the 5 min attempt
/// timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_refused_by_a_full_stream_are_published_once_workers_make_room() -> anyhow::Result<()> {
    const RUNS: usize = 24;
    let mut grid = Grid::start_nats()?;
    grid.spawn_coordinator_with_args(&["--metrics-addr", "off", "--tasks-stream-max-mb", "1"])?;
    grid.wait_until_serving().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    // 24 tasks of 64 KiB each into a stream of 1 MiB: a third of them do not fit.
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let start = StartRun {
            flow: "echo-once".into(),
            input: json!({ "blob": "x".repeat(64 * 1024) }),
            ..Default::default()
        };
        runs.push(client.start(start).await.or_logs(&grid)?.run_id);
    }
    wait_for_log(
        &grid,
        0,
        &["task publish keeps failing", "maximum bytes"],
        "the refused publishes to be retried 8 times",
    )
    .await?;
    grid.start_workers(&["a"], 4)?;
    for run_id in &runs {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        anyhow::ensure!(view.status == RunStatus::Succeeded, "run {run_id}: {view:?}\n{}", grid.logs());
    }
    Ok(())
}

/// A run's end is announced whatever its output: one over the grid's payload limit as JSON
/// (the form it is published in) is announced with a `payload_too_large` error instead,
/// and one the NATS server refuses as over its `max_payload` goes without its data. A list
/// of floats takes 9 bytes each as MessagePack, which bounds the run's input and output,
/// and up to 25 as JSON. (Both were published again and again, refused each time, and
/// never announced.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_end_too_large_to_publish_is_announced_without_its_output() -> anyhow::Result<()> {
    /// Floats whose JSON is some 25 bytes each.
    fn floats(count: usize) -> serde_json::Value {
        json!(vec![-1.234_567_890_123_456_7e-123; count])
    }
    let mut grid = Grid::start_nats_with_config("max_payload: 512KB")?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    let wide =
        "name: wide\npublish_ended: true\noutput: 'steps.copy.output'\nsteps:\n  - { id: copy, kind: transform, \
                output: 'input' }\n";
    deploy(&grid, &client, wide).await?;
    let payload_max = flowgrid_model::Limits::default().payload_bytes_max;
    // Over the payload limit as JSON, within it (and within the server's bound) as MessagePack.
    let over_the_limit = floats(55_000);
    let json_bytes = serde_json::to_vec(&over_the_limit)?.len();
    assert!(json_bytes > payload_max && rmp_serde::to_vec(&over_the_limit)?.len() < 500_000, "{json_bytes}");
    // Within the payload limit as JSON, over the server's `max_payload`.
    let over_the_server = floats(30_000);
    let json_bytes = serde_json::to_vec(&over_the_server)?.len();
    assert!(json_bytes < payload_max && json_bytes > 600_000, "{json_bytes}");

    let mut runs = Vec::new();
    for input in [over_the_limit, over_the_server] {
        let start = StartRun { flow: "wide".into(), input, ..Default::default() };
        runs.push(client.start(start).await.or_logs(&grid)?.run_id);
    }
    let stream = crate::redrive::run_ends_holding(&grid, 2).await?;
    let mut ends = std::collections::HashMap::new();
    for sequence in 1..=2 {
        let ended: flowgrid_proto::RunEnded = serde_json::from_slice(&stream.get_raw_message(sequence).await?.payload)?;
        ends.insert(ended.run_id.clone(), ended);
    }
    for (run_id, said) in runs.iter().zip(["as JSON, over the limit of", "max_payload"]) {
        let ended = &ends[run_id];
        let error = ended.error.as_ref().expect("an error in place of the output");
        assert_eq!((ended.status, &ended.output), (RunStatus::Succeeded, &None), "{ended:?}");
        assert!(error.code == "payload_too_large" && error.message.contains(said), "{error:?}");
    }
    Ok(())
}

/// A task whose publish is refused until its attempt's deadline is given up, and counted
/// as such in `flowgrid_tasks_publish_given_up_total{pool}`: it was counted only as a failed
/// publish (which counts publishes retried), so a task left to its attempt timeout showed
/// only in a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_publish_is_given_up_is_counted() -> anyhow::Result<()> {
    const FILLERS: usize = 20;
    let mut grid = Grid::start_nats()?;
    let metrics_addr = format!("127.0.0.1:{}", flowgrid_tests::free_port()?);
    grid.spawn_coordinator_with_args(&["--metrics-addr", &metrics_addr, "--tasks-stream-max-mb", "1"])?;
    grid.wait_until_serving().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let hasty = "name: hasty\nsteps:\n  - { id: only, kind: task, pool: b, task: echo, timeout_ms: 1000, retry: { \
                 max_attempts: 1 } }\n";
    deploy(&grid, &client, hasty).await?;
    let sample = |prefix: &str| {
        let body = flowgrid_tests::scrape_metrics(&metrics_addr).ok()?;
        flowgrid_tests::metric_value(&body, prefix)
    };
    // 20 tasks of 64 KiB each into a stream of 1 MiB, with no workers: the stream fills,
    // and the tasks that do not fit are retried (their attempts have 5 minutes).
    for _ in 0..FILLERS {
        let start = StartRun {
            flow: "echo-once".into(),
            input: json!({ "blob": "x".repeat(64 * 1024) }),
            ..Default::default()
        };
        client.start(start).await.or_logs(&grid)?;
    }
    flowgrid_tests::wait_for("a refused publish to be retried", RUN_DEADLINE, || async {
        sample("flowgrid_tasks_publish_failed_total{pool=\"a\"}").filter(|retried| *retried >= 1.0)
    })
    .await
    .or_logs(&grid)?;
    // A task as large, whose attempt ends a second after its dispatch: its publish is
    // refused until then, and given up.
    let start =
        StartRun { flow: "hasty".into(), input: json!({ "blob": "x".repeat(64 * 1024) }), ..Default::default() };
    client.start(start).await.or_logs(&grid)?;
    flowgrid_tests::wait_for("the hasty task's publish to be given up", RUN_DEADLINE, || async {
        sample("flowgrid_tasks_publish_given_up_total{pool=\"b\"}").filter(|given_up| *given_up >= 1.0)
    })
    .await
    .or_logs(&grid)?;
    Ok(())
}
