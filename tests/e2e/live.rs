//! Live output: what a worker emits while its attempt runs reaches `flowgrid run tail`,
//! `Client::tail` and the web UI, in order, while the run goes and after it ended.

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{http_get, Grid};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{deploy, OrLogs, RUN_DEADLINE};

/// A second's wait, then a model's answer that comes word by word.
const ANSWER_FLOW: &str = r#"
name: answer
steps:
  - { id: think, kind: wait, duration_ms: 1000 }
  - { id: answer, kind: task, pool: gpu, task: generate, after: [think], input: '#{ prompt: input.prompt }' }
"#;

const REPLY: &str = "Generated reply to: what is a grid";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_live_output_reaches_whoever_tails_the_run() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["gpu"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ANSWER_FLOW).await?;
    let start = StartRun { flow: "answer".into(), input: json!({"prompt": "what is a grid"}), ..Default::default() };
    let run = client.start(start).await.or_logs(&grid)?;
    let run_id = run.run_id.to_string();

    // Tailed while the run waits: the words come as the worker emits them, then the command ends with the run.
    let (ok, text, errors) = grid.cli(&["run", "tail", &run_id])?;
    assert!(ok, "{text}{errors}\n{}", grid.logs());
    assert_eq!(text, format!("{REPLY}\n"));
    assert!(
        errors.contains("── answer, attempt 1 ──") && errors.contains(&format!("run {run_id} succeeded")),
        "{errors}"
    );

    // After the end the grid still has it all, in order, numbered.
    let (ok, text, errors) = grid.cli(&["--json", "run", "tail", &run_id, "--step", "answer"])?;
    assert!(ok, "{errors}");
    let pieces: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let words: Vec<&str> = REPLY.split_inclusive(' ').collect();
    assert_eq!(pieces.len(), words.len(), "{text}");
    for (index, (piece, word)) in pieces.iter().zip(&words).enumerate() {
        assert_eq!(piece, &json!({"step": "answer", "item": null, "attempt": 1, "seq": index + 1, "data": word}));
    }

    let mut tail = client.tail(&run.run_id, None).await?;
    let mut seen = String::new();
    for expected_seq in 1..=words.len() as u64 {
        let piece = tokio::time::timeout(RUN_DEADLINE, tail.next()).await?.expect("a piece")?;
        assert_eq!((piece.attempt.step.as_str(), piece.seq), ("answer", expected_seq));
        seen.push_str(piece.data.as_str().unwrap_or_default());
    }
    assert_eq!(seen, REPLY);
    assert_eq!(client.get(&run.run_id).await?.status, RunStatus::Succeeded);

    // The run's page in the web UI shows it too, by attempt.
    let addr = crate::ui::start_ui(&mut grid, &[]).await?;
    let (status, page) = http_get(&addr, &format!("/runs/{run_id}"))?;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h2>Live output</h2>") && page.contains(&format!("<pre>{REPLY}</pre>")), "{page}");

    // A step the run does not have is named with the ones it has.
    let (ok, _, errors) = grid.cli(&["run", "tail", &run_id, "--step", "nope"])?;
    assert!(!ok && errors.contains("has no step \"nope\"; its steps: think, answer"), "{errors}");
    Ok(())
}
