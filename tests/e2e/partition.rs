//! A coordinator, or a worker, cut off from NATS by the network while it keeps running: it
//! sits in a Linux network namespace of its own, joined to the host by a veth pair, and the
//! host's end of the pair goes down. Its TCP connection stays open (nothing resets it), as in a
//! real partition. Creating the namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and
//! iproute2's `ip`; without them the test says SKIPPED and why.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::pull;
use flowgrid_sdk::{RunId, RunStatus, StartRun};
use flowgrid_tests::{Grid, Netns};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{deploy, OrLogs, ECHO_FLOW};

/// How long shards may take to settle after a change (generous: debug builds, 2 cores).
const SETTLE: Duration = Duration::from_secs(30);
/// How long nats-server may take to drop a client that stopped answering: its pings go
/// every 2 s to a silent client, which is dropped after 2 go unanswered
/// (deploy/nats-server.conf), so 3 ping intervals after its last word, plus one for the
/// timer's phase.
const DEAD_CLIENT_DROPPED: Duration = Duration::from_secs(8);
/// How long the coordinator stays cut off: several leases (1.5 s), and a few seconds after
/// nats-server dropped it, in which no request may go to it any more.
const PARTITION: Duration = Duration::from_secs(13);
/// The clients' request timeout: a start that took longer waited for a coordinator that
/// never answered, at least once.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Concurrent starters, each starting runs one after another.
const STARTERS: u64 = 8;

/// A namespace to cut a process off in; `None` (after saying why) when this machine does not
/// allow one.
fn netns(test: &str) -> Option<Netns> {
    match Netns::create() {
        Ok(netns) => Some(netns),
        Err(error) => {
            eprintln!(
                "SKIPPED: {test}: a network namespace to cut a process off in needs root and iproute2's `ip` \
                 ({error:#})"
            );
            None
        }
    }
}

/// The grid's NATS URL as seen from inside `netns`.
fn nats_url_inside(grid: &Grid, netns: &Netns) -> anyhow::Result<String> {
    Ok(netns.nats_url(grid.nats_url.rsplit(':').next().context("the grid's port")?))
}

/// What one starter saw: the runs it started, when it sent each start and how long the
/// start took, and the starts that failed.
#[derive(Default)]
struct Starts {
    runs: Vec<(RunId, u64)>,
    took: Vec<(Instant, Duration)>,
    failures: Vec<String>,
}

/// Starts echo runs with idempotency keys, one after another, until `stop`.
async fn start_runs(client: flowgrid_sdk::Client, starter: u64, stop: CancellationToken) -> Starts {
    let mut starts = Starts::default();
    for number in 0u64.. {
        if stop.is_cancelled() {
            break;
        }
        let value = starter * 1_000_000 + number;
        let start = StartRun {
            flow: "echo-once".into(),
            version: None,
            input: json!({"value": value}),
            idempotency_key: Some(format!("partition-{value}")),
            ..Default::default()
        };
        let sent = Instant::now();
        let outcome = client.start(start).await;
        starts.took.push((sent, sent.elapsed()));
        match outcome {
            Ok(started) => starts.runs.push((started.run_id, value)),
            Err(error) => starts.failures.push(format!("start {value}: {error}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    starts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_nats_hands_its_shards_over_and_no_request_or_run_is_lost() -> anyhow::Result<()> {
    let Some(netns) = netns("partition") else { return Ok(()) };
    let mut grid = Grid::start_nats_on("0.0.0.0", "")?;
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 32)?;
    let nats_url = nats_url_inside(&grid, &netns)?;
    grid.spawn_coordinator_in_netns(&netns, &nats_url)?;
    grid.wait_shards_served_by(2, SETTLE).await?;
    let client = grid.client().await?.with_request_timeout(REQUEST_TIMEOUT);
    deploy(&grid, &client, ECHO_FLOW).await?;

    let stop = CancellationToken::new();
    let starters: Vec<_> =
        (0..STARTERS).map(|starter| tokio::spawn(start_runs(client.clone(), starter, stop.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut_at = Instant::now();
    netns.set_linked(false)?;
    grid.wait_shards_served_by(1, SETTLE).await.or_logs(&grid)?;
    let taken_over = cut_at.elapsed();
    tokio::time::sleep(PARTITION.saturating_sub(taken_over)).await;
    netns.set_linked(true)?;
    let healed_at = Instant::now();
    grid.wait_shards_served_by(2, SETTLE).await.or_logs(&grid)?;
    let rejoined = healed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut starts = Starts::default();
    for starter in starters {
        let Starts { runs, took, failures } = starter.await?;
        starts.runs.extend(runs);
        starts.took.extend(took);
        starts.failures.extend(failures);
    }
    // Starts sent in the partition, and those sent once nats-server had dropped the cut-off
    // coordinator (a second after it must have): how many waited out a request timeout.
    let waited = |from: Instant| {
        let sent: Vec<&Duration> =
            starts.took.iter().filter(|(sent, _)| *sent >= from && *sent < healed_at).map(|(_, took)| took).collect();
        (sent.iter().filter(|took| ***took >= REQUEST_TIMEOUT).count(), sent.len())
    };
    let (waited_during, during) = waited(cut_at);
    let (waited_late, late) = waited(cut_at + DEAD_CLIENT_DROPPED + Duration::from_secs(1));
    eprintln!(
        "shards taken over {} ms after the cut; the coordinator served again {} ms after the heal; {} runs \
         started; {waited_during} of the {during} starts sent during the partition waited out a request timeout, \
         {waited_late} of the {late} sent after nats-server must have dropped the cut-off coordinator",
        taken_over.as_millis(),
        rejoined.as_millis(),
        starts.runs.len(),
    );
    assert!(starts.failures.is_empty(), "starts with keys failed: {:?}\n{}", starts.failures, grid.logs());
    assert!(late >= 20, "too few starts after nats-server dropped the cut-off coordinator to judge: {late}");
    // Without nats-server's pings (deploy/nats-server.conf) about half of them waited: the
    // cut-off coordinator went on taking its share of the requests for the whole partition.
    assert!(
        waited_late * 20 <= late,
        "{waited_late} of {late} starts sent after nats-server must have dropped the cut-off coordinator waited \
         for it\n{}",
        grid.logs()
    );

    for (run_id, value) in &starts.runs {
        let view = grid.wait_run(&client, run_id, SETTLE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "run {run_id}: {:?}", view.error);
        assert_eq!(view.output, Some(json!({"value": value})), "run {run_id}");
    }
    for coordinator in &mut grid.coordinators {
        coordinator.stop(Duration::from_secs(20));
    }
    let report = flowgrid_coordinator::audit::audit(&grid.data_dir(), grid.shards).await?;
    assert!(report.is_clean(), "the audit found problems: {report:?}");
    assert_eq!(report.runs, starts.runs.len() as u64, "every run started, and no other, is in the store");
    Ok(())
}

/// A map whose items each take a second and a half, with attempts that time out after
/// three: an item whose worker was cut off is tried again elsewhere.
const SLOW_ITEMS: &str = r#"
name: slow-items
output: 'steps.items.output'
steps:
  - id: items
    kind: map
    items: input.items
    pool: a
    task: sleep
    input: '#{ ms: 1500, value: item }'
    output: 'result.map(|entry| entry.value)'
    timeout_ms: 3000
    retry: {max_attempts: 4, initial_backoff_ms: 100}
"#;

/// Items of the map.
const ITEMS: i64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_a_worker_cut_off_from_nats_are_done_elsewhere_and_its_late_results_are_not_applied(
) -> anyhow::Result<()> {
    let Some(netns) = netns("partition") else { return Ok(()) };
    let mut grid = Grid::start_nats_on("0.0.0.0", "")?;
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SLOW_ITEMS).await?;
    // Only the worker that will be cut off serves the pool at first, so it takes every item.
    let nats_url = nats_url_inside(&grid, &netns)?;
    grid.spawn_worker(
        "worker-cut-off",
        netns
            .command(&flowgrid_tests::flowgrid_bin())
            .args(["--nats-url", &nats_url, "worker", "--pools", "a", "--concurrency", "64", "--speed", "0"])
            // Its log says how the coordinator answered each result.
            .env("FLOWGRID_LOG", "flowgrid_sdk=debug,info"),
    )?;
    let cut_off_log = grid.workers.last().context("the worker just started")?.log.clone();
    let items: Vec<i64> = (0..ITEMS).collect();
    let start = StartRun {
        flow: "slow-items".into(),
        version: None,
        input: json!({"items": items}),
        idempotency_key: None,
        ..Default::default()
    };
    let run_id = client.start(start).await.or_logs(&grid)?.run_id;
    wait_items_held(&grid).await?;

    netns.set_linked(false)?;
    let cut_at = Instant::now();
    grid.start_workers(&["a"], 64)?;
    // The first attempts time out (3 s) and the items run again on the other worker;
    // the cut-off worker finishes its attempts meanwhile and holds their results.
    let view = grid.wait_run(&client, &run_id, SETTLE).await?;
    let ended = cut_at.elapsed();
    netns.set_linked(true)?;
    let healed_at = Instant::now();
    assert_eq!(view.status, RunStatus::Succeeded, "{:?}\n{}", view.error, grid.logs());
    assert_eq!(view.output, Some(json!(items)), "every item once, in order");
    // The late results get through and are answered "not applied".
    let until = Instant::now() + SETTLE;
    let late = loop {
        let log = std::fs::read_to_string(&cut_off_log)?;
        let late =
            log.lines().filter(|line| line.contains("result confirmed") && line.contains("applied=false")).count();
        if late >= ITEMS as usize || Instant::now() > until {
            break late;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "the run ended {} ms after the cut; {late} late results answered `not applied` within {} ms of the heal",
        ended.as_millis(),
        healed_at.elapsed().as_millis()
    );
    assert_eq!(late, ITEMS as usize, "late results answered `not applied`\n{}", grid.logs());
    let again = client.get(&run_id).await?;
    assert_eq!(again.output, view.output, "a late result changed the run");
    for coordinator in &mut grid.coordinators {
        coordinator.stop(Duration::from_secs(20));
    }
    let report = flowgrid_coordinator::audit::audit(&grid.data_dir(), grid.shards).await?;
    assert!(report.is_clean(), "the audit found problems: {report:?}");
    Ok(())
}

/// Waits until the worker holds every item: all of them delivered by the pool's consumer
/// and none acked yet.
async fn wait_items_held(grid: &Grid) -> anyhow::Result<()> {
    let subjects = flowgrid_proto::Subjects::new(grid.prefix.clone());
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let until = Instant::now() + SETTLE;
    loop {
        // Nothing is held until the pool's consumer exists.
        let held = async {
            let stream = jetstream.get_stream(subjects.tasks_stream()).await.ok()?;
            let mut consumer = stream.get_consumer::<pull::Config>(&subjects.pool_consumer("a")).await.ok()?;
            Some(consumer.info().await.ok()?.num_ack_pending as i64)
        }
        .await
        .unwrap_or(0);
        if held == ITEMS {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("the worker held {held} of {ITEMS} items after {SETTLE:?}\n{}", grid.logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
