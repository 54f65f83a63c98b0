//! A coordinator cut off from NATS by the network while it keeps running: it sits in a
//! Linux network namespace of its own, joined to the host by a veth pair, and the host's
//! end of the pair goes down. Its TCP connection stays open (nothing resets it), as in a
//! real partition. Creating the namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and
//! iproute2's `ip`; without them the test says SKIPPED and why.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flowgrid_sdk::{RunId, RunStatus, StartRun};
use flowgrid_tests::Grid;
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

/// A network namespace and the veth pair that joins it to the host; both are deleted on
/// drop, even when the test fails.
struct Netns {
    name: String,
    host_link: String,
    host_address: String,
}

impl Netns {
    /// Creates the namespace and the pair, with `10.x.y.1` on the host and `10.x.y.2` inside;
    /// `None` (after saying why) when this machine does not allow it.
    fn create(test: &str) -> anyhow::Result<Option<Netns>> {
        let id = std::process::id();
        let (a, b) = (100 + (id / 256) % 100, id % 256);
        let netns = Netns {
            name: format!("flowgrid-e2e-{id}"),
            host_link: format!("fgh{id}"),
            host_address: format!("10.{a}.{b}.1"),
        };
        if let Err(error) = ip(&["netns", "add", &netns.name]) {
            eprintln!(
                "SKIPPED: {test}: a network namespace to cut a coordinator off in needs root and iproute2's `ip` \
                 ({error:#})"
            );
            return Ok(None);
        }
        let inner_link = format!("fgn{id}");
        ip(&["link", "add", &netns.host_link, "type", "veth", "peer", "name", &inner_link])?;
        ip(&["link", "set", &inner_link, "netns", &netns.name])?;
        ip(&["addr", "add", &format!("{}/30", netns.host_address), "dev", &netns.host_link])?;
        ip(&["link", "set", &netns.host_link, "up"])?;
        let inside = |args: &[&str]| ip(&[&["netns", "exec", &netns.name, "ip"], args].concat());
        inside(&["addr", "add", &format!("10.{a}.{b}.2/30"), "dev", &inner_link])?;
        inside(&["link", "set", &inner_link, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(Some(netns))
    }

    /// Cuts the namespace off (`false`) or joins it again (`true`).
    fn set_linked(&self, linked: bool) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_link, if linked { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output().with_context(|| format!("run ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
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
    let Some(netns) = Netns::create("partition")? else { return Ok(()) };
    let mut grid = Grid::start_nats_on("0.0.0.0", "")?;
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 32)?;
    let port = grid.nats_url.rsplit(':').next().context("the grid's port")?.to_owned();
    grid.spawn_coordinator_in_netns(&netns.name, &format!("nats://{}:{port}", netns.host_address))?;
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
