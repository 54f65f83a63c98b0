//! The fault schedule: one action every `--fault-interval` (80..120% of it, seeded), in the
//! cycle kill, pause, kill, scale event, or, when a coordinator can be cut off from NATS
//! (the cluster has a network namespace for slot 0), kill, pause, kill, cut, kill, scale event:
//! - kill: kill -9 of a random coordinator (restarted at once);
//! - pause: SIGSTOP of a random coordinator for its lease plus one second, then SIGCONT;
//! - cut: slot 0's coordinator cut off from NATS for its lease plus [`CUT_BEYOND_LEASE`]
//!   (long enough for nats-server to drop its connection), then joined again;
//! - scale event: a coordinator added, or the added one asked to leave (SIGTERM).
//!
//! The cycle is fixed so that a short run sees every kind; the targets and the times come
//! from the seed. A kill, pause or cut only happens while at least three coordinators serve,
//! so that two keep serving.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::chaos::watch::{Cause, Watch};
use crate::grid::{Cluster, CoordinatorProcess};
use crate::service_time::XorShift;

/// Coordinators serving before a kill or pause (two keep serving during it).
const READY_FOR_FAULT_MIN: usize = 3;
/// How long an action waits for enough coordinators to serve before it is skipped.
const READY_WAIT_MAX: Duration = Duration::from_secs(20);
/// A coordinator asked to leave must exit within this; then it is killed.
pub const LEAVE_DEADLINE: Duration = Duration::from_secs(30);
/// A coordinator that exited by itself is restarted, but not sooner than this after its start.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);
/// A cut lasts the coordinator's lease plus this: past the 6-8 s nats-server takes to drop a
/// client that stopped answering its pings, or whose socket stopped taking writes for 2 s
/// (deploy/nats-server.conf).
const CUT_BEYOND_LEASE: Duration = Duration::from_secs(8);
/// Lease assumed when neither the member record nor `--lease-ms` gives one.
pub const LEASE_MS_DEFAULT: u64 = 1_500;

/// Counters of what the schedule did.
#[derive(Default)]
pub struct FaultStats {
    pub kills: AtomicU64,
    pub sigstops: AtomicU64,
    /// Cuts from NATS.
    pub cuts: AtomicU64,
    pub scale_events: AtomicU64,
    /// Actions skipped because too few coordinators were serving.
    pub skipped: AtomicU64,
    /// Coordinators that exited without being killed or asked to leave.
    pub unexpected_exits: AtomicU64,
    /// Coordinators asked to leave that exited with a failure status, or not in time.
    pub leave_failures: AtomicU64,
    /// Shards a kill left to be taken over / a pause left.
    pub shards_orphaned: AtomicU64,
    /// Coordinator processes running (not paused) at the last look.
    pub running: AtomicU64,
    /// Graceful leaves, start to exit, in milliseconds.
    pub leave_ms: std::sync::Mutex<Vec<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Kill,
    Pause,
    Cut,
    ScaleOut,
    ScaleIn,
}

pub struct Schedule {
    pub interval: Duration,
    pub seed: u64,
    /// The base number of coordinators (slots `0..base`); slot `base` is the added one.
    pub base: usize,
    pub lease_ms: Option<u64>,
}

/// Runs the schedule until `until`.
pub async fn run(cluster: &mut Cluster, watch: &Watch, schedule: &Schedule, stats: &FaultStats, until: Instant) {
    let mut random = XorShift::new(schedule.seed);
    let mut step = 0u64;
    loop {
        let wait = schedule.interval.mul_f64(0.8 + 0.4 * random.next_unit());
        let next = Instant::now() + wait;
        // Look after the processes while waiting (unexpected exits, leaves ending).
        while Instant::now() < next.min(until) {
            tend(cluster, watch, stats);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if Instant::now() >= until {
            break;
        }
        // With cuts the cycle is kill, pause, kill, cut, kill, scale; without, kill, pause, kill, scale.
        let cycle = if cluster.cut_slot().is_some() { 6 } else { 4 };
        let action = if step.is_multiple_of(2) {
            Action::Kill
        } else if step % cycle == 1 {
            Action::Pause
        } else if cycle == 6 && step % cycle == 3 {
            Action::Cut
        } else if cluster.coordinators.get(schedule.base).is_some_and(Option::is_some) {
            Action::ScaleIn
        } else {
            Action::ScaleOut
        };
        step += 1;
        if let Err(error) = act(cluster, watch, schedule, stats, action, &mut random).await {
            watch.note(&format!("action {action:?} failed: {error:#}"));
            eprintln!("chaos: {action:?} failed: {error:#}");
        }
    }
    tend(cluster, watch, stats);
}

async fn act(
    cluster: &mut Cluster,
    watch: &Watch,
    schedule: &Schedule,
    stats: &FaultStats,
    action: Action,
    random: &mut XorShift,
) -> Result<()> {
    match action {
        Action::Kill | Action::Pause => {
            let Some(ready) = wait_ready(cluster, watch, stats).await else {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                watch.note(&format!("{action:?} skipped: fewer than {READY_FOR_FAULT_MIN} coordinators serve"));
                return Ok(());
            };
            let slot = ready[(random.next_u64() % ready.len() as u64) as usize];
            let process = cluster.coordinators[slot].as_mut().expect("a ready slot holds a process");
            let pid = process.pid();
            let member = watch.with(|state| state.member_of_pid(pid)).unwrap_or_default();
            if action == Action::Kill {
                let at = Instant::now();
                process.kill_hard();
                let orphaned = watch.expect_takeover(&member, Cause::Kill, at);
                stats.kills.fetch_add(1, Ordering::Relaxed);
                stats.shards_orphaned.fetch_add(orphaned as u64, Ordering::Relaxed);
                watch.note(&format!(
                    "KILL -9 {} pid {pid} member {member}: {orphaned} shards to take over",
                    process.name
                ));
                cluster.coordinators[slot] = None;
                let new_pid = cluster.spawn_coordinator(slot)?;
                watch.note(&format!("RESTART coordinator-{slot} pid {new_pid}"));
            } else {
                let pause = lease_of(watch, schedule, &member) + Duration::from_secs(1);
                let at = Instant::now();
                process.pause()?;
                let orphaned = watch.expect_takeover(&member, Cause::Pause, at);
                stats.sigstops.fetch_add(1, Ordering::Relaxed);
                watch.note(&format!(
                    "SIGSTOP {} pid {pid} member {member} for {pause:?}: {orphaned} shards held",
                    process.name
                ));
                tokio::time::sleep(pause).await;
                let process = cluster.coordinators[slot].as_mut().expect("the paused process stays in its slot");
                process.resume()?;
                watch.resumed(&member, Instant::now());
                watch.note(&format!("SIGCONT {} pid {pid}", process.name));
            }
        }
        Action::Cut => {
            let slot = cluster.cut_slot().expect("a cut is scheduled only when a slot can be cut");
            let ready = wait_ready(cluster, watch, stats).await;
            if !ready.is_some_and(|ready| ready.contains(&slot)) {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                watch.note(&format!("{action:?} skipped: coordinator-{slot} does not serve, or too few others do"));
                return Ok(());
            }
            let process = cluster.coordinators[slot].as_ref().expect("a ready slot holds a process");
            let (pid, name) = (process.pid(), process.name.clone());
            let member = watch.with(|state| state.member_of_pid(pid)).unwrap_or_default();
            let cut_for = lease_of(watch, schedule, &member) + CUT_BEYOND_LEASE;
            let at = Instant::now();
            cluster.set_cut(true)?;
            let orphaned = watch.expect_takeover(&member, Cause::Cut, at);
            stats.cuts.fetch_add(1, Ordering::Relaxed);
            watch.note(&format!(
                "CUT {name} pid {pid} member {member} off from NATS for {cut_for:?}: {orphaned} shards"
            ));
            tokio::time::sleep(cut_for).await;
            cluster.set_cut(false)?;
            watch.rejoined(&member, Instant::now());
            watch.note(&format!("JOINED {name} pid {pid} to NATS again"));
        }
        Action::ScaleOut => {
            let pid = cluster.spawn_coordinator(schedule.base)?;
            stats.scale_events.fetch_add(1, Ordering::Relaxed);
            watch.note(&format!("SCALE OUT coordinator-{} pid {pid}", schedule.base));
        }
        Action::ScaleIn => {
            let Some(mut process) = cluster.coordinators[schedule.base].take() else { return Ok(()) };
            let pid = process.pid();
            let result = process.terminate();
            stats.scale_events.fetch_add(1, Ordering::Relaxed);
            watch.note(&format!("SCALE IN {} pid {pid} (SIGTERM)", process.name));
            cluster.leaving.push(process);
            result?;
        }
    }
    Ok(())
}

/// The lease `member` announced, else `--lease-ms`, else the default.
fn lease_of(watch: &Watch, schedule: &Schedule, member: &str) -> Duration {
    let lease_ms = watch.with(|state| state.lease_ms_of(member)).or(schedule.lease_ms).unwrap_or(LEASE_MS_DEFAULT);
    Duration::from_millis(lease_ms)
}

/// Slots whose coordinator runs, is not paused, and has a member record that is not
/// draining (it may hold no shard yet); `None` when fewer than [`READY_FOR_FAULT_MIN`] are within [`READY_WAIT_MAX`].
async fn wait_ready(cluster: &mut Cluster, watch: &Watch, stats: &FaultStats) -> Option<Vec<usize>> {
    let until = Instant::now() + READY_WAIT_MAX;
    loop {
        tend(cluster, watch, stats);
        let ready = ready_slots(cluster, watch);
        if ready.len() >= READY_FOR_FAULT_MIN {
            return Some(ready);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready_slots(cluster: &mut Cluster, watch: &Watch) -> Vec<usize> {
    let mut ready = Vec::new();
    for (slot, process) in cluster.coordinators.iter_mut().enumerate() {
        let Some(process) = process else { continue };
        if process.is_paused() || process.has_exited() {
            continue;
        }
        let pid = process.pid();
        let member = watch.with(|state| state.members.values().any(|member| member.pid == pid && !member.draining));
        if member {
            ready.push(slot);
        }
    }
    ready
}

/// Restarts coordinators that exited on their own and reaps the ones that were asked to
/// leave; updates the running count.
pub fn tend(cluster: &mut Cluster, watch: &Watch, stats: &FaultStats) {
    for slot in 0..cluster.coordinators.len() {
        let exited = cluster.coordinators[slot].as_mut().is_some_and(CoordinatorProcess::has_exited);
        // One that exits at once is restarted at most every RESTART_BACKOFF.
        let young =
            cluster.coordinators[slot].as_ref().is_some_and(|process| process.started.elapsed() < RESTART_BACKOFF);
        if !exited || young {
            continue;
        }
        let mut process = cluster.coordinators[slot].take().expect("checked above");
        stats.unexpected_exits.fetch_add(1, Ordering::Relaxed);
        let status = process.exit_status().map(|status| status.to_string()).unwrap_or_default();
        watch.note(&format!(
            "UNEXPECTED EXIT {} pid {} ({status}); log {} ends with:\n{}",
            process.name,
            process.pid(),
            process.log.display(),
            process.log_tail(20)
        ));
        eprintln!(
            "chaos: {} (pid {}) exited by itself ({status}); see {}",
            process.name,
            process.pid(),
            process.log.display()
        );
        match cluster.spawn_coordinator(slot) {
            Ok(pid) => watch.note(&format!("RESTART coordinator-{slot} pid {pid}")),
            Err(error) => watch.note(&format!("restart of coordinator-{slot} failed: {error:#}")),
        }
    }
    let mut still_leaving = Vec::new();
    for mut process in std::mem::take(&mut cluster.leaving) {
        let asked = process.leave_requested.unwrap_or(process.started);
        match process.exit_status() {
            Some(status) => {
                let took = asked.elapsed();
                stats.leave_ms.lock().expect("leave times lock").push(took.as_millis() as u64);
                if !status.success() {
                    stats.leave_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("chaos: {} left with {status}; see {}", process.name, process.log.display());
                }
                watch.note(&format!("LEFT {} pid {} ({status}) after {took:?}", process.name, process.pid()));
            }
            None if asked.elapsed() > LEAVE_DEADLINE => {
                stats.leave_failures.fetch_add(1, Ordering::Relaxed);
                watch.note(&format!(
                    "{} pid {} did not leave within {LEAVE_DEADLINE:?} of SIGTERM: killed; log {} ends with:\n{}",
                    process.name,
                    process.pid(),
                    process.log.display(),
                    process.log_tail(20)
                ));
                eprintln!("chaos: {} did not leave within {LEAVE_DEADLINE:?}; killed", process.name);
                process.kill_hard();
            }
            None => still_leaving.push(process),
        }
    }
    cluster.leaving = still_leaving;
    let running = cluster.coordinators.iter().flatten().filter(|process| !process.is_paused()).count();
    stats.running.store(running as u64, Ordering::Relaxed);
}
