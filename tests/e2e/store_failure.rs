//! A coordinator whose store can take no more commits (its journal failed a write or a
//! sync) hands its shards to the other coordinators and stops with an error that says
//! what to do (ADR 0008).
//!
//! A failing disk cannot be made on demand here, so this coordinator runs in the test's
//! process on the real embedded store, wrapped to report itself broken when the test says
//! so. Everything else is real: nats-server, a second coordinator process on the same
//! data directory, and worker processes. What a real journal failure does to `broken()`
//! is tested in the store's own crate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use flowgrid_coordinator::{embedded_store_id, run_with_store, CoordinatorConfig};
use flowgrid_model::ShardId;
use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_store::{Store, StoreLimits};
use flowgrid_store_redb::{RedbShard, RedbStore};
use flowgrid_tests::Grid;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{deploy, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// How long shards may take to settle after a change (debug builds, 2 cores).
const SETTLE: Duration = Duration::from_secs(30);

/// The embedded store, with a switch that makes it report itself broken.
struct BreakableStore {
    inner: RedbStore,
    broken: Arc<Mutex<Option<String>>>,
}

impl Store for BreakableStore {
    type Shard = RedbShard;

    async fn open_shard(&self, shard: ShardId) -> flowgrid_store::Result<RedbShard> {
        self.inner.open_shard(shard).await
    }

    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap().clone()
    }
}

/// The coordinator's flags, parsed as `flowgrid coordinator` parses them.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    config: CoordinatorConfig,
}

async fn run_echo(grid: &Grid, client: &flowgrid_sdk::Client, index: usize) -> anyhow::Result<()> {
    let start =
        StartRun { flow: "echo-once".into(), version: None, input: json!({ "n": index }), idempotency_key: None };
    let run = client.start(start).await.or_logs(grid)?;
    let view = grid.wait_run(client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "run {index}: {view:?}\n{}", grid.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_store_breaks_hands_its_shards_over_and_stops_with_an_error() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let data_dir = grid.data_dir();
    let data_dir_text = data_dir.display().to_string();
    let shards = grid.shards.to_string();
    let flags = Flags::try_parse_from([
        "coordinator",
        "--nats-url",
        &grid.nats_url,
        "--prefix",
        &grid.prefix,
        "--data-dir",
        &data_dir_text,
        "--shards",
        &shards,
        "--metrics-addr",
        "off",
    ])?;
    let broken = Arc::new(Mutex::new(None));
    let store = BreakableStore { inner: RedbStore::open(&data_dir, StoreLimits::default())?, broken: broken.clone() };
    let coordinator =
        tokio::spawn(run_with_store(flags.config, store, embedded_store_id(&data_dir), CancellationToken::new()));
    grid.wait_shards_served_by(1, SETTLE).await?;
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, SETTLE).await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    for index in 0..4 {
        run_echo(&grid, &client, index).await?;
    }

    *broken.lock().unwrap() = Some("journal write failed: No space left on device (os error 28)".to_owned());
    let stopped = tokio::time::timeout(SETTLE, coordinator).await.or_logs(&grid)??;
    let error = stopped.expect_err("a coordinator whose store broke stops with an error");
    let message = error.to_string();
    assert!(message.contains("No space left on device"), "the failure is named: {message}");
    assert!(message.contains("released its shards") && message.contains("start it again"), "{message}");

    // The other coordinator took every shard, and serves runs as before.
    grid.wait_shards_served_by(1, SETTLE).await?;
    for index in 4..8 {
        run_echo(&grid, &client, index).await?;
    }
    Ok(())
}
