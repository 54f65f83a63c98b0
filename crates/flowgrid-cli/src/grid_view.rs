//! What `flowgrid members`, `shards` and `status` show, computed from one snapshot of the
//! members and shards buckets. Pure: the caller reads the buckets and the clock.
//!
//! Liveness is judged here the way an outside reader can: a member is alive while
//! `now - heartbeat_ms <= lease_ms` (wall clocks, so only exact on one host), draining
//! when it is alive and says so, dead otherwise. A shard has a live owner when its claim
//! names an alive or draining member and is not released; every other shard is unowned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use flowgrid_model::Millis;
use flowgrid_proto::{GridConfig, MemberRecord, ShardClaim, ShardState, WorkerRecord, PRIORITY_DEFAULT};

use crate::output::{duration_ms, Table};

/// Groups of consecutive shards printed in one "unowned" line before the rest is elided.
const SHARD_GROUPS_SHOWN_MAX: usize = 24;

/// A member as others see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Alive,
    /// Alive, but not watching the buckets yet (starting, or back after losing NATS): it
    /// keeps the shards it serves and is given no others.
    CatchingUp,
    Draining,
    Dead,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::CatchingUp => "catching-up",
            MemberState::Draining => "draining",
            MemberState::Dead => "dead",
        }
    }

    /// Alive or draining: it still holds (or hands over) its shards.
    pub fn is_live(self) -> bool {
        self != MemberState::Dead
    }
}

/// The state of `record` at wall-clock time `now_ms`.
pub fn member_state(record: &MemberRecord, now_ms: Millis) -> MemberState {
    if now_ms.saturating_sub(record.heartbeat_ms) > record.lease_ms {
        MemberState::Dead
    } else if record.draining {
        MemberState::Draining
    } else if record.catching_up {
        MemberState::CatchingUp
    } else {
        MemberState::Alive
    }
}

/// What the members and shards buckets held at `now_ms`.
#[derive(Clone, Debug, Default)]
pub struct GridSnapshot {
    pub now_ms: Millis,
    pub members: Vec<MemberRecord>,
    /// `None` while no coordinator has written the grid's settings.
    pub grid: Option<GridConfig>,
    pub claims: BTreeMap<u32, ShardClaim>,
}

impl GridSnapshot {
    fn states(&self) -> BTreeMap<&str, MemberState> {
        self.members.iter().map(|record| (record.id.as_str(), member_state(record, self.now_ms))).collect()
    }

    /// Shards of the grid: from its settings, else as many as there are claims for.
    pub fn shard_count(&self) -> u32 {
        match &self.grid {
            Some(grid) => grid.shards,
            None => self.claims.keys().next_back().map_or(0, |last| last + 1),
        }
    }

    /// The live owner of `claim`, if it has one.
    fn live_owner<'a>(&self, claim: &'a ShardClaim, states: &BTreeMap<&str, MemberState>) -> Option<&'a str> {
        let owner = claim.owner.as_deref()?;
        let live = claim.state != ShardState::Released && states.get(owner).is_some_and(|state| state.is_live());
        live.then_some(owner)
    }
}

/// One member with what a reader derives from its record (`flowgrid members --json`).
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    #[serde(flatten)]
    pub record: MemberRecord,
    pub state: MemberState,
    pub heartbeat_age_ms: u64,
    /// Since start; for a dead member, until its last heartbeat.
    pub uptime_ms: u64,
}

/// Every member, sorted by id.
pub fn member_views(snapshot: &GridSnapshot) -> Vec<MemberView> {
    let mut views: Vec<MemberView> = snapshot
        .members
        .iter()
        .map(|record| {
            let state = member_state(record, snapshot.now_ms);
            let until = if state == MemberState::Dead { record.heartbeat_ms } else { snapshot.now_ms };
            MemberView {
                record: record.clone(),
                state,
                heartbeat_age_ms: snapshot.now_ms.saturating_sub(record.heartbeat_ms),
                uptime_ms: until.saturating_sub(record.started_ms),
            }
        })
        .collect();
    views.sort_by(|left, right| left.record.id.cmp(&right.record.id));
    views
}

pub fn members_table(views: &[MemberView]) -> Table {
    let mut table = Table::new(&["ID", "HOST", "PID", "STATE", "SHARDS", "HEARTBEAT", "UPTIME", "METRICS"]);
    for view in views {
        let record = &view.record;
        table.row(vec![
            record.id.clone(),
            record.host.clone(),
            record.pid.to_string(),
            view.state.as_str().to_owned(),
            // A dead member's record keeps the count of its last heartbeat; it serves none.
            if view.state == MemberState::Dead { "-".to_owned() } else { record.shards_serving.to_string() },
            age(view.heartbeat_age_ms),
            duration_ms(view.uptime_ms),
            record.metrics_addr.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    table
}

/// `flowgrid workers`: one line per live worker of a pool.
pub fn workers_table(workers: &[WorkerRecord], now_ms: Millis) -> Table {
    let mut table =
        Table::new(&["POOL", "HOST", "PID", "RUNNING", "CONCURRENCY", "TASKS DONE", "UPTIME", "HEARTBEAT", "SDK"]);
    for worker in workers {
        table.row(vec![
            worker.pool.clone(),
            worker.host.clone(),
            worker.pid.to_string(),
            worker.running.to_string(),
            worker.concurrency.to_string(),
            worker.tasks_done.to_string(),
            duration_ms(now_ms.saturating_sub(worker.started_ms)),
            age(now_ms.saturating_sub(worker.heartbeat_ms)),
            worker.sdk.clone(),
        ]);
    }
    table
}

/// One line of `flowgrid status`: the live workers, by pool.
pub fn render_workers_summary(workers: &[WorkerRecord]) -> String {
    let mut by_pool: BTreeMap<&str, (u32, u32, u32)> = BTreeMap::new();
    for worker in workers {
        let (count, running, concurrency) = by_pool.entry(&worker.pool).or_default();
        *count += 1;
        *running += worker.running;
        *concurrency += worker.concurrency;
    }
    if by_pool.is_empty() {
        return "workers: none listed (`flowgrid workers`)\n".to_owned();
    }
    let pools: Vec<String> = by_pool
        .iter()
        .map(|(pool, (count, running, concurrency))| format!("{pool} {count} ({running}/{concurrency} busy)"))
        .collect();
    format!("workers: {}\n", pools.join(", "))
}

/// The shards of one live member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OwnerShards {
    pub owner: String,
    pub member: MemberState,
    pub shards: u32,
    pub acquiring: u32,
    pub serving: u32,
    pub releasing: u32,
}

impl OwnerShards {
    fn new(owner: &str, member: MemberState) -> OwnerShards {
        OwnerShards { owner: owner.to_owned(), member, shards: 0, acquiring: 0, serving: 0, releasing: 0 }
    }
}

/// Who holds the grid's shards (`flowgrid shards`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ShardSummary {
    pub shards: u32,
    /// Shards served by a live owner.
    pub serving: u32,
    /// Shards a live owner is acquiring or releasing.
    pub moving: u32,
    /// Every live member (even one without shards), sorted by id.
    pub owners: Vec<OwnerShards>,
    /// Shards without a live owner: never claimed, released, or held by a dead member.
    pub unowned: Vec<u32>,
    pub epoch_min: Option<u64>,
    pub epoch_max: Option<u64>,
}

impl ShardSummary {
    /// True when every shard is served by a live owner.
    pub fn all_serving(&self) -> bool {
        self.shards > 0 && self.serving == self.shards
    }
}

pub fn shard_summary(snapshot: &GridSnapshot) -> ShardSummary {
    let states = snapshot.states();
    let shards = snapshot.shard_count();
    let mut owners: BTreeMap<&str, OwnerShards> = states
        .iter()
        .filter(|(_, state)| state.is_live())
        .map(|(id, state)| (*id, OwnerShards::new(id, *state)))
        .collect();
    let mut summary = ShardSummary { shards, ..Default::default() };
    for shard in 0..shards {
        let Some(claim) = snapshot.claims.get(&shard) else {
            summary.unowned.push(shard);
            continue;
        };
        summary.epoch_min = Some(summary.epoch_min.map_or(claim.epoch, |min| min.min(claim.epoch)));
        summary.epoch_max = Some(summary.epoch_max.map_or(claim.epoch, |max| max.max(claim.epoch)));
        let Some(owner) = snapshot.live_owner(claim, &states) else {
            summary.unowned.push(shard);
            continue;
        };
        let member = states[owner];
        let entry = owners.entry(owner).or_insert_with(|| OwnerShards::new(owner, member));
        entry.shards += 1;
        match claim.state {
            ShardState::Acquiring => entry.acquiring += 1,
            ShardState::Serving => entry.serving += 1,
            ShardState::Releasing => entry.releasing += 1,
            ShardState::Released => unreachable!("a released shard has no live owner"),
        }
    }
    summary.owners = owners.into_values().collect();
    summary.serving = summary.owners.iter().map(|owner| owner.serving).sum();
    summary.moving = summary.owners.iter().map(|owner| owner.acquiring + owner.releasing).sum();
    summary
}

/// The summary as `flowgrid shards` prints it.
pub fn render_shard_summary(summary: &ShardSummary) -> String {
    let mut text = String::new();
    let epochs = match (summary.epoch_min, summary.epoch_max) {
        (Some(min), Some(max)) if min == max => format!(", epoch {min}"),
        (Some(min), Some(max)) => format!(", epochs {min}..{max}"),
        _ => String::new(),
    };
    let _ = writeln!(
        text,
        "shards: {} ({} serving, {} moving, {} unowned){epochs}",
        summary.shards,
        summary.serving,
        summary.moving,
        summary.unowned.len()
    );
    if !summary.owners.is_empty() {
        let mut table = Table::new(&["OWNER", "MEMBER", "SHARDS", "SERVING", "ACQUIRING", "RELEASING"]);
        for owner in &summary.owners {
            table.row(vec![
                owner.owner.clone(),
                owner.member.as_str().to_owned(),
                owner.shards.to_string(),
                owner.serving.to_string(),
                owner.acquiring.to_string(),
                owner.releasing.to_string(),
            ]);
        }
        text.push_str(&table.render());
    }
    if summary.unowned.is_empty() {
        text.push_str("unowned: 0\n");
    } else {
        let _ = writeln!(text, "unowned: {} (shards {})", summary.unowned.len(), shard_list(&summary.unowned));
    }
    text
}

/// One shard's claim as `flowgrid shards --all` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShardLine {
    pub shard: u32,
    pub owner: Option<String>,
    /// The owner's state as a member; `None` without an owner or a member record.
    pub owner_state: Option<MemberState>,
    /// `None` for a shard nobody ever claimed.
    pub state: Option<ShardState>,
    pub epoch: Option<u64>,
    pub changed_ms: Option<Millis>,
}

pub fn shard_lines(snapshot: &GridSnapshot) -> Vec<ShardLine> {
    let states = snapshot.states();
    let known: BTreeSet<u32> = (0..snapshot.shard_count()).chain(snapshot.claims.keys().copied()).collect();
    known
        .into_iter()
        .map(|shard| match snapshot.claims.get(&shard) {
            Some(claim) => shard_line(&states, shard, claim),
            None => ShardLine { shard, owner: None, owner_state: None, state: None, epoch: None, changed_ms: None },
        })
        .collect()
}

pub fn shard_lines_table(lines: &[ShardLine], now_ms: Millis) -> Table {
    claims_table(["SHARD", "SINCE"], lines.iter().map(|line| (line.shard.to_string(), line)), now_ms)
}

/// One kept revision of a shard's claim, as `flowgrid shards --history` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClaimRevision {
    /// The bucket's revision: grows with every change of any claim (and of the grid's settings).
    pub revision: u64,
    #[serde(flatten)]
    pub claim: ShardLine,
}

/// `shard`'s kept claims, each with its revision, oldest first; owners' member states as
/// `snapshot` has them.
pub fn claim_revisions(snapshot: &GridSnapshot, shard: u32, claims: &[(u64, ShardClaim)]) -> Vec<ClaimRevision> {
    let states = snapshot.states();
    claims
        .iter()
        .map(|(revision, claim)| ClaimRevision { revision: *revision, claim: shard_line(&states, shard, claim) })
        .collect()
}

fn shard_line(states: &BTreeMap<&str, MemberState>, shard: u32, claim: &ShardClaim) -> ShardLine {
    ShardLine {
        shard,
        owner: claim.owner.clone(),
        owner_state: claim.owner.as_deref().and_then(|owner| states.get(owner).copied()),
        state: Some(claim.state),
        epoch: Some(claim.epoch),
        changed_ms: Some(claim.changed_ms),
    }
}

pub fn claim_history_table(revisions: &[ClaimRevision], now_ms: Millis) -> Table {
    let rows = revisions.iter().map(|revision| (revision.revision.to_string(), &revision.claim));
    claims_table(["REVISION", "WRITTEN"], rows, now_ms)
}

/// A table of claims, each row named by its first cell (a shard, a revision); `[first, last]`
/// are the headers of the name and of the claim's age.
fn claims_table<'a>(
    [first, last]: [&str; 2],
    rows: impl Iterator<Item = (String, &'a ShardLine)>,
    now_ms: Millis,
) -> Table {
    let mut table = Table::new(&[first, "OWNER", "STATE", "EPOCH", last]);
    for (name, line) in rows {
        let owner = match (&line.owner, line.owner_state) {
            (None, _) => "-".to_owned(),
            (Some(owner), Some(state)) if state.is_live() => owner.clone(),
            (Some(owner), Some(state)) => format!("{owner} ({})", state.as_str()),
            (Some(owner), None) => format!("{owner} (gone)"),
        };
        let state = match line.state {
            Some(state) => shard_state_name(state).to_owned(),
            None => "unclaimed".to_owned(),
        };
        table.row(vec![
            name,
            owner,
            state,
            line.epoch.map_or_else(|| "-".to_owned(), |epoch| epoch.to_string()),
            line.changed_ms.map_or_else(|| "-".to_owned(), |changed| age(now_ms.saturating_sub(changed))),
        ]);
    }
    table
}

fn shard_state_name(state: ShardState) -> &'static str {
    match state {
        ShardState::Acquiring => "acquiring",
        ShardState::Serving => "serving",
        ShardState::Releasing => "releasing",
        ShardState::Released => "released",
    }
}

/// Tasks of one pool: waiting in the stream and delivered to a worker, not yet acked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolBacklog {
    pub pool: String,
    /// Over all of the pool's priority lanes, as `in_flight` and `pulls_waiting`.
    pub pending: u64,
    pub in_flight: u64,
    /// Pull requests open on the pool's consumers: each worker with room for more tasks
    /// keeps one open.
    pub pulls_waiting: u64,
    /// Tasks out with the pool's workers at once, at most (`flowgrid pool limit`).
    pub max_in_flight: i64,
    /// Each priority lane that has a consumer, highest first (the default priority's is
    /// the pool's consumer).
    pub lanes: Vec<LaneBacklog>,
}

/// The tasks of one priority of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaneBacklog {
    pub priority: u8,
    pub pending: u64,
    pub in_flight: u64,
    pub pulls_waiting: u64,
}

impl PoolBacklog {
    /// A pool with no lane counted yet.
    pub fn empty(pool: &str) -> PoolBacklog {
        PoolBacklog {
            pool: pool.to_owned(),
            pending: 0,
            in_flight: 0,
            pulls_waiting: 0,
            max_in_flight: 0,
            lanes: Vec::new(),
        }
    }

    /// Counts one of the pool's lanes in its totals.
    pub fn add_lane(&mut self, lane: LaneBacklog) {
        self.pending += lane.pending;
        self.in_flight += lane.in_flight;
        self.pulls_waiting += lane.pulls_waiting;
        self.lanes.push(lane);
        self.lanes.sort_by_key(|lane| std::cmp::Reverse(lane.priority));
    }

    /// Tasks wait and no worker is there to take them: none holds a task of the pool and
    /// none asks for one.
    pub fn has_no_worker(&self) -> bool {
        self.pending > 0 && self.in_flight == 0 && self.pulls_waiting == 0
    }

    /// Lanes whose tasks wait, none of them out with a worker nor asked for, while workers
    /// of the pool wait for tasks on other lanes: those workers do not pull from them.
    pub fn unserved_lanes(&self) -> impl Iterator<Item = &LaneBacklog> {
        self.lanes.iter().filter(move |lane| {
            lane.pending > 0 && lane.in_flight == 0 && lane.pulls_waiting == 0 && self.pulls_waiting > 0
        })
    }

    /// A pool as seen through its default lane only (tests).
    #[cfg(test)]
    fn single(pool: &str, pending: u64, in_flight: u64, pulls_waiting: u64, max_in_flight: i64) -> PoolBacklog {
        let mut backlog = PoolBacklog { max_in_flight, ..PoolBacklog::empty(pool) };
        backlog.add_lane(LaneBacklog { priority: PRIORITY_DEFAULT, pending, in_flight, pulls_waiting });
        backlog
    }
}

/// Says what to do about a pool whose tasks wait with no worker to take them.
pub fn no_worker_hint(pool: &PoolBacklog) -> String {
    let tasks = if pool.pending == 1 { "task waits" } else { "tasks wait" };
    format!(
        "pool {}: {} {tasks} and no worker is pulling from it; start a worker for pool `{}`",
        pool.pool, pool.pending, pool.pool
    )
}

/// Says what to do about a lane whose tasks wait while the pool's workers pull other lanes.
pub fn unserved_lane_hint(pool: &str, lane: &LaneBacklog) -> String {
    let tasks = if lane.pending == 1 { "task" } else { "tasks" };
    format!(
        "pool {pool}: {} {tasks} of priority {} wait while its workers wait on other lanes; workers that do not \
         know priority lanes take only priority {PRIORITY_DEFAULT}: see docs/protocol.md, \"Priority lanes\"",
        lane.pending, lane.priority
    )
}

/// Durable submits: not yet taken, and taken by a coordinator that has not started the run yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubmitBacklog {
    pub waiting: u64,
    pub in_flight: u64,
    /// Submits the grid refused and keeps, with why (`flowgrid run refused`).
    pub refused: u64,
}

/// The messages of a flow's trigger stream not yet started as runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TriggerBacklog {
    pub flow: String,
    pub stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Not yet delivered to the coordinator that reads the stream.
    pub pending: u64,
    /// Delivered, their runs not yet started.
    pub in_flight: u64,
}

/// What waits in the grid's streams; `None` where the stream does not exist yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    pub pools: Option<Vec<PoolBacklog>>,
    pub submit: Option<SubmitBacklog>,
    /// The triggers of deployed flows (their consumers on the operator's streams).
    pub triggers: Vec<TriggerBacklog>,
}

/// The backlog as `flowgrid status` prints it.
pub fn render_backlog(backlog: &Backlog) -> String {
    let mut text = String::new();
    match &backlog.pools {
        None => text.push_str("pools: no tasks stream yet (a coordinator creates it)\n"),
        Some(pools) if pools.is_empty() => {
            text.push_str("pools: none yet (a pool appears when its first worker starts)\n")
        }
        Some(pools) => {
            let mut table = Table::new(&["POOL", "PENDING", "IN FLIGHT", "MAX IN FLIGHT", "PULLS WAITING"]);
            for pool in pools {
                table.row(vec![
                    pool.pool.clone(),
                    pool.pending.to_string(),
                    pool.in_flight.to_string(),
                    pool.max_in_flight.to_string(),
                    pool.pulls_waiting.to_string(),
                ]);
            }
            text.push_str(&table.render());
            for pool in pools.iter().filter(|pool| pool.lanes.len() > 1) {
                let lanes: Vec<String> = pool
                    .lanes
                    .iter()
                    .map(|lane| format!("{}: {} pending, {} in flight", lane.priority, lane.pending, lane.in_flight))
                    .collect();
                let _ = writeln!(text, "pool {} by priority: {}", pool.pool, lanes.join("; "));
            }
            for pool in pools {
                if pool.has_no_worker() {
                    let _ = writeln!(text, "{}", no_worker_hint(pool));
                    continue;
                }
                for lane in pool.unserved_lanes() {
                    let _ = writeln!(text, "{}", unserved_lane_hint(&pool.pool, lane));
                }
            }
        }
    }
    match &backlog.submit {
        None => text.push_str("submit: no submit stream yet\n"),
        Some(submit) => {
            let _ = write!(text, "submit: {} waiting, {} being started", submit.waiting, submit.in_flight);
            if submit.refused > 0 {
                let _ = write!(text, ", {} refused (`flowgrid run refused` lists them, with why)", submit.refused);
            }
            text.push('\n');
        }
    }
    if !backlog.triggers.is_empty() {
        let mut table = Table::new(&["TRIGGER OF FLOW", "STREAM", "SUBJECT", "PENDING", "IN FLIGHT"]);
        for trigger in &backlog.triggers {
            table.row(vec![
                trigger.flow.clone(),
                trigger.stream.clone(),
                trigger.subject.clone().unwrap_or_else(|| "(all)".to_owned()),
                trigger.pending.to_string(),
                trigger.in_flight.to_string(),
            ]);
        }
        text.push_str(&table.render());
    }
    text
}

/// How long ago something happened: `0.2s ago`, `12.3s ago`, `4m05s ago`.
pub fn age(elapsed_ms: u64) -> String {
    if elapsed_ms < 60_000 {
        format!("{:.1}s ago", elapsed_ms as f64 / 1_000.0)
    } else {
        format!("{} ago", duration_ms(elapsed_ms))
    }
}

/// Sorted shard numbers with runs of three or more folded into ranges: `0-3, 9, 200`;
/// past [`SHARD_GROUPS_SHOWN_MAX`] groups the rest is counted instead.
pub fn shard_list(shards: &[u32]) -> String {
    let mut groups: Vec<(u32, u32)> = Vec::new();
    for &shard in shards {
        match groups.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(shard) => *last = shard,
            _ => groups.push((shard, shard)),
        }
    }
    let mut parts: Vec<String> = Vec::new();
    for &(first, last) in groups.iter().take(SHARD_GROUPS_SHOWN_MAX) {
        match last - first {
            0 => parts.push(first.to_string()),
            1 => parts.extend([first.to_string(), last.to_string()]),
            _ => parts.push(format!("{first}-{last}")),
        }
    }
    let hidden: u32 = groups.iter().skip(SHARD_GROUPS_SHOWN_MAX).map(|(first, last)| last - first + 1).sum();
    if hidden > 0 {
        parts.push(format!("... {hidden} more"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_000_000;

    fn member(id: &str, heartbeat_ago_ms: u64, draining: bool) -> MemberRecord {
        MemberRecord {
            id: id.to_owned(),
            host: "box".to_owned(),
            pid: 42,
            started_ms: NOW - 65_000,
            heartbeat_ms: NOW - heartbeat_ago_ms,
            lease_ms: 1_500,
            draining,
            catching_up: false,
            shards_serving: 0,
            store: "redb:box:.grid/data".to_owned(),
            metrics_addr: None,
        }
    }

    fn claim(owner: Option<&str>, state: ShardState, epoch: u64) -> ShardClaim {
        ShardClaim { owner: owner.map(str::to_owned), state, epoch, changed_ms: NOW - 3_000 }
    }

    #[test]
    fn members_are_alive_until_their_lease_runs_out() {
        assert_eq!(member_state(&member("a", 200, false), NOW), MemberState::Alive);
        assert_eq!(member_state(&member("a", 1_500, false), NOW), MemberState::Alive);
        assert_eq!(member_state(&member("a", 1_501, false), NOW), MemberState::Dead);
        assert_eq!(member_state(&member("a", 300, true), NOW), MemberState::Draining);
        assert_eq!(member_state(&member("a", 9_000, true), NOW), MemberState::Dead);
        let catching_up = MemberRecord { catching_up: true, ..member("a", 300, false) };
        assert_eq!(member_state(&catching_up, NOW), MemberState::CatchingUp);
        assert!(MemberState::CatchingUp.is_live());
        // A heartbeat stamped ahead of our clock is fresh, not an underflow.
        assert_eq!(member_state(&member("a", 0, false), NOW - 500), MemberState::Alive);
    }

    #[test]
    fn ages_read_as_seconds_then_minutes() {
        assert_eq!(age(0), "0.0s ago");
        assert_eq!(age(210), "0.2s ago");
        assert_eq!(age(12_345), "12.3s ago");
        assert_eq!(age(245_000), "4m05s ago");
        assert_eq!(age(7_380_000), "2h03m ago");
    }

    #[test]
    fn shard_lists_fold_runs_into_ranges() {
        assert_eq!(shard_list(&[4, 9, 200]), "4, 9, 200");
        assert_eq!(shard_list(&[0, 1, 2, 3, 7, 8, 10]), "0-3, 7, 8, 10");
        assert_eq!(shard_list(&(0..256).collect::<Vec<_>>()), "0-255");
        let scattered: Vec<u32> = (0..30).map(|n| n * 2).collect();
        assert_eq!(
            shard_list(&scattered),
            format!("{}, ... 6 more", (0..24).map(|n| (n * 2).to_string()).collect::<Vec<_>>().join(", "))
        );
    }

    #[test]
    fn members_sort_by_id_with_their_age_and_uptime() {
        let snapshot = GridSnapshot {
            now_ms: NOW,
            members: vec![member("b", 200, false), member("a", 5_000, false)],
            ..Default::default()
        };
        let views = member_views(&snapshot);
        assert_eq!(views[0].record.id, "a");
        assert_eq!(views[0].state, MemberState::Dead);
        assert_eq!(views[0].uptime_ms, 60_000, "a dead member's uptime ends at its last heartbeat");
        assert_eq!(views[1].heartbeat_age_ms, 200);
        assert_eq!(views[1].uptime_ms, 65_000);
        let text = members_table(&views).render();
        assert!(text.contains("b   box   42   alive  0       0.2s ago   1m05s   -"), "{text}");
        assert!(text.contains("a   box   42   dead   -       5.0s ago"), "a dead member serves no shard: {text}");
        let json = serde_json::to_value(&views[1]).unwrap();
        assert_eq!(json["id"], "b");
        assert_eq!(json["state"], "alive");
    }

    #[test]
    fn the_summary_groups_shards_by_live_owner_and_lists_the_rest() {
        let mut claims = BTreeMap::new();
        for shard in 0..10 {
            claims.insert(shard, claim(Some("a"), ShardState::Serving, 3));
        }
        claims.insert(1, claim(Some("a"), ShardState::Acquiring, 4));
        claims.insert(2, claim(Some("b"), ShardState::Releasing, 2));
        claims.insert(4, claim(Some("dead"), ShardState::Serving, 1));
        claims.insert(5, claim(None, ShardState::Released, 7));
        claims.insert(6, claim(Some("gone"), ShardState::Serving, 3));
        // Shard 9 was never claimed.
        claims.remove(&9);
        let snapshot = GridSnapshot {
            now_ms: NOW,
            members: vec![
                member("b", 100, true),
                member("a", 100, false),
                member("dead", 4_000, false),
                member("idle", 0, false),
            ],
            grid: Some(GridConfig { shards: 10, created_ms: 0 }),
            claims,
        };
        let summary = shard_summary(&snapshot);
        assert_eq!(summary.shards, 10);
        assert_eq!(summary.unowned, [4, 5, 6, 9]);
        assert_eq!(summary.serving, 4);
        assert_eq!(summary.moving, 2);
        assert_eq!((summary.epoch_min, summary.epoch_max), (Some(1), Some(7)));
        let owners: Vec<(&str, u32, u32, u32, u32)> = summary
            .owners
            .iter()
            .map(|owner| (owner.owner.as_str(), owner.shards, owner.serving, owner.acquiring, owner.releasing))
            .collect();
        assert_eq!(owners, [("a", 5, 4, 1, 0), ("b", 1, 0, 0, 1), ("idle", 0, 0, 0, 0)]);
        assert_eq!(summary.owners[1].member, MemberState::Draining);
        assert!(!summary.all_serving());
        let text = render_shard_summary(&summary);
        assert!(text.starts_with("shards: 10 (4 serving, 2 moving, 4 unowned), epochs 1..7\n"), "{text}");
        assert!(text.contains("b      draining  1       0        0          1"), "{text}");
        assert!(text.ends_with("unowned: 4 (shards 4-6, 9)\n"), "{text}");
    }

    #[test]
    fn a_fully_served_grid_says_so() {
        let claims = (0..4).map(|shard| (shard, claim(Some("a"), ShardState::Serving, 1))).collect();
        let snapshot = GridSnapshot {
            now_ms: NOW,
            members: vec![member("a", 0, false)],
            grid: Some(GridConfig { shards: 4, created_ms: 0 }),
            claims,
        };
        let summary = shard_summary(&snapshot);
        assert!(summary.all_serving());
        let text = render_shard_summary(&summary);
        assert!(text.starts_with("shards: 4 (4 serving, 0 moving, 0 unowned), epoch 1\n"), "{text}");
        assert!(text.ends_with("unowned: 0\n"), "{text}");
        // Without grid settings the claims say how many shards there are.
        let no_settings = GridSnapshot { grid: None, ..snapshot };
        assert_eq!(shard_summary(&no_settings).shards, 4);
        assert!(!shard_summary(&GridSnapshot::default()).all_serving());
    }

    #[test]
    fn the_backlog_shows_each_pool_the_submits_and_the_triggers() {
        let mut gpu = PoolBacklog::single("gpu-llm", 1_100, 64, 0, 64);
        gpu.add_lane(LaneBacklog { priority: 9, pending: 0, in_flight: 0, pulls_waiting: 2 });
        gpu.add_lane(LaneBacklog { priority: 1, pending: 100, in_flight: 0, pulls_waiting: 0 });
        let backlog = Backlog {
            pools: Some(vec![
                PoolBacklog::single("cpu-media", 0, 3, 1, 20_000),
                gpu,
                PoolBacklog::single("tests", 2, 0, 0, 20_000),
            ]),
            submit: Some(SubmitBacklog { waiting: 5, in_flight: 1, refused: 2 }),
            triggers: vec![TriggerBacklog {
                flow: "on-order".into(),
                stream: "ORDERS".into(),
                subject: Some("orders.*.created".into()),
                pending: 7,
                in_flight: 2,
            }],
        };
        assert_eq!(
            render_backlog(&backlog),
            "POOL       PENDING  IN FLIGHT  MAX IN FLIGHT  PULLS WAITING\n\
             cpu-media  0        3          20000          1\n\
             gpu-llm    1200     64         64             2\n\
             tests      2        0          20000          0\n\
             pool gpu-llm by priority: 9: 0 pending, 0 in flight; 5: 1100 pending, 64 in flight; 1: 100 pending, 0 in flight\n\
             pool gpu-llm: 100 tasks of priority 1 wait while its workers wait on other lanes; workers that do not know \
             priority lanes take only priority 5: see docs/protocol.md, \"Priority lanes\"\n\
             pool tests: 2 tasks wait and no worker is pulling from it; start a worker for pool `tests`\n\
             submit: 5 waiting, 1 being started, 2 refused (`flowgrid run refused` lists them, with why)\n\
             TRIGGER OF FLOW  STREAM  SUBJECT           PENDING  IN FLIGHT\n\
             on-order         ORDERS  orders.*.created  7        2\n"
        );
        let empty = render_backlog(&Backlog::default());
        assert!(empty.contains("no tasks stream yet") && empty.contains("no submit stream yet"), "{empty}");
    }

    #[test]
    fn every_shard_gets_a_line_with_its_owner_state_and_age() {
        let mut claims = BTreeMap::new();
        claims.insert(0, claim(Some("a"), ShardState::Serving, 2));
        claims.insert(1, claim(Some("dead"), ShardState::Serving, 1));
        claims.insert(3, claim(Some("gone"), ShardState::Releasing, 1));
        let snapshot = GridSnapshot {
            now_ms: NOW,
            members: vec![member("a", 0, false), member("dead", 9_000, false)],
            grid: Some(GridConfig { shards: 4, created_ms: 0 }),
            claims,
        };
        let lines = shard_lines(&snapshot);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2].state, None);
        let text = shard_lines_table(&lines, NOW).render();
        let expected = "SHARD  OWNER        STATE      EPOCH  SINCE\n\
                        0      a            serving    2      3.0s ago\n\
                        1      dead (dead)  serving    1      3.0s ago\n\
                        2      -            unclaimed  -      -\n\
                        3      gone (gone)  releasing  1      3.0s ago\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_shards_history_lists_each_kept_claim_by_revision() {
        let snapshot = GridSnapshot {
            now_ms: NOW,
            members: vec![member("a", 0, false), member("b", 9_000, false)],
            grid: Some(GridConfig { shards: 4, created_ms: 0 }),
            claims: BTreeMap::new(),
        };
        let kept = [
            (7, claim(Some("b"), ShardState::Releasing, 3)),
            (9, claim(None, ShardState::Released, 3)),
            (12, claim(Some("a"), ShardState::Acquiring, 3)),
        ];
        let revisions = claim_revisions(&snapshot, 2, &kept);
        assert!(revisions.iter().all(|revision| revision.claim.shard == 2));
        let text = claim_history_table(&revisions, NOW).render();
        let expected = "REVISION  OWNER     STATE      EPOCH  WRITTEN\n\
                        7         b (dead)  releasing  3      3.0s ago\n\
                        9         -         released   3      3.0s ago\n\
                        12        a         acquiring  3      3.0s ago\n";
        assert_eq!(text, expected);
    }
}
