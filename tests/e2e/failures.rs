//! Failures: retries with backoff, catches, attempt timeouts.

use std::time::Duration;

use flowgrid_sdk::{RunStatus, StartRun, StepStatus};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::json;

use crate::{deploy, refusal, OrLogs, RUN_DEADLINE};

fn start(flow: &str, input: serde_json::Value) -> StartRun {
    StartRun { flow: flow.into(), input, ..Default::default() }
}

const FLAKY_FLOW: &str = r#"
name: flaky-retry
output: 'steps.shaky.output'
steps:
  - id: shaky
    kind: task
    pool: a
    task: flaky
    input: '#{ succeed_on_attempt: 3, tag: input.tag }'
    retry: {max_attempts: 3, initial_backoff_ms: 300, backoff_multiplier: 2.0, jitter: 0.0}
"#;

const FLAKY_EXHAUSTED_FLOW: &str = r#"
name: flaky-exhausted
steps:
  - id: shaky
    kind: task
    pool: a
    task: flaky
    input: '#{ succeed_on_attempt: 3 }'
    retry: {max_attempts: 2, initial_backoff_ms: 50, jitter: 0.0}
"#;

/// The delays before attempts 2 and 3 of `FLAKY_FLOW`: 300 ms, then 300 * 2.0, no jitter.
const FLAKY_BACKOFF_TOTAL_MS: u64 = 300 + 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_failing_twice_succeeds_on_the_third_attempt_after_backoff() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, FLAKY_FLOW).await?;
    deploy(&grid, &client, FLAKY_EXHAUSTED_FLOW).await?;

    let run = client.start(start("flaky-retry", json!({"tag": "t-1"}))).await.or_logs(&grid)?;
    let exhausted = client.start(start("flaky-exhausted", json!({}))).await.or_logs(&grid)?;

    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!({"succeed_on_attempt": 3, "tag": "t-1"})), "{view:?}");
    let shaky = step(&view, "shaky");
    assert_eq!(shaky.status, StepStatus::Succeeded, "{shaky:?}");
    assert_eq!(shaky.attempts, 3, "two failures then a success: {shaky:?}");
    let ended_ms = view.ended_ms.expect("an ended run has ended_ms");
    let took_ms = ended_ms.saturating_sub(view.created_ms);
    assert!(
        took_ms >= FLAKY_BACKOFF_TOTAL_MS,
        "the run took {took_ms} ms, less than its backoffs ({FLAKY_BACKOFF_TOTAL_MS} ms): backoff not applied: {view:?}"
    );

    // The same task with one retry too few: the policy's limit holds.
    let view = grid.wait_run(&client, &exhausted.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    assert_eq!(view.error.as_ref().map(|error| error.code.as_str()), Some("transient"), "{view:?}");
    let shaky = step(&view, "shaky");
    assert_eq!(shaky.attempts, 2, "max_attempts 2: {shaky:?}");
    assert_eq!(shaky.status, StepStatus::Failed, "{shaky:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_history_names_every_failed_attempt_and_its_backoff_page_by_page() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, FLAKY_FLOW).await?;
    let run = client.start(start("flaky-retry", json!({"tag": "t-9"}))).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());

    // Start, attempt 1 failed, retry due, attempt 2 failed, retry due, attempt 3 succeeded.
    let history = client.history(&run.run_id, None, None).await.or_logs(&grid)?;
    assert_eq!(history.next, None);
    let seqs: Vec<u64> = history.records.iter().map(|record| record.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5], "{history:?}");
    let started = history.records[0].started.as_ref().expect("record 0 is the start");
    assert_eq!((started.flow.as_str(), &started.input), ("flaky-retry", &json!({"tag": "t-9"})));
    let kinds: Vec<&str> = history.records[1..]
        .iter()
        .map(|record| match record.event.as_ref().expect("an event") {
            flowgrid_engine::Event::TaskFailed { .. } => "failed",
            flowgrid_engine::Event::TimerFired { .. } => "timer",
            flowgrid_engine::Event::TaskSucceeded { .. } => "succeeded",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(kinds, vec!["failed", "timer", "failed", "timer", "succeeded"]);
    let times: Vec<u64> = history.records.iter().map(|record| record.at_ms).collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{times:?}");
    assert!(times[5] - times[0] >= FLAKY_BACKOFF_TOTAL_MS, "the backoffs are between the records: {times:?}");

    // Page by page: two records at a time, each page saying where the next starts.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = client.history(&run.run_id, after, Some(2)).await.or_logs(&grid)?;
        assert!(page.records.len() <= 2);
        paged.extend(page.records.iter().map(|record| record.seq));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, seqs);

    let (ok, text, _) = grid.cli(&["run", "history", &run.run_id.0])?;
    assert!(ok, "{text}");
    assert!(text.contains("started flaky-retry@1 with input {\"tag\":\"t-9\"}"), "{text}");
    assert!(text.contains("shaky attempt 1 failed: transient:"), "{text}");
    assert!(text.contains("shaky attempt 2 due after its backoff"), "{text}");
    assert!(text.contains("shaky attempt 3 succeeded:"), "{text}");
    let (ok, text, _) = grid.cli(&["run", "history", &run.run_id.0, "--after", "3", "--limit", "1"])?;
    assert!(ok && text.lines().count() == 2 && text.contains("shaky attempt 3 due after its backoff"), "{text}");

    // Bad requests are refused, saying what to change.
    let missing = client.history(&flowgrid_sdk::RunId("no-such-run".into()), None, None).await.expect_err("no run");
    assert_eq!(refusal(&missing).code, flowgrid_sdk::ErrorCode::NotFound, "{missing:?}");
    let too_many = client.history(&run.run_id, None, Some(5_000)).await.expect_err("over the page limit");
    assert!(refusal(&too_many).message.contains("ask for 1 to 1000 records"), "{too_many:?}");
    Ok(())
}

/// Charges fail for good; a refund (the failure handler) echoes what it was given.
const CHECKOUT_FLOW: &str = r#"
name: checkout
on_failure:
  flow: refund
  input: '#{ order: input.order, why: result.error.code, failed_run: result.run_id }'
steps:
  - id: charge
    kind: task
    pool: a
    task: fail
    input: '#{ code: "declined", retryable: false }'
"#;

const REFUND_FLOW: &str = r#"
name: refund
output: 'steps.undo.output'
steps:
  - { id: undo, kind: task, pool: a, task: echo }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_starts_its_flows_failure_handler_once_with_its_labels() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, REFUND_FLOW).await?;
    deploy(&grid, &client, CHECKOUT_FLOW).await?;
    let labelled = StartRun {
        flow: "checkout".into(),
        input: json!({"order": 7}),
        labels: [("customer".to_owned(), "acme".to_owned())].into(),
        ..Default::default()
    };
    let run = client.start(labelled).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    let handler_id = view.on_failure_run.clone().expect("the failed run names its handler's run");

    let handler = grid.wait_run(&client, &handler_id, RUN_DEADLINE).await?;
    assert_eq!(handler.status, RunStatus::Succeeded, "{handler:?}\n{}", grid.logs());
    assert_eq!(handler.flow, "refund");
    let expected = json!({"order": 7, "why": "declined", "failed_run": run.run_id.0.as_ref()});
    assert_eq!(handler.output, Some(expected), "{handler:?}");
    assert_eq!(handler.labels.get("customer").map(String::as_str), Some("acme"));
    assert_eq!(handler.labels.get("flowgrid.on_failure_of").map(|id| id.as_str()), Some(run.run_id.0.as_ref()));
    assert_eq!(handler.on_failure_run, None);

    // Exactly one handler run, found by its label; `run get` links it.
    let label = format!("flowgrid.on_failure_of={}", run.run_id);
    let (ok, text, _) = grid.cli(&["run", "list", "--label", &label])?;
    assert!(ok && text.lines().count() == 2 && text.contains(handler_id.as_str()), "{text}");
    let (ok, text, hints) = grid.cli(&["run", "get", &run.run_id.0])?;
    assert!(ok && text.contains(&format!("handler   run {handler_id} (its flow's on_failure)")), "{text}");
    assert!(hints.contains(&format!("flowgrid run history {}", run.run_id)), "{hints}");

    // Redriven and failed again: a second handler run, for that end.
    client.redrive(&run.run_id, "card updated").await.or_logs(&grid)?;
    let again = wait_for("the redriven run to fail again", RUN_DEADLINE, || async {
        let view = client.get(&run.run_id).await.ok()?;
        (view.status == RunStatus::Failed).then_some(view)
    })
    .await?;
    let second = again.on_failure_run.clone().expect("a handler for the second end");
    assert_ne!(second, handler_id);
    assert_eq!(grid.wait_run(&client, &second, RUN_DEADLINE).await?.status, RunStatus::Succeeded);

    // A handler the grid refuses (its flow is not deployed) is not started, and `run get`
    // says so rather than leaving a link to a run that does not exist.
    let orphan = CHECKOUT_FLOW.replace("name: checkout", "name: orphaned").replace("flow: refund", "flow: nowhere");
    deploy(&grid, &client, &orphan).await?;
    let start = StartRun { flow: "orphaned".into(), input: json!({"order": 8}), ..Default::default() };
    let orphaned = client.start(start).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &orphaned.run_id, RUN_DEADLINE).await?;
    let missing = view.on_failure_run.clone().expect("the handler's run id");
    let hint = format!("the failure handler run {missing} was not started");
    wait_for("run get to say the handler was not started", RUN_DEADLINE, || async {
        let (ok, _, hints) = grid.cli(&["run", "get", &orphaned.run_id.0]).ok()?;
        (ok && hints.contains(&hint)).then_some(())
    })
    .await?;
    Ok(())
}

const CATCH_FLOW: &str = r#"
name: catch-fallback
output: 'steps.refund.output'
steps:
  - id: charge
    kind: task
    pool: a
    task: fail
    input: '#{ code: "card_declined", retryable: false }'
    retry: {max_attempts: 3, initial_backoff_ms: 50}
    catch:
      - errors: [insufficient_funds]
        next: alert
      - errors: [card_declined]
        next: refund
  - id: refund
    kind: task
    pool: a
    task: echo
    input: '#{ reason: steps.charge.error.code, order: input.order }'
  - id: alert
    kind: transform
    output: '"alerted"'
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_failure_routes_to_the_fallback_which_reads_the_error() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, CATCH_FLOW).await?;

    let run = client.start(start("catch-fallback", json!({"order": 42}))).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;

    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    assert_eq!(view.output, Some(json!({"reason": "card_declined", "order": 42})), "{view:?}");
    let charge = step(&view, "charge");
    assert_eq!(charge.status, StepStatus::Failed, "{charge:?}");
    assert!(charge.caught, "the failed step must show the catch took over: {charge:?}");
    assert_eq!(charge.error.as_ref().map(|error| error.code.as_str()), Some("card_declined"), "{charge:?}");
    assert_eq!(charge.attempts, 1, "a non-retryable error is never retried: {charge:?}");
    assert_eq!(step(&view, "refund").status, StepStatus::Succeeded);
    assert_eq!(step(&view, "alert").status, StepStatus::Skipped, "the other catch did not fire");
    assert!(view.error.is_none(), "a succeeded run has no error: {view:?}");
    Ok(())
}

const TIMEOUT_FLOW: &str = r#"
name: slow-timeout
steps:
  - id: slow
    kind: task
    pool: a
    task: sleep
    input: '#{ ms: 3000 }'
    timeout_ms: 300
    retry: {max_attempts: 2, initial_backoff_ms: 50, jitter: 0.0}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_timeout_is_retried_then_fails_the_run_with_code_timeout() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, TIMEOUT_FLOW).await?;

    let run = client.start(start("slow-timeout", json!({}))).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;

    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    assert_eq!(view.error.as_ref().map(|error| error.code.as_str()), Some("timeout"), "{view:?}");
    let slow = step(&view, "slow");
    assert_eq!(slow.attempts, 2, "the timed-out attempt is retried once: {slow:?}");
    assert_eq!(slow.status, StepStatus::Failed, "{slow:?}");
    assert_eq!(slow.error.as_ref().map(|error| error.code.as_str()), Some("timeout"), "{slow:?}");
    let took = Duration::from_millis(view.ended_ms.expect("ended").saturating_sub(view.created_ms));
    assert!(took >= Duration::from_millis(600), "two attempts of 300 ms each timed out, yet the run took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_total_timeout_ends_the_step_however_many_retries_its_policy_allows() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    let budgeted = TIMEOUT_FLOW
        .replace("name: slow-timeout", "name: budgeted")
        .replace("max_attempts: 2", "max_attempts: 20")
        .replace("timeout_ms: 300", "timeout_ms: 300\n    total_timeout_ms: 1000");
    deploy(&grid, &client, &budgeted).await?;

    let run = client.start(start("budgeted", json!({}))).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}\n{}", grid.logs());
    let slow = step(&view, "slow");
    let error = slow.error.clone().expect("the step's error");
    assert_eq!(error.code, "timeout", "{slow:?}");
    assert!(error.message.contains("total_timeout_ms of 1000 ms"), "{error:?}");
    assert!((3..=4).contains(&slow.attempts), "attempts of 300 ms and 50 ms backoffs within 1 s: {slow:?}");
    let took = view.ended_ms.expect("ended").saturating_sub(view.created_ms);
    assert!((900..5_000).contains(&took), "the step ended at its budget, not after 20 attempts: {took} ms");
    Ok(())
}

/// Six steps of 150 ms, each reported; the first attempt fails after the third.
const RESUMABLE_FLOW: &str = r#"
name: resumable
output: 'steps.count.output'
steps:
  - id: count
    kind: task
    pool: a
    task: resume
    input: '#{ to: 6, step_ms: 150, fail_at: 3 }'
    retry: { max_attempts: 2, initial_backoff_ms: 300, jitter: 0 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_resumes_from_the_progress_its_failed_attempt_reported() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, RESUMABLE_FLOW).await?;
    let run = client.start(StartRun { flow: "resumable".into(), ..Default::default() }).await.or_logs(&grid)?;

    // While the first attempt goes, its reports show with the step.
    let seen = flowgrid_tests::wait_for("a progress report", RUN_DEADLINE, || async {
        let view = client.get(&run.run_id).await.ok()?;
        step(&view, "count").progress.clone()
    })
    .await
    .or_logs(&grid)?;
    assert!(seen["done"].as_u64().is_some_and(|done| (1..=6).contains(&done)), "{seen}");

    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    // The second attempt started where the first one's last report said it got to.
    assert_eq!(view.output, Some(json!({"from": 3, "done": 6})), "{view:?}");
    assert_eq!(step(&view, "count").attempts, 2);
    assert_eq!(step(&view, "count").progress, None, "a step that ended shows its output, not its progress");
    Ok(())
}

/// A run that failed in the engine (an expression of a transform) had no attempt:
/// `run get` says why it failed and does not send the reader to the history for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_failed_by_an_expression_is_explained_by_run_get_alone() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, "name: sums\nsteps:\n  - { id: total, kind: transform, output: 'input.items.len()' }\n")
        .await?;
    let run = client.start(StartRun { flow: "sums".into(), input: json!({}), ..Default::default() }).await?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "{view:?}");
    let (ok, text, hints) = grid.cli(&["run", "get", &run.run_id.0])?;
    assert!(ok && text.contains("expression_error"), "{text}");
    assert!(!hints.contains("run history"), "{hints}");
    Ok(())
}
