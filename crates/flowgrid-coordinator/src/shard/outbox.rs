//! Messages a shard's commits decide and others must get: a subflow step's child start,
//! the child's end for its parent, the cancel of a child whose parent ended, and the
//! announcement of a run's end (flows with `publish_ended`).
//!
//! A child's end, a child's cancel and a run's announcement are decided in a commit of
//! one shard and must reach another shard (whoever owns it then) or the run-ends stream.
//! They are written to the deciding shard's outbox in that same commit
//! (`("outbox", run, what)`), sent after it, and deleted once the receiver took them (its
//! own commit is durable, or the stream acknowledged); a shard that is acquired or
//! reloaded sends every message left in its outbox again. Receivers take a message once
//! (a child's end only while the step waits for that child; a cancel of a run that ended
//! changes nothing; the stream drops an announcement it has within its duplicate window),
//! so sending one twice is harmless.
//!
//! A child's start needs no outbox: the parent's state says which children it waits
//! for, and a reload starts them again (the child's run id follows from its parent, so
//! a child that exists is not started twice).
//!
//! A message may be written again under its key while an earlier copy is on its way (a
//! child's cancel for a run redriven at once): each write is numbered, and a delivery
//! deletes the message only if no later write replaced it, so the later one is still sent.
//!
//! Each message is sent by a task of its own until it is taken or the shard stops here,
//! waiting longer between tries (up to [`RETRY_MAX`]); at most [`IN_FLIGHT_MAX`] requests
//! (and outbox reads) are out at once per coordinator. A message waiting for its turn
//! holds only its key: it is read from the store when sent, so an outage of a receiver
//! does not fill memory with child outputs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use flowgrid_engine::{ChildStart, Run, RunStatus, TaskError};
use flowgrid_model::{ParentRef, RunId};
use flowgrid_proto::{ChildRunEnded, ErrorCode, RunEnded, StartChildRun};
use flowgrid_sdk::backoff::Backoff;
use flowgrid_sdk::Error as ClientError;
use flowgrid_store::{keys, printable_key, ShardStore};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::actor::ShardActor;
use super::batch::Batch;
use super::gates::GateVerb;
use super::runs::child_end_within;
use super::Command;
use crate::error::Result;
use crate::metrics;
use crate::records::{self, OutboxRecord};
use crate::submit::refused_for_good;

/// Requests for other shards' runs out at once per coordinator.
pub const IN_FLIGHT_MAX: usize = 64;
/// First and longest pause between two tries of one message.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often a cancel that finds no child is tried again when this coordinator is not
/// starting that child: its start may still be on its way from another one.
const CANCEL_NOT_FOUND_TRIES: u32 = 20;

/// Whether a cancel that found no child (again) is given up: `not_found` counts its answers
/// that found none, this one included. It is tried again after the first such answer and
/// [`CANCEL_NOT_FOUND_TRIES`] more times, then dropped.
fn missing_child_given_up(not_found: &AtomicU32) -> bool {
    not_found.fetch_add(1, Ordering::Relaxed) >= CANCEL_NOT_FOUND_TRIES
}

/// The child runs this coordinator is starting right now. A cancel that finds no child
/// waits while the child's start is on its way here, so a child started just after its
/// parent ended is cancelled too.
#[derive(Default)]
pub struct ChildrenStarting(Mutex<HashMap<RunId, u32>>);

impl ChildrenStarting {
    /// Marks `child` as being started until the guard is dropped.
    fn begin(self: &Arc<Self>, child: RunId) -> StartingGuard {
        *self.0.lock().expect("children starting lock").entry(child.clone()).or_default() += 1;
        StartingGuard { starting: Arc::clone(self), child }
    }

    fn contains(&self, child: &RunId) -> bool {
        self.0.lock().expect("children starting lock").contains_key(child)
    }
}

/// Unmarks a child when its start is over.
struct StartingGuard {
    starting: Arc<ChildrenStarting>,
    child: RunId,
}

impl Drop for StartingGuard {
    fn drop(&mut self) {
        let mut starting = self.starting.0.lock().expect("children starting lock");
        if let Some(count) = starting.get_mut(&self.child) {
            *count -= 1;
            if *count == 0 {
                starting.remove(&self.child);
            }
        }
    }
}

/// What one try of a message came to.
enum Sent {
    /// The receiver took it (or will never need it): done.
    Taken,
    /// Not this time: try again later.
    Again,
}

/// The number of the latest write of each message waiting in the outbox: a delivery deletes
/// its message only if it was sent for that write (one sent for an earlier write may have
/// carried the earlier content). Shared by the actor's `&self` methods, hence the lock (only
/// the actor takes it).
#[derive(Default)]
pub struct OutboxWrites(Mutex<Writes>);

#[derive(Default)]
struct Writes {
    next: u64,
    latest: HashMap<Vec<u8>, u64>,
}

impl OutboxWrites {
    /// Notes a write of the message at `key`; returns its number.
    fn wrote(&self, key: &[u8]) -> u64 {
        let mut writes = self.0.lock().expect("outbox writes lock");
        writes.next += 1;
        let number = writes.next;
        writes.latest.insert(key.to_vec(), number);
        number
    }

    /// Whether the message at `key`, delivered as written by write `number`, is to be
    /// deleted: only if no later write replaced it (then it is forgotten here).
    fn delivered(&self, key: &[u8], number: u64) -> bool {
        let mut writes = self.0.lock().expect("outbox writes lock");
        if writes.latest.get(key) != Some(&number) {
            return false;
        }
        writes.latest.remove(key);
        true
    }

    /// Forgets every write (a reload numbers the messages it finds anew), keeping the count
    /// going, so that a delivery of before the reload deletes nothing.
    fn forget(&self) {
        self.0.lock().expect("outbox writes lock").latest.clear();
    }
}

/// Outbox messages read per page when a reload lists them, at most, and their bytes.
const OUTBOX_PAGE_RECORDS: usize = 1_000;
const OUTBOX_PAGE_BYTES: usize = 4 << 20;

impl<S: ShardStore> ShardActor<S> {
    /// Puts `record` into the shard's outbox in this batch; it is sent after the commit.
    pub(super) fn send_after_commit(&self, record: OutboxRecord, batch: &mut Batch) {
        let key = record.key();
        batch.writes.set_chunked(&key, &records::encode(&record), &self.context.store_limits);
        let write = self.outbox_writes.wrote(&key);
        batch.outbox.push((key, write));
    }

    /// Deletes a message its receiver took in `batch`, unless a later write replaced it.
    pub(super) fn delete_delivered(&self, key: &[u8], write: u64, batch: &mut Batch) {
        if self.outbox_writes.delivered(key, write) {
            batch.writes.clear_range(keys::chunks_range(key));
        }
    }

    /// The keys of every message left in the outbox (after a reload: sent again), each with
    /// its write's number, read a page at a time: the messages themselves are read when
    /// their turn comes.
    pub(super) async fn load_outbox(&self) -> Result<Vec<(Vec<u8>, u64)>> {
        self.outbox_writes.forget();
        let mut range = keys::outbox_range();
        let mut found = Vec::new();
        loop {
            let page = self.store.scan_records(range.clone(), OUTBOX_PAGE_RECORDS, OUTBOX_PAGE_BYTES).await?;
            let next = page.records.last().map(|(last, _)| keys::chunks_range(last).end);
            found.extend(page.records.into_iter().map(|(key, _)| {
                let write = self.outbox_writes.wrote(&key);
                (key, write)
            }));
            match next {
                Some(next) if page.more => range.begin = next,
                _ => return Ok(found),
            }
        }
    }

    /// Sends the outbox message at `key` (written by write number `write`) until its
    /// receiver takes it, then deletes it from the outbox unless a later write replaced it.
    /// The message is read from the store at each try: a message waiting for a receiver
    /// that is down holds only its key in memory, and one deleted meanwhile is not sent.
    pub(super) fn deliver(&self, (key, write): (Vec<u8>, u64)) {
        let (client, permits) = (self.context.client.clone(), self.context.messages_in_flight.clone());
        let starting = Arc::clone(&self.context.children_starting);
        let (inbox, stopped, shard, store) = (self.inbox.clone(), self.loaded.clone(), self.shard, self.store.clone());
        let kind = records::outbox_kind(&key);
        let pending = Pending::new(kind);
        tokio::spawn(async move {
            let _pending = pending;
            let not_found = AtomicU32::new(0);
            let sent = until_done(&permits, &stopped, Some(kind), || async {
                let record = match read_message(&*store, &key).await {
                    Read::Message(record) => record,
                    Read::Gone => return Some(false),
                    Read::Failed => return None,
                };
                match send(&client, &record, &starting, &not_found).await {
                    Sent::Taken => Some(true),
                    Sent::Again => None,
                }
            })
            .await;
            if sent != Some(true) {
                return;
            }
            // Deleted by the shard's next commit; if the shard moved meanwhile, its next
            // owner sends the message again, and the receiver ignores the repeat.
            let deleted = match inbox.upgrade() {
                Some(inbox) => inbox.send(Command::OutboxDelivered { key, write }).await.is_ok(),
                None => false,
            };
            if !deleted {
                debug!(shard = %shard, "shard stopped before deleting a delivered message");
            }
        });
    }

    /// Starts the child run of a subflow step. A start the grid refuses for good (no such
    /// flow, a bad input, too deep: [`refused_for_good`]) is reported to the step as the
    /// child's failure; any other failure, an `internal` error too, is tried again.
    pub(super) fn start_child(&self, start: ChildStart, depth: u32) {
        let (client, permits) = (self.context.client.clone(), self.context.messages_in_flight.clone());
        let starting = Arc::clone(&self.context.children_starting);
        let stopped = self.loaded.clone();
        let pending = Pending::new(START_CHILD);
        tokio::spawn(async move {
            let _pending = pending;
            let starting_guard = starting.begin(start.child.clone());
            let request = StartChildRun {
                flow: start.flow.clone(),
                version: start.version,
                input: Arc::clone(&start.input),
                parent: ParentRef {
                    run_id: start.parent.clone(),
                    step: start.step.clone(),
                    item: start.item,
                    depth,
                    round: start.round,
                },
                labels: start.labels.clone(),
            };
            let outcome = until_done(&permits, &stopped, Some(START_CHILD), || async {
                match client.start_child(&request).await {
                    Ok(started) => {
                        debug!(parent = %start.parent, step = %start.step, child = %started.run_id, created = started.created, "child run started");
                        Some(None)
                    }
                    Err(ClientError::Api(refusal)) if refused_for_good(&refusal) => Some(Some(refusal)),
                    Err(error) => {
                        if worth_a_warning(&error) {
                            warn!(parent = %start.parent, step = %start.step, error = %error, "a child run's start failed; trying again later");
                        } else {
                            debug!(parent = %start.parent, step = %start.step, error = %error, "cannot start a child run yet; trying again");
                        }
                        None
                    }
                }
            })
            .await;
            drop(starting_guard);
            let Some(Some(refusal)) = outcome else { return };
            info!(parent = %start.parent, step = %start.step, flow = %start.flow, error = %refusal.message, "child run refused; its step fails");
            let ended = ChildRunEnded {
                parent: start.parent.clone(),
                step: start.step.clone(),
                item: start.item,
                child: start.child.clone(),
                status: RunStatus::Failed,
                output: None,
                error: Some(TaskError {
                    code: refusal.code.to_string(),
                    message: format!("the child run could not start: {}", with_issues(&refusal)),
                    retryable: false,
                }),
                refused: true,
            };
            // Not in the outbox: if this is lost, the parent's next owner starts the child
            // again and is refused again.
            send_until_taken(&client, &permits, &starting, &OutboxRecord::ChildEnded(ended), &stopped).await;
        });
    }
}

/// The depth of the child runs `run` starts: one below its own.
pub(super) fn child_depth(run: &Run) -> u32 {
    run.parent().map_or(1, |parent| parent.depth + 1)
}

/// What a read of an outbox message found.
enum Read {
    Message(Box<OutboxRecord>),
    /// Deleted (delivered by an earlier try or owner), or unreadable (logged, counted and
    /// kept): not sent.
    Gone,
    /// The store did not answer, for now: tried again.
    Failed,
}

/// Reads the outbox message at `key`, once. A message this version cannot read (it does not
/// decode, or the store refuses its chunks for good: they do not join) is not sent, and is
/// kept: a coordinator of another version may read it. It is logged with its key, run and
/// kind and counted in `flowgrid_run_messages_unreadable_total`, once per delivery (a reload
/// of the shard, or a later write of the message, tries it again).
async fn read_message<S: ShardStore>(store: &S, key: &[u8]) -> Read {
    let error = match store.get_chunked(key).await {
        Ok(Some(bytes)) => match records::decode::<OutboxRecord>("outbox message", &bytes) {
            Ok(record) => return Read::Message(Box::new(record)),
            Err(error) => error.to_string(),
        },
        Ok(None) => return Read::Gone,
        Err(error) if error.may_pass_later() => {
            debug!(key = %printable_key(key), error = %error, "cannot read an outbox message yet; trying again");
            return Read::Failed;
        }
        Err(error) => error.to_string(),
    };
    let kind = records::outbox_kind(key);
    let run = keys::decode_outbox(key).map_or_else(|_| "unknown".to_owned(), |(run, _)| run.to_string());
    warn!(
        key = %printable_key(key),
        run = %run,
        kind,
        error = %error,
        "an outbox message cannot be read; it is kept and not sent (a coordinator of the version that wrote it may \
         read it: upgrade this one, or inspect the key and delete it if no version can)"
    );
    ::metrics::counter!(metrics::RUN_MESSAGES_UNREADABLE, "kind" => kind).increment(1);
    Read::Gone
}

/// Sends `record` until its receiver takes it, waiting longer between tries; `false`
/// when the shard stopped serving here first.
async fn send_until_taken(
    client: &flowgrid_sdk::Client,
    permits: &Semaphore,
    starting: &ChildrenStarting,
    record: &OutboxRecord,
    stopped: &CancellationToken,
) -> bool {
    let not_found = AtomicU32::new(0);
    let sent = until_done(permits, stopped, Some(record.kind()), || async {
        match send(client, record, starting, &not_found).await {
            Sent::Taken => Some(()),
            Sent::Again => None,
        }
    })
    .await;
    sent.is_some()
}

/// Tries `attempt` until it gives `Some`, each try within the coordinator's bound on
/// requests out, waiting longer between tries; `None` when the shard stopped serving here
/// first. A repeated try counts in `flowgrid_run_messages_retried_total` under `retried`.
async fn until_done<T, Attempt, Tried>(
    permits: &Semaphore,
    stopped: &CancellationToken,
    retried: Option<&'static str>,
    mut attempt: Attempt,
) -> Option<T>
where
    Attempt: FnMut() -> Tried,
    Tried: std::future::Future<Output = Option<T>>,
{
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut again = false;
    loop {
        let done = {
            let Ok(_permit) = permits.acquire().await else { return None };
            if stopped.is_cancelled() {
                return None;
            }
            // Counted as it is made: a retry the shard's stop cut off never happened.
            if let Some(kind) = retried.filter(|_| again) {
                ::metrics::counter!(metrics::RUN_MESSAGES_RETRIED, "kind" => kind).increment(1);
            }
            again = true;
            tokio::select! {
                _ = stopped.cancelled() => return None,
                done = attempt() => done,
            }
        };
        if done.is_some() {
            return done;
        }
        tokio::select! {
            _ = stopped.cancelled() => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// The kind of message a child's start is, for metrics.
pub const START_CHILD: &str = "start_child";

/// Counts a message as pending from its creation until it is dropped (sent, or its shard
/// stopped here).
struct Pending(&'static str);

impl Pending {
    fn new(kind: &'static str) -> Pending {
        ::metrics::gauge!(metrics::RUN_MESSAGES_PENDING, "kind" => kind).increment(1.0);
        Pending(kind)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::RUN_MESSAGES_PENDING, "kind" => self.0).decrement(1.0);
    }
}

/// One try of an outbox message.
async fn send(
    client: &flowgrid_sdk::Client,
    record: &OutboxRecord,
    starting: &ChildrenStarting,
    not_found: &AtomicU32,
) -> Sent {
    let outcome = match record {
        OutboxRecord::ChildEnded(ended) => end_child(client, ended).await,
        OutboxRecord::CancelChild { child, reason } => client.cancel(child, reason.clone()).await.map(|_| ()),
        OutboxRecord::RunEnded(ended) => return announce(client, ended).await,
        OutboxRecord::GateAcquire(message) => client.gate(GateVerb::Acquire.api_verb(), message).await.map(|_| ()),
        OutboxRecord::GateRelease(message) => client.gate(GateVerb::Release.api_verb(), message).await.map(|_| ()),
        OutboxRecord::Admit(message) => client.gate(GateVerb::Admit.api_verb(), message).await.map(|_| ()),
        OutboxRecord::StartFailureHandler { failed, start, .. } => {
            return start_failure_handler(client, failed, start).await
        }
    };
    match outcome {
        Ok(()) => Sent::Taken,
        Err(ClientError::Api(refusal)) if refusal.code == ErrorCode::NotFound => match record {
            // The parent is gone (its retention passed): nobody waits for this end.
            OutboxRecord::ChildEnded(_) | OutboxRecord::RunEnded(_) => Sent::Taken,
            // Answered by `start_failure_handler` above; never reaches here.
            OutboxRecord::StartFailureHandler { .. } => Sent::Taken,
            // Never refused as missing: a run that is gone gives its admission back.
            OutboxRecord::GateAcquire(_) | OutboxRecord::GateRelease(_) | OutboxRecord::Admit(_) => Sent::Again,
            OutboxRecord::CancelChild { child, .. } => {
                if starting.contains(child) {
                    return Sent::Again;
                }
                if missing_child_given_up(not_found) {
                    debug!(child = %child, "no child run to cancel: it never started");
                    return Sent::Taken;
                }
                Sent::Again
            }
        },
        Err(error) => {
            if worth_a_warning(&error) {
                warn!(error = %error, "a message for another run was refused; trying again later");
            } else {
                debug!(error = %error, "cannot send a message for another run yet; trying again");
            }
            Sent::Again
        }
    }
}

/// Tells a parent of its child's end. An end the NATS server refuses as over its
/// `max_payload` (one under the grid's payload limit, which bounds the end when the child
/// ends) is sent again within the server's bound ([`child_end_within`]): the child's output
/// gives way to a `payload_too_large` error, which fails the parent's step, and an error
/// message too long is cut. It is dropped if even that is refused so: the same message
/// could only be refused again.
async fn end_child(client: &flowgrid_sdk::Client, ended: &ChildRunEnded) -> flowgrid_sdk::Result<()> {
    let refusal = match client.child_ended(ended).await {
        Err(ClientError::Api(refusal)) if refusal.code == ErrorCode::PayloadTooLarge => refusal,
        taken => return taken.map(|_| ()),
    };
    warn!(
        parent = %ended.parent,
        child = %ended.child,
        error = %refusal,
        "a child's end is over the NATS server's max_payload; its parent gets it within that bound, without the \
         child's output or with its error message cut (raise max_payload to the grid's payload limit and more)"
    );
    let max_payload = client.nats().server_info().max_payload;
    // What the server carries, less room for the subject, headers and a forwarding envelope.
    let bytes_max = max_payload.saturating_sub(flowgrid_proto::max_payload_needed(0));
    let output_over = |bytes| {
        format!(
            "its output could not be passed on: its end is {bytes} bytes, over what the NATS server carries (its \
             `max_payload` of {max_payload} bytes); raise `max_payload` in nats-server's configuration to the grid's \
             payload limit and more, or give the flow an `output` expression that picks what its caller needs"
        )
    };
    let smaller = child_end_within(ended.clone(), bytes_max, output_over);
    match client.child_ended(&smaller).await {
        Err(ClientError::Api(refusal)) if refusal.code == ErrorCode::PayloadTooLarge => {
            warn!(
                parent = %ended.parent,
                child = %ended.child,
                error = %refusal,
                "a child's end is over the NATS server's max_payload even without its output; it is dropped, and the \
                 parent's step waits until its timeout or the parent is cancelled"
            );
            Ok(())
        }
        taken => taken.map(|_| ()),
    }
}

/// Whether a failed request is logged as a warning: one the grid failed on or refused
/// (an `internal` error, a refusal, an answer that may have been applied), which trying
/// again may not mend, so that it needs looking at. One refused for now (overloaded, a
/// shard moving) or not answered is logged at debug level.
fn worth_a_warning(error: &ClientError) -> bool {
    matches!(error, ClientError::Api(refusal) if !refusal.retryable)
}

/// Starts the failure handler's run for the run `failed`. A start the grid refuses for good
/// (no such flow, an input its schema refuses: [`refused_for_good`]) is logged and dropped:
/// the failed run stays as it ended, and its view names the handler run that was meant to
/// start. Any other failure, an `internal` error too, is tried again.
async fn start_failure_handler(
    client: &flowgrid_sdk::Client,
    failed: &RunId,
    start: &flowgrid_proto::StartRun,
) -> Sent {
    match client.start(start.clone()).await {
        Ok(started) => {
            debug!(failed = %failed, handler = %started.run_id, flow = %start.flow, "failure handler started");
            Sent::Taken
        }
        Err(ClientError::Api(refusal)) if refused_for_good(&refusal) => {
            warn!(
                failed = %failed,
                flow = %start.flow,
                error = %refusal,
                "the failure handler's run was refused; it is not started (deploy the flow, or fix its input schema, \
                 and start it by hand)"
            );
            Sent::Taken
        }
        Err(error) => {
            if worth_a_warning(&error) {
                warn!(failed = %failed, flow = %start.flow, error = %error, "a failure handler's start failed; trying again later");
            } else {
                debug!(failed = %failed, error = %error, "cannot start a failure handler yet; trying again");
            }
            Sent::Again
        }
    }
}

/// Whether the run-ends stream does not exist (a failure to ask is not taken for that).
async fn run_ends_stream_gone(client: &flowgrid_sdk::Client) -> bool {
    use async_nats::jetstream::{context::GetStreamErrorKind, ErrorCode};
    match client.jetstream().get_stream(client.subjects().run_ends_stream()).await.map_err(|error| error.kind()) {
        Err(GetStreamErrorKind::JetStream(error)) => error.error_code() == ErrorCode::STREAM_NOT_FOUND,
        _ => false,
    }
}

/// Publishes a run's end on its flow's subject through JetStream, with the run id, its
/// creation time (and the redrive it ended after, if any) as the message id: the run-ends
/// stream keeps it (and drops a repeat within its duplicate window), and core subscribers
/// get it too. Taken once the stream acknowledged it. An end the NATS server refuses as
/// over its `max_payload` (one under the grid's payload limit, which bounds the
/// announcement when the run ends) is announced without its output and error message, or
/// dropped if even that is over: the same message could only be refused again.
async fn announce(client: &flowgrid_sdk::Client, ended: &RunEnded) -> Sent {
    let acked = match publish_end(client, ended).await {
        Err(error) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
            warn!(
                run = %ended.run_id,
                error = %error,
                "a run's end is over the NATS server's max_payload; it is announced without its data (raise \
                 max_payload to the grid's payload limit and more)"
            );
            publish_end(client, &without_data(ended)).await
        }
        acked => acked,
    };
    match acked {
        Ok(()) => Sent::Taken,
        Err(error) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
            warn!(
                run = %ended.run_id,
                error = %error,
                "a run's end is over the NATS server's max_payload even without its data; it is not announced"
            );
            Sent::Taken
        }
        // The run-ends stream was deleted (by hand, or with NATS's store): no stream answers
        // (or, with a plain subscriber on the subject, the publish times out). Make it again,
        // and the end goes out at the next try.
        Err(error)
            if error.kind() == PublishErrorKind::StreamNotFound
                || (error.kind() == PublishErrorKind::TimedOut && run_ends_stream_gone(client).await) =>
        {
            let limits = flowgrid_sdk::broker::BrokerLimits::default();
            match flowgrid_sdk::broker::run_ends_stream(client.jetstream(), client.subjects(), &limits).await {
                Ok(_) => warn!("the run-ends stream was gone; made it again"),
                Err(error) => debug!(error = %error, "cannot make the run-ends stream again; trying again"),
            }
            Sent::Again
        }
        Err(error) => {
            debug!(run = %ended.run_id, error = %error, "cannot announce a run's end yet; trying again");
            Sent::Again
        }
    }
}

/// One publish of `ended` as JSON, until the stream acknowledged it or refused it.
async fn publish_end(
    client: &flowgrid_sdk::Client,
    ended: &RunEnded,
) -> std::result::Result<(), async_nats::jetstream::context::PublishError> {
    // A plain data type: encoding it cannot fail.
    let payload = serde_json::to_vec(ended).expect("a run's end encodes to JSON");
    let mut headers = async_nats::HeaderMap::new();
    // A run made again under the id of a deleted one (its idempotency key reused) is
    // another run: its creation time keeps its end from passing for a duplicate.
    let message_id = match ended.redriven {
        0 => format!("{}:{}", ended.run_id, ended.created_ms),
        times => format!("{}:{}/r{times}", ended.run_id, ended.created_ms),
    };
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
    let subject = client.subjects().run_ended(&ended.flow);
    client.jetstream().publish_with_headers(subject, headers, payload.into()).await?.await.map(|_| ())
}

/// A run's end without its output, and with an error that says the data was left out (the
/// run's own error code, if it has one, stays).
fn without_data(ended: &RunEnded) -> RunEnded {
    let message = "left out: the run's end with its output or error is over the NATS server's max_payload; read the \
                   run for them"
        .to_owned();
    let error = match &ended.error {
        Some(error) => TaskError { code: error.code.clone(), message, retryable: error.retryable },
        None => TaskError { code: "payload_too_large".to_owned(), message, retryable: false },
    };
    RunEnded { output: None, error: Some(error), ..ended.clone() }
}

/// A refusal's message and its first located problems (an input its schema refuses), as
/// one line for a step's error.
fn with_issues(refusal: &flowgrid_proto::ApiError) -> String {
    /// Problems named in the step's error; the child's start would name them all.
    const ISSUES_SHOWN: usize = 5;
    let mut message = refusal.message.clone();
    for issue in refusal.issues.iter().take(ISSUES_SHOWN) {
        message.push_str(&format!("; {issue}"));
    }
    if refusal.issues.len() > ISSUES_SHOWN {
        message.push_str(&format!("; and {} more", refusal.issues.len() - ISSUES_SHOWN));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_counts_as_starting_until_its_last_start_is_over() {
        let starting = Arc::new(ChildrenStarting::default());
        let child = RunId("child".into());
        let first = starting.begin(child.clone());
        let again = starting.begin(child.clone());
        assert!(starting.contains(&child));
        drop(first);
        assert!(starting.contains(&child), "a second start of the same child is still on its way");
        drop(again);
        assert!(!starting.contains(&child));
        assert!(starting.0.lock().unwrap().is_empty(), "nothing is kept once every start is over");
    }

    /// A retry counts as it is made: one the shard's stop cut off during its backoff never
    /// happened, and is not counted.
    #[test]
    fn a_retry_counts_when_it_is_made() {
        let recording = crate::metrics::testing::Recording::new();
        let retried = || recording.sample("flowgrid_run_messages_retried_total{kind=\"child_ended\"}");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
        let permits = Semaphore::new(1);
        recording.record(|| {
            runtime.block_on(async {
                let stopped = CancellationToken::new();
                let tries = AtomicU32::new(0);
                let done = until_done(&permits, &stopped, Some("child_ended"), || async {
                    (tries.fetch_add(1, Ordering::Relaxed) == 2).then_some(())
                })
                .await;
                assert_eq!((done, tries.load(Ordering::Relaxed)), (Some(()), 3));
                assert_eq!(retried(), Some(2.0), "two retries made");

                // The shard stops while the message waits for its retry.
                let sent = until_done(&permits, &stopped, Some("child_ended"), || async {
                    stopped.cancel();
                    None::<()>
                })
                .await;
                assert_eq!(sent, None);
            })
        });
        assert_eq!(retried(), Some(2.0), "a retry that never happened is not counted:\n{}", recording.render());
    }

    /// A cancel that finds no child is tried again after that answer and
    /// [`CANCEL_NOT_FOUND_TRIES`] more times (while this coordinator is not starting the
    /// child), then dropped.
    #[test]
    fn a_cancel_that_finds_no_child_is_tried_again_as_often_as_said() {
        let not_found = AtomicU32::new(0);
        let mut tried_again = 0;
        while !missing_child_given_up(&not_found) {
            tried_again += 1;
            assert!(tried_again <= 2 * CANCEL_NOT_FOUND_TRIES, "never given up");
        }
        assert_eq!(tried_again, CANCEL_NOT_FOUND_TRIES, "tries after the first answer that found no child");
    }

    /// An outbox message this version cannot read (it does not decode, or its chunks do not
    /// join) is not sent, stays in the store, and is counted by its kind; a readable one is
    /// read and not counted.
    #[test]
    fn an_unreadable_message_is_counted_by_kind_and_kept() {
        use flowgrid_store::{StoreLimits, WriteBatch};

        use crate::shard::testing::{test_shard, TestShard};

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let TestShard { _dir, file, epoch } = runtime.block_on(test_shard());
        let limits = StoreLimits::default();
        let run = RunId("unreadable".into());
        // A release that would free a place, garbled: 0xc1 starts no MessagePack value.
        let garbled = keys::outbox(&run, &format!("{}.2", records::OUTBOX_GATE_RELEASE));
        let cut = keys::outbox(&run, records::OUTBOX_CHILD_ENDED);
        let readable = OutboxRecord::CancelChild { child: run.clone(), reason: "test".into() };
        let mut batch = WriteBatch::new();
        batch.set_chunked(&garbled, b"\xc1 garbled", &limits);
        // Over one value: written as several chunks, the last of which is then lost.
        batch.set_chunked(&cut, &vec![0x90; 2 * limits.value_bytes_max], &limits);
        batch.set_chunked(&readable.key(), &records::encode(&readable), &limits);
        runtime.block_on(file.commit(epoch, batch)).unwrap();
        let chunks = runtime.block_on(file.scan(keys::chunks_range(&cut), usize::MAX, false)).unwrap();
        assert!(chunks.len() > 1, "the message is chunked");
        let mut batch = WriteBatch::new();
        batch.clear(chunks.last().unwrap().0.clone());
        runtime.block_on(file.commit(epoch, batch)).unwrap();

        let recording = crate::metrics::testing::Recording::new();
        let unreadable = |kind: &str| {
            recording.sample(&format!("flowgrid_run_messages_unreadable_total{{kind=\"{kind}\"}}")).unwrap_or(0.0)
        };
        recording.record(|| {
            runtime.block_on(async {
                assert!(matches!(read_message(&file, &garbled).await, Read::Gone), "a message that does not decode");
                assert!(
                    matches!(read_message(&file, &cut).await, Read::Gone),
                    "chunks that do not join are not retried"
                );
                assert!(matches!(read_message(&file, &readable.key()).await, Read::Message(_)));
            })
        });
        let rendered = recording.render();
        assert_eq!(unreadable(records::OUTBOX_GATE_RELEASE), 1.0, "{rendered}");
        assert_eq!(unreadable(records::OUTBOX_CHILD_ENDED), 1.0, "{rendered}");
        assert_eq!(unreadable(records::OUTBOX_CANCEL_CHILD), 0.0, "{rendered}");
        for kept in [&garbled, &cut] {
            let left = runtime.block_on(file.scan(keys::chunks_range(kept), usize::MAX, false)).unwrap();
            assert!(!left.is_empty(), "an unreadable message is kept: {}", printable_key(kept));
        }
    }

    #[test]
    fn a_delivery_deletes_its_message_only_if_no_later_write_replaced_it() {
        let writes = OutboxWrites::default();
        let (cancel, other) = (b"cancel".to_vec(), b"other".to_vec());
        let first = writes.wrote(&cancel);
        let unrelated = writes.wrote(&other);
        // The run is redriven and cancelled again before the first copy's delivery is noted.
        let second = writes.wrote(&cancel);
        assert!(!writes.delivered(&cancel, first), "the first copy's delivery deleted the second write");
        assert!(writes.delivered(&cancel, second));
        assert!(!writes.delivered(&cancel, second), "a message is deleted once");
        assert!(writes.delivered(&other, unrelated), "another key's write is its own");
        assert!(writes.0.lock().unwrap().latest.is_empty(), "nothing is kept once delivered");

        // A reload numbers what it finds anew: a delivery of before it deletes nothing.
        let before = writes.wrote(&cancel);
        writes.forget();
        let reloaded = writes.wrote(&cancel);
        assert!(!writes.delivered(&cancel, before));
        assert!(writes.delivered(&cancel, reloaded));
    }
}
