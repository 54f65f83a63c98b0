//! `flowgrid ui`: the web view shows the grid, a flow's graph and a run step by step, and
//! answers a wrong address with a page that says so.

use std::process::Command;

use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{free_port, http_get, wait_for, Grid};
use serde_json::json;

use crate::{deploy, OrLogs, RUN_DEADLINE};

const UI_FLOW: &str = r#"
name: ui-flow
description: Shown in the UI.
steps:
  - { id: first, kind: task, pool: a, task: echo }
  - id: route
    kind: choice
    after: [first]
    choices: [{ when: 'input.fast == true', next: quick }]
    default: slow
  - { id: quick, kind: transform, output: '"quick <b>path</b>"' }
  - { id: slow, kind: wait, duration_ms: 10 }
  - { id: approve, kind: signal, after: [first] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_shows_the_grid_a_flow_and_a_run_step_by_step() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, UI_FLOW).await?;
    let start = StartRun { flow: "ui-flow".into(), version: None, input: json!({"fast": true}), idempotency_key: None };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;

    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut ui = Command::new(flowgrid_tests::flowgrid_bin());
    ui.args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "ui", "--listen", &addr]);
    grid.spawn_worker("ui", &mut ui)?;
    wait_for("the UI to answer", RUN_DEADLINE, || async { http_get(&addr, "/").ok() }).await?;

    let (status, overview) = http_get(&addr, "/")?;
    assert_eq!(status, 200, "{overview}");
    assert!(overview.contains("members: 1") && overview.contains("shards: "), "the grid's status: {overview}");
    assert!(overview.contains(r#"href="/flows/ui-flow""#), "the flow is listed: {overview}");
    assert!(overview.contains(&format!(r#"href="/runs/{run_id}""#)), "the run is listed: {overview}");

    let (status, flow) = http_get(&addr, "/flows/ui-flow")?;
    assert_eq!(status, 200, "{flow}");
    assert!(flow.contains("<svg") && flow.contains("Shown in the UI."), "{flow}");
    for step in ["first", "route", "quick", "slow", "approve"] {
        assert!(flow.contains(&format!("<title>{step} (")), "step {step} is drawn: {flow}");
    }

    // While the run waits for its signal, its page reloads itself and says how to send it.
    let (_, running) = http_get(&addr, &format!("/runs/{run_id}"))?;
    assert!(running.contains(r#"http-equiv="refresh""#), "a running run's page reloads: {running}");
    assert!(running.contains(&format!("flowgrid run signal {run_id} approve")), "{running}");
    assert!(running.contains("quick &lt;b&gt;path&lt;/b&gt;"), "outputs are escaped: {running}");

    client.signal(&run_id, "approve", json!("ok")).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    let (_, ended) = http_get(&addr, &format!("/runs/{run_id}"))?;
    assert!(!ended.contains(r#"http-equiv="refresh""#), "an ended run's page stays: {ended}");
    assert!(ended.contains(r#"class="node succeeded""#) && ended.contains(r#"class="node skipped""#), "{ended}");

    let (status, runs) = http_get(&addr, "/runs?status=succeeded&flow=ui-flow")?;
    assert_eq!(status, 200, "{runs}");
    assert!(runs.contains(run_id.as_str()), "{runs}");
    let (status, page) = http_get(&addr, "/runs?status=bogus")?;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("is not a run status"), "{page}");
    let (status, page) = http_get(&addr, "/runs/no-such-run")?;
    assert_eq!(status, 404, "{page}");
    let (status, _) = http_get(&addr, "/flows/no-such-flow")?;
    assert_eq!(status, 404);
    Ok(())
}
