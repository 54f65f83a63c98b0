//! The task cache: workers' results of steps with `cache`, kept in a NATS KV bucket that
//! every coordinator of the grid shares, so a result stored by one shard serves the runs
//! of every other.
//!
//! An entry's key is the SHA-256 of the task's pool, its name and the step's cache key
//! (JSON with object keys sorted, so `{a, b}` and `{b, a}` are one key); its value is the
//! result and when it was stored. A lookup takes an entry younger than the step's
//! `cache.ttl_ms`; the bucket drops entries past [`CACHE_TTL_MS_MAX`] and, when full, its
//! oldest.
//!
//! The cache only ever saves worker calls: a lookup that fails, times out or finds no room
//! sends the task to a worker, and a store that fails is dropped (counted). A result taken
//! from the cache is recorded in the run's history like a worker's, so the run replays
//! the same without the cache.
//!
//! The bucket is opened (and created) on first use, so a grid whose flows cache nothing
//! does not reserve JetStream storage for it.
//!
//! Single flight: a lookup that misses leads a *flight* for its key on this coordinator,
//! and its task goes to a worker. Lookups of the same key that miss while the flight is
//! open follow it instead of calling workers of their own: they take the leader's result
//! when it is stored; when the leader's attempt fails, times out or is cancelled, the
//! first of them leads a new flight (its task goes to a worker) and the others follow it.
//! None waits past its own deadline, and a follower whose own attempt closes (its run
//! cancelled, say) drops out: its task is dropped, and it leads nothing. Coordinators do
//! not share flights. A lookup belongs to what its shard loaded: when the shard reloads or
//! moves, it stops (and leads nothing), and the reload or the next owner looks the shard's
//! open tasks up again, oldest first, so the task already with a worker leads again.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use flowgrid_model::limits::CACHE_TTL_MS_MAX;
use flowgrid_model::{AttemptId, Millis};
use flowgrid_proto::Subjects;
use flowgrid_sdk::broker;
use ring::digest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{oneshot, Mutex, OnceCell, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::metrics;

/// Lookups and stores out at once, over the coordinator: past it, a task goes to a worker
/// without a lookup and a result is not stored.
const IN_FLIGHT_MAX: usize = 1_024;
/// How long a lookup or a store may take before it is given up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// After the bucket could not be opened, how long until the next try.
const OPEN_RETRY: Duration = Duration::from_secs(30);

/// The bucket's longest keep: the longest `cache.ttl_ms` a definition may give.
const MAX_AGE: Duration = Duration::from_millis(CACHE_TTL_MS_MAX);

/// A stored result: what the bucket holds under an entry's key.
#[derive(Serialize, Deserialize)]
struct Entry {
    stored_ms: Millis,
    output: Value,
}

/// The coordinator's handle on the task cache bucket.
pub struct TaskCache {
    jetstream: async_nats::jetstream::Context,
    subjects: Subjects,
    max_bytes: i64,
    bucket: OnceCell<kv::Store>,
    /// When opening the bucket last failed: no other try until [`OPEN_RETRY`] later.
    open_failed: Mutex<Option<Instant>>,
    in_flight: Arc<Semaphore>,
    flights: SingleFlight,
}

/// The flights of one coordinator's lookups (see the module's docs).
#[derive(Default)]
pub struct SingleFlight {
    flights: std::sync::Mutex<Flights>,
    /// How many flights are open and attempts follow one (set under the lock): an attempt
    /// that closes looks itself up only when there is one.
    open: AtomicUsize,
}

/// The open flights, by entry key and by leader, and the attempts that follow them.
#[derive(Default)]
struct Flights {
    by_key: HashMap<String, Flight>,
    by_leader: HashMap<AttemptId, String>,
    /// Each attempt that follows a flight, from its first join until its wait ends (also
    /// between two flights, once one ended and before it joins the next): when it closes,
    /// it drops out, and its wait stops and leads nothing.
    following: HashMap<AttemptId, Following>,
    /// The number the next [`Ticket`] takes.
    next_ticket: u64,
}

impl Flights {
    fn remove(&mut self, key: &str) -> Option<Flight> {
        let flight = self.by_key.remove(key)?;
        self.by_leader.remove(&flight.leader);
        Some(flight)
    }

    /// How many flights are open and attempts follow one.
    fn open(&self) -> usize {
        self.by_key.len() + self.following.len()
    }
}

/// A worker call other lookups of its key wait for.
struct Flight {
    leader: AttemptId,
    /// The leader attempt's deadline: a flight past it is over.
    deadline: Instant,
    /// The followers, by attempt: each gets the leader's result, or `None` to lead or
    /// follow anew.
    followers: Vec<(AttemptId, oneshot::Sender<Option<Landed>>)>,
}

/// An attempt that follows a flight of `key`.
struct Following {
    key: String,
    ticket: Ticket,
}

/// A follower's hold on its place among the following attempts: its number tells its
/// wait from another copy of its attempt's (a shard that reloads sends its open tasks
/// again), and `closed` is cancelled when its attempt closes.
#[derive(Clone)]
struct Ticket {
    number: u64,
    closed: CancellationToken,
}

/// A result a flight's leader got: from the bucket (stored then), or from a worker (now).
#[derive(Clone, Debug, PartialEq)]
pub struct Landed {
    pub output: Value,
    pub stored_ms: Millis,
}

impl Landed {
    /// The output, if younger than `ttl_ms`: a follower reads with its own step's `ttl_ms`,
    /// which may be shorter than its leader's.
    pub fn fresh_for(self, ttl_ms: Millis) -> Option<Value> {
        (now_ms().saturating_sub(self.stored_ms) < ttl_ms).then_some(self.output)
    }
}

/// What a lookup that missed does.
pub enum Joined {
    /// Send the task to a worker; other lookups of its key follow it.
    Lead,
    /// Wait for the leader's result (see [`SingleFlight::follow`]).
    Follow(Follower),
}

/// A lookup that follows a flight.
pub struct Follower {
    /// The leader's result; `None`: its attempt ended without one.
    landing: oneshot::Receiver<Option<Landed>>,
    /// The leader's deadline: past it, the flight is over.
    until: Instant,
    ticket: Ticket,
}

/// How a follower's wait ended.
#[derive(Debug, PartialEq)]
pub enum Followed {
    /// The result of the flight it followed, fresh for its step: the attempt takes it.
    Took(Value),
    /// Send the task to a worker: it leads a new flight, or its own deadline passed.
    ToWorker,
    /// Drop the task: its attempt closed (nothing takes its result), or its shard reloaded
    /// or moved (the reload, or the shard's next owner, sends it again).
    Dropped,
}

/// What became of a lookup or a store, as counted in `flowgrid_task_cache_total`.
#[derive(Clone, Copy)]
enum Outcome {
    /// A stored result was fresh enough and answered the attempt.
    Hit,
    /// No entry, or one older than the step's `ttl_ms`: the task went to a worker, or
    /// waited for another task of its key that did.
    Miss,
    /// A worker's result was stored.
    Stored,
    /// Too many lookups and stores were out, or the bucket failed or was too slow: the
    /// task went to a worker, or the result was not stored.
    Skipped,
    /// A miss that followed another lookup's worker call of the same key and took its
    /// result (counted besides its `Miss`).
    Joined,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stored => "stored",
            Outcome::Skipped => "skipped",
            Outcome::Joined => "joined",
        }
    }
}

fn count(pool: &str, outcome: Outcome) {
    ::metrics::counter!(metrics::TASK_CACHE, "pool" => pool.to_owned(), "outcome" => outcome.as_str()).increment(1);
}

impl TaskCache {
    /// A cache whose bucket holds at most `max_bytes`, opened when first used.
    pub fn new(jetstream: async_nats::jetstream::Context, subjects: Subjects, max_bytes: i64) -> TaskCache {
        TaskCache {
            jetstream,
            subjects,
            max_bytes,
            bucket: OnceCell::new(),
            open_failed: Mutex::new(None),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_MAX)),
            flights: SingleFlight::default(),
        }
    }

    /// The coordinator's flights.
    pub fn flights(&self) -> &SingleFlight {
        &self.flights
    }

    /// Counts a follower that took its leader's result.
    pub fn count_joined(pool: &str) {
        count(pool, Outcome::Joined);
    }

    /// Counts a task that waits for another of its key (the other's lookup stands for
    /// its own: no stored result was there).
    pub fn count_miss(pool: &str) {
        count(pool, Outcome::Miss);
    }

    /// The bucket, opened (and created) on first use; `None` while it cannot be opened.
    async fn bucket(&self) -> Option<&kv::Store> {
        if let Some(bucket) = self.bucket.get() {
            return Some(bucket);
        }
        let mut open_failed = self.open_failed.lock().await;
        if open_failed.is_some_and(|failed| failed.elapsed() < OPEN_RETRY) {
            return None;
        }
        let open = || async {
            let opened = broker::task_cache_kv(&self.jetstream, &self.subjects, self.max_bytes, MAX_AGE);
            match tokio::time::timeout(REQUEST_TIMEOUT, opened).await {
                Ok(opened) => opened.map_err(|error| error.to_string()),
                Err(_) => Err(format!("no answer from NATS within {REQUEST_TIMEOUT:?}")),
            }
        };
        let opened = self.bucket.get_or_try_init(open).await;
        match opened {
            Ok(bucket) => {
                *open_failed = None;
                Some(bucket)
            }
            Err(error) => {
                warn!(
                    bucket = %self.subjects.task_cache_bucket(),
                    error = %error,
                    "cannot open the task cache; tasks of steps with `cache` go to workers until it opens (tried \
                     again in 30 s). If nats-server has too little JetStream storage left, give it more or lower \
                     --task-cache-max-mb"
                );
                *open_failed = Some(Instant::now());
                None
            }
        }
    }

    /// A permit for one lookup or store, if fewer than [`IN_FLIGHT_MAX`] are out.
    pub fn permit(&self, pool: &str) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.in_flight).try_acquire_owned().ok();
        if permit.is_none() {
            count(pool, Outcome::Skipped);
        }
        permit
    }

    /// The stored result under `key` (the [`entry_key`] of a task of `pool` and `task`),
    /// if there is one younger than `ttl_ms`.
    pub async fn look_up(&self, pool: &str, task: &str, key: &str, ttl_ms: Millis) -> Option<Landed> {
        let Some(bucket) = self.bucket().await else {
            count(pool, Outcome::Skipped);
            return None;
        };
        let stored = match tokio::time::timeout(REQUEST_TIMEOUT, bucket.get(key)).await {
            Ok(Ok(stored)) => stored,
            Ok(Err(error)) => {
                debug!(pool, task, error = %error, "task cache lookup failed; the task goes to a worker");
                count(pool, Outcome::Skipped);
                return None;
            }
            Err(_) => {
                debug!(pool, task, "task cache lookup timed out; the task goes to a worker");
                count(pool, Outcome::Skipped);
                return None;
            }
        };
        let fresh = stored
            .and_then(|bytes| rmp_serde::from_slice::<Entry>(&bytes).ok())
            .filter(|entry| now_ms().saturating_sub(entry.stored_ms) < ttl_ms);
        count(pool, if fresh.is_some() { Outcome::Hit } else { Outcome::Miss });
        fresh.map(|entry| Landed { output: entry.output, stored_ms: entry.stored_ms })
    }

    /// Stores a worker's `output` under `key` (the [`entry_key`] of a task of `pool` and
    /// `task`).
    pub async fn store(&self, pool: &str, task: &str, key: &str, output: Value) {
        let Some(bucket) = self.bucket().await else {
            count(pool, Outcome::Skipped);
            return;
        };
        let entry = Entry { stored_ms: now_ms(), output };
        let bytes = match rmp_serde::to_vec_named(&entry) {
            Ok(bytes) => Bytes::from(bytes),
            Err(error) => {
                debug!(pool, task, error = %error, "cannot encode a result for the task cache");
                count(pool, Outcome::Skipped);
                return;
            }
        };
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, bucket.put(key, bytes)).await {
            Ok(Ok(_)) => Outcome::Stored,
            Ok(Err(error)) => {
                debug!(pool, task, error = %error, "cannot store a result in the task cache");
                Outcome::Skipped
            }
            Err(_) => Outcome::Skipped,
        };
        count(pool, outcome);
    }
}

impl SingleFlight {
    /// Follows the flight `attempt` (due by `deadline`) `joined` for `key`, and takes its
    /// leader's result if it is fresh for `ttl_ms`. When that leader's attempt ends without
    /// one (failed, timed out, cancelled), or its deadline passes, its followers join again:
    /// the first leads a new flight, the others (and the failed leader's retry) follow it.
    /// [`Followed::ToWorker`] when it leads one, and at `deadline`.
    ///
    /// [`Followed::Dropped`], at once and without leading a flight, once `attempt` closes
    /// ([`SingleFlight::leader_gone`]: nothing would take its result, and a flight it led
    /// would never end), or once `loaded` is cancelled: the follower's shard reloaded or
    /// moved, and the reload or the shard's next owner sends its task again. Led from here,
    /// it would take the lead from the task that is with a worker, or open a flight that
    /// nothing ends on this coordinator.
    pub async fn follow(
        &self,
        joined: Joined,
        key: String,
        attempt: &AttemptId,
        deadline: Instant,
        ttl_ms: Millis,
        loaded: &CancellationToken,
    ) -> Followed {
        let Joined::Follow(mut follower) = joined else { return Followed::ToWorker };
        let ticket = follower.ticket.clone();
        let followed = loop {
            let Follower { landing, until, .. } = follower;
            let landed = tokio::select! {
                biased;
                () = loaded.cancelled() => break Followed::Dropped,
                () = ticket.closed.cancelled() => break Followed::Dropped,
                landed = tokio::time::timeout_at(until.min(deadline).into(), landing) => landed,
            };
            // Read with this step's own `ttl_ms`. None from the leader (its attempt ended
            // without a result), one too old, or the leader's deadline passed: lead or
            // follow anew.
            let fresh = match landed {
                Ok(Ok(landed)) => landed.and_then(|landed| landed.fresh_for(ttl_ms)),
                _ => None,
            };
            if let Some(output) = fresh {
                break Followed::Took(output);
            }
            if Instant::now() >= deadline {
                break Followed::ToWorker;
            }
            let flights = self.flights.lock().expect("flights lock");
            // Checked under the lock: a shard cancels `loaded` before it ends the flights its
            // attempts lead (under this lock), and an attempt's close cancels its ticket under
            // it, so a flight led past this check is ended too.
            if loaded.is_cancelled() || ticket.closed.is_cancelled() {
                break Followed::Dropped;
            }
            match self.join_locked(flights, key.clone(), attempt, deadline, Some(&ticket)) {
                Joined::Lead => break Followed::ToWorker,
                Joined::Follow(next) => follower = next,
            }
        };
        // Its wait is over: it leaves the following attempts (unless its attempt closed
        // meanwhile, or another copy of it took its place).
        let mut flights = self.flights.lock().expect("flights lock");
        if flights.following.get(attempt).is_some_and(|following| following.ticket.number == ticket.number) {
            flights.following.remove(attempt);
            self.open.store(flights.open(), Ordering::Relaxed);
        }
        drop(flights);
        if ticket.closed.is_cancelled() {
            return Followed::Dropped;
        }
        followed
    }

    /// After a miss of `key` by `attempt` (due by `deadline`): leads a flight, or follows
    /// the one open.
    pub fn join(&self, key: String, attempt: &AttemptId, deadline: Instant) -> Joined {
        let flights = self.flights.lock().expect("flights lock");
        self.join_locked(flights, key, attempt, deadline, None)
    }

    /// [`SingleFlight::join`], with the flights locked; `ticket`: the follower's, when it
    /// joins again from [`SingleFlight::follow`].
    fn join_locked(
        &self,
        mut flights: MutexGuard<'_, Flights>,
        key: String,
        attempt: &AttemptId,
        deadline: Instant,
        ticket: Option<&Ticket>,
    ) -> Joined {
        if let Some(flight) = flights.by_key.get_mut(&key) {
            if flight.deadline > Instant::now() && flight.leader != *attempt {
                let (sender, landing) = oneshot::channel();
                flight.followers.push((attempt.clone(), sender));
                let until = flight.deadline;
                let ticket = match ticket {
                    Some(ticket) => ticket.clone(),
                    None => {
                        let ticket = Ticket { number: flights.next_ticket, closed: CancellationToken::new() };
                        flights.next_ticket += 1;
                        let following = Following { key, ticket: ticket.clone() };
                        // Another copy of the attempt that followed (its shard reloaded) stops.
                        if let Some(copy) = flights.following.insert(attempt.clone(), following) {
                            copy.ticket.closed.cancel();
                        }
                        self.open.store(flights.open(), Ordering::Relaxed);
                        ticket
                    }
                };
                return Joined::Follow(Follower { landing, until, ticket });
            }
        }
        // None open, one over (its followers lead or follow anew), or the leader's task again.
        let over = flights.remove(&key);
        flights.by_leader.insert(attempt.clone(), key.clone());
        flights.by_key.insert(key, Flight { leader: attempt.clone(), deadline, followers: Vec::new() });
        self.open.store(flights.open(), Ordering::Relaxed);
        drop(flights);
        if let Some(over) = over {
            land_followers(over.followers, None);
        }
        Joined::Lead
    }

    /// Ends the flight of `key` with its leader's `output`, stored at `stored_ms`: each
    /// follower takes it if it is fresh enough for its step.
    pub fn land(&self, key: &str, output: &Value, stored_ms: Millis) {
        if self.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut flights = self.flights.lock().expect("flights lock");
        let flight = flights.remove(key);
        self.open.store(flights.open(), Ordering::Relaxed);
        drop(flights);
        if let Some(flight) = flight {
            land_followers(flight.followers, Some((output, stored_ms)));
        }
    }

    /// `attempt` closed without a result to store (failed, timed out, cancelled, its run
    /// forgotten): if it led a flight, its followers lead or follow anew; if it followed
    /// one, it drops out, and its wait stops without leading a flight.
    pub fn leader_gone(&self, attempt: &AttemptId) {
        if self.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(Following { key, ticket }) = flights.following.remove(attempt) {
            ticket.closed.cancel();
            if let Some(flight) = flights.by_key.get_mut(&key) {
                flight.followers.retain(|(follower, _)| follower != attempt);
            }
        }
        let led = flights.by_leader.get(attempt).cloned().and_then(|key| flights.remove(&key));
        self.open.store(flights.open(), Ordering::Relaxed);
        drop(flights);
        if let Some(flight) = led {
            land_followers(flight.followers, None);
        }
    }
}

/// Tells each follower how its flight ended (a follower that stopped waiting is gone).
fn land_followers(followers: Vec<(AttemptId, oneshot::Sender<Option<Landed>>)>, landed: Option<(&Value, Millis)>) {
    for (_, follower) in followers {
        let _ = follower.send(landed.map(|(output, stored_ms)| Landed { output: output.clone(), stored_ms }));
    }
}

/// The bucket key of a task's result: the lowercase hex SHA-256 of its pool, task name
/// and key value.
pub fn entry_key(pool: &str, task: &str, key: &Value) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    feed_str(&mut context, pool);
    feed_str(&mut context, task);
    feed_value(&mut context, key);
    let mut hex = String::with_capacity(64);
    for byte in context.finish().as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Writes a string with its length in front, so that no two sequences of strings feed the
/// same bytes.
fn feed_str(context: &mut digest::Context, text: &str) {
    context.update(&(text.len() as u64).to_le_bytes());
    context.update(text.as_bytes());
}

/// Writes a JSON value unambiguously, each kind tagged, objects in key order.
fn feed_value(context: &mut digest::Context, value: &Value) {
    match value {
        Value::Null => context.update(b"n"),
        Value::Bool(flag) => context.update(if *flag { b"t" } else { b"f" }),
        Value::Number(number) => {
            context.update(b"#");
            feed_str(context, &number.to_string());
        }
        Value::String(text) => {
            context.update(b"s");
            feed_str(context, text);
        }
        Value::Array(items) => {
            context.update(b"[");
            context.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                feed_value(context, item);
            }
        }
        Value::Object(map) => {
            context.update(b"{");
            context.update(&(map.len() as u64).to_le_bytes());
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by_key(|(name, _)| *name);
            for (name, item) in entries {
                feed_str(context, name);
                feed_value(context, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use flowgrid_model::{AttemptId, Millis, RunId};
    use serde_json::json;
    use tokio::sync::oneshot::error::TryRecvError;
    use tokio_util::sync::CancellationToken;

    use crate::clock::now_ms;

    use super::{entry_key, Followed, Joined, SingleFlight};

    fn attempt(run: &str) -> AttemptId {
        AttemptId { run_id: RunId(run.into()), step: "fetch".into(), item: None, attempt: 1 }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn follow(flights: &SingleFlight, key: &str, run: &str) -> tokio::sync::oneshot::Receiver<Option<super::Landed>> {
        match flights.join(key.into(), &attempt(run), later()) {
            Joined::Follow(follower) => follower.landing,
            Joined::Lead => panic!("{run} should follow the flight of {key}"),
        }
    }

    #[test]
    fn misses_of_one_key_follow_the_first_and_take_its_result() {
        let flights = SingleFlight::default();
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        let (mut b, mut c) = (follow(&flights, "k", "b"), follow(&flights, "k", "c"));
        // Another key is another flight.
        assert!(matches!(flights.join("other".into(), &attempt("d"), later()), Joined::Lead));
        assert!(b.try_recv().is_err(), "nothing before the leader's result");
        flights.land("k", &json!({"answer": 42}), now_ms());
        assert_eq!(b.try_recv().unwrap().map(|landed| landed.output), Some(json!({"answer": 42})));
        assert_eq!(c.try_recv().unwrap().map(|landed| landed.output), Some(json!({"answer": 42})));
        // Landed: the next miss leads again.
        assert!(matches!(flights.join("k".into(), &attempt("e"), later()), Joined::Lead));
    }

    /// A follower reads its leader's result with its own step's `ttl_ms`: a stored result
    /// fresh for the leader's longer one is too old for a step that takes a shorter one.
    #[tokio::test]
    async fn a_follower_takes_a_stored_result_only_if_it_is_fresh_for_its_own_step() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        let (short, long) = (follower(&flights, "short", 1_000), follower(&flights, "long", 86_400_000));
        until_followers(&flights, 2).await;
        // Stored a minute ago: fresh for a day, too old for a second.
        flights.land("k", &json!("old"), now_ms() - 60_000);
        assert_eq!(short.await.unwrap(), Followed::ToWorker, "the short ttl's task goes to a worker");
        assert_eq!(long.await.unwrap(), Followed::Took(json!("old")));
    }

    /// The run leading the flight of `k`, once `followers` follow it.
    async fn flight_with(flights: &SingleFlight, followers: usize) -> String {
        loop {
            let open = flights
                .flights
                .lock()
                .unwrap()
                .by_key
                .get("k")
                .map(|flight| (flight.leader.run_id.as_str().to_owned(), flight.followers.len()));
            match open {
                Some((leader, count)) if count == followers => return leader,
                _ => tokio::task::yield_now().await,
            }
        }
    }

    /// A task of `run` (with a step's `ttl_ms`) that joins the flight of `k`, as a spawned task.
    fn follower(
        flights: &std::sync::Arc<SingleFlight>,
        run: &'static str,
        ttl_ms: Millis,
    ) -> tokio::task::JoinHandle<Followed> {
        follower_of_shard(flights, run, ttl_ms, CancellationToken::new())
    }

    /// [`follower`] of a shard whose load is `loaded`.
    fn follower_of_shard(
        flights: &std::sync::Arc<SingleFlight>,
        run: &'static str,
        ttl_ms: Millis,
        loaded: CancellationToken,
    ) -> tokio::task::JoinHandle<Followed> {
        let flights = std::sync::Arc::clone(flights);
        tokio::spawn(async move {
            let deadline = later();
            let joined = flights.join("k".into(), &attempt(run), deadline);
            flights.follow(joined, "k".into(), &attempt(run), deadline, ttl_ms, &loaded).await
        })
    }

    /// The run whose attempt leads the flight of `k`, if one is open.
    fn leader_of_k(flights: &SingleFlight) -> Option<String> {
        let flights = flights.flights.lock().unwrap();
        flights.by_key.get("k").map(|flight| flight.leader.run_id.as_str().to_owned())
    }

    /// Until the flight of `k` has `count` followers.
    async fn until_followers(flights: &SingleFlight, count: usize) {
        while flights.flights.lock().unwrap().by_key.get("k").is_none_or(|flight| flight.followers.len() < count) {
            tokio::task::yield_now().await;
        }
    }

    /// Followers to whom the landed result is too old keep the single flight between them:
    /// one leads a new flight to a worker, the others follow it.
    #[tokio::test]
    async fn followers_to_whom_a_result_is_too_old_form_one_new_flight() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        let (b, c) = (follower(&flights, "b", 1_000), follower(&flights, "c", 1_000));
        until_followers(&flights, 2).await;
        flights.land("k", &json!("old"), now_ms() - 60_000);
        // One of them leads anew (its task goes to a worker), the other follows it.
        let rejoined = tokio::time::timeout(Duration::from_secs(5), until_followers(&flights, 1));
        assert!(rejoined.await.is_ok(), "no new flight: each follower went to a worker on its own");
        flights.land("k", &json!("new"), now_ms());
        let mut outcomes = vec![b.await.unwrap(), c.await.unwrap()];
        outcomes.sort_by_key(|outcome| matches!(outcome, Followed::Took(_)));
        assert_eq!(
            outcomes,
            vec![Followed::ToWorker, Followed::Took(json!("new"))],
            "one new leader, one follower of it"
        );
    }

    /// A shard that reloads or moves stops its lookups before it ends the flights its
    /// attempts led: its follower leads no new flight (the reload, or the next owner, sends
    /// its task again, after the one already with a worker), and the followers of shards
    /// that stay go on without it.
    #[tokio::test]
    async fn a_follower_whose_shard_reloaded_leads_no_flight_when_the_leader_ends() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        let reloaded = CancellationToken::new();
        // b (of a's shard) follows first, so that it would be the first to lead anew.
        let b = follower_of_shard(&flights, "b", 60_000, reloaded.clone());
        until_followers(&flights, 1).await;
        let c = follower(&flights, "c", 60_000);
        until_followers(&flights, 2).await;
        // As the shard's reload does: its load is cancelled, then its runs are forgotten.
        reloaded.cancel();
        flights.leader_gone(&attempt("a"));
        assert_eq!(b.await.unwrap(), Followed::Dropped, "b stopped");
        // c, of a shard that stays, leads (its task goes to a worker) and nothing else does.
        let led = tokio::time::timeout(Duration::from_secs(5), c).await;
        assert_eq!(led.expect("c waits for a flight b led").unwrap(), Followed::ToWorker, "c leads");
        assert_eq!(leader_of_k(&flights).as_deref(), Some("c"));
        // A follower whose load is cancelled while it waits stops waiting at once.
        let moved = CancellationToken::new();
        let d = follower_of_shard(&flights, "d", 60_000, moved.clone());
        until_followers(&flights, 1).await;
        moved.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), d).await;
        assert_eq!(stopped.expect("d stops at the cancel, not at its flight's end").unwrap(), Followed::Dropped);
        assert_eq!(leader_of_k(&flights).as_deref(), Some("c"), "c's flight goes on");
    }

    #[test]
    fn followers_go_to_workers_when_the_leader_ends_without_a_result() {
        let flights = SingleFlight::default();
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        let (mut b, mut c) = (follow(&flights, "k", "b"), follow(&flights, "k", "c"));
        // A follower's own end takes it out of the flight, and ends nothing else.
        flights.leader_gone(&attempt("b"));
        assert!(matches!(b.try_recv(), Err(TryRecvError::Closed)), "b left the flight");
        assert!(matches!(c.try_recv(), Err(TryRecvError::Empty)), "c still waits");
        assert_eq!(leader_of_k(&flights).as_deref(), Some("a"));
        flights.leader_gone(&attempt("a"));
        assert_eq!(c.try_recv().unwrap(), None);
        assert!(matches!(flights.join("k".into(), &attempt("d"), later()), Joined::Lead));
    }

    /// A follower whose attempt closed (its run cancelled or failed) drops its task, and
    /// leads no flight when its leader ends, whether it closed while it waited for the leader
    /// or after the leader's end woke it: a flight it led would never end, and the tasks of
    /// its key would wait for it until its deadline.
    #[tokio::test]
    async fn a_follower_whose_attempt_closed_leads_no_flight_when_its_leader_ends() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        // b follows first, so that it would be the first to lead anew.
        let b = follower(&flights, "b", 60_000);
        until_followers(&flights, 1).await;
        let c = follower(&flights, "c", 60_000);
        until_followers(&flights, 2).await;
        flights.leader_gone(&attempt("b"));
        let stopped = tokio::time::timeout(Duration::from_secs(5), b).await;
        assert_eq!(stopped.expect("b stops at its close, not at its flight's end").unwrap(), Followed::Dropped);
        flights.leader_gone(&attempt("a"));
        assert_eq!(c.await.unwrap(), Followed::ToWorker, "c leads");
        assert_eq!(leader_of_k(&flights).as_deref(), Some("c"));

        // d closes after c's end woke it, before it joins again (this test's runtime runs
        // one task at a time: d and e wait to run until the test's next await).
        let d = follower(&flights, "d", 60_000);
        until_followers(&flights, 1).await;
        let e = follower(&flights, "e", 60_000);
        until_followers(&flights, 2).await;
        flights.leader_gone(&attempt("c"));
        flights.leader_gone(&attempt("d"));
        assert_eq!(d.await.unwrap(), Followed::Dropped);
        assert_eq!(e.await.unwrap(), Followed::ToWorker, "e leads");
        assert_eq!(leader_of_k(&flights).as_deref(), Some("e"));
        // Nothing is left of b and d: e's end leaves no flight and no follower.
        flights.leader_gone(&attempt("e"));
        assert_eq!(flights.open.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    /// When a leader's deadline passes before its followers', one of them goes to a worker
    /// and the others follow it, as when its attempt ends without a result.
    #[tokio::test]
    async fn when_a_leader_times_out_one_follower_goes_to_a_worker_and_the_others_follow_it() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(matches!(flights.join("k".into(), &attempt("a"), soon), Joined::Lead));
        let followers: Vec<_> = ["b", "c", "d"]
            .into_iter()
            .map(|run| {
                let joined = flights.join("k".into(), &attempt(run), later());
                assert!(matches!(joined, Joined::Follow(_)), "{run} follows a");
                let flights = std::sync::Arc::clone(&flights);
                tokio::spawn(async move {
                    let loaded = CancellationToken::new();
                    flights.follow(joined, "k".into(), &attempt(run), later(), 60_000, &loaded).await
                })
            })
            .collect();
        // Past a's deadline: a new flight, led by one of them and followed by the two others
        // (a's had three followers until it ended).
        let relayed = tokio::time::timeout(Duration::from_secs(5), flight_with(&flights, 2));
        let leader = relayed.await.expect("no new flight: each follower went to a worker on its own");
        assert!(["b", "c", "d"].contains(&leader.as_str()), "{leader}");
        flights.land("k", &json!("answer"), now_ms());
        let mut outcomes = Vec::new();
        for follower in followers {
            outcomes.push(follower.await.unwrap());
        }
        outcomes.sort_by_key(|outcome| matches!(outcome, Followed::Took(_)));
        let expected = vec![Followed::ToWorker, Followed::Took(json!("answer")), Followed::Took(json!("answer"))];
        assert_eq!(outcomes, expected, "one new leader, two followers of it");
    }

    #[tokio::test]
    async fn when_a_leader_fails_its_followers_form_one_new_flight_that_its_retry_follows_too() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        assert!(matches!(flights.join("k".into(), &attempt("a"), later()), Joined::Lead));
        let follower = |run: &'static str| follower(&flights, run, 60_000);
        let (b, c) = (follower("b"), follower("c"));
        assert_eq!(flight_with(&flights, 2).await, "a");
        flights.leader_gone(&attempt("a"));
        // One of b and c leads (its task goes to a worker); the other, and a's retry, follow it.
        assert!(["b", "c"].contains(&flight_with(&flights, 1).await.as_str()));
        let retry = AttemptId { attempt: 2, ..attempt("a") };
        let mut retried = match flights.join("k".into(), &retry, later()) {
            Joined::Follow(follower) => follower.landing,
            Joined::Lead => panic!("the retry follows the new flight"),
        };
        flights.land("k", &json!("answer"), now_ms());
        let mut outcomes = vec![b.await.unwrap(), c.await.unwrap()];
        outcomes.sort_by_key(|outcome| matches!(outcome, Followed::Took(_)));
        assert_eq!(outcomes, vec![Followed::ToWorker, Followed::Took(json!("answer"))], "one new leader, one follower");
        assert_eq!(retried.try_recv().unwrap().map(|landed| landed.output), Some(json!("answer")));
    }

    #[test]
    fn a_flight_past_its_deadline_or_joined_by_its_leader_is_led_anew() {
        let flights = SingleFlight::default();
        let past = Instant::now() - Duration::from_millis(1);
        assert!(matches!(flights.join("k".into(), &attempt("a"), past), Joined::Lead));
        assert!(matches!(flights.join("k".into(), &attempt("b"), later()), Joined::Lead), "over: b leads");
        let mut c = follow(&flights, "k", "c");
        // The leader's task again (delivered twice): it leads, its followers go to workers.
        assert!(matches!(flights.join("k".into(), &attempt("b"), later()), Joined::Lead));
        assert_eq!(c.try_recv().unwrap(), None);
        flights.leader_gone(&attempt("b"));
        assert!(matches!(flights.join("k".into(), &attempt("d"), later()), Joined::Lead), "no flight left open");
    }

    #[test]
    fn keys_ignore_the_order_of_object_fields_and_nothing_else() {
        let key = entry_key("gpu", "embed", &json!({"a": 1, "b": [true, null, "x"]}));
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase()));
        assert_eq!(key, entry_key("gpu", "embed", &json!({"b": [true, null, "x"], "a": 1})));
        let others = [
            entry_key("gpu", "embed", &json!({"a": 1, "b": [null, true, "x"]})),
            entry_key("gpu", "embed", &json!({"a": "1", "b": [true, null, "x"]})),
            entry_key("gpu", "embed2", &json!({"a": 1, "b": [true, null, "x"]})),
            entry_key("gpu2", "embed", &json!({"a": 1, "b": [true, null, "x"]})),
            // The pool and task names are delimited: "gp" + "uembed" is another key.
            entry_key("gp", "uembed", &json!({"a": 1, "b": [true, null, "x"]})),
        ];
        for other in others {
            assert_ne!(key, other);
        }
        assert_ne!(entry_key("p", "t", &json!(["ab"])), entry_key("p", "t", &json!(["a", "b"])));
        assert_ne!(entry_key("p", "t", &json!(null)), entry_key("p", "t", &json!("n")));
    }
}
