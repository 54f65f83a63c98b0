//! The task cache: a worker's result reused by later runs with the same key, until its
//! time is up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowgrid_model::{shard_of, Epoch, RunId, ShardId};
use flowgrid_sdk::{RunStatus, RunView, StartRun};
use flowgrid_store::{Key, KeyRange, ShardStore, Store, StoreLimits, WriteBatch};
use flowgrid_store_redb::{RedbShard, RedbStore};
use flowgrid_tests::{metric_value, scrape_metrics, step, wait_for, Grid};
use serde_json::{json, Value};

use crate::store_failure::spawn_coordinator;
use crate::{deploy, OrLogs, RUN_DEADLINE};

/// How long a stored `fetch` result is reused.
const TTL_MS: u64 = 2_000;

const CACHED_FLOW: &str = r#"
name: cached
output: '#{ fetched: steps.fetch.output, parts: steps.each.output }'
steps:
  - id: fetch
    kind: task
    pool: a
    task: echo
    input: '#{ url: input.url, request: input.request }'
    cache: { key: 'input.url', ttl_ms: 2000 }
  - id: each
    kind: map
    after: [fetch]
    items: 'input.parts'
    pool: a
    task: echo
    cache: { ttl_ms: 600000 }
"#;

async fn run(grid: &Grid, client: &flowgrid_sdk::Client, input: Value) -> anyhow::Result<RunView> {
    let start = StartRun { flow: "cached".into(), input, ..Default::default() };
    let started = client.start(start).await.or_logs(grid)?;
    let view = grid.wait_run(client, &started.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    Ok(view)
}

/// Waits until the coordinator has counted `count` task cache lookups or stores of
/// `outcome` (`stored`, `miss`, ...) in all.
async fn counted(metrics_addr: &str, outcome: &str, count: f64) -> anyhow::Result<()> {
    let series = format!("flowgrid_task_cache_total{{pool=\"a\",outcome=\"{outcome}\"}}");
    wait_for(&format!("task cache outcome {outcome} counted {count} times"), Duration::from_secs(10), || async {
        let body = scrape_metrics(metrics_addr).ok()?;
        metric_value(&body, &series).filter(|counted| *counted >= count)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_result_serves_later_runs_with_the_same_key_until_its_ttl() -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&["a"], 8).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, CACHED_FLOW).await?;

    let first = run(&grid, &client, json!({"url": "u1", "request": 1, "parts": [1, 2]})).await?;
    let first_stored = Instant::now();
    assert_eq!((step(&first, "fetch").cached, step(&first, "each").cached), (0, 0), "{first:?}");
    counted(&metrics_addr, "stored", 3.0).await.or_logs(&grid)?;

    // The same url: `fetch` takes the first run's result (request 1, not 2) without a
    // worker; of the items, 2 was stored by the first run and 3 goes to a worker.
    let second = run(&grid, &client, json!({"url": "u1", "request": 2, "parts": [2, 3]})).await?;
    assert!(first_stored.elapsed() < Duration::from_millis(TTL_MS), "the test host was too slow to check the hit");
    assert_eq!(second.output, Some(json!({"fetched": {"url": "u1", "request": 1}, "parts": [2, 3]})), "{second:?}");
    let (fetch, each) = (step(&second, "fetch"), step(&second, "each"));
    assert_eq!((fetch.cached, fetch.attempts, each.cached, each.attempts), (1, 1, 1, 2), "{second:?}");
    let (ok, text, _) = grid.cli(&["run", "get", &second.run_id.0])?;
    assert!(ok && text.contains("step fetch: result from the task cache\n"), "{text}");
    assert!(text.contains("step each: 1 results from the task cache\n"), "{text}");

    // Another url is another key.
    let other = run(&grid, &client, json!({"url": "u2", "request": 3, "parts": []})).await?;
    assert_eq!(step(&other, "fetch").cached, 0);
    assert_eq!(other.output.as_ref().map(|output| &output["fetched"]["request"]), Some(&json!(3)));

    // Past its ttl the stored result is not used: a worker answers, and its result is
    // stored for the next runs.
    // (A margin: the result was stored a moment after the first run ended.)
    let expired = Duration::from_millis(TTL_MS + 300);
    tokio::time::sleep(expired.saturating_sub(first_stored.elapsed())).await;
    let late = run(&grid, &client, json!({"url": "u1", "request": 4, "parts": [1]})).await?;
    assert_eq!(step(&late, "fetch").cached, 0, "{late:?}");
    assert_eq!(step(&late, "each").cached, 1, "item 1 is within its own ttl: {late:?}");
    assert_eq!(late.output.as_ref().map(|output| &output["fetched"]["request"]), Some(&json!(4)));
    counted(&metrics_addr, "stored", 6.0).await.or_logs(&grid)?;
    let again = run(&grid, &client, json!({"url": "u1", "request": 5, "parts": []})).await?;
    assert_eq!(again.output.as_ref().map(|output| &output["fetched"]["request"]), Some(&json!(4)), "{again:?}");

    let body = scrape_metrics(&metrics_addr).or_logs(&grid)?;
    let hits = metric_value(&body, "flowgrid_task_cache_total{pool=\"a\",outcome=\"hit\"}");
    assert_eq!(hits, Some(4.0), "fetch twice, items 2 and 1:\n{body}");
    let misses = metric_value(&body, "flowgrid_task_cache_total{pool=\"a\",outcome=\"miss\"}");
    assert_eq!(misses, Some(6.0), "fetch three times, items 1, 2 and 3:\n{body}");
    Ok(())
}

/// A slow cached task: the worker sleeps `input.ms`, then answers with the input (so the
/// answer names the run whose worker call it was).
const SLOW_CACHED_FLOW: &str = r#"
name: slow-cached
output: 'steps.fetch.output'
steps:
  - id: fetch
    kind: task
    pool: a
    task: sleep
    input: 'input'
    timeout_ms: 60000
    cache: { key: 'input.key', ttl_ms: 600000 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_of_one_key_at_once_wait_for_one_worker_call_and_go_to_workers_if_it_ends_without_a_result(
) -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&["a"], 8).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SLOW_CACHED_FLOW).await?;
    let start = |request: u32, key: &str, ms: u32| StartRun {
        flow: "slow-cached".into(),
        input: json!({"key": key, "request": request, "ms": ms}),
        ..Default::default()
    };

    // Three runs at once with one key: one worker call (the first's), the others take its
    // answer. Each starts once the one before it has looked the key up (and missed).
    let mut runs = Vec::new();
    for request in 1..=3 {
        runs.push(client.start(start(request, "k1", 800)).await.or_logs(&grid)?.run_id);
        counted(&metrics_addr, "miss", f64::from(request)).await.or_logs(&grid)?;
    }
    let mut answered_by = Vec::new();
    let mut from_cache = 0;
    for run_id in &runs {
        let view = grid.wait_run(&client, run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        answered_by.push(view.output.as_ref().map(|output| output["request"].clone()));
        from_cache += step(&view, "fetch").cached;
    }
    assert_eq!(answered_by, vec![Some(json!(1)); 3], "every run has the first run's answer");
    assert_eq!(from_cache, 2, "the two later runs took it without a worker");
    let body = scrape_metrics(&metrics_addr)?;
    assert_eq!(metric_value(&body, "flowgrid_task_cache_total{pool=\"a\",outcome=\"joined\"}"), Some(2.0), "{body}");

    // A leader cancelled: its follower's task goes to a worker at once, not at the
    // leader's deadline (60 s).
    let leader = client.start(start(4, "k2", 3_000)).await.or_logs(&grid)?.run_id;
    counted(&metrics_addr, "miss", 4.0).await.or_logs(&grid)?;
    let follower = client.start(start(5, "k2", 100)).await.or_logs(&grid)?.run_id;
    counted(&metrics_addr, "miss", 5.0).await.or_logs(&grid)?;
    // Its own task would take 100 ms: still running well after, it waits for the leader.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = client.get(&follower).await.or_logs(&grid)?;
    assert_eq!(view.status, RunStatus::Running, "the follower waits for the leader: {view:?}");
    let cancelled = Instant::now();
    client.cancel(&leader, "test").await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &follower, RUN_DEADLINE).await?;
    assert_eq!(view.output.as_ref().map(|output| &output["request"]), Some(&json!(5)), "its own worker: {view:?}");
    assert!(cancelled.elapsed() < Duration::from_secs(10), "the follower waited {:?}", cancelled.elapsed());
    Ok(())
}

/// A follower whose run is cancelled leaves its flight: when its leader's run is cancelled
/// next, it does not lead a new flight (its task would go to a worker for a run that is
/// gone, and nothing would end that flight), so the next run of the key goes to a worker at
/// once instead of waiting for the cancelled follower's deadline (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_follower_leads_no_flight_when_its_leader_is_cancelled() -> anyhow::Result<()> {
    let (grid, metrics_addr) = Grid::start_with_metrics(&["a"], 8).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SLOW_CACHED_FLOW).await?;
    let start = |request: u32, ms: u32| StartRun {
        flow: "slow-cached".into(),
        input: json!({"key": "k", "request": request, "ms": ms}),
        ..Default::default()
    };

    let leader = client.start(start(1, 60_000)).await.or_logs(&grid)?.run_id;
    counted(&metrics_addr, "miss", 1.0).await.or_logs(&grid)?;
    let follower = client.start(start(2, 100)).await.or_logs(&grid)?.run_id;
    counted(&metrics_addr, "miss", 2.0).await.or_logs(&grid)?;
    client.cancel(&follower, "test").await.or_logs(&grid)?;
    client.cancel(&leader, "test").await.or_logs(&grid)?;

    let next = client.start(start(3, 100)).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &next, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    assert_eq!(view.output.as_ref().map(|output| &output["request"]), Some(&json!(3)), "its own worker: {view:?}");
    Ok(())
}

/// A map step whose items' results are cached, under a key that fails for an item that
/// is not a number.
const CACHED_ITEMS_FLOW: &str = r#"
name: cached-items
output: 'steps.each.output'
steps:
  - id: each
    kind: map
    items: 'input.items'
    pool: a
    task: echo
    timeout_ms: 600000
    cache: { key: 'input.key + 1', ttl_ms: 600000 }
"#;

/// A run fails at a map item's cache key in the turn that dispatched the items before it:
/// those never go out, and lead no flight (their run is gone, so nothing would end it). The
/// next run with their key goes to a worker at once, instead of waiting for their deadline
/// (10 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_closed_in_the_turn_that_dispatched_it_leads_no_flight() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, CACHED_ITEMS_FLOW).await?;
    let start =
        |items: Value| StartRun { flow: "cached-items".into(), input: json!({"items": items}), ..Default::default() };

    let failed = client.start(start(json!([{"key": 1}, {"key": null}]))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &failed, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Failed, "item 1's key fails: {view:?}");

    let next = client.start(start(json!([{"key": 1}]))).await.or_logs(&grid)?.run_id;
    let view = grid.wait_run(&client, &next, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    assert_eq!(view.output, Some(json!([{"key": 1}])), "{view:?}");
    Ok(())
}

/// How the commit a test makes fail fails.
#[derive(Clone, Copy, Debug)]
enum CommitFailure {
    /// An I/O error: the shard's actor reloads the shard from the store.
    Transient,
    /// Another owner's epoch: the shard's actor stops, and its coordinator opens the shard
    /// again, as when the shard moves away and back.
    StaleEpoch,
}

/// Two runs of one shard ask for one key: the first's task is with a worker, the second's
/// waits for its result. Then a commit of their shard fails, and the shard reloads, or
/// stops and is opened again: it looks its open tasks up again, oldest first, so the first's
/// leads again and the second's waits for it again. One worker call answers both. (A lookup
/// left running from before would wake as the shard forgot the first's attempt, and call a
/// worker of its own.) With `second_timeout_ms`, the second run is of a later version of the
/// flow whose task times out that soon: its task is due back before the first's, and still
/// waits for it.
async fn the_task_with_a_worker_leads_again_after(
    failure: CommitFailure,
    second_timeout_ms: Option<u64>,
) -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let store = FailingStore::open(&grid)?;
    let _coordinator = spawn_coordinator(&grid, store.clone())?;
    grid.wait_shards_served_by(1, SETTLE).await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    let first_version = deploy(&grid, &client, SLOW_CACHED_FLOW).await?.version;
    let second_version = match second_timeout_ms {
        Some(timeout_ms) => {
            let sooner = SLOW_CACHED_FLOW.replace("timeout_ms: 60000", &format!("timeout_ms: {timeout_ms}"));
            deploy(&grid, &client, &sooner).await?.version
        }
        None => first_version,
    };
    let (shard, keys) = idempotency_keys_of_one_shard("slow-cached", grid.shards);
    let start = |run: usize, version: u32, key: &str, ms: u32| StartRun {
        flow: "slow-cached".into(),
        version: Some(version),
        input: json!({"key": key, "request": run, "ms": ms}),
        idempotency_key: Some(keys[run].clone()),
        ..Default::default()
    };

    // The first run's task with a worker for longer than the shard takes to serve again.
    let first = client.start(start(0, first_version, "k", 5_000)).await.or_logs(&grid)?.run_id;
    crate::cancels::wait_held(&grid, "a", (1, 0), SETTLE).await?;
    // Its start answered, the second run's lookup follows the first's (it joined in the
    // commit, before the answer).
    let second = client.start(start(1, second_version, "k", 100)).await.or_logs(&grid)?.run_id;
    // A third run's start is the shard's next commit: it fails, the client tries again.
    store.fail_next_commit(shard, failure);
    let third = client.start(start(2, first_version, "other", 1)).await.or_logs(&grid)?.run_id;
    assert!(store.failed(), "the shard's next commit was the third run's start, and failed");

    let view = grid.wait_run(&client, &second, RUN_DEADLINE).await?;
    let answer = view.output.as_ref().map(|output| &output["request"]);
    assert_eq!(answer, Some(&json!(0)), "the second run has the first run's answer: {view:?}\n{}", grid.logs());
    assert_eq!(step(&view, "fetch").cached, 1, "{view:?}");
    let view = grid.wait_run(&client, &first, RUN_DEADLINE).await?;
    assert_eq!(view.output.as_ref().map(|output| &output["request"]), Some(&json!(0)), "{view:?}");
    assert_eq!(step(&view, "fetch").cached, 0, "the first run's answer is its own worker's: {view:?}");
    let view = grid.wait_run(&client, &third, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_worker_leads_its_key_again_when_its_shard_reloads() -> anyhow::Result<()> {
    the_task_with_a_worker_leads_again_after(CommitFailure::Transient, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_worker_leads_its_key_again_when_its_shard_is_opened_again() -> anyhow::Result<()> {
    the_task_with_a_worker_leads_again_after(CommitFailure::StaleEpoch, None).await
}

/// The shard sends its open tasks again by when each was dispatched, not by deadline: the
/// second run's task, due back first (20 s against 60 s), does not take the lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_worker_leads_its_key_again_when_a_later_one_is_due_back_first() -> anyhow::Result<()> {
    the_task_with_a_worker_leads_again_after(CommitFailure::Transient, Some(20_000)).await
}

/// How long shards may take to settle after a change (debug builds, 2 cores).
const SETTLE: Duration = Duration::from_secs(30);

/// Three idempotency keys whose runs of `flow` land on one shard, and that shard.
fn idempotency_keys_of_one_shard(flow: &str, shards: u32) -> (ShardId, Vec<String>) {
    let mut by_shard: HashMap<ShardId, Vec<String>> = HashMap::new();
    for candidate in 0u64.. {
        let key = format!("key-{candidate}");
        let shard = shard_of(RunId::from_idempotency_key(flow, &key).as_str(), shards);
        let keys = by_shard.entry(shard).or_default();
        keys.push(key);
        if keys.len() == 3 {
            return (shard, std::mem::take(keys));
        }
    }
    unreachable!("the candidates never end")
}

/// The embedded store, whose next commit of one shard can be made to fail.
#[derive(Clone)]
struct FailingStore {
    inner: RedbStore,
    /// The shard whose next commit fails, and how.
    fail_next: Arc<Mutex<Option<(ShardId, CommitFailure)>>>,
}

impl FailingStore {
    fn open(grid: &Grid) -> anyhow::Result<FailingStore> {
        let inner = RedbStore::open(grid.data_dir(), StoreLimits::default())?;
        Ok(FailingStore { inner, fail_next: Arc::default() })
    }

    fn fail_next_commit(&self, shard: ShardId, failure: CommitFailure) {
        *self.fail_next.lock().unwrap() = Some((shard, failure));
    }

    /// Whether the commit [`FailingStore::fail_next_commit`] asked for has failed.
    fn failed(&self) -> bool {
        self.fail_next.lock().unwrap().is_none()
    }
}

impl Store for FailingStore {
    type Shard = FailingShard;

    async fn open_shard(&self, shard: ShardId) -> flowgrid_store::Result<FailingShard> {
        let inner = self.inner.open_shard(shard).await?;
        Ok(FailingShard { inner, shard, fail_next: Arc::clone(&self.fail_next) })
    }
}

struct FailingShard {
    inner: RedbShard,
    shard: ShardId,
    fail_next: Arc<Mutex<Option<(ShardId, CommitFailure)>>>,
}

impl ShardStore for FailingShard {
    async fn acquire(&self) -> flowgrid_store::Result<Epoch> {
        self.inner.acquire().await
    }

    async fn current_epoch(&self) -> flowgrid_store::Result<Epoch> {
        self.inner.current_epoch().await
    }

    async fn get(&self, key: &[u8]) -> flowgrid_store::Result<Option<flowgrid_store::Value>> {
        self.inner.get(key).await
    }

    async fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        reverse: bool,
    ) -> flowgrid_store::Result<Vec<(Key, flowgrid_store::Value)>> {
        self.inner.scan(range, limit, reverse).await
    }

    async fn commit(&self, epoch: Epoch, batch: WriteBatch) -> flowgrid_store::Result<()> {
        let failure = {
            let mut fail_next = self.fail_next.lock().unwrap();
            fail_next.take_if(|(shard, _)| *shard == self.shard).map(|(_, failure)| failure)
        };
        match failure {
            None => self.inner.commit(epoch, batch).await,
            Some(CommitFailure::Transient) => {
                Err(flowgrid_store::Error::Backend("an I/O error the test injected".into()))
            }
            Some(CommitFailure::StaleEpoch) => {
                Err(flowgrid_store::Error::StaleEpoch { shard: self.shard, epoch, current: Epoch(epoch.0 + 1) })
            }
        }
    }
}
