//! Watches the grid's members and shard claims (NATS KV) and times what the faults cause,
//! on the harness's own clock:
//!
//! - takeover: a coordinator is killed (or paused, or cut off from NATS); for each shard it
//!   held, the time from the fault to a claim of the shard in state `serving` by another member;
//! - hand-over: a shard's claim goes to `releasing` (its owner gives it away: a member
//!   joins or leaves); the time from there to `serving` by the new owner.
//!
//! Every claim change and every harness action is appended to `timeline.log` with the time
//! since the harness started, for reading after a failure.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use async_nats::jetstream::kv::{Entry, Operation};
use futures::StreamExt;
use tokio::task::JoinHandle;

use flowgrid_proto::{shard_of_key, MemberRecord, ShardClaim, ShardState, Subjects};
use flowgrid_sdk::broker;

/// Why a shard is expected to change owner without a hand-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Kill,
    Pause,
    /// Cut off from NATS by the network.
    Cut,
}

#[derive(Clone, Debug)]
struct PendingTakeover {
    since: Instant,
    from: String,
    cause: Cause,
}

/// What the watcher knows and measured.
#[derive(Default)]
pub struct WatchState {
    pub claims: BTreeMap<u32, ShardClaim>,
    pub members: HashMap<String, MemberRecord>,
    pending: HashMap<u32, PendingTakeover>,
    releasing: HashMap<u32, (Instant, String)>,
    /// Members the harness killed (`None`), or paused or cut off from NATS (`None` until
    /// they were resumed or joined again, then that time).
    down: HashMap<String, Option<Instant>>,
    /// Claims taken (straight to `acquiring` by another member) from a member the harness
    /// had neither killed nor paused: `(shard, from, to)`.
    pub taken_from_live: Vec<(u32, String, String)>,
    /// Takeovers after a kill, in milliseconds.
    pub takeover_ms: Vec<u64>,
    /// Takeovers after a pause, in milliseconds.
    pub pause_takeover_ms: Vec<u64>,
    /// Takeovers after a cut from NATS, in milliseconds.
    pub cut_takeover_ms: Vec<u64>,
    /// Hand-overs, in milliseconds.
    pub handoff_ms: Vec<u64>,
    /// Members back on NATS after a cut that serve no shard yet, and since when.
    rejoined: HashMap<String, Instant>,
    /// From a cut's end to its member serving a shard again, in milliseconds.
    pub serving_again_ms: Vec<u64>,
    pub last_takeover_ms: Option<u64>,
    pub claim_changes: u64,
    pub watch_errors: u64,
    /// Records that did not decode (a contract mismatch with the coordinator).
    pub undecodable: u64,
}

impl WatchState {
    /// The member id of the live process `pid` (the newest record naming it).
    pub fn member_of_pid(&self, pid: u32) -> Option<String> {
        self.members
            .values()
            .filter(|member| member.pid == pid)
            .max_by_key(|member| member.started_ms)
            .map(|m| m.id.clone())
    }

    /// Shards whose claim names `member` as owner, in any state.
    pub fn shards_of(&self, member: &str) -> Vec<u32> {
        self.claims
            .iter()
            .filter(|(_, claim)| claim.owner.as_deref() == Some(member))
            .map(|(shard, _)| *shard)
            .collect()
    }

    /// Shards of `shards` not in state `serving`.
    pub fn shards_not_serving(&self, shards: u32) -> Vec<u32> {
        (0..shards)
            .filter(|shard| self.claims.get(shard).is_none_or(|claim| claim.state != ShardState::Serving))
            .collect()
    }

    /// Members whose record says they are catching up (not watching the buckets yet), but
    /// for those the harness killed: their last record stays as it was.
    pub fn members_catching_up(&self) -> Vec<String> {
        let mut members: Vec<String> = self
            .members
            .values()
            .filter(|member| member.catching_up && !self.killed(&member.id))
            .map(|member| member.id.clone())
            .collect();
        members.sort();
        members
    }

    /// Members back from a cut that serve no shard yet.
    pub fn rejoined_not_serving(&self) -> Vec<String> {
        let mut members: Vec<String> = self.rejoined.keys().cloned().collect();
        members.sort();
        members
    }

    /// Takeovers still expected after a kill.
    pub fn pending_kill_takeovers(&self) -> usize {
        self.pending.values().filter(|pending| pending.cause == Cause::Kill).count()
    }

    /// Shards expected to be taken over, by the member they are expected from.
    pub fn pending_takeovers(&self) -> Vec<(u32, String, Cause)> {
        let mut pending: Vec<_> =
            self.pending.iter().map(|(shard, pending)| (*shard, pending.from.clone(), pending.cause)).collect();
        pending.sort_by_key(|(shard, _, _)| *shard);
        pending
    }

    /// The lease `member` announced.
    pub fn lease_ms_of(&self, member: &str) -> Option<u64> {
        self.members.get(member).map(|record| record.lease_ms)
    }

    /// Expects every shard `member` holds now to be served by another member; the time
    /// from `since` to then is a takeover of `cause`.
    fn expect_takeover(&mut self, member: &str, cause: Cause, since: Instant) -> usize {
        self.down.insert(member.to_owned(), None);
        // A fault after a cut ends the wait for it to serve again untimed.
        self.rejoined.remove(member);
        let shards = self.shards_of(member);
        for shard in &shards {
            // A hand-over the member had started ends as a takeover now.
            self.releasing.remove(shard);
            self.pending.insert(*shard, PendingTakeover { since, from: member.to_owned(), cause });
        }
        shards.len()
    }

    /// See [`Watch::rejoined`].
    fn rejoined(&mut self, member: &str, at: Instant) {
        self.down.insert(member.to_owned(), Some(at));
        self.rejoined.insert(member.to_owned(), at);
    }

    /// True when the harness killed `member` (its last record stays as it was).
    fn killed(&self, member: &str) -> bool {
        self.down.get(member) == Some(&None)
    }

    /// True when the harness has not killed `member`, and has not paused it or cut it off
    /// within `grace` (its lease) of `now`.
    fn is_live(&self, member: &str, now: Instant, grace: std::time::Duration) -> bool {
        match self.down.get(member) {
            None => true,
            Some(None) => false,
            Some(Some(resumed)) => now.saturating_duration_since(*resumed) > grace,
        }
    }

    fn claim_changed(&mut self, shard: u32, claim: Option<ShardClaim>, now: Instant) -> Option<String> {
        self.claim_changes += 1;
        let Some(claim) = claim else {
            self.claims.remove(&shard);
            return None;
        };
        let mut stolen = None;
        if let (ShardState::Acquiring, Some(to), Some(previous)) = (claim.state, &claim.owner, self.claims.get(&shard))
        {
            if let (Some(from), false) = (&previous.owner, previous.state == ShardState::Released) {
                let grace = std::time::Duration::from_millis(self.lease_ms_of(from).unwrap_or(1_500));
                if from != to && self.is_live(from, now, grace) {
                    self.taken_from_live.push((shard, from.clone(), to.clone()));
                    stolen = Some(format!(
                        "shard-{shard} taken by {to} from {from} ({:?}), which the harness had neither killed nor paused",
                        previous.state
                    ));
                }
            }
        }
        match (claim.state, claim.owner.as_deref()) {
            (ShardState::Releasing, Some(owner)) => {
                self.releasing.insert(shard, (now, owner.to_owned()));
            }
            (ShardState::Serving, Some(owner)) => {
                if let Some(pending) = self.pending.get(&shard) {
                    if pending.from != owner {
                        let elapsed = millis(now, pending.since);
                        match pending.cause {
                            Cause::Kill => {
                                self.takeover_ms.push(elapsed);
                                self.last_takeover_ms = Some(elapsed);
                            }
                            Cause::Pause => self.pause_takeover_ms.push(elapsed),
                            Cause::Cut => self.cut_takeover_ms.push(elapsed),
                        }
                    }
                    // Served again by the paused member itself: nothing to time.
                    self.pending.remove(&shard);
                }
                if let Some((since, from)) = self.releasing.remove(&shard) {
                    if from != owner {
                        self.handoff_ms.push(millis(now, since));
                    }
                }
                if let Some(since) = self.rejoined.remove(owner) {
                    self.serving_again_ms.push(millis(now, since));
                }
            }
            _ => {}
        }
        self.claims.insert(shard, claim);
        stolen
    }
}

fn millis(now: Instant, since: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(since).as_millis()).unwrap_or(u64::MAX)
}

/// The running watcher. Dropping it stops the watch.
pub struct Watch {
    state: Arc<Mutex<WatchState>>,
    timeline: Arc<Mutex<Timeline>>,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `timeline.log`: claim changes and harness actions with the time since the start.
pub struct Timeline {
    origin: Instant,
    file: Option<std::fs::File>,
}

impl Timeline {
    pub fn line(&mut self, text: &str) {
        if let Some(file) = self.file.as_mut() {
            let _ = writeln!(file, "{:>9.3}s {text}", self.origin.elapsed().as_secs_f64());
        }
    }
}

impl Watch {
    /// Opens the members and shards buckets of the grid under `prefix` and watches them
    /// from their current values on.
    pub async fn start(nats: async_nats::Client, prefix: &str, origin: Instant, dir: &Path) -> Result<Watch> {
        let subjects = Subjects::new(prefix.to_owned());
        let jetstream = async_nats::jetstream::new(nats);
        let shards = broker::shards_kv(&jetstream, &subjects).await.context("open the shards bucket")?;
        let members = broker::members_kv(&jetstream, &subjects).await.context("open the members bucket")?;
        let mut shard_updates = shards.watch_with_history(">").await.context("watch the shards bucket")?;
        let mut member_updates = members.watch_with_history(">").await.context("watch the members bucket")?;
        let file = std::fs::File::create(dir.join("timeline.log")).ok();
        let timeline = Arc::new(Mutex::new(Timeline { origin, file }));
        let state = Arc::new(Mutex::new(WatchState::default()));
        let (task_state, task_timeline) = (state.clone(), timeline.clone());
        let task = tokio::spawn(async move {
            loop {
                let (update, is_shard) = tokio::select! {
                    update = shard_updates.next() => (update, true),
                    update = member_updates.next() => (update, false),
                };
                let now = Instant::now();
                let Some(update) = update else { break };
                let mut state = task_state.lock().expect("watch state lock");
                let mut timeline = task_timeline.lock().expect("timeline lock");
                match update {
                    Ok(entry) if is_shard => apply_shard_entry(&mut state, &mut timeline, entry, now),
                    Ok(entry) => apply_member_entry(&mut state, &mut timeline, entry),
                    Err(error) => {
                        state.watch_errors += 1;
                        timeline.line(&format!("watch error: {error}"));
                    }
                }
            }
        });
        Ok(Watch { state, timeline, task })
    }

    /// Reads the state.
    pub fn with<T>(&self, read: impl FnOnce(&WatchState) -> T) -> T {
        read(&self.state.lock().expect("watch state lock"))
    }

    /// Appends a harness action to the timeline.
    pub fn note(&self, text: &str) {
        self.timeline.lock().expect("timeline lock").line(text);
    }

    /// See [`WatchState::expect_takeover`]; returns how many shards are expected to move.
    pub fn expect_takeover(&self, member: &str, cause: Cause, since: Instant) -> usize {
        self.state.lock().expect("watch state lock").expect_takeover(member, cause, since)
    }

    /// `member` runs again after a pause.
    pub fn resumed(&self, member: &str, at: Instant) {
        self.state.lock().expect("watch state lock").down.insert(member.to_owned(), Some(at));
    }

    /// `member` reaches NATS again after a cut: as [`Watch::resumed`], and the time until it
    /// serves a shard again is measured.
    pub fn rejoined(&self, member: &str, at: Instant) {
        self.state.lock().expect("watch state lock").rejoined(member, at);
    }
}

fn apply_shard_entry(state: &mut WatchState, timeline: &mut Timeline, entry: Entry, now: Instant) {
    let Some(shard) = shard_of_key(&entry.key) else { return };
    let claim = match entry.operation {
        Operation::Put => match rmp_serde::from_slice::<ShardClaim>(&entry.value) {
            Ok(claim) => Some(claim),
            Err(error) => {
                state.undecodable += 1;
                timeline.line(&format!("{} does not decode as a shard claim: {error}", entry.key));
                return;
            }
        },
        Operation::Delete | Operation::Purge => None,
    };
    match &claim {
        Some(claim) => timeline.line(&format!(
            "{} {:?} owner={} epoch={}",
            entry.key,
            claim.state,
            claim.owner.as_deref().unwrap_or("-"),
            claim.epoch
        )),
        None => timeline.line(&format!("{} deleted", entry.key)),
    }
    if let Some(stolen) = state.claim_changed(shard, claim, now) {
        timeline.line(&format!("CLAIM TAKEN FROM A LIVE MEMBER: {stolen}"));
    }
}

fn apply_member_entry(state: &mut WatchState, timeline: &mut Timeline, entry: Entry) {
    match entry.operation {
        Operation::Put => match rmp_serde::from_slice::<MemberRecord>(&entry.value) {
            Ok(record) => {
                let known = state.members.get(&record.id);
                let changed = known
                    .is_none_or(|known| (known.draining, known.catching_up) != (record.draining, record.catching_up));
                if changed {
                    let status = match (record.draining, record.catching_up) {
                        (true, _) => "draining",
                        (false, true) => "catching up",
                        (false, false) if known.is_some() => "caught up",
                        (false, false) => "joined",
                    };
                    timeline.line(&format!(
                        "member {} pid {} {status} (lease {} ms)",
                        record.id, record.pid, record.lease_ms
                    ));
                }
                state.members.insert(record.id.clone(), record);
            }
            Err(error) => {
                state.undecodable += 1;
                timeline.line(&format!("member {} does not decode: {error}", entry.key));
            }
        },
        Operation::Delete | Operation::Purge => {
            timeline.line(&format!("member {} left", entry.key));
            state.members.remove(&entry.key);
            state.rejoined.remove(&entry.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn claim(owner: Option<&str>, state: ShardState) -> Option<ShardClaim> {
        Some(ShardClaim { owner: owner.map(str::to_owned), state, epoch: 1, changed_ms: 0 })
    }

    #[test]
    fn a_killed_members_shards_are_timed_until_another_serves_them() {
        let mut state = WatchState::default();
        let start = Instant::now();
        state.claim_changed(0, claim(Some("a"), ShardState::Serving), start);
        state.claim_changed(1, claim(Some("a"), ShardState::Releasing), start);
        state.claim_changed(2, claim(Some("b"), ShardState::Serving), start);
        assert_eq!(state.expect_takeover("a", Cause::Kill, start), 2);
        assert_eq!(state.pending_kill_takeovers(), 2);
        let later = start + Duration::from_millis(1_800);
        state.claim_changed(0, claim(Some("b"), ShardState::Acquiring), later);
        assert!(state.takeover_ms.is_empty(), "acquiring is not serving yet");
        state.claim_changed(0, claim(Some("b"), ShardState::Serving), later);
        state.claim_changed(1, claim(Some("c"), ShardState::Serving), later + Duration::from_millis(200));
        assert_eq!(state.takeover_ms, vec![1_800, 2_000]);
        assert_eq!(state.last_takeover_ms, Some(2_000));
        assert!(state.handoff_ms.is_empty(), "a takeover of a shard being released is not a hand-over");
        assert_eq!(state.pending_kill_takeovers(), 0);
        assert!(state.taken_from_live.is_empty());
    }

    #[test]
    fn a_claim_taken_from_a_member_nobody_stopped_is_counted() {
        let mut state = WatchState::default();
        let start = Instant::now();
        state.claim_changed(0, claim(Some("a"), ShardState::Serving), start);
        state.claim_changed(1, claim(Some("b"), ShardState::Serving), start);
        state.claim_changed(2, claim(Some("b"), ShardState::Releasing), start);
        state.claim_changed(2, claim(None, ShardState::Released), start);
        assert!(state.claim_changed(2, claim(Some("a"), ShardState::Acquiring), start).is_none(), "after a release");
        assert!(state.claim_changed(0, claim(Some("b"), ShardState::Acquiring), start).is_some());
        state.expect_takeover("b", Cause::Pause, start);
        assert!(state.claim_changed(1, claim(Some("a"), ShardState::Acquiring), start).is_none(), "b is paused");
        state.down.insert("b".to_owned(), Some(start));
        let soon = start + Duration::from_millis(500);
        state.claim_changed(1, claim(Some("b"), ShardState::Serving), soon);
        assert!(state.claim_changed(1, claim(Some("a"), ShardState::Acquiring), soon).is_none(), "within the lease");
        state.claim_changed(1, claim(Some("b"), ShardState::Serving), soon);
        let later = start + Duration::from_secs(5);
        assert!(state.claim_changed(1, claim(Some("a"), ShardState::Acquiring), later).is_some());
        assert_eq!(state.taken_from_live.len(), 2);
    }

    #[test]
    fn hand_overs_are_timed_from_releasing_to_serving_elsewhere() {
        let mut state = WatchState::default();
        let start = Instant::now();
        state.claim_changed(3, claim(Some("a"), ShardState::Releasing), start);
        state.claim_changed(3, claim(None, ShardState::Released), start + Duration::from_millis(50));
        state.claim_changed(3, claim(Some("b"), ShardState::Acquiring), start + Duration::from_millis(60));
        state.claim_changed(3, claim(Some("b"), ShardState::Serving), start + Duration::from_millis(120));
        assert_eq!(state.handoff_ms, vec![120]);
        assert_eq!(state.shards_not_serving(4), vec![0, 1, 2]);
    }

    /// Shard 0 served by `a`, then `a` cut off from NATS at `start`.
    fn a_cut_off_at(start: Instant) -> WatchState {
        let mut state = WatchState::default();
        state.claim_changed(0, claim(Some("a"), ShardState::Serving), start);
        state.expect_takeover("a", Cause::Cut, start);
        state
    }

    #[test]
    fn a_member_back_from_a_cut_is_timed_until_it_serves_a_shard_again() {
        let start = Instant::now();
        let mut state = a_cut_off_at(start);
        state.claim_changed(0, claim(Some("b"), ShardState::Serving), start + Duration::from_secs(2));
        let back = start + Duration::from_secs(10);
        state.rejoined("a", back);
        state.claim_changed(0, claim(Some("b"), ShardState::Releasing), back + Duration::from_millis(700));
        state.claim_changed(0, claim(Some("a"), ShardState::Acquiring), back + Duration::from_millis(710));
        assert!(state.serving_again_ms.is_empty(), "acquiring is not serving yet");
        state.claim_changed(0, claim(Some("a"), ShardState::Serving), back + Duration::from_millis(720));
        state.claim_changed(1, claim(Some("a"), ShardState::Serving), back + Duration::from_millis(900));
        assert_eq!(state.serving_again_ms, vec![720], "timed once, at its first shard");
        assert_eq!(state.handoff_ms, vec![20]);
        assert!(state.rejoined_not_serving().is_empty());
        // Killed after its cut, before it served again: not timed.
        state.expect_takeover("a", Cause::Cut, back);
        state.rejoined("a", back + Duration::from_secs(10));
        assert_eq!(state.rejoined_not_serving(), vec!["a".to_owned()]);
        state.expect_takeover("a", Cause::Kill, back + Duration::from_secs(11));
        assert!(state.rejoined_not_serving().is_empty());
        assert_eq!(state.serving_again_ms.len(), 1);
    }

    #[test]
    fn members_catching_up_leave_out_the_killed_ones() {
        let mut state = WatchState::default();
        let start = Instant::now();
        for (id, catching_up) in [("a", true), ("b", true), ("c", false)] {
            let record = MemberRecord {
                id: id.to_owned(),
                host: "h".to_owned(),
                pid: 1,
                started_ms: 0,
                heartbeat_ms: 0,
                lease_ms: 1_500,
                draining: false,
                catching_up,
                shards_serving: 0,
                store: "s".to_owned(),
                metrics_addr: None,
            };
            state.members.insert(id.to_owned(), record);
        }
        state.expect_takeover("a", Cause::Kill, start);
        assert_eq!(state.members_catching_up(), vec!["b".to_owned()]);
        // Cut off, then back: it has to catch up like any other.
        state.expect_takeover("b", Cause::Cut, start);
        state.rejoined("b", start);
        assert_eq!(state.members_catching_up(), vec!["b".to_owned()]);
    }

    #[test]
    fn a_paused_member_that_keeps_its_shard_is_not_timed() {
        let mut state = WatchState::default();
        let start = Instant::now();
        state.claim_changed(0, claim(Some("a"), ShardState::Serving), start);
        state.claim_changed(1, claim(Some("a"), ShardState::Serving), start);
        state.expect_takeover("a", Cause::Pause, start);
        state.claim_changed(0, claim(Some("a"), ShardState::Serving), start + Duration::from_secs(3));
        state.claim_changed(1, claim(Some("b"), ShardState::Serving), start + Duration::from_secs(3));
        assert_eq!(state.pause_takeover_ms, vec![3_000]);
        assert!(state.takeover_ms.is_empty());
        assert!(state.pending_takeovers().is_empty());
    }

    #[test]
    fn a_cut_off_members_shards_are_timed_apart_and_are_not_taken_from_a_live_member() {
        let start = Instant::now();
        let mut state = a_cut_off_at(start);
        let taken = start + Duration::from_millis(1_400);
        assert!(state.claim_changed(0, claim(Some("b"), ShardState::Acquiring), taken).is_none(), "a is cut off");
        state.claim_changed(0, claim(Some("b"), ShardState::Serving), taken);
        assert_eq!(state.cut_takeover_ms, vec![1_400]);
        assert!(state.takeover_ms.is_empty() && state.pause_takeover_ms.is_empty());
        assert!(state.taken_from_live.is_empty());
    }
}
