//! A pool's priority lanes as one worker sees them.
//!
//! Tasks of the default priority travel on the pool's own subject; every other priority
//! has a lane of its own (subject `<prefix>.tasks.<pool>.p<n>`, consumer `pool<n>-<pool>`).
//! A worker finds the lanes that hold tasks by asking the stream which of the pool's lane
//! subjects have messages, at most once per [`SCAN_EVERY`], and binds their consumers
//! beside its pulls (a lane it cannot bind is tried again after [`BIND_RETRY`]); a lane a
//! coordinator announces (it opened its consumer) is bound at once. Each free slot goes to the
//! highest lane that has a task waiting; when none has, one slot listens on each lane (as
//! many lanes as there are free slots, highest first) so that the next task of any of them
//! starts at once. A lane with a bound of tasks out of its own may hold a pull that does not
//! wait: its pulls carry an expiry ([`Lane::is_bounded`]). A lane whose pull fails is
//! dropped, and bound again like a lane not seen before once it may be tried again (see
//! [`Lanes::forget`]); the pool's own lane is never dropped, but opened again in place
//! ([`Lanes::reopen`]), keeping the others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{StreamExt, TryStreamExt};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::broker::{self, BrokerLimits};
use flowgrid_proto::{Subjects, PRIORITY_DEFAULT};

/// How often a worker looks for lanes of its pool that it does not pull from yet.
pub(super) const SCAN_EVERY: Duration = Duration::from_secs(1);

/// One lane: its priority, its consumer, how often its tasks are heartbeated, whether a
/// slot listens on it, and whether its bound of tasks out may hold a pull.
pub(super) struct Lane {
    pub(super) priority: u8,
    pub(super) consumer: PullConsumer,
    /// How often a task of this lane is heartbeated: from its consumer's ack wait, which
    /// may differ from one lane to another (a consumer made by another hand or version).
    pub(super) heartbeat_every: Duration,
    /// Set while a slot waits on this lane for its next task (see the module's text).
    pub(super) listening: Arc<AtomicBool>,
    /// Set when the server may hold a pull of this lane that does not wait (`no_wait`): it
    /// does so while the lane is at its bound of tasks out with tasks waiting, until a slot
    /// frees. Set for a consumer bound below the default (`flowgrid pool limit`), or once a
    /// pull of the lane was held (a bound set after the lane was bound).
    bounded: AtomicBool,
}

impl Lane {
    /// `ack_pending_default`: the bound of tasks out of a pool that has no limit of its own.
    fn new(priority: u8, consumer: PullConsumer, ack_pending_default: i64) -> Lane {
        let bounded = AtomicBool::new(is_limited(&consumer, ack_pending_default));
        let heartbeat_every = heartbeat_every(&consumer);
        Lane { priority, consumer, heartbeat_every, listening: Arc::new(AtomicBool::new(false)), bounded }
    }

    pub(super) fn is_listened(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Whether the server may hold a pull of this lane (see `bounded`).
    pub(super) fn is_bounded(&self) -> bool {
        self.bounded.load(Ordering::Relaxed)
    }

    /// Notes that the server may hold a pull of this lane: one was held, or its consumer
    /// has a bound of its own.
    pub(super) fn set_bounded(&self) {
        self.bounded.store(true, Ordering::Relaxed);
    }
}

/// The heartbeat period of `consumer`'s tasks, from its ack wait as it was opened.
fn heartbeat_every(consumer: &PullConsumer) -> Duration {
    super::heartbeat_period(consumer.cached_info().config.ack_wait)
}

/// Whether `consumer` has a bound of tasks out below the default one, as it was opened.
fn is_limited(consumer: &PullConsumer, ack_pending_default: i64) -> bool {
    let bound = consumer.cached_info().config.max_ack_pending;
    // -1: no bound at all.
    bound > 0 && bound < ack_pending_default
}

/// How long a look for lanes waits for the consumers it asked for, at most.
const BIND_WAIT: Duration = Duration::from_millis(500);

/// How long a worker waits before it tries again to bind a lane whose consumer it could not
/// open: [`BIND_RETRY_FIRST`] after a first failure (JetStream electing the consumer's
/// leader), twice as long after each failure in a row, up to this (a consumer its
/// credentials do not allow).
pub(super) const BIND_RETRY: Duration = Duration::from_secs(30);
const BIND_RETRY_FIRST: Duration = Duration::from_secs(1);

/// The lanes a worker pulls from, highest priority first; the default lane is always one.
pub(super) struct Lanes {
    stream: jetstream::stream::Stream,
    lanes: Vec<Lane>,
    /// The bound of tasks out of a pool without a limit of its own: a lane bound below it
    /// may hold a pull (see [`Lane::is_bounded`]).
    ack_pending_default: i64,
    scanned: Option<Instant>,
    /// Lanes whose consumer is being opened, beside the pulls: a request that NATS does
    /// not answer (one the worker's permissions deny) holds no other lane.
    binding: JoinSet<(u8, Result<PullConsumer, broker::BrokerError>)>,
    /// A bit per priority being bound.
    binding_now: u16,
    /// When each priority whose binding failed may be tried again.
    retry_at: [Option<Instant>; 16],
    /// How often in a row each priority's binding failed.
    failures: [u32; 16],
}

const _: () = assert!(flowgrid_proto::PRIORITY_MAX < 16, "a priority is a bit of binding_now and retry_at's index");

impl Lanes {
    pub(super) fn new(stream: jetstream::stream::Stream, pool_consumer: PullConsumer, limits: &BrokerLimits) -> Lanes {
        let ack_pending_default = limits.pool_ack_pending_max;
        Lanes {
            stream,
            lanes: vec![Lane::new(PRIORITY_DEFAULT, pool_consumer, ack_pending_default)],
            ack_pending_default,
            scanned: None,
            binding: JoinSet::new(),
            binding_now: 0,
            retry_at: [None; 16],
            failures: [0; 16],
        }
    }

    /// Every lane, highest priority first.
    pub(super) fn highest_first(&self) -> &[Lane] {
        &self.lanes
    }

    /// Puts `pool_consumer`, opened again on `stream` after its pull failed, in place of the
    /// pool's own lane's consumer, its heartbeat period from the new consumer's ack wait; the
    /// other lanes stay as they are.
    pub(super) fn reopen(&mut self, stream: jetstream::stream::Stream, pool_consumer: PullConsumer) {
        self.stream = stream;
        let pool_lane = self.lanes.iter_mut().find(|lane| lane.priority == PRIORITY_DEFAULT);
        let pool_lane = pool_lane.expect("the pool's own lane is never dropped");
        if is_limited(&pool_consumer, self.ack_pending_default) {
            pool_lane.set_bounded();
        }
        pool_lane.heartbeat_every = heartbeat_every(&pool_consumer);
        pool_lane.consumer = pool_consumer;
    }

    /// Drops the lane of `priority`, whose pull failed (its consumer deleted, NATS lost
    /// its store): a look binds it again, made anew if it is missing, once it holds tasks
    /// and [`BIND_RETRY_FIRST`] has passed, so that a lane whose pulls keep failing is
    /// asked once a second, not at every pass. The pool's own lane stays: see
    /// [`Lanes::reopen`].
    pub(super) fn forget(&mut self, priority: u8) {
        assert_ne!(priority, PRIORITY_DEFAULT, "the pool's own lane is opened again, not dropped");
        self.lanes.retain(|lane| lane.priority != priority);
        self.retry_at[usize::from(priority)] = Some(Instant::now() + BIND_RETRY_FIRST);
    }

    /// Binds the lanes a coordinator announced (`announced`: their consumers exist), at
    /// once, and the lanes of `pool` that hold tasks and are not bound yet, once per
    /// [`SCAN_EVERY`]. Returns the priorities of the lanes it bound.
    pub(super) async fn scan(
        &mut self,
        subjects: &Subjects,
        pool: &str,
        limits: &BrokerLimits,
        announced: &Announced,
    ) -> Result<Vec<u8>, async_nats::Error> {
        let mut bound = Vec::new();
        while let Some(done) = self.binding.try_join_next() {
            self.take(done, pool, &mut bound);
        }
        let mut wanted = announced.take();
        if self.scanned.is_none_or(|scanned| scanned.elapsed() >= SCAN_EVERY) {
            self.scanned = Some(Instant::now());
            let lanes: Vec<(String, usize)> = match self.lanes_holding(subjects, pool).await {
                Ok(lanes) => lanes,
                Err(error) => {
                    // Announced lanes stay wanted for the next look.
                    announced.restore(&wanted);
                    return Err(error);
                }
            };
            let holding = lanes.iter().filter(|(_, waiting)| *waiting > 0);
            wanted.extend(holding.filter_map(|(subject, _)| subjects.lane_priority(pool, subject)));
        }
        let mut asked = 0u16;
        for priority in wanted {
            let waiting = self.retry_at[usize::from(priority)].is_some_and(|at| at > Instant::now());
            if waiting
                || self.binding_now & (1 << priority) != 0
                || self.lanes.iter().any(|lane| lane.priority == priority)
            {
                continue;
            }
            self.binding_now |= 1 << priority;
            asked |= 1 << priority;
            let (stream, subjects, pool, limits) =
                (self.stream.clone(), subjects.clone(), pool.to_owned(), limits.clone());
            self.binding.spawn(async move {
                (priority, broker::lane_consumer(&stream, &subjects, &pool, priority, &limits).await)
            });
        }
        // A lane's consumer opens within milliseconds: waiting that long for those asked for
        // now lets a worker that starts with tasks on higher lanes take those first, while a
        // request NATS does not answer holds the pulls once, and no longer than BIND_WAIT.
        let until = tokio::time::Instant::now() + BIND_WAIT;
        while self.binding_now & asked != 0 {
            match tokio::time::timeout_at(until, self.binding.join_next()).await {
                Ok(Some(done)) => self.take(done, pool, &mut bound),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(bound)
    }

    /// The task subjects of `pool` in the stream, each with its tasks waiting.
    async fn lanes_holding(&self, subjects: &Subjects, pool: &str) -> Result<Vec<(String, usize)>, async_nats::Error> {
        Ok(self.stream.info_with_subjects(subjects.task_lanes(pool)).await?.try_collect().await?)
    }

    /// Adds a lane whose consumer opened (its priority to `bound`); a lane that could not
    /// be bound is tried again later, up to [`BIND_RETRY`].
    fn take(
        &mut self,
        done: Result<(u8, Result<PullConsumer, broker::BrokerError>), tokio::task::JoinError>,
        pool: &str,
        bound: &mut Vec<u8>,
    ) {
        let Ok((priority, opened)) = done else {
            // A bind that panicked: its priority is not known, so the bits are cleared once
            // no bind is left, and the lanes still wanted are asked for again.
            if self.binding.is_empty() {
                self.binding_now = 0;
            }
            return;
        };
        self.binding_now &= !(1 << priority);
        match opened {
            Ok(consumer) => {
                self.retry_at[usize::from(priority)] = None;
                self.failures[usize::from(priority)] = 0;
                let at = self.lanes.iter().position(|lane| lane.priority < priority).unwrap_or(self.lanes.len());
                self.lanes.insert(at, Lane::new(priority, consumer, self.ack_pending_default));
                bound.push(priority);
            }
            Err(error) => {
                let failures = &mut self.failures[usize::from(priority)];
                *failures = failures.saturating_add(1);
                let delay = Backoff::after(BIND_RETRY_FIRST, BIND_RETRY, u64::from(*failures));
                warn!(
                    pool = %pool,
                    priority,
                    error = %error,
                    "cannot open the consumer of the pool's lane; its tasks wait for workers that can: a worker with \
                     NATS permissions of its own needs the lane's consumer `pool{priority}-{pool}` allowed (operations.md, \
                     Securing NATS); tried again in {delay:?}"
                );
                self.retry_at[usize::from(priority)] = Some(Instant::now() + delay);
            }
        }
    }
}

/// The priorities of the lanes coordinators announced since the worker last looked: a bit
/// per priority, so that announcements however many take no more room.
#[derive(Default)]
pub(super) struct Announced(std::sync::atomic::AtomicU16);

const _: () = assert!(flowgrid_proto::PRIORITY_MAX < 16, "a priority is a bit of Announced's u16");

impl Announced {
    /// Notes an announcement (its payload: the priority as text); anything else is ignored.
    pub(super) fn note(&self, payload: &[u8]) -> bool {
        let Some(priority) = std::str::from_utf8(payload).ok().and_then(|text| text.parse::<u8>().ok()) else {
            return false;
        };
        if priority > flowgrid_proto::PRIORITY_MAX {
            return false;
        }
        self.0.fetch_or(1 << priority, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Notes `priorities` again (taken by a look that failed).
    fn restore(&self, priorities: &[u8]) {
        let bits = priorities.iter().fold(0u16, |bits, priority| bits | (1 << priority));
        self.0.fetch_or(bits, std::sync::atomic::Ordering::Relaxed);
    }

    /// The priorities noted since the last call, highest first.
    fn take(&self) -> Vec<u8> {
        let noted = self.0.swap(0, std::sync::atomic::Ordering::Relaxed);
        (0..=flowgrid_proto::PRIORITY_MAX).rev().filter(|priority| noted & (1 << priority) != 0).collect()
    }
}

/// How long a lane whose waiting pull failed rests before the worker pulls again: the
/// server refuses a waiting pull at once (more idle workers than the consumer's
/// `max_waiting`, an `expires` over its `max_expires`), and without a pause the worker
/// would ask again and again.
const LISTEN_FAILED_PAUSE: Duration = Duration::from_secs(1);

/// Waits up to `expires` for the lane's next task and returns it; clears the lane's
/// listening flag when the wait ends, whatever ended it (after [`LISTEN_FAILED_PAUSE`]
/// when the pull failed).
pub(super) async fn listen(
    consumer: &PullConsumer,
    listening: &AtomicBool,
    expires: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<jetstream::Message> {
    let message = async {
        let error = match consumer.batch().max_messages(1).expires(expires).messages().await {
            Ok(mut batch) => tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    super::hand_back_unstarted(&mut batch).await;
                    return None;
                }
                next = batch.next() => match next? {
                    Ok(message) => return Some(message),
                    Err(error) => error.to_string(),
                },
            },
            Err(error) => error.to_string(),
        };
        debug!(error = %error, "listening on a lane failed");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(LISTEN_FAILED_PAUSE) => {}
        }
        None
    }
    .await;
    listening.store(false, Ordering::Release);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_announcements_of_a_priority_are_noted() {
        let announced = Announced::default();
        assert!(announced.note(b"0"));
        assert!(announced.note(b"7"));
        assert!(announced.note(b"7"));
        for wrong in [&b"12"[..], b"x", b"", b"-1"] {
            assert!(!announced.note(wrong), "{wrong:?}");
        }
        assert_eq!(announced.take(), vec![7, 0]);
        assert!(announced.take().is_empty(), "each is taken once");
        // A look that failed gives them back, with those noted meanwhile.
        announced.note(b"3");
        announced.restore(&[7, 0]);
        assert_eq!(announced.take(), vec![7, 3, 0]);
    }

    /// A lane whose consumer did not open (its leader being elected) is tried again within
    /// a second, then less and less often, up to [`BIND_RETRY`] (one the worker may not open).
    #[test]
    fn a_lane_that_did_not_bind_is_tried_again_soon_then_less_often() {
        let bind_retry_after = |failures: u64| Backoff::after(BIND_RETRY_FIRST, BIND_RETRY, failures);
        let delays: Vec<u64> = (1..=8).map(|failures| bind_retry_after(failures).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(bind_retry_after(u64::from(u32::MAX)), BIND_RETRY);
    }
}
