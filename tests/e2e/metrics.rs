//! The coordinator's Prometheus endpoint, scraped after real work as an operator would.

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{free_port, metric_value, scrape_metrics, wait_for, Grid};
use serde_json::json;

use crate::{deploy, OrLogs, ECHO_FLOW, RUN_DEADLINE};

const RUNS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_runs_tasks_commits_and_publishes() -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&["a"], 8).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    for index in 0..RUNS {
        let start = StartRun {
            flow: "echo-once".into(),
            version: None,
            input: json!({ "n": index }),
            idempotency_key: None,
            ..Default::default()
        };
        let run = client.start(start).await.or_logs(&grid)?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    }

    let body = scrape_metrics(&metrics_addr).or_logs(&grid)?;
    let expect_at_least = |prefix: &str, least: f64| {
        let value = metric_value(&body, prefix).unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"));
        assert!(value >= least, "{prefix} is {value}, expected at least {least}");
    };
    let runs = RUNS as f64;
    expect_at_least("flowgrid_runs_started_total ", runs);
    expect_at_least("flowgrid_runs_finished_total{status=\"succeeded\"", runs);
    expect_at_least("flowgrid_run_duration_seconds_count{flow=\"echo-once\",status=\"succeeded\"}", runs);
    // A real histogram (buckets, not quantiles), so that coordinators' series add up.
    expect_at_least("flowgrid_run_duration_seconds_bucket{flow=\"echo-once\",status=\"succeeded\",le=\"60\"}", runs);
    expect_at_least("flowgrid_tasks_dispatched_total{pool=\"a\"", runs);
    expect_at_least("flowgrid_task_results_total{pool=\"a\",outcome=\"succeeded\"}", runs);
    expect_at_least("flowgrid_api_requests_total{verb=\"run.start\",outcome=\"ok\"}", runs);
    expect_at_least("flowgrid_task_publish_seconds_count ", runs);
    expect_at_least("flowgrid_store_commit_seconds_count ", 2.0 * runs);
    // One run after the other: each start waits for a journal group of its own.
    expect_at_least("flowgrid_store_journal_sync_seconds_count ", runs);
    expect_at_least("flowgrid_store_journal_bytes_total ", 100.0 * runs);
    assert_eq!(metric_value(&body, "flowgrid_store_checkpoint_failed_total "), Some(0.0), "{body}");
    // Counters the alerts watch are there before their first event, so that `increase`
    // sees that event.
    for counter in [
        "flowgrid_api_rejected_total ",
        "flowgrid_store_commit_failed_total ",
        "flowgrid_lease_lost_total ",
        "flowgrid_shard_takeovers_total ",
        "flowgrid_run_messages_retried_total{kind=\"run_ended\"}",
    ] {
        assert_eq!(metric_value(&body, counter), Some(0.0), "{counter}:\n{body}");
    }
    assert_eq!(metric_value(&body, "flowgrid_runs_active "), Some(0.0), "every run ended:\n{body}");
    assert_eq!(metric_value(&body, "flowgrid_tasks_in_flight{pool=\"a\"}"), Some(0.0), "every attempt closed:\n{body}");
    assert_eq!(
        metric_value(&body, "flowgrid_shards_owned "),
        Some(f64::from(grid.shards)),
        "one coordinator owns every shard"
    );
    // The shards' commits reach their files within the checkpoint interval (1 s).
    wait_for("a checkpoint", std::time::Duration::from_secs(10), || async {
        let body = scrape_metrics(&metrics_addr).ok()?;
        metric_value(&body, "flowgrid_store_checkpoint_seconds_count ").filter(|count| *count >= 1.0)
    })
    .await
    .or_logs(&grid)?;
    for quantile in ["0.5", "0.99"] {
        let prefix = format!("flowgrid_task_publish_seconds{{quantile=\"{quantile}\"}}");
        let seconds = metric_value(&body, &prefix).unwrap_or(f64::NAN);
        assert!((0.0..RUN_DEADLINE.as_secs_f64()).contains(&seconds), "{prefix} out of range: {seconds}");
    }
    Ok(())
}

/// deploy/prometheus/flowgrid-alerts.yml: each rule is complete (alert, expr, a severity, a
/// summary), and every flowgrid metric its expressions use is one a coordinator exports,
/// in the form it exports it (`_bucket` only for histograms with buckets).
#[test]
fn the_alert_rules_use_only_metrics_the_coordinator_exports() {
    let path = flowgrid_tests::repo_root().join("deploy/prometheus/flowgrid-alerts.yml");
    let text = std::fs::read_to_string(&path).expect("the alert rules file");
    let rules: serde_json::Value = serde_norway::from_str(&text).expect("the alert rules are YAML");
    let rules = rules["groups"][0]["rules"].as_array().expect("groups[0].rules");
    assert!(rules.len() >= 10, "{} rules", rules.len());
    let names = flowgrid_coordinator::metrics::NAMES;
    for rule in rules {
        let alert = rule["alert"].as_str().expect("every rule is an alert");
        let expr = rule["expr"].as_str().unwrap_or_default();
        assert!(!expr.trim().is_empty(), "{alert}: no expr");
        assert!(matches!(rule["labels"]["severity"].as_str(), Some("warning" | "critical")), "{alert}: severity");
        assert!(rule["annotations"]["summary"].as_str().is_some_and(|summary| !summary.is_empty()), "{alert}");
        let used: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|token| token.starts_with("flowgrid_"))
            .collect();
        assert!(!used.is_empty() || expr.contains("up{"), "{alert}: uses no flowgrid metric: {expr}");
        for token in used {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| token.strip_suffix(suffix).filter(|base| names.contains(base)))
                .unwrap_or(token);
            assert!(names.contains(&base), "{alert}: {token} is no metric a coordinator exports");
            if token.ends_with("_bucket") {
                assert!(flowgrid_coordinator::metrics::BUCKETED.contains(&base), "{alert}: {base} has no buckets");
            }
        }
        // A run's status is matched by name: `!=` would count the runs a limit's
        // `cancel_new` or an operator cancelled as failing.
        assert!(!expr.contains("status!="), "{alert}: match the statuses it counts by name: {expr}");
    }
}

const POOL_B_FLOW: &str = r#"
name: on-pool-b
steps:
  - id: echo
    kind: task
    pool: b
    task: echo
"#;

/// The pools' gauges follow what waits on each pool and who serves it, as an alert on a
/// pool without workers, or an autoscaler of a pool's workers, reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_gauges_count_waiting_tasks_and_live_workers() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    grid.spawn_coordinator_with_args(&["--metrics-addr", &metrics_addr, "--pool-gauges-ms", "200"])?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, POOL_B_FLOW).await?;
    let run = client.start(StartRun { flow: "on-pool-b".into(), ..Default::default() }).await.or_logs(&grid)?;
    let gauges = |pool: &str| {
        let body = scrape_metrics(&metrics_addr).ok()?;
        let names = ["tasks_waiting", "tasks_with_workers", "pulls_waiting", "workers", "worker_slots"];
        names
            .iter()
            .map(|name| metric_value(&body, &format!("flowgrid_pool_{name}{{pool=\"{pool}\"}}")))
            .collect::<Option<Vec<f64>>>()
    };
    // Pool a: one worker of 8 slots asking for tasks; pool b: a task and nobody to take it.
    let a = wait_for("pool a's worker counted", RUN_DEADLINE, || async {
        gauges("a").filter(|a| a[3] == 1.0 && a[2] >= 1.0)
    })
    .await
    .or_logs(&grid)?;
    assert_eq!((a[0], a[1], a[4]), (0.0, 0.0, 8.0), "pool a: {a:?}");
    wait_for("pool b's task counted as waiting", RUN_DEADLINE, || async {
        gauges("b").filter(|b| b[..] == [1.0, 0.0, 0.0, 0.0, 0.0])
    })
    .await
    .or_logs(&grid)?;

    // A worker for b takes the task; the one for a stops and takes its record with it.
    grid.start_workers(&["b"], 2)?;
    let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    wait_for("pool b's worker counted and its task gone", RUN_DEADLINE, || async {
        gauges("b").filter(|b| b[0] == 0.0 && b[3] == 1.0 && b[4] == 2.0)
    })
    .await
    .or_logs(&grid)?;
    assert!(grid.workers[0].stop(std::time::Duration::from_secs(10)), "the worker stops on SIGTERM");
    wait_for("pool a without workers", RUN_DEADLINE, || async {
        gauges("a").filter(|a| a[3] == 0.0 && a[4] == 0.0 && a[2] == 0.0)
    })
    .await
    .or_logs(&grid)?;
    Ok(())
}
