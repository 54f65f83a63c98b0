//! Store failures a coordinator recovers from:
//! - a store that can take no more commits (its journal failed a write or a sync): the
//!   coordinator hands its shards to the others and stops with an error that says what to
//!   do (ADR 0008);
//! - a shard whose commit and then reload failed, so that its actor stopped: the
//!   coordinator lets the shard's claim go and opens the shard again.
//!
//! A failing disk (other than a full one: see `disk_full.rs`) cannot be made on demand
//! here, so the coordinator under test runs in the test's process on the real embedded
//! store, wrapped so that the test can make it report itself broken, or make its shards'
//! commits and scans fail. Everything else is real:
//! nats-server, worker processes and, where a test needs one, a second coordinator process
//! on the same data directory. What a real journal failure does to `broken()` is tested in
//! the store's own crate.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use flowgrid_coordinator::{embedded_store_id, run_with_store, CoordinatorConfig};
use flowgrid_model::{shard_of, Epoch, RunId, ShardId};
use flowgrid_sdk::{ErrorCode, RunStatus, StartRun};
use flowgrid_store::{Key, KeyRange, ShardStore, Store, StoreLimits, Value, WriteBatch};
use flowgrid_store_redb::{RedbShard, RedbStore};
use flowgrid_tests::{free_port, metric_value, scrape_metrics, wait_for, Grid};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{deploy, refusal, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// How long shards may take to settle after a change (debug builds, 2 cores).
const SETTLE: Duration = Duration::from_secs(30);

/// The embedded store, with switches: one makes it report itself broken, one makes every
/// shard's commits and scans fail, and one makes one shard's next commit hang and then fail.
#[derive(Clone)]
pub(crate) struct BreakableStore {
    inner: RedbStore,
    broken: Arc<Mutex<Option<String>>>,
    failing: Arc<AtomicBool>,
    /// Shards a commit failed for while `failing`.
    failed_commits: Arc<Mutex<HashSet<ShardId>>>,
    /// Shards a scan failed for while `failing`: a reload scans first, so their actors stop.
    failed_scans: Arc<Mutex<HashSet<ShardId>>>,
    /// The shard whose next commit hangs for the time given and then fails.
    stall: Arc<Mutex<Option<(ShardId, Duration)>>>,
    /// Set once that commit failed.
    stalled: Arc<AtomicBool>,
}

impl BreakableStore {
    pub(crate) fn open(grid: &Grid) -> anyhow::Result<BreakableStore> {
        let inner = RedbStore::open(grid.data_dir(), StoreLimits::default())?;
        Ok(BreakableStore {
            inner,
            broken: Arc::default(),
            failing: Arc::default(),
            failed_commits: Arc::default(),
            failed_scans: Arc::default(),
            stall: Arc::default(),
            stalled: Arc::default(),
        })
    }

    /// Makes the next commit of `shard` hang for `hang` and then fail (a disk that stalls,
    /// then errs), so that its turn ends late and the shard reloads.
    pub(crate) fn stall_next_commit(&self, shard: ShardId, hang: Duration) {
        *self.stall.lock().unwrap() = Some((shard, hang));
    }

    /// Whether the commit [`BreakableStore::stall_next_commit`] asked for has failed.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

impl Store for BreakableStore {
    type Shard = BreakableShard;

    async fn open_shard(&self, shard: ShardId) -> flowgrid_store::Result<BreakableShard> {
        let inner = self.inner.open_shard(shard).await?;
        Ok(BreakableShard { inner, shard, store: self.clone() })
    }

    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap().clone()
    }
}

pub(crate) struct BreakableShard {
    inner: RedbShard,
    shard: ShardId,
    store: BreakableStore,
}

impl BreakableShard {
    /// Fails while the store is `failing`, noting the shard in `failed`.
    fn check(&self, failed: &Mutex<HashSet<ShardId>>) -> flowgrid_store::Result<()> {
        if self.store.failing.load(Ordering::Relaxed) {
            failed.lock().unwrap().insert(self.shard);
            return Err(flowgrid_store::Error::Backend("an I/O error the test injected".into()));
        }
        Ok(())
    }
}

impl ShardStore for BreakableShard {
    async fn acquire(&self) -> flowgrid_store::Result<Epoch> {
        self.inner.acquire().await
    }

    async fn current_epoch(&self) -> flowgrid_store::Result<Epoch> {
        self.inner.current_epoch().await
    }

    async fn get(&self, key: &[u8]) -> flowgrid_store::Result<Option<Value>> {
        self.inner.get(key).await
    }

    async fn scan(&self, range: KeyRange, limit: usize, reverse: bool) -> flowgrid_store::Result<Vec<(Key, Value)>> {
        self.check(&self.store.failed_scans)?;
        self.inner.scan(range, limit, reverse).await
    }

    async fn commit(&self, epoch: Epoch, batch: WriteBatch) -> flowgrid_store::Result<()> {
        self.check(&self.store.failed_commits)?;
        let hang = self.store.stall.lock().unwrap().take_if(|(shard, _)| *shard == self.shard).map(|(_, hang)| hang);
        if let Some(hang) = hang {
            tokio::time::sleep(hang).await;
            self.store.stalled.store(true, Ordering::Relaxed);
            return Err(flowgrid_store::Error::Backend("an I/O error the test injected after a stall".into()));
        }
        self.inner.commit(epoch, batch).await
    }
}

/// A coordinator running in this process.
pub(crate) type Coordinator = tokio::task::JoinHandle<flowgrid_coordinator::Result<()>>;

/// The coordinator's flags, parsed as `flowgrid coordinator` parses them.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    config: CoordinatorConfig,
}

/// A coordinator in this process on `store`, with the flags `flowgrid coordinator` would get.
pub(crate) fn spawn_coordinator<S: Store>(grid: &Grid, store: S) -> anyhow::Result<Coordinator> {
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
    let store_id = embedded_store_id(&data_dir);
    Ok(tokio::spawn(run_with_store(flags.config, store, store_id, CancellationToken::new())))
}

/// For each shard, an idempotency key whose run of `echo-once` lands on that shard (a run
/// started without a key gets a fresh id, so a retried start may land anywhere).
fn a_key_per_shard(shards: u32) -> Vec<String> {
    let mut keys = vec![None; shards as usize];
    let mut candidate = 0u64;
    while keys.iter().any(Option::is_none) {
        let key = format!("key-{candidate}");
        let shard = shard_of(RunId::from_idempotency_key("echo-once", &key).as_str(), shards);
        keys[shard.0 as usize].get_or_insert(key);
        candidate += 1;
    }
    keys.into_iter().flatten().collect()
}

fn echo_start(idempotency_key: Option<&str>) -> StartRun {
    StartRun {
        flow: "echo-once".into(),
        version: None,
        input: json!({}),
        idempotency_key: idempotency_key.map(str::to_owned),
        ..Default::default()
    }
}

/// Starts `start` and waits until the run has succeeded.
async fn run_echo(grid: &Grid, client: &flowgrid_sdk::Client, start: StartRun) -> anyhow::Result<()> {
    let key = start.idempotency_key.clone();
    let run = client.start(start).await.or_logs(grid)?;
    let view = grid.wait_run(client, &run.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "key {key:?}: {view:?}\n{}", grid.logs());
    Ok(())
}

/// nats-server, a coordinator in this process on a breakable store serving every shard,
/// workers for pool `a`, and `echo-once` deployed and run once.
async fn grid_with_breakable_coordinator() -> anyhow::Result<(Grid, BreakableStore, Coordinator, flowgrid_sdk::Client)>
{
    let mut grid = Grid::start_nats()?;
    let store = BreakableStore::open(&grid)?;
    let coordinator = spawn_coordinator(&grid, store.clone())?;
    grid.wait_shards_served_by(1, SETTLE).await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    run_echo(&grid, &client, echo_start(None)).await?;
    Ok((grid, store, coordinator, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_store_breaks_hands_its_shards_over_and_stops_with_an_error() -> anyhow::Result<()> {
    let (mut grid, store, coordinator, client) = grid_with_breakable_coordinator().await?;
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, SETTLE).await?;
    for _ in 0..4 {
        run_echo(&grid, &client, echo_start(None)).await?;
    }

    *store.broken.lock().unwrap() = Some("journal write failed: No space left on device (os error 28)".to_owned());
    let stopped = tokio::time::timeout(SETTLE, coordinator).await.or_logs(&grid)??;
    let error = stopped.expect_err("a coordinator whose store broke stops with an error");
    let message = error.to_string();
    assert!(message.contains("No space left on device"), "the failure is named: {message}");
    assert!(message.contains("released its shards") && message.contains("start it again"), "{message}");

    // The other coordinator took every shard, and serves runs as before.
    grid.wait_shards_served_by(1, SETTLE).await?;
    for _ in 0..4 {
        run_echo(&grid, &client, echo_start(None)).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_stopped_after_a_failed_commit_and_reload_is_opened_again() -> anyhow::Result<()> {
    let (grid, store, _coordinator, client) = grid_with_breakable_coordinator().await?;

    // A start on every shard at once while commits and scans fail: each shard fails its
    // commit, then the reload that follows it (200 ms later), and its actor stops. (One
    // after the other, the starts after the stop of the shard holding the flow's catalog
    // would be refused earlier, when they ask it for the flow's plan.)
    let keys = a_key_per_shard(grid.shards);
    let impatient = client.clone().with_retry_budget(Duration::ZERO);
    store.failing.store(true, Ordering::Relaxed);
    let starts = keys.iter().map(|key| impatient.start(echo_start(Some(key))));
    for refused in futures::future::join_all(starts).await {
        let refused = refused.expect_err("no start commits while the store fails");
        assert!(refused.api().is_some_and(|error| error.retryable), "a refusal is retryable: {refused:?}");
    }
    wait_for("every shard that failed a commit to fail its reload", SETTLE, || async {
        let failed_commits = store.failed_commits.lock().unwrap().clone();
        let stopped = store.failed_scans.lock().unwrap().is_superset(&failed_commits);
        (!failed_commits.is_empty() && stopped).then_some(())
    })
    .await?;
    store.failing.store(false, Ordering::Relaxed);

    // Every shard is opened again and serves: the same start on each succeeds (the client
    // retries a shard not served yet for up to 15 s).
    for key in &keys {
        run_echo(&grid, &client, echo_start(Some(key))).await?;
    }
    Ok(())
}

/// A run whose history no longer decodes (here its start record, overwritten while its
/// coordinator was stopped) is held back when its shard loads: the shard serves its other
/// runs, and every request about that run is refused with why, so that it is neither
/// started again under its key nor changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_be_loaded_is_held_back_while_its_shard_serves() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    // Two runs of one shard; no worker yet, so the first one waits for its task.
    let shard_of_key = |key: &str| shard_of(RunId::from_idempotency_key("echo-once", key).as_str(), grid.shards);
    let held_key = "held-0";
    let other_key = (1..).map(|n| format!("held-{n}")).find(|key| shard_of_key(key) == shard_of_key(held_key));
    let other_key = other_key.expect("a key in every shard");
    let held = client.start(echo_start(Some(held_key))).await.or_logs(&grid)?.run_id;
    assert!(grid.coordinators[0].stop(SETTLE), "the coordinator stops within {SETTLE:?}");

    let store = RedbStore::open(grid.data_dir(), StoreLimits::default())?;
    let file = store.open_shard(shard_of_key(held_key)).await?;
    let epoch = file.acquire().await?;
    let start_record = flowgrid_store::keys::history(&held, 0);
    let mut batch = WriteBatch::new();
    batch.clear_range(flowgrid_store::keys::chunks_range(&start_record));
    // 0xc1 is no MessagePack value.
    batch.insert_chunked(&start_record, &[0xc1], &StoreLimits::default());
    file.commit(epoch, batch).await?;
    file.close()?;
    drop(store);

    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    grid.spawn_coordinator_with_metrics(&metrics_addr)?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 4)?;
    run_echo(&grid, &client, echo_start(Some(&other_key))).await?;

    let impatient = client.clone().with_retry_budget(Duration::ZERO);
    let got = impatient.get(&held).await.expect_err("the held-back run is not answered as if it were known");
    let restarted = impatient.start(echo_start(Some(held_key))).await.expect_err("its key starts no new run");
    for refused in [&got, &restarted] {
        let refusal = refusal(refused);
        assert_eq!(refusal.code, ErrorCode::Unavailable, "{refusal:?}");
        assert!(refusal.message.contains("could not be loaded"), "says why: {refusal:?}");
    }
    let body = scrape_metrics(&metrics_addr)?;
    assert_eq!(metric_value(&body, "flowgrid_runs_held_back"), Some(1.0), "{body}");
    Ok(())
}
