//! Starting runs: open loop at a target rate, closed loop at a fixed concurrency.
//!
//! Open loop: start `i` is scheduled at `t0 + i / rate` from a fixed clock, and every
//! latency of that run counts from its scheduled time, so a slow grid (or a slow harness)
//! cannot hide its delay by delaying the next start (no coordinated omission). Since
//! tokio's timer ends a sleep up to 1 ms late, the pacer wakes up to 1 ms early; a start sent
//! before its scheduled time counts from when it was sent.
//! Closed loop: each of `concurrency` loops starts a run, waits for its end, and starts
//! the next.
//! After the window, [`drain`] gives the starts sent their replies and the runs their ends
//! for a bounded time, then stops the driver; what is left counts as errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use flowgrid_sdk::{Client, RunId, StartBatcher, StartRun};

use crate::flows::Plan;
use crate::tracker::Tracker;

/// Start requests awaiting their reply at once in the open loop; past it a start is
/// counted as an error (`harness_backlog`) instead of queueing without bound.
const OPEN_LOOP_PENDING_MAX: usize = 50_000;
/// How long a closed loop waits for its run before giving it up (`run_wait_timeout`).
pub const CLOSED_LOOP_RUN_WAIT: Duration = Duration::from_secs(60);
/// After a refused start, a closed loop's pause before the next: a grid that refuses
/// everything is not spun on.
const CLOSED_LOOP_REFUSED_PAUSE: Duration = Duration::from_millis(10);

/// Errors by kind (`overloaded`, `timeout`, `run_failed`, ...).
#[derive(Default)]
pub struct Errors {
    kinds: Mutex<BTreeMap<String, u64>>,
    total: AtomicU64,
}

impl Errors {
    pub fn add(&self, kind: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.total.fetch_add(count, Ordering::Relaxed);
        *self.kinds.lock().expect("errors lock").entry(kind.to_owned()).or_default() += count;
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn kinds(&self) -> BTreeMap<String, u64> {
        self.kinds.lock().expect("errors lock").clone()
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.kinds.lock().expect("errors lock").get(kind).copied().unwrap_or(0)
    }
}

/// What the driver needs to start runs.
#[derive(Clone)]
pub struct Starter {
    pub client: Client,
    /// Sends starts in batches; `None`: each start is a request of its own.
    pub batcher: Option<StartBatcher>,
    /// Without a batcher: start requests awaiting their reply at once, at most (the
    /// batcher has its own bound); `None`: no bound but the open loop's.
    pub requests: Option<Arc<Semaphore>>,
    pub plan: Arc<Plan>,
    pub tracker: Arc<Tracker>,
    pub errors: Arc<Errors>,
    pub sequence: Arc<AtomicU64>,
    /// With idempotency keys: their prefix, unique to this harness run.
    pub key_prefix: Option<String>,
}

impl Starter {
    /// Sends one start; on success the tracker knows the run from `started`, and its id is
    /// returned. Until its outcome the tracker counts the start as pending: one still
    /// waiting (for a request to go out, or for its reply) when the drain ends counts as
    /// unanswered.
    async fn start(&self, started: Instant, waiter: Option<oneshot::Sender<crate::tracker::RunEnd>>) -> Option<RunId> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let request = StartRun {
            flow: self.plan.flow_name.clone(),
            version: None,
            input: self.plan.run_input(sequence),
            idempotency_key: self.key_prefix.as_ref().map(|prefix| format!("{prefix}-{sequence}")),
            ..Default::default()
        };
        self.tracker.start_sent();
        let outcome = match &self.batcher {
            Some(batcher) => batcher.start(request).await,
            None => {
                // Held until the reply; the semaphore is never closed.
                let _request = match &self.requests {
                    Some(requests) => requests.acquire().await.ok(),
                    None => None,
                };
                self.client.start(request).await
            }
        };
        match outcome {
            Ok(reply) => self.tracker.start_answered(reply.run_id.clone(), started, waiter).then_some(reply.run_id),
            Err(error) => {
                if self.tracker.start_failed() {
                    self.errors.add(&error_kind(&error), 1);
                }
                None
            }
        }
    }
}

/// The error's code for the report: the API code, `timeout`, or `nats`.
pub fn error_kind(error: &flowgrid_sdk::Error) -> String {
    match error {
        flowgrid_sdk::Error::Api(refusal) => format!("start_{}", refusal.code),
        flowgrid_sdk::Error::Timeout { .. } => "start_timeout".to_owned(),
        _ => "start_nats".to_owned(),
    }
}

/// Starts runs at `rate` per second until `stop`.
pub async fn open_loop(starter: Starter, rate: f64, stop: CancellationToken) {
    let errors = starter.errors.clone();
    paced(
        rate,
        OPEN_LOOP_PENDING_MAX,
        stop,
        || errors.add("harness_backlog", 1),
        move |_, scheduled| {
            let starter = starter.clone();
            async move {
                starter.start(scheduled.into_std(), None).await;
            }
        },
    )
    .await;
}

/// Calls `start(index, origin)` at `rate` per second from a fixed clock (a late start
/// does not shift the later ones) until `stop`, with at most `pending_max` starts pending;
/// one due while that many are pending is skipped and reported to `skipped`. `origin` is
/// where the start's latency counts from: the earlier of its schedule and its sending (a start
/// sent early is timed from its sending, one sent late from its schedule). Returns once every
/// start has finished.
pub async fn paced<Start, Pending>(
    rate: f64,
    pending_max: usize,
    stop: CancellationToken,
    mut skipped: impl FnMut(),
    mut start: Start,
) where
    Start: FnMut(u64, tokio::time::Instant) -> Pending,
    Pending: std::future::Future<Output = ()> + Send + 'static,
{
    let pending = Arc::new(Semaphore::new(pending_max));
    let origin = tokio::time::Instant::now();
    let mut in_flight = JoinSet::new();
    for index in 0u64.. {
        let scheduled = origin + Duration::from_secs_f64(index as f64 / rate);
        // Wake up to one timer tick early: tokio's sleeps end up to a tick late, and a start
        // sent early counts from when it was sent, one sent late from its schedule.
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(scheduled - TIMER_RESOLUTION) => {}
        }
        while in_flight.try_join_next().is_some() {}
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            skipped();
            continue;
        };
        let started = start(index, scheduled.min(tokio::time::Instant::now()));
        in_flight.spawn(async move {
            started.await;
            drop(permit);
        });
    }
    while in_flight.join_next().await.is_some() {}
}

/// The resolution of tokio's timer: a sleep ends up to this much after its deadline.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// `concurrency` loops of start-and-wait until `stop`. A run that has not ended after
/// `run_wait` is given up: one error (`run_wait_timeout`), and the tracker forgets it, so
/// that the drain does not count it a second time as unfinished.
pub async fn closed_loop(starter: Starter, concurrency: usize, run_wait: Duration, stop: CancellationToken) {
    let mut loops = JoinSet::new();
    for _ in 0..concurrency {
        let starter = starter.clone();
        let stop = stop.clone();
        loops.spawn(async move {
            while !stop.is_cancelled() {
                let (sender, receiver) = oneshot::channel();
                let Some(run_id) = starter.start(Instant::now(), Some(sender)).await else {
                    tokio::time::sleep(CLOSED_LOOP_REFUSED_PAUSE).await;
                    continue;
                };
                // `forget` is false if the run ended meanwhile, or the drain counted it already.
                if tokio::time::timeout(run_wait, receiver).await.is_err() && starter.tracker.forget(&run_id) {
                    starter.errors.add("run_wait_timeout", 1);
                }
            }
        });
    }
    while loops.join_next().await.is_some() {}
}

/// Ends the load after the window: cancels `stop` (no new start), waits up to `drain` for
/// the driver's starts to be answered and the runs started inside the window to end, then
/// up to the same deadline for the others; then stops the driver, so that its backlog of
/// starts does not go out while the floors are measured (what the SDK's batcher queued
/// already still does). What is left counts as errors: runs that did not end as
/// `run_unfinished`, starts still waiting for their reply as `start_unanswered` (their
/// runs, the slowest, are missing from the latencies). Returns whether the driver's starts
/// were answered and the runs of the window ended in time.
pub async fn drain(
    mut driver: JoinHandle<()>,
    stop: &CancellationToken,
    tracker: &Tracker,
    errors: &Errors,
    drain: Duration,
) -> bool {
    stop.cancel();
    let deadline = tokio::time::Instant::now() + drain;
    let measured_ended = tokio::time::timeout_at(deadline, async {
        let _ = (&mut driver).await;
        tracker.measured_runs_ended().await;
    })
    .await
    .is_ok();
    // The runs started after the window end too, before the workers stop: on a grid of its
    // own it does not matter, but on one it shares no run of the harness's is left waiting
    // for a worker that is gone.
    let _ = tokio::time::timeout_at(deadline, tracker.runs_ended()).await;
    // A start already answered is in the tracker either way; one answered from here on is
    // not followed (the tracker counts it as unanswered).
    driver.abort();
    let unfinished = tracker.unfinished();
    errors.add("run_unfinished", unfinished.runs);
    errors.add("start_unanswered", unfinished.starts);
    measured_ended
}

/// `run.get` checks of sampled runs in flight at once: one at a time fell behind a busy
/// coordinator at a high `--verify-share`, and the runs left unchecked counted as errors.
const VERIFY_IN_FLIGHT_MAX: usize = 64;

/// Checks sampled finished runs with `run.get`: each must have succeeded.
pub async fn verify(
    client: Client,
    mut runs: tokio::sync::mpsc::UnboundedReceiver<flowgrid_sdk::RunId>,
    errors: Arc<Errors>,
    checked: Arc<AtomicU64>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(VERIFY_IN_FLIGHT_MAX));
    let mut checks = tokio::task::JoinSet::new();
    while let Some(run_id) = runs.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let (client, errors, checked) = (client.clone(), errors.clone(), checked.clone());
        checks.spawn(async move {
            verify_run(&client, &run_id, &errors).await;
            checked.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
        while checks.try_join_next().is_some() {}
    }
    while checks.join_next().await.is_some() {}
}

async fn verify_run(client: &Client, run_id: &flowgrid_sdk::RunId, errors: &Errors) {
    // The ack of the last result follows the commit that ends the run; allow a little
    // time anyway in case the end is one tick later.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.get(run_id).await {
            Ok(view) if view.status == flowgrid_sdk::RunStatus::Succeeded => return,
            Ok(view) if view.status.is_terminal() => {
                errors.add(&format!("run_{}", view.status.as_str()), 1);
                return;
            }
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(_) => {
                errors.add("run_not_ended_after_last_ack", 1);
                return;
            }
            Err(error) => {
                errors.add("verify_get_failed", 1);
                eprintln!("verify: run.get {run_id} failed: {error}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use flowgrid_proto::{encode, Encoding, Reply, RunStarted, Subjects, DEFAULT_PREFIX};

    use super::*;
    use crate::args::Workload;

    /// Bound of every wait of these tests for what a working driver does at once; only a
    /// broken one reaches it.
    const TEST_WAIT: Duration = Duration::from_secs(10);

    /// A nats-server with no coordinator: the tests stand in for its start API.
    struct TestNats {
        _dir: tempfile::TempDir,
        _nats: flowgrid_testkit::Process,
        url: String,
    }

    impl TestNats {
        fn start() -> TestNats {
            let dir = tempfile::tempdir().expect("temporary dir");
            let (nats, url) = crate::grid::start_nats(dir.path(), "127.0.0.1").expect("start nats-server");
            TestNats { _dir: dir, _nats: nats, url }
        }

        async fn connect(&self) -> async_nats::Client {
            async_nats::connect(&self.url).await.expect("connect to nats-server")
        }

        /// A starter of one-task chain runs: through a batcher if `batched`, else each start
        /// a request of its own, at most `requests` of them out (`None`: no bound).
        async fn starter(&self, batched: bool, requests: Option<usize>) -> Starter {
            let client = Client::new(self.connect().await, DEFAULT_PREFIX).with_retry_budget(Duration::ZERO);
            let plan = Arc::new(Plan::new(Workload::Chain, 1));
            Starter {
                batcher: batched.then(|| StartBatcher::new(client.clone(), 256, 16)),
                requests: requests.map(|max| Arc::new(Semaphore::new(max))),
                client,
                tracker: Tracker::new(plan.tasks_per_run, None, 0.0),
                plan,
                errors: Arc::new(Errors::default()),
                sequence: Arc::new(AtomicU64::new(0)),
                key_prefix: None,
            }
        }
    }

    /// Waits until `done` holds; panics after [`TEST_WAIT`].
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(TEST_WAIT, async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{what} within {TEST_WAIT:?}");
    }

    /// An open loop faster than the grid: its starts wait in the batcher for replies that
    /// do not come before the drain ends. Each must count (as `start_unanswered`), and the
    /// driver must stop sending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_left_without_a_reply_when_the_drain_ends_count_as_unanswered() {
        let nats = TestNats::start();
        let subjects = Subjects::new(DEFAULT_PREFIX);
        // Taken and never answered.
        let api = nats.connect().await;
        let _silent = api.subscribe(subjects.api("run.>")).await.expect("subscribe");
        api.flush().await.expect("flush");
        let starter = nats.starter(true, None).await;
        let (tracker, errors, sequence) = (starter.tracker.clone(), starter.errors.clone(), starter.sequence.clone());
        let stop = CancellationToken::new();
        let driver = tokio::spawn(open_loop(starter, 1_000.0, stop.clone()));
        wait_until("10 starts made", || sequence.load(Ordering::Relaxed) >= 10).await;
        let drained = drain(driver, &stop, &tracker, &errors, Duration::from_millis(100)).await;
        assert!(!drained, "the driver's starts were still waiting");
        let made = sequence.load(Ordering::Relaxed);
        assert!(made > 0, "the open loop made starts");
        assert_eq!(errors.kinds(), BTreeMap::from([("start_unanswered".to_owned(), made)]));
        assert_eq!(tracker.counters.runs_started.load(Ordering::Relaxed), 0);
    }

    /// `--start-batch-max 1`: single starts keep to `--start-requests-max` requests out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_starts_keep_to_the_requests_bound() {
        const REQUESTS_MAX: usize = 2;
        let nats = TestNats::start();
        let subjects = Subjects::new(DEFAULT_PREFIX);
        let api = nats.connect().await;
        let mut requests = api.subscribe(subjects.api("run.>")).await.expect("subscribe");
        api.flush().await.expect("flush");
        let starter = nats.starter(false, Some(REQUESTS_MAX)).await;
        let (client, sequence) = (starter.client.clone(), starter.sequence.clone());
        let stop = CancellationToken::new();
        let driver = tokio::spawn(open_loop(starter, 1_000.0, stop.clone()));
        wait_until("10 starts made", || sequence.load(Ordering::Relaxed) >= 10).await;
        stop.cancel();
        // Whatever the starts sent is at the server, then at the subscriber.
        client.nats().flush().await.expect("flush");
        api.flush().await.expect("flush");
        let mut received = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), requests.next()).await {
            received += 1;
        }
        driver.abort();
        assert_eq!(
            received,
            REQUESTS_MAX,
            "start requests out at once, of {} starts",
            sequence.load(Ordering::Relaxed)
        );
    }

    /// A closed loop's run that never ends is given up after the run wait: one error, not a
    /// second one when the drain counts what did not end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_a_closed_loop_gives_up_is_one_error() {
        let nats = TestNats::start();
        let subjects = Subjects::new(DEFAULT_PREFIX);
        let api = nats.connect().await;
        let mut requests = api.subscribe(subjects.api("run.start")).await.expect("subscribe");
        api.flush().await.expect("flush");
        // Every start is answered; no run ever ends (no worker).
        let responder = tokio::spawn(async move {
            for sequence in 0u128.. {
                let Some(request) = requests.next().await else { return };
                let started = Reply::Ok(RunStarted {
                    run_id: RunId::from_parts(1_767_225_600_000, sequence),
                    flow: "lt-chain-1".to_owned(),
                    version: 1,
                    created: true,
                });
                let reply = encode(Encoding::MsgPack, &started).expect("encodes");
                let _ = api.publish(request.reply.expect("a request"), reply.into()).await;
            }
        });
        let starter = nats.starter(false, None).await;
        let (tracker, errors) = (starter.tracker.clone(), starter.errors.clone());
        let stop = CancellationToken::new();
        let driver = tokio::spawn(closed_loop(starter, 1, Duration::from_millis(20), stop.clone()));
        wait_until("two runs given up", || errors.count("run_wait_timeout") >= 2).await;
        drain(driver, &stop, &tracker, &errors, TEST_WAIT).await;
        responder.abort();
        let started = tracker.counters.runs_started.load(Ordering::Relaxed);
        assert!(started >= 2);
        assert_eq!(errors.total(), started, "one error per lost run: {:?}", errors.kinds());
    }

    /// The pacer wakes up to a timer tick early; a start sent before its schedule must be
    /// timed from its sending, or its latency would count from a moment still to come.
    #[tokio::test]
    async fn a_start_is_never_timed_from_a_moment_after_its_sending() {
        let origins = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let pacer = tokio::spawn(paced(1_000.0, 100, stop.clone(), || {}, {
            let origins = origins.clone();
            move |_, origin| {
                origins.lock().expect("origins").push((origin, tokio::time::Instant::now()));
                async {}
            }
        }));
        // 100 starts take 100 ms at this rate; the bound only keeps a broken pacer from hanging.
        let made = async {
            while origins.lock().expect("origins").len() < 100 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), made).await;
        stop.cancel();
        pacer.await.expect("the pacer ends");
        let origins = origins.lock().expect("origins");
        assert!(origins.len() >= 50, "{} starts in 100 ms at 1,000/s", origins.len());
        let future = origins.iter().filter(|(origin, sent)| origin > sent).count();
        assert_eq!(future, 0, "{future} of {} starts timed from after their sending", origins.len());
    }
}
