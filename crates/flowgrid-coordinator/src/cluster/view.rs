//! What this member knows of the others and of the shard claims, fed by KV watches.
//!
//! Liveness is judged by this member's own clock: a member is alive while its record
//! changed less than its lease ago (as seen here). Wall clocks of other hosts are never
//! compared. An owner named by a claim but never seen (e.g. a record that expired, or one
//! not read yet) gets one lease from when the members were last read whole, so that a
//! restarted member never takes shards from a live owner it has not heard of yet (and the
//! shard manager takes none before that read).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flowgrid_proto::{MemberRecord, ShardClaim};

/// Leases after which a dead member is forgotten: long past any hand-over of its shards.
const DEAD_MEMBER_KEPT_LEASES: u32 = 20;

struct Member {
    record: MemberRecord,
    revision: u64,
    changed: Instant,
}

/// A shard's claim and the KV revision it is at.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub claim: ShardClaim,
    pub revision: u64,
}

pub struct ClusterView {
    me: String,
    lease: Duration,
    /// When the members were last read whole (until then, when the view was made).
    read: Instant,
    members: HashMap<String, Member>,
    claims: Vec<Option<Claim>>,
}

impl ClusterView {
    pub fn new(me: String, shards: u32, lease: Duration, now: Instant) -> ClusterView {
        ClusterView { me, lease, read: now, members: HashMap::new(), claims: vec![None; shards as usize] }
    }

    /// A member record at `revision` (from a watch or a read); older revisions are ignored.
    pub fn member_put(&mut self, record: MemberRecord, revision: u64, now: Instant) {
        match self.members.get_mut(&record.id) {
            Some(member) if member.revision >= revision => {}
            Some(member) => {
                member.record = record;
                member.revision = revision;
                member.changed = now;
            }
            None => {
                self.members.insert(record.id.clone(), Member { record, revision, changed: now });
            }
        }
    }

    /// Every member record was read at `now`: an owner not among them gets a lease from
    /// here (reading them took longer than a lease when the KV was slow to answer).
    pub fn members_read(&mut self, now: Instant) {
        self.read = now;
    }

    /// A member record read at startup: its age by the wall clock (`now_ms` against its
    /// heartbeat) counts against its lease, so that a member long dead for everyone else
    /// is not given a fresh lease here (placements would disagree until it ran out). The
    /// clocks of two hosts differ: an age up to [`LOADED_CLOCK_SKEW_MAX`] counts as none, so
    /// that a live member whose host's clock is behind is not taken for dead (and its shards
    /// taken from it) by a member starting on a host whose clock is ahead.
    pub fn member_loaded(&mut self, record: MemberRecord, revision: u64, now: Instant, now_ms: u64) {
        let age =
            Duration::from_millis(now_ms.saturating_sub(record.heartbeat_ms)).saturating_sub(LOADED_CLOCK_SKEW_MAX);
        let seen = now.checked_sub(age).unwrap_or(now);
        self.member_put(record, revision, seen);
    }

    /// Gives every member that was alive at `stalled_since` a fresh lease from `now`: this
    /// member itself stalled (paused process, lost lease) and saw no heartbeats meanwhile,
    /// which says nothing about the others. Members already dead before stay dead.
    pub fn refresh_after_stall(&mut self, stalled_since: Instant, now: Instant) {
        let default = self.lease;
        // Owners never seen: as alive after the stall as they were before it.
        if stalled_since.saturating_duration_since(self.read) <= default {
            self.read = self.read.max(now);
        }
        for member in self.members.values_mut() {
            let alive_then =
                stalled_since.saturating_duration_since(member.changed) <= lease_of(&member.record, default);
            if alive_then {
                member.changed = member.changed.max(now);
            }
        }
    }

    /// A member deleted its record: it left.
    pub fn member_deleted(&mut self, id: &str) {
        self.members.remove(id);
    }

    /// A claim at `revision`; older revisions are ignored. `None`: the key was deleted.
    pub fn claim_put(&mut self, shard: u32, claim: Option<ShardClaim>, revision: u64) {
        let Some(slot) = self.claims.get_mut(shard as usize) else { return };
        if slot.as_ref().is_some_and(|known| known.revision >= revision) {
            return;
        }
        *slot = claim.map(|claim| Claim { claim, revision });
    }

    pub fn claim(&self, shard: u32) -> Option<&Claim> {
        self.claims.get(shard as usize).and_then(Option::as_ref)
    }

    /// Whether member `id` counts as alive at `now`.
    pub fn alive(&self, id: &str, now: Instant) -> bool {
        if id == self.me {
            return true;
        }
        match self.members.get(id) {
            Some(member) => now.saturating_duration_since(member.changed) <= lease_of(&member.record, self.lease),
            None => now.saturating_duration_since(self.read) <= self.lease,
        }
    }

    /// Live members that take shards (neither draining nor catching up), sorted; `me` is
    /// included when `me_active`.
    pub fn candidates(&self, me_active: bool, now: Instant) -> Vec<&str> {
        let mut live: Vec<&str> = self
            .members
            .values()
            .filter(|member| member.record.id != self.me && !member.record.draining && !member.record.catching_up)
            .filter(|member| self.alive(&member.record.id, now))
            .map(|member| member.record.id.as_str())
            .collect();
        if me_active {
            live.push(self.me.as_str());
        }
        live.sort_unstable();
        live
    }

    /// How long ago `id`'s record last changed as seen here; `None` for a member never seen.
    pub fn silent_for(&self, id: &str, now: Instant) -> Option<Duration> {
        self.members.get(id).map(|member| now.saturating_duration_since(member.changed))
    }

    /// Forgets members dead for long (by their own lease): they own nothing any more once
    /// their shards moved.
    pub fn forget_dead(&mut self, now: Instant) {
        let default = self.lease;
        self.members.retain(|_, member| {
            now.saturating_duration_since(member.changed) <= lease_of(&member.record, default) * DEAD_MEMBER_KEPT_LEASES
        });
    }
}

/// How far the wall clocks of the grid's hosts may differ for a member's age read at startup
/// (its heartbeat time, written by its host) to count as none.
const LOADED_CLOCK_SKEW_MAX: Duration = Duration::from_secs(2);

/// The lease a member announced, or this grid's default for an unreadable value.
fn lease_of(record: &MemberRecord, default: Duration) -> Duration {
    if record.lease_ms == 0 {
        default
    } else {
        Duration::from_millis(record.lease_ms)
    }
}

#[cfg(test)]
mod tests {
    use flowgrid_proto::ShardState;

    use super::*;

    const LEASE: Duration = Duration::from_millis(1500);

    fn record(id: &str, draining: bool) -> MemberRecord {
        MemberRecord {
            id: id.to_owned(),
            host: "h".into(),
            pid: 1,
            started_ms: 0,
            heartbeat_ms: 0,
            lease_ms: LEASE.as_millis() as u64,
            draining,
            catching_up: false,
            shards_serving: 0,
            store: "s".into(),
            metrics_addr: None,
        }
    }

    #[test]
    fn a_member_dies_a_lease_after_its_last_change_seen_here() {
        let start = Instant::now();
        let mut view = ClusterView::new("me".into(), 4, LEASE, start);
        view.member_put(record("a", false), 1, start);
        assert!(view.alive("a", start + LEASE));
        assert!(!view.alive("a", start + LEASE + Duration::from_millis(1)));
        // The same revision again is no sign of life.
        view.member_put(record("a", false), 1, start + LEASE);
        assert!(!view.alive("a", start + LEASE + Duration::from_millis(1)));
        view.member_put(record("a", false), 2, start + LEASE);
        assert!(view.alive("a", start + LEASE * 2));
        assert!(view.alive("me", start + LEASE * 10));
        assert_eq!(view.silent_for("a", start + LEASE * 3), Some(LEASE * 2));
        assert_eq!(view.silent_for("never-seen", start), None);
    }

    /// An owner never seen counts as alive for a lease from when the members were read,
    /// not from when the view was made: a read that took longer than a lease (a slow KV)
    /// leaves the live owners of the claims alive.
    #[test]
    fn an_owner_never_seen_lives_a_lease_from_the_read_of_the_members() {
        let start = Instant::now();
        let mut view = ClusterView::new("me".into(), 4, LEASE, start);
        assert!(!view.alive("unknown", start + LEASE * 2), "no read: a lease from the start");
        view.members_read(start + LEASE * 2);
        assert!(view.alive("unknown", start + LEASE * 3));
        assert!(!view.alive("unknown", start + LEASE * 3 + Duration::from_millis(1)));
        // A stall of this member's own, begun while they counted as alive, keeps them so.
        view.refresh_after_stall(start + LEASE * 2 + LEASE / 2, start + LEASE * 6);
        assert!(view.alive("unknown", start + LEASE * 6));
        assert!(!view.alive("unknown", start + LEASE * 7 + Duration::from_millis(1)));
    }

    #[test]
    fn a_loaded_record_counts_its_age_and_a_stall_renews_only_the_living() {
        let start = Instant::now() + Duration::from_secs(60);
        let mut view = ClusterView::new("me".into(), 4, LEASE, start);
        let mut old = record("old", false);
        old.heartbeat_ms = 10_000;
        view.member_loaded(old, 1, start, 10_000 + 5_000);
        let mut fresh = record("fresh", false);
        fresh.heartbeat_ms = 10_000;
        // Its host's clock 2 s behind: alive all the same, for a whole lease.
        view.member_loaded(fresh, 2, start, 10_000 + 2_000);
        let mut late = record("late", false);
        late.heartbeat_ms = 10_000;
        view.member_loaded(late, 3, start, 10_000 + 2_000 + 200);
        assert!(!view.alive("old", start));
        assert!(view.alive("fresh", start + LEASE));
        assert!(!view.alive("fresh", start + LEASE + Duration::from_millis(1)));
        assert!(view.alive("late", start + Duration::from_millis(1_200)));
        assert!(!view.alive("late", start + Duration::from_millis(1_400)));
        // A stall from +1 s to +10 s: "fresh" was alive when it began, "old" was not.
        view.refresh_after_stall(start + Duration::from_secs(1), start + Duration::from_secs(10));
        assert!(view.alive("fresh", start + Duration::from_secs(11)));
        assert!(!view.alive("old", start + Duration::from_secs(10)));
    }

    #[test]
    fn a_member_is_forgotten_by_its_own_lease() {
        let start = Instant::now();
        let mut view = ClusterView::new("me".into(), 4, LEASE, start);
        let slow = MemberRecord { lease_ms: 60_000, ..record("slow", false) };
        view.member_put(slow, 1, start);
        view.member_put(record("quick", false), 1, start);
        let later = start + LEASE * DEAD_MEMBER_KEPT_LEASES + Duration::from_millis(1);
        view.forget_dead(later);
        assert!(view.alive("slow", later), "a 60 s lease still holds");
        assert_eq!(view.silent_for("quick", later), None, "forgotten");
    }

    #[test]
    fn an_unknown_owner_gets_one_lease_from_the_start_of_the_view() {
        let start = Instant::now();
        let view = ClusterView::new("me".into(), 4, LEASE, start);
        assert!(view.alive("ghost", start + LEASE));
        assert!(!view.alive("ghost", start + LEASE + Duration::from_millis(1)));
    }

    #[test]
    fn candidates_leave_out_draining_catching_up_and_dead_members() {
        let start = Instant::now();
        let mut view = ClusterView::new("me".into(), 4, LEASE, start);
        view.member_put(record("b", false), 1, start);
        view.member_put(record("a", false), 1, start);
        view.member_put(record("c", true), 1, start);
        view.member_put(MemberRecord { catching_up: true, ..record("d", false) }, 1, start);
        assert_eq!(view.candidates(true, start), vec!["a", "b", "me"]);
        // Caught up: it takes shards from now on.
        view.member_put(record("d", false), 2, start);
        assert_eq!(view.candidates(true, start), vec!["a", "b", "d", "me"]);
        view.member_deleted("d");
        assert_eq!(view.candidates(false, start), vec!["a", "b"]);
        assert_eq!(view.candidates(true, start + LEASE * 2), vec!["me"]);
        view.member_deleted("a");
        assert_eq!(view.candidates(false, start), vec!["b"]);
    }

    #[test]
    fn older_claim_revisions_are_ignored() {
        let mut view = ClusterView::new("me".into(), 2, LEASE, Instant::now());
        let claim = |owner: &str| ShardClaim {
            owner: Some(owner.to_owned()),
            state: ShardState::Serving,
            epoch: 1,
            changed_ms: 0,
        };
        view.claim_put(1, Some(claim("a")), 5);
        view.claim_put(1, Some(claim("b")), 4);
        assert_eq!(view.claim(1).map(|known| known.claim.owner.clone()), Some(Some("a".to_owned())));
        view.claim_put(7, Some(claim("a")), 1);
        assert_eq!(view.claim(0), None);
    }
}
