//! The shard manager: one task per coordinator that keeps the shards it serves in line
//! with the placement over the live members.
//!
//! It watches the members and shards buckets and, on every change (and every tick, for
//! leases running out), reconciles:
//! - a shard served here that placement gives to another member is *released*: its claim
//!   goes to `releasing`, the shard leaves the routing table, its actor commits what it
//!   holds and stops, its file closes, and the claim goes to `released`;
//! - a shard placement gives to this member is *acquired* once its claim is free
//!   (released, never claimed, or held by a member whose lease ran out): the claim goes to
//!   `acquiring` by compare-and-set (so only one member wins), the shard is opened (the
//!   embedded store waits for the previous owner's file lock), its epoch bumped, its runs
//!   reloaded, and the claim goes to `serving`.
//!
//! If this member's own lease runs out, every shard stops at once, without touching the
//! claims (others may hold them already); when the lease is renewed, reconciling starts over.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use flowgrid_model::{Epoch, ShardId};
use flowgrid_proto::{shard_key, shard_of_key, MemberRecord, ShardClaim, ShardState};
use flowgrid_store::Store;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::placement::owner_of;
use super::view::ClusterView;
use super::{Lease, Membership};
use crate::clock::now_ms;
use crate::metrics;
use crate::routing::{serve_shard_commands, Router};
use crate::shard::{spawn_shard, ShardHandle};

/// How often the manager looks at leases even when nothing changes.
const TICK: Duration = Duration::from_millis(100);
/// Shards opened and reloaded at once.
const ACQUIRES_IN_FLIGHT_MAX: usize = 16;
/// Pauses while a shard file is still locked by its previous owner.
const BUSY_RETRY_FIRST: Duration = Duration::from_millis(20);
const BUSY_RETRY_MAX: Duration = Duration::from_millis(200);
/// How long a shard file may stay locked before the wait is logged (a paused previous owner).
const BUSY_REPORT_AFTER: Duration = Duration::from_secs(2);
/// Pause before trying a shard again after an acquire failed.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// How long starting a bucket's watch and reading the bucket may take before the manager
/// goes on without it and tries again. A request sent while the connection was already
/// dead (cut off from NATS) would otherwise hold the manager for the client's whole request
/// timeout after the connection is back.
const WATCH_START_TIMEOUT: Duration = Duration::from_secs(2);
/// Shard opens that fail alike (a full disk fails every shard, twice a second) are warned
/// about at most this often.
const OPEN_FAILURE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Everything the manager and its hand-over tasks share.
pub struct ManagerContext<S: Store> {
    pub me: String,
    pub store: S,
    pub router: Arc<Router>,
    pub shards_kv: kv::Store,
    pub lease: Arc<Lease>,
    pub membership: Arc<Membership>,
    pub queue_max: usize,
    /// Bounds forwarded requests handled at once over all shards served here.
    pub forward_permits: Arc<Semaphore>,
    /// Warns about shards that fail to open, at a bounded rate.
    pub open_failures: OpenFailures,
    /// Changes each time the client connects to NATS again.
    pub connections: tokio::sync::watch::Receiver<u64>,
    /// The parent of every shard's stop: cancelled when the node stops, so that shards a
    /// drain cut short do not go on serving (and holding their files) behind it.
    pub shards_stop: CancellationToken,
}

/// Shard opens that failed other than on a busy file (a full or failing disk), retried
/// every [`RETRY_AFTER_FAILURE`]: the first is warned about, then at most one warning per
/// [`OPEN_FAILURE_WARN_EVERY`] with how many failed since; the others go to debug.
#[derive(Default)]
pub struct OpenFailures {
    /// Failed opens since the last warning, and when it was.
    state: std::sync::Mutex<(u64, Option<Instant>)>,
}

impl OpenFailures {
    fn report(&self, shard: u32, error: &flowgrid_store::Error) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (since_warning, warned) = &mut *state;
        *since_warning += 1;
        if warned.is_some_and(|at| at.elapsed() < OPEN_FAILURE_WARN_EVERY) {
            debug!(shard, error = %error, "cannot open the shard");
            return;
        }
        warn!(
            shard,
            error = %error,
            failed_opens = *since_warning,
            "cannot open the shard; it is retried every {RETRY_AFTER_FAILURE:?}; this warning comes at most every \
             {OPEN_FAILURE_WARN_EVERY:?}, and failed_opens counts the failed opens of every shard since the last one"
        );
        *since_warning = 0;
        *warned = Some(Instant::now());
    }
}

/// A shard served here.
struct Owned {
    handle: ShardHandle,
    /// The lease term the shard's actor serves in: it stops once that term is over.
    term: u64,
    epoch: Epoch,
    /// Revision of the shard's claim as this member last wrote it.
    revision: u64,
    stop: CancellationToken,
    actor: JoinHandle<()>,
    commands: JoinHandle<()>,
}

impl Owned {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.actor.await;
        let _ = self.commands.await;
    }
}

enum Transition {
    Acquired(u32, Owned),
    /// `conflict`: the claim had moved past the revision tried (this member's view was behind).
    AcquireFailed {
        shard: u32,
        conflict: Option<u64>,
    },
    Released(u32),
}

pub struct ShardManager<S: Store> {
    shared: Arc<ManagerContext<S>>,
    shards: u32,
    view: ClusterView,
    owned: HashMap<u32, Owned>,
    /// Shards being acquired or released.
    busy: HashSet<u32>,
    retry_at: HashMap<u32, Instant>,
    /// Claim revisions an acquire lost on: not tried again before the view shows a newer one.
    lost_at: HashMap<u32, u64>,
    transitions: JoinSet<Transition>,
    /// The shard each hand-over task is for, so that one that panics frees its shard.
    transition_shards: HashMap<tokio::task::Id, u32>,
    acquire_permits: Arc<Semaphore>,
    draining: bool,
    /// The lease term the shards served here were acquired in.
    term: u64,
}

impl<S: Store> ShardManager<S> {
    pub fn new(shared: ManagerContext<S>, shards: u32) -> ShardManager<S> {
        let view = ClusterView::new(shared.me.clone(), shards, shared.lease.duration(), Instant::now());
        ShardManager {
            shared: Arc::new(shared),
            shards,
            view,
            owned: HashMap::new(),
            busy: HashSet::new(),
            retry_at: HashMap::new(),
            lost_at: HashMap::new(),
            transitions: JoinSet::new(),
            transition_shards: HashMap::new(),
            acquire_permits: Arc::new(Semaphore::new(ACQUIRES_IN_FLIGHT_MAX)),
            draining: false,
            term: 0,
        }
    }

    /// Serves shards until `drain` is cancelled, then hands every shard over and returns
    /// once none is left here. It drains by itself when the store can take no more
    /// commits in this process, and then returns why.
    pub async fn run(mut self, members_kv: kv::Store, drain: CancellationToken) -> Option<String> {
        let mut broken = None;
        let mut members = None;
        let mut claims = None;
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stall = self.shared.lease.duration() / 3;
        let mut last_turn = Instant::now();
        loop {
            // Without both watches this member could not take a shard handed to it: the
            // others place none on it meanwhile (after a start, or back from losing NATS).
            self.shared.membership.set_catching_up(members.is_none() || claims.is_none());
            if members.is_none() {
                members = within_watch_start(self.shared.connections.clone(), self.load_members(&members_kv)).await;
            }
            if claims.is_none() {
                claims = within_watch_start(self.shared.connections.clone(), self.load_claims()).await;
            }
            self.shared.membership.set_catching_up(members.is_none() || claims.is_none());
            tokio::select! {
                entry = next_entry(&mut members) => match entry {
                    Some(entry) => self.member_changed(entry),
                    None => members = None,
                },
                entry = next_entry(&mut claims) => match entry {
                    Some(entry) => self.claim_changed(entry),
                    None => claims = None,
                },
                Some(done) = self.transitions.join_next_with_id() => match done {
                    Ok((id, transition)) => {
                        self.transition_shards.remove(&id);
                        self.transition_done(transition).await;
                    }
                    Err(error) => self.transition_failed(&error),
                },
                _ = ticks.tick() => {}
                _ = drain.cancelled(), if !self.draining => {
                    info!(shards = self.owned.len(), "draining: handing every shard to the other coordinators");
                    self.start_draining();
                }
            }
            if !self.draining {
                if let Some(failure) = self.shared.store.broken() {
                    error!(
                        shards = self.owned.len(),
                        failure = %failure,
                        "the store takes no more commits in this process: handing every shard to the other \
                         coordinators, then stopping"
                    );
                    self.start_draining();
                    broken = Some(failure);
                }
            }
            let lease = self.shared.lease.clone();
            let now = Instant::now();
            if now.saturating_duration_since(last_turn) > stall || !lease.holds(self.term) {
                // This member stalled: the others' heartbeats it missed meanwhile prove nothing.
                self.view.refresh_after_stall(last_turn, now);
            }
            last_turn = now;
            if !lease.holds(self.term) {
                // Out of lease, or renewed after a gap in which others may have taken shards.
                self.stop_all().await;
                self.term = lease.term();
                if self.draining {
                    break;
                }
                if !lease.valid() {
                    continue;
                }
            }
            // Without both views this member could take a live member's shards (an owner it
            // has not read counts as dead after a lease): it lets shards go, takes none.
            self.reconcile(members.is_some() && claims.is_some());
            if self.draining && self.owned.is_empty() && self.busy.is_empty() {
                break;
            }
        }
        // Hand-over tasks still running (only when the lease ran out while draining).
        while let Some(done) = self.transitions.join_next().await {
            if let Ok(Transition::Acquired(_, owned)) = done {
                owned.stop().await;
            }
        }
        self.stop_all().await;
        broken
    }

    /// From now on every shard here is handed over, and none is taken. The others learn it
    /// from the next heartbeat, sent at once; the hand-over does not wait for it.
    fn start_draining(&mut self) {
        self.draining = true;
        self.shared.membership.set_draining();
    }

    /// Starts a watch on the members bucket and reads what is there now.
    async fn load_members(&mut self, members_kv: &kv::Store) -> Option<kv::Watch> {
        let watch = members_kv.watch_all().await.map_err(|error| warn!(error = %error, "cannot watch members")).ok()?;
        let entries =
            read_all(members_kv).await.map_err(|error| warn!(error = %error, "cannot read the members")).ok()?;
        let (now, now_ms) = (Instant::now(), now_ms());
        for entry in entries {
            if entry.operation != Operation::Put {
                continue;
            }
            match rmp_serde::from_slice::<MemberRecord>(&entry.value) {
                Ok(record) => self.view.member_loaded(record, entry.revision, now, now_ms),
                Err(error) => warn!(key = %entry.key, error = %error, "unreadable member record ignored"),
            }
        }
        self.view.members_read(now);
        Some(watch)
    }

    async fn load_claims(&mut self) -> Option<kv::Watch> {
        let kv = &self.shared.shards_kv;
        let watch = kv.watch_all().await.map_err(|error| warn!(error = %error, "cannot watch shard claims")).ok()?;
        let entries = read_all(kv).await.map_err(|error| warn!(error = %error, "cannot read the shard claims")).ok()?;
        for entry in entries {
            self.claim_changed(entry);
        }
        Some(watch)
    }

    fn member_changed(&mut self, entry: kv::Entry) {
        match entry.operation {
            Operation::Put => match rmp_serde::from_slice::<MemberRecord>(&entry.value) {
                Ok(record) => self.view.member_put(record, entry.revision, Instant::now()),
                Err(error) => warn!(key = %entry.key, error = %error, "unreadable member record ignored"),
            },
            Operation::Delete | Operation::Purge => self.view.member_deleted(&entry.key),
        }
    }

    fn claim_changed(&mut self, entry: kv::Entry) {
        let Some(shard) = shard_of_key(&entry.key) else { return };
        let claim = match entry.operation {
            Operation::Put => match rmp_serde::from_slice::<ShardClaim>(&entry.value) {
                Ok(claim) => Some(claim),
                Err(error) => {
                    warn!(key = %entry.key, error = %error, "unreadable shard claim ignored");
                    return;
                }
            },
            Operation::Delete | Operation::Purge => None,
        };
        self.view.claim_put(shard, claim, entry.revision);
    }

    async fn transition_done(&mut self, transition: Transition) {
        match transition {
            Transition::Acquired(shard, owned) => {
                self.busy.remove(&shard);
                // Its actor serves only in the term it was made in: a lease renewed after a
                // gap meanwhile (a new term) would stop it at its first event.
                if !self.shared.lease.holds(owned.term) {
                    owned.stop().await;
                    self.retry_at.insert(shard, Instant::now() + RETRY_AFTER_FAILURE);
                    return;
                }
                self.shared.router.table.insert(owned.handle.clone());
                self.owned.insert(shard, owned);
                self.settled();
            }
            Transition::AcquireFailed { shard, conflict: Some(revision) } => {
                self.busy.remove(&shard);
                self.lost_at.insert(shard, revision);
            }
            Transition::AcquireFailed { shard, conflict: None } => {
                self.busy.remove(&shard);
                self.retry_at.insert(shard, Instant::now() + RETRY_AFTER_FAILURE);
            }
            Transition::Released(shard) => {
                self.busy.remove(&shard);
                self.settled();
            }
        }
    }

    /// A hand-over task that panicked: its shard is tried again later (a claim it left
    /// behind is given back by [`Self::reconcile`]).
    fn transition_failed(&mut self, error: &tokio::task::JoinError) {
        let shard = self.transition_shards.remove(&error.id());
        error!(shard, error = %error, "a shard hand-over task failed; the shard is tried again later");
        if let Some(shard) = shard {
            self.busy.remove(&shard);
            self.retry_at.insert(shard, Instant::now() + RETRY_AFTER_FAILURE);
        }
    }

    /// Runs a hand-over of `shard`; the shard is busy until it is done.
    fn spawn_transition(&mut self, shard: u32, task: impl Future<Output = Transition> + Send + 'static) {
        self.busy.insert(shard);
        let id = self.transitions.spawn(task).id();
        self.transition_shards.insert(id, shard);
    }

    fn settled(&self) {
        if self.busy.is_empty() {
            info!(serving = self.owned.len(), "shards settled");
        }
    }

    /// Compares what is served here with the placement and starts the hand-overs needed;
    /// acquires only when `may_acquire`.
    fn reconcile(&mut self, may_acquire: bool) {
        let now = Instant::now();
        self.retry_at.retain(|_, at| *at > now);
        let view = &self.view;
        self.lost_at.retain(|shard, lost| view.claim(*shard).map_or(0, |known| known.revision) <= *lost);
        let me = self.shared.me.clone();
        let candidates = self.view.candidates(!self.draining, now);
        let placed_here: Vec<bool> =
            (0..self.shards).map(|shard| owner_of(shard, &candidates) == Some(me.as_str())).collect();
        for shard in 0..self.shards {
            if self.busy.contains(&shard) || self.retry_at.contains_key(&shard) || self.lost_at.contains_key(&shard) {
                continue;
            }
            let mine = placed_here[shard as usize];
            if let Some(owned) = self.owned.get(&shard) {
                let taken = self.view.claim(shard).is_some_and(|known| {
                    known.revision > owned.revision && known.claim.owner.as_deref() != Some(me.as_str())
                });
                if taken {
                    // Another member claimed it (it thought this one dead): stop at once.
                    warn!(shard, "shard claimed by another coordinator; it stops serving here");
                    let owned = self.owned.remove(&shard).expect("owned");
                    self.start_stop(shard, owned);
                } else if owned.actor.is_finished() {
                    // Its actor gave up (a commit failed and so did the reload that followed):
                    // let the claim go, then open the shard afresh, here or elsewhere.
                    warn!(shard, "the shard stopped serving here (see the errors above); it is opened again shortly");
                    let owned = self.owned.remove(&shard).expect("owned");
                    self.retry_at.insert(shard, now + RETRY_AFTER_FAILURE);
                    self.start_release(shard, owned);
                } else if !mine {
                    let owned = self.owned.remove(&shard).expect("owned");
                    self.start_release(shard, owned);
                }
                continue;
            }
            if !may_acquire {
                continue;
            }
            let Some(known) = self.view.claim(shard) else {
                if mine {
                    self.start_acquire(shard, None, 0, false);
                }
                continue;
            };
            let claim = &known.claim;
            let (revision, epoch) = (known.revision, claim.epoch);
            match claim.owner.as_deref() {
                // A claim left here by an earlier stop (lost lease): take it back or let it go.
                Some(owner) if owner == me => {
                    if mine {
                        self.start_acquire(shard, Some(revision), epoch, false);
                    } else if claim.state != ShardState::Released {
                        self.start_give_back(shard, revision, epoch);
                    }
                }
                None if mine => self.start_acquire(shard, Some(revision), epoch, false),
                Some(owner) if mine && !self.view.alive(owner, now) => {
                    // Rare, and what an operator looks for after a takeover nobody expected.
                    // `silent_ms`: since the owner's record last changed, as seen here (none: never seen).
                    let silent_ms = self.view.silent_for(owner, now).map(|silent| silent.as_millis() as u64);
                    info!(shard, dead = owner, state = ?claim.state, silent_ms, "taking over a shard whose owner's lease ran out");
                    self.start_acquire(shard, Some(revision), epoch, true);
                }
                _ => {}
            }
        }
        self.view.forget_dead(now);
    }

    fn start_acquire(&mut self, shard: u32, revision: Option<u64>, epoch: u64, takeover: bool) {
        let shared = self.shared.clone();
        let permits = self.acquire_permits.clone();
        // The term this member decided in: the acquire goes on only while it lasts.
        let term = self.term;
        self.spawn_transition(shard, async move {
            let started = Instant::now();
            match acquire(&shared, &permits, shard, revision, epoch, term).await {
                Ok(owned) => {
                    ::metrics::histogram!(metrics::SHARD_ACQUIRE_SECONDS).record(started.elapsed().as_secs_f64());
                    if takeover {
                        ::metrics::counter!(metrics::SHARD_TAKEOVERS).increment(1);
                    }
                    Transition::Acquired(shard, owned)
                }
                Err(Lost::Race) => Transition::AcquireFailed { shard, conflict: Some(revision.unwrap_or(0)) },
                Err(Lost::Failed) => Transition::AcquireFailed { shard, conflict: None },
            }
        });
    }

    fn start_release(&mut self, shard: u32, owned: Owned) {
        self.shared.router.table.remove(owned.handle.shard);
        let shared = self.shared.clone();
        self.spawn_transition(shard, async move {
            let started = Instant::now();
            let releasing = claim_value(&shared.me, ShardState::Releasing, owned.epoch.0);
            let revision = shared.shards_kv.update(shard_key(shard), releasing, owned.revision).await;
            let epoch = owned.epoch.0;
            owned.stop().await;
            match revision {
                Ok(revision) => {
                    let released = claim_value_free(epoch);
                    if let Err(error) = shared.shards_kv.update(shard_key(shard), released, revision).await {
                        warn!(shard, error = %error, "cannot mark the shard released; it moves once the lease runs out");
                    }
                }
                Err(error) => warn!(shard, error = %error, "shard claim changed under its owner; released anyway"),
            }
            ::metrics::histogram!(metrics::SHARD_RELEASE_SECONDS).record(started.elapsed().as_secs_f64());
            Transition::Released(shard)
        });
    }

    /// Stops serving a shard another member has claimed, leaving its claim alone.
    fn start_stop(&mut self, shard: u32, owned: Owned) {
        self.shared.router.table.remove(owned.handle.shard);
        self.spawn_transition(shard, async move {
            owned.stop().await;
            Transition::Released(shard)
        });
    }

    /// Frees a claim this member still holds on paper but no longer serves.
    fn start_give_back(&mut self, shard: u32, revision: u64, epoch: u64) {
        let shared = self.shared.clone();
        self.spawn_transition(shard, async move {
            let _ = shared.shards_kv.update(shard_key(shard), claim_value_free(epoch), revision).await;
            Transition::Released(shard)
        });
    }

    /// Stops every shard here at once, leaving the claims as they are.
    async fn stop_all(&mut self) {
        if self.owned.is_empty() {
            return;
        }
        warn!(shards = self.owned.len(), "lease ran out: every shard stops serving here");
        // Every shard is told first, then all are waited for together: one slow to stop (in
        // a reload, a long commit) keeps no other's file from the member taking it over.
        let owned: Vec<Owned> = self.owned.drain().map(|(_, owned)| owned).collect();
        for owned in &owned {
            self.shared.router.table.remove(owned.handle.shard);
            owned.stop.cancel();
        }
        futures::future::join_all(owned.into_iter().map(Owned::stop)).await;
    }
}

/// Why an acquire did not end with the shard served here.
enum Lost {
    /// The claim had changed since this member read it: another member won, or the view
    /// was behind.
    Race,
    /// The claim could not be written, or opening or loading failed, or the lease ran out
    /// (the claim was given back): tried again after [`RETRY_AFTER_FAILURE`].
    Failed,
}

/// Claims, opens, reloads and announces one shard, all within lease term `term` (the one
/// the manager decided in): a lease that runs out meanwhile, even if renewed at once, may
/// have let another member take the shard, so each step that may have waited checks that
/// the lease has held without a gap since `term` began.
async fn acquire<S: Store>(
    shared: &ManagerContext<S>,
    permits: &Semaphore,
    shard: u32,
    revision: Option<u64>,
    epoch: u64,
    term: u64,
) -> Result<Owned, Lost> {
    if !shared.lease.holds(term) {
        return Err(Lost::Failed);
    }
    let key = shard_key(shard);
    let acquiring = claim_value(&shared.me, ShardState::Acquiring, epoch);
    // (whether another member's write came first, what went wrong)
    let claimed = match revision {
        Some(revision) => shared
            .shards_kv
            .update(&key, acquiring, revision)
            .await
            .map_err(|error| (error.kind() == kv::UpdateErrorKind::WrongLastRevision, error.to_string())),
        None => shared
            .shards_kv
            .create(&key, acquiring)
            .await
            .map_err(|error| (error.kind() == kv::CreateErrorKind::AlreadyExists, error.to_string())),
    };
    let revision = match claimed {
        Ok(revision) => revision,
        Err((true, error)) => {
            debug!(shard, error = %error, "another coordinator claimed the shard first");
            return Err(Lost::Race);
        }
        // Nothing shows another claim (a timeout, no responders while JetStream elects a
        // leader): tried again shortly, not left until the claim changes, which it may never.
        // (NATS itself says when it is unreachable; this would say it for every shard.)
        Err((false, error)) => {
            debug!(shard, error = %error, "cannot write the shard's claim; trying again shortly");
            return Err(Lost::Failed);
        }
    };
    let give_back = |revision: u64| async move {
        let _ = shared.shards_kv.update(&shard_key(shard), claim_value_free(epoch), revision).await;
    };
    let opened = open_when_free(&shared.store, &shared.lease, term, &shared.open_failures, shard).await;
    let Some(shard_store) = opened else {
        give_back(revision).await;
        return Err(Lost::Failed);
    };
    // Loading is what costs: bound it, not the wait for the file.
    let Ok(_permit) = permits.acquire().await else {
        give_back(revision).await;
        return Err(Lost::Failed);
    };
    // The wait for a permit may have outlasted the lease: the shard's epoch is bumped next.
    if !shared.lease.holds(term) {
        debug!(shard, "the lease ran out while the shard waited to load; giving its claim back");
        drop(shard_store);
        give_back(revision).await;
        return Err(Lost::Failed);
    }
    let router = &shared.router;
    let stop = shared.shards_stop.child_token();
    // The actor reads the lease's term itself as it starts: should a renewal after a gap
    // come in between, it differs from `term`, and the check after loading stops it.
    let spawned =
        spawn_shard(shard_store, ShardId(shard), router.context.clone(), shared.queue_max, stop.clone()).await;
    let (handle, epoch, actor) = match spawned {
        Ok(spawned) => spawned,
        Err(error) => {
            warn!(shard, error = %error, "cannot load the shard; trying again shortly");
            give_back(revision).await;
            return Err(Lost::Failed);
        }
    };
    let nats = &router.context.nats;
    let commands = match nats.subscribe(router.context.subjects.shard_commands(shard)).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            warn!(shard, error = %error, "cannot subscribe to the shard's commands");
            stop.cancel();
            let _ = actor.await;
            give_back(revision).await;
            return Err(Lost::Failed);
        }
    };
    let commands = tokio::spawn(serve_shard_commands(
        router.clone(),
        handle.clone(),
        commands,
        shared.forward_permits.clone(),
        stop.clone(),
    ));
    // Bounded: a flush waits for a reconnect, and the lease may run out meanwhile.
    let _ = tokio::time::timeout(shared.lease.duration(), nats.flush()).await;
    let owned = Owned { handle, term, epoch, revision, stop, actor, commands };
    if !shared.lease.holds(term) {
        // Out of lease while loading: the shard is not this member's to claim any more.
        owned.stop().await;
        return Err(Lost::Failed);
    }
    match shared.shards_kv.update(&key, claim_value(&shared.me, ShardState::Serving, epoch.0), revision).await {
        Ok(revision) => Ok(Owned { revision, ..owned }),
        Err(error) => {
            warn!(shard, error = %error, "shard claim changed while loading it; letting it go");
            owned.stop().await;
            Err(Lost::Race)
        }
    }
}

/// Opens a shard's store, waiting while the previous owner still holds it (a paused
/// process keeps its file lock until it resumes or dies). Gives up once the lease has not
/// held without a gap since `term` began: it ran out, even if it was renewed since.
async fn open_when_free<S: Store>(
    store: &S,
    lease: &Lease,
    term: u64,
    open_failures: &OpenFailures,
    shard: u32,
) -> Option<S::Shard> {
    let mut delay = BUSY_RETRY_FIRST;
    let started = Instant::now();
    let mut told = false;
    loop {
        if !lease.holds(term) {
            return None;
        }
        match store.open_shard(ShardId(shard)).await {
            Ok(opened) => return Some(opened),
            Err(flowgrid_store::Error::Busy { detail, .. }) => {
                if !told && started.elapsed() > BUSY_REPORT_AFTER {
                    info!(shard, detail = %detail, "waiting for the previous owner to let go of the shard");
                    told = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BUSY_RETRY_MAX);
            }
            Err(error) => {
                open_failures.report(shard, &error);
                return None;
            }
        }
    }
}

fn claim_value(owner: &str, state: ShardState, epoch: u64) -> Bytes {
    encode_claim(&ShardClaim { owner: Some(owner.to_owned()), state, epoch, changed_ms: now_ms() })
}

fn claim_value_free(epoch: u64) -> Bytes {
    encode_claim(&ShardClaim { owner: None, state: ShardState::Released, epoch, changed_ms: now_ms() })
}

fn encode_claim(claim: &ShardClaim) -> Bytes {
    Bytes::from(rmp_serde::to_vec_named(claim).expect("a shard claim encodes"))
}

/// A watch started within [`WATCH_START_TIMEOUT`], or `None` (the caller tries again at
/// once): also when the connection to NATS comes back meanwhile, as the start's request
/// may have gone out on the dead connection and have no answer coming (`connections`
/// changes on each connect).
async fn within_watch_start(
    mut connections: tokio::sync::watch::Receiver<u64>,
    start: impl Future<Output = Option<kv::Watch>>,
) -> Option<kv::Watch> {
    connections.mark_unchanged();
    tokio::select! {
        watch = tokio::time::timeout(WATCH_START_TIMEOUT, start) => match watch {
            Ok(watch) => watch,
            Err(_) => {
                warn!(timeout = ?WATCH_START_TIMEOUT, "starting a KV watch took too long; starting it again");
                None
            }
        },
        Ok(()) = connections.changed() => {
            info!("connected to NATS again while starting a KV watch; starting it again");
            None
        }
    }
}

/// The next entry of a watch; pending forever without one, `None` when it ended.
async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<kv::Entry> {
    let Some(stream) = watch.as_mut() else {
        tokio::time::sleep(TICK).await;
        return None;
    };
    match stream.next().await {
        Some(Ok(entry)) => Some(entry),
        Some(Err(error)) => {
            warn!(error = %error, "KV watch failed; starting it again");
            None
        }
        None => None,
    }
}

/// Every current entry of a bucket, or why not all could be read: a view that missed one
/// would never learn of it (the watch reports the writes from its start on), so the caller
/// reads them all again with a new watch.
async fn read_all(kv: &kv::Store) -> Result<Vec<kv::Entry>, String> {
    let keys = kv.keys().await.map_err(|error| format!("cannot list the bucket's keys: {error}"))?;
    let keys: Vec<String> =
        keys.try_collect().await.map_err(|error| format!("cannot list the bucket's keys: {error}"))?;
    futures::stream::iter(keys)
        .map(|key| async move { kv.entry(key.as_str()).await.map_err(|error| format!("cannot read {key}: {error}")) })
        .buffer_unordered(32)
        .try_filter_map(|entry| async move { Ok(entry) })
        .try_collect()
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use flowgrid_store::StoreLimits;
    use flowgrid_store_redb::RedbStore;

    use super::*;

    /// Runs a lease out and renews it: a new term, which then holds for an hour (renewed
    /// as if sent in the future, so that it holds however slow the host is).
    fn lapse_and_renew(lease: &Lease) {
        while lease.valid() {
            std::thread::sleep(Duration::from_millis(1));
        }
        lease.renewed(Instant::now() + Duration::from_secs(3600));
    }

    /// A store whose shard is held by a previous owner at the first open, during which this
    /// member's lease runs out and is renewed (the process was paused, or cut off from NATS).
    struct LapsesWhileBusy {
        inner: RedbStore,
        lease: Arc<Lease>,
        opened_once: AtomicBool,
    }

    impl Store for LapsesWhileBusy {
        type Shard = <RedbStore as Store>::Shard;

        async fn open_shard(&self, shard: ShardId) -> flowgrid_store::Result<Self::Shard> {
            if self.opened_once.swap(true, Ordering::AcqRel) {
                return self.inner.open_shard(shard).await;
            }
            lapse_and_renew(&self.lease);
            Err(flowgrid_store::Error::Busy { shard, detail: "held by the previous owner".to_owned() })
        }
    }

    #[tokio::test]
    async fn a_shard_is_not_opened_for_an_acquire_whose_lease_ran_out_while_it_waited() {
        let dir = tempfile::tempdir().unwrap();
        // Held 400 ms: long enough for the acquire to begin in its term on a loaded machine
        // (it gives up at once in a lapsed one), then waited out by the store's first open.
        let lease = Arc::new(Lease::new(Duration::from_millis(600)));
        lease.renewed(Instant::now());
        let term = lease.term();
        let store = LapsesWhileBusy {
            inner: RedbStore::open(dir.path(), StoreLimits::default()).unwrap(),
            lease: lease.clone(),
            opened_once: AtomicBool::new(false),
        };
        let opened = open_when_free(&store, &lease, term, &OpenFailures::default(), 0).await;
        assert!(lease.valid() && lease.term() != term, "the lease holds again, in a new term");
        assert!(opened.is_none(), "the acquire begun in the old term gives up");
        // The new term's acquire opens it.
        let opened = open_when_free(&store, &lease, lease.term(), &OpenFailures::default(), 0).await;
        assert!(opened.is_some());
    }
}
