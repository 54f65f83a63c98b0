//! Correlates what the driver and the simulated workers see, per run, into latencies.
//!
//! - start overhead: start request sent (for the open loop: its *scheduled* time) to the
//!   first task of the run received by a worker;
//! - step overhead: a chain step's result sent by the worker to the next chain step of the
//!   same run stored in JetStream (the stream's time stamp): the engine's overhead from a
//!   result to the next task's publish, plus the result's hop to the coordinator, so an
//!   upper bound;
//! - step round trip: the same result sent to that next task received by a worker (both
//!   NATS hops and the delivery of the pull consumer included);
//! - run end-to-end: start request sent (or scheduled) to the result of the run's last
//!   task acknowledged by the coordinator (the ack follows the commit that ends the run).
//!
//! The driver learns a run's id from the start reply, which may arrive after the run's
//! first task reached a worker; whichever comes first creates the run's entry, and a
//! latency is recorded once both of its ends are known. Start and end-to-end latencies
//! are recorded for runs started inside the measured window; step overhead and task
//! throughput for what happens inside it. A task counts only for a run a start reply
//! named: one of a run no reply named yet is held in its entry until one does (an entry
//! is made for it only while a start awaits its reply), so a copy of a task of an ended
//! run, or a task a grid still held from an earlier harness run, is not counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use flowgrid_model::limits::MAP_ITEMS_MAX;
use flowgrid_model::{AttemptId, RunId};

use crate::args::TASKS_PER_RUN_MAX;
use crate::flows::chain_position;

/// Latencies are recorded in microseconds, up to an hour, with 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
/// How often a wait for runs to end looks again.
const ENDED_POLL: Duration = Duration::from_millis(20);

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, from: Instant, to: Instant) {
    let micros = to.saturating_duration_since(from).as_micros() as u64;
    histogram.saturating_record(micros.clamp(1, HISTOGRAM_MAX_US));
}

/// How a run ended, as seen from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// Every task's result was acked by the coordinator.
    Done,
}

/// What the simulated workers report.
pub trait TaskSink: Send + Sync + 'static {
    /// A worker received a task at `at` that JetStream stored at `stored`.
    fn received(&self, attempt: &AttemptId, stored: Instant, at: Instant);
    /// A worker is sending the task's result for the first time, at `at`.
    fn result_sent(&self, _attempt: &AttemptId, _at: Instant) {}
    /// The coordinator acked the task's result at `acked`; `applied`: as the ack says.
    fn acked(&self, attempt: &AttemptId, acked: Instant, applied: bool);
    /// The result was refused for good or never confirmed.
    fn failed(&self, attempt: &AttemptId, reason: &str);
    /// The coordinator took the result without applying it: a repeat of a result it applied
    /// before (its answer was lost), or one for an attempt no longer open. Counted apart; the
    /// worker reports the task acked all the same (the harness cannot tell the two apart).
    fn not_applied(&self, _attempt: &AttemptId) {}
}

#[derive(Default)]
struct RunTrack {
    /// Start request sent (closed loop) or scheduled (open loop); `None` until the start
    /// reply named the run.
    started: Option<Instant>,
    /// Started inside the measured window.
    measured: bool,
    first_task: Option<Instant>,
    /// Last chain step whose result was sent, and when it was first sent.
    chain_result: Option<(u32, Instant)>,
    tasks_acked: u32,
    /// Of `tasks_acked`, those acked while the window was open before a start reply named
    /// the run: held, and added to the counters when one does (with the rest).
    held_measured: u32,
    /// The tasks acked so far, each once (a task delivered again is acked again): the
    /// first 64 chain positions as bits of one word (no allocation for most chains), later
    /// positions and map items in bitsets grown as they come.
    acked_positions: u64,
    acked_positions_later: Vec<u64>,
    acked_items: Vec<u64>,
    done: Option<Instant>,
    waiter: Option<oneshot::Sender<RunEnd>>,
}

impl RunTrack {
    /// Notes `attempt`'s task acked; false if it was acked before (delivered twice).
    fn first_ack(&mut self, attempt: &AttemptId) -> bool {
        match (attempt.item, chain_position(&attempt.step)) {
            // No workload has more items than a map may have: a larger index is no task of
            // the harness's, counted each time rather than grown into.
            (Some(item), _) if (item as usize) < MAP_ITEMS_MAX => first_set(&mut self.acked_items, item as usize),
            (None, Some(position)) if position < u64::BITS => {
                let first = self.acked_positions & (1 << position) == 0;
                self.acked_positions |= 1 << position;
                first
            }
            // No chain is longer than `--tasks-per-run` allows.
            (None, Some(position)) if position <= TASKS_PER_RUN_MAX => {
                first_set(&mut self.acked_positions_later, (position - u64::BITS) as usize)
            }
            // A task the workloads do not make: counted each time.
            _ => true,
        }
    }
}

/// Sets bit `index` of a bitset kept as words, growing it to hold the bit; false if the
/// bit was set already.
fn first_set(words: &mut Vec<u64>, index: usize) -> bool {
    let (word, bit) = (index / u64::BITS as usize, index % u64::BITS as usize);
    if words.len() <= word {
        words.resize(word + 1, 0);
    }
    let first = words[word] & (1 << bit) == 0;
    words[word] |= 1 << bit;
    first
}

/// Latency histograms, in microseconds.
#[derive(Clone)]
pub struct Histograms {
    pub run_e2e: Histogram<u64>,
    pub start_overhead: Histogram<u64>,
    /// Start request to its reply: the part of the start overhead before the first task
    /// is published.
    pub start_reply: Histogram<u64>,
    pub step_overhead: Histogram<u64>,
    pub step_round_trip: Histogram<u64>,
}

struct Inner {
    /// foldhash: every task looks its run up twice.
    runs: HashMap<RunId, RunTrack, foldhash::fast::RandomState>,
    histograms: Histograms,
    /// Start requests sent ([`Tracker::start_sent`]) whose outcome has not come.
    starts_pending: u64,
    /// [`Tracker::unfinished`] counted what was left: nothing new is followed.
    closed: bool,
}

impl Inner {
    /// The entry of `run_id`; a new one only while a start awaits its reply (that reply may
    /// name the run), else `None`: no start of the harness's made the run.
    fn track(&mut self, run_id: &RunId) -> Option<&mut RunTrack> {
        if !self.runs.contains_key(run_id) && (self.closed || self.starts_pending == 0) {
            return None;
        }
        Some(self.runs.entry(run_id.clone()).or_default())
    }
}

/// What [`Tracker::unfinished`] found left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unfinished {
    /// Runs started that have not ended.
    pub runs: u64,
    /// Start requests still awaiting their reply.
    pub starts: u64,
}

/// Counters read by the progress line and the report.
#[derive(Default)]
pub struct Counters {
    pub runs_started: AtomicU64,
    pub runs_done: AtomicU64,
    /// Runs finished while the window was open.
    pub runs_done_measured: AtomicU64,
    pub tasks_acked: AtomicU64,
    /// Task results acked while the window was open.
    pub tasks_acked_measured: AtomicU64,
    pub task_failures: AtomicU64,
    /// Results taken without being applied (see [`TaskSink::not_applied`]).
    pub results_not_applied: AtomicU64,
    /// Finished runs sent for a `run.get` check.
    pub runs_sampled: AtomicU64,
}

pub struct Tracker {
    inner: Mutex<Inner>,
    tasks_per_run: u32,
    measuring: AtomicBool,
    /// When the measured window opened and closed: a run belongs to it by when it was
    /// started (sent, or scheduled), not by when its start reply came.
    window: Mutex<(Option<Instant>, Option<Instant>)>,
    pub counters: Counters,
    /// Finished runs sampled for a `run.get` check.
    verify: Option<mpsc::UnboundedSender<RunId>>,
    verify_share: f64,
    verify_seed: AtomicU64,
}

impl Tracker {
    pub fn new(tasks_per_run: u32, verify: Option<mpsc::UnboundedSender<RunId>>, verify_share: f64) -> Arc<Tracker> {
        Arc::new(Tracker {
            inner: Mutex::new(Inner {
                runs: HashMap::default(),
                histograms: Histograms {
                    run_e2e: new_histogram(),
                    start_overhead: new_histogram(),
                    start_reply: new_histogram(),
                    step_overhead: new_histogram(),
                    step_round_trip: new_histogram(),
                },
                starts_pending: 0,
                closed: false,
            }),
            tasks_per_run,
            measuring: AtomicBool::new(false),
            window: Mutex::new((None, None)),
            counters: Counters::default(),
            verify,
            verify_share,
            verify_seed: AtomicU64::new(0x5EED),
        })
    }

    pub fn set_measuring(&self, on: bool) {
        let mut window = self.window.lock().expect("window lock");
        match on {
            true => *window = (Some(Instant::now()), None),
            false => window.1 = Some(Instant::now()),
        }
        self.measuring.store(on, Ordering::SeqCst);
    }

    /// Whether a run started at `started` belongs to the measured window.
    fn in_window(&self, started: Instant) -> bool {
        match *self.window.lock().expect("window lock") {
            (Some(from), until) => started >= from && until.is_none_or(|until| started < until),
            (None, _) => false,
        }
    }

    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    /// A start request is about to be sent. Until its outcome ([`Tracker::start_answered`],
    /// [`Tracker::start_failed`]) tasks of runs no reply has named yet are kept, and
    /// [`Tracker::unfinished`] counts it as unanswered.
    pub fn start_sent(&self) {
        self.inner.lock().expect("tracker lock").starts_pending += 1;
    }

    /// The reply to a start announced by [`Tracker::start_sent`] named `run_id`: as
    /// [`Tracker::started`]. False if [`Tracker::unfinished`] came first and counted the
    /// start as unanswered: the run is not followed.
    pub fn start_answered(&self, run_id: RunId, started: Instant, waiter: Option<oneshot::Sender<RunEnd>>) -> bool {
        let measured = self.in_window(started);
        let mut inner = self.inner.lock().expect("tracker lock");
        if inner.closed {
            return false;
        }
        inner.starts_pending = inner.starts_pending.saturating_sub(1);
        self.name_run(&mut inner, run_id, started, measured, waiter);
        true
    }

    /// A start announced by [`Tracker::start_sent`] failed. False if [`Tracker::unfinished`]
    /// came first and counted it as unanswered: it is not an error a second time.
    pub fn start_failed(&self) -> bool {
        let mut inner = self.inner.lock().expect("tracker lock");
        if inner.closed {
            return false;
        }
        inner.starts_pending = inner.starts_pending.saturating_sub(1);
        true
    }

    /// The run `run_id` was started (a start reply named it, or it was started without a
    /// request). `started` is when the start was sent (or scheduled); `waiter` hears when
    /// the run ends. Ignored after [`Tracker::unfinished`].
    pub fn started(&self, run_id: RunId, started: Instant, waiter: Option<oneshot::Sender<RunEnd>>) {
        let measured = self.in_window(started);
        let mut inner = self.inner.lock().expect("tracker lock");
        if !inner.closed {
            self.name_run(&mut inner, run_id, started, measured, waiter);
        }
    }

    /// Makes `run_id` a run of the harness's: its latencies so far are recorded, and the
    /// tasks held for it counted.
    fn name_run(
        &self,
        inner: &mut Inner,
        run_id: RunId,
        started: Instant,
        measured: bool,
        waiter: Option<oneshot::Sender<RunEnd>>,
    ) {
        self.counters.runs_started.fetch_add(1, Ordering::Relaxed);
        let Inner { runs, histograms, .. } = inner;
        let track = runs.entry(run_id.clone()).or_default();
        if track.started.is_none() {
            // Every task acked so far was held for this reply.
            self.counters.tasks_acked.fetch_add(u64::from(track.tasks_acked), Ordering::Relaxed);
            self.counters.tasks_acked_measured.fetch_add(u64::from(track.held_measured), Ordering::Relaxed);
            track.held_measured = 0;
        }
        track.started = Some(started);
        track.measured = measured;
        track.waiter = waiter;
        if measured {
            record(&mut histograms.start_reply, started, Instant::now());
        }
        if let (true, Some(first)) = (measured, track.first_task) {
            record(&mut histograms.start_overhead, started, first);
        }
        self.finish_if_done(inner, run_id);
    }

    /// Gives up on `run_id` (its wait ran out): it is forgotten, so that
    /// [`Tracker::unfinished`] does not count it again. False if it had ended, or was
    /// counted as unfinished already.
    pub fn forget(&self, run_id: &RunId) -> bool {
        let mut inner = self.inner.lock().expect("tracker lock");
        let open = inner.runs.get(run_id).is_some_and(|track| track.started.is_some() && track.done.is_none());
        if open {
            inner.runs.remove(run_id);
        }
        open
    }

    /// Runs whose end is still unknown.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().expect("tracker lock").runs.values().filter(|track| track.started.is_some()).count()
    }

    /// Runs started inside the window that have not ended yet.
    pub fn open_measured(&self) -> usize {
        self.inner.lock().expect("tracker lock").runs.values().filter(|track| track.measured).count()
    }

    /// Returns once every run started inside the window has ended (callers bound the wait).
    pub async fn measured_runs_ended(&self) {
        while self.open_measured() > 0 {
            tokio::time::sleep(ENDED_POLL).await;
        }
    }

    /// Returns once every run started has ended, after the window too (callers bound the wait).
    pub async fn runs_ended(&self) {
        while self.in_flight() > 0 {
            tokio::time::sleep(ENDED_POLL).await;
        }
    }

    /// Runs started that have not ended, in the window or not (a run lost in the warm-up
    /// is lost all the same), and start requests still awaiting their reply (the runs they
    /// would start are the slowest of all: left out, the latencies would look better than
    /// the grid is). Forgets every open run and every task held for a run no reply named;
    /// afterwards nothing new is followed, so a reply that comes later adds nothing that
    /// would go uncounted.
    pub fn unfinished(&self) -> Unfinished {
        let mut inner = self.inner.lock().expect("tracker lock");
        let runs = inner.runs.values().filter(|track| track.started.is_some() && track.done.is_none()).count();
        let unfinished = Unfinished { runs: runs as u64, starts: inner.starts_pending };
        inner.runs.clear();
        inner.starts_pending = 0;
        inner.closed = true;
        unfinished
    }

    /// A copy of the histograms so far.
    pub fn histograms(&self) -> Histograms {
        self.inner.lock().expect("tracker lock").histograms.clone()
    }

    pub fn e2e_p99_us(&self) -> u64 {
        self.inner.lock().expect("tracker lock").histograms.run_e2e.value_at_quantile(0.99)
    }

    fn finish_if_done(&self, inner: &mut Inner, run_id: RunId) {
        let Some(track) = inner.runs.get(&run_id) else { return };
        let (Some(started), Some(done)) = (track.started, track.done) else { return };
        let mut track = inner.runs.remove(&run_id).expect("present");
        self.counters.runs_done.fetch_add(1, Ordering::Relaxed);
        if self.measuring() {
            self.counters.runs_done_measured.fetch_add(1, Ordering::Relaxed);
        }
        if track.measured {
            record(&mut inner.histograms.run_e2e, started, done);
        }
        if let Some(waiter) = track.waiter.take() {
            let _ = waiter.send(RunEnd::Done);
        }
        self.maybe_verify(run_id);
    }

    fn maybe_verify(&self, run_id: RunId) {
        let Some(verify) = &self.verify else { return };
        // A cheap deterministic sample: splitmix64 over a counter.
        let mut x = self.verify_seed.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        if (x as f64 / u64::MAX as f64) < self.verify_share {
            self.counters.runs_sampled.fetch_add(1, Ordering::Relaxed);
            let _ = verify.send(run_id);
        }
    }
}

impl TaskSink for Tracker {
    fn received(&self, attempt: &AttemptId, stored: Instant, at: Instant) {
        let measuring = self.measuring();
        let mut inner = self.inner.lock().expect("tracker lock");
        let Some(track) = inner.track(&attempt.run_id) else { return };
        let (measured, started, chain_result) = (track.measured, track.started, track.chain_result);
        let first = track.first_task.is_none();
        if first {
            track.first_task = Some(at);
        }
        let histograms = &mut inner.histograms;
        if let (true, true, Some(started)) = (first, measured, started) {
            record(&mut histograms.start_overhead, started, at);
        }
        if let (Some(position), Some((previous, result_sent))) = (chain_position(&attempt.step), chain_result) {
            if measuring && position == previous + 1 && attempt.item.is_none() {
                record(&mut histograms.step_overhead, result_sent, stored);
                record(&mut histograms.step_round_trip, result_sent, at);
            }
        }
    }

    /// Noted at the send, not at the ack: the coordinator may publish the next step before
    /// the worker has the ack of this one, and that step's overhead starts at this send.
    fn result_sent(&self, attempt: &AttemptId, at: Instant) {
        let (Some(position), None) = (chain_position(&attempt.step), attempt.item) else { return };
        let mut inner = self.inner.lock().expect("tracker lock");
        if let Some(track) = inner.track(&attempt.run_id) {
            track.chain_result = Some((position, at));
        }
    }

    fn acked(&self, attempt: &AttemptId, acked: Instant, applied: bool) {
        let mut inner = self.inner.lock().expect("tracker lock");
        // A copy of a task whose run ended already (delivered again): its run is not
        // followed any more, and counting it would count the task twice.
        if !applied && !inner.runs.contains_key(&attempt.run_id) {
            return;
        }
        let Some(track) = inner.track(&attempt.run_id) else { return };
        if !track.first_ack(attempt) {
            return;
        }
        let measuring = self.measuring();
        track.tasks_acked += 1;
        if track.started.is_none() {
            // No reply named the run yet: held until one does.
            track.held_measured += u32::from(measuring);
        } else {
            self.counters.tasks_acked.fetch_add(1, Ordering::Relaxed);
            if measuring {
                self.counters.tasks_acked_measured.fetch_add(1, Ordering::Relaxed);
            }
        }
        if track.tasks_acked >= self.tasks_per_run && track.done.is_none() {
            track.done = Some(acked);
            self.finish_if_done(&mut inner, attempt.run_id.clone());
        }
    }

    fn failed(&self, _attempt: &AttemptId, _reason: &str) {
        self.counters.task_failures.fetch_add(1, Ordering::Relaxed);
    }

    fn not_applied(&self, _attempt: &AttemptId) {
        self.counters.results_not_applied.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flowgrid_model::RunId;

    use super::*;

    fn attempt(run: &str, step: &str) -> AttemptId {
        AttemptId { run_id: RunId(run.into()), step: step.into(), item: None, attempt: 1 }
    }

    #[test]
    fn a_chain_gives_start_step_and_end_to_end_samples() {
        let tracker = Tracker::new(2, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // The first task arrives before the start reply names the run.
        tracker.start_sent();
        tracker.received(&attempt("r", "s1"), at(1), at(2));
        assert!(tracker.start_answered(RunId("r".into()), t0, None));
        tracker.result_sent(&attempt("r", "s1"), at(3));
        tracker.acked(&attempt("r", "s1"), at(4), true);
        // Delivered again and acked again: still one task of two, the run not done.
        tracker.acked(&attempt("r", "s1"), at(4), true);
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 0);
        assert_eq!(tracker.counters.tasks_acked.load(Ordering::Relaxed), 1);
        tracker.received(&attempt("r", "s2"), at(5), at(6));
        tracker.result_sent(&attempt("r", "s2"), at(7));
        tracker.acked(&attempt("r", "s2"), at(9), true);
        let histograms = tracker.histograms();
        assert_eq!(histograms.start_overhead.len(), 1);
        assert!(histograms.start_overhead.equivalent(histograms.start_overhead.max(), 2_000));
        assert!(histograms.step_overhead.equivalent(histograms.step_overhead.max(), 2_000), "result sent to stored");
        assert!(histograms.step_round_trip.equivalent(histograms.step_round_trip.max(), 3_000), "sent to received");
        assert!(histograms.run_e2e.equivalent(histograms.run_e2e.max(), 9_000));
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.in_flight(), 0);
    }

    /// `--tasks-per-run` allows chains far longer than 64 steps: a late step delivered
    /// again counts once, and the run does not end a step early.
    #[test]
    fn a_late_step_of_a_long_chain_delivered_twice_counts_once() {
        let tracker = Tracker::new(70, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        tracker.started(RunId("r".into()), t0, None);
        tracker.acked(&attempt("r", "s65"), t0, true);
        tracker.acked(&attempt("r", "s65"), t0, true);
        assert_eq!(tracker.counters.tasks_acked.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 0);
        // Every other step once: the run ends at the seventieth distinct step, not before.
        for position in (1..=70).filter(|position| *position != 65) {
            assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 0, "done before s{position}");
            tracker.acked(&attempt("r", &format!("s{position}")), t0, true);
        }
        assert_eq!(tracker.counters.tasks_acked.load(Ordering::Relaxed), 70);
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_result_not_applied_is_counted_apart_and_changes_no_run() {
        let tracker = Tracker::new(2, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        tracker.started(RunId("r".into()), t0, None);
        tracker.not_applied(&attempt("r", "s1"));
        tracker.acked(&attempt("r", "s1"), t0, false);
        assert_eq!(tracker.counters.results_not_applied.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.counters.tasks_acked_measured.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 0);
        assert_eq!(tracker.in_flight(), 1);
    }

    /// A task delivered again after its run ended is answered "not applied": it is not
    /// counted a second time, and leaves nothing behind.
    #[test]
    fn a_copy_of_a_task_of_an_ended_run_is_not_counted_again() {
        let tracker = Tracker::new(1, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        tracker.started(RunId("r".into()), t0, None);
        tracker.acked(&attempt("r", "s1"), t0, true);
        assert_eq!((tracker.counters.runs_done.load(Ordering::Relaxed), tracker.in_flight()), (1, 0));
        tracker.not_applied(&attempt("r", "s1"));
        tracker.acked(&attempt("r", "s1"), t0, false);
        assert_eq!(tracker.counters.tasks_acked_measured.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.counters.results_not_applied.load(Ordering::Relaxed), 1);
        assert!(tracker.inner.lock().unwrap().runs.is_empty(), "no entry is left for the ended run");
    }

    /// The copy of an ended run's task is delivered again (received, then acked as not
    /// applied): with no start awaiting its reply it makes no entry; with one, it is held
    /// for a reply that never names it and dropped at the end. Counted once either way.
    #[test]
    fn a_copy_of_a_task_received_after_its_run_ended_is_not_counted_and_leaves_no_entry() {
        let tracker = Tracker::new(1, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        tracker.started(RunId("r".into()), t0, None);
        tracker.received(&attempt("r", "s1"), t0, t0);
        tracker.acked(&attempt("r", "s1"), t0, true);
        let tasks = || tracker.counters.tasks_acked_measured.load(Ordering::Relaxed);
        assert_eq!((tasks(), tracker.counters.runs_done.load(Ordering::Relaxed)), (1, 1));
        tracker.received(&attempt("r", "s1"), t0, t0);
        tracker.acked(&attempt("r", "s1"), t0, false);
        assert_eq!(tasks(), 1, "the copy is not counted");
        assert!(tracker.inner.lock().unwrap().runs.is_empty(), "no entry is left for the ended run");
        // Another start awaits its reply: the copy could belong to its run, so it is held.
        tracker.start_sent();
        tracker.received(&attempt("r", "s1"), t0, t0);
        tracker.acked(&attempt("r", "s1"), t0, false);
        assert_eq!(tasks(), 1, "held for a reply that never names the run");
        assert!(tracker.start_answered(RunId("other".into()), t0, None));
        assert_eq!(tasks(), 1);
        assert_eq!(tracker.unfinished(), Unfinished { runs: 1, starts: 0 }, "the other run; the copy is dropped");
        assert!(tracker.inner.lock().unwrap().runs.is_empty());
    }

    /// A task the grid still held from an earlier harness run is not one of this run's.
    #[test]
    fn a_task_of_a_run_the_harness_did_not_start_is_not_counted() {
        let tracker = Tracker::new(1, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        tracker.received(&attempt("earlier", "s1"), t0, t0);
        tracker.acked(&attempt("earlier", "s1"), t0, true);
        assert_eq!(tracker.counters.tasks_acked.load(Ordering::Relaxed), 0);
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 0);
        assert!(tracker.inner.lock().unwrap().runs.is_empty());
    }

    /// The drain's cutoff: a start still waiting then counts as unanswered, and a reply or
    /// failure that comes later adds nothing (no entry, no second error).
    #[test]
    fn a_start_answered_after_the_cutoff_adds_nothing() {
        let tracker = Tracker::new(1, None, 0.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            tracker.start_sent();
        }
        assert!(tracker.start_answered(RunId("answered".into()), t0, None));
        assert_eq!(tracker.unfinished(), Unfinished { runs: 1, starts: 2 });
        assert!(!tracker.start_answered(RunId("late".into()), t0, None));
        assert!(!tracker.start_failed());
        tracker.received(&attempt("late", "s1"), t0, t0);
        assert!(tracker.inner.lock().unwrap().runs.is_empty());
        assert_eq!(tracker.counters.runs_started.load(Ordering::Relaxed), 1);
        assert_eq!(tracker.unfinished(), Unfinished::default());
    }

    /// A closed loop gives a run up: forgotten, it is not counted again as unfinished.
    #[test]
    fn a_run_given_up_is_not_unfinished_too() {
        let tracker = Tracker::new(1, None, 0.0);
        let t0 = Instant::now();
        tracker.started(RunId("lost".into()), t0, None);
        tracker.started(RunId("open".into()), t0, None);
        assert!(tracker.forget(&RunId("lost".into())));
        assert!(!tracker.forget(&RunId("lost".into())), "forgotten once");
        assert_eq!(tracker.unfinished().runs, 1);
        assert!(!tracker.forget(&RunId("open".into())), "counted as unfinished already");
    }

    #[test]
    fn a_run_belongs_to_the_window_it_was_started_in_whenever_its_reply_comes() {
        let tracker = Tracker::new(1, None, 0.0);
        let t0 = Instant::now();
        let (before, inside) = (t0, t0 + Duration::from_millis(15));
        *tracker.window.lock().unwrap() = (Some(t0 + Duration::from_millis(10)), Some(t0 + Duration::from_millis(20)));
        // Replies that come after the window closed.
        tracker.started(RunId("early".into()), before, None);
        tracker.started(RunId("in".into()), inside, None);
        assert_eq!(tracker.open_measured(), 1, "only the run started inside the window");
        assert_eq!(tracker.histograms().start_reply.len(), 1);
        assert_eq!(tracker.unfinished().runs, 2, "each counts as unfinished until it ends, the one of the warm-up too");
    }

    #[test]
    fn a_step_counts_when_the_next_task_arrives_before_the_ack_of_the_result() {
        let tracker = Tracker::new(2, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        tracker.started(RunId("r".into()), t0, None);
        tracker.received(&attempt("r", "s1"), at(1), at(1));
        tracker.result_sent(&attempt("r", "s1"), at(2));
        tracker.received(&attempt("r", "s2"), at(3), at(4));
        tracker.acked(&attempt("r", "s1"), at(5), true);
        let histograms = tracker.histograms();
        assert_eq!(histograms.step_overhead.len(), 1, "the step was not counted");
        assert!(histograms.step_overhead.equivalent(histograms.step_overhead.max(), 1_000), "sent to stored");
    }

    #[test]
    fn a_run_done_before_its_start_reply_ends_at_the_reply() {
        let tracker = Tracker::new(1, None, 0.0);
        tracker.set_measuring(true);
        let t0 = Instant::now();
        tracker.start_sent();
        tracker.received(&attempt("r", "s1"), t0, t0);
        tracker.acked(&attempt("r", "s1"), t0, true);
        assert_eq!(tracker.counters.runs_done.load(Ordering::Relaxed), 0);
        assert_eq!(tracker.counters.tasks_acked_measured.load(Ordering::Relaxed), 0, "held until the reply");
        let (sender, mut receiver) = oneshot::channel();
        assert!(tracker.start_answered(RunId("r".into()), t0, Some(sender)));
        assert_eq!(receiver.try_recv(), Ok(RunEnd::Done));
        assert_eq!(tracker.counters.tasks_acked_measured.load(Ordering::Relaxed), 1, "counted once named");
    }

    #[test]
    fn nothing_is_recorded_outside_the_window() {
        let tracker = Tracker::new(1, None, 0.0);
        let t0 = Instant::now();
        tracker.started(RunId("r".into()), t0, None);
        tracker.received(&attempt("r", "s1"), t0, t0);
        tracker.acked(&attempt("r", "s1"), t0, true);
        assert!(tracker.histograms().run_e2e.is_empty());
        assert_eq!(tracker.counters.tasks_acked_measured.load(Ordering::Relaxed), 0);
    }
}
