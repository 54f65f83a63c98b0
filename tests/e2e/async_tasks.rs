//! Async tasks: a worker hands an attempt off with its task token, and another process
//! completes it later.

use flowgrid_sdk::{RunId, RunStatus, StartRun};
use flowgrid_tests::{step, wait_for, Grid};
use serde_json::{json, Value};

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
