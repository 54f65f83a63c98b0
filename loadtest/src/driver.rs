//! Starting runs: open loop at a target rate, closed loop at a fixed concurrency.
//!
//! Open loop: start `i` is scheduled at `t0 + i / rate` from a fixed clock, and every
//! latency of that run counts from its scheduled time, so a slow grid (or a slow harness)
//! cannot hide its delay by delaying the next start (no coordinated omission). Since
//! tokio's timer ends a sleep up to 1 ms late, the pacer wakes up to 1 ms early; a start sent
//! before its scheduled time counts from when it was sent.
//! Closed loop: each of `concurrency` loops starts a run, waits for its end, and starts
//! the next.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use flowgrid_sdk::{Client, StartBatcher, StartRun};

use crate::flows::Plan;
use crate::tracker::Tracker;

/// Start requests awaiting their reply at once in the open loop; past it a start is
/// counted as an error (`harness_backlog`) instead of queueing without bound.
const OPEN_LOOP_PENDING_MAX: usize = 50_000;
/// How long a closed loop waits for its run before counting it as unfinished.
const CLOSED_LOOP_RUN_WAIT: Duration = Duration::from_secs(60);

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
    pub plan: Arc<Plan>,
    pub tracker: Arc<Tracker>,
    pub errors: Arc<Errors>,
    pub sequence: Arc<AtomicU64>,
    /// With idempotency keys: their prefix, unique to this harness run.
    pub key_prefix: Option<String>,
}

impl Starter {
    /// Sends one start; on success the tracker knows the run from `started`.
    async fn start(&self, started: Instant, waiter: Option<oneshot::Sender<crate::tracker::RunEnd>>) -> bool {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let request = StartRun {
            flow: self.plan.flow_name.clone(),
            version: None,
            input: self.plan.run_input(sequence),
            idempotency_key: self.key_prefix.as_ref().map(|prefix| format!("{prefix}-{sequence}")),
            ..Default::default()
        };
        let outcome = match &self.batcher {
            Some(batcher) => batcher.start(request).await,
            None => self.client.start(request).await,
        };
        match outcome {
            Ok(reply) => {
                self.tracker.started(reply.run_id, started, waiter);
                true
            }
            Err(error) => {
                self.errors.add(&error_kind(&error), 1);
                false
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

/// `concurrency` loops of start-and-wait until `stop`.
pub async fn closed_loop(starter: Starter, concurrency: usize, stop: CancellationToken) {
    let mut loops = JoinSet::new();
    for _ in 0..concurrency {
        let starter = starter.clone();
        let stop = stop.clone();
        loops.spawn(async move {
            while !stop.is_cancelled() {
                let (sender, receiver) = oneshot::channel();
                if !starter.start(Instant::now(), Some(sender)).await {
                    // A refused start: do not spin on a grid that refuses everything.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                if tokio::time::timeout(CLOSED_LOOP_RUN_WAIT, receiver).await.is_err() {
                    starter.errors.add("run_wait_timeout", 1);
                }
            }
        });
    }
    while loops.join_next().await.is_some() {}
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
    use super::*;

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
