//! Result application: a result is applied once, whatever is sent again.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use flowgrid_proto::{
    decode, encode, Encoding, ErrorCode, Reply, ResultAck, Subjects, TaskMessage, TaskResult, CONTENT_TYPE_HEADER,
};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_sdk::{RunStatus, StartRun, StepStatus, TaskError};
use flowgrid_tests::{step, Grid};
use futures::StreamExt;
use serde_json::json;

use crate::{deploy, OrLogs, RUN_DEADLINE};

/// A pool no worker serves: the test plays the worker.
const MANUAL_FLOW: &str = r#"
name: manual-pool
output: 'steps.only.output'
steps:
  - id: only
    kind: task
    pool: manual
    task: echo
    input: '#{ question: input.question }'
"#;

/// Pulls the next task of `pool` like a worker would.
async fn pull_task(grid: &Grid, pool: &str, deadline: Duration) -> anyhow::Result<(jetstream::Message, Encoding)> {
    let nats = grid.nats_client().await?;
    let context = jetstream::new(nats);
    let subjects = Subjects::new(grid.prefix.clone());
    let limits = BrokerLimits::default();
    let stream = broker::tasks_stream(&context, &subjects, &limits).await?;
    let consumer = broker::pool_consumer(&stream, &subjects, pool, &limits).await?;
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        let mut batch = consumer.fetch().max_messages(1).expires(Duration::from_millis(500)).messages().await?;
        if let Some(message) = batch.next().await {
            let message = message.map_err(|error| anyhow::anyhow!("fetch from pool {pool}: {error}"))?;
            let content_type = message.headers.as_ref().and_then(|headers| headers.get(CONTENT_TYPE_HEADER));
            let encoding = Encoding::from_content_type(content_type.map(|value| value.as_str()));
            return Ok((message, encoding));
        }
    }
    anyhow::bail!("no task arrived on pool {pool} within {deadline:?}\n{}", grid.logs())
}

/// Sends a result to `reply_to` as a request, in `encoding`, and decodes the reply.
async fn send_result(
    nats: &async_nats::Client,
    reply_to: &str,
    encoding: Encoding,
    result: &TaskResult,
) -> anyhow::Result<Reply<ResultAck>> {
    let mut request =
        async_nats::Request::new().payload(encode(encoding, result)?.into()).timeout(Some(Duration::from_secs(10)));
    if let Some(content_type) = encoding.content_type() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE_HEADER, content_type);
        request = request.headers(headers);
    }
    let reply = nats.send_request(reply_to.to_owned(), request).await?;
    let content_type = reply.headers.as_ref().and_then(|headers| headers.get(CONTENT_TYPE_HEADER));
    let reply_encoding = Encoding::from_content_type(content_type.map(|value| value.as_str()));
    Ok(decode(reply_encoding, &reply.payload)?)
}

fn applied(reply: Reply<ResultAck>, grid: &Grid) -> bool {
    match reply {
        Reply::Ok(ack) => ack.applied,
        Reply::Error(error) => panic!("the result was refused: {error:?}\n{}", grid.logs()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_result_is_applied_once() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, MANUAL_FLOW).await?;
    let start = StartRun {
        flow: "manual-pool".into(),
        version: None,
        input: json!({"question": "six times seven"}),
        idempotency_key: None,
        ..Default::default()
    };
    let run = client.start(start).await.or_logs(&grid)?;

    let (message, encoding) = pull_task(&grid, "manual", RUN_DEADLINE).await?;
    let task: TaskMessage = decode(encoding, &message.payload)?;
    assert_eq!(task.attempt.run_id, run.run_id, "{task:?}");
    assert_eq!((task.attempt.step.as_str(), task.attempt.item, task.attempt.attempt), ("only", None, 1), "{task:?}");
    assert_eq!((&*task.pool, &*task.task), ("manual", "echo"), "{task:?}");
    assert_eq!(*task.input, json!({"question": "six times seven"}), "{task:?}");

    let nats = grid.nats_client().await?;
    // A progress report first: taken, and shown with the step; one that also carries an
    // output is refused.
    let progress = Some(json!({"read": "six"}));
    let report = TaskResult { attempt: task.attempt.clone(), output: None, error: None, progress: progress.clone() };
    let reported = send_result(&nats, &task.reply_to, encoding, &report).await.or_logs(&grid)?;
    assert!(applied(reported, &grid), "a report for the open attempt is taken\n{}", grid.logs());
    assert_eq!(step(&client.get(&run.run_id).await?, "only").progress, progress);
    // A report larger than a progress report may be is refused, and the last one stays.
    let large = Some(json!({ "read": "x".repeat(flowgrid_model::limits::PROGRESS_BYTES_MAX) }));
    let oversized = TaskResult { progress: large, ..report.clone() };
    match send_result(&nats, &task.reply_to, encoding, &oversized).await.or_logs(&grid)? {
        Reply::Error(error) => {
            assert_eq!(error.code, ErrorCode::PayloadTooLarge, "{error:?}");
            assert!(error.message.contains("the progress report is") && error.message.contains("65536"), "{error:?}");
        }
        other => panic!("an oversized progress report must be refused: {other:?}"),
    }
    assert_eq!(step(&client.get(&run.run_id).await?, "only").progress, progress);
    let both = TaskResult { output: Some(json!(1)), ..report.clone() };
    match send_result(&nats, &task.reply_to, encoding, &both).await.or_logs(&grid)? {
        Reply::Error(error) => assert!(error.message.contains("exactly one of `output`, `error` and `progress`")),
        other => panic!("a result with an output and progress must be refused: {other:?}"),
    }
    // The refusal of a JSON result is JSON, and says so in its header.
    match send_result(&nats, &task.reply_to, Encoding::Json, &both).await.or_logs(&grid)? {
        Reply::Error(error) => assert!(error.message.contains("exactly one of `output`, `error` and `progress`")),
        other => panic!("a result with an output and progress must be refused: {other:?}"),
    }
    let answer = json!({"answer": 42});
    let result =
        TaskResult { attempt: task.attempt.clone(), output: Some(answer.clone()), error: None, progress: None };
    let first = send_result(&nats, &task.reply_to, encoding, &result).await.or_logs(&grid)?;
    assert!(applied(first, &grid), "the first result must be applied\n{}", grid.logs());
    let second = send_result(&nats, &task.reply_to, encoding, &result).await.or_logs(&grid)?;
    assert!(!applied(second, &grid), "the same result sent again must not be applied\n{}", grid.logs());

    // A contradicting error for the closed attempt, and a result for an attempt that was
    // never opened, change nothing either.
    let error = TaskError { code: "late".into(), message: "too late".into(), retryable: true };
    let late_error = TaskResult { attempt: task.attempt.clone(), output: None, error: Some(error), progress: None };
    let late = send_result(&nats, &task.reply_to, encoding, &late_error).await.or_logs(&grid)?;
    assert!(!applied(late, &grid), "an error for a closed attempt must not be applied");
    let mut never_opened = task.attempt.clone();
    never_opened.attempt = 2;
    let stray = TaskResult { attempt: never_opened, output: Some(json!("stray")), error: None, progress: None };
    let stray = send_result(&nats, &task.reply_to, encoding, &stray).await.or_logs(&grid)?;
    assert!(!applied(stray, &grid), "a result for an attempt never opened must not be applied");
    message.ack().await.map_err(|error| anyhow::anyhow!("ack: {error}"))?;

    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(answer), "{view:?}");
    let only = step(&view, "only");
    assert_eq!((only.status, only.attempts), (StepStatus::Succeeded, 1), "one attempt, one success: {only:?}");
    assert!(only.error.is_none(), "{only:?}");
    Ok(())
}

/// A task whose output is `null` succeeds: the result carries `output: null`, which is an
/// output, not a missing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_output_is_a_result() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, crate::ECHO_FLOW).await?;
    let start = StartRun { flow: "echo-once".into(), input: serde_json::Value::Null, ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    let echo = step(&view, "echo");
    assert_eq!((echo.status, echo.attempts), (StepStatus::Succeeded, 1), "{echo:?}");
    Ok(())
}

/// `depth` arrays, one in the other, around a number.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// A result the grid does not keep (an output nested past the limit, an empty or unusable
/// error code) fails its attempt with `invalid_output`, so the run goes on at once; a
/// progress report nested too deeply is refused; and a message nested thousands of levels
/// deep is refused without taking the coordinator down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_grid_does_not_keep_fails_its_attempt_and_deep_messages_are_refused() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, MANUAL_FLOW).await?;
    let nats = grid.nats_client().await?;
    let cases: [(TaskResult, &str); 3] = {
        let attempt = flowgrid_sdk::AttemptId {
            run_id: flowgrid_sdk::RunId("placeholder".into()),
            step: "only".into(),
            item: None,
            attempt: 1,
        };
        let error = |code: &str| Some(TaskError { code: code.into(), message: "broke".into(), retryable: true });
        [
            (
                TaskResult { attempt: attempt.clone(), output: Some(nested(40)), error: None, progress: None },
                "nested 40 levels deep",
            ),
            (
                TaskResult { attempt: attempt.clone(), output: None, error: error(" "), progress: None },
                "empty error code",
            ),
            (
                TaskResult { attempt, output: None, error: error("line\nbreak"), progress: None },
                "no control characters",
            ),
        ]
    };
    for (mut result, says) in cases {
        let start = StartRun { flow: "manual-pool".into(), input: json!({"question": "q"}), ..Default::default() };
        let run = client.start(start).await.or_logs(&grid)?;
        let (message, encoding) = pull_task(&grid, "manual", RUN_DEADLINE).await?;
        let task: TaskMessage = decode(encoding, &message.payload)?;
        assert_eq!(task.attempt.run_id, run.run_id);
        if says == "nested 40 levels deep" {
            let report =
                TaskResult { attempt: task.attempt.clone(), output: None, error: None, progress: Some(nested(40)) };
            match send_result(&nats, &task.reply_to, encoding, &report).await.or_logs(&grid)? {
                Reply::Error(error) => assert!(error.message.contains("progress report is nested 40"), "{error:?}"),
                other => panic!("a progress report nested too deeply must be refused: {other:?}"),
            }
        }
        result.attempt = task.attempt.clone();
        let reply = send_result(&nats, &task.reply_to, encoding, &result).await.or_logs(&grid)?;
        assert!(applied(reply, &grid), "the result fails the attempt: {result:?}");
        message.ack().await.map_err(|error| anyhow::anyhow!("ack: {error}"))?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        let only = step(&view, "only");
        let error = only.error.as_ref().expect("the step failed");
        assert_eq!(
            (view.status, only.attempts, error.code.as_str()),
            (RunStatus::Failed, 1, "invalid_output"),
            "{view:?}"
        );
        assert!(error.message.contains(says), "{error:?}");
    }

    // 2,000 levels of MessagePack arrays as a start's input: refused, the coordinator stays.
    let mut start = vec![0x82, 0xa4];
    start.extend_from_slice(b"flow");
    start.extend_from_slice(&[0xab]);
    start.extend_from_slice(b"manual-pool");
    start.extend_from_slice(&[0xa5]);
    start.extend_from_slice(b"input");
    start.extend(std::iter::repeat_n(0x91, 2_000));
    start.push(0x01);
    let subjects = Subjects::new(grid.prefix.clone());
    let reply = nats.request(subjects.api("run.start"), start.into()).await?;
    match decode::<Reply<serde_json::Value>>(Encoding::MsgPack, &reply.payload)? {
        Reply::Error(error) => assert!(error.message.contains("nested deeper than 128 levels"), "{error:?}"),
        other => panic!("a start nested 2,000 levels deep must be refused: {other:?}"),
    }
    let start = StartRun { flow: "manual-pool".into(), input: json!({"question": "q"}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    assert_eq!(client.get(&run.run_id).await?.status, RunStatus::Running, "the coordinator still serves");
    Ok(())
}
