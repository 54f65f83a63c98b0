//! Several coordinators on one grid: they split the shards, any of them serves any
//! request, shards move on scale-out, graceful leave and kill -9, and no run is lost or
//! applied twice on the way.

use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, kv, stream};
use flowgrid_proto::{ApiError, Encoding, ErrorCode, Reply, ShardClaim, ShardState, Subjects};
use flowgrid_sdk::broker::{self, BrokerError, BrokerLimits};
use flowgrid_sdk::{RunStatus, StartRun};
use flowgrid_tests::{api_request_json, free_port, metric_value, scrape_metrics, step, wait_for, Grid};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{deploy, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// How long shards may take to settle after a change (generous: debug builds, 2 cores).
const SETTLE: Duration = Duration::from_secs(30);
/// A request to a coordinator that leaves, unanswered this long, was lost.
const LOST_REQUEST_AFTER: Duration = Duration::from_secs(20);

/// A map whose items each take a moment, so that runs are in flight while shards move.
const SLOW_MAP: &str = r#"
name: slow-map
output: 'steps.doubled.output'
steps:
  - id: doubled
    kind: map
    items: input.numbers
    pool: a
    task: double
    input: '#{ value: item }'
    output: 'result.map(|entry| entry.value)'
    max_concurrency: 4
"#;

fn numbers(run: usize) -> Vec<i64> {
    (0..20).map(|i| (run * 100 + i) as i64).collect()
}

async fn start_runs(
    grid: &Grid,
    client: &flowgrid_sdk::Client,
    runs: usize,
) -> anyhow::Result<Vec<flowgrid_sdk::RunId>> {
    let mut ids = Vec::new();
    for run in 0..runs {
        let start = StartRun {
            flow: "slow-map".into(),
            version: None,
            input: json!({"numbers": numbers(run)}),
            idempotency_key: Some(format!("run-{run}")),
            ..Default::default()
        };
        ids.push(client.start(start).await.or_logs(grid)?.run_id);
    }
    Ok(ids)
}

/// Every run succeeded with each item doubled exactly once.
async fn check_runs(grid: &Grid, client: &flowgrid_sdk::Client, ids: &[flowgrid_sdk::RunId]) -> anyhow::Result<()> {
    for (run, run_id) in ids.iter().enumerate() {
        let view = grid.wait_run(client, run_id, Duration::from_secs(60)).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "run {run}: {:?}\n{}", view.error, grid.logs());
        let expected: Vec<Value> = numbers(run).iter().map(|n| json!(n * 2)).collect();
        assert_eq!(view.output, Some(Value::Array(expected)), "run {run}");
        let items = step(&view, "doubled").items.expect("a map step counts its items");
        assert_eq!(items.succeeded, 20, "run {run}: {items:?}");
    }
    Ok(())
}

/// Two coordinators serving every shard, the second started with the flags `second`, the
/// slow map deployed and 8 runs started.
async fn two_coordinators_with_runs_in_flight(
    second: &[&str],
) -> anyhow::Result<(Grid, flowgrid_sdk::Client, Vec<flowgrid_sdk::RunId>)> {
    let mut grid = Grid::start(&["a"]).await?;
    grid.spawn_coordinator_with_args(second)?;
    grid.wait_shards_served_by(2, SETTLE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SLOW_MAP).await?;
    let ids = start_runs(&grid, &client, 8).await?;
    Ok((grid, client, ids))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_split_the_shards_and_either_serves_any_request() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    grid.spawn_coordinator()?;
    let owners = grid.wait_shards_served_by(2, SETTLE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SLOW_MAP).await?;
    let ids = start_runs(&grid, &client, 8).await?;
    check_runs(&grid, &client, &ids).await?;
    // Requests reach either coordinator (queue group) and are forwarded to the owner:
    // every run is readable and listable from any of them.
    let listed = client.list(flowgrid_sdk::ListRuns { limit: Some(100), ..Default::default() }).await.or_logs(&grid)?;
    assert_eq!(listed.runs.len(), ids.len());
    let first = owners[0].clone();
    assert!(owners.iter().any(|owner| *owner != first), "both coordinators own shards: {owners:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_then_graceful_leave_moves_shards_without_losing_runs() -> anyhow::Result<()> {
    let mut grid = Grid::start(&["a"]).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, SLOW_MAP).await?;
    let before = start_runs(&grid, &client, 6).await?;

    grid.spawn_coordinator()?;
    let owners = grid.wait_shards_served_by(2, SETTLE).await?;
    let during = start_runs(&grid, &client, 6).await?;

    // The first coordinator leaves: it hands every shard to the second and exits 0. Requests
    // sent meanwhile are answered: those it received before it stopped taking any, by it.
    // One on its way to it at the instant it unsubscribes can be lost (NATS request/reply is
    // at most once, and async-nats drops what reaches a subscription it drains once its
    // unsubscribe is written): a caller sends it again, as the SDK does with reads. So each
    // asker (one request out at a time) may lose one request at most, and its repeat is
    // answered.
    let leaving = grid.coordinators[0].pid();
    let asking = tokio_util::sync::CancellationToken::new();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut askers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (nats, asking, answered) = (grid.nats_client().await?, asking.clone(), answered.clone());
        let (prefix, body) = (grid.prefix.clone(), json!({"run_id": before[0]}));
        askers.spawn(async move {
            let (mut asked, mut lost, mut never_answered) = (0u32, 0u32, 0u32);
            while !asking.is_cancelled() {
                asked += 1;
                let mut tries = 0;
                loop {
                    tries += 1;
                    // Longer than any answer takes (a forward that waits for the moving shard
                    // and then for its new owner) on a busy host: a request that times out
                    // here was lost, not slow.
                    match api_request_json(&nats, &prefix, "run.get", &body, LOST_REQUEST_AFTER).await {
                        Err(error) if error.kind() == async_nats::RequestErrorKind::TimedOut => {
                            lost += 1;
                            if tries == 2 {
                                never_answered += 1;
                                break;
                            }
                        }
                        _ => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            (asked, lost, never_answered)
        });
    }
    // The coordinator stops while every asker has requests going.
    wait_for("requests flowing", SETTLE, || async {
        (answered.load(std::sync::atomic::Ordering::Relaxed) >= 20).then_some(())
    })
    .await?;
    assert!(grid.coordinators[0].stop(Duration::from_secs(20)), "a graceful leave exits 0\n{}", grid.logs());
    let after = grid.wait_shards_served_by(1, SETTLE).await?;
    assert!(after.iter().all(|owner| !owner.contains(&format!("-{leaving}-"))), "{after:?} (was {owners:?})");
    asking.cancel();
    while let Some(outcome) = askers.join_next().await {
        let (asked, lost, never_answered) = outcome?;
        assert_eq!(never_answered, 0, "{never_answered} of {asked} requests were never answered\n{}", grid.logs());
        assert!(lost <= 1, "{lost} of {asked} requests were lost on their way\n{}", grid.logs());
    }

    check_runs(&grid, &client, &before).await?;
    check_runs(&grid, &client, &during).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_of_a_killed_coordinator_are_taken_over_after_its_lease() -> anyhow::Result<()> {
    let (mut grid, client, ids) = two_coordinators_with_runs_in_flight(&[]).await?;

    let killed_at = Instant::now();
    grid.coordinators[1].kill_hard();
    grid.wait_shards_served_by(1, SETTLE).await?;
    eprintln!("shards served again {} ms after the kill", killed_at.elapsed().as_millis());
    check_runs(&grid, &client, &ids).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_paused_past_its_lease_gives_its_shards_up_when_it_resumes() -> anyhow::Result<()> {
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let (grid, client, ids) = two_coordinators_with_runs_in_flight(&["--metrics-addr", &metrics_addr]).await?;

    let paused = grid.coordinators[1].pid().to_string();
    let signal = |name: &str| std::process::Command::new("kill").args([name, &paused]).status();
    signal("-STOP")?;
    // Longer than the lease (1.5 s): the other coordinator claims the paused one's shards,
    // but the shard files stay locked until the paused process resumes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal("-CONT")?;
    grid.wait_shards_served_by(2, SETTLE).await?;
    check_runs(&grid, &client, &ids).await?;
    // Its first heartbeat after the pause went through at once, renewing the lease in a new
    // term: the lease it lost meanwhile is counted all the same.
    let body = scrape_metrics(&metrics_addr)?;
    let lost = metric_value(&body, "flowgrid_lease_lost_total ");
    assert!(lost.is_some_and(|lost| lost >= 1.0), "flowgrid_lease_lost_total is {lost:?}\n{}", grid.logs());
    Ok(())
}

/// A flow whose runs end in the commit that starts them: their shard no longer holds them
/// in memory once that commit is made.
const DONE_AT_ONCE: &str = "name: done-at-once\nsteps:\n  - { id: done, kind: succeed }\n";
/// Keyless starts sent while a stale owner listens on every shard's subject.
const STALE_OWNER_STARTS: usize = 50;
/// Starts sent first, so that each coordinator has compiled the flow's version: a start
/// reaches either coordinator (queue group), and one that missed both is 1 in 2^15.
const WARM_UP_STARTS: usize = 16;

/// A coordinator that lost a shard without handing it over (a stale epoch at a commit, or a
/// stall past its lease) listens on the shard's subject until its manager stops it, beside
/// the shard's new owner, and refuses at once as "not served": played here by a plain NATS
/// client refusing every forwarded request. Each keyless start forwarded meanwhile reaches
/// both; the owner applies it (its run ends in that commit) and the refusal comes first.
/// The start is still applied once: one run per start, each with one start record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_from_a_coordinator_that_lost_the_shard_applies_no_start_twice() -> anyhow::Result<()> {
    let mut grid = Grid::start(&[]).await?;
    grid.spawn_coordinator()?;
    grid.wait_shards_served_by(2, SETTLE).await?;
    let client = grid.client().await?;
    deploy(&grid, &client, DONE_AT_ONCE).await?;
    let start = |labels: flowgrid_model::Labels| StartRun {
        flow: "done-at-once".into(),
        version: Some(1),
        labels,
        ..Default::default()
    };
    for _ in 0..WARM_UP_STARTS {
        client.start(start(Default::default())).await.or_logs(&grid)?;
    }

    let stale = grid.nats_client().await?;
    let mut commands = stale.subscribe(format!("{}.shard.*.cmd", grid.prefix)).await?;
    stale.flush().await?;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stale_owner = tokio::spawn({
        let refused = refused.clone();
        async move {
            while let Some(message) = commands.next().await {
                let Some(reply_to) = message.reply else { continue };
                let shard = message.subject.split('.').rev().nth(1).unwrap_or_default().to_owned();
                let refusal =
                    ApiError::new(ErrorCode::Unavailable, format!("shard {shard} is not served right now; retry"));
                let answer = flowgrid_proto::encode(Encoding::MsgPack, &Reply::<Value>::Error(refusal))?;
                stale.publish(reply_to, answer.into()).await?;
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        }
    });

    let labels: flowgrid_model::Labels = [("batch".to_owned(), "stale-owner".to_owned())].into();
    let starts = (0..STALE_OWNER_STARTS).map(|_| client.start(start(labels.clone())));
    let outcomes = futures::future::join_all(starts).await;
    stale_owner.abort();
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused > 0, "no start was forwarded past the stale owner\n{}", grid.logs());
    let (mut started, mut failed) = (Vec::new(), Vec::new());
    for outcome in outcomes {
        match outcome {
            Ok(run) => started.push(run.run_id),
            Err(error) => failed.push(format!("{error:?}")),
        }
    }

    let query = flowgrid_sdk::ListRuns { labels, limit: Some(200), ..Default::default() };
    let listed = client.list(query).await.or_logs(&grid)?.runs;
    let mut ids: Vec<&str> = listed.iter().map(|run| run.run_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (listed.len(), ids.len()),
        (STALE_OWNER_STARTS, STALE_OWNER_STARTS),
        "runs listed (and distinct ids) for {STALE_OWNER_STARTS} keyless starts, {refused} refusals by the stale \
         owner; {} starts failed: {failed:?}",
        failed.len()
    );
    for run_id in &started {
        let history = client.history(run_id, None, None).await.or_logs(&grid)?;
        let starts = history.records.iter().filter(|record| record.started.is_some()).count();
        assert_eq!(starts, 1, "run {run_id} has {starts} start records: {:?}", history.records);
    }
    assert!(failed.is_empty(), "starts failed: {failed:?}\n{}", grid.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_revision_of_a_hand_over_can_be_read_back_also_from_a_bucket_made_with_one() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    // The shards bucket as earlier versions made it: one revision per claim.
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let bucket = flowgrid_proto::Subjects::new(grid.prefix.clone()).shards_bucket();
    jetstream.create_key_value(kv::Config { bucket: bucket.clone(), history: 1, ..Default::default() }).await?;

    grid.start_coordinator().await?;
    let first = grid.wait_shards_served_by(1, SETTLE).await?[0].clone();
    let kv = jetstream.get_key_value(&bucket).await?;
    assert_eq!(kv.status().await?.history(), broker::CLAIM_REVISIONS_KEPT, "the coordinator raises it");

    // A second coordinator takes half of the shards: each moves released, then acquiring.
    grid.spawn_coordinator()?;
    let owners = grid.wait_shards_served_by(2, SETTLE).await?;
    let (shard, newcomer) = owners.iter().enumerate().find(|(_, owner)| **owner != first).expect("two owners");
    let mut states = Vec::new();
    let mut history = kv.history(flowgrid_proto::shard_key(shard as u32)).await?;
    while let Some(entry) = history.next().await {
        let claim: ShardClaim = rmp_serde::from_slice(&entry?.value)?;
        states.push((claim.state, claim.owner));
    }
    let tail = &states[states.len().saturating_sub(4)..];
    let expected = [
        (ShardState::Releasing, Some(first.clone())),
        (ShardState::Released, None),
        (ShardState::Acquiring, Some(newcomer.clone())),
        (ShardState::Serving, Some(newcomer.clone())),
    ];
    assert_eq!(tail, expected, "the last revisions of shard {shard}'s claim: {states:?}");

    // `flowgrid shards --history` reads the same revisions back for an operator.
    let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--json", "shards", "--history", &shard.to_string()])
        .output()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let shown: Value = serde_json::from_slice(&output.stdout)?;
    let shown: Vec<(String, Value)> = shown["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|revision| (revision["state"].as_str().unwrap_or_default().to_owned(), revision["owner"].clone()))
        .collect();
    let expected: Vec<(String, Value)> =
        expected.iter().map(|(state, owner)| (format!("{state:?}").to_lowercase(), json!(owner))).collect();
    assert_eq!(shown[shown.len().saturating_sub(4)..], expected[..], "flowgrid shards --history {shard}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_another_shard_count_is_refused_and_leaves_its_directory_as_it_was() -> anyhow::Result<()> {
    let grid = Grid::start(&[]).await?;
    let other = grid.dir.path().join("other-data");
    let wrong = (grid.shards * 2).to_string();
    let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "coordinator", "--metrics-addr", "off"])
        .args(["--shards", &wrong, "--data-dir"])
        .arg(&other)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("start it with --shards {}", grid.shards)), "{stderr}");
    assert!(!other.join("grid.json").exists(), "a refused coordinator records no grid in its directory");
    // The grid's own directory names the grid once its coordinator joined.
    let recorded: Value = serde_json::from_slice(&std::fs::read(grid.data_dir().join("grid.json"))?)?;
    assert_eq!(recorded, json!({"prefix": grid.prefix, "shards": grid.shards}));
    // Shards in FoundationDB need a build with it: this one says how to make one, and
    // touches nothing.
    let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "coordinator", "--metrics-addr", "off"])
        .args(["--fdb-cluster-file", "/etc/foundationdb/fdb.cluster", "--data-dir"])
        .arg(grid.dir.path().join("fdb-data"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("built without FoundationDB") && stderr.contains("--features fdb"), "{stderr}");
    assert!(!grid.dir.path().join("fdb-data").exists(), "no data directory made");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_naming_the_same_streams_as_a_grid_is_refused_and_changes_none_of_them() -> anyhow::Result<()> {
    let grid = Grid::start(&["a"]).await?;
    // Upper-cased, the prefix names the same streams and buckets (`FLOWGRID_TASKS`, ...).
    let other = grid.prefix.to_uppercase();
    let (ours, theirs) = (Subjects::new(grid.prefix.clone()), Subjects::new(other.clone()));
    assert_eq!((ours.tasks_stream(), ours.shards_bucket()), (theirs.tasks_stream(), theirs.shards_bucket()));
    let output = std::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &other, "coordinator", "--metrics-addr", "off"])
        .args(["--shards", &grid.shards.to_string(), "--data-dir"])
        .arg(grid.dir.path().join("other-data"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let tasks = jetstream.get_stream(ours.tasks_stream()).await?;
    assert_eq!(tasks.cached_info().config.subjects, [ours.tasks_all()], "the grid's tasks stream is left as it was");
    // A worker of the other prefix leaves it as it is too.
    match broker::tasks_stream(&jetstream, &theirs, &BrokerLimits::default()).await {
        Err(BrokerError::StreamOfAnotherGrid { found, .. }) => assert_eq!(found, [ours.tasks_all()]),
        Err(error) => panic!("refused for another reason: {error}"),
        Ok(_) => panic!("the tasks stream was taken for prefix {other}"),
    }
    let tasks = jetstream.get_stream(ours.tasks_stream()).await?;
    assert_eq!(tasks.cached_info().config.subjects, [ours.tasks_all()]);
    // The grid runs as before.
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let start = StartRun { flow: "echo-once".into(), input: json!({"n": 1}), ..Default::default() };
    let started = client.start(start).await.or_logs(&grid)?;
    let view = grid.wait_run(&client, &started.run_id, RUN_DEADLINE).await?;
    assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
    // The refusal names both prefixes.
    let refusal = stderr.lines().find(|line| line.contains("names the same NATS streams")).unwrap_or_default();
    assert!(refusal.contains(&format!("{other:?}")) && refusal.contains(&format!("{:?}", grid.prefix)), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_cannot_read_the_members_does_not_join_unchecked() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    // The members bucket takes one consumer, and another holds it: listing the members
    // (which takes a consumer of its own) fails.
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let bucket = Subjects::new(grid.prefix.clone()).members_bucket();
    let members = jetstream
        .create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_consumers: 1,
            allow_direct: true,
            allow_rollup: true,
            deny_delete: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await?;
    let holder = consumer::pull::Config { durable_name: Some("holder".to_owned()), ..Default::default() };
    members.create_consumer(holder).await?;
    let (mut coordinator, read) = spawn_coordinator_reading_its_log(&grid)?;
    let Ok(status) = tokio::time::timeout(SETTLE, coordinator.wait()).await else {
        coordinator.kill().await?;
        panic!("the coordinator joined without checking the members' stores:\n{}", read.await?);
    };
    let stderr = read.await?;
    assert_eq!(status?.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot list the members") && stderr.contains("start the coordinator again"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_leaves_when_one_with_another_store_joined_while_it_started() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let nats = grid.nats_client().await?;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let subjects = Subjects::new(grid.prefix.clone());
    // The coordinator asks about its tasks stream right after it first compared the
    // members' stores with its own: a coordinator with another store joins at that moment,
    // as one started at the same instant would.
    let mut stream_requests = nats.subscribe(format!("$JS.API.STREAM.*.{}", subjects.tasks_stream())).await?;
    nats.flush().await?;
    let (mut coordinator, read) = spawn_coordinator_reading_its_log(&grid)?;
    if tokio::time::timeout(SETTLE, stream_requests.next()).await?.is_none() {
        anyhow::bail!("the coordinator never asked about its tasks stream:\n{}", read.await?);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let other = flowgrid_proto::MemberRecord {
        id: "elsewhere-1-0001".into(),
        host: "elsewhere".into(),
        pid: 1,
        started_ms: now,
        heartbeat_ms: now,
        lease_ms: 60_000,
        draining: false,
        catching_up: true,
        shards_serving: 0,
        store: "redb:elsewhere:/data".into(),
        metrics_addr: None,
    };
    let subject = format!("$KV.{}.{}", subjects.members_bucket(), other.id);
    jetstream.publish(subject, rmp_serde::to_vec_named(&other)?.into()).await?.await?;
    let Ok(status) = tokio::time::timeout(SETTLE, coordinator.wait()).await else {
        coordinator.kill().await?;
        panic!("the coordinator joined beside one with another store:\n{}", read.await?);
    };
    let stderr = read.await?;
    assert_eq!(status?.code(), Some(1), "{stderr}");
    assert!(stderr.contains("keeps this grid's shards in redb:elsewhere:/data"), "{stderr}");
    // It left: only the other's record is there.
    let members = jetstream.get_key_value(subjects.members_bucket()).await?;
    let keys: Vec<String> = futures::TryStreamExt::try_collect(members.keys().await?).await?;
    assert_eq!(keys, vec![other.id], "{stderr}");
    Ok(())
}

/// A coordinator that cannot open the submit stream's consumer (a push consumer made by
/// hand under its name) stops with an error naming it, before it joins: no member record
/// is left for the others to place shards on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_cannot_open_the_submit_consumer_stops_without_joining() -> anyhow::Result<()> {
    let grid = Grid::start_nats()?;
    let jetstream = async_nats::jetstream::new(grid.nats_client().await?);
    let subjects = Subjects::new(grid.prefix.clone());
    let submit = broker::submit_stream(&jetstream, &subjects, &BrokerLimits::default()).await?;
    let by_hand = consumer::push::Config {
        durable_name: Some(subjects.submit_consumer()),
        deliver_subject: "by-hand.submits".to_owned(),
        ..Default::default()
    };
    submit.create_consumer(by_hand).await?;
    let (mut coordinator, read) = spawn_coordinator_reading_its_log(&grid)?;
    let Ok(status) = tokio::time::timeout(SETTLE, coordinator.wait()).await else {
        coordinator.kill().await?;
        panic!("the coordinator serves without its submit consumer:\n{}", read.await?);
    };
    let stderr = read.await?;
    assert_eq!(status?.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("consumer {}", subjects.submit_consumer())), "{stderr}");
    let members = jetstream.get_key_value(subjects.members_bucket()).await?;
    let keys: Vec<String> = futures::TryStreamExt::try_collect(members.keys().await?).await?;
    assert!(keys.is_empty(), "member records left behind: {keys:?}\n{stderr}");
    Ok(())
}

/// A coordinator of `grid` started by hand, and the task that reads its log (stderr) to
/// its exit.
fn spawn_coordinator_reading_its_log(
    grid: &Grid,
) -> anyhow::Result<(tokio::process::Child, tokio::task::JoinHandle<String>)> {
    let mut coordinator = tokio::process::Command::new(flowgrid_tests::flowgrid_bin())
        .args(["--nats-url", &grid.nats_url, "--prefix", &grid.prefix, "coordinator", "--metrics-addr", "off"])
        .args(["--shards", &grid.shards.to_string(), "--data-dir"])
        .arg(grid.data_dir())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = coordinator.stderr.take().expect("piped");
    let read = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    Ok((coordinator, read))
}
