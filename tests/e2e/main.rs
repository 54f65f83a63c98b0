//! End-to-end tests: each test starts its own nats-server (random port, temporary store),
//! real `flowgrid` coordinator and worker processes, and drives them through the SDK or
//! raw NATS requests. A failing test prints the processes' logs.
//!
//! Build the binary first: `cargo build --bins` (make test does).

mod api;
mod async_tasks;
mod cache;
mod cancels;
mod chaos;
mod cluster;
mod concurrency;
mod crash;
mod disk_full;
mod failures;
mod flows;
mod harness;
mod http_worker;
mod live;
mod local_grid;
mod metrics;
mod partition;
mod pause;
mod pools;
mod priority;
mod publish;
mod python;
mod redrive;
mod results;
mod retention;
mod schedules;
mod secured;
mod signals;
mod store_failure;
mod subflows;
mod triggers;
mod ui;
mod worker_stop;

use std::time::Duration;

use flowgrid_sdk::{ApiError, Client, FlowDeployed};
use flowgrid_tests::Grid;

/// How long a small run may take from start to end.
const RUN_DEADLINE: Duration = Duration::from_secs(30);

/// One echo task on pool `a`: the smallest flow that runs through a worker.
const ECHO_FLOW: &str = r#"
name: echo-once
output: 'steps.echo.output'
steps:
  - id: echo
    kind: task
    pool: a
    task: echo
"#;

/// Adds the grid's logs to an error, so that a failing `?` shows what the processes did.
trait OrLogs<T> {
    fn or_logs(self, grid: &Grid) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> OrLogs<T> for Result<T, E> {
    fn or_logs(self, grid: &Grid) -> anyhow::Result<T> {
        self.map_err(|error| error.into().context(format!("grid logs:\n{}", grid.logs())))
    }
}

/// How long a coordinator may take to log what a test waits for.
const LOG_DEADLINE: Duration = Duration::from_secs(60);

/// Waits until the log of coordinator `coordinator` has every one of `needles`.
async fn wait_for_log(grid: &Grid, coordinator: usize, needles: &[&str], what: &str) -> anyhow::Result<()> {
    let log = grid.coordinators[coordinator].log.clone();
    flowgrid_tests::wait_for(what, LOG_DEADLINE, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        needles.iter().all(|needle| text.contains(needle)).then_some(())
    })
    .await
    .or_logs(grid)
}

/// Deploys a definition that must be accepted.
async fn deploy(grid: &Grid, client: &Client, definition: &str) -> anyhow::Result<FlowDeployed> {
    client.deploy(definition).await.map_err(|error| anyhow::anyhow!("deploy refused: {error:?}\n{}", grid.logs()))
}

/// The grid's refusal inside an SDK error; panics with the error otherwise.
fn refusal(error: &flowgrid_sdk::Error) -> &ApiError {
    error.api().unwrap_or_else(|| panic!("expected a refusal from the grid, got {error:?}"))
}
