//! Triggers: the owner of a flow's catalog shard starts a run of the flow's latest version
//! for every message of the stream its `trigger` names.
//!
//! One durable pull consumer per flow (`<grid>_trigger_<flow>` on the trigger's stream)
//! keeps the place in the stream, so a catalog shard that moves to another coordinator
//! goes on where its last owner stopped, and a message out but not acknowledged comes back
//! after the consumer's ack wait. A run's idempotency key is `trigger/<stream>/<stream
//! sequence>`: a message delivered twice starts one run. A stream made again after the
//! trigger was first deployed (deleted by hand, or lost with NATS's store) numbers its
//! messages from 1 again: its keys are `trigger/<stream>/<its creation, Unix ns>/<sequence>`,
//! so they do not find the runs of the stream before, and its consumer reads it from its
//! first message, as every one was published after the trigger was deployed. On a stream
//! with work-queue retention, which NATS lets a consumer read only from its first message,
//! a consumer made again reads from there too: such a stream holds only the messages not
//! acknowledged yet, and their keys find the runs they started. A message is acknowledged
//! once the run's start is committed; one that is not JSON, whose input expression fails,
//! or whose start is refused for good (an input over the payload limit), is logged, counted
//! and not delivered again.
//!
//! A message is pulled only when its start can begin at once (a pull asks for no more
//! messages than there are free permits), so the time it is out is its start's, at most
//! [`START_TIMEOUT`], under the consumer's [`ACK_WAIT`]: the stream does not deliver it
//! again while it is being started. Once a trigger is stopped (its flow paused, another
//! version deployed) it pulls and starts nothing more: a start that had not begun gives
//! its message back to the stream at once, for the next reader, and so does a message that
//! the pull open at the stop still brings.
//!
//! Under `--retain-ended-runs`, a message whose run may have been deleted (it was
//! published, and the trigger first deployed, longer ago than the retention) is
//! not started: the consumer made again (deleted by hand, or lost) reads from the flow's
//! first deploy, and a start for such a message would make a second run under the id of
//! one that ran and was deleted. It is logged, counted `too_old` and not delivered again.
//! A message published after the consumer that delivers it was made, and delivered for the
//! first time, had no run however old it is (the flow was paused, or had no trigger, for
//! longer than the retention): it starts its run.
//!
//! The consumer must acknowledge each message on its own (explicit acks): with `all`, the
//! acknowledgment of one message acknowledges every one before it, a start that is to come
//! back among them; with `none`, every message delivered counts as taken. A consumer made by
//! hand with another ack policy, which NATS does not let change, is not read: the trigger
//! logs what to do and tries again every few seconds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::RetentionPolicy;
use async_nats::jetstream::{AckKind, Message};
use flowgrid_model::{Evaluator, Expr, ExprError, FlowPlan, Millis, Scope, Trigger};
use flowgrid_proto::StartRun;
use flowgrid_sdk::Client;
use flowgrid_store::ShardStore;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::actor::ShardActor;
use crate::clock::now_ms;
use crate::metrics;
use crate::submit::{after_failed_start, retry_delay, AfterFailedStart, FAILED_RETRY_DELAY};

/// Messages of one trigger being started at once.
const STARTS_IN_FLIGHT_MAX: usize = 64;
/// How long a message may be out before the stream delivers it again.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long one start may take, under [`ACK_WAIT`] (and without the client's retries of
/// an overloaded grid): a start still under way when the stream delivers its message again
/// would start it twice at once, and fill the permits with copies.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a pull waits for messages before the next is asked for. A pull ends as soon as
/// it has the messages it asked for, so this bounds only an idle trigger's requests (and
/// how long a pull lost with the connection goes unnoticed).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Pause before the consumer is opened again after the stream could not be read.
const REOPEN_PAUSE: Duration = Duration::from_secs(5);

/// The triggers this shard's actor runs: one per flow of its catalog whose latest version
/// has one.
#[derive(Default)]
pub(super) struct Triggers {
    running: HashMap<String, (u32, CancellationToken)>,
}

impl<S: ShardStore> ShardActor<S> {
    /// Starts, moves to the new version, or stops the trigger of `plan`'s flow, of which
    /// `plan` is now the latest version. A paused flow's trigger stops; its consumer keeps
    /// its place, so the messages published meanwhile start their runs on the resume.
    pub(super) fn update_trigger(&mut self, plan: &Arc<FlowPlan>) {
        let paused = self.flow_pauses.contains_key(&plan.name);
        let running = &mut self.triggers.running;
        let Some(trigger) = plan.definition.trigger.as_ref().filter(|_| !paused) else {
            if let Some((_, stop)) = running.remove(&plan.name) {
                let why = if paused { "the flow is paused" } else { "the latest version has none" };
                info!(flow = %plan.name, "trigger stopped: {why}");
                stop.cancel();
            }
            return;
        };
        if running.get(&plan.name).is_some_and(|(version, _)| *version == plan.version) {
            return;
        }
        if let Some((_, stop)) = running.remove(&plan.name) {
            stop.cancel();
        }
        let stop = self.loaded.child_token();
        // When a version of the flow first read this stream.
        let since_ms = self.catalog.get(&plan.name).and_then(|versions| {
            let reading = versions.iter().filter(|entry| {
                entry.plan.definition.trigger.as_ref().is_some_and(|other| other.stream == trigger.stream)
            });
            reading.map(|entry| entry.deployed_ms).min()
        });
        let consumer = TriggerConsumer {
            client: self.context.client.clone().with_request_timeout(START_TIMEOUT).with_retry_budget(Duration::ZERO),
            name: self.context.subjects.trigger_consumer(&plan.name),
            flow: plan.name.clone(),
            version: plan.version,
            since_ms: since_ms.unwrap_or(0),
            retain_ended_ms: self.context.retain_ended_ms,
            too_old_warned: AtomicBool::new(false),
            trigger: trigger.clone(),
            input: plan.trigger_input.clone().map(|expr| (expr, Arc::clone(self.context.plans.evaluator()))),
        };
        tokio::spawn(consumer.run(stop.clone()));
        running.insert(plan.name.clone(), (plan.version, stop));
    }
}

struct TriggerConsumer {
    client: Client,
    name: String,
    flow: String,
    version: u32,
    /// When the first version of the flow that reads this stream was deployed (Unix ms).
    since_ms: Millis,
    /// How long an ended run stays in the store (`--retain-ended-runs`); `None` keeps them all.
    retain_ended_ms: Option<u64>,
    /// Whether a message too old to start was logged as a warning since the consumer was
    /// last opened: the others of a replay are logged at debug level.
    too_old_warned: AtomicBool,
    trigger: Trigger,
    /// The trigger's input expression, and the evaluator to run it.
    input: Option<(Expr, Arc<Evaluator>)>,
}

impl TriggerConsumer {
    /// Reads the stream and starts runs until `stop`; opens the consumer again after a
    /// failure (a stream deleted and made again, NATS away).
    async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(STARTS_IN_FLIGHT_MAX));
        let mut warned = false;
        while !stop.is_cancelled() {
            match this.consume(&permits, &stop, &mut warned).await {
                Ok(()) => return,
                Err(error) => {
                    if !warned {
                        warn!(flow = %this.flow, stream = %this.trigger.stream, error = %error, "trigger cannot read its stream; trying again every few seconds");
                        warned = true;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(REOPEN_PAUSE) => {}
                    }
                }
            }
        }
    }

    async fn consume(
        self: &Arc<Self>,
        permits: &Arc<Semaphore>,
        stop: &CancellationToken,
        warned: &mut bool,
    ) -> Result<(), String> {
        let stream =
            self.client.jetstream().get_stream(&self.trigger.stream).await.map_err(|error| error.to_string())?;
        let created_ns = stream.cached_info().created.unix_timestamp_nanos();
        let made_again = created_ns / 1_000_000 > i128::from(self.since_ms);
        let keys = if made_again {
            info!(flow = %self.flow, stream = %self.trigger.stream, "the trigger's stream was made after the trigger was deployed; its runs are keyed by its creation and it is read from its first message");
            format!("trigger/{}/{created_ns}/", self.trigger.stream)
        } else {
            format!("trigger/{}/", self.trigger.stream)
        };
        // From the first message published since the trigger was deployed: a consumer made
        // later (the flow paused meanwhile, its creation failing a while) misses none. A
        // work-queue stream takes only consumers that deliver all of it, which is what it
        // holds: the messages not acknowledged yet.
        let work_queue = stream.cached_info().config.retention == RetentionPolicy::WorkQueue;
        let deliver_policy = if made_again || work_queue {
            DeliverPolicy::All
        } else {
            let since = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.since_ms) * 1_000_000)
                .map_err(|error| format!("the trigger's deploy time {} is out of range: {error}", self.since_ms))?;
            DeliverPolicy::ByStartTime { start_time: since }
        };
        let config = pull::Config {
            durable_name: Some(self.name.clone()),
            description: Some(format!("flowgrid: starts a run of flow {} per message", self.flow)),
            filter_subject: self.trigger.subject.clone().unwrap_or_default(),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // No bound on the messages out at once (the server's default is 1,000): each
            // start that keeps failing stays out between its deliveries, and a thousand of
            // them would stop the trigger.
            max_ack_pending: -1,
            ..Default::default()
        };
        // Created, or updated to the latest version's subject and bounds. One made before
        // (by an earlier release, or by hand) keeps its deliver policy, which NATS does not
        // let change: it keeps its place in the stream.
        let consumer: PullConsumer = match stream.create_consumer(config.clone()).await {
            Ok(consumer) => consumer,
            Err(error) => {
                let existing: PullConsumer = stream.get_consumer(&self.name).await.map_err(|_| error.to_string())?;
                let ack_policy = existing.cached_info().config.ack_policy;
                if ack_policy != AckPolicy::Explicit {
                    return Err(flowgrid_sdk::trigger_stream::not_explicit_acks(
                        &self.trigger.stream,
                        &self.name,
                        ack_policy,
                    ));
                }
                let kept = pull::Config { deliver_policy: existing.cached_info().config.deliver_policy, ..config };
                match stream.update_consumer(kept).await {
                    Ok(updated) => updated,
                    Err(error) => {
                        warn!(flow = %self.flow, consumer = %self.name, error = %error, "trigger cannot update its consumer; it reads with the consumer as it is (its subject may be an earlier version's): delete the consumer (`nats consumer rm <stream> <consumer>`) to have it made afresh");
                        existing
                    }
                }
            }
        };
        if std::mem::take(warned) {
            // The next failure warns again.
            info!(flow = %self.flow, stream = %self.trigger.stream, "trigger reads its stream again");
        }
        self.too_old_warned.store(false, Ordering::Relaxed);
        debug!(flow = %self.flow, consumer = %self.name, "trigger reading its stream");
        // Unknown (out of range): no message counts as published after it.
        let consumer_created_ms =
            Millis::try_from(consumer.cached_info().created.unix_timestamp_nanos() / 1_000_000).unwrap_or(Millis::MAX);
        // A pull above the consumer's own bound (one made by hand) would be refused.
        let pull_max = usize::try_from(consumer.cached_info().config.max_batch).ok().filter(|&max| max > 0);
        let pull = |messages: usize| {
            let consumer = consumer.clone();
            async move {
                let messages = pull_max.map_or(messages, |max| messages.min(max));
                let pulled = consumer
                    .batch()
                    .max_messages(messages)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                    .map_err(|error| error.to_string())?;
                Ok(pulled.map(|message| message.map_err(|error| error.to_string())))
            }
        };
        let hand = |message, permit| {
            let this = self.clone();
            let keys = keys.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                this.start_unless_stopped(message, &keys, consumer_created_ms, &stop).await;
                drop(permit);
            });
        };
        let give_back = |message: Message| {
            debug!(flow = %self.flow, version = self.version, "trigger stopped as a pull delivered a message; it goes back to the stream");
            tokio::spawn(async move {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            });
        };
        read_messages(pull, permits, stop, hand, give_back).await
    }

    /// Starts the run of `message` unless the trigger was stopped since it was pulled: then
    /// it goes back to the stream at once, for the next reader (the flow's next version, or
    /// its resume), and no run of this version starts after the stop was answered.
    async fn start_unless_stopped(
        &self,
        message: Message,
        keys: &str,
        consumer_created_ms: Millis,
        stop: &CancellationToken,
    ) {
        if stop.is_cancelled() {
            debug!(flow = %self.flow, version = self.version, "trigger stopped before the message's start; it goes back to the stream");
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        }
        self.start(message, keys, consumer_created_ms).await;
    }

    /// Logs a message too old to start: a warning for the first since the consumer was
    /// opened, as a replay may hold many, then at debug level.
    fn warn_too_old(&self, sequence: u64, published_ms: Millis) {
        let retain_ms = self.retain_ended_ms.unwrap_or_default();
        if self.too_old_warned.swap(true, Ordering::Relaxed) {
            debug!(flow = %self.flow, stream = %self.trigger.stream, sequence, published_ms, "trigger message older than the retention of ended runs; no run started for it");
        } else {
            warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, published_ms, retain_ms, "trigger message published longer ago than --retain-ended-runs: its run may have ended and been deleted, and a start would run it a second time; no run started for it (others as old are logged at debug level)");
        }
    }

    /// The input of the run of a message: its payload, or what the trigger's `input`
    /// expression makes of it.
    fn input(&self, payload: Value, subject: &str, sequence: u64) -> Result<Value, ExprError> {
        let Some((expr, evaluator)) = &self.input else { return Ok(payload) };
        let message = json!({ "message": payload, "subject": subject, "sequence": sequence });
        evaluator.eval(expr, &Scope { input: Some(&message), ..Scope::default() })
    }

    /// Starts the run of one message, keyed `<keys><sequence>`, delivered by the consumer
    /// made at `consumer_created_ms`; acknowledges it once the start is committed.
    async fn start(&self, message: Message, keys: &str, consumer_created_ms: Millis) {
        let info = message.info().ok();
        let sequence = info.as_ref().map_or(0, |info| info.stream_sequence);
        let delivery = info.and_then(|info| {
            let published_ms = Millis::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok()?;
            Some(Delivery { published_ms, delivered: info.delivered, consumer_created_ms })
        });
        let too_old = |delivery: &Delivery| run_may_be_deleted(delivery, self.since_ms, self.retain_ended_ms, now_ms());
        if let Some(Delivery { published_ms, .. }) = delivery.filter(too_old) {
            self.warn_too_old(sequence, published_ms);
            count(&self.flow, "too_old");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
        let payload: serde_json::Value = match serde_json::from_slice(&message.payload) {
            Ok(payload) => payload,
            Err(error) => {
                warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "trigger message is not JSON; no run started for it");
                count(&self.flow, "malformed");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let input = match self.input(payload, message.subject.as_str(), sequence) {
            Ok(input) => input,
            Err(error) => {
                warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "the trigger's input expression failed for this message; no run started for it");
                count(&self.flow, "input_failed");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let start = StartRun {
            flow: self.flow.clone(),
            version: Some(self.version),
            input,
            idempotency_key: Some(format!("{keys}{sequence}")),
            labels: self.trigger.labels.clone(),
            start_at_ms: None,
        };
        match self.client.start(start).await {
            Ok(started) => {
                debug!(flow = %self.flow, sequence, run = %started.run_id, created = started.created, "trigger started a run");
                count(&self.flow, "started");
                let _ = message.double_ack().await;
            }
            Err(error) => match error.api().map_or(AfterFailedStart::Soon, after_failed_start) {
                AfterFailedStart::Soon => {
                    debug!(flow = %self.flow, sequence, error = %error, "trigger start not taken yet; the message comes back");
                    let _ = message.ack_with(AckKind::Nak(Some(retry_delay(&message)))).await;
                }
                AfterFailedStart::Later => {
                    warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "trigger start failed on the grid's side (it may have been applied); the message comes back in {FAILED_RETRY_DELAY:?}");
                    let _ = message.ack_with(AckKind::Nak(Some(FAILED_RETRY_DELAY))).await;
                }
                AfterFailedStart::Refused => {
                    warn!(flow = %self.flow, stream = %self.trigger.stream, sequence, error = %error, "trigger message refused; no run started for it");
                    count(&self.flow, "refused");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            },
        }
    }
}

/// When a message the trigger comes to start was published, and what its consumer tells of
/// it.
#[derive(Clone, Copy, Debug)]
struct Delivery {
    /// When the stream took the message (Unix ms).
    published_ms: Millis,
    /// How often its consumer delivered it, this time included.
    delivered: i64,
    /// When the consumer that delivered it was made (Unix ms).
    consumer_created_ms: Millis,
}

/// Whether the run of a message, `delivery`, may have been deleted at `now_ms` under a
/// retention of ended runs of `retain_ended_ms`, for a trigger first deployed at
/// `first_deploy_ms`. That run started after the message was published and after the
/// deploy, and ended later still; a run is deleted once it ended longer ago than the
/// retention. A message published after its consumer was made and delivered for the first
/// time had no run: no reader had it before.
fn run_may_be_deleted(
    delivery: &Delivery,
    first_deploy_ms: Millis,
    retain_ended_ms: Option<u64>,
    now_ms: Millis,
) -> bool {
    let Some(retain_ms) = retain_ended_ms else { return false };
    let never_read = delivery.delivered == 1 && delivery.published_ms > delivery.consumer_created_ms;
    !never_read && delivery.published_ms.max(first_deploy_ms) < now_ms.saturating_sub(retain_ms)
}

/// Reads messages until `stop`, each pull asking for no more than the free `permits`, and
/// hands each message to `hand` with the permit its start holds: a message never waits for
/// a permit once delivered, so its time out is its start's. Once `stop` is cancelled
/// nothing more is pulled nor handed over (the stop comes first whatever else is ready):
/// what the pull then open still brings, until it ends, goes to `give_back`, as NATS
/// delivers to a pull asked for though its reader went away, and each such message would
/// wait out the ack wait. `pull(n)` asks the consumer for at most `n` messages; an error of
/// a pull, or a pull that ends at once with no message (its consumer gone), ends the
/// reading with it.
async fn read_messages<M, P, F, Pulled>(
    mut pull: P,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
    mut hand: impl FnMut(M, OwnedSemaphorePermit),
    mut give_back: impl FnMut(M),
) -> Result<(), String>
where
    P: FnMut(usize) -> F,
    F: Future<Output = Result<Pulled, String>>,
    Pulled: Stream<Item = Result<M, String>> + Unpin,
{
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            permit = Arc::clone(permits).acquire_owned() => permit,
        };
        let Ok(first) = first else { return Ok(()) };
        let mut granted = vec![first];
        while let Ok(permit) = Arc::clone(permits).try_acquire_owned() {
            granted.push(permit);
        }
        let pulled_at = Instant::now();
        // Not raced with `stop`: asking takes no wait for messages, and a pull asked for is
        // read to its end.
        let mut pulled = pull(granted.len()).await?;
        let mut handed = 0_usize;
        let mut stopped = false;
        loop {
            let next = if stopped {
                pulled.next().await
            } else {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        stopped = true;
                        continue;
                    }
                    next = pulled.next() => next,
                }
            };
            match next {
                Some(Ok(message)) if stopped => give_back(message),
                Some(Ok(message)) => {
                    let permit = granted.pop().ok_or("a pull delivered more messages than it asked for")?;
                    hand(message, permit);
                    handed += 1;
                }
                Some(Err(_)) | None if stopped => return Ok(()),
                Some(Err(error)) => return Err(error),
                None if handed == 0 && pulled_at.elapsed() < PULL_EXPIRES / 2 => {
                    return Err("a pull of the consumer ended at once with no message".to_owned())
                }
                None => break,
            }
        }
    }
}

fn count(flow: &str, outcome: &'static str) {
    ::metrics::counter!(metrics::TRIGGER_MESSAGES, "flow" => flow.to_owned(), "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::pin::pin;

    use futures::{stream, FutureExt};

    use super::*;

    const DAY_MS: Millis = 86_400_000;

    /// A message published at `published_ms`, delivered `delivered` times by a consumer made
    /// at `consumer_created_ms`.
    fn delivery(published_ms: Millis, delivered: i64, consumer_created_ms: Millis) -> Delivery {
        Delivery { published_ms, delivered, consumer_created_ms }
    }

    #[test]
    fn a_message_s_run_may_be_deleted_once_it_and_the_first_deploy_are_older_than_the_retention() {
        let now = 100 * DAY_MS;
        let retain = Some(30 * DAY_MS);
        // Each delivered by a consumer made after it was published (made again, or by hand).
        let again = 90 * DAY_MS;
        assert!(
            run_may_be_deleted(&delivery(60 * DAY_MS, 1, again), 50 * DAY_MS, retain, now),
            "published 40 days ago"
        );
        assert!(
            !run_may_be_deleted(&delivery(80 * DAY_MS, 1, again), 50 * DAY_MS, retain, now),
            "published 20 days ago"
        );
        // A consumer made by hand before the first deploy hands over older messages: their
        // runs started after the deploy.
        assert!(
            !run_may_be_deleted(&delivery(10 * DAY_MS, 1, again), 80 * DAY_MS, retain, now),
            "deployed 20 days ago"
        );
        assert!(!run_may_be_deleted(&delivery(0, 1, again), 0, None, now), "without a retention every run is kept");
    }

    /// A flow paused (or without a trigger) for longer than the retention: its consumer,
    /// made at the first deploy, kept its place, and delivers the messages published
    /// meanwhile for the first time.
    #[test]
    fn a_message_first_delivered_by_a_consumer_made_before_it_was_published_had_no_run() {
        let now = 100 * DAY_MS;
        let retain = Some(30 * DAY_MS);
        let deployed = 10 * DAY_MS;
        let first = delivery(60 * DAY_MS, 1, deployed);
        assert!(!run_may_be_deleted(&first, deployed, retain, now), "published 40 days ago, never read: {first:?}");
        // Delivered before: that delivery may have started its run.
        let again = delivery(60 * DAY_MS, 2, deployed);
        assert!(run_may_be_deleted(&again, deployed, retain, now), "{again:?}");
    }

    /// What a pull of the tests delivers: `count` messages, numbered from 0, then its end.
    type Pulled = stream::Iter<std::vec::IntoIter<Result<usize, String>>>;

    fn messages(count: usize) -> Pulled {
        stream::iter((0..count).map(Ok).collect::<Vec<_>>())
    }

    /// Pulls that deliver at once what they ask for and end, as pulls of a stream with a
    /// backlog do, recording in `asked` what each asked for.
    fn backlog(
        asked: &RefCell<Vec<usize>>,
    ) -> impl FnMut(usize) -> futures::future::Ready<Result<Pulled, String>> + '_ {
        |count| {
            asked.borrow_mut().push(count);
            futures::future::ready(Ok(messages(count)))
        }
    }

    #[tokio::test]
    async fn a_stop_comes_before_the_messages_already_pulled() {
        // Either of two ready branches may be taken unless the stop is polled first: many
        // rounds show a stop that is not.
        for _ in 0..64 {
            let permits = Arc::new(Semaphore::new(STARTS_IN_FLIGHT_MAX));
            let stop = CancellationToken::new();
            let pull = |count: usize| {
                let stop = stop.clone();
                async move {
                    // The flow is paused while the pull's messages arrive.
                    stop.cancel();
                    Ok(messages(count))
                }
            };
            let (mut handed, mut given_back) = (Vec::new(), Vec::new());
            let read = read_messages(
                pull,
                &permits,
                &stop,
                |message, _| handed.push(message),
                |message| given_back.push(message),
            )
            .await;
            assert_eq!(read, Ok(()));
            assert_eq!(handed, Vec::<usize>::new(), "no message is handed to a start after the stop");
            assert_eq!(given_back.len(), STARTS_IN_FLIGHT_MAX, "the pull's messages go back to the stream");
        }
    }

    #[tokio::test]
    async fn a_stop_while_every_start_is_under_way_pulls_nothing() {
        let permits = Arc::new(Semaphore::new(STARTS_IN_FLIGHT_MAX));
        let busy = Arc::clone(&permits).try_acquire_many_owned(STARTS_IN_FLIGHT_MAX as u32).expect("free permits");
        let stop = CancellationToken::new();
        let asked = RefCell::new(Vec::new());
        let mut read = pin!(read_messages(backlog(&asked), &permits, &stop, |_, _| {}, |_| {}));
        assert_eq!((&mut read).now_or_never(), None, "waiting for a start to end");
        // The stop, and a start that ends, before the reader runs again.
        stop.cancel();
        drop(busy);
        assert_eq!(read.await, Ok(()));
        assert_eq!(asked.take(), Vec::<usize>::new(), "nothing pulled after the stop");
    }

    #[tokio::test]
    async fn a_pull_asks_for_no_more_messages_than_starts_may_begin() {
        let permits = Arc::new(Semaphore::new(STARTS_IN_FLIGHT_MAX));
        let _busy = Arc::clone(&permits).try_acquire_many_owned(60).expect("free permits");
        let stop = CancellationToken::new();
        let asked = RefCell::new(Vec::new());
        let mut starting = Vec::new();
        let start = |message, permit| {
            starting.push((message, permit));
            if starting.len() == 4 {
                stop.cancel();
            }
        };
        let read = read_messages(backlog(&asked), &permits, &stop, start, |_| {}).await;
        assert_eq!(read, Ok(()));
        assert_eq!(asked.take(), [4], "the free permits, not the batch of a stream");
        assert_eq!(starting.len(), 4);
    }
}
