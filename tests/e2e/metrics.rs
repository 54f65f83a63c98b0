//! The coordinator's Prometheus endpoint, scraped after real work as an operator would.

use std::time::Duration;

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{free_port, Grid};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{deploy, OrLogs, RUN_DEADLINE};

const ECHO_FLOW: &str = r#"
name: metrics-echo
output: 'steps.echo.output'
steps:
  - id: echo
    kind: task
    pool: a
    task: echo
"#;

const RUNS: u64 = 20;

/// `GET /metrics` over plain HTTP/1.0; the body.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "scrape of {addr} answered {head}");
    Ok(body.to_owned())
}

/// The value of the sample whose name and labels start with `prefix` (`name{label="v"` or
/// `name ` for a sample without labels).
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines().filter(|line| line.starts_with(prefix)).find_map(value)
}

/// The value of one sample line: its last field.
fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_runs_tasks_commits_and_publishes() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    grid.spawn_coordinator_with_metrics(&metrics_addr)?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    for index in 0..RUNS {
        let start = StartRun {
            flow: "metrics-echo".into(),
            version: None,
            input: json!({ "n": index }),
            idempotency_key: None,
        };
        let run = client.start(start).await.or_logs(&grid)?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    }

    let body = scrape(&metrics_addr).await.or_logs(&grid)?;
    let expect_at_least = |prefix: &str, least: f64| {
        let value = sample(&body, prefix).unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"));
        assert!(value >= least, "{prefix} is {value}, expected at least {least}");
    };
    let runs = RUNS as f64;
    expect_at_least("flowgrid_runs_started_total ", runs);
    expect_at_least("flowgrid_runs_finished_total{status=\"succeeded\"", runs);
    expect_at_least("flowgrid_tasks_dispatched_total{pool=\"a\"", runs);
    expect_at_least("flowgrid_task_results_total{", runs);
    expect_at_least("flowgrid_task_publish_seconds_count ", runs);
    expect_at_least("flowgrid_store_commit_seconds_count ", 2.0 * runs);
    assert_eq!(sample(&body, "flowgrid_runs_active "), Some(0.0), "every run ended:\n{body}");
    assert_eq!(
        sample(&body, "flowgrid_shards_owned "),
        Some(f64::from(grid.shards)),
        "one coordinator owns every shard"
    );
    for line in body.lines().filter(|line| line.starts_with("flowgrid_task_publish_seconds{quantile=")) {
        let seconds = value(line).unwrap_or(f64::NAN);
        assert!((0.0..RUN_DEADLINE.as_secs_f64()).contains(&seconds), "publish latency out of range: {line}");
    }
    Ok(())
}
