//! Concurrency limits: at most `max` runs of a flow (of each concurrency key) go at once.
//!
//! A limit lives in the shard its flow and key hash to (its *gate*); its runs live in
//! their own shards. Three messages cross between them, each written to the sender's
//! outbox in the commit that decides it and sent until taken (ADR 0018):
//! - **acquire**: a run that starts (or is redriven) queued asks for a slot;
//! - **admit**: the gate gives it one (at once when it has room, later in the order asked);
//!   the run's shard starts the steps the run held;
//! - **release**: a run that ends gives its slot, or its place in the queue, back; the gate
//!   admits the next one.
//!
//! Each message names the run's *round* (0 for its start, `n` after its `n`th redrive), so
//! a late message of an earlier round never counts for the current one. Receivers make
//! repeats and reorderings harmless: the gate takes an acquire once and a release only for
//! the round it holds; an admission for a run that ended or went again meanwhile is
//! answered with a release of that round. Acquire and release go on retry timers of their
//! own, so either may come first: the gate remembers the rounds released (taken or found
//! nothing) and turned away ([`EndedRounds`]), and an acquire of such a round, repeated or
//! late, changes nothing. So a slot taken by a run that is gone comes back, a run that
//! ended never takes a place (nor under `cancel_oldest` a live run's), and a limit never
//! admits more runs than `max` of the rounds it was asked for.
//!
//! A limit's bounds (`max`, `rate`, `when_full`) come with each acquire, as the asking
//! run's flow version gives them; the gate takes them only from a version at least as new
//! as the one it holds to, after the acquire proved no repeat. Every record the gate writes
//! carries its bounds and their version, and while it keeps any place, one of its records
//! carries the bounds it holds to, so a reload takes the same (the newest version's).
//! The gate numbers the places it queues in the order asked: a reload queues them so.
//!
//! A limit whose `when_full` is not `queue` turns runs away by cancelling them, through
//! the gate shard's outbox like a parent cancels its child: `cancel_new` the run that asks
//! when there is no room for it at once (it never queues), `cancel_oldest` the oldest run
//! of the key while more than `max` go or wait. A holder being cancelled keeps its slot
//! until its release comes, so `max` holds at every moment.

use std::collections::{BTreeSet, HashMap, VecDeque};

use ::metrics::Gauge;
use flowgrid_engine::{Event, Run};
use flowgrid_model::{Millis, RunId, StartRate, WhenFull};
use flowgrid_proto::{ApiError, ErrorCode, GateMessage, GateTaken, LimitSummary};
use flowgrid_store::{keys, ShardStore};
use tracing::{debug, warn};

use super::actor::ShardActor;
use super::batch::Batch;
use crate::clock::now_ms;
use crate::error::Result;
use crate::metrics;
use crate::records::{self, GateRateRecord, GateRecord, OutboxRecord};

/// Which of the three messages a shard takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateVerb {
    Acquire,
    Release,
    Admit,
}

impl GateVerb {
    /// The API verb that carries it.
    pub fn api_verb(self) -> &'static str {
        match self {
            GateVerb::Acquire => "gate.acquire",
            GateVerb::Release => "gate.release",
            GateVerb::Admit => "run.admit",
        }
    }
}

/// Runs one limit admits in one commit at most; the rest go in the shard's next turns (a
/// raised `max` or a rate's full bucket may let thousands go at once).
const ADMITS_PER_TURN: usize = 1_000;

/// Runs a `cancel_oldest` limit turns away in one commit at most; the rest in the shard's
/// next turns. Each is a message in the outbox (up to ~1 KB with a long key), and a `max`
/// lowered from thousands to a few, or a queueing limit changed to `cancel_oldest`, may
/// turn tens of thousands away at once: more than one transaction holds.
const CANCELS_PER_TURN: usize = 1_000;

/// Ended rounds a shard remembers at most ([`EndedRounds`]), about 150 bytes each (under
/// 1 MB a shard, 48 MB for 64 shards all full). A repeated acquire comes within seconds of
/// its first (an outbox tries again at least every 10 s while its receiver answers): this
/// covers 10 s at 500 limited runs ending a second in one shard.
const ENDED_ROUNDS_KEPT: usize = 5_000;

/// How long a shard remembers an ended round ([`EndedRounds`]), while fewer than
/// [`ENDED_ROUNDS_KEPT`] ended since: long enough also for a run's shard that stopped, and
/// sends its outbox again as it is loaded once more.
const ENDED_ROUNDS_KEPT_MS: Millis = 3_600_000;

/// A limit: its flow and the key its runs count under.
type GateId = (String, String);

/// The limits whose gate is in this shard, and when each next has something to do on its
/// own (admit a run its start rate held back, turn away more runs under `cancel_oldest`, or
/// forget a limit gone idle).
#[derive(Default)]
pub(super) struct Gates {
    gates: HashMap<GateId, Gate>,
    due: BTreeSet<(Millis, GateId)>,
    /// Limits were due but the last batch was over its bytes: the next turn lets the first
    /// one admit before it takes more events, so that admissions go on under any load.
    first_next_turn: bool,
    /// The rounds whose acquire changes nothing any more, of all the shard's limits (it
    /// outlives a limit forgotten while idle: a late acquire may come after that).
    ended: EndedRounds,
}

/// The rounds of runs that a limit of the shard released (its release came, whether it
/// found the run's place or came first and found nothing) or turned away (`cancel_new`,
/// or `cancel_oldest` out of the queue): an acquire of such a round, or an earlier one,
/// that comes afterwards (its outbox sent it again after a lost reply, or it was late)
/// changes nothing. Else it would put a run that ended back in the queue, and under
/// `cancel_oldest` cancel a live run in its favour.
///
/// Bounded: the [`ENDED_ROUNDS_KEPT`] latest, none longer than [`ENDED_ROUNDS_KEPT_MS`]
/// once later ones are noted. Kept in memory only, unlike the places: stored under the
/// places' keys, each would read as a place kept for a run that ended (to `flowgrid audit`
/// too), and each end would cost a second write to forget it. So an acquire whose round
/// was released before a reload of the limit's shard (a crash, a handover) and that comes
/// after it takes a place again: its admission is answered with a release (as for any run
/// that ended), but under `cancel_oldest` it may turn a live run away meanwhile.
#[derive(Default)]
struct EndedRounds {
    /// The latest round of each run noted, and when (the gate's clock).
    rounds: HashMap<RunId, (u32, Millis)>,
    /// The runs in the order noted, each with its round: an entry whose run has a later
    /// round noted since stays behind until it reaches the front.
    order: VecDeque<(RunId, u32)>,
}

impl EndedRounds {
    /// Whether an acquire of `round` of `run_id` comes after that round or a later one ended.
    fn covers(&self, run_id: &RunId, round: u32) -> bool {
        self.rounds.get(run_id).is_some_and(|(ended, _)| round <= *ended)
    }

    /// Notes that `round` of `run_id` ended at `now`, and forgets the oldest rounds noted
    /// past the bounds.
    fn note(&mut self, run_id: &RunId, round: u32, now: Millis) {
        if self.covers(run_id, round) {
            return;
        }
        self.rounds.insert(run_id.clone(), (round, now));
        self.order.push_back((run_id.clone(), round));
        while let Some((run_id, round)) = self.order.pop_front() {
            // An entry left behind by a later round of its run is dropped as it comes.
            let Some(&(noted, at)) = self.rounds.get(&run_id).filter(|(noted, _)| *noted == round) else { continue };
            if self.rounds.len() <= ENDED_ROUNDS_KEPT && at.saturating_add(ENDED_ROUNDS_KEPT_MS) > now {
                self.order.push_front((run_id, noted));
                break;
            }
            self.rounds.remove(&run_id);
        }
        // Entries left behind are dropped once they outnumber the rounds kept.
        if self.order.len() > 2 * self.rounds.len() + 64 {
            let rounds = &self.rounds;
            self.order.retain(|(run_id, round)| rounds.get(run_id).is_some_and(|(noted, _)| noted == round));
        }
    }
}

/// One limit: the runs that hold a slot and those waiting, each with its round.
///
/// Places come and go through its own methods ([`Gate::hold`], [`Gate::enqueue`] and
/// those that take them out), which keep count of the places whose stored record carries
/// the bounds it holds to.
#[derive(Default)]
struct Gate {
    /// Runs at once; 0: no bound.
    max: u32,
    rate: Option<StartRate>,
    when_full: WhenFull,
    /// The flow version the bounds above are of: only an acquire of this version or a
    /// newer one changes them.
    version: u32,
    /// How often the bounds changed: each place remembers the count its record was written
    /// at, so the gate knows which stored records carry the bounds it holds to.
    bounds_changes: u64,
    /// The places whose stored record carries the bounds the gate holds to: while it keeps
    /// places and none does, a reload would take other bounds.
    places_with_bounds: usize,
    /// When the start rate's bucket is full again (Unix µs); see [`GateRateRecord`]. Read
    /// through [`Gate::bucket_full_us`].
    full_us: u64,
    holders: HashMap<RunId, Holder>,
    queue: Queue,
    /// The number the next run queued gets ([`GateRecord::seq`]).
    next_seq: u64,
    /// Its entry in [`Gates::due`].
    due_ms: Option<Millis>,
}

/// A run that holds a slot of a limit.
struct Holder {
    round: u32,
    /// When it was admitted: `cancel_oldest` turns away the holder admitted first.
    since_ms: Millis,
    /// `cancel_oldest` asked for it to be cancelled; it keeps its slot until it ended.
    cancelling: bool,
    /// [`Gate::bounds_changes`] when its record was written.
    bounds_of: u64,
}

/// A run that waits for a slot, as its stored record has it (so it can be written again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Waiting {
    round: u32,
    /// Its number in the order asked ([`GateRecord::seq`]).
    seq: Option<u64>,
    /// When it asked.
    since_ms: Millis,
    /// [`Gate::bounds_changes`] when its record was written.
    bounds_of: u64,
}

impl Gate {
    /// Rebuilds a limit from the records of its places, as its shard loads: the bounds of
    /// the newest version among them, the holders, and the queue in the order asked.
    fn restore(places: Vec<(RunId, GateRecord)>) -> Gate {
        let mut gate = Gate { bounds_changes: 1, ..Gate::default() };
        // The latest record of the newest version: every record carries the bounds the
        // gate held to when it wrote it, and at least one of them those it held to last.
        if let Some((_, newest)) = places.iter().max_by_key(|(_, record)| (record.version, record.since_ms)) {
            (gate.version, gate.max, gate.rate, gate.when_full) =
                (newest.version, newest.max, newest.rate, newest.when_full);
        }
        let mut waiting = Vec::new();
        for (run_id, record) in places {
            let bounds = (record.version, record.max, record.rate, record.when_full);
            let bounds_of = u64::from(bounds == gate.bounds());
            gate.next_seq = gate.next_seq.max(record.seq.map_or(0, |seq| seq.saturating_add(1)));
            if record.admitted {
                let holder =
                    Holder { round: record.round, since_ms: record.since_ms, cancelling: record.cancelling, bounds_of };
                gate.hold(run_id, holder);
            } else {
                let place = Waiting { round: record.round, seq: record.seq, since_ms: record.since_ms, bounds_of };
                waiting.push((run_id, place));
            }
        }
        // Numbered places in their order; those written before places were numbered asked
        // before any of them, and go first in the order of their clock.
        waiting.sort_unstable_by(|(a_id, a), (b_id, b)| {
            (a.seq, a.since_ms, a_id, a.round).cmp(&(b.seq, b.since_ms, b_id, b.round))
        });
        for (run_id, place) in waiting {
            gate.enqueue(run_id, place);
        }
        gate
    }

    fn bounds(&self) -> (u32, u32, Option<StartRate>, WhenFull) {
        (self.version, self.max, self.rate, self.when_full)
    }

    /// Takes the bounds an acquire of flow version `version` brings, unless the gate holds
    /// to a newer version's: a run of an older version (redriven, delayed past a deploy, a
    /// child pinned to it) asks under the newest version's bounds.
    fn adopt_bounds(&mut self, version: u32, max: u32, rate: Option<StartRate>, when_full: WhenFull) {
        if version < self.version || (version, max, rate, when_full) == self.bounds() {
            return;
        }
        (self.version, self.max, self.rate, self.when_full) = (version, max, rate, when_full);
        self.bounds_changes += 1;
        self.places_with_bounds = 0;
    }

    /// The record of a place, with the bounds the gate holds to.
    fn record(&self, round: u32, admitted: bool, since_ms: Millis, seq: Option<u64>, cancelling: bool) -> GateRecord {
        GateRecord {
            round,
            admitted,
            since_ms,
            seq,
            max: self.max,
            rate: self.rate,
            when_full: self.when_full,
            version: self.version,
            cancelling,
        }
    }

    fn holds(&self, run_id: &RunId, round: u32) -> bool {
        self.holders.get(run_id).is_some_and(|holder| holder.round == round)
    }

    fn hold(&mut self, run_id: RunId, holder: Holder) {
        self.count_in(holder.bounds_of);
        if let Some(replaced) = self.holders.insert(run_id, holder) {
            self.count_out(replaced.bounds_of);
        }
    }

    fn unhold(&mut self, run_id: &RunId) -> Option<Holder> {
        let holder = self.holders.remove(run_id)?;
        self.count_out(holder.bounds_of);
        Some(holder)
    }

    /// Queues `run_id` last, in place of any earlier round of it.
    fn enqueue(&mut self, run_id: RunId, place: Waiting) {
        self.count_in(place.bounds_of);
        if let Some(replaced) = self.queue.push(run_id, place) {
            self.count_out(replaced.bounds_of);
        }
    }

    /// Takes `run_id` out of the queue if it waits for `round` (any round: `None`).
    fn dequeue(&mut self, run_id: &RunId, round: Option<u32>) -> Option<Waiting> {
        let place = self.queue.remove(run_id, round)?;
        self.count_out(place.bounds_of);
        Some(place)
    }

    fn dequeue_front(&mut self) -> Option<(RunId, Waiting)> {
        let (run_id, place) = self.queue.pop_front()?;
        self.count_out(place.bounds_of);
        Some((run_id, place))
    }

    fn count_in(&mut self, bounds_of: u64) {
        if bounds_of == self.bounds_changes {
            self.places_with_bounds += 1;
        }
    }

    fn count_out(&mut self, bounds_of: u64) {
        if bounds_of == self.bounds_changes {
            self.places_with_bounds -= 1;
        }
    }

    /// A place to write again with the bounds the gate holds to, when it keeps places and
    /// none of their records carries those bounds (they came with a run that was turned
    /// away, or the places that carried them are gone): so a reload takes them. The run
    /// that waits last (it stays longest), else a holder.
    fn place_to_restamp(&mut self) -> Option<(RunId, GateRecord)> {
        if self.places_with_bounds > 0 {
            return None;
        }
        let current = self.bounds_changes;
        let (run_id, record) = if let Some(run_id) = self.queue.back().cloned() {
            let place = self.queue.waiting.get_mut(&run_id).expect("the queue's last run waits");
            place.bounds_of = current;
            let place = *place;
            (run_id, self.record(place.round, false, place.since_ms, place.seq, false))
        } else {
            let (run_id, holder) = self.holders.iter_mut().next()?;
            holder.bounds_of = current;
            let (run_id, round, since_ms, cancelling) =
                (run_id.clone(), holder.round, holder.since_ms, holder.cancelling);
            (run_id, self.record(round, true, since_ms, None, cancelling))
        };
        self.places_with_bounds = 1;
        Some((run_id, record))
    }

    /// When the rate's bucket is full again, as of `now_us`: at most one period of the
    /// rate ahead. A bucket filled under an older version's slower rate (a period of a
    /// day), or by a gate whose clock was ahead, would otherwise hold runs back far longer
    /// than the rate says.
    fn bucket_full_us(&self, now_us: u64) -> u64 {
        self.rate.map_or(self.full_us, |rate| bucket_full_us(rate, self.full_us, now_us))
    }

    /// Whether a run asking now would be admitted at once: room under `max`, nobody
    /// waiting, and a start the rate lets go.
    fn has_room(&self, now_us: u64) -> bool {
        self.queue.is_empty()
            && (self.max == 0 || self.holders.len() < self.max as usize)
            && self.rate.is_none_or(|rate| next_start_us(rate, self.bucket_full_us(now_us)) <= now_us)
    }

    /// Under `cancel_oldest`, how many more runs go and wait than `max` (those being
    /// cancelled aside); 0 under the other policies.
    fn over_max(&self) -> usize {
        if self.when_full != WhenFull::CancelOldest || self.max == 0 {
            return 0;
        }
        let going = self.holders.values().filter(|holder| !holder.cancelling).count();
        (going + self.queue.waiting.len()).saturating_sub(self.max as usize)
    }

    /// Under `cancel_oldest`, takes up to `most` of the runs [`Gate::over_max`] counts,
    /// oldest first: the holders by when they were admitted (they are marked cancelling and
    /// keep their slots), then the queue's front (which leaves the queue).
    fn take_oldest(&mut self, most: usize) -> Vec<(RunId, TurnedAway)> {
        let mut left = self.over_max().min(most);
        if left == 0 {
            // Every acquire of every limit asks: most have nothing to turn away.
            return Vec::new();
        }
        let mut oldest: Vec<(Millis, &RunId)> = self
            .holders
            .iter()
            .filter(|(_, holder)| !holder.cancelling)
            .map(|(run_id, holder)| (holder.since_ms, run_id))
            .collect();
        if oldest.len() > left {
            oldest.select_nth_unstable(left);
            oldest.truncate(left);
        }
        oldest.sort_unstable();
        let holders: Vec<RunId> = oldest.into_iter().map(|(_, run_id)| run_id.clone()).collect();
        let current = self.bounds_changes;
        let mut taken = Vec::with_capacity(left);
        for run_id in holders {
            let holder = self.holders.get_mut(&run_id).expect("a holder just found");
            holder.cancelling = true;
            // Its record is written again, with the bounds the gate holds to.
            let was_of = std::mem::replace(&mut holder.bounds_of, current);
            let (round, since_ms) = (holder.round, holder.since_ms);
            self.count_out(was_of);
            self.count_in(current);
            let record = self.record(round, true, since_ms, None, true);
            taken.push((run_id, TurnedAway::Holder(record)));
        }
        left -= taken.len();
        let queued = std::iter::from_fn(|| self.dequeue_front()).take(left);
        taken.extend(queued.map(|(run_id, place)| (run_id, TurnedAway::Queued(place.round))));
        taken
    }
}

/// A run [`Gate::take_oldest`] turns away.
#[derive(Debug)]
enum TurnedAway {
    /// A holder, now marked cancelling: it keeps its slot until its release comes. With
    /// its record to write again, which says so, so that a reload keeps it marked.
    Holder(GateRecord),
    /// A queued run, waiting for this round: it left the queue, and its record goes.
    Queued(u32),
}

/// Runs waiting for a slot, in the order asked, with their places. A run leaves from
/// anywhere in O(1): its entry in `order` stays behind until it reaches the front.
///
/// Its runs count in [`metrics::RUNS_WAITING_FOR_SLOT`] while they wait: a run raises the
/// gauge as it enters and lowers it as it leaves (admitted, turned away, released), and a
/// queue dropped with runs in it (its shard's gates forgotten as the shard stops or
/// reloads) lowers it by those, as a reload raises it again by the runs it queues.
struct Queue {
    order: VecDeque<(RunId, u32)>,
    waiting: HashMap<RunId, Waiting>,
    waiting_gauge: Gauge,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            order: VecDeque::new(),
            waiting: HashMap::new(),
            waiting_gauge: ::metrics::gauge!(metrics::RUNS_WAITING_FOR_SLOT),
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.waiting_gauge.decrement(self.waiting.len() as f64);
    }
}

impl Queue {
    fn contains(&self, run_id: &RunId, round: u32) -> bool {
        self.round_of(run_id) == Some(round)
    }

    /// The round `run_id` waits for, if it waits.
    fn round_of(&self, run_id: &RunId) -> Option<u32> {
        self.waiting.get(run_id).map(|place| place.round)
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Adds `run_id` at the end, in place of any earlier round of it (given back).
    fn push(&mut self, run_id: RunId, place: Waiting) -> Option<Waiting> {
        self.order.push_back((run_id.clone(), place.round));
        let replaced = self.waiting.insert(run_id, place);
        if replaced.is_none() {
            self.waiting_gauge.increment(1.0);
        }
        replaced
    }

    /// Takes `run_id` out if it waits for `round` (any round: `None`).
    fn remove(&mut self, run_id: &RunId, round: Option<u32>) -> Option<Waiting> {
        let waits = self.round_of(run_id).is_some_and(|waiting| round.is_none_or(|round| round == waiting));
        if !waits {
            return None;
        }
        let place = self.waiting.remove(run_id);
        self.waiting_gauge.decrement(1.0);
        // Entries left behind are dropped once they outnumber the runs waiting.
        if self.order.len() > 2 * self.waiting.len() + 64 {
            let waiting = &self.waiting;
            self.order.retain(|(run_id, round)| waiting.get(run_id).is_some_and(|place| place.round == *round));
        }
        place
    }

    fn pop_front(&mut self) -> Option<(RunId, Waiting)> {
        while let Some((run_id, round)) = self.order.pop_front() {
            if self.contains(&run_id, round) {
                let place = self.waiting.remove(&run_id).expect("it waits");
                self.waiting_gauge.decrement(1.0);
                return Some((run_id, place));
            }
        }
        None
    }

    /// The run that waits last: the latest to ask.
    fn back(&self) -> Option<&RunId> {
        self.order.iter().rev().find(|(run_id, round)| self.contains(run_id, *round)).map(|(run_id, _)| run_id)
    }
}

/// A start rate as a token bucket in time (GCRA): each start admitted moves the time the
/// bucket is full again on by one interval, and a start may go while that time is at most
/// the bucket's depth less one interval ahead (so `runs` go at once after a quiet period).
/// The interval is the period over `runs` rounded up to a whole microsecond: rounded down,
/// runs would start faster than the rate says (`{runs: 30000, per_ms: 1000}` one each
/// 33 µs: 30,303 a second).
fn interval_us(rate: StartRate) -> u64 {
    rate.per_ms.saturating_mul(1_000).div_ceil(u64::from(rate.runs.max(1))).max(1)
}

/// The bucket's depth: `runs` intervals, the rate's period (up to `runs` µs more, as the
/// interval is rounded up).
fn depth_us(rate: StartRate) -> u64 {
    u64::from(rate.runs.max(1)).saturating_mul(interval_us(rate))
}

/// The earliest time (Unix µs) the rate lets the next start go.
fn next_start_us(rate: StartRate, full_us: u64) -> u64 {
    full_us.saturating_sub(depth_us(rate).saturating_sub(interval_us(rate)))
}

/// `full_us` as `rate` reads it at `now_us`: an empty bucket is full again one depth (a
/// period) later, so it is never further ahead than that, whatever rate or clock moved it
/// there.
fn bucket_full_us(rate: StartRate, full_us: u64, now_us: u64) -> u64 {
    full_us.min(now_us.saturating_add(depth_us(rate)))
}

/// The shard (by its routing key) whose gate keeps the limit of `flow` and `key`.
pub fn gate_routing_key(flow: &str, key: &str) -> String {
    format!("gate\u{0}{flow}\u{0}{key}")
}

impl<S: ShardStore> ShardActor<S> {
    /// Loads the limits whose gate is in this shard: holders, queues (in the order asked)
    /// and where their start rates stand.
    pub(super) async fn load_gates(&mut self) -> Result<()> {
        let mut places: HashMap<GateId, Vec<(RunId, GateRecord)>> = HashMap::new();
        for (key, value) in self.store.scan(keys::gate_range(), usize::MAX, false).await? {
            let (flow, gate_key, run_id) = keys::decode_gate(&key)?;
            let record: GateRecord = records::decode("gate record", &value)?;
            places.entry((flow, gate_key)).or_default().push((run_id, record));
        }
        for (id, places) in places {
            self.gates.gates.insert(id, Gate::restore(places));
        }
        for (key, value) in self.store.scan(keys::gate_rate_range(), usize::MAX, false).await? {
            let id = keys::decode_gate_rate(&key)?;
            let record: GateRateRecord = records::decode("gate rate record", &value)?;
            // As stored: read through `Gate::bucket_full_us`, under the rate the gate holds to.
            self.gates.gates.entry(id).or_default().full_us = record.full_us;
        }
        // Each limit admits what it can (its rate may have let more go meanwhile), or is
        // forgotten, in the shard's first turn.
        let now = now_ms();
        for (id, gate) in &mut self.gates.gates {
            gate.due_ms = Some(now);
            self.gates.due.insert((now, id.clone()));
        }
        Ok(())
    }

    /// Takes one of the three messages.
    pub(super) fn take_gate_message(
        &mut self,
        verb: GateVerb,
        message: GateMessage,
        batch: &mut Batch,
    ) -> std::result::Result<GateTaken, ApiError> {
        if message.flow.is_empty() {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "a concurrency limit's message names its flow"));
        }
        if let Some(rate) = message.rate.filter(|rate| rate.runs == 0 || rate.per_ms == 0) {
            let why = format!(
                "a start rate needs rate.runs and rate.per_ms of at least 1 (got runs {}, per_ms {})",
                rate.runs, rate.per_ms
            );
            return Err(ApiError::new(ErrorCode::InvalidRequest, why));
        }
        if verb == GateVerb::Admit {
            // Its slot stays taken until the run is loaded and takes it.
            if let Some(refusal) = self.held_back_refusal(&message.run_id) {
                return Err(refusal);
            }
        }
        let applied = match verb {
            GateVerb::Acquire => self.acquire(message, batch),
            GateVerb::Release => self.release(message, batch),
            GateVerb::Admit => self.take_admission(message, batch),
        };
        Ok(GateTaken { applied })
    }

    /// A run asks for a slot: it gets one at once if the gate has room, its rate lets it
    /// go and nobody waits, else it waits in the queue (or, by the limit's `when_full`, is
    /// turned away, or turns the oldest run away). A repeat changes nothing, not even the
    /// limit's bounds; those of an older flow version than the gate holds to are not taken.
    fn acquire(&mut self, message: GateMessage, batch: &mut Batch) -> bool {
        // This round (or a later one) was released or turned away already: a repeat whose
        // reply was lost, or an acquire that came after its release.
        if self.gates.ended.covers(&message.run_id, message.round) {
            debug!(run = %message.run_id, round = message.round, "an acquire after its round ended; it changes nothing");
            return false;
        }
        let id = (message.flow.clone(), message.key.clone());
        let gate = self.gates.gates.entry(id.clone()).or_default();
        let run_id = message.run_id.clone();
        if gate.holds(&run_id, message.round) || gate.queue.contains(&run_id, message.round) {
            return false;
        }
        // A late acquire of an earlier round (retried while the run was cancelled and
        // redriven) changes nothing: the run has asked again since.
        let held = gate.holders.get(&run_id).map(|holder| holder.round);
        if held.into_iter().chain(gate.queue.round_of(&run_id)).any(|round| round > message.round) {
            return false;
        }
        // Only past the checks above: a repeat or a late acquire leaves the bounds as well.
        gate.adopt_bounds(message.version, message.max, message.rate, message.when_full);
        // A run holds one place per round; a newer round replaces an older one (whose
        // release, when it comes, no longer matches).
        let earlier = gate.unhold(&run_id).is_some() | gate.dequeue(&run_id, None).is_some();
        let now = now_ms();
        if gate.when_full == WhenFull::CancelNew && !gate.has_room(now * 1_000) {
            if earlier {
                batch.writes.clear(keys::gate(&id.0, &id.1, &run_id));
            }
            let reason =
                format!("{} had no room for it (`when_full: cancel_new`)", describe_limit(&id, gate.max, gate.rate));
            self.gates.ended.note(&run_id, message.round, now);
            self.turn_away(run_id, reason, WhenFull::CancelNew, batch);
            // Forgets the limit if it holds nothing, or admits after an earlier round left.
            self.admit_waiting(&id, batch);
            return true;
        }
        let seq = gate.next_seq;
        gate.next_seq += 1;
        let record = gate.record(message.round, false, now, Some(seq), false);
        let place = Waiting { round: message.round, seq: Some(seq), since_ms: now, bounds_of: gate.bounds_changes };
        gate.enqueue(run_id.clone(), place);
        batch.writes.set(keys::gate(&id.0, &id.1, &run_id), records::encode(&record));
        self.cancel_oldest(&id, Some(&run_id), batch);
        self.admit_waiting(&id, batch);
        true
    }

    /// Under `cancel_oldest`: while more runs of the limit go and wait than its `max`
    /// (those being cancelled aside), the oldest is cancelled: the holder admitted first,
    /// else the first in the queue, which leaves the queue at once; at most
    /// [`CANCELS_PER_TURN`] in one commit, the rest in the next turns ([`Self::admit_waiting`]
    /// keeps the limit due while some are left). `newest` (the run that just asked, last in
    /// the queue) is never the oldest while `max` is at least 1.
    ///
    /// `newest` adds one run past `max`: the youngest run this commit turns away (the last
    /// taken) names it as the run that took its place. The others were past `max` before it
    /// asked (a `max` lowered, a limit switched to `cancel_oldest`): newer runs took their
    /// places, as they say, as do the runs turned away in later turns.
    fn cancel_oldest(&mut self, id: &GateId, newest: Option<&RunId>, batch: &mut Batch) {
        let Some(gate) = self.gates.gates.get_mut(id) else { return };
        let cancelled = gate.take_oldest(CANCELS_PER_TURN);
        let Some(last) = cancelled.len().checked_sub(1) else { return };
        let limit = describe_limit(id, gate.max, gate.rate);
        let newer_runs = format!("newer runs took its place under {limit} (`when_full: cancel_oldest`)");
        let now = now_ms();
        for (n, (run_id, how)) in cancelled.into_iter().enumerate() {
            let key = keys::gate(&id.0, &id.1, &run_id);
            match how {
                // It keeps its slot until its release comes; its record says it is cancelled.
                TurnedAway::Holder(record) => batch.writes.set(key, records::encode(&record)),
                // It leaves the queue now, with its record.
                TurnedAway::Queued(round) => {
                    batch.writes.clear(key);
                    self.gates.ended.note(&run_id, round, now);
                }
            }
            let reason = match newest {
                Some(newest) if n == last => {
                    format!("run {newest} took its place under {limit} (`when_full: cancel_oldest`)")
                }
                _ => newer_runs.clone(),
            };
            self.turn_away(run_id, reason, WhenFull::CancelOldest, batch);
        }
    }

    /// Asks for `run_id` to be cancelled with `reason`, after the commit, through this
    /// shard's outbox (as a parent's end cancels its child).
    fn turn_away(&self, run_id: RunId, reason: String, why: WhenFull, batch: &mut Batch) {
        debug!(run = %run_id, reason = %reason, "a concurrency limit turns a run away");
        ::metrics::counter!(metrics::RUNS_TURNED_AWAY, "when_full" => why.as_str()).increment(1);
        self.send_after_commit(OutboxRecord::CancelChild { child: run_id, reason }, batch);
    }

    /// A run gives its slot (or its place in the queue) back, for the round it names; the
    /// next runs in the queue get the room.
    ///
    /// Its round is noted as ended whatever the release finds ([`EndedRounds`]): it may
    /// have come before the acquire of that round, which is then late and changes nothing.
    fn release(&mut self, message: GateMessage, batch: &mut Batch) -> bool {
        self.gates.ended.note(&message.run_id, message.round, now_ms());
        let id = (message.flow.clone(), message.key.clone());
        let Some(gate) = self.gates.gates.get_mut(&id) else { return false };
        let run_id = &message.run_id;
        if gate.holds(run_id, message.round) {
            gate.unhold(run_id);
        } else if gate.dequeue(run_id, Some(message.round)).is_none() {
            return false;
        }
        batch.writes.clear(keys::gate(&id.0, &id.1, run_id));
        self.admit_waiting(&id, batch);
        true
    }

    /// The limits this shard keeps (of `flow`, or all), as `limit.list` shows them.
    pub(super) fn limit_summaries(&self, flow: Option<&str>) -> Vec<LimitSummary> {
        let now = now_ms();
        self.gates
            .gates
            .iter()
            .filter(|((gate_flow, _), _)| flow.is_none_or(|flow| flow == gate_flow))
            .map(|((flow, key), gate)| LimitSummary {
                flow: flow.clone(),
                key: key.clone(),
                max: gate.max,
                rate: gate.rate,
                when_full: gate.when_full,
                going: gate.holders.len() as u32,
                queued: gate.queue.waiting.len() as u32,
                next_start_ms: gate
                    .rate
                    .filter(|_| !gate.queue.is_empty())
                    .map(|rate| next_start_us(rate, gate.bucket_full_us(now * 1_000)).div_ceil(1_000))
                    .filter(|next_ms| *next_ms > now),
            })
            .collect()
    }

    /// The next time a limit has something to do on its own.
    pub(super) fn next_gate_due(&self) -> Option<Millis> {
        self.gates.due.first().map(|(due_ms, _)| *due_ms)
    }

    /// Lets the limits whose time came admit the runs their start rates held back, turn
    /// away the runs `cancel_oldest` left for a later commit, and forgets those gone idle.
    /// A limit due when the batch is over its bytes admits in the next turn, before that
    /// turn takes more events (see [`ShardActor::admit_first_due_gate`]).
    pub(super) fn admit_due_gates(&mut self, now: Millis, batch: &mut Batch) {
        // Taken out first: a limit with more to admit than one commit takes is due again at
        // once, in the next turn.
        let mut due = Vec::new();
        while self.gates.due.first().is_some_and(|(due_ms, _)| *due_ms <= now) {
            let (_, id) = self.gates.due.pop_first().expect("checked above");
            if let Some(gate) = self.gates.gates.get_mut(&id) {
                gate.due_ms = None;
            }
            due.push(id);
        }
        let bytes_max = self.batch_bytes_max();
        for id in due {
            if batch.writes.bytes() >= bytes_max {
                // The batch is full: this limit admits in the next turn.
                if let Some(gate) = self.gates.gates.get_mut(&id) {
                    gate.due_ms = Some(now);
                    self.gates.due.insert((now, id));
                    self.gates.first_next_turn = true;
                }
                continue;
            }
            self.cancel_oldest(&id, None, batch);
            self.admit_waiting(&id, batch);
        }
    }

    /// In a turn after one whose batch was too full for a due limit: lets the first due
    /// limit admit before the turn takes more events (a shard busy with large results would
    /// otherwise fill every batch first, and hold admissions back while it stays busy).
    pub(super) fn admit_first_due_gate(&mut self, batch: &mut Batch) {
        if !std::mem::take(&mut self.gates.first_next_turn) {
            return;
        }
        let now = now_ms();
        if self.gates.due.first().is_none_or(|(due_ms, _)| *due_ms > now) {
            return;
        }
        let (_, id) = self.gates.due.pop_first().expect("checked above");
        if let Some(gate) = self.gates.gates.get_mut(&id) {
            gate.due_ms = None;
        }
        self.cancel_oldest(&id, None, batch);
        self.admit_waiting(&id, batch);
    }

    /// Gives the runs first in the queue the slots the gate has free, as fast as its start
    /// rate lets them go; then notes when the gate next has something to do, or forgets it
    /// when it holds nothing any more.
    fn admit_waiting(&mut self, id: &GateId, batch: &mut Batch) {
        let bytes_max = self.batch_bytes_max();
        let Some(gate) = self.gates.gates.get_mut(id) else { return };
        let now = now_ms();
        let now_us = now * 1_000;
        let mut admitted = Vec::new();
        let mut due_ms = None;
        gate.full_us = gate.bucket_full_us(now_us);
        while !gate.queue.is_empty() && (gate.max == 0 || gate.holders.len() < gate.max as usize) {
            if admitted.len() == ADMITS_PER_TURN || batch.writes.bytes() >= bytes_max {
                due_ms = Some(now);
                break;
            }
            if let Some(rate) = gate.rate {
                let next_us = next_start_us(rate, gate.full_us);
                if next_us > now_us {
                    due_ms = Some(next_us.div_ceil(1_000));
                    break;
                }
                gate.full_us = gate.full_us.max(now_us).saturating_add(interval_us(rate));
            }
            let Some((run_id, Waiting { round, .. })) = gate.dequeue_front() else { break };
            let holder = Holder { round, since_ms: now, cancelling: false, bounds_of: gate.bounds_changes };
            gate.hold(run_id.clone(), holder);
            let record = gate.record(round, true, now, None, false);
            batch.writes.set(keys::gate(&id.0, &id.1, &run_id), records::encode(&record));
            admitted.push(GateMessage {
                flow: id.0.clone(),
                key: id.1.clone(),
                run_id,
                round,
                max: 0,
                rate: None,
                when_full: WhenFull::Queue,
                version: 0,
            });
        }
        if let Some((run_id, record)) = gate.place_to_restamp() {
            batch.writes.set(keys::gate(&id.0, &id.1, &run_id), records::encode(&record));
        }
        if gate.rate.is_some() && !admitted.is_empty() {
            let record = GateRateRecord { full_us: gate.full_us };
            batch.writes.set(keys::gate_rate(&id.0, &id.1), records::encode(&record));
        }
        if gate.over_max() > 0 {
            // `cancel_oldest` has more runs to turn away than one commit took.
            due_ms = Some(now);
        }
        let idle = gate.holders.is_empty() && gate.queue.is_empty();
        // An idle limit is forgotten once its bucket is full: it then knows nothing a new
        // limit would not.
        let forget = idle && gate.full_us <= now_us;
        if idle && !forget {
            due_ms = Some(gate.full_us.div_ceil(1_000));
        }
        let previous = std::mem::replace(&mut gate.due_ms, due_ms);
        if previous != due_ms {
            if let Some(previous) = previous {
                self.gates.due.remove(&(previous, id.clone()));
            }
            if let Some(due_ms) = due_ms {
                self.gates.due.insert((due_ms, id.clone()));
            }
        }
        if forget {
            let gate = self.gates.gates.remove(id).expect("looked up above");
            debug!(flow = %id.0, key = %id.1, max = gate.max, "concurrency limit idle");
            if gate.full_us != 0 {
                batch.writes.clear(keys::gate_rate(&id.0, &id.1));
            }
        }
        for message in admitted {
            self.send_after_commit(OutboxRecord::Admit(message), batch);
        }
    }

    /// The gate admitted one of this shard's runs: it starts the steps it held. A run that
    /// ended, or went again in a later round, gives the slot back instead; a repeat
    /// changes nothing.
    fn take_admission(&mut self, message: GateMessage, batch: &mut Batch) -> bool {
        let current = self.runs.get(&message.run_id).map(|active| (round_of(&active.run), active.run.is_queued()));
        match current {
            Some((round, true)) if round == message.round => {
                ::metrics::counter!(metrics::RUNS_ADMITTED).increment(1);
                self.apply_event(&message.run_id, Event::Admitted, now_ms(), batch)
            }
            Some((round, false)) if round == message.round => false,
            _ => {
                debug!(run = %message.run_id, round = message.round, "admitted after it ended or went again; giving the slot back");
                self.send_after_commit(OutboxRecord::GateRelease(message), batch);
                true
            }
        }
    }

    /// Queues a run of a flow with a concurrency limit (its start or redrive in this
    /// batch left it queued): it asks the limit's gate for a slot. `key`: the run's key,
    /// if its start computed it already.
    pub(super) fn ask_for_slot(&self, run: &Run, key: Option<String>, batch: &mut Batch) {
        if let Some(message) = self.gate_message(run, key) {
            ::metrics::counter!(metrics::RUNS_QUEUED).increment(1);
            self.send_after_commit(OutboxRecord::GateAcquire(message), batch);
        }
    }

    /// A run of a flow with a concurrency limit ended: its slot (or its place in the
    /// queue) goes back.
    pub(super) fn give_slot_back(&self, run: &Run, batch: &mut Batch) {
        if let Some(message) = self.gate_message(run, None) {
            let message = GateMessage { max: 0, rate: None, when_full: WhenFull::Queue, version: 0, ..message };
            self.send_after_commit(OutboxRecord::GateRelease(message), batch);
        }
    }

    /// The message about `run`'s place under its flow's limit (under `key`, else the key
    /// computed from its input); `None` without a limit.
    fn gate_message(&self, run: &Run, key: Option<String>) -> Option<GateMessage> {
        let plan = run.plan();
        let concurrency = plan.concurrency.as_ref()?;
        let key = key.unwrap_or_else(|| match concurrency.key_of(self.context.plans.evaluator(), run.input()) {
            Ok(key) => key,
            Err(error) => {
                // Its start computed the key; only a changed evaluator could fail here.
                warn!(run = %run.id(), error = %error, "cannot compute the run's concurrency key; it counts under no key");
                String::new()
            }
        });
        Some(GateMessage {
            flow: plan.name.clone(),
            key,
            run_id: run.id().clone(),
            round: round_of(run),
            max: concurrency.max.unwrap_or(0),
            rate: concurrency.rate,
            when_full: concurrency.when_full,
            version: plan.version,
        })
    }
}

/// A limit as a cancelled run's reason names it: `flow `f`'s concurrency limit for key
/// `acme` (max 2, 3 runs per 60000 ms)`.
fn describe_limit((flow, key): &GateId, max: u32, rate: Option<StartRate>) -> String {
    let for_key = if key.is_empty() { String::new() } else { format!(" for key `{key}`") };
    let bounds: Vec<String> = [
        (max > 0).then(|| format!("max {max}")),
        rate.map(|rate| format!("{} runs per {} ms", rate.runs, rate.per_ms)),
    ]
    .into_iter()
    .flatten()
    .collect();
    format!("flow `{flow}`'s concurrency limit{for_key} ({})", bounds.join(", "))
}

/// Which start of the run it is: 0, or how often it was redriven.
fn round_of(run: &Run) -> u32 {
    run.redriven().map_or(0, |redriven| redriven.times)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: usize) -> RunId {
        RunId(format!("r{n}").into())
    }

    fn waiting(round: u32) -> Waiting {
        Waiting { round, seq: None, since_ms: 0, bounds_of: 0 }
    }

    fn holder(since_ms: Millis) -> Holder {
        Holder { round: 0, since_ms, cancelling: false, bounds_of: 0 }
    }

    /// Runs and rounds as they leave the queue from its front.
    fn drain(queue: &mut Queue) -> Vec<(RunId, u32)> {
        std::iter::from_fn(|| queue.pop_front()).map(|(run_id, place)| (run_id, place.round)).collect()
    }

    /// The runs [`Gate::take_oldest`] took, each with the round it waited for if it was queued.
    fn turned_away(taken: Vec<(RunId, TurnedAway)>) -> Vec<(RunId, Option<u32>)> {
        let round = |how| match how {
            TurnedAway::Holder(_) => None,
            TurnedAway::Queued(round) => Some(round),
        };
        taken.into_iter().map(|(run_id, how)| (run_id, round(how))).collect()
    }

    #[test]
    fn a_queue_keeps_the_order_asked_and_lets_runs_leave_from_anywhere() {
        let mut queue = Queue::default();
        for n in 0..4 {
            queue.push(run(n), waiting(0));
        }
        assert!(
            queue.remove(&run(1), Some(0)).is_some() && queue.remove(&run(1), Some(0)).is_none(),
            "a run leaves once"
        );
        assert!(queue.remove(&run(2), Some(1)).is_none(), "only for the round it waits for");
        // A later round of a run that waits goes to the end, in place of the earlier one.
        assert_eq!(queue.push(run(0), waiting(1)), Some(waiting(0)));
        assert!(queue.contains(&run(0), 1) && !queue.contains(&run(0), 0));
        assert_eq!(queue.back(), Some(&run(0)));
        assert_eq!(drain(&mut queue), vec![(run(2), 0), (run(3), 0), (run(0), 1)]);
        assert!(queue.is_empty() && queue.order.is_empty() && queue.back().is_none());
    }

    /// The gauge of runs waiting for a slot follows the queues: a run counts once while it
    /// waits (a later round in place of an earlier one too), not once it left, and the runs
    /// of queues dropped with their gates (a shard that stops or reloads) no longer count.
    #[test]
    fn runs_count_as_waiting_for_a_slot_while_they_wait_and_not_once_their_gates_are_gone() {
        let recording = crate::metrics::testing::Recording::new();
        let counted = || recording.sample("flowgrid_runs_waiting_for_slot ");
        let (gate, reloaded) = recording.record(|| {
            let mut gate = Gate { max: 1, when_full: WhenFull::CancelOldest, ..Gate::default() };
            for n in 0..4 {
                gate.enqueue(run(n), waiting(0));
            }
            gate.enqueue(run(0), waiting(1));
            assert_eq!(counted(), Some(4.0), "a later round takes the place of the earlier one");
            assert!(gate.dequeue(&run(1), Some(0)).is_some() && gate.dequeue(&run(1), None).is_none());
            assert!(gate.dequeue_front().is_some(), "admitted");
            assert_eq!(counted(), Some(2.0));
            assert_eq!(gate.take_oldest(CANCELS_PER_TURN).len(), 1, "one turned away");
            assert_eq!(counted(), Some(1.0));
            let reloaded = Gate::restore(vec![
                (run(10), place(false, 1, Some(0), 1, 1)),
                (run(11), place(false, 2, Some(1), 1, 1)),
                (run(12), place(true, 3, None, 1, 1)),
            ]);
            assert_eq!(counted(), Some(3.0), "a reload counts the runs it queues");
            (gate, reloaded)
        });
        drop(reloaded);
        assert_eq!(counted(), Some(1.0), "the runs of a gate forgotten no longer count");
        let mut gates = Gates::default();
        gates.gates.insert(("f".to_owned(), String::new()), gate);
        drop(gates);
        assert_eq!(counted(), Some(0.0), "{}", recording.render());
    }

    #[test]
    fn runs_leaving_a_long_queue_leave_no_entries_behind() {
        let mut queue = Queue::default();
        for n in 0..10_000 {
            queue.push(run(n), waiting(0));
        }
        for n in 0..9_990 {
            assert!(queue.remove(&run(n), None).is_some());
        }
        assert!(queue.order.len() <= 2 * 10 + 64, "{} entries for 10 runs", queue.order.len());
        let order: Vec<_> = drain(&mut queue).into_iter().map(|(run_id, _)| run_id).collect();
        assert_eq!(order, (9_990..10_000).map(run).collect::<Vec<_>>());
    }

    /// `cancel_oldest` turns away the holders admitted first, then the queue's front, until
    /// `max` go and wait; a few at a time when asked for fewer.
    #[test]
    fn cancel_oldest_takes_the_oldest_holders_then_the_queue_a_bounded_number_at_a_time() {
        let mut gate = Gate { max: 2, when_full: WhenFull::CancelOldest, ..Gate::default() };
        for (n, since_ms) in [(0, 30), (1, 10), (2, 20), (3, 10)] {
            gate.hold(run(n), holder(since_ms));
        }
        for n in 4..8 {
            gate.enqueue(run(n), waiting(0));
        }
        assert_eq!(gate.over_max(), 6);
        let ids = |taken| turned_away(taken).into_iter().map(|(run_id, _)| run_id).collect::<Vec<_>>();
        assert_eq!(ids(gate.take_oldest(3)), vec![run(1), run(3), run(2)], "by admission, then by id");
        assert_eq!(gate.over_max(), 3, "those being cancelled do not count");
        assert_eq!(
            turned_away(gate.take_oldest(2)),
            vec![(run(0), None), (run(4), Some(0))],
            "a holder, then a queued run"
        );
        assert!(gate.holders.values().all(|holder| holder.cancelling), "holders keep their slots");
        assert_eq!(ids(gate.take_oldest(5)), vec![run(5)]);
        assert_eq!((gate.over_max(), gate.take_oldest(5).len()), (0, 0));
        assert_eq!(drain(&mut gate.queue), vec![(run(6), 0), (run(7), 0)], "the newest stay queued");

        // A limit of `max` 1 lowered under 10,000 runs: a thousand a commit.
        let mut gate = Gate { max: 1, when_full: WhenFull::CancelOldest, ..Gate::default() };
        for n in 0..10_000 {
            gate.enqueue(run(n), waiting(0));
        }
        let mut turns = 0;
        while gate.over_max() > 0 {
            assert!(gate.take_oldest(CANCELS_PER_TURN).len() <= CANCELS_PER_TURN);
            turns += 1;
        }
        assert_eq!((turns, gate.queue.waiting.len()), (10, 1));
        // Other policies never turn the oldest away.
        gate.when_full = WhenFull::Queue;
        gate.enqueue(run(10_000), waiting(0));
        assert_eq!((gate.over_max(), gate.take_oldest(5).len()), (0, 0));
    }

    /// A holder `cancel_oldest` turned away is written again as being cancelled, with the
    /// bounds the gate holds to: a reload counts it as it did (not against `max`), and does
    /// not turn it away a second time.
    #[test]
    fn a_holder_being_cancelled_stays_so_across_a_reload() {
        let mut gate =
            Gate { max: 1, when_full: WhenFull::CancelOldest, version: 1, bounds_changes: 1, ..Gate::default() };
        // Its record carries older bounds.
        gate.hold(run(0), holder(10));
        let queued = gate.record(0, false, 20, Some(0), false);
        gate.enqueue(run(1), Waiting { round: 0, seq: Some(0), since_ms: 20, bounds_of: gate.bounds_changes });
        let taken = gate.take_oldest(CANCELS_PER_TURN);
        let [(holder_id, TurnedAway::Holder(record))] = <[_; 1]>::try_from(taken).expect("one turned away") else {
            panic!("the holder is turned away, not the queued run");
        };
        assert_eq!(holder_id, run(0));
        assert!(record.admitted && record.cancelling && record.since_ms == 10, "{record:?}");
        assert_eq!(gate.places_with_bounds, 2, "its record now carries the bounds the gate holds to");
        let stored = records::decode::<GateRecord>("gate record", &records::encode(&record)).expect("it decodes");

        let reloaded = Gate::restore(vec![(run(0), stored), (run(1), queued)]);
        assert!(reloaded.holders[&run(0)].cancelling, "still being cancelled");
        assert_eq!(reloaded.over_max(), 0, "nothing more to turn away");
    }

    #[test]
    fn a_start_rate_lets_its_runs_go_at_once_then_one_per_interval() {
        let rate = StartRate { runs: 4, per_ms: 1_000 };
        assert_eq!(interval_us(rate), 250_000);
        let now = 1_000_000_000_u64;
        // An idle limit's bucket is full: four starts go now.
        let mut full_us = 0;
        for _ in 0..4 {
            assert!(next_start_us(rate, full_us) <= now);
            full_us = full_us.max(now) + interval_us(rate);
        }
        assert_eq!(next_start_us(rate, full_us), now + 250_000, "the fifth one interval later");
        // A period later the bucket is full again.
        assert_eq!(full_us, now + 1_000_000);
        let odd = StartRate { runs: 3, per_ms: 1_000 };
        assert_eq!(interval_us(odd), 333_334, "intervals are whole microseconds, rounded up");
        assert_eq!(interval_us(StartRate { runs: 100_000, per_ms: 1 }), 1, "at least one");
        let absurd = StartRate { runs: 1, per_ms: u64::MAX };
        assert_eq!(next_start_us(absurd, now), now, "no overflow: one run per period");
    }

    /// A bucket emptied under a slow rate, or moved far ahead by a clock that was ahead,
    /// holds the runs of a faster rate back no longer than that rate's period.
    #[test]
    fn a_start_rate_bucket_is_never_more_than_one_period_ahead() {
        let now = 1_000_000_000_u64;
        let daily = StartRate { runs: 1, per_ms: 86_400_000 };
        let per_minute = StartRate { runs: 100, per_ms: 60_000 };
        // One run went under a rate of one a day: the bucket is full again in a day.
        let full_us = now + interval_us(daily);
        assert_eq!(bucket_full_us(daily, full_us, now), now + 86_400_000_000, "a day: as the daily rate says");
        // A new version lets 100 go a minute: the bucket reads as empty, not as a day away,
        // and the gate keeps it so (as it does when it admits).
        let mut gate = Gate { rate: Some(per_minute), full_us, ..Gate::default() };
        assert_eq!(gate.bucket_full_us(now), now + 60_000_000);
        gate.full_us = gate.bucket_full_us(now);
        assert_eq!(next_start_us(per_minute, gate.full_us), now + 600_000, "the next start in one interval");
        assert!(!gate.has_room(now) && gate.has_room(now + 600_000));
        // A gate whose clock was a year ahead: the same.
        let ahead = Gate { full_us: now + 365 * 86_400_000_000, ..gate };
        assert_eq!(ahead.bucket_full_us(now), now + 60_000_000);
        // A bucket within a period is read as it is; without a rate there is nothing to read.
        assert_eq!(bucket_full_us(per_minute, now + 1_000, now), now + 1_000);
        let no_rate = Gate { full_us: u64::MAX, ..Gate::default() };
        assert_eq!(no_rate.bucket_full_us(now), u64::MAX);
        assert_eq!(bucket_full_us(StartRate { runs: 1, per_ms: u64::MAX }, u64::MAX, now), u64::MAX, "no overflow");
    }

    /// A rate whose period is no whole number of microseconds per run lets a burst of
    /// `runs` go, and over a long stretch no more than `runs` per period: its interval is
    /// rounded up, not down. Each start goes at the earliest time the rate lets it, as
    /// [`ShardActor::admit_waiting`] reads the bucket.
    #[test]
    fn a_start_rate_never_lets_more_runs_go_than_it_says_over_a_long_stretch() {
        let rate = StartRate { runs: 3, per_ms: 1_000 };
        let first = 1_000_000_000_u64;
        let (mut now, mut full_us) = (first, 0);
        let mut burst = 0;
        for _ in 0..3_000 {
            full_us = bucket_full_us(rate, full_us, now);
            now = now.max(next_start_us(rate, full_us));
            burst += u32::from(now == first);
            full_us = full_us.max(now) + interval_us(rate);
        }
        assert_eq!(burst, 3, "a burst of `runs` after a quiet period");
        // 2,997 starts after the burst, at most 3 a second.
        assert!(now - first >= 999_000_000, "3,000 starts took {} µs", now - first);
        // The same for a fast rate: 30,000 a second, not 30,303.
        let fast = StartRate { runs: 30_000, per_ms: 1_000 };
        assert_eq!(interval_us(fast), 34);
        assert!(1_000_000 / interval_us(fast) <= u64::from(fast.runs));
    }

    /// Rounds released or turned away are remembered, each with the later rounds of its
    /// run's places before it, within bounds of count and time.
    #[test]
    fn ended_rounds_cover_their_earlier_rounds_within_bounds() {
        let mut ended = EndedRounds::default();
        ended.note(&run(0), 1, 10);
        assert!(ended.covers(&run(0), 0) && ended.covers(&run(0), 1), "the round and the earlier ones");
        assert!(!ended.covers(&run(0), 2) && !ended.covers(&run(1), 0), "a later round asks anew; others too");
        ended.note(&run(0), 0, 20);
        assert!(ended.covers(&run(0), 1), "a late release of an earlier round forgets nothing");
        ended.note(&run(0), 2, 30);
        assert!(ended.covers(&run(0), 2) && ended.rounds.len() == 1);
        // The latest `ENDED_ROUNDS_KEPT`.
        for n in 1..=ENDED_ROUNDS_KEPT {
            ended.note(&run(n), 0, 40);
        }
        assert!(!ended.covers(&run(0), 2) && ended.covers(&run(1), 0), "the oldest is forgotten first");
        assert!(ended.rounds.len() == ENDED_ROUNDS_KEPT && ended.order.len() <= 2 * ENDED_ROUNDS_KEPT + 64);
        // No longer than `ENDED_ROUNDS_KEPT_MS` once a later one is noted.
        ended.note(&run(0), 0, 40 + ENDED_ROUNDS_KEPT_MS);
        assert_eq!(ended.rounds.len(), 1, "those noted an hour ago are forgotten");
        assert!(ended.covers(&run(0), 0) && ended.order.len() <= 64);
    }

    fn place(admitted: bool, since_ms: Millis, seq: Option<u64>, version: u32, max: u32) -> GateRecord {
        let when_full = WhenFull::Queue;
        GateRecord { round: 0, admitted, since_ms, seq, max, rate: None, when_full, version, cancelling: false }
    }

    /// A reloaded queue is in the order the runs asked: by their numbers, also when many
    /// asked in one millisecond (their ids say nothing of the order) or the gate's clock
    /// went back; places written before they were numbered first, by their times.
    #[test]
    fn a_reloaded_queue_keeps_the_order_asked_whatever_the_clock_and_the_run_ids_say() {
        let records = vec![
            (run(1), place(false, 100, Some(7), 1, 1)),
            (run(3), place(false, 100, Some(5), 1, 1)),
            (run(20), place(true, 120, None, 1, 1)),
            (run(0), place(false, 90, Some(8), 1, 1)),
            (run(2), place(false, 100, Some(6), 1, 1)),
            (run(10), place(false, 50, None, 0, 1)),
            (run(11), place(false, 40, None, 0, 1)),
        ];
        let mut gate = Gate::restore(records);
        assert!(gate.holds(&run(20), 0) && gate.holders.len() == 1);
        let order: Vec<_> = drain(&mut gate.queue).into_iter().map(|(run_id, _)| run_id).collect();
        assert_eq!(order, [11, 10, 3, 2, 1, 0].map(run), "old places by time, then by number");
        assert_eq!(gate.next_seq, 9, "the next run queued goes after them");
        assert_eq!(Gate::restore(vec![(run(0), place(true, 1, None, 1, 1))]).next_seq, 0);
    }

    /// A place stored by an older release, without a number or a version, still loads.
    #[test]
    fn a_place_stored_without_number_and_version_loads_as_older_than_any() {
        let old = serde_json::json!({"round": 1, "admitted": false, "since_ms": 5, "max": 2});
        let record: GateRecord = records::decode("gate record", &records::encode(&old)).expect("an old record decodes");
        assert_eq!((record.seq, record.version, record.round, record.max), (None, 0, 1, 2));
        assert!(!record.cancelling, "a holder of an older release is not being cancelled");
    }

    /// A reload takes the bounds of the newest version among the places, not those of the
    /// latest place: a run of an older version may have asked later.
    #[test]
    fn a_reloaded_limit_takes_the_bounds_of_the_newest_version() {
        let records = vec![
            (run(0), place(true, 10, None, 2, 1)),
            (run(1), place(true, 30, None, 1, 3)),
            (run(2), place(false, 20, Some(0), 2, 1)),
        ];
        let gate = Gate::restore(records);
        assert_eq!((gate.version, gate.max), (2, 1));
        assert_eq!(gate.places_with_bounds, 2, "the places written with those bounds");
        // Without versions (records of an older release): the latest place's.
        let gate = Gate::restore(vec![(run(0), place(true, 10, None, 0, 1)), (run(1), place(true, 30, None, 0, 3))]);
        assert_eq!((gate.version, gate.max), (0, 3));
    }

    /// The bounds change only with a version at least as new; when none of the stored
    /// places carries the bounds the gate holds to, one is written again with them.
    #[test]
    fn a_limit_keeps_the_newest_versions_bounds_and_a_place_that_stores_them() {
        let mut gate = Gate::default();
        gate.adopt_bounds(2, 1, None, WhenFull::CancelNew);
        gate.adopt_bounds(1, 3, None, WhenFull::Queue);
        assert_eq!(gate.bounds(), (2, 1, None, WhenFull::CancelNew), "an older version's bounds are not taken");
        assert!(gate.place_to_restamp().is_none(), "no place: nothing to keep them in");
        gate.hold(run(0), Holder { bounds_of: gate.bounds_changes, ..holder(10) });
        assert!(gate.place_to_restamp().is_none(), "its record carries them");
        let bounds_of = gate.bounds_changes;
        gate.adopt_bounds(2, 1, None, WhenFull::CancelNew);
        assert_eq!(gate.bounds_changes, bounds_of, "the same bounds again change nothing");

        // A newer version comes with a run that was turned away: the holder's record is
        // written again with its bounds, and so is the next one when that holder leaves.
        gate.hold(run(1), holder(20));
        gate.adopt_bounds(3, 2, Some(StartRate { runs: 1, per_ms: 10 }), WhenFull::CancelNew);
        let (restamped, record) = gate.place_to_restamp().expect("no record carries the new bounds");
        assert_eq!((record.version, record.max, record.rate, record.admitted), (3, 2, gate.rate, true));
        assert_eq!(record.since_ms, gate.holders[&restamped].since_ms, "the holder's own time is kept");
        assert!(gate.place_to_restamp().is_none());
        gate.unhold(&restamped);
        let (other, _) = gate.place_to_restamp().expect("the place that carried them left");
        assert_ne!(other, restamped);
        gate.unhold(&other);
        // A waiting run is written again as it waits, with its number and time.
        gate.enqueue(run(2), Waiting { round: 1, seq: Some(4), since_ms: 7, bounds_of: 0 });
        let (waiting_run, record) = gate.place_to_restamp().expect("the waiting run's record is old");
        assert_eq!(waiting_run, run(2));
        assert_eq!(
            (record.round, record.admitted, record.seq, record.since_ms, record.version),
            (1, false, Some(4), 7, 3)
        );
    }
}
