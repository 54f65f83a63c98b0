//! `flowgrid-loadtest chaos`: several coordinators share one grid (one data dir, one
//! nats-server) under a steady load of checkable runs while a seeded schedule kills them
//! (kill -9, restarted at once), pauses them (SIGSTOP past their lease), cuts one off from
//! NATS (a network namespace whose link goes down; root only), adds one and asks it to leave
//! (SIGTERM). Afterwards every accepted run must have succeeded with the output
//! its input implies, and the audit of the stopped grid's store must find no result applied
//! twice and no commit under a stale epoch.
//!
//! Output: a readable summary, then one JSON line whose first keys are `runs_accepted`,
//! `runs_lost`, `results_double_applied`, `stale_epoch_commits`, `kills`,
//! `takeover_ms_p50`, `takeover_ms_p99`. The exit code is non-zero when runs were lost,
//! a result was applied twice or a stale epoch committed (or the audit could not run).

mod faults;
mod load;
mod watch;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use flowgrid_coordinator::audit::{self, Audit};
use flowgrid_sdk::{RunId, RunStatus};
use flowgrid_testkit::Netns;

use crate::args::ChaosArgs;
use crate::grid::{locate_flowgrid_bin, Cluster, ClusterSpec};
use crate::report::{describe_errors, print_table, round1};
use faults::{FaultStats, Schedule};
use load::Ledger;
use watch::Watch;

/// Period of the progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long the grid may take to come up: every coordinator a member, every shard served.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// After the faults, how long the shard claims may take to settle (every shard served).
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
/// How long each coordinator may take to leave at the end.
const FINAL_LEAVE_DEADLINE: Duration = Duration::from_secs(15);
/// Lost runs described in the summary.
const LOST_SHOWN_MAX: usize = 10;

pub async fn chaos(args: ChaosArgs) -> Result<()> {
    args.validate()?;
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        (nanos % 1_000_000_007) as u64
    });
    let flowgrid = locate_flowgrid_bin(args.flowgrid_bin.as_deref())?;
    let mut coordinator_args = Vec::new();
    if let Some(lease_ms) = args.lease_ms {
        coordinator_args.extend(["--lease-ms".to_owned(), lease_ms.to_string()]);
    }
    let spec = ClusterSpec {
        flowgrid: flowgrid.clone(),
        prefix: args.prefix.clone(),
        shards: args.shards,
        coordinator_args,
        keep_dir: args.keep_dir.clone(),
    };
    // Cutting a coordinator off from NATS needs a network namespace, and so root.
    let netns = match Netns::create() {
        Ok(netns) => Some(netns),
        Err(error) => {
            eprintln!(
                "chaos: NO CUTS: cutting a coordinator off from NATS needs a network namespace, which needs root \
                 and iproute2's `ip` ({error:#}); kills, pauses and scale events only"
            );
            None
        }
    };
    let mut cluster = Cluster::start_nats(spec, netns)?;
    let origin = Instant::now();
    eprintln!(
        "chaos: seed {seed}; {} coordinators ({}), {} shards, {} runs/s for {:?}; logs in {}",
        args.coordinators,
        flowgrid.display(),
        args.shards,
        args.rate,
        args.duration,
        cluster.dir().display()
    );

    let outcome = drive(&args, seed, &mut cluster, origin).await;
    let failed = match &outcome {
        Ok(verdict) => !verdict.passed(),
        Err(_) => true,
    };
    if failed && args.keep_dir.is_none() {
        let kept = cluster.keep_dir();
        eprintln!("chaos: logs, timeline and data kept in {}", kept.display());
    }
    let verdict = outcome?;
    if !verdict.passed() {
        bail!("chaos found problems: {}", verdict.failures.join("; "));
    }
    Ok(())
}

/// What decides the exit code.
struct Verdict {
    failures: Vec<String>,
}

impl Verdict {
    fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

async fn drive(args: &ChaosArgs, seed: u64, cluster: &mut Cluster, origin: Instant) -> Result<Verdict> {
    // The first coordinator alone writes the grid's settings; the others join it.
    cluster.spawn_coordinator(0)?;
    cluster.wait_until_serving().await?;
    for slot in 1..args.coordinators {
        cluster.spawn_coordinator(slot)?;
    }
    let watch =
        Watch::start(cluster.connect("flowgrid-chaos-watch").await?, &args.prefix, origin, cluster.dir()).await?;
    wait_for_grid(cluster, &watch, args.coordinators, args.shards).await?;
    watch.note("grid up");

    let client = cluster.client("flowgrid-chaos-client").await?.with_request_timeout(load::REQUEST_TIMEOUT);
    client.deploy(load::CHILD_DEFINITION).await.context("deploy the chaos flow's child")?;
    client.deploy(load::HANDLER_DEFINITION).await.context("deploy the chaos flow's failure handler")?;
    let events = async_nats::jetstream::stream::Config {
        name: load::EVENTS_STREAM.to_owned(),
        subjects: vec![load::EVENTS_SUBJECT.to_owned()],
        ..Default::default()
    };
    client.jetstream().get_or_create_stream(events).await.context("create the chaos events stream")?;
    client.deploy(load::DEFINITION).await.context("deploy the chaos flow")?;
    wait_for_trigger(&client, &args.prefix).await?;
    cluster.spawn_workers(args.workers, load::POOL, args.worker_concurrency)?;

    let ledger = Arc::new(Ledger::default());
    let stop_load = CancellationToken::new();
    let starter = tokio::spawn(load::start_loop(client.clone(), seed, args.rate, ledger.clone(), stop_load.clone()));
    let poller = tokio::spawn(load::poll_loop(client.clone(), ledger.clone(), stop_load.clone()));
    let stats = FaultStats::default();
    let load_started = Instant::now();
    let until = load_started + args.duration;
    let schedule = Schedule { interval: args.fault_interval, seed, base: args.coordinators, lease_ms: args.lease_ms };
    watch.note(&format!("load and faults start (seed {seed})"));
    tokio::join!(
        faults::run(cluster, &watch, &schedule, &stats, until),
        progress(origin, &watch, &ledger, &stats, until)
    );
    let faults_s = load_started.elapsed().as_secs_f64();

    // The load stops; starts in flight get their answer.
    watch.note("faults end; load stops");
    stop_load.cancel();
    let _ = starter.await;
    let _ = poller.await;
    eprintln!(
        "chaos: faults over after {faults_s:.0} s; waiting up to {:?} for {} accepted runs to finish",
        args.drain,
        ledger.unfinished()
    );
    let unfinished = load::poll_until_finished(&client, &ledger, args.drain).await;
    watch.note(&format!("drained: {unfinished} runs not seen finished"));
    let settled = settle(cluster, &watch, &stats, args.shards).await;

    let workers_exited = cluster.workers_exited();
    cluster.stop_workers(Duration::from_secs(5));
    let stopped = stop_coordinators(cluster, &watch).await;
    cluster.stop_nats();
    eprintln!("chaos: coordinators stopped; auditing {}", cluster.data_dir().display());
    let audited = audit::audit_runs(&cluster.data_dir(), args.shards).await;
    if let Err(error) = &audited {
        eprintln!("chaos: the audit failed: {error}");
    }

    let findings = Findings {
        args,
        seed,
        faults_s,
        ledger: &ledger,
        stats: &stats,
        watch: &watch,
        audit: audited.as_ref().ok(),
        audit_error: audited.as_ref().err().map(ToString::to_string),
        settled,
        stopped,
        workers_exited,
    };
    Ok(findings.report())
}

/// Waits until the chaos flow's trigger reads its stream: it starts runs for the messages
/// published from then on.
async fn wait_for_trigger(client: &flowgrid_sdk::Client, prefix: &str) -> Result<()> {
    let consumer = flowgrid_proto::Subjects::new(prefix.to_owned()).trigger_consumer(load::FLOW);
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Ok(stream) = client.jetstream().get_stream(load::EVENTS_STREAM).await {
            if stream.consumer_info(&consumer).await.is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the chaos flow's trigger did not create its consumer {consumer} within {STARTUP_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `coordinators` members are known and every shard is served.
async fn wait_for_grid(cluster: &mut Cluster, watch: &Watch, coordinators: usize, shards: u32) -> Result<()> {
    let until = Instant::now() + STARTUP_DEADLINE;
    loop {
        let (members, not_serving) = watch
            .with(|state| (state.members.values().filter(|m| !m.draining).count(), state.shards_not_serving(shards)));
        if members >= coordinators && not_serving.is_empty() {
            return Ok(());
        }
        let exited: Vec<String> = cluster
            .coordinators
            .iter_mut()
            .flatten()
            .filter_map(|process| process.has_exited().then(|| process.name.clone()))
            .collect();
        if !exited.is_empty() || Instant::now() > until {
            bail!(
                "the grid did not come up within {STARTUP_DEADLINE:?}: {members} of {coordinators} coordinators are \
                 members, {} shards not served (first: {:?}), exited: {exited:?}\n{}",
                not_serving.len(),
                not_serving.iter().take(8).collect::<Vec<_>>(),
                cluster.coordinator_logs(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the grid looked once the faults were over and it had had time to settle.
struct Settled {
    not_serving: Vec<u32>,
    /// Takeovers a kill made expected that never happened.
    pending_takeovers: usize,
    /// Live members still catching up.
    catching_up: Vec<String>,
    /// Members back from a cut that serve no shard yet: waited for, so that the last cut
    /// is timed too, but not a failure.
    rejoined_not_serving: Vec<String>,
}

impl Settled {
    fn is_settled(&self) -> bool {
        self.not_serving.is_empty()
            && self.pending_takeovers == 0
            && self.catching_up.is_empty()
            && self.rejoined_not_serving.is_empty()
    }
}

/// Waits (bounded) until every shard is served, every takeover a kill expected has
/// happened, no live member is catching up any more and every member back from a cut
/// serves a shard again.
async fn settle(cluster: &mut Cluster, watch: &Watch, stats: &FaultStats, shards: u32) -> Settled {
    let until = Instant::now() + SETTLE_DEADLINE;
    loop {
        faults::tend(cluster, watch, stats);
        let settled = watch.with(|state| Settled {
            not_serving: state.shards_not_serving(shards),
            pending_takeovers: state.pending_kill_takeovers(),
            catching_up: state.members_catching_up(),
            rejoined_not_serving: state.rejoined_not_serving(),
        });
        if settled.is_settled() || Instant::now() > until {
            if !settled.is_settled() {
                let detail = watch.with(|state| {
                    let claims: Vec<String> = settled
                        .not_serving
                        .iter()
                        .map(|shard| format!("shard-{shard}: {:?}", state.claims.get(shard)))
                        .collect();
                    format!(
                        "not served: {}; takeovers expected: {:?}; members catching up: {:?}; back from a cut and \
                         serving nothing: {:?}",
                        claims.join(", "),
                        state.pending_takeovers(),
                        settled.catching_up,
                        settled.rejoined_not_serving
                    )
                });
                watch.note(&format!("the grid did not settle within {SETTLE_DEADLINE:?}: {detail}"));
                eprintln!("chaos: the grid did not settle within {SETTLE_DEADLINE:?}: {detail}");
            }
            return settled;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the final graceful stop went.
#[derive(Default)]
struct Stopped {
    asked: usize,
    clean: usize,
    /// Descriptions of coordinators that exited with a failure or had to be killed.
    failures: Vec<String>,
    leave_ms: Vec<u64>,
}

/// Asks every coordinator to leave (SIGTERM), one after the other, each within
/// [`FINAL_LEAVE_DEADLINE`]; kills the ones that do not.
async fn stop_coordinators(cluster: &mut Cluster, watch: &Watch) -> Stopped {
    let mut stopped = Stopped::default();
    let mut processes: Vec<_> = cluster.coordinators.iter_mut().filter_map(Option::take).collect();
    processes.append(&mut cluster.leaving);
    for mut process in processes {
        if process.has_exited() {
            let status = process.exit_status().map(|status| status.to_string()).unwrap_or_default();
            stopped.failures.push(format!("{} had exited before the final stop ({status})", process.name));
            continue;
        }
        stopped.asked += 1;
        let asked_at = Instant::now();
        if process.leave_requested.is_none() {
            if let Err(error) = process.terminate() {
                stopped.failures.push(format!("{}: SIGTERM failed: {error:#}", process.name));
            }
        }
        let from = process.leave_requested.unwrap_or(asked_at);
        while !process.has_exited() && from.elapsed() < FINAL_LEAVE_DEADLINE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match process.exit_status() {
            Some(status) if status.success() => {
                stopped.clean += 1;
                stopped.leave_ms.push(from.elapsed().as_millis() as u64);
                watch.note(&format!("final stop: {} pid {} left ({status})", process.name, process.pid()));
            }
            Some(status) => {
                stopped.failures.push(format!(
                    "{} exited with {status} on SIGTERM; log {}",
                    process.name,
                    process.log.display()
                ));
                watch.note(&format!("final stop: {} exited with {status}:\n{}", process.name, process.log_tail(20)));
            }
            None => {
                stopped.failures.push(format!(
                    "{} did not exit within {FINAL_LEAVE_DEADLINE:?} of SIGTERM (killed); log {}",
                    process.name,
                    process.log.display()
                ));
                watch.note(&format!(
                    "final stop: {} did not exit within {FINAL_LEAVE_DEADLINE:?}; log ends with:\n{}",
                    process.name,
                    process.log_tail(20)
                ));
                process.kill_hard();
            }
        }
    }
    stopped
}

/// The progress line every [`PROGRESS_EVERY`] until `until`.
async fn progress(origin: Instant, watch: &Watch, ledger: &Ledger, stats: &FaultStats, until: Instant) {
    loop {
        let next = (Instant::now() + PROGRESS_EVERY).min(until);
        tokio::time::sleep_until(next.into()).await;
        let (last, p50, pause_n, handoffs) = watch.with(|state| {
            (
                state.last_takeover_ms,
                percentile(&state.takeover_ms, 0.5),
                state.pause_takeover_ms.len(),
                state.handoff_ms.len(),
            )
        });
        eprintln!(
            "[{:>6.1}s] runs accepted {} finished {} open {} | start errors {} | kills {} sigstops {} cuts {} scale {} \
             | takeover last {} p50 {} | pause takeovers {pause_n} hand-overs {handoffs} | coordinators up {}",
            origin.elapsed().as_secs_f64(),
            ledger.accepted.load(Ordering::Relaxed),
            ledger.finished.load(Ordering::Relaxed),
            ledger.unfinished(),
            ledger.start_errors.total(),
            stats.kills.load(Ordering::Relaxed),
            stats.sigstops.load(Ordering::Relaxed),
            stats.cuts.load(Ordering::Relaxed),
            stats.scale_events.load(Ordering::Relaxed),
            describe_ms(last),
            describe_ms(p50),
            stats.running.load(Ordering::Relaxed),
        );
        if Instant::now() >= until {
            return;
        }
    }
}

fn describe_ms(value: Option<u64>) -> String {
    value.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "-".to_owned())
}

/// The nearest-rank percentile of `values`; `None` when empty.
fn percentile(values: &[u64], quantile: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Everything the end of a run looks at.
struct Findings<'a> {
    args: &'a ChaosArgs,
    seed: u64,
    faults_s: f64,
    ledger: &'a Ledger,
    stats: &'a FaultStats,
    watch: &'a Watch,
    audit: Option<&'a Audit>,
    audit_error: Option<String>,
    settled: Settled,
    stopped: Stopped,
    workers_exited: Vec<String>,
}

/// Per accepted run: lost or not, and why.
#[derive(Default)]
struct RunChecks {
    lost: u64,
    wrong_output: u64,
    missing_from_store: u64,
    not_succeeded: BTreeMap<String, u64>,
    /// The API's last view disagrees with the store.
    api_store_mismatches: u64,
    /// Runs whose steps took more than one attempt in all (a retry after a timeout).
    retried: u64,
    lost_examples: Vec<String>,
}

/// The failure handler runs of the cancelled runs, as the store holds them.
#[derive(Default)]
struct HandlerChecks {
    /// Runs the grid answered were cancelled.
    cancelled: u64,
    /// Of them, with their handler run in the store.
    started: u64,
    /// Of them, with their handler's start still in an outbox (the shard's next owner sends it).
    pending: u64,
    /// Of them, with neither: a handler start lost.
    missing: Vec<RunId>,
    /// Handler runs in the store for no cancelled run (or under another id than the one
    /// their idempotency key gives).
    unexpected: u64,
}

impl Findings<'_> {
    /// Exactly one handler run per cancelled run: each in the store under the id its
    /// idempotency key gives, or its start still in an outbox; none for any other run.
    fn check_handlers(&self, audit: &Audit) -> HandlerChecks {
        let cancelled = self.ledger.cancelled.lock().expect("ledger lock").clone();
        let mut checks = HandlerChecks { cancelled: cancelled.len() as u64, ..HandlerChecks::default() };
        let expected: HashSet<RunId> = cancelled.iter().map(load::handler_run_id).collect();
        for run_id in &cancelled {
            if audit.runs.contains_key(&load::handler_run_id(run_id)) {
                checks.started += 1;
            } else if audit.handler_starts_left.contains(&(run_id.clone(), 0)) {
                checks.pending += 1;
            } else {
                checks.missing.push(run_id.clone());
            }
        }
        checks.unexpected = audit
            .runs
            .values()
            .filter(|facts| facts.flow == load::HANDLER_FLOW && !expected.contains(&facts.run_id))
            .count() as u64;
        checks
    }

    fn check_runs(&self) -> RunChecks {
        let mut checks = RunChecks::default();
        let runs = self.ledger.runs.lock().expect("ledger lock");
        for run in runs.iter() {
            if run.outcome.as_ref().is_some_and(|outcome| outcome.attempts > load::ATTEMPTS_WITHOUT_RETRIES) {
                checks.retried += 1;
            }
            // The store is the truth; without an audit, the API's last view stands in.
            let (status, output, source) = match self.audit {
                Some(audit) => match audit.runs.get(&run.run_id) {
                    Some(facts) => (facts.status, facts.output.clone(), "store"),
                    None => (None, None, "store"),
                },
                None => match &run.outcome {
                    Some(outcome) => (Some(outcome.status), outcome.output.clone(), "api"),
                    None => (None, None, "api"),
                },
            };
            if let (Some(audit), Some(outcome)) = (self.audit, &run.outcome) {
                if let Some(facts) = audit.runs.get(&run.run_id) {
                    if facts.status != Some(outcome.status) || facts.output != outcome.output {
                        checks.api_store_mismatches += 1;
                    }
                }
            }
            let reason = match status {
                None => {
                    checks.missing_from_store += 1;
                    Some(format!("not found ({source})"))
                }
                Some(RunStatus::Succeeded) if output.as_ref() == Some(&run.expected) => None,
                Some(RunStatus::Succeeded) => {
                    checks.wrong_output += 1;
                    Some(format!(
                        "succeeded with output {} instead of {}",
                        output.map(|value| value.to_string()).unwrap_or_else(|| "none".to_owned()),
                        run.expected
                    ))
                }
                Some(other) => {
                    *checks.not_succeeded.entry(other.as_str().to_owned()).or_default() += 1;
                    let error = run.outcome.as_ref().and_then(|outcome| outcome.error.clone()).unwrap_or_default();
                    Some(format!("{} ({source}) {error}", other.as_str()))
                }
            };
            if let Some(reason) = reason {
                checks.lost += 1;
                if checks.lost_examples.len() < LOST_SHOWN_MAX {
                    let age = run.accepted_at.elapsed().as_secs_f64();
                    checks.lost_examples.push(format!(
                        "run {} (start #{}, accepted {age:.0} s before the end): {reason}",
                        run.run_id, run.index
                    ));
                }
            }
        }
        checks
    }

    fn report(self) -> Verdict {
        let checks = self.check_runs();
        let (takeover, pause_takeover, cut_takeover, handoff, serving_again) = self.watch.with(|state| {
            (
                state.takeover_ms.clone(),
                state.pause_takeover_ms.clone(),
                state.cut_takeover_ms.clone(),
                state.handoff_ms.clone(),
                state.serving_again_ms.clone(),
            )
        });
        let (claim_changes, watch_errors, undecodable, taken_from_live) = self
            .watch
            .with(|state| (state.claim_changes, state.watch_errors, state.undecodable, state.taken_from_live.clone()));
        let stats = self.stats;
        let kills = stats.kills.load(Ordering::Relaxed);
        let accepted = self.ledger.accepted.load(Ordering::Relaxed);
        let finished = self.ledger.finished.load(Ordering::Relaxed);
        let report = self.audit.map(|audit| &audit.report);
        let double_applied = report.map(|report| report.results_double_applied);
        let stale_epochs = report.map(|report| report.stale_epoch_commits);
        let leave_ms = stats.leave_ms.lock().expect("leave times lock").clone();

        let mut failures = Vec::new();
        if checks.lost > 0 {
            failures.push(format!("{} of {accepted} accepted runs lost", checks.lost));
        }
        match (double_applied, stale_epochs) {
            (Some(double), Some(stale)) => {
                if double > 0 {
                    failures.push(format!("{double} results applied twice"));
                }
                if stale > 0 {
                    failures.push(format!("{stale} commits under a stale epoch"));
                }
            }
            _ => failures.push(format!(
                "the audit could not run: {}",
                self.audit_error.clone().unwrap_or_else(|| "unknown error".to_owned())
            )),
        }
        let handlers = self.audit.map(|audit| self.check_handlers(audit));
        if let Some(handlers) = &handlers {
            if !handlers.missing.is_empty() {
                failures.push(format!(
                    "{} cancelled runs without their failure handler run (first: {})",
                    handlers.missing.len(),
                    handlers.missing[0]
                ));
            }
            if handlers.unexpected > 0 {
                failures.push(format!("{} failure handler runs for no cancelled run", handlers.unexpected));
            }
        }
        let settled = &self.settled;
        if !settled.not_serving.is_empty() {
            failures.push(format!("{} shards not served at the end", settled.not_serving.len()));
        }
        if !settled.catching_up.is_empty() {
            failures.push(format!("coordinators still catching up at the end: {}", settled.catching_up.join(", ")));
        }

        let start_errors = self.ledger.start_errors.kinds();
        let get_errors = self.ledger.get_errors.kinds();
        let ms = |values: &[u64]| {
            format!(
                "p50 {}  p99 {}  max {}  ({} samples)",
                describe_ms(percentile(values, 0.5)),
                describe_ms(percentile(values, 0.99)),
                describe_ms(values.iter().max().copied()),
                values.len()
            )
        };
        let mut rows = vec![
            (
                "grid".to_owned(),
                format!(
                    "{} coordinators (+1 added at times), {} shards, {} workers, seed {}",
                    self.args.coordinators, self.args.shards, self.args.workers, self.seed
                ),
            ),
            (
                "load".to_owned(),
                format!(
                    "{} runs/s for {:.0} s (3 doublings with a 300 ms wait before the last, which runs in a child run)",
                    self.args.rate, self.faults_s
                ),
            ),
            ("runs accepted / finished".to_owned(), format!("{accepted} / {finished} (seen ended through the API)")),
            (
                "runs lost".to_owned(),
                format!(
                    "{} (missing {}, wrong output {}, not succeeded {:?})",
                    checks.lost, checks.missing_from_store, checks.wrong_output, checks.not_succeeded
                ),
            ),
            ("runs retried (attempt timeout)".to_owned(), checks.retried.to_string()),
            (
                "runs started by events".to_owned(),
                format!(
                    "{} (messages on {} that the flow's trigger starts)",
                    self.ledger.triggered.load(Ordering::Relaxed),
                    load::EVENTS_STREAM
                ),
            ),
            (
                "runs cancelled and redriven".to_owned(),
                format!(
                    "{} (one in {}; not done in time: {})",
                    self.ledger.redriven.load(Ordering::Relaxed),
                    load::REDRIVE_EVERY,
                    describe_errors(self.ledger.redrive_errors.total(), &self.ledger.redrive_errors.kinds())
                ),
            ),
            (
                "failure handler runs".to_owned(),
                match &handlers {
                    Some(handlers) => format!(
                        "{} for {} cancelled runs ({} starts still in outboxes; missing {}, unexpected {})",
                        handlers.started,
                        handlers.cancelled,
                        handlers.pending,
                        handlers.missing.len(),
                        handlers.unexpected
                    ),
                    None => "not checked (no audit)".to_owned(),
                },
            ),
            (
                "runs paused and resumed".to_owned(),
                format!(
                    "{} (one in {}; not done in time: {})",
                    self.ledger.paused.load(Ordering::Relaxed),
                    load::REDRIVE_EVERY,
                    describe_errors(self.ledger.pause_errors.total(), &self.ledger.pause_errors.kinds())
                ),
            ),
            ("run.get errors (asked again)".to_owned(), describe_errors(self.ledger.get_errors.total(), &get_errors)),
            ("API view != store".to_owned(), checks.api_store_mismatches.to_string()),
            (
                "start errors".to_owned(),
                format!(
                    "{} (retried and then accepted: {})",
                    describe_errors(self.ledger.start_errors.total(), &start_errors),
                    self.ledger.start_retried.load(Ordering::Relaxed)
                ),
            ),
            (
                "faults".to_owned(),
                format!(
                    "{kills} kills, {} sigstops, {} cuts from NATS, {} scale events, {} skipped",
                    stats.sigstops.load(Ordering::Relaxed),
                    stats.cuts.load(Ordering::Relaxed),
                    stats.scale_events.load(Ordering::Relaxed),
                    stats.skipped.load(Ordering::Relaxed)
                ),
            ),
            ("takeover after kill".to_owned(), ms(&takeover)),
            ("takeover after pause".to_owned(), ms(&pause_takeover)),
            ("takeover after cut from NATS".to_owned(), ms(&cut_takeover)),
            ("hand-over".to_owned(), ms(&handoff)),
            ("serving again after a cut".to_owned(), ms(&serving_again)),
            ("graceful leave (scale-in)".to_owned(), ms(&leave_ms)),
            (
                "coordinator trouble".to_owned(),
                format!(
                    "{} exited by themselves, {} leaves failed; final stop: {} of {} clean, slowest {}",
                    stats.unexpected_exits.load(Ordering::Relaxed),
                    stats.leave_failures.load(Ordering::Relaxed),
                    self.stopped.clean,
                    self.stopped.asked,
                    describe_ms(self.stopped.leave_ms.iter().max().copied())
                ),
            ),
            (
                "claims at the end".to_owned(),
                format!(
                    "{} shards not served, {} takeovers never seen, {claim_changes} changes watched, {} coordinators \
                     still catching up",
                    settled.not_serving.len(),
                    settled.pending_takeovers,
                    settled.catching_up.len()
                ),
            ),
            (
                "claims taken from live members".to_owned(),
                format!("{} (neither killed, paused nor cut off by the harness)", taken_from_live.len()),
            ),
        ];
        match report {
            Some(report) => {
                rows.push((
                    "audit".to_owned(),
                    format!(
                        "{} runs in {} shard files, {:?}; gaps {}, double-applied {}, stale epochs {}, \
                         concurrency slots lost {}, problems {}; outbox messages left {}",
                        report.runs,
                        report.shard_files,
                        report.runs_by_status,
                        report.history_gaps,
                        report.results_double_applied,
                        report.stale_epoch_commits,
                        report.gate_places_leaked,
                        report.problems_total,
                        report.outbox_messages_left
                    ),
                ));
            }
            None => {
                rows.push(("audit".to_owned(), format!("failed: {}", self.audit_error.clone().unwrap_or_default())))
            }
        }
        print_table("flowgrid chaos", &rows);
        if !checks.lost_examples.is_empty() {
            println!("lost runs (first {}):", checks.lost_examples.len());
            for example in &checks.lost_examples {
                println!("  {example}");
            }
        }
        if let Some(report) = report {
            if !report.problems.is_empty() {
                println!("audit problems (first {} of {}):", report.problems.len(), report.problems_total);
                for problem in &report.problems {
                    println!("  {problem}");
                }
            }
        }
        if !taken_from_live.is_empty() {
            println!("claims taken from live members (first {}):", taken_from_live.len().min(LOST_SHOWN_MAX));
            for (shard, from, to) in taken_from_live.iter().take(LOST_SHOWN_MAX) {
                println!("  shard-{shard}: from {from} to {to}");
            }
        }
        for failure in &self.stopped.failures {
            println!("final stop: {failure}");
        }
        if !self.workers_exited.is_empty() {
            println!("workers that exited by themselves: {:?}", self.workers_exited);
        }
        if watch_errors > 0 || undecodable > 0 {
            println!("claim watch: {watch_errors} errors, {undecodable} records that did not decode");
        }
        println!();

        let percentile_value = |values: &[u64], quantile| json!(percentile(values, quantile));
        let fields: Vec<(&str, Value)> = vec![
            ("runs_accepted", json!(accepted)),
            ("runs_lost", json!(checks.lost)),
            ("results_double_applied", json!(double_applied)),
            ("stale_epoch_commits", json!(stale_epochs)),
            ("kills", json!(kills)),
            ("takeover_ms_p50", percentile_value(&takeover, 0.5)),
            ("takeover_ms_p99", percentile_value(&takeover, 0.99)),
            ("takeover_ms_max", json!(takeover.iter().max())),
            ("takeovers", json!(takeover.len())),
            ("pause_takeover_ms_p50", percentile_value(&pause_takeover, 0.5)),
            ("pause_takeover_ms_p99", percentile_value(&pause_takeover, 0.99)),
            ("cuts", json!(stats.cuts.load(Ordering::Relaxed))),
            ("cut_takeover_ms_p50", percentile_value(&cut_takeover, 0.5)),
            ("cut_takeover_ms_p99", percentile_value(&cut_takeover, 0.99)),
            ("handoff_ms_p50", percentile_value(&handoff, 0.5)),
            ("handoff_ms_p99", percentile_value(&handoff, 0.99)),
            ("handoffs", json!(handoff.len())),
            ("serving_again_ms_p50", percentile_value(&serving_again, 0.5)),
            ("serving_again_ms_max", json!(serving_again.iter().max())),
            ("runs_finished", json!(finished)),
            ("runs_wrong_output", json!(checks.wrong_output)),
            ("runs_missing", json!(checks.missing_from_store)),
            ("runs_not_succeeded", json!(checks.not_succeeded)),
            ("runs_retried", json!(checks.retried)),
            ("api_store_mismatches", json!(checks.api_store_mismatches)),
            ("start_errors", json!(self.ledger.start_errors.total())),
            ("runs_redriven", json!(self.ledger.redriven.load(Ordering::Relaxed))),
            ("failure_handlers_started", json!(handlers.as_ref().map(|handlers| handlers.started))),
            ("failure_handlers_missing", json!(handlers.as_ref().map(|handlers| handlers.missing.len()))),
            ("runs_triggered", json!(self.ledger.triggered.load(Ordering::Relaxed))),
            ("redrive_errors", json!(self.ledger.redrive_errors.total())),
            ("runs_paused", json!(self.ledger.paused.load(Ordering::Relaxed))),
            ("pause_errors", json!(self.ledger.pause_errors.total())),
            ("get_errors", json!(self.ledger.get_errors.total())),
            ("sigstops", json!(stats.sigstops.load(Ordering::Relaxed))),
            ("scale_events", json!(stats.scale_events.load(Ordering::Relaxed))),
            ("faults_skipped", json!(stats.skipped.load(Ordering::Relaxed))),
            ("unexpected_exits", json!(stats.unexpected_exits.load(Ordering::Relaxed))),
            (
                "leave_failures",
                json!(stats.leave_failures.load(Ordering::Relaxed) + self.stopped.failures.len() as u64),
            ),
            ("shards_not_serving", json!(settled.not_serving.len())),
            ("members_catching_up", json!(settled.catching_up.len())),
            ("claims_taken_from_live", json!(taken_from_live.len())),
            ("final_stop_ms_max", json!(self.stopped.leave_ms.iter().max())),
            ("audit_problems", json!(report.map(|report| report.problems_total))),
            ("history_gaps", json!(report.map(|report| report.history_gaps))),
            ("outbox_messages_left", json!(report.map(|report| report.outbox_messages_left))),
            ("gate_places_leaked", json!(report.map(|report| report.gate_places_leaked))),
            ("coordinators", json!(self.args.coordinators)),
            ("shards", json!(self.args.shards)),
            ("rate", json!(self.args.rate)),
            ("seed", json!(self.seed)),
            ("duration_s", json!(round1(self.faults_s))),
        ];
        println!("{}", ordered_json_line(&fields));
        Verdict { failures }
    }
}

/// One JSON object with the keys in the order given.
fn ordered_json_line(fields: &[(&str, Value)]) -> String {
    let parts: Vec<String> =
        fields.iter().map(|(key, value)| format!("{}:{}", Value::String((*key).to_owned()), value)).collect();
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.99), Some(7));
        let values: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&values, 0.5), Some(50));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
    }

    #[test]
    fn the_json_line_keeps_the_key_order() {
        let line = ordered_json_line(&[("runs_accepted", json!(3)), ("kills", json!(1)), ("a", json!(null))]);
        assert_eq!(line, r#"{"runs_accepted":3,"kills":1,"a":null}"#);
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["kills"], 1);
    }
}
